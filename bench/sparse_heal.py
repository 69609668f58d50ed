"""Wanda 50% on SmolLM2-135M, then a short CPT heal that keeps the mask: held-out perplexity and the zero count.

Runs the product end to end with ``healer run`` on a recipe written here: prune (``method: sparse``, Wanda,
50% unstructured, C4 calibration), cpt (the mask re-applied after every optimizer step) on the corpus sample,
eval on WikiText-2 validation against the dense model. Prints dense / pruned / healed perplexity and the zero
count after pruning, after healing and in the eval, and exits non-zero unless healing lowered perplexity with
the zero count exactly the pruned one.

    python bench/sparse_heal.py [--run-dir runs/sparse-heal] [--steps 16] [--criterion wanda]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from healer.cli import main as healer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def recipe(args) -> dict:
    return {
        "name": f"smollm2-{args.criterion}-50-heal",
        "run_dir": args.run_dir,
        "model": {"source": "smollm2", "dtype": "float32"},
        "prune": {"method": "sparse", "criterion": args.criterion,
                  "sparsity": {"pattern": "unstructured", "ratio": 0.5},
                  "calibration": {"path": str(DATA / "calibration" / "c4-sample.jsonl"), "num_samples": 32,
                                  "seq_len": 128}},
        "data": {"sources": [{"path": str(DATA / "corpus" / "slimpajama-sample" / "train")}], "seq_len": 128},
        "cpt": {"zero_stage": 2, "micro_batch_size": 4, "global_batch_size": 8, "max_steps": args.steps,
                "lr": args.lr, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0,
                "save_every": args.steps, "log_every": 1},
        "eval": {"perplexity_files": [str(DATA / "eval" / "wikitext-2" / "wiki.valid.tokens")],
                 "context_lengths": [128], "max_tokens": args.eval_tokens, "compare_to": "dense"},
        "launch": {"nproc_per_node": 1},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/sparse-heal")
    parser.add_argument("--criterion", default="wanda", choices=("wanda", "sparsegpt", "magnitude"))
    parser.add_argument("--steps", type=int, default=16, help="CPT steps of 8 x 128 tokens")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    path = run.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe(args), sort_keys=False))
    code = healer(["run", str(path)])
    if code:
        return code
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "prune" / "prune_report.json").read_text())
    cpt = json.loads((run / "cpt" / "manifest.json").read_text())["outputs"]
    evaluated = json.loads((run / "eval" / "eval.json").read_text())
    rows = {r["label"]: r.get("perplexity") for r in summary["rows"]}
    pruned_zeros = report["sparsity"]["zeros"]
    healed_zeros = cpt["sparsity"]["zeros"]
    print(f"\n{args.criterion} 50% unstructured on SmolLM2-135M; heal: {cpt['steps']} CPT steps, "
          f"{cpt['tokens_trained']:,} tokens of the corpus sample; perplexity on WikiText-2 validation "
          f"({args.eval_tokens} tokens, 128-token windows)")
    print(f"  dense ppl {rows['dense']:.2f} | pruned ppl {rows['pruned']:.2f} | healed ppl {rows['healed (CPT)']:.2f}")
    print(f"  zeros: pruned {pruned_zeros:,} ({report['sparsity']['overall']:.2%}), after the heal {healed_zeros:,}, "
          f"in the evaluated model {evaluated['sparsity']['zeros']:,}; prune {report['elapsed_s']} s")
    ok = rows["healed (CPT)"] < rows["pruned"] and healed_zeros == pruned_zeros == evaluated["sparsity"]["zeros"]
    print("OK" if ok else "FAILED: healing must lower perplexity with the zero count exact")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

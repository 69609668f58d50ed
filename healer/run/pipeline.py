"""``healer run recipe.yaml``: prune -> cpt -> sft -> eval -> release, resumable, never silently stale.

Each stage writes its directory and, last, a completion manifest that records what the stage was built
from (``healer.run.stage_inputs``). Running again skips a finished stage only while those inputs still
match the recipe and the stages before it; when they do not, the run is refused before anything is
written, naming what changed. An interrupted stage resumes (the trainers pick up their newest
checkpoint). Training stages start through the launcher (local processes, a hostfile or SLURM, as
``launch:`` says); the others run in this process.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from healer.core.errors import HealerError
from healer.core.hashing import canonical_hash
from healer.core.lock import DirectoryLock
from healer.core.manifest import (
    MANIFEST,
    finished_manifest,
    read_stage_manifest,
    supersede_stage_manifest,
    write_json_atomic,
)
from healer.core.redact import redact_tree
from healer.recipe import Recipe, round_step_dirs
from healer.run.invoke import invoke
from healer.run.rounds import Step, step_inputs, steps_of
from healer.run.stage_inputs import describe_changes
from healer.stages import DISTRIBUTED_STAGES, MODEL_STAGES, STAGES, TRAINING_STAGES, VERBS

SUMMARY = "summary.json"


@dataclass
class Options:
    only: str | None = field(default=None, metadata={
        "help": f"comma-separated stages to run ({','.join(STAGES)}); the others are left as they are "
                "(prune: every round of prune.rounds)"})
    force: bool = field(default=False, metadata={
        "help": "run every stage again from scratch, even finished ones (training stages get --resume none)"})
    dry_run: bool = field(default=False, metadata={
        "help": "print the steps (each round of prune.rounds too) and which would run or be skipped; run nothing"})


def stages_of(recipe: Recipe) -> list[str]:
    """The labels of the steps ``healer run`` takes: the stages, with ``prune`` as ``roundK/prune``,
    ``roundK/cpt`` when the recipe has ``prune.rounds``."""
    return [step.label for step in steps_of(recipe, STAGES)]


def _selected(opts: Options) -> set[str] | None:
    if opts.only is None:
        return None
    only = {s.strip() for s in opts.only.split(",") if s.strip()}
    bad = only - set(STAGES)
    if bad or not only:
        raise HealerError(f"--only: unknown stage(s) {', '.join(sorted(bad)) or '(none given)'}; "
                          f"stages: {', '.join(STAGES)}")
    return only


def plan(recipe: Recipe, stages: list[str], only: set[str] | None, force: bool) -> list[tuple[str, bool]]:
    """(step, run it?) for the selected steps; refuses when a finished step no longer matches its inputs.

    ``stages`` are step labels (:func:`stages_of`). A finished step is skipped only while the inputs
    recorded in its manifest equal what the recipe and the steps before it give now. A step that runs
    again invalidates every finished step after it. Steps before the last selected one are checked even
    when not selected: a selected step must not be built on a stale one.
    """
    by_label = {step.label: step for step in steps_of(recipe, STAGES)}
    steps = [by_label[label] for label in stages]
    chosen = [i for i, step in enumerate(steps) if only is None or step.group in only]
    last = max(chosen, default=-1)
    reruns: list[str] = []
    stale: list[str] = []  # the refusal's lines
    stale_steps: list[str] = []
    out = []
    producers = {str(s.recipe.model_dir(s.stage)): s for s in steps if s.stage in MODEL_STAGES}
    available: set[str] = set()  # steps whose model exists when a later step starts: finished or run first
    for step in steps[:last + 1]:
        selected = only is None or step.group in only
        directory = step.recipe.stage_dir(step.stage)
        manifest = finished_manifest(directory)
        if selected and (force or manifest is None):
            _check_input_is_made(step, producers, available, only)
            reruns.append(step.label)
            available.add(step.label)
            out.append((step.label, True))
            continue
        if manifest is not None:
            available.add(step.label)
        if manifest is None:
            continue
        if reruns or stale_steps:
            changes = [f"built on {', '.join(reruns + stale_steps)}, which must run again"]
        else:
            recorded = manifest.get("inputs") or {}
            expected = step_inputs(step)
            changes = [] if recorded.get("hash") == canonical_hash(expected) \
                else describe_changes(recorded.get("values"), redact_tree(expected)) or ["a secret value changed"]
        if changes:
            stale_steps.append(step.label)
            stale.append(f"  {step.label} ({directory}): " + "; ".join(changes))
        elif selected:
            out.append((step.label, False))
    if stale:
        groups = list(dict.fromkeys(by_label[label].group for label in stale_steps))
        raise HealerError(
            f"{recipe.run_dir} holds finished stages built from other inputs than this recipe gives:\n"
            + "\n".join(stale)
            + f"\nto rebuild them, run again with --force --only {','.join(groups)} (or --force for every "
            "stage); to keep them, use a new run_dir (--run-dir DIR)")
    return out


def _check_gguf_before_training(recipe: Recipe, steps: list[tuple[str, bool]]) -> None:
    """``release.gguf`` for a family or layout GGUF cannot express is refused before hours of healing, not at
    the end of the release (pruning keeps the family and one width for every block)."""
    if recipe.release is None or not recipe.release.gguf or not any(run for _, run in steps):
        return
    from healer.model.modeling import load_config, resolve_source
    from healer.release.gguf_export import check_exportable

    check_exportable(load_config(resolve_source(recipe.model.source, recipe.model.gguf_file, recipe.model.revision)))


def _check_input_is_made(step, producers: dict, available: set[str], only: set[str] | None) -> None:
    """A step that would start from a stage's model that is neither finished nor run first is refused here,
    naming both, before any rank starts and fails on a missing directory."""
    source = step.recipe.stage_input(step.stage) if step.stage != "prune" else None
    producer = producers.get(source)
    if producer is None or producer.label in available or producer is step:
        return
    wanted = {producer.group, *(only or {step.group})}
    groups = ",".join(stage for stage in STAGES if stage in wanted)
    raise HealerError(f"{step.label} starts from {source}, which {producer.label} has not written (no finished "
                      f"{producer.label} in {producer.recipe.stage_dir(producer.stage)}); run it too (--only "
                      f"{groups}) or point {step.stage}.input at a model")


def run_pipeline(recipe: Recipe, opts: Options) -> int:
    """The ``healer run`` verb: every stage of ``recipe`` in order (``opts.only`` a subset, ``opts.force`` all anew)."""
    only = _selected(opts)
    stages = stages_of(recipe)
    if not stages:
        raise HealerError(f"the recipe has no stage sections ({', '.join(STAGES)})")
    run_dir = Path(recipe.run_dir)
    if opts.dry_run:
        print(format_plan(recipe, plan(recipe, stages, only, opts.force)))
        return 0
    with DirectoryLock(run_dir, "healer run"):
        steps = plan(recipe, stages, only, opts.force)
        _check_gguf_before_training(recipe, steps)
        run_dir.mkdir(parents=True, exist_ok=True)
        # Every process of every stage reads this one resolved file: the recipe as it is run now. Written
        # only after the checks above, so a refused run leaves the previous one's record as it was.
        resolved = run_dir / "recipe.yaml"
        from healer.launch.run import (
            write_rank_recipe,  # launch.env <redacted>: the ranks get it from their environment
        )

        write_rank_recipe(recipe, resolved)
        return _run(recipe, steps, resolved, opts.force)


def format_plan(recipe: Recipe, steps: list[tuple[str, bool]]) -> str:
    """``healer run --dry-run``: one line per step, what it does and whether it would run."""
    by_label = {step.label: step for step in steps_of(recipe, STAGES)}
    lines = [f"healer run {recipe.name}: {len(steps)} steps in {recipe.run_dir}"]
    for label, run in steps:
        step = by_label[label]
        what = f"  ({step.detail})" if step.detail else ""
        if step.stage == "cpt" and step.recipe is not recipe:
            what = f"  ({step.recipe.cpt.max_steps} steps from {step.recipe.stage_input('cpt')})"
        lines.append(f"  {label:<14} {'run' if run else 'finished, skip':<15} -> "
                     f"{step.recipe.stage_dir(step.stage)}{what}")
    return "\n".join(lines)


def _run(recipe: Recipe, steps: list[tuple[str, bool]], resolved: Path, force: bool) -> int:
    started = time.time()
    timings: dict[str, float] = {}
    by_label = {step.label: step for step in steps_of(recipe, STAGES)}
    print(f"healer run {recipe.name}: {' -> '.join(s for s, _ in steps)}  (run directory {recipe.run_dir})")
    if recipe.build_corpus is not None:
        _ensure_corpus(recipe.build_corpus.output, recipe.build_corpus.max_docs)
    # Every step this run rebuilds stops counting as finished now, not when its turn comes: if the run
    # is interrupted, the next `healer run` carries on with them instead of finding old results.
    for label, run in steps:
        if run:
            step = by_label[label]
            supersede_stage_manifest(step.recipe.stage_dir(step.stage))
    for label, run in steps:
        step = by_label[label]
        stage_dir = step.recipe.stage_dir(step.stage)
        if not run:
            print(f"[{label}] finished earlier with the same inputs ({stage_dir}); skipping")
            continue
        if step.stage == "release":
            write_summary(recipe)  # the model card shows the dense/pruned/healed table
        print(f"[{label}] starting -> {stage_dir}" + (f"  ({step.detail})" if step.detail else ""), flush=True)
        t0 = time.time()
        if step.stage == "cpt":  # KD from a cache: build or extend it first (one teacher pass, every round reuses it)
            from healer.train.distill_cache import ensure_cache

            ensure_cache(step.recipe)
        code = _run_step(step, recipe, resolved, force)
        timings[label] = round(time.time() - t0, 1)
        if code != 0:
            if code == 2:  # a refusal: the error above says what to change; resuming would refuse again
                print(f"[{label}] refused (exit code 2): change what the error above names, then run `healer run` "
                      "again")
            else:
                print(f"[{label}] stopped with exit code {code}; run `healer run` again to resume it")
            return code
        _check_finished(step)
        print(f"[{label}] done in {timings[label]:.0f} s", flush=True)

    summary = write_summary(recipe, timings, time.time() - started)
    print(format_summary(summary))
    return 0


def _run_step(step: Step, recipe: Recipe, resolved: Path, force: bool) -> int:
    if step.stage in DISTRIBUTED_STAGES:
        from healer.launch.run import run_stage, write_rank_recipe

        if step.recipe is not recipe:  # a round: its ranks read the round recipe
            resolved = Path(step.recipe.run_dir) / "recipe.yaml"
            write_rank_recipe(step.recipe, resolved)
        args = ["--resume", "none"] if force and step.stage in TRAINING_STAGES else []
        return run_stage(step.stage, str(resolved), args, step.recipe.launch)
    verb = VERBS[step.stage]
    _, options = verb.load()
    # The step's own inputs: a round's prune also records the round it prunes.
    return invoke(verb, step.recipe, options(), inputs=step_inputs(step))


def _check_finished(step: Step) -> None:
    """A step that exited 0 must have left a manifest recording the inputs this run gave it."""
    directory = step.recipe.stage_dir(step.stage)
    manifest = finished_manifest(directory)
    if manifest is None:
        raise HealerError(f"{step.label} exited without error but wrote no {directory / MANIFEST}; "
                          "its output is incomplete -- see the messages above")
    recorded = manifest.get("inputs") or {}
    expected = step_inputs(step)
    if recorded.get("hash") != canonical_hash(expected):
        changes = "; ".join(describe_changes(recorded.get("values"), redact_tree(expected))
                            or ["a secret value changed"])
        raise HealerError(f"{step.label} finished, but not from the inputs this run gave it ({changes}); "
                          "was another process writing it?")


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
    rounds = recipe.prune.rounds if recipe.prune is not None else None
    for k in range(1, len(rounds or ()) + 1):  # each round's pruned and healed model
        for label, directory in round_step_dirs(recipe):
            if label.startswith(f"round{k}/"):
                model = directory / "hf" if label.endswith("cpt") else directory
                if (model / "config.json").is_file():
                    out.append((f"round {k} {'healed' if label.endswith('cpt') else 'pruned'}", str(model)))
    for stage, label in (("prune", "pruned"), ("replace", "span replaced"), ("cpt", "healed (CPT)"),
                         ("sft", "instruction-tuned")):
        if stage == "prune" and rounds:
            continue  # the last round's rows above
        if getattr(recipe, stage) is not None and (recipe.model_dir(stage) / "config.json").is_file():
            out.append((label, str(recipe.model_dir(stage))))
    return out


def write_summary(recipe: Recipe, timings: dict | None = None, wall_s: float | None = None) -> dict:
    """Parameters and perplexity of the dense, pruned, healed and tuned models, saved as summary.json.

    Perplexity is measured exactly as the eval stage measures it (its first text file, its shortest
    context length, its token cap and BOS policy); numbers the eval stage already has are reused.
    """
    path = Path(recipe.run_dir) / SUMMARY
    previous = json.loads(path.read_text()) if path.is_file() else {}
    cached = {(r["label"], r["model"]): r for r in previous.get("rows", []) if r.get("stamp")}
    cfg = recipe.eval
    text_file = cfg.perplexity_files[0] if cfg is not None and cfg.perplexity_files else None
    if text_file is not None and not Path(text_file).is_file():
        text_file = None  # e.g. `--only prune,cpt` before the eval text exists: parameters only
    context = min(cfg.context_lengths) if cfg is not None and cfg.context_lengths else None
    evaluated = _eval_numbers(recipe, text_file, context)
    rows = []
    for label, source in checkpoints(recipe):
        stamp = _stamp(source)
        row = cached.get((label, source))
        if row is None or row["stamp"] != stamp:
            row = {"label": label, "model": source, "stamp": stamp, **_measure(recipe, source, text_file, context,
                                                                                evaluated.get(source))}
        rows.append(row)
    summary = {"recipe": recipe.name, "text": text_file, "context_length": context, "rows": rows,
               "release": str(recipe.stage_dir("release")) if recipe.release is not None else None,
               "stage_seconds": {**previous.get("stage_seconds", {}), **(timings or {})},
               "tokens_trained": _tokens_trained(recipe)}
    if recipe.prune is not None and recipe.prune.rounds:
        summary["rounds"] = [{"round": k, "ratio": r.ratio, "heal_tokens": r.heal_tokens,
                              "tokens_trained": summary["tokens_trained"].get(f"round{k}/cpt")}
                             for k, r in enumerate(recipe.prune.rounds, start=1)]
    if wall_s is not None:
        summary["wall_seconds_this_run"] = round(wall_s, 1)
    write_json_atomic(path, summary)
    return summary


def _eval_numbers(recipe: Recipe, text_file: str | None, context: int | None) -> dict[str, float]:
    """model source -> perplexity already in the eval stage's eval.json (the evaluated model and the dense one)."""
    from healer.eval.suite import EVAL_FILE, perplexity_labels

    eval_json = recipe.stage_dir("eval") / EVAL_FILE if recipe.eval is not None else None
    if text_file is None or eval_json is None or not eval_json.is_file():
        return {}
    result = json.loads(eval_json.read_text())
    # The eval stage's key for this file (its name, or its path below the common folder where two share one).
    name, ctx = perplexity_labels(recipe.eval.perplexity_files)[0], str(context)
    out = {}
    for source, numbers in ((result.get("source"), result), (recipe.model.source, result.get("dense") or {})):
        ppl = numbers.get("perplexity", {}).get(name, {}).get(ctx, {}).get("ppl")
        if source and ppl is not None:
            out[source] = ppl
    return out


def _measure(recipe: Recipe, source: str, text_file: str | None, context: int | None, known_ppl: float | None) -> dict:
    import torch

    from healer.eval.ppl import perplexity, read_text, tokenize
    from healer.model.modeling import (
        count_parameters,
        load_model,
        load_tokenizer,
        resolve_source,
    )

    location = resolve_source(source, recipe.model.gguf_file if source == recipe.model.source else None)
    model = load_model(location, torch.float32)
    row = {"params": count_parameters(model), "layers": model.config.num_hidden_layers,
           "intermediate_size": model.config.intermediate_size}
    if known_ppl is not None:
        row["perplexity"] = known_ppl
    elif text_file is not None:
        cfg = recipe.eval
        tokenizer = load_tokenizer(location)
        max_chars = cfg.max_tokens * 16 if cfg.max_tokens else None  # as the eval stage reads it
        ids = tokenize(tokenizer, read_text(text_file, max_chars), cfg.max_tokens)
        row["perplexity"] = perplexity(model, tokenizer, ids, context, bos=cfg.bos, batch_size=cfg.batch_size,
                                       progress=False)["ppl"]
    return row


def _stamp(model_source: str) -> float | None:
    """When a local checkpoint was written (a re-run stage invalidates its cached row)."""
    config = Path(model_source) / "config.json"
    return config.stat().st_mtime if config.is_file() else None


def _tokens_trained(recipe: Recipe) -> dict[str, int]:
    out = {}
    if recipe.prune is not None and recipe.prune.rounds:
        for label, directory in round_step_dirs(recipe):
            manifest = read_stage_manifest(directory) if label.endswith("cpt") else None
            if manifest and "tokens_trained" in manifest.get("outputs", {}):
                out[label] = manifest["outputs"]["tokens_trained"]
    for stage in TRAINING_STAGES:
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

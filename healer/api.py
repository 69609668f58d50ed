"""healer from Python: the CLI's verbs as functions that return what the stage produced.

    from healer.api import prune, heal, evaluate, release

    pruned = prune("recipe.yaml", {"prune.ratio": 0.3, "run_dir": "runs/try1"})
    pruned.model_dir                       # the pruned Hugging Face checkpoint
    scores = evaluate("recipe.yaml", {"run_dir": "runs/try1", "eval.input": str(pruned.model_dir)})
    scores.metrics["perplexity"]           # eval.json, as a dict

(They live in ``healer.api`` rather than on ``healer`` itself because ``healer.prune`` and
``healer.release.stage`` already name the pruning package and the release module.)

Every function takes a recipe -- a YAML path, the name of a shipped recipe (``demo``), a dict, or a
:class:`healer.recipe.Recipe` -- plus overrides as ``{"section.key": value}`` (what ``--section.key value``
is on the command line), and runs the verb through :func:`healer.run.invoke.invoke`, the function ``healer VERB``
calls: the same stage lock, the same recorded inputs, the same manifest. A stage that fails raises
:class:`healer.core.errors.HealerError`; one that finishes returns a :class:`StageResult` read back from its
manifest. Training stages run in this process on one rank (as ``healer cpt`` does); for many ranks use
:func:`run`, which starts them through the recipe's ``launch:`` section as ``healer run`` does.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from healer.core.errors import HealerError
from healer.recipe import Recipe, load_recipe

RecipeLike = str | Path | dict | Recipe


@dataclass(frozen=True)
class StageResult:
    """What one finished stage left.

    Attributes:
        stage: the verb (``prune``, ``cpt``, ...).
        dir: the stage directory.
        model_dir: the Hugging Face checkpoint it left for the next stage (None for eval and release).
        outputs: the ``outputs`` of its ``manifest.json`` (paths, parameter counts, metrics summary).
        recipe: the recipe it ran with, overrides applied.
    """

    stage: str
    dir: Path
    model_dir: Path | None
    outputs: dict
    recipe: Recipe


@dataclass(frozen=True)
class EvalResult(StageResult):
    """A finished ``eval`` stage; ``metrics`` is its ``eval.json`` (perplexity, tasks, the lm_eval command)."""

    metrics: dict = dataclasses.field(default_factory=dict)


def as_recipe(recipe: RecipeLike, overrides: dict[str, Any] | list[str] | None = None) -> Recipe:
    """A validated :class:`Recipe` from a path, shipped name, dict or Recipe, with ``overrides`` applied.

    A Recipe given with overrides is re-validated from its dump, so an override is checked like any key.
    """
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        recipe = recipe.model_dump(mode="json")
    if not isinstance(recipe, (str, Path, dict)):
        raise HealerError(f"recipe: give a YAML path, a shipped recipe name, a dict or a Recipe, not "
                          f"{type(recipe).__name__}")
    return load_recipe(recipe, overrides)


def _options(verb, options: dict[str, Any]):
    _, cls = verb.load()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise HealerError(f"healer {verb.name}: unknown option {', '.join(unknown)}; "
                          f"its options: {', '.join(sorted(known)) or 'none (use recipe overrides)'}")
    return cls(**options)


def run_stage(stage: str, recipe: RecipeLike, overrides: dict[str, Any] | list[str] | None = None,
              **options: Any) -> StageResult:
    """Run verb ``stage`` the way ``healer STAGE`` does and return what its manifest records.

    ``options`` are the verb's own flags (``resume="none"`` for ``healer cpt --resume none``).
    """
    from healer.core.manifest import finished_manifest
    from healer.run.invoke import invoke
    from healer.stages import VERBS

    verb = VERBS.get(stage)
    if verb is None or not verb.stage:
        raise HealerError(f"unknown stage {stage!r}; stages: {', '.join(v for v in VERBS if VERBS[v].stage)}")
    resolved = as_recipe(recipe, overrides)
    code = invoke(verb, resolved, _options(verb, options))
    if code != 0:
        raise HealerError(f"healer {stage} stopped with exit code {code} (see the messages above); "
                          "call it again to resume")
    stage_dir = resolved.stage_dir(stage)
    manifest = finished_manifest(stage_dir)
    if manifest is None:
        raise HealerError(f"healer {stage} returned but left no finished manifest in {stage_dir}")
    model_dir = resolved.model_dir(stage) if verb.model_subdir is not None else None
    return StageResult(stage, stage_dir, model_dir, manifest.get("outputs") or {}, resolved)


def prune(recipe: RecipeLike, overrides: dict[str, Any] | list[str] | None = None) -> StageResult:
    """``healer prune``: prune ``model.source`` as ``prune:`` says; ``model_dir`` is the pruned checkpoint and
    ``outputs`` has ``params_before``/``params_after`` and the path of ``prune_report.json``."""
    return run_stage("prune", recipe, overrides)


def heal(recipe: RecipeLike, overrides: dict[str, Any] | list[str] | None = None, *, resume: str = "auto",
         force: bool = False) -> StageResult:
    """``healer cpt``: continued pretraining of the pruned model (KD when ``cpt.kd`` is set), one rank here.

    ``resume``: ``auto`` (newest complete checkpoint), ``none`` or a checkpoint directory; ``force``: resume
    across a changed setting that makes steps incomparable. ``model_dir`` is the exported checkpoint.
    """
    return run_stage("cpt", recipe, overrides, resume=resume, force=force)


def finetune(recipe: RecipeLike, overrides: dict[str, Any] | list[str] | None = None, *, resume: str = "auto",
             force: bool = False) -> StageResult:
    """``healer sft``: LoRA instruction tuning; ``model_dir`` is the merged checkpoint."""
    return run_stage("sft", recipe, overrides, resume=resume, force=force)


def evaluate(recipe: RecipeLike, overrides: dict[str, Any] | list[str] | None = None) -> EvalResult:
    """``healer eval``: perplexity and zero-shot tasks of ``eval.input`` (default: the last stage's model).

    ``metrics`` is the written ``eval.json`` (with ``dense`` and ``deltas`` when ``eval.compare_to`` is set,
    and ``lm_eval.command``, the line that re-runs the task numbers with lm-eval).
    """
    done = run_stage("eval", recipe, overrides)
    metrics = json.loads(Path(done.outputs["eval_json"]).read_text())
    return EvalResult(**{f.name: getattr(done, f.name) for f in dataclasses.fields(StageResult)}, metrics=metrics)


def release(recipe: RecipeLike, overrides: dict[str, Any] | list[str] | None = None) -> StageResult:
    """``healer release``: the final checkpoint with its model card, curves and hash manifest in ``dir``."""
    return run_stage("release", recipe, overrides)


def run(recipe: RecipeLike, overrides: dict[str, Any] | list[str] | None = None, *, only: str | None = None,
        force: bool = False) -> dict:
    """``healer run``: every stage of the recipe (training stages on the ranks ``launch:`` gives).

    ``only``: comma-separated stages; ``force``: run finished stages again. Returns ``summary.json`` (the
    dense / pruned / healed table).
    """
    from healer.run.invoke import invoke
    from healer.run.pipeline import SUMMARY
    from healer.stages import VERBS

    resolved = as_recipe(recipe, overrides)
    verb = VERBS["run"]
    code = invoke(verb, resolved, _options(verb, {"only": only, "force": force}))
    if code != 0:
        raise HealerError(f"healer run stopped with exit code {code} (see the messages above); call it again "
                          "to resume")
    return json.loads((Path(resolved.run_dir) / SUMMARY).read_text())

"""Iterative pruning: ``prune.rounds`` becomes prune -> heal steps of ``healer run``, one directory each.

Round K prunes the model the round before left (its healed model, or its pruned one when it did not heal),
so every criterion is recomputed on the model as it is now, into ``<run_dir>/roundK/prune``, then heals
it with the recipe's ``cpt:`` settings for ``heal_tokens`` into ``<run_dir>/roundK/cpt``. Each step is an
ordinary stage run under a *round recipe*: the recipe with ``model.source`` set to the round's input,
``prune:`` set to what this round removes and ``cpt.max_steps`` to its share of tokens. The KD teacher
stays the recipe's own (the dense ``model.source`` unless ``cpt.kd.teacher`` names another).

Ratios are fractions of the ORIGINAL model and add up: ``[{ratio: 0.2}, {ratio: 0.2}]`` removes 40% of
the original blocks, as one-shot ``ratio: 0.4`` does. For depth the per-round block counts come from the
rounded cumulative ratio (``round(0.4 * N) - round(0.2 * N)``), so the total equals the one-shot count.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from healer.core.errors import HealerError
from healer.recipe import round_dir, round_heals, round_model_dir


@dataclass(frozen=True)
class Step:
    """One step of ``healer run``: a stage run under ``recipe`` (the run's own, or a round recipe)."""

    label: str  # what the plan and --only show: the stage, or "round2/prune"
    stage: str  # the verb that runs
    recipe: Any  # healer.recipe.Recipe
    group: str  # the recipe section it belongs to (a round's steps belong to prune)
    after: Path | None = None  # a round's prune: the step directory of the round before, whose result it prunes
    detail: str = ""


def heal_steps(tokens: int, global_batch_size: int, seq_len: int) -> int:
    """Optimizer steps that see at least ``tokens``: ceil(tokens / (global_batch_size * seq_len))."""
    return math.ceil(tokens / (global_batch_size * seq_len))


def blocks_per_round(ratios: list[float], num_blocks: int) -> list[int]:
    """Blocks each round removes from a model of ``num_blocks``: differences of the rounded cumulative ratio,
    so the rounds together remove exactly what one-shot pruning at their sum would."""
    out, done, cumulative = [], 0, 0.0
    for k, ratio in enumerate(ratios):
        cumulative += ratio
        total = round(cumulative * num_blocks)
        if total - done < 1:
            raise HealerError(f"prune.rounds[{k}].ratio {ratio:g} removes no block of the model's {num_blocks} "
                              f"(cumulative {cumulative:g} * {num_blocks} rounds to {total}); raise it or merge "
                              "the round into another")
        out.append(total - done)
        done = total
    if done >= num_blocks:
        raise HealerError(f"prune.rounds remove {done} of {num_blocks} blocks, leaving none; lower the ratios")
    return out


def width_ratios(ratios: list[float]) -> list[float]:
    """Each round's ratio of the model it prunes (what ``prune.ratio`` means), from ratios of the original."""
    out, kept = [], 1.0
    for ratio in ratios:
        out.append(1.0 - (kept - ratio) / kept)
        kept -= ratio
    return out


def _original_blocks(recipe) -> int:
    model = recipe.model
    return _block_count(model.source, model.gguf_file, model.revision)


@functools.lru_cache(maxsize=8)
def _block_count(source: str, gguf_file: str | None, revision: str | None) -> int:
    """Blocks of the model at ``source``; a GGUF's from its header (transformers would de-quantize every
    tensor to build the config). Cached: ``healer run`` plans the rounds more than once."""
    from healer.model.modeling import load_config, resolve_source

    location = resolve_source(source, gguf_file, revision)
    if location.gguf_file:
        try:
            from gguf import GGUFReader

            reader = GGUFReader(Path(location.path) / location.gguf_file)
            arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
            return int(reader.fields[f"{arch}.block_count"].parts[-1][0])
        except Exception:  # noqa: BLE001 -- an unusual header: the full config load names the problem
            pass
    return load_config(location).num_hidden_layers


def round_steps(recipe) -> list[Step]:
    """The prune (and heal) step of every round of ``recipe.prune.rounds``, each under its round recipe."""
    from pydantic import ValidationError

    from healer.recipe import Recipe, RecipeError, format_validation_error

    rounds = recipe.prune.rounds
    ratios = [r.ratio for r in rounds]
    if recipe.prune.method == "depth":
        n = _original_blocks(recipe)
        counts = blocks_per_round(ratios, n)
        amounts = [{"num_blocks": c} for c in counts]
        shown = [f"remove {c} of the original {n} blocks" for c in counts]
    else:
        amounts = [{"ratio": r} for r in width_ratios(ratios)]
        shown = [f"remove {r:g} of the original width ({a['ratio']:.4g} of this round's input)"
                 for r, a in zip(ratios, amounts)]
    steps: list[Step] = []
    base = recipe.model_dump(mode="json")
    for k, (spec, amount) in enumerate(zip(rounds, amounts), start=1):
        where = round_dir(recipe.run_dir, k)
        tree = {**base, "name": f"{recipe.name}-round{k}", "run_dir": str(where), "build_corpus": None,
                "replace": None, "sft": None, "eval": None, "release": None}
        tree["prune"] = {**base["prune"], **amount, "rounds": None, "output": str(where / "prune")}
        if k > 1:
            tree["model"] = {**base["model"], "source": str(round_model_dir(recipe, k - 1)), "gguf_file": None,
                             "revision": None}
        heal = ""
        if spec.heal_tokens > 0:
            if recipe.cpt is None or recipe.data is None:
                raise HealerError(f"prune.rounds[{k - 1}].heal_tokens: healing a round trains with the cpt: and "
                                  "data: sections; add them (or set heal_tokens: 0)")
            steps_k = heal_steps(spec.heal_tokens, recipe.cpt.global_batch_size, recipe.data.seq_len)
            cpt = {**base["cpt"], "max_steps": steps_k, "input": None, "output": str(where / "cpt")}
            cpt.pop("stop_at_recovery", None)  # a round heals for its tokens; the recovery target is the final cpt's
            if cpt.get("kd") is not None and not cpt["kd"].get("teacher"):
                if k > 1 and recipe.model.gguf_file:
                    raise HealerError("prune.rounds with cpt.kd: the dense teacher is model.source with "
                                      "model.gguf_file, which a round recipe cannot name; set cpt.kd.teacher to "
                                      "the GGUF file's path or a converted HF directory")
                cpt["kd"] = {**cpt["kd"], "teacher": recipe.model.source}  # the dense model, in every round
            tree["cpt"] = cpt
            tokens = steps_k * recipe.cpt.global_batch_size * recipe.data.seq_len
            heal = f"; heal {steps_k} steps ({tokens:,} tokens >= heal_tokens {spec.heal_tokens:,})"
        else:
            tree["cpt"] = None
        try:
            sub = Recipe.model_validate(tree)
        except ValidationError as err:  # a round's values the section refuses: name the round
            raise RecipeError(format_validation_error(err, f"prune.rounds[{k - 1}] (round {k})")) from None
        after = None
        if k > 1:
            after = round_dir(recipe.run_dir, k - 1) / ("cpt" if round_heals(recipe, k - 1) else "prune")
        steps.append(Step(f"round{k}/prune", "prune", sub, "prune", after, shown[k - 1] + heal))
        if sub.cpt is not None:
            steps.append(Step(f"round{k}/cpt", "cpt", sub, "prune"))
    return steps


def steps_of(recipe, stages: tuple[str, ...]) -> list[Step]:
    """Every step ``healer run`` takes for ``recipe``: its stages in order, ``prune`` as its rounds if it has some."""
    out: list[Step] = []
    for stage in stages:
        if getattr(recipe, stage) is None:
            continue
        if stage == "prune" and recipe.prune.rounds:
            out += round_steps(recipe)
        else:
            out.append(Step(stage, stage, recipe, stage))
    return out


def step_inputs(step: Step) -> dict[str, Any]:
    """What ``step``'s result depends on: its stage's inputs under its recipe, and for a round's prune the
    manifest of the step before it (so a re-run round makes every later round stale)."""
    from healer.core.hashing import canonical_hash
    from healer.core.manifest import read_stage_manifest
    from healer.run.stage_inputs import stage_inputs

    out = stage_inputs(step.recipe, step.stage)
    if step.after is not None:
        manifest = read_stage_manifest(step.after)
        out[f"{step.after.parent.name}/{step.after.name} manifest"] = \
            canonical_hash(manifest) if manifest is not None else None
    return out



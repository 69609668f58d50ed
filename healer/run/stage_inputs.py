"""What a stage's result is built from, so ``healer run`` can tell a finished stage from a stale one.

A stage's effective inputs are: its recipe section as resolved, the top-level recipe keys it reads
(``Verb.reads``: the model, the data, the seed ...), the manifest of every earlier stage of the recipe
(hashed: a re-run upstream stage has a new manifest, so everything after it no longer matches), and the
healer version. They are kept flat (``prune.ratio: 0.34``) so a mismatch can be shown key by key.

A value that names a local file or directory outside the run directory (the model, a teacher, corpus shards,
the SFT data, an eval file, a DeepSpeed JSON) also brings the sha256 of each of its files
(``model.source file model.safetensors: 3f2a...``): a file rewritten at the same path makes the stage stale,
naming the file. Digests are cached per version of a file (:func:`healer.core.hashing.file_digest`), so a
large model is read in full once. Upstream stage directories are left to their manifests.
"""

from __future__ import annotations

import json
from typing import Any

from healer.core.errors import HealerError
from healer.core.hashing import canonical_hash
from healer.stages import STAGES, VERBS

# Keys that change how a run is watched or saved, not what it computes: checkpoint and log cadence
# (resume is exact, so where checkpoints fall does not change the weights), validation passes (logged,
# never trained on). Matched by the last part of a key, anywhere. `launch:` is left out by not being in
# any stage's `reads`: it says where the same training runs (ranks, nodes, cluster). A different world
# size does split the data stream differently across ranks -- the trainers themselves refuse to *resume*
# across that -- but a finished stage is the recipe's result, and moving to another cluster must not
# make it stale.
NOT_RESULT_KEYS = frozenset({"log_every", "save_every", "keep_last", "eval_every", "eval_batches", "report_to"})

# Keys whose value is a path but not an input: where a stage writes.
OUTPUT_KEYS = frozenset({"output", "run_dir"})
MAX_FILES_HASHED = 10_000  # per directory value: a value naming a whole file system is not a model or corpus


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}", sub, out)
    elif prefix.rsplit(".", 1)[-1] not in NOT_RESULT_KEYS:
        out[prefix] = value


def healer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("healer")
    except PackageNotFoundError:
        return "unknown"


def stage_inputs(recipe, stage: str) -> dict[str, Any]:
    """The flat ``{key: value}`` that ``stage``'s result depends on, under ``recipe`` and what is on disk now."""
    from healer.core.manifest import read_stage_manifest

    dumped = recipe.model_dump(mode="json")
    out: dict[str, Any] = {"healer": healer_version()}
    for key in (stage, *VERBS[stage].reads):
        _flatten(key, dumped.get(key), out)
    out[f"{stage}.input"] = recipe.stage_input(stage)  # the resolved input, also when it is implicit
    out.update(content_digests(out, recipe.run_dir))
    for upstream in STAGES[:STAGES.index(stage)]:
        if getattr(recipe, upstream, None) is not None:
            for label, directory in recipe.step_dirs(upstream):  # several with prune.rounds
                manifest = read_stage_manifest(directory)
                out[f"{label} manifest"] = canonical_hash(manifest) if manifest is not None else None
    return out


def _path_like(value: Any, key: str = ""):
    """(key, string) for every string in ``value`` (nested lists and mappings; ``data.sources.0.path``),
    leaving out the keys that name outputs."""
    if isinstance(value, dict):
        for sub, item in value.items():
            if str(sub).rsplit(".", 1)[-1] not in OUTPUT_KEYS:
                yield from _path_like(item, f"{key}.{sub}" if key else str(sub))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _path_like(item, f"{key}.{index}")
    elif isinstance(value, str):
        yield key, value


def content_digests(flat: dict[str, Any], run_dir: str) -> dict[str, str]:
    """``{"<key> file <name>": sha256}`` for every file of each local path among ``flat``'s values (outside
    ``run_dir``; hidden files and folders, and Python's bytecode caches, left out: they change without the
    input changing)."""
    from pathlib import Path

    from healer.core.hashing import file_digest

    run = Path(run_dir).resolve()
    out: dict[str, str] = {}
    for key, item in _path_like(flat):
        # A word (``dense``, ``cosine``) is a setting even when the current directory has a file of that name.
        if not item or "\n" in item or len(item) > 4096 or not ("/" in item or "." in item):
            continue
        path = Path(item).expanduser()
        try:
            if not path.exists():
                continue
            real = path.resolve()
        except OSError:
            continue
        if real == run or run in real.parents:
            continue
        if real.is_file():
            out[f"{key} file {real.name}"] = file_digest(real)
        elif real.is_dir():
            files = sorted(f for f in real.rglob("*") if f.is_file()
                           and not any(part.startswith(".") or part == "__pycache__"
                                       for part in f.relative_to(real).parts))
            for f in files[:MAX_FILES_HASHED]:
                out[f"{key} file {f.relative_to(real)}"] = file_digest(f)
    return out


def changes_since_finish(recipe, stage: str) -> list[str]:
    """``key: old -> new`` between the inputs a finished ``stage`` recorded and what ``recipe`` gives it now;
    [] when it never finished or finished from these very inputs."""
    from healer.core.manifest import finished_manifest
    from healer.core.redact import redact_tree

    manifest = finished_manifest(recipe.stage_dir(stage))
    if manifest is None:
        return []
    recorded = manifest.get("inputs") or {}
    expected = stage_inputs(recipe, stage)
    if recorded.get("hash") == canonical_hash(expected):
        return []
    return describe_changes(recorded.get("values"), redact_tree(expected)) or ["a secret value changed"]


def refuse_finished_with_other_inputs(recipe, stage: str, trains_on: tuple[str, ...]) -> None:
    """A training verb run again on its finished stage under changed inputs has no step left to train, so it
    would exit 0 over weights built from the old inputs. Refuse that, unless a key in ``trains_on`` changed
    (a larger ``max_steps``: the run trains on, under the recipe it is resumed with)."""
    changes = changes_since_finish(recipe, stage)
    if changes and not any(change.split(":")[0] in trains_on for change in changes):
        raise HealerError(f"{stage}: {recipe.stage_dir(stage)} finished from other inputs ({'; '.join(changes)}); "
                          f"all its steps are trained, so they would not apply: raise {trains_on[0]} to train on "
                          "with them, or pass --resume none to train again from the input")


def describe_changes(recorded: dict[str, Any] | None, expected: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every input that differs (upstream manifests as "was re-run")."""
    if not recorded:
        return ["its manifest records no inputs (written by an older healer)"]
    lines = []
    for key in sorted(set(recorded) | set(expected)):
        old, new = recorded.get(key, "(unset)"), expected.get(key, "(unset)")
        if old == new:
            continue
        if key.endswith(" manifest"):
            lines.append(f"{key.split()[0]} finished again since (or its output is gone)")
        elif " file " in key:
            what = "added" if old == "(unset)" else "gone" if new == "(unset)" else "its content changed"
            lines.append(f"{key}: {what}")
        else:
            lines.append(f"{key}: {_short(old)} -> {_short(new)}")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."

"""Stage completion manifests.

A stage that finished writes ``<stage_dir>/manifest.json`` last, atomically, so its
presence alone means "done". The manifest also records the stage's effective inputs
(:func:`healer.run.stage_inputs.stage_inputs`, handed to the stage by :func:`healer.run.invoke.invoke`):
``healer run`` skips a finished stage only while they still match.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from healer.core.errors import HealerError

MANIFEST = "manifest.json"

def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("healer", "torch", "transformers", "deepspeed", "peft", "accelerate", "datasets", "lm-eval"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def git_commit(path: str | Path | None = None) -> str | None:
    """The healer checkout's commit, when it runs from one."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_stage_manifest(stage_dir: str | Path, stage: str, inputs: dict[str, Any] | None,
                         outputs: dict[str, Any] | None = None) -> Path:
    """Mark ``stage_dir`` as a finished ``stage``.

    ``inputs``: what the result is built from (:func:`healer.run.stage_inputs.stage_inputs`), which ``healer
    run`` compares to decide whether the stage is still current; None when the stage was called directly,
    not as a verb (the next ``healer run`` then builds it again). ``outputs``: what it produced (paths, numbers).
    """
    from healer.core.hashing import canonical_hash
    from healer.core.redact import redact_tree

    path = Path(stage_dir) / MANIFEST
    write_json_atomic(path, {
        "stage": stage,
        # Unique per finish: stages after this one record its manifest's hash, so a re-run of this stage
        # makes them stale even when it finishes within the same second with the same numbers.
        "run_id": uuid.uuid4().hex,
        # The release's manifest is published: values are shown <redacted> where secret; the hash is of
        # the real ones, and is what a later run compares.
        "inputs": {"hash": canonical_hash(inputs), "values": redact_tree(inputs)} if inputs is not None else None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "outputs": outputs or {},
        "versions": package_versions(),
        "git_commit": git_commit(),
    })
    return path


def read_json_if_present(path: str | Path) -> dict | None:
    """The JSON object at ``path``, or None when it is missing, half-written or not a JSON object.

    For files whose absence only means "not done yet" (a stage manifest: the stage then runs again). A file
    whose loss would change a result (a prune report, an evaluation) is read with :func:`read_json_report`.
    """
    try:
        return read_json_report(path)
    except HealerError:
        return None


def read_json_report(path: str | Path) -> dict | None:
    """The JSON object at ``path``, None when there is no such file; a damaged file is an error naming it.

    healer writes its reports atomically, so a report that does not parse was edited or damaged by hand;
    reading it as absent would silently drop what it says (a sparse prune's mask, the removed blocks).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HealerError(f"{path} is not valid JSON ({err}); restore it, or run the stage that wrote it "
                          "again") from None
    if not isinstance(data, dict):
        raise HealerError(f"{path} holds a JSON {type(data).__name__}, not the object healer wrote; restore it, "
                          "or run the stage that wrote it again")
    return data


def read_stage_manifest(stage_dir: str | Path) -> dict | None:
    return read_json_if_present(Path(stage_dir) / MANIFEST)


def supersede_stage_manifest(stage_dir: str | Path) -> None:
    """Mark a finished stage as no longer finished before it runs again.

    A run that stops half-way must not leave the old "done" behind over half-written files. The mark
    keeps the stage name (so release still knows the directory as its own and may replace it) and
    drops outputs and inputs, so neither a trainer nor ``healer run`` takes it for a finished run.
    """
    path = Path(stage_dir) / MANIFEST
    manifest = read_json_if_present(path)
    if manifest is not None:
        write_json_atomic(path, {"stage": manifest.get("stage"), "superseded": True,
                                 "superseded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def claim_stage_dir(stage_dir: str | Path, stage: str) -> None:
    """Refuse to run ``stage`` in a directory another stage's manifest marks as its own (a cpt directory given
    as sft.output, a release as eval.output): its files would be mixed or overwritten, and its manifest taken
    for this stage's."""
    manifest = read_stage_manifest(stage_dir)
    other = manifest.get("stage") if manifest is not None else None
    if other and other != stage:
        raise HealerError(f"{stage}.output: {stage_dir} holds the {other} stage's result (its manifest.json says "
                          f"stage: {other}); give {stage} a directory of its own")


def finished_manifest(stage_dir: str | Path) -> dict | None:
    """The manifest of a finished stage in ``stage_dir``; None while it never finished or runs again."""
    manifest = read_stage_manifest(stage_dir)
    return manifest if manifest is not None and not manifest.get("superseded") else None

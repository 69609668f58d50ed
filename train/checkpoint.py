"""Resumable checkpoints: the DeepSpeed engine state plus each rank's trainer state, written atomically.

Layout of ``<stage_dir>/checkpoints``::

    step00000040/            one checkpoint (DeepSpeed's model/optimizer/scheduler files)
        trainer_state_rank{r}.pt   step, tokens, data stream position and RNG states of rank r
        complete.json        written last, after every rank's files are on disk
    latest                   the tag of the newest complete checkpoint, replaced atomically

A checkpoint without ``complete.json`` is a save that was interrupted: it is never loaded and the next
save of the same step replaces it, so a crash during a save leaves the previous checkpoint and the
``latest`` pointer as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from healer.errors import HealerError

COMPLETE = "complete.json"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step") and _is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def find_resume_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint ``--resume auto`` uses: the one ``latest`` names if it is complete, else the newest complete."""
    root = Path(ckpt_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir() and _is_complete(candidate):
            return candidate
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def resolve_resume(resume: str, ckpt_dir: str | Path) -> Path | None:
    """``auto`` -> newest complete checkpoint (or None), ``none`` -> None, anything else -> that checkpoint dir."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_resume_checkpoint(ckpt_dir)
    path = Path(resume)
    if not path.is_dir() or not _is_complete(path):
        raise HealerError(f"--resume {resume}: not a complete checkpoint directory (no {COMPLETE} inside); "
                          f"use --resume auto to pick the newest complete one in {ckpt_dir}")
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fault(point: str, step: int) -> None:
    """Test-only fault injection: HEALER_FAULT=<point>:<step>[:<rank>] SIGKILLs this process there."""
    spec = os.environ.get("HEALER_FAULT", "")
    if not spec:
        return
    parts = spec.split(":")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if parts[0] == point and int(parts[1]) == step and (len(parts) < 3 or int(parts[2]) == rank):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, trainer_state: dict[str, Any], *,
                    keep_last: int) -> Path:
    """Collective: every rank calls it at the same step. Returns the checkpoint directory.

    ``trainer_state`` is this rank's own state (its data stream position differs from the others').
    """
    root = Path(ckpt_dir)
    tag = tag_for(step)
    path = root / tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():  # left by an interrupted save of this step, or by an earlier run: replace it whole
            shutil.rmtree(path)
    _barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    state_file = path / f"trainer_state_rank{rank}.pt"
    tmp = state_file.with_name(state_file.name + ".tmp")
    torch.save(trainer_state, tmp)
    os.replace(tmp, state_file)
    _fault("kill_in_save", step)
    _barrier()
    if rank == 0:
        _fsync_tree(path)
        _write_atomic(path / COMPLETE, json.dumps({"step": step, "world_size": world, "tag": tag,
                                                   "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        _write_atomic(root / LATEST, tag)
        _prune(root, keep_last, newest=path)
    _barrier()
    return path


def _prune(root: Path, keep_last: int, newest: Path) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop interrupted saves older than ``newest``."""
    complete = complete_checkpoints(root)
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step") and not _is_complete(p) and p.name < newest.name:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(engine, path: str | Path) -> dict[str, Any]:
    """Collective: restore the engine (model, optimizer, LR scheduler) and return this rank's trainer state."""
    path = Path(path)
    info = json.loads((path / COMPLETE).read_text())
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if info["world_size"] != world:
        raise HealerError(
            f"checkpoint {path} was written by {info['world_size']} ranks but this run has {world}; resume with "
            f"the same number of processes, or start fresh with --resume none")
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise HealerError(f"DeepSpeed could not load checkpoint {path}")
    return torch.load(path / f"trainer_state_rank{rank}.pt", map_location="cpu", weights_only=False)


def capture_rng() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""Resumable checkpoints: the DeepSpeed engine state plus each rank's trainer state, written atomically.

Layout of ``<stage_dir>/checkpoints``::

    step00000040/                  one checkpoint (DeepSpeed's model/optimizer files)
        trainer_state_rank{r}.json step, tokens, data stream position, python/numpy RNG of rank r
        rng_rank{r}.safetensors    torch CPU (and CUDA) RNG states of rank r
        constraints_rank{r}.safetensors  rank r's share of the training constraints (a sparse model's mask), if any
        complete.json              written last: step, ranks, ZeRO stage, the run's settings, every file's size
    latest                         the tag of the newest complete checkpoint, replaced atomically

A checkpoint resumes on another number of ranks or another ZeRO stage (an elastic resume): the weights and
Adam state are consolidated per parameter and loaded into the new engine (:mod:`healer.train.universal`), and
the data positions of all the old ranks go to the batches, which re-deal them (``{"ranks": [...]}``).

A checkpoint without ``complete.json`` is a save that was interrupted: it is never loaded and the next
save of the same step replaces it, so a crash during a save leaves the previous checkpoint and the
``latest`` pointer as they were. A checkpoint whose files no longer have the sizes ``complete.json``
recorded (a truncated copy, a disk that lost data) is skipped for the previous complete one, with a message.

Nothing in a checkpoint runs code: healer's own trainer state is JSON and safetensors, and DeepSpeed's
``*_model_states.pt`` / ``*_optim_states.pt`` are read with ``weights_only=True`` and an allowlist of
DeepSpeed's state classes (:mod:`healer.train.safe_load`), on the same-layout and the elastic path alike.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from healer.core.errors import HealerError
from healer.train.safe_load import weights_only_loads

COMPLETE = "complete.json"
CONSTRAINTS = "constraints"  # constraints_rank{r}.safetensors: e.g. the sparsity mask share of rank r
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step") and _is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def read_info(path: Path) -> dict[str, Any]:
    """The ``complete.json`` of checkpoint ``path``."""
    try:
        return json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError) as err:
        raise HealerError(f"checkpoint {path}: {COMPLETE} is unreadable ({err}); resume from another "
                          "checkpoint (--resume DIR) or start over (--resume none)") from None


def damage(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be trusted although it is complete (a file missing or of another size)."""
    try:
        files = read_info(path).get("files", {})
    except HealerError as err:
        return str(err)
    for name, size in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, {COMPLETE} recorded {size}"
    return None


def find_resume_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint ``--resume auto`` uses: the one ``latest`` names if it is complete and intact, else the
    newest complete and intact one. A damaged checkpoint is skipped with a message on stderr."""
    root = Path(ckpt_dir)
    candidates = complete_checkpoints(root)[::-1]
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in candidates:  # the pointer wins over a newer complete one (written by a later failed run)
            candidates.remove(named)
            candidates.insert(0, named)
    for i, path in enumerate(candidates):
        why = damage(path)
        if why is None:
            return path
        fallback = candidates[i + 1].name if i + 1 < len(candidates) else "none left: starting from the input model"
        if _rank_world()[0] == 0:
            print(f"healer: checkpoint {path} is damaged ({why}); falling back to the previous complete "
                  f"checkpoint ({fallback})", file=sys.stderr, flush=True)
    return None


def resolve_resume(resume: str, ckpt_dir: str | Path) -> Path | None:
    """``auto`` -> newest intact checkpoint (or None), ``none`` -> None, anything else -> that checkpoint dir."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_resume_checkpoint(ckpt_dir)
    path = Path(resume)
    if not path.is_dir() or not _is_complete(path):
        raise HealerError(f"--resume {resume}: not a complete checkpoint directory (no {COMPLETE} inside); "
                          f"use --resume auto to pick the newest complete one in {ckpt_dir}")
    why = damage(path)
    if why is not None:
        raise HealerError(f"--resume {resume}: the checkpoint is damaged ({why}); pick an older one or "
                          "use --resume auto")
    return path


def move_aside(ckpt_dir: Path, why: str) -> Path | None:
    """Rename ``ckpt_dir`` to ``checkpoints.old-<time>`` (``--resume none``): nothing is deleted."""
    if not ckpt_dir.is_dir() or not any(ckpt_dir.iterdir()):
        return None
    aside = ckpt_dir.with_name(f"{ckpt_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():  # two restarts within a second
        aside = ckpt_dir.with_name(f"{ckpt_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    ckpt_dir.rename(aside)
    print(f"healer: {why}: moved the previous checkpoints to {aside}", file=sys.stderr, flush=True)
    return aside


def check_settings(saved: dict[str, Any], current: dict[str, Any], *, path: Path, force: bool) -> list[str]:
    """Refuse to resume when a setting that makes steps incomparable changed (``cpt.seq_len: 32 -> 64``).

    Keys are recipe keys; ``--force`` turns the refusal into the returned list of changes (to be printed).
    The ranks and ZeRO stage are not settings: they may change (see :func:`load_checkpoint`).
    """
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items()
               if k in saved and _plain(saved[k]) != _plain(v)]
    if changed and not force:
        raise HealerError(f"checkpoint {path} was written with other settings ({'; '.join(changed)}): its steps "
                          "would not continue the same run. Restore the settings, pass --force to resume anyway, "
                          "or start over with --resume none")
    return changed


def _plain(value: Any) -> Any:
    """The value as JSON gives it back (tuples become lists), for comparing saved with current settings."""
    return json.loads(json.dumps(value))


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


def _fsync_tree(path: Path) -> dict[str, int]:
    """fsync every file under ``path``; return their sizes by relative path."""
    sizes = {}
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.name != COMPLETE:
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
            sizes[str(file.relative_to(path))] = file.stat().st_size
    _fsync_dir(path)
    return sizes


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fault(point: str, step: int) -> None:
    """Test-only fault injection: HEALER_FAULT=<point>:<step>[:<rank>] SIGKILLs this process there
    (``kill_at_step``, ``kill_in_save``); ``term_at_step`` sends SIGTERM instead, as a scheduler would."""
    spec = os.environ.get("HEALER_FAULT", "")
    if not spec:
        return
    parts = spec.split(":")
    term = parts[0] == point.replace("kill_", "term_")
    if (parts[0] == point or term) and int(parts[1]) == step and (len(parts) < 3 or int(parts[2]) == _rank_world()[0]):
        import signal

        os.kill(os.getpid(), signal.SIGTERM if term else signal.SIGKILL)


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=on)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, trainer_state: dict[str, Any], *, keep_last: int,
                    settings: dict[str, Any], frozen_base: bool = False,
                    rank_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Collective: every rank calls it at the same step. Returns the checkpoint directory.

    Args:
        trainer_state: this rank's own state, JSON-able (its data stream position differs from the others').
        keep_last: complete checkpoints kept after this one is complete.
        settings: what makes steps comparable (recipe key -> value), checked by ``check_settings`` on resume.
        frozen_base: leave frozen parameters out (LoRA: the base weights are the stage's input, not state).
        rank_tensors: this rank's training constraints' state (e.g. its share of a sparsity mask), saved as
            ``constraints_rank{r}.safetensors`` inside the checkpoint, so it is complete only with them.

    A full disk stops the save with one line and removes the partial directory; the previous checkpoint
    and ``latest`` stay as they were.
    """
    root = Path(ckpt_dir)
    tag = tag_for(step)
    path = root / tag
    rank, world = _rank_world()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():  # left by an interrupted save of this step, or by an earlier run: replace it whole
            shutil.rmtree(path)
    _barrier()
    failure: OSError | None = None
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False, exclude_frozen_parameters=frozen_base)
        rng_json, rng_tensors = capture_rng()
        _save_tensors(rng_tensors, path / f"rng_rank{rank}.safetensors")
        if rank_tensors:
            _save_tensors(rank_tensors, path / f"{CONSTRAINTS}_rank{rank}.safetensors")
        state_file = path / f"trainer_state_rank{rank}.json"
        tmp = state_file.with_name(state_file.name + ".tmp")
        tmp.write_text(json.dumps({**trainer_state, "rng": rng_json}))
        os.replace(tmp, state_file)
    except OSError as err:
        failure = err
    _fault("kill_in_save", step)
    if _any_rank(failure is not None):
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        _barrier()
        kept = find_resume_checkpoint(root)
        keep = f"the previous checkpoint {kept.name} is kept" if kept else "there is no earlier checkpoint"
        if failure is not None and failure.errno == errno.ENOSPC:
            raise HealerError(f"no space left on {root} while saving step {step}; {keep}. Free space (or lower "
                              "keep_last) and run again to resume")
        raise HealerError(f"cannot write checkpoint {path}"
                          + (f": {failure.strerror or failure}" if failure else " (another rank failed)")
                          + f"; {keep}")
    _barrier()
    if rank == 0:
        files = _fsync_tree(path)
        _write_atomic(path / COMPLETE, json.dumps({
            "step": step, "tag": tag, "ranks": world, "zero_stage": engine.zero_optimization_stage(),
            "settings": settings, "files": files,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
        _write_atomic(root / LATEST, tag)
        _prune(root, keep_last, newest=path)
    _barrier()
    return path


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int, newest: Path) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop interrupted saves older than ``newest``."""
    complete = complete_checkpoints(root)
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step") and not _is_complete(p) and p.name < newest.name:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(engine, path: str | Path, *, settings: dict[str, Any], force: bool = False,
                    frozen_base: bool = False) -> dict[str, Any]:
    """Collective: restore the engine (model, optimizer) and this rank's RNG; return this rank's trainer state.

    ``settings`` are this run's (see ``save_checkpoint``); a change is refused unless ``force``. The trainer
    state keeps the saved settings under ``"settings"``, the forced changes under ``"changed"``, and its
    ``"data"`` is ``{"ranks": [data position of each rank that wrote the checkpoint]}`` (read on demand).

    Another number of ranks or ZeRO stage than the checkpoint's is an elastic resume: the weights and Adam
    state are consolidated and loaded whole (:mod:`healer.train.universal`), ``"elastic"`` says what
    changed, and a rank the checkpoint has no RNG for keeps the one it was seeded with.
    """
    from safetensors.torch import load_file

    path = Path(path)
    info = read_info(path)
    rank, world = _rank_world()
    saved_ranks = int(info.get("ranks", info.get("world_size")))
    layout = {"ranks": (saved_ranks, world), "ZeRO stage": (info.get("zero_stage"), engine.zero_optimization_stage())}
    elastic = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in layout.items() if a != b)
    changed = check_settings(info.get("settings", {}), settings, path=path, force=force)
    if elastic:
        _load_elastic(engine, path, saved_ranks, info.get("zero_stage"))
    else:
        _load_same_layout(engine, path, frozen_base)
    state = _rank_state(path, min(rank, saved_ranks - 1))  # step and tokens are the same on every rank
    tensors = _rank_file(path, min(rank, saved_ranks - 1), lambda f: load_file(str(f)), "rng_rank{r}.safetensors")
    rng = state.pop("rng")
    if rank < saved_ranks:
        restore_rng(rng, tensors)
    constraints = path / f"{CONSTRAINTS}_rank{rank}.safetensors"
    if elastic and (path / f"{CONSTRAINTS}_rank0.safetensors").is_file():
        if 3 in (info.get("zero_stage"), engine.zero_optimization_stage()):
            raise HealerError(f"checkpoint {path} holds ZeRO-3 shares of a sparsity mask; it cannot be resumed with "
                              f"{elastic}. Resume with the layout it was written with, or start over (--resume none)")
        constraints = path / f"{CONSTRAINTS}_rank0.safetensors"  # below ZeRO-3 every rank holds the whole mask
    state["constraints"] = load_file(str(constraints)) if constraints.is_file() else None
    if "data" in state:
        state["data"] = {"ranks": _RankData(path, saved_ranks)}
    return {**state, "settings": info.get("settings", {}), "changed": changed, "elastic": elastic}


class _RankData(Sequence):
    """The data position of each rank that wrote checkpoint ``path``, read when first asked for."""

    def __init__(self, path: Path, ranks: int):
        self.path, self.ranks = path, ranks
        self._cache: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.ranks

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(self.ranks))]
        if not 0 <= r < self.ranks:
            raise IndexError(r)
        if r not in self._cache:
            self._cache[r] = _rank_state(self.path, r).get("data")
        return self._cache[r]


def _rank_file(path: Path, r: int, read, pattern: str):
    try:
        return read(path / pattern.format(r=r))
    except (OSError, ValueError) as err:
        raise HealerError(f"checkpoint {path}: the trainer state of rank {r} is unreadable ({err}); resume from "
                          "an older one (--resume DIR) or start over (--resume none)") from None


def _rank_state(path: Path, r: int) -> dict[str, Any]:
    return _rank_file(path, r, lambda f: json.loads(f.read_text()), "trainer_state_rank{r}.json")


def _load_elastic(engine, path: Path, saved_ranks: int, saved_stage: int | None) -> None:
    from healer.train.universal import consolidate, load_whole, trainable_order

    try:  # the shards are read tensor by tensor as load_whole sets them, so both can meet a bad file
        with weights_only_loads():
            load_whole(engine, consolidate(path, trainable_order(engine.module)))
    except HealerError:
        raise
    except Exception as err:  # whatever the unpickler or a shard of another layout raises
        raise HealerError(f"checkpoint {path} (ZeRO stage {saved_stage} on {saved_ranks} rank(s)) could not be "
                          f"consolidated for this layout ({type(err).__name__}: {err}); resume with the layout it "
                          "was written with, or start over (--resume none)") from None


def _load_same_layout(engine, path: Path, frozen_base: bool) -> None:
    try:
        with weights_only_loads():
            load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False, load_module_strict=not frozen_base)
    except HealerError:
        raise
    except Exception as err:  # DeepSpeed raises whatever its unpickler or shape checks raise
        raise HealerError(f"DeepSpeed could not load checkpoint {path} ({type(err).__name__}: {err}); resume from "
                          "an older one (--resume DIR) or start over (--resume none)") from None
    if load_path is None:
        raise HealerError(f"DeepSpeed could not load checkpoint {path}; resume from an older one (--resume DIR) "
                          "or start over (--resume none)")


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """This process's RNG states: python and numpy as JSON, torch CPU and CUDA as tensors (for safetensors)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    as_json = {"python": [version, list(mt), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    return as_json, tensors


def restore_rng(as_json: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Undo ``capture_rng``."""
    version, mt, gauss = as_json["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = as_json["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(len(tensors) - 1) if f"cuda{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)

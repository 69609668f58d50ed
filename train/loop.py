"""The one training loop every training stage runs (cpt, sft, and whatever heals next).

A stage builds the engine, the batches and the objective, then calls :func:`resume` and :func:`train`.
What varies between stages is the objective (``tokens(batch)`` and ``(loss_sum, parts)``); the
loop owns accumulation with token-weighted normalisation, the LR schedule, logging, eval and checkpoint
cadence, preemption and resume, the same way for every stage:

* a window of ``accum`` micro-batches is fetched first; its supervised tokens are summed over the window and
  all ranks, and every micro-batch's backward gets ``loss_sum * accum * world / total`` (DeepSpeed divides by
  ``accum`` and averages over ranks), so the gradient is that of the mean loss over the window's tokens;
* the LR of step ``s`` is ``lr_at(s)``, set on the optimizer before the step (no scheduler state to restore);
* SIGTERM/SIGUSR1 finish the current step, save, write ``PREEMPTED`` and return ``preempted``
  (the stage exits with :data:`~healer.train.signals.PREEMPTED_EXIT_CODE`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from healer.core.errors import HealerError
from healer.train.checkpoint import _fault, load_checkpoint, move_aside, resolve_resume, save_checkpoint
from healer.train.engine import set_lr
from healer.train.metrics import MetricsLogger, peak_memory_gib
from healer.train.schedule import due
from healer.train.signals import PREEMPTED_EXIT_CODE, PreemptionWatcher

PREEMPTED = "PREEMPTED"
CHECKPOINTS = "checkpoints"


class Batches(Protocol):
    """A rank's micro-batches: ``next()`` gives one (None when the data ran out) and the position is state."""

    def next(self) -> dict[str, torch.Tensor] | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Cadence:
    """How long to train and how often to log, evaluate and save, in optimizer steps."""

    max_steps: int
    log_every: int = 1
    save_every: int = 50
    keep_last: int = 2
    eval_every: int | None = None


@dataclass
class Progress:
    """Where a run stands: finished optimizer steps and input tokens seen over all ranks."""

    step: int = 0
    tokens_seen: int = 0
    supervised: int = 0  # tokens the loss was averaged over (objective.tokens), over all ranks
    resumed_from: Path | None = None
    changed: list[str] = field(default_factory=list)  # settings changed under --force


@dataclass
class Outcome:
    """How :func:`train` ended: ``done``, ``paused`` (``stop_after`` reached), ``reached`` (``stop_when``),
    ``exhausted`` or ``preempted``."""

    status: str
    progress: Progress
    last: dict[str, float]
    step_times: list[float]


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs (CPU and CUDA) from one number."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resume(engine, batches: Batches, *, stage_dir: Path, how: str, settings: dict[str, Any], force: bool,
           frozen_base: bool = False, say: Callable[[str], None] = print, constraints: Sequence[Any] = ()) -> Progress:
    """Collective: restore the newest (``how="auto"``), no (``"none"``) or a given checkpoint.

    Args:
        how: ``auto``, ``none`` (old checkpoints are moved aside, never deleted) or a checkpoint directory.
        settings: recipe keys that make steps comparable (data, seq_len, batch, seed ...) and their values;
            a change is refused naming the key unless ``force``.
        frozen_base: the checkpoints leave frozen weights out (LoRA).
        say: prints a line on rank 0 (the stage's logger).
        constraints: as in :func:`train`; their state comes back from the checkpoint.
    """
    rank, _ = _world()
    ckpt_dir = stage_dir / CHECKPOINTS
    if how == "none" and rank == 0:
        move_aside(ckpt_dir, "--resume none")
    if dist.is_initialized():
        dist.barrier()
    path = resolve_resume(how, ckpt_dir)
    if path is None:
        return Progress()
    state = load_checkpoint(engine, path, settings=settings, force=force, frozen_base=frozen_base)
    for constraint in constraints:  # None when the checkpoint holds no constraint state
        constraint.load_state_dict(state["constraints"], path)
    if state["changed"]:
        say(f"healer: --force: resuming {path} although {'; '.join(state['changed'])}")
    if state["elastic"]:
        say(f"healer: elastic resume ({state['elastic']}): weights and optimizer state consolidated, the rest of the "
            "data epoch re-dealt over this run's ranks and workers")
    try:
        batches.load_state_dict(state["data"])
    except Exception as err:  # a forced change of data or seq_len: the old position means nothing now
        if not state["changed"]:
            raise
        say(f"healer: --force: the data stream starts afresh ({err})")
    say(f"healer: resumed from {path} at step {state['step']} ({state['tokens_seen']:,} tokens)")
    return Progress(int(state["step"]), int(state["tokens_seen"]), int(state["supervised"]), path, state["changed"])


def check_resume(how: str, stage_dir: Path) -> None:
    """Refuse a ``--resume DIR`` that is not a usable checkpoint before minutes of model loading."""
    if how not in ("auto", "none"):
        resolve_resume(how, stage_dir / CHECKPOINTS)


def _own_grad_norm(engine) -> float:
    """The global grad norm when DeepSpeed does not report one (ZeRO 0 keeps the gradients on the params)."""
    grads = [p.grad.float().pow(2).sum() for p in engine.module.parameters() if p.grad is not None]
    return torch.sqrt(sum(grads)).item() if grads else 0.0


def _input_tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def train(engine, objective, batches: Batches, *, lr_at: Callable[[int], float], cadence: Cadence,
          progress: Progress, stage_dir: Path, settings: dict[str, Any], logger: MetricsLogger,
          stop_after: int | None = None, evaluate: Callable[[Any], dict[str, float]] | None = None,
          step_scalars: Callable[[int, float], dict[str, float]] | None = None,
          frozen_base: bool = False, constraints: Sequence[Any] = (),
          stop_when: Callable[[dict[str, Any]], bool] | None = None) -> Outcome:
    """Collective: run optimizer steps from ``progress.step`` to ``cadence.max_steps`` (or ``stop_after`` more).

    Args:
        objective: ``tokens(batch)`` and ``objective(engine, batch) -> (loss_sum, parts)``.
        lr_at: the LR of optimizer step ``s`` (0-based), from the recipe this run was started with.
        settings: recorded in every checkpoint, compared on resume.
        evaluate: ``evaluate(engine) -> scalars`` (collective), when ``cadence.eval_every`` is due and at the end.
        step_scalars: ``(step, seconds) -> scalars`` the stage adds to a logged step (collective: every rank
            calls it at every step).
        frozen_base: checkpoints leave frozen weights out (LoRA).
        constraints: objects whose ``apply(engine)`` runs after every optimizer step (e.g.
            :class:`~healer.train.masks.SparsityMask`); their ``state_dict()`` goes into every checkpoint.
        stop_when: ``(scalars) -> bool`` on every step's scalars (the same on every rank: they are reduced);
            True saves and ends the run there (``cpt.stop_at_recovery``).
    """
    rank, world = _world()
    device = engine.device
    accum = engine.gradient_accumulation_steps()
    zero0 = engine.zero_optimization_stage() == 0
    stop_at = cadence.max_steps if stop_after is None else min(cadence.max_steps, progress.step + stop_after)
    step, tokens_seen, supervised = progress.step, progress.tokens_seen, progress.supervised
    saved_at = step if progress.resumed_from is not None else None
    watcher = PreemptionWatcher()
    last: dict[str, float] = {}
    times: list[float] = []
    names: list[str] | None = None
    status = "done"
    engine.train()
    try:
        while step < stop_at:
            t0 = time.perf_counter()
            window = []
            for _ in range(accum):
                batch = batches.next()
                if batch is None:
                    break
                window.append(batch)
            counts = torch.tensor([float(sum(objective.tokens(b) for b in window)),
                                   float(sum(_input_tokens(b) for b in window)), float(len(window) < accum)],
                                  dtype=torch.float64, device=device)  # NCCL reduces device tensors only
            if world > 1:  # also how ranks agree that one ran out: a ZeRO forward on one rank alone hangs
                dist.all_reduce(counts)
            if counts[2] > 0:
                status = "exhausted"
                logger.write(f"healer: the data ran out at step {step}")
                break
            lr = lr_at(step)
            set_lr(engine, lr)
            scale = accum * world / max(counts[0].item(), 1.0)
            sums: torch.Tensor | None = None
            grad_norm = None
            for i, batch in enumerate(window):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                loss_sum, parts = objective(engine, batch)
                engine.backward(loss_sum * scale)
                if zero0 and i == accum - 1:
                    grad_norm = _own_grad_norm(engine)
                engine.step()
                if names is None:
                    names = sorted(parts)
                row = torch.stack([loss_sum.detach().float(), *(parts[n].detach().float() for n in names)])
                sums = row if sums is None else sums + row
            for constraint in constraints:  # the window's last engine.step() was the optimizer step
                constraint.apply(engine)
            step += 1
            tokens_seen += int(counts[1].item())
            supervised += int(counts[0].item())
            _fault("kill_at_step", step)
            if not zero0:
                grad_norm = engine.get_global_grad_norm()
            grad_norm = None if grad_norm is None else float(grad_norm)
            # fp16 loss scaling skips an overflowing step by design; anywhere else an inf/NaN norm is a broken step
            bad_norm = grad_norm is not None and not math.isfinite(grad_norm) and not engine.fp16_enabled()
            stats = torch.cat([sums.double(), torch.tensor([float(watcher.requested), float(bad_norm)],
                                                           dtype=torch.float64, device=device)])
            if world > 1:
                dist.all_reduce(stats)  # one collective: the window's sums, a stop request, a non-finite norm
            if not math.isfinite(stats[0].item()) or stats[-1].item() > 0:
                # Every rank sees the same reduced values, so all of them stop here together.
                raise HealerError(_non_finite_message(step, stats[0].item() / max(counts[0].item(), 1.0),
                                                      grad_norm, lr, saved_at, stage_dir))
            preempted = stats[-2].item() > 0
            dt = time.perf_counter() - t0
            times.append(dt)
            total = max(counts[0].item(), 1.0)
            scalars: dict[str, Any] = {
                "train/loss": stats[0].item() / total, "train/lr": lr,
                "train/grad_norm": grad_norm,
                "perf/tokens_per_s": counts[1].item() / dt, "perf/step_time_s": dt, "data/tokens_seen": tokens_seen,
                "mem/peak_gib": peak_memory_gib(device),
                **{f"train/{n}": stats[1 + i].item() / total for i, n in enumerate(names)}}
            if step_scalars is not None:
                scalars.update(step_scalars(step, dt))
            if evaluate is not None and due(step, cadence.eval_every, cadence.max_steps):
                scalars.update(evaluate(engine))
                engine.train()
            reached = stop_when is not None and stop_when(scalars)
            if due(step, cadence.log_every, stop_at) or preempted or reached:
                logger.log(step, scalars)
            last.update({k: float(v) for k, v in scalars.items() if v is not None})
            if due(step, cadence.save_every, stop_at) or preempted or reached:
                _save(engine, batches, stage_dir, Progress(step, tokens_seen, supervised), cadence, settings,
                      frozen_base, constraints)
                saved_at = step
            if preempted:
                status = "preempted"
                logger.write(f"healer: preempted ({watcher.signal_name or 'signal on another rank'}); saved step "
                             f"{step}, exiting with {PREEMPTED_EXIT_CODE}")
                if rank == 0:
                    _mark_preempted(stage_dir, step)
                break
            if reached:
                status = "reached"
                logger.write(f"healer: the stop condition was reached at step {step}; saved, stopping")
                break
        else:
            if stop_at < cadence.max_steps:
                status = "paused"
        if status == "exhausted" and step > 0 and saved_at != step:
            _save(engine, batches, stage_dir, Progress(step, tokens_seen, supervised), cadence, settings, frozen_base,
                  constraints)
    finally:
        watcher.restore()
    if status != "preempted" and rank == 0:
        (stage_dir / PREEMPTED).unlink(missing_ok=True)
    return Outcome(status, Progress(step, tokens_seen, supervised, progress.resumed_from, progress.changed), last,
                   times)


def _non_finite_message(step: int, loss: float, grad_norm: float | None, lr: float, saved_at: int | None,
                        stage_dir: Path) -> str:
    """One line for the first step whose loss or gradient norm is not a number: what, where it stopped, why."""
    what = f"the training loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
    kept = (f"the last good checkpoint (step {saved_at}) is kept in {stage_dir / CHECKPOINTS}"
            if saved_at is not None else "no checkpoint had been written yet")
    return (f"step {step}: {what}; training stopped without saving, {kept}. Likely causes: a learning rate too "
            f"high for this model (lr {lr:g} at this step: lower lr or lengthen warmup_steps), fp16 overflow "
            "(precision: bf16), or NaN/inf already in the input model's weights")


def _save(engine, batches: Batches, stage_dir: Path, at: Progress, cadence: Cadence, settings: dict[str, Any],
          frozen_base: bool, constraints: Sequence[Any] = ()) -> None:
    state = {"step": at.step, "tokens_seen": at.tokens_seen, "supervised": at.supervised, "data": batches.state_dict()}
    tensors = {k: v for c in constraints for k, v in c.state_dict().items()}
    save_checkpoint(engine, stage_dir / CHECKPOINTS, at.step, state, keep_last=cadence.keep_last, settings=settings,
                    frozen_base=frozen_base, rank_tensors=tensors)


def finished(stage_dir: Path, steps: int) -> bool:
    """Whether the stage already wrote its manifest for a run of ``steps`` steps (so ``--resume auto`` has
    nothing to do; a larger ``max_steps`` resumes the last checkpoint and trains on)."""
    from healer.core.manifest import finished_manifest

    manifest = finished_manifest(stage_dir)
    outputs = manifest.get("outputs", {}) if manifest is not None else {}
    stopped = bool((outputs.get("recovery") or {}).get("reached"))  # cpt.stop_at_recovery ended it early
    return manifest is not None and (outputs.get("steps") == steps or stopped)


def _mark_preempted(stage_dir: Path, step: int) -> None:
    from healer.core.manifest import write_json_atomic

    # torchrun reports any non-zero worker exit as its own failure code; this file tells a requeue
    # script that the stop was a clean preemption, not a crash.
    write_json_atomic(stage_dir / PREEMPTED, {"step": step, "exit_code": PREEMPTED_EXIT_CODE,
                                              "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

"""Learning-rate schedules as a multiplier of the peak LR per optimizer step.

``lr_multiplier(step)`` is the factor applied during optimizer step ``step`` (0-based),
the convention of ``torch.optim.lr_scheduler.LambdaLR``.
"""

from __future__ import annotations

import math
from typing import Callable


def make_lr_lambda(schedule: str, *, max_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1,
                   decay_fraction: float = 0.1) -> Callable[[int], float]:
    """A step -> LR multiplier function.

    Args:
        schedule: ``cosine`` (linear warmup, cosine to ``min_lr_ratio``), ``wsd`` (warmup, stable at the peak,
            linear decay to ``min_lr_ratio`` over the last ``decay_fraction`` of the steps) or ``constant``
            (warmup, then the peak).
        max_steps: the run's total optimizer steps; the cosine/decay ends there.
        warmup_steps: steps of linear warmup from ``1/warmup_steps`` of the peak up to the peak.
        min_lr_ratio: the final LR as a fraction of the peak.
        decay_fraction: wsd only.

    The function is a closure, not an object, so LambdaLR does not save it in checkpoints:
    a resumed run follows the schedule of the recipe it was resumed with.
    """
    if schedule not in ("cosine", "wsd", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; use cosine, wsd or constant")
    warmup = min(warmup_steps, max_steps)
    decay_steps = max(1, round(max_steps * decay_fraction))
    decay_start = max(warmup, max_steps - decay_steps)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            span = max(1, max_steps - warmup)
            progress = min(1.0, (step - warmup) / span)
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 - (1 - min_lr_ratio) * progress

    return lr_lambda

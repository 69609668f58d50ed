"""Stopping a heal at a recovery target (``cpt.stop_at_recovery``): the share of the pruned-to-dense gap in
validation loss that the healed model has closed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from healer.core.errors import HealerError

RECOVERY_FILE = "recovery.json"  # written by the cpt stage: the pruned and dense validation losses at step 0


def recovery_baseline(stage_dir: Path, *, fresh: bool, pruned_loss: Callable[[], float],
                      dense_loss: Callable[[], float], write: bool) -> dict[str, float]:
    """The pruned and dense validation losses a heal's recovery is measured against.

    Measured when a run starts from its input (``fresh``: ``pruned_loss()`` / ``dense_loss()`` are
    validation passes of the student and of the dense model over the same batches) and kept in
    ``recovery.json`` (written where ``write``: rank 0), read back on resume: by then the student has healed.
    """
    path = Path(stage_dir) / RECOVERY_FILE
    if not fresh:
        if not path.is_file():
            raise HealerError(f"cpt.stop_at_recovery: {path} is missing, so the pruned model's loss before this "
                              "run healed it is unknown; train again with --resume none, or drop the key")
        return json.loads(path.read_text())
    baseline = {"pruned_val_loss": pruned_loss(), "dense_val_loss": dense_loss()}
    if write:
        from healer.core.manifest import write_json_atomic

        write_json_atomic(path, baseline)
    return baseline


def recovery_reached(baseline: dict[str, float], target: float) -> Callable[[dict], bool]:
    """``stop_when`` for the training loop: adds ``val/recovery`` to a step's scalars that have a validation
    loss, and says whether it reached ``target``. With no gap (the input is no worse than the dense model)
    it never stops early."""
    pruned, dense = baseline["pruned_val_loss"], baseline["dense_val_loss"]
    gap = pruned - dense

    def reached(scalars: dict) -> bool:
        loss = scalars.get("val/loss")
        if loss is None or not gap > 0:
            return False
        scalars["val/recovery"] = (pruned - loss) / gap
        return scalars["val/recovery"] >= target

    return reached

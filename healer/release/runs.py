"""``<release>/runs/<stage>/``: the training stages' TensorBoard curves, for the Hub's "Training metrics" tab.

The Hub shows any ``*tfevents*`` file of a model repo in TensorBoard. The stage logs are not copied as
they are: they hold text notes (the DeepSpeed and stage configs) and are named after the machine they ran
on. Their scalars are rewritten instead, every point with its step and wall time, into one file per log
folder named ``events.out.tfevents.<first wall time>.healer``; a resumed run's purged points stay purged.
"""

from __future__ import annotations

from pathlib import Path


def publish_runs(log_dir: Path, out_dir: Path) -> list[Path]:
    """Rewrite the scalars of the TensorBoard log ``log_dir`` under ``out_dir``; returns the files written
    ([] when ``log_dir`` has no scalar)."""
    if not log_dir.is_dir():
        return []
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    written = []
    for folder in sorted({p.parent for p in log_dir.rglob("*tfevents*") if p.is_file()}):
        acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0 = keep every point
        acc.Reload()
        series = {tag: sorted(acc.Scalars(tag), key=lambda e: e.step) for tag in acc.Tags().get(SCALARS, [])}
        series = {tag: events for tag, events in series.items() if events}
        if not series:
            continue
        target = out_dir / folder.relative_to(log_dir)
        target.mkdir(parents=True, exist_ok=True)
        before = set(target.iterdir())
        writer = SummaryWriter(str(target))
        for tag, events in series.items():
            for e in events:
                writer.add_scalar(tag, e.value, e.step, walltime=e.wall_time)
        writer.close()
        (new,) = set(target.iterdir()) - before
        start = min(e.wall_time for events in series.values() for e in events)
        written.append(new.rename(target / f"events.out.tfevents.{int(start)}.healer"))
    return written

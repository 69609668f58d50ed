"""Learning curves from TensorBoard event files, drawn as PNG for the model card.

The scalars are read back with TensorBoard's own ``EventAccumulator`` (it merges the
several event files a resumed run leaves, honouring purged steps), and drawn with
matplotlib's Agg backend so no display is needed.
"""

from __future__ import annotations

from pathlib import Path

# Panels of one figure: a title and which tags go on it (a tag goes on the first panel it matches).
PANELS = (
    # train/ce and train/kl are the two halves of a distillation loss
    ("loss", lambda tag: "loss" in tag or tag.endswith(("/ce", "/kl"))),
    ("learning rate", lambda tag: tag.endswith("/lr") or tag == "lr"),
    ("grad norm", lambda tag: "grad_norm" in tag),
    ("tokens / s", lambda tag: tag.endswith("tokens_per_s")),
)


def read_scalars(log_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar tag under ``log_dir`` -> (steps, values), in step order; {} when there is no log."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir() or not any(log_dir.rglob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    out: dict[str, tuple[list[int], list[float]]] = {}
    # A run may log from sub-folders (one per writer); read each folder that holds event files.
    for folder in sorted({p.parent for p in log_dir.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0 = keep every point
        acc.Reload()
        prefix = "" if folder == log_dir else f"{folder.relative_to(log_dir).as_posix()}/"
        for tag in acc.Tags().get(SCALARS, []):
            events = sorted(acc.Scalars(tag), key=lambda e: e.step)
            out[prefix + tag] = ([e.step for e in events], [e.value for e in events])
    return out


def plot_curves(scalars: dict[str, tuple[list[int], list[float]]], out_png: str | Path, title: str) -> Path | None:
    """Draw the loss / learning-rate / grad-norm panels that ``scalars`` has; None when it has none of them."""
    grouped: dict[str, list[str]] = {}
    for tag in sorted(scalars):
        name = next((name for name, match in PANELS if match(tag)), None)
        if name is not None:
            grouped.setdefault(name, []).append(tag)
    panels = [(name, grouped[name]) for name, _ in PANELS if name in grouped]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, tags) in zip(axes[0], panels):
        for tag in tags:
            steps, values = scalars[tag]
            ax.plot(steps, values, label=tag, marker="o" if len(steps) < 20 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if name == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.suptitle(title)
    return save_figure(fig, out_png)


def save_figure(fig, out_png: str | Path) -> Path:
    """Lay ``fig`` out, write it to ``out_png`` (its folder made), close it; the path written."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png

"""Per-step metrics: TensorBoard scalars (and wandb / MLflow) and a progress bar, on rank 0 only.

Every rank may call :meth:`MetricsLogger.log`; ranks other than 0 do nothing, so
training loops need no ``if rank == 0`` around their logging. Scalars go to every tracker
``report_to`` names (``train/trackers.py``; TensorBoard event files in ``<log_dir>`` by default)
under the names given (use ``/`` to group: ``train/loss``, ``tokens/source/arxiv``); the bar
shows a few chosen keys.

    logger = MetricsLogger(stage_dir / "tensorboard", total_steps=cfg.max_steps, rank=rank, initial_step=start,
                           report_to=cfg.report_to)
    for step in ...:
        logger.log(step, {"train/loss": loss, "train/lr": lr})
    logger.close()
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from healer.train.trackers import Tracker, open_trackers

# What the bar shows, in this order, when present in a step's scalars (key -> short label).
DEFAULT_BAR_KEYS = {"train/loss": "loss", "train/lr": "lr", "perf/tokens_per_s": "tok/s", "val/loss": "val"}


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.detach().float().item()
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out


def _open_jsonl(path: Path, initial_step: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    kept: list[str] = []
    if initial_step and path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= initial_step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)
    return open(path, "a")


class MetricsLogger:
    """Scalars every step to TensorBoard (and wandb / MLflow) plus a tqdm bar, written by rank 0 only.

    Args:
        log_dir: directory for the TensorBoard event files (created on rank 0); wandb and MLflow keep theirs
            in its parent, the stage directory. None: no tracker at all (a logger that only prints).
        total_steps: the run's last step, so the bar shows progress and an ETA.
        rank: this process's global rank; only rank 0 writes or draws anything.
        initial_step: where a resumed run starts, so the bar does not restart at 0.
        desc: the bar's label (the stage name).
        bar_keys: scalar names shown on the bar, mapped to short labels.
        progress_bar: False turns the bar off (e.g. benchmarks); None shows it
            only when stderr is a terminal, and otherwise prints a progress line (step, scalars, seconds per
            step, ETA) after the first step, then every ``print_every`` steps or ``print_seconds`` seconds,
            whichever comes first, and at the last step, so a batch job's log shows progress from the start.
        print_every: steps between plain-text progress lines when there is no bar.
        print_seconds: the longest wait between two plain-text progress lines.
        jsonl_path: also append every step's scalars as one JSON line (``{"step": n, ...}``) for scripts and
            plots (``time`` is the wall clock when the step was logged, ``cpu_time`` this process's CPU seconds so
            far: on a shared machine the gaps in CPU time measure a step's cost better than wall time); on a
            resume, lines past ``initial_step`` (from the interrupted run) are dropped first.
        report_to: trackers to send the scalars to (``tensorboard``, ``wandb``, ``mlflow``; a training
            section's ``report_to`` key).
        run_config: the stage's settings, recorded as the wandb/MLflow run's config.
    """

    def __init__(self, log_dir: str | Path | None, total_steps: int, *, rank: int = 0, initial_step: int = 0,
                 desc: str = "train", bar_keys: Mapping[str, str] | None = None, progress_bar: bool | None = None,
                 print_every: int = 10, print_seconds: float = 30.0, jsonl_path: str | Path | None = None,
                 report_to: Sequence[str] = ("tensorboard",), run_config: Mapping[str, Any] | None = None):
        self.rank = rank
        self.enabled = rank == 0
        self.total_steps = total_steps
        self.bar_keys = dict(DEFAULT_BAR_KEYS if bar_keys is None else bar_keys)
        self.print_every = max(1, print_every)
        self.print_seconds = print_seconds
        self._initial_step = initial_step
        self._started = time.monotonic()
        self._printed_at: float | None = None
        self.desc = desc
        self.last: dict[str, float] = {}
        self._trackers: list[Tracker] = []
        self._bar = None
        self._jsonl = None
        if not self.enabled:
            return
        if jsonl_path is not None:
            self._jsonl = _open_jsonl(Path(jsonl_path), initial_step)
        if log_dir is not None:
            self._trackers = open_trackers(list(report_to), Path(log_dir), run_name=desc, initial_step=initial_step,
                                           config=run_config)
        show_bar = sys.stderr.isatty() if progress_bar is None else progress_bar
        self._text_progress = progress_bar is None and not show_bar
        if show_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def log(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Record ``scalars`` at ``step`` (non-numbers and None are ignored) and advance the bar to ``step``."""
        if not self.enabled:
            return
        values = {k: v for k, v in ((k, _as_float(v)) for k, v in scalars.items()) if v is not None}
        self.last.update(values)
        for tracker in self._trackers:
            tracker.log(step, values)
        if self._jsonl is not None:
            row = {"step": step, "time": time.time(), "cpu_time": time.process_time(), **values}
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        shown = {label: self.last[k] for k, label in self.bar_keys.items() if k in self.last}
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self._bar.update(max(0, step - self._bar.n))
        elif self._text_progress:
            now = time.monotonic()
            if (self._printed_at is None or step % self.print_every == 0 or step >= self.total_steps
                    or now - self._printed_at >= self.print_seconds):
                self._printed_at = now
                body = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
                print(f"[{self.desc}] step {step}/{self.total_steps} {body}{self._pace(step, now)}", file=sys.stderr,
                      flush=True)

    def _pace(self, step: int, now: float) -> str:
        """`` | 11.2 s/step, ETA 2m 26s`` from this run's steps so far (a resume counts from where it started)."""
        done = step - self._initial_step
        if done <= 0:
            return ""
        per_step = (now - self._started) / done
        left = max(0, self.total_steps - step) * per_step
        eta = f"{int(left // 3600)}h {int(left % 3600 // 60):02d}m" if left >= 3600 else \
            f"{int(left // 60)}m {int(left % 60):02d}s" if left >= 60 else f"{left:.0f}s"
        return f" | {per_step:.3g} s/step, ETA {eta}"

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Write a text note (the run's settings, a decoded sample) to every tracker."""
        if self.enabled:
            for tracker in self._trackers:
                tracker.text(tag, text, step)

    def write(self, message: str) -> None:
        """Print a line on rank 0 without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def flush(self) -> None:
        for tracker in self._trackers:
            tracker.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            tracker.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Dense bf16/fp16 tensor-core peak FLOP/s per device, by a substring of torch.cuda.get_device_name().
# Longest match wins ("H100 PCIe" before "H100"). Unknown devices (and every CPU) give no MFU.
PEAK_FLOPS_16BIT = {
    "H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "GH200": 989e12,
    "A100": 312e12, "A800": 312e12, "H800": 989e12, "L40S": 362e12, "L40": 181e12, "A10G": 125e12,
    "A10": 125e12, "L4": 121e12, "V100": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "B200": 2250e12,
}


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s per device or None, the device's name). Only 16-bit GPU peaks are known."""
    if device.type != "cuda":
        import platform

        return None, f"cpu ({platform.processor() or platform.machine()})"
    name = torch.cuda.get_device_name(device)
    if precision not in ("bf16", "fp16"):
        return None, name
    matches = [k for k in PEAK_FLOPS_16BIT if k in name]
    if not matches:
        return None, name
    return PEAK_FLOPS_16BIT[max(matches, key=len)], name


def training_flops_per_token(config, matmul_params: int, seq_len: int) -> float:
    """6 * (parameters used in matmuls) + attention scores/values (12 * layers * hidden * seq), per token.

    ``matmul_params`` excludes the input embedding (a lookup) but counts the output head even when tied.
    """
    layers = getattr(config, "num_hidden_layers", 0)
    heads = getattr(config, "num_attention_heads", 0)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // max(1, heads))
    return 6.0 * matmul_params + 12.0 * layers * heads * head_dim * seq_len


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

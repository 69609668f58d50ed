"""Where a training stage's per-step scalars go: TensorBoard (the default), Weights & Biases, MLflow.

A training section's ``report_to: [tensorboard, wandb, mlflow]`` names them; :class:`MetricsLogger`
(``train/metrics.py``) opens one :class:`Tracker` per name on rank 0 and hands each the same scalars.
wandb and mlflow are optional (``pip install 'healer[trackers]'``): a recipe naming one that is not
installed is refused when it is loaded, not an hour into training.

Both follow their own environment variables: ``WANDB_PROJECT``/``WANDB_ENTITY``/``WANDB_MODE``
(``offline`` needs no account) and ``MLFLOW_TRACKING_URI``/``MLFLOW_EXPERIMENT_NAME``. Without a
tracking URI, MLflow writes a local file store in ``<stage dir>/mlruns`` (``mlflow ui
--backend-store-uri`` reads it). The run id of each is kept in
the stage directory, so a resumed stage goes on logging into the same run.

This module imports no tracker (and no torch) at import time: recipe validation only looks the
packages up.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import AfterValidator

from healer.core.errors import HealerError

TrackerName = Literal["tensorboard", "wandb", "mlflow"]

# name -> (module that must be importable, what to install when it is not)
PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install wandb (or pip install 'healer[trackers]')"),
    "mlflow": ("mlflow", "pip install mlflow-skinny (or pip install 'healer[trackers]')"),
}


def check_installed(names: list[str]) -> list[str]:
    """Pydantic validator of ``report_to``: every named tracker importable, each once, in the given order."""
    for name in names:
        module, install = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"{name} is not installed; {install}")
    return list(dict.fromkeys(names))


ReportTo = Annotated[list[TrackerName], AfterValidator(check_installed)]


class Tracker(Protocol):
    def log(self, step: int, values: Mapping[str, float]) -> None: ...
    def text(self, tag: str, text: str, step: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def _run_id(stage_dir: Path, tracker: str, new) -> str:
    """The id of this stage's run in ``tracker``: the one a previous (interrupted) run recorded, else ``new()``."""
    path = stage_dir / f".{tracker}_run_id"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = new()
    path.write_text(run_id + "\n")
    return run_id


class TensorBoardTracker:
    """Event files in ``log_dir`` (what the release draws its curves from and ships under ``runs/``)."""

    def __init__(self, log_dir: Path, initial_step: int):
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        # purge_step drops events past the resume point that a killed run may have written,
        # so a resumed curve is not drawn twice.
        self.writer = SummaryWriter(str(log_dir), purge_step=initial_step + 1 if initial_step else None,
                                    flush_secs=30)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            if math.isfinite(value):
                self.writer.add_scalar(key, value, step)
            else:  # TensorBoard drops NaN/inf silently; keep a trace that it happened
                self.writer.add_scalar(key + "_nonfinite", 1.0, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run named after the stage; its files go to ``<stage dir>/wandb``."""

    def __init__(self, stage_dir: Path, run_name: str, config: Mapping[str, Any] | None):
        import wandb

        run_id = _run_id(stage_dir, "wandb", lambda: uuid.uuid4().hex[:12])
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "healer"), name=run_name, id=run_id,
                                  resume="allow", dir=str(stage_dir), config=dict(config or {}), reinit=True)
        except Exception as err:  # not logged in, no network in online mode, ...
            raise HealerError(f"report_to wandb: wandb.init failed ({str(err).splitlines()[0] if str(err) else err!r}"
                              "); run `wandb login`, or set WANDB_MODE=offline to log locally") from err

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log({k: v for k, v in values.items() if math.isfinite(v)}, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.run.summary[tag] = text

    def flush(self) -> None:
        pass  # wandb streams by itself

    def close(self) -> None:
        self.run.finish()


# MLflow allows letters, digits, _ - . space / in a metric name; a corpus source name may hold anything.
_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


class MlflowTracker:
    """An MLflow run in experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``healer``), through a client of its
    own so that two stages in one process never share MLflow's global "active run"."""

    def __init__(self, stage_dir: Path, run_name: str, config: Mapping[str, Any] | None):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (stage_dir / "mlruns").resolve().as_uri()
            # MLflow 3 refuses its file store unless asked for it; with no server named, a folder beside
            # the checkpoints is still the store that needs nothing else installed.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "healer")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)

        def new_run() -> str:
            run = self.client.create_run(experiment_id, run_name=run_name)
            for key, value in (config or {}).items():
                self.client.log_param(run.info.run_id, key, str(value)[:500])  # MLflow's limit on a param
            return run.info.run_id

        self.run_id = _run_id(stage_dir, "mlflow", new_run)
        self.uri = uri

    def log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_BAD.sub("_", k), v, now, step) for k, v in values.items() if math.isfinite(v)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, _MLFLOW_BAD.sub("_", tag) + ".md")

    def flush(self) -> None:
        pass  # every call is written when it is made

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(report_to: list[str], log_dir: Path, *, run_name: str, initial_step: int,
                  config: Mapping[str, Any] | None = None) -> list[Tracker]:
    """One tracker per name in ``report_to``.

    Args:
        log_dir: TensorBoard's folder (``<stage dir>/tensorboard``); wandb and MLflow keep their files and
            run ids in its parent, the stage directory.
        run_name: the run's name in wandb/MLflow (the stage).
        initial_step: where a resumed run starts (TensorBoard drops the killed run's later events).
        config: the stage's settings, recorded as the run's config/params (secrets redacted).
    """
    from healer.core.redact import redact_tree

    config = redact_tree(dict(config)) if config else None
    stage_dir = Path(log_dir).parent
    stage_dir.mkdir(parents=True, exist_ok=True)
    makers = {
        "tensorboard": lambda: TensorBoardTracker(Path(log_dir), initial_step),
        "wandb": lambda: WandbTracker(stage_dir, run_name, config),
        "mlflow": lambda: MlflowTracker(stage_dir, run_name, config),
    }
    return [makers[name]() for name in report_to]

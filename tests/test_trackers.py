"""report_to: the single metrics logger sends every step's scalars to TensorBoard, wandb and MLflow."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import sys
import types

import pytest

from healer.core.errors import RecipeError
from healer.recipe import load_recipe
from healer.train.metrics import MetricsLogger


def test_a_tracker_that_is_not_installed_is_refused_at_recipe_load(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RecipeError) as err:
        load_recipe("demo", ["cpt.report_to=[tensorboard, wandb]"])
    assert "cpt.report_to: wandb is not installed; pip install wandb" in str(err.value)
    with pytest.raises(RecipeError, match=r"sft.report_to.0: Input should be 'tensorboard', 'wandb' or 'mlflow'"):
        load_recipe("demo", ["sft.report_to=[comet]"])
    assert load_recipe("demo").cpt.report_to == ["tensorboard"]  # the default


class FakeRun:
    def __init__(self, **kwargs):
        self.init = kwargs
        self.logged: list[tuple[int, dict]] = []
        self.summary: dict = {}
        self.finished = False

    def log(self, values, step):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in `wandb` module: what the logger hands it is what a real run would get."""
    runs: list[FakeRun] = []
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # libraries probe it with find_spec
    module.init = lambda **kwargs: runs.append(FakeRun(**kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", module)
    return runs


def test_every_step_reaches_each_tracker_and_a_resume_continues_the_same_run(tmp_path, fake_wandb):
    stage = tmp_path / "cpt"
    cfg = {"lr": 1e-4, "launch": {"env": {"HF_TOKEN": "hf_secret"}}}
    with MetricsLogger(stage / "tensorboard", 4, report_to=["tensorboard", "wandb"], desc="cpt",
                       run_config=cfg, progress_bar=False) as logger:
        logger.log(1, {"train/loss": 2.5, "train/lr": 1e-4, "note": "not a number"})
        logger.log(2, {"train/loss": math.nan})
        logger.text("config/x", "hello", 2)
    run = fake_wandb[0]
    assert run.logged == [(1, {"train/loss": 2.5, "train/lr": 1e-4}), (2, {})]  # NaN is not sent as a point
    assert run.summary == {"config/x": "hello"} and run.finished
    assert run.init["name"] == "cpt" and run.init["dir"] == str(stage) and run.init["resume"] == "allow"
    assert "hf_secret" not in repr(run.init["config"])
    assert any((stage / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard still written beside it

    with MetricsLogger(stage / "tensorboard", 4, report_to=["wandb"], initial_step=2, progress_bar=False) as again:
        again.log(3, {"train/loss": 2.0})
    assert fake_wandb[1].init["id"] == run.init["id"]  # the resumed stage logs into the same run
    assert fake_wandb[1].logged == [(3, {"train/loss": 2.0})]


def test_other_ranks_open_no_tracker(tmp_path, fake_wandb):
    with MetricsLogger(tmp_path / "tb", 2, rank=1, report_to=["tensorboard", "wandb"], progress_bar=False) as log:
        log.log(1, {"train/loss": 1.0})
    assert fake_wandb == [] and not (tmp_path / "tb").exists()


def test_real_mlflow_local_file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stage = tmp_path / "sft"
    with MetricsLogger(stage / "tensorboard", 3, report_to=["mlflow"], desc="sft", run_config={"lr": 0.1},
                       progress_bar=False) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"train/loss": 1.0 / step, "tokens/source/a:b": step})
    client = MlflowClient(tracking_uri=(stage / "mlruns").resolve().as_uri())
    run_id = (stage / ".mlflow_run_id").read_text().strip()
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [m.value for m in client.get_metric_history(run_id, "tokens/source/a_b")] == [1, 2, 3]
    run = client.get_run(run_id)
    assert run.data.params["lr"] == "0.1" and run.info.run_name == "sft" and run.info.status == "FINISHED"


def test_real_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    stage = tmp_path / "cpt"
    with MetricsLogger(stage / "tensorboard", 2, report_to=["wandb"], desc="cpt", progress_bar=False) as logger:
        logger.log(1, {"train/loss": 2.0})
        logger.log(2, {"train/loss": 1.5})
    run_id = (stage / ".wandb_run_id").read_text().strip()
    offline = list((stage / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline and any(offline[0].glob("*.wandb"))


@pytest.mark.slow
def test_a_cpt_run_reports_its_steps_to_the_trackers_its_recipe_names(tmp_path, fake_wandb):
    """cpt.report_to reaches the trainer's logger: every optimizer step's loss goes to wandb too."""
    import json

    from helpers import SAMPLE_TEXT, save_tiny

    from healer.model.modeling import resolve_source
    from healer.train.config import CPTConfig
    from healer.train.cpt import Options, heal
    from healer.train.data.config import DataConfig, SourceConfig

    model = save_tiny(tmp_path, "llama", layers=2, hidden=32, intermediate=64)
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{i} {SAMPLE_TEXT}"}) + "\n" for i in range(20)))
    cfg = CPTConfig(zero_stage=2, micro_batch_size=2, global_batch_size=4, max_steps=2, warmup_steps=1, seed=0,
                    report_to=["tensorboard", "wandb"], kd=None)
    heal(cfg, DataConfig(sources=[SourceConfig(path=str(corpus))], seq_len=32), location=resolve_source(str(model)),
         teacher_location=None, stage_dir=tmp_path / "cpt", hf_dir=tmp_path / "cpt" / "hf", opts=Options())
    run = fake_wandb[-1]
    jsonl = [json.loads(line) for line in (tmp_path / "cpt" / "metrics.jsonl").read_text().splitlines()]
    losses = {step: values["train/loss"] for step, values in run.logged if "train/loss" in values}
    assert losses == {row["step"]: pytest.approx(row["train/loss"]) for row in jsonl if "train/loss" in row}
    assert sorted(losses) == [1, 2] and run.init["name"] == "cpt" and run.init["config"]["max_steps"] == 2
    assert run.finished


def test_a_log_without_a_terminal_shows_progress_from_the_first_step(capsys):
    """In a batch job's log (no terminal, so no bar) the first step is reported at once with its pace and
    ETA, then every print_every steps, and the last step always; a resumed run counts from where it began."""
    logger = MetricsLogger(None, 25, initial_step=3, print_every=10, print_seconds=3600)
    for step in range(4, 26):
        logger.log(step, {"train/loss": 2.0, "train/lr": 1e-4})
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[2] for line in lines] == ["4/25", "10/25", "20/25", "25/25"]
    assert "loss=2" in lines[0] and "s/step, ETA" in lines[0]

    slow = MetricsLogger(None, 5, print_every=10, print_seconds=0)  # a line per step once steps are slow
    for step in range(1, 6):
        slow.log(step, {"train/loss": 1.0})
    assert len(capsys.readouterr().err.splitlines()) == 5

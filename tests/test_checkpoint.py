"""The checkpoint protocol a user relies on: nothing of ours is pickled, a damaged checkpoint is skipped for the
previous one, a full disk keeps the previous one, and a resume that cannot work says why in one line."""

from __future__ import annotations

import errno
import json
import random

import numpy as np
import pytest
import torch

from healer.core.errors import HealerError
from healer.train.checkpoint import (
    COMPLETE,
    LATEST,
    check_settings,
    find_resume_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)

SETTINGS = {"data.seq_len": 32, "cpt.micro_batch_size": 1}


def _engine(zero_stage: int, seed: int = 0):
    from healer.train.engine import build_ds_config, init_distributed, init_engine, make_optimizer

    init_distributed()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    # the stage named in a passed-through config: on one rank a recipe's ZeRO-1/2 would run as stage 0
    ds = build_ds_config(zero_stage=zero_stage, micro_batch_size=1, global_batch_size=1, world_size=1,
                         base={"zero_optimization": {"stage": zero_stage}})
    return init_engine(model, ds, make_optimizer(model, lr=1e-2))


def _train_step(engine) -> None:
    x = torch.randn(1, 8)
    engine.backward(engine(x).pow(2).sum())
    engine.step()


@pytest.fixture(scope="module")
def engine():
    return _engine(zero_stage=1)


def test_trainer_state_is_json_and_rng_comes_back(engine, tmp_path):
    _train_step(engine)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save_checkpoint(engine, tmp_path, 1, {"step": 1, "data": {"pos": [1, 2]}}, keep_last=2, settings=SETTINGS)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())

    ours = sorted(p.name for p in path.iterdir() if not p.name.endswith("states.pt"))
    assert ours == [COMPLETE, "rng_rank0.safetensors", "trainer_state_rank0.json"]
    assert json.loads((path / "trainer_state_rank0.json").read_text())["data"] == {"pos": [1, 2]}
    info = json.loads((path / COMPLETE).read_text())
    assert info["zero_stage"] == 1 and info["ranks"] == 1 and info["settings"] == SETTINGS
    assert info["files"]["trainer_state_rank0.json"] == (path / "trainer_state_rank0.json").stat().st_size

    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = load_checkpoint(engine, path, settings=SETTINGS)
    assert state["step"] == 1 and list(state["data"]["ranks"]) == [{"pos": [1, 2]}] and state["changed"] == []
    assert state["elastic"] == ""
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(engine, tmp_path, capsys):
    for step in (2, 4):
        _train_step(engine)
        save_checkpoint(engine, tmp_path, step, {"step": step}, keep_last=3, settings=SETTINGS)
    victim = max((tmp_path / "step00000004").glob("*optim_states.pt"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:100])  # complete.json still says "complete"

    assert find_resume_checkpoint(tmp_path).name == "step00000002"
    err = capsys.readouterr().err
    assert "step00000004 is damaged" in err and victim.name in err and "falling back" in err
    with pytest.raises(HealerError, match="damaged"):
        resolve_resume(str(tmp_path / "step00000004"), tmp_path)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(engine, tmp_path, monkeypatch):
    _train_step(engine)
    save_checkpoint(engine, tmp_path, 1, {"step": 1}, keep_last=2, settings=SETTINGS)

    real = type(engine).save_checkpoint

    def full_disk(self, save_dir, tag=None, **kw):
        real(self, save_dir, tag=tag, **kw)  # half of the files made it ...
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(engine), "save_checkpoint", full_disk)
    with pytest.raises(HealerError, match=rf"no space left on {tmp_path} while saving step 2; the previous checkpoint "
                                          r"step00000001 is kept"):
        save_checkpoint(engine, tmp_path, 2, {"step": 2}, keep_last=2, settings=SETTINGS)
    assert not (tmp_path / "step00000002").exists()
    assert (tmp_path / LATEST).read_text() == "step00000001"
    assert find_resume_checkpoint(tmp_path).name == "step00000001"


def test_changed_settings_are_refused_by_key_unless_forced(tmp_path):
    saved = {"data.seq_len": 32, "cpt.micro_batch_size": 1, "cpt.betas": [0.9, 0.95]}
    now = {"data.seq_len": 64, "cpt.micro_batch_size": 1, "cpt.betas": (0.9, 0.95)}  # tuples == saved lists
    with pytest.raises(HealerError, match=r"data\.seq_len: 32 -> 64\).*--force"):
        check_settings(saved, now, path=tmp_path, force=False)
    assert check_settings(saved, now, path=tmp_path, force=True) == ["data.seq_len: 32 -> 64"]
    assert check_settings(saved, dict(saved), path=tmp_path, force=False) == []


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"step{step:08d}"
        d.mkdir()
        if complete:
            (d / COMPLETE).write_text("{}")
    (tmp_path / LATEST).write_text("step00000006")  # pointer to an interrupted save: ignored
    assert find_resume_checkpoint(tmp_path).name == "step00000004"
    (tmp_path / LATEST).write_text("step00000002")
    assert find_resume_checkpoint(tmp_path).name == "step00000002"
    assert resolve_resume("none", tmp_path) is None
    with pytest.raises(HealerError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "step00000006"), tmp_path)

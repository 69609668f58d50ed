"""Checkpoints are data: a pickle planted in a model or optimizer state file is refused in one line and never
runs, on the same-layout and the elastic resume path; real checkpoints of every single-rank layout still resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import one_rank_cpt_recipe

from healer.cli import main


class Payload:
    """What an attacker plants: unpickling it writes a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _recipe(tmp_path: Path, zero_stage: int) -> Path:
    return one_rank_cpt_recipe(tmp_path, max_steps=2, zero_stage=zero_stage, kd=None, warmup_steps=0, save_every=1)


def _plant(state_file: Path, marker: Path) -> None:
    """The payload inside a real state file, and complete.json's size updated, as a planted copy would be."""
    state = torch.load(state_file, weights_only=False)  # the test's own file: a real one to start from
    state["planted"] = Payload(marker)
    torch.save(state, state_file)
    complete = state_file.parent / "complete.json"
    record = json.loads(complete.read_text())
    record["files"][state_file.name] = state_file.stat().st_size
    complete.write_text(json.dumps(record))


@pytest.mark.parametrize("zero_stage,pattern,resume_with", [
    (0, "mp_rank_00_model_states.pt", []),                      # same layout, DeepSpeed's loader
    (0, "mp_rank_00_model_states.pt", ["cpt.zero_stage=3"]),    # elastic: another ZeRO stage
    (3, "zero_pp_rank_0_mp_rank_00_optim_states.pt", []),       # ZeRO-3's optimizer shard
])
def test_a_planted_pickle_is_refused_and_never_runs(tmp_path, capsys, zero_stage, pattern, resume_with):
    recipe = _recipe(tmp_path, zero_stage)
    assert main(["cpt", str(recipe), "--cpt.max_steps", "1"]) == 0
    checkpoint = tmp_path / "run" / "cpt" / "checkpoints" / "step00000001"
    marker = tmp_path / "payload-ran"
    _plant(checkpoint / pattern, marker)
    capsys.readouterr()
    assert main(["cpt", str(recipe), "--cpt.max_steps", "2", *resume_with]) == 2
    err = capsys.readouterr().err
    assert f"{pattern}: refused to load: its pickle calls exec" in err, err
    assert "Traceback" not in err
    assert not marker.exists()


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_real_checkpoints_resume_through_the_safe_loader(tmp_path, zero_stage):
    recipe = _recipe(tmp_path, zero_stage)
    assert main(["cpt", str(recipe), "--cpt.max_steps", "1"]) == 0
    assert main(["cpt", str(recipe), "--cpt.max_steps", "2"]) == 0
    manifest = json.loads((tmp_path / "run" / "cpt" / "manifest.json").read_text())
    assert manifest["outputs"]["steps"] == 2

"""2-process ZeRO-2 / ZeRO-3 runs of `healer sft` (LoRA) with the real DeepSpeed engine on CPU (gloo).

The same promise as cpt's (test_cpt_distributed.py), through the same loop: a run SIGKILLed after a step or
in the middle of writing a checkpoint, or preempted with SIGTERM, then resumed with `--resume auto`, logs
exactly the losses of a run never interrupted and writes a bit-identical adapter.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import healer_on_ranks, save_tiny

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 6  # 24 examples, global batch 8, 2 epochs




@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    data = root / "data.json"
    data.write_text(json.dumps([{"instruction": f"Add {i} and {i + 1}.", "input": "",
                                 "output": f"The sum is {2 * i + 1}."} for i in range(24)]))
    return {"root": root, "model": save_tiny(root, layers=2), "data": data}


def _recipe(ws, out: Path, zero_stage: int) -> Path:
    recipe = {"model": {"source": str(ws["model"])}, "seed": 3,
              "sft": {"data": str(ws["data"]), "output": str(out), "zero_stage": zero_stage, "micro_batch_size": 2,
                      "global_batch_size": 8, "epochs": 2, "lr": 3e-3, "dropout": 0.1, "save_every": 2,
                      "keep_last": 2}}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(ws, recipe: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    return healer_on_ranks("sft", recipe, fault=fault, cwd=ws["root"])


def _metrics(stage: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (stage / "metrics.jsonl").read_text().splitlines())}


def _adapter(stage: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(stage / "adapter" / "adapter_model.safetensors")


def _interrupted_matches_uninterrupted(ws, zero_stage: int, second_fault: str) -> Path:
    ref = ws["root"] / f"z{zero_stage}_ref"
    done = _run(ws, _recipe(ws, ref, zero_stage))
    assert done.returncode == 0, done.stderr[-3000:]

    run = ws["root"] / f"z{zero_stage}_interrupted"
    recipe = _recipe(ws, run, zero_stage)
    killed = _run(ws, recipe, fault="kill_at_step:3:1")  # rank 1 dies after step 3; step 2 is saved
    assert killed.returncode != 0
    assert (run / "checkpoints" / "latest").read_text() == "step00000002"
    second = _run(ws, recipe, fault=second_fault)
    assert second.returncode != 0
    assert "resumed from" in second.stderr and "step 2" in second.stderr, second.stderr[-3000:]
    if second_fault.startswith("term_"):  # preempted: a checkpoint at the step boundary, the marker, exit 75
        assert json.loads((run / "PREEMPTED").read_text())["step"] == 4 and "exiting with 75" in second.stderr
    final = _run(ws, recipe)
    assert final.returncode == 0, final.stderr[-3000:]

    want, got = _metrics(ref), _metrics(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s]["train/loss"] for s in sorted(got)] == [want[s]["train/loss"] for s in sorted(want)]
    assert want[STEPS]["train/loss"] < want[1]["train/loss"]
    a, b = _adapter(ref), _adapter(run)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    manifest = json.loads((run / "manifest.json").read_text())["outputs"]
    assert manifest["steps"] == STEPS and manifest["tokens_trained"] == json.loads(
        (ref / "manifest.json").read_text())["outputs"]["tokens_trained"]
    assert not (run / "PREEMPTED").exists()
    return run


def test_zero2_sigkill_then_sigterm_resume_to_the_uninterrupted_adapter(workspace):
    run = _interrupted_matches_uninterrupted(workspace, 2, second_fault="term_at_step:4:1")
    assert json.loads((run / "checkpoints" / "step00000004" / "complete.json").read_text())["step"] == 4


def test_zero3_sigkill_in_save_resumes_to_the_uninterrupted_adapter(workspace):
    _interrupted_matches_uninterrupted(workspace, 3, second_fault="kill_in_save:4:0")

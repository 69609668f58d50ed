"""2-process ZeRO-2 / ZeRO-3 runs of `healer cpt` with the real DeepSpeed engine on CPU (gloo).

A run SIGKILLed at a step, and again in the middle of writing a checkpoint, then resumed with
`--resume auto`, must log exactly the same loss at every step as a run never interrupted, and
export bit-identical weights. On CPU in fp32 the kernels are deterministic, so we ask for equality.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import SAMPLE_TEXT, healer_on_ranks, save_tiny

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 8




def _corpus(path: Path, docs: int, seed: int) -> Path:
    import random

    rng = random.Random(seed)
    words = SAMPLE_TEXT.split()
    with open(path, "w") as fh:
        for _ in range(docs):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))}) + "\n")
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpt")
    teacher = save_tiny(root, "llama", name="teacher", layers=3, hidden=32, intermediate=64, heads=4, kv_heads=2)
    student = save_tiny(root, "llama", name="student", layers=2, hidden=32, intermediate=64, heads=4, kv_heads=2)
    return {"root": root, "teacher": teacher, "student": student,
            "train": _corpus(root / "train.jsonl", 120, 0), "val": _corpus(root / "val.jsonl", 20, 1)}


def _recipe(ws, out: Path, zero_stage: int, kd: bool) -> Path:
    recipe = {
        "model": {"source": str(ws["teacher"])},
        "data": {"sources": [{"path": str(ws["train"])}], "validation": [{"path": str(ws["val"])}], "seq_len": 32},
        "cpt": {"input": str(ws["student"]), "output": str(out), "zero_stage": zero_stage, "micro_batch_size": 2,
                "global_batch_size": 8, "max_steps": STEPS, "lr": 3e-3, "warmup_steps": 2, "save_every": 2,
                "keep_last": 2, "eval_every": 4, "eval_batches": 2},
    }
    recipe["cpt"]["kd"] = {"alpha": 0.5, "temperature": 2.0, "top_k": 16} if kd else None  # None: plain CE
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(ws, recipe: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    return healer_on_ranks("cpt", recipe, timeout=240, fault=fault, cwd=ws["root"])


def _losses(stage: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def _weights(hf: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(hf / "model.safetensors")


def _kill_resume_matches_uninterrupted(ws, zero_stage: int, kd: bool, kill_in_save: bool) -> None:
    name = f"z{zero_stage}{'kd' if kd else ''}"
    ref = ws["root"] / f"{name}_ref"
    done = _run(ws, _recipe(ws, ref, zero_stage, kd))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (ref / "manifest.json").is_file()

    run = ws["root"] / f"{name}_killed"
    recipe = _recipe(ws, run, zero_stage, kd)
    killed = _run(ws, recipe, fault="kill_at_step:5:1")  # rank 1 dies after step 5; step 4 is saved
    assert killed.returncode != 0
    assert (run / "checkpoints" / "latest").read_text() == "step00000004"

    if kill_in_save:
        in_save = _run(ws, recipe, fault="kill_in_save:6:0")  # resumes at 4, dies while writing step 6
        assert in_save.returncode != 0
        assert "resumed from" in in_save.stderr and "step 4" in in_save.stderr, in_save.stderr[-3000:]
        assert (run / "checkpoints" / "step00000006").is_dir()  # a half-written checkpoint ...
        assert not (run / "checkpoints" / "step00000006" / "complete.json").exists()
        assert (run / "checkpoints" / "latest").read_text() == "step00000004"  # ... that nothing points to

    final = _run(ws, recipe)
    assert final.returncode == 0, final.stderr[-3000:]

    want, got = _losses(ref), _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step]["train/loss"] == want[step]["train/loss"], (step, got[step], want[step])
        if kd:
            assert got[step]["train/kl"] == want[step]["train/kl"]
    assert got[STEPS]["val/loss"] == want[STEPS]["val/loss"]
    assert want[STEPS]["train/loss"] < want[1]["train/loss"]  # it learned something

    a, b = _weights(ref / "hf"), _weights(run / "hf")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["outputs"]["steps"] == STEPS
    assert manifest["outputs"]["tokens_trained"] == STEPS * 8 * 32
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000006", "step00000008"]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    assert model.config.num_hidden_layers == 2


def test_zero2_sigkill_and_resume_give_the_uninterrupted_losses(workspace):
    _kill_resume_matches_uninterrupted(workspace, zero_stage=2, kd=False, kill_in_save=False)


def test_zero3_kd_sigkill_in_save_and_resume_give_the_uninterrupted_losses(workspace):
    _kill_resume_matches_uninterrupted(workspace, zero_stage=3, kd=True, kill_in_save=True)

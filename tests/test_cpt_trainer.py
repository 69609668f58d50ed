"""The CPT trainer's parts a user notices: LR schedules, the KD loss, batch arithmetic, checkpoint
selection, and preemption of a real single-process run (SIGTERM -> save -> exit code -> resume)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import _TEXT, save_tiny, tiny_model
from healer.errors import HealerError
from healer.train.checkpoint import COMPLETE, LATEST, find_resume_checkpoint, resolve_resume
from healer.train.engine import build_ds_config
from healer.train.kd import distill_loss
from healer.train.schedule import make_lr_lambda
from healer.train.signals import PREEMPTED_EXIT_CODE


def test_cosine_schedule_warms_up_then_decays_to_min_ratio():
    f = make_lr_lambda("cosine", max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    warm = [f(s) for s in range(10)]
    assert warm == sorted(warm) and warm[0] == pytest.approx(0.1) and warm[-1] == pytest.approx(1.0)
    decay = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert f(100) == pytest.approx(0.1) and f(55) == pytest.approx(0.55)


def test_wsd_schedule_is_flat_until_the_last_fraction():
    f = make_lr_lambda("wsd", max_steps=100, warmup_steps=5, min_lr_ratio=0.0, decay_fraction=0.2)
    assert all(f(s) == 1.0 for s in range(5, 80))
    assert f(90) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def _logits(seed: int, shape=(2, 12, 50)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_kd_with_teacher_equal_to_student_has_zero_kl():
    model = tiny_model("llama", layers=2, hidden=32, intermediate=64)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = model(ids).logits
    for top_k in (None, 8):
        loss, ce, kl = distill_loss(logits, logits.detach(), ids, alpha=0.0, temperature=2.0, top_k=top_k)
        assert abs(kl.item()) < 1e-5 if top_k is None else kl.item() >= 0
        if top_k is None:
            assert abs(loss.item()) < 1e-5
    # alpha=1 is plain next-token cross-entropy, what the model computes itself
    loss, ce, _ = distill_loss(logits, _logits(1, logits.shape), ids, alpha=1.0)
    assert loss.item() == pytest.approx(model(ids, labels=ids).loss.item(), rel=1e-5)


def test_kd_loss_pulls_the_student_towards_the_teacher():
    student = _logits(0).requires_grad_(True)
    teacher = _logits(1)
    ids = torch.randint(0, 50, (2, 12))
    _, _, kl_before = distill_loss(student, teacher, ids, alpha=0.0, temperature=1.0)
    assert kl_before.item() > 0.1
    opt = torch.optim.SGD([student], lr=5.0)
    for _ in range(50):
        loss, _, _ = distill_loss(student, teacher, ids, alpha=0.0, temperature=1.0, top_k=10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, _, kl_after = distill_loss(student, teacher, ids, alpha=0.0, temperature=1.0)
    assert kl_after.item() < kl_before.item() / 3


def test_batch_arithmetic_is_derived_and_a_bad_global_batch_is_refused():
    cfg = build_ds_config(zero_stage=2, micro_batch_size=4, global_batch_size=64, world_size=2)
    assert cfg["gradient_accumulation_steps"] == 8 and cfg["train_batch_size"] == 64
    with pytest.raises(HealerError, match="cpt.global_batch_size=60"):
        build_ds_config(zero_stage=2, micro_batch_size=4, global_batch_size=60, world_size=2)
    with pytest.raises(HealerError, match="offload_params needs"):
        build_ds_config(zero_stage=2, micro_batch_size=1, global_batch_size=2, world_size=2, offload_params=True)
    # a passed-through DeepSpeed JSON wins over the recipe's knobs
    cfg = build_ds_config(zero_stage=2, micro_batch_size=1, global_batch_size=8, world_size=2, base="zero3")
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["gradient_accumulation_steps"] == 4


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


def _steps(stage: Path) -> list[int]:
    path = stage / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_sigterm_saves_exits_with_the_preemption_code_and_resumes(tmp_path):
    model = save_tiny(tmp_path, "llama", layers=2, hidden=32, intermediate=64)
    corpus = tmp_path / "train.jsonl"
    lines = [json.dumps({"text": f"{i} {_TEXT}"}) for i in range(50)]
    lines[1] = '{"text": "a line cut short'  # a bad record: skipped, counted, and shown with its line
    corpus.write_text("\n".join(lines) + "\n")
    stage = tmp_path / "cpt"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"source": str(model)}, "data": {"sources": [{"path": str(corpus)}], "seq_len": 32},
        "cpt": {"output": str(stage), "zero_stage": 2, "micro_batch_size": 2, "global_batch_size": 2,
                "max_steps": 100000, "save_every": 100000, "warmup_steps": 0}}))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("HEALER_FAULT", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "healer", "cpt", "--config", str(recipe)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while len(_steps(stage)) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "skipped a bad record" in err and "train.jsonl" in err, err[-3000:]
    saved = find_resume_checkpoint(stage / "checkpoints")
    stopped_at = json.loads((saved / COMPLETE).read_text())["step"]
    assert stopped_at == _steps(stage)[-1] >= 3
    assert json.loads((stage / "PREEMPTED").read_text())["step"] == stopped_at
    assert not (stage / "manifest.json").exists()

    done = subprocess.run(cmd + [f"cpt.max_steps={stopped_at + 2}"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at step {stopped_at}" in done.stderr
    assert _steps(stage) == list(range(1, stopped_at + 3))
    assert json.loads((stage / "manifest.json").read_text())["outputs"]["steps"] == stopped_at + 2
    assert not (stage / "PREEMPTED").exists()
    last = json.loads((stage / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(last["train/loss"]) and last["data/skipped_records"] == 1

"""The CPT trainer's parts a user notices: LR schedules, batch arithmetic, what a resume follows and refuses,
and preemption of a real single-process run (SIGTERM -> save -> exit code -> resume)."""

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
import yaml
from helpers import SAMPLE_TEXT, logged_steps, one_rank_cpt_recipe, save_tiny

from healer.core.errors import HealerError
from healer.train.checkpoint import COMPLETE, find_resume_checkpoint
from healer.train.engine import build_ds_config
from healer.train.schedule import due, make_lr_lambda, warmup_note
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


def test_a_warmup_as_long_as_the_run_is_named_in_one_line():
    # the LR would rise for the whole run and never reach the peak before the last step
    note = warmup_note("cpt", max_steps=10, warmup_steps=10)
    assert note.startswith("cpt.warmup_steps (10) is not below the run's length (10 steps)") and "\n" not in note
    f = make_lr_lambda("wsd", max_steps=10, warmup_steps=10)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])  # what the note says
    assert warmup_note("sft", max_steps=3, warmup_steps=25).startswith("sft.warmup_steps (25)")
    assert warmup_note("cpt", max_steps=11, warmup_steps=10) is None
    assert warmup_note("cpt", max_steps=1, warmup_steps=0) is None


def test_linear_schedule_and_due():
    f = make_lr_lambda("linear", max_steps=10, warmup_steps=0, min_lr_ratio=0.0)
    assert [round(f(s), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert [s for s in range(1, 11) if due(s, 4, last=10)] == [4, 8, 10]
    assert not due(0, 4) and not due(3, None)


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
    # what the JSON would set silently against the recipe (and its manifest) is refused, naming both
    with pytest.raises(HealerError, match=r"cpt.deepspeed_config: its optimizer section\(s\) would not be used"):
        build_ds_config(zero_stage=2, micro_batch_size=1, global_batch_size=8, world_size=2,
                        base={"optimizer": {"type": "AdamW", "params": {"lr": 1}}})
    with pytest.raises(HealerError, match=r"train_batch_size=16 but cpt.global_batch_size=8; set the batch in one"):
        build_ds_config(zero_stage=2, micro_batch_size=1, global_batch_size=8, world_size=2,
                        base={"train_batch_size": 16})
    assert build_ds_config(zero_stage=2, micro_batch_size=1, global_batch_size=8, world_size=2,
                           base={"train_batch_size": 8})["gradient_accumulation_steps"] == 4  # agreeing is fine


def test_one_rank_trains_like_a_plain_adamw_loop():
    """On one rank a recipe's ZeRO-2 runs as stage 0 without the all-reduce of a world of one, and its steps
    are a plain PyTorch loop's: same weights after two accumulated, clipped steps (bench/lean_step.py times it)."""
    import torch
    from helpers import tiny_model

    from healer.train.engine import init_distributed, init_engine, make_optimizer, param_groups

    init_distributed()
    ds = build_ds_config(zero_stage=2, micro_batch_size=2, global_batch_size=4, world_size=1, grad_clip=0.5)
    assert ds["zero_optimization"]["stage"] == 0
    assert build_ds_config(zero_stage=2, micro_batch_size=2, global_batch_size=4, world_size=1,
                           base={"zero_optimization": {"stage": 2}})["zero_optimization"]["stage"] == 2
    lean, plain = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    engine = init_engine(lean, ds, make_optimizer(lean, lr=1e-2, weight_decay=0.1))
    assert not engine.enable_backward_allreduce
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5_000_000  # not DeepSpeed's 5e8 (2 GB of fp32)
    opt = torch.optim.AdamW(param_groups(plain, 0.1), lr=1e-2, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, plain.config.vocab_size, (2, 16), generator=gen) for _ in range(4)]
    for step in range(2):
        for ids in batches[2 * step: 2 * step + 2]:
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
            (plain(input_ids=ids, labels=ids).loss / 2).backward()
        # Clip to 0.5 with DeepSpeed's arithmetic (the squared per-tensor norms summed; torch's clip_grad_norm_
        # takes the norm of the norms): the two differ in the last bit, which Adam's second step lifts past 1e-6.
        total = torch.stack([p.grad.norm() for p in plain.parameters()]).pow(2).sum().sqrt()
        for p in plain.parameters():
            p.grad.mul_(torch.clamp(0.5 / (total + 1e-6), max=1.0))
        opt.step()
        opt.zero_grad()
    for (name, a), b in zip(lean.named_parameters(), plain.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.slow
def test_sigterm_saves_exits_with_the_preemption_code_and_resumes(tmp_path):
    model = save_tiny(tmp_path, "llama", layers=2, hidden=32, intermediate=64)
    corpus = tmp_path / "train.jsonl"
    lines = [json.dumps({"text": f"{i} {SAMPLE_TEXT}"}) for i in range(50)]
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
        while len(logged_steps(stage)) < 3 and time.time() < deadline and proc.poll() is None:
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
    assert stopped_at == logged_steps(stage)[-1] >= 3
    assert json.loads((stage / "PREEMPTED").read_text())["step"] == stopped_at
    assert not (stage / "manifest.json").exists()

    done = subprocess.run(cmd + [f"cpt.max_steps={stopped_at + 2}"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at step {stopped_at}" in done.stderr
    assert logged_steps(stage) == list(range(1, stopped_at + 3))
    assert json.loads((stage / "manifest.json").read_text())["outputs"]["steps"] == stopped_at + 2
    assert not (stage / "PREEMPTED").exists()
    last = json.loads((stage / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(last["train/loss"]) and last["data/skipped_records"] == 1


def _heal(tmp_path: Path, model: Path, corpus: Path, *, resume: str = "auto", force: bool = False, seq_len: int = 32,
          **cpt):
    from healer.model.modeling import resolve_source
    from healer.train.config import CPTConfig
    from healer.train.cpt import Options, heal
    from healer.train.data.config import DataConfig, SourceConfig

    cfg = CPTConfig(**{"zero_stage": 2, "micro_batch_size": 2, "global_batch_size": 4, "save_every": 2,
                       "warmup_steps": 1, "seed": 0, "kd": None, **cpt})  # CE: no teacher is given
    data = DataConfig(sources=[SourceConfig(path=str(corpus))], seq_len=seq_len)
    return heal(cfg, data, location=resolve_source(str(model)), teacher_location=None, stage_dir=tmp_path / "cpt",
                hf_dir=tmp_path / "cpt" / "hf", opts=Options(resume=resume, force=force))


@pytest.mark.slow
def test_a_resumed_run_follows_its_recipe_and_refuses_incomparable_settings(tmp_path, capsys):
    """cpt.lr and cpt.max_steps changed on resume take effect from the resumed step; a changed data.seq_len is
    refused naming the key; --force resumes anyway, restarting the data stream."""
    model = save_tiny(tmp_path, "llama", layers=2, hidden=32, intermediate=64)
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{i} {SAMPLE_TEXT}"}) + "\n" for i in range(40)))
    first = _heal(tmp_path, model, corpus, max_steps=2, lr=1e-3, schedule="cosine")
    assert first["steps"] == 2

    second = _heal(tmp_path, model, corpus, max_steps=4, lr=5e-3, schedule="linear", min_lr_ratio=0.0)
    assert second["steps"] == 4
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "cpt" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == [1, 2, 3, 4]
    new = make_lr_lambda("linear", max_steps=4, warmup_steps=1, min_lr_ratio=0.0)
    assert rows[3]["train/lr"] == pytest.approx(5e-3 * new(2)) and rows[4]["train/lr"] == pytest.approx(5e-3 * new(3))
    assert rows[2]["train/lr"] == pytest.approx(1e-3 * make_lr_lambda("cosine", max_steps=2, warmup_steps=1)(1))
    assert "resumed from" in capsys.readouterr().err

    with pytest.raises(HealerError, match=r"data\.seq_len: 32 -> 16"):
        _heal(tmp_path, model, corpus, max_steps=6, seq_len=16)
    forced = _heal(tmp_path, model, corpus, max_steps=6, seq_len=16, force=True)
    assert forced["steps"] == 6 and forced["forced_changes"] == ["data.seq_len: 32 -> 16"]
    assert "--force: resuming" in capsys.readouterr().err


def test_the_recipe_seed_reaches_every_training_stage():
    from healer.recipe import Recipe

    recipe = Recipe(model={"source": "m"}, seed=7, cpt={}, sft={"self_distill": {}})
    assert (recipe.cpt.seed, recipe.sft.seed, recipe.sft.self_distill.seed) == (7, 7, 7)
    assert Recipe(model={"source": "m"}, seed=7, cpt={"seed": 3}).cpt.seed == 3  # a stage's own seed wins


def test_a_sequence_longer_than_the_model_was_built_for_is_refused_before_training(tmp_path, capsys):
    from healer.cli import main

    model = save_tiny(tmp_path, "llama", layers=2, hidden=32, intermediate=64)
    limit = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    corpus = tmp_path / "train.jsonl"
    corpus.write_text(json.dumps({"text": SAMPLE_TEXT}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"source": str(model)}, "run_dir": str(tmp_path / "run"),
                                      "data": {"sources": [{"path": str(corpus)}], "seq_len": limit + 1},
                                      "cpt": {"input": str(model), "max_steps": 1}}))
    assert main(["cpt", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"data.seq_len: {limit + 1} tokens is more than the model's max_position_embeddings" in err
    assert not (tmp_path / "run" / "cpt" / "checkpoints").exists()


@pytest.mark.slow
def test_a_finished_cpt_rerun_with_other_settings_is_refused_not_silently_kept(tmp_path, capsys):
    """`healer cpt` again on its finished stage with a changed cpt.lr has no step left to train: it must not exit 0
    over the old weights. A larger cpt.max_steps trains on under the new settings."""
    from healer.cli import main

    recipe = one_rank_cpt_recipe(tmp_path, max_steps=1)
    assert main(["cpt", str(recipe)]) == 0
    weights = (tmp_path / "run" / "cpt" / "hf" / "model.safetensors").read_bytes()
    # one step against the default 10 warmup steps: said, not left for the user to find in the LR curve
    assert "healer cpt: cpt.warmup_steps (10) is not below the run's length (1 step)" in capsys.readouterr().err
    assert main(["cpt", str(recipe), "--cpt.lr", "0.01"]) == 2
    from healer.train.config import CPTConfig

    assert f"cpt.lr: {CPTConfig().lr} -> 0.01" in capsys.readouterr().err  # the default the first run used
    assert (tmp_path / "run" / "cpt" / "hf" / "model.safetensors").read_bytes() == weights
    assert main(["cpt", str(recipe), "--cpt.lr", "0.01", "--cpt.max_steps", "2"]) == 0
    manifest = json.loads((tmp_path / "run" / "cpt" / "manifest.json").read_text())
    assert manifest["outputs"]["steps"] == 2


def test_frozen_embeddings_stay_the_inputs_and_a_resume_cannot_unfreeze_them(tmp_path):
    """cpt.train_embeddings: false trains the blocks only: the exported embedding and head are the input's,
    bit for bit, the blocks moved, only the blocks' weights count as trainable, and resuming the run with the
    embeddings trainable (other optimizer state) is refused naming the key."""
    import torch
    from safetensors.torch import load_file

    model = save_tiny(tmp_path, "llama", layers=2, hidden=32, intermediate=64)
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{i} {SAMPLE_TEXT}"}) + "\n" for i in range(40)))
    result = _heal(tmp_path, model, corpus, max_steps=2, lr=1e-2, train_embeddings=False)
    before, after = load_file(model / "model.safetensors"), load_file(tmp_path / "cpt" / "hf" / "model.safetensors")
    frozen = [k for k in before if "embed_tokens" in k or "lm_head" in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    blocks = sum(v.numel() for k, v in before.items() if k not in frozen)
    assert result["steps"] == 2 and result["trainable_parameters"] == blocks

    with pytest.raises(HealerError, match=r"cpt\.train_embeddings: False -> True"):
        _heal(tmp_path, model, corpus, max_steps=4, lr=1e-2, train_embeddings=True)


@pytest.mark.parametrize("poison", ["lr", "weights"])
def test_a_non_finite_loss_stops_training_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys, poison):
    """An lr that blows the weights up, or NaN already in the input model: the first step whose loss or gradient
    norm is not a number stops the stage in one line naming that step; nothing after it is saved or exported."""
    import re

    from safetensors.torch import load_file, save_file

    from healer.cli import main

    model = save_tiny(tmp_path, "llama", layers=2, hidden=32, intermediate=64)
    if poison == "weights":
        weights = load_file(model / "model.safetensors")
        weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
        save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    recipe = one_rank_cpt_recipe(tmp_path, model, max_steps=6, kd=None, lr=1e30 if poison == "lr" else 1e-4,
                                 warmup_steps=0, save_every=1)
    assert main(["cpt", str(recipe)]) == 2
    err = capsys.readouterr().err
    found = re.search(r"step (\d+): the (training loss|gradient norm) is (nan|inf|-inf); training stopped without "
                      r"saving, (the last good checkpoint \(step (\d+)\)|no checkpoint had been written yet)", err)
    assert found, err
    bad = int(found[1])
    saved = sorted(int(p.name[4:]) for p in (tmp_path / "run" / "cpt" / "checkpoints").glob("step[0-9]*"))
    assert saved == list(range(1, bad)) if poison == "lr" else saved == []
    assert bad == 1 if poison == "weights" else bad > 1
    assert "Traceback" not in err and "lower lr or lengthen warmup_steps" in err
    assert not (tmp_path / "run" / "cpt" / "manifest.json").exists() and not (tmp_path / "run" / "cpt" / "hf").exists()


def test_a_resume_from_another_input_model_is_refused_naming_both(tmp_path, capsys):
    from healer.cli import main

    recipe = one_rank_cpt_recipe(tmp_path, max_steps=2, save_every=1, kd=None)
    assert main(["cpt", str(recipe)]) == 0
    other = save_tiny(tmp_path, "llama", name="other", layers=2, hidden=32, intermediate=64, seed=3)
    weights = (tmp_path / "run" / "cpt" / "hf" / "model.safetensors").read_bytes()
    # more steps (a resume), but from other weights than the checkpoint continues
    assert main(["cpt", str(recipe), "--cpt.max_steps", "3", "--cpt.input", str(other)]) == 2
    err = capsys.readouterr().err
    assert "was written with other settings (cpt.input: " in err and str(other) in err and "--resume none" in err
    assert (tmp_path / "run" / "cpt" / "hf" / "model.safetensors").read_bytes() == weights


def test_a_lone_process_whose_picked_port_is_taken_meanwhile_picks_another():
    # Run in a fresh interpreter: a process group, once made, stays for the life of the process.
    script = """
import os, socket
for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
    os.environ.pop(key, None)
import healer.train.engine as engine
taken = socket.socket()
taken.bind(("127.0.0.1", 0))
taken.listen()
real_free_port, picks = engine._free_port, []
def racing_free_port():  # the first port it hands out is bound by "someone else" before the store listens
    picks.append(taken.getsockname()[1] if not picks else real_free_port())
    return picks[-1]
engine._free_port = racing_free_port
info = engine.init_distributed()
print(info.rank, info.world_size, len(picks), os.environ["MASTER_PORT"] != str(picks[0]))
"""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["0", "1", "2", "True"]


def test_a_child_of_a_lone_process_does_not_take_its_filled_in_rank_env_for_a_launchers():
    # The parent's store still listens on the port it picked; a child that inherited MASTER_PORT and "joined" as
    # rank 0 of a world of 1 would bind that port and fail with EADDRINUSE.
    script = """
import os, subprocess, sys
for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
    os.environ.pop(key, None)
import healer.train.engine as engine
engine.init_distributed()
child = "import os, healer.train.engine as e; e.init_distributed(); print(os.environ['MASTER_PORT'])"
out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=240)
print(out.returncode, os.environ["MASTER_PORT"], (out.stdout.split() or ["none"])[-1])
print(out.stderr[-1500:], file=sys.stderr)
"""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=480)
    assert out.returncode == 0, out.stderr[-2000:]
    code, parent_port, child_port = out.stdout.split()[-3:]
    assert code == "0", out.stderr[-2000:]
    assert child_port != parent_port

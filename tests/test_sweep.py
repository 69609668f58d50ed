"""``healer sweep``: one run directory per value, a table and a frontier PNG with the dense model, finished
points skipped on a second sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import SAMPLE_TEXT, depth_prune_section, logged_steps, tiny_recipe

import healer.run.sweep as sweep_mod
from healer.cli import main
from healer.core.errors import HealerError
from healer.run.sweep import parse_over


def test_over_is_parsed_and_bad_ones_refused():
    assert parse_over("prune.ratio=0.2,0.3") == ("prune.ratio", [0.2, 0.3])
    assert parse_over("--prune.num-blocks=1, 2") == ("prune.num_blocks", [1, 2])
    for bad in ("prune.ratio", "prune.ratio=", "=0.2", "prune.ratio=0.2,0.2"):
        with pytest.raises(HealerError, match="--over"):
            parse_over(bad)
    from healer.run.sweep import point_dir

    assert point_dir("run", "model.source", "org/name").name == "model.source=org_name"  # one folder, not nested


def _recipe(tmp_path, calibration_file, extra=""):
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(SAMPLE_TEXT * 10)
    prune = depth_prune_section(calibration_file, ratio=0.25, keep_first=0, keep_last=0)
    evaluate = f'eval: {{perplexity_files: [{heldout}], context_lengths: [32], output: "${{run_dir}}/eval"}}'
    recipe, _ = tiny_recipe(tmp_path, prune, evaluate, extra)
    return recipe


def test_sweep_writes_a_frontier_with_the_dense_model_and_skips_finished_points(
        tmp_path, calibration_file, monkeypatch, capsys):
    recipe = _recipe(tmp_path, calibration_file)
    assert main(["sweep", str(recipe), "--over", "prune.ratio=0.25,0.5", "--repeats", "1"]) == 0
    sweep_dir = tmp_path / "run" / "sweep"
    result = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["label"] for r in result["rows"]] == ["dense", "prune.ratio=0.25", "prune.ratio=0.5"]
    assert [r["layers"] for r in result["rows"]] == [4, 3, 2]
    params = [r["params"] for r in result["rows"]]
    assert params[0] > params[1] > params[2]
    assert all(r["perplexity"] > 1 and r["tokens_per_s"] > 0 for r in result["rows"])
    for value in ("0.25", "0.5"):
        assert (sweep_dir / f"prune.ratio={value}" / "eval" / "eval.json").is_file()
    table = (sweep_dir / "sweep.md").read_text()
    assert table.startswith("| model | parameters | blocks | perplexity | tokens/s |")
    assert "| prune.ratio=0.5 |" in table
    assert (sweep_dir / "frontier.png").read_bytes()[:4] == b"\x89PNG"

    # Again: every stage of every point is finished, and no model is timed again.
    timed = []
    monkeypatch.setattr(sweep_mod, "throughput", lambda *a: timed.append(a) or 1.0)
    capsys.readouterr()
    assert main(["sweep", str(recipe), "--over", "prune.ratio=0.25,0.5"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 4 and timed == []


def test_a_fixed_stage_output_is_refused_since_every_point_would_share_it(tmp_path, calibration_file, capsys):
    recipe = _recipe(tmp_path, calibration_file)
    recipe.write_text(recipe.read_text().replace('output: "${run_dir}/eval"', f"output: {tmp_path / 'eval'}"))
    assert main(["sweep", str(recipe), "--over", "prune.ratio=0.25,0.5"]) == 2
    assert "eval.output" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_jobs_run_points_at_once_each_logging_to_its_own_directory(tmp_path, calibration_file, capsys):
    recipe = _recipe(tmp_path, calibration_file)
    assert main(["sweep", str(recipe), "--over", "prune.ratio=0.25,0.5", "--repeats", "1", "--jobs", "2"]) == 0
    sweep_dir = tmp_path / "run" / "sweep"
    result = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["layers"] for r in result["rows"]] == [4, 3, 2]
    for value in ("0.25", "0.5"):
        log = (sweep_dir / f"prune.ratio={value}" / "sweep.log").read_text()
        assert "[prune] done" in log and "[eval] done" in log  # the point's whole run went to its own log
    out = capsys.readouterr().out
    assert "[sweep] prune.ratio=0.5 finished" in out and "[prune] starting" not in out


def test_jobs_split_the_cores_and_refuse_more_gpus_than_there_are(monkeypatch):
    import torch

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert sweep_mod.job_env(4, 3, local=True) == {"OMP_NUM_THREADS": "2"}
    assert sweep_mod.job_env(4, 0, local=False) == {}  # a Slurm point gets its own allocation
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5")
    assert sweep_mod.job_env(3, 2, local=True) == {"CUDA_VISIBLE_DEVICES": "4,5"}
    with pytest.raises(HealerError, match="--jobs 6 or fewer"):
        sweep_mod.job_env(8, 0, local=True)
    with pytest.raises(HealerError, match="--jobs 0"):
        sweep_mod.sweep(None, sweep_mod.Options(over="prune.ratio=0.2", jobs=0))


def test_parallel_points_share_one_teacher_logit_cache_built_before_they_start(tmp_path, calibration_file, capsys):
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{i} {SAMPLE_TEXT}"}) + "\n" for i in range(30)))
    recipe = _recipe(tmp_path, calibration_file, textwrap.dedent(f"""
        data: {{sources: [{{path: {corpus}}}], seq_len: 32}}
        cpt: {{max_steps: 2, micro_batch_size: 2, global_batch_size: 2, zero_stage: 0, warmup_steps: 0,
              kd: {{top_k: 8, cache: {tmp_path / 'cache'}}}}}
    """))
    assert main(["sweep", str(recipe), "--over", "cpt.lr=1e-4,1e-3", "--repeats", "1", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("building the teacher-logit cache") == 1
    assert (tmp_path / "cache" / "cache.json").is_file()
    for value in ("1e-4", "1e-3"):
        log = (tmp_path / "run" / "sweep" / f"cpt.lr={value}" / "sweep.log").read_text()
        assert "from the logit cache" in log and "teacher-logit cache" not in log


@pytest.mark.slow
@pytest.mark.distributed
def test_ctrl_c_stops_every_parallel_point_at_a_checkpoint_and_the_next_sweep_resumes_them(
        tmp_path, calibration_file):
    import psutil

    from healer.train.checkpoint import COMPLETE, find_resume_checkpoint

    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{i} {SAMPLE_TEXT}"}) + "\n" for i in range(30)))
    recipe = _recipe(tmp_path, calibration_file, textwrap.dedent(f"""
        data: {{sources: [{{path: {corpus}}}], seq_len: 32}}
        cpt: {{max_steps: 100000, save_every: 100000, micro_batch_size: 2, global_batch_size: 2, zero_stage: 0,
              warmup_steps: 0, kd: null}}
    """))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HEALER_FAULT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "healer", "sweep", str(recipe), "--over", "cpt.lr=1e-4,1e-3", "--repeats", "1",
           "--jobs", "2"]
    stages = [tmp_path / "run" / "sweep" / f"cpt.lr={v}" / "cpt" for v in ("1e-4", "1e-3")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while min(len(logged_steps(s)) for s in stages) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGINT)  # only the sweep: it has to stop its points itself
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted; run the same command again" in err and "Traceback" not in err, err[-3000:]
    time.sleep(1)
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]  # no point or rank keeps training unseen
    stopped = []
    for stage in stages:
        saved = find_resume_checkpoint(stage / "checkpoints")
        assert saved is not None, (stage.parent / "sweep.log").read_text()[-3000:]
        stopped.append(json.loads((saved / COMPLETE).read_text())["step"])
        assert json.loads((stage / "PREEMPTED").read_text())["step"] == stopped[-1] >= 2
        assert not (stage / "manifest.json").exists()

    steps = max(stopped) + 2
    done = subprocess.run(cmd + ["--cpt.max_steps", str(steps)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage, at in zip(stages, stopped):
        assert json.loads((stage / "manifest.json").read_text())["outputs"]["steps"] == steps
        assert logged_steps(stage)[-1] == steps and f"at step {at}" in (stage.parent / "sweep.log").read_text()


def test_a_sweep_over_the_dense_model_is_refused():
    from healer.core.errors import HealerError

    with pytest.raises(HealerError, match=r"--over model.source changes the dense model"):
        parse_over("model.source=a/b,c/d")
    assert parse_over("prune.ratio=0.2,0.3") == ("prune.ratio", [0.2, 0.3])

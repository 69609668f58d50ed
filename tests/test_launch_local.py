"""`healer launch` on this machine: torchrun ranks, two node launchers on loopback, preemption, bad input.

Only 127.0.0.0/8 is ever contacted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from launch_cpt_recipe import losses, reference_run, weights  # noqa: E402

from healer.cli import main as healer_main  # noqa: E402
from healer.launch.config import LaunchConfig  # noqa: E402
from healer.launch.run import run_entry  # noqa: E402
from healer.launch.supervise import PREEMPTED_EXIT_CODE  # noqa: E402
from healer.launch.torchrun import free_port  # noqa: E402

TOY = str(Path(__file__).with_name("launch_toy_trainer.py"))


def _healer(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "healer", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _finish(proc: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.mark.distributed
@pytest.mark.slow
def test_two_launchers_on_loopback_train_like_one_node_with_two_processes(tmp_path_factory, tmp_path):
    ws, one_node = reference_run(tmp_path_factory)  # `healer launch --nproc 2 cpt recipe.yaml`
    recipe = one_node / "recipe.yaml"
    # Two "nodes" of one rank each, meeting at 127.0.0.1, as on two machines that may not ssh to each other.
    port = str(free_port())
    two = tmp_path / "two_nodes"
    nodes = [_healer("launch", "--nnodes", "2", "--node-rank", str(k), "--master-addr", "127.0.0.1",
                     "--master-port", port, "cpt", str(recipe), "--run-dir", str(two)) for k in (0, 1)]
    results = [_finish(p) for p in nodes]
    for rc, out in results:
        assert rc == 0, out
    assert "node 0 of 2" in results[0][1] and "node 1 of 2" in results[1][1]

    assert losses(two) == losses(one_node)  # the same loss at every step
    a, b = weights(two), weights(one_node)
    assert all((a[k] == b[k]).all() for k in b)
    manifest = json.loads((two / "cpt" / "manifest.json").read_text())
    assert manifest["outputs"]["world_size"] == 2
    # every rank has its own log file
    assert len(list((two / "launch" / "cpt" / "logs").glob("node*/*/attempt_0/0/stderr.log"))) == 2


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_and_a_relaunch_resumes(tmp_path):
    """What a scheduler's preemption does to `healer launch`: the ranks save, the launcher exits 75."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "import sys; from healer.launch.run import run_entry; "
           "from healer.launch.config import LaunchConfig; "
           f"sys.exit(run_entry({[TOY, '--out', str(out), '--steps', '30', '--step-sleep', '0.2']!r}, "
           f"LaunchConfig(nproc_per_node=2), __import__('pathlib').Path({str(tmp_path / 'launch')!r})))"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out / "loss.txt").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, text
    saved = int(text.split("preempted: saved step")[1].split()[0])
    assert 0 < saved < 30

    assert run_entry([TOY, "--out", str(out), "--steps", "30"], LaunchConfig(nproc_per_node=2),
                     tmp_path / "launch") == 0
    steps = [int(line.split()[0]) for line in (out / "loss.txt").read_text().splitlines()]
    assert steps == list(range(1, 31))  # resumed after the saved step: nothing lost, nothing redone
    assert json.loads((out / "final.json").read_text())["world"] == 2


# ---- bad input: one clear message, nothing started -------------------------------------------------------

@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "model": {"source": "unused"}}))
    return path


def _launch_error(capsys, *args: str) -> str:
    assert healer_main(["launch", *args]) == 2
    return capsys.readouterr().err


def test_malformed_hostfile_line_is_named(tmp_path, recipe, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\n127.0.0.1 slots=2\n127.0.0.2 slots two\n")
    err = _launch_error(capsys, "--hostfile", str(hosts), "--no-ssh", "--node-rank", "0", "cpt", str(recipe))
    assert f"hostfile {hosts}, line 3" in err and "slots=N" in err
    assert not (tmp_path / "run" / "launch" / "cpt" / "logs").exists()


def test_more_processes_than_slots_is_refused(tmp_path, recipe, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 slots=2\n127.0.0.2 slots=1\n")
    err = _launch_error(capsys, "--hostfile", str(hosts), "--no-ssh", "--node-rank", "0", "--nproc", "2",
                        "cpt", str(recipe))
    assert "line 2" in err and "127.0.0.2 has slots=1" in err and "--nproc asks for 2" in err


def test_unreachable_host_is_refused_before_any_rank_starts(tmp_path, recipe, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    # Over ssh (the DeepSpeed launcher's way) every host must answer; nothing listens for ssh on
    # this loopback address, so the first host is already refused.
    err = _launch_error(capsys, "--hostfile", str(hosts), "cpt", str(recipe))
    assert "127.0.0.1 (hostfile line 1)" in err and "--no-ssh" in err
    assert not (tmp_path / "run" / "launch" / "cpt" / "logs").exists()


def test_node_rank_outside_the_hostfile_and_missing_multinode_flags_are_refused(tmp_path, recipe, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    err = _launch_error(capsys, "--hostfile", str(hosts), "--no-ssh", "--node-rank", "2", "cpt", str(recipe))
    assert "--node-rank 2" in err and "node ranks 0..1" in err
    err = _launch_error(capsys, "--nnodes", "2", "cpt", str(recipe))
    assert "--node-rank" in err and "--master-addr" in err
    err = _launch_error(capsys, "--nproc", "2", "cpd", str(recipe))
    assert "'cpd' is not a stage" in err and "cpt" in err


def test_dry_run_shows_the_torchrun_command_and_ranks_read_the_overridden_recipe(tmp_path, recipe, capsys):
    assert healer_main(["launch", "--nproc", "2", "--dry-run", "cpt", str(recipe), "--seed", "7"]) == 0
    cmd = capsys.readouterr().out
    resolved = tmp_path / "run" / "launch" / "cpt" / "recipe.yaml"
    assert "torch.distributed.run" in cmd and "--nproc-per-node=2" in cmd
    assert f"-m healer cpt --config {resolved}" in cmd
    assert yaml.safe_load(resolved.read_text())["seed"] == 7  # the override reaches every rank


def test_slurm_dry_run_prints_a_valid_sbatch_script(tmp_path, recipe, capsys):
    args = ["launch", "--slurm", "--nodes", "4", "--gpus-per-node", "8", "--dry-run", "cpt", str(recipe),
            "--launch.slurm.partition", "gpu", "--launch.slurm.time", "2-00:00:00",
            "--launch.slurm.extra_sbatch", "[--exclusive]", "--launch.env", "{NCCL_IB_HCA: mlx5}"]
    assert healer_main(args) == 0
    script = capsys.readouterr().out
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --time=2-00:00:00", "#SBATCH --signal=USR1@300", "#SBATCH --requeue",
                 "#SBATCH --exclusive", "for name in NCCL_IB_HCA; do", "--nproc-per-node=8",
                 f'-eq {PREEMPTED_EXIT_CODE} ]', "scontrol requeue"):
        assert line in script, line
    assert "mlx5" not in script  # launch.env reaches the job through sbatch's environment, not the file
    assert (tmp_path / "run" / "launch" / "cpt" / "cpt.sbatch").read_text().strip() == script.strip()


@pytest.mark.distributed
def test_a_rank_that_refuses_shows_its_one_line_and_its_exit_code_not_torchruns_traceback(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"source": "smollm2"}, "run_dir": str(tmp_path / "run"),
                                      "data": {"sources": [{"path": str(tmp_path)}]},
                                      "cpt": {"input": str(tmp_path / "no-such-model")}}))
    rc, out = _finish(_healer("launch", "--nproc", "1", "cpt", str(recipe)), timeout=180)
    assert rc == 2, out  # the rank's own code, not torchrun's 1
    assert f"cpt.input: {tmp_path / 'no-such-model'} is neither an existing path" in out
    assert "Traceback" not in out and "ChildFailedError" not in out
    report = tmp_path / "run" / "launch" / "cpt" / "logs" / "node0" / "torchrun-error.txt"
    assert f"torchrun's failure report: {report}" in out
    assert "ChildFailedError" in report.read_text()  # kept whole, for whoever wants it

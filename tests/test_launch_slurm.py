"""`healer launch --slurm` against a real SLURM cluster (slurm-wlm, two slurmd on 127.0.0.1).

The fixture starts slurmctld + two slurmd in a temporary directory and stops them afterwards; the tests
skip with the reason when the slurm binaries are missing (`.ci/install_slurm.sh` installs them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import missing_binaries, start_cluster  # noqa: E402

from healer.errors import HealerError  # noqa: E402
from healer.launch import slurm  # noqa: E402
from healer.launch.config import LaunchConfig, SlurmConfig  # noqa: E402
from healer.launch.run import run_entry  # noqa: E402
from healer.launch.supervise import PREEMPTED_EXIT_CODE  # noqa: E402

TOY = str(Path(__file__).with_name("launch_toy_trainer.py"))
STEPS = 12

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM binaries missing ({', '.join(missing)}); install slurm-wlm (.ci/install_slurm.sh)")
    if os.geteuid() != 0:
        pytest.skip("the localhost SLURM cluster runs slurmd, which needs root")
    c = start_cluster(tmp_path_factory.mktemp("slurm"))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(c.conf)
    yield c
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    c.stop()


def _two_nodes(**slurm_keys) -> LaunchConfig:
    return LaunchConfig(backend="slurm", nodes=2, nproc_per_node=1, env={"HEALER_TOY_ENV": "from-recipe"},
                        slurm=SlurmConfig(signal_seconds=60, **slurm_keys))


def _submit(cluster, stage: str, entry: list[str], cfg: LaunchConfig, logs: Path) -> str:
    assert run_entry(entry, cfg, logs, stage, wait=False) == 0
    job_id = cluster.run("squeue", "-h", "-n", f"healer-{stage}", "-o", "%i").stdout.split()
    assert len(job_id) == 1, job_id
    return job_id[0]


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """An uninterrupted two-node job: its output dir and exit code."""
    root = tmp_path_factory.mktemp("ref")
    job = _submit(cluster, "toyref", [TOY, "--out", str(root / "out"), "--steps", str(STEPS)], _two_nodes(),
                  root / "launch")
    rc = slurm.wait(job, root / "launch" / f"slurm-{job}.out", poll_s=1)
    return root, job, rc


def test_two_node_slurm_job_trains_with_one_rank_per_node(cluster, reference):
    root, job, rc = reference
    log = (root / "launch" / f"slurm-{job}.out").read_text()
    assert rc == 0, log + cluster.logs()
    final = json.loads((root / "out" / "final.json").read_text())
    assert final["step"] == STEPS and final["world"] == 2
    ranks = [json.loads((root / "out" / f"ranks-{r}.txt").read_text().splitlines()[0]) for r in (0, 1)]
    # srun put one launcher on each SLURM node; the recipe's launch.env reached every rank.
    assert sorted(r["slurm_node"] for r in ranks) == ["0", "1"]
    assert all(r["toy_env"] == "from-recipe" for r in ranks)
    assert "healer: toyref finished" in log
    assert f"step {STEPS} loss" in log  # rank 0's progress is on the job's main output
    per_rank = list((root / "launch" / "logs").glob("node*/*/attempt_0/0/stdout.log"))
    assert len(per_rank) == 2  # one log per rank (one rank per node here)


def test_preempted_job_saves_requeues_and_ends_like_an_uninterrupted_one(cluster, reference, tmp_path):
    out = tmp_path / "out"
    job = _submit(cluster, "toypreempt", [TOY, "--out", str(out), "--steps", str(STEPS), "--step-sleep", "0.5"],
                  _two_nodes(), tmp_path / "launch")
    deadline = time.monotonic() + 90
    while not (out / "loss.txt").exists() or len((out / "loss.txt").read_text().splitlines()) < 3:
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.5)
    # What SLURM does --signal seconds before the time limit: SIGUSR1 to the job's tasks.
    cluster.run("scancel", "--signal=USR1", job)
    log_path = tmp_path / "launch" / f"slurm-{job}.out"
    rc = slurm.wait(job, log_path, poll_s=1)
    log = log_path.read_text()
    assert rc == 0, log + cluster.logs()
    assert "preempted and saved a checkpoint; requeueing" in log
    assert cluster.job_field(job, "Restarts") == "1"
    assert "resumed from step" in log
    steps = [int(line.split()[0]) for line in (out / "loss.txt").read_text().splitlines()]
    assert steps[-1] == STEPS and len(steps) == STEPS  # every step once: nothing lost, nothing redone
    ref_root, _, ref_rc = reference
    assert ref_rc == 0
    ref_loss = json.loads((ref_root / "out" / "final.json").read_text())["loss"]
    assert json.loads((out / "final.json").read_text())["loss"] == ref_loss


def test_failing_job_is_retried_then_gives_up_with_the_reason(cluster, tmp_path):
    cfg = _two_nodes(max_restarts=1)
    job = _submit(cluster, "toyfail", [TOY, "--out", str(tmp_path / "out"), "--fail"], cfg, tmp_path / "launch")
    rc = slurm.wait(job, tmp_path / "launch" / f"slurm-{job}.out", poll_s=1)
    log = (tmp_path / "launch" / f"slurm-{job}.out").read_text()
    assert rc != 0
    assert "requeueing (retry 1 of 1)" in log
    assert "giving up after 1 retries" in log
    starts = (tmp_path / "out" / "ranks-0.txt").read_text().splitlines()
    assert len(starts) == 2  # the first try and one retry


def test_option_the_cluster_rejects_is_refused_before_anything_runs(cluster, tmp_path):
    cfg = _two_nodes(partition="no-such-partition")
    with pytest.raises(HealerError, match="(?s)SLURM refused.*partition"):
        run_entry([TOY, "--out", str(tmp_path / "out")], cfg, tmp_path / "launch", "toybad", wait=False)
    assert not (tmp_path / "out").exists()
    assert cluster.run("squeue", "-h", "-n", "healer-toybad", "-o", "%i").stdout.strip() == ""


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(cluster, tmp_path, capsys):
    cfg = LaunchConfig(backend="slurm", nodes=4, env={"NCCL_IB_HCA": "mlx5"},
                       slurm=SlurmConfig(partition="gpu", account="proj", time="2-00:00:00", gpus_per_node=8,
                                         constraint="h100", extra_sbatch=["--exclusive"], signal_seconds=600))
    assert run_entry(["-m", "healer", "cpt", "--config", "r.yaml"], cfg, tmp_path, "cptdry", dry_run=True) == 0
    script = capsys.readouterr().out
    # The script, run through bash -n, is valid shell; sbatch itself checks the directives on submit.
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --signal=USR1@600", "#SBATCH --requeue", "#SBATCH --exclusive", "export NCCL_IB_HCA=mlx5",
                 "--nproc-per-node=8", f"-eq {PREEMPTED_EXIT_CODE} ]"):
        assert line in script
    assert cluster.run("squeue", "-h", "-n", "healer-cptdry", "-o", "%i").stdout.strip() == ""

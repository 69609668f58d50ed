"""`healer launch --slurm` against a real SLURM cluster (slurm-wlm, two slurmd on 127.0.0.1).

The fixture starts slurmctld + two slurmd in a temporary directory and stops them afterwards; the tests
skip with the reason when the slurm binaries are missing (`.ci/install_slurm.sh` installs them).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from launch_cpt_recipe import STEPS, cpt_recipe, losses, reference_run, weights  # noqa: E402
from slurm_cluster import missing_binaries, start_cluster  # noqa: E402

from healer.core.errors import HealerError  # noqa: E402
from healer.launch import slurm  # noqa: E402
from healer.launch.config import LaunchConfig, SlurmConfig  # noqa: E402
from healer.launch.run import run_entry, run_stage  # noqa: E402

TOY = str(Path(__file__).with_name("launch_toy_trainer.py"))

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


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


def _job_id(cluster, name: str) -> str:
    ids = cluster.run("squeue", "-h", "-n", name, "-o", "%i").stdout.split()
    assert len(ids) == 1, ids
    return ids[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


def test_preempted_two_node_job_saves_requeues_and_ends_like_an_uninterrupted_run(cluster, reference, tmp_path):
    ws, one_node = reference  # the same recipe, run uninterrupted on one node with 2 ranks
    run_dir = tmp_path / "run"
    recipe = cpt_recipe(ws, run_dir)
    # `healer run`'s path for a distributed stage: run_stage with the recipe's launch.backend slurm.
    assert run_stage("cpt", str(recipe), [], _two_nodes(), wait=False) == 0
    job = _job_id(cluster, "healer-cpt")
    log = run_dir / "launch" / "cpt" / f"slurm-{job}.out"
    metrics = run_dir / "cpt" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not metrics.exists():  # the trainer is stepping
        assert time.monotonic() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING"), cluster.logs()
        time.sleep(0.2)
    # What SLURM does --signal seconds before the time limit: SIGUSR1 to the job's tasks.
    cluster.run("scancel", "--signal=USR1", job)
    rc = slurm.wait(job, log, poll_s=1)
    text = log.read_text()
    assert rc == 0, text + cluster.logs()
    assert "node 0/2" in text and "node 1/2" in text  # srun put one launcher on each SLURM node
    assert "preempted and saved a checkpoint; requeueing" in text
    assert cluster.job_field(job, "Restarts") == "1"
    assert "resumed from" in text and "healer: cpt finished" in text
    assert f"step {STEPS}/{STEPS}" in text  # rank 0's progress is on the job's main output
    manifest = json.loads((run_dir / "cpt" / "manifest.json").read_text())
    assert manifest["outputs"]["steps"] == STEPS and manifest["outputs"]["world_size"] == 2

    got, want = losses(run_dir), losses(one_node)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want  # the same loss at every step as the run nobody interrupted
    a, b = weights(run_dir), weights(one_node)
    assert all((a[k] == b[k]).all() for k in b)
    # one log per rank per attempt (one rank per node, two attempts)
    assert len(list((run_dir / "launch" / "cpt" / "logs").glob("node*/*/attempt_0/0/stderr.log"))) == 4


def test_failing_job_is_retried_then_gives_up_with_the_reason(cluster, tmp_path):
    cfg = _two_nodes(max_restarts=1)
    assert run_entry([TOY, "--out", str(tmp_path / "out"), "--fail"], cfg, tmp_path / "launch", "toyfail",
                     wait=False) == 0
    job = _job_id(cluster, "healer-toyfail")
    rc = slurm.wait(job, tmp_path / "launch" / f"slurm-{job}.out", poll_s=1)
    log = (tmp_path / "launch" / f"slurm-{job}.out").read_text()
    assert rc != 0
    assert "requeueing (retry 1 of 1)" in log
    assert "giving up after 1 retries" in log
    starts = (tmp_path / "out" / "ranks-0.txt").read_text().splitlines()
    assert len(starts) == 2  # the first try and one retry
    assert json.loads(starts[0])["toy_env"] == "from-recipe"  # launch.env reaches every rank


def test_option_the_cluster_rejects_is_refused_before_anything_runs(cluster, tmp_path):
    cfg = _two_nodes(partition="no-such-partition")
    with pytest.raises(HealerError, match="(?s)SLURM refused.*partition"):
        run_entry([TOY, "--out", str(tmp_path / "out")], cfg, tmp_path / "launch", "toybad", wait=False)
    assert not (tmp_path / "out").exists()
    assert cluster.run("squeue", "-h", "-n", "healer-toybad", "-o", "%i").stdout.strip() == ""


def test_launch_env_reaches_the_job_as_written_and_never_its_files(cluster, tmp_path):
    # A secret and a value full of shell syntax: both must arrive exactly, run nothing, and stay out of files.
    hostile = "$(touch PWNED) `touch PWNED`; touch PWNED '\" \\"
    token = "hf_" + "Zq7Lk2Vw9Xp4Rt6Ym1Nb3Cd5Fg8Hj0Ks2"
    cfg = LaunchConfig(backend="slurm", nodes=2, nproc_per_node=1, env={"HEALER_TOY_ENV": hostile, "HF_TOKEN": token},
                       slurm=SlurmConfig(signal_seconds=60))
    launch = tmp_path / "launch"
    assert run_entry([TOY, "--out", str(tmp_path / "out"), "--steps", "2"], cfg, launch, "toyenv", wait=False) == 0
    job = _job_id(cluster, "healer-toyenv")
    assert slurm.wait(job, launch / f"slurm-{job}.out", poll_s=1) == 0, cluster.logs()
    for rank in (0, 1):
        seen = json.loads((tmp_path / "out" / f"ranks-{rank}.txt").read_text().splitlines()[0])
        assert seen["toy_env"] == hostile
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
    for path in launch.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path

"""A real two-node SLURM cluster on 127.0.0.1, for tests.

One ``slurmctld`` and two ``slurmd -N n1`` / ``-N n2`` on their own ports, ``auth/none``, everything
(config, state, spool, logs) in a temporary directory. Both "nodes" are this machine; SLURM does not
know that, so jobs really get two nodes, two node ranks and two ``srun`` tasks.

Use :func:`start_cluster` (returns ``None`` with a reason when the slurm binaries are missing) and
``cluster.stop()``; the tests wrap it in a module-scoped fixture.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sacct")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES[:6] if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONF = """\
ClusterName=healertest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/linear
ReturnToService=2
JobRequeue=1
KillWait=20
MinJobAge=600
SchedulerParameters=sched_interval=1
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
PlugStackConfig={root}/plugstack.conf
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1_port} CPUs={cpus} State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2_port} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """Environment for sbatch/srun/squeue: SLURM_CONF points at this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        for part in out.split():
            if part.startswith("JobState="):
                return part.split("=", 1)[1]
        return "UNKNOWN"

    def job_field(self, job_id: str, name: str) -> str | None:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        for part in out.split():
            if part.startswith(name + "="):
                return part.split("=", 1)[1]
        return None

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s; logs in {self.root}")

    def logs(self) -> str:
        out = []
        for log in sorted(self.root.glob("*.log")):
            out.append(f"==== {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(out)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_cluster(root: str | Path, cpus: int = 2, timeout: float = 60) -> SlurmCluster:
    """Start slurmctld + two slurmd under ``root`` and wait until both nodes are idle."""
    root = Path(root)
    for sub in ("state", "spool/n1", "spool/n2"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "plugstack.conf").write_text("")
    conf = root / "slurm.conf"
    import getpass

    conf.write_text(CONF.format(root=root, user=getpass.getuser(), cpus=cpus, ctld_port=_free_port(),
                                slurmd_port=_free_port(), n1_port=_free_port(), n2_port=_free_port()))
    cluster = SlurmCluster(root, conf)
    env = cluster.env
    # -D: stay in the foreground so the fixture owns the processes; -i: ignore old state; -c: clear jobs.
    cluster.procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-c", "-f", str(conf)], env=env,
                                          stdout=subprocess.DEVNULL, stderr=open(root / "slurmctld.err", "w")))
    time.sleep(1)
    for node in ("n1", "n2"):
        cluster.procs.append(subprocess.Popen(["slurmd", "-D", "-N", node, "-f", str(conf)], env=env,
                                              stdout=subprocess.DEVNULL, stderr=open(root / f"slurmd-{node}.err", "w")))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [p.args[0] for p in cluster.procs if p.poll() is not None]
        if dead:
            cluster.stop()
            raise RuntimeError(f"{dead} exited at start; logs in {root}:\n{cluster.logs()}")
        out = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
        states = dict(line.split() for line in out if line.strip())
        if states.get("n1") == "idle" and states.get("n2") == "idle":
            return cluster
        time.sleep(0.5)
    cluster.stop()
    raise RuntimeError(f"slurm nodes not idle after {timeout:.0f} s; logs in {root}:\n{cluster.logs()}")

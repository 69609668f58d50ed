"""Recipe section ``launch:``: how a stage becomes processes.

``backend`` picks the engine: ``local`` (torchrun on this machine), ``hostfile`` (several machines listed
in a DeepSpeed hostfile, over ssh with the DeepSpeed launcher or, with ``ssh: false``, one
``healer launch --node-rank K`` per machine) and ``slurm`` (an sbatch job; srun starts one torchrun per
node). The command-line flags of ``healer launch`` override these keys.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from healer.config_base import Section


class SlurmConfig(Section):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = Field(None, description="sbatch --time, e.g. 2-00:00:00")
    constraint: str | None = None
    gpus_per_node: int = Field(0, ge=0, description="GPUs to ask for per node; also the ranks per node when > 0")
    cpus_per_task: int | None = Field(None, gt=0, description="CPUs for each node's launcher and its ranks")
    mem: str | None = Field(None, description="sbatch --mem, e.g. 0 (all of it) or 480G")
    signal_seconds: int = Field(300, gt=0, description="SIGUSR1 this long before the time limit")
    max_restarts: int = Field(3, ge=0, description="requeues after a failure (preemptions do not count)")
    extra_sbatch: list[str] = Field(default_factory=list, description="lines added verbatim as #SBATCH ...")
    setup: list[str] = Field(default_factory=list,
                             description="shell lines run before srun, e.g. `module load cuda` or `source venv`")
    submit: bool = Field(True, description="false: write the script and print it without submitting")


class LaunchConfig(Section):
    backend: Literal["local", "hostfile", "slurm"] = "local"
    nproc_per_node: int | None = Field(None, gt=0, description="ranks per node (GPUs, or CPU processes with gloo); "
                                                              "default 1, or the hostfile's slots")
    nodes: int = Field(1, gt=0)
    node_rank: int | None = Field(None, ge=0, description="hostfile without ssh: this machine's line in the hostfile")
    hostfile: str | None = Field(None, description="DeepSpeed hostfile: one `host slots=N` line per node")
    ssh: bool = Field(True, description="hostfile: start the other nodes over ssh (pdsh); false: run "
                                        "`healer launch --node-rank K` on each node yourself")
    master_addr: str | None = Field(None, description="rank 0's address; default: 127.0.0.1, the hostfile's "
                                                      "first host, or SLURM's first node")
    master_port: int | None = Field(None, gt=0, lt=65536,
                                    description="default: a free port (local), 29500 (hostfile), "
                                                "29500 + job id % 1000 (SLURM)")
    env: dict[str, str] = Field(default_factory=dict, description="NCCL_*/network settings passed to every rank")
    log_dir: str | None = Field(None, description="per-rank logs; default <run_dir>/launch/<stage>")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

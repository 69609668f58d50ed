"""Recipe section ``launch:``: how a stage becomes processes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from healer.config_base import Section


class SlurmConfig(Section):
    partition: str | None = None
    account: str | None = None
    time: str | None = Field(None, description="sbatch --time, e.g. 2-00:00:00")
    constraint: str | None = None
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int | None = Field(None, gt=0)
    signal_seconds: int = Field(300, gt=0, description="SIGUSR1 this long before the time limit")
    max_restarts: int = Field(3, ge=0)
    extra_sbatch: list[str] = Field(default_factory=list, description="lines added verbatim as #SBATCH ...")


class LaunchConfig(Section):
    backend: Literal["local", "hostfile", "slurm"] = "local"
    nproc_per_node: int = Field(1, gt=0)
    nodes: int = Field(1, gt=0)
    hostfile: str | None = None
    ssh: bool = True
    master_addr: str = "127.0.0.1"
    master_port: int = Field(29500, gt=0, lt=65536)
    env: dict[str, str] = Field(default_factory=dict, description="NCCL_*/network settings passed to every rank")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

"""One node's share of a job: a torchrun command line and the environment its ranks get.

torchrun (``python -m torch.distributed.run``) does the real work: it starts ``nproc_per_node`` ranks with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set and meets the other nodes at
``master_addr:master_port`` (static rendezvous: every node names its own ``node_rank``).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NodeSpec:
    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int
    log_dir: Path | None = None  # per-rank stdout/stderr files go under <log_dir>/node<K>/
    run_id: str = "healer"


def torchrun_command(node: NodeSpec, entry: list[str]) -> list[str]:
    """``entry`` is what each rank runs after ``python``: ``["-m", "healer", "cpt", ...]`` or ``["script.py", ...]``."""
    cmd = [sys.executable, "-m", "torch.distributed.run",
           f"--nnodes={node.nnodes}", f"--node-rank={node.node_rank}", f"--nproc-per-node={node.nproc_per_node}",
           f"--master-addr={node.master_addr}", f"--master-port={node.master_port}",
           # A failed rank fails the job: restarts are SLURM's (requeue) or the user's decision, and the
           # trainer resumes from its checkpoint either way.
           "--max-restarts=0", f"--rdzv-id={node.run_id}"]
    if node.log_dir is not None:
        # Every rank's stdout+stderr to its own file; the console shows the node's first rank (the
        # progress bar lives on global rank 0).
        cmd += [f"--log-dir={node.log_dir / f'node{node.node_rank}'}", "--tee=3", "--local-ranks-filter=0"]
    if entry and entry[0] == "-m":
        cmd += ["-m", *entry[1:]]
    else:
        cmd += entry
    return cmd


def rank_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the ranks: ours, the recipe's ``launch.env``, and the CPU switches when no GPU."""
    env = dict(os.environ)
    env.update(extra or {})
    env.setdefault("PYTHONUNBUFFERED", "1")
    if "DS_ACCELERATOR" not in env and not _has_cuda():
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU needs to be told; the trainer then uses gloo
    return env


def _has_cuda() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    import torch

    return torch.cuda.is_available()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]

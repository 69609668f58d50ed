"""``python -m healer.launch.node``: what srun starts on each node of a SLURM job.

It reads its place from SLURM's environment (node rank = SLURM_NODEID, nodes = SLURM_JOB_NUM_NODES,
master = the first node of SLURM_JOB_NODELIST at its NodeAddr, port = :func:`master_port_for_job`
unless given) and runs torchrun for this node's ranks under the preemption supervisor.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from healer.launch.slurm import first_node, slurm_node_addr
from healer.launch.supervise import supervise
from healer.launch.torchrun import NodeSpec, rank_env, torchrun_command
from healer.train.rendezvous import master_port_for_job


def node_spec_from_slurm(env: dict[str, str], nproc_per_node: int, master_addr: str | None,
                         master_port: int | None, log_dir: Path | None, stage: str) -> NodeSpec:
    try:
        job_id = int(env["SLURM_JOB_ID"])
        node_rank = int(env["SLURM_NODEID"])
        nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env["SLURM_NNODES"])
        nodelist = env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"]
    except KeyError as err:
        raise SystemExit(f"healer.launch.node: {err.args[0]} is not set; this runs inside a SLURM job step "
                         "(srun), started by the script `healer launch --slurm` writes") from None
    addr = master_addr or slurm_node_addr(first_node(nodelist))
    port = master_port or master_port_for_job(job_id)
    return NodeSpec(nnodes, node_rank, nproc_per_node, addr, port, log_dir, run_id=f"healer-{stage}-{job_id}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m healer.launch.node")
    parser.add_argument("--nproc-per-node", type=int, required=True)
    parser.add_argument("--stage", default="job")
    parser.add_argument("--log-dir", type=Path)
    parser.add_argument("--master-addr")
    parser.add_argument("--master-port", type=int)
    parser.add_argument("entry", nargs=argparse.REMAINDER, help="-- then what each rank runs after `python`")
    args = parser.parse_args(argv)
    entry = args.entry[1:] if args.entry[:1] == ["--"] else args.entry
    node = node_spec_from_slurm(dict(os.environ), args.nproc_per_node, args.master_addr, args.master_port,
                                args.log_dir, args.stage)
    print(f"healer launch: node {node.node_rank}/{node.nnodes} on {os.uname().nodename}, "
          f"{node.nproc_per_node} ranks, master {node.master_addr}:{node.master_port}", flush=True)
    report = args.log_dir / f"node{node.node_rank}" / "torchrun-error.txt" if args.log_dir else None
    return supervise(torchrun_command(node, entry), rank_env(), report=report)


if __name__ == "__main__":
    sys.exit(main())

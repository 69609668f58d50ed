"""``healer launch [flags] STAGE recipe.yaml [--key value ...]``: run one stage on many ranks.

The flags override the recipe's ``launch:`` section for this run::

    healer launch --nproc 2 cpt recipe.yaml                          # 2 ranks here (torchrun)
    healer launch --hostfile hosts cpt recipe.yaml                   # every host over ssh (DeepSpeed launcher)
    healer launch --hostfile hosts --no-ssh --node-rank 1 cpt r.yaml # run on each host yourself
    healer launch --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 cpt r.yaml
    healer launch --slurm --nodes 4 --gpus-per-node 8 --dry-run cpt r.yaml  # print the sbatch script

The recipe the ranks read is the one given here with every override applied, written to
``<run_dir>/launch/<stage>/recipe.yaml``, so all ranks (and a requeued SLURM job) see the same settings.
"""

from __future__ import annotations

import argparse

from healer.errors import HealerError
from healer.launch.config import LaunchConfig
from healer.launch.run import launch_dir, run_stage
from healer.recipe import Recipe, dump_recipe


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="healer launch", add_help=False, exit_on_error=False)
    p.add_argument("stage")
    p.add_argument("--nproc", type=int, help="ranks per node")
    p.add_argument("--nnodes", "--nodes", dest="nodes", type=int, help="number of nodes")
    p.add_argument("--node-rank", type=int, help="this node's rank (multi-node without ssh)")
    p.add_argument("--hostfile", help="DeepSpeed hostfile (`host slots=N` lines)")
    p.add_argument("--no-ssh", action="store_true", help="hostfile: start only this node's ranks")
    p.add_argument("--master-addr")
    p.add_argument("--master-port", type=int)
    p.add_argument("--slurm", action="store_true", help="submit an sbatch job")
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--dry-run", action="store_true", help="print the command or sbatch script, start nothing")
    p.add_argument("--wait", action="store_true", help="SLURM: block until the job ends, echoing its log")
    return p


def launch_config(base: LaunchConfig, args: argparse.Namespace) -> LaunchConfig:
    """The recipe's ``launch:`` section with the command-line flags on top."""
    cfg = base.model_dump()
    if args.slurm:
        cfg["backend"] = "slurm"
    elif args.hostfile:
        cfg["backend"] = "hostfile"
    for key, value in (("nproc_per_node", args.nproc), ("nodes", args.nodes), ("node_rank", args.node_rank),
                       ("hostfile", args.hostfile), ("master_addr", args.master_addr),
                       ("master_port", args.master_port)):
        if value is not None:
            cfg[key] = value
    if args.no_ssh:
        cfg["ssh"] = False
    if args.gpus_per_node is not None:
        cfg["slurm"]["gpus_per_node"] = args.gpus_per_node
    try:
        return LaunchConfig.model_validate(cfg)
    except ValueError as err:
        raise HealerError(f"launch flags: {err}") from None


def main(recipe: Recipe, args: list[str]) -> int:
    try:
        ns, extra = _parser().parse_known_args(args)
    except (argparse.ArgumentError, SystemExit) as err:
        raise HealerError(f"{err}; usage: healer launch [--nproc N] [--hostfile F [--no-ssh --node-rank K]] "
                          "[--slurm --nodes N --gpus-per-node G] [--dry-run] STAGE recipe.yaml") from None
    if extra:
        raise HealerError(f"unexpected arguments {extra}; give one STAGE, the recipe, then --key value overrides")
    cfg = launch_config(recipe.launch, ns)
    # The ranks read the recipe exactly as resolved here (file + overrides), from a file beside the logs.
    out = launch_dir(recipe.run_dir, ns.stage, cfg)
    out.mkdir(parents=True, exist_ok=True)
    resolved = out / "recipe.yaml"
    resolved.write_text(dump_recipe(recipe))
    return run_stage(ns.stage, str(resolved), [], cfg, dry_run=ns.dry_run, wait=ns.wait or cfg.backend != "slurm")

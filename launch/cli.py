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
import dataclasses
from dataclasses import dataclass, field

from pydantic import ValidationError

from healer.errors import HealerError
from healer.launch.config import LaunchConfig
from healer.launch.run import launch_dir, run_stage, write_rank_recipe
from healer.recipe import Recipe


@dataclass
class Options:
    """``healer launch``'s own flags (contract 1); the recipe is the CLI's positional recipe argument."""

    stage: str = field(default="", metadata={"help": "the stage every rank runs (cpt, sft, ...)", "positional": True})
    nproc: int | None = field(default=None, metadata={"help": "ranks per node (launch.nproc_per_node)"})
    nnodes: int | None = field(default=None,
                               metadata={"help": "number of nodes (launch.nodes)", "aliases": ("--nodes",)})
    node_rank: int | None = field(default=None,
                                  metadata={"help": "this node's rank, for multi-node runs without ssh"})
    hostfile: str | None = field(default=None, metadata={"help": "DeepSpeed hostfile (`host slots=N` lines)"})
    no_ssh: bool = field(default=False, metadata={"help": "hostfile: start only this node's ranks"})
    master_addr: str | None = field(default=None, metadata={"help": "rank 0's address (launch.master_addr)"})
    master_port: int | None = field(default=None, metadata={"help": "rank 0's port (launch.master_port)"})
    slurm: bool = field(default=False, metadata={"help": "submit an sbatch job (launch.backend slurm)"})
    gpus_per_node: int | None = field(default=None, metadata={"help": "SLURM: GPUs per node, also ranks per node"})
    dry_run: bool = field(default=False,
                          metadata={"help": "print the command or sbatch script, start nothing"})
    wait: bool = field(default=False, metadata={"help": "SLURM: block until the job ends, echoing its log"})


def _parser() -> argparse.ArgumentParser:
    """argv -> Options, for the CLI that still hands ``healer launch`` its remaining arguments as a list."""
    p = argparse.ArgumentParser(prog="healer launch", add_help=False, exit_on_error=False)
    for f in dataclasses.fields(Options):
        if f.metadata.get("positional"):
            p.add_argument(f.name)
            continue
        names = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        if f.type in ("bool", bool):
            p.add_argument(*names, dest=f.name, action="store_true")
        else:
            p.add_argument(*names, dest=f.name, type=int if "int" in str(f.type) else str)
    return p


def parse_options(args: list[str]) -> Options:
    try:
        ns, extra = _parser().parse_known_args(args)
    except (argparse.ArgumentError, SystemExit) as err:
        raise HealerError(f"{err}; usage: healer launch [--nproc N] [--hostfile F [--no-ssh --node-rank K]] "
                          "[--slurm --nodes N --gpus-per-node G] [--dry-run] STAGE recipe.yaml") from None
    if extra:
        raise HealerError(f"unexpected arguments {extra}; give one STAGE, the recipe, then --key value overrides")
    return Options(**vars(ns))


def launch_config(base: LaunchConfig, opts: Options) -> LaunchConfig:
    """The recipe's ``launch:`` section with the command-line flags on top."""
    cfg = base.model_dump()
    if opts.slurm:
        cfg["backend"] = "slurm"
    elif opts.hostfile:
        cfg["backend"] = "hostfile"
    flags = {"nproc_per_node": ("--nproc", opts.nproc), "nodes": ("--nnodes", opts.nnodes),
             "node_rank": ("--node-rank", opts.node_rank), "hostfile": ("--hostfile", opts.hostfile),
             "master_addr": ("--master-addr", opts.master_addr), "master_port": ("--master-port", opts.master_port)}
    for key, (_, value) in flags.items():
        if value is not None:
            cfg[key] = value
    if opts.no_ssh:
        cfg["ssh"] = False
    if opts.gpus_per_node is not None:
        cfg["slurm"]["gpus_per_node"] = opts.gpus_per_node
    try:
        return LaunchConfig.model_validate(cfg)
    except ValidationError as err:
        # Name the flag (or key) and the problem; pydantic's own text would repeat the input values,
        # launch.env's secrets among them.
        problem = err.errors()[0]
        key = ".".join(str(p) for p in problem["loc"])
        flag = flags.get(key, (f"launch.{key}",))[0]
        raise HealerError(f"{flag}: {problem['msg']}") from None


def main(recipe: Recipe, opts: Options | list[str]) -> int:
    """Run ``opts.stage`` of ``recipe`` on the ranks the recipe's ``launch:`` section and the flags describe."""
    if isinstance(opts, list):
        opts = parse_options(opts)
    if not opts.stage:
        raise HealerError("healer launch needs a STAGE: healer launch [flags] STAGE recipe.yaml")
    cfg = launch_config(recipe.launch, opts)
    # The ranks read the recipe exactly as resolved here (file + overrides), from a file beside the logs.
    resolved = launch_dir(recipe.run_dir, opts.stage, cfg) / "recipe.yaml"
    write_rank_recipe(recipe, resolved)
    return run_stage(opts.stage, str(resolved), [], cfg, dry_run=opts.dry_run,
                     wait=opts.wait or cfg.backend != "slurm")

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

from dataclasses import dataclass, field

from healer.errors import HealerError
from healer.launch.config import LaunchConfig
from healer.launch.run import launch_dir, run_stage
from healer.recipe import Recipe, dump_recipe
from healer.stages import STAGES


@dataclass
class Options:
    stage: str | None = field(default=None, metadata={"help": "the stage to run on the ranks", "positional": True,
                                                       "choices": STAGES})
    nproc: int | None = field(default=None, metadata={"help": "ranks per node"})
    nodes: int | None = field(default=None, metadata={"help": "number of nodes", "aliases": ("--nnodes",)})
    node_rank: int | None = field(default=None, metadata={"help": "this node's rank (multi-node without ssh)"})
    hostfile: str | None = field(default=None, metadata={"help": "DeepSpeed hostfile (`host slots=N` lines)"})
    no_ssh: bool = field(default=False, metadata={"help": "hostfile: start only this node's ranks"})
    master_addr: str | None = field(default=None, metadata={"help": "node 0's address"})
    master_port: int | None = field(default=None, metadata={"help": "rendezvous port, the same on every node"})
    slurm: bool = field(default=False, metadata={"help": "submit an sbatch job"})
    gpus_per_node: int | None = field(default=None, metadata={"help": "SLURM: GPUs per node"})
    dry_run: bool = field(default=False, metadata={"help": "print the command or sbatch script, start nothing"})
    wait: bool = field(default=False, metadata={"help": "SLURM: block until the job ends, echoing its log"})


def launch_config(base: LaunchConfig, args: Options) -> LaunchConfig:
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


def main(recipe: Recipe, ns: Options) -> int:
    """The ``healer launch`` verb: run ``ns.stage`` of ``recipe`` on the ranks the flags and ``launch:`` say."""
    if ns.stage is None:
        raise HealerError(f"which stage? healer launch [flags] STAGE recipe.yaml (STAGE: {', '.join(STAGES)})")
    cfg = launch_config(recipe.launch, ns)
    # The ranks read the recipe exactly as resolved here (file + overrides), from a file beside the logs.
    out = launch_dir(recipe.run_dir, ns.stage, cfg)
    out.mkdir(parents=True, exist_ok=True)
    resolved = out / "recipe.yaml"
    resolved.write_text(dump_recipe(recipe))
    return run_stage(ns.stage, str(resolved), [], cfg, dry_run=ns.dry_run, wait=ns.wait or cfg.backend != "slurm")

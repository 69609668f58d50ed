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

from pydantic import ValidationError

from healer.core.errors import HealerError
from healer.launch.config import LaunchConfig
from healer.launch.run import launch_dir, run_stage, write_rank_recipe
from healer.recipe import Recipe
from healer.stages import STAGES


@dataclass
class Options:
    """``healer launch``'s own flags; the recipe is the CLI's positional recipe argument."""

    stage: str | None = field(default=None, metadata={"help": "the stage every rank runs", "positional": True,
                                                       "choices": STAGES})
    nproc: int | None = field(default=None, metadata={"help": "ranks per node (launch.nproc_per_node)"})
    nodes: int | None = field(default=None,
                              metadata={"help": "number of nodes (launch.nodes)", "aliases": ("--nnodes",)})
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


def launch_config(base: LaunchConfig, opts: Options) -> LaunchConfig:
    """The recipe's ``launch:`` section with the command-line flags on top."""
    cfg = base.model_dump()
    if opts.slurm:
        cfg["backend"] = "slurm"
    elif opts.hostfile:
        cfg["backend"] = "hostfile"
    flags = {"nproc_per_node": ("--nproc", opts.nproc), "nodes": ("--nodes", opts.nodes),
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


def main(recipe: Recipe, opts: Options) -> int:
    """Run ``opts.stage`` of ``recipe`` on the ranks the recipe's ``launch:`` section and the flags describe."""
    if not opts.stage:
        raise HealerError(f"which stage? healer launch [flags] STAGE recipe.yaml (STAGE: {', '.join(STAGES)})")
    cfg = launch_config(recipe.launch, opts)
    # The ranks read the recipe exactly as resolved here (file + overrides), from a file beside the logs.
    resolved = launch_dir(recipe.run_dir, opts.stage, cfg) / "recipe.yaml"
    write_rank_recipe(recipe, resolved)
    return run_stage(opts.stage, str(resolved), [], cfg, dry_run=opts.dry_run,
                     wait=opts.wait or cfg.backend != "slurm")

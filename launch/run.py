"""Turn one stage of a recipe into processes: locally, across a hostfile's nodes, or as a SLURM job.

Every rank runs ``python -m healer STAGE --config recipe.yaml [overrides]``; the engines (torchrun, the
DeepSpeed launcher, srun) set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Everything
this module checks (recipe, hostfile, slots, ssh, sbatch options) is checked before a rank starts.
"""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from healer.errors import HealerError
from healer.launch import slurm
from healer.launch.config import LaunchConfig
from healer.launch.hostfile import check_slots, check_ssh, parse_hostfile
from healer.launch.supervise import supervise
from healer.launch.torchrun import NodeSpec, free_port, rank_env, torchrun_command
from healer.recipe import load_recipe, resolve_recipe_path

DEFAULT_PORT = 29500


def launch_dir(run_dir: str | Path, stage: str, cfg: LaunchConfig) -> Path:
    """Where the launcher writes its script, per-rank logs and the resolved recipe."""
    return Path(cfg.log_dir or Path(run_dir) / "launch" / stage).resolve()


def run_stage(stage: str, recipe_path: str, args: list[str], cfg: LaunchConfig, *,
              dry_run: bool = False, wait: bool = True) -> int:
    """Run ``healer STAGE`` on the ranks ``cfg`` describes; block until it ends and return its exit code.

    ``args`` are command-line arguments handed to every rank's ``healer STAGE`` (``--resume none``). ``dry_run`` prints the
    command (or the sbatch script) instead of running it. ``wait=False`` returns right after a SLURM
    submission.
    """
    from healer.stages import STAGES

    if stage not in STAGES:
        raise HealerError(f"launch: {stage!r} is not a stage; one of: {', '.join(STAGES)}")
    recipe = load_recipe(recipe_path)  # a bad recipe is refused here, not on 64 ranks
    path = resolve_recipe_path(recipe_path).resolve()
    entry = ["-m", "healer", stage, "--config", str(path), *args]
    return run_entry(entry, cfg, launch_dir(recipe.run_dir, stage, cfg), stage, dry_run=dry_run, wait=wait)


def run_entry(entry: list[str], cfg: LaunchConfig, logs: Path, stage: str = "job", *, dry_run: bool = False,
              wait: bool = True) -> int:
    """Run ``python <entry>`` on every rank (``entry`` = ``["-m", "module", ...]`` or ``["script.py", ...]``)."""
    if cfg.backend == "slurm":
        return _run_slurm(entry, cfg, logs, stage, dry_run, wait)
    if cfg.backend == "hostfile" and cfg.ssh:
        return _run_deepspeed_ssh(entry, cfg, logs, dry_run)
    node = node_spec(cfg, logs, stage)
    cmd = torchrun_command(node, entry)
    if dry_run:
        print(shlex.join(cmd))
        return 0
    logs.mkdir(parents=True, exist_ok=True)
    print(f"healer launch: {stage}: node {node.node_rank} of {node.nnodes}, {node.nproc_per_node} ranks here, "
          f"master {node.master_addr}:{node.master_port}; per-rank logs in {logs}/logs/node{node.node_rank}",
          file=sys.stderr, flush=True)
    rc = supervise(cmd, rank_env(cfg.env))
    if rc != 0:
        print(f"healer launch: {stage} exited with code {rc}; per-rank logs in {logs}/logs/node{node.node_rank}",
              file=sys.stderr, flush=True)
    return rc


def node_spec(cfg: LaunchConfig, logs: Path, stage: str) -> NodeSpec:
    """This machine's part of a torchrun job: one node, a hostfile without ssh, or --nnodes/--node-rank."""
    run_id = f"healer-{stage}"
    if cfg.backend == "hostfile":
        if cfg.hostfile is None:
            raise HealerError("launch.backend is hostfile but no hostfile is given (--hostfile FILE)")
        hosts = parse_hostfile(cfg.hostfile)
        nproc = check_slots(hosts, cfg.nproc_per_node, cfg.hostfile)
        rank = cfg.node_rank if cfg.node_rank is not None else _my_line(hosts, cfg.hostfile)
        if rank >= len(hosts):
            raise HealerError(f"--node-rank {rank} but hostfile {cfg.hostfile} lists {len(hosts)} hosts "
                              f"(node ranks 0..{len(hosts) - 1})")
        master = cfg.master_addr or hosts[0].name
        _check_resolves(master, f"the master address (hostfile {cfg.hostfile}, line {hosts[0].line})")
        return NodeSpec(len(hosts), rank, nproc, master, cfg.master_port or DEFAULT_PORT, logs / "logs", run_id)
    nproc = cfg.nproc_per_node or 1
    if cfg.nodes == 1:
        return NodeSpec(1, 0, nproc, "127.0.0.1", cfg.master_port or free_port(), logs / "logs", run_id)
    if cfg.node_rank is None or cfg.master_addr is None:
        raise HealerError(f"--nnodes {cfg.nodes} without a hostfile needs --node-rank K (0..{cfg.nodes - 1}) and "
                          "--master-addr (node 0's address), and the same --master-port on every node")
    if cfg.node_rank >= cfg.nodes:
        raise HealerError(f"--node-rank {cfg.node_rank} is out of range for --nnodes {cfg.nodes}")
    _check_resolves(cfg.master_addr, "--master-addr")
    return NodeSpec(cfg.nodes, cfg.node_rank, nproc, cfg.master_addr, cfg.master_port or DEFAULT_PORT,
                    logs / "logs", run_id)


def _my_line(hosts, hostfile) -> int:
    names = {socket.gethostname(), socket.gethostname().split(".")[0], socket.getfqdn()}
    mine = [i for i, h in enumerate(hosts) if h.name in names]
    if len(mine) != 1:
        raise HealerError(f"cannot tell which line of hostfile {hostfile} is this machine ({socket.gethostname()}); "
                          "pass --node-rank K (the host's position in the file, from 0)")
    return mine[0]


def _check_resolves(host: str, what: str) -> None:
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror as err:
        raise HealerError(f"{what}: cannot resolve host {host!r} ({err.strerror}); fix the name or use an IP address")


def _run_deepspeed_ssh(entry: list[str], cfg: LaunchConfig, logs: Path, dry_run: bool) -> int:
    """Several nodes over ssh: the DeepSpeed launcher (pdsh) starts the ranks on every host of the hostfile."""
    if cfg.hostfile is None:
        raise HealerError("launch.backend is hostfile but no hostfile is given (--hostfile FILE)")
    hosts = parse_hostfile(cfg.hostfile)
    nproc = check_slots(hosts, cfg.nproc_per_node, cfg.hostfile)
    master = cfg.master_addr or hosts[0].name
    module = entry[0] == "-m"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={cfg.hostfile}", "--launcher=pdsh",
           f"--master_addr={master}", f"--master_port={cfg.master_port or DEFAULT_PORT}", f"--num_gpus={nproc}",
           "--no_local_rank", f"--enable_each_rank_log={logs / 'logs'}"]
    cmd += (["--module", *entry[1:]] if module else entry)
    if dry_run:
        print(shlex.join(cmd))
        return 0
    check_ssh(hosts)
    if shutil.which("pdsh") is None:
        raise HealerError("the DeepSpeed launcher needs pdsh to reach the hosts over ssh; install pdsh, or run "
                          "with --no-ssh and start `healer launch --no-ssh --node-rank K ...` on each host")
    logs.mkdir(parents=True, exist_ok=True)
    env = rank_env(cfg.env)
    # The DeepSpeed launcher exports these to the remote ranks (it only forwards a few prefixes itself).
    env_file = logs / "deepspeed_env"
    wanted = {**cfg.env, **{k: env[k] for k in ("DS_ACCELERATOR",) if k in env}}
    env_file.write_text("".join(f"{k}={v}\n" for k, v in wanted.items()))
    env["DS_ENV_FILE"] = str(env_file)
    return subprocess.run(cmd, env=env).returncode


def _run_slurm(entry: list[str], cfg: LaunchConfig, logs: Path, stage: str, dry_run: bool, wait: bool) -> int:
    logs.mkdir(parents=True, exist_ok=True)
    script = slurm.render_sbatch(stage, entry, cfg, logs, Path.cwd())
    path = logs / f"{stage}.sbatch"
    path.write_text(script)
    if dry_run or not cfg.slurm.submit:
        print(script)
        print(f"# written to {path}; submit it with: sbatch {path}", file=sys.stderr)
        return 0
    job_id = slurm.submit(path)
    log = logs / f"slurm-{job_id}.out"
    print(f"healer launch: submitted {stage} as SLURM job {job_id}; main log {log}; per-rank logs {logs}/logs",
          file=sys.stderr, flush=True)
    return slurm.wait(job_id, log) if wait else 0

"""Turn one stage of a recipe into processes: locally, across a hostfile's nodes, or as a SLURM job.

Every rank runs ``python -m healer STAGE --config recipe.yaml [overrides]``; the engines (torchrun, the
DeepSpeed launcher, srun) set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Everything
this module checks (recipe, hostfile, slots, ssh, sbatch options) is checked before a rank starts.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from healer.core.errors import HealerError
from healer.core.redact import REDACTED, redact_text, redact_tree, write_text
from healer.launch import slurm
from healer.launch.config import LaunchConfig
from healer.launch.hostfile import check_slots, check_ssh, parse_hostfile
from healer.launch.supervise import supervise
from healer.launch.torchrun import NodeSpec, free_port, rank_env, torchrun_command
from healer.recipe import Recipe, load_recipe, resolve_recipe_path

DEFAULT_PORT = 29500
# What the DeepSpeed launcher can put in its remote pdsh command as it is (it does not quote).
_PLAIN_WORD = re.compile(r"[\w@%+=:,./-]*", re.ASCII)


def launch_dir(run_dir: str | Path, stage: str, cfg: LaunchConfig) -> Path:
    """Where the launcher writes its script, per-rank logs and the resolved recipe."""
    return Path(cfg.log_dir or Path(run_dir) / "launch" / stage).resolve()


def write_rank_recipe(recipe: Recipe, path: Path) -> bool:
    """Write the recipe the ranks read to ``path``; return True when it had to be private (mode 0600).

    The ranks take ``launch.env`` from their environment (the launcher sets it), never from this file, so
    its values are written as <redacted>. Anything else that looks secret (a token in a data URL, a
    ``*_token`` key) is needed by the ranks as it is: then the file is kept, readable by its owner only.
    """
    tree = recipe.model_dump(mode="json")  # nulls kept: a key set to null must not return to its default
    env = tree.get("launch", {}).get("env")
    if env:
        tree["launch"]["env"] = {key: REDACTED for key in env}
    private = redact_tree(tree) != tree
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(tree, sort_keys=False), private=private)
    if private:
        print(f"healer launch: {path} holds values that look like secrets, which the ranks need; it is "
              "readable by you only (mode 0600). Pass secrets in launch.env to keep them out of files.",
              file=sys.stderr)
    return private


def _check_env(cfg: LaunchConfig) -> None:
    stale = [key for key, value in cfg.env.items() if value == REDACTED]
    if stale:
        raise HealerError(f"launch.env.{stale[0]} is {REDACTED}: this recipe is a copy healer wrote with its secrets "
                          "removed; launch from your own recipe, or set the value (--launch.env.KEY VALUE)")


def run_stage(stage: str, recipe_path: str, args: list[str], cfg: LaunchConfig, *,
              dry_run: bool = False, wait: bool = True) -> int:
    """Run ``healer STAGE`` on the ranks ``cfg`` describes; block until it ends and return its exit code.

    ``args`` go on every rank's command line after the recipe: the stage's flags (``["--resume", "none"]``)
    and ``key=value`` recipe overrides; the overrides are applied here too, so a bad one is refused before
    any rank starts. ``dry_run`` prints the command (or the sbatch script) instead of running it.
    ``wait=False`` returns right after a SLURM submission.
    """
    from healer.stages import STAGES

    if stage not in STAGES:
        raise HealerError(f"launch: {stage!r} is not a stage; one of: {', '.join(STAGES)}")
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    recipe = load_recipe(recipe_path, overrides)  # a bad recipe is refused here, not on 64 ranks
    path = resolve_recipe_path(recipe_path).resolve()
    entry = ["-m", "healer", stage, "--config", str(path), *args]
    return run_entry(entry, cfg, launch_dir(recipe.run_dir, stage, cfg), stage, dry_run=dry_run, wait=wait)


def run_entry(entry: list[str], cfg: LaunchConfig, logs: Path, stage: str = "job", *, dry_run: bool = False,
              wait: bool = True) -> int:
    """Run ``python <entry>`` on every rank (``entry`` = ``["-m", "module", ...]`` or ``["script.py", ...]``)."""
    _check_env(cfg)
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
    rc = supervise(cmd, rank_env(cfg.env), report=logs / "logs" / f"node{node.node_rank}" / "torchrun-error.txt")
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
        raise HealerError(f"{what}: cannot resolve host {host!r} ({err.strerror}); "
                          "fix the name or use an IP address") from err


def _check_pdsh_env(env: dict[str, str]) -> None:
    """Refuse launch.env values the DeepSpeed launcher would run or change on the remote hosts.

    Over pdsh it pastes every value into the remote shell command as ``export K="value";`` (stripped, in
    double quotes), where ``$(...)``, backquotes, ``"`` and ``\\`` act, and outer spaces are lost.
    """
    for key, value in env.items():
        if re.search(r'[$`"\\]', value) or value != value.strip():
            raise HealerError(f"launch.env.{key}: its value holds $, `, \" or \\ (or starts or ends with a space), "
                              "which the DeepSpeed launcher would run or change in the remote shell over ssh; "
                              "use --no-ssh (one `healer launch` per host), or set it in the hosts' own environment")


def _run_deepspeed_ssh(entry: list[str], cfg: LaunchConfig, logs: Path, dry_run: bool) -> int:
    """Several nodes over ssh: the DeepSpeed launcher (pdsh) starts the ranks on every host of the hostfile."""
    if cfg.hostfile is None:
        raise HealerError("launch.backend is hostfile but no hostfile is given (--hostfile FILE)")
    hosts = parse_hostfile(cfg.hostfile)
    nproc = check_slots(hosts, cfg.nproc_per_node, cfg.hostfile)
    master = cfg.master_addr or hosts[0].name
    _check_pdsh_env(cfg.env)
    for what, word in (("the working directory", os.getcwd()), ("the log directory", str(logs / "logs")),
                       *(("the rank argument", arg) for arg in entry)):
        if not _PLAIN_WORD.fullmatch(word):
            raise HealerError(f"{what} {word!r} holds characters a shell acts on (space, quote, $, ;, ...), and the "
                              "DeepSpeed launcher passes it unquoted to the remote shell over ssh; use paths of "
                              "letters, digits and _@%+=:,./- (run_dir), or --no-ssh (one `healer launch` per host)")
    module = entry[0] == "-m"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={cfg.hostfile}", "--launcher=pdsh",
           f"--master_addr={master}", f"--master_port={cfg.master_port or DEFAULT_PORT}", f"--num_gpus={nproc}",
           "--no_local_rank", f"--enable_each_rank_log={logs / 'logs'}"]
    cmd += (["--module", *entry[1:]] if module else entry)
    if dry_run:
        print(shlex.join(cmd))
        return 0
    check_ssh(hosts, cfg.ssh_host_key_checking)
    if shutil.which("pdsh") is None:
        raise HealerError("the DeepSpeed launcher needs pdsh to reach the hosts over ssh; install pdsh, or run "
                          "with --no-ssh and start `healer launch --no-ssh --node-rank K ...` on each host")
    logs.mkdir(parents=True, exist_ok=True)
    env = rank_env(cfg.env)
    # pdsh's ssh gets the same host-key policy as the check above.
    env["PDSH_SSH_ARGS_APPEND"] = f"{env.get('PDSH_SSH_ARGS_APPEND', '')} -o StrictHostKeyChecking=" \
                                  f"{cfg.ssh_host_key_checking}".strip()
    # The DeepSpeed launcher exports these to the remote ranks (it only forwards a few prefixes itself).
    # It may hold secrets (launch.env), so only its owner may read it.
    env_file = logs / "deepspeed_env"
    wanted = {**cfg.env, **{k: env[k] for k in ("DS_ACCELERATOR",) if k in env}}
    write_text(env_file, "".join(f"{k}={v}\n" for k, v in wanted.items()), private=True)
    env["DS_ENV_FILE"] = str(env_file)
    return subprocess.run(cmd, env=env).returncode


def _run_slurm(entry: list[str], cfg: LaunchConfig, logs: Path, stage: str, dry_run: bool, wait: bool) -> int:
    logs.mkdir(parents=True, exist_ok=True)
    script = slurm.render_sbatch(stage, entry, cfg, logs, Path.cwd())
    path = logs / f"{stage}.sbatch"
    # launch.env is not in the script; a secret typed into launch.slurm.setup would be, so then only the
    # owner may read the file, and the console copy hides it.
    shown = redact_text(script)
    write_text(path, script, private=shown != script)
    if shown != script:
        print(f"healer launch: {path} holds a value that looks like a secret (launch.slurm.setup?); it is readable "
              "by you only (mode 0600). Put secrets in launch.env: they reach the job without being written.",
              file=sys.stderr)
    if dry_run or not cfg.slurm.submit:
        print(shown)
        print(f"# written to {path}; submit it with: sbatch {path}", file=sys.stderr)
        if cfg.env:
            print(f"# the job expects {', '.join(cfg.env)} (launch.env) in sbatch's environment: export them "
                  "before submitting by hand", file=sys.stderr)
        return 0
    # Not rank_env(): the login node's lack of a GPU says nothing about the compute nodes.
    job_id = slurm.submit(path, env={**os.environ, **cfg.env})
    log = logs / f"slurm-{job_id}.out"
    print(f"healer launch: submitted {stage} as SLURM job {job_id}; main log {log}; per-rank logs {logs}/logs",
          file=sys.stderr, flush=True)
    return slurm.wait(job_id, log) if wait else 0

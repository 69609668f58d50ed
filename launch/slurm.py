"""SLURM: an sbatch script per stage, submitted (or shown with ``--dry-run``) and, when asked, waited on.

Inside the allocation the script runs one ``srun`` task per node; each task is
``python -m healer.launch.node`` (master address, port and node rank from SLURM's environment), which
runs torchrun for that node's ranks. Preemption: ``--signal=USR1@N`` warns the ranks N seconds before
the time limit, the trainer checkpoints and exits with PREEMPTED_EXIT_CODE, and the script requeues the
job; the requeued job resumes from the checkpoint because the trainer's ``--resume auto`` finds it.
Failures are requeued too, at most ``max_restarts`` times, counted in a file next to the log.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from healer.core.errors import HealerError
from healer.launch.config import LaunchConfig
from healer.launch.supervise import PREEMPTED_EXIT_CODE


class SlurmError(HealerError):
    pass


def _directive_path(path: Path, what: str) -> str:
    """``path`` for an #SBATCH line: sbatch splits those at whitespace and reads quotes itself, so refuse both."""
    text = str(path)
    if re.search(r"[\s'\"\\]", text) or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise SlurmError(f"{what} {text!r} holds a space, quote, backslash or control character, which an "
                         "#SBATCH line cannot carry; use a run_dir (or launch.log_dir) without them")
    return text


def render_sbatch(stage: str, entry: list[str], cfg: LaunchConfig, launch_dir: Path, workdir: Path) -> str:
    """The job script. ``entry`` is what every rank runs after ``python`` (``-m healer cpt --config ...``).

    Every value from the recipe or the command line is either checked to be safe where it lands (the
    #SBATCH options, by :class:`LaunchConfig`) or shell-quoted; the paths the shell lines need are
    assigned once, quoted, and used as ``"$var"``, so a ``$(...)`` in a directory name stays text.
    ``launch.env`` is not written here: its values may be secrets, so ``healer launch`` hands them to
    sbatch in its environment (sbatch's default ``--export=ALL``) and the script only checks they arrived.
    """
    s = cfg.slurm
    nproc = s.gpus_per_node or cfg.nproc_per_node or 1
    # In --output a % starts a SLURM filename pattern (%j is wanted); %% is a literal %.
    output = _directive_path(launch_dir, "the launch directory").replace("%", "%%")
    sb = [f"--job-name=healer-{stage}", f"--nodes={cfg.nodes}", "--ntasks-per-node=1",
          f"--output={output}/slurm-%j.out", "--open-mode=append",  # a requeued job appends to the same log
          f"--signal=USR1@{s.signal_seconds}", "--requeue", f"--chdir={_directive_path(workdir, 'the directory')}"]
    for flag, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos), ("time", s.time),
                        ("constraint", s.constraint), ("cpus-per-task", s.cpus_per_task), ("mem", s.mem)):
        if value is not None:
            sb.append(f"--{flag}={value}")
    if s.gpus_per_node:
        sb.append(f"--gpus-per-node={s.gpus_per_node}")
    sb += s.extra_sbatch  # validated: one --option[=value] each

    node_cmd = [sys.executable, "-m", "healer.launch.node", f"--nproc-per-node={nproc}", f"--stage={stage}",
                f"--log-dir={launch_dir}/logs"]
    if cfg.master_port is not None:
        node_cmd.append(f"--master-port={cfg.master_port}")
    if cfg.master_addr is not None:
        node_cmd.append(f"--master-addr={cfg.master_addr}")
    node_cmd += ["--", *entry]
    q = shlex.quote
    lines = ["#!/bin/bash", f"# healer {stage}: written by `healer launch --slurm`"]
    lines += [f"#SBATCH {opt}" for opt in sb]
    lines += ["", f"stage={q(stage)}", f"launch_dir={q(str(launch_dir))}"]
    if cfg.env:
        names = " ".join(q(k) for k in cfg.env)
        lines += [
            "",
            "# launch.env: healer launch passes these to sbatch in its environment; their values are never",
            "# written to this file (submitting it by hand: export them first). Variables that come from the",
            "# environment are exported to srun's tasks already.",
            f"for name in {names}; do",
            '    if [ -z "${!name+set}" ]; then',
            '        echo "healer: $name (launch.env) is not in the job environment; export it before sbatch, '
            'or submit with healer launch --slurm" >&2; exit 1',
            "    fi",
            "done",
        ]
    if s.setup:
        lines += ["", "# launch.slurm.setup, as written in the recipe"] + s.setup
    lines += [
        "",
        'echo "healer: job $SLURM_JOB_ID stage $stage on $SLURM_JOB_NODELIST (restart ${SLURM_RESTART_COUNT:-0})"',
        "# one task per node; each runs torchrun for that node's ranks. --wait: if one node's ranks are gone,",
        "# stop the others after 120 s instead of letting them hang in a collective.",
        "srun --nodes=$SLURM_JOB_NUM_NODES --ntasks-per-node=1 --kill-on-bad-exit=0 --wait=120 \\",
        "    ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \\",
        "    " + " ".join(q(a) for a in node_cmd),
        "rc=$?",
        'failures_file="$launch_dir/failures.$SLURM_JOB_ID"',
        'if [ "$rc" -eq 0 ]; then',
        '    echo "healer: $stage finished"; rm -f "$failures_file"; exit 0',
        "fi",
        f'if [ "$rc" -eq {PREEMPTED_EXIT_CODE} ]; then',
        '    echo "healer: $stage was preempted and saved a checkpoint; requeueing job $SLURM_JOB_ID to resume it"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        '    echo "healer: scontrol requeue failed; resubmit $launch_dir/$stage.sbatch to resume"; exit "$rc"',
        "fi",
        'failures=$(( $(cat "$failures_file" 2>/dev/null || echo 0) + 1 )); echo "$failures" > "$failures_file"',
        f'if [ "$failures" -le {s.max_restarts} ]; then',
        f'    echo "healer: $stage failed with exit code $rc; requeueing (retry $failures of {s.max_restarts})"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
        f'echo "healer: $stage failed with exit code $rc and has failed $failures times; giving up after '
        f'{s.max_restarts} retries (launch.slurm.max_restarts). Per-rank logs: $launch_dir/logs"',
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)


def submit(script: Path, env: dict[str, str] | None = None) -> str:
    """sbatch the script with ``env`` as its environment (the job's, too: sbatch exports it by default).

    A refusal (bad partition, account, time, constraint...) becomes a SlurmError.
    """
    try:
        done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120,
                              env=env)
    except FileNotFoundError:
        raise SlurmError("sbatch is not installed here; run `healer launch --slurm` on a SLURM login node, "
                         "or use --dry-run to only write the script") from None
    if done.returncode != 0:
        why = done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}"
        if "configuration source" in why:
            raise SlurmError(f"sbatch found no SLURM configuration (SLURM_CONF, /etc/slurm/slurm.conf):\n  {why}\n"
                             f"Run this on the cluster's login node; the script is kept at {script}")
        raise SlurmError(f"SLURM refused the job script {script}:\n  {why}\n"
                         "Nothing was started. Fix the matching launch.slurm key (partition, account, qos, time, "
                         "constraint, gpus_per_node, extra_sbatch) in the recipe or on the command line.")
    return done.stdout.strip().split(";")[0]


_FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
          "PREEMPTED", "SPECIAL_EXIT"}


def job_info(job_id: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """``scontrol show job`` as a dict; empty once SLURM has forgotten the job."""
    done = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60,
                          env=env)
    if done.returncode != 0:
        return {}
    return dict(part.split("=", 1) for part in done.stdout.split() if "=" in part)


def wait(job_id: str, log: Path, env: dict[str, str] | None = None, poll_s: float = 2.0) -> int:
    """Block until the job (requeues included) ends, echoing its main log; return its exit code."""
    offset = 0
    state = "PENDING"
    info: dict[str, str] = {}
    while True:
        info = job_info(job_id, env) or info
        state = info.get("JobState", state)
        if log.exists():
            with open(log, errors="replace") as fh:
                fh.seek(offset)
                chunk = fh.read()
                offset = fh.tell()
            if chunk:
                sys.stdout.write(chunk)
                sys.stdout.flush()
        if state in _FINAL:
            break
        time.sleep(poll_s)
    code, _, sig = info.get("ExitCode", "1:0").partition(":")
    if state == "COMPLETED":
        return 0
    print(f"healer launch: SLURM job {job_id} ended {state} (exit code {code}, signal {sig}); log: {log}",
          file=sys.stderr)
    return int(code) or 1


def slurm_node_addr(hostname: str) -> str:
    """The address SLURM reaches a node at (NodeAddr), which is what the other nodes must connect to."""
    done = subprocess.run(["scontrol", "show", "node", "-o", hostname], capture_output=True, text=True, timeout=60)
    match = re.search(r"\bNodeAddr=(\S+)", done.stdout)
    return match.group(1) if match else hostname


def first_node(nodelist: str) -> str:
    done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60,
                          check=True)
    return done.stdout.split()[0]

"""Recipe section ``launch:``: how a stage becomes processes.

``backend`` picks the engine: ``local`` (torchrun on this machine), ``hostfile`` (several machines listed
in a DeepSpeed hostfile, over ssh with the DeepSpeed launcher or, with ``ssh: false``, one
``healer launch --node-rank K`` per machine) and ``slurm`` (an sbatch job; srun starts one torchrun per
node). The command-line flags of ``healer launch`` override these keys.

Values here reach a shell script (SLURM) or an ssh command line, so they are checked when the recipe is
loaded: no control characters anywhere (a newline in ``partition`` would end the ``#SBATCH`` line and
start a shell command), SLURM options in the shapes sbatch accepts, environment names that are shell
identifiers. Free-form strings (paths, ``env`` values) are quoted where they are written.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from healer.core.config_base import Section

# What sbatch accepts for these options: names (comma lists for several partitions), SLURM's time
# formats, memory as <int>[KMGT], and feature expressions for --constraint.
_NAME_LIST = re.compile(r"[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*")
_TIME = re.compile(r"\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}"
                   r"|INFINITE|UNLIMITED|infinite|unlimited")
_MEM = re.compile(r"\d+[KMGTkmgt]?")
_CONSTRAINT = re.compile(r"[A-Za-z0-9_.\-&|,*!\[\]()]+")
_SBATCH_LINE = re.compile(r"--[a-z][a-z0-9-]*(=[^\s'\"\\]+)?")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOST = re.compile(r"[A-Za-z0-9_.:\[\]][A-Za-z0-9_.:\-\[\]]*")


def _fail(problem: str) -> PydanticCustomError:
    # A custom error keeps the message as written: the recipe loader prints `launch.slurm.partition: <problem>`.
    return PydanticCustomError("launch_value", problem)


def control_problem(text: str) -> str | None:
    """Why ``text`` cannot go into a script line (a newline or another control character), or None."""
    if "\n" in text or "\r" in text:
        return "contains a newline; it must be one line"
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    return None if bad is None else f"contains the control character {bad!r}"


def _one_line(value: str | None) -> str | None:
    if value is not None and (problem := control_problem(value)):
        raise _fail(problem)
    return value


def _shaped(value: str | None, pattern: re.Pattern, what: str) -> str | None:
    if value is None:
        return None
    _one_line(value)
    if not pattern.fullmatch(value):
        raise _fail(f"{value!r} is not {what}")
    return value


class SlurmConfig(Section):
    partition: str | None = Field(None, description="sbatch --partition: a name, or names joined by commas")
    account: str | None = Field(None, description="sbatch --account")
    qos: str | None = Field(None, description="sbatch --qos")
    time: str | None = Field(None, description="sbatch --time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    constraint: str | None = Field(None, description="sbatch --constraint: features joined by & | , (e.g. a100&ib)")
    gpus_per_node: int = Field(0, ge=0, description="GPUs to ask for per node; also the ranks per node when > 0")
    cpus_per_task: int | None = Field(None, gt=0, description="CPUs for each node's launcher and its ranks")
    mem: str | None = Field(None, description="sbatch --mem: <int>[K|M|G|T], e.g. 0 (all of it) or 480G")
    signal_seconds: int = Field(300, gt=0, description="SIGUSR1 this long before the time limit")
    max_restarts: int = Field(3, ge=0, description="requeues after a failure (preemptions do not count)")
    extra_sbatch: list[str] = Field(default_factory=list,
                                    description="more sbatch options, one `--option[=value]` per item (no spaces), "
                                                "written as #SBATCH lines")
    setup: list[str] = Field(default_factory=list,
                             description="shell lines run as written before srun, e.g. `module load cuda`; "
                                         "one line each")
    submit: bool = Field(True, description="false: write the script and print it without submitting")

    @field_validator("partition", "account", "qos")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return _shaped(value, _NAME_LIST, "a SLURM name (letters, digits, _ . -; several joined by commas)")

    @field_validator("time")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        return _shaped(value, _TIME, "a SLURM time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or INFINITE)")

    @field_validator("mem")
    @classmethod
    def _mem(cls, value: str | None) -> str | None:
        return _shaped(value, _MEM, "a SLURM memory size <int>[K|M|G|T] (e.g. 480G, or 0 for all of it)")

    @field_validator("constraint")
    @classmethod
    def _constraint(cls, value: str | None) -> str | None:
        return _shaped(value, _CONSTRAINT, "a SLURM feature expression (letters, digits, _ . - & | , * ! [ ] ( ))")

    @field_validator("extra_sbatch")
    @classmethod
    def _sbatch_lines(cls, lines: list[str]) -> list[str]:
        out = []
        for i, line in enumerate(lines):
            if problem := control_problem(line):
                raise _fail(f"item {i} {problem}")
            option = line.strip().removeprefix("#SBATCH").strip()
            if not _SBATCH_LINE.fullmatch(option):
                raise _fail(f"item {i} {line!r} is not one `--option` or `--option=value` (no spaces or quotes)")
            out.append(option)
        return out

    @field_validator("setup")
    @classmethod
    def _setup_lines(cls, lines: list[str]) -> list[str]:
        for i, line in enumerate(lines):
            if problem := control_problem(line):
                raise _fail(f"item {i} {problem}; give each shell line as its own item")
        return lines


class LaunchConfig(Section):
    backend: Literal["local", "hostfile", "slurm"] = Field(
        "local", description="local: torchrun here; hostfile: every host of launch.hostfile; slurm: an sbatch job")
    nproc_per_node: int | None = Field(None, gt=0, description="ranks per node (GPUs, or CPU processes with gloo); "
                                                              "default 1, or the hostfile's slots")
    nodes: int = Field(1, gt=0, description="nodes the stage runs on: the SLURM job's, or torchrun --nnodes "
                                            "(with --node-rank)")
    node_rank: int | None = Field(None, ge=0, description="hostfile without ssh: this machine's line in the hostfile")
    hostfile: str | None = Field(None, description="DeepSpeed hostfile: one `host slots=N` line per node")
    ssh: bool = Field(True, description="hostfile: start the other nodes over ssh (pdsh); false: run "
                                        "`healer launch --node-rank K` on each node yourself")
    ssh_host_key_checking: Literal["yes", "accept-new", "no"] = Field(
        "yes", description="ssh StrictHostKeyChecking for the hostfile's hosts: yes (default: every host must be in "
                           "known_hosts), accept-new (trust a host seen for the first time), no (trust any key; "
                           "only on a network you control)")
    master_addr: str | None = Field(None, description="rank 0's address; default: 127.0.0.1, the hostfile's "
                                                      "first host, or SLURM's first node")
    master_port: int | None = Field(None, gt=0, lt=65536,
                                    description="default: a free port (local), 29500 (hostfile), "
                                                "20000 + job id % 12000 (SLURM)")
    env: dict[str, str] = Field(default_factory=dict,
                                description="environment for every rank (NCCL_*, HF_TOKEN ...); names are shell "
                                            "identifiers; values are never written to release files or logs")
    log_dir: str | None = Field(None, description="per-rank logs; default <run_dir>/launch/<stage>")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @field_validator("hostfile", "log_dir")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return _one_line(value)

    @field_validator("master_addr")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return _shaped(value, _HOST, "a host name or IP address (it may not start with '-')")

    @field_validator("env", mode="before")
    @classmethod
    def _env_numbers(cls, env):
        # `NCCL_IB_DISABLE: 1` in YAML is a number; the environment only holds text.
        if isinstance(env, dict):
            return {k: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for k, v in env.items()}
        return env

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            if not _ENV_KEY.fullmatch(key):
                raise _fail(f"{key!r} is not an environment variable name (letters, digits, _; not starting "
                            "with a digit)")
            if problem := control_problem(value):
                raise _fail(f"{key}: the value {problem}")
        return env

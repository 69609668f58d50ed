"""DeepSpeed hostfiles: one ``hostname slots=N`` line per node, ``#`` comments.

The same file works for ``deepspeed --hostfile`` and for ``healer launch --hostfile``; parsing it here
first lets a typo or an unreachable host fail with the file and line named, before any rank starts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from healer.core.errors import HealerError

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.:\-\[\]]+)\s+slots\s*=\s*(?P<slots>\S+)$")


class HostfileError(HealerError):
    pass


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int


def parse_hostfile(path: str | Path) -> list[Host]:
    """The hosts in file order; the first one is node rank 0 (and the default master address)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise HostfileError(f"hostfile {path}: cannot read it ({err.strerror})") from None
    try:
        if b"\0" in data:
            raise UnicodeError
        text = data.decode("utf-8")
    except UnicodeError:
        raise HostfileError(f"hostfile {path}: not a text file (binary, or not UTF-8); a hostfile holds "
                            "`hostname slots=N` lines") from None
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise HostfileError(f"hostfile {path}, line {number}: {raw.strip()!r} is not `hostname slots=N` "
                                f"(DeepSpeed hostfile format)")
        name, slots_text = match["host"], match["slots"]
        if name.startswith("-"):
            # ssh and pdsh would read it as an option (`-oProxyCommand=...` runs a command).
            raise HostfileError(f"hostfile {path}, line {number}: host {name!r} starts with '-', which ssh reads "
                                "as an option, not a host name")
        if not slots_text.isdigit() or int(slots_text) < 1:
            raise HostfileError(f"hostfile {path}, line {number}: slots={slots_text} is not a positive integer")
        if name in seen:
            raise HostfileError(f"hostfile {path}, line {number}: host {name} is already on line {seen[name]}")
        seen[name] = number
        hosts.append(Host(name, int(slots_text), number))
    if not hosts:
        raise HostfileError(f"hostfile {path}: no hosts in it (expected lines like `node1 slots=8`)")
    return hosts


def check_slots(hosts: list[Host], nproc_per_node: int | None, path: str | Path) -> int:
    """Ranks per node: every host runs the same number; asking for more than a host's slots is refused."""
    if nproc_per_node is None:
        counts = {h.slots for h in hosts}
        if len(counts) > 1:
            raise HostfileError(f"hostfile {path}: hosts have different slot counts {sorted(counts)}; "
                                f"pass --nproc N (at most {min(counts)}) to run the same number on each")
        return hosts[0].slots
    short = [h for h in hosts if h.slots < nproc_per_node]
    if short:
        h = short[0]
        raise HostfileError(f"hostfile {path}, line {h.line}: {h.name} has slots={h.slots} but --nproc asks for "
                            f"{nproc_per_node} processes per node; lower --nproc or raise its slots")
    return nproc_per_node


def check_ssh(hosts: list[Host], host_key_checking: str = "yes", timeout: int = 10) -> None:
    """Every host answers a non-interactive ssh, as the DeepSpeed launcher (pdsh) will need.

    ``host_key_checking`` is ssh's StrictHostKeyChecking (``launch.ssh_host_key_checking``): ``yes`` unless
    the user chose to trust unknown hosts.
    """
    if shutil.which("ssh") is None:
        raise HostfileError("ssh is not installed here; install openssh-client, or run with --no-ssh "
                            "(start `healer launch --no-ssh --node-rank K ...` on each node)")
    for host in hosts:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}", "-o",
               f"StrictHostKeyChecking={host_key_checking}", "--", host.name, "true"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            raise HostfileError(f"host {host.name} (hostfile line {host.line}) did not answer ssh within "
                                f"{timeout} s; fix the host name or the network, or use --no-ssh") from None
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["no message"])[-1]
            if "Host key verification failed" in done.stderr:
                raise HostfileError(f"host {host.name} (hostfile line {host.line}): ssh does not know its host key "
                                    "(not in ~/.ssh/known_hosts). Check the key and add it (ssh-keyscan), or set "
                                    "launch.ssh_host_key_checking: accept-new to trust hosts seen for the first time")
            raise HostfileError(f"host {host.name} (hostfile line {host.line}) is not reachable over passwordless "
                                f"ssh: {why}. Fix ssh (keys, host name) or use --no-ssh and start "
                                f"`healer launch --no-ssh --node-rank K` on each node")

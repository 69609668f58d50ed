"""An exclusive lock per stage directory, so two runs never write one directory at once.

The lock for directory ``D`` is the file ``D/../.D.lock`` -- beside ``D``, not in it, because stages
replace their directory wholesale (release renames a finished temporary directory over it) and an extra
file inside would look like someone else's work. The file holds who took it (host, pid, start time,
command) so a refusal can name the holder.

Mutual exclusion is ``flock`` on that file; the kernel drops it when the holder dies, however it dies.
A lock file whose holder is gone (SIGKILL, power loss) is therefore taken over, with a message. Where
``flock`` is not shared between hosts (some network file systems), the recorded host stops a second
host from taking a live lock: a lock recorded by another host is only ever given up by deleting it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import psutil

from healer.core.errors import HealerError


def lock_path(directory: str | Path) -> Path:
    """The lock file that guards ``directory``."""
    d = Path(directory).resolve()
    return d.parent / f".{d.name}.lock"


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    what = f" ({holder['command']})" if holder.get("command") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{what}, since {when}"


def _alive(holder: dict) -> bool:
    """Whether the recorded process on this host still runs (and is the same process, not a reused pid)."""
    try:
        proc = psutil.Process(int(holder.get("pid")))
        return proc.create_time() <= float(holder.get("started", 0)) + 1.0
    except (psutil.Error, TypeError, ValueError):
        return False


class DirectoryLock:
    """``with DirectoryLock(dir, "healer prune"):`` -- hold ``dir`` exclusively; refuse if someone else does."""

    def __init__(self, directory: str | Path, command: str = ""):
        self.directory = Path(directory)
        self.path = lock_path(directory)
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> "DirectoryLock":
        if self.directory.exists() and not self.directory.is_dir():
            raise HealerError(f"{self.directory} is a file; a stage writes a directory there -- pick another path")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise HealerError(f"cannot create {self.path.parent} ({err.strerror})") from None
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                    return self  # this process holds it already (e.g. the run dir is also a stage dir)
                raise HealerError(f"{self.directory} is in use by {_describe(holder)}: another healer is writing "
                                  "it; wait for it to finish or choose another directory") from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                # No flock on this file system: the recorded holder is all there is to go by.
            try:
                same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the holder released (unlinked) it between our open and flock: try again
                os.close(fd)
                continue
            holder = _read(fd)
            if holder and holder.get("pid") != os.getpid():
                self._check_stale(fd, holder)
            self._fd = fd
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "command": self.command}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(record).encode(), 0)
        os.fsync(self._fd)
        return self

    def _check_stale(self, fd: int, holder: dict) -> None:
        here = socket.gethostname()
        if holder.get("host") != here:
            os.close(fd)
            raise HealerError(f"{self.directory} is locked by {_describe(holder)}; if that run is gone, "
                              f"delete {self.path}")
        if _alive(holder):
            os.close(fd)
            raise HealerError(f"{self.directory} is in use by {_describe(holder)}: another healer is writing "
                              "it; wait for it to finish or choose another directory")
        print(f"healer: taking over the stale lock on {self.directory} left by {_describe(holder)} "
              "(that process is no longer running)", file=sys.stderr, flush=True)

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink while still holding it: a waiter that opened the old file sees it is gone and retries.
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # drops the flock
        self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw.decode()) if raw.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?"}


def is_main_process() -> bool:
    """Rank 0 of a distributed job, or a single process (the launchers set RANK): the one that locks."""
    return os.environ.get("RANK", "0") == "0"

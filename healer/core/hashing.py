"""Content digests: of a file, of every file under a folder, and of a JSON-able value."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256(path: Path) -> str:
    """sha256 of the bytes of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(folder: Path) -> dict[str, dict]:
    """Every file under ``folder`` (relative POSIX path) -> sha256 and size, except the manifest itself."""
    return {p.relative_to(folder).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def canonical_hash(data: Any) -> str:
    """sha256 of ``data`` as canonical JSON (sorted keys), the same on every machine."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _digest_cache_dir() -> Path:
    import os

    root = os.environ.get("HEALER_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                          os.path.expanduser("~/.cache"), "healer")
    return Path(root) / "file-digests"


def file_digest(path: str | Path) -> str:
    """sha256 of the whole file at ``path``, computed once per version of the file.

    A version is (real path, size, mtime_ns, inode): the digest is cached under ``$HEALER_CACHE`` (default
    ``~/.cache/healer``), so a 140 GB teacher is read in full once, not at every start, and a file rewritten
    in place (same size, new bytes) is hashed again. Processes on one machine that ask at once wait for the
    first one's result instead of each reading the file. The first hash of a large file is announced.
    """
    import fcntl
    import os
    import sys

    real = Path(path).resolve()
    stat = real.stat()
    version = f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}"
    folder = _digest_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / hashlib.sha256(version.encode()).hexdigest()
    with open(entry.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if entry.is_file():
            return entry.read_text().strip()
        if stat.st_size > 1 << 30:
            print(f"healer: hashing {real} ({stat.st_size / 2**30:.1f} GiB) once; its digest is cached in {folder}",
                  file=sys.stderr, flush=True)
        digest = sha256(real)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
        tmp.write_text(digest)
        os.replace(tmp, entry)
        return digest

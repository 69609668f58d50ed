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

"""Finding the shard files a source names (files, directories, globs, fsspec URLs), in one order on every rank.

Reading them is :mod:`healer.core.textio`'s business; what each suffix means is written there.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
from pathlib import Path

from healer.core.errors import HealerError
from healer.core.textio import SUFFIXES, SUPPORTED  # the reader decides what a file is


def is_remote(path: str) -> bool:
    return "://" in path


def _supported(path: str) -> bool:
    return path.lower().endswith(SUFFIXES)


def _fsspec():
    try:
        import fsspec
    except ImportError:  # pragma: no cover - depends on the installation
        raise HealerError("remote data paths need fsspec (and huggingface_hub for hf://): pip install fsspec") from None
    return fsspec


def resolve_files(path: str, key: str = "data.sources") -> list[str]:
    """All shard files a ``path`` names, sorted so every rank sees the same list in the same order.

    ``path`` is a file, a directory (searched recursively), or a glob (``train/chunk*/*.jsonl.zst``);
    ``s3://``, ``https://`` and ``hf://datasets/org/name/...`` paths go through fsspec.
    """
    if is_remote(path):
        from fsspec.core import url_to_fs

        _fsspec()
        fs, stripped = url_to_fs(path)
        protocol = path.split("://", 1)[0]
        if any(ch in path for ch in "*?["):
            found = fs.glob(stripped)
        elif fs.isdir(stripped):
            found = fs.find(stripped)
        elif fs.isfile(stripped):
            found = [stripped]
        else:
            raise HealerError(f"{key}: {path!r} does not exist")
        files = sorted(f if "://" in f else f"{protocol}://{f}" for f in found if _supported(f))
    elif any(ch in path for ch in "*?["):
        files = sorted(f for f in globlib.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(f))
        files = [f for f in files if _supported(f)]
    else:
        p = Path(path).expanduser()
        if p.is_dir():
            files = sorted(str(f) for f in p.rglob("*") if f.is_file() and _supported(str(f)))
        elif p.is_file():
            if not _supported(str(p)):
                raise HealerError(f"{key}: {path} is not a file type healer reads: {SUPPORTED}")
            files = [str(p)]
        else:
            hint = ""
            if path.count("/") == 1 and not path.startswith((".", "/", "~")):
                hint = f"; for a Hugging Face dataset give its files, e.g. hf://datasets/{path}/train/**/*.jsonl.zst"
            raise HealerError(f"{key}: path {path!r} does not exist (give a file, a directory or a glob){hint}")
    if not files:
        raise HealerError(
            f"{key}: {path!r} names no shard files ({SUPPORTED})"
        )
    return files


def file_signature(path: str) -> str:
    """What a resume checks a shard by: its size and the sha256 of its whole content.

    The digest is computed once per version of the file (:func:`healer.core.hashing.file_digest`), so a
    shard overwritten in place with other text of the same size is noticed, and a start re-reads nothing.
    Not the modification time: copying a corpus to node-local scratch changes it, not the data.
    A remote file is checked by the size and the content hash or ETag its filesystem reports (reading
    every remote shard's ends would cost two requests per shard at every start).
    """
    if is_remote(path):
        from fsspec.core import url_to_fs

        fs, stripped = url_to_fs(path)
        info = fs.info(stripped)
        ids = [f"{k}={info[k]}" for k in ("lfs", "blob_id", "sha256", "etag", "ETag", "md5", "checksum") if info.get(k)]
        return f"{info.get('size')}:{','.join(ids)}"
    from healer.core.hashing import file_digest

    try:
        return f"{os.path.getsize(path)}:{file_digest(path)[:16]}"
    except OSError as err:  # the reader skips and counts such a shard; a checkpoint must still be written
        return f"unreadable:{err.errno}"


def fingerprint(files: list[str]) -> dict:
    """``{"files", "names", "content"}``: how many shards, a hash of their names, a hash of their signatures.

    Names are taken relative to the shards' common folder, so a corpus copied elsewhere still matches.
    """
    if not files:
        return {"files": 0, "names": "", "content": ""}
    parts = [f.split("/") for f in files]
    common = 0
    while common < len(parts[0]) - 1 and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    names = ["/".join(p[common:]) for p in parts]
    names_hash = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    content = hashlib.sha256("\n".join(f"{n} {file_signature(f)}" for n, f in zip(names, files)).encode())
    return {"files": len(files), "names": names_hash, "content": content.hexdigest()[:16]}

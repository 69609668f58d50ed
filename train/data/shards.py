"""Finding shard files and reading them as raw records, from any byte offset, without loading a file whole.

A shard is read as a stream of decompressed bytes split into lines (``.jsonl``, ``.jsonl.zst``,
``.jsonl.gz``, ``.txt``) or as rows (``.parquet``). Every record comes with the position *after* it
(bytes of decompressed stream, or rows), which is all a reader has to remember to resume there:
a plain file seeks, a compressed one decompresses up to that point and throws the bytes away (fast,
no parsing), so resuming never re-reads earlier shards.
"""

from __future__ import annotations

import glob as globlib
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from healer.errors import HealerError

LINE_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz", ".txt", ".txt.zst", ".txt.gz")
ROW_SUFFIXES = (".parquet",)
SUFFIXES = LINE_SUFFIXES + ROW_SUFFIXES
_CHUNK = 1 << 20


class CorruptShard(Exception):
    """The compressed stream is damaged or ends early; the reader skips the rest of the file."""


def is_remote(path: str) -> bool:
    return "://" in path


def shard_kind(path: str) -> str:
    """``jsonl`` | ``txt`` | ``parquet``: how records are cut out of the file."""
    name = path.lower()
    for suffix in (".zst", ".gz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "txt"
    return "jsonl"


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
            files = [str(p)]
        else:
            hint = ""
            if path.count("/") == 1 and not path.startswith((".", "/", "~")):
                hint = f"; for a Hugging Face dataset give its files, e.g. hf://datasets/{path}/train/**/*.jsonl.zst"
            raise HealerError(f"{key}: path {path!r} does not exist (give a file, a directory or a glob){hint}")
    if not files:
        raise HealerError(
            f"{key}: {path!r} names no shard files; supported: {', '.join(SUFFIXES)}"
        )
    return files


def _open_binary(path: str):
    if is_remote(path):
        return _fsspec().open(path, "rb").open()
    return open(path, "rb")


def _decompressed_chunks(fh, path: str) -> Iterator[bytes]:
    """Decompressed bytes of a whole file, raising :class:`CorruptShard` on damage or truncation.

    zstandard's stream reader returns a truncated frame silently, so frames are decoded by hand
    and an unfinished last frame is reported.
    """
    lower = path.lower()
    if lower.endswith((".zst", ".gz")):
        if lower.endswith(".zst"):
            import zstandard

            dctx = zstandard.ZstdDecompressor()
            new_decoder, errors, what = dctx.decompressobj, (zstandard.ZstdError,), "zstd"
        else:
            new_decoder, errors, what = (lambda: zlib.decompressobj(wbits=47)), (zlib.error,), "gzip"
        dobj = new_decoder()
        in_frame = False
        data = fh.read(_CHUNK)
        while data:
            try:
                out = dobj.decompress(data)
            except errors as err:
                raise CorruptShard(f"{what}: {err}") from None
            in_frame = True
            if out:
                yield out
            if dobj.eof:  # a frame/member ended; another may follow in the same file
                data = dobj.unused_data
                dobj, in_frame = new_decoder(), False
                if not data:
                    data = fh.read(_CHUNK)
            else:
                data = fh.read(_CHUNK)
        if in_frame and not dobj.eof:
            raise CorruptShard(f"{what} stream ends in the middle of a frame (truncated file)")
    else:
        while True:
            data = fh.read(_CHUNK)
            if not data:
                return
            yield data


def iter_lines(path: str, offset: int = 0) -> Iterator[tuple[bytes, int]]:
    """``(line, offset_after_line)`` for every line of a (compressed) text file, starting at ``offset``.

    ``offset`` counts decompressed bytes. The final line may lack a newline.
    """
    with _open_binary(path) as fh:
        compressed = path.lower().endswith((".zst", ".gz"))
        if offset and not compressed:
            fh.seek(offset)
            chunks = _decompressed_chunks(fh, path)
        else:
            chunks = _decompressed_chunks(fh, path)
            to_skip = offset
            while to_skip > 0:  # decompress and drop what was consumed before the checkpoint
                chunk = next(chunks, None)
                if chunk is None:
                    return
                if len(chunk) > to_skip:
                    chunks = _prepend(chunk[to_skip:], chunks)
                    break
                to_skip -= len(chunk)
        pos = offset
        carry = b""
        for chunk in chunks:
            if carry:
                chunk = carry + chunk
            lines = chunk.split(b"\n")
            carry = lines.pop()
            for line in lines:
                pos += len(line) + 1
                yield line, pos
        if carry:
            pos += len(carry)
            yield carry, pos


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def iter_parquet_rows(path: str, columns: list[str], offset: int = 0) -> Iterator[tuple[dict, int]]:
    """``(row, rows_consumed)`` for the rows of a parquet file from row ``offset`` on, one row group at a time."""
    import pyarrow.parquet as pq

    with _open_binary(path) as fh:
        pf = pq.ParquetFile(fh)
        names = set(pf.schema_arrow.names)
        cols = [c for c in columns if c in names]
        start = 0
        for group in range(pf.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if start + rows <= offset:  # whole group consumed before the checkpoint: not even read
                start += rows
                continue
            table = pf.read_row_group(group, columns=cols)
            records = table.to_pylist()
            for i in range(max(0, offset - start), rows):
                yield records[i], start + i + 1
            start += rows

"""The one text reader: records of ``.txt``, ``.jsonl``, ``.json`` and ``.parquet`` files, with one bad-record policy.

The corpus stream, calibration, perplexity evaluation and self-distillation all read text through here,
so a file means the same thing to each of them. What a file holds is decided by its name; a trailing
``.zst`` or ``.gz`` is decompressed on the fly (``.jsonl.zst``, ``.txt.gz``, ...):

- ``.jsonl``: one JSON object per line; the text is its (dotted) ``text_field``. Blank lines are ignored.
- ``.json``: one JSON document, a list of such objects (or ``{"data": [...]}``, or one object); parsed
  whole, so keep big corpora in ``.jsonl``. A ``.json`` file that holds one object per line is read as
  JSON lines (told apart by its first line, without reading the file whole).
- ``.parquet``: one row per record, the text in column ``text_field``; read one row group at a time.
- ``.txt`` (also ``.text`` and WikiText's ``.tokens``/``.raw``): **one line is one document**, as the
  ``text`` loader of Hugging Face ``datasets`` reads it; blank lines are ignored. Lines, unlike
  paragraphs or whole files, stream and resume at a byte offset the way JSON lines do, and the same
  file gives the same documents here as on the Hub (a perplexity over them joins them with a blank
  line, as the Hugging Face perplexity guide's ``"\\n\\n".join(dataset["text"])`` does). A document that
  must keep its line breaks belongs in a ``.jsonl`` record.
- ``.ndjson`` is ``.jsonl``. Other names are refused rather than guessed at.

Bad records are handled one way everywhere (:class:`BadRecords`): ``skip`` skips each one and counts it
by kind (``malformed_json``, ``missing_text``, ``empty_text``, ``non_utf8``, ``binary``,
``corrupt_shard``, ``empty_file``) keeping ``file:line`` of the first few; ``strict`` stops at the first
with one line naming the file and line. Positions are decompressed bytes (line files) or records (parquet, ``.json``
lists): a reader remembers one integer to resume at a record without re-reading what came before.
"""

from __future__ import annotations

import codecs
import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from healer.core.errors import HealerError

MAX_EXAMPLES = 10
COMPRESSIONS = (".zst", ".gz")
_CHUNK = 1 << 20
# a record longer than this is tokenized in pieces; ~25k tokens, a few MB of tokenizer working memory
PIECE_CHARS = 100_000

Report = Callable[[str, str, str], None]  # (kind, where, detail)


class CorruptShard(Exception):
    """The compressed stream is damaged or ends early; the reader skips the rest of the file."""


@dataclass
class BadRecords:
    """The bad-record policy and what it met: counts by kind, ``file:line`` of the first few.

    ``strict`` raises :class:`HealerError` at the first bad record instead of counting it.
    ``setting`` names the recipe key that switches the policy, for the error message (None: no key).
    """

    strict: bool = False
    setting: str | None = "data.bad_records"
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, kind: str, where: str, detail: str = "") -> None:
        msg = f"{where}: {kind}{' (' + detail + ')' if detail else ''}"
        if self.strict:
            hint = f" or set {self.setting}: skip to skip and count such records" if self.setting else ""
            raise HealerError(f"{msg}; fix the file{hint}")
        self.note(kind, msg)

    def note(self, kind: str, msg: str) -> None:
        """Count something worth a look that is not a bad record (never stops a strict run)."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.examples) < MAX_EXAMPLES and msg not in self.examples:  # a repeated source meets it again
            self.examples.append(msg)

    def summary(self) -> str:
        """One line for a log, e.g. ``skipped 3 bad record(s): malformed_json 2, non_utf8 1, first at line 2 of
        a.jsonl (malformed_json (...))``."""
        if not self.counts:
            return "no bad records"
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.counts.items()))
        first = ""
        if self.examples:
            where, _, what = self.examples[0].partition(": ")
            path, _, line = where.rpartition(":")
            first = f", first at line {line} of {path} ({what})" if line.isdigit() else f", first in {where} ({what})"
        return f"skipped {sum(self.counts.values())} bad record(s): {kinds}{first}"

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": list(self.examples)}

    def load_state_dict(self, sd: dict) -> None:
        self.counts = dict(sd["counts"])
        self.examples = list(sd["examples"])


# --------------------------------------------------------------------------- what a file is

# what each file name ending means; WikiText's own .tokens/.raw files are plain text
KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
         ".txt": "txt", ".text": "txt", ".tokens": "txt", ".raw": "txt"}
SUFFIXES = tuple(s + z for s in KINDS if s != ".parquet" for z in ("", *COMPRESSIONS)) + (".parquet",)
SUPPORTED = ".jsonl, .json, .parquet or .txt (one document per line; also .ndjson, .text, .tokens, .raw), " \
            "optionally compressed as .zst or .gz"


def file_kind(path: str) -> str | None:
    """``jsonl`` | ``json`` | ``txt`` | ``parquet``: how records are cut out of ``path``; None for other names."""
    name = path.lower().rsplit("/", 1)[-1]
    compressed = name.endswith(COMPRESSIONS)
    if compressed:
        name = name.rsplit(".", 1)[0]
    kind = KINDS.get("." + name.rsplit(".", 1)[-1]) if "." in name else None
    return None if compressed and kind == "parquet" else kind  # parquet compresses inside


def open_binary(path: str):
    """A binary file object for a local path or an fsspec URL (``s3://``, ``hf://``, ``memory://``)."""
    if "://" in path:
        try:
            import fsspec
        except ImportError:  # pragma: no cover - depends on the installation
            raise HealerError(f"{path}: remote paths need fsspec (and huggingface_hub for hf://): "
                              "pip install fsspec") from None
        return fsspec.open(path, "rb").open()
    return open(path, "rb")


# --------------------------------------------------------------------------- raw bytes, lines, rows

def decompressed_chunks(fh, path: str) -> Iterator[bytes]:
    """Decompressed bytes of a whole file, raising :class:`CorruptShard` on damage or truncation.

    zstandard's stream reader returns a truncated frame silently, so frames are decoded by hand
    and an unfinished last frame is reported.
    """
    lower = path.lower()
    if not lower.endswith(COMPRESSIONS):
        while data := fh.read(_CHUNK):
            yield data
        return
    if lower.endswith(".zst"):
        import zstandard

        new_decoder, errors, what = zstandard.ZstdDecompressor().decompressobj, (zstandard.ZstdError,), "zstd"
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


def iter_lines(path: str, offset: int = 0) -> Iterator[tuple[bytes, int]]:
    """``(line, offset_after_line)`` for every line of a (compressed) file, from decompressed byte ``offset``.

    A plain file seeks; a compressed one decompresses up to ``offset`` and drops those bytes (fast, no
    parsing). The final line may lack a newline.
    """
    with open_binary(path) as fh:
        compressed = path.lower().endswith(COMPRESSIONS)
        if offset and not compressed:
            fh.seek(offset)
        chunks = decompressed_chunks(fh, path)
        if compressed:
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


def iter_parquet_rows(path: str, columns: list[str] | None, offset: int = 0) -> Iterator[tuple[dict, int]]:
    """``(row, rows_consumed)`` for the rows of a parquet file from row ``offset`` on, one row group at a time."""
    import pyarrow.parquet as pq

    with open_binary(path) as fh:
        pf = pq.ParquetFile(fh)
        names = set(pf.schema_arrow.names)
        cols = None if columns is None else [c for c in columns if c in names]
        start = 0
        for group in range(pf.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if start + rows <= offset:  # whole group consumed before the checkpoint: not even read
                start += rows
                continue
            records = pf.read_row_group(group, columns=cols).to_pylist()
            for i in range(max(0, offset - start), rows):
                yield records[i], start + i + 1
            start += rows


def _json_items(path: str, offset: int) -> Iterator[tuple[Any, int]] | None:
    """The items of a ``.json`` file that is one JSON list (or ``{"data": [...]}``); None when it is JSON lines.

    Only a file that is one document is read whole; JSON lines are told apart by their first line.
    """
    lines = iter_lines(path)
    first = next(lines, (b"", 0))[0].lstrip(b" \t\r" + codecs.BOM_UTF8)
    if not first.startswith(b"["):
        try:
            head = json.loads(first)
        except ValueError:
            head = None  # not a complete line: a pretty-printed document (or broken, reported below)
        alone = next(lines, None) is None
        if first[:1] != b"{" or (head is not None and not (alone and isinstance(head.get("data"), list))):
            return None
    with open_binary(path) as fh:
        raw = b"".join(decompressed_chunks(fh, path))
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as err:
        raise CorruptShard(f"not UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise CorruptShard(f"not valid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if isinstance(data, dict):  # {"data": [...]} as some exports write it, or one record
        data = data["data"] if isinstance(data.get("data"), list) else [data]
    if not isinstance(data, list):
        raise CorruptShard(f"a .json file holds a list of records, not a {type(data).__name__}")
    return ((item, i + 1) for i, item in enumerate(data) if i >= offset)


def open_records(path: str, offset: int = 0, columns: list[str] | None = None) -> tuple[str, Iterator]:
    """``(kind, items)``: the raw records of ``path`` from position ``offset`` as ``(raw, position_after)``.

    ``kind`` says what a raw record is: ``txt`` / ``jsonl`` (a line of bytes) or ``rows`` (an object
    already parsed: a parquet row or an item of a ``.json`` list). ``columns`` limits parquet reads.
    """
    kind = file_kind(path)
    if kind is None:  # guessing would train on JSON syntax as text, or skip a whole text file as bad JSON
        raise HealerError(f"{path}: unknown file type; name it {SUPPORTED}")
    if kind == "parquet":
        return "rows", iter_parquet_rows(path, columns, offset)
    if kind == "json":
        items = _json_items(path, offset)
        if items is not None:
            return "rows", items
        kind = "jsonl"
    return kind, iter_lines(path, offset)


# --------------------------------------------------------------------------- records and their text

def decode_record(raw, kind: str, where: str, report: Report) -> dict | None:
    """A raw record as a dict (a ``.txt`` line becomes ``{"text": line}``), or None when it is blank or bad.

    Bad ones go to ``report(kind, where, detail)``; ``where`` is ``file:line`` for the message.
    """
    if kind == "rows":
        if isinstance(raw, dict):
            return raw
        report("malformed_json", where, f"a record is a JSON object, got {type(raw).__name__}")
        return None
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    if kind == "txt":
        if b"\x00" in raw:  # UTF-8 text has no NUL; a line with one is from a binary file
            report("binary", where, "a NUL byte: is this a text file?")
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            report("non_utf8", where, f"{err.reason} at byte {err.start}")
            return None
        return {"text": text.rstrip("\r")} if text.strip() else None
    if not raw.strip():  # blank line between records
        return None
    try:
        record = json.loads(raw)
    except UnicodeDecodeError as err:
        report("non_utf8", where, f"{err.reason} at byte {err.start}")
        return None
    except ValueError as err:
        report("malformed_json", where, str(err).split(":")[0])
        return None
    if not isinstance(record, dict):
        report("malformed_json", where, f"a record is a JSON object, got {type(record).__name__}")
        return None
    return record


def dotted(record, path: str):
    """``record["meta"]["redpajama_set_name"]`` for ``path="meta.redpajama_set_name"``; None when absent."""
    node = record
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def record_text(record: dict, text_field: str, where: str, report: Report) -> str | None:
    """The record's non-blank text at ``text_field``, or None (reported as missing or empty)."""
    text = dotted(record, text_field)
    if not isinstance(text, str):
        report("missing_text", where, f"no string field {text_field!r}")
        return None
    if not text.strip():
        report("empty_text", where, "")
        return None
    return text


def iter_file_records(path: str, bad: BadRecords) -> Iterator[tuple[dict, str]]:
    """``(record, "file:line")`` for every good record of one file; bad ones go to ``bad``."""
    report = bad.add
    n = 0
    failed = True
    try:
        kind, items = open_records(path)
        for raw, _pos in items:
            n += 1
            record = decode_record(raw, kind, f"{path}:{n}", report)
            if record is not None:
                yield record, f"{path}:{n}"
        failed = False
    except CorruptShard as err:
        report("corrupt_shard", f"{path}:{n + 1}" if n else path, str(err))
    except OSError as err:
        raise HealerError(f"{path}: cannot read it ({err.strerror or err})") from None
    except HealerError:
        raise
    except Exception as err:  # a broken parquet footer, ...
        report("corrupt_shard", f"{path}:{n + 1}" if n else path, f"{type(err).__name__}: {err}")
    if n == 0 and not failed:
        report("empty_file", path, "")


def iter_texts(paths: Iterable[str | Path], bad: BadRecords, text_field: str = "text") -> Iterator[str]:
    """The non-blank texts of ``paths`` in order; bad records go to ``bad``."""
    for path in paths:
        for record, where in iter_file_records(str(path), bad):
            text = record_text(record, text_field, where, bad.add)
            if text is not None:
                yield text


def read_texts(paths: Iterable[str | Path], bad: BadRecords, *, text_field: str = "text",
               max_docs: int | None = None, max_chars: int | None = None, what: str = "text file") -> list[str]:
    """The texts of ``paths``, stopping after ``max_docs`` documents or once ``max_chars`` are in hand.

    Raises one line naming the files (and what was skipped) when no usable text is found; ``what``
    names the setting they came from (``prune.calibration.path``, ...).
    """
    paths = [str(p) for p in paths]
    for p in paths:
        if "://" not in p and not Path(p).is_file():
            raise HealerError(f"{what}: {p} does not exist")
    texts: list[str] = []
    chars = 0
    for text in iter_texts(paths, bad, text_field):
        texts.append(text)
        chars += len(text)
        if (max_docs is not None and len(texts) >= max_docs) or (max_chars is not None and chars >= max_chars):
            break
    if not texts:
        names = paths[0] if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, ...)"
        skipped = f"; {bad.summary()}" if bad.counts else ""
        raise HealerError(f"{what}: {names} has no usable text (a non-empty {text_field!r} in JSON and parquet "
                          f"records, a non-blank line in .txt){skipped}")
    return texts


# --------------------------------------------------------------------------- long texts in pieces

# a non-space character followed by a space: where a cut keeps the tokens (see split_text)
_SEAM = re.compile(r"\S ")


def split_points(text: str, max_chars: int = PIECE_CHARS) -> list[int]:
    """Offsets ``[0, c1, ..., len(text)]`` that cut ``text`` into pieces of at most ``max_chars`` characters.

    Each cut falls just before a space that follows a non-space character, in the second half of the
    window. That is a word boundary for the pre-tokenizers of byte-level BPE tokenizers (GPT-2, Llama-3,
    Qwen, SmolLM2: the space goes with the next word), so tokenizing the pieces one by one gives the same
    ids as tokenizing the whole text. Cuts are never made before a newline (Llama-3's pre-tokenizer keeps
    punctuation and the newlines after it together). Tokenizers that mark the start of every input
    (SentencePiece's ``▁`` prefix) may differ in the first token of a piece: one token per ``max_chars``
    characters. Text with no such space in the window (CJK, base64) is cut at ``max_chars`` exactly.
    """
    cuts = [0]
    start = 0
    half = max_chars // 2
    while len(text) - start > max_chars:
        end = start + max_chars
        seams = [m.start() for m in _SEAM.finditer(text, start + half, end + 1)]
        start = seams[-1] + 1 if seams else end
        cuts.append(start)
    cuts.append(len(text))
    return cuts


def split_text(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """``text`` in pieces of at most ``max_chars`` characters, cut where tokens do not change (:func:`split_points`)."""
    cuts = split_points(text, max_chars)
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def encode_in_pieces(encode: Callable[[list[str]], list[list[int]]], text: str,
                     max_chars: int = PIECE_CHARS) -> Iterator[list[int]]:
    """Token ids of ``text``, one piece (see :func:`split_text`) at a time, through ``encode(list_of_texts)``."""
    for piece in split_text(text, max_chars):
        yield encode([piece])[0]


def tokenizer_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """``encode(texts) -> ids`` with no special tokens and no truncation, the fast Rust path when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is not None or backend.padding is not None:
            import copy

            backend = copy.deepcopy(backend)  # a tokenizer.json may enable truncation; documents must stay whole
            backend.no_truncation()
            backend.no_padding()
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]
    return lambda texts: [list(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]

"""The teacher-logit cache: a teacher's top-k logits per block of the token stream, looked up by content.

KD-CPT with ``cpt.kd.cache: DIR`` reads the teacher's top-k from here instead of running the teacher
(``healer distill-cache`` writes it, :mod:`healer.train.distill_cache`). A block is found by a hash of its
token ids (and position ids, when the stream sends them), not by its place in the stream: the cache does not
care which rank, worker, resume point or run (sweep point, round) reads a block, only that it was built.

Layout of ``DIR``::

    cache.json                 the key (teacher, tokenizer, data, seq_len, k, streams), dtype and coverage;
                               written last, atomically: without it the directory is not a cache
    shard-00000.zst            one zstd frame per block: values [seq_len-1, k] then indices [seq_len-1, k] int32
    shard-00000.index.npy      per block: hash (16 bytes), offset and length of its frame in the shard

A shard's index is written (atomically) after its shard file, so a killed build leaves whole shards, which the
next build keeps, and no ``cache.json`` claiming more than they hold.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from healer.core.errors import HealerError
from healer.train.kd import TopK

FORMAT = 1
KEY_FILE = "cache.json"
INDEX_DTYPE = np.dtype([("hash", "S16"), ("offset", "<u8"), ("length", "<u4")])
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what a cache is keyed by, in the order a refusal names them
KEY_FIELDS = ("teacher", "tokenizer", "data", "seq_len", "k", "streams")


def block_hash(input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> bytes:
    """16-byte content hash of one block (``[seq_len]`` token ids, plus its position ids when the stream
    resets them at document starts: the teacher's logits depend on both)."""
    digest = hashlib.blake2b(input_ids.to(torch.int64).contiguous().numpy().tobytes(), digest_size=16)
    if position_ids is not None:
        digest.update(b"pos")
        digest.update(position_ids.to(torch.int64).contiguous().numpy().tobytes())
    return digest.digest()


def batch_hashes(batch: dict[str, torch.Tensor]) -> list[bytes]:
    """:func:`block_hash` of every row of a stream batch (``input_ids`` ``[B, seq_len]``, on the CPU)."""
    ids, pos = batch["input_ids"].cpu(), batch.get("position_ids")
    return [block_hash(ids[i], None if pos is None else pos[i].cpu()) for i in range(ids.shape[0])]


def encode_block(top: TopK, dtype: str) -> bytes:
    """One block's ``[seq_len-1, k]`` values (in ``dtype``) and indices (int32), as raw bytes."""
    values = top.values.to(DTYPES[dtype]).contiguous().cpu()
    indices = top.indices.to(torch.int32).contiguous().cpu()
    return values.view(torch.uint8).numpy().tobytes() + indices.view(torch.uint8).numpy().tobytes()


def decode_block(raw: bytes, positions: int, k: int, dtype: str) -> TopK:
    """Inverse of :func:`encode_block`: fp32 values and int64 indices, ``[positions, k]`` each."""
    torch_dtype = DTYPES[dtype]
    n_val = positions * k * torch_dtype.itemsize
    if len(raw) != n_val + positions * k * 4:
        raise ValueError(f"block holds {len(raw)} bytes, expected {n_val + positions * k * 4}")
    buf = bytearray(raw)  # writable: torch.frombuffer warns on read-only memory
    values = torch.frombuffer(buf, dtype=torch_dtype, count=positions * k).view(positions, k).float()
    indices = torch.frombuffer(buf, dtype=torch.int32, count=positions * k, offset=n_val).view(positions, k).long()
    return TopK(values, indices)


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def weights_signature(path: Path) -> str:
    """Size and sha256 of a whole weight file (:func:`healer.core.hashing.file_digest`: read once per version of
    the file, then cached), so editing any tensor of the teacher invalidates a cache built from it."""
    from healer.core.hashing import file_digest

    return f"{path.stat().st_size}:{file_digest(path)}"


def teacher_fingerprint(location) -> dict[str, str]:
    """What the teacher is (a :class:`healer.model.modeling.ModelLocation`): its config in full and the digest of
    every weight file (:func:`weights_signature`), so a copied checkpoint matches and a retrained one does not.
    A hub id is taken by name and revision (its files are not here to read)."""
    path = Path(location.path)
    if location.gguf_file:
        parts = [location.gguf_file, weights_signature(path / location.gguf_file)]
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt"))
        parts = [(path / "config.json").read_text() if (path / "config.json").is_file() else ""]
        parts += [f"{f.name} {weights_signature(f)}" for f in files]
    else:
        parts = [location.path, location.revision or "main"]
    return {"label": str(location), "hash": _digest(parts)}


def tokenizer_fingerprint(tokenizer) -> dict[str, str]:
    """The token ids a tokenizer gives (its vocabulary and special tokens), not where it was loaded from."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = [str(tokenizer.bos_token_id), str(tokenizer.eos_token_id)]
    return {"label": f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} ({len(vocab)} tokens)",
            "hash": _digest([json.dumps(vocab), *special])}


def data_fingerprint(data_cfg) -> dict[str, str]:
    """What decides the blocks' contents: the sources (and their files' fingerprints, as the loader records them
    for resume), mixture, seed, packing; not the validation set, the workers or the tokenizer batch size."""
    from healer.train.data.loader import plan_entries
    from healer.train.data.shards import fingerprint

    settings = data_cfg.model_dump(mode="json", exclude={"validation", "num_workers", "tokenizer_batch_size",
                                                         "repeat_cache_mb", "bad_records", "seq_len"})
    for source in settings["sources"]:  # where the corpus lies is not what it holds: its files are hashed below
        source.pop("path")
    entries = plan_entries(data_cfg.sources, "data.sources")
    files = [fingerprint(list(e.files)) for e in entries]
    return {"label": ", ".join(e.name for e in entries), "hash": _digest([json.dumps(settings, sort_keys=True),
                                                                          json.dumps(files, sort_keys=True)])}


def cache_key(*, teacher_location, tokenizer, data_cfg, streams: int, k: int | None) -> dict[str, Any]:
    """The key a cache is built under and checked against (:data:`KEY_FIELDS`).

    streams: ranks x dataloader workers per rank of the cpt run -- the number of packed streams the data is
        split into, which decides which blocks the first N steps read (not which rank reads which).
    """
    return {"teacher": teacher_fingerprint(teacher_location), "tokenizer": tokenizer_fingerprint(tokenizer),
            "data": data_fingerprint(data_cfg), "seq_len": data_cfg.seq_len, "k": k, "streams": streams}


def describe_key(key: dict[str, Any], name: str, other: dict[str, Any]) -> str:
    """``key[name]`` for a refusal: a fingerprint by its label, plus its hash when ``other``'s label is the same."""
    value, theirs = key.get(name), other.get(name)
    if isinstance(value, dict):
        label = str(value.get("label"))
        same_label = isinstance(theirs, dict) and theirs.get("label") == value.get("label")
        return f"{label} (content {value.get('hash')})" if same_label else label
    return repr(value)


def key_mismatch(cached: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """The first key field that differs, said in one phrase (None when the cache serves ``wanted``)."""
    for name in KEY_FIELDS:
        a, b = cached.get(name), wanted.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            same = a.get("hash") == b.get("hash")
        else:
            same = a == b
        if not same:
            return (f"{name}: cache has {describe_key(cached, name, wanted)}, this run has "
                    f"{describe_key(wanted, name, cached)}")
    return None


def read_key_file(directory: Path) -> dict[str, Any]:
    """``DIR/cache.json``; refuses a directory that is not a finished cache."""
    path = directory / KEY_FILE
    if not directory.is_dir():
        what = "is a file, not a cache directory" if directory.exists() else "does not exist"
        raise HealerError(f"cpt.kd.cache: {directory} {what}; build it with `healer distill-cache RECIPE`")
    if not path.is_file():
        partial = any(directory.glob("shard-*.index.npy"))
        why = ("holds shards of an unfinished build (killed?); run `healer distill-cache` again to finish it"
               if partial else "is not a teacher-logit cache (no cache.json); build one with `healer distill-cache`")
        raise HealerError(f"cpt.kd.cache: {directory} {why}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise HealerError(f"cpt.kd.cache: {path} is not readable JSON ({err}); delete {directory} and build it "
                          "again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise HealerError(f"cpt.kd.cache: {path} is format {meta.get('format') if isinstance(meta, dict) else '?'}, "
                          f"this healer reads format {FORMAT}; delete {directory} and build it again")
    types = {"key": dict, "dtype": str, "shards": list, "stream_tokens": int, "vocab": int}
    missing = [f for f, kind in types.items() if not isinstance(meta.get(f), kind)]
    missing += [f for f in KEY_FIELDS if f not in (meta["key"] if isinstance(meta.get("key"), dict) else {})]
    if missing or meta["dtype"] not in DTYPES:
        raise HealerError(f"cpt.kd.cache: {path} lacks a valid {', '.join(missing) or 'dtype'}; it is not a cache "
                          f"healer wrote -- delete {directory} and build it again")
    return meta


def read_index(path: Path) -> np.ndarray:
    """One shard's index (structured, never pickled)."""
    try:
        index = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise HealerError(f"logit cache: {path} is not a readable index ({err}); delete {path.parent} and build it "
                          "again") from None
    if index.dtype != INDEX_DTYPE:
        raise HealerError(f"logit cache: {path} has entries of type {index.dtype}, not a cache index; delete "
                          f"{path.parent} and build it again")
    return index


class LogitCache:
    """A finished cache opened for reading: :meth:`lookup` gives a batch's cached top-k.

    directory: what ``healer distill-cache`` wrote (``cpt.kd.cache``).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.meta = read_key_file(self.directory)
        self.key = self.meta["key"]
        self.k, self.dtype, self.seq_len = int(self.key["k"]), self.meta["dtype"], int(self.key["seq_len"])
        parts, shard_of = [], []
        for n, name in enumerate(self.meta["shards"]):
            index = read_index(self.directory / f"{name}.index.npy")
            parts.append(index)
            shard_of.append(np.full(len(index), n, dtype=np.int32))
        index = np.concatenate(parts) if parts else np.zeros(0, INDEX_DTYPE)
        shards = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
        order = np.argsort(index["hash"], kind="stable")  # sorted: a lookup is a binary search, no dict of millions
        self.index, self.shard_of = index[order], shards[order]
        self._files: dict[int, int] = {}
        self._zstd = None

    @property
    def tokens(self) -> int:
        """Tokens of the stream the cache covers from its start (all ranks together)."""
        return int(self.meta["stream_tokens"])

    def check(self, wanted: dict[str, Any], top_k: int | None, vocab: int) -> None:
        """Refuse, naming what differs, a cache built for another teacher, tokenizer, data, seq_len or k, or for
        a vocabulary other than the student's (``vocab``)."""
        if int(self.meta["vocab"]) != vocab:
            raise HealerError(f"cpt.kd.cache {self.directory}: the teacher's vocabulary is {self.meta['vocab']}, the "
                              f"student's {vocab}; the teacher must share the student's tokenizer")
        if top_k is None:
            raise HealerError(f"cpt.kd.top_k is null (the full vocabulary) but cpt.kd.cache {self.directory} holds "
                              f"the teacher's top {self.k} logits; set cpt.kd.top_k: {self.k}")
        if top_k != self.k:
            raise HealerError(f"cpt.kd.top_k is {top_k} but cpt.kd.cache {self.directory} holds the teacher's top "
                              f"{self.k} logits; set cpt.kd.top_k: {self.k}, or build a top-{top_k} cache into "
                              "another directory")
        differs = key_mismatch(self.key, {**wanted, "k": self.k})
        if differs:
            raise HealerError(f"cpt.kd.cache {self.directory} was built for other inputs -- {differs}; build one for "
                              "this recipe into another directory (`healer distill-cache --output DIR`) or delete it "
                              "first")

    def _find(self, digest: bytes) -> int | None:
        i = int(np.searchsorted(self.index["hash"], np.bytes_(digest)))
        # numpy drops an S16 value's trailing zero bytes when it hands it out: pad before comparing
        return i if i < len(self.index) and self.index["hash"][i].ljust(16, b"\0") == digest else None

    def has(self, digest: bytes) -> bool:
        return self._find(digest) is not None

    def _read(self, i: int) -> bytes:
        n = int(self.shard_of[i])
        fd = self._files.get(n)
        if fd is None:
            fd = self._files[n] = os.open(self.directory / f"{self.meta['shards'][n]}.zst", os.O_RDONLY)
        entry = self.index[i]
        raw = os.pread(fd, int(entry["length"]), int(entry["offset"]))
        if self._zstd is None:
            import zstandard

            self._zstd = zstandard.ZstdDecompressor()
        return self._zstd.decompress(raw)

    def lookup(self, batch: dict[str, torch.Tensor]) -> TopK | list[int]:
        """``TopK`` ``[B, seq_len-1, k]`` of a stream batch, or the rows the cache lacks (a list)."""
        seq = batch["input_ids"].shape[-1]
        if seq != self.seq_len:
            raise HealerError(f"cpt.kd.cache {self.directory}: built for seq_len {self.seq_len}, the batch has {seq}")
        found, missing = [], []
        for row, digest in enumerate(batch_hashes(batch)):
            i = self._find(digest)
            if i is None:
                missing.append(row)
                continue
            try:
                found.append(decode_block(self._read(i), seq - 1, self.k, self.dtype))
            except Exception as err:  # a truncated or altered shard
                raise HealerError(f"cpt.kd.cache {self.directory}: shard {self.meta['shards'][int(self.shard_of[i])]}"
                                  f" is damaged ({err}); delete {self.directory} and build it again") from None
        if missing:
            return missing
        return TopK(torch.stack([t.values for t in found]), torch.stack([t.indices for t in found]))

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


class CachedTeacherBatches:
    """A rank's batches with the teacher's cached top-k attached (``kd_values``, ``kd_indices``), for
    :class:`healer.train.objectives.Distill` with ``cached=True``; the position is the wrapped batches'.

    batches: the stream's batches (the loop's ``Batches``).
    cache: the opened cache.
    first_step, accumulation: the optimizer step the run resumed at and micro-batches per step, so that a
        block the cache lacks is reported at its step.
    """

    def __init__(self, batches, cache: LogitCache, *, first_step: int, accumulation: int, global_batch: int):
        self.batches, self.cache = batches, cache
        self.first_step, self.accumulation, self.global_batch = first_step, accumulation, global_batch
        self.seen = 0

    def next(self) -> dict[str, torch.Tensor] | None:
        batch = self.batches.next()
        if batch is None:
            return None
        step = self.first_step + self.seen // self.accumulation
        self.seen += 1
        top = self.cache.lookup(batch)
        if isinstance(top, list):
            covered = self.cache.tokens
            steps = covered // max(1, self.global_batch * self.cache.seq_len)
            raise HealerError(
                f"cpt.kd.cache {self.cache.directory} has no entry for {len(top)} of this micro-batch's blocks at step "
                f"{step} (the cache covers {covered:,} tokens = {steps:,} steps of {self.global_batch} x "
                f"{self.cache.seq_len}); build it further with `healer distill-cache "
                "--tokens N` (N at least max_steps x global batch x seq_len)")
        return {**batch, "kd_values": top.values, "kd_indices": top.indices}

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)

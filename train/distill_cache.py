"""``healer distill-cache RECIPE``: run the KD teacher once over the cpt stage's token stream, keep its top-k.

It reads the stream exactly as ``healer cpt`` will (same ``data:``, seed and split into ``--ranks`` x
``data.num_workers`` streams), runs the teacher (``cpt.kd.teacher``, default ``model.source``) on each block
it has not cached yet, and writes the top ``k`` logits per position into ``cpt.kd.cache`` (or ``--output``),
in the format :mod:`healer.train.logit_cache` describes. Running it again resumes a killed build (whole shards
are kept) or extends a finished cache to more ``--tokens``; a cache built for other inputs is refused.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from healer.core.errors import HealerError
from healer.train.logit_cache import (
    DTYPES,
    FORMAT,
    INDEX_DTYPE,
    KEY_FILE,
    batch_hashes,
    cache_key,
    encode_block,
    key_mismatch,
    read_index,
)

BUILD_FILE = "building.json"  # the key of a build under way, so a resumed build knows what its shards hold
SHARD_BLOCKS = 256  # blocks per shard: a killed build loses at most this many teacher forwards


@dataclass
class Options:
    """``healer distill-cache`` flags."""

    output: str | None = field(default=None, metadata={
        "help": "cache directory; defaults to cpt.kd.cache"})
    tokens: int | None = field(default=None, metadata={
        "help": "tokens to cover; defaults to cpt.max_steps x cpt.global_batch_size x data.seq_len"})
    ranks: int | None = field(default=None, metadata={
        "help": "ranks the cpt stage will run on: the stream is split into ranks x data.num_workers parts; "
                "defaults to launch.nodes x launch.nproc_per_node"})
    k: int | None = field(default=None, metadata={
        "help": "logits kept per position; defaults to cpt.kd.top_k (the cpt stage must use the same)"})
    values_dtype: str = field(default="float32", metadata={
        "help": "dtype of the stored logit values (bfloat16/float16 halve the values' size)",
        "choices": tuple(DTYPES)})


def planned_ranks(launch) -> int:
    """The ranks ``launch:`` starts the cpt stage on; a hostfile without ``nproc_per_node`` is refused (its
    slots decide, and a cache built for another count would not match the cpt stream)."""
    if launch.nproc_per_node is None and launch.backend == "hostfile":
        raise HealerError("distill-cache: launch.nproc_per_node is unset, so the hostfile's slots decide the ranks; "
                          "pass --ranks (nodes x slots) so the cache matches the cpt stage's stream")
    return launch.nodes * (launch.nproc_per_node or 1)


def stage_tokens(cfg, data) -> int:
    """The stream tokens a cpt stage reads: what a cache for it must cover."""
    return cfg.max_steps * cfg.global_batch_size * data.seq_len


def run_distill_cache(recipe, opts: Options) -> int:
    """The verb: build (or finish, or extend) the cache. Returns the exit code."""
    from healer.core.lock import DirectoryLock
    from healer.model.modeling import check_seq_len, load_config, load_tokenizer, resolve_source
    from healer.train.config import CPTConfig

    cfg = recipe.cpt or CPTConfig(seed=recipe.seed)
    if cfg.kd is None:
        raise HealerError("cpt.kd is null: the cpt stage distils from nobody, so there is no teacher to cache")
    if cfg.kd.hidden_weight > 0:
        raise HealerError(f"cpt.kd.hidden_weight is {cfg.kd.hidden_weight}: hidden-state KD needs the live teacher, "
                          "a logit cache cannot serve it; set it to 0 to use a cache")
    if recipe.data is None or not recipe.data.sources:
        raise HealerError("distill-cache reads the cpt stream: give a `data:` section with at least one source")
    out = opts.output or cfg.kd.cache
    if not out:
        raise HealerError("where to? set cpt.kd.cache: DIR in the recipe (the cpt stage reads it there) or --output")
    k = opts.k if opts.k is not None else cfg.kd.top_k
    if k is None or k < 1:
        raise HealerError(f"cpt.kd.top_k is {k}: a cache keeps the teacher's top-k logits; set cpt.kd.top_k (e.g. 64)"
                          " or pass --k")
    if opts.ranks is None:
        opts.ranks = planned_ranks(recipe.launch)
    if opts.ranks < 1:
        raise HealerError(f"--ranks {opts.ranks}: must be >= 1")
    per_step = opts.ranks * cfg.micro_batch_size
    if cfg.global_batch_size % per_step:
        raise HealerError(f"cpt.global_batch_size {cfg.global_batch_size} is not a multiple of --ranks {opts.ranks} x "
                          f"cpt.micro_batch_size {cfg.micro_batch_size}")
    seq_len = recipe.data.seq_len
    tokens = opts.tokens if opts.tokens is not None else stage_tokens(cfg, recipe.data)
    if tokens < 1:
        raise HealerError(f"--tokens {tokens}: must be >= 1")
    teacher_source = cfg.kd.teacher or recipe.model.source
    same = teacher_source == recipe.model.source
    location = resolve_source(teacher_source, recipe.model.gguf_file if same else None,
                              recipe.model.revision if same else None,
                              key="model.source" if same else "cpt.kd.teacher")
    config = load_config(location)
    check_seq_len(seq_len, config, "data.seq_len")
    if k > config.vocab_size:
        raise HealerError(f"k (--k or cpt.kd.top_k) {k} exceeds the teacher's vocabulary of {config.vocab_size}")
    tokenizer = load_tokenizer(location)  # KD needs the student to share it; the cpt stage checks its own
    streams = opts.ranks * max(1, recipe.data.num_workers)
    key = cache_key(teacher_location=location, tokenizer=tokenizer, data_cfg=recipe.data, streams=streams, k=k)
    steps = math.ceil(tokens / (cfg.global_batch_size * seq_len))
    micro_per_rank = steps * cfg.global_batch_size // per_step
    blocks_per_stream = math.ceil(micro_per_rank / max(1, recipe.data.num_workers)) * cfg.micro_batch_size
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HealerError(f"{out} is a file; the cache is a directory (cpt.kd.cache / --output)")
    out.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(out, "healer distill-cache"):
        build(out, key, location=location, tokenizer=tokenizer, data_cfg=recipe.data, streams=streams,
              blocks_per_stream=blocks_per_stream, micro_batch_size=cfg.micro_batch_size, dtype=opts.values_dtype,
              precision=cfg.precision, attn=cfg.attn_implementation, vocab=config.vocab_size,
              coverage={"steps": steps, "global_batch_size": cfg.global_batch_size, "ranks": opts.ranks})
    return 0


def ensure_cache(recipe) -> None:
    """What ``healer run`` does before a cpt stage with ``cpt.kd.cache``: build the cache when the directory
    holds none (or only a killed build), extend it when it covers fewer stream tokens than the stage reads, and
    otherwise leave it alone. A cache for other inputs is refused naming what differs (here when it is short,
    by the cpt stage when it is not)."""
    cfg, data = recipe.cpt, recipe.data
    if cfg is None or cfg.kd is None or cfg.kd.cache is None or data is None:
        return
    need = stage_tokens(cfg, data)
    meta = _json_object(Path(cfg.kd.cache) / KEY_FILE)
    covered = meta.get("stream_tokens") if meta is not None else None
    if isinstance(covered, int) and covered >= need:
        return
    launch = recipe.launch
    if launch.backend != "local" or launch.nodes > 1:  # the teacher pass would run here, on the submitting host
        state = "covers fewer tokens than the stage reads" if meta else "holds no cache"
        raise HealerError(f"cpt.kd.cache {cfg.kd.cache} {state}, and this run launches on {launch.backend} "
                          f"({launch.nodes} node(s)): build it first on a node of that cluster, `healer distill-cache "
                          "RECIPE --ranks N` (N: the cpt stage's ranks), then run again; healer run builds it itself "
                          "only for a one-node local launch")
    print(f"[cpt] {'extending' if meta else 'building'} the teacher-logit cache {cfg.kd.cache} (cpt.kd.cache) to "
          f"the {need:,} tokens the stage reads", flush=True)
    run_distill_cache(recipe, Options())


def _json_object(path: Path) -> dict | None:
    """The JSON object at ``path``; None when it is missing, not JSON (even binary) or not an object."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _previous(out: Path, key: dict) -> tuple[list[str], set[bytes], int, int]:
    """Shards a killed or finished build left (those with an index), their blocks' hashes, the next shard number
    and the stream tokens a finished cache covered; refuses a directory holding a cache for other inputs, or
    anything else."""
    for stale in out.glob("*.tmp*"):  # the shard a killed build was writing
        stale.unlink()
    meta = _json_object(out / KEY_FILE) or _json_object(out / BUILD_FILE)
    names = sorted(p.name[: -len(".index.npy")] for p in out.glob("shard-*.index.npy"))
    if meta is None:
        others = [p.name for p in out.iterdir() if p.name not in (".healer.core.lock",) and not p.name.startswith(".")]
        if others:
            raise HealerError(f"{out} is not empty and is not a logit cache ({', '.join(others[:3])} "
                              "...); choose an empty or new directory")
        return [], set(), 0, 0
    recorded = meta.get("key")
    differs = ("format" if meta.get("format") != FORMAT else "key" if not isinstance(recorded, dict)
               else key_mismatch(recorded, key))
    if differs:
        raise HealerError(f"{out} holds a cache built for other inputs -- {differs}; choose another "
                          "directory (or delete it to rebuild)")
    seen: set[bytes] = set()
    for name in names:
        seen.update(bytes(h).ljust(16, b"\0") for h in read_index(out / f"{name}.index.npy")["hash"])
    following = max((int(n.split("-")[1]) for n in names), default=-1) + 1
    covered = meta.get("stream_tokens")
    return names, seen, following, covered if isinstance(covered, int) else 0


class _ShardWriter:
    """Appends blocks (one zstd frame each) to ``shard-NNNNN.zst``; :meth:`close` makes it count: the shard is
    renamed into place first, then its index, so an index never names bytes that are not there."""

    def __init__(self, out: Path, number: int, dtype: str):
        import zstandard

        self.out, self.name, self.dtype = out, f"shard-{number:05d}", dtype
        self.tmp = out / f"{self.name}.zst.tmp{os.getpid()}"
        self.fh = open(self.tmp, "wb")
        self.zstd = zstandard.ZstdCompressor(level=3)
        self.rows: list[tuple[bytes, int, int]] = []

    def add(self, digest: bytes, top) -> None:
        frame = self.zstd.compress(encode_block(top, self.dtype))
        self.rows.append((digest, self.fh.tell(), len(frame)))
        self.fh.write(frame)

    def close(self) -> str:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.out / f"{self.name}.zst")
        index = np.array(self.rows, dtype=INDEX_DTYPE)
        tmp = self.out / f"{self.name}.index.tmp{os.getpid()}.npy"
        np.save(tmp, index, allow_pickle=False)
        os.replace(tmp, self.out / f"{self.name}.index.npy")
        return self.name


def _teacher(location, precision: str, attn: str):
    from healer.model.modeling import load_model
    from healer.train.cpt import attn_implementation
    from healer.train.engine import resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(precision, device)
    model = load_model(location, torch.float32, attn_implementation=attn_implementation(attn, device, precision))
    # the precision the cpt stage's live teacher would run in (init_frozen_engine casts the same way)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return model.requires_grad_(False).to(device=device, dtype=dtype).eval(), device, precision


@torch.no_grad()
def teacher_topk_rows(teacher, batch: dict[str, torch.Tensor], k: int, chunk_size: int):
    """The teacher's :class:`TopK` ``[B, seq_len-1, k]`` for a stream batch, computed as the live KD loss does:
    final hidden states of one forward, the head applied to chunks of positions, fp32 ``topk``."""
    from healer.train.kd import TopK, teacher_top_k
    from healer.train.objectives import _forward_hidden, output_head

    hidden = _forward_hidden(teacher, batch)[-1][:, :-1]
    b, s, h = hidden.shape
    flat = hidden.reshape(-1, h)
    head = output_head(teacher)
    parts = [teacher_top_k(head(flat[i:i + chunk_size]), k) for i in range(0, flat.shape[0], chunk_size)]
    return TopK(torch.cat([p.values for p in parts]).view(b, s, k), torch.cat([p.indices for p in parts]).view(b, s, k))


def build(out: Path, key: dict, *, location, tokenizer, data_cfg, streams: int, blocks_per_stream: int,
          micro_batch_size: int, dtype: str, precision: str, attn: str, coverage: dict, vocab: int) -> dict:
    """Write the cache into ``out`` (locked by the caller) and return what ``cache.json`` records.

    streams / blocks_per_stream: read that many blocks from each of the ``streams`` packed streams, in turn.
    micro_batch_size: rows per teacher forward (the stream's micro-batch).
    coverage: what the blocks amount to for the cpt stage (steps, global batch, ranks), recorded as is.
    vocab: the teacher's vocabulary size (the student's must match, as live KD checks).
    """
    from tqdm.auto import tqdm

    from healer.core.manifest import write_json_atomic
    from healer.train.data import build_loader
    from healer.train.kd import DEFAULT_CHUNK_SIZE, TopK

    shards, seen, number, covered = _previous(out, key)
    write_json_atomic(out / BUILD_FILE, {"format": FORMAT, "key": key})
    teacher = None
    loaders = [iter(build_loader(data_cfg.model_copy(update={"num_workers": 0}), tokenizer, rank=s,
                                 world_size=streams, micro_batch_size=micro_batch_size)) for s in range(streams)]
    k = key["k"]
    writer: _ShardWriter | None = None
    left = [blocks_per_stream] * streams
    bar = tqdm(total=blocks_per_stream * streams, desc="distill-cache", unit="block")
    reused = read = 0
    try:
        while any(left):
            for s in range(streams):
                if not left[s]:
                    continue
                batch = next(loaders[s], None)
                if batch is None:  # a stream that ran out (on_exhausted: stop/drain) ends the cpt run there too
                    left[s] = 0
                    continue
                rows = batch["input_ids"].shape[0]
                left[s] = max(0, left[s] - rows)
                read += rows
                digests = batch_hashes(batch)
                new = [i for i, d in enumerate(digests) if d not in seen]
                reused += rows - len(new)
                bar.update(rows)
                if not new:
                    continue
                if teacher is None:
                    teacher, device, precision = _teacher(location, precision, attn)
                    bar.set_postfix_str(f"teacher on {device} ({precision})")
                sub = {n: v[new].to(device) for n, v in batch.items()}
                top = teacher_topk_rows(teacher, sub, k, DEFAULT_CHUNK_SIZE)
                for j, i in enumerate(new):
                    if digests[i] in seen:  # the same block twice in one batch
                        continue
                    writer = writer or _ShardWriter(out, number, dtype)
                    writer.add(digests[i], TopK(top.values[j], top.indices[j]))
                    seen.add(digests[i])
                    if len(writer.rows) >= SHARD_BLOCKS:
                        shards.append(writer.close())
                        writer, number = None, number + 1
        if writer is not None:
            shards.append(writer.close())
            writer = None
    finally:
        bar.close()
        if writer is not None:  # interrupted: drop the half-written shard, keep the whole ones
            writer.fh.close()
            writer.tmp.unlink(missing_ok=True)
    meta = {"format": FORMAT, "key": key, "dtype": dtype, "blocks": len(seen), "shards": sorted(shards),
            "tokens": len(seen) * key["seq_len"], "coverage": coverage, "teacher_precision": precision,
            "vocab": vocab,
            # the stream's first tokens every block of which is here (repeated blocks are stored once)
            "stream_tokens": max(covered, read * key["seq_len"])}
    write_json_atomic(out / KEY_FILE, meta)  # last: from here on the directory is a cache
    (out / BUILD_FILE).unlink(missing_ok=True)
    print(f"healer distill-cache: the stream's first {meta['stream_tokens']:,} tokens: {len(seen):,} distinct blocks, "
          f"top {k} logits as {dtype} ({reused:,} block reads already cached) in {len(shards)} shard(s) -> {out}",
          flush=True)
    return meta

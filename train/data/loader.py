"""``build_loader``: the packed token batches of one rank, from dataloader workers, resumable exactly.

Each rank runs ``max(1, num_workers)`` streams; global stream ``rank * W + w`` reads a disjoint part of
every source (see :mod:`healer.train.data.reader`). Batches come from the streams in turn, 0, 1, ...,
W-1, 0, ... (torch's DataLoader hands out an iterable dataset's items in exactly that order), and each
batch travels with its stream's state after it. The loader keeps the state of the last batch it handed
out from each stream: that, plus whose turn is next, is the checkpoint. On resume the DataLoader's
physical worker ``j`` plays stream ``(j + next) % W``, so the turn order carries on where it stopped.
A checkpoint written by another number of ranks or workers is re-dealt (:mod:`healer.train.data.reshard`).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from healer.core.errors import HealerError
from healer.core.textio import MAX_EXAMPLES, BadRecords
from healer.train.data.config import DataConfig, SourceConfig
from healer.train.data.shards import fingerprint, resolve_files
from healer.train.data.stream import Entry, PackedStream, StreamSettings

# 2: sources are recorded by a hash of their shards' names and contents, not by their file count
STATE_FORMAT = 2


def _source_name(source: SourceConfig, index: int) -> str:
    if source.name:
        return source.name
    parts = [p for p in Path(source.path.split("://")[-1]).parts if not any(ch in p for ch in "*?[")]
    stem = parts[-1] if parts else f"source{index}"
    for suffix in (".zst", ".gz", ".jsonl", ".json", ".parquet", ".txt"):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    return stem or f"source{index}"


def plan_entries(sources: list[SourceConfig], key: str = "data.sources") -> list[Entry]:
    """The mixture: one entry per source, or per domain of a source split by ``domains``; weights sum to 1."""
    if not sources:
        raise HealerError(f"{key} is empty: give at least one corpus (a file, directory or glob)")
    entries: list[Entry] = []
    for k, src in enumerate(sources):
        files = tuple(resolve_files(src.path, f"{key}[{k}].path"))
        name = _source_name(src, k)
        if src.domains:
            if not src.domain_field:
                raise HealerError(f"{key}[{k}]: `domains` needs a `domain_field` naming each record's domain")
            total = sum(src.domains.values())  # > 0: the recipe refuses negative weights and an all-zero split
            kept = [(domain, w) for domain, w in src.domains.items() if w > 0]
            for j, (domain, w) in enumerate(kept):
                label = f"{src.name}/{domain}" if src.name else domain
                entries.append(Entry(label, files, src.weight * w / total, src.text_field, src.domain_field,
                                     domain, count_skips=(j == 0)))
        else:
            entries.append(Entry(name, files, src.weight, src.text_field))
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise HealerError(f"{key}: several sources are called {dupes}; give each a distinct `name`")
    total = sum(e.weight for e in entries)
    return [Entry(e.name, e.files, e.weight / total, e.text_field, e.domain_field, e.domain, e.count_skips)
            for e in entries]


class _Streams(IterableDataset):
    """What each DataLoader worker runs: its stream, from its saved state, tagged with its index."""

    def __init__(self, entries, tokenizer, settings, rank: int, world_size: int, workers: int):
        self.entries, self.tokenizer, self.settings = entries, tokenizer, settings
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.states: list[dict | None] = [None] * workers
        self.first = 0  # the stream DataLoader worker 0 plays

    def stream(self, local: int) -> PackedStream:
        stream = PackedStream(self.entries, self.tokenizer, self.settings, worker=self.rank * self.workers + local,
                              num_workers=self.world_size * self.workers)
        if self.states[local] is not None:
            stream.load_state_dict(self.states[local])
        return stream

    def __iter__(self):
        info = get_worker_info()
        local = ((info.id if info is not None else 0) + self.first) % self.workers
        try:
            stream = self.stream(local)
            for batch in stream:
                yield local, batch, stream.state_dict()
            # the state at the end holds what was skipped after the last batch (and resumes to the end)
            yield local, _END, stream.state_dict()
        except HealerError as err:
            # torch would re-raise it in the trainer with the worker's traceback in the message;
            # hand the message over instead, so the user sees one clear line
            yield local, None, str(err)


_END = "end"  # in place of a batch: this stream has ended; its final state comes with it


def _identity(item):
    return item


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


class StreamLoader:
    """Packed batches for one rank; iterate it, checkpoint it with :meth:`state_dict`, read :meth:`stats`.

    Iterating again (a new ``iter()``) continues after the last batch handed out; batches that
    workers had prefetched are made again, identically.
    """

    def __init__(self, entries: list[Entry], tokenizer, settings: StreamSettings, *, rank: int, world_size: int,
                 num_workers: int = 0, split: str = "train"):
        if not 0 <= rank < world_size:
            raise HealerError(f"data loader: rank {rank} is outside world_size {world_size}")
        self.entries, self.settings, self.split = entries, settings, split
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.workers = max(1, num_workers)
        self._data = _Streams(entries, tokenizer, settings, rank, world_size, self.workers)
        self._next = 0
        self._batches = 0
        self._sources: list[dict] | None = None  # fingerprints of the entries' shards, made when first needed

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self):
        self._data.first = self._next
        self._data.states = list(self._data.states)
        if self.num_workers == 0:
            items = iter(self._data)
        else:
            # Workers are the parallelism: their tokenizers run single-threaded (rayon threads would
            # fight over the same cores, and tokenizers warns after a fork). The variable is set only
            # while the workers fork, so the trainer's own process keeps its setting.
            previous = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = previous or "false"
            try:
                items = iter(DataLoader(self._data, batch_size=None, num_workers=self.num_workers,
                                        collate_fn=_identity, prefetch_factor=4,
                                        pin_memory=torch.cuda.is_available()))  # for non_blocking copies
            finally:
                if previous is None:
                    del os.environ["TOKENIZERS_PARALLELISM"]
        for local, batch, state in items:
            if batch is None:
                raise HealerError(state)
            self._data.states[local] = state
            if isinstance(batch, str):  # _END
                continue
            self._next = (local + 1) % self.workers
            self._batches += 1
            yield batch
        if self.settings.policy == "repeat":
            skips = BadRecords(counts=self.stats()["skipped"], examples=self.stats()["skipped_examples"])
            raise HealerError(
                f"data: rank {self.rank} found no usable document in its share of the corpus "
                f"({skips.summary()}); check the paths, text_field and domains"
            )

    def set_weights(self, weights: list[float]) -> None:
        """Mix the entries by ``weights`` (one each, in ``entries`` order) from each stream's next document
        batch on (``data.dynamic``); a new ``iter()`` then makes the batches under them."""
        self.entries = [replace(e, weight=float(w)) for e, w in zip(self.entries, weights, strict=True)]
        self._data.entries = self.entries  # streams that have not started yet begin with them
        self._data.states = [None if s is None else {**s, "next_weights": [float(w) for w in weights]}
                             for s in self._data.states]

    # -- checkpoint -----------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {"format": STATE_FORMAT, "split": self.split, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.workers, "micro_batch_size": self.settings.micro_batch_size,
                "seq_len": self.settings.seq_len, "shuffle_blocks": self.settings.shuffle_blocks,
                "entries": [e.name for e in self.entries]}

    def sources(self) -> list[dict]:
        """Per entry, its shards' count and hashes of their names and contents (see ``shards.fingerprint``)."""
        if self._sources is None:
            by_files: dict[tuple, dict] = {}  # the domains of one source share its files: hash them once
            self._sources = [by_files.setdefault(e.files, fingerprint(list(e.files))) for e in self.entries]
        return self._sources

    def state_dict(self) -> dict:
        """Small and picklable: per stream the reader positions before its current document batch,
        a cursor into that batch and the counters; whose turn is next; what the sources' files were."""
        return {**self._fingerprint(), "sources": self.sources(), "next": self._next, "batches": self._batches,
                "streams": list(self._data.states)}

    def load_state_dict(self, sd: dict) -> None:
        """Continue from ``sd``; refused, naming the setting or source, when it was written for other data.

        ``{"ranks": [state of old rank 0, 1, ...]}`` (what a checkpoint gives, a sequence read on demand) is
        this rank's state when the ranks and workers are the ones it was written with; otherwise (an elastic
        resume) the rest of the epoch is re-dealt over this layout's streams and this rank keeps its own.
        """
        if "ranks" in sd:
            olds = sd["ranks"]
            if len(olds) == self.world_size and olds[self.rank].get("num_workers") == self.workers:
                sd = olds[self.rank]  # the layout it was written with: no re-deal, only this rank's state is read
        if "ranks" in sd:
            for old in olds:
                self._check(old, same_layout=False)
            streams = [state for old in olds for state in old["streams"]]
            from healer.train.data.reshard import reshard

            new = reshard(streams, self.entries, self._data.tokenizer, self.settings,
                          new_streams=self.world_size * self.workers)
            self._data.states = new[self.rank * self.workers:(self.rank + 1) * self.workers]
            self._next = 0
            self._batches = sum(old["batches"] for r, old in enumerate(olds) if r % self.world_size == self.rank)
            return
        self._check(sd, same_layout=True)
        self._data.states = list(sd["streams"])
        self._next, self._batches = sd["next"], sd["batches"]

    def _check(self, sd: dict, same_layout: bool) -> None:
        """Refuse ``sd`` when it was written for other data (or, unless re-dealt, another layout)."""
        if sd.get("format") != STATE_FORMAT:
            raise HealerError(
                f"data checkpoint: written in data-state format {sd.get('format')!r}, this healer reads format "
                f"{STATE_FORMAT}; resume with the healer version that wrote it, or start the data stream afresh")
        mine = self._fingerprint()
        for key, value in mine.items():
            if not same_layout and key in ("rank", "world_size", "num_workers"):
                continue
            then = sd.get(key, False if key == "shuffle_blocks" else None)  # older states read blocks in order
            if _plain(then) != value:  # a checkpoint written as JSON has lists where tuples were
                raise HealerError(
                    f"data checkpoint: {key} was {then!r} when it was saved and is {value!r} now; "
                    "resume with the same data settings, ranks and workers (or start the data stream afresh)"
                )
        key = "data.sources" if self.split == "train" else "data.validation"
        for entry, then, now in zip(self.entries, sd["sources"], self.sources()):
            if then == now:
                continue
            if then["files"] != now["files"] or then["names"] != now["names"]:
                what = f"its files are not the ones it had ({then['files']} shard(s) then, {now['files']} now)"
            else:
                what = "its files have the same names but other contents (size or bytes differ)"
            raise HealerError(
                f"data checkpoint: {key} source {entry.name!r}: {what}; resuming would continue mid-way "
                "through other data. Point the source back at the data it was trained on, or start afresh "
                "(--resume none)")

    # -- counters -------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters of this rank since the start of the run (they survive a resume)."""
        tokens = {e.name: 0 for e in self.entries}
        docs = {e.name: 0 for e in self.entries}
        skipped: dict[str, int] = {}
        examples: list[str] = []
        for state in self._data.states:
            if state is None:
                continue
            for e, t, d in zip(self.entries, state["tokens"], state["docs"]):
                tokens[e.name] += t
                docs[e.name] += d
            for kind, n in state["skips"]["counts"].items():
                skipped[kind] = skipped.get(kind, 0) + n
            examples.extend(state["skips"]["examples"])
        return {"tokens": tokens, "documents": docs, "skipped": skipped, "skipped_examples": examples[:MAX_EXAMPLES]}


def build_loader(cfg: DataConfig, tokenizer, *, rank: int = 0, world_size: int = 1, micro_batch_size: int = 1,
                 split: str = "train") -> StreamLoader:
    """The packed batches of one rank: ``{"input_ids": LongTensor[micro_batch_size, cfg.seq_len]}``.

    ``split="train"`` mixes ``cfg.sources`` endlessly (``on_exhausted: repeat``) or until a source runs
    out (``stop``/``drain``); ``split="validation"`` reads ``cfg.validation`` once, in file order.
    """
    if split == "train":
        entries = plan_entries(cfg.sources, "data.sources")
        policy, shuffle, blocks = cfg.on_exhausted, cfg.shuffle_files, cfg.shuffle_blocks
    elif split == "validation":
        entries = plan_entries(cfg.validation, "data.validation")
        policy, shuffle, blocks = "drain", False, False
    else:
        raise HealerError(f"data loader: split must be 'train' or 'validation', not {split!r}")
    settings = StreamSettings(seq_len=cfg.seq_len, micro_batch_size=micro_batch_size, policy=policy, seed=cfg.seed,
                              strict=cfg.bad_records == "strict", reset_position_ids=cfg.reset_position_ids,
                              tokenizer_batch_size=cfg.tokenizer_batch_size, shuffle_files=shuffle, bos=cfg.bos,
                              shuffle_blocks=blocks,
                              cache_chars=cfg.repeat_cache_mb * 1_000_000)
    return StreamLoader(entries, tokenizer, settings, rank=rank, world_size=world_size,
                        num_workers=cfg.num_workers, split=split)


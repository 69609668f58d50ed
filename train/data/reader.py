"""Documents of one corpus (or one domain of it) for one dataloader worker, with a resumable position.

A worker reads either its own subset of the shard files (when there are at least as many files as
workers in the whole job) or, when files are fewer, every file but only every ``stride``-th line.
Either way the workers of all ranks together read each record exactly once per epoch.

After an elastic resume (another number of ranks or workers, :mod:`healer.train.data.reshard`) a reader
first works through a *queue*: pieces of files left unread by the old layout's workers, each read from a
byte offset and line on, every ``stride``-th line. When the queue is done its epoch ends, and the next
epoch is the new layout's ordinary share.

Records are cut out of files by :mod:`healer.core.textio` (which says what each suffix means); bad ones are
skipped and counted by kind (``skip``) or stop the run with the file and line (``strict``). Each bad
record is counted once: when one stream is split into domains, each domain has its own reader over the
same files and only the first one counts, only in its first epoch; when workers share a file line by
line, each counts the bad lines of its own share and only the first counts what spoils the whole file
(a corrupt or empty shard).
"""

from __future__ import annotations

import bisect
import json
import random
from typing import NamedTuple

from healer.core.errors import HealerError
from healer.core.textio import BadRecords, CorruptShard, decode_record, dotted, open_records, record_text


class Piece(NamedTuple):
    """Part of a file: its records from byte ``offset`` (after ``line`` lines) on, every ``stride``-th line
    starting at ``phase`` (lines counted from the file's start)."""

    path: str
    offset: int
    line: int
    stride: int
    phase: int


class DocReader:
    """Texts of one mixture entry for one global worker, epoch after epoch, resumable at any record.

    Args:
        files: every shard of the source, in the same order on every rank.
        worker, num_workers: this worker's global index (rank * workers_per_rank + worker) and the total.
        text_field, domain_field: dotted record keys of the text and of the domain label.
        domain: keep only records whose domain is this (None: keep all).
        skips: where bad records are reported; ``count_skips=False`` reports none (strict still raises).
        shuffle_seed: shuffle this worker's file order each epoch with this seed (None: keep sorted order).
        cache_chars: from the second epoch on, serve documents from memory when this worker's share of
            the source holds at most this many characters; an upsampled small domain then costs no
            re-reading of the shards it is scattered in. 0 turns it off.
    """

    def __init__(self, files: list[str], *, worker: int, num_workers: int, text_field: str = "text",
                 domain_field: str | None = None, domain: str | None = None, skips: BadRecords,
                 count_skips: bool = True, shuffle_seed: int | None = None, cache_chars: int = 0):
        if len(files) >= num_workers:
            self.files, self.stride, self.phase = files[worker::num_workers], 1, 0
        else:  # fewer files than workers: everybody reads every file, each its own lines
            self.files, self.stride, self.phase = list(files), num_workers, worker
        self.text_field, self.domain_field, self.domain = text_field, domain_field, domain
        self.skips, self.count_skips, self.shuffle_seed = skips, count_skips, shuffle_seed
        # A record of another domain cannot contain the domain's JSON string, so such lines are
        # dropped before parsing (only when the name needs no JSON escaping, and never by the
        # reader that counts bad records: it must see every line).
        needle = json.dumps(domain) if domain is not None else None
        self._needle = needle.encode() if needle and needle.isascii() and needle == f'"{domain}"' else None
        self.epoch, self.index, self.offset, self.line, self.docs_this_epoch = 0, 0, 0, 0, 0
        self.queue: list[Piece] | None = None  # the old layout's leftovers (elastic resume), read before epoch+1
        self._order = self._epoch_order()
        self._it = None
        self._kind = "jsonl"  # what the open file's raw records are: txt | jsonl | rows
        self.cache_chars = cache_chars
        # path -> (offsets, lines, texts) of this worker's documents; None: not built; False: too big
        self._cache: dict | bool | None = None

    # -- position -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = {"epoch": self.epoch, "index": self.index, "offset": self.offset, "line": self.line,
              "docs_this_epoch": self.docs_this_epoch}
        if self.queue is not None:
            sd["queue"] = [list(piece) for piece in self.queue]
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.index, self.offset = sd["epoch"], sd["index"], sd["offset"]
        self.line, self.docs_this_epoch = sd["line"], sd["docs_this_epoch"]
        self.queue = [Piece(*piece) for piece in sd["queue"]] if sd.get("queue") is not None else None
        self._order = self._epoch_order()
        self._it = None

    def new_epoch(self) -> None:
        self.epoch, self.index, self.offset, self.line, self.docs_this_epoch = self.epoch + 1, 0, 0, 0, 0
        self.queue = None
        self._order = self._epoch_order()
        self._it = None

    def remainder(self) -> list[Piece]:
        """What this reader has not read of its current epoch, as pieces another reader can take over."""
        if self.queue is not None:
            rest = self.queue[self.index:]
            return [rest[0]._replace(offset=self.offset, line=self.line), *rest[1:]] if rest else []
        rest = self._order[self.index:]
        return [Piece(path, self.offset if k == 0 else 0, self.line if k == 0 else 0, self.stride, self.phase)
                for k, path in enumerate(rest)]

    def _share(self) -> tuple[int, int]:
        """(stride, phase) of the file being read: the queue piece's, or this worker's own."""
        if self.queue is not None and self.index < len(self.queue):
            piece = self.queue[self.index]
            return piece.stride, piece.phase
        return self.stride, self.phase

    def _next_file(self) -> None:
        self.index, self.offset, self.line, self._it = self.index + 1, 0, 0, None
        if self.queue is not None and self.index < len(self.queue):  # a leftover piece starts mid-file
            self.offset, self.line = self.queue[self.index].offset, self.queue[self.index].line

    def _epoch_order(self) -> list[str]:
        if self.queue is not None:
            return [piece.path for piece in self.queue]
        order = list(self.files)
        if self.shuffle_seed is not None:
            random.Random(f"{self.shuffle_seed}:{self.phase}:{self.epoch}").shuffle(order)
        return order

    # -- reading --------------------------------------------------------------------------------
    def next_text(self) -> str | None:
        """The next document's text, or None at the end of this epoch's files."""
        if self.epoch > 0 and self.cache_chars and self.queue is None:
            if self._cache is None:
                self._cache = self._build_cache()
            if self._cache:
                return self._next_cached()
        while self.index < len(self._order):
            path = self._order[self.index]
            stride, phase = self._share()
            try:
                if self._it is None:
                    self._it = self._open(path)  # a .json list is parsed here, and may be broken
                for raw, pos in self._it:
                    self.offset = pos
                    self.line += 1
                    if (self.line - 1) % stride != phase:
                        continue
                    text = self._parse(raw, path, self.line)
                    if text is not None:
                        self.docs_this_epoch += 1
                        return text
                if self.line == 0 and self.offset == 0:
                    self._skip_file("empty_file", path)
            except CorruptShard as err:
                self._skip_file("corrupt_shard", f"{path}:{self.line + 1}", str(err))
            except HealerError:
                raise
            except Exception as err:  # unreadable file, broken parquet footer, ...
                self._skip_file("corrupt_shard", f"{path}:{self.line + 1}", f"{type(err).__name__}: {err}")
            self._next_file()
        return None

    def _build_cache(self) -> dict | bool:
        """Every document of this worker's files with the position after it, or False past ``cache_chars``.

        Bad records were counted in the first epoch; this pass counts nothing."""
        cache, chars = {}, 0
        for path in self.files:
            offsets, lines, texts = [], [], []
            line = 0
            try:
                for raw, pos in self._open(path, 0):
                    line += 1
                    if (line - 1) % self.stride != self.phase:
                        continue
                    text = self._parse(raw, path, line)
                    if text is not None:
                        chars += len(text)
                        if chars > self.cache_chars:
                            return False
                        offsets.append(pos)
                        lines.append(line)
                        texts.append(text)
            except HealerError:
                raise
            except Exception:  # a damaged shard ends where the first epoch found it ending
                pass
            cache[path] = (offsets, lines, texts)
        return cache

    def _next_cached(self) -> str | None:
        while self.index < len(self._order):
            offsets, lines, texts = self._cache[self._order[self.index]]
            k = bisect.bisect_right(offsets, self.offset)
            if k < len(offsets):
                self.offset, self.line = offsets[k], lines[k]
                self.docs_this_epoch += 1
                return texts[k]
            self.index, self.offset, self.line = self.index + 1, 0, 0
        return None

    def _open(self, path: str, offset: int | None = None):
        offset = self.offset if offset is None else offset
        columns = [self.text_field.split(".")[0]]
        if self.domain is not None:
            columns.append(self.domain_field.split(".")[0])
        self._kind, items = open_records(path, offset, columns)
        return items

    def _counting(self) -> bool:
        # each bad record is counted once: by the first domain's reader, in the first epoch
        return self.count_skips and self.epoch == 0

    def _skip(self, kind: str, where: str, detail: str = "") -> None:
        if self._counting() or self.skips.strict:
            self.skips.add(kind, where, detail)

    def _skip_file(self, kind: str, where: str, detail: str = "") -> None:
        # every worker sharing a file line by line meets its damage; the first one counts it
        if self.phase == 0 or self.skips.strict:
            self._skip(kind, where, detail)

    def _parse(self, raw, path: str, line: int) -> str | None:
        where = f"{path}:{line}"
        if self._kind == "jsonl" and self._needle is not None and not self._counting() and self._needle not in raw:
            return None
        record = decode_record(raw, self._kind, where, self._skip)
        if record is None:
            return None
        if self.domain is not None and dotted(record, self.domain_field) != self.domain:
            return None
        return record_text(record, self.text_field, where, self._skip)

"""One worker's packed token stream: mix documents from several sources, tokenize in batches, pack.

The stream reads up to ``tokenizer_batch_size`` documents at a time (and at most about ``FILL_CHARS``
characters), choosing each one's source with a seeded draw, tokenizes them, appends EOS to each and
lays them end to end in one flat array. Blocks of ``seq_len`` tokens are cut from that array; a block
that reaches the end of it continues in the next batch, so a document's remainder carries into the
next block and nothing is padded.

A long document is tokenized in pieces of at most ``PIECE_CHARS`` characters, cut where the tokens do
not change (:func:`healer.core.textio.split_points`), and its pieces may spread over several batches: memory
does not grow with a document's length beyond its text (tokenizing 10 MB of text in one call takes GBs).

With ``shuffle_blocks`` (the training default) the whole blocks of a batch are handed out in a seeded
random order, a pure function of (seed, worker, batch number). Without it a document of 10K tokens fills
40 consecutive 256-token blocks, so whole optimizer steps of a short heal see one source file (measured
on the SlimPajama sample: 9 of the first 20 4-sequence steps were one Python file). Only the block that
continues the previous batch's last block, and the one cut at the batch's end, keep their places; a
document longer than a batch (``FILL_CHARS``) still spans consecutive batches.

Resuming needs no packing buffer and no token ids in the checkpoint: the state is the position of
every reader *before* the current batch (plus the counters at that point, and for a document cut
across batches, its reader's position before it and the next piece), the batch's number and how many
of its first tokens finish the previous batch's last block, and a cursor into the batch's hand-out
order. Loading it re-reads and re-tokenizes that one batch, shuffles it the same way and skips to the
cursor.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from healer.core.errors import HealerError
from healer.core.textio import PIECE_CHARS, BadRecords, split_points, tokenizer_encoder
from healer.train.data.reader import DocReader

_M64 = (1 << 64) - 1
# characters per batch of documents (plus at most one piece), tokenized in one call: the tokenizer's
# working memory is some 50-200 bytes a character, so this bounds it whatever the documents' lengths
FILL_CHARS = 1_000_000


@dataclass(frozen=True)
class Entry:
    """One member of the mixture: a source, or one domain of a source, with its token weight."""

    name: str
    files: tuple[str, ...]
    weight: float
    text_field: str = "text"
    domain_field: str | None = None
    domain: str | None = None
    count_skips: bool = True


@dataclass(frozen=True)
class StreamSettings:
    seq_len: int
    micro_batch_size: int
    policy: str = "repeat"  # repeat | stop | drain
    seed: int = 0
    strict: bool = False
    reset_position_ids: bool = False
    tokenizer_batch_size: int = 256
    shuffle_files: bool = True
    bos: bool = False
    cache_chars: int = 16_000_000
    shuffle_blocks: bool = False


def _mix(x: int) -> int:
    # splitmix64 finalizer: a counter-based generator needs no state beyond the counter.
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def uniform(seed: int, stream: int, counter: int) -> float:
    """A float in [0, 1), a pure function of (seed, stream, counter)."""
    return (_mix(_mix(_mix(seed & _M64) ^ stream) ^ counter) >> 11) / 9007199254740992.0


class PackedStream:
    """Packed micro-batches for global worker ``worker`` of ``num_workers``, resumable at any batch.

    Iterating yields ``{"input_ids": LongTensor[micro_batch_size, seq_len]}`` (plus ``position_ids``
    when asked); :meth:`state_dict` after a batch resumes right after it.
    """

    def __init__(self, entries: list[Entry], tokenizer, settings: StreamSettings, *, worker: int, num_workers: int):
        if not entries:
            raise HealerError("data: no sources to read (add data.sources)")
        self.entries, self.s, self.worker = entries, settings, worker
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise HealerError("the tokenizer has no EOS token, which separates packed documents; set one")
        self.bos = tokenizer.bos_token_id if settings.bos else None
        if settings.bos and self.bos is None:
            raise HealerError("data.bos is true but the tokenizer has no BOS token")
        self._encode_batch = tokenizer_encoder(tokenizer)
        self.skips = BadRecords(strict=settings.strict)
        self.readers = [
            DocReader(list(e.files), worker=worker, num_workers=num_workers, text_field=e.text_field,
                      domain_field=e.domain_field, domain=e.domain, skips=self.skips, count_skips=e.count_skips,
                      shuffle_seed=settings.seed if settings.shuffle_files else None, cache_chars=settings.cache_chars)
            for e in entries
        ]
        n = len(entries)
        self.status = ["active"] * n  # active | done (drained) | empty (no document for this worker)
        self.picks = 0
        # per entry: chars and count of documents read, tokens and chars of documents tokenized, and the
        # tokens handed to it so far (estimated from characters at read time), which the mixture balances
        self.est = [[0, 0, 0, 0, 0.0] for _ in range(n)]
        # the mixture in force, and per entry the assigned tokens the deficit rule counts from: a new
        # mixture sets the pace from then on rather than making up for the whole history under the old one
        self.weights = [e.weight for e in entries]
        self.base = [0.0] * n
        self._next_weights: list[float] | None = None  # set_weights: in force from the next document batch
        self.ended = False
        self.tokens, self.docs = [0] * n, [0] * n
        self._snapshot: dict | None = None
        # a document cut across batches: its entry, its reader's state before it, its text, cut points, next piece
        self._pending: tuple[int, dict, str, list[int], int] | None = None
        self._flat = np.zeros(0, dtype=np.int64)
        self._starts: list[int] = []  # where each piece starts in _flat
        self._owners: list[int] = []  # the entry each piece came from
        self._opens: list[bool] = []  # whether the piece starts its document
        self.fills = 0  # batches of documents read so far: numbers the shuffle of each
        # hand-out order of the batch: its first `_head` tokens finish the previous batch's last block, then
        # `_order` lists the flat start of each whole block, then the rest starts the next batch's first block
        self._head = 0
        self._order: np.ndarray | None = None
        self.cursor = 0  # tokens of the current batch handed out, in hand-out order

    # -- state ----------------------------------------------------------------------------------
    def _core(self) -> dict:
        pending = None
        if self._pending is not None:
            entry, before, _text, _cuts, piece = self._pending
            pending = {"entry": entry, "reader": before, "piece": piece}
        return {"readers": [r.state_dict() for r in self.readers], "status": list(self.status), "picks": self.picks,
                "est": [list(e) for e in self.est], "skips": self.skips.state_dict(), "ended": self.ended,
                "pending": pending, "weights": list(self.weights), "base": list(self.base), "fills": self.fills}

    def _load_core(self, core: dict) -> None:
        self._pending = None
        pending = core.get("pending")
        if pending is not None:  # read the cut document again from its reader's position before it
            i = pending["entry"]
            self.readers[i].load_state_dict(pending["reader"])
            text = self.readers[i].next_text()
            if text is None:
                raise HealerError(f"data checkpoint: the document being read from {self.entries[i].name!r} is gone; "
                                  "the source's files changed since the checkpoint")
            self._pending = (i, pending["reader"], text, split_points(text, PIECE_CHARS), pending["piece"])
        for k, (reader, sd) in enumerate(zip(self.readers, core["readers"])):
            if pending is None or k != pending["entry"] or reader.state_dict() != sd:
                reader.load_state_dict(sd)
        self.status, self.picks, self.ended = list(core["status"]), core["picks"], core["ended"]
        self.fills = core.get("fills", 0)
        self.est = [list(e) for e in core["est"]]
        # states written before dynamic mixing have neither: the recipe's weights, in force from the start
        self.weights = list(core.get("weights") or [e.weight for e in self.entries])
        self.base = list(core.get("base") or [0.0] * len(self.entries))
        self.skips.load_state_dict(core["skips"])  # re-reading above may have counted skips again

    def state_dict(self) -> dict:
        return {"batch_start": self._snapshot, "cursor": self.cursor, "tokens": list(self.tokens),
                "docs": list(self.docs), "skips": self.skips.state_dict(), "next_weights": self._next_weights}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["tokens"]) != len(self.entries):
            raise HealerError("data checkpoint: it was written for a different list of sources/domains")
        if sd["batch_start"] is not None:
            self._load_core(sd["batch_start"])
            # the same documents, read, tokenized and shuffled again: a pure function of the snapshot
            self._fill(carry=sd["batch_start"].get("carry", 0))
            self.cursor = sd["cursor"]
        self.tokens, self.docs = list(sd["tokens"]), list(sd["docs"])
        self.skips.load_state_dict(sd["skips"])
        self.set_weights(sd.get("next_weights"))

    def set_weights(self, weights: list[float] | None) -> None:
        """Mix by ``weights`` (one per entry, summing to 1) from the next batch of documents on.

        The batch being packed keeps the mixture it was read with, so a resume re-reads it identically;
        setting the weights in force already changes nothing (a resume may set them again).
        """
        if weights is not None and len(weights) != len(self.entries):
            raise HealerError(f"data: {len(weights)} mixture weights for {len(self.entries)} sources/domains")
        self._next_weights = None if weights is None else [float(w) for w in weights]

    def stats(self) -> dict:
        return {"tokens": {e.name: t for e, t in zip(self.entries, self.tokens)},
                "documents": {e.name: d for e, d in zip(self.entries, self.docs)},
                "skipped": dict(self.skips.counts), "skipped_examples": list(self.skips.examples)}

    # -- mixing ---------------------------------------------------------------------------------
    def _tokens_per_char(self, i: int) -> float:
        _, _, tokens, chars, _ = self.est[i]
        if chars:
            return tokens / chars
        all_chars = sum(e[3] for e in self.est)
        return sum(e[2] for e in self.est) / all_chars if all_chars else 0.25

    def _deficits(self) -> list[float]:
        """Per entry, the tokens it is short of its share since ``base`` (0 for entries no longer active)."""
        active = [i for i, st in enumerate(self.status) if st == "active"]
        weight = sum(self.weights[i] for i in active)
        assigned = sum(self.est[i][4] - self.base[i] for i in active)
        out = [0.0] * len(self.entries)
        for i in active:
            out[i] = self.weights[i] / weight * assigned - (self.est[i][4] - self.base[i])
        return out

    def _pick(self) -> int | None:
        """The entry furthest behind its token share, with a seeded jitter of up to one mean document.

        Following the deficit keeps every entry within about one document of its share at any point
        (a plain weighted draw drifts by many long documents); the jitter makes the interleaving a
        seeded random one. Tokens of documents not yet tokenized are estimated from their characters.
        """
        active = [i for i, st in enumerate(self.status) if st == "active"]
        if not active:
            return None
        if len(active) == 1:
            return active[0]
        docs = sum(e[1] for e in self.est)
        mean_doc = sum(e[4] for e in self.est) / docs if docs else 1.0
        deficits = self._deficits()
        best, best_score = active[0], float("-inf")
        for _, i in enumerate(active):
            score = deficits[i] + uniform(self.s.seed, self.worker, self.picks * len(self.entries) + i) * mean_doc
            if score > best_score:
                best, best_score = i, score
        self.picks += 1
        return best

    def _next_document(self) -> bool:
        """Pick an entry and read its next document into ``_pending``; False when the stream must stop."""
        while True:
            i = self._pick()
            if i is None:
                self.ended = True
                return False
            reader = self.readers[i]
            before = reader.state_dict()
            text = reader.next_text()
            if text is not None:
                self.est[i][0] += len(text)
                self.est[i][1] += 1
                self.est[i][4] += len(text) * self._tokens_per_char(i)
                self._pending = (i, before, text, split_points(text, PIECE_CHARS), 0)
                return True
            # this entry's files are used up for this epoch
            if reader.docs_this_epoch == 0:
                self.status[i] = "empty"
                # legitimate for a rare domain split over many workers, a typo when every worker says it
                self.skips.note("empty_source", f"{self.entries[i].name}: no document in worker {self.worker}'s "
                                                "share (check the path, text_field and domain name)")
            elif self.s.policy == "repeat":
                reader.new_epoch()
            elif self.s.policy == "stop":
                self.ended = True
                return False
            else:
                self.status[i] = "done"

    def _fill(self, carry: int = 0) -> bool:
        """Read and tokenize the next batch of documents (or pieces of one); False when the stream has ended.

        ``carry``: how many of its first tokens go to the block the previous batch left unfinished.
        """
        if self.ended:
            return False
        if self._next_weights is not None and self._next_weights != self.weights:
            # each entry keeps its lead or lag (within about a document) across the change; forgetting it
            # would hand the next pick to any entry alike, which favours domains of long documents
            lag = self._deficits()
            self.base = [e[4] + d for e, d in zip(self.est, lag)]
            self.weights = self._next_weights
        self._next_weights = None
        self._snapshot = {**self._core(), "carry": carry}  # with the mixture this batch is read under
        texts: list[str] = []
        owners: list[int] = []
        opens: list[bool] = []
        closes: list[bool] = []
        chars = 0
        while len(texts) < self.s.tokenizer_batch_size and chars < FILL_CHARS:
            if self._pending is None and not self._next_document():
                break
            i, before, text, cuts, piece = self._pending
            texts.append(text[cuts[piece]:cuts[piece + 1]])
            owners.append(i)
            opens.append(piece == 0)
            closes.append(piece + 2 == len(cuts))
            chars += len(texts[-1])
            self._pending = None if closes[-1] else (i, before, text, cuts, piece + 1)
        if not texts:
            self.ended = True
            return False
        pieces: list[list[int]] = []  # bos?, ids, eos for every document, flattened once at the end
        starts: list[int] = []
        pos = 0
        head = [] if self.bos is None else [self.bos]
        for i, text, ids, first, last in zip(owners, texts, self._encode_batch(texts), opens, closes):
            starts.append(pos)
            pieces += (head if first else [], ids, [self.eos] if last else [])
            n = len(head) * first + len(ids) + last
            pos += n
            self.est[i][2] += n
            self.est[i][3] += len(text)
        self._flat = np.fromiter(chain.from_iterable(pieces), dtype=np.int64, count=pos)
        self._starts, self._owners, self._opens, self.cursor = starts, owners, opens, 0
        self._head, self._order = min(carry, pos), None
        whole = (pos - self._head) // self.s.seq_len
        if self.s.shuffle_blocks and whole > 1:
            rng = np.random.default_rng([self.s.seed, self.worker, self.fills])
            self._order = self._head + rng.permutation(whole) * self.s.seq_len
        self.fills += 1
        return True

    def _span(self, at: int, want: int) -> tuple[int, int]:
        """The range of ``_flat`` handed out from hand-out position ``at``, at most ``want`` tokens long."""
        if self._order is not None:
            k = (at - self._head) // self.s.seq_len
            if at >= self._head and k < len(self._order):  # whole blocks are asked for whole
                start = int(self._order[k]) + (at - self._head) % self.s.seq_len
                return start, start + min(want, self.s.seq_len - (at - self._head) % self.s.seq_len)
            if at < self._head:
                return at, min(self._head, at + want)
        return at, min(len(self._flat), at + want)

    def handed_out(self) -> list[tuple[int, int]]:
        """The ranges of the current batch's ``_flat`` handed out so far (what :mod:`.reshard` counts as seen)."""
        out, at = [], 0
        while at < self.cursor:
            a, b = self._span(at, self.cursor - at)
            out.append((a, b))
            at += b - a
        return out

    # -- packing --------------------------------------------------------------------------------
    def _block(self):
        """The next ``seq_len`` tokens, the in-block offsets where documents start, and the counters
        they add; None when the stream ends first (a last partial block is dropped, never padded)."""
        need = self.s.seq_len
        pieces, doc_starts = [], []
        tokens: dict[int, int] = {}
        docs: dict[int, int] = {}
        got = 0
        while got < need:
            if self.cursor >= len(self._flat) and not self._fill(carry=need - got if got else 0):
                return None
            a, b = self._span(self.cursor, need - got)
            j = bisect.bisect_right(self._starts, a) - 1
            while j < len(self._starts) and self._starts[j] < b:
                start = self._starts[j]
                end = self._starts[j + 1] if j + 1 < len(self._starts) else len(self._flat)
                owner = self._owners[j]
                tokens[owner] = tokens.get(owner, 0) + min(b, end) - max(a, start)
                if start >= a and self._opens[j]:
                    docs[owner] = docs.get(owner, 0) + 1
                    doc_starts.append(got + start - a)
                j += 1
            pieces.append(self._flat[a:b])
            got += b - a
            self.cursor += b - a
        return (pieces[0] if len(pieces) == 1 else np.concatenate(pieces)), doc_starts, tokens, docs

    def _positions(self, doc_starts: list[int]) -> np.ndarray:
        # position ids restart at 0 where a document starts (and at the block start, as Megatron does)
        n = self.s.seq_len
        mark = np.zeros(n, dtype=np.int64)
        mark[doc_starts] = doc_starts
        return np.arange(n, dtype=np.int64) - np.maximum.accumulate(mark)

    def __iter__(self):
        while True:
            blocks, positions, pending = [], [], []
            for _ in range(self.s.micro_batch_size):
                block = self._block()
                if block is None:
                    return
                ids, doc_starts, tokens, docs = block
                blocks.append(ids)
                if self.s.reset_position_ids:
                    positions.append(self._positions(doc_starts))
                pending.append((tokens, docs))
            for tokens, docs in pending:  # counters move only with batches that are handed out
                for i, n in tokens.items():
                    self.tokens[i] += n
                for i, n in docs.items():
                    self.docs[i] += n
            batch = {"input_ids": torch.from_numpy(np.stack(blocks))}
            if self.s.reset_position_ids:
                batch["position_ids"] = torch.from_numpy(np.stack(positions))
            yield batch

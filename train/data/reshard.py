"""Elastic resume of the data stream: deal what N old streams left of their epoch to M new streams.

A stream's position is, per mixture entry, a reader position (see :mod:`healer.train.data.reader`); what
the reader has not read of its current epoch is a list of file pieces (the rest of the current file, then
its remaining files). The documents an old stream had read into its current batch but not yet handed out
are given back: its readers are wound back to just after the last document whose first token was handed
out (a document cut by the checkpoint counts as seen). Every old stream's pieces, in stream order, are then
dealt round-robin to the new streams; when there are fewer pieces than new streams each piece is split by
lines (every ``k``-th line of it to each of ``k`` streams), so no new stream idles while another has work.

A new stream reads its pieces, then starts the next epoch of the new layout's ordinary split. So within
the epoch being read at the checkpoint every document is read exactly once, by one old or one new stream.
(A stream whose reader of an entry had already wrapped into a later epoch than another's gives its pieces
of that later epoch; the new streams all go on with the epoch after the latest one.) With
``data.shuffle_blocks`` a batch's blocks are handed out of order, so a document of an old stream's current
batch that no handed-out block had reached, read before one that was, is skipped, not read twice (see
:func:`_started`).

Everything here is a pure function of the old streams' states and the new layout, so every rank computes
the same deal and keeps its own streams.
"""

from __future__ import annotations

from healer.core.textio import MAX_EXAMPLES
from healer.train.data.reader import Piece
from healer.train.data.stream import Entry, PackedStream, StreamSettings


def _started(stream: PackedStream) -> list[int]:
    """Per entry, how many of the current batch's documents its reader is wound past: up to the last one
    any token of which was handed out.

    Read in order, those documents are a prefix of the batch. With ``data.shuffle_blocks`` they need not
    be: a document none of whose blocks the shuffle had reached, read before one it had, is then skipped
    for the rest of the epoch rather than read twice (at most one batch of documents per old stream).
    """
    handed = stream.handed_out()
    counts = [0] * len(stream.entries)
    nth = [0] * len(stream.entries)
    opening = [k for k, opens in enumerate(stream._opens) if opens]
    for n, k in enumerate(opening):  # a document runs from its first piece to the next document's
        owner, start = stream._owners[k], stream._starts[k]
        end = stream._starts[opening[n + 1]] if n + 1 < len(opening) else len(stream._flat)
        nth[owner] += 1
        if any(a < end and start < b for a, b in handed):
            counts[owner] = nth[owner]
    return counts


def leftovers(state: dict | None, entries: list[Entry], tokenizer, settings: StreamSettings, *, worker: int,
              num_workers: int) -> tuple[list[list[Piece]], list[int]]:
    """Per entry, the pieces old stream ``worker`` of ``num_workers`` had not begun at ``state``, and its epoch.

    ``state`` is the stream's checkpointed state (None: it never produced a batch).
    """
    stream = PackedStream(entries, tokenizer, settings, worker=worker, num_workers=num_workers)
    if state is not None and state["batch_start"] is not None:
        stream.load_state_dict(state)  # re-reads and re-tokenizes its current batch
        begun = _started(stream)
        for reader, before, n in zip(stream.readers, state["batch_start"]["readers"], begun):
            reader.load_state_dict(before)
            while n > 0:  # replay the documents the batch took from this reader
                if reader.next_text() is None:  # the batch ran into the reader's next epoch (policy repeat)
                    reader.new_epoch()
                    continue
                n -= 1
    return [reader.remainder() for reader in stream.readers], [reader.epoch for reader in stream.readers]


def deal(pieces: list[Piece], new_streams: int) -> list[list[Piece]]:
    """Pieces round-robin to ``new_streams`` streams, split by lines first when they are fewer than the streams."""
    if pieces and len(pieces) < new_streams:
        k = -(-new_streams // len(pieces))
        pieces = [Piece(p.path, p.offset, p.line, p.stride * k, p.phase + p.stride * t)
                  for p in pieces for t in range(k)]
    return [pieces[j::new_streams] for j in range(new_streams)]


def _merge_skips(states: list[dict]) -> dict:
    counts: dict[str, int] = {}
    examples: list[str] = []
    for sd in states:
        for kind, n in sd["counts"].items():
            counts[kind] = counts.get(kind, 0) + n
        examples.extend(e for e in sd["examples"] if e not in examples)
    return {"counts": counts, "examples": examples[:MAX_EXAMPLES]}


def reshard(old: list[dict | None], entries: list[Entry], tokenizer, settings: StreamSettings, *,
            new_streams: int) -> list[dict]:
    """The states of ``new_streams`` streams that together read exactly what the ``old`` streams left.

    Args:
        old: every old global stream's state, in global order (rank * workers + worker); None for one that
            never produced a batch.
        entries, tokenizer, settings: the mixture and packing the streams were (and are) built with.
        new_streams: ranks x workers of the new layout.

    Counters (tokens and documents per entry, skipped records) move with old stream ``g`` to new stream
    ``g % new_streams``, so their totals over all ranks carry on.
    """
    n_old = len(old)
    per_stream = [leftovers(sd, entries, tokenizer, settings, worker=g, num_workers=n_old) for g, sd in enumerate(old)]
    seen = [sd for sd in old if sd is not None and sd["batch_start"] is not None]
    cores = [sd["batch_start"] for sd in seen]
    epochs = [max(epochs[i] for _, epochs in per_stream) for i in range(len(entries))]
    docs_this_epoch = [sum(core["readers"][i]["docs_this_epoch"] for core in cores) for i in range(len(entries))]
    dealt = [deal([p for pieces, _ in per_stream for p in pieces[i]], new_streams) for i in range(len(entries))]
    est = [[sum(core["est"][i][k] for core in cores) / new_streams for k in range(5)] for i in range(len(entries))]
    # data.dynamic: every stream mixes with the same weights; each entry's tokens since the last change (est
    # minus base) are averaged over the new streams as est is, so no entry catches up on its whole history
    mixture = {}
    if cores and cores[0].get("weights") is not None:
        base = [sum(core.get("base", [0.0] * len(entries))[i] for core in cores) / new_streams
                for i in range(len(entries))]
        mixture = {"weights": list(cores[0]["weights"]), "base": base}
    next_weights = next((sd.get("next_weights") for sd in seen if sd.get("next_weights") is not None), None)
    states = []
    for j in range(new_streams):
        readers, status = [], []
        for i in range(len(entries)):
            queue = dealt[i][j]
            if queue:
                readers.append({"epoch": epochs[i], "index": 0, "offset": queue[0].offset, "line": queue[0].line,
                                "docs_this_epoch": docs_this_epoch[i], "queue": [list(p) for p in queue]})
                status.append("active")
            else:  # nothing of this epoch left for it: its next epoch is the new layout's
                readers.append({"epoch": epochs[i] + 1, "index": 0, "offset": 0, "line": 0, "docs_this_epoch": 0})
                status.append("active" if settings.policy == "repeat" else "done")
        mine = [sd for g, sd in enumerate(old) if g % new_streams == j and sd is not None]
        skips = _merge_skips([sd["skips"] for sd in mine])
        core = {"readers": readers, "status": status, "picks": sum(c["picks"] for c in cores), "est": est,
                "skips": skips, "ended": all(s != "active" for s in status), "pending": None, **mixture}
        states.append({"batch_start": core, "cursor": 0, "skips": skips,
                       "tokens": [sum(sd["tokens"][i] for sd in mine) for i in range(len(entries))],
                       "docs": [sum(sd["docs"][i] for sd in mine) for i in range(len(entries))],
                       "next_weights": next_weights})
    return states

"""LLM-Streamline's surgery: cut a contiguous span of blocks and put ONE standard block in its place.

The replacement is a block of the same family, initialised from one block of the span, so the output is
an ordinary checkpoint with ``num_hidden_layers = kept + 1`` that ``from_pretrained``, vLLM and llama.cpp
load without remote code. In the model the new block sits where the span started: it receives the
hidden states that entered the span and should produce those that left it, which the ``replace`` stage
then trains it to do (:mod:`healer.train.replace`).

Which block of the span seeds it (``prune.replace.init``):

- ``closest`` (default): the block whose own output, fed the span's input, is nearest (MSE, the loss the
  replacement is trained on) to the span's output on the calibration text. Training starts from the
  lowest loss any block of the span offers, and the report records every candidate's distance.
- ``first`` / ``last``: the span's first or last block, without looking at data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from healer.prune.blockwise import BlockStack
from healer.prune.config import is_span
from healer.prune.depth import _chunks

INITS = ("closest", "first", "last")


def lowest_sum_span(scores: dict[int, float], count: int) -> list[int]:
    """The ``count`` consecutive scored blocks whose summed score is lowest (ties: the earliest).

    Turns any per-block depth criterion (lower = removed first) into a span choice; only windows whose
    every block has a score (lies within the candidates) are considered.
    """
    starts = [s for s in sorted(scores) if all(s + k in scores for k in range(count))]
    if not starts:
        raise ValueError(f"no run of {count} consecutive removable blocks among {sorted(scores)}; lower "
                         "prune.keep_first / prune.keep_last or the amount removed")
    best = min(starts, key=lambda s: (sum(scores[s + k] for k in range(count)), s))
    return list(range(best, best + count))


@dataclass
class SpanFit:
    """How well the identity (a plain cut) and each block of the span stand in for the span, on calibration."""

    span: list[int]
    cosine_cut: float  # mean cos(span input, span output): the paper's similarity; what a plain cut keeps
    mse_cut: float  # mean over tokens of mean-over-hidden (output - input)^2
    cosine: dict[int, float]  # block b of the span fed the span's input, vs the span's output
    mse: dict[int, float]
    tokens: int


def _fit(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(summed cosine, summed per-token MSE) between hidden states ``a`` and ``b`` over all tokens."""
    a, b = a.float(), b.float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).sum().item()
    return cos, (a - b).pow(2).mean(-1).sum().item()


@torch.no_grad()
def measure_span(stack: BlockStack, tokens: torch.Tensor, span: list[int]) -> SpanFit:
    """Run calibration ``tokens`` up to the end of ``span`` and score the cut and every candidate seed."""
    start, end = span[0], span[-1]
    entering, leaving, contexts = [], [], []
    for chunk in _chunks(tokens):
        h = stack.embed(chunk)
        ctx = stack.context(h)
        for i in range(end + 1):
            if i == start:
                entering.append(h)
            with stack.block(i) as block:
                h = stack.run_block(block, i, h, ctx)
        leaving.append(h)
        contexts.append(ctx)
    n = int(tokens.numel())
    cut = [_fit(x, y) for x, y in zip(entering, leaving)]
    cosine, mse = {}, {}
    for b in span:
        with stack.block(b) as block:
            fits = [_fit(stack.run_block(block, b, x, ctx), y) for x, y, ctx in zip(entering, leaving, contexts)]
        cosine[b] = sum(f[0] for f in fits) / n
        mse[b] = sum(f[1] for f in fits) / n
    return SpanFit(list(span), sum(c[0] for c in cut) / n, sum(c[1] for c in cut) / n, cosine, mse, n)


def choose_seed(init: str, span: list[int], fit: SpanFit | None) -> int:
    """The block of ``span`` the replacement starts as, by ``prune.replace.init``."""
    if init == "first":
        return span[0]
    if init == "last":
        return span[-1]
    if fit is None:
        raise ValueError("prune.replace.init: closest needs calibration text (prune.calibration.path)")
    return min(span, key=lambda b: (fit.mse[b], b))


def blocks_to_drop(span: list[int], seed: int) -> list[int]:
    """Every block of the span but the seed, which stays in place as the replacement."""
    return [b for b in span if b != seed]


def describe(kind: str, init: str, span: list[int], seed: int, fit: SpanFit | None) -> dict:
    """The ``replacement`` entry of ``prune_report.json``.

    ``position`` is the replacement's index in the pruned model; ``student_layer`` / ``teacher_layer`` are
    the hidden-state indices (HF ``output_hidden_states``: 0 = embeddings) the replace stage matches.
    """
    position = span[0]  # every block before the span is kept, and the span is one block now
    out = {"kind": kind, "span": span, "init": init, "init_from_block": seed, "position": position,
           "student_layer": position + 1, "teacher_layer": span[-1] + 1}
    if fit is not None:
        out.update({
            "span_cosine": fit.cosine_cut, "measured_on_tokens": fit.tokens,
            "before_training": {"cosine_plain_cut": fit.cosine_cut, "mse_plain_cut": fit.mse_cut,
                                "cosine_init": fit.cosine[seed], "mse_init": fit.mse[seed]},
            "candidates": {str(b): {"cosine": fit.cosine[b], "mse": fit.mse[b]} for b in span},
        })
    return out


def plan(kind: str, init: str, stack: BlockStack, tokens: torch.Tensor | None,
         span: list[int]) -> tuple[list[int], dict]:
    """(blocks to drop, the report's ``replacement`` entry) for replacing ``span`` of the model in ``stack``.

    ``kind`` and ``init`` are ``prune.replace``'s keys; ``tokens`` (calibration) measure the span when given.
    """
    if not is_span(span):
        raise ValueError(f"prune.replace: blocks {span} are not one contiguous span")
    if len(span) < 2:
        raise ValueError(f"prune.replace.kind: {kind} would put 1 block in place of the {len(span)} removed; remove "
                         "at least 2 (prune.ratio / prune.num_blocks) or set prune.replace.kind: none")
    fit = measure_span(stack, tokens, span) if tokens is not None else None
    seed = choose_seed(init, span, fit)
    return blocks_to_drop(span, seed), describe(kind, init, span, seed, fit)

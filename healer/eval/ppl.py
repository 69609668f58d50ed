"""Perplexity over non-overlapping windows of a text, as the pruning papers report it.

The text is tokenized once, cut into windows of ``context_length`` tokens that do
not overlap, and every token after the first of a window is scored. With a BOS
policy of "prepend", each window is ``[BOS] + (context_length - 1)`` text tokens and
all of those text tokens are scored, so the model sees the same start-of-text
marker it was trained with. The policy used is part of the result, because the
same model gives different numbers under the two conventions.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from healer.core.errors import HealerError
from healer.core.textio import BadRecords, encode_in_pieces, read_texts, tokenizer_encoder


def read_text(path: str | Path, max_chars: int | None = None, bad: BadRecords | None = None) -> str:
    """The text a perplexity is measured on: the documents of ``path`` joined with a blank line.

    Documents are what :mod:`healer.core.textio` reads (``.jsonl``/``.json``/``.parquet`` records' ``text``,
    one per line of a ``.txt``; ``.zst``/``.gz`` decompressed), joined the way a web corpus reads as one
    stream. ``max_chars`` stops reading once that much text is in hand, so a cap on tokens does not mean
    decompressing a whole corpus shard. Bad records go to ``bad`` (default: skipped and counted, and
    printed); a file with no usable text is refused naming it.
    """
    bad = bad if bad is not None else BadRecords(setting=None)
    docs = read_texts([path], bad, max_chars=max_chars, what="eval.perplexity_files")
    if bad.counts:
        print(f"perplexity file {path}: {bad.summary()}", file=sys.stderr)
    return "\n\n".join(docs)


def resolve_bos(tokenizer, policy: str) -> int | None:
    """The BOS id to prepend to each window under ``policy`` (auto/always/never), or None for none.

    ``auto`` follows the tokenizer's own default: a Llama-2 tokenizer adds BOS, SmolLM2's does not.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if policy == "never" or bos is None:
        if policy == "always" and bos is None:
            raise HealerError("eval.bos is 'always' but the tokenizer has no BOS token; use 'auto' or 'never'")
        return None
    if policy == "always":
        return bos
    probe = tokenizer("hello").input_ids
    return bos if probe and probe[0] == bos else None


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` with no special tokens (BOS is the window's business, not the text's).

    The text is tokenized in pieces cut where the tokens do not change (:func:`healer.core.textio.split_points`),
    so a large evaluation file needs memory for its ids, not GBs of tokenizer working memory.
    """
    if max_tokens is not None:
        text = text[: max_tokens * 16]  # tokens average well under 16 characters; spare tokenizing the rest
    ids: list[int] = []
    for piece in encode_in_pieces(tokenizer_encoder(tokenizer), text):
        ids.extend(piece)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, tokenizer, text: str | torch.Tensor, context_length: int, bos: str = "auto",
               max_tokens: int | None = None, batch_size: int = 4, progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``text`` (a string, or token ids already made) in non-overlapping windows.

    Args:
        context_length: tokens per window, BOS included when it is prepended.
        bos: "auto", "always" or "never"; see :func:`resolve_bos`.
        max_tokens: read at most this many text tokens.
        batch_size: windows per forward pass.

    Only full windows are scored (the tail shorter than a window is dropped, as the
    papers do), unless the text is shorter than one window; then the whole text is
    one window. Returns ``ppl``, ``nll`` (mean, nats), ``tokens_scored``, ``windows``, ``bos``.
    """
    bos_id = resolve_bos(tokenizer, bos)
    ids = tokenize(tokenizer, text, max_tokens) if isinstance(text, str) else text[:max_tokens]
    span = context_length - 1 if bos_id is not None else context_length
    if span < 1:
        raise HealerError(f"eval.context_lengths: {context_length} is too short to score a token")
    n_windows = len(ids) // span
    if n_windows == 0:
        windows = ids[None, :]
    else:
        windows = ids[: n_windows * span].view(n_windows, span)
    if bos_id is not None:
        windows = torch.cat([torch.full((len(windows), 1), bos_id, dtype=torch.long), windows], dim=1)
    if windows.shape[1] < 2:
        raise HealerError("perplexity: the text has fewer than 2 tokens")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=f"ppl@{context_length}", disable=not progress,
                      leave=False):
        batch = windows[start:start + batch_size].to(device)
        logits = model(batch).logits.float()
        # Window position 0 is never scored; position 0 is BOS when it is prepended, so every text token is.
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens_scored": total_tokens,
        "windows": len(windows),
        "context_length": context_length,
        "bos": {"policy": bos, "prepended": bos_id is not None,
                "bos_token_id": getattr(tokenizer, "bos_token_id", None)},
    }

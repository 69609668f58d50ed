"""Perplexity over non-overlapping windows of a text, as the pruning papers report it.

The text is tokenized once, cut into windows of ``context_length`` tokens that do
not overlap, and every token after the first of a window is scored. With a BOS
policy of "prepend", each window is ``[BOS] + (context_length - 1)`` text tokens and
all of those text tokens are scored, so the model sees the same start-of-text
marker it was trained with. The policy used is part of the result, because the
same model gives different numbers under the two conventions.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from healer.errors import HealerError


def _open_text(path: Path):
    """A text stream over ``path``, decompressing ``.zst`` on the fly."""
    if path.name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def read_text(path: str | Path, max_chars: int | None = None) -> str:
    """The text of a plain text file, or of a JSON-lines / JSON-list file's ``text`` fields (``.zst`` allowed).

    Documents are joined with a blank line, the way a web corpus reads as one stream.
    ``max_chars`` stops reading once that much text is in hand, so a cap on tokens does not
    mean decompressing a whole corpus shard.
    """
    path = Path(path)
    if not path.is_file():
        raise HealerError(f"eval.perplexity_files: {path} does not exist")
    name = path.name[: -len(".zst")] if path.name.endswith(".zst") else path.name
    with _open_text(path) as fh:
        if name.endswith(".jsonl"):
            docs, size = [], 0
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise HealerError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise HealerError(f"{path}:{lineno}: a JSON-lines record needs a string field `text`")
                docs.append(record["text"])
                size += len(record["text"]) + 2
                if max_chars is not None and size >= max_chars:
                    break
            return "\n\n".join(docs)
        if name.endswith(".json"):
            records = json.load(fh)
            if not isinstance(records, list) or not all(isinstance(r, dict) and "text" in r for r in records):
                raise HealerError(f"{path}: a JSON file for perplexity is a list of objects with a `text` field")
            return "\n\n".join(r["text"] for r in records)
        return fh.read(max_chars) if max_chars is not None else fh.read()


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
    """Token ids of ``text`` with no special tokens (BOS is the window's business, not the text's)."""
    if max_tokens is not None:
        text = text[: max_tokens * 16]  # tokens average well under 16 characters; spare tokenizing the rest
    ids = tokenizer(text, add_special_tokens=False).input_ids
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

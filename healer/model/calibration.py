"""Calibration text: N samples of L tokens, drawn reproducibly from any file :mod:`healer.core.textio` reads."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from healer.core.errors import CalibrationError, HealerError
from healer.core.textio import BadRecords, encode_in_pieces, read_texts, tokenizer_encoder


def read_documents(path: str | Path, text_field: str = "text", max_documents: int = 20000,
                   bad_records: str = "skip") -> list[str]:
    """Up to ``max_documents`` non-empty documents of ``path``, read by :mod:`healer.core.textio` (``.jsonl``,
    ``.json``, ``.parquet`` records' ``text_field``, or ``.txt`` with one document per line; ``.zst``/``.gz``).

    Bad records are skipped, counted and reported in one line (``bad_records="strict"``: refused at the
    first); if nothing usable remains the error names the file and the first bad record.
    """
    bad = BadRecords(strict=bad_records == "strict", setting=None)
    try:
        docs = read_texts([path], bad, text_field=text_field, max_docs=max_documents, what="calibration file")
    except HealerError as err:
        raise CalibrationError(str(err)) from None
    if bad.counts:
        print(f"calibration file {path}: {bad.summary()}", file=sys.stderr)
    return docs


def calibration_tokens(docs: list[str], tokenizer, num_samples: int, seq_len: int, seed: int = 0,
                       source: str = "calibration text") -> torch.Tensor:
    """A ``[num_samples, seq_len]`` LongTensor: documents shuffled with ``seed``, joined with EOS, cut in windows.

    Long documents are tokenized in pieces (:func:`healer.core.textio.encode_in_pieces`) and only until enough
    tokens are in hand, so one huge document costs no more memory than its text.
    """
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    need = num_samples * seq_len
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    encode = tokenizer_encoder(tokenizer)
    for i in order:
        for piece in encode_in_pieces(encode, docs[i]):
            ids.extend(piece)
            if len(ids) >= need:
                break
        if eos is not None:
            ids.append(eos)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise CalibrationError(
            f"{source} holds {len(ids)} tokens but {num_samples} samples x {seq_len} tokens = {need} are needed; "
            "lower prune.calibration.num_samples / seq_len or give a larger file"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(num_samples, seq_len)


def load_calibration(path: str | Path, tokenizer, num_samples: int = 10, seq_len: int = 128, seed: int = 0,
                     text_field: str = "text", max_documents: int = 20000, bad_records: str = "skip") -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens from the documents of ``path`` (see :func:`read_documents`)."""
    docs = read_documents(path, text_field=text_field, max_documents=max_documents, bad_records=bad_records)
    return calibration_tokens(docs, tokenizer, num_samples, seq_len, seed, source=f"calibration file {path}")

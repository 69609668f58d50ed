"""Calibration text: N samples of L tokens, drawn reproducibly from a jsonl or plain-text file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from healer.errors import CalibrationError


def read_documents(path: str | Path, text_field: str = "text", max_documents: int = 20000) -> list[str]:
    """Non-empty documents from ``path``: jsonl records' ``text_field`` (``.zst`` allowed), or blank-line
    separated plain text.

    Malformed jsonl lines are skipped; if nothing usable remains the error names the file.
    """
    file = Path(path)
    if not file.is_file():
        raise CalibrationError(f"calibration file {file} does not exist")
    docs: list[str] = []
    bad_lines = 0
    first_bad: int | None = None
    name = file.name[:-4] if file.name.endswith(".zst") else file.name
    is_jsonl = name.endswith((".jsonl", ".json"))
    with _open_text(file) as fh:
        if is_jsonl:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record.get(text_field) if isinstance(record, dict) else None
                except json.JSONDecodeError:
                    text = None
                if not isinstance(text, str) or not text.strip():
                    bad_lines += 1
                    first_bad = first_bad or lineno
                    continue
                docs.append(text)
                if len(docs) >= max_documents:
                    break
        else:
            block: list[str] = []
            for line in fh:
                if line.strip():
                    block.append(line.rstrip("\n"))
                elif block:
                    docs.append("\n".join(block))
                    block = []
                if len(docs) >= max_documents:
                    break
            if block and len(docs) < max_documents:
                docs.append("\n".join(block))
    if not docs:
        hint = (f"; {bad_lines} lines lacked a non-empty {text_field!r} field (first at line {first_bad})"
                if bad_lines else "")
        raise CalibrationError(f"calibration file {file} has no usable text{hint}")
    return docs


def _open_text(file: Path):
    if file.name.endswith(".zst"):
        import io

        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(file, "rb"), closefd=True),
                                encoding="utf-8", errors="replace")
    return open(file, encoding="utf-8", errors="replace")


def calibration_tokens(docs: list[str], tokenizer, num_samples: int, seq_len: int, seed: int = 0,
                       source: str = "calibration text") -> torch.Tensor:
    """A ``[num_samples, seq_len]`` LongTensor: documents shuffled with ``seed``, joined with EOS, cut in windows."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    need = num_samples * seq_len
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for i in order:
        ids.extend(tokenizer(docs[i], add_special_tokens=False)["input_ids"])
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
                     text_field: str = "text", max_documents: int = 20000) -> torch.Tensor:
    docs = read_documents(path, text_field=text_field, max_documents=max_documents)
    return calibration_tokens(docs, tokenizer, num_samples, seq_len, seed, source=f"calibration file {path}")

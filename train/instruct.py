"""Instruction data for LoRA tuning: load records, render prompts, tokenize with the loss on responses only.

Two record shapes are accepted, one per line of a JSONL file, as a JSON list, or as parquet rows:

* Alpaca: ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` may be empty or absent);
* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``.

Two prompt formats render them: the Alpaca template (Stanford Alpaca's exact wording) or the tokenizer's
own chat template. Every token the model should learn to *write* (each assistant reply and the final EOS)
keeps its id in ``labels``; every token it only *reads* (template, instruction, input, user turns) is -100.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from healer.core.errors import HealerError
from healer.core.textio import BadRecords, iter_file_records

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------- loading

def load_records(path: str | Path, max_samples: int | None = None, seed: int = 0) -> list[dict]:
    """Read Alpaca or chat records from a file :mod:`healer.core.textio` reads (a ``.json`` list, ``.jsonl``,
    ``.parquet``, compressed or not) and check their shape.

    ``max_samples`` keeps a seeded random subset (the same one for the same seed), so a short run sees
    a spread of the data instead of its first lines. Raises :class:`HealerError` naming the file and the
    record (``file:N``: line N of JSON lines, record N of a JSON list) at the first record that is not
    JSON, not UTF-8 or neither shape: training data is refused rather than silently thinned.
    """
    path = Path(path)
    if not path.is_file():
        raise HealerError(f"sft.data: {path} does not exist; give an Alpaca-style .json/.jsonl file")
    bad = BadRecords(strict=True, setting=None)
    out = [check_record(record, where) for record, where in iter_file_records(str(path), bad)]
    if not out:
        raise HealerError(f"{path}: no records; expected Alpaca (instruction/input/output) or chat (messages) records")
    if max_samples is not None and max_samples < len(out):
        picks = sorted(random.Random(seed).sample(range(len(out)), max_samples))
        out = [out[i] for i in picks]
    return out


def check_record(record: Any, where: str) -> dict:
    """Return ``record`` normalised (missing Alpaca ``input`` -> ""), or raise naming ``where``."""
    if not isinstance(record, dict):
        raise HealerError(f"{where}: expected an object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise HealerError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for j, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
                raise HealerError(f"{where}: messages[{j}] needs role in {ROLES} and a string content")
        if not any(m["role"] == "assistant" for m in messages):
            raise HealerError(f"{where}: no assistant message, so there is nothing to learn from it")
        return {"messages": messages}
    missing = [k for k in ("instruction", "output") if not isinstance(record.get(k), str)]
    if missing:
        raise HealerError(f"{where}: missing string field(s) {missing}; expected instruction/input/output "
                          "(Alpaca) or messages (chat)")
    inp = record.get("input") or ""
    if not isinstance(inp, str):
        raise HealerError(f"{where}: 'input' must be a string")
    return {"instruction": record["instruction"], "input": inp, "output": record["output"]}


def to_messages(record: dict) -> list[dict]:
    """An Alpaca record as a two-turn chat (instruction and input in the user turn)."""
    if "messages" in record:
        return record["messages"]
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


# ---------------------------------------------------------------- rendering

def resolve_prompt_format(prompt_format: str, tokenizer) -> str:
    """``auto`` -> ``chat`` when the tokenizer carries a chat template, else ``alpaca``."""
    if prompt_format == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise HealerError("sft.prompt_format: chat, but the tokenizer has no chat template; "
                          "use prompt_format: alpaca (or auto)")
    return prompt_format


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """Stanford Alpaca's prompt, ending right where the response starts."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def render_segments(record: dict, tokenizer, prompt_format: str) -> list[tuple[str, bool]]:
    """Split a record into text pieces, each marked ``True`` when the model is trained to produce it."""
    if prompt_format == "alpaca":
        if "messages" in record:
            record = _messages_as_alpaca(record["messages"])
        return [(alpaca_prompt(record["instruction"], record.get("input", "")), False), (record["output"], True)]
    messages = to_messages(record)
    segments: list[tuple[str, bool]] = []
    done = ""  # text rendered so far; every later rendering must extend it
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise HealerError(
                "the tokenizer's chat template does not render a conversation as a growing prefix, so the "
                "reply tokens cannot be located; use sft.prompt_format: alpaca")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _messages_as_alpaca(messages: list[dict]) -> dict:
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if roles != ["user", "assistant"]:
        raise HealerError("prompt_format alpaca takes one user turn and one assistant reply per record; "
                          "use a tokenizer with a chat template (prompt_format: chat) for multi-turn data")
    system = " ".join(m["content"] for m in messages if m["role"] == "system")
    user = next(m["content"] for m in messages if m["role"] == "user")
    reply = next(m["content"] for m in messages if m["role"] == "assistant")
    return {"instruction": user, "input": system, "output": reply}


# ---------------------------------------------------------------- tokenizing

@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class TokenizedSet:
    examples: list[Example]
    prompt_format: str
    dropped: int = 0  # records whose reply fell entirely past max_seq_len
    truncated: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def tokenize_record(record: dict, tokenizer, prompt_format: str, max_seq_len: int | None = None) -> Example:
    """Tokens and labels for one record: -100 on what the model reads, the token id on what it writes.

    Pieces are tokenized one by one and concatenated, so the boundary between prompt and reply is exact.
    An EOS is appended (and supervised) unless the reply already ends its turn with one; this is what
    teaches the tuned model to stop.
    """
    ids: list[int] = []
    labels: list[int] = []
    # Templates write their own BOS into the text; the Alpaca prompt relies on the tokenizer adding it.
    add_bos = prompt_format == "alpaca"
    for k, (text, trained) in enumerate(render_segments(record, tokenizer, prompt_format)):
        piece = tokenizer(text, add_special_tokens=add_bos and k == 0)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in [t for t in labels if t != IGNORE_INDEX]:
        ids.append(eos)
        labels.append(eos)
    if max_seq_len is not None and len(ids) > max_seq_len:
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return Example(ids, labels)


def tokenize_records(records: Iterable[dict], tokenizer, prompt_format: str = "auto",
                     max_seq_len: int = 512) -> TokenizedSet:
    """Tokenize every record; ones with no reply token left after truncation are dropped and counted."""
    fmt = resolve_prompt_format(prompt_format, tokenizer)
    out = TokenizedSet([], fmt)
    for record in records:
        full = tokenize_record(record, tokenizer, fmt)
        ex = Example(full.input_ids[:max_seq_len], full.labels[:max_seq_len])
        if ex.supervised == 0:
            out.dropped += 1
            continue
        out.truncated += len(full.input_ids) > max_seq_len
        out.examples.append(ex)
    if out.dropped:
        out.notes.append(f"{out.dropped} record(s) dropped: their reply starts past sft.max_seq_len={max_seq_len}")
    if not out.examples:
        raise HealerError(f"no instruction example fits in sft.max_seq_len={max_seq_len}; raise it")
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}

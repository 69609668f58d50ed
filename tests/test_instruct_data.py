"""Instruction data: record loading, prompt rendering and the loss mask, token by token."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_tokenizer

from healer.core.errors import HealerError
from healer.train.instruct import (
    IGNORE_INDEX,
    alpaca_prompt,
    collate,
    load_records,
    resolve_prompt_format,
    tokenize_record,
    tokenize_records,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def ids(tok, text, **kw):
    return tok(text, add_special_tokens=False, **kw)["input_ids"]


def test_alpaca_mask_token_by_token():
    tok = tiny_tokenizer()
    record = {"instruction": "add two numbers", "input": "a = 1, b = 2", "output": "return a + b"}
    ex = tokenize_record(record, tok, "alpaca")
    prompt = ids(tok, alpaca_prompt(record["instruction"], record["input"]))
    reply = ids(tok, record["output"])
    # what the model reads, then what it writes, then EOS so it learns to stop
    assert ex.input_ids == prompt + reply + [tok.eos_token_id]
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + reply + [tok.eos_token_id]
    assert "### Input:\na = 1, b = 2" in tok.decode(ex.input_ids)


def test_alpaca_without_input_uses_the_short_template():
    tok = tiny_tokenizer()
    ex = tokenize_record({"instruction": "say hi", "input": "", "output": "hi"}, tok, "alpaca")
    text = tok.decode(ex.input_ids)
    assert "### Input" not in text and text.endswith("### Response:\nhi<|endoftext|>")


def test_chat_template_masks_every_non_assistant_token():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    record = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add 1 and 2"},
                           {"role": "assistant", "content": "3"}, {"role": "user", "content": "and 2 and 2"},
                           {"role": "assistant", "content": "4"}]}
    assert resolve_prompt_format("auto", tok) == "chat"
    ex = tokenize_record(record, tok, "chat")
    eos = tok.eos_token_id
    expect_ids, expect_labels = [], []
    for text, trained in [("<|system|>\nbe brief<|endoftext|>\n"
                           "<|user|>\nadd 1 and 2<|endoftext|>\n<|assistant|>\n", False),
                          ("3<|endoftext|>\n", True),
                          ("<|user|>\nand 2 and 2<|endoftext|>\n<|assistant|>\n", False),
                          ("4<|endoftext|>\n", True)]:
        piece = ids(tok, text)
        expect_ids += piece
        expect_labels += piece if trained else [IGNORE_INDEX] * len(piece)
    assert ex.input_ids == expect_ids
    assert ex.labels == expect_labels
    # the template already closes each reply with EOS: no second one is appended
    assert ex.input_ids.count(eos) == 5 and sum(1 for t in ex.labels if t == eos) == 2


def test_alpaca_records_render_through_the_chat_template():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    ex = tokenize_record({"instruction": "name a fox", "input": "quick", "output": "brown fox"}, tok, "chat")
    supervised = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert supervised == "brown fox<|endoftext|>\n"
    assert "<|user|>\nname a fox\n\nquick" in tok.decode(ex.input_ids)


def test_chat_format_without_template_is_refused():
    with pytest.raises(HealerError, match="no chat template"):
        resolve_prompt_format("chat", tiny_tokenizer())
    assert resolve_prompt_format("auto", tiny_tokenizer()) == "alpaca"


def test_truncation_drops_examples_with_no_reply_left():
    tok = tiny_tokenizer()
    records = [{"instruction": "x " * 200, "output": "late reply"}, {"instruction": "short", "output": "ok reply"}]
    limit = len(ids(tok, alpaca_prompt("short"))) + 2  # room for two reply tokens of the short record
    data = tokenize_records(records, tok, "alpaca", max_seq_len=limit)
    assert data.dropped == 1 and data.truncated == 1 and len(data.examples) == 1
    assert len(data.examples[0].input_ids) == limit and data.examples[0].supervised == 2


def test_collate_pads_outside_attention_and_loss():
    tok = tiny_tokenizer()
    data = tokenize_records([{"instruction": "a", "output": "b"},
                             {"instruction": "longer one here", "output": "c d e"}], tok, "alpaca")
    batch = collate(data.examples, pad_id=tok.pad_token_id)
    short = len(data.examples[0].input_ids)
    assert batch["input_ids"].shape[1] == max(len(e.input_ids) for e in data.examples)
    assert batch["attention_mask"][0, short:].sum() == 0 and (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][1].all()


def test_loading_json_jsonl_and_naming_bad_records(tmp_path):
    alpaca = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(10)]
    (tmp_path / "a.json").write_text(json.dumps(alpaca))
    assert len(load_records(tmp_path / "a.json")) == 10
    subset = load_records(tmp_path / "a.json", max_samples=4, seed=1)
    assert len(subset) == 4 and subset == load_records(tmp_path / "a.json", max_samples=4, seed=1)
    lines = [json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
             "", json.dumps({"instruction": "q", "output": "a"})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    recs = load_records(tmp_path / "c.jsonl")
    assert recs[1] == {"instruction": "q", "input": "", "output": "a"} and "messages" in recs[0]
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(HealerError, match=r"bad.jsonl:2: missing string field"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "noreply.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(HealerError, match="noreply.jsonl:1: no assistant message"):
        load_records(tmp_path / "noreply.jsonl")
    with pytest.raises(HealerError, match="does not exist"):
        load_records(tmp_path / "missing.json")


@pytest.mark.parametrize("body, message", [
    (b'{"instruction": "q", "output": "a"}\n{"instruction": "caf\xe9", "output": "a"}\n',
     r"data.jsonl:2: non_utf8 \(invalid continuation byte at byte \d+\); fix the file$"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", r"data.jsonl:1: (non_utf8|malformed_json)"),
    (b'{"instruction": "q", "output": "a"}\n{"instruction": "q", "output"\n', r"data.jsonl:2: malformed_json"),
    (b"", r"data.jsonl: empty_file"),
])
def test_binary_or_broken_sft_data_is_one_line_naming_file_and_line(tmp_path, body, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(body)
    with pytest.raises(HealerError, match=message) as caught:
        load_records(path)
    assert "\n" not in str(caught.value)


def test_a_json_list_that_is_not_valid_json_names_the_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"instruction": "q", "output": "a"},\n {"instruction": "q" "output": "a"}]')
    with pytest.raises(HealerError, match=r"data.json: corrupt_shard \(not valid JSON at line 2 column 22"):
        load_records(path)


def test_real_alpaca_file(shared_data):
    path = shared_data / "instruct" / "alpaca_data.json"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    records = load_records(path)
    assert len(records) > 50_000
    with_input = sum(1 for r in records if r["input"])
    assert 0 < with_input < len(records)
    data = tokenize_records(load_records(path, max_samples=200), tiny_tokenizer(), "alpaca", max_seq_len=512)
    assert len(data.examples) + data.dropped == 200
    assert all(e.supervised > 0 and e.labels[-1] == e.input_ids[-1] for e in data.examples)

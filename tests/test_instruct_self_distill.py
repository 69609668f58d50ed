"""Self-distilled instruction data: prompts built from corpus text, replies from the teacher, Alpaca JSON out."""

from __future__ import annotations

import json

import pytest
from helpers import save_tiny

from healer.cli import main as cli_main
from healer.core.errors import HealerError
from healer.train.instruct import load_records
from healer.train.self_distill import build_prompts, pydoc_texts, read_texts, tidy_reply


def test_prompts_quote_the_corpus_and_are_deterministic():
    texts = pydoc_texts()
    assert len(texts) > 50  # every CPython carries its documentation topics
    prompts = build_prompts(texts, 40, seed=3, passage_chars=300)
    assert prompts == build_prompts(texts, 40, seed=3, passage_chars=300)
    assert prompts != build_prompts(texts, 40, seed=4, passage_chars=300)
    assert len({(p["instruction"], p["input"]) for p in prompts}) == 40
    quoted = [p["input"] for p in prompts if p["input"]]
    assert quoted and all(len(q) <= 300 and any(q[:30] in t for t in texts) for q in quoted)
    assert len({p["instruction"].split('"')[0] for p in prompts}) >= 4  # several kinds of task


def test_reading_a_corpus_directory_of_zst_shards(tmp_path):
    import zstandard

    shard = tmp_path / "train" / "chunk1"
    shard.mkdir(parents=True)
    lines = [json.dumps({"text": f"doc {i}", "meta": {"redpajama_set_name": "X"}}) for i in range(5)]
    (shard / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    (shard / "b.jsonl").write_text('{"text": "plain"}\nnot json\n')
    assert read_texts(tmp_path) == [f"doc {i}" for i in range(5)] + ["plain"]
    with pytest.raises(HealerError, match=r"^sft.self_distill.corpus: path \S*nothing-here' does not exist"):
        read_texts(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "junk.txt").write_bytes(b"\x00\x01binary\n\xff\xfe\n")
    with pytest.raises(HealerError, match=r"^sft.self_distill.corpus: \S*junk.txt has no usable text.*binary 1, "
                                          r"non_utf8 1[^\n]*$"):
        read_texts(tmp_path / "empty")


def test_cut_off_replies_lose_their_unfinished_sentence():
    assert tidy_reply("One. Two is cut", finished=False) == "One."
    assert tidy_reply("  Done.  ", finished=True) == "Done."
    assert tidy_reply("no sentence end at all", finished=False) == "no sentence end at all"


def test_instruct_build_verb_writes_alpaca_json(tmp_path):
    model = save_tiny(tmp_path, layers=2)
    out = tmp_path / "made.json"
    code = cli_main(["instruct", "build", "--model", str(model), "--output", str(out), "--num-examples", "6",
                     "--max-new-tokens", "16", "--sft.self_distill.passage_chars", "120"])
    assert code == 0
    records = load_records(out)  # the SFT loader accepts it as is
    assert 1 <= len(records) <= 6 and all(r["output"] for r in records)
    assert cli_main(["instruct", "oops", "--model", str(model)]) == 2  # wrong sub-action: usage, no traceback

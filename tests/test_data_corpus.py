"""The offline demo corpus (built from the standard library) and the `healer data` verb."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard
from helpers import tiny_tokenizer

from healer.cli import main as healer_main
from healer.train.data import DataConfig, build_demo_corpus, build_loader


def read_shard(path: Path) -> list[dict]:
    body = zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
    return [json.loads(line) for line in body.decode("utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo_corpus")
    return out, build_demo_corpus(out)


def test_demo_corpus_is_slimpajama_shaped_from_the_stdlib(corpus):
    out, counts = corpus
    train = sorted((out / "train" / "chunk1").glob("example_train_*.jsonl.zst"))
    holdout = out / "validation" / "chunk1" / "example_holdout_0.jsonl.zst"
    assert len(train) == counts["train_shards"] >= 4 and holdout.is_file()
    records = [r for p in train for r in read_shard(p)]
    val = read_shard(holdout)
    assert len(records) == counts["train_documents"] and len(val) == counts["validation_documents"] >= 1
    assert {r["meta"]["redpajama_set_name"] for r in records} == {"PydocTopics", "StdlibDocstrings"}
    assert 1_000_000 <= counts["characters"] <= 3_000_000
    texts = {r["text"] for r in records}
    assert not texts & {r["text"] for r in val}, "held-out documents are not trained on"
    assert any(t.startswith("Module json") for t in texts) and any("assert" in t for t in texts)
    assert not any(" at 0x" in t for t in texts), "object addresses would make the corpus differ run to run"


def test_cli_build_is_byte_identical_to_the_function(tmp_path):
    assert healer_main(["data", "build-corpus", "--output", str(tmp_path / "a"), "--max-docs", "30"]) == 0
    counts = build_demo_corpus(tmp_path / "b", max_docs=30)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.zst"))
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.zst"))
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert counts["train_documents"] + counts["validation_documents"] == 30


def test_pipeline_reads_the_demo_corpus_by_domain(corpus):
    out, _ = corpus
    cfg = DataConfig(sources=[{"path": str(out / "train"), "domains": {"PydocTopics": 1, "StdlibDocstrings": 1}}],
                     validation=[{"path": str(out / "validation")}], seq_len=128)
    tok = tiny_tokenizer()
    loader = build_loader(cfg, tok, micro_batch_size=2)
    for i, _ in enumerate(loader):
        if i == 20:
            break
    assert all(n > 0 for n in loader.stats()["tokens"].values())
    assert len(list(build_loader(cfg, tok, micro_batch_size=2, split="validation"))) > 0


def test_data_stats_shows_sources_skips_and_a_block(corpus, tmp_path, capsys):
    from transformers import LlamaConfig

    out, _ = corpus
    model_dir = tmp_path / "tiny"
    tiny_tokenizer().save_pretrained(model_dir)
    LlamaConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32).save_pretrained(model_dir)
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "notes.jsonl").write_text('{"text": "def add(a, b):\\n    return a + b"}\n{"text": broken\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"source": str(model_dir)}, "data": {
        "seq_len": 64, "sources": [{"path": str(out / "train"), "weight": 0.8},
                                   {"path": str(extra), "name": "notes", "weight": 0.2}]}}))
    assert healer_main(["data", "stats", "--config", str(recipe), "--batches", "30"]) == 0
    shown = capsys.readouterr().out
    assert "\ntrain " in shown and "\nnotes " in shown and "skipped: malformed_json" in shown
    assert shown.count("notes.jsonl:2: malformed_json") == 1 and "sample block (64 tokens" in shown
    assert healer_main(["data", "stats"]) == 2, "stats without a recipe says what to give"

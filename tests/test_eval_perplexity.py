"""Perplexity in non-overlapping windows, the BOS policy, and the context-length guard."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from healer.core.errors import HealerError
from healer.core.textio import BadRecords
from healer.eval import perplexity, read_text
from healer.eval.config import EvalConfig
from healer.eval.ppl import tokenize
from healer.eval.suite import evaluate


class ToyTokenizer:
    """A character tokenizer with a BOS it adds by default, like Llama-2's (ids: 1 = BOS, 3.. = bytes)."""

    bos_token_id = 1
    eos_token_id = 2

    def __init__(self, adds_bos: bool = True):
        self.adds_bos = adds_bos

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + (b % 120) for b in text.encode()]
        if add_special_tokens and self.adds_bos:
            ids = [self.bos_token_id] + ids

        class Out:
            input_ids = ids
        return Out()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


TEXT = "the quick brown fox jumps over the lazy dog. " * 8  # 360 characters -> 360 tokens


def reference_ppl(model, windows: torch.Tensor) -> float:
    """Mean token NLL the way transformers computes a causal LM loss, over all windows."""
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))  # windows are equal length, so the mean of means is the mean


def test_windows_without_bos_match_transformers_loss(model):
    tok = ToyTokenizer(adds_bos=True)
    result = perplexity(model, tok, TEXT, 32, bos="never", progress=False)
    ids = torch.tensor(tok(TEXT, add_special_tokens=False).input_ids)
    windows = ids[: (len(ids) // 32) * 32].view(-1, 32)
    assert result["windows"] == len(ids) // 32 == 11
    assert result["tokens_scored"] == 11 * 31  # the first token of a window has nothing to predict it
    assert result["ppl"] == pytest.approx(reference_ppl(model, windows), rel=1e-4)
    assert result["bos"]["prepended"] is False


def test_bos_auto_follows_the_tokenizer_and_scores_every_text_token(model):
    with_bos = perplexity(model, ToyTokenizer(adds_bos=True), TEXT, 32, bos="auto", progress=False)
    without = perplexity(model, ToyTokenizer(adds_bos=False), TEXT, 32, bos="auto", progress=False)
    assert with_bos["bos"] == {"policy": "auto", "prepended": True, "bos_token_id": 1}
    assert without["bos"]["prepended"] is False
    # [BOS] + 31 text tokens per window: 360 // 31 = 11 windows, all 31 text tokens of each scored
    assert with_bos["windows"] == 11 and with_bos["tokens_scored"] == 11 * 31
    ids = torch.tensor(ToyTokenizer()(TEXT, add_special_tokens=False).input_ids)
    windows = torch.cat([torch.ones(11, 1, dtype=torch.long), ids[: 11 * 31].view(11, 31)], dim=1)
    assert with_bos["ppl"] == pytest.approx(reference_ppl(model, windows), rel=1e-4)
    assert with_bos["ppl"] != pytest.approx(without["ppl"], rel=1e-6)


def test_max_tokens_caps_what_is_read(model):
    result = perplexity(model, ToyTokenizer(), TEXT, 16, bos="never", max_tokens=64, progress=False)
    assert result["windows"] == 4 and result["tokens_scored"] == 4 * 15


def test_jsonl_text_is_joined_and_bad_lines_are_named(tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_text(good) == "one\n\ntwo"
    import zstandard

    shard = tmp_path / "shard.jsonl.zst"
    lines = "".join(json.dumps({"text": f"doc {i} " * 50, "meta": {}}) + "\n" for i in range(100))
    shard.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    assert read_text(shard).count("doc 99") == 50
    capped = read_text(shard, max_chars=1000)  # stops after the documents that reach 1000 characters
    assert 1000 <= len(capped) < 1000 + 400 and "doc 3 " in capped and "doc 4 " not in capped
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    skipped = BadRecords()
    assert read_text(bad, bad=skipped) == "one"  # the one policy: skipped and counted, with file and line
    assert skipped.counts == {"missing_text": 1} and skipped.examples[0].startswith(f"{bad}:2: missing_text")
    with pytest.raises(HealerError, match=r"^[^\n]*bad.jsonl:2: missing_text[^\n]*$"):
        read_text(bad, bad=BadRecords(strict=True))


def test_gzip_json_and_txt_files_are_read_as_text(tmp_path):
    import gzip

    docs = [f"document {i} about foxes" for i in range(5)]
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode()))
    (tmp_path / "b.json").write_text(json.dumps([{"text": d} for d in docs], indent=2))
    (tmp_path / "c.txt").write_text("\n".join(docs) + "\n\n")  # .txt: one document per line
    for name in ("a.jsonl.gz", "b.json", "c.txt"):
        assert read_text(tmp_path / name) == "\n\n".join(docs), name


def test_invalid_json_file_is_one_line_naming_it(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"text": "one"},\n {"text": "two"\n')
    with pytest.raises(HealerError, match=r"^eval.perplexity_files: \S*broken.json has no usable text.*corrupt_shard.*"
                                          r"not valid JSON at line 3[^\n]*$"):
        read_text(broken)


def test_a_long_text_is_tokenized_in_pieces_to_the_same_ids():
    from helpers import tiny_tokenizer

    import healer.core.textio as textio

    tok = tiny_tokenizer()
    text = ("The quick brown fox jumps over the lazy dog.\n  def add(a, b):\n    return a + b  " * 400)
    whole = tok(text, add_special_tokens=False).input_ids
    assert len(textio.split_points(text, 2000)) > 10
    pieces = [i for piece in textio.encode_in_pieces(textio.tokenizer_encoder(tok), text, 2000) for i in piece]
    assert pieces == whole
    assert tokenize(tok, text).tolist() == whole
    assert tokenize(tok, text, max_tokens=100).tolist() == whole[:100]


@pytest.fixture
def model_dir(model, tmp_path):
    from healer.model.modeling import save_and_verify

    model_dir = tmp_path / "model"
    save_and_verify(model, None, model_dir)
    # a tokenizer for the saved dir: a byte-level BPE made in-process (no download)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(33 + i): i for i in range(90)}
    vocab["[UNK]"] = 90
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(model_dir)
    return model_dir


def test_context_longer_than_the_model_is_skipped_with_a_note(model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    cfg = EvalConfig(perplexity_files=[str(text)], context_lengths=[16, 128])
    result = evaluate(str(model_dir), cfg, tmp_path / "out")
    assert result["perplexity"]["text.txt"]["16"]["ppl"] > 1
    assert "max_position_embeddings=64" in result["perplexity"]["text.txt"]["128"]["skipped"]
    assert any("128" in note for note in result["notes"])
    on_disk = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert on_disk["perplexity"] == json.loads(json.dumps(result["perplexity"]))
    assert on_disk["bos"]["prepended"] is False


def test_files_with_the_same_name_are_kept_apart_in_eval_json(model_dir, tmp_path):
    for folder, text in (("wiki", TEXT), ("code", "def add(a, b): return a + b\n" * 12)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "test.txt").write_text(text)
    files = [str(tmp_path / "wiki" / "test.txt"), str(tmp_path / "code" / "test.txt")]
    result = evaluate(str(model_dir), EvalConfig(perplexity_files=files, context_lengths=[16]), tmp_path / "out")
    assert list(result["perplexity"]) == ["wiki/test.txt", "code/test.txt"]
    assert result["perplexity"]["wiki/test.txt"]["16"]["ppl"] != result["perplexity"]["code/test.txt"]["16"]["ppl"]
    with pytest.raises(HealerError, match=r"^eval.perplexity_files lists \S*test.txt twice"):
        evaluate(str(model_dir), EvalConfig(perplexity_files=[files[0], files[0]]), tmp_path / "out2")
    with pytest.raises(HealerError, match=r"^eval.perplexity_files: \S*nope.txt does not exist$"):
        evaluate(str(model_dir), EvalConfig(perplexity_files=[str(tmp_path / "nope.txt")]), tmp_path / "out3")

"""The one text reader: what each file type means, the bad-record policy, long texts in pieces."""

from __future__ import annotations

import gzip
import json
import os
import random

import pytest
import zstandard
from helpers import tiny_tokenizer

from healer.core.errors import HealerError
from healer.core.textio import BadRecords, file_kind, read_texts, split_points, tokenizer_encoder
from healer.model.calibration import calibration_tokens, load_calibration

DOCS = ["first document, one line", "second: with 'quotes' and ünïcode", "third"]


def write_every_kind(folder) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = "".join(json.dumps({"text": d, "meta": {"n": i}}) + "\n" for i, d in enumerate(DOCS)).encode()
    files = {
        "a.jsonl": jsonl, "a.jsonl.zst": zstandard.ZstdCompressor().compress(jsonl), "a.jsonl.gz": gzip.compress(jsonl),
        "a.json": json.dumps([{"text": d} for d in DOCS], indent=2).encode(),
        "data.json": json.dumps({"data": [{"text": d} for d in DOCS]}).encode(),
        "lines.json": jsonl,  # a .json file holding JSON lines
        "a.txt": ("\r\n".join(DOCS) + "\n\n   \n").encode(),  # one document per line; CRLF and blank lines
        "a.txt.zst": zstandard.ZstdCompressor().compress(("\n".join(DOCS)).encode()),
    }
    for name, body in files.items():
        (folder / name).write_bytes(body)
    pq.write_table(pa.Table.from_pylist([{"text": d} for d in DOCS]), folder / "a.parquet", row_group_size=2)
    return {name: str(folder / name) for name in [*files, "a.parquet"]}


def test_every_file_type_gives_the_same_documents(tmp_path):
    for name, path in write_every_kind(tmp_path).items():
        bad = BadRecords()
        assert read_texts([path], bad) == DOCS, name
        assert bad.counts == {}, name
    kinds = [file_kind(p) for p in ("d/x.JSONL.ZST", "x.txt.gz", "x.parquet", "x.json", "wiki.valid.tokens",
                                    "x.ndjson", "x.csv", "x.parquet.gz", "d.jsonl/README", "x")]
    assert kinds == ["jsonl", "txt", "parquet", "json", "txt", "jsonl", None, None, None, None]
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(HealerError, match=r"^\S*x.csv: unknown file type; name it .jsonl"):
        read_texts([tmp_path / "x.csv"], BadRecords())


def test_one_policy_skip_and_count_or_strict_with_file_and_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "good"}\n{"text": "broken"\n{"body": "no text"}\n{"text": "  "}\n'
                     b'{"text": "caf\xe9"}\n[1, 2]\n\n{"text": "also good"}\n')
    bad = BadRecords()
    assert read_texts([path], bad) == ["good", "also good"]
    assert bad.counts == {"malformed_json": 2, "missing_text": 1, "empty_text": 1, "non_utf8": 1}
    assert bad.examples[0].startswith(f"{path}:2: malformed_json")
    assert "first at line 2 of" in bad.summary()
    with pytest.raises(HealerError, match=rf"^{path}:2: malformed_json \(Expecting ',' delimiter\); fix the file or "
                                          r"set data.bad_records: skip to skip and count such records$"):
        read_texts([path], BadRecords(strict=True))
    with pytest.raises(HealerError, match=r"^prune.calibration.path: \S*nothing.jsonl does not exist$"):
        read_texts([tmp_path / "nothing.jsonl"], BadRecords(), what="prune.calibration.path")


def test_split_points_cut_before_a_space_and_keep_every_character():
    rng = random.Random(0)
    text = "".join(rng.choice(["word", " ", "  ", "\n", ".", "x" * 30, "\t", "é"]) for _ in range(20000))
    cuts = split_points(text, 500)
    assert cuts[0] == 0 and cuts[-1] == len(text) and len(cuts) > 20
    pieces = [text[a:b] for a, b in zip(cuts, cuts[1:])]
    assert "".join(pieces) == text and all(0 < len(p) <= 500 for p in pieces)
    assert all(text[c] == " " and not text[c - 1].isspace() for c in cuts[1:-1])
    assert split_points("x" * 1200, 500) == [0, 500, 1000, 1200]  # no space at all: cut at the limit


def test_calibration_from_a_huge_document_equals_tokenizing_it_whole(tmp_path):
    tok = tiny_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b " * 40_000  # 2.9 MB
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    tokens = load_calibration(path, tok, num_samples=4, seq_len=256)
    head = tok(text[:20_000], add_special_tokens=False).input_ids
    assert tokens.flatten().tolist() == head[:1024]
    short = calibration_tokens([text[:10_000]], tok, num_samples=2, seq_len=64)
    assert short.flatten().tolist() == head[:128]


def test_non_fast_tokenizers_encode_through_their_call():
    class Chars:
        def __call__(self, text, add_special_tokens=True):
            class Out:
                input_ids = [ord(c) for c in text]
            return Out()

    assert tokenizer_encoder(Chars())(["ab", "c"]) == [[97, 98], [99]]


def test_a_file_digest_is_taken_once_per_version_of_the_file(tmp_path, monkeypatch):
    import hashlib

    from healer.core import hashing

    monkeypatch.setenv("HEALER_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 4096)
    reads = []
    real = hashing.sha256
    monkeypatch.setattr(hashing, "sha256", lambda p: reads.append(p) or real(p))
    assert hashing.file_digest(f) == hashlib.sha256(b"a" * 4096).hexdigest()
    assert hashing.file_digest(f) == hashlib.sha256(b"a" * 4096).hexdigest() and len(reads) == 1  # cached
    before = f.stat()
    f.write_bytes(b"a" * 2048 + b"b" + b"a" * 2047)  # same size, rewritten in place (a moment later)
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns + 10**7))
    assert hashing.file_digest(f) == hashlib.sha256(b"a" * 2048 + b"b" + b"a" * 2047).hexdigest()
    assert len(reads) == 2

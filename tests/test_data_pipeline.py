"""The corpus stream: packing, sharding over ranks and workers, exact resume, mixture, bad input, formats.

Documents are "d<i> w.. w.." so each one's id token shows where it landed; a word-level tokenizer
built in-process maps every word to one id.
"""

from __future__ import annotations

import gzip
import io
import json
import random
from pathlib import Path

import pytest
import torch
import zstandard

from healer.core.errors import HealerError
from healer.train.data import DataConfig, build_loader

N_DOCS = 120


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", "<bos>"] + [f"d{i}" for i in range(1000)] + [f"w{i}" for i in range(50)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")


def make_docs(n: int = N_DOCS, first: int = 0, domains=("A", "B", "C"), seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(first, first + n):
        words = " ".join(f"w{rng.randrange(50)}" for _ in range(rng.randrange(2, 40)))
        docs.append({"text": f"d{i} {words}", "meta": {"redpajama_set_name": domains[i % len(domains)]}})
    return docs


def write_shards(folder: Path, docs: list[dict], per_shard: int, suffix: str = ".jsonl.zst") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(0, len(docs), per_shard):
        body = b"".join(json.dumps(d).encode() + b"\n" for d in docs[k:k + per_shard])
        path = folder / f"example_train_{k // per_shard}{suffix}"
        if suffix.endswith(".zst"):
            body = zstandard.ZstdCompressor().compress(body)
        elif suffix.endswith(".gz"):
            body = gzip.compress(body, mtime=0)
        path.write_bytes(body)
        paths.append(path)
    return paths


def take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append({k: v.clone() for k, v in batch.items()})
        if len(out) == n:
            break
    return out


def expected_stream(tok, docs: list[dict]) -> list[int]:
    ids = []
    for d in docs:
        ids += tok(d["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids


def doc_ids(tok, batches) -> list[int]:
    words = tok.convert_ids_to_tokens(torch.cat([b["input_ids"].flatten() for b in batches]).tolist())
    return [int(w[1:]) for w in words if w.startswith("d")]


def test_blocks_are_the_documents_end_to_end_with_eos(tmp_path, tok):
    docs = make_docs(40)
    write_shards(tmp_path / "c", docs, per_shard=15, suffix=".jsonl")
    cfg = DataConfig(sources=[{"path": str(tmp_path / "c")}], seq_len=16, on_exhausted="stop", shuffle_files=False,
                     tokenizer_batch_size=7, shuffle_blocks=False)
    batches = list(build_loader(cfg, tok, rank=0, world_size=1, micro_batch_size=2))
    got = torch.cat([b["input_ids"].flatten() for b in batches]).tolist()
    want = expected_stream(tok, docs)
    assert all(b["input_ids"].shape == (2, 16) and b["input_ids"].dtype == torch.long for b in batches)
    assert got == want[: len(got)]
    assert len(want) - len(got) < 2 * 16, "only the last partial micro-batch may be dropped"


def test_shuffled_blocks_spread_a_long_document_and_are_the_same_blocks(tmp_path, tok):
    """A long document among short ones: read in order it fills consecutive steps; shuffled (the default), its
    blocks are spread over the batch, and the stream hands out exactly the same blocks, resumably."""
    docs = make_docs(30)
    docs.insert(3, {"text": "d99 " + " ".join(f"w{i % 50}" for i in range(400))})
    write_shards(tmp_path / "c", docs, per_shard=31)

    def blocks(shuffle: bool) -> list[tuple[int, ...]]:
        cfg = DataConfig(sources=[{"path": str(tmp_path / "c")}], seq_len=8, on_exhausted="stop",
                         tokenizer_batch_size=64, shuffle_blocks=shuffle)
        return [tuple(b["input_ids"][0].tolist()) for b in build_loader(cfg, tok, micro_batch_size=1)]

    ordered, shuffled = blocks(False), blocks(True)
    assert sorted(shuffled) == sorted(ordered) and shuffled != ordered
    flat = [t for b in ordered for t in b]
    start = flat.index(tok.convert_tokens_to_ids("d99"))
    end = flat.index(tok.eos_token_id, start)
    inside = {b for i, b in enumerate(ordered) if start <= 8 * i and 8 * (i + 1) <= end}  # the long document's

    def longest_run(seq: list[tuple[int, ...]]) -> int:
        best = run = 0
        for b in seq:
            run = run + 1 if b in inside else 0
            best = max(best, run)
        return best

    assert longest_run(ordered) >= 40  # ~400 tokens of one document in a row
    assert longest_run(shuffled) <= 10

    cfg = DataConfig(sources=[{"path": str(tmp_path / "c")}], seq_len=8, on_exhausted="stop", tokenizer_batch_size=64)
    for k in (1, 17, 60):
        first = build_loader(cfg, tok, micro_batch_size=1)
        take(first, k)
        resumed = build_loader(cfg, tok, micro_batch_size=1)
        resumed.load_state_dict(first.state_dict())
        assert [tuple(b["input_ids"][0].tolist()) for b in resumed] == shuffled[k:]


def test_position_ids_restart_after_each_document(tmp_path, tok):
    write_shards(tmp_path / "c", make_docs(30), per_shard=30, suffix=".jsonl")
    cfg = DataConfig(sources=[{"path": str(tmp_path / "c")}], seq_len=32, reset_position_ids=True)
    for batch in take(build_loader(cfg, tok, rank=0, world_size=1, micro_batch_size=2), 5):
        for ids, pos in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist()):
            assert pos[0] == 0
            for t in range(1, len(ids)):
                assert pos[t] == (0 if ids[t - 1] == tok.eos_token_id else pos[t - 1] + 1)


@pytest.mark.parametrize("n_shards", [6, 2], ids=["shards-per-worker", "fewer-shards-than-workers"])
def test_ranks_and_workers_read_every_document_exactly_once(tmp_path, tok, n_shards):
    docs = make_docs(90)
    write_shards(tmp_path / "c", docs, per_shard=-(-len(docs) // n_shards))
    # two domains of one stream plus nothing else: every document belongs to exactly one entry
    cfg = DataConfig(sources=[{"path": str(tmp_path / "c" / "*.jsonl.zst"), "domains": {"A": 1, "B": 1, "C": 2}}],
                     seq_len=2, on_exhausted="drain", num_workers=2, tokenizer_batch_size=5)
    seen: list[int] = []
    docs_counted = 0
    for rank in range(2):
        loader = build_loader(cfg, tok, rank=rank, world_size=2, micro_batch_size=1)
        # seq_len 2: a dropped tail is at most the last EOS, so every document's id token comes out
        seen += doc_ids(tok, list(loader))
        docs_counted += sum(loader.stats()["documents"].values())
    assert sorted(seen) == list(range(90))
    assert docs_counted == 90


def mixed_config(root: Path, **kw) -> DataConfig:
    write_shards(root / "slim", make_docs(150), per_shard=20)
    write_shards(root / "extra", make_docs(60, first=500, domains=("X",)), per_shard=25, suffix=".jsonl")
    base = dict(sources=[{"path": str(root / "slim"), "domains": {"A": 0.5, "B": 0.3, "C": 0.2}, "weight": 3},
                         {"path": str(root / "extra"), "name": "extra"}],
                seq_len=24, num_workers=2, tokenizer_batch_size=7)
    return DataConfig(**{**base, **kw})


def test_resume_gives_the_same_batches_token_by_token(tmp_path, tok):
    cfg = mixed_config(tmp_path, reset_position_ids=True)
    total = 26
    for rank in range(2):
        ref_loader = build_loader(cfg, tok, rank=rank, world_size=2, micro_batch_size=2)
        reference = take(ref_loader, total)
        mid_doc = 0
        for cut in (1, 6, 17):  # inside a document batch, across shards and into the second epoch
            first = build_loader(cfg, tok, rank=rank, world_size=2, micro_batch_size=2)
            assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(take(first, cut), reference))
            buf = io.BytesIO()
            torch.save(first.state_dict(), buf)
            assert buf.tell() < 64 * 1024, "the data state is small: positions, not token buffers"
            buf.seek(0)
            resumed = build_loader(cfg, tok, rank=rank, world_size=2, micro_batch_size=2)
            resumed.load_state_dict(torch.load(buf, weights_only=False))
            rest = take(resumed, total - cut)
            for a, b in zip(rest, reference[cut:]):
                assert torch.equal(a["input_ids"], b["input_ids"])
                assert torch.equal(a["position_ids"], b["position_ids"])
            assert resumed.stats() == ref_loader.stats()
            mid_doc += not tok.convert_ids_to_tokens(reference[cut]["input_ids"][0, 0].item()).startswith("d")
        assert mid_doc, "at least one cut falls inside a document"


def test_iterating_again_continues_after_the_last_batch(tmp_path, tok):
    cfg = mixed_config(tmp_path, num_workers=0)
    reference = take(build_loader(cfg, tok, micro_batch_size=2), 12)
    loader = build_loader(cfg, tok, micro_batch_size=2)
    got = take(loader, 5) + take(loader, 7)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(got, reference))


def test_resume_with_other_ranks_or_workers_is_refused(tmp_path, tok):
    cfg = mixed_config(tmp_path, num_workers=0)
    loader = build_loader(cfg, tok, rank=0, world_size=2, micro_batch_size=2)
    take(loader, 2)
    other = build_loader(cfg, tok, rank=0, world_size=4, micro_batch_size=2)
    with pytest.raises(HealerError, match="world_size"):
        other.load_state_dict(loader.state_dict())


def test_mixture_follows_token_weights(tmp_path, tok):
    short = [{"text": "d1 " + "w1 " * 4} for _ in range(400)]
    long = [{"text": "d2 " + "w2 " * 60} for _ in range(100)]
    write_shards(tmp_path / "short", short, per_shard=100, suffix=".jsonl")
    write_shards(tmp_path / "long", long, per_shard=50, suffix=".jsonl")
    cfg = DataConfig(sources=[{"path": str(tmp_path / "short"), "weight": 0.7},
                              {"path": str(tmp_path / "long"), "weight": 0.3}], seq_len=64, seed=3)
    loader = build_loader(cfg, tok, micro_batch_size=4)
    take(loader, 150)  # 38k tokens
    tokens = loader.stats()["tokens"]
    share = tokens["short"] / sum(tokens.values())
    assert abs(share - 0.7) < 0.03, tokens  # stated tolerance: 3 points on ~40k tokens


def test_bad_records_are_skipped_and_counted_or_refused(tmp_path, tok):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(
        b'{"text": "d1 w1"}\n'
        b'{"text": "d2 w2",\n'  # malformed JSON (line 2)
        b'{"txt": "d3"}\n'  # no text field
        b'{"text": "   "}\n'  # empty text
        b'{"text": "d4 \xff\xfe w4"}\n'  # not UTF-8
        b'\n'
        b'{"text": "d5 w5"}\n'
    )
    (folder / "b.jsonl").write_bytes(b"")
    frames = [zstandard.ZstdCompressor().compress(b"".join(json.dumps({"text": f"d{i} w1 w2"}).encode() + b"\n"
                                                           for i in range(k, k + 50))) for k in range(100, 400, 50)]
    (folder / "c.jsonl.zst").write_bytes(b"".join(frames)[:-20])  # the last of 6 frames is cut short
    (folder / "d.jsonl.zst").write_bytes(frames[0][:30] + b"\x00" * 64 + frames[0][30:])  # damaged inside
    cfg = DataConfig(sources=[{"path": str(folder)}], seq_len=2, on_exhausted="drain", shuffle_files=False,
                     shuffle_blocks=False)
    loader = build_loader(cfg, tok, micro_batch_size=1)
    seen = doc_ids(tok, list(loader))
    stats = loader.stats()
    assert stats["skipped"] == {"malformed_json": 1, "missing_text": 1, "empty_text": 1, "non_utf8": 1,
                                "empty_file": 1, "corrupt_shard": 2}
    assert seen[:2] == [1, 5] and seen[2:] == list(range(100, 350))
    assert any(str(folder / "a.jsonl") + ":2: malformed_json" in e for e in stats["skipped_examples"])
    assert any("c.jsonl.zst" in e and "truncated" in e for e in stats["skipped_examples"])
    assert any("d.jsonl.zst:1: corrupt_shard (zstd" in e for e in stats["skipped_examples"])

    for workers in (0, 1):  # from a worker process too, the message comes through as it is
        strict = build_loader(cfg.model_copy(update={"bad_records": "strict", "num_workers": workers}), tok,
                              micro_batch_size=1)
        with pytest.raises(HealerError, match=r"^[^\n]*a\.jsonl:2: malformed_json[^\n]*$"):
            list(strict)


def test_every_format_gives_the_same_tokens(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(30)
    streams = {}
    for suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        write_shards(tmp_path / suffix.strip("."), docs, per_shard=30, suffix=suffix)
    pq.write_table(pa.Table.from_pylist(docs), tmp_path / "docs.parquet", row_group_size=7)
    (tmp_path / "docs.txt").write_text("".join(d["text"] + "\n" for d in docs))
    (tmp_path / "docs.txt.gz").write_bytes(gzip.compress((tmp_path / "docs.txt").read_bytes()))
    (tmp_path / "docs.json").write_text(json.dumps(docs, indent=1))  # a JSON list, pretty-printed
    for path in ("jsonl", "jsonl.gz", "jsonl.zst/*.zst", "docs.parquet", "docs.txt", "docs.txt.gz", "docs.json"):
        cfg = DataConfig(sources=[{"path": str(tmp_path / path)}], seq_len=8, on_exhausted="stop")
        batches = build_loader(cfg, tok, micro_batch_size=1)
        streams[path] = torch.cat([b["input_ids"].flatten() for b in batches]).tolist()
    first = streams["jsonl"]
    assert len(first) > 100 and all(s == first for s in streams.values())


@pytest.mark.parametrize("name", ["docs.parquet", "docs.json"])
def test_parquet_and_json_lists_resume_inside_a_file(tmp_path, tok, name):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(make_docs(60)), tmp_path / "docs.parquet", row_group_size=9)
    (tmp_path / "docs.json").write_text(json.dumps(make_docs(60)))
    cfg = DataConfig(sources=[{"path": str(tmp_path / name)}], seq_len=8, tokenizer_batch_size=4)
    reference = take(build_loader(cfg, tok, micro_batch_size=1), 40)
    first = build_loader(cfg, tok, micro_batch_size=1)
    take(first, 13)
    resumed = build_loader(cfg, tok, micro_batch_size=1)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(take(resumed, 27), reference[13:]))


def test_validation_is_one_finite_pass(tmp_path, tok):
    write_shards(tmp_path / "val", make_docs(20), per_shard=20)
    cfg = DataConfig(sources=[{"path": str(tmp_path / "val")}], validation=[{"path": str(tmp_path / "val")}],
                     seq_len=2)
    batches = list(build_loader(cfg, tok, micro_batch_size=1, split="validation"))
    assert sorted(doc_ids(tok, batches)) == list(range(20))


def test_missing_paths_and_empty_config_name_the_key(tmp_path, tok):
    with pytest.raises(HealerError, match=r"data.sources\[0\].path.*nowhere"):
        build_loader(DataConfig(sources=[{"path": str(tmp_path / "nowhere")}]), tok)
    with pytest.raises(HealerError, match="data.validation is empty"):
        build_loader(DataConfig(sources=[{"path": str(tmp_path)}]), tok, split="validation")


SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "slimpajama-sample" / "train"


@pytest.mark.skipif(not SAMPLE.exists(), reason="the shared SlimPajama sample is not on this machine")
def test_domain_weights_rebalance_the_skewed_slimpajama_sample():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # one token per whitespace-separated word: fast, and token counts are easy to reason about
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    # The sample holds 10x more C4 and StackExchange documents than GitHub ones, and one GitHub
    # document of 55k words: shares within 3 points after 2M tokens.
    weights = {"RedPajamaC4": 0.5, "RedPajamaStackExchange": 0.3, "RedPajamaGithub": 0.2}
    cfg = DataConfig(sources=[{"path": str(SAMPLE), "domains": weights}], seq_len=1024)
    loader = build_loader(cfg, words, micro_batch_size=8)
    take(loader, 250)
    tokens = loader.stats()["tokens"]
    total = sum(tokens.values())
    assert total == 250 * 8 * 1024
    for domain, weight in weights.items():
        assert abs(tokens[domain] / total - weight) < 0.03, tokens


def test_later_epochs_from_memory_match_rereading_and_resume(tmp_path, tok):
    docs = make_docs(40)
    docs[7] = {"text": "", "meta": {"redpajama_set_name": "A"}}  # one bad record, met again every epoch
    write_shards(tmp_path / "c", docs, per_shard=9)
    base = dict(sources=[{"path": str(tmp_path / "c"), "domains": {"A": 0.6, "B": 0.4}}], seq_len=16,
                tokenizer_batch_size=5)
    reread = build_loader(DataConfig(**base, repeat_cache_mb=0), tok, micro_batch_size=2)
    cached_cfg = DataConfig(**base, repeat_cache_mb=1)
    cached = build_loader(cached_cfg, tok, micro_batch_size=2)
    a, b = take(reread, 60), take(cached, 60)  # ~1900 tokens: the ~500-token corpus several times over
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert cached.stats() == reread.stats() and cached.stats()["skipped"] == {"empty_text": 1}
    first = build_loader(cached_cfg, tok, micro_batch_size=2)
    take(first, 41)  # well into a later epoch
    assert first.state_dict()["streams"][0]["batch_start"]["readers"][0]["epoch"] >= 2
    resumed = build_loader(cached_cfg, tok, micro_batch_size=2)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(take(resumed, 19), b[41:]))


def test_remote_paths_go_through_fsspec_and_resume(tok):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")  # an fsspec filesystem in this process: the s3:// / hf:// code path, offline
    docs = make_docs(30)
    for k in range(3):
        body = b"".join(json.dumps(d).encode() + b"\n" for d in docs[k * 10:(k + 1) * 10])
        with fs.open(f"/healer-test/train/example_train_{k}.jsonl.zst", "wb") as fh:
            fh.write(zstandard.ZstdCompressor().compress(body))
    try:
        cfg = DataConfig(sources=[{"path": "memory://healer-test/train/*.jsonl.zst"}], seq_len=8,
                         shuffle_files=False, tokenizer_batch_size=4, shuffle_blocks=False)
        reference = take(build_loader(cfg, tok, micro_batch_size=1), 30)
        got = torch.cat([b["input_ids"].flatten() for b in reference]).tolist()
        assert got == expected_stream(tok, docs)[: len(got)]
        first = build_loader(cfg, tok, micro_batch_size=1)
        take(first, 11)
        resumed = build_loader(cfg, tok, micro_batch_size=1)
        resumed.load_state_dict(first.state_dict())
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(take(resumed, 19), reference[11:]))
    finally:
        fs.rm("/healer-test", recursive=True)


def test_resume_does_not_reread_finished_shards(tmp_path, tok, monkeypatch):
    import healer.train.data.reader as reader

    shards = write_shards(tmp_path / "c", make_docs(60), per_shard=10)
    cfg = DataConfig(sources=[{"path": str(tmp_path / "c")}], seq_len=16, shuffle_files=False, tokenizer_batch_size=3,
                     repeat_cache_mb=0)
    reference = take(build_loader(cfg, tok, micro_batch_size=1), 40)
    first = build_loader(cfg, tok, micro_batch_size=1)
    take(first, 30)
    position = first.state_dict()["streams"][0]["batch_start"]["readers"][0]
    assert position["epoch"] == 0 and position["index"] >= 2
    opened = []
    real_open = reader.open_records

    def spy(path, *args, **kwargs):
        opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(reader, "open_records", spy)
    resumed = build_loader(cfg, tok, micro_batch_size=1)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(take(resumed, 10), reference[30:]))
    assert opened and not set(opened) & {str(s) for s in shards[: position["index"]]}


def test_resume_on_other_files_of_the_same_names_is_refused(tmp_path, tok):
    shards = write_shards(tmp_path / "c", make_docs(60), per_shard=10)
    cfg = DataConfig(sources=[{"path": str(tmp_path / "c"), "name": "web"}], seq_len=16, tokenizer_batch_size=3)
    first = build_loader(cfg, tok, micro_batch_size=1)
    take(first, 5)
    state = first.state_dict()
    copied = tmp_path / "copy"  # the same bytes elsewhere (node-local scratch): resumes
    copied.mkdir()
    for shard in shards:
        (copied / shard.name).write_bytes(shard.read_bytes())
    moved = DataConfig(sources=[{"path": str(copied), "name": "web"}], seq_len=16, tokenizer_batch_size=3)
    build_loader(moved, tok, micro_batch_size=1).load_state_dict(state)
    # other documents under the same names (same sizes even): refused, naming the source
    write_shards(tmp_path / "c", make_docs(60, first=300), per_shard=10)
    with pytest.raises(HealerError, match=r"^data checkpoint: data.sources source 'web': .*same names but other "
                                          r"contents[^\n]*$"):
        build_loader(cfg, tok, micro_batch_size=1).load_state_dict(state)
    shards[-1].unlink()
    with pytest.raises(HealerError, match=r"'web': its files are not the ones it had \(6 shard\(s\) then, 5 now"):
        build_loader(cfg, tok, micro_batch_size=1).load_state_dict(state)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_corrupt_shard_read_by_two_workers_is_counted_once(tmp_path, tok, workers):
    folder = tmp_path / "c"
    folder.mkdir()
    frames = [zstandard.ZstdCompressor().compress(b"".join(json.dumps({"text": f"d{i} w1 w2"}).encode() + b"\n"
                                                           for i in range(k, k + 10))) for k in range(0, 40, 10)]
    (folder / "a.jsonl.zst").write_bytes(b"".join(frames)[:-20])  # the last frame is cut short
    # one file, two workers: both read it, every other line each, and both meet the truncation
    cfg = DataConfig(sources=[{"path": str(folder)}], seq_len=4, num_workers=workers, tokenizer_batch_size=4)
    loader = build_loader(cfg, tok, micro_batch_size=1)
    take(loader, 200)  # several epochs (counts are kept with the batches after them)
    assert loader.stats()["skipped"] == {"corrupt_shard": 1}


@pytest.mark.parametrize("domains, message", [
    ({"A": 1, "B": -0.5}, r"data\.sources\.0\.domains: .*domain 'B' is -0\.5"),
    ({"A": 0, "B": 0}, r"data\.sources\.0\.domains: .*sum to 0"),
    ({"A": float("nan")}, r"data\.sources\.0\.domains\.A: Input should be a finite number"),  # refused as any nan is
])
def test_domain_weights_that_are_not_shares_are_refused_at_recipe_load(tmp_path, domains, message):
    from healer.recipe import RecipeError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"source": "m"}, "data": {"sources": [{"path": "x", "domains": domains}]}}))
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)


def test_a_domain_of_weight_zero_is_left_out(tmp_path, tok):
    write_shards(tmp_path / "c", make_docs(30), per_shard=10)
    cfg = DataConfig(sources=[{"path": str(tmp_path / "c"), "domains": {"A": 1, "B": 0}}], seq_len=2,
                     on_exhausted="drain")
    loader = build_loader(cfg, tok, micro_batch_size=1)
    assert sorted(doc_ids(tok, list(loader))) == list(range(0, 30, 3))  # make_docs: d<i> is in domain "ABC"[i % 3]
    assert list(loader.stats()["tokens"]) == ["A"]


def long_docs(n_words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    long = " ".join(f"w{rng.randrange(50)}" + ("\n" if rng.random() < 0.05 else "") for _ in range(n_words))
    return make_docs(10) + [{"text": "d500 " + long, "meta": {"redpajama_set_name": "A"}}] + make_docs(10, first=20)


def test_a_long_document_is_tokenized_in_pieces_with_the_same_tokens(tmp_path, tok, monkeypatch):
    from helpers import tiny_tokenizer

    import healer.train.data.stream as stream

    monkeypatch.setattr(stream, "PIECE_CHARS", 300)  # a 6000-word document: some 90 pieces, cut over many batches
    monkeypatch.setattr(stream, "FILL_CHARS", 1000)
    docs = long_docs(6000)
    write_shards(tmp_path / "c", docs, per_shard=7, suffix=".jsonl")
    cfg = DataConfig(sources=[{"path": str(tmp_path / "c")}], seq_len=64, on_exhausted="stop", shuffle_files=False,
                     reset_position_ids=True, tokenizer_batch_size=4, shuffle_blocks=False)
    for tokenizer in (tok, tiny_tokenizer()):  # word-level, and byte-level BPE (whose merges span a seam if cut badly)
        batches = list(build_loader(cfg, tokenizer, micro_batch_size=1))
        got = torch.cat([b["input_ids"].flatten() for b in batches]).tolist()
        want = expected_stream(tokenizer, docs)
        assert got == want[: len(got)] and len(want) - len(got) < 64
        for b in batches:  # positions restart only where a document starts, not where a piece does
            ids, pos = b["input_ids"][0].tolist(), b["position_ids"][0].tolist()
            assert pos[0] == 0
            assert all(pos[t] == (0 if ids[t - 1] == tokenizer.eos_token_id else pos[t - 1] + 1) for t in range(1, 64))
    loader = build_loader(cfg, tok, micro_batch_size=1)
    reference = list(loader)
    assert 500 in doc_ids(tok, reference)
    assert loader.stats()["documents"] == {"c": len(doc_ids(tok, reference))}  # a document in pieces counts once
    for cut in (2, 40, 97):  # before, inside and after the long document
        first = build_loader(cfg, tok, micro_batch_size=1)
        take(first, cut)
        if cut == 40:
            assert first.state_dict()["streams"][0]["batch_start"]["pending"]["piece"] > 0  # resumes mid-document
        resumed = build_loader(cfg, tok, micro_batch_size=1)
        resumed.load_state_dict(first.state_dict())
        rest = list(resumed)
        assert len(rest) == len(reference) - cut
        assert all(torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["position_ids"], b["position_ids"])
                   for a, b in zip(rest, reference[cut:]))
        assert resumed.stats() == loader.stats()


_PEAK = r"""
import json, random, resource, sys
sys.path.insert(0, sys.argv[3])
from helpers import tiny_tokenizer
from healer.train.data import DataConfig, build_loader

chars, path = int(sys.argv[1]), sys.argv[2]
rng = random.Random(0)
words = ["the", "quick", "brown", "fox", "pruning", "heals", "model", "tokens", "def", "return", "0123", "x;"]
text = " ".join(rng.choice(words) for _ in range(chars // 6))
with open(path, "w") as fh:
    fh.write(json.dumps({"text": "short one"}) + "\n" + json.dumps({"text": text}) + "\n")
del text
tok = tiny_tokenizer()
tok("warm up the tokenizer " * 100)
cfg = DataConfig(sources=[{"path": path}], seq_len=2048, on_exhausted="stop")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tokens = sum(b["input_ids"].numel() for b in build_loader(cfg, tok, micro_batch_size=16))
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps({"tokens": tokens, "peak_growth_mb": growth}))
"""


def test_peak_memory_does_not_grow_with_the_length_of_one_document(tmp_path):
    """One 20 MB record costs little more than a 2 MB one: its text (a few bytes a character), not its tokens.

    Tokenized in one call, 20 MB of text takes some 4 GB here (~200 bytes a character); in pieces the
    tokenizer's working memory stays at a few tens of MB whatever the document's length.
    """
    import subprocess
    import sys

    tests = str(Path(__file__).parent)
    runs = {}
    for mb in (2, 20):
        out = subprocess.run([sys.executable, "-c", _PEAK, str(mb * 1_000_000), str(tmp_path / f"{mb}.jsonl"), tests],
                             capture_output=True, text=True, timeout=600, check=True)
        runs[mb] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs[20]["tokens"] > 9 * runs[2]["tokens"] > 0  # the whole document came through
    extra = runs[20]["peak_growth_mb"] - runs[2]["peak_growth_mb"]
    # 18 MB more text: the line, the str and one copy are ~60 MB; tokenizing it whole would be ~3500 MB
    assert extra < 150, runs


@pytest.mark.parametrize("workers", [0, 2])
def test_what_was_skipped_after_the_last_batch_is_counted_and_named(tmp_path, tok, workers):
    folder = tmp_path / "c"
    write_shards(folder, make_docs(8), per_shard=8, suffix=".jsonl")
    (folder / "z.json").write_text('[{"text": "d1 w1"},')  # read last, after the last block
    cfg = DataConfig(sources=[{"path": str(folder)}], seq_len=4, on_exhausted="drain", shuffle_files=False,
                     num_workers=workers)
    loader = build_loader(cfg, tok, micro_batch_size=1)
    list(loader)
    assert loader.stats()["skipped"]["corrupt_shard"] == 1
    binary = tmp_path / "b"
    binary.mkdir()
    (binary / "x.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00\n\xff\xfe\xfd\n")
    with pytest.raises(HealerError, match=r"^data: rank 0 found no usable document .*binary 1, .*non_utf8 1, first at "
                                          r"line 1 of \S*x.txt \(binary[^\n]*$"):
        list(build_loader(DataConfig(sources=[{"path": str(binary)}], seq_len=4, num_workers=workers), tok))

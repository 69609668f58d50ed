"""Elastic resume: a run checkpointed on N ranks (x workers) goes on with M, and within the epoch every
document is still read exactly once (the data stream is re-dealt, :mod:`healer.train.data.reshard`); the
weights and Adam state of any ZeRO stage load into an engine of any other (:mod:`healer.train.universal`).
The 2-process runs are in test_elastic_distributed.py.

Documents here are ``d{i}`` repeated: every token of a batch names its document, so the test sees which
documents each rank was handed, and a document read twice shows up as two separate runs of its id.
"""

from __future__ import annotations

import json
import random

import pytest

from healer.train.data import DataConfig, build_loader
from healer.train.data.reader import Piece
from healer.train.data.reshard import deal

N_DOCS = 150


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + [f"d{i}" for i in range(N_DOCS)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Two sources: ``web`` in 7 shards (each worker reads whole files), ``code`` in one shard (workers
    share it line by line), documents of 1-40 tokens, cut across blocks.

    Blocks are 2 tokens and micro-batches 1 block, so the partial block a drained stream drops at its end
    is at most its last EOS: every document is handed out, and a missing one is the re-deal's fault."""
    root = tmp_path_factory.mktemp("elastic")
    rng = random.Random(0)
    ids = {"web": range(0, 110), "code": range(110, N_DOCS)}
    for name, shards in (("web", 7), ("code", 1)):
        folder = root / name
        folder.mkdir()
        docs = [" ".join([f"d{i}"] * rng.randint(1, 40)) for i in ids[name]]
        for k in range(shards):
            with open(folder / f"part{k}.jsonl", "w") as fh:
                fh.writelines(json.dumps({"text": t}) + "\n" for t in docs[k::shards])
    lengths = {}
    for name in ("web", "code"):
        for path in (root / name).iterdir():
            for line in path.read_text().splitlines():
                words = json.loads(line)["text"].split()
                lengths[int(words[0][1:])] = len(words)
    return {"root": root, "ids": set(range(N_DOCS)), "lengths": lengths}


def _config(corpus: dict, workers: int, shuffle: bool = False) -> DataConfig:
    return DataConfig(sources=[{"path": str(corpus["root"] / "web"), "weight": 0.7},
                               {"path": str(corpus["root"] / "code"), "weight": 0.3}],
                      seq_len=2, on_exhausted="drain", num_workers=workers, tokenizer_batch_size=8,
                      shuffle_blocks=shuffle)


def _runs(tokens: list[int], eos: int) -> list[int]:
    """The document ids of a rank's token sequence, one per maximal run (EOS tokens dropped)."""
    out: list[int] = []
    last = None
    for t in tokens:
        if t != eos and t != last:
            out.append(t)
        last = t
    return out


def _elastic_run(tok, corpus: dict, layouts: list[tuple[int, int, int | None]], shuffle: bool = False,
                 tokens_seen: list[int] | None = None) -> tuple[list[int], list[dict]]:
    """Run the data stream through ``layouts`` of (ranks, workers, batches per rank; None: to the end),
    each resuming from the previous one's states. Returns every document run seen, and the last states;
    ``tokens_seen`` gets every token handed out."""
    seen: list[int] = []
    states: list[dict] | None = None
    before = None
    for world, workers, batches in layouts:
        cfg = _config(corpus, workers, shuffle)
        new_states = []
        for rank in range(world):
            loader = build_loader(cfg, tok, rank=rank, world_size=world, micro_batch_size=1)
            if states is not None:
                loader.load_state_dict({"ranks": states} if (world, workers) != before else states[rank])
            tokens: list[list[int]] = [[] for _ in range(max(1, workers))]  # per stream: workers take turns
            for n, batch in enumerate(loader, 1):
                tokens[(loader._next - 1) % len(tokens)] += batch["input_ids"].flatten().tolist()
                if n == batches:
                    break
            seen += [d for stream in tokens for d in _runs(stream, tok.eos_token_id)]
            if tokens_seen is not None:
                tokens_seen += [t for stream in tokens for t in stream]
            new_states.append(loader.state_dict())
        states, before = new_states, (world, workers)
    return [t - 2 for t in seen], states  # token d{i} has id i + 2


def _assert_each_once(seen: list[int], corpus: dict) -> None:
    twice = sorted({d for d in seen if seen.count(d) > 1})
    missing = sorted(corpus["ids"] - set(seen))
    assert not twice and not missing, f"read twice: {twice}; never read: {missing}"


def test_one_epoch_without_resume_reads_each_document_once(tok, corpus):
    seen, _ = _elastic_run(tok, corpus, [(2, 0, None)])
    _assert_each_once(seen, corpus)


def test_two_ranks_to_one_to_two_read_each_document_once(tok, corpus):
    """The check: 2 ranks -> checkpoint -> 1 rank -> checkpoint -> 2 ranks, to the end of the epoch."""
    seen, states = _elastic_run(tok, corpus, [(2, 0, 150), (1, 0, 333), (2, 0, None)])
    _assert_each_once(seen, corpus)
    documents = sum(sum(s["streams"][0]["docs"]) for s in states)
    assert documents == N_DOCS  # the counters carried over the re-deals too


@pytest.mark.parametrize("layouts", [
    [(1, 0, 301), (2, 0, None)],
    [(2, 0, 123), (3, 0, None)],
    [(3, 0, 97), (2, 0, None)],
    [(2, 0, 900), (1, 0, None)],  # most of the epoch read before the change: few pieces left to deal
], ids=["1to2", "2to3", "3to2", "late-2to1"])
def test_other_rank_counts_read_each_document_once(tok, corpus, layouts):
    seen, _ = _elastic_run(tok, corpus, layouts)
    _assert_each_once(seen, corpus)


def test_fewer_workers_read_each_document_once(tok, corpus):
    seen, _ = _elastic_run(tok, corpus, [(1, 2, 222), (1, 1, None)])
    _assert_each_once(seen, corpus)


@pytest.mark.parametrize("layouts", [[(2, 0, 150), (1, 0, 333), (2, 0, None)], [(1, 2, 222), (1, 1, None)]],
                         ids=["2to1to2", "fewer-workers"])
def test_shuffled_blocks_resume_elastically_without_reading_a_token_twice(tok, corpus, layouts):
    """data.shuffle_blocks hands a batch's blocks out of order, so the re-deal cannot tell which unread
    documents lie before a begun one: it skips them (at most one document batch, 8 here, per old stream)
    rather than reading anything twice."""
    from collections import Counter

    tokens: list[int] = []
    _elastic_run(tok, corpus, layouts, shuffle=True, tokens_seen=tokens)
    counts = Counter(t - 2 for t in tokens if t != tok.eos_token_id)
    assert all(counts[d] <= corpus["lengths"][d] for d in counts), "a document's tokens were handed out twice"
    missing = corpus["ids"] - set(counts)
    streams = sum(world * max(1, workers) for world, workers, _ in layouts[:-1])
    assert len(missing) <= 8 * streams
    assert sum(counts.values()) > 0.8 * sum(corpus["lengths"].values())


def test_the_worker_count_is_no_resume_setting(corpus):
    from healer.train.config import CPTConfig
    from healer.train.cpt import settings_of

    settings = settings_of(CPTConfig(), _config(corpus, 2))
    assert "data.num_workers" not in settings and settings["data.seq_len"] == 2  # other data keys still are


def test_a_layout_change_without_all_ranks_states_is_refused(tok, corpus):
    from healer.core.errors import HealerError

    _, states = _elastic_run(tok, corpus, [(2, 0, 2)])
    loader = build_loader(_config(corpus, 0), tok, rank=0, world_size=1, micro_batch_size=1)
    with pytest.raises(HealerError, match="world_size was 2 when it was saved and is 1 now"):
        loader.load_state_dict(states[0])


def test_deal_splits_pieces_by_lines_when_they_are_fewer_than_streams():
    pieces = [Piece("a", 10, 3, 2, 1)]
    dealt = deal(pieces, 3)
    # lines 2, 4, 6, ... of the rest of file a (phase 1 of 2), split three ways
    assert dealt == [[Piece("a", 10, 3, 6, 1)], [Piece("a", 10, 3, 6, 3)], [Piece("a", 10, 3, 6, 5)]]
    assert deal([Piece("a", 0, 0, 1, 0), Piece("b", 0, 0, 1, 0), Piece("c", 0, 0, 1, 0)], 2) == [
        [Piece("a", 0, 0, 1, 0), Piece("c", 0, 0, 1, 0)], [Piece("b", 0, 0, 1, 0)]]
    assert deal([], 2) == [[], []]


# -- weights and optimizer state ------------------------------------------------------------------------


def _engine(zero_stage: int, seed: int, width: int = 8):
    import torch

    from healer.train.engine import build_ds_config, init_distributed, init_engine, make_optimizer

    init_distributed()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.LayerNorm(width), torch.nn.Linear(width, 3))
    ds = build_ds_config(zero_stage=zero_stage, micro_batch_size=1, global_batch_size=1, world_size=1,
                         base={"zero_optimization": {"stage": zero_stage}})  # a stage named in a base config is kept
    return init_engine(model, ds, make_optimizer(model, lr=1e-2))


def _step(engine, i: int) -> None:
    import torch

    x = torch.randn(1, 8, generator=torch.Generator().manual_seed(i))
    engine.backward(engine(x).pow(2).sum())
    engine.step()


def _weights(engine) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    zero = engine.zero_optimization_stage() > 0
    named = engine.module.named_parameters()
    return {n: (safe_get_full_fp32_param(p) if zero else p.detach()).clone() for n, p in named}


@pytest.mark.parametrize("stages", [(1, 0), (0, 2), (2, 3), (3, 0)], ids=lambda s: f"zero{s[0]}to{s[1]}")
def test_another_zero_stage_resumes_with_the_same_weights_and_adam_state(tmp_path, stages):
    """Five more steps after the resume match the engine that wrote the checkpoint: Adam's moments and step came
    along (an optimizer started afresh moves the weights by ~lr at once, 1e-2 here)."""
    from healer.train.checkpoint import load_checkpoint, save_checkpoint

    old = _engine(stages[0], seed=0)
    for i in range(3):
        _step(old, i)
    path = save_checkpoint(old, tmp_path, 3, {"step": 3, "data": {"pos": 7}}, keep_last=1, settings={})
    new = _engine(stages[1], seed=1)
    state = load_checkpoint(new, path, settings={})
    assert state["elastic"] == f"ZeRO stage {stages[0]} -> {stages[1]}" and state["step"] == 3
    assert state["data"]["ranks"][0] == {"pos": 7}
    a, b = _weights(old), _weights(new)
    assert all((a[n] == b[n]).all() for n in a)
    for i in range(3, 8):
        _step(old, i)
        _step(new, i)
    a, b = _weights(old), _weights(new)
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-6


def test_a_checkpoint_of_another_model_is_one_clear_line(tmp_path):
    from healer.core.errors import HealerError
    from healer.train.checkpoint import load_checkpoint, save_checkpoint

    old = _engine(2, seed=0)
    _step(old, 0)
    path = save_checkpoint(old, tmp_path, 1, {"step": 1}, keep_last=1, settings={})
    with pytest.raises(HealerError, match=r"has shape \(8, 8\), this model.s \(6, 8\): it was written for another"):
        load_checkpoint(_engine(0, seed=0, width=6), path, settings={})


@pytest.mark.parametrize("world", [1, 2, 3])
def test_zero12_parameters_are_built_one_at_a_time_as_deepspeed_joins_them(world):
    """An elastic resume builds each parameter from the ranks' partitions alone instead of joining every group
    whole three times (weights, two moments); the values must be the ones DeepSpeed's ``zero_to_fp32`` gives,
    alignment paddings and a parameter cut between two ranks included."""
    import math

    import torch
    from deepspeed.utils import zero_to_fp32 as z

    from healer.train.universal import _zero12_slices

    shapes = [{"a": torch.Size([5, 3]), "b": torch.Size([7])}, {"c": torch.Size([2, 2, 3])}]
    paddings = [[1, 0], [2]]
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    gen = torch.Generator().manual_seed(world)
    for group, pads in zip(shapes, paddings):
        used = sum(s.numel() + p for s, p in zip(group.values(), pads))
        per_rank = math.ceil(used / (2 * world)) * 2  # each rank's partition, the whole aligned to 2 x ranks
        for rank in range(world):
            parts[rank].append(torch.randn(per_rank, generator=gen))
    state = z.zero_model_state(buffers={}, param_shapes=shapes, shared_params=[], ds_version=0,
                               frozen_param_shapes=None, frozen_param_fragments=None)
    want = z._get_fp32_state_dict_from_zero2_checkpoint(world, parts, [state], True, paddings)
    built = _zero12_slices(parts, shapes, paddings, world)
    assert sorted(built) == ["a", "b", "c"]
    for name, build in built.items():
        got = build()
        assert got.shape == want[name].shape and torch.equal(got, want[name]), name
        assert got.untyped_storage().data_ptr() not in {p.untyped_storage().data_ptr() for r in parts for p in r}

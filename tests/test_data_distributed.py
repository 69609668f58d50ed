"""The corpus stream under real torch.distributed ranks (gloo, 2 processes), each with dataloader workers."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from test_data_pipeline import make_docs, write_shards

from healer.train.data import DataConfig, build_loader


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + [f"d{i}" for i in range(1000)] + [f"w{i}" for i in range(50)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def _rank_main(rank: int, world: int, port: int, corpus: str, out: str) -> None:
    # torchrun and the DeepSpeed launcher start ranks as fresh interpreters, whose dataloader workers
    # fork; mp.spawn's children would spawn them instead (re-importing torch in every worker)
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        tok = _word_tokenizer()
        base = dict(sources=[{"path": corpus, "domains": {"A": 1, "B": 1, "C": 1}}], num_workers=2,
                    tokenizer_batch_size=4)
        # one pass, seq_len 2: every document's id token comes out on exactly one rank
        once = build_loader(DataConfig(**base, seq_len=2, on_exhausted="drain"), tok, rank=dist.get_rank(),
                            world_size=dist.get_world_size(), micro_batch_size=1)
        ids = torch.cat([b["input_ids"].flatten() for b in once]).tolist()
        mine = sorted(int(w[1:]) for w in tok.convert_ids_to_tokens(ids) if w.startswith("d"))
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)
        # endless stream: stop after 7 batches, checkpoint, resume in a new loader, compare with no stop
        cfg = DataConfig(**base, seq_len=12)
        ref = build_loader(cfg, tok, rank=rank, world_size=world, micro_batch_size=2)
        reference = [b["input_ids"].clone() for _, b in zip(range(20), ref)]
        first = build_loader(cfg, tok, rank=rank, world_size=world, micro_batch_size=2)
        for _, _b in zip(range(7), first):
            pass
        resumed = build_loader(cfg, tok, rank=rank, world_size=world, micro_batch_size=2)
        resumed.load_state_dict(first.state_dict())
        same = all(torch.equal(b["input_ids"], r) for (_, b), r in zip(zip(range(13), resumed), reference[7:]))
        torch.save({"everyone": everyone, "same": same, "first_batch": reference[0]}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_with_workers_split_the_corpus_and_resume(tmp_path):
    write_shards(tmp_path / "c", make_docs(70), per_shard=10)
    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path / "c"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    seen = results[0]["everyone"]
    assert sorted(seen[0] + seen[1]) == list(range(70)), "every document on exactly one rank"
    assert seen[0] and seen[1]
    assert all(r["same"] for r in results), "resumed batches equal the uninterrupted ones on every rank"
    assert not torch.equal(results[0]["first_batch"], results[1]["first_batch"]), "ranks read different data"

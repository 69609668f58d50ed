"""The teacher-logit cache (`healer distill-cache`, `cpt.kd.cache`): the loss it gives equals live top-k KD, a
cache for other inputs is refused naming what differs, a missing block names its step, a killed build is not
mistaken for a cache, and a cpt run with a cache trains without ever loading the teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import SAMPLE_TEXT, save_tiny, tiny_model, tiny_tokenizer

from healer.core.errors import HealerError
from healer.train.distill_cache import teacher_topk_rows
from healer.train.kd import TopK, chunked_head_loss
from healer.train.logit_cache import CachedTeacherBatches, LogitCache, cache_key, decode_block, encode_block
from healer.train.objectives import Distill, _forward_hidden, output_head

K = 8


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cached_top_k_gives_the_live_top_k_loss_and_gradient(temperature):
    teacher, student = tiny_model(seed=0, layers=2), tiny_model(seed=1, layers=2)
    batch = {"input_ids": torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))}
    live = Distill(teacher, alpha=0.3, temperature=temperature, top_k=K, chunk_size=7)
    loss_live, parts_live = live(student, batch)
    loss_live.backward()
    grad_live = _grads(student)
    student.zero_grad()

    top = teacher_topk_rows(teacher, batch, K, chunk_size=5)
    top = decode_block(encode_block(top, "float32"), 2 * 23, K, "float32")  # through the stored bytes
    cached = Distill(None, alpha=0.3, temperature=temperature, top_k=K, chunk_size=7, cached=True)
    cached_batch = {**batch, "kd_values": top.values.view(2, 23, K), "kd_indices": top.indices.view(2, 23, K)}
    loss_cached, parts_cached = cached(student, cached_batch)
    loss_cached.backward()
    assert torch.allclose(loss_cached, loss_live, rtol=1e-6, atol=1e-6)
    assert torch.allclose(parts_cached["kl"], parts_live["kl"], rtol=1e-6, atol=1e-6)
    assert parts_cached["kl"] > 0
    diff = (_grads(student) - grad_live).abs().max()
    assert diff <= 1e-5 * grad_live.abs().max(), diff

    # the recomputing path (a ZeRO-3 head) agrees too
    states = _forward_hidden(student, batch)
    targets = batch["input_ids"][:, 1:]
    t_states = _forward_hidden(teacher, batch)
    unfused_live = chunked_head_loss(states[-1][:, :-1], targets, output_head(student),
                                     teacher_hidden=t_states[-1][:, :-1], teacher_head=output_head(teacher),
                                     alpha=0.3, temperature=temperature, top_k=K, fused=False, chunk_size=9)
    unfused_cached = chunked_head_loss(states[-1][:, :-1], targets, output_head(student), alpha=0.3,
                                       temperature=temperature,
                                       teacher_topk=TopK(cached_batch["kd_values"], cached_batch["kd_indices"]),
                                       fused=False, chunk_size=9)
    assert torch.allclose(unfused_cached[0], unfused_live[0], rtol=1e-6, atol=1e-6)


def test_a_cache_without_top_k_or_with_hidden_states_is_refused():
    with pytest.raises(HealerError, match="needs top_k"):
        Distill(None, alpha=0.0, cached=True)
    with pytest.raises(HealerError, match="needs the live teacher"):
        Distill(None, alpha=0.0, top_k=4, hidden_pairs=[(1, 2)], hidden_weight=1.0, cached=True)
    from healer.train.config import KDConfig

    with pytest.raises(ValueError, match="hidden_weight"):
        KDConfig(cache="/x", hidden_weight=0.5, top_k=4)


def _setup(tmp_path: Path, **cpt) -> tuple[Path, Path, Path]:
    model = save_tiny(tmp_path, "llama", layers=2, hidden=32, intermediate=64)
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{i} {SAMPLE_TEXT}"}) + "\n" for i in range(30)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"source": str(model)}, "run_dir": str(tmp_path / "run"),
        "data": {"sources": [{"path": str(corpus)}], "seq_len": 32},
        "cpt": {"input": str(model), "max_steps": 2, "micro_batch_size": 2, "global_batch_size": 4, "zero_stage": 0,
                "warmup_steps": 0, "kd": {"top_k": K, "cache": str(tmp_path / "cache")}, **cpt}}))
    return model, corpus, recipe


def test_distill_cache_builds_a_cache_the_cpt_stage_trains_on_without_the_teacher(tmp_path, capsys, monkeypatch):
    from healer.cli import main

    model, corpus, recipe = _setup(tmp_path)
    assert main(["distill-cache", str(recipe)]) == 0
    meta = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert meta["stream_tokens"] >= 2 * 4 * 32 and meta["key"]["k"] == K
    assert "distill-cache" in capsys.readouterr().out

    import healer.train.cpt as cpt

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(cpt, "_teacher", no_teacher)
    assert main(["cpt", str(recipe)]) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "run" / "cpt" / "manifest.json").read_text())
    assert manifest["outputs"]["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "cpt" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["train/kl"] for r in rows if "train/kl" in r]
    assert kl and all(v > 0 for v in kl)

    # a sweep point with another temperature and alpha reads the same cache (they are applied after the lookup)
    assert main(["cpt", str(recipe), "--cpt.kd.temperature", "2", "--cpt.kd.alpha", "0.5", "--run_dir",
                 str(tmp_path / "point2")]) == 0
    assert json.loads((tmp_path / "point2" / "cpt" / "manifest.json").read_text())["outputs"]["steps"] == 2
    # more steps than the cache covers: refused before training, saying how to extend it
    capsys.readouterr()
    assert main(["cpt", str(recipe), "--cpt.max_steps", "50"]) == 2
    assert "covers" in capsys.readouterr().err
    # a second build over the same data reuses every block
    assert main(["distill-cache", str(recipe)]) == 0
    assert "already cached" in capsys.readouterr().out


def test_a_cache_for_other_inputs_is_refused_naming_what_differs(tmp_path):
    from healer.cli import main
    from healer.model.modeling import resolve_source
    from healer.train.data.config import DataConfig, SourceConfig

    model, corpus, recipe = _setup(tmp_path)
    assert main(["distill-cache", str(recipe)]) == 0
    cache = LogitCache(tmp_path / "cache")
    data = DataConfig(sources=[SourceConfig(path=str(corpus))], seq_len=32)
    tok = tiny_tokenizer()
    good = dict(teacher_location=resolve_source(str(model)), tokenizer=tok, data_cfg=data, streams=1, k=K)
    cache.check(cache_key(**good), K, 320)

    other_model = save_tiny(tmp_path, "llama", name="other", seed=3, layers=2, hidden=32, intermediate=64)
    other_tok = tiny_tokenizer()
    other_tok.add_tokens(["<extra>"])
    other_corpus = tmp_path / "other.jsonl"
    other_corpus.write_text(json.dumps({"text": "something else " * 50}) + "\n")
    import shutil

    edited = tmp_path / "edited"  # same size, same first and last bytes, one weight changed in the middle
    shutil.copytree(model, edited)
    weights = bytearray((edited / "model.safetensors").read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    (edited / "model.safetensors").write_bytes(bytes(weights))
    cases = {
        "teacher": {"teacher_location": resolve_source(str(other_model))},
        "teacher ": {"teacher_location": resolve_source(str(edited))},
        "tokenizer": {"tokenizer": other_tok},
        "data": {"data_cfg": DataConfig(sources=[SourceConfig(path=str(other_corpus))], seq_len=32)},
        "seq_len": {"data_cfg": DataConfig(sources=[SourceConfig(path=str(corpus))], seq_len=16)},
        "streams": {"streams": 2},
    }
    for name, change in cases.items():
        with pytest.raises(HealerError, match=rf"built for other inputs -- {name.strip()}: cache has"):
            cache.check(cache_key(**{**good, **change}), K, 320)
    with pytest.raises(HealerError, match=f"cpt.kd.top_k is 4 but .* holds the teacher's top {K}"):
        cache.check(cache_key(**good), 4, 320)
    with pytest.raises(HealerError, match="vocabulary is 320, the student's 500"):
        cache.check(cache_key(**good), K, 500)
    with pytest.raises(HealerError, match="top_k is null"):
        cache.check(cache_key(**good), None, 320)
    # the same corpus copied elsewhere is the same data
    copied = tmp_path / "copy" / "train.jsonl"
    copied.parent.mkdir()
    copied.write_bytes(corpus.read_bytes())
    cache.check(cache_key(**{**good, "data_cfg": DataConfig(sources=[SourceConfig(path=str(copied))], seq_len=32)}),
                K, 320)
    # the data's file changed under the same name: refused too
    corpus.write_text(corpus.read_text() + json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(HealerError, match="-- data:"):
        cache.check(cache_key(**good), K, 320)
    # the teacher rewritten in place, same path and size, one tensor's bytes changed: its digest is taken again
    weights = bytearray((model / "model.safetensors").read_bytes())
    weights[-3 * len(weights) // 7] ^= 0xFF
    (model / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(HealerError, match="-- teacher:"):
        cache.check(cache_key(**{**good, "data_cfg": DataConfig(sources=[SourceConfig(path=str(copied))],
                                                                seq_len=32)}), K, 320)


def test_a_block_the_cache_lacks_names_the_step_and_the_coverage(tmp_path):
    from healer.cli import main

    _, _, recipe = _setup(tmp_path)
    assert main(["distill-cache", str(recipe)]) == 0
    cache = LogitCache(tmp_path / "cache")

    class Stream:
        def next(self):
            return {"input_ids": torch.full((2, 32), 5)}

    batches = CachedTeacherBatches(Stream(), cache, first_step=7, accumulation=1, global_batch=4)
    with pytest.raises(HealerError, match=r"at step 7 \(the cache covers 256 tokens = 2 steps of 4 x 32\)"):
        batches.next()


def test_a_killed_build_is_not_a_cache_and_the_next_build_finishes_it(tmp_path, capsys, monkeypatch):
    from healer.cli import main
    from healer.train import distill_cache

    _, _, recipe = _setup(tmp_path, max_steps=20)
    monkeypatch.setattr(distill_cache, "SHARD_BLOCKS", 4)
    real, calls = distill_cache.teacher_topk_rows, []

    def dies_on_the_fifth(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as if killed mid-build
        return real(*a, **k)

    monkeypatch.setattr(distill_cache, "teacher_topk_rows", dies_on_the_fifth)
    assert main(["distill-cache", str(recipe)]) == 130  # Ctrl-C: one line, no traceback
    assert "interrupted" in capsys.readouterr().err
    cache_dir = tmp_path / "cache"
    assert not (cache_dir / "cache.json").exists()
    assert not list(cache_dir.glob("*.tmp*"))
    assert len(list(cache_dir.glob("shard-*.index.npy"))) == 2  # 8 blocks kept, the half shard dropped
    capsys.readouterr()
    assert main(["cpt", str(recipe)]) == 2
    assert "unfinished build" in capsys.readouterr().err

    monkeypatch.setattr(distill_cache, "teacher_topk_rows", real)
    assert main(["distill-cache", str(recipe)]) == 0
    import re

    reused = re.search(r"([\d,]+) block reads already cached", capsys.readouterr().out)
    assert reused and int(reused.group(1).replace(",", "")) >= 8  # the kept shards' blocks: no teacher rerun
    assert LogitCache(cache_dir).tokens >= 20 * 4 * 32


@pytest.mark.distributed
@pytest.mark.slow
def test_two_rank_zero3_kd_from_a_cache_built_for_two_ranks_matches_the_live_teacher(tmp_path):
    """The build reads the stream split as 2 ranks will (every block each rank reads is there), and ZeRO-3's
    partitioned head (the recomputed chunks) gives the live teacher's KD loss at every step."""
    import os
    import socket
    import subprocess
    import sys

    from healer.cli import main

    _, _, recipe = _setup(tmp_path, zero_stage=3, max_steps=3, micro_batch_size=1)
    assert main(["distill-cache", str(recipe), "--ranks", "2"]) == 0
    live = tmp_path / "live.yaml"
    spec = yaml.safe_load(recipe.read_text())
    spec["run_dir"] = str(tmp_path / "live_run")
    spec["cpt"]["kd"].pop("cache")
    live.write_text(yaml.safe_dump(spec))

    def run(config: Path) -> dict[int, float]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = ["timeout", "240", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "healer", "cpt", "--config",
               str(config)]
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        run_dir = Path(yaml.safe_load(config.read_text())["run_dir"])
        rows = [json.loads(line) for line in (run_dir / "cpt" / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/kl"] for r in rows if "train/kl" in r}

    cached, reference = run(recipe), run(live)
    assert sorted(cached) == sorted(reference) == [1, 2, 3]
    for step in reference:
        assert abs(cached[step] - reference[step]) <= 1e-5 * abs(reference[step]), (step, cached, reference)


def test_the_build_splits_the_stream_for_the_ranks_the_recipe_launches():
    from healer.launch.config import LaunchConfig
    from healer.train.distill_cache import planned_ranks

    assert planned_ranks(LaunchConfig()) == 1
    assert planned_ranks(LaunchConfig(nodes=2, nproc_per_node=4)) == 8
    with pytest.raises(HealerError, match="pass --ranks"):
        planned_ranks(LaunchConfig(backend="hostfile", hostfile="hosts", nodes=2))


def test_healer_run_builds_a_missing_cache_and_extends_a_short_one(tmp_path, capsys, monkeypatch):
    from healer.cli import main

    model, corpus, recipe = _setup(tmp_path)
    import healer.train.cpt as cpt

    def no_teacher(*a, **k):
        raise AssertionError("the cpt stage loaded the teacher")

    monkeypatch.setattr(cpt, "_teacher", no_teacher)
    assert main(["run", str(recipe)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "building the teacher-logit cache" in out
    assert json.loads((tmp_path / "cache" / "cache.json").read_text())["stream_tokens"] >= 2 * 4 * 32
    assert json.loads((tmp_path / "run" / "cpt" / "manifest.json").read_text())["outputs"]["steps"] == 2

    # twice the steps: the cache is extended (its blocks reused) and the stage trains on it
    assert main(["run", str(recipe), "--cpt.max_steps", "4", "--force"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "extending the teacher-logit cache" in out and "already cached" in out
    assert json.loads((tmp_path / "cache" / "cache.json").read_text())["stream_tokens"] >= 4 * 4 * 32
    assert json.loads((tmp_path / "run" / "cpt" / "manifest.json").read_text())["outputs"]["steps"] == 4

    # a cache that covers the stage is left alone (a sweep point, the next round)
    assert main(["run", str(recipe), "--cpt.max_steps", "3", "--run-dir", str(tmp_path / "point")]) == 0, \
        capsys.readouterr().err
    assert "teacher-logit cache" not in capsys.readouterr().out
    assert json.loads((tmp_path / "point" / "cpt" / "manifest.json").read_text())["outputs"]["steps"] == 3


def test_healer_run_on_a_cluster_does_not_build_the_cache_on_the_submitting_host(tmp_path, capsys):
    from healer.cli import main

    model, corpus, recipe = _setup(tmp_path)
    assert main(["run", str(recipe), "--launch.backend", "slurm", "--launch.nodes", "2"]) == 2
    err = capsys.readouterr().err
    assert "holds no cache" in err and "healer distill-cache RECIPE --ranks N" in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "cpt").exists()


def test_a_cache_json_with_a_mistyped_field_is_refused_by_cpt_and_repaired_by_the_next_build(tmp_path, capsys):
    from healer.cli import main

    model, corpus, recipe = _setup(tmp_path)
    assert main(["distill-cache", str(recipe)]) == 0
    key_file = tmp_path / "cache" / "cache.json"
    meta = json.loads(key_file.read_text())
    key_file.write_text(json.dumps({**meta, "stream_tokens": "lots"}))
    capsys.readouterr()
    assert main(["cpt", str(recipe)]) == 2
    assert "lacks a valid stream_tokens" in capsys.readouterr().err
    assert main(["distill-cache", str(recipe)]) == 0  # every shard is kept; the key file is written again
    assert "already cached" in capsys.readouterr().out
    assert json.loads(key_file.read_text())["stream_tokens"] == meta["stream_tokens"]
    assert main(["cpt", str(recipe)]) == 0

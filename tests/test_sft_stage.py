"""`healer sft`: LoRA under a real DeepSpeed engine (CPU, gloo), adapter + merged outputs, resume, 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import free_port, save_tiny

from healer.cli import main as cli_main
from healer.core.errors import HealerError
from healer.core.manifest import read_stage_manifest
from healer.train.config import SFTConfig
from healer.train.sft import Options, train_lora

REPO = Path(__file__).resolve().parents[1]


def arithmetic_records(n: int = 24) -> list[dict]:
    return [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"The sum is {2 * i + 1}."}
            for i in range(n)]


def scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def write_recipe(tmp_path: Path, model_dir: Path, sft: dict) -> Path:
    recipe = {"name": "t", "run_dir": str(tmp_path / "run"), "model": {"source": str(model_dir)}, "sft": sft}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_sft_stage_self_distills_trains_and_writes_adapter_and_merged_model(tmp_path):
    """No `sft.data`: the teacher answers corpus prompts first, then LoRA trains on them (the demo's path)."""
    import zstandard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny(tmp_path, layers=2)
    corpus = tmp_path / "corpus" / "train" / "chunk1"
    corpus.mkdir(parents=True)
    docs = [{"text": f"Topic {i}\n\nThe quick brown fox jumps over the lazy dog number {i}. " * 6 +
             "\n\nLarge language models predict the next token. Pruning removes blocks; healing trains them back."}
            for i in range(8)]
    (corpus / "example_train_0.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("".join(json.dumps(d) + "\n" for d in docs).encode()))
    recipe = write_recipe(tmp_path, model_dir, {
        "self_distill": {"corpus": str(tmp_path / "corpus"), "num_examples": 8, "max_new_tokens": 24,
                         "batch_size": 8, "passage_chars": 120},
        "micro_batch_size": 2, "global_batch_size": 4, "max_steps": 2, "lr": 1e-3, "zero_stage": 2,
        "max_seq_len": 512})

    assert cli_main(["sft", "--config", str(recipe)]) == 0

    stage = tmp_path / "run" / "sft"
    made = json.loads((stage / "self_distill.json").read_text())
    # a random model babbles; replies under 10 characters are dropped, the rest are kept
    assert 4 <= len(made) <= 8 and all(r["output"] and r["instruction"] for r in made)
    assert any("quick brown fox" in r["input"] for r in made)  # passages quoted from the corpus
    manifest = read_stage_manifest(stage)
    out = manifest["outputs"]
    assert manifest["stage"] == "sft" and out["examples"] == len(made) and out["steps"] == 2
    assert out["tokens_trained"] > 0 and out["final_loss"] > 0
    assert [s for s, _ in scalars(stage / "tensorboard", "train/loss")] == [1, 2]
    assert len(scalars(stage / "tensorboard", "train/lr")) == 2
    assert all(v > 0 for _, v in scalars(stage / "tensorboard", "train/grad_norm"))

    # standard PEFT adapter: base + adapter gives the same logits as the merged plain checkpoint
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(stage / "adapter"))
    probe = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        base_logits = base(probe).logits
        tuned_logits = PeftModel.from_pretrained(base, stage / "adapter").eval()(probe).logits
    merged = AutoModelForCausalLM.from_pretrained(stage / "merged").eval()
    with torch.no_grad():
        merged_logits = merged(probe).logits
    assert torch.allclose(merged_logits, tuned_logits, atol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 1e-4  # training moved the model
    assert not any("lora" in k for k in merged.state_dict())  # a plain model, no PEFT modules left

    # a finished stage is not trained twice
    mtime = (stage / "manifest.json").stat().st_mtime
    assert cli_main(["sft", "--config", str(recipe)]) == 0
    assert (stage / "manifest.json").stat().st_mtime == mtime


def metrics(stage: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (stage / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_max_seq_len_above_the_models_positions_is_refused_before_training(tmp_path):
    """As cpt's data.seq_len: an example longer than max_position_embeddings would train untrained positions."""
    model_dir = save_tiny(tmp_path, layers=1)  # max_position_embeddings 512
    data = tmp_path / "data.json"
    data.write_text(json.dumps(arithmetic_records(4)))
    cfg = SFTConfig(micro_batch_size=2, global_batch_size=2, max_steps=1, max_seq_len=513)
    with pytest.raises(HealerError, match=r"sft.max_seq_len: 513 tokens .*max_position_embeddings \(512\)"):
        train_lora(str(model_dir), data, cfg, tmp_path / "sft")
    assert not (tmp_path / "sft" / "adapter").exists()


def test_interrupted_sft_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    """Stop at step 2 (--steps), get SIGTERM during step 4, finish: the same losses and adapter, bit for bit.

    ZeRO-3 with LoRA dropout on, so the adapter shards, optimizer state and RNG must all come back.
    """
    import signal

    from safetensors.torch import load_file

    from healer.train.metrics import MetricsLogger

    model_dir = save_tiny(tmp_path, layers=2)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(arithmetic_records()))
    cfg = SFTConfig(micro_batch_size=2, global_batch_size=8, epochs=2, lr=3e-3, zero_stage=3, save_every=2,
                    dropout=0.1, seed=0)

    whole = train_lora(str(model_dir), data, cfg, tmp_path / "whole")
    split = tmp_path / "split"
    assert train_lora(str(model_dir), data, cfg, split, opts=Options(steps=2)) is None
    assert (split / "checkpoints" / "latest").read_text().strip() == "step00000002"
    with pytest.raises(HealerError, match=r"sft\.data: .*'examples': 24.*'examples': 20.*sft\.max_samples: None -> 20"):
        train_lora(str(model_dir), data, cfg.model_copy(update={"max_samples": 20}), split)

    log = MetricsLogger.log

    def log_then_preempt(self, step, scalars):  # a scheduler's SIGTERM, arriving while step 4 is logged
        log(self, step, scalars)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    sigterm_before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(MetricsLogger, "log", log_then_preempt)
    assert train_lora(str(model_dir), data, cfg, split) == "preempted"
    monkeypatch.setattr(MetricsLogger, "log", log)
    # the flag is honoured at the next step boundary: step 5 is finished and saved, not lost
    assert (split / "checkpoints" / "latest").read_text().strip() == "step00000005"
    assert json.loads((split / "PREEMPTED").read_text())["step"] == 5
    assert signal.getsignal(signal.SIGTERM) == sigterm_before  # our handler is gone again
    assert not (split / "merged").exists()
    resumed = train_lora(str(model_dir), data, cfg, split)

    assert not (split / "PREEMPTED").exists()
    assert resumed["tokens_trained"] == whole["tokens_trained"] and resumed["steps"] == 6
    assert resumed["supervised_tokens"] == whole["supervised_tokens"]
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(split / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    want, got = metrics(tmp_path / "whole"), metrics(split)
    assert sorted(got) == list(range(1, 7))
    assert [got[s]["train/loss"] for s in got] == [want[s]["train/loss"] for s in want]
    assert want[6]["train/loss"] < want[1]["train/loss"]  # it learns the arithmetic answers

    # --resume none starts over and keeps the old checkpoints aside
    train_lora(str(model_dir), data, cfg, split, opts=Options(resume="none", steps=1))
    assert [p.name for p in split.glob("checkpoints.old-*")] and (split / "checkpoints" / "latest").read_text() == \
        "step00000001"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_under_zero2_match_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m healer sft` splits each global batch over ranks: same adapter as 1 rank."""
    from safetensors.torch import load_file

    model_dir = save_tiny(tmp_path, layers=2)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(arithmetic_records(16)))
    sft = {"data": str(data), "micro_batch_size": 2, "global_batch_size": 8, "epochs": 1, "lr": 3e-3,
           "zero_stage": 2, "dropout": 0.0}
    recipe = write_recipe(tmp_path, model_dir, sft)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           "-m", "healer", "sft", "--config", str(recipe)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = read_stage_manifest(tmp_path / "run" / "sft")["outputs"]

    cfg = SFTConfig(**{k: v for k, v in sft.items() if k != "data"})
    one = train_lora(str(model_dir), data, cfg, tmp_path / "one")
    assert two["tokens_trained"] == one["tokens_trained"] and two["steps"] == one["steps"] == 2
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "run" / "sft" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)



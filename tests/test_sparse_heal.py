"""Healing that keeps a sparse prune's mask: CPT re-applies it after every optimizer step (ZeRO 2 and 3, with
and without KD, across a kill and resume), and LoRA SFT merges ``(W + dW) * mask``. The test in every case:
the healed model has exactly the pruned zeros, and the N:M pattern still holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import SAMPLE_TEXT, free_port, save_tiny, tiny_tokenizer
from transformers import AutoModelForCausalLM

from healer.core.errors import HealerError
from healer.model.modeling import resolve_source
from healer.prune.sparse import prune_sparse, verify_sparsity
from healer.train.masks import pack_bits, sparsity_to_keep, unpack_bits

SHAPE = {"layers": 2, "hidden": 32, "intermediate": 64, "heads": 4, "kv_heads": 2}


def _corpus(path: Path, docs: int = 120, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    words = SAMPLE_TEXT.split()
    with open(path, "w") as fh:
        fh.writelines(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))}) + "\n"
                      for _ in range(docs))
    return path


def _sparse(root: Path, pattern: str = "2:4", name: str = "pruned") -> tuple[Path, Path, int]:
    """(dense dir, 2:4 magnitude-pruned dir with its prune_report.json, pruned zero count)."""
    dense = root / "dense"
    if not dense.exists():
        save_tiny(root, "llama", name="dense", **SHAPE)
    report = prune_sparse(resolve_source(str(dense)), root / name, None, None, criterion="magnitude",
                          pattern=pattern, ratio=0.5 if pattern == "unstructured" else None, progress=False)
    return dense, root / name, report["sparsity"]["zeros"]


def _zeros(model_dir: Path, pattern: str = "2:4") -> tuple[int, bool]:
    found = verify_sparsity(model_dir, pattern, 0.5 if pattern == "unstructured" else None)["sparsity"]
    return found["zeros"], found["pattern_holds"]


def test_packed_masks_round_trip():
    mask = torch.rand(7, 13) > 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), (7, 13)), mask)
    assert pack_bits(mask).numel() == (7 * 13 + 7) // 8


def test_a_sparse_prune_is_found_from_its_report_or_the_recipe(tmp_path):
    from healer.recipe import load_recipe

    dense, pruned, zeros = _sparse(tmp_path)
    recipe = load_recipe(None, {"model.source": str(dense), "run_dir": str(tmp_path / "run")})
    assert sparsity_to_keep(recipe, str(pruned)) == {"pattern": "2:4", "ratio": 0.5, "layers": [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "zeros": zeros}
    assert sparsity_to_keep(recipe, str(dense)) is None  # a dense input trains without a mask


@pytest.mark.parametrize("damage", [b'{"method": "sparse", "pattern": "2:', b"\xff\xfe\x00binary", b"[1, 2]"])
def test_a_damaged_prune_report_stops_the_heal_instead_of_dropping_the_mask(tmp_path, damage):
    # Read as "no report", the sparse prune would heal as a dense model and lose its zeros with exit 0.
    _, pruned, _ = _sparse(tmp_path)
    (pruned / "prune_report.json").write_bytes(damage)
    with pytest.raises(HealerError, match="prune_report.json .*run the stage that wrote it again"):
        sparsity_to_keep(None, str(pruned))


# -- CPT, one process ------------------------------------------------------------------------------------

def _heal(root: Path, model: Path, stage: str, *, max_steps: int, resume: str = "auto", keep: dict | None, **cpt):
    from healer.train.config import CPTConfig
    from healer.train.cpt import Options, heal
    from healer.train.data.config import DataConfig, SourceConfig

    cfg = CPTConfig(**{"zero_stage": 2, "micro_batch_size": 2, "global_batch_size": 4, "save_every": 2,
                       "warmup_steps": 0, "lr": 3e-3, "seed": 0, "max_steps": max_steps, "kd": None,
                       **cpt})  # CE: no teacher is given
    data = DataConfig(sources=[SourceConfig(path=str(root / "train.jsonl"))], seq_len=32)
    return heal(cfg, data, location=resolve_source(str(model)), teacher_location=None, stage_dir=root / stage,
                hf_dir=root / stage / "hf", opts=Options(resume=resume), keep_sparsity=keep)


@pytest.mark.slow
def test_cpt_keeps_every_pruned_zero_and_a_resume_keeps_the_saved_mask(tmp_path):
    """Without the mask one optimizer step fills the zeros in; with it the export has exactly the pruned zeros,
    and a resumed run takes its mask from the checkpoint, not from whatever the input holds by then."""
    _corpus(tmp_path / "train.jsonl")
    _, pruned, zeros = _sparse(tmp_path)
    keep = sparsity_to_keep(None, str(pruned))

    unmasked = _heal(tmp_path, pruned, "dense_heal", max_steps=2, keep=None)
    assert _zeros(Path(unmasked["hf_dir"]))[0] < zeros // 10  # the optimizer fills the pruned weights back in

    first = _heal(tmp_path, pruned, "cpt", max_steps=4, keep=keep)
    assert first["sparsity"]["zeros"] == zeros and first["sparsity"]["pattern_holds"]
    assert _zeros(tmp_path / "cpt" / "hf") == (zeros, True)
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "cpt" / "hf")
    before = AutoModelForCausalLM.from_pretrained(pruned)
    assert not torch.equal(healed.model.layers[0].mlp.down_proj.weight, before.model.layers[0].mlp.down_proj.weight)
    assert (tmp_path / "cpt" / "checkpoints" / "step00000004" / "constraints_rank0.safetensors").is_file()

    # The input changes under the run (its zeros filled in): a resume must still keep the mask it saved.
    before.model.layers[0].mlp.down_proj.weight.data.add_(1e-3)
    before.save_pretrained(pruned)
    more = _heal(tmp_path, pruned, "cpt", max_steps=6, keep=keep)
    assert more["steps"] == 6 and more["sparsity"]["zeros"] == zeros


@pytest.mark.slow
def test_a_checkpoint_without_a_mask_is_not_resumed_as_sparse(tmp_path):
    _corpus(tmp_path / "train.jsonl")
    _, pruned, _ = _sparse(tmp_path)
    _heal(tmp_path, pruned, "cpt", max_steps=2, keep=None)
    with pytest.raises(HealerError, match="holds no sparsity mask.*--resume none"):
        _heal(tmp_path, pruned, "cpt", max_steps=4, keep=sparsity_to_keep(None, str(pruned)))


# -- CPT, two processes, ZeRO-2 and ZeRO-3, killed and resumed -------------------------------------------



def _run(root: Path, recipe: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("HEALER_FAULT", None)
    if fault:
        env["HEALER_FAULT"] = fault
    cmd = ["timeout", "300", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "healer", "cpt",
           "--config", str(recipe)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root, check=False)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("zero_stage,kd", [(2, False), (3, True)])
def test_two_ranks_keep_the_mask_through_a_kill_and_resume(tmp_path, zero_stage, kd):
    """2 ranks; rank 1 SIGKILLed after step 3 (step 2 saved); the resumed run loads each rank's mask share
    (partitioned under ZeRO-3) and the export holds exactly the pruned zeros and the 2:4 pattern."""
    _corpus(tmp_path / "train.jsonl")
    dense, pruned, zeros = _sparse(tmp_path)
    out = tmp_path / "cpt"
    recipe = {"model": {"source": str(dense)},
              "data": {"sources": [{"path": str(tmp_path / "train.jsonl")}], "seq_len": 32},
              "cpt": {"input": str(pruned), "output": str(out), "zero_stage": zero_stage, "micro_batch_size": 2,
                      "global_batch_size": 8, "max_steps": 5, "lr": 3e-3, "warmup_steps": 0, "save_every": 2}}
    recipe["cpt"]["kd"] = {"alpha": 0.5, "temperature": 2.0} if kd else None  # None: plain CE
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    killed = _run(tmp_path, path, fault="kill_at_step:3:1")
    assert killed.returncode != 0 and (out / "checkpoints" / "latest").is_file(), killed.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"
    shares = [out / "checkpoints" / "step00000002" / f"constraints_rank{r}.safetensors" for r in (0, 1)]
    assert all(s.is_file() for s in shares)
    if zero_stage == 3:  # each rank saved its partition of each mask: half a weight's entries
        from safetensors.torch import load_file

        share = load_file(shares[1])
        down = "sparsity_mask.model.layers.0.mlp.down_proj.weight.shape"
        assert share[down].tolist() == [32 * 64 // 2]
    final = _run(tmp_path, path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resumed from" in final.stderr
    assert _zeros(out / "hf") == (zeros, True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"]["sparsity"]["zeros"] == zeros and manifest["outputs"]["steps"] == 5


# -- LoRA SFT: the merge writes (W + dW) * mask ------------------------------------------------------------

def _adapter(base_dir: Path, out: Path) -> Path:
    """A LoRA adapter with nonzero A and B on every projection (as after training)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_lora_merge_writes_exactly_the_pruned_zeros(tmp_path, pattern):
    from healer.train.lora import merge_adapter

    _, pruned, zeros = _sparse(tmp_path, pattern)
    adapter = _adapter(pruned, tmp_path / "adapter")
    keep = sparsity_to_keep(None, str(pruned))
    merge_adapter(resolve_source(str(pruned)), adapter, tmp_path / "plain", tiny_tokenizer(), torch.float32)
    assert _zeros(tmp_path / "plain", pattern)[0] < zeros // 10  # a plain merge fills every zero in
    merge_adapter(resolve_source(str(pruned)), adapter, tmp_path / "merged", tiny_tokenizer(), torch.float32, keep)
    assert _zeros(tmp_path / "merged", pattern) == (zeros, True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").model.layers[1].self_attn.q_proj.weight
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").model.layers[1].self_attn.q_proj.weight
    kept = merged != 0
    assert torch.equal(merged[kept], plain[kept])  # the kept weights carry the adapter's update


@pytest.mark.slow
def test_sft_stage_on_a_sparse_base_keeps_its_zeros(tmp_path):
    from healer.train.config import SFTConfig
    from healer.train.sft import train_lora

    _, pruned, zeros = _sparse(tmp_path)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Add {i} and {i + 1}.", "input": "",
                                 "output": f"The sum is {2 * i + 1}."} for i in range(16)]))
    cfg = SFTConfig(micro_batch_size=2, global_batch_size=4, epochs=1, lr=3e-3, zero_stage=2, seed=0)
    out = train_lora(str(pruned), data, cfg, tmp_path / "sft", keep_sparsity=sparsity_to_keep(None, str(pruned)))
    assert out["sparsity"]["zeros"] == zeros and out["sparsity"]["pattern_holds"]
    assert _zeros(tmp_path / "sft" / "merged") == (zeros, True)

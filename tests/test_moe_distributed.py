"""A mixture-of-experts student healed by KD under ZeRO-3 on 2 ranks whose tokens go to different experts."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import SAMPLE_TEXT, healer_on_ranks, save_tiny

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_zero3_kd_on_an_moe_whose_ranks_route_to_different_experts_finishes(tmp_path):
    from safetensors.torch import load_file

    # 16 experts, one per token, 16 tokens per rank and step: the ranks route to different sets of experts,
    # so any gather that followed the routing would leave one rank waiting for the other.
    kwargs = dict(layers=2, hidden=32, intermediate=64, num_experts=16, num_experts_per_tok=1)
    teacher = save_tiny(tmp_path, "qwen3_moe", name="teacher", seed=1, **kwargs)
    student = save_tiny(tmp_path, "qwen3_moe", name="student", seed=2, **kwargs)
    words = SAMPLE_TEXT.split()
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(words[i % len(words):] + words[:i % len(words)])}) + "\n"
                              for i in range(60)))
    out = tmp_path / "cpt"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"source": str(teacher)}, "data": {"sources": [{"path": str(corpus)}], "seq_len": 16},
        "cpt": {"input": str(student), "output": str(out), "zero_stage": 3, "micro_batch_size": 1,
                "global_batch_size": 2, "max_steps": 3, "lr": 1e-2, "warmup_steps": 0,
                "kd": {"alpha": 0.5, "temperature": 2.0}}}))
    done = healer_on_ranks("cpt", recipe, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    before, after = load_file(student / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before if ".experts." in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if ".gate.weight" in k)

"""Objectives on real DeepSpeed engines: 2 processes, gloo, CPU, ZeRO-2 and ZeRO-3 (partitioned output head,
tied embeddings, a ZeRO-3 teacher). Loss, full gradients and the losses of two further optimizer steps must
equal plain-PyTorch references (the unchunked ``distill_loss`` / the HF loss) to 1e-5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("kd_distributed_worker.py")




def test_objectives_under_zero2_and_zero3_match_references(tmp_path):
    out = tmp_path / "diffs.json"
    done = torchrun([str(WORKER), str(out)], timeout=540, cwd=WORKER.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    diffs = json.loads(out.read_text())
    assert set(diffs) == {"z3_kd_top7", "z3_kd_tied", "z3_ce", "z3_hidden_mse", "z2_kd_top7"}
    for case, d in diffs.items():
        assert d["loss"] <= 1e-5 and d["grad"] <= 1e-5, (case, d)

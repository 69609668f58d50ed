"""``healer prune`` end to end: what lands on disk, what the report says, and how bad input is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, save_tiny
from healer.cli import main
from healer.errors import HealerError
from healer.prune.config import PruneConfig
from healer.prune.stage import prune


@pytest.mark.parametrize("family", FAMILIES)
def test_depth_ppl_writes_a_loadable_checkpoint_and_report(family, tmp_path, calibration_file):
    src = save_tiny(tmp_path, family, layers=8)
    cfg = PruneConfig(method="depth", criterion="ppl", ratio=0.25, calibration={"path": str(calibration_file),
                                                                                 "num_samples": 4, "seq_len": 32})
    report = prune(str(src), cfg, tmp_path / "out", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 6
    assert len(report["removed"]) == 2 and set(report["removed"]) <= set(range(4, 6))  # "+": keep first 4, last 2
    assert report["protected"] == {"keep_first": 4, "keep_last": 2, "applied": True}
    assert set(report["scores"]) == {"4", "5"}
    assert report["params_after"] < report["params_before"]
    assert report["calibration_ppl_after"] > 0 and report["calibration_ppl_before"] > 0
    assert report["config_changes"]["num_hidden_layers"] == [8, 6]
    on_disk = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert on_disk["removed"] == report["removed"]
    assert (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.mark.parametrize("criterion", ["block_influence", "angular", "magnitude", "taylor"])
def test_other_depth_criteria_remove_the_requested_count(criterion, tmp_path, calibration_file):
    src = save_tiny(tmp_path, "llama", layers=8)
    cfg = PruneConfig(method="depth", criterion=criterion, num_blocks=3, keep_first=1, keep_last=1,
                      calibration={"path": str(calibration_file), "num_samples": 4, "seq_len": 32})
    report = prune(str(src), cfg, tmp_path / "out", progress=False)
    assert len(report["removed"]) == 3
    if criterion == "angular":
        first = report["removed"][0]
        assert report["removed"] == [first, first + 1, first + 2]
    assert report["scored_from"] == ("memory" if criterion == "taylor" else "disk, one block at a time")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 5


@pytest.mark.parametrize("target,criterion", [("mlp", "maw"), ("mlp", "l2"), ("mlp", "activation"),
                                              ("attention", "head_norm")])
def test_width_pruning_edits_config_honestly(target, criterion, tmp_path, calibration_file):
    src = save_tiny(tmp_path, "qwen2", layers=3, heads=4, kv_heads=2, intermediate=128)
    cfg = PruneConfig(method="width", target=target, criterion=criterion, ratio=0.5,
                      calibration={"path": str(calibration_file), "num_samples": 4, "seq_len": 32})
    prune(str(src), cfg, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    if target == "mlp":
        assert config["intermediate_size"] == 64
    else:
        assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 16)
    assert "quantization_config" not in config


def test_explicit_block_list(tmp_path):
    src = save_tiny(tmp_path, "mistral", layers=6)
    report = prune(str(src), PruneConfig(blocks=[0, 5]), tmp_path / "out", progress=False)
    assert report["removed"] == [0, 5] and report["criterion"] == "explicit"


def test_cli_prune_and_key_naming_errors(tmp_path, calibration_file, capsys):
    src = save_tiny(tmp_path, "llama", layers=6)
    out = tmp_path / "cli-out"
    code = main(["prune", "--model", str(src), "--method", "width", "--target", "mlp", "--criterion", "maw",
                 "--ratio", "0.25", "--output", str(out)])
    assert code == 0
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 96
    assert json.loads((out / "manifest.json").read_text())["stage"] == "prune"

    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        model: {{source: {src}}}
        prune: {{method: depth, criterion: ppl, ratoi: 0.2}}
    """))
    assert main(["prune", "--config", str(recipe)]) == 2
    assert "prune.ratoi: unknown key" in capsys.readouterr().err
    assert main(["prune", "--model", str(src), "--ratio", "1.5"]) == 2
    assert "prune.ratio" in capsys.readouterr().err
    assert main(["prune", "--model", str(src), "--criterion", "bogus"]) == 2
    assert "unknown depth criterion 'bogus'" in capsys.readouterr().err


def test_bad_inputs_get_one_clear_message(tmp_path, calibration_file):
    src = save_tiny(tmp_path, "llama", layers=4)
    with pytest.raises(HealerError, match="would leave none"):
        prune(str(src), PruneConfig(num_blocks=4, criterion="magnitude"), tmp_path / "a", progress=False)
    with pytest.raises(HealerError, match="rounds to 0"):
        prune(str(src), PruneConfig(method="width", criterion="maw", ratio=0.99, round_to=8), tmp_path / "b",
              progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"title": "no text field"}\nnot json\n')
    with pytest.raises(HealerError, match="no usable text.*first at line 1"):
        prune(str(src), PruneConfig(criterion="block_influence", ratio=0.25, calibration={"path": str(empty)}),
              tmp_path / "c", progress=False)
    with pytest.raises(HealerError, match="calibration.path is required"):
        prune(str(src), PruneConfig(criterion="angular", ratio=0.25), tmp_path / "d", progress=False)
    with pytest.raises(HealerError, match="keep_first"):
        prune(str(src), PruneConfig(criterion="ppl", num_blocks=1, calibration={"path": str(calibration_file)}),
              tmp_path / "e", progress=False)  # 4 blocks, first 4 + last 2 protected
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # refused before writing anything


def test_unknown_family_refused_before_loading_weights(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(HealerError, match="'gpt2' is not supported"):
        prune(str(tmp_path / "gpt2"), PruneConfig(criterion="magnitude", num_blocks=1), tmp_path / "o")


_PEAK_SCRIPT = """
import sys, torch
from healer.prune import depth
from healer.prune.blockwise import BlockStack
import transformers.masking_utils, transformers.models.llama.modeling_llama  # imports are not the measurement
tokens = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))

def rss_kb(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))

with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
    fh.write("5")
base = rss_kb("VmRSS:")
if sys.argv[2] == "layerwise":
    stack = BlockStack.from_pretrained_dir(sys.argv[1])
else:
    from transformers import AutoModelForCausalLM
    stack = BlockStack.from_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]))
scores = depth.block_influence_scores(stack, tokens, list(range(stack.num_blocks)), progress=False)
print((rss_kb("VmHWM:") - base) / 1024, sorted(scores.items()))
"""


@pytest.mark.slow
def test_layerwise_scoring_peak_memory_is_a_fraction_of_the_model(tmp_path):
    """Scoring from disk holds one block at a time: its peak memory is far below the full model's."""
    src = save_tiny(tmp_path, "llama", layers=12, hidden=512, intermediate=2048, heads=8, kv_heads=8, vocab=256)
    model_mb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20
    runs = {}
    for mode in ("layerwise", "full"):
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(src), mode], capture_output=True, text=True,
                             check=True, timeout=300)
        peak, scores = out.stdout.strip().split(" ", 1)
        runs[mode] = (float(peak), scores)
    assert runs["layerwise"][1] == runs["full"][1]  # same scores either way
    assert model_mb > 150
    assert runs["full"][0] > 0.8 * model_mb
    assert runs["layerwise"][0] < 0.4 * runs["full"][0], runs

"""``healer prune`` end to end: what lands on disk, what the report says, and how bad input is refused."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import ALL_FAMILIES, save_tiny
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from healer.cli import main
from healer.core.errors import HealerError
from healer.prune.config import PruneConfig
from healer.prune.criteria import CRITERIA
from healer.prune.stage import prune, teachers
from healer.recipe import load_recipe


@pytest.mark.parametrize("family", ALL_FAMILIES)
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
    cfg = PruneConfig(method="width", target=target, criterion=criterion, ratio=0.5, round_to=64,
                      calibration={"path": str(calibration_file), "num_samples": 4, "seq_len": 32})
    report = prune(str(src), cfg, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    if target == "mlp":
        assert config["intermediate_size"] == 64
        # round_to 64 is below what llama.cpp's k-quants need: the report says so and records the divisibility
        assert report["widths"]["intermediate_size"] == {
            "value": 64, "divisible_by": {"32": True, "64": True, "128": False, "256": False}}
        assert any("k-quants" in w for w in report["warnings"])
        assert json.loads((tmp_path / "out" / "prune_report.json").read_text())["warnings"] == report["warnings"]
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
                 "--ratio", "0.25", "--round-to", "32", "--output", str(out)])
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
    assert main(["prune", "--model", str(src), "--blocks", "[]", "--output", str(tmp_path / "none")]) == 2
    assert "prune.blocks is empty" in capsys.readouterr().err
    assert main(["prune", "--model", str(src), "--num-blocks", "1", "--criterion", "magnitude",
                 "--output", str(src)]) == 2
    assert "is the input model" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


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


@pytest.fixture
def no_scoring(monkeypatch):
    """Every criterion fails loudly if called: a refusal must come before any scoring work."""
    def scored(*_args, **_kwargs):
        raise AssertionError("a criterion ran although the input should have been refused first")

    for table in CRITERIA.values():
        for name, spec in table.items():
            monkeypatch.setitem(table, name, dataclasses.replace(spec, score=scored))


def _break_weights(src):
    file = src / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])


def _break_config(src):
    (src / "config.json").write_text('{"model_type": "llama", ')


# (name, how to break the setup, PruneConfig kwargs, output (relative to tmp_path, or a marker), expected error)
REFUSALS = [
    ("output is the input", None, dict(num_blocks=1, criterion="magnitude"), "model",
     "prune.output: .* is the input model"),
    ("output inside the input", None, dict(num_blocks=1, criterion="magnitude"), "model/pruned",
     "is inside the input model"),
    ("output is the KD teacher", None, dict(num_blocks=1, criterion="magnitude"), "teacher",
     r"is the KD teacher \(cpt.kd.teacher\)"),
    ("output is a file", None, dict(num_blocks=1, criterion="magnitude"), "a-file", "is a file, not a directory"),
    ("output below a file", None, dict(num_blocks=1, criterion="magnitude"), "a-file/out", "cannot be created"),
    ("seq_len above max positions", None,
     dict(num_blocks=1, criterion="block_influence", calibration={"seq_len": 600}), "out",
     r"prune.calibration.seq_len: 600 tokens .*max_position_embeddings \(512\)"),
    ("all blocks", None, dict(num_blocks=4, criterion="magnitude"), "out", "would leave none"),
    ("ratio rounds to no block", None, dict(ratio=0.05, criterion="magnitude"), "out", "rounds to 0 blocks"),
    ("block out of range", None, dict(blocks=[1, 4]), "out", r"prune.blocks: \[4\] out of range"),
    ("every block listed", None, dict(blocks=[0, 1, 2, 3]), "out", "removes all 4 blocks"),
    ("protected ends leave too few", None, dict(num_blocks=1, criterion="ppl"), "out", "keep_first"),
    ("width ratio removes no neuron", None, dict(method="width", criterion="maw", ratio=0.01, round_to=8), "out",
     "rounds to removing none"),
    ("width ratio removes every KV group", None, dict(method="width", criterion="head_norm", ratio=0.9), "out",
     "would remove all 2 key-value groups"),
    ("no calibration for a data criterion", None, dict(num_blocks=1, criterion="angular", calibration={"path": None}),
     "out", "calibration.path is required by criterion 'angular'"),
    ("truncated safetensors", _break_weights, dict(num_blocks=1, criterion="magnitude"), "out",
     "model.safetensors: not a readable safetensors file .*truncated or corrupt"),
    ("invalid config.json", _break_config, dict(num_blocks=1, criterion="magnitude"), "out",
     "cannot read the config .*config.json"),
]


@pytest.mark.parametrize("name,breakage,kwargs,output,expected", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_input_is_refused_in_one_line_before_scoring(name, breakage, kwargs, output, expected, tmp_path,
                                                         calibration_file, no_scoring):
    src = save_tiny(tmp_path, "llama", layers=4)
    teacher = save_tiny(tmp_path, "llama", name="teacher", layers=4)
    (tmp_path / "a-file").write_text("not a directory")
    if breakage:
        breakage(src)
    kwargs.setdefault("calibration", {})
    kwargs["calibration"] = {"path": str(calibration_file), "num_samples": 2, "seq_len": 16} | kwargs["calibration"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(HealerError, match=expected) as err:
        prune(str(src), PruneConfig(**kwargs), tmp_path / output, progress=False,
              keep_apart={"the KD teacher (cpt.kd.teacher)": str(teacher)})
    assert "\n" not in str(err.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_garbage_gguf_is_refused_naming_it(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(200))
    with pytest.raises(HealerError, match=f"{gguf}: cannot read the config from this GGUF file"):
        prune(str(gguf), PruneConfig(num_blocks=1, criterion="magnitude"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(HealerError, match="is the folder of the input model .*would shadow the GGUF"):
        prune(str(gguf), PruneConfig(num_blocks=1, criterion="magnitude"), tmp_path, progress=False)


CONFIG_REFUSALS = [
    (dict(blocks=[]), "prune.blocks is empty, so nothing would be removed"),
    (dict(blocks=[2, 2]), r"prune.blocks lists \[2\] more than once"),
    (dict(ratio=0.0), "prune.ratio must be between 0 and 1"),
    (dict(ratio=-0.2), "prune.ratio must be between 0 and 1"),
    (dict(ratio=1.0), "prune.ratio must be between 0 and 1"),
    (dict(num_blocks=0), "num_blocks"),
    (dict(num_blocks=-1), "num_blocks"),
    (dict(), "say how much to remove"),
    (dict(ratio=0.2, num_blocks=2), "give only one of ratio, num_blocks, blocks"),
    (dict(method="width", criterion="maw"), "prune.ratio is required for method: width"),
    (dict(method="width", criterion="maw", ratio=0.2, num_blocks=1), "apply to method: depth only"),
    (dict(criterion="bogus", ratio=0.2), "unknown depth criterion 'bogus'; choose one of ppl, taylor"),
    (dict(criterion="maw", ratio=0.2), "'maw' is a width criterion: set prune.method: width"),
    (dict(method="width", criterion="maw", target="attention", ratio=0.2), "'maw' prunes mlp, not attention"),
    (dict(method="sparse", ratio=0.2), "method"),
]


@pytest.mark.parametrize("kwargs,expected", CONFIG_REFUSALS)
def test_impossible_settings_are_refused_naming_the_key(kwargs, expected):
    with pytest.raises(ValidationError, match=expected):
        PruneConfig(**kwargs)


def test_teachers_of_a_recipe_are_kept_apart(tmp_path):
    src = save_tiny(tmp_path, "llama", layers=4)
    out = tmp_path / "teacher"
    out.mkdir()
    recipe = load_recipe(None, {"model.source": str(src), "prune.num_blocks": 1, "prune.criterion": "magnitude",
                                "prune.output": str(out), "cpt.kd.teacher": str(out)})
    assert teachers(recipe) == {"the KD teacher (cpt.kd.teacher)": str(out)}
    with pytest.raises(HealerError, match="is the KD teacher"):
        prune(recipe.stage_input("prune"), recipe.prune, recipe.stage_dir("prune"), keep_apart=teachers(recipe))
    default = load_recipe(None, {"model.source": str(src), "prune.num_blocks": 1, "cpt.kd": {}})
    assert teachers(default) == {"the KD teacher (cpt.kd.teacher)": str(src)}  # the dense model by default


def test_an_interrupted_rerun_leaves_the_previous_result_whole_and_no_file_of_it_in_the_next(tmp_path, monkeypatch):
    src = save_tiny(tmp_path, "llama", layers=4)
    out = tmp_path / "out"
    prune(str(src), PruneConfig(num_blocks=1, criterion="magnitude"), out, progress=False)
    (out / "tokenizer.model").write_text("a file the next source does not have")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import healer.prune.stage as stage

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt  # killed while saving

    monkeypatch.setattr(stage, "save_and_verify", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prune(str(src), PruneConfig(num_blocks=2, criterion="magnitude"), out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old result, whole
    monkeypatch.undo()
    report = prune(str(src), PruneConfig(num_blocks=2, criterion="magnitude"), out, progress=False)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4 - len(report["removed"]) == 2
    assert not (out / "tokenizer.model").exists()  # nothing of the earlier result beside the new one
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []  # the leftovers are gone


def test_a_directory_holding_another_model_is_not_overwritten(tmp_path):
    src = save_tiny(tmp_path, "llama", layers=4)
    other = save_tiny(tmp_path, "llama", name="other", layers=2)  # e.g. another stage's export
    with pytest.raises(HealerError, match="already holds config.json that healer prune did not write"):
        prune(str(src), PruneConfig(num_blocks=1, criterion="magnitude"), other, progress=False)
    assert json.loads((other / "config.json").read_text())["num_hidden_layers"] == 2
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("unrelated files are no model")
    prune(str(src), PruneConfig(num_blocks=1, criterion="magnitude"), tmp_path / "notes", progress=False)


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
scores = depth.block_influence_scores(stack, tokens, list(range(stack.num_blocks)), 1, progress=False)
print((rss_kb("VmHWM:") - base) / 1024, sorted(scores.items()))
"""


@pytest.mark.slow
def test_layerwise_scoring_peak_memory_is_a_fraction_of_the_model(tmp_path):
    """Scoring from disk holds one block at a time: its peak memory is far below the full model's."""
    src = save_tiny(tmp_path, "llama", layers=12, hidden=512, intermediate=2048, heads=8, kv_heads=8, vocab=256)
    model_mb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20
    runs = {}
    # A fixed mmap threshold: glibc otherwise raises it after the first large free, so later blocks come from
    # the heap and stay in RSS after they are freed (the layerwise peak then wandered from 59 to 102 MB).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    for mode in ("layerwise", "full"):
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(src), mode], capture_output=True, text=True,
                             check=True, timeout=300, env=env)
        peak, scores = out.stdout.strip().split(" ", 1)
        runs[mode] = (float(peak), scores)
    assert runs["layerwise"][1] == runs["full"][1]  # same scores either way
    assert model_mb > 150
    assert runs["full"][0] > 0.8 * model_mb
    assert runs["layerwise"][0] < 0.4 * runs["full"][0], runs

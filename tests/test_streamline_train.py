"""``healer replace``: the block prune put in place of a span learns the span's map, and only that block changes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import SAMPLE_TEXT, healer_on_ranks, save_tiny
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from healer.cli import main
from healer.recipe import load_recipe

STEPS = 24


def _recipe(tmp_path, calibration_file, **replace) -> tuple:
    model = save_tiny(tmp_path, "llama", layers=8)
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{i} {SAMPLE_TEXT}"}) + "\n" for i in range(60)))
    held = tmp_path / "val.jsonl"
    held.write_text("".join(json.dumps({"text": f"held out {i} {SAMPLE_TEXT[::-1]}"}) + "\n" for i in range(10)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"source": str(model)}, "run_dir": str(tmp_path / "run"),
        "prune": {"method": "depth", "criterion": "angular", "num_blocks": 3, "keep_first": 1, "keep_last": 1,
                  "calibration": {"path": str(calibration_file), "num_samples": 4, "seq_len": 32},
                  "replace": {"kind": "layer", "init": "closest"}},
        "data": {"sources": [{"path": str(corpus)}], "validation": [{"path": str(held)}], "seq_len": 32},
        "replace": {"max_steps": STEPS, "lr": 3e-3, "warmup_steps": 0, "schedule": "constant", "micro_batch_size": 2,
                    "global_batch_size": 2, "zero_stage": 2, "eval_every": 8, "save_every": 8, **replace},
        "release": {"model_name": "tiny-streamline"}}))
    return model, recipe


def test_replacement_learns_the_span_and_only_it_changes(tmp_path, calibration_file):
    model, recipe = _recipe(tmp_path, calibration_file)
    assert main(["prune", "--config", str(recipe)]) == 0
    assert main(["replace", "--config", str(recipe)]) == 0
    pruned, stage = tmp_path / "run" / "prune", tmp_path / "run" / "replace"
    report = json.loads((stage / "prune_report.json").read_text())
    rep = report["replacement"]
    trained = rep["training"]
    curve = [mse for _, mse in trained["mse_curve"]]
    assert [s for s, _ in trained["mse_curve"]] == list(range(1, STEPS + 1))
    assert sum(curve[-4:]) < 0.75 * sum(curve[:4])  # the loss goes down
    before, after = trained["before_training"], trained["after_training"]
    assert after["mse"] < before["mse"] and after["cosine"] > before["cosine"]
    assert before["mse_plain_cut"] > 0 and -1 <= before["cosine_plain_cut"] <= 1
    assert trained["tokens_trained"] == STEPS * 2 * 32
    # hf/ is a plain checkpoint with kept + 1 blocks; it differs from prune's output in the replacement alone.
    out = AutoModelForCausalLM.from_pretrained(stage / "hf")
    assert out.config.num_hidden_layers == 8 - 3 + 1
    a, b = load_file(str(pruned / "model.safetensors")), load_file(str(stage / "hf" / "model.safetensors"))
    prefix = f"model.layers.{rep['position']}."
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith(prefix) for k in changed)
    assert json.loads((stage / "manifest.json").read_text())["outputs"]["steps"] == STEPS
    # cpt would start from the trained model, not prune's.
    assert load_recipe(recipe, ["cpt.max_steps=1"]).stage_input("cpt") == str(stage / "hf")
    # The model card says what replaced the span and how it was trained, with its curve.
    assert main(["release", "--config", str(recipe)]) == 0
    release = tmp_path / "run" / "release"
    card = (release / "README.md").read_text()
    assert f"initialised from block {rep['init_from_block']}" in card and "trained alone for 1,536 tokens" in card
    assert (release / "images" / "replace_curves.png").is_file() and "LoRA" not in card
    assert AutoModelForCausalLM.from_pretrained(release).config.num_hidden_layers == 6


def test_replace_needs_a_replacement_to_train(tmp_path, calibration_file, capsys):
    model, recipe = _recipe(tmp_path, calibration_file)
    with pytest.raises(Exception, match="prune.replace.kind: layer"):
        load_recipe(recipe, ["prune.replace.kind=none"])
    save_tiny(tmp_path, "llama", name="plain")
    assert main(["replace", "--config", str(recipe), f"replace.input={tmp_path / 'plain'}"]) != 0
    assert "plain/prune_report.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "run" / "replace" / "checkpoints").exists()


def test_llama2_7b_recipe_is_the_papers_setting():
    from pathlib import Path

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "streamline-llama2-7b.yaml")
    assert recipe.prune.replacing and recipe.prune.replace.kind == "layer" and recipe.prune.criterion == "angular"
    assert recipe.prune.calibration.num_samples == 500  # the paper's span-choice samples
    assert 32 - recipe.prune.num_blocks + 1 == 24  # ~25% of Llama-2-7B's parameters
    r = recipe.replace
    samples = r.max_steps * r.global_batch_size
    assert abs(samples - 30_000) <= r.global_batch_size  # the paper's 30,000 training samples
    assert abs(samples * recipe.data.seq_len - 0.06e9) < 0.003e9  # 0.06B tokens
    assert recipe.stage_input("replace") == str(recipe.stage_dir("prune"))
    assert recipe.stage_input("eval") == str(recipe.model_dir("replace"))


def test_longer_run_resumes_and_keeps_the_first_runs_before_measurement(tmp_path, calibration_file, capsys):
    model, recipe = _recipe(tmp_path, calibration_file, max_steps=8)
    assert main(["prune", "--config", str(recipe)]) == 0
    assert main(["replace", "--config", str(recipe)]) == 0
    stage = tmp_path / "run" / "replace"
    first = json.loads((stage / "prune_report.json").read_text())["replacement"]["training"]
    assert main(["replace", "--config", str(recipe), "replace.max_steps=16"]) == 0
    assert "at step 8" in capsys.readouterr().err
    again = json.loads((stage / "prune_report.json").read_text())["replacement"]["training"]
    assert again["before_training"] == first["before_training"]
    assert [s for s, _ in again["mse_curve"]] == list(range(1, 17)) and again["mse_curve"][:8] == first["mse_curve"]
    assert again["tokens_trained"] == 16 * 2 * 32


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [3])
def test_two_ranks_under_zero_train_the_block_alone(tmp_path, calibration_file, zero_stage):
    model, recipe = _recipe(tmp_path, calibration_file, zero_stage=zero_stage, max_steps=8, global_batch_size=4)
    assert main(["prune", "--config", str(recipe)]) == 0
    done = healer_on_ranks("replace", recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    stage = tmp_path / "run" / "replace"
    trained = json.loads((stage / "prune_report.json").read_text())["replacement"]
    assert trained["training"]["tokens_trained"] == 8 * 4 * 32
    assert trained["training"]["after_training"]["mse"] < trained["training"]["before_training"]["mse"]
    a = load_file(str(tmp_path / "run" / "prune" / "model.safetensors"))
    b = load_file(str(stage / "hf" / "model.safetensors"))
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith(f"model.layers.{trained['position']}.") for k in changed)

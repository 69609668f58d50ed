"""`healer prune` with `method: sparse`: the recipe keys reach the sparse core, and the stage leaves a plain HF
directory with the zeros, a report that says how many and where, and a manifest the later stages read."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import save_tiny, tiny_tokenizer
from transformers import AutoModelForCausalLM

from healer.cli import main
from healer.core.errors import HealerError
from healer.core.manifest import read_stage_manifest
from healer.prune.sparse import verify_sparsity
from healer.prune.stage import Options, prune, run_prune_stage
from healer.recipe import RecipeError, load_recipe
from healer.release.stage import build_release


def sparse_recipe(src, tmp_path, calibration_file, **sparsity):
    return load_recipe(None, {"model.source": str(src), "run_dir": str(tmp_path / "run"), "prune.method": "sparse",
                              "prune.criterion": "wanda", "prune.sparsity": sparsity or {"pattern": "2:4"},
                              "prune.calibration": {"path": str(calibration_file), "num_samples": 4,
                                                    "seq_len": 16}})


def test_sparse_stage_writes_zeros_report_and_manifest(tmp_path, calibration_file, capsys):
    src = save_tiny(tmp_path, "llama", layers=2)
    recipe = sparse_recipe(src, tmp_path, calibration_file)
    assert run_prune_stage(recipe, Options()) == 0
    out = recipe.stage_dir("prune")
    report = json.loads((out / "prune_report.json").read_text())
    assert (report["method"], report["criterion"], report["pattern"]) == ("sparse", "wanda", "2:4")
    assert report["sparsity"]["pattern_holds"] and report["sparsity"]["overall"] == pytest.approx(0.5)
    assert set(report["sparsity"]["by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}
    assert len(report["sparsity"]["per_layer"]) == 2 * 7
    assert report["params_before"] == report["params_after"] and report["seed"] == 0
    assert report["calibration"]["tokens"] == 4 * 16 and report["pruned_from"] == "disk, one block at a time"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"]["sparsity"]["zeros"] == report["sparsity"]["zeros"]
    assert manifest["outputs"]["sparsity"]["pattern"] == "2:4"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    check = verify_sparsity(reloaded, "2:4")["sparsity"]
    assert check["pattern_holds"] and check["zeros"] == report["sparsity"]["zeros"]
    # Embeddings and lm_head are untouched.
    dense = AutoModelForCausalLM.from_pretrained(src)
    assert torch.equal(reloaded.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    assert "pattern holds in every layer" in capsys.readouterr().out
    # built aside and swapped in: nothing of the build is left in or beside the output
    assert not list(out.glob(".*")) and not list(out.parent.glob(f".{out.name}.*-*"))


def test_magnitude_needs_no_calibration_and_cli_flags_reach_sparsity(tmp_path, capsys):
    src = save_tiny(tmp_path, "qwen2", layers=2)
    out = tmp_path / "out"
    code = main(["prune", "--model", str(src), "--method", "sparse", "--criterion", "magnitude",
                 "--pattern", "unstructured", "--sparsity", "0.3",
                 "--prune.sparsity.layers", "[down_proj]", "--output", str(out)])
    assert code == 0, capsys.readouterr()
    report = json.loads((out / "prune_report.json").read_text())
    assert report["layers_pruned"] == ["down_proj"] and set(report["sparsity"]["by_type"]) == {"down_proj"}
    assert report["sparsity"]["overall"] == pytest.approx(0.3, abs=0.01)
    assert report["calibration"]["tokens"] == 0


def test_wanda_without_calibration_and_a_width_off_the_groups_are_refused_before_writing(tmp_path):
    src = save_tiny(tmp_path, "llama", layers=2, intermediate=100)
    cfg = load_recipe(None, {"model.source": str(src), "prune.method": "sparse", "prune.criterion": "wanda",
                             "prune.sparsity": {"pattern": "unstructured", "ratio": 0.5}}).prune
    with pytest.raises(HealerError, match="prune.calibration.path is required by criterion 'wanda'"):
        prune(str(src), cfg, tmp_path / "a", progress=False)
    cfg = load_recipe(None, {"model.source": str(src), "prune.method": "sparse", "prune.criterion": "magnitude",
                             "prune.sparsity": {"pattern": "4:8"}}).prune
    with pytest.raises(HealerError, match="down_proj has 100 inputs, not a multiple of 8"):
        prune(str(src), cfg, tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("overrides,named", [
    ({"prune.sparsity.pattern": 7}, "prune.sparsity.pattern is the number 7"),
    ({"prune.sparsity.pattern": "2:4", "prune.sparsity.ratio": 0.3}, "prune.sparsity.ratio 0.3 contradicts"),
    ({"prune.sparsity.pattern": "unstructured"}, "prune.sparsity.ratio is required"),
    ({"prune.sparsity.pattern": "half"}, "prune.sparsity.pattern: 'half' is neither"),
    ({"prune.sparsity.pattern": "2:4", "prune.sparsity.layers": ["lm_head"]}, "not projections of a block"),
    ({"prune.sparsity.pattern": "4:8", "prune.sparsity.blocksize": 12}, "blocksize 12 must be a multiple of M=8"),
    ({"prune.sparsity.pattern": "2:4", "prune.ratio": 0.5}, "prune.ratio does not apply to method: sparse"),
    ({}, "prune.sparsity is required for method: sparse"),
    ({"prune.sparsity.pattern": "2:4", "prune.criterion": "ppl"}, "unknown sparse criterion 'ppl'"),
])
def test_sparse_recipe_errors_name_the_key(overrides, named):
    base = {"model.source": "x", "prune.method": "sparse", "prune.criterion": "wanda"}
    with pytest.raises(RecipeError, match=named):
        load_recipe(None, base | overrides)


def test_an_unquoted_n_m_that_yaml_read_as_base_60_is_read_back(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {source: x}\nprune: {method: sparse, sparsity: {pattern: 4:8}}\n")
    cfg = load_recipe(recipe, ["prune.sparsity.blocksize=64"]).prune
    assert (cfg.criterion, cfg.sparsity.pattern) == ("wanda", "4:8")  # the method's first criterion by default
    assert load_recipe(None, {"model.source": "x", "prune.method": "sparse", "prune.sparsity.pattern": 124}
                       ).prune.sparsity.pattern == "2:4"


def test_sparsity_section_is_refused_for_depth():
    with pytest.raises(RecipeError, match="prune.sparsity applies to method: sparse only"):
        load_recipe(None, {"model.source": "x", "prune.ratio": 0.2, "prune.sparsity.pattern": "2:4"})


def test_eval_and_release_report_the_sparsity_beside_perplexity(tmp_path, calibration_file, capsys):
    """prune (wanda 2:4) -> eval -> release: eval.json and the card say how many zeros, per projection type,
    and the card says the released files still hold every pruned zero and the 2:4 pattern."""
    src = save_tiny(tmp_path, "llama", layers=2)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "name": "tiny-wanda", "run_dir": str(tmp_path / "run"), "model": {"source": str(src)},
        "prune": {"method": "sparse", "criterion": "wanda", "sparsity": {"pattern": "2:4"},
                  "calibration": {"path": str(calibration_file), "num_samples": 4, "seq_len": 16}},
        "eval": {"perplexity_files": [str(calibration_file)], "context_lengths": [32], "compare_to": "dense"},
        "release": {"license": "mit"}}))
    for verb in ("prune", "eval", "release"):
        assert main([verb, str(recipe_file)]) == 0, capsys.readouterr()
    run = tmp_path / "run"
    pruned = json.loads((run / "prune" / "prune_report.json").read_text())["sparsity"]
    result = json.loads((run / "eval" / "eval.json").read_text())
    assert result["sparsity"]["overall"] == pytest.approx(0.5) and result["sparsity"]["pattern_holds"] is True
    assert result["sparsity"]["zeros"] == pruned["zeros"]
    assert result["sparsity"]["nonzero_parameters"] == result["parameters"] - pruned["zeros"]
    assert result["dense"]["sparsity"]["zeros"] == 0 and result["deltas"]["sparsity"]["model"] == pytest.approx(0.5)
    assert "sparsity (block projections)" in capsys.readouterr().out
    card = (run / "release" / "README.md").read_text()
    assert "sparse pruning (set 50.0% of the weights of the block projections to zero (2:4 semi-structured" in card
    assert f"The released weights hold all {pruned['zeros']:,} zeros pruning wrote" in card
    assert "| `down_proj` | 50.00% |" not in card and "| down_proj | 50.00% | 50.00% |" in card
    assert "| sparsity of the block projections | 0.0% | 50.0% | +50.0 pp |" in card
    assert "sparse-pruning" in card
    manifest = read_stage_manifest(run / "release")
    assert manifest["outputs"]["sparsity"]["kept"] is True and manifest["outputs"]["sparsity"]["lost"] == 0


def test_release_warns_when_healing_filled_pruned_zeros(tmp_path, calibration_file, capsys):
    src = save_tiny(tmp_path, "llama", layers=2)
    recipe = sparse_recipe(src, tmp_path, calibration_file)
    assert run_prune_stage(recipe, Options()) == 0
    healed = AutoModelForCausalLM.from_pretrained(recipe.stage_dir("prune"))
    with torch.no_grad():
        healed.model.layers[0].mlp.down_proj.weight.add_(1e-3)  # a heal that ignored the mask
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "model": {"source": str(src)}, "prune": recipe.prune.model_dump(),
        "cpt": {"max_steps": 1}, "release": {}}))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    healed.save_pretrained(recipe.model_dir("cpt"))  # where the heal of this recipe leaves its model
    tiny_tokenizer().save_pretrained(recipe.model_dir("cpt"))
    outputs = build_release(recipe, tmp_path / "release")
    lost = outputs["sparsity"]["lost"]
    assert lost == healed.model.layers[0].mlp.down_proj.weight.numel() // 2 and not outputs["sparsity"]["kept"]
    card = (tmp_path / "release" / "README.md").read_text()
    assert f"**Warning: healing did not keep the sparsity**: {lost:,} of the" in card
    assert "the 2:4 pattern no longer holds" in card

"""The Python API: prune -> evaluate from a notebook, on the same path as the CLI."""

from __future__ import annotations

import json

import pytest
from helpers import SAMPLE_TEXT, save_tiny

from healer.api import as_recipe, evaluate, heal, prune
from healer.cli import main
from healer.core.errors import HealerError, RecipeError


def test_prune_then_evaluate_through_the_api(tmp_path):
    src = save_tiny(tmp_path, layers=4)
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": SAMPLE_TEXT * 3}) + "\n" for _ in range(4)))
    recipe = {"model": {"source": str(src)}, "run_dir": str(tmp_path / "run"),
              "prune": {"method": "depth", "blocks": [1, 2]},
              "eval": {"perplexity_files": [str(text)], "context_lengths": [32], "compare_to": "dense"}}

    pruned = prune(recipe)
    assert pruned.model_dir == tmp_path / "run" / "prune"
    assert json.loads((pruned.model_dir / "config.json").read_text())["num_hidden_layers"] == 2
    assert pruned.outputs["params_after"] < pruned.outputs["params_before"]

    scores = evaluate(recipe)  # eval's input defaults to the pruned model, as in `healer run`
    assert scores.metrics["source"] == str(pruned.model_dir)
    assert scores.metrics["num_layers"] == 2 and scores.metrics["dense"]["num_layers"] == 4
    ppl = scores.metrics["perplexity"]["text.jsonl"]["32"]["ppl"]
    assert scores.outputs["perplexity"]["text.jsonl"]["32"] == ppl

    # the CLI verb is the same code: a finished stage with the same inputs is measured the same way
    assert main(["eval", "--model", str(src), "--run-dir", str(tmp_path / "run"), "--eval.input",
                 str(pruned.model_dir), f"--eval.perplexity_files=[{text}]", "--eval.context_lengths=[32]"]) == 0
    assert json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())["perplexity"]["text.jsonl"]["32"][
        "ppl"] == pytest.approx(ppl)


def test_overrides_and_wrong_input_are_named(tmp_path):
    src = save_tiny(tmp_path, layers=2)
    base = {"model": {"source": str(src)}, "prune": {"method": "depth", "num_blocks": 1}}
    recipe = as_recipe(base, {"prune.num_blocks": 2, "run_dir": str(tmp_path / "r")})
    assert recipe.run_dir == str(tmp_path / "r") and recipe.prune.num_blocks == 2
    assert as_recipe(recipe, {"seed": 3}).seed == 3 and as_recipe(recipe) is recipe
    assert base["prune"]["num_blocks"] == 1  # the caller's dict is not changed
    with pytest.raises(RecipeError, match=r"recipe dict: invalid recipe\n  prune.ratoi: unknown key"):
        as_recipe({**base, "prune": {"ratoi": 0.2}})
    with pytest.raises(HealerError, match="not int"):
        as_recipe(3)
    with pytest.raises(HealerError, match="healer cpt: unknown option steps; its options: action, force, resume"):
        from healer.api import run_stage

        run_stage("cpt", base, steps=3)
    assert heal.__doc__ and "resume" in heal.__doc__

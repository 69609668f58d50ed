"""The recipe: typed, refuses bad keys by name, takes overrides from the command line."""

from __future__ import annotations

import pytest

from healer.cli import split_args
from healer.recipe import RecipeError, load_recipe


def test_embedded_demo_recipe_is_valid_and_follows_run_dir():
    recipe = load_recipe("demo", ["run_dir=/tmp/elsewhere"])
    assert recipe.model.source == "smollm2" and recipe.prune.ratio == 0.2 and recipe.cpt.kd is not None
    assert recipe.data.sources[0].path == "/tmp/elsewhere/corpus/train"
    assert recipe.stage_input("cpt") == "/tmp/elsewhere/prune"
    assert recipe.stage_input("eval") == "/tmp/elsewhere/sft/merged"


@pytest.mark.parametrize("override,named", [
    ("prune.ratoi=0.2", "prune.ratoi: unknown key"),
    ("cpt.max_steps=many", "cpt.max_steps"),
    ("cpt.zero_stage=5", "cpt.zero_stage"),
    ("prune.ratio=1.5", "prune.ratio must be between 0 and 1"),
    ("sft.rank=0", "sft.rank"),
])
def test_bad_values_are_refused_naming_the_key(override, named):
    with pytest.raises(RecipeError, match=named):
        load_recipe("demo", [override])


def test_missing_model_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("prune: {ratio: 0.2}\n")
    with pytest.raises(RecipeError, match=r"r.yaml: invalid recipe\n  model: required key is missing"):
        load_recipe(path)


def test_command_line_override_forms():
    config, overrides, rest = split_args(
        ["demo", "--prune.ratio", "0.3", "--cpt.max_steps=5", "sft.rank=4", "--ratio", "0.25", "--resume", "none"],
        {"--ratio": "prune.ratio"})
    assert config == "demo"
    assert overrides == ["prune.ratio=0.3", "cpt.max_steps=5", "sft.rank=4", "prune.ratio=0.25"]
    assert rest == ["--resume", "none"]
    recipe = load_recipe(config, overrides)
    assert (recipe.prune.ratio, recipe.cpt.max_steps, recipe.sft.rank) == (0.25, 5, 4)


def test_unknown_flag_is_refused():
    with pytest.raises(RecipeError, match="unknown option --ratoi"):
        split_args(["--ratoi", "0.2"], {"--ratio": "prune.ratio"})

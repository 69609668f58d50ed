"""The recipe: typed, refuses bad keys by name, takes overrides from the command line."""

from __future__ import annotations

import re

import pytest

from healer.recipe import RecipeError, dump_recipe, load_recipe


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
    ("cpt.lr=inf", "cpt.lr"),
    ("cpt.lr=nan", "cpt.lr"),
    ("cpt.betas=[nan,0.95]", r"cpt.betas.0"),
    ("cpt.betas=[0.9,1.0]", r"cpt.betas.1"),
    ("sft.epochs=inf", "sft.epochs"),
    ("cpt.kd.temperature=nan", "cpt.kd.temperature"),
    ("prune.ratio=nan", "prune.ratio"),
])
def test_bad_values_are_refused_naming_the_key(override, named):
    with pytest.raises(RecipeError, match=named):
        load_recipe("demo", [override])


def test_an_infinite_source_weight_is_refused_naming_the_source(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {source: smollm2}\ndata:\n  sources:\n    - {path: a, weight: 1.0}\n"
                    "    - {path: b, weight: .inf}\n")
    with pytest.raises(RecipeError, match=r"data.sources.1.weight: Input should be a finite number"):
        load_recipe(path)


def test_missing_model_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("prune: {ratio: 0.2}\n")
    with pytest.raises(RecipeError, match=r"r.yaml: invalid recipe\n  model: required key is missing"):
        load_recipe(path)


def test_dumped_recipe_loads_back_the_same_even_with_nulls(tmp_path):
    """The ranks read the dumped recipe: a key set to null must not come back as its default."""
    recipe = load_recipe("demo", ["data.sources=[{path: /x, domain_field: null}]"])
    assert recipe.data.sources[0].domain_field is None  # its default is meta.redpajama_set_name
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(recipe))
    assert load_recipe(path) == recipe


def test_recipe_path_that_is_a_directory_is_named(tmp_path):
    with pytest.raises(RecipeError, match=f"recipe {tmp_path}: is a directory"):
        load_recipe(tmp_path)


def test_a_section_given_twice_is_refused_naming_both_lines(tmp_path):
    """YAML keeps only the last of two `prune:` keys; the first section's settings would vanish unsaid."""
    path = tmp_path / "r.yaml"
    path.write_text("model: {source: m}\nprune: {ratio: 0.2}\nprune:\n  output: x\n")
    with pytest.raises(RecipeError, match=r"r.yaml: prune is given twice \(lines 2 and 3\)"):
        load_recipe(path)


def test_an_unknown_reference_is_refused_and_shell_values_keep_theirs(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {source: m}\nprune: {ratio: 0.2, output: '${nowhere}/p'}\n")
    with pytest.raises(RecipeError, match=r"prune.output: \$\{nowhere\} .* only \$\{run_dir\}"):
        load_recipe(path)
    recipe = load_recipe("demo", ["launch.slurm.setup=['export A=${HOME}/bin']", "launch.env={B: '${X}'}"])
    assert recipe.launch.slurm.setup == ["export A=${HOME}/bin"] and recipe.launch.env == {"B": "${X}"}


@pytest.mark.parametrize("typed", ["out #2", "out\nx", "  padded"])
def test_a_command_line_string_is_kept_as_typed(typed):
    """YAML would read `out #2` as `out` and fold the newline: the run would write somewhere else."""
    assert load_recipe("demo", [f"prune.output={typed}"]).prune.output == typed
    assert load_recipe("demo", ["prune.output='quoted'"]).prune.output == "quoted"
    assert load_recipe("demo", ["prune.ratio=null", "prune.blocks=[1, 2]"]).prune.blocks == [1, 2]


def test_loading_and_checking_recipes_imports_no_torch():
    """`healer VERB --help`, `healer schema` and a refused recipe answer in a blink: no torch, transformers or
    DeepSpeed is imported to read, validate or hash any shipped recipe, or any pruning method's section."""
    import subprocess
    import sys

    probe = """
import sys
from pathlib import Path
import healer.configs
from healer.recipe import load_recipe
from healer.run.stage_inputs import stage_inputs
from healer.schema import schema_lines
from healer.recipe import Recipe
shipped = sorted(Path(healer.configs.__file__).parent.glob("*.yaml"))
assert len(shipped) > 5, shipped
for path in shipped:
    recipe = load_recipe(str(path))
    for stage in ("prune", "cpt", "sft", "eval", "release"):
        if getattr(recipe, stage) is not None:
            stage_inputs(recipe, stage)
for override in ({"prune.method": "width", "prune.criterion": "activation", "prune.target": "mlp"},
                 {"prune.method": "sparse", "prune.criterion": "sparsegpt", "prune.ratio": None,
                  "prune.sparsity.pattern": "2:4"},
                 {"prune.ratio": None, "prune.blocks": [3, 4], "prune.replace.kind": "layer", "replace.max_steps": 2}):
    load_recipe("demo", override)
schema_lines(Recipe)
heavy = sorted(m for m in ("torch", "transformers", "deepspeed", "peft", "numpy", "safetensors") if m in sys.modules)
print(",".join(heavy))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"loading recipes imported {out.stdout.strip()}"


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """Nine levels of nine aliases are 9**9 values from 400 bytes: refused before anything expands them."""
    lines = ["model: {source: smollm2}", "a: &a [" + ", ".join(["x"] * 9) + "]"]
    for level, prev in zip("bcdefghi", "abcdefgh"):
        lines.append(f"{level}: &{level} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecipeError, match=r"bomb.yaml: its aliases .* expand it to more than 100,000 values"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"override prune.blocks: its aliases"):
        load_recipe("demo", ["prune.blocks=" + "{a: &a [1,1,1,1,1,1,1,1,1,1], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                             "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                             "e: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]}"])


@pytest.mark.parametrize("run_dir", ["${run_dir}/x", "/data/${USER}/run"])
def test_a_run_dir_made_of_a_reference_is_refused(run_dir):
    with pytest.raises(RecipeError, match=r"run_dir: .* holds a \$\{...\} reference"):
        load_recipe("demo", [f"run_dir={run_dir}"])


@pytest.mark.parametrize("override,named", [
    ('release.model_name="evil\\nlicense: mit"', "release.model_name: 'evil"),
    ('release.repo_id=org/x"); import os #', "release.repo_id: 'org/x\"); import os #' is not a Hub repo id"),
    ("release.base_model=https://example.com/m", "release.base_model"),
    ("name=a name with spaces", "name: 'a name with spaces' is not a plain name"),
])
def test_what_the_model_card_prints_is_refused_unless_plain(override, named):
    with pytest.raises(RecipeError, match=re.escape(named)):
        load_recipe("demo", [override])

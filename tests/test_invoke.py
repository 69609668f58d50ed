"""One function runs a stage for `healer VERB` and `healer run`: it hands the stage the inputs its manifest
records, holds the stage directory's lock, and refuses to resume a finished training run under other inputs."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from healer.core.errors import HealerError
from healer.core.lock import lock_path
from healer.core.manifest import write_stage_manifest
from healer.recipe import load_recipe
from healer.run.invoke import invoke
from healer.run.stage_inputs import stage_inputs
from healer.stages import VERBS
from healer.train.cpt import Options  # noqa: F401  (the fake verb's flags: Verb.load reads module.Options)

CALLS: list[dict] = []


def fake_cpt(recipe, opts, inputs=None):
    """Stands in for run_cpt: notes what it was given, and that this process holds its directory's lock."""
    holder = json.loads(lock_path(recipe.stage_dir("cpt")).read_text())
    assert (holder["pid"], holder["command"]) == (os.getpid(), "healer cpt")
    CALLS.append({"inputs": inputs, "resume": opts.resume})
    write_stage_manifest(recipe.stage_dir("cpt"), "cpt", inputs, {"steps": recipe.cpt.max_steps})
    return 0


FAKE_CPT = dataclasses.replace(VERBS["cpt"], target=f"{__name__}:fake_cpt")


def _recipe(tmp_path, overrides=None):
    tree = {"run_dir": str(tmp_path / "run"), "model": {"source": str(tmp_path / "base")},
            "data": {"sources": [{"path": str(tmp_path / "corpus")}], "seq_len": 32},
            "cpt": {"max_steps": 4, "lr": 1e-4}}
    return load_recipe(tree, overrides)


def test_a_stage_records_the_inputs_it_is_given_and_resumes_only_for_more_steps(tmp_path):
    CALLS.clear()
    first = _recipe(tmp_path)
    assert invoke(FAKE_CPT, first, Options()) == 0
    assert CALLS[-1]["inputs"] == stage_inputs(first, "cpt")

    # More steps: the finished run trains on.
    more = _recipe(tmp_path, overrides={"cpt.max_steps": 8})
    assert invoke(FAKE_CPT, more, Options()) == 0 and CALLS[-1]["inputs"]["cpt.max_steps"] == 8

    # Another learning rate over finished steps: refused, naming the key, before the stage runs.
    other = _recipe(tmp_path, overrides={"cpt.max_steps": 8, "cpt.lr": 5e-4})
    with pytest.raises(HealerError, match=r"finished from other inputs \(cpt.lr: 0.0001 -> 0.0005\)"):
        invoke(FAKE_CPT, other, Options())
    assert len(CALLS) == 2

    # Starting over is the user's explicit choice.
    assert invoke(FAKE_CPT, other, Options(resume="none")) == 0 and CALLS[-1]["resume"] == "none"


def test_healer_run_hands_a_step_its_own_inputs(tmp_path):
    CALLS.clear()
    recipe = _recipe(tmp_path)
    own = {**stage_inputs(recipe, "cpt"), "round": "round2"}
    assert invoke(FAKE_CPT, recipe, Options(), inputs=own) == 0
    assert CALLS[-1]["inputs"] == own


@pytest.mark.parametrize("verb,other", [("sft", "cpt"), ("eval", "release"), ("prune", "sft")])
def test_a_stage_refuses_a_directory_another_stage_finished_in(tmp_path, capsys, verb, other):
    from healer.cli import main

    theirs = tmp_path / "run" / other
    write_stage_manifest(theirs, other, None, {"steps": 3})
    before = (theirs / "manifest.json").read_bytes()
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "model": {"source": "smollm2"},
                                  "sft": {"data": str(tmp_path / "a.json")}, "prune": {"ratio": 0.2}}))
    assert main([verb, str(recipe), f"{verb}.output={theirs}"]) == 2
    err = capsys.readouterr().err
    assert f"{verb}.output: {theirs} holds the {other} stage's result (its manifest.json says stage: {other})" in err
    assert (theirs / "manifest.json").read_bytes() == before  # not superseded, not rewritten


def test_a_stage_that_fails_after_it_starts_leaves_no_finished_manifest(tmp_path, capsys):
    """The old manifest is retired before the stage writes anything: a failure (or a kill) part-way leaves
    "not finished", never new files under the old "finished"."""
    from healer.cli import main
    from healer.core.manifest import finished_manifest, read_stage_manifest

    eval_dir = tmp_path / "run" / "eval"
    write_stage_manifest(eval_dir, "eval", None, {"perplexity": {}})
    missing = tmp_path / "gone.txt"
    assert main(["eval", "--model", "smollm2", f"run_dir={tmp_path / 'run'}",
                 f"eval.perplexity_files=[{missing}]"]) == 2
    assert f"eval.perplexity_files: {missing} does not exist" in capsys.readouterr().err
    assert finished_manifest(eval_dir) is None and read_stage_manifest(eval_dir)["stage"] == "eval"

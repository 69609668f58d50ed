"""``healer run``: one recipe from a base model to a release directory; a second run skips what is done,
a changed recipe is refused naming what changed, ``--force`` re-runs every stage."""

from __future__ import annotations

import json
import textwrap

import pytest
from helpers import depth_prune_section, save_tiny, tiny_recipe, write_pipeline_inputs
from transformers import AutoModelForCausalLM

from healer.cli import main
from healer.core.manifest import write_stage_manifest
from healer.recipe import load_recipe
from healer.run.stage_inputs import stage_inputs


def _write_inputs(tmp_path):
    return write_pipeline_inputs(tmp_path, meta={"redpajama_set_name": "Tiny"})


@pytest.mark.slow
@pytest.mark.distributed
def test_run_goes_from_base_model_to_release_and_skips_finished_stages(tmp_path, calibration_file, capsys):
    corpus, heldout, instruct = _write_inputs(tmp_path)
    recipe, src = tiny_recipe(tmp_path, depth_prune_section(calibration_file, num_blocks=1), f"""
        data:
          sources: [{{path: {corpus}}}]
          seq_len: 32
        cpt:
          zero_stage: 2
          micro_batch_size: 2
          global_batch_size: 2
          max_steps: 4
          warmup_steps: 1
          save_every: 2
          eval_every: 100
          kd: {{alpha: 0.5, temperature: 2.0}}
        sft:
          data: {instruct}
          micro_batch_size: 4
          global_batch_size: 4
          max_steps: 2
          max_seq_len: 320
        eval:
          perplexity_files: [{heldout}]
          context_lengths: [32]
          compare_to: dense
        release: {{model_name: tiny-healed}}
    """)
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    for stage in ("prune", "cpt", "sft", "eval", "release"):
        assert json.loads((run / stage / "manifest.json").read_text())["stage"] == stage
    released = AutoModelForCausalLM.from_pretrained(run / "release")
    assert released.config.num_hidden_layers == 3
    card = (run / "release" / "README.md").read_text()
    assert card.startswith("---\n") and "# tiny-healed" in card
    assert "## Stage by stage" in card and "| instruction-tuned |" in card
    assert (run / "release" / "images" / "cpt_curves.png").is_file()
    summary = json.loads((run / "summary.json").read_text())
    labels = [r["label"] for r in summary["rows"]]
    assert labels == ["dense", "pruned", "healed (CPT)", "instruction-tuned"]
    assert all(r["perplexity"] > 1 for r in summary["rows"])
    assert summary["rows"][1]["params"] < summary["rows"][0]["params"]
    assert summary["tokens_trained"]["cpt"] == 4 * 2 * 32
    assert "instruction-tuned" in out and "release:" in out

    # Everything finished: a second run does no work.
    assert main(["run", str(recipe)]) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier") == 5


def _prune_release_recipe(tmp_path, blocks="[1]"):
    recipe, _ = tiny_recipe(tmp_path, f"prune: {{method: depth, blocks: {blocks}}}",
                            "release: {model_name: tiny-pruned}")
    return recipe


def test_a_model_rewritten_at_the_same_path_is_a_changed_input_named_by_its_file(tmp_path, capsys):
    recipe = _prune_release_recipe(tmp_path)
    assert main(["run", str(recipe)]) == 0
    weights = tmp_path / "model" / "model.safetensors"
    size = weights.stat().st_size
    save_tiny(tmp_path, "llama", name="model", layers=4, hidden=64, intermediate=128, seed=1)  # other weights
    assert weights.stat().st_size == size  # same path, same size: only the bytes differ
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "model.source file model.safetensors: its content changed" in err and "--force" in err
    assert main(["run", str(recipe), "--force"]) == 0
    assert main(["run", str(recipe)]) == 0  # the digest of the new version is recorded
    assert capsys.readouterr().out.count("finished earlier with the same inputs") == 2


def test_a_release_of_another_model_describes_none_of_the_pipelines_pruning(tmp_path, capsys):
    recipe = _prune_release_recipe(tmp_path)
    assert main(["run", str(recipe)]) == 0
    pipeline_card = (tmp_path / "run" / "release" / "README.md").read_text()
    assert "structured pruning" in pipeline_card
    other = save_tiny(tmp_path, "llama", name="other", layers=2, hidden=64, intermediate=128, seed=2)
    capsys.readouterr()
    out = tmp_path / "elsewhere"
    assert main(["release", str(recipe), "--release.input", str(other), "--release.output", str(out)]) == 0
    assert "is not an output of this recipe's stages" in capsys.readouterr().err
    card = (out / "README.md").read_text()
    assert "with no pruning or training recorded" in card and "structured pruning" not in card
    assert "## Stage by stage" not in card
    # the pipeline's own pruned model, named explicitly, is still described by its prune
    pruned = tmp_path / "again"
    assert main(["release", str(recipe), "--release.input", str(tmp_path / "run" / "prune"),
                 "--release.output", str(pruned)]) == 0
    assert "structured pruning" in (pruned / "README.md").read_text()


def test_changed_recipe_is_refused_naming_the_change_and_force_rebuilds(tmp_path, capsys):
    recipe = _prune_release_recipe(tmp_path)
    run = tmp_path / "run"
    assert main(["run", str(recipe)]) == 0
    first_release = json.loads((run / "release" / "manifest.json").read_text())
    assert main(["run", str(recipe)]) == 0
    assert capsys.readouterr().out.count("finished earlier with the same inputs") == 2
    # Settings that do not change the result do not invalidate anything.
    assert main(["run", str(recipe), "--launch.nproc_per_node", "2"]) == 0

    # The case: a new prune setting over the old run would release the old weights under it.
    assert main(["run", str(recipe), "--prune.blocks", "[2]"]) == 2
    err = capsys.readouterr().err
    assert "prune.blocks: [1] -> [2]" in err and "release" in err and "--force" in err and "run_dir" in err
    assert load_recipe(run / "recipe.yaml").prune.blocks == [1]  # the record of the last real run is kept
    assert json.loads((run / "release" / "manifest.json").read_text()) == first_release

    assert "--force --only prune,release" in err
    assert main(["run", str(recipe), "--prune.blocks", "[2]", "--force"]) == 0
    assert load_recipe(run / "recipe.yaml").prune.blocks == [2]
    report = json.loads((run / "prune" / "prune_report.json").read_text())
    assert report["removed"] == [2]
    release = json.loads((run / "release" / "manifest.json").read_text())
    assert release["finished_at"] >= first_release["finished_at"] and release != first_release
    assert release["inputs"]["values"]["prune manifest"] != first_release["inputs"]["values"]["prune manifest"]
    capsys.readouterr()
    assert main(["run", str(recipe), "--prune.blocks", "[2]"]) == 0
    assert capsys.readouterr().out.count("finished earlier") == 2


def test_rerun_upstream_stage_invalidates_downstream(tmp_path, capsys):
    recipe = _prune_release_recipe(tmp_path)
    assert main(["run", str(recipe)]) == 0
    assert main(["prune", str(recipe)]) == 0  # the same settings, but new weights on disk
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "release" in err and "prune finished again since" in err
    assert "--force --only release" in err
    assert main(["run", str(recipe), "--force", "--only", "release"]) == 0
    assert main(["run", str(recipe)]) == 0


def test_run_dir_in_use_is_refused(tmp_path, capsys):
    recipe = _prune_release_recipe(tmp_path)
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from healer.core.lock import DirectoryLock
        with DirectoryLock({str(tmp_path / 'run')!r}, "healer run"):
            print("held", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["run", str(recipe)]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"in use by pid {holder.pid}" in capsys.readouterr().err
    assert not (tmp_path / "run" / "prune").exists()


def test_force_reruns_every_training_stage_from_scratch(tmp_path, monkeypatch, capsys):
    """`healer run --force` starts cpt and sft again with --resume none (it once never reached sft)."""
    corpus, _, instruct = _write_inputs(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""
        run_dir: {tmp_path / 'run'}
        model: {{source: {tmp_path / 'base'}}}
        data: {{sources: [{{path: {corpus}}}], seq_len: 32}}
        cpt: {{max_steps: 2}}
        sft: {{data: {instruct}, max_steps: 2}}
    """))
    calls = []

    def fake_run_stage(stage, recipe_path, args, cfg, **kw):
        # What a rank does: record the inputs the recipe it reads gives, train, write the manifest.
        calls.append((stage, list(args)))
        loaded = load_recipe(recipe_path)
        write_stage_manifest(loaded.stage_dir(stage), stage, stage_inputs(loaded, stage), {"steps": 2})
        return 0

    monkeypatch.setattr("healer.launch.run.run_stage", fake_run_stage)
    monkeypatch.setattr("healer.run.pipeline.write_summary", lambda *a, **k: {"rows": []})
    assert main(["run", str(recipe)]) == 0
    assert calls == [("cpt", []), ("sft", [])]
    assert main(["run", str(recipe)]) == 0
    assert len(calls) == 2  # both finished with the same inputs: skipped
    assert main(["run", str(recipe), "--force"]) == 0
    assert calls[2:] == [("cpt", ["--resume", "none"]), ("sft", ["--resume", "none"])]
    # A --force run that stops in cpt leaves both stages unfinished: the next plain run carries on.
    monkeypatch.setattr("healer.launch.run.run_stage", lambda *a, **k: 75)
    assert main(["run", str(recipe), "--force"]) == 75
    monkeypatch.setattr("healer.launch.run.run_stage", fake_run_stage)
    assert main(["run", str(recipe)]) == 0
    assert calls[4:] == [("cpt", []), ("sft", [])]
    # A changed data section makes cpt stale, and sft with it.
    capsys.readouterr()
    assert main(["run", str(recipe), "--data.seq_len", "64"]) == 2
    err = capsys.readouterr().err
    assert "data.seq_len: 32 -> 64" in err and "sft" in err
    # A stage that exits 0 without its manifest is not reported as done.
    monkeypatch.setattr("healer.launch.run.run_stage", lambda *a, **k: 0)
    assert main(["run", str(recipe), "--force", "--only", "cpt"]) == 2
    assert "wrote no" in capsys.readouterr().err


def test_a_manifest_shows_secret_inputs_redacted_and_still_compares_the_real_ones(tmp_path):
    """The release's manifest.json is published: a token pasted into the recipe must not be in it."""
    from healer.core.errors import HealerError
    from healer.core.manifest import read_stage_manifest
    from healer.run.pipeline import plan

    token = "hf_AbCdEfGhIjKlMnOpQrStUv0123456789"
    recipe = load_recipe(None, {"model": {"source": "m"}, "run_dir": str(tmp_path / "run"),
                                "release": {"tags": [token]}})
    write_stage_manifest(recipe.stage_dir("release"), "release", stage_inputs(recipe, "release"))
    assert token not in (recipe.stage_dir("release") / "manifest.json").read_text()
    assert read_stage_manifest(recipe.stage_dir("release"))["inputs"]["values"]
    assert plan(recipe, ["release"], None, force=False) == [("release", False)]  # the same inputs: done
    other = load_recipe(None, {"model": {"source": "m"}, "run_dir": str(tmp_path / "run"),
                               "release": {"tags": [token.replace("A", "B")]}})
    with pytest.raises(HealerError, match="release .*a secret value changed") as err:
        plan(other, ["release"], None, force=False)
    assert token.replace("A", "B") not in str(err.value)


@pytest.mark.parametrize("damage", [b"\xff\xfe\x00 not text", b'{"stage": "rel', b'"release"'])
def test_a_damaged_stage_manifest_means_the_stage_runs_again(tmp_path, damage):
    """A manifest that is not a readable JSON object is not a finished stage: the plan runs it, no traceback."""
    from healer.run.pipeline import plan

    recipe = load_recipe(None, {"model": {"source": "m"}, "run_dir": str(tmp_path / "run"), "release": {}})
    write_stage_manifest(recipe.stage_dir("release"), "release", stage_inputs(recipe, "release"))
    assert plan(recipe, ["release"], None, force=False) == [("release", False)]
    (recipe.stage_dir("release") / "manifest.json").write_bytes(damage)
    assert plan(recipe, ["release"], None, force=False) == [("release", True)]


def test_only_a_later_stage_on_a_fresh_run_dir_names_the_missing_stage_before_any_rank(tmp_path, capsys):
    from healer.cli import main

    for only, says in [("cpt", "cpt starts from {run}/prune, which prune has not written"),
                       ("sft,eval", "sft starts from {run}/cpt/hf, which cpt has not written"),
                       ("release", "run it too (--only sft,release)")]:
        assert main(["run", "demo", f"run_dir={tmp_path}", "--only", only]) == 2
        err = capsys.readouterr().err
        assert says.format(run=tmp_path) in err and "Traceback" not in err
    assert not (tmp_path / "launch").exists() and not (tmp_path / "recipe.yaml").exists()


def test_a_gguf_the_family_cannot_have_is_refused_before_any_stage_runs(tmp_path, capsys):
    from helpers import save_tiny

    from healer.cli import main

    model = save_tiny(tmp_path, "qwen2", layers=2)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"use_sliding_window": True, "sliding_window": 64,
                                                            "max_window_layers": 0}))
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "model": {"source": str(model)},
                                   "prune": {"num_blocks": 1, "criterion": "magnitude"},
                                   "release": {"gguf": ["q8_0"]}}))
    assert main(["run", str(recipe)]) == 2
    assert "release.gguf: config.use_sliding_window is on" in capsys.readouterr().err
    assert not (tmp_path / "run" / "prune").exists()

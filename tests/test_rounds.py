"""``prune.rounds``: iterative prune -> heal, each round its own resumable steps; ratios are of the original
model; a run killed in round 2 carries on there; the summary (and so the model card) lists every round."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import depth_prune_section, tiny_recipe, write_corpus
from transformers import AutoConfig

from healer.cli import main
from healer.core.errors import HealerError, RecipeError
from healer.core.manifest import write_stage_manifest
from healer.prune.report import combined_report
from healer.recipe import load_recipe
from healer.run.rounds import blocks_per_round, heal_steps, width_ratios
from healer.run.stage_inputs import stage_inputs


def test_round_arithmetic_matches_one_shot():
    # Two rounds of 20% remove what one-shot 40% removes, whatever the rounding of each round alone.
    assert blocks_per_round([0.2, 0.2], 7) == [1, 2] and round(0.4 * 7) == 3
    assert blocks_per_round([0.2, 0.2], 30) == [6, 6]
    assert heal_steps(50_000_000, 512, 2048) == 48  # 47.7 rounded up: at least heal_tokens
    assert heal_steps(512 * 2048, 512, 2048) == 1
    # Width: 20% then 20% of the original = 20% of it, then 25% of what is left.
    assert width_ratios([0.2, 0.2]) == pytest.approx([0.2, 0.25])
    with pytest.raises(HealerError, match=r"prune.rounds\[1\].ratio 0.05 removes no block"):
        blocks_per_round([0.3, 0.05], 7)  # 2.1 -> 2, 2.45 -> 2


@pytest.mark.parametrize("rounds, match", [
    ("[{ratio: 0.5}, {ratio: 0.5}]", "must add up to less than 1"),
    ("[]", "prune.rounds is empty"),
    ("[{ratio: 0.2, heal_tokens: 5 apples}]", "not a token count"),
    ("[{ratio: 1.2}]", "between 0 and 1"),
])
def test_impossible_rounds_are_refused_naming_the_key(tmp_path, rounds, match):
    with pytest.raises(RecipeError, match=match) as err:
        load_recipe(None, {"model": {"source": "m"}, "prune": {"method": "depth", "rounds": _yaml(rounds)}})
    assert "prune" in str(err.value)


def test_the_rounds_report_counts_from_the_original_model():
    # Round 2's indices are of round 1's 6-block output: its block 2 is original block 3, its 4 is original 6.
    one = {"method": "depth", "removed": [2, 5], "kept": [0, 1, 3, 4, 6, 7], "params_before": 800,
           "params_after": 600, "scores": {"0": 1.0}, "calibration_ppl_before": 10.0, "calibration_ppl_after": 12.0,
           "config_changes": {"num_hidden_layers": [8, 6]}}
    two = {"method": "depth", "removed": [2, 4], "kept": [0, 1, 3, 5], "params_before": 600, "params_after": 400,
           "scores": {"0": 2.0}, "calibration_ppl_before": 11.0, "calibration_ppl_after": 15.0,
           "config_changes": {"num_hidden_layers": [6, 4]}}
    both = combined_report([one, two])
    assert both["removed"] == [2, 3, 5, 6] and both["kept"] == [0, 1, 4, 7]
    assert both["params_before"] == 800 and both["params_after"] == 400 and both["param_reduction"] == 0.5
    assert both["ratio"] == 0.5 and both["config_changes"] == {"num_hidden_layers": [8, 4]}
    assert "scores" not in both and "calibration_ppl_before" not in both  # they describe one round's input
    assert [r["removed_original"] for r in both["rounds"]] == [[2, 5], [3, 6]]
    assert both["rounds"][1]["calibration_ppl_after"] == 15.0
    # Width: each round's ratio is of its own input's width.
    w = combined_report([{"method": "width", "ratio": 0.2, "intermediate_size": [100, 80]},
                         {"method": "width", "ratio": 0.25, "intermediate_size": [80, 60]}])
    assert w["intermediate_size"] == [100, 60] and w["ratio"] == pytest.approx(0.4)


def test_rounds_refuse_a_second_amount_and_sparse(tmp_path):
    with pytest.raises(RecipeError, match="prune.ratio and prune.rounds"):
        load_recipe(None, {"model": {"source": "m"}, "prune": {"ratio": 0.3, "rounds": [{"ratio": 0.2}]}})
    with pytest.raises(RecipeError, match="sparse pruning is one-shot"):
        load_recipe(None, {"model": {"source": "m"}, "prune": {"method": "sparse", "rounds": [{"ratio": 0.2}],
                                                               "sparsity": {"ratio": 0.5}}})
    recipe = load_recipe(None, {"model": {"source": "m"}, "prune": {"rounds": [{"ratio": 0.2, "heal_tokens": "1.5M"}]}})
    assert recipe.prune.rounds[0].heal_tokens == 1_500_000 and recipe.prune.total_ratio == 0.2


def _yaml(text):
    import yaml

    return yaml.safe_load(text)


def _rounds_recipe(tmp_path, calibration_file, heal=("2k", "0")):
    corpus = write_corpus(tmp_path / "corpus")
    rounds = f"[{{ratio: 0.25, heal_tokens: {heal[0]}}}, {{ratio: 0.25, heal_tokens: {heal[1]}}}]"
    return tiny_recipe(tmp_path, depth_prune_section(calibration_file, keep_first=0, keep_last=0, rounds=rounds),
                       f"""
                       data:
                         sources: [{{path: {corpus}}}]
                         seq_len: 32
                       cpt: {{micro_batch_size: 2, global_batch_size: 4, max_steps: 3, kd: {{alpha: 0.5}}}}
                       release: {{model_name: tiny-rounds}}
                       """, layers=8)


def _fake_cpt(calls, kill=None):
    """Stands in for the launcher: "heals" by copying the input model, then writes the stage's manifest as
    the cpt verb would (from the recipe file the ranks get). ``kill``: a stage dir that dies the first time."""

    def run_stage(stage, recipe_path, args, cfg):
        sub = load_recipe(recipe_path)
        where = sub.stage_dir(stage)
        calls.append((str(where), sub.cpt.max_steps, sub.cpt.kd.teacher if sub.cpt.kd else None))
        if kill is not None and where == kill and not kill.with_name("killed").exists():
            kill.with_name("killed").touch()
            where.mkdir(parents=True, exist_ok=True)
            return 137
        shutil.copytree(sub.stage_input("cpt"), sub.model_dir("cpt"), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("manifest.json", "prune_report.json"))
        write_stage_manifest(where, stage, stage_inputs(sub, stage), {"steps": sub.cpt.max_steps,
                                                                    "tokens_trained": sub.cpt.max_steps * 4 * 32})
        return 0

    return run_stage


def test_dry_run_lists_every_round_and_writes_nothing(tmp_path, calibration_file, capsys):
    recipe, _ = _rounds_recipe(tmp_path, calibration_file, heal=("2k", "0"))
    assert main(["run", str(recipe), "--dry-run"]) == 0
    shown = capsys.readouterr().out
    # 2000 tokens / (4 sequences * 32 tokens) -> 16 steps, rounded up.
    assert "round1/prune" in shown and "remove 2 of the original 8 blocks; heal 16 steps" in shown
    assert "round1/cpt" in shown and "round2/prune" in shown
    assert "round2/cpt" not in shown  # heal_tokens 0: the final cpt: heals it
    assert not (tmp_path / "run").exists()


def test_rounds_run_in_their_own_dirs_resume_in_round_two_and_reach_the_card(
        tmp_path, calibration_file, monkeypatch, capsys):
    import healer.launch.run as launch_run

    recipe, src = _rounds_recipe(tmp_path, calibration_file, heal=("2k", "1k"))
    run = tmp_path / "run"
    calls = []
    monkeypatch.setattr(launch_run, "run_stage", _fake_cpt(calls, kill=run / "round2" / "cpt"))

    # Killed in round 2's heal: the next run skips round 1 and round 2's prune and carries on there.
    assert main(["run", str(recipe)]) == 137
    out = capsys.readouterr().out
    assert "[round2/cpt] stopped with exit code 137" in out
    assert [c[0] for c in calls] == [str(run / "round1" / "cpt"), str(run / "round2" / "cpt")]
    # 16 and 8 steps; the teacher is the dense model in every round, not the round's input.
    assert calls[0][1:] == (16, str(src)) and calls[1][1:] == (8, str(src))
    layers = [AutoConfig.from_pretrained(run / f"round{k}" / "prune").num_hidden_layers for k in (1, 2)]
    assert layers == [6, 4]
    # Round 2's criterion ran on round 1's healed 6-block model: its scores are of those 6 blocks.
    report2 = json.loads((run / "round2" / "prune" / "prune_report.json").read_text())
    assert len(report2["scores"]) == 6
    assert load_recipe(run / "round2" / "recipe.yaml").model.source == str(run / "round1" / "cpt" / "hf")

    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    for label in ("round1/prune", "round1/cpt", "round2/prune"):
        assert f"[{label}] finished earlier" in out
    assert "[round2/cpt] starting" in out and "[cpt] starting" in out and "[release] starting" in out
    assert calls[-1][0] == str(run / "cpt") and calls[-1][1] == 3  # the final heal: cpt.max_steps
    summary = json.loads((run / "summary.json").read_text())
    labels = [r["label"] for r in summary["rows"]]
    assert labels == ["dense", "round 1 pruned", "round 1 healed", "round 2 pruned", "round 2 healed",
                      "healed (CPT)"]
    assert [r["layers"] for r in summary["rows"]] == [8, 6, 6, 4, 4, 4]
    assert set(summary["tokens_trained"]) == {"round1/cpt", "round2/cpt", "cpt"}
    card = (run / "release" / "README.md").read_text()
    assert "| round 1 healed |" in card and "| round 2 pruned |" in card
    assert "Pruned in 2 rounds" in card and "round 2 removed 25% of the original model and healed on" in card
    # The card counts from the dense model, not from round 2's input: 4 of 8 blocks, the dense parameter count.
    assert "removed 4 of 8 decoder blocks" in card and "in 2 rounds (below), no weight update" in card
    dense_params = summary["rows"][0]["params"]
    assert f"| base | {dense_params:,} |" in card
    report1 = json.loads((run / "round1" / "prune" / "prune_report.json").read_text())
    removed2 = [[b for b in range(8) if b not in report1["removed"]][i] for i in report2["removed"]]
    assert f"| 2 | {', '.join(map(str, report2['removed']))} | {', '.join(map(str, removed2))} |" in card
    # A round's report gone: the release stops naming it instead of describing the cut from the others.
    (run / "round1" / "prune" / "prune_report.json").unlink()
    capsys.readouterr()
    assert main(["run", str(recipe), "--force", "--only", "release"]) != 0
    assert "round1/prune/prune_report.json is missing" in capsys.readouterr().err


def test_a_changed_round_makes_every_later_step_stale(tmp_path, calibration_file, monkeypatch, capsys):
    import healer.launch.run as launch_run

    recipe, _ = _rounds_recipe(tmp_path, calibration_file)
    monkeypatch.setattr(launch_run, "run_stage", _fake_cpt([]))
    assert main(["run", str(recipe), "--only", "prune"]) == 0
    capsys.readouterr()
    # A round 1 heal of another length: round 1's heal and everything built on it are refused as stale.
    assert main(["run", str(recipe), "prune.rounds=[{ratio: 0.25, heal_tokens: 4k}, {ratio: 0.25}]"]) == 2
    err = capsys.readouterr().err
    assert "round1/cpt" in err and "cpt.max_steps: 16 -> 32" in err
    assert "round2/prune" in err and "built on round1/cpt" in err
    assert "--force --only prune" in err
    # Re-running round 1 outside `healer run` (another process) makes round 2 stale through its manifest.
    assert main(["run", str(recipe), "--only", "prune"]) == 0  # unchanged recipe: all finished
    assert capsys.readouterr().out.count("finished earlier") == 3
    sub = load_recipe(tmp_path / "run" / "round1" / "recipe.yaml")
    write_stage_manifest(sub.stage_dir("cpt"), "cpt", stage_inputs(sub, "cpt"), {"steps": 16})
    assert main(["run", str(recipe), "--only", "prune"]) == 2
    assert "round2/prune" in capsys.readouterr().err


def test_healer_prune_alone_refuses_rounds(tmp_path, calibration_file, capsys):
    recipe, _ = _rounds_recipe(tmp_path, calibration_file)
    assert main(["prune", str(recipe)]) == 2
    assert "healer run" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.distributed
def test_real_rounds_killed_in_round_two_heal_resume_from_its_checkpoint(tmp_path, calibration_file, monkeypatch,
                                                                         capsys):
    """The real thing, one rank: round 2's heal is SIGKILLed at its third step; the next `healer run` skips
    round 1 and round 2's prune and resumes round 2's heal from its step-2 checkpoint."""
    recipe, src = _rounds_recipe(tmp_path, calibration_file, heal=("128", "192"))  # 2 and 3 steps of 2 x 32
    text = recipe.read_text().replace(
        "cpt: {micro_batch_size: 2, global_batch_size: 4, max_steps: 3, kd: {alpha: 0.5}}",
        "cpt: {micro_batch_size: 2, global_batch_size: 2, max_steps: 2, save_every: 1, zero_stage: 0, "
        "kd: {alpha: 0.5}}\nlaunch: {nproc_per_node: 1}")
    recipe.write_text(text.replace("release: {model_name: tiny-rounds}\n", ""))
    run = tmp_path / "run"
    monkeypatch.setenv("HEALER_FAULT", "kill_at_step:3")  # only round 2's heal has a third step
    assert main(["run", str(recipe)]) != 0
    assert json.loads((run / "round1" / "cpt" / "manifest.json").read_text())["outputs"]["steps"] == 2
    assert not (run / "round2" / "cpt" / "manifest.json").exists()
    monkeypatch.delenv("HEALER_FAULT")
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    for label in ("round1/prune", "round1/cpt", "round2/prune"):
        assert f"[{label}] finished earlier" in out
    logs = "".join(p.read_text(errors="replace") for p in (run / "round2" / "launch").rglob("*") if p.is_file())
    assert "at step 2" in logs  # healer: resumed from .../step_2 at step 2
    manifest = json.loads((run / "round2" / "cpt" / "manifest.json").read_text())
    assert manifest["outputs"]["steps"] == 3 and manifest["outputs"]["kd"] is not None
    assert AutoConfig.from_pretrained(run / "cpt" / "hf").num_hidden_layers == 4

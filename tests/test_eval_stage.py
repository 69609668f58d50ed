"""`healer eval` end to end: eval.json, the comparison with the dense model, the stage manifest."""

from __future__ import annotations

import json

import pytest
from helpers import SAMPLE_TEXT, save_tiny

from healer.cli import main
from healer.core.manifest import read_stage_manifest


@pytest.fixture
def setup(tmp_path):
    dense = save_tiny(tmp_path, name="dense", layers=3, seed=0)
    pruned = save_tiny(tmp_path, name="pruned", layers=2, seed=1)
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": SAMPLE_TEXT * 3}) + "\n" for _ in range(4)))
    return dense, pruned, text


def test_eval_compares_with_the_dense_model_and_reuses_its_numbers(setup, tmp_path, capsys):
    dense, pruned, text = setup
    run = tmp_path / "run"
    args = ["eval", "--model", str(dense), "--input", str(pruned), "--run-dir", str(run),
            f"--eval.perplexity_files=[{text}]", "--eval.context_lengths=[32, 1024]", "--compare-to", "dense"]
    assert main(args) == 0
    result = json.loads((run / "eval" / "eval.json").read_text())
    dense_result = json.loads((run / "eval" / "dense" / "eval.json").read_text())
    ppl = result["perplexity"]["text.jsonl"]["32"]["ppl"]
    dense_ppl = dense_result["perplexity"]["text.jsonl"]["32"]["ppl"]
    assert ppl != dense_ppl  # two different models were evaluated
    delta = result["deltas"]["perplexity"]["text.jsonl"]["32"]
    assert delta["delta"] == pytest.approx(ppl - dense_ppl) and delta["ratio"] == pytest.approx(ppl / dense_ppl)
    assert result["deltas"]["parameters"]["model"] < result["deltas"]["parameters"]["dense"]
    assert result["perplexity"]["text.jsonl"]["1024"]["skipped"].startswith("context length 1024 skipped")
    manifest = read_stage_manifest(run / "eval")
    assert manifest["stage"] == "eval" and manifest["outputs"]["perplexity"]["text.jsonl"]["32"] == ppl
    out = capsys.readouterr().out
    assert "ppl text.jsonl @32" in out and "dense" in out

    # a second run measures the same way: the dense numbers are read back, not recomputed
    assert main(args) == 0
    assert "re-using the dense model's numbers" in capsys.readouterr().out


def test_compare_to_an_existing_eval_json(setup, tmp_path):
    dense, pruned, text = setup
    common = [f"--eval.perplexity_files=[{text}]", "--eval.context_lengths=[32]"]
    assert main(["eval", "--model", str(dense), "--run-dir", str(tmp_path / "dense_run"), *common]) == 0
    dense_json = tmp_path / "dense_run" / "eval" / "eval.json"
    assert main(["eval", "--model", str(dense), "--input", str(pruned), "--run-dir", str(tmp_path / "run"),
                 "--compare-to", str(dense_json), *common]) == 0
    result = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    dense_ppl = json.loads(dense_json.read_text())["perplexity"]["text.jsonl"]["32"]["ppl"]
    assert result["dense"]["perplexity"]["text.jsonl"]["32"]["ppl"] == dense_ppl
    assert "warning" not in result["deltas"]


def test_a_dense_reference_measured_otherwise_is_said_on_the_terminal(setup, tmp_path, capsys):
    dense, pruned, text = setup
    common = [f"--eval.perplexity_files=[{text}]", "--eval.context_lengths=[32]"]
    assert main(["eval", "--model", str(dense), "--run-dir", str(tmp_path / "dense_run"), *common,
                 "eval.max_tokens=64"]) == 0
    dense_json = tmp_path / "dense_run" / "eval" / "eval.json"
    capsys.readouterr()
    assert main(["eval", "--model", str(dense), "--input", str(pruned), "--run-dir", str(tmp_path / "run"),
                 "--compare-to", str(dense_json), *common]) == 0
    err = capsys.readouterr().err
    assert "healer eval: warning: the dense numbers" in err and "(max_tokens)" in err


def test_a_missing_dense_file_is_a_clear_error(setup, tmp_path, capsys):
    dense, pruned, text = setup
    code = main(["eval", "--model", str(dense), "--run-dir", str(tmp_path / "run"), f"--eval.perplexity_files=[{text}]",
                 "--eval.context_lengths=[32]", "--compare-to", str(tmp_path / "nope.json")])
    assert code == 2
    assert "nope.json does not exist" in capsys.readouterr().err
    assert read_stage_manifest(tmp_path / "run" / "eval") is None  # not marked finished

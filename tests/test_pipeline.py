"""``healer run``: one recipe from a base model to a release directory; a second run skips what is done."""

from __future__ import annotations

import json
import textwrap

import pytest
from transformers import AutoModelForCausalLM

from conftest import _TEXT, save_tiny
from healer.cli import main


def _write_inputs(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for shard in range(2):
        with open(corpus / f"part_{shard}.jsonl", "w") as fh:
            for i in range(30):
                fh.write(json.dumps({"text": f"Shard {shard} document {i}. " + _TEXT,
                                     "meta": {"redpajama_set_name": "Tiny"}}) + "\n")
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(_TEXT * 20)
    instruct = tmp_path / "instruct.json"
    instruct.write_text(json.dumps([{"instruction": f"Repeat the number {i}.", "input": "", "output": f"{i}"}
                                    for i in range(16)]))
    return corpus, heldout, instruct


@pytest.mark.slow
@pytest.mark.distributed
def test_run_goes_from_base_model_to_release_and_skips_finished_stages(tmp_path, calibration_file, capsys):
    src = save_tiny(tmp_path, "llama", layers=4, hidden=64, intermediate=128)
    corpus, heldout, instruct = _write_inputs(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: tiny
        run_dir: {tmp_path / 'run'}
        model: {{source: {src}}}
        prune:
          method: depth
          criterion: block_influence
          num_blocks: 1
          calibration: {{path: {calibration_file}, num_samples: 4, seq_len: 32}}
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
    """))
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

"""``healer forecast``: the power-law fit recovers known parameters, the bootstrap interval covers the truth,
a fit on the first quarter of a curve predicts the rest, and the verb reads a cpt stage's files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from healer.cli import main
from healer.core.errors import HealerError
from healer.run.forecast import PowerLaw, fit_power_law, forecast

TRUE = PowerLaw(l_inf=2.0, a=60.0, alpha=0.35, rmse=0.0)


def _curve(noise=0.0, n=40, seed=0):
    t = np.geomspace(2e4, 2e7, n)
    rng = np.random.default_rng(seed)
    return t, TRUE.loss(t) + rng.normal(0, noise, n)


def test_exact_curve_gives_back_its_parameters():
    t, y = _curve()
    fit = fit_power_law(t, y)
    assert fit.l_inf == pytest.approx(2.0, abs=1e-3)
    assert fit.alpha == pytest.approx(0.35, rel=1e-3)
    assert fit.a == pytest.approx(60.0, rel=1e-2)
    assert fit.tokens_for(TRUE.loss(5e6)) == pytest.approx(5e6, rel=1e-2)


def test_noisy_quarter_predicts_the_rest_and_the_interval_covers_the_truth():
    t, y = _curve(noise=0.01, n=80, seed=1)
    pruned, dense = 6.0, 2.2  # the gap; 90% of it is loss 2.58, reached by the true curve at:
    truth = TRUE.tokens_for(pruned - 0.9 * (pruned - dense))
    quarter = t <= t[19]
    fc = forecast(t[quarter], y[quarter], pruned_loss=pruned, dense_loss=dense, recovery=0.9, boots=100)
    assert fc.low <= truth <= fc.high
    assert fc.tokens == pytest.approx(truth, rel=0.5)
    rest = fc.fit.loss(t[~quarter])
    assert np.abs(rest - TRUE.loss(t[~quarter])).max() < 0.1


def test_a_target_below_the_plateau_is_never_reached():
    t, y = _curve()
    fc = forecast(t, y, pruned_loss=6.0, dense_loss=1.5, recovery=0.95, boots=20)  # target 1.725 < L_inf 2.0
    assert math.isinf(fc.tokens) and fc.unreachable == 1.0


def test_refuses_what_it_cannot_fit():
    with pytest.raises(HealerError, match="at least 3"):
        fit_power_law([0, 100, 200], [5.0, 4.0, 3.0])
    with pytest.raises(HealerError, match="does not fall"):
        fit_power_law([1e3, 1e4, 1e5, 1e6], [2.0, 2.1, 2.2, 2.3])
    with pytest.raises(HealerError, match="no gap"):
        forecast([1e3, 1e4, 1e5], [3, 2.5, 2.2], pruned_loss=2.0, dense_loss=2.5, recovery=0.9)


def test_verb_reads_a_cpt_stage_and_checks_on_the_later_points(tmp_path, capsys):
    t, y = _curve(noise=0.005, n=40, seed=2)
    with open(tmp_path / "metrics.jsonl", "w") as fh:
        for step, (tokens, loss) in enumerate(zip(t, y), start=1):
            fh.write(json.dumps({"step": step, "train/loss": loss + 0.1, "data/tokens_seen": tokens}) + "\n")
            fh.write(json.dumps({"step": step, "val/loss": loss, "data/tokens_seen": tokens}) + "\n")
        fh.write('{"step": 41, "val/lo')  # a line cut by a kill
    (tmp_path / "recovery.json").write_text(json.dumps({"pruned_val_loss": 6.0, "dense_val_loss": 2.2}))
    assert main(["forecast", str(tmp_path), "--recovery", "0.8,0.9", "--fit-tokens", str(t[9]),
                 "--boots", "30"]) == 0
    out = capsys.readouterr().out
    assert "10 points of val/loss" in out and "80% of the gap" in out and "90% of the gap" in out
    assert "check on 30 later points" in out
    assert main(["forecast", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "recovery.json").unlink()
    assert main(["forecast", str(tmp_path)]) == 2
    assert "--pruned-loss and --dense-loss" in capsys.readouterr().err


@pytest.mark.slow
def test_cpt_stops_at_the_recovery_target_and_records_it(tmp_path, capsys):
    """The dense reference is a briefly trained tiny model, the "pruned" input its untrained start: the heal
    must stop as soon as the validation loss has recovered the target share of that gap, not at max_steps."""
    import yaml
    from helpers import SAMPLE_TEXT, save_tiny

    model = save_tiny(tmp_path, "llama", layers=2, hidden=32, intermediate=64)
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{i} {SAMPLE_TEXT}"}) + "\n" for i in range(60)))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": f"{i} {SAMPLE_TEXT}"}) + "\n" for i in range(60, 70)))
    base = {"data": {"sources": [{"path": str(corpus)}], "validation": [{"path": str(held)}], "seq_len": 32}}
    cpt = {"micro_batch_size": 2, "global_batch_size": 2, "zero_stage": 0, "lr": 0.01, "warmup_steps": 0,
           "eval_every": 2, "eval_batches": 2}
    dense = tmp_path / "dense.yaml"
    dense.write_text(yaml.safe_dump({**base, "model": {"source": str(model)}, "run_dir": str(tmp_path / "dense"),
                                     "cpt": {**cpt, "input": str(model), "max_steps": 20, "kd": None}}))
    assert main(["cpt", str(dense)]) == 0
    heal = tmp_path / "heal.yaml"
    heal.write_text(yaml.safe_dump({**base, "model": {"source": str(tmp_path / "dense" / "cpt" / "hf")},
                                    "run_dir": str(tmp_path / "heal"),
                                    "cpt": {**cpt, "input": str(model), "max_steps": 60, "stop_at_recovery": 0.5}}))
    capsys.readouterr()
    assert main(["cpt", str(heal)]) == 0
    stage = tmp_path / "heal" / "cpt"
    baseline = json.loads((stage / "recovery.json").read_text())
    assert baseline["pruned_val_loss"] > baseline["dense_val_loss"] + 0.1
    outputs = json.loads((stage / "manifest.json").read_text())["outputs"]
    rec = outputs["recovery"]
    assert rec["reached"] and rec["recovered"] >= 0.5 and outputs["steps"] == rec["at_step"] < 60
    assert (stage / "hf" / "config.json").is_file()
    # The stopped run is finished: running it again trains nothing.
    capsys.readouterr()
    assert main(["cpt", str(heal)]) == 0
    assert "is finished" in capsys.readouterr().err

"""Every stage verb, killed before any one of its filesystem steps, leaves the previous complete result under
its manifest, or the new complete one, or no finished manifest -- and running it again gives the result of a
run that was never killed. Driven by ``crashpoints.py`` (see there for what a step is and how a kill is made).
"""

from __future__ import annotations

import pytest
from crashpoints import RERUNS, run_plan, tiny_pipeline


@pytest.mark.slow
def test_a_kill_before_any_step_of_any_stage_leaves_a_whole_result_or_none(tmp_path):
    recipe = tiny_pipeline(tmp_path)
    run = tmp_path / "run"
    base = ["--config", str(recipe)]
    cases = [{"stage": stage, "argv": [stage, *base, *flags], "kills": 3} for stage, flags in RERUNS.items()]
    cases += [{"stage": stage, "argv": [stage, *base], "kills": 2, "fresh": True} for stage in RERUNS]
    # The judge sees the bug it is for: a verb that re-scores under its old manifest.
    cases.append({"stage": "eval", "argv": ["eval", *base, *RERUNS["eval"]], "kills": 2, "recover": False,
                  "sabotage": "keep_old_manifest"})
    results = run_plan(tmp_path, {"run_dir": str(run), "template": str(tmp_path / "finished"),
                                   "setup": [[stage, *base] for stage in RERUNS], "cases": cases})
    *honest, sabotaged = results
    for result in honest:
        label = f"{result['stage']} ({'first run' if result['fresh'] else 're-run'})"
        assert "error" not in result, f"{label}: {result.get('error')}\n{result.get('log')}"
        assert result["steps"] >= 5, label  # every stage writes several files: the hook sees them
        assert result["bad"] == [], f"{label}: {result['bad'][:3]}"
        assert result["recovered"] == result["killed"] >= 2, label
    # The re-scored eval.json (and the per-model copy under dense/) left under the manifest of the old scores.
    assert all(any(bad["problem"].startswith("the old manifest stands over other files:")
                   and "'eval.json'" in bad["problem"] and bad["how"] == how
                   for bad in sabotaged["bad"]) for how in ("checked", "killed")), sabotaged["bad"]

"""The prune report of a whole ``prune.rounds`` cut, from the report each round wrote."""

from __future__ import annotations

import math


def combined_report(reports: list[dict]) -> dict:
    """One prune report for the whole cut of ``prune.rounds``, from each round's ``prune_report.json`` in order.

    Each round's report describes its own input: round 2's ``removed`` are indices of the model round 1 left,
    and its ``params_before`` is that model's count. The release describes the cut against the ORIGINAL model,
    so this maps blocks back to their original indices and takes the counts before from round 1. The last
    round's report gives the rest (method, criterion, calibration); its scores, which rank round-K blocks, and
    each round's perplexities move to ``rounds``: one entry per round, as measured on that round's input.
    """
    first, last = reports[0], reports[-1]
    out = {key: value for key, value in last.items()
           if key not in ("scores", "calibration_ppl_before", "calibration_ppl_after")}
    out["params_before"] = first.get("params_before")
    out["param_reduction"] = (1 - out["params_after"] / out["params_before"]
                              if out.get("params_before") and out.get("params_after") else None)
    if isinstance(first.get("config_changes"), dict) and isinstance(last.get("config_changes"), dict):
        # (old, new) pairs: old as round 1 found it, new as the last round left it
        out["config_changes"] = {k: [first["config_changes"].get(k, new)[0], new[1]]
                                 for k, new in last["config_changes"].items()}
    for key in ("intermediate_size", "attention_heads"):  # width: (before, after) of the whole cut
        if first.get(key) and last.get(key):
            out[key] = [first[key][0], last[key][1]]
    rounds, original = [], None
    for k, report in enumerate(reports, start=1):
        entry = {"round": k, "params_before": report.get("params_before"), "params_after": report.get("params_after"),
                 "calibration_ppl_before": report.get("calibration_ppl_before"),
                 "calibration_ppl_after": report.get("calibration_ppl_after")}
        if "removed" in report:
            if original is None:
                original = list(range(len(report["removed"]) + len(report.get("kept", []))))
            entry["removed"] = list(report["removed"])
            entry["removed_original"] = [original[i] for i in report["removed"]]
            original = [b for i, b in enumerate(original) if i not in set(report["removed"])]
        rounds.append(entry)
    if original is not None:
        out["removed"] = sorted(b for r in rounds for b in r["removed_original"])
        out["kept"] = original
        out["ratio"] = len(out["removed"]) / (len(out["removed"]) + len(original))
    elif all(isinstance(r.get("ratio"), (int, float)) for r in reports):  # width: each of its own input's width
        out["ratio"] = 1 - math.prod(1 - r["ratio"] for r in reports)
    else:
        out["ratio"] = None
    out["rounds"] = rounds
    return out

"""Zero-shot multiple-choice accuracy through lm-evaluation-harness, on a model already in memory."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from healer.eval.tasks import prepare_tasks, task_kind


def _clean(value):
    # lm-eval reports "N/A" stderr when it cannot bootstrap (one example); JSON wants numbers or null.
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    return None


def run_tasks(model, tokenizer, tasks: dict[str, str], out_dir: str | Path, limit: int | None = None,
              batch_size: int = 8, add_bos_token: bool | None = None, seed: int = 0) -> dict:
    """Evaluate ``model`` zero-shot on ``tasks`` (name -> local HF-schema file) and return per-task metrics.

    Every task reports ``acc`` and ``acc_norm`` (length-normalised accuracy) with their standard
    errors and the number of examples; LAMBADA, a word-prediction task, reports ``acc`` and
    ``perplexity`` instead of ``acc_norm``.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    configs = prepare_tasks(tasks, out_dir, limit)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
              add_bos_token=add_bos_token)
    # lm-eval logs every request at INFO; the progress bar is enough for a person watching.
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    # A TaskManager that indexes only our folder: indexing lm-eval's thousands of built-in YAMLs costs seconds.
    manager = TaskManager(include_path=str(Path(out_dir) / "tasks"), include_defaults=False)
    results = simple_evaluate(model=lm, tasks=configs, task_manager=manager, num_fewshot=0, log_samples=False,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, bootstrap_iters=1000)
    out = {}
    for name in tasks:
        raw = results["results"][name]
        entry = {}
        for metric in task_kind(name).metrics:
            entry[metric] = _clean(raw.get(f"{metric},none"))
            entry[f"{metric}_stderr"] = _clean(raw.get(f"{metric}_stderr,none"))
        entry["n"] = int(results.get("n-samples", {}).get(name, {}).get("effective", 0)) or None
        entry["data"] = str(tasks[name])
        out[name] = entry
    return out

"""Zero-shot accuracy through lm-evaluation-harness's own task definitions, on a model already in memory.

What healer runs here is ``lm_eval.simple_evaluate`` with an ``HFLM`` wrapped around the loaded model and
a ``TaskManager`` over the YAMLs :mod:`healer.eval.tasks` writes; :func:`lm_eval_command` is the
``lm_eval`` command line that gives the same numbers from the saved checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
from pathlib import Path

from healer.eval.tasks import prepare_tasks


def _clean(value):
    # lm-eval reports "N/A" stderr when it cannot bootstrap (one example); JSON wants numbers or null.
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    return None


def lm_eval_command(model_path: str, tasks: list[str], include_path: str | Path, *, gguf_file: str | None = None,
                    revision: str | None = None, dtype: str = "float32", batch_size: int = 8, limit: int | None = None,
                    add_bos_token: bool | None = None, device: str = "cpu", seed: int = 0) -> list[str]:
    """The ``lm_eval`` argv that re-runs healer's task numbers from the checkpoint at ``model_path``.

    Args:
        model_path: the HF directory or hub id the evaluated weights came from (``gguf_file`` inside it,
            ``revision`` of a hub id).
        tasks, include_path: the task names and the folder of YAMLs :func:`prepare_tasks` wrote.
        dtype, batch_size, limit, add_bos_token, device, seed: as healer ran them.

    ``--model_args`` is given as JSON, which lm-eval's parser accepts, so a path with a comma or a space
    survives. ``shlex.join`` of the list is the line a person pastes into a shell.
    """
    model_args: dict = {"pretrained": str(model_path), "dtype": dtype}
    if gguf_file:
        model_args["gguf_file"] = gguf_file
    if revision:
        model_args["revision"] = revision
    if add_bos_token is not None:
        model_args["add_bos_token"] = add_bos_token
    argv = ["lm_eval", "--model", "hf", "--model_args", json.dumps(model_args),
            "--include_path", str(include_path), "--tasks", ",".join(tasks), "--num_fewshot", "0",
            "--batch_size", str(batch_size), "--device", device, "--seed", str(seed)]
    if limit is not None:
        argv += ["--limit", str(limit)]
    return argv


def run_tasks(model, tokenizer, tasks: dict[str, str], out_dir: str | Path, limit: int | None = None,
              batch_size: int = 8, add_bos_token: bool | None = None, seed: int = 0) -> dict:
    """Evaluate ``model`` zero-shot on ``tasks`` (name -> local file in the task's HF schema).

    Returns ``{task: {metric: value, metric_stderr: value, "n", "data", "version"}}`` with the metrics
    lm-eval's task YAML defines (``acc`` and ``acc_norm`` for most; ``acc`` alone for BoolQ and Winogrande;
    ``perplexity`` and ``acc`` for LAMBADA). ``limit`` scores the first N examples of each file.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = prepare_tasks(tasks, out_dir)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
              add_bos_token=add_bos_token)
    # lm-eval logs every request at INFO; the progress bar is enough for a person watching.
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    # Only our folder is indexed: indexing lm-eval's thousands of built-in YAMLs costs seconds, and our
    # YAMLs reach the built-in ones they need through `include:` by path.
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=0, limit=limit,
                              log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, bootstrap_iters=1000)
    out = {}
    for name in tasks:
        raw = results["results"][name]
        entry = {}
        for key, value in raw.items():
            metric, _, filt = key.partition(",")
            if filt == "none":
                entry[metric] = _clean(value)
        entry["n"] = int(results.get("n-samples", {}).get(name, {}).get("effective", 0)) or None
        entry["data"] = str(tasks[name])
        entry["version"] = results.get("versions", {}).get(name)
        out[name] = entry
    return out


def reproduction(location, tasks: dict[str, str], out_dir: str | Path, *, dtype: str, batch_size: int,
                 limit: int | None, add_bos_token: bool | None, device: str, seed: int) -> dict:
    """eval.json's ``lm_eval`` entry: the lm-eval version and the command line that re-runs the task numbers.

    ``location`` is the :class:`healer.model.modeling.ModelLocation` the evaluated weights were loaded from.
    """
    import lm_eval

    include_path = (Path(out_dir) / "tasks").resolve()
    local = Path(location.path).expanduser()
    model_path = str(local.resolve()) if local.exists() else location.path  # a hub id stays as it is
    argv = lm_eval_command(model_path, list(tasks), include_path, gguf_file=location.gguf_file,
                           revision=location.revision, dtype=dtype,
                           batch_size=batch_size, limit=limit, add_bos_token=add_bos_token, device=device,
                           seed=seed)
    return {"version": lm_eval.__version__, "include_path": str(include_path), "argv": argv,
            "command": shlex.join(argv)}

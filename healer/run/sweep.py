"""``healer sweep RECIPE --over prune.ratio=0.2,0.3,0.4``: the size-quality frontier of one recipe.

Each value runs the whole recipe (``healer run``) in its own run directory, ``<run_dir>/sweep/KEY=VALUE``,
one after the other, or ``--jobs N`` at once, each in its own process with its log in the point's directory;
a finished point is skipped stage by stage as ``healer run`` skips any finished stage.
For the dense model and each point's final model it collects the parameter count, forward throughput
(tokens/s of the same input on this machine, median of a few passes), perplexity as ``healer run``'s summary
measures it and the eval stage's task accuracies, and writes ``sweep.json``, ``sweep.md`` (a table) and
``frontier.png`` (perplexity against parameters) to ``<run_dir>/sweep``.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from healer.core.errors import HealerError
from healer.core.manifest import read_json_if_present, read_json_report, write_json_atomic

THROUGHPUT_TOKENS = 256  # one sequence of this many token ids, the same for every model


@dataclass
class Options:
    over: str = field(default="", metadata={
        "help": "KEY=V1,V2,...: the recipe key to vary and its values (YAML each), e.g. prune.ratio=0.2,0.3"})
    repeats: int = field(default=5, metadata={"help": "timed forward passes per model for throughput"})
    jobs: int = field(default=1, metadata={
        "help": "points run at once, each in its own process (log: <point>/sweep.log); with a local launcher the "
                "visible GPUs, or on CPU the cores, are split evenly among them"})


def parse_over(text: str) -> tuple[str, list[Any]]:
    """``prune.ratio=0.2,0.3`` -> (``prune.ratio``, [0.2, 0.3]): scalar values, each read as YAML."""
    from healer.recipe import parse_override

    key, eq, raw = text.partition("=")
    raw_values = [v.strip() for v in raw.split(",") if v.strip()]
    if not eq or not key.strip() or not raw_values:
        raise HealerError(f"sweep: --over {text!r}: say what to vary as KEY=V1,V2 (e.g. --over prune.ratio=0.2,0.3)")
    values = [parse_override(f"{key}={v}") for v in raw_values]
    key = values[0][0]
    values = [v for _, v in values]
    if key == "model" or key.startswith("model."):
        # The frontier has one dense reference: points with different dense models would share its row.
        raise HealerError(f"sweep: --over {key} changes the dense model each point is measured against; the "
                          "frontier has one dense row. Sweep each model on its own (one `healer sweep` per model)")
    if len(set(map(str, values))) != len(values):
        raise HealerError(f"sweep: --over {text!r} lists a value twice; each value is one run directory")
    return key, values


def point_dir(run_dir: str | Path, key: str, value: Any) -> Path:
    """``<run_dir>/sweep/KEY=VALUE``; a value that is a path keeps to one folder name (``/`` -> ``_``)."""
    name = f"{key}={value}".replace("/", "_").replace("\\", "_")
    if name.startswith(".") or "\n" in name:
        raise HealerError(f"sweep: {key}={value!r} cannot name a run directory; use another value spelling")
    return Path(run_dir) / "sweep" / name


def point_recipe(recipe, key: str, value: Any, run_dir: Path):
    """``recipe`` at one point: ``key`` set to ``value``, every path under the recipe's run_dir moved under
    ``run_dir`` (what ``${run_dir}`` gave). Refuses stage outputs outside it: every point would write there."""
    from pydantic import ValidationError

    from healer.recipe import Recipe, RecipeError, format_validation_error, set_dotted
    from healer.stages import STAGES

    tree = recipe.model_dump(mode="json")
    set_dotted(tree, key, value)
    tree = _reroot(tree, str(recipe.run_dir).rstrip("/"), str(run_dir))
    tree["run_dir"] = str(run_dir)
    try:
        point = Recipe.model_validate(tree)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, f"sweep point {key}={value}")) from None
    for stage in STAGES:
        if getattr(point, stage) is not None and Path(run_dir) not in point.stage_dir(stage).resolve().parents:
            raise HealerError(f"sweep: {stage}.output is {point.stage_dir(stage)}, the same for every point; "
                              "write it under ${run_dir} (or leave it unset)")
    return point


def _reroot(node: Any, old: str, new: str) -> Any:
    if isinstance(node, str):
        return new + node[len(old):] if node == old or node.startswith(old + "/") else node
    if isinstance(node, dict):
        return {k: _reroot(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_reroot(v, old, new) for v in node]
    return node


def final_model(recipe) -> str:
    """The model a run ends with: the release, else the last stage that leaves a model."""
    from healer.stages import MODEL_STAGES

    if recipe.release is not None:
        return str(recipe.stage_dir("release"))
    for stage in reversed(MODEL_STAGES):
        if getattr(recipe, stage) is not None:
            return str(recipe.model_dir(stage))
    return recipe.model.source


def throughput(source: str, gguf_file: str | None, repeats: int) -> float:
    """Tokens/s of one forward pass over the same ``THROUGHPUT_TOKENS`` ids (seed 0), median of ``repeats``."""
    import torch

    from healer.model.modeling import load_model, resolve_source

    model = load_model(resolve_source(source, gguf_file), torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, THROUGHPUT_TOKENS), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for _ in range(2):  # warm-up: first calls pay one-time costs (allocator, kernels)
            model(ids)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t0)
    return THROUGHPUT_TOKENS / statistics.median(times)


def _accuracies(eval_json: dict | None, dense: bool = False) -> dict[str, float]:
    if not eval_json:
        return {}
    tasks = (eval_json.get("dense") or {}).get("tasks", {}) if dense else eval_json.get("tasks", {})
    return {task: v["acc"] for task, v in tasks.items() if isinstance(v, dict) and v.get("acc") is not None}


def _row(label: str, value: Any, summary_row: dict, source: str, acc: dict, speed: float) -> dict:
    return {"label": label, "value": value, "model": source, "params": summary_row.get("params"),
            "layers": summary_row.get("layers"), "perplexity": summary_row.get("perplexity"),
            "tokens_per_s": speed, "accuracy": acc}


def run_sweep(recipe, opts: Options) -> int:
    """The ``healer sweep`` verb: run ``recipe`` at every value of ``--over``, then measure and tabulate."""
    return sweep(recipe, opts).get("exit_code", 0)


def sweep(recipe, opts: Options) -> dict:
    """Run every point of ``opts.over`` and write the frontier; returns what sweep.json holds."""
    from healer.eval.suite import EVAL_FILE
    from healer.run.pipeline import Options as RunOptions
    from healer.run.pipeline import run_pipeline, write_summary

    key, values = parse_over(opts.over)
    if opts.jobs < 1:
        raise HealerError(f"sweep: --jobs {opts.jobs}: give how many points run at once (1 or more)")
    out_dir = Path(recipe.run_dir) / "sweep"
    previous = read_json_if_present(out_dir / "sweep.json") or {}
    cached = {(r["label"], r["model"]): r for r in previous.get("rows", []) if r and r.get("stamp")}
    dirs = [point_dir(recipe.run_dir, key, v).resolve() for v in values]
    if len(set(dirs)) != len(dirs):
        raise HealerError(f"sweep: two values of {key} give the same run directory name "
                          f"({', '.join(map(str, values))})")
    points = [(v, point_recipe(recipe, key, v, d)) for v, d in zip(values, dirs)]
    if opts.jobs > 1:
        from healer.train.distill_cache import ensure_cache

        for _, point in points:  # points running at once would race to build a shared teacher-logit cache
            ensure_cache(point)
        failed = run_parallel(key, points, opts.jobs)
        if failed:
            return {"exit_code": failed}
    rows, dense_row, summary = [], None, {}
    for value, point in points:
        if opts.jobs == 1:
            print(f"[sweep] {key}={value} -> {point.run_dir}", flush=True)
            code = run_pipeline(point, RunOptions())
            if code != 0:
                print(f"[sweep] {key}={value} stopped with exit code {code}; run the sweep again to resume it")
                return {"exit_code": code}
        summary = write_summary(point)
        eval_json = read_json_report(point.stage_dir("eval") / EVAL_FILE) if point.eval else None
        final = final_model(point)
        # The release copies the last stage's model: its row in the summary is the last one.
        final_row = {r["model"]: r for r in summary["rows"]}.get(final) or summary["rows"][-1]
        for label, source, srow, acc, v in (
                ("dense", point.model.source, summary["rows"][0], _accuracies(eval_json, dense=True), None),
                (f"{key}={value}", final, final_row, _accuracies(eval_json), value)):
            if label == "dense" and dense_row is not None:
                continue
            stamp = _stamp(source)
            hit = cached.get((label, source))
            speed = hit["tokens_per_s"] if hit and stamp is not None and hit["stamp"] == stamp else \
                throughput(source, point.model.gguf_file if source == point.model.source else None, opts.repeats)
            row = {**_row(label, v, srow, source, acc, speed), "stamp": stamp}
            if label == "dense":
                dense_row = row
            else:
                rows.append(row)
    result = {"key": key, "values": values, "text": summary.get("text"),
              "context_length": summary.get("context_length"), "throughput_input_tokens": THROUGHPUT_TOKENS,
              "rows": [dense_row, *rows]}
    write_json_atomic(out_dir / "sweep.json", result)
    (out_dir / "sweep.md").write_text(format_table(result) + "\n")
    plot_frontier(result, out_dir / "frontier.png")
    print(format_table(result))
    print(f"[sweep] wrote {out_dir / 'sweep.json'}, sweep.md and frontier.png")
    return result


def job_env(jobs: int, index: int, local: bool) -> dict[str, str]:
    """What point ``index`` of ``jobs`` running at once gets: its share of the visible GPUs (local launcher) or,
    on a machine without one, of the CPU cores. A Slurm launcher's points each get their own allocation."""
    if not local:
        return {}
    import torch

    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        share = len(devices) // jobs
        if share == 0:
            raise HealerError(f"sweep: --jobs {jobs} on {len(devices)} GPU(s): every point needs a GPU of its own; "
                              f"use --jobs {len(devices)} or fewer")
        return {"CUDA_VISIBLE_DEVICES": ",".join(devices[index * share:(index + 1) * share])}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}


def _run_point_logged(tree: dict, log: str, env: dict[str, str]) -> int:
    """One point's ``healer run`` in a fresh process, every output (its stages' ranks' too) into ``log``."""
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    if "OMP_NUM_THREADS" in env:
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    from healer.recipe import Recipe
    from healer.run.pipeline import Options as RunOptions
    from healer.run.pipeline import run_pipeline

    try:
        return run_pipeline(Recipe.model_validate(tree), RunOptions())
    except HealerError as err:
        print(f"healer: {err}", flush=True)
        return 2


def run_parallel(key: str, points: list, jobs: int) -> int:
    """Run every point's ``healer run``, ``jobs`` at once; return 0, or the first failed point's exit code
    after all have ended (each failure printed with its log)."""
    from multiprocessing.connection import wait

    # spawn, not fork: a forked copy of a process that has started torch threads can deadlock. One process
    # per point (not a pool): a point killed by the OOM killer fails alone, with its own exit code.
    context = multiprocessing.get_context("spawn")
    first_failure = 0
    queue, free_slots, running = list(points), list(range(jobs)), {}
    try:
        while queue or running:
            while queue and free_slots:  # a point holds a slot's GPUs (or cores) until it ends
                (value, point), slot = queue.pop(0), free_slots.pop(0)
                Path(point.run_dir).mkdir(parents=True, exist_ok=True)
                log = Path(point.run_dir) / "sweep.log"
                env = job_env(jobs, slot, point.launch.backend == "local")
                proc = context.Process(target=_point_main, args=(point.model_dump(mode="json"), str(log), env))
                proc.start()
                running[proc.sentinel] = (proc, value, log, slot)
                print(f"[sweep] {key}={value} -> {point.run_dir} (log {log})", flush=True)
            for sentinel in wait(list(running)):
                proc, value, log, slot = running.pop(sentinel)
                proc.join()
                free_slots.append(slot)
                code = proc.exitcode
                if code == 0:
                    print(f"[sweep] {key}={value} finished", flush=True)
                else:
                    why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                    first_failure = first_failure or (code if code > 0 else 1)
                    print(f"[sweep] {key}={value} stopped ({why}); see {log}, run the sweep again to resume it",
                          flush=True)
    finally:  # interrupted: the points still running stop too (each resumes on the next sweep)
        for proc, *_ in running.values():
            proc.terminate()
            proc.join()
    return first_failure


def _point_main(tree: dict, log: str, env: dict[str, str]) -> None:
    sys.exit(_run_point_logged(tree, log, env))


def _stamp(source: str) -> float | None:
    config = Path(source) / "config.json"
    return config.stat().st_mtime if config.is_file() else None


def format_table(result: dict) -> str:
    """The sweep as a markdown table: one row per model, dense first."""
    tasks = sorted({t for r in result["rows"] for t in r.get("accuracy", {})})
    header = ["model", "parameters", "blocks", "perplexity", "tokens/s", *tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in result["rows"]:
        ppl = f"{r['perplexity']:.2f}" if r.get("perplexity") is not None else "-"
        cells = [r["label"], f"{r['params']:,}", str(r["layers"]), ppl, f"{r['tokens_per_s']:.0f}",
                 *(f"{r['accuracy'][t]:.3f}" if t in r.get("accuracy", {}) else "-" for t in tasks)]
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("text"):
        lines.append(f"\nPerplexity on `{Path(result['text']).name}` ({result['context_length']}-token windows); "
                     f"tokens/s: one forward pass of {result['throughput_input_tokens']} tokens on this machine.")
    return "\n".join(lines)


def plot_frontier(result: dict, path: Path) -> None:
    """Perplexity (or, without it, tokens/s) against parameters, the dense model marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "perplexity" if all(r.get("perplexity") is not None for r in result["rows"]) else "tokens_per_s"
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [r for r in result["rows"] if r["label"] != "dense"]
    ax.plot([r["params"] for r in points], [r[metric] for r in points], "o-", label=result["key"])
    for r in points:
        ax.annotate(str(r["value"]), (r["params"], r[metric]), textcoords="offset points", xytext=(4, 4))
    dense = result["rows"][0]
    ax.plot([dense["params"]], [dense[metric]], "k*", markersize=12, label="dense")
    ax.set_xlabel("parameters")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"size-quality frontier over {result['key']}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

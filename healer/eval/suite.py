"""One model's evaluation: perplexity at each context length and zero-shot tasks -> ``eval.json``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from healer.core.errors import HealerError
from healer.core.manifest import write_json_atomic
from healer.core.textio import BadRecords
from healer.eval.config import EvalConfig
from healer.eval.ppl import perplexity, read_text, resolve_bos, tokenize
from healer.eval.sparsity import measure_sparsity
from healer.model.modeling import (
    ModelLocation,
    count_parameters,
    load_model,
    load_tokenizer,
    resolve_source,
    torch_dtype,
)

EVAL_FILE = "eval.json"
# 2: files read by healer.core.textio (a .txt line is a document; documents joined with a blank line)
TEXT_READER = 2
# 2: tasks run through lm-eval's own task YAMLs (1 was healer's re-typed prompts; same prompts, other metrics)
TASK_RUNNER = 2


def perplexity_labels(files: list[str]) -> list[str]:
    """The key of each perplexity file in eval.json: its name, or, where two files share a name, its path
    relative to the folder all the files are in (``a/test.txt``, ``b/test.txt``)."""
    paths = [Path(f) for f in files]
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    resolved = [p.resolve() for p in paths]
    twice = sorted({str(f) for f, r in zip(files, resolved) if resolved.count(r) > 1})
    if twice:
        raise HealerError(f"eval.perplexity_files lists {twice[0]} twice; give each file once")
    root = Path(os.path.commonpath([str(r) for r in resolved]))
    return [r.relative_to(root).as_posix() for r in resolved]


def settings(cfg: EvalConfig) -> dict:
    """What decides the numbers; two eval.json files compare only when these agree."""
    return {
        "text_reader": TEXT_READER,
        "perplexity_files": [str(Path(f)) for f in cfg.perplexity_files],
        "context_lengths": list(cfg.context_lengths),
        "max_tokens": cfg.max_tokens,
        "bos": cfg.bos,
        "tasks": dict(cfg.tasks),
        "limit": cfg.limit,
        **({"task_runner": TASK_RUNNER} if cfg.tasks else {}),
    }


def max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def evaluate_loaded(model, tokenizer, cfg: EvalConfig, out_dir: str | Path, seed: int = 0,
                    sparsity_pattern: tuple[str | None, float | None] = (None, None),
                    location: ModelLocation | None = None, dtype: str = "float32") -> dict:
    """Evaluate a model already in memory; see :func:`evaluate`.

    ``location``/``dtype``: where and how the weights were loaded, for the ``lm_eval`` command line that
    re-runs the task numbers (none is recorded for a model that exists only in memory).
    """
    start = time.time()
    limit_pos = max_positions(model)
    bos_id = resolve_bos(tokenizer, cfg.bos)
    ppl: dict[str, dict] = {}
    notes: list[str] = []
    for file, label in zip(cfg.perplexity_files, perplexity_labels(cfg.perplexity_files)):
        max_chars = cfg.max_tokens * 16 if cfg.max_tokens else None  # see tokenize()
        bad = BadRecords(setting=None)
        ids = tokenize(tokenizer, read_text(file, max_chars, bad), cfg.max_tokens)
        if bad.counts:  # the number is still comparable (same file, same skips), but say what it left out
            notes.append(f"perplexity file {label}: {bad.summary()}")
        per_ctx: dict[str, dict] = {}
        for ctx in cfg.context_lengths:
            if limit_pos is not None and ctx > limit_pos:
                note = f"context length {ctx} skipped: the model has max_position_embeddings={limit_pos}"
                per_ctx[str(ctx)] = {"skipped": note}
                if note not in notes:
                    notes.append(note)
                continue
            per_ctx[str(ctx)] = perplexity(model, tokenizer, ids, ctx, bos=cfg.bos, batch_size=cfg.batch_size)
        ppl[label] = per_ctx
    if not cfg.perplexity_files and not cfg.tasks:
        notes.append("nothing to measure: set eval.perplexity_files and/or eval.tasks")
    tasks, lm_eval = {}, None
    if cfg.tasks:
        from healer.eval.harness import reproduction, run_tasks

        tasks = run_tasks(model, tokenizer, cfg.tasks, out_dir, limit=cfg.limit, batch_size=cfg.batch_size,
                          add_bos_token=bos_id is not None, seed=seed)
        if location is not None:
            lm_eval = reproduction(location, cfg.tasks, out_dir, dtype=dtype, batch_size=cfg.batch_size,
                                   limit=cfg.limit, add_bos_token=bos_id is not None,
                                   device=next(model.parameters()).device.type, seed=seed)
    return {
        "parameters": count_parameters(model),
        "sparsity": measure_sparsity(model, *sparsity_pattern),
        "num_layers": getattr(model.config, "num_hidden_layers", None),
        "max_position_embeddings": limit_pos,
        "bos": {"policy": cfg.bos, "prepended": bos_id is not None,
                "bos_token_id": getattr(tokenizer, "bos_token_id", None)},
        "perplexity": ppl,
        "tasks": tasks,
        "lm_eval": lm_eval,
        "notes": notes,
        "settings": settings(cfg),
        "seconds": round(time.time() - start, 1),
    }


def evaluate(model_source: str, cfg: EvalConfig, out_dir: str | Path, gguf_file: str | None = None,
             dtype: str = "float32", seed: int = 0,
             sparsity_pattern: tuple[str | None, float | None] = (None, None), key: str = "model.source") -> dict:
    """Evaluate ``model_source`` (HF dir, .gguf, 'smollm2', hub id) and write ``out_dir/eval.json``.
    ``key``: the recipe key ``model_source`` came from, which an error names.

    Args:
        cfg: which text files and context lengths for perplexity, which zero-shot tasks.
        out_dir: gets ``eval.json`` and ``tasks/`` (the lm-eval task YAMLs, and any data file that needed a fix).
        gguf_file, dtype: as ``model.gguf_file`` / ``model.dtype`` in the recipe.
        sparsity_pattern: (pattern, ratio) a sparse prune aimed at, checked on the weights; (None, None) counts.

    Returns the dict written to ``eval.json``::

        {"model", "parameters", "num_layers", "max_position_embeddings",
         "sparsity": {"overall", "zeros", "weights", "by_type", "pattern", "pattern_holds", "problems",
                      "nonzero_parameters"} of the block projections (None for an unknown family),
         "bos": {"policy", "prepended", "bos_token_id"},
         "perplexity": {file label (perplexity_labels): {context length: {"ppl", "nll", "tokens_scored", ...}
                                                    or {"skipped": why}}},
         "tasks": {task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr" (the metrics lm-eval's task
                          defines), "n", "data", "version"}},
         "lm_eval": {"version", "include_path", "argv", "command"}: the ``lm_eval`` command line that
                    re-runs the task numbers from the checkpoint (None without tasks),
         "notes": [...], "settings": {...}, "seconds"}

    ``healer eval`` adds ``source`` and, with ``compare_to``, ``dense`` and ``deltas``.
    """
    for file in cfg.perplexity_files:  # a wrong path fails before the model takes its time to load
        if "://" not in file and not Path(file).is_file():
            raise HealerError(f"eval.perplexity_files: {file} does not exist")
    perplexity_labels(cfg.perplexity_files)
    if cfg.tasks:  # every task file's records too (file and record named), before the model and any scoring
        from healer.eval.tasks import prepare_tasks

        prepare_tasks(cfg.tasks, out_dir)
    location = resolve_source(model_source, gguf_file, key=key)
    torch.manual_seed(seed)
    model = load_model(location, torch_dtype(dtype))
    tokenizer = load_tokenizer(location)
    result = {"model": str(location), **evaluate_loaded(model, tokenizer, cfg, out_dir, seed=seed,
                                                        sparsity_pattern=sparsity_pattern, location=location,
                                                        dtype=dtype)}
    write_json_atomic(Path(out_dir) / EVAL_FILE, result)
    return result


def read_eval(path: str | Path) -> dict:
    """An eval.json (or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / EVAL_FILE
    if not path.is_file():
        raise HealerError(f"eval.compare_to: {path} does not exist; give a dense eval.json or 'dense'")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HealerError(f"eval.compare_to: {path} is not valid JSON ({err})") from None


def compare(result: dict, dense: dict) -> dict:
    """Deltas of ``result`` against ``dense`` for every number both have (model minus dense, and ratio)."""

    def pair(model_value, dense_value) -> dict | None:
        if not isinstance(model_value, (int, float)) or not isinstance(dense_value, (int, float)):
            return None
        return {"dense": dense_value, "model": model_value, "delta": model_value - dense_value,
                "ratio": model_value / dense_value if dense_value else None}

    deltas: dict = {"parameters": pair(result.get("parameters"), dense.get("parameters")),
                    "sparsity": pair((result.get("sparsity") or {}).get("overall"),
                                     (dense.get("sparsity") or {}).get("overall")),
                    "perplexity": {}, "tasks": {}}
    for file, per_ctx in result.get("perplexity", {}).items():
        for ctx, entry in per_ctx.items():
            other = dense.get("perplexity", {}).get(file, {}).get(ctx, {})
            p = pair(entry.get("ppl"), other.get("ppl"))
            if p:
                deltas["perplexity"].setdefault(file, {})[ctx] = p
    for task, entry in result.get("tasks", {}).items():
        other = dense.get("tasks", {}).get(task, {})
        for metric in ("acc", "acc_norm", "perplexity"):
            p = pair(entry.get(metric), other.get(metric))
            if p:
                deltas["tasks"].setdefault(task, {})[metric] = p
    if result.get("settings") != dense.get("settings"):
        deltas["warning"] = "the dense numbers were measured with different eval settings"
    return deltas

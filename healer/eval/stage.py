"""``healer eval``: evaluate the pipeline's latest checkpoint (or ``eval.input``), compare it with the dense model."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from healer.core.manifest import write_json_atomic, write_stage_manifest
from healer.eval.config import EvalConfig
from healer.eval.sparsity import sparsity_target
from healer.eval.suite import EVAL_FILE, compare, evaluate, read_eval, settings


def dense_eval(recipe, cfg: EvalConfig, out_dir: Path) -> dict:
    """The dense model's numbers under ``cfg``: re-used from ``out_dir/dense`` when measured the same way."""
    dense_dir = out_dir / "dense"
    cached = dense_dir / EVAL_FILE
    if cached.is_file():
        previous = read_eval(cached)
        if previous.get("settings") == settings(cfg) and previous.get("source") == recipe.model.source:
            print(f"healer eval: re-using the dense model's numbers in {cached}")
            return previous
    print(f"healer eval: evaluating the dense model {recipe.model.source}")
    result = evaluate(recipe.model.source, cfg, dense_dir, gguf_file=recipe.model.gguf_file,
                      dtype=recipe.model.dtype, seed=recipe.seed)
    result["source"] = recipe.model.source
    write_json_atomic(cached, result)
    return result


@dataclass
class Options:
    """``healer eval`` has no flags of its own: everything it does is a recipe key (``--eval.KEY``)."""


def run_eval_stage(recipe, opts: Options, inputs: dict | None = None) -> int:
    """The ``healer eval`` verb: evaluate ``recipe.stage_input("eval")`` (and the dense model) -> eval.json.
    ``inputs``: what its manifest records it was built from."""
    cfg = recipe.eval or EvalConfig()
    out_dir = recipe.stage_dir("eval")
    source = recipe.stage_input("eval")
    # The dense model may be a GGUF named by model.gguf_file; a stage output is a plain HF dir.
    gguf = recipe.model.gguf_file if source == recipe.model.source else None
    # Read a given dense eval.json first: a wrong path should fail before minutes of evaluation.
    given_dense = read_eval(cfg.compare_to) if cfg.compare_to and cfg.compare_to != "dense" else None
    print(f"healer eval: evaluating {source}")
    result = evaluate(source, cfg, out_dir, gguf_file=gguf, dtype=recipe.model.dtype, seed=recipe.seed,
                      key="model.source" if source == recipe.model.source else "eval.input",
                      sparsity_pattern=sparsity_target(recipe) if source != recipe.model.source else (None, None))
    result["source"] = source
    if cfg.compare_to:
        same = source == recipe.model.source  # evaluating the dense model itself: nothing to measure twice
        dense = given_dense or (result if same else dense_eval(recipe, cfg, out_dir))
        result["dense"] = {k: dense.get(k) for k in ("model", "parameters", "sparsity", "num_layers", "perplexity",
                                                     "tasks")}
        result["compare_to"] = cfg.compare_to
        result["deltas"] = compare(result, dense)
        if result["deltas"].get("warning"):  # said where the user looks, not only inside eval.json
            differ = sorted(k for k in set(result.get("settings") or {}) | set(dense.get("settings") or {})
                            if (result.get("settings") or {}).get(k) != (dense.get("settings") or {}).get(k))
            print(f"healer eval: warning: the dense numbers ({cfg.compare_to}) were measured with other eval settings "
                  f"({', '.join(differ) or 'unknown'}); the deltas compare unlike with unlike", file=sys.stderr)
    write_json_atomic(out_dir / EVAL_FILE, result)
    print(format_table(result))
    write_stage_manifest(out_dir, "eval", inputs, {
        "eval_json": str(out_dir / EVAL_FILE),
        "source": source,
        "parameters": result["parameters"],
        "sparsity": (result.get("sparsity") or {}).get("overall"),
        "perplexity": {f: {c: e.get("ppl") for c, e in per.items()} for f, per in result["perplexity"].items()},
        "tasks": {t: {m: e.get(m) for m in ("acc", "acc_norm")} for t, e in result["tasks"].items()},
    })
    return 0


def format_table(result: dict) -> str:
    """A plain-text table of one eval.json (with the dense column when compared)."""
    dense = result.get("dense") or {}
    rows = [("metric", "dense", "model")] if dense else [("metric", "model")]

    def row(name, model_value, dense_value):
        def fmt(v):
            return "-" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.4g}")
        rows.append((name, fmt(dense_value), fmt(model_value)) if dense else (name, fmt(model_value)))

    row("parameters", result.get("parameters"), dense.get("parameters"))
    sparse, dense_sparse = result.get("sparsity") or {}, dense.get("sparsity") or {}
    if sparse.get("zeros"):  # a dense model's stray zeros are not worth a row
        row("nonzero parameters", sparse.get("nonzero_parameters"), dense_sparse.get("nonzero_parameters"))
        row("sparsity (block projections)", sparse.get("overall"), dense_sparse.get("overall"))
        for kind, value in sparse.get("by_type", {}).items():
            row(f"  sparsity {kind}", value, dense_sparse.get("by_type", {}).get(kind))
        if sparse.get("pattern_holds") is not None:
            rows.append(("pattern " + str(sparse.get("pattern")), *(["-"] if dense else []),
                         "holds" if sparse["pattern_holds"] else "BROKEN"))
    for file, per_ctx in result.get("perplexity", {}).items():
        for ctx, entry in per_ctx.items():
            other = dense.get("perplexity", {}).get(file, {}).get(ctx, {})
            row(f"ppl {file} @{ctx}", entry.get("ppl"), other.get("ppl"))
    for task, entry in result.get("tasks", {}).items():
        other = dense.get("tasks", {}).get(task, {})
        for metric in ("acc", "acc_norm", "perplexity"):
            if metric in entry:
                row(f"{task} {metric}", entry.get(metric), other.get(metric))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)

"""``healer prune``: score, cut, save, reload-check, report.

The output directory is a plain Hugging Face checkpoint (config edited honestly, safetensors,
tokenizer) plus ``prune_report.json`` and the stage manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from healer.adapter import ModelAdapter, architecture_for
from healer.calibration import load_calibration
from healer.errors import HealerError
from healer.manifest import package_versions, write_json_atomic, write_stage_manifest
from healer.modeling import (count_parameters, load_config, load_model, load_tokenizer, resolve_source,
                             save_and_verify, torch_dtype)
from healer.prune.config import PruneConfig
from healer.prune import depth, width
from healer.prune.blockwise import BlockStack

# Criteria that only ever look at one block at a time and so can read blocks from disk shards.
LAYERWISE = {"magnitude", "block_influence", "angular", "activation", "head_norm"}
REPORT = "prune_report.json"


def plan_depth(cfg: PruneConfig, num_blocks: int) -> tuple[int, list[int]]:
    """(blocks to remove, candidate blocks) for a model of ``num_blocks``; raises ValueError if impossible."""
    first, last = cfg.protected
    candidates = list(range(first, num_blocks - last))
    if cfg.blocks is not None:
        bad = [b for b in cfg.blocks if not 0 <= b < num_blocks]
        if bad:
            raise ValueError(f"prune.blocks: {bad} out of range for a model with {num_blocks} blocks (0..{num_blocks - 1})")
        if len(set(cfg.blocks)) >= num_blocks:
            raise ValueError(f"prune.blocks removes all {num_blocks} blocks")
        return len(set(cfg.blocks)), sorted(set(cfg.blocks))
    count = depth.blocks_to_remove(num_blocks, cfg.ratio, cfg.num_blocks)
    if count > len(candidates):
        raise ValueError(
            f"cannot remove {count} of {num_blocks} blocks while keeping the first {first} and last {last} "
            f"(prune.keep_first / prune.keep_last); {len(candidates)} are removable"
        )
    return count, candidates


def score_depth(cfg: PruneConfig, count: int, candidates: list[int], model, stack: BlockStack,
                tokens: torch.Tensor | None, progress: bool) -> tuple[dict, list[int]]:
    """Per-block (or per-span-start, for angular) scores and the chosen blocks to drop."""
    if cfg.criterion == "ppl":
        scores = depth.ppl_scores(stack, tokens, candidates, progress)
    elif cfg.criterion == "taylor":
        scores = depth.taylor_scores(model, tokens, candidates, progress)
    elif cfg.criterion == "magnitude":
        scores = depth.magnitude_scores(stack, candidates, progress)
    elif cfg.criterion == "block_influence":
        scores = depth.block_influence_scores(stack, tokens, candidates, progress)
    else:  # angular: one contiguous span
        starts = [s for s in candidates if s + count - 1 in candidates]
        scores = depth.angular_span_scores(stack, tokens, count, starts, progress)
        best = min(starts, key=lambda s: (scores[s], s))
        return scores, list(range(best, best + count))
    return scores, depth.choose_lowest(scores, count)


def _load_tokens(cfg: PruneConfig, tokenizer) -> torch.Tensor | None:
    cal = cfg.calibration
    if cal.path is None:
        if cfg.needs_calibration:
            raise HealerError(f"prune.calibration.path is required by criterion {cfg.criterion!r} "
                              "(a jsonl with a text field or a plain-text file)")
        return None
    return load_calibration(cal.path, tokenizer, cal.num_samples, cal.seq_len, cal.seed, cal.text_field,
                            cal.max_documents)


def prune(source: str, cfg: PruneConfig, out_dir: str | Path, *, gguf_file: str | None = None,
          dtype: str = "float32", seed: int = 0, progress: bool = True) -> dict:
    """Prune the model at ``source`` as ``cfg`` says and write the result to ``out_dir``. Returns the report."""
    started = time.time()
    torch.manual_seed(seed)
    location = resolve_source(source, gguf_file)
    config = load_config(location)
    architecture_for(config)  # refuse an unknown family before any work
    count, candidates = None, None
    try:
        if cfg.method == "depth":
            count, candidates = plan_depth(cfg, config.num_hidden_layers)
        elif cfg.ratio is None:
            raise ValueError("prune.ratio is required for method: width")
        elif cfg.target == "mlp":
            width.kept_width(config.intermediate_size, cfg.ratio, cfg.round_to)
        else:
            width.kept_groups(getattr(config, "num_key_value_heads", None) or config.num_attention_heads, cfg.ratio)
    except ValueError as err:
        raise HealerError(str(err)) from None

    tokenizer = load_tokenizer(location)
    tokens = _load_tokens(cfg, tokenizer)
    torch_type = torch_dtype(dtype)

    # Score from disk shards, one block resident, when the criterion allows and the source is a directory.
    disk_stack = None
    if location.is_local_dir and cfg.criterion in LAYERWISE and cfg.blocks is None:
        try:
            disk_stack = BlockStack.from_pretrained_dir(location.path, torch_type)
        except FileNotFoundError:
            disk_stack = None
    layerwise_scores = None
    if disk_stack is not None:
        layerwise_scores = _score(cfg, count, candidates, None, disk_stack, tokens, config, progress)
        del disk_stack

    model = load_model(location, torch_type)
    adapter = ModelAdapter(model)
    params_before = count_parameters(model)
    ppl_before = depth.perplexity(model, tokens) if tokens is not None else None
    config_before = model.config.to_dict()

    if cfg.method == "depth" and cfg.blocks is not None:
        scores, drop = {}, sorted(set(cfg.blocks))
    else:
        scores, drop = layerwise_scores or _score(cfg, count, candidates, model, BlockStack.from_model(model),
                                                  tokens, config, progress)

    details: dict = {}
    if cfg.method == "depth":
        edited = adapter.remove_blocks(drop)
        details = {"removed": drop, "kept": [i for i in range(config.num_hidden_layers) if i not in drop],
                   "scores": {str(k): v for k, v in scores.items()}, "config_keys_edited": edited}
        if cfg.criterion == "angular":
            details["scores_are"] = "angular distance of the span of that many blocks starting at each index"
    elif cfg.target == "mlp":
        keep = width.kept_width(config.intermediate_size, cfg.ratio, cfg.round_to)
        kept = width.top_indices(scores, keep)
        adapter.shrink_mlp(kept)
        details = {"intermediate_size": [config.intermediate_size, keep], **width.describe(scores, kept)}
    else:
        groups = width.kept_groups(adapter.num_kv_heads, cfg.ratio)
        before = (adapter.num_heads, adapter.num_kv_heads)
        kept = width.top_indices(scores, groups)
        adapter.shrink_attention(kept)
        details = {"attention_heads": [before[0], model.config.num_attention_heads],
                   "key_value_heads": [before[1], model.config.num_key_value_heads],
                   "removed_groups_per_block": width.describe(scores, kept)["removed_per_block"],
                   "group_scores": [s.tolist() for s in scores]}

    ppl_after = depth.perplexity(model, tokens) if tokens is not None else None
    out = Path(out_dir)
    max_diff = save_and_verify(model, tokenizer, out, atol=cfg.verify_atol)
    config_after = model.config.to_dict()
    params_after = count_parameters(model)
    first, last = cfg.protected
    report = {
        "source": str(location),
        "method": cfg.method,
        "criterion": cfg.criterion if not (cfg.method == "depth" and cfg.blocks is not None) else "explicit",
        "target": cfg.target if cfg.method == "width" else "blocks",
        "ratio": cfg.ratio,
        "score_meaning": "lower = less important, removed first" if cfg.method == "depth"
        else "higher = more important, kept",
        "protected": {"keep_first": first, "keep_last": last,
                      "applied": cfg.method == "depth" and cfg.blocks is None and (first + last) > 0},
        **details,
        "params_before": params_before,
        "params_after": params_after,
        "param_reduction": 1 - params_after / params_before,
        "calibration": cfg.calibration.model_dump() | {"tokens": int(tokens.numel()) if tokens is not None else 0},
        "calibration_ppl_before": ppl_before,
        "calibration_ppl_after": ppl_after,
        "config_changes": {k: [config_before.get(k), v] for k, v in config_after.items()
                           if config_before.get(k) != v and k not in ("transformers_version", "dtype", "architectures")},
        "reload_max_logit_diff": max_diff,
        "scored_from": "disk, one block at a time" if layerwise_scores is not None else "memory",
        "seed": seed,
        "versions": package_versions(),
        "elapsed_s": round(time.time() - started, 2),
    }
    write_json_atomic(out / REPORT, report)
    return report


def _score(cfg, count, candidates, model, stack, tokens, config, progress):
    if cfg.method == "depth":
        return score_depth(cfg, count, candidates, model, stack, tokens, progress)
    if cfg.target == "mlp":
        if cfg.criterion == "activation":
            scores = width.activation_scores(stack, tokens, progress)
        else:
            adapter = ModelAdapter(model)
            scores = width.maw_scores(adapter) if cfg.criterion == "maw" else width.l2_scores(adapter)
        return scores, None
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return width.head_output_scores(stack, tokens, heads, kv, head_dim, progress), None


@dataclass
class Options:
    """``healer prune`` has no flags of its own: everything it does is a recipe key (``--prune.KEY``)."""


def run_prune_stage(recipe, opts: Options) -> int:
    """The ``healer prune`` verb: prune ``recipe.stage_input("prune")`` into the prune stage directory."""
    if recipe.prune is None:
        raise HealerError("the recipe has no prune: section (give --method/--ratio or a recipe with prune:)")
    out = recipe.stage_dir("prune")
    report = prune(recipe.stage_input("prune"), recipe.prune, out, gguf_file=recipe.model.gguf_file,
                   dtype=recipe.model.dtype, seed=recipe.seed)
    write_stage_manifest(out, "prune", {"model_dir": str(out), "report": str(out / REPORT),
                                        "params_before": report["params_before"],
                                        "params_after": report["params_after"]})
    _print_summary(report, out)
    return 0


def _print_summary(report: dict, out: Path) -> None:
    what = (f"removed blocks {report['removed']}" if "removed" in report
            else f"intermediate_size {report['intermediate_size'][0]} -> {report['intermediate_size'][1]}"
            if "intermediate_size" in report
            else f"heads {report['attention_heads'][0]} -> {report['attention_heads'][1]}")
    ppl = ""
    if report["calibration_ppl_before"] is not None:
        ppl = f"; calibration ppl {report['calibration_ppl_before']:.2f} -> {report['calibration_ppl_after']:.2f}"
    print(f"pruned ({report['method']}, {report['criterion']}): {what}; params {report['params_before']:,} -> "
          f"{report['params_after']:,} (-{report['param_reduction']:.1%}){ppl}\nwrote {out}")

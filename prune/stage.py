"""``healer prune``: check, score, cut, save, reload-check, report.

The output directory is a plain Hugging Face checkpoint (config edited honestly, safetensors,
tokenizer) plus ``prune_report.json`` and the stage manifest. Which criterion scores what, and how,
comes from :data:`healer.prune.criteria.CRITERIA`. Every refusal (bad output directory, unreadable
model, impossible amount, too long calibration) happens before any scoring.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from healer.core.errors import HealerError, UnsupportedArchitecture
from healer.core.manifest import package_versions, read_stage_manifest, write_json_atomic, write_stage_manifest
from healer.core.swap import new_partial_dir, swap_in
from healer.model.adapter import ModelAdapter, architecture_for, refuse_head_pruning, refuse_moe_mlp
from healer.model.calibration import load_calibration
from healer.model.experts import (
    check_all_blocks_have_experts,
    expert_width_key,
    keep_experts,
    num_experts,
    shrink_experts,
)
from healer.model.modeling import (
    check_output_dir,
    check_seq_len,
    check_weights,
    count_parameters,
    load_config,
    load_model,
    load_tokenizer,
    model_path,
    resolve_source,
    save_and_verify,
    torch_dtype,
)
from healer.prune import depth, replace, width
from healer.prune.blockwise import BlockStack
from healer.prune.config import PruneConfig
from healer.prune.criteria import DEFAULT_SCORES_ARE
from healer.prune.sparse import plan_sparsity, prune_sparse

REPORT = "prune_report.json"
MODEL_FILES = ("config.json", "*.safetensors", "*.bin", "*.gguf", "*.pt")


def plan_depth(cfg: PruneConfig, num_blocks: int) -> tuple[int, list[int]]:
    """(blocks to remove, candidate blocks) for a model of ``num_blocks``; raises ValueError if impossible."""
    first, last = cfg.protected
    candidates = list(range(first, num_blocks - last))
    if cfg.blocks is not None:
        bad = [b for b in cfg.blocks if not 0 <= b < num_blocks]
        if bad:
            raise ValueError(f"prune.blocks: {bad} out of range for a model with {num_blocks} blocks "
                             f"(0..{num_blocks - 1})")
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


def plan_width(cfg: PruneConfig, config) -> int:
    """Units kept in every block (MLP neurons or key-value groups); raises ValueError if impossible."""
    if cfg.spec.target == "mlp":
        key = expert_width_key(config) if architecture_for(config).moe else "intermediate_size"
        return width.kept_width(getattr(config, key), cfg.ratio, cfg.round_to)
    if cfg.spec.target == "experts":
        total, top_k = num_experts(config), int(config.num_experts_per_tok)
        if cfg.experts is not None:
            keep, key = cfg.experts, f"prune.experts {cfg.experts}"
            if keep >= total:
                raise ValueError(f"{key} keeps every one of the model's {total} experts per block; keep fewer")
        else:
            keep, key = width.kept_groups(total, cfg.ratio, "experts per block"), f"prune.ratio {cfg.ratio}"
        if keep < top_k:
            raise ValueError(f"{key} keeps {keep} of {total} experts per block, fewer than the {top_k} the router "
                             "picks per token (num_experts_per_tok); keep more")
        return keep
    return width.kept_groups(getattr(config, "num_key_value_heads", None) or config.num_attention_heads, cfg.ratio)


def score(cfg: PruneConfig, stack: BlockStack, tokens: torch.Tensor | None, count: int | None,
          candidates: list[int] | None, progress: bool) -> tuple[dict | list, list[int] | None]:
    """Run the criterion on ``stack``: (scores, blocks to drop) for depth, (per-block scores, None) for width."""
    spec = cfg.spec
    if cfg.method == "depth":
        scores = spec.score(stack, tokens, candidates, count, progress)
        # A replacement stands in for one contiguous span; per-block criteria then pick the cheapest window.
        pick = replace.lowest_sum_span if cfg.replacing and spec.select is not depth.lowest_span else spec.select
        return scores, pick(scores, count)
    return spec.score(stack, tokens, progress), None


def _load_tokens(cfg: PruneConfig, tokenizer) -> torch.Tensor | None:
    cal = cfg.calibration
    if cal.path is None:
        return None
    return load_calibration(cal.path, tokenizer, cal.num_samples, cal.seq_len, cal.seed, cal.text_field,
                            cal.max_documents)


def check_output(out: Path, location, keep_apart: dict[str, str]) -> None:
    """Refuse an output directory that is a file, unwritable, the input or a teacher, or another model's."""
    protected = {}
    if Path(location.path).is_dir():  # not a hub id
        protected["the input model (model.source)"] = Path(location.path) / (location.gguf_file or "")
    for label, source in keep_apart.items():
        where = model_path(source)
        if where is not None:
            protected[label] = where
    check_output_dir(out, "prune.output", protected)
    ours = (out / REPORT).exists() or (read_stage_manifest(out) or {}).get("stage") == "prune"
    if out.is_dir() and not ours:
        foreign = next((f for pattern in MODEL_FILES for f in sorted(out.glob(pattern))), None)
        if foreign is not None:
            raise HealerError(f"prune.output: {out} already holds {foreign.name} that healer prune did not write; "
                              "choose another directory, or empty this one if it may be overwritten")


def check_model(cfg: PruneConfig, location, config) -> None:
    """Refuse a model healer cannot prune or read, and calibration it cannot use, before any scoring."""
    arch = architecture_for(config)  # refuse an unknown family before any work
    target = cfg.spec.target
    if target == "attention":
        refuse_head_pruning(arch)
    elif target == "weights":
        refuse_moe_mlp(arch, "sparse pruning")
    elif target == "mlp" and arch.moe:
        check_all_blocks_have_experts(arch, config)
        if cfg.spec.needs_data:
            raise UnsupportedArchitecture(
                f"{arch.family}: prune.criterion {cfg.criterion} scores dense MLP neurons on calibration text; the "
                "width inside experts is scored from their weights: use criterion maw or l2")
    elif target == "experts":
        check_all_blocks_have_experts(arch, config)
    check_weights(location, config)
    if cfg.needs_calibration and cfg.calibration.path is None:
        raise HealerError(f"prune.calibration.path is required by criterion {cfg.criterion!r} "
                          "(a jsonl with a text field or a plain-text file)")
    if cfg.calibration.path is not None:
        check_seq_len(cfg.calibration.seq_len, config, "prune.calibration.seq_len")


def prune(source: str, cfg: PruneConfig, out_dir: str | Path, *, gguf_file: str | None = None,
          dtype: str = "float32", seed: int = 0, progress: bool = True,
          keep_apart: dict[str, str] | None = None) -> dict:
    """Prune the model at ``source`` as ``cfg`` says and write the result to ``out_dir``. Returns the report.

    ``keep_apart`` maps a label to other models the output must not overwrite (e.g. a KD teacher);
    the input model is always kept apart.
    """
    started = time.time()
    torch.manual_seed(seed)
    out = Path(out_dir)
    torch_type = torch_dtype(dtype)
    location = resolve_source(source, gguf_file)
    check_output(out, location, keep_apart or {})
    config = load_config(location)
    check_model(cfg, location, config)
    spec = cfg.spec
    count, candidates, keep = None, None, None
    try:
        if cfg.method == "depth":
            count, candidates = plan_depth(cfg, config.num_hidden_layers)
            if cfg.replacing and count < 2:
                raise ValueError(f"prune.replace.kind: {cfg.replace.kind} would put 1 block in place of the {count} "
                                 "removed; remove at least 2 (prune.ratio / prune.num_blocks) or set kind: none")
        elif cfg.method == "width":
            keep = plan_width(cfg, config)
    except ValueError as err:
        raise HealerError(str(err)) from None

    if cfg.method == "sparse":
        try:  # every layer's width fits the N:M groups, before calibration is read or anything is written
            plan_sparsity(config, cfg.sparsity.pattern, cfg.sparsity.ratio, layers=cfg.sparsity.layers)
        except HealerError as err:
            raise HealerError(str(err)) from None

    tokenizer = load_tokenizer(location)
    tokens = _load_tokens(cfg, tokenizer)
    if cfg.method == "sparse":
        return _prune_sparse(cfg, location, config, tokens, tokenizer, out, torch_type, seed, progress, started)
    explicit = cfg.method == "depth" and cfg.blocks is not None

    # Score from disk shards, one block resident, when the criterion allows and the source is a directory.
    disk_stack = None
    if location.is_local_dir and spec.reads_shards and not explicit:
        try:
            disk_stack = BlockStack.from_pretrained_dir(location.path, torch_type)
        except FileNotFoundError:  # no safetensors (e.g. pytorch_model.bin): score in memory
            disk_stack = None
    scored = None
    if disk_stack is not None:
        scored = score(cfg, disk_stack, tokens, count, candidates, progress)
        del disk_stack

    model = load_model(location, torch_type)
    adapter = ModelAdapter(model)
    params_before = count_parameters(model)
    ppl_before = depth.perplexity(model, tokens) if tokens is not None else None
    config_before = model.config.to_dict()

    if explicit:
        scores, drop = {}, sorted(set(cfg.blocks))
    else:
        scores, drop = scored or score(cfg, BlockStack.from_model(model), tokens, count, candidates, progress)

    details: dict = {}
    if cfg.method == "depth":
        removed = drop
        if cfg.replacing:  # the span's seed block stays in place as the replacement
            try:
                drop, replacement = replace.plan(cfg.replace.kind, cfg.replace.init, BlockStack.from_model(model),
                                                 tokens, removed)
            except ValueError as err:
                raise HealerError(str(err)) from None
            details["replacement"] = replacement
        edited = adapter.remove_blocks(drop)
        details = {"removed": removed, "kept": [i for i in range(config.num_hidden_layers) if i not in removed],
                   "scores": {str(k): v for k, v in scores.items()}, "config_keys_edited": edited, **details}
    elif spec.target == "experts":
        kept = width.top_indices(scores, keep)
        total = num_experts(config)
        keep_experts(adapter.arch, adapter.blocks, model.config, dict(enumerate(kept)))
        details = {"experts": [total, keep], "kept_experts_per_block": [k.tolist() for k in kept],
                   **width.describe(scores, kept), "expert_scores": [s.tolist() for s in scores]}
    elif spec.target == "mlp" and adapter.arch.moe:  # every expert's own neurons
        kept = width.top_indices(scores, keep)
        key = expert_width_key(config)
        shrink_experts(adapter.arch, adapter.blocks, model.config, kept)
        details = {"expert_intermediate_size": [getattr(config, key), keep], "config_key": key,
                   **width.describe(scores, kept), "widths": width.width_divisibility({key: keep}),
                   "warnings": width.kernel_warnings(keep)}
    elif spec.target == "mlp":
        kept = width.top_indices(scores, keep)
        adapter.shrink_mlp(kept)
        details = {"intermediate_size": [config.intermediate_size, keep], **width.describe(scores, kept),
                   "widths": width.width_divisibility({"intermediate_size": keep}),
                   "warnings": width.kernel_warnings(keep)}
    else:
        before = (adapter.num_heads, adapter.num_kv_heads)
        kept = width.top_indices(scores, keep)
        adapter.shrink_attention(kept)
        details = {"attention_heads": [before[0], model.config.num_attention_heads],
                   "key_value_heads": [before[1], model.config.num_key_value_heads],
                   "removed_groups_per_block": width.describe(scores, kept)["removed_per_block"],
                   "group_scores": [s.tolist() for s in scores],
                   "widths": width.width_divisibility({"q_proj_out": adapter.num_heads * adapter.head_dim,
                                                       "kv_proj_out": adapter.num_kv_heads * adapter.head_dim})}

    ppl_after = depth.perplexity(model, tokens) if tokens is not None else None
    # Built aside and swapped in whole: no file of an earlier result (its report, a tokenizer file the new
    # source lacks) is ever left beside the new weights.
    partial = new_partial_dir(out)
    max_diff = save_and_verify(model, tokenizer, partial, atol=cfg.verify_atol)
    config_after = model.config.to_dict()
    params_after = count_parameters(model)
    first, last = cfg.protected
    report = {
        "source": str(location),
        "method": cfg.method,
        "criterion": "explicit" if explicit else cfg.criterion,
        "criterion_description": "the blocks listed in prune.blocks" if explicit else spec.description,
        "target": spec.target,
        "ratio": cfg.ratio,
        "score_meaning": spec.scores_are or DEFAULT_SCORES_ARE[cfg.method],
        "protected": {"keep_first": first, "keep_last": last,
                      "applied": cfg.method == "depth" and not explicit and (first + last) > 0},
        **details,
        "params_before": params_before,
        "params_after": params_after,
        "param_reduction": 1 - params_after / params_before,
        "calibration": cfg.calibration.model_dump() | {"tokens": int(tokens.numel()) if tokens is not None else 0},
        "calibration_ppl_before": ppl_before,
        "calibration_ppl_after": ppl_after,
        "config_changes": {k: [config_before.get(k), v] for k, v in config_after.items()
                           if config_before.get(k) != v
                           and k not in ("transformers_version", "dtype", "architectures")},
        "reload_max_logit_diff": max_diff,
        "scored_from": "disk, one block at a time" if scored is not None else "memory",
        "seed": seed,
        "versions": package_versions(),
        "elapsed_s": round(time.time() - started, 2),
    }
    write_json_atomic(partial / REPORT, report)
    swap_in(partial, out)
    return report


def _prune_sparse(cfg: PruneConfig, location, config, tokens: torch.Tensor | None, tokenizer, out: Path,
                  dtype: torch.dtype, seed: int, progress: bool, started: float) -> dict:
    """``method: sparse``: zero weights in place (shapes kept) and write the report with the stage's fields."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # the parameter count from the config alone: the model may not fit in memory
        params = count_parameters(AutoModelForCausalLM.from_config(config))
    sp = cfg.sparsity
    partial = new_partial_dir(out)
    extra = {
        "target": "weights",
        "score_meaning": cfg.spec.scores_are or DEFAULT_SCORES_ARE["sparse"],
        "params_before": params,
        "params_after": params,
        "param_reduction": 0.0,
        "calibration": cfg.calibration.model_dump() | {"tokens": int(tokens.numel()) if tokens is not None else 0},
        "seed": seed,
        "versions": package_versions(),
    }
    report = prune_sparse(location, partial, tokens, tokenizer, criterion=cfg.criterion, pattern=sp.pattern,
                          ratio=sp.ratio, layers=sp.layers, blocksize=sp.blocksize, percdamp=sp.percdamp,
                          dtype=dtype, verify_atol=cfg.verify_atol, progress=progress, extra=extra,
                          started=started)
    swap_in(partial, out)
    return report


@dataclass
class Options:
    """``healer prune`` has no flags of its own: everything it does is a recipe key (``--prune.KEY``)."""


def run_prune_stage(recipe, opts: Options, inputs: dict | None = None) -> int:
    """The ``healer prune`` verb: prune ``recipe.stage_input("prune")`` into the prune stage directory.
    ``inputs``: what its manifest records it was built from."""
    if recipe.prune is None:
        raise HealerError("the recipe has no prune: section (give --method/--ratio or a recipe with prune:)")
    if recipe.prune.rounds:
        raise HealerError("prune.rounds: each round prunes the round before's healed model; `healer run` runs "
                          "them (`healer run --dry-run` lists the steps)")
    out = recipe.stage_dir("prune")
    report = prune(recipe.stage_input("prune"), recipe.prune, out, gguf_file=recipe.model.gguf_file,
                   dtype=recipe.model.dtype, seed=recipe.seed, keep_apart=teachers(recipe))
    outputs = {"model_dir": str(out), "report": str(out / REPORT), "params_before": report["params_before"],
               "params_after": report["params_after"]}
    if report["method"] == "sparse":  # what the healing stages must keep (the mask) and eval/release report
        s = report["sparsity"]
        outputs["sparsity"] = {"pattern": report["pattern"], "ratio": report["ratio"], "overall": s["overall"],
                               "zeros": s["zeros"], "pattern_holds": s["pattern_holds"],
                               "layers": report["layers_pruned"]}
    write_stage_manifest(out, "prune", inputs, outputs)
    _print_summary(report, out)
    return 0


def teachers(recipe) -> dict[str, str]:
    """Models later stages of ``recipe`` read as teachers, by the key that names them: prune must not write there."""
    found = {}
    kd = getattr(recipe.cpt, "kd", None) if getattr(recipe, "cpt", None) is not None else None
    if kd is not None:
        found["the KD teacher (cpt.kd.teacher)"] = getattr(kd, "teacher", None) or recipe.model.source
    self_distill = getattr(recipe.sft, "self_distill", None) if getattr(recipe, "sft", None) is not None else None
    if self_distill is not None:
        found["the self-distillation teacher (sft.self_distill.teacher)"] = (getattr(self_distill, "teacher", None)
                                                                             or recipe.model.source)
    return found


def _print_summary(report: dict, out: Path) -> None:
    if report["method"] == "sparse":
        s = report["sparsity"]
        held = "holds in every layer" if s["pattern_holds"] else "BROKEN: " + "; ".join(s["problems"][:2])
        print(f"pruned (sparse, {report['criterion']}, {report['pattern']}): {s['zeros']:,} of {s['weights']:,} "
              f"projection weights are zero ({s['overall']:.1%}); pattern {held}\nwrote {out}")
        return
    what = (f"removed blocks {report['removed']}" if "removed" in report
            else f"intermediate_size {report['intermediate_size'][0]} -> {report['intermediate_size'][1]}"
            if "intermediate_size" in report
            else f"every expert's {report['config_key']} {report['expert_intermediate_size'][0]} -> "
                 f"{report['expert_intermediate_size'][1]}" if "expert_intermediate_size" in report
            else f"experts per block {report['experts'][0]} -> {report['experts'][1]}" if "experts" in report
            else f"heads {report['attention_heads'][0]} -> {report['attention_heads'][1]}")
    if "replacement" in report:
        what += f", in their place block {report['replacement']['init_from_block']} (trained by `healer replace`)"
    ppl = ""
    if report["calibration_ppl_before"] is not None:
        ppl = f"; calibration ppl {report['calibration_ppl_before']:.2f} -> {report['calibration_ppl_after']:.2f}"
    print(f"pruned ({report['method']}, {report['criterion']}): {what}; params {report['params_before']:,} -> "
          f"{report['params_after']:,} (-{report['param_reduction']:.1%}){ppl}\nwrote {out}")
    for warning in report.get("warnings") or []:
        print(f"warning: {warning}")

"""``healer replace``: train the block that stands in for a pruned span (LLM-Streamline), on the training core.

``prune`` with ``prune.replace.kind: layer`` leaves a checkpoint in which one block of the removed span sits
where the span was. This stage trains that block alone so that, fed the hidden states entering the span in
the dense model, it gives the hidden states leaving it: :class:`~healer.train.objectives.HiddenMSE` between
the student's state after the replacement and the dense teacher's after the span's last block, on the
streamed ``data:`` corpus, with the loop of cpt/sft (ZeRO, launcher, checkpoints, resume, preemption).

Nothing after the span matters to the loss, so both models are cut one block past it before training (the
extra block keeps the matched state ahead of the final norm, which Hugging Face applies to the last hidden
state it returns); a step costs the prefix and one block, not the model. ``hf/`` is the whole pruned
checkpoint with the trained block spliced in. The stage also writes ``prune_report.json``: the prune
report with ``replacement.training`` (tokens, MSE curve, cosine and MSE before/after on held-out batches).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from healer.core.errors import HealerError
from healer.core.manifest import supersede_stage_manifest
from healer.train.config import ReplaceTrainConfig

REPORT = "prune_report.json"
BEFORE = "replace_before.json"  # the held-out fit of the untrained block, kept across resumes


@dataclass
class Options:
    """``healer replace`` flags (as cpt's, without export: the stage always exports)."""

    resume: str = field(default="auto", metadata={
        "help": "auto: newest complete checkpoint; none: start over (old checkpoints moved aside); or a checkpoint "
                "dir"})
    force: bool = field(default=False, metadata={
        "help": "resume even though a setting that makes steps incomparable changed (data, span, micro-batch ...)"})


@dataclass(frozen=True)
class Placement:
    """Where the replacement is, read from the input's ``prune_report.json``."""

    span: list[int]  # dense blocks it stands in for
    position: int  # its block index in the pruned model
    report: dict

    # Hidden-state indices as HF ``output_hidden_states`` counts them (0 = embeddings, i = after block i - 1).
    @property
    def student_layer(self) -> int:
        return self.position + 1

    @property
    def teacher_layer(self) -> int:
        return self.span[-1] + 1


def read_placement(model_dir: str | Path) -> Placement:
    """The span and position recorded by ``prune`` in ``model_dir``; refuses a checkpoint without a replacement."""
    path = Path(model_dir) / REPORT
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise HealerError(f"replace.input: {path} is missing; `healer replace` trains the block `healer prune` put "
                          "in place of a span (prune.replace.kind: layer)") from None
    except (OSError, ValueError) as err:
        raise HealerError(f"replace.input: cannot read {path} ({err}); run `healer prune` again") from None
    rep = report.get("replacement") if isinstance(report, dict) else None
    if not isinstance(rep, dict) or "span" not in rep or "position" not in rep:
        raise HealerError(f"replace.input: {path} records no replacement block; prune with prune.replace.kind: "
                          "layer, or drop the replace: section")
    return Placement(list(rep["span"]), int(rep["position"]), report)


def truncate(model: torch.nn.Module, keep: int) -> None:
    """Keep the first ``keep`` blocks of ``model`` (in place); the rest never influence the loss."""
    from healer.model.adapter import ModelAdapter

    adapter = ModelAdapter(model)
    if keep < adapter.num_blocks:
        adapter.remove_blocks(list(range(keep, adapter.num_blocks)))


def train_only(model: torch.nn.Module, position: int) -> int:
    """Freeze everything but block ``position``; returns its parameter count."""
    from healer.model.adapter import ModelAdapter

    model.requires_grad_(False)
    block = ModelAdapter(model).blocks[position]
    block.requires_grad_(True)
    return sum(getattr(p, "ds_numel", p.numel()) for p in block.parameters())


def settings_of(cfg: ReplaceTrainConfig, data_cfg, place: Placement) -> dict[str, Any]:
    """What makes two runs' steps comparable, by recipe key: resuming with another value is refused."""
    # num_workers is no setting: another worker count resumes with the stream re-dealt (data/reshard.py)
    data = data_cfg.model_dump(mode="json", exclude={"validation", "num_workers"})
    return {**{f"data.{k}": v for k, v in data.items()},
            **{f"replace.{k}": getattr(cfg, k) for k in ("micro_batch_size", "global_batch_size", "seed")},
            "prune.replace (span)": place.span, "prune.replace (init_from_block)": place.report["replacement"].get(
                "init_from_block")}


def _hidden(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    kwargs = {k: batch[k] for k in ("position_ids", "attention_mask") if batch.get(k) is not None}
    return model(input_ids=batch["input_ids"], use_cache=False, output_hidden_states=True, logits_to_keep=1,
                 **kwargs).hidden_states


def _fit_sums(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> list[float]:
    a, b = a.float(), b.float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    mse = (a - b).pow(2).mean(-1)
    if mask is not None:
        cos, mse = cos * mask, mse * mask
    return [cos.sum().item(), mse.sum().item()]


@torch.no_grad()
def held_out_fit(engine, teacher, batches: list[dict], place: Placement, *, with_cut: bool) -> dict[str, float]:
    """Collective: mean cosine and MSE (per token) of the replacement's output against the span's output on
    ``batches``; ``with_cut`` adds the plain cut's (the span's input against its output)."""
    was_training = engine.training
    engine.eval()
    n = torch.tensor([float(len(batches))], device=engine.device)
    if dist.is_initialized():  # every rank must run the same number of (ZeRO-3) forwards
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
    sums = torch.zeros(5, dtype=torch.float64)
    for batch in batches[: int(n.item())]:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        mask = batch.get("attention_mask")
        student = _hidden(engine, batch)[place.student_layer]
        states = _hidden(teacher, batch)
        target = states[place.teacher_layer]
        cut = _fit_sums(states[place.span[0]], target, mask) if with_cut else [0.0, 0.0]
        sums += torch.tensor([*_fit_sums(student, target, mask), *cut,
                              float(mask.sum()) if mask is not None else float(target.shape[0] * target.shape[1])],
                             dtype=torch.float64)
    sums = sums.to(engine.device)
    if dist.is_initialized():
        dist.all_reduce(sums)
    engine.train(was_training)
    count = max(sums[4].item(), 1.0)
    out = {"val/cosine": sums[0].item() / count, "val/mse": sums[1].item() / count}
    if with_cut:
        out.update({"val/cosine_plain_cut": sums[2].item() / count, "val/mse_plain_cut": sums[3].item() / count})
    return out


def splice_export(engine, location, position: int, tokenizer, hf_dir: Path) -> None:
    """Collective: write the full pruned checkpoint at ``location`` with block ``position`` from ``engine``.

    The directory appears whole or not at all (written beside it, then renamed), and is reloaded with plain
    transformers to check its logits.
    """
    from healer.core.swap import new_partial_dir, swap_in
    from healer.model.adapter import architecture_for
    from healer.model.modeling import load_model, save_and_verify
    from healer.train.export import gather_state_dict

    state = gather_state_dict(engine.module)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        full = load_model(location, torch.float32)
        prefix = f"{architecture_for(full.config).blocks}.{position}."
        block = {k: v.float() for k, v in state.items() if k.startswith(prefix)}
        own = {k for k in full.state_dict() if k.startswith(prefix)}
        if not block or set(block) != own:
            raise HealerError(f"replace: the trained block's weights ({len(block)} tensors) do not match block "
                              f"{position} of {location} ({len(own)}); the input changed during training")
        full.load_state_dict(block, strict=False)
        tmp = new_partial_dir(hf_dir)
        save_and_verify(full, tokenizer, tmp)
        swap_in(tmp, hf_dir)
    if dist.is_initialized():
        dist.barrier()


def mse_curve(metrics_jsonl: Path) -> list[list[float]]:
    """``[[step, train MSE per token], ...]`` from the stage's ``metrics.jsonl`` (the loop's per-step rows)."""
    curve: dict[int, float] = {}
    if metrics_jsonl.is_file():
        for line in metrics_jsonl.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by a kill
                continue
            if "train/mse" in row:
                curve[int(row["step"])] = float(row["train/mse"])
    return [[s, curve[s]] for s in sorted(curve)]


def run_replace(recipe, opts: Options, inputs: dict | None = None) -> int:
    """The ``healer replace`` verb: every rank runs it. ``inputs``: what its manifest records it was built from.
    Returns the exit code."""
    from healer.core.manifest import write_stage_manifest
    from healer.model.modeling import resolve_source
    from healer.train.signals import PREEMPTED_EXIT_CODE

    cfg = recipe.replace or ReplaceTrainConfig(seed=recipe.seed)
    if recipe.data is None or not recipe.data.sources:
        raise HealerError("replace needs a `data:` section with at least one source (data.sources: [{path: ...}]): "
                          "the replacement learns the span's map on that text")
    source = recipe.stage_input("replace")
    place = read_placement(source)  # before any model is loaded
    teacher = cfg.teacher or recipe.model.source
    same = teacher == recipe.model.source
    teacher_location = resolve_source(teacher, recipe.model.gguf_file if same else None,
                                      recipe.model.revision if same else None,
                                      key="model.source" if same else "replace.teacher")
    location = resolve_source(source, key="replace.input")
    outputs = train_replacement(cfg, recipe.data, location=location, teacher_location=teacher_location, place=place,
                                stage_dir=recipe.stage_dir("replace"),
                                hf_dir=recipe.model_dir("replace"), opts=opts)
    if outputs is None:
        return PREEMPTED_EXIT_CODE
    if dist.get_rank() == 0 and not outputs.get("unchanged"):
        write_stage_manifest(recipe.stage_dir("replace"), "replace", inputs, outputs)
    return 0


def _load(location, attn: str, keep: int):
    from healer.model.modeling import load_model

    model = load_model(location, torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    truncate(model, keep)
    return model


def train_replacement(cfg: ReplaceTrainConfig, data_cfg, *, location, teacher_location, place: Placement,
                      stage_dir: str | Path, hf_dir: str | Path, opts: Options) -> dict[str, Any] | None:
    """Collective: build the cut student and teacher, resume, train the replacement with the loop, export.

    Returns the outputs the stage manifest records, or None when the run was preempted.
    """
    from healer.core.manifest import write_json_atomic
    from healer.model.modeling import load_tokenizer
    from healer.train.cpt import CorpusBatches, attn_implementation
    from healer.train.data import build_loader
    from healer.train.engine import (
        batch_summary,
        build_ds_config,
        init_distributed,
        init_engine,
        init_frozen_engine,
        make_optimizer,
        resolve_precision,
    )
    from healer.train.loop import Cadence, check_resume, finished, resume, seed_everything, train
    from healer.train.metrics import MetricsLogger
    from healer.train.objectives import HiddenMSE
    from healer.train.schedule import stage_lr

    info = init_distributed()
    rank, world, device = info.rank, info.world_size, info.device
    stage_dir, hf_dir = Path(stage_dir), Path(hf_dir)
    if opts.resume == "auto" and finished(stage_dir, cfg.max_steps):
        if rank == 0:
            print(f"healer replace: {stage_dir} is finished ({cfg.max_steps} steps, manifest.json); --resume none "
                  "trains again, a larger replace.max_steps trains on", file=sys.stderr)
        return {"unchanged": True}
    check_resume(opts.resume, stage_dir)
    if rank == 0:  # work to do: the old "finished" must not outlive a run that stops half-way
        supersede_stage_manifest(stage_dir)
    seed = cfg.seed if cfg.seed is not None else 0
    precision = resolve_precision(cfg.precision, device)
    ds_config = build_ds_config(
        zero_stage=cfg.zero_stage, micro_batch_size=cfg.micro_batch_size, global_batch_size=cfg.global_batch_size,
        world_size=world, grad_clip=cfg.grad_clip, precision=precision, offload_optimizer=cfg.offload_optimizer,
        offload_params=cfg.offload_params, base=cfg.deepspeed_config, section="replace")
    micro = ds_config["train_micro_batch_size_per_gpu"]
    seed_everything(seed + rank)

    tokenizer = load_tokenizer(location)
    attn = attn_implementation(cfg.attn_implementation, device, precision)
    hf_ds = None
    if ds_config["zero_optimization"].get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # from_pretrained builds partitioned models while it lives
    # One block past the replacement / the span: the matched states are then not the last, normed, ones.
    student = _load(location, attn, place.position + 2)
    trainable = train_only(student, place.position)
    optimizer = make_optimizer(student, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                               offload="offload_optimizer" in ds_config["zero_optimization"])
    engine = init_engine(student, ds_config, optimizer)
    dense = _load(teacher_location, attn, place.span[-1] + 2)
    for key in ("hidden_size", "vocab_size"):  # same token ids must mean the same text, in the same space
        if getattr(dense.config, key) != getattr(student.config, key):
            raise HealerError(f"replace.teacher {teacher_location}: {key} {getattr(dense.config, key)} differs from "
                              f"the pruned model's {getattr(student.config, key)}; the teacher is the unpruned model")
    teacher = init_frozen_engine(dense, ds_config, device)
    del hf_ds

    def loader(split: str):
        return build_loader(data_cfg, tokenizer, rank=rank, world_size=world, micro_batch_size=micro, split=split)

    batches = CorpusBatches(loader("train"))
    settings = settings_of(cfg, data_cfg, place)
    logger = MetricsLogger(None, cfg.max_steps, rank=rank, progress_bar=False)
    # Checkpoints hold the block and its optimizer state; the frozen rest is the stage's input, not state.
    progress = resume(engine, batches, stage_dir=stage_dir, how=opts.resume, settings=settings, force=opts.force,
                      frozen_base=True, say=logger.write)
    held_split = "validation" if data_cfg.validation else "train"
    held_iter = iter(loader(held_split))
    held = [b for b in (next(held_iter, None) for _ in range(cfg.eval_batches)) if b is not None]

    before_path = stage_dir / BEFORE
    if progress.step == 0:  # collective; a resumed run reports what its first run measured
        before = held_out_fit(engine, teacher, held, place, with_cut=True)
        if rank == 0:
            stage_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(before_path, before)
    before = json.loads(before_path.read_text()) if rank == 0 and before_path.is_file() else {}

    logger = MetricsLogger(stage_dir / "tensorboard", cfg.max_steps, rank=rank, initial_step=progress.step,
                           desc="replace", jsonl_path=stage_dir / "metrics.jsonl",
                           report_to=cfg.report_to, run_config=cfg.model_dump(mode="json"))
    logger.write(f"healer replace: block {place.position} of {location} stands in for dense blocks {place.span} of "
                 f"{teacher_location} | {trainable:,} trainable parameters | ZeRO-"
                 f"{ds_config['zero_optimization']['stage']} | {precision} | {world} ranks")
    logger.write("healer replace: " + batch_summary(ds_config, world, data_cfg.seq_len)
                 + f" | held-out fit on {len(held)} {held_split} micro-batches per rank")
    objective = HiddenMSE(teacher, student_layer=place.student_layer, teacher_layer=place.teacher_layer)
    lr_at = stage_lr(cfg, cfg.max_steps, section="replace", say=logger.write)
    outcome = train(engine, objective, batches, lr_at=lr_at,
                    cadence=Cadence(cfg.max_steps, cfg.log_every, cfg.save_every, cfg.keep_last, cfg.eval_every),
                    progress=progress, stage_dir=stage_dir, settings=settings, logger=logger,
                    evaluate=lambda eng: held_out_fit(eng, teacher, held, place, with_cut=False), frozen_base=True)
    logger.close()
    if outcome.status == "preempted":
        return None
    after = held_out_fit(engine, teacher, held, place, with_cut=False)
    splice_export(engine, location, place.position, tokenizer, hf_dir)
    if rank != 0:
        return {}
    training = {
        "objective": f"hidden_mse: student hidden state {place.student_layer} vs dense {place.teacher_layer}",
        "trainable_parameters": trainable, "steps": outcome.progress.step,
        "tokens_trained": outcome.progress.tokens_seen, "held_out": f"{held_split} split",
        "before_training": {"cosine": before.get("val/cosine"), "mse": before.get("val/mse"),
                            "cosine_plain_cut": before.get("val/cosine_plain_cut"),
                            "mse_plain_cut": before.get("val/mse_plain_cut")},
        "after_training": {"cosine": after["val/cosine"], "mse": after["val/mse"]},
        "mse_curve": mse_curve(stage_dir / "metrics.jsonl"),
        "data_exhausted": outcome.status == "exhausted",
    }
    report = dict(place.report)
    report["replacement"] = {**report["replacement"], "training": training}
    write_json_atomic(stage_dir / REPORT, report)
    return {"hf_dir": str(hf_dir), "report": str(stage_dir / REPORT), "checkpoints": str(stage_dir / "checkpoints"),
            "tensorboard": str(stage_dir / "tensorboard"), "steps": outcome.progress.step,
            "tokens_trained": outcome.progress.tokens_seen, "final_loss": outcome.last.get("train/loss"),
            "held_out_cosine": [before.get("val/cosine"), after["val/cosine"]], "world_size": world,
            "zero_stage": ds_config["zero_optimization"]["stage"], "precision": precision,
            "forced_changes": outcome.progress.changed}

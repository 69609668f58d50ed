"""``healer cpt``: continued pretraining of a (pruned) checkpoint under DeepSpeed ZeRO, with optional KD.

Run it under torchrun, the DeepSpeed launcher or srun (one process per device), or as one plain process.
It reads ``recipe.stage_input("cpt")`` and the ``data:`` stream, and writes ``<stage_dir>/checkpoints``
(resumable), ``<stage_dir>/tensorboard``, ``<stage_dir>/metrics.jsonl``, the Hugging Face export
``<stage_dir>/hf`` and, last, ``<stage_dir>/manifest.json``. The steps themselves are ``healer.train.loop``.

With ``cpt.lora`` only a LoRA adapter trains (the Wanda paper's healing on C4): checkpoints hold the adapter
and its optimizer, ``<stage_dir>/adapter`` is the adapter in PEFT's format, and the export is the base with the
adapter folded in (times the mask on a sparse input, ``healer.train.lora.merge_adapter``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from healer.core.errors import HealerError
from healer.core.manifest import supersede_stage_manifest
from healer.train.config import CPTConfig
from healer.train.loop import Cadence, check_resume, finished, resume, seed_everything, train
from healer.train.signals import PREEMPTED_EXIT_CODE

SOURCE_STATS_EVERY = 10  # steps between gathering every rank's per-source token counters


@dataclass
class Options:
    """``healer cpt`` flags."""

    action: str = field(default="train", metadata={
        "help": "train, or export: write the HF export of the newest checkpoint and stop",
        "positional": True, "choices": ("train", "export")})
    resume: str = field(default="auto", metadata={
        "help": "auto: newest complete checkpoint; none: start over (old checkpoints moved aside); or a checkpoint "
                "dir"})
    force: bool = field(default=False, metadata={
        "help": "resume even though a setting that makes steps incomparable changed (data, seq_len, micro-batch ...)"})


def settings_of(cfg: CPTConfig, data_cfg) -> dict[str, Any]:
    """What makes two runs' steps comparable, by recipe key: resuming with another value is refused."""
    # num_workers is no setting: another worker count resumes with the stream re-dealt (data/reshard.py)
    data = data_cfg.model_dump(mode="json", exclude={"validation", "num_workers"})
    # A full-weight checkpoint and an adapter checkpoint hold different tensors: `cpt.lora` on/off is a
    # setting of its own, so the refusal names it rather than a missing key.
    lora = cfg.lora.model_dump(mode="json") if cfg.lora is not None else {}
    return {**{f"data.{k}": v for k, v in data.items()},
            **{f"cpt.{k}": getattr(cfg, k) for k in ("micro_batch_size", "global_batch_size", "seed")},
            "cpt.lora": cfg.lora is not None, **{f"cpt.lora.{k}": v for k, v in lora.items()},
            # frozen embeddings have no optimizer state: a checkpoint with and one without cannot swap
            "cpt.train_embeddings": cfg.train_embeddings}


def run_cpt(recipe, opts: Options, inputs: dict | None = None) -> int:
    """The ``healer cpt`` verb: every rank runs it. ``inputs``: what its manifest records it was built from.
    Returns the exit code."""
    from healer.core.manifest import write_stage_manifest
    from healer.model.modeling import check_seq_len, load_config, resolve_source

    cfg = recipe.cpt or CPTConfig(seed=recipe.seed)
    if recipe.data is None or not recipe.data.sources:
        raise HealerError("cpt needs a `data:` section with at least one source (data.sources: [{path: ...}])")
    source = recipe.stage_input("cpt")
    same = source == recipe.model.source
    location = resolve_source(source, recipe.model.gguf_file if same else None, recipe.model.revision if same else None,
                              key="model.source" if same else "cpt.input")
    # Positions past the model's maximum were never trained: refuse before any rank builds an engine.
    check_seq_len(recipe.data.seq_len, load_config(location), "data.seq_len")
    teacher_location = None
    dynamic = recipe.data.dynamic
    if (cfg.kd is not None or cfg.stop_at_recovery is not None or (dynamic and dynamic.reference == "teacher")) \
            and opts.action == "train":
        # The KD teacher; with stop_at_recovery or data.dynamic (and no KD) the dense model the recovery or
        # the per-domain reference loss is measured on.
        teacher = (cfg.kd.teacher if cfg.kd is not None else None) or recipe.model.source
        same_t = teacher == recipe.model.source
        teacher_location = resolve_source(teacher, recipe.model.gguf_file if same_t else None,
                                          recipe.model.revision if same_t else None,
                                          key="model.source" if same_t else "cpt.kd.teacher")
    stage_dir = recipe.stage_dir("cpt")
    from healer.train.kd import cut_points_of_input
    from healer.train.masks import sparsity_to_keep

    outputs = heal(cfg, recipe.data, location=location, teacher_location=teacher_location, stage_dir=stage_dir,
                   hf_dir=recipe.model_dir("cpt"), opts=opts, keep_sparsity=sparsity_to_keep(recipe, source),
                   merge_dtype=recipe.model.dtype,
                   hidden_pairs=cut_points_of_input(recipe, source) if cfg.kd and cfg.kd.hidden_weight else None)
    if outputs is None:
        return PREEMPTED_EXIT_CODE
    if dist.get_rank() == 0 and opts.action == "train" and not outputs.get("unchanged"):
        write_stage_manifest(stage_dir, "cpt", inputs, outputs)
    return 0


def _matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all unique parameters, those used in matmuls: without the input embedding, with a tied output head)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += getattr(p, "ds_numel", p.numel())
    emb = model.get_input_embeddings().weight
    emb_n = getattr(emb, "ds_numel", emb.numel())
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    return total, total - emb_n + (emb_n if tied else 0)


def freeze_embeddings(model: torch.nn.Module) -> int:
    """Freeze the token embeddings and the output head (``cpt.train_embeddings: false``); returns the output
    head's parameter count, whose weight gradient backward no longer computes."""
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(False)
    head = model.get_output_embeddings()
    if head is None:
        return 0
    head.weight.requires_grad_(False)
    return getattr(head.weight, "ds_numel", head.weight.numel())


def _constraints(engine, keep_sparsity: dict | None, lora: bool) -> list:
    """The mask that keeps a sparse input's zeros through training (none for a dense input).

    Under LoRA the base weights are frozen, so nothing fills the zeros in while training; the merge masks.
    """
    if keep_sparsity is None or lora:
        return []
    from healer.model.adapter import architecture_for
    from healer.train.masks import SparsityMask, projection_pattern

    module = engine.module
    return [SparsityMask(module, projection_pattern(keep_sparsity["layers"], architecture_for(module.config)))]


class CorpusBatches:
    """The data stream as the loop's ``Batches``, plus its counters (tokens per source, skipped records)."""

    def __init__(self, loader):
        self.loader = loader
        self.it = iter(loader)

    def next(self) -> dict[str, torch.Tensor] | None:
        return next(self.it, None)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self.it = iter(self.loader)

    def source_tokens(self) -> dict[str, int]:
        """Tokens per corpus source summed over ranks (a collective)."""
        mine = dict(self.loader.stats().get("tokens", {}))
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return mine
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        total: dict[str, int] = {}
        for part in everyone:
            for k, v in part.items():
                total[k] = total.get(k, 0) + int(v)
        return total

    def skipped(self) -> tuple[int, list[str]]:
        """This rank's count of skipped bad records, and where the first few were (file, line, why)."""
        stats = self.loader.stats()
        return int(sum(stats.get("skipped", {}).values())), list(stats.get("skipped_examples", []))


@torch.no_grad()
def evaluate(engine, make_loader, max_batches: int) -> dict[str, float]:
    """Validation CE per token over up to ``max_batches`` micro-batches per rank (all ranks stop together)."""
    from healer.train.objectives import NextTokenCE

    ce = NextTokenCE()
    it = iter(make_loader())
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)
    for _ in range(max_batches):
        batch = next(it, None)
        more = torch.tensor([0.0 if batch is None else 1.0], device=engine.device)
        if dist.is_initialized():
            dist.all_reduce(more, op=dist.ReduceOp.MIN)
        if more.item() == 0:
            break
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss_sum, _ = ce(engine, batch)
        total[0] += loss_sum.double()
        total[1] += ce.tokens(batch)
    if dist.is_initialized():
        dist.all_reduce(total)
    if total[1] == 0:
        return {}
    val = (total[0] / total[1]).item()
    return {"val/loss": val, "val/ppl": float(torch.tensor(val).exp())}


def attn_implementation(requested: str, device: torch.device, precision: str) -> str:
    """``auto`` -> flash_attention_2 where it can run (GPU, 16-bit, flash-attn installed), else sdpa."""
    if requested != "auto":
        return requested
    import importlib.util

    if device.type == "cuda" and precision in ("bf16", "fp16") and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def adapted_modules(model) -> list[str] | str:
    """The module names a PEFT model's adapter is on (a fused ``qkv_proj`` where the recipe said q_proj/v_proj)."""
    config = getattr(model, "peft_config", {}).get("default")
    targets = getattr(config, "target_modules", None)
    return sorted(targets) if isinstance(targets, (set, list, tuple)) else targets


def router_balance(cfg: CPTConfig, config) -> float:
    """``cpt.router_aux_loss_coef``, defaulting to the model config's for a mixture-of-experts student (0 for a
    dense one); a dense student given one is refused."""
    from healer.model.adapter import architecture_for

    moe = architecture_for(config).moe
    if cfg.router_aux_loss_coef is None:
        return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if moe else 0.0
    if cfg.router_aux_loss_coef > 0 and not moe:
        raise HealerError(f"cpt.router_aux_loss_coef: {cfg.router_aux_loss_coef} balances a mixture-of-experts "
                          f"router; {config.model_type} has none: remove the key")
    return cfg.router_aux_loss_coef


def _load_student(location, attn: str, cfg: CPTConfig, ds_config: dict):
    from healer.model.modeling import load_model

    hf_ds = None
    if ds_config["zero_optimization"].get("stage") == 3:
        # While this object lives, from_pretrained builds the model already partitioned (zero.Init):
        # no rank ever holds the whole fp32 model.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)
    model = load_model(location, torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, hf_ds


def _teacher(teacher_location, attn: str, ds_config: dict, device, vocab: int):
    from healer.model.modeling import load_model
    from healer.train.engine import init_frozen_engine

    teacher = load_model(teacher_location, torch.float32, attn_implementation=attn)
    t_vocab = teacher.get_output_embeddings().weight
    t_vocab = getattr(t_vocab, "ds_shape", t_vocab.shape)[0]
    if t_vocab != vocab:
        raise HealerError(f"cpt.kd.teacher {teacher_location}: vocabulary {t_vocab} differs from the student's "
                          f"{vocab}; the teacher must share the student's tokenizer")
    return init_frozen_engine(teacher, ds_config, device)


def _open_cache(cfg: CPTConfig, data_cfg, teacher_location, tokenizer, world: int, ds_config: dict, vocab: int):
    """``cpt.kd.cache`` opened and checked against this run (teacher, tokenizer, data, seq_len, k, streams, and
    that it covers cpt.max_steps); None without one."""
    if cfg.kd is None or cfg.kd.cache is None:
        return None
    from healer.train.logit_cache import LogitCache, cache_key

    cache = LogitCache(cfg.kd.cache)
    cache.check(cache_key(teacher_location=teacher_location, tokenizer=tokenizer, data_cfg=data_cfg,
                          streams=world * max(1, data_cfg.num_workers), k=cfg.kd.top_k), cfg.kd.top_k, vocab)
    need = cfg.max_steps * ds_config["train_batch_size"] * data_cfg.seq_len
    if cache.tokens < need:
        raise HealerError(f"cpt.kd.cache {cfg.kd.cache} covers {cache.tokens:,} tokens of the stream, cpt.max_steps "
                          f"{cfg.max_steps} reads {need:,}; extend it: healer distill-cache RECIPE --tokens {need}")
    return cache


def _export_lora(engine, *, stage_dir: Path, hf_dir: Path, location, tokenizer, dtype: str, keep_sparsity,
                 rank: int, say) -> Path:
    """Collective: save the engine's adapter to ``<stage_dir>/adapter``; rank 0 merges it into ``hf_dir``."""
    from healer.model.modeling import torch_dtype
    from healer.train.lora import ADAPTER, merge_adapter, save_adapter

    adapter_dir = stage_dir / ADAPTER
    save_adapter(engine, adapter_dir, rank == 0)
    if rank == 0:
        diff = merge_adapter(location, adapter_dir, Path(hf_dir), tokenizer, torch_dtype(dtype), keep_sparsity)
        say(f"healer cpt: adapter -> {adapter_dir}, merged{' under the sparsity mask' if keep_sparsity else ''} "
            f"-> {hf_dir} (reload check {diff:.2g})")
    if dist.is_initialized():
        dist.barrier()
    return adapter_dir


def heal(cfg: CPTConfig, data_cfg, *, location, teacher_location, stage_dir: str | Path, hf_dir: str | Path,
         opts: Options, keep_sparsity: dict | None = None, merge_dtype: str = "float32",
         hidden_pairs: list[tuple[int, int]] | None = None) -> dict[str, Any] | None:
    """Collective: build the student (and teacher), resume, train with the loop, export.

    ``keep_sparsity`` (``healer.train.masks.sparsity_to_keep``): the input is a sparse prune whose zeros a
    mask keeps through every optimizer step (under ``cfg.lora``: the merge writes ``(W + dW) * mask``); the
    export is checked to still hold them. ``merge_dtype``: the dtype of the merged export under ``cfg.lora``.
    ``hidden_pairs``: the (student, teacher) hidden states KD also matches (``cpt.kd.hidden_weight``), the
    input's cut points.

    Returns the outputs the stage manifest records, or None when the run was preempted.
    """
    from healer.model.modeling import load_tokenizer
    from healer.train.data import build_loader
    from healer.train.engine import (
        batch_summary,
        build_ds_config,
        init_distributed,
        init_engine,
        make_optimizer,
        resolve_precision,
    )
    from healer.train.export import export_hf
    from healer.train.metrics import MetricsLogger, peak_flops, training_flops_per_token
    from healer.train.objectives import Distill, NextTokenCE
    from healer.train.schedule import stage_lr

    info = init_distributed()
    rank, world, device = info.rank, info.world_size, info.device
    stage_dir = Path(stage_dir)
    if opts.action == "train" and opts.resume == "auto" and finished(stage_dir, cfg.max_steps):
        if rank == 0:
            print(f"healer cpt: {stage_dir} is finished ({cfg.max_steps} steps, manifest.json); --resume none "
                  "trains again, a larger cpt.max_steps trains on", file=sys.stderr)
        return {"unchanged": True}
    check_resume(opts.resume, stage_dir)
    if rank == 0:  # work to do: the old "finished" must not outlive a run that stops half-way
        supersede_stage_manifest(stage_dir)
    seed = cfg.seed if cfg.seed is not None else 0
    precision = resolve_precision(cfg.precision, device)
    ds_config = build_ds_config(
        zero_stage=cfg.zero_stage, micro_batch_size=cfg.micro_batch_size, global_batch_size=cfg.global_batch_size,
        world_size=world, grad_clip=cfg.grad_clip, precision=precision, offload_optimizer=cfg.offload_optimizer,
        offload_params=cfg.offload_params, base=cfg.deepspeed_config, section="cpt")
    micro = ds_config["train_micro_batch_size_per_gpu"]
    zero_stage = ds_config["zero_optimization"]["stage"]  # a passed-through deepspeed_config may set it
    seed_everything(seed + rank)

    tokenizer = load_tokenizer(location)
    attn = attn_implementation(cfg.attn_implementation, device, precision)
    model, hf_ds = _load_student(location, attn, cfg, ds_config)
    balance = router_balance(cfg, model.config)  # refused for a dense student before the teacher loads
    n_params, n_matmul = _matmul_params(model)
    lora = cfg.lora is not None
    trainable = n_params
    frozen_head = 0  # matmul parameters of a frozen output head (no weight gradient in backward)
    if not cfg.train_embeddings and not lora:
        frozen_head = freeze_embeddings(model)
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    if lora:
        from healer.train.lora import attach

        seed_everything(seed)  # every rank builds the same adapter (ZeRO-3 keeps each rank's slice of its own)
        model = attach(model, cfg.lora, "cpt.lora.target_modules")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        seed_everything(seed + rank)
    optimizer = make_optimizer(model, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                               offload="offload_optimizer" in ds_config["zero_optimization"])
    engine = init_engine(model, ds_config, optimizer)
    constraints = _constraints(engine, keep_sparsity, lora)
    teacher = None
    if cfg.kd is not None and opts.action == "train" and teacher_location is None:
        raise ValueError("heal: cfg.kd is set (KD is on by default) but no teacher_location was given; pass the "
                         "teacher, or kd=None for plain CE")
    cache = (_open_cache(cfg, data_cfg, teacher_location, tokenizer, world, ds_config, model.config.vocab_size)
             if opts.action == "train" else None)
    reference_from_teacher = data_cfg.dynamic is not None and data_cfg.dynamic.reference == "teacher"
    if teacher_location is not None and (cache is None or cfg.stop_at_recovery is not None or reference_from_teacher):
        teacher = _teacher(teacher_location, attn, ds_config, device, model.config.vocab_size)
    del hf_ds  # later models (the export's rebuild) must not be partitioned

    batches = CorpusBatches(build_loader(data_cfg, tokenizer, rank=rank, world_size=world, micro_batch_size=micro,
                                         split="train"))
    if data_cfg.dynamic is not None:
        from healer.train.data.dynamic import DomainMixer, MixedBatches

        batches = MixedBatches(batches, DomainMixer(data_cfg.dynamic, batches.loader.entries))
    logger = MetricsLogger(None, cfg.max_steps, rank=rank, progress_bar=False)  # prints before the real one
    # a checkpoint of a run from another input model continues other weights, whatever the manifest would say
    settings = {**settings_of(cfg, data_cfg), "cpt.input": str(location)}
    progress = resume(engine, batches, stage_dir=stage_dir, how=opts.resume, settings=settings, force=opts.force,
                      frozen_base=lora, say=logger.write, constraints=constraints)
    if opts.action == "export":
        if progress.resumed_from is None:
            raise HealerError(f"healer cpt export: no complete checkpoint in {stage_dir / 'checkpoints'}")
        if lora:
            _export_lora(engine, stage_dir=stage_dir, hf_dir=hf_dir, location=location, tokenizer=tokenizer,
                         dtype=merge_dtype, keep_sparsity=keep_sparsity, rank=rank, say=logger.write)
        else:
            export_hf(engine.module, tokenizer, hf_dir)
        logger.write(f"healer cpt: exported step {progress.step} to {hf_dir}")
        return {"hf_dir": str(hf_dir), "steps": progress.step}

    seq_len = data_cfg.seq_len
    peak, device_name = peak_flops(device, precision)
    flops_per_token = training_flops_per_token(model.config, n_matmul, seq_len)
    if lora:  # a frozen weight's backward computes no weight gradient: 4 instead of 6 FLOPs per parameter
        flops_per_token -= 2.0 * n_matmul
    flops_per_token -= 2.0 * frozen_head
    logger = MetricsLogger(stage_dir / "tensorboard", cfg.max_steps, rank=rank, initial_step=progress.step,
                           desc="cpt", jsonl_path=stage_dir / "metrics.jsonl",
                           report_to=cfg.report_to, run_config=cfg.model_dump(mode="json"))
    lowered = f" (cpt.zero_stage {cfg.zero_stage}: one rank shards nothing)" if zero_stage < cfg.zero_stage else ""
    attn = getattr(model.config, "_attn_implementation", None) or attn  # what loading settled on (Gemma 2: eager)
    logger.write(f"healer cpt: {location} -> {stage_dir} | {n_params:,} parameters | ZeRO-{zero_stage}{lowered}"
                 f" | {precision} | {attn} | {world} ranks on {device_name}")
    logger.write("healer cpt: " + batch_summary(ds_config, world, seq_len)
                 + (f" | KD alpha={cfg.kd.alpha} T={cfg.kd.temperature} top_k={cfg.kd.top_k}" if cfg.kd else "")
                 + (f" from the logit cache {cfg.kd.cache} (no teacher loaded)" if cache is not None else "")
                 + (f" | LoRA r={cfg.lora.rank} alpha={cfg.lora.alpha} on {adapted_modules(model)}: {trainable:,} "
                    "trainable parameters" if lora else "")
                 + (f" | embeddings and output head frozen: {trainable:,} trainable parameters" if frozen_head else "")
                 + (f" hidden_weight={cfg.kd.hidden_weight} at cuts {hidden_pairs}" if hidden_pairs else
                    " (cpt.kd.hidden_weight is ignored: the input has no depth-prune cut points)"
                    if cfg.kd and cfg.kd.hidden_weight else ""))
    logger.text("config/ds_config", f"```\n{ds_config}\n```", progress.step)
    if peak is None:
        logger.write(f"healer cpt: MFU unknown on {device_name} (no known peak FLOP/s for it in {precision})")

    shown: list[str] = []
    mixing = batches.mixer if data_cfg.dynamic is not None else None
    if mixing is not None:
        from healer.train.data.dynamic import validation_of_domain

        def domain_loss(eng, domain: str) -> float:
            def make():
                return build_loader(validation_of_domain(data_cfg, domain), tokenizer, rank=rank, world_size=world,
                                    micro_batch_size=micro, split="validation")

            loss = evaluate(eng, make, cfg.eval_batches).get("val/loss")
            if loss is None:
                raise HealerError(f"data.dynamic: data.validation has no full {seq_len}-token block of domain "
                                  f"{domain!r} for every rank; give more held-out text of it")
            return loss

        if mixing.reference is None:
            if teacher is None:
                raise HealerError("data.dynamic.reference is `teacher` but no teacher is loaded; give cpt.kd.teacher "
                                  "(or model.source), or per-domain reference losses")
            mixing.measure_reference(lambda domain: domain_loss(teacher, domain))
        logger.write("healer cpt: data.dynamic every " f"{data_cfg.dynamic.every} steps, eta {data_cfg.dynamic.eta}; "
                     "reference loss " + ", ".join(f"{d} {v:.4f}" for d, v in mixing.reference.items())
                     + " | weights " + ", ".join(f"{n} {w:.3f}" for n, w in zip(mixing.names, mixing.weights)))
        if data_cfg.dynamic.every % cfg.log_every:
            logger.write(f"healer cpt: data.dynamic.every ({data_cfg.dynamic.every}) is not a multiple of "
                         f"cpt.log_every ({cfg.log_every}): updates at unlogged steps reach only the manifest")

    def step_scalars(step: int, seconds: float) -> dict[str, float]:
        n_skipped, examples = batches.skipped()
        for example in examples[len(shown):]:  # this rank's first few, once each
            logger.write(f"healer cpt: skipped a bad record: {example}")
        shown[:] = examples
        out = {"data/skipped_records": float(n_skipped)}
        if mixing is not None:
            out.update(batches.step(step, lambda domain: domain_loss(engine, domain)))
            engine.train()
        if peak is not None:
            out["perf/mfu"] = flops_per_token * ds_config["train_batch_size"] * seq_len / seconds / (peak * world)
        if step % SOURCE_STATS_EVERY == 0 or step == cfg.max_steps:
            out.update({f"data/tokens/{k}": v for k, v in batches.source_tokens().items()})
        return out

    evaluate_fn = None
    if data_cfg.validation:
        def make_val():
            return build_loader(data_cfg, tokenizer, rank=rank, world_size=world, micro_batch_size=micro,
                                split="validation")

        def evaluate_fn(eng):
            return evaluate(eng, make_val, cfg.eval_batches)

    stop_when = None
    if cfg.stop_at_recovery is not None:
        from healer.train.recovery import recovery_baseline, recovery_reached

        if evaluate_fn is None:
            raise HealerError("cpt.stop_at_recovery measures recovery on validation loss; give data.validation")
        baseline = recovery_baseline(stage_dir, fresh=progress.resumed_from is None, write=rank == 0,
                                     pruned_loss=lambda: evaluate_fn(engine)["val/loss"],
                                     dense_loss=lambda: evaluate_fn(teacher)["val/loss"])
        logger.write(f"healer cpt: stop at {cfg.stop_at_recovery:.0%} recovery of validation loss "
                     f"{baseline['pruned_val_loss']:.4f} (input) -> {baseline['dense_val_loss']:.4f} (dense)")
        stop_when = recovery_reached(baseline, cfg.stop_at_recovery)
    if cfg.kd is None or cache is not None:
        teacher = None  # it only measured the dense loss (recovery baseline, data.dynamic reference)
    objective = (Distill(teacher, alpha=cfg.kd.alpha, temperature=cfg.kd.temperature, top_k=cfg.kd.top_k,
                         hidden_pairs=hidden_pairs, hidden_weight=cfg.kd.hidden_weight, cached=cache is not None,
                         router_aux_loss_coef=balance)
                 if teacher is not None or cache is not None else NextTokenCE(router_aux_loss_coef=balance))
    train_batches = batches
    if cache is not None:
        from healer.train.logit_cache import CachedTeacherBatches

        train_batches = CachedTeacherBatches(batches, cache, first_step=progress.step,
                                             accumulation=ds_config["gradient_accumulation_steps"],
                                             global_batch=ds_config["train_batch_size"])
    lr_at = stage_lr(cfg, cfg.max_steps, section="cpt", say=logger.write)
    outcome = train(engine, objective, train_batches, lr_at=lr_at,
                    cadence=Cadence(cfg.max_steps, cfg.log_every, cfg.save_every, cfg.keep_last, cfg.eval_every),
                    progress=progress, stage_dir=stage_dir, settings=settings, logger=logger,
                    step_scalars=step_scalars, evaluate=evaluate_fn, constraints=constraints, stop_when=stop_when,
                    frozen_base=lora)
    logger.close()
    if mixing is not None and rank == 0:
        from healer.train.data.dynamic import plot_weights

        plot_weights(mixing, stage_dir / "domain_weights.png")
    if outcome.status == "preempted":
        return None
    adapter_dir = None
    if lora:
        adapter_dir = _export_lora(engine, stage_dir=stage_dir, hf_dir=hf_dir, location=location, tokenizer=tokenizer,
                                   dtype=merge_dtype, keep_sparsity=keep_sparsity, rank=rank, say=logger.write)
    else:
        export_hf(engine.module, tokenizer, hf_dir)
    sparsity = None
    if keep_sparsity is not None and rank == 0:
        from healer.train.masks import check_kept

        sparsity = check_kept(hf_dir, keep_sparsity, "cpt export")
    steady = outcome.step_times[1:] or outcome.step_times
    last = outcome.last
    return {
        "hf_dir": str(hf_dir), "checkpoints": str(stage_dir / "checkpoints"),
        "tensorboard": str(stage_dir / "tensorboard"), "steps": outcome.progress.step,
        "tokens_trained": outcome.progress.tokens_seen, "final_loss": last.get("train/loss"),
        "final_val_loss": last.get("val/loss"),
        "tokens_per_s": ds_config["train_batch_size"] * seq_len / (sum(steady) / len(steady)) if steady else None,
        "mfu": last.get("perf/mfu"), "device": device_name, "world_size": world, "zero_stage": zero_stage,
        "precision": precision, "parameters": n_params, "kd": cfg.kd.model_dump() if cfg.kd else None,
        "sparsity": sparsity, "trainable_parameters": trainable,
        "lora": cfg.lora.model_dump(mode="json") if lora else None,
        "adapter_dir": str(adapter_dir) if adapter_dir else None,
        "recovery": {"target": cfg.stop_at_recovery, **baseline, "reached": outcome.status == "reached",
                     "at_step": outcome.progress.step, "recovered": last.get("val/recovery")}
        if cfg.stop_at_recovery is not None else None,
        "mixture": mixing.summary() if mixing is not None else None,
        "data_exhausted": outcome.status == "exhausted", "forced_changes": outcome.progress.changed,
        "tokens_per_source": {k[len("data/tokens/"):]: int(v) for k, v in last.items() if k.startswith("data/tokens/")},
    }


"""``healer cpt``: continued pretraining of a (pruned) checkpoint under DeepSpeed ZeRO, with optional KD.

Run it under torchrun, the DeepSpeed launcher or srun (one process per device), or as
one plain process. It reads ``recipe.stage_input("cpt")`` and the ``data:`` stream and writes
``<stage_dir>/checkpoints`` (resumable), ``<stage_dir>/tensorboard``, ``<stage_dir>/metrics.jsonl``,
the Hugging Face export ``<stage_dir>/hf`` and, last, ``<stage_dir>/manifest.json``.

Verb arguments:
    --resume auto   (default) continue from the newest complete checkpoint, if any
    --resume none   start from the input model; existing checkpoints are moved aside, not deleted
    --resume DIR    continue from that checkpoint directory
    export          write the HF export from the newest checkpoint and stop (no training)
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from healer.errors import HealerError
from healer.train.checkpoint import (
    _fault,
    capture_rng,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from healer.train.config import CPTConfig
from healer.train.engine import (
    DistInfo,
    batch_summary,
    build_ds_config,
    init_distributed,
    init_engine,
    init_frozen_engine,
    make_optimizer,
    resolve_precision,
)
from healer.train.kd import distill_loss
from healer.train.metrics import (
    MetricsLogger,
    peak_flops,
    peak_memory_gib,
    training_flops_per_token,
)
from healer.train.schedule import make_lr_lambda
from healer.train.signals import PREEMPTED_EXIT_CODE, PreemptionWatcher

SOURCE_STATS_EVERY = 10  # steps between gathering every rank's per-source token counters


@dataclass
class RunOptions:
    resume: str = "auto"
    export_only: bool = False


def parse_args(args: list[str]) -> RunOptions:
    opts = RunOptions()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--resume":
            if i + 1 >= len(args):
                raise HealerError("--resume needs a value: auto, none or a checkpoint directory")
            opts.resume = args[i + 1]
            i += 2
            continue
        if arg.startswith("--resume="):
            opts.resume = arg.split("=", 1)[1]
        elif arg == "export":
            opts.export_only = True
        else:
            raise HealerError(f"healer cpt: unexpected argument {arg!r}; it takes --resume auto|none|DIR and `export`")
        i += 1
    return opts


def run_cpt_stage(recipe, args: list[str]) -> int:
    """The ``healer cpt`` verb."""
    from healer.manifest import write_stage_manifest

    opts = parse_args(args)
    cfg = recipe.cpt or CPTConfig()
    if recipe.data is None or not recipe.data.sources:
        raise HealerError("cpt needs a `data:` section with at least one source (data.sources: [{path: ...}])")
    from healer.modeling import resolve_source

    source = recipe.stage_input("cpt")
    same = source == recipe.model.source
    location = resolve_source(source, recipe.model.gguf_file if same else None, recipe.model.revision if same else None)
    teacher_location = None
    if cfg.kd is not None:
        teacher = cfg.kd.teacher or recipe.model.source
        same_t = teacher == recipe.model.source
        teacher_location = resolve_source(teacher, recipe.model.gguf_file if same_t else None,
                                          recipe.model.revision if same_t else None)
    from healer.train.data import build_loader

    stage_dir = recipe.stage_dir("cpt")
    result = train(cfg, recipe.data, location=location, teacher_location=teacher_location, stage_dir=stage_dir,
                   hf_dir=recipe.model_dir("cpt"), build_loader=build_loader, opts=opts)
    if result.preempted:
        return PREEMPTED_EXIT_CODE
    if result.rank == 0 and not opts.export_only:
        write_stage_manifest(stage_dir, "cpt", result.outputs)
    return 0


@dataclass
class TrainResult:
    rank: int
    preempted: bool
    outputs: dict[str, Any]


def _source_tokens(loader) -> dict[str, int]:
    """Tokens per corpus source summed over ranks (a collective)."""
    mine = dict(loader.stats().get("tokens", {})) if hasattr(loader, "stats") else {}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    total: dict[str, int] = {}
    for part in everyone:
        for k, v in part.items():
            total[k] = total.get(k, 0) + int(v)
    return total


def _skipped(loader) -> tuple[int, list[str]]:
    """This rank's count of skipped bad records, and where the first few were (file, line, why)."""
    if not hasattr(loader, "stats"):
        return 0, []
    stats = loader.stats()
    return int(sum(stats.get("skipped", {}).values())), list(stats.get("skipped_examples", []))


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


class _Batches:
    """Pulls micro-batches from the loader; under ``on_exhausted: stop`` all ranks agree when any runs dry,
    because a ZeRO forward on one rank without the others would hang."""

    def __init__(self, loader: Iterable, device: torch.device, must_agree: bool):
        self.loader = loader
        self.it = iter(loader)
        self.device = device
        self.must_agree = must_agree and dist.is_initialized() and dist.get_world_size() > 1

    def next(self) -> dict[str, torch.Tensor] | None:
        try:
            batch = next(self.it)
        except StopIteration:
            batch = None
        if self.must_agree:
            flag = torch.tensor([0.0 if batch is None else 1.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if flag.item() == 0:
                return None
        return batch


def _forward_loss(engine, teacher, batch: dict, device: torch.device, kd) -> tuple[torch.Tensor, ...]:
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    kwargs = {}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
    if kd is None:
        out = engine(input_ids=input_ids, labels=input_ids, use_cache=False, **kwargs)
        return (out.loss,)
    out = engine(input_ids=input_ids, use_cache=False, **kwargs)
    with torch.no_grad():
        t_logits = teacher(input_ids=input_ids, use_cache=False, **kwargs).logits
    return distill_loss(out.logits, t_logits, input_ids, alpha=kd.alpha, temperature=kd.temperature, top_k=kd.top_k)


@torch.no_grad()
def evaluate(engine, loader_factory: Callable[[], Iterable], device: torch.device, max_batches: int) -> float | None:
    """Mean validation loss over up to ``max_batches`` micro-batches per rank (all ranks stop together)."""
    loader = loader_factory()
    batches = _Batches(loader, device, must_agree=True)
    engine.eval()
    total = torch.zeros(2, device=device)
    for _ in range(max_batches):
        batch = batches.next()
        if batch is None:
            break
        ids = batch["input_ids"].to(device)
        out = engine(input_ids=ids, labels=ids, use_cache=False)
        total += torch.stack([out.loss.detach().float(), torch.ones((), device=device)])
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] > 0 else None


def _set_seed(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def attn_implementation(requested: str, device: torch.device, precision: str) -> str:
    """``auto`` -> flash_attention_2 where it can run (GPU, 16-bit, flash-attn installed), else sdpa."""
    if requested != "auto":
        return requested
    import importlib.util

    if device.type == "cuda" and precision in ("bf16", "fp16") and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def _load_student(location, attn: str, cfg: CPTConfig, ds_config: dict):
    from healer.modeling import load_model

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


def train(cfg: CPTConfig, data_cfg, *, location, teacher_location, stage_dir: str | Path, hf_dir: str | Path,
          build_loader: Callable, opts: RunOptions) -> TrainResult:
    """The training loop; every rank runs it. Returns the outputs the stage manifest records."""
    from healer.modeling import load_model, load_tokenizer

    info: DistInfo = init_distributed()
    rank, world, device = info.rank, info.world_size, info.device
    stage_dir = Path(stage_dir)
    ckpt_dir = stage_dir / "checkpoints"
    precision = resolve_precision(cfg.precision, device)
    ds_config = build_ds_config(
        zero_stage=cfg.zero_stage, micro_batch_size=cfg.micro_batch_size, global_batch_size=cfg.global_batch_size,
        world_size=world, grad_clip=cfg.grad_clip, precision=precision, offload_optimizer=cfg.offload_optimizer,
        offload_params=cfg.offload_params, base=cfg.deepspeed_config, section="cpt")
    micro = ds_config["train_micro_batch_size_per_gpu"]
    accum = ds_config["gradient_accumulation_steps"]

    if opts.resume == "none" and rank == 0 and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        aside = ckpt_dir.with_name(f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}")
        ckpt_dir.rename(aside)
        print(f"healer cpt: --resume none: moved the previous checkpoints to {aside}", file=sys.stderr)
    if dist.is_initialized():
        dist.barrier()
    resume_from = resolve_resume(opts.resume, ckpt_dir)

    _set_seed(cfg.seed + rank)
    tokenizer = load_tokenizer(location)
    attn = attn_implementation(cfg.attn_implementation, device, precision)
    model, hf_ds = _load_student(location, attn, cfg, ds_config)
    n_params, n_matmul = _matmul_params(model)
    offload = "offload_optimizer" in ds_config["zero_optimization"]
    optimizer = make_optimizer(model, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                               offload=offload)
    lr_lambda = make_lr_lambda(cfg.schedule, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
                               min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)
    engine = init_engine(model, ds_config, optimizer, lr_lambda)

    teacher = None
    if cfg.kd is not None and not opts.export_only:
        teacher_model = load_model(teacher_location, torch.float32, attn_implementation=attn)
        t_vocab = teacher_model.get_output_embeddings().weight
        t_vocab = getattr(t_vocab, "ds_shape", t_vocab.shape)[0]
        if t_vocab != model.config.vocab_size:
            raise HealerError(f"cpt.kd.teacher {teacher_location}: vocabulary {t_vocab} differs from the student's "
                              f"{model.config.vocab_size}; the teacher must share the student's tokenizer")
        teacher = init_frozen_engine(teacher_model, ds_config, device)
    del hf_ds  # later models (the export's rebuild) must not be partitioned

    loader = build_loader(data_cfg, tokenizer, rank=rank, world_size=world, micro_batch_size=micro, split="train")
    step, tokens_seen = 0, 0
    if resume_from is not None:
        state = load_checkpoint(engine, resume_from)
        step, tokens_seen = int(state["step"]), int(state["tokens"])
        if state.get("data") is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(state["data"])
        restore_rng(state["rng"])

    if opts.export_only:
        if resume_from is None:
            raise HealerError(f"healer cpt export: no complete checkpoint in {ckpt_dir}")
        from healer.train.export import export_hf

        export_hf(engine.module, tokenizer, hf_dir)
        return TrainResult(rank, False, {"hf_dir": str(hf_dir), "steps": step})

    seq_len = data_cfg.seq_len
    tokens_per_step = ds_config["train_batch_size"] * seq_len
    peak, device_name = peak_flops(device, precision)
    flops_per_token = training_flops_per_token(model.config, n_matmul, seq_len)
    logger = MetricsLogger(stage_dir / "tensorboard", cfg.max_steps, rank=rank, initial_step=step, desc="cpt",
                           jsonl_path=stage_dir / "metrics.jsonl")
    stage = ds_config["zero_optimization"]["stage"]
    logger.write(f"healer cpt: {location} -> {stage_dir} | {n_params:,} parameters | ZeRO-{stage}"
                 f" | {precision} | {attn} | {world} ranks on {device_name}")
    logger.write("healer cpt: " + batch_summary(ds_config, world, seq_len)
                 + (f" | KD alpha={cfg.kd.alpha} T={cfg.kd.temperature} top_k={cfg.kd.top_k}" if cfg.kd else ""))
    if resume_from is not None:
        logger.write(f"healer cpt: resumed from {resume_from} at step {step} ({tokens_seen:,} tokens)")
    logger.text("config/ds_config", f"```\n{ds_config}\n```", step)
    if peak is None:
        logger.write(f"healer cpt: MFU unknown on {device_name} (no known peak FLOP/s for it in {precision})")

    val_factory = None
    if data_cfg.validation:
        val_factory = lambda: build_loader(data_cfg, tokenizer, rank=rank, world_size=world,  # noqa: E731
                                           micro_batch_size=micro, split="validation")

    watcher = PreemptionWatcher()
    batches = _Batches(loader, device, must_agree=data_cfg.on_exhausted != "repeat")
    last: dict[str, float] = {}
    times: list[float] = []
    preempted = exhausted = False
    stats = torch.zeros(5, device=device)
    shown_skips: list[str] = []
    engine.train()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]  # the LR this step uses; engine.step() moves the schedule on
        stats.zero_()
        for _ in range(accum):
            batch = batches.next()
            if batch is None:
                exhausted = True
                break
            losses = _forward_loss(engine, teacher, batch, device, cfg.kd)
            engine.backward(losses[0])
            engine.step()
            for i, value in enumerate(losses):
                stats[i] += value.detach().float() / accum
        if exhausted:
            logger.write(f"healer cpt: the data stream ran out at step {step} "
                         f"(data.on_exhausted: {data_cfg.on_exhausted})")
            break
        step += 1
        tokens_seen += tokens_per_step
        _fault("kill_at_step", step)
        stats[3] = float(watcher.requested)
        n_skipped, examples = _skipped(loader)
        stats[4] = float(n_skipped)
        for example in examples[len(shown_skips):]:  # this rank's first few, once each
            logger.write(f"healer cpt: skipped a bad record: {example}")
        shown_skips = examples
        if dist.is_initialized():
            dist.all_reduce(stats)  # one collective: the mean losses, and whether any rank was told to stop
        loss, ce, kl, stop, skipped = stats.tolist()
        preempted = stop > 0
        dt = time.perf_counter() - t0
        times.append(dt)
        scalars = {"train/loss": loss / world, "train/lr": lr,
                   "train/grad_norm": engine.get_global_grad_norm(), "perf/tokens_per_s": tokens_per_step / dt,
                   "perf/step_time_s": dt, "data/tokens_seen": tokens_seen, "data/skipped_records": skipped,
                   "mem/peak_gib": peak_memory_gib(device)}
        if peak is not None:
            scalars["perf/mfu"] = flops_per_token * tokens_per_step / dt / (peak * world)
        if cfg.kd is not None:
            scalars.update({"train/ce": ce / world, "train/kl": kl / world})
        if step % SOURCE_STATS_EVERY == 0 or step == cfg.max_steps:
            scalars.update({f"data/tokens/{k}": v for k, v in _source_tokens(loader).items()})
        if val_factory is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            val = evaluate(engine, val_factory, device, cfg.eval_batches)
            if val is not None:
                scalars.update({"val/loss": val, "val/ppl": float(torch.tensor(val).exp())})
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            logger.log(step, scalars)
        last.update({k: float(v) for k, v in scalars.items() if v is not None})
        if step % cfg.save_every == 0 or step == cfg.max_steps or preempted:
            _save(engine, ckpt_dir, step, tokens_seen, loader, cfg.keep_last)
        if preempted:
            logger.write(f"healer cpt: preempted ({watcher.signal_name or 'signal on another rank'}); "
                         f"saved step {step}, exiting with {PREEMPTED_EXIT_CODE}")
            if rank == 0:
                _mark_preempted(stage_dir, step)
            logger.close()
            watcher.restore()
            return TrainResult(rank, True, {})
    watcher.restore()
    if exhausted and step > 0:
        _save(engine, ckpt_dir, step, tokens_seen, loader, cfg.keep_last)
    logger.close()

    from healer.train.export import export_hf

    export_hf(engine.module, tokenizer, hf_dir)
    steady = times[1:] or times
    outputs = {
        "hf_dir": str(hf_dir), "checkpoints": str(ckpt_dir), "tensorboard": str(stage_dir / "tensorboard"),
        "steps": step, "tokens_trained": tokens_seen, "final_loss": last.get("train/loss"),
        "final_val_loss": last.get("val/loss"), "tokens_per_s": tokens_per_step / (sum(steady) / len(steady))
        if steady else None, "mfu": last.get("perf/mfu"), "device": device_name, "world_size": world,
        "zero_stage": ds_config["zero_optimization"]["stage"], "precision": precision, "parameters": n_params,
        "kd": cfg.kd.model_dump() if cfg.kd else None, "data_exhausted": exhausted,
        "tokens_per_source": {k[len("data/tokens/"):]: v for k, v in last.items() if k.startswith("data/tokens/")},
    }
    if rank == 0:
        (stage_dir / "PREEMPTED").unlink(missing_ok=True)
    return TrainResult(rank, False, outputs)


def _save(engine, ckpt_dir: Path, step: int, tokens: int, loader, keep_last: int) -> None:
    state = {"step": step, "tokens": tokens, "rng": capture_rng(),
             "data": loader.state_dict() if hasattr(loader, "state_dict") else None}
    save_checkpoint(engine, ckpt_dir, step, state, keep_last=keep_last)


def _mark_preempted(stage_dir: Path, step: int) -> None:
    from healer.manifest import write_json_atomic

    # torchrun reports any non-zero worker exit as its own failure code; this file tells a requeue
    # script that the stop was a clean preemption, not a crash.
    write_json_atomic(stage_dir / "PREEMPTED", {"step": step, "exit_code": PREEMPTED_EXIT_CODE,
                                               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def main(argv: list[str] | None = None) -> int:
    """``python -m healer.train.cpt --config r.yaml ...``: the verb without the CLI dispatcher."""
    from healer.cli import main as cli_main

    return cli_main(["cpt", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

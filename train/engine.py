"""Process group, DeepSpeed config and engine creation, shared by CPT and SFT.

The same code runs under torchrun, the DeepSpeed launcher, srun, or as one plain
process; on a machine without a GPU it uses the gloo backend (``DS_ACCELERATOR=cpu``).

    dist = init_distributed()
    ds_config = build_ds_config(zero_stage=2, micro_batch_size=4, global_batch_size=64,
                                world_size=dist.world_size, grad_clip=1.0)
    optimizer = make_optimizer(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    engine = init_engine(model, ds_config, optimizer)  # the loop sets each step's LR: set_lr(engine, lr)
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from healer.core.errors import HealerError
from healer.train.rendezvous import master_port_for_job


def _presets() -> dict[str, Any]:
    """Preset name -> its JSON resource in the installed ``healer.configs`` package (``zero2`` -> zero2.json)."""
    folder = importlib.resources.files("healer.configs") / "deepspeed"
    return {f.name[: -len(".json")]: f for f in folder.iterdir() if f.name.endswith(".json")}


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host() -> str | None:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=20, check=True).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


# Names the port a lone process picked for itself. Its children inherit RANK/WORLD_SIZE/MASTER_PORT from it, and
# must not take them for a launcher's: the parent's store may still listen on that port.
LONE_PORT_VAR = "HEALER_LONE_MASTER_PORT"


def _fill_rank_env() -> bool:
    """Make RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* exist: from a launcher, from srun, or for one lone process.

    Returns True when the port is one this process picked for itself (a lone process), so it may pick another.
    """
    inherited_lone = os.environ.get(LONE_PORT_VAR) is not None and \
        os.environ.get(LONE_PORT_VAR) == os.environ.get("MASTER_PORT")
    if inherited_lone:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", LONE_PORT_VAR):
            os.environ.pop(key, None)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        return False
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        # srun started one task per rank: SLURM's variables are the only ones we get.
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        if int(os.environ["WORLD_SIZE"]) > 1 and "MASTER_ADDR" not in os.environ:
            host = _first_slurm_host()
            if host is None:
                raise HealerError("running under srun with several tasks but MASTER_ADDR is not set and "
                                  "`scontrol show hostnames $SLURM_JOB_NODELIST` failed; export MASTER_ADDR")
            os.environ["MASTER_ADDR"] = host
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(master_port_for_job(int(os.environ.get("SLURM_JOB_ID", "0"))))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        return False
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" in os.environ:
        return False
    _pick_lone_port()
    return True


def _pick_lone_port() -> None:
    os.environ["MASTER_PORT"] = os.environ[LONE_PORT_VAR] = str(_free_port())


def init_distributed(timeout_minutes: int = 30) -> DistInfo:
    """Join (or create) the process group and pick this rank's device.

    Uses NCCL when CUDA is available, gloo otherwise. Safe to call twice.
    """
    import datetime

    import deepspeed
    import torch.distributed as dist

    own_port = not dist.is_initialized() and _fill_rank_env()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    for attempt in range(5):
        if dist.is_initialized():
            break
        try:
            deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        except dist.DistNetworkError as err:
            # A free port is only free until someone binds it: another process on a busy machine can take the
            # port a lone process picked before its store listens on it. That process picks another.
            if not own_port or "EADDRINUSE" not in str(err) or attempt == 4:
                raise
            _pick_lone_port()
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a GPU that has it, fp32 elsewhere (CPU runs are exact in fp32)."""
    if precision != "auto":
        if precision in ("bf16", "fp16") and device.type == "cpu":
            raise HealerError(f"precision {precision} needs a GPU; on CPU use precision: fp32 (or auto)")
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def load_ds_json(source: str | Mapping[str, Any] | None) -> dict:
    """A DeepSpeed config given as a dict, a JSON file path, or a preset name (``zero2`` -> configs/deepspeed)."""
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    presets = _presets()
    path: Any = Path(source)
    if not path.is_file() and source in presets:
        path = presets[source]
    if not path.is_file():
        raise HealerError(f"deepspeed_config: {source} is neither a JSON file nor a preset "
                          f"({', '.join(sorted(presets))})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HealerError(f"deepspeed_config: {path} is not valid JSON ({err}); fix the file or name a preset "
                          f"({', '.join(sorted(presets))})") from None


def _setdefault_deep(tree: dict, defaults: Mapping[str, Any]) -> None:
    for key, value in defaults.items():
        if isinstance(value, Mapping) and isinstance(tree.get(key), dict):
            _setdefault_deep(tree[key], value)
        else:
            tree.setdefault(key, copy.deepcopy(value))


def build_ds_config(*, zero_stage: int, micro_batch_size: int, global_batch_size: int, world_size: int,
                    grad_clip: float = 1.0, precision: str = "fp32", offload_optimizer: bool = False,
                    offload_params: bool = False, base: str | Mapping[str, Any] | None = None,
                    section: str = "cpt") -> dict:
    """The DeepSpeed JSON for a run: ``base`` (passed through as is) plus the recipe's knobs for what it leaves out.

    On one rank ZeRO-1/2 run as stage 0 (plain data parallelism with nothing to shard), unless ``base`` names
    the stage. Gradient accumulation is derived as ``global_batch_size / (micro_batch_size * world_size)``; a global
    batch that does not divide is refused with the numbers, naming ``<section>.global_batch_size``.
    ``precision`` is already resolved (bf16, fp16 or fp32).
    """
    cfg = load_ds_json(base)
    ignored = [key for key in ("optimizer", "scheduler") if key in cfg]
    if ignored:  # healer builds AdamW itself and sets the LR every step: these would be dropped without a word
        raise HealerError(f"{section}.deepspeed_config: its {' and '.join(ignored)} section(s) would not be used "
                          f"(healer builds AdamW from {section}.lr, betas and weight_decay and sets the LR from "
                          f"{section}.schedule); remove them and set those keys")
    for key, value, name in (("train_micro_batch_size_per_gpu", micro_batch_size, "micro_batch_size"),
                             ("train_batch_size", global_batch_size, "global_batch_size")):
        if key in cfg and int(cfg[key]) != value:  # the manifest and the resume checks record the recipe's
            raise HealerError(f"{section}.deepspeed_config: {key}={cfg[key]} but {section}.{name}={value}; set the "
                              f"batch in one place: {section}.{name}")
    micro = int(cfg.get("train_micro_batch_size_per_gpu", micro_batch_size))
    total = int(cfg.get("train_batch_size", global_batch_size))
    if total % (micro * world_size):
        per_step = micro * world_size
        raise HealerError(
            f"{section}.global_batch_size={total} is not a multiple of micro_batch_size*world_size = "
            f"{micro}*{world_size} = {per_step}; pick e.g. {max(1, round(total / per_step)) * per_step}")
    accum = total // (micro * world_size)
    if "gradient_accumulation_steps" in cfg and int(cfg["gradient_accumulation_steps"]) != accum:
        raise HealerError(f"deepspeed_config: gradient_accumulation_steps={cfg['gradient_accumulation_steps']} "
                          f"disagrees with train_batch_size {total} / ({micro} micro * {world_size} ranks) = {accum}")
    if world_size == 1 and zero_stage in (1, 2) and not offload_optimizer:
        # One rank has nothing to shard: ZeRO-1/2 would only add a flat fp32 copy of the weights, gradient
        # buckets and the copies between them (bench/lean_step.py measures it). A stage named in ``base`` is kept.
        zero_stage = 0
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage >= 1:
        zero.update(overlap_comm=True, contiguous_gradients=True)
    if zero_stage == 3:
        # False: export.py gathers the weights itself, one parameter at a time; DeepSpeed need not gather a
        # full 16-bit copy of the model onto rank 0 at every checkpoint save.
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params:
        if zero_stage != 3:
            raise HealerError(f"{section}.offload_params needs {section}.zero_stage: 3 (got {zero_stage})")
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    defaults: dict[str, Any] = {
        "train_batch_size": total,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # we log ourselves, every step, on rank 0
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        defaults["bf16"] = {"enabled": True}
    elif precision == "fp16":
        defaults["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    _setdefault_deep(cfg, defaults)
    return cfg


def batch_summary(ds_config: Mapping[str, Any], world_size: int, seq_len: int | None = None) -> str:
    """One line a person reads to check the batch arithmetic."""
    micro = ds_config["train_micro_batch_size_per_gpu"]
    accum = ds_config["gradient_accumulation_steps"]
    total = ds_config["train_batch_size"]
    line = f"batch: {micro} micro x {accum} accumulation x {world_size} ranks = {total} sequences/step"
    if seq_len:
        line += f" = {total * seq_len:,} tokens/step"
    return line


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and norm weights (any parameter with fewer than 2 dims)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(model: torch.nn.Module, *, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                   weight_decay: float = 0.1, offload: bool = False) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters; DeepSpeed's CPU Adam when the optimizer state lives on the CPU."""
    groups = param_groups(model, weight_decay)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, weight_decay=weight_decay, adamw_mode=True)
    kwargs: dict[str, Any] = {}
    if next(model.parameters()).is_cuda:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, **kwargs)


def init_engine(model: torch.nn.Module, ds_config: dict, optimizer: torch.optim.Optimizer | None = None):
    """``deepspeed.initialize`` with our optimizer and no LR scheduler.

    The training loop sets each step's LR itself (``set_lr``) from the recipe's schedule, so no scheduler
    state goes into checkpoints and a resumed run follows the recipe it is resumed with.
    """
    import deepspeed
    import torch.distributed as dist

    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden:
        _setdefault_deep(ds_config, bucket_sizes(hidden))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if engine.zero_optimization_stage() == 0 and dist.get_world_size() == 1:
        # A world of one has nothing to all-reduce, but DeepSpeed would still flatten every gradient into a
        # bucket and copy it back at each step (one more copy of the gradients, and the time to make it).
        engine.enable_backward_allreduce = False
    return engine


def bucket_sizes(hidden_size: int) -> dict[str, Any]:
    """ZeRO communication buckets sized to the model, as transformers' DeepSpeed integration sizes "auto".

    DeepSpeed's defaults are 5e8 elements: 2 GB of fp32 per bucket whatever the model, most of a small
    model's memory. hidden_size² (16.8M elements for a 7B Llama, floored at 5M) keeps each collective large
    enough to be efficient. Stage 3's prefetch and persistence knobs keep DeepSpeed's defaults.
    """
    size = max(hidden_size * hidden_size, 5_000_000)
    return {"zero_optimization": {"reduce_bucket_size": size, "allgather_bucket_size": size}}


def set_lr(engine, lr: float) -> None:
    """The LR of every parameter group for the next optimizer step (ZeRO wrappers share the groups)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def init_frozen_engine(model: torch.nn.Module, ds_config: Mapping[str, Any], device: torch.device):
    """A forward-only engine for a frozen model (the KD teacher).

    Under ZeRO-3 its weights are partitioned across ranks like the student's; under stage 0-2 it is a plain
    replica on each device (those stages shard optimizer state, which a frozen model does not have).
    """
    import deepspeed

    model.requires_grad_(False)
    model.eval()
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    cfg: dict[str, Any] = {k: ds_config[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                      "gradient_accumulation_steps", "bf16", "fp16") if k in ds_config}
    cfg["steps_per_print"] = 10**9
    if stage == 3:
        zero = {"stage": 3, "stage3_param_persistence_threshold": 10_000}
        if "offload_param" in ds_config.get("zero_optimization", {}):
            zero["offload_param"] = ds_config["zero_optimization"]["offload_param"]
        cfg["zero_optimization"] = zero
        engine, *_ = deepspeed.initialize(model=model, config=cfg)
        engine.eval()
        return engine
    if "bf16" in cfg and cfg["bf16"].get("enabled"):
        model.to(torch.bfloat16)
    elif "fp16" in cfg and cfg["fp16"].get("enabled"):
        model.to(torch.float16)
    return model.to(device)

"""Weights and Adam state of a DeepSpeed checkpoint, whole per parameter, for a resume on another layout.

DeepSpeed's own route (``ds_to_universal`` then ``checkpoint.load_universal``) writes a converted copy of
the checkpoint to disk and only loads into ZeRO-1/2/3 engines; healer runs one rank with ZeRO-1/2 as stage
0 (plain AdamW, :func:`healer.train.engine.build_ds_config`), whose checkpoint holds the optimizer's own
``state_dict`` and which ``load_universal`` cannot fill. So healer does the same thing in memory:

* :func:`consolidate` reads every rank's shards (memory-mapped) and gives, per trainable parameter name,
  how to build its whole fp32 master weight and its ``exp_avg`` / ``exp_avg_sq``, plus Adam's step count.
  The shard layout is undone as DeepSpeed's ``zero_to_fp32`` undoes it (its own lazy helper for ZeRO-3, the
  same walk over each group for ZeRO-1/2), applied to the moments as to the weights, one parameter at a
  time: ``zero_to_fp32`` itself joins every group whole, three times (weights and two moments).
* :func:`load_whole` puts them into a freshly built engine of any stage: stage 0 sets the parameter and
  the AdamW state; ZeRO-1/2/3 set each rank's fragment with ``safe_set_full_fp32_param`` and
  ``safe_set_full_optimizer_state`` and the (16-bit or fp32) model weights from the same values. Each
  tensor is built when it is set and dropped after, so the peak is the engine plus about one parameter.

fp32 runs continue bit for bit up to the order in which gradients are summed (ranks vs accumulation).
Every ``*_states.pt`` is read with ``weights_only=True`` and DeepSpeed's allowlist (:mod:`healer.train.safe_load`).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from healer.core.errors import HealerError

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class Whole:
    """A checkpoint's trainable parameters, whole, built one tensor at a time.

    ``params``: per trainable parameter name (in the optimizer's order), per kind (``"fp32"``, ``"exp_avg"``,
    ``"exp_avg_sq"``), a function that builds that whole tensor from the memory-mapped shards when called;
    ``shapes``: each parameter's shape, known without building anything. Loading builds, sets and drops one
    tensor at a time, so an elastic resume holds one parameter's whole copy beside the engine, not three whole
    copies of the model (a 7B model's 84 GB of fp32 weights and moments, on every rank of a node).
    """

    params: dict[str, dict[str, Callable[[], torch.Tensor]]]
    shapes: dict[str, tuple[int, ...]]
    step: int


@contextlib.contextmanager
def _quiet():
    """zero_to_fp32 prints its progress (and tqdm bars) for a command-line user; here it is one step of many."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _load(path: Path) -> dict:
    from healer.train.safe_load import load_states

    return load_states(path, map_location="cpu", mmap=True)


def _step(state: dict) -> int:
    value = state["step"]
    return int(value.item() if torch.is_tensor(value) else value)


class _Joined:
    """The concatenation of ``parts`` (1-D tensors, e.g. every rank's partition of a flat group), sliced
    without building it: ZeRO-1/2 lay a group's parameters end to end over the ranks' partitions in order."""

    def __init__(self, parts: list[torch.Tensor]):
        self.parts = parts
        self.starts = [0]
        for part in parts:
            self.starts.append(self.starts[-1] + part.numel())

    def numel(self) -> int:
        return self.starts[-1]

    def slice(self, start: int, length: int) -> torch.Tensor:
        end, pieces = start + length, []
        for part, lo, hi in zip(self.parts, self.starts, self.starts[1:]):
            if lo < end and start < hi:
                pieces.append(part[max(start, lo) - lo: min(end, hi) - lo])
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()


def _zero12_slices(parts_per_rank: list[list[torch.Tensor]], shapes: list[dict], paddings, world: int
                   ) -> dict[str, Callable[[], torch.Tensor]]:
    """Per parameter name, a function building it from every rank's flat partitions (one list per rank, one
    tensor per group), walking each group as DeepSpeed's ``zero_to_fp32`` does: parameters end to end in
    ``param_shapes`` order, each followed by its alignment padding, the group's end aligned to 2 x ranks."""
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for g, group_shapes in enumerate(shapes):
        joined = _Joined([rank_parts[g] for rank_parts in parts_per_rank])
        pads = paddings[g] if paddings is not None else [0] * len(group_shapes)
        if len(pads) != len(group_shapes):
            raise ValueError(f"{len(pads)} alignment paddings for the {len(group_shapes)} parameters of group {g}")
        offset = 0
        for (name, shape), pad in zip(group_shapes.items(), pads):
            numel = math.prod(shape)
            out[name] = lambda joined=joined, offset=offset, numel=numel, shape=tuple(shape): joined.slice(
                offset, numel).view(shape)
            offset += numel + pad
        align = 2 * world
        if math.ceil(offset / align) != math.ceil(joined.numel() / align):
            raise ValueError(f"group {g}: its parameters take {offset} numbers of its {joined.numel()}")
    return out


def consolidate(path: str | Path, order: list[str]) -> Whole:
    """The whole fp32 weights and Adam moments of the DeepSpeed checkpoint directory ``path``, built lazily.

    ``order``: the trainable parameter names in the optimizer's order (``engine.param_groups`` order), which
    a stage-0 checkpoint needs (its AdamW state is keyed by position).
    """
    path = Path(path)
    optim_files = sorted(path.glob("*_optim_states.pt"))
    if not optim_files:
        return _consolidate_stage0(path, order)
    if any(f.name.startswith("bf16_") for f in optim_files):
        raise HealerError(f"checkpoint {path} was written by DeepSpeed's bf16 optimizer without ZeRO; it cannot be "
                          "resumed on another number of ranks. Resume with the ranks it was written with")
    from deepspeed.utils import zero_to_fp32 as z

    def by_rank(f: Path) -> int:
        return int(f.name.split("_pp_rank_")[1].split("_")[0])

    optim_files = sorted(optim_files, key=by_rank)
    with _quiet():  # zero_to_fp32 prints its progress
        models = z.parse_model_states(z.get_model_state_files(str(path)))
    shards = [_load(f)["optimizer_state_dict"] for f in optim_files]
    stage, world = shards[0]["zero_stage"], shards[0]["partition_count"]
    world = max(world) if isinstance(world, list) else world
    if world != len(shards):
        raise HealerError(f"checkpoint {path} holds {len(shards)} optimizer shard(s) for {world} ranks; resume "
                          "from a complete checkpoint")
    flats: dict[str, list] = {}
    builders: dict[str, dict[str, Callable[[], torch.Tensor]]] = {}
    if stage <= 2:
        flats["fp32"] = [s["single_partition_of_fp32_groups"] for s in shards]
        for key in MOMENTS:
            flats[key] = [[_group_state(s, g)[key][: len(s["single_partition_of_fp32_groups"][g])]
                           for g in range(len(s["single_partition_of_fp32_groups"]))] for s in shards]
        step = _step(_group_state(shards[0], 0))
        paddings = shards[0].get("param_alignment_paddings")
        for kind, parts in flats.items():
            builders[kind] = _zero12_slices(parts, models[0].param_shapes, paddings, world)
    else:
        flats["fp32"] = [list(s["fp32_flat_groups"]) for s in shards]  # per rank, one flat tensor per sub-group
        inner = [s["optimizer_state_dict"]["state"] for s in shards]
        for key in MOMENTS:
            flats[key] = [[st[i][key] for i in sorted(st)] for st in inner]
        step = _step(inner[0][min(inner[0])])
        for kind, parts in flats.items():
            with _quiet():  # DeepSpeed's GatheredTensor: joins one parameter's fragments when asked
                lazy = z._get_fp32_state_dict_from_zero3_checkpoint(world, parts, models, True)
            builders[kind] = {name: tensor.contiguous for name, tensor in lazy.items()}
    shapes = {name: tuple(shape) for group in models[0].param_shapes for name, shape in group.items()}
    for alias, target in models[0].shared_params:  # tied weights, as zero_to_fp32 recovers them
        for table in (shapes, *builders.values()):
            if target in table:
                table.setdefault(alias, table[target])
    missing = [n for n in order if n not in builders["fp32"]]
    if missing:
        raise HealerError(f"checkpoint {path} has no weights for {missing[:3]} (of {len(missing)}); it was written "
                          "for another model. Resume from a checkpoint of this run or start over (--resume none)")
    return Whole({n: {k: builders[k][n] for k in builders} for n in order}, {n: shapes[n] for n in order}, step)


def _group_state(shard: dict, group: int) -> dict:
    """The inner optimizer's state of flat group ``group`` (a list when DeepSpeed's elastic_checkpoint is on)."""
    base = shard["base_optimizer_state"]
    return base[group] if isinstance(base, list) else base["state"][group]


def _consolidate_stage0(path: Path, order: list[str]) -> Whole:
    files = sorted(path.glob("mp_rank_*_model_states.pt"))
    if len(files) != 1:
        raise HealerError(f"checkpoint {path}: expected one mp_rank_*_model_states.pt, found {len(files)}; resume "
                          "from a complete checkpoint")
    sd = _load(files[0])
    opt, module = sd.get("optimizer"), sd["module"]
    if not isinstance(opt, dict) or "state" not in opt or "param_groups" not in opt:
        raise HealerError(f"checkpoint {path} holds no plain optimizer state (a 16-bit run without ZeRO); it cannot "
                          "be resumed on another number of ranks. Resume with the ranks it was written with")
    index = [i for group in opt["param_groups"] for i in group["params"]]
    if len(index) != len(order):
        raise HealerError(f"checkpoint {path} has {len(index)} trained tensors, this model {len(order)}; it was "
                          "written for another model. Resume from a checkpoint of this run or start over")
    params, shapes, step = {}, {}, 0
    for i, name in zip(index, order):
        weight, state = module[name], opt["state"].get(i)
        shapes[name] = tuple(weight.shape)
        if state is None:  # never stepped: Adam starts from zeros
            zeros = lambda weight=weight: torch.zeros_like(weight, dtype=torch.float32)  # noqa: E731
            params[name] = {"fp32": lambda weight=weight: weight.float(), "exp_avg": zeros, "exp_avg_sq": zeros}
            continue
        step = max(step, _step(state))
        # memory-mapped: each tensor is read from the file when it is copied into the engine
        params[name] = {"fp32": lambda weight=weight: weight.float(),
                        **{k: lambda state=state, k=k: state[k] for k in MOMENTS}}
    return Whole(params, shapes, step)


def trainable_order(module: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters in the order ``make_optimizer`` gives them to AdamW."""
    from healer.train.engine import param_groups

    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in param_groups(module, 0.0) for p in group["params"]]


def load_whole(engine, whole: Whole) -> None:
    """Collective: set ``engine``'s weights, Adam moments and step from ``whole`` (any ZeRO stage)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    stage = engine.zero_optimization_stage()
    named = dict(engine.module.named_parameters())
    for name, saved in whole.shapes.items():  # before anything is set: a refusal leaves the engine as it was
        shape = tuple(getattr(named[name], "ds_shape", named[name].shape))
        if tuple(saved) != shape:
            raise HealerError(f"the checkpoint's {name} has shape {tuple(saved)}, this model's {shape}: it was "
                              "written for another model. Resume from a checkpoint of this run or start over "
                              "(--resume none)")
    optimizer = engine.optimizer
    if stage == 0 and not isinstance(optimizer, torch.optim.Optimizer):
        # DeepSpeed's bf16/fp16 optimizer without ZeRO keeps its own fp32 copies: not handled (nor testable on CPU)
        raise HealerError(f"an elastic resume into a {type(optimizer).__name__} engine (16-bit without ZeRO) is not "
                          "supported; name the ZeRO stage in deepspeed_config (e.g. the zero2 preset) so one rank "
                          "keeps it, or resume on the ranks the checkpoint was written with")
    if stage > 0:  # AdamW makes its state at the first step; the moments must have a place before
        flats = optimizer.fp32_partitioned_groups_flat if stage == 3 else optimizer.single_partition_of_fp32_groups
        for flat in flats:
            if not optimizer.optimizer.state[flat]:
                optimizer.optimizer.state[flat] = {"step": _step_tensor(optimizer.optimizer, 0, flat),
                                                   **{k: torch.zeros_like(flat) for k in MOMENTS}}
    for name, build in whole.params.items():  # one whole tensor at a time, dropped once it is set
        p = named[name]
        if stage == 0:
            with torch.no_grad():
                p.copy_(build["fp32"]())
            optimizer.state[p] = {"step": _step_tensor(optimizer, whole.step, p),
                                  **{k: build[k]().to(p.device, copy=True) for k in MOMENTS}}
            continue
        fp32 = build["fp32"]().to(engine.device)
        safe_set_full_fp32_param(p, fp32)
        for key in MOMENTS:
            if stage == 3:
                safe_set_full_optimizer_state(p, build[key]().to(engine.device), key)
            else:
                _set_zero12_moment(optimizer, p, build[key]().to(engine.device), key)
        if stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                p.copy_(fp32)
        else:
            with torch.no_grad():
                p.copy_(fp32)
        del fp32
    if stage > 0:  # the inner AdamW steps flat partitions; their step counts are Adam's bias correction
        for flat, state in optimizer.optimizer.state.items():
            if "step" in state:
                state["step"] = _step_tensor(optimizer.optimizer, whole.step, flat) if torch.is_tensor(
                    state["step"]) else whole.step
    engine.global_steps = whole.step


def _set_zero12_moment(optimizer, p: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
    """This rank's fragment of ``p``'s Adam moment ``key`` under ZeRO-1/2.

    ``safe_set_full_optimizer_state`` needs DeepSpeed's links to the optimizer state, which (0.19) exist only
    after a step, and then only for the first parameter group; the fragment addresses are there from the start.
    """
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:  # none of this parameter lives in this rank's partition
        return
    flat = optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
    hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
    mine = value.flatten().narrow(0, lp.start, lp.numel)
    optimizer.optimizer.state[flat][key].narrow(0, hp.start, hp.numel).copy_(mine)


def _step_tensor(optimizer: torch.optim.Optimizer, step: int, param: torch.Tensor) -> torch.Tensor:
    """Adam's step count as torch keeps it: on the parameter's device for the fused/capturable kernels."""
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    return torch.tensor(float(step), dtype=torch.float32, device=param.device if on_device else "cpu")

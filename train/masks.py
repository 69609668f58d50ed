"""Healing that keeps a sparse prune's zeros: a mask re-applied after every optimizer step.

The optimizer would otherwise fill pruned weights back in within one step. DeepSpeed holds each weight
twice -- the fp32 master the optimizer updates and the module parameter the forward reads -- so both are
multiplied by the mask:

* ZeRO 0 without mixed precision: the module parameter is the master.
* ZeRO 1/2 (and the bf16 optimizer): every rank has the whole module parameter; the master is a flat fp32
  partition of which this rank owns a fragment of each parameter (``param._hp_mapping``).
* ZeRO 3: each rank holds one flat partition of the module parameter (``param.ds_tensor``) and the same slice
  of the fp32 master; the mask is kept partitioned the same way, so no rank ever holds a whole layer's mask.

The mask is taken from the weights themselves when healing starts (the pruned checkpoint's zeros), saved in
every checkpoint (packed 8 weights to a byte, per rank) and restored from it on resume, so a resumed run
keeps exactly the mask it started with.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from healer.core.errors import HealerError

MASK_PREFIX = "sparsity_mask."
WHOLE = "whole:"  # key prefix of a ZeRO-3 persistent parameter's whole mask, beside its partition's


def projection_pattern(layers: list[str] | None, arch) -> re.Pattern:
    """The parameter names of the pruned block projections (``layers`` are roles, None = all seven)."""
    from healer.prune.sparse import select_layers

    paths = select_layers(arch, layers).values()
    # Module names may carry wrappers' prefixes (PEFT's base_model.model., DeepSpeed's module.).
    return re.compile(rf"(^|\.){re.escape(arch.blocks)}\.\d+\.({'|'.join(re.escape(p) for p in paths)})"
                      rf"(\.base_layer)?\.weight$")


def _local(param: nn.Parameter) -> tuple[str, torch.Tensor | None, torch.Tensor | None]:
    """(kind, module tensor to mask, fp32 master slice to mask) as this rank holds them.

    The master slice is a view for ZeRO 1/2; for ZeRO 3 it is read through DeepSpeed's local API (and written
    back by :meth:`SparsityMask.apply`).
    """
    if hasattr(param, "ds_id"):  # ZeRO-3: partitioned
        from deepspeed.utils import safe_get_local_fp32_param

        return "zero3", param.ds_tensor.data.view(-1), safe_get_local_fp32_param(param)
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:
        return "fragment", param.data, mapping.get_hp_fragment()
    return "plain", param.data, None


class SparsityMask:
    """Keeps every weight of the pruned projections that is zero when healing starts at zero.

    Built on the DeepSpeed engine (or a plain module) before the first step: ``mask = (weight != 0)`` for
    each parameter whose name ``pattern`` matches, in the layout this rank holds (see the module docstring).
    ``apply(engine)`` after each optimizer step; ``state_dict()`` / ``load_state_dict()`` for checkpoints.
    """

    name = "sparsity_mask"

    def __init__(self, model: nn.Module, pattern: re.Pattern):
        self.params: dict[str, nn.Parameter] = {n: p for n, p in model.named_parameters()
                                                if pattern.search(n) and p.requires_grad}
        if not self.params:
            raise HealerError("sparsity mask: the model has no trainable projection weights to keep sparse (were "
                              "they frozen, or renamed by a wrapper?)")
        self.masks: dict[str, torch.Tensor] = {}
        for name, param in self.params.items():
            kind, module_t, master = _local(param)
            if kind == "plain" and param.dtype != torch.float32:
                raise HealerError(f"sparsity mask: {name} is {param.dtype} without a ZeRO optimizer, whose fp32 "
                                  "copy the mask cannot reach; use zero_stage 1-3 or bf16 precision")
            # The master is what the optimizer updates; under ZeRO-3 it is also the only local copy in fp32.
            source = master if kind == "zero3" else module_t
            self.masks[name] = (source != 0).reshape(-1 if kind == "zero3" else source.shape)
            if kind == "zero3" and getattr(param, "ds_persist", False):
                # A persistent parameter (below stage3_param_persistence_threshold): after each step DeepSpeed
                # gathers it whole into param.data on every rank, and the forward reads that copy, so it needs
                # its whole mask too. Such parameters are small by definition. (Collective: every rank builds.)
                import deepspeed

                with deepspeed.zero.GatheredParameters([param]):
                    self.masks[WHOLE + name] = param.data != 0

    @torch.no_grad()
    def apply(self, engine) -> None:
        """Zero the masked weights in the fp32 master and in the module parameters (this rank's share)."""
        for name, param in self.params.items():
            mask = self.masks[name]
            kind, module_t, master = _local(param)
            if kind == "zero3":
                from deepspeed.utils import safe_set_local_fp32_param

                safe_set_local_fp32_param(param, master * mask.to(master.device))
                module_t.mul_(mask.to(module_t.device, module_t.dtype))
                whole = self.masks.get(WHOLE + name)
                if whole is not None and param.data.numel() == param.ds_numel:
                    param.data.mul_(whole.to(param.device, param.dtype))
                continue
            module_t.mul_(mask.to(module_t.device, module_t.dtype))
            if kind == "fragment":  # the master may live elsewhere (offload_optimizer: CPU)
                address = param._hp_mapping.lp_fragment_address
                master.mul_(mask.view(-1).narrow(0, address.start, address.numel).to(master.device, master.dtype))

    def kept_zeros(self) -> int:
        """Masked weights in this rank's share (a ZeRO-3 partition's padding counts as masked)."""
        return sum(int((~m).sum()) for name, m in self.masks.items() if not name.startswith(WHOLE))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's masks, 8 weights to a byte, for the checkpoint."""
        out = {}
        for name, mask in self.masks.items():
            out[MASK_PREFIX + name] = pack_bits(mask)
            out[MASK_PREFIX + name + ".shape"] = torch.tensor(list(mask.shape), dtype=torch.int64)
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor] | None, where: str | Path) -> None:
        """Take the masks of a checkpoint (``where`` names it in errors); they must cover the same weights.

        ``tensors`` is None for a checkpoint saved without constraints: refused, since the pruned weights of a
        run that did not keep them are no longer zero and nothing says which they were.
        """
        if tensors is None:
            raise HealerError(f"checkpoint {where} holds no sparsity mask (it was saved by a run that did not keep "
                              "one); resuming from it could not tell which weights were pruned: start over "
                              "(--resume none)")
        names = {k[len(MASK_PREFIX):-len(".shape")] for k in tensors if k.startswith(MASK_PREFIX)
                 and k.endswith(".shape")}
        if names != set(self.masks):
            odd = sorted(names ^ set(self.masks))[:3]
            raise HealerError(f"checkpoint {where}: its sparsity masks cover other weights than this model's pruned "
                              f"projections (e.g. {odd}); resume from a checkpoint of this run, or start over "
                              "(--resume none)")
        for name in list(self.masks):
            shape = tuple(tensors[MASK_PREFIX + name + ".shape"].tolist())
            if shape != tuple(self.masks[name].shape):
                raise HealerError(f"checkpoint {where}: the sparsity mask of {name} is {shape}, this rank holds "
                                  f"{tuple(self.masks[name].shape)} (another ZeRO stage or number of ranks?)")
            self.masks[name] = unpack_bits(tensors[MASK_PREFIX + name], shape).to(self.masks[name].device)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 entries to a byte (a 7B model's masks: under 1 GB instead of 7)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8).cpu()


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of :func:`pack_bits`."""
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    bits = (packed.view(-1, 1) & weights) != 0
    numel = 1
    for dim in shape:
        numel *= dim
    return bits.view(-1)[:numel].view(shape)


# -- which stages keep a mask, and the checks after them -------------------------------------------------

def sparsity_to_keep(recipe, source: str) -> dict | None:
    """The sparse prune a training stage's input ``source`` carries: ``{"pattern", "ratio", "layers", "zeros"}``.

    Read from ``source/prune_report.json`` when the input is a sparse prune's directory, else from the recipe's
    ``prune:`` section when the input descends from it (a cpt export feeding sft); None for a dense input.
    """
    from healer.core.manifest import read_json_report

    report = read_json_report(Path(source) / "prune_report.json")
    upstream = recipe is not None and recipe.prune is not None and source != recipe.model.source
    if report is None and upstream:
        report = read_json_report(recipe.stage_dir("prune") / "prune_report.json")
        if report is None and recipe.prune.method == "sparse":  # its report is gone: the recipe still says
            sp = recipe.prune.sparsity
            return {"pattern": sp.pattern, "ratio": sp.ratio, "layers": sp.layers, "zeros": None}
    if not report or report.get("method") != "sparse":
        return None
    return {"pattern": report.get("pattern"), "ratio": report.get("ratio"), "layers": report.get("layers_pruned"),
            "zeros": (report.get("sparsity") or {}).get("zeros")}


def check_kept(model_dir: str | Path, keep: dict, what: str) -> dict:
    """After healing: the saved model must hold at least the pruned zeros, in the pruned pattern; else raise.

    ``keep``: :func:`sparsity_to_keep`'s dict. ``what`` names the directory in the error. Returns the
    ``verify_sparsity`` summary without the per-layer table, for the stage manifest.
    """
    from healer.core.errors import VerificationError
    from healer.prune.sparse import verify_sparsity

    found = verify_sparsity(model_dir, keep["pattern"], keep["ratio"], layers=keep["layers"])["sparsity"]
    if not found["pattern_holds"] or (keep.get("zeros") is not None and found["zeros"] < keep["zeros"]):
        raise VerificationError(f"{what} {model_dir}: the healed weights lost the sparsity ({found['zeros']:,} zeros, "
                                f"{keep.get('zeros')} pruned; {'; '.join(found['problems'][:2])})")
    return {k: v for k, v in found.items() if k != "per_layer"} | {"pattern": keep["pattern"],
                                                                    "pruned_zeros": keep.get("zeros")}


@torch.no_grad()
def mask_merged(merged: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """LoRA's merge under a mask: ``W <- (W + dW) * mask`` for each masked weight; returns the zeros restored.

    ``masks``: parameter name (in ``merged``) -> bool tensor, True where the weight stays, taken from the base
    weights before merging (:func:`masks_of`).
    """
    params = dict(merged.named_parameters())
    restored = 0
    for name, mask in masks.items():
        weight = params[name]
        restored += int(((weight != 0) & ~mask).sum())
        weight.mul_(mask.to(weight.dtype))
    return restored


def masks_of(model: nn.Module, keep: dict) -> dict[str, torch.Tensor]:
    """``weight != 0`` for every pruned projection of a plain (unwrapped, unpartitioned) model, by name."""
    from healer.model.adapter import architecture_for

    pattern = projection_pattern(keep["layers"], architecture_for(model.config))
    return {name: p.detach() != 0 for name, p in model.named_parameters() if pattern.search(name)}

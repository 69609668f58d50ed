"""Mixture-of-experts blocks: where a block's router and experts are, what one expert computes, and removing
whole experts.

transformers 5 writes every MoE family here (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE) the same way: the block's
``mlp`` holds a router ``gate`` (``weight`` ``[E, H]``, attributes ``num_experts`` and ``top_k``) and the experts
``experts`` as fused 3-D parameters (``gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``) whose forward is
``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``. Qwen2-MoE's shared expert sits beside them
as a plain MLP and is never removed.
"""

from __future__ import annotations

import torch
from torch import nn

from healer.core.errors import UnsupportedArchitecture
from healer.model.adapter import Architecture, get_module

ROUTER, EXPERTS = "gate", "experts"


def moe_parts(arch: Architecture, block: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(router, experts) of ``block``'s MLP; None for a dense MLP (a dense family, or Qwen-MoE's
    ``mlp_only_layers``)."""
    if not arch.moe:
        return None
    mlp = get_module(block, arch.mlp)
    router, experts = getattr(mlp, ROUTER, None), getattr(mlp, EXPERTS, None)
    if router is None or not isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter):
        return None
    return router, experts


def experts_of(arch: Architecture, block: nn.Module, index: int) -> tuple[nn.Module, nn.Module]:
    """:func:`moe_parts` of block ``index``; ValueError for a block with a dense MLP."""
    parts = moe_parts(arch, block)
    if parts is None:
        raise ValueError(f"block {index} has no experts")
    return parts


def expert_output(experts: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
    """What expert ``index`` adds for ``hidden`` ``[T, H]`` before its routing weight: down(act(gate x) * up x)."""
    gate, up = nn.functional.linear(hidden, experts.gate_up_proj[index]).chunk(2, dim=-1)
    return nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[index])


def num_experts(config) -> int:
    """Experts per MoE block (``num_experts``; Mixtral's ``num_local_experts`` answers to it too)."""
    return int(getattr(config, "num_experts", None) or config.num_local_experts)


def keep_experts(arch: Architecture, blocks: nn.ModuleList, config, keep_per_block: dict[int, torch.Tensor]) -> None:
    """Keep the listed experts of each MoE block (ascending indices), slicing the router's rows with them.

    Every MoE block keeps the same number (``num_experts`` is one number in the config); the number kept must
    be at least ``num_experts_per_tok``, or the router could not pick that many.
    """
    total = num_experts(config)
    counts = {len(k) for k in keep_per_block.values()}
    if len(counts) != 1:
        raise ValueError("every MoE block must keep the same number of experts: num_experts is one number")
    kept = counts.pop()
    top_k = int(config.num_experts_per_tok)
    if not top_k <= kept <= total:
        raise ValueError(f"keeping {kept} experts per block: it must be between num_experts_per_tok ({top_k}) and "
                         f"num_experts ({total})")
    for index, keep in keep_per_block.items():
        keep = torch.sort(keep).values
        for module in experts_of(arch, blocks[index], index):
            # Every tensor of the router and of the experts is indexed by expert first.
            for name, param in list(module.named_parameters(recurse=False)):
                if param.shape[0] != total:
                    raise ValueError(f"block {index}: {type(module).__name__}.{name} {tuple(param.shape)} is not "
                                     f"indexed by expert ({total} first)")
                setattr(module, name, nn.Parameter(param.data.index_select(0, keep.to(param.device)).contiguous(),
                                                   requires_grad=param.requires_grad))
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None and buffer.dim() and buffer.shape[0] == total:
                    setattr(module, name, buffer.index_select(0, keep.to(buffer.device)).contiguous())
            module.num_experts = kept
    config.num_experts = kept


def check_all_blocks_have_experts(arch: Architecture, config) -> None:
    """Refuse expert pruning of a dense family, or of an MoE model some of whose blocks have a dense MLP (one
    score list per block, one expert count for all)."""
    if not arch.moe:
        raise UnsupportedArchitecture(f"{arch.family}: prune.target experts needs a mixture-of-experts model; this "
                                      "family's MLPs are dense (prune them with target: mlp)")
    step, only = getattr(config, "decoder_sparse_step", 1), getattr(config, "mlp_only_layers", None) or []
    if step != 1 or only:
        raise UnsupportedArchitecture(f"{arch.family}: some blocks have a dense MLP (decoder_sparse_step {step}, "
                                      f"mlp_only_layers {list(only)}); expert pruning needs experts in every block")


def expert_width_key(config) -> str:
    """The config key of every expert's intermediate width: ``moe_intermediate_size`` (Qwen-MoE), else
    ``intermediate_size`` (Mixtral, OLMoE)."""
    return "moe_intermediate_size" if getattr(config, "moe_intermediate_size", None) else "intermediate_size"


def expert_mlp_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detached gate ``[E, I, H]``, up ``[E, I, H]`` and down ``[E, H, I]`` of a block's fused experts."""
    gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)
    return gate, up, experts.down_proj.detach()


def shrink_experts(arch: Architecture, blocks: nn.ModuleList, config, keep_per_block: list[torch.Tensor]) -> None:
    """Keep the given intermediate neurons of every expert (``[E, k]`` indices per MoE block): each expert's gate/up
    rows and down columns. Every expert of the model keeps the same width (one number in the config)."""
    widths = {k.shape[-1] for k in keep_per_block}
    if len(widths) != 1:
        raise ValueError("every expert must keep the same number of neurons: the experts' width is one number")
    kept = widths.pop()
    key = expert_width_key(config)
    width = getattr(config, key)
    for index, (block, keep) in enumerate(zip(blocks, keep_per_block)):
        experts = experts_of(arch, block, index)[1]
        keep = torch.sort(keep.to(experts.gate_up_proj.device), dim=-1).values
        rows = torch.cat([keep, keep + width], dim=-1)  # gate rows [0, I), up rows [I, 2I)
        hidden = experts.gate_up_proj.shape[-1]
        gate_up = torch.gather(experts.gate_up_proj.data, 1, rows[..., None].expand(-1, -1, hidden))
        down = torch.gather(experts.down_proj.data, 2, keep[:, None, :].expand(-1, hidden, -1))
        experts.gate_up_proj = nn.Parameter(gate_up.contiguous(), requires_grad=experts.gate_up_proj.requires_grad)
        experts.down_proj = nn.Parameter(down.contiguous(), requires_grad=experts.down_proj.requires_grad)
        if hasattr(experts, "intermediate_dim"):
            experts.intermediate_dim = kept
    setattr(config, key, kept)

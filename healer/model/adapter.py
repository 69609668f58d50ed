"""The one place that knows where things live inside a decoder-only model.

Surgery and scoring never spell ``model.model.layers`` or ``mlp.gate_proj``; they ask an
:class:`Architecture`. Adding a family that follows the same block layout is one entry in
:data:`ARCHITECTURES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from healer.core.errors import UnsupportedArchitecture


@dataclass(frozen=True)
class Architecture:
    """Attribute paths of one model family, relative to the ``*ForCausalLM`` module."""

    family: str
    blocks: str = "model.layers"
    embed_tokens: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"
    lm_head: str = "lm_head"
    attention: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    mlp: str = "mlp"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    # Config lists with one entry per block (sliced when blocks are removed).
    per_layer_config_lists: tuple[str, ...] = ("layer_types", "no_rope_layers")


# Llama, Mistral, Qwen2 and Qwen3 share the block layout; Qwen3's per-head q_norm/k_norm act on
# head_dim and so survive head removal untouched.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama"),
    "mistral": Architecture("mistral"),
    "qwen2": Architecture("qwen2"),
    "qwen3": Architecture("qwen3"),
}


def architecture_for(config) -> Architecture:
    """The :class:`Architecture` of a transformers config; refuses unknown families before any work."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnsupportedArchitecture(
            f"model family {model_type!r} is not supported by healer's architecture adapter "
            f"(supported: {', '.join(sorted(ARCHITECTURES))}); add an entry to ARCHITECTURES in "
            "healer/model/adapter.py if its blocks follow the Llama layout"
        )
    return arch


def get_module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def attention_projections(arch: Architecture, block: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """q, k, v, o of one block (a block of a whole model, or one read alone from disk)."""
    attn = get_module(block, arch.attention)
    return (get_module(attn, arch.q_proj), get_module(attn, arch.k_proj), get_module(attn, arch.v_proj),
            get_module(attn, arch.o_proj))


def mlp_projections(arch: Architecture, block: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """gate, up, down of one block's GLU MLP."""
    mlp = get_module(block, arch.mlp)
    return get_module(mlp, arch.gate_proj), get_module(mlp, arch.up_proj), get_module(mlp, arch.down_proj)


class ModelAdapter:
    """A model plus its :class:`Architecture`: typed accessors for blocks, projections and head counts."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.arch = architecture_for(model.config)

    # -- structure --------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return get_module(self.model, self.arch.blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def attention_projections(self, block: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        return attention_projections(self.arch, block)

    def mlp_projections(self, block: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return mlp_projections(self.arch, block)

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    # -- depth surgery -----------------------------------------------------------------------------
    def remove_blocks(self, drop: list[int]) -> list[str]:
        """Remove blocks in place and rewrite the config to match. Returns the config keys edited."""
        n = self.num_blocks
        keep = [i for i in range(n) if i not in set(drop)]
        if not keep:
            raise ValueError("cannot remove every block")
        blocks = self.blocks
        new_blocks = nn.ModuleList([blocks[i] for i in keep])
        for new_idx, block in enumerate(new_blocks):
            # The KV cache is indexed by layer_idx; a stale index breaks generation after pruning.
            for module in block.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_idx
        parent_path, _, attr = self.arch.blocks.rpartition(".")
        setattr(get_module(self.model, parent_path), attr, new_blocks)

        edited = ["num_hidden_layers"]
        self.config.num_hidden_layers = len(keep)
        for key in self._per_layer_lists(n):
            setattr(self.config, key, [getattr(self.config, key)[i] for i in keep])
            edited.append(key)
        mwl = getattr(self.config, "max_window_layers", None)
        if isinstance(mwl, int) and mwl < n:
            # Qwen2: blocks below max_window_layers use full attention; count the survivors.
            self.config.max_window_layers = sum(1 for i in keep if i < mwl)
            edited.append("max_window_layers")
        inner = get_module(self.model, self.arch.blocks.rpartition(".")[0])
        if hasattr(inner, "has_sliding_layers") and getattr(self.config, "layer_types", None):
            inner.has_sliding_layers = "sliding_attention" in self.config.layer_types
        return edited

    def _per_layer_lists(self, n: int) -> list[str]:
        keys = []
        for key in self.arch.per_layer_config_lists:
            value = getattr(self.config, key, None)
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or len(value) != n:
                raise ValueError(f"config.{key} should list one entry per block ({n}), got {value!r}")
            keys.append(key)
        return keys

    # -- width surgery -----------------------------------------------------------------------------
    def shrink_mlp(self, keep_per_block: list[torch.Tensor]) -> None:
        """Keep the given intermediate neurons in every block (gate/up rows and down columns together)."""
        widths = {len(k) for k in keep_per_block}
        if len(widths) != 1:
            raise ValueError("every block must keep the same number of neurons: intermediate_size is one number")
        for block, keep in zip(self.blocks, keep_per_block):
            gate, up, down = self.mlp_projections(block)
            _keep_rows(gate, keep)
            _keep_rows(up, keep)
            _keep_cols(down, keep)
        self.config.intermediate_size = widths.pop()

    def shrink_attention(self, keep_groups_per_block: list[torch.Tensor]) -> None:
        """Keep the given key-value groups (and all their query heads) in every block; GQA stays valid."""
        counts = {len(g) for g in keep_groups_per_block}
        if len(counts) != 1:
            raise ValueError("every block must keep the same number of KV groups: the head count is one number")
        head_dim, group = self.head_dim, self.num_heads // self.num_kv_heads
        for block, groups in zip(self.blocks, keep_groups_per_block):
            groups = torch.sort(groups).values
            kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
            q_heads = (groups[:, None] * group + torch.arange(group)).flatten()
            q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
            q, k, v, o = self.attention_projections(block)
            _keep_rows(q, q_rows)
            _keep_rows(k, kv_rows)
            _keep_rows(v, kv_rows)
            _keep_cols(o, q_rows)
        kept = counts.pop()
        self.config.head_dim = head_dim  # no longer hidden_size // num_attention_heads
        self.config.num_key_value_heads = kept
        self.config.num_attention_heads = kept * group


def _keep_rows(linear: nn.Linear, idx: torch.Tensor) -> None:
    idx = idx.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(0, idx).contiguous())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data.index_select(0, idx).contiguous())
    linear.out_features = len(idx)


def _keep_cols(linear: nn.Linear, idx: torch.Tensor) -> None:
    idx = idx.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(1, idx).contiguous())
    linear.in_features = len(idx)

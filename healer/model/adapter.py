"""The one place that knows where things live inside a decoder-only model.

Surgery and scoring never spell ``model.model.layers`` or ``mlp.gate_proj``; they ask an
:class:`Architecture`. A family is one entry in :data:`ARCHITECTURES`: its attribute paths, whether it fuses
q/k/v or gate/up into one matrix (Phi-3), and whether its q/k norms span all heads (OLMo 2). What differs
between families outside the block's weights (embedding scale, norms placed after a sublayer, soft-capped
logits, per-layer attention kinds) lives in the families' own modules and configs, which healer runs as they are.
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
    # One matrix whose rows are q, then k, then v (Phi-3's ``qkv_proj``); None: three projections.
    qkv_proj: str | None = None
    # One matrix whose rows are gate, then up (Phi-3's ``gate_up_proj``); None: two projections.
    gate_up_proj: str | None = None
    # q_norm/k_norm normalise the concatenation of all heads (OLMo 2, OLMo 3, OLMoE): removing a head rescales the
    # others, so head pruning is refused. Per-head norms (Qwen3, Gemma 3) act on head_dim and are left as they are.
    qk_norm_spans_heads: bool = False
    # Mixture of experts: the MLP is a router (``mlp.gate``) and fused experts (``mlp.experts``), as transformers 5
    # writes every MoE family (see healer/model/experts.py).
    moe: bool = False
    # Config lists with one entry per block (sliced when blocks are removed).
    per_layer_config_lists: tuple[str, ...] = ("layer_types", "no_rope_layers")


# Every family here runs its blocks as ``block(hidden, attention_mask=, position_embeddings=, ...)`` and its
# model forward adds nothing between blocks (Gemma's embedding scale is inside its embedding module), which is
# what block-by-block scoring relies on.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama"),
    "mistral": Architecture("mistral"),
    "qwen2": Architecture("qwen2"),
    "qwen3": Architecture("qwen3"),
    "smollm3": Architecture("smollm3"),
    "gemma2": Architecture("gemma2"),
    "gemma3_text": Architecture("gemma3_text"),
    "phi3": Architecture("phi3", qkv_proj="qkv_proj", gate_up_proj="gate_up_proj"),
    "olmo2": Architecture("olmo2", qk_norm_spans_heads=True),
    "olmo3": Architecture("olmo3", qk_norm_spans_heads=True),
    "qwen3_moe": Architecture("qwen3_moe", moe=True),
    "qwen2_moe": Architecture("qwen2_moe", moe=True),  # its shared expert is an MLP beside the experts, kept whole
    "mixtral": Architecture("mixtral", moe=True),
    "olmoe": Architecture("olmoe", moe=True, qk_norm_spans_heads=True),
}


def architecture_for(config) -> Architecture:
    """The :class:`Architecture` of a transformers config; refuses unknown families before any work."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnsupportedArchitecture(
            f"model family {model_type!r} is not supported by healer's architecture adapter "
            f"(supported: {', '.join(sorted(ARCHITECTURES))}); convert the checkpoint to one of these or add "
            "an entry to ARCHITECTURES in healer/model/adapter.py"
        )
    return arch


def get_module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def attention_output(arch: Architecture, block: nn.Module) -> nn.Linear:
    """The attention's output projection (its input is the heads side by side, ``[..., heads * head_dim]``)."""
    return get_module(get_module(block, arch.attention), arch.o_proj)


def mlp_output(arch: Architecture, block: nn.Module) -> nn.Linear:
    """The MLP's down projection (its input is ``act(gate x) * up x``, one column per intermediate neuron)."""
    return get_module(get_module(block, arch.mlp), arch.down_proj)


def mlp_weights(arch: Architecture, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detached gate, up and down weights of one block's GLU MLP (views into a fused gate|up matrix)."""
    refuse_moe_mlp(arch, "MLP width pruning")
    mlp = get_module(block, arch.mlp)
    down = get_module(mlp, arch.down_proj).weight.detach()
    if arch.gate_up_proj:
        gate, up = get_module(mlp, arch.gate_up_proj).weight.detach().chunk(2, dim=0)
        return gate, up, down
    return get_module(mlp, arch.gate_proj).weight.detach(), get_module(mlp, arch.up_proj).weight.detach(), down


def refuse_moe_mlp(arch: Architecture, what: str) -> None:
    """Raise for work on a dense MLP's projections when the family's MLPs are mixtures of experts."""
    if arch.moe:
        raise UnsupportedArchitecture(
            f"{arch.family}: {what} of mixture-of-experts MLPs is not supported; prune whole experts "
            "(prune.method: width, criterion: frequency or reap), the experts' width (criterion: maw or l2), blocks "
            "(method: depth) or attention heads (criterion: head_norm)")


def projection_paths(arch: Architecture) -> dict[str, str]:
    """Every linear projection of a block, by role name (``q_proj`` ... ``down_proj``; ``qkv_proj`` and
    ``gate_up_proj`` where the family fuses them), as a path inside the block."""
    refuse_moe_mlp(arch, "sparse pruning")
    roles = ("qkv_proj",) if arch.qkv_proj else ("q_proj", "k_proj", "v_proj")
    attn = {role: getattr(arch, role) for role in (*roles, "o_proj")}
    roles = ("gate_up_proj",) if arch.gate_up_proj else ("gate_proj", "up_proj")
    mlp = {role: getattr(arch, role) for role in (*roles, "down_proj")}
    return ({role: f"{arch.attention}.{path}" for role, path in attn.items()}
            | {role: f"{arch.mlp}.{path}" for role, path in mlp.items()})


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
        edited += self._renumber_dense_mlp_layers(n, keep)
        return edited

    def _renumber_dense_mlp_layers(self, n: int, keep: list[int]) -> list[str]:
        """Qwen-MoE: which blocks have a dense MLP is ``mlp_only_layers`` plus every block whose number is not a
        multiple of ``decoder_sparse_step``; both count positions, so the survivors are listed explicitly."""
        step, only = getattr(self.config, "decoder_sparse_step", None), getattr(self.config, "mlp_only_layers", None)
        if not self.arch.moe or not isinstance(step, int) or only is None:
            return []
        dense = [new for new, old in enumerate(keep) if old in only or (old + 1) % step != 0]
        if step == 1 and list(only) == dense:
            return []
        self.config.decoder_sparse_step, self.config.mlp_only_layers = 1, dense
        return ["decoder_sparse_step", "mlp_only_layers"]

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
        refuse_moe_mlp(self.arch, "MLP width pruning")
        widths = {len(k) for k in keep_per_block}
        if len(widths) != 1:
            raise ValueError("every block must keep the same number of neurons: intermediate_size is one number")
        width = self.config.intermediate_size
        for block, keep in zip(self.blocks, keep_per_block):
            mlp = get_module(block, self.arch.mlp)
            if self.arch.gate_up_proj:  # rows [0, I) gate, [I, 2I) up
                _keep_rows(get_module(mlp, self.arch.gate_up_proj), torch.cat([keep, keep + width]))
            else:
                _keep_rows(get_module(mlp, self.arch.gate_proj), keep)
                _keep_rows(get_module(mlp, self.arch.up_proj), keep)
            _keep_cols(get_module(mlp, self.arch.down_proj), keep)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = len(keep)
        self.config.intermediate_size = widths.pop()

    def shrink_attention(self, keep_groups_per_block: list[torch.Tensor]) -> None:
        """Keep the given key-value groups (and all their query heads) in every block; GQA stays valid."""
        refuse_head_pruning(self.arch)
        counts = {len(g) for g in keep_groups_per_block}
        if len(counts) != 1:
            raise ValueError("every block must keep the same number of KV groups: the head count is one number")
        head_dim, group = self.head_dim, self.num_heads // self.num_kv_heads
        q_width, kv_width = self.num_heads * head_dim, self.num_kv_heads * head_dim
        kept = counts.pop()
        for block, groups in zip(self.blocks, keep_groups_per_block):
            groups = torch.sort(groups).values
            kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
            q_heads = (groups[:, None] * group + torch.arange(group)).flatten()
            q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
            attn = get_module(block, self.arch.attention)
            if self.arch.qkv_proj:  # rows: q [0, q_width), k [q_width, +kv_width), v after
                _keep_rows(get_module(attn, self.arch.qkv_proj),
                           torch.cat([q_rows, q_width + kv_rows, q_width + kv_width + kv_rows]))
            else:
                _keep_rows(get_module(attn, self.arch.q_proj), q_rows)
                _keep_rows(get_module(attn, self.arch.k_proj), kv_rows)
                _keep_rows(get_module(attn, self.arch.v_proj), kv_rows)
            _keep_cols(get_module(attn, self.arch.o_proj), q_rows)
            # Some families keep the counts on the module and split their fused rows by them (Phi-3).
            for name, value in (("num_heads", kept * group), ("num_attention_heads", kept * group),
                                ("num_key_value_heads", kept)):
                if isinstance(getattr(attn, name, None), int):
                    setattr(attn, name, value)
        self.config.head_dim = head_dim  # no longer hidden_size // num_attention_heads
        self.config.num_key_value_heads = kept
        self.config.num_attention_heads = kept * group


def refuse_head_pruning(arch: Architecture) -> None:
    """Raise for a family whose attention heads cannot be removed exactly.

    OLMo 2, OLMo 3 and OLMoE RMS-normalise the queries and keys of all heads together: removing a head changes
    the scale of every other head's query at every token, which no edit of the kept weights undoes.
    """
    if arch.qk_norm_spans_heads:
        raise UnsupportedArchitecture(
            f"{arch.family}: attention heads cannot be pruned (its q/k norms span all heads, so removing one "
            "rescales the others at every token); prune the MLPs (prune.target: mlp), blocks (method: depth) or "
            "weights (method: sparse) instead")


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

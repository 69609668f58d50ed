"""Width pruning: score GLU MLP neurons and attention key-value groups, keep the best in every block.

Every criterion has the signature ``(stack, tokens, progress)`` and returns one tensor per block with
one score per unit (neuron or key-value group), higher = more important. The kept count is the same in
every block so ``intermediate_size`` and the head counts stay single numbers in ``config.json``.
They are listed in :data:`healer.prune.criteria.CRITERIA`.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from healer.model.adapter import attention_output, mlp_output, mlp_weights
from healer.model.experts import expert_mlp_weights, moe_parts
from healer.prune.blockwise import BlockStack
from healer.prune.depth import _boundary_walk

# What the deploy kernels need of a pruned width (the GLU intermediate size is ffn_down's row length):
# llama.cpp's k-quants (Q2_K..Q6_K, IQ*) quantise rows in super-blocks of QK_K = 256 and fall back to a
# 32-block type (Q5_0, Q5_1, Q8_0, IQ4_NL) for a tensor whose rows are not a multiple of 256; the 32-block
# types themselves need 32, below which llama-quantize refuses the tensor. Marlin (vLLM's GPTQ/AWQ kernel)
# tiles K in 128 and N in 64, and AWQ/GPTQ quantise in groups of 128.
KERNEL_MULTIPLES = (32, 64, 128, 256)
KQUANT_BLOCK = 256
GGUF_BLOCK = 32
MARLIN_K = 128


def width_divisibility(widths: dict[str, int]) -> dict[str, dict]:
    """Each named width -> its value and whether it divides by 32, 64, 128 and 256 (what the kernels need)."""
    return {name: {"value": value, "divisible_by": {str(m): value % m == 0 for m in KERNEL_MULTIPLES}}
            for name, value in widths.items()}


def kernel_warnings(intermediate_size: int) -> list[str]:
    """What a pruned MLP width of ``intermediate_size`` costs at deployment; [] when every kernel takes it."""
    out = []
    if intermediate_size % GGUF_BLOCK:
        out.append(f"intermediate_size {intermediate_size} is not a multiple of {GGUF_BLOCK}: llama.cpp cannot "
                   "quantise ffn_down (q8_0, q4_0 and every k-quant need it); set prune.round_to 256")
    elif intermediate_size % KQUANT_BLOCK:
        out.append(f"intermediate_size {intermediate_size} is not a multiple of {KQUANT_BLOCK}: llama.cpp's "
                   "k-quants (Q4_K_M etc.) cannot quantise ffn_down and llama-quantize falls back to a 32-block "
                   "type (Q5_0/Q5_1/Q8_0/IQ4_NL) for it; set prune.round_to 256")
    if intermediate_size % MARLIN_K:
        out.append(f"intermediate_size {intermediate_size} is not a multiple of {MARLIN_K}: vLLM's Marlin "
                   "kernels and AWQ/GPTQ group size 128 cannot take down_proj")
    return out


def kept_width(total: int, ratio: float, multiple: int) -> int:
    """Neurons kept when removing ``ratio`` of ``total``, rounded to a multiple of ``multiple``."""
    keep = round(total * (1.0 - ratio) / multiple) * multiple
    keep = min(keep, total)
    if keep <= 0:
        raise ValueError(
            f"prune.ratio {ratio} leaves {total * (1 - ratio):.1f} of {total} neurons, which rounds to 0 at "
            f"prune.round_to {multiple}; lower the ratio or round_to"
        )
    if keep == total:
        raise ValueError(
            f"prune.ratio {ratio} of {total} neurons rounds to removing none at prune.round_to {multiple}; "
            "raise the ratio or lower round_to"
        )
    return keep


def kept_groups(total: int, ratio: float, unit: str = "key-value groups") -> int:
    keep = round(total * (1.0 - ratio))
    if keep <= 0:
        raise ValueError(f"prune.ratio {ratio} would remove all {total} {unit}; lower the ratio")
    if keep == total:
        raise ValueError(f"prune.ratio {ratio} of {total} {unit} rounds to removing none; raise the ratio")
    return keep


def _glu_weights(arch, block) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate ``[..., I, H]``, up ``[..., I, H]``, down ``[..., H, I]`` of a block's MLP; ``...`` is the experts of an
    MoE block (``[E]``), nothing for a dense one."""
    parts = moe_parts(arch, block)
    return expert_mlp_weights(parts[1]) if parts is not None else mlp_weights(arch, block)


def maw_scores(stack: BlockStack, tokens: torch.Tensor | None, progress: bool = True) -> list[torch.Tensor]:
    """max(w) + |min(w)| of each gate row plus the same of each up row (the pruned Llama-3.2 method, no data);
    ``[E, I]`` per MoE block (each expert's neurons)."""
    out = []
    for _, block in tqdm(stack.blocks(), total=stack.num_blocks, desc="maw", disable=not progress):
        gate, up, _ = _glu_weights(stack.arch, block)
        g, u = gate.float(), up.float()
        out.append(g.amax(-1) + g.amin(-1).abs() + u.amax(-1) + u.amin(-1).abs())
    return out


def l2_scores(stack: BlockStack, tokens: torch.Tensor | None, progress: bool = True) -> list[torch.Tensor]:
    """L2 norm of everything a neuron owns: its gate row, up row and down column (no data); ``[E, I]`` per MoE
    block."""
    out = []
    for _, block in tqdm(stack.blocks(), total=stack.num_blocks, desc="l2", disable=not progress):
        gate, up, down = _glu_weights(stack.arch, block)
        sq = gate.float().pow(2).sum(-1) + up.float().pow(2).sum(-1) + down.float().pow(2).sum(-2)
        out.append(sq.sqrt())
    return out


def activation_scores(stack: BlockStack, tokens: torch.Tensor, progress: bool = True) -> list[torch.Tensor]:
    """Minitron-style: mean |act(gate x) * up x| of each intermediate neuron over calibration tokens.

    Block by block: only one block and the calibration activations are resident.
    """
    sums = [torch.zeros(0)] * stack.num_blocks
    counts = [0] * stack.num_blocks

    def watch(i, block):
        def hook(module, args):
            x = args[0].detach().float()  # the down projection's input: act(gate x) * up x
            s = x.abs().reshape(-1, x.shape[-1]).sum(0)
            sums[i] = s if counts[i] == 0 else sums[i] + s
            counts[i] += x.shape[0] * x.shape[1]

        down = mlp_output(stack.arch, block)
        return [down.register_forward_pre_hook(hook)]

    _boundary_walk(stack, tokens, _ignore, progress, "mlp activations", watch=watch)
    return [s / n for s, n in zip(sums, counts)]


def head_output_scores(stack: BlockStack, tokens: torch.Tensor, progress: bool = True) -> list[torch.Tensor]:
    """Per key-value group: the summed mean norm of what each of its query heads adds to the residual
    stream (the head's slice of the o_proj input times its o_proj columns), on calibration data."""
    config = stack.config
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    group = num_heads // num_kv_heads
    sums = [torch.zeros(num_kv_heads) for _ in range(stack.num_blocks)]
    counts = [0] * stack.num_blocks

    def watch(i, block):
        def hook(module, args):
            x = args[0].detach().float()  # [batch, seq, heads * head_dim]
            w = module.weight.detach().float()  # [hidden, heads * head_dim]
            per_head = torch.stack([
                (x[..., h * head_dim:(h + 1) * head_dim] @ w[:, h * head_dim:(h + 1) * head_dim].T).norm(dim=-1).sum()
                for h in range(num_heads)
            ])
            sums[i] += per_head.view(num_kv_heads, group).sum(1)
            counts[i] += x.shape[0] * x.shape[1]

        o_proj = attention_output(stack.arch, block)
        return [o_proj.register_forward_pre_hook(hook)]

    _boundary_walk(stack, tokens, _ignore, progress, "head output norms", watch=watch)
    return [s / n for s, n in zip(sums, counts)]


def _ignore(*_args) -> None:
    pass


def top_indices(scores: list[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """Per block (and per expert, for ``[E, I]`` scores), the ``keep`` highest-scoring indices, in ascending order
    (original layout preserved)."""
    return [torch.sort(torch.topk(s, keep, dim=-1).indices, dim=-1).values for s in scores]


def describe(scores: list[torch.Tensor], kept: list[torch.Tensor]) -> dict:
    """What the report records: per-block kept indices are implied by removed ones, which are fewer (per expert,
    a list of lists, for the experts of an MoE block)."""
    removed = []
    for s, k in zip(scores, kept):
        mask = torch.ones(s.shape, dtype=torch.bool)
        mask.scatter_(-1, k, False)
        removed.append([torch.nonzero(row).flatten().tolist() for row in mask] if mask.dim() == 2
                       else torch.nonzero(mask).flatten().tolist())
    return {"removed_per_block": removed,
            "score_summary": [{"min": float(s.min()), "mean": float(s.mean()), "max": float(s.max())} for s in scores]}

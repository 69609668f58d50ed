"""Expert scores for ``prune.target: experts``: one score per expert of every MoE block, HIGHER = kept.

Both run the calibration text through the model one block at a time and watch each block's experts module,
which receives the tokens, the experts the router picked for them and the routing weights:

- ``frequency``: the share of the block's tokens routed to the expert (top-k picks counted once each).
- ``reap``: REAP's router-weighted expert activation (Lasby et al., 2025): over the tokens routed to the
  expert, the mean of its routing weight times the norm of its output, ``mean g_e(x) * ||f_e(x)||``. An expert
  the router never picks scores 0 under both.
"""

from __future__ import annotations

import torch

from healer.model.experts import expert_output, experts_of, num_experts
from healer.prune.blockwise import BlockStack
from healer.prune.depth import _boundary_walk


def _routed(args, kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [T, H], top-k expert ids [T, k], routing weights [T, k]) of one call of an experts module."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args):]]
    return values[0].detach(), values[1].detach(), values[2].detach()


def _walk_experts(stack: BlockStack, tokens: torch.Tensor, progress: bool, desc: str, per_call) -> list[torch.Tensor]:
    """Run ``per_call(experts, hidden, ids, weights, sums, counts)`` on every call of every block's experts and
    return ``sums / counts`` per block (0 where an expert saw no token)."""
    total = num_experts(stack.config)
    sums = [torch.zeros(total, dtype=torch.float64) for _ in range(stack.num_blocks)]
    counts = [torch.zeros(total, dtype=torch.float64) for _ in range(stack.num_blocks)]

    def watch(i, block):
        def hook(module, args, kwargs, output):
            hidden, ids, weights = _routed(args, kwargs)
            per_call(module, hidden, ids, weights, sums[i], counts[i])

        return [experts_of(stack.arch, block, i)[1].register_forward_hook(hook, with_kwargs=True)]

    _boundary_walk(stack, tokens, lambda *_: None, progress, desc, watch=watch)
    return [(s / c.clamp(min=1)).float() for s, c in zip(sums, counts)]


def frequency_scores(stack: BlockStack, tokens: torch.Tensor, progress: bool = True) -> list[torch.Tensor]:
    """Per MoE block, the share of calibration tokens the router sends to each expert."""
    def per_call(experts, hidden, ids, weights, sums, counts):
        # an id of E (a padded pick, which some implementations use) is no expert's
        sums += torch.bincount(ids.flatten().cpu(), minlength=len(sums))[: len(sums)].double()
        counts += hidden.shape[0]

    return _walk_experts(stack, tokens, progress, "expert frequency", per_call)


def reap_scores(stack: BlockStack, tokens: torch.Tensor, progress: bool = True) -> list[torch.Tensor]:
    """Per MoE block, REAP: over the tokens routed to each expert, mean routing weight x ||expert output||."""
    def per_call(experts, hidden, ids, weights, sums, counts):
        with torch.no_grad():
            for e in torch.unique(ids).tolist():
                if e >= len(sums):  # a padded pick, as in frequency_scores
                    continue
                token, slot = torch.where(ids == e)
                out = expert_output(experts, e, hidden[token]).float()
                sums[e] += (weights[token, slot].float() * out.norm(dim=-1)).sum().item()
                counts[e] += token.numel()

    return _walk_experts(stack, tokens, progress, "expert saliency (REAP)", per_call)

"""Depth pruning: score whole transformer blocks, choose which to drop.

Every criterion has the signature ``(stack, tokens, candidates, count, progress)`` and returns one
score per candidate block where a LOWER score means "less important, drop first" (``angular``
scores the span of ``count`` blocks starting at each candidate; see :func:`angular_scores`).
Blocks outside the candidates (Shortened LLaMA's "+" heuristic keeps the first and last few) get no
score. They are listed in :data:`healer.prune.criteria.CRITERIA`.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from healer.model.adapter import ModelAdapter
from healer.prune.blockwise import BlockStack

# Calibration batches are processed in chunks of this many sequences to bound activation memory.
CHUNK = 8


def _chunks(tokens: torch.Tensor, size: int = CHUNK) -> list[torch.Tensor]:
    return list(tokens.split(size))


def ppl_scores(stack: BlockStack, tokens: torch.Tensor, candidates: list[int], count: int,
               progress: bool = True) -> dict[int, float]:
    """Calibration perplexity of the model with each candidate block removed (Shortened LLaMA PPL).

    The hidden states entering block ``i`` do not depend on blocks >= ``i``, so one dense pass walks
    the prefix once; at each candidate the suffix is run from the cached state with that block skipped.
    The naive way re-runs the whole model per candidate.
    """
    candidates_set = set(candidates)
    nll = {i: 0.0 for i in candidates}
    predicted = 0
    bar = tqdm(total=len(candidates) * len(_chunks(tokens)), desc="ppl: blocks", disable=not progress, unit="eval")
    for chunk in _chunks(tokens):
        with torch.no_grad():
            hidden = stack.embed(chunk)
            ctx = stack.context(hidden)
            for i, block in stack.blocks():
                if i in candidates_set:
                    h = hidden
                    for j in range(i + 1, stack.num_blocks):
                        with stack.block(j) as later:
                            h = stack.run_block(later, j, h, ctx)
                    total, n = stack.nll(h, chunk)
                    nll[i] += total
                    bar.update(1)
                if i == max(candidates_set, default=-1):
                    break  # the rest of the prefix is never needed
                hidden = stack.run_block(block, i, hidden, ctx)
        predicted += chunk.shape[0] * (chunk.shape[1] - 1)
    bar.close()
    return {i: math.exp(nll[i] / predicted) for i in candidates}


def ppl_scores_naive(model, tokens: torch.Tensor, candidates: list[int], progress: bool = False) -> dict[int, float]:
    """The baseline for the benchmark: a full forward of the model with one block left out, per candidate."""
    adapter = ModelAdapter(model)
    parent = adapter.blocks
    path, _, attr = adapter.arch.blocks.rpartition(".")
    holder = model.get_submodule(path)
    n = len(parent)
    # The model's forward reads per-layer lists (attention kinds) by position: they lose the left-out entry too.
    lists = {key: getattr(model.config, key) for key in adapter.arch.per_layer_config_lists
             if isinstance(getattr(model.config, key, None), list) and len(getattr(model.config, key)) == n}
    out = {}
    for i in tqdm(candidates, desc="ppl (naive)", disable=not progress):
        holder.__setattr__(attr, torch.nn.ModuleList([parent[j] for j in range(n) if j != i]))
        model.config.num_hidden_layers = n - 1
        for key, values in lists.items():
            setattr(model.config, key, values[:i] + values[i + 1:])
        try:
            out[i] = perplexity(model, tokens)
        finally:
            holder.__setattr__(attr, parent)
            model.config.num_hidden_layers = n
            for key, values in lists.items():
                setattr(model.config, key, values)
    return out


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor) -> float:
    """exp(mean next-token NLL) of ``tokens`` under ``model`` (batched, no padding)."""
    total, count = 0.0, 0
    for chunk in _chunks(tokens):
        chunk = chunk.to(next(model.parameters()).device)
        logits = model(chunk, use_cache=False).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                   reduction="sum").item()
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


def taylor_scores(stack: BlockStack, tokens: torch.Tensor, candidates: list[int], count: int,
                  progress: bool = True) -> dict[int, float]:
    """Shortened LLaMA's Taylor+: sum over a block's weights of |w * dL/dw| on the calibration loss.

    Needs the whole model in memory (a backward pass through every block): ``stack`` must come from
    :meth:`BlockStack.from_model`.
    """
    model = stack.model
    if model is None:
        raise ValueError("taylor needs the model in memory (BlockStack.from_model), not blocks read from disk")
    adapter = ModelAdapter(model)
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    chunks = _chunks(tokens)
    for chunk in tqdm(chunks, desc="taylor: gradients", disable=not progress):
        chunk = chunk.to(next(model.parameters()).device)
        logits = model(chunk, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        (loss / len(chunks)).backward()
    scores = {}
    for i in candidates:
        block = adapter.blocks[i]
        scores[i] = sum((p.detach() * p.grad).abs().sum().item() for p in block.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)
    model.train(was_training)
    return scores


def magnitude_scores(stack: BlockStack, tokens: torch.Tensor | None, candidates: list[int], count: int,
                     progress: bool = True) -> dict[int, float]:
    """L2 norm of all of a block's weights (no data: ``tokens`` is ignored). Read block by block."""
    scores = {}
    for i in tqdm(candidates, desc="magnitude", disable=not progress):
        with stack.block(i) as block:
            scores[i] = math.sqrt(sum(p.detach().float().pow(2).sum().item() for p in block.parameters()))
    return scores


def _boundary_walk(stack: BlockStack, tokens: torch.Tensor, visit, progress: bool, desc: str,
                   watch=None) -> None:
    """Run calibration through every block, calling ``visit(i, chunk, hidden_in, hidden_out)``.

    One block is resident at a time. ``watch(i, block)``, if given, returns hook handles that observe
    the block while calibration passes through it; they are removed before the next block.
    """
    hiddens = [stack.embed(chunk) for chunk in _chunks(tokens)]
    contexts = [stack.context(h) for h in hiddens]
    for i, block in tqdm(stack.blocks(), total=stack.num_blocks, desc=desc, disable=not progress):
        handles = watch(i, block) if watch else []
        try:
            with torch.no_grad():
                for c, (h, ctx) in enumerate(zip(hiddens, contexts)):
                    out = stack.run_block(block, i, h, ctx)
                    visit(i, c, h, out)
                    hiddens[c] = out
        finally:
            for handle in handles:
                handle.remove()


def block_influence_scores(stack: BlockStack, tokens: torch.Tensor, candidates: list[int], count: int,
                           progress: bool = True) -> dict[int, float]:
    """ShortGPT's Block Influence: mean over tokens of 1 - cos(block input, block output)."""
    sums = [0.0] * stack.num_blocks
    counts = [0] * stack.num_blocks

    def visit(i, c, h_in, h_out):
        cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
        sums[i] += (1 - cos).sum().item()
        counts[i] += cos.numel()

    _boundary_walk(stack, tokens, visit, progress, "block influence")
    return {i: sums[i] / counts[i] for i in candidates}


def angular_scores(stack: BlockStack, tokens: torch.Tensor, candidates: list[int], count: int,
                   progress: bool = True) -> dict[int, float]:
    """Gromov et al.: angular distance arccos(cos(x_l, x_{l+n}))/pi between the hidden states entering
    block ``l`` and leaving block ``l+n-1`` (``n = count``), averaged over all calibration tokens, for
    each start ``l`` whose whole span lies within ``candidates``.

    Only the last ``count + 1`` boundary states are kept (unit-normalised), not every layer's.
    """
    span, removable = count, set(candidates)
    starts = [s for s in candidates if all(s + k in removable for k in range(span))]
    if not starts:
        raise ValueError(f"no run of {span} consecutive removable blocks in {candidates}")
    wanted = set(starts)
    sums = {s: 0.0 for s in starts}
    seen = [0]
    window: dict[tuple[int, int], torch.Tensor] = {}  # (boundary index, chunk) -> normalised states

    def visit(i, c, h_in, h_out):
        if i == 0:
            window[(0, c)] = torch.nn.functional.normalize(h_in.float(), dim=-1)
        window[(i + 1, c)] = torch.nn.functional.normalize(h_out.float(), dim=-1)
        start = i + 1 - span
        if start in wanted:
            cos = (window[(start, c)] * window[(i + 1, c)]).sum(-1).clamp(-1, 1)
            sums[start] += (torch.arccos(cos) / math.pi).sum().item()
            if start == min(wanted):
                seen[0] += cos.numel()
        window.pop((i + 1 - span, c), None)

    _boundary_walk(stack, tokens, visit, progress, "angular distance")
    return {s: sums[s] / seen[0] for s in starts}


def choose_lowest(scores: dict[int, float], k: int) -> list[int]:
    """The ``k`` blocks with the lowest scores (ties broken by index), sorted."""
    return sorted(sorted(scores, key=lambda i: (scores[i], i))[:k])


def lowest_span(scores: dict[int, float], k: int) -> list[int]:
    """The ``k`` consecutive blocks starting where the span score is lowest (ties: the earliest)."""
    best = min(scores, key=lambda s: (scores[s], s))
    return list(range(best, best + k))


def blocks_to_remove(num_blocks: int, ratio: float | None, count: int | None) -> int:
    """How many blocks ``ratio`` or ``count`` means for a model of ``num_blocks``; refuses impossible asks."""
    if count is None:
        if ratio is None:
            raise ValueError("prune: give prune.ratio, prune.num_blocks or prune.blocks")
        count = round(ratio * num_blocks)
        if count == 0:
            raise ValueError(f"prune.ratio {ratio} of {num_blocks} blocks rounds to 0 blocks; raise the ratio")
    if count >= num_blocks:
        raise ValueError(f"removing {count} of {num_blocks} blocks would leave none; lower prune.ratio/num_blocks")
    return count


@torch.no_grad()
def merge_across_cuts(blocks, removed: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """LaCo's reserving-differences merge: each run of removed blocks is folded into the kept block before it,
    ``theta_k + sum_r (theta_r - theta_k)``, instead of being dropped.

    blocks: the dense model's blocks (indexable, ``state_dict()`` each); removed: the blocks a depth prune cuts.
    Returns the new state dict of every kept block that received a merge, by its dense index; a run at the very
    start (no block before it) is dropped as usual.
    """
    removed_set = set(removed)
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for r in sorted(removed_set):
        k = r - 1
        while k in removed_set:
            k -= 1
        if k < 0:
            continue
        if k not in merged:
            merged[k] = {n: t.detach().clone().float() for n, t in blocks[k].state_dict().items()}
        base = blocks[k].state_dict()
        for name, theta in blocks[r].state_dict().items():
            merged[k][name] += theta.float() - base[name].float()
    return merged

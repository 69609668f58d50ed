"""Which weights of one linear layer to zero: sparsity patterns, and the magnitude and Wanda masks.

A mask is a bool tensor shaped like the weight, True where the weight is pruned (set to zero).
Neither criterion changes the weights that stay (SparseGPT, which does, lives in ``sparsegpt.py``).
"""

from __future__ import annotations

import torch

from healer.core.errors import HealerError
from healer.prune.pattern import Pattern


def check_shape(weight: torch.Tensor, pattern: Pattern, name: str) -> None:
    """N:M groups run along the input dimension, so it must be a multiple of M."""
    if pattern.is_nm and weight.shape[1] % pattern.m:
        raise HealerError(f"layer {name} has {weight.shape[1]} inputs, not a multiple of {pattern.m}: pattern "
                          f"{pattern} cannot hold; choose another pattern or leave this layer out "
                          f"(prune.sparsity.layers)")


def row_mask(metric: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Prune the lowest-``metric`` weights within each output row (or within each N:M group of a row).

    Exactly ``int(in_features * ratio)`` weights per row for unstructured, exactly M-N per group for N:M.
    """
    rows, cols = metric.shape
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if pattern.is_nm:
        groups = metric.reshape(rows, cols // pattern.m, pattern.m)
        drop = torch.topk(groups, pattern.m - pattern.n, dim=-1, largest=False).indices
        return mask.reshape_as(groups).scatter_(-1, drop, True).reshape(rows, cols)
    k = int(cols * pattern.ratio)
    # A stable sort makes ties (e.g. dead input columns) break the same way on every run.
    drop = torch.sort(metric, dim=1, stable=True).indices[:, :k]
    return mask.scatter_(1, drop, True)


def layer_mask(metric: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Prune the lowest-``metric`` weights of the whole layer (exactly ``int(numel * ratio)``); N:M as ``row_mask``."""
    if pattern.is_nm:
        return row_mask(metric, pattern)
    flat = metric.flatten()
    drop = torch.sort(flat, stable=True).indices[: int(flat.numel() * pattern.ratio)]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(0, drop, True).view_as(metric)


def magnitude_mask(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """|W| compared over the whole layer, the baseline of the Wanda and SparseGPT papers."""
    return layer_mask(weight.abs().float(), pattern)


def wanda_mask(weight: torch.Tensor, input_sq_norm: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Wanda: |W_ij| * ||X_j||_2 compared within each output row.

    ``input_sq_norm[j]`` is the squared L2 norm (any positive multiple of it) of input feature ``j`` over the
    calibration tokens; a weight on a feature with large activations survives even if it is small.
    """
    metric = weight.abs().float() * input_sq_norm.to(weight.device, torch.float32).sqrt().unsqueeze(0)
    return row_mask(metric, pattern)

"""Which weights of one linear layer to zero: sparsity patterns, and the magnitude and Wanda masks.

A mask is a bool tensor shaped like the weight, True where the weight is pruned (set to zero).
Neither criterion changes the weights that stay (SparseGPT, which does, lives in ``sparsegpt.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from healer.core.errors import HealerError


@dataclass(frozen=True)
class Pattern:
    """Unstructured at ``ratio``, or N:M -- at most ``n`` nonzeros in every ``m`` consecutive input weights."""

    ratio: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"unstructured {self.ratio:g}"


def parse_pattern(pattern: str, ratio: float | None, key: str = "prune.sparsity") -> Pattern:
    """Check ``pattern`` ("unstructured" or "N:M") and ``ratio`` together; errors name ``key``.

    For N:M the ratio is implied (1 - N/M); a ratio given as well must agree with it.
    """
    text = str(pattern).strip()
    if text == "unstructured":
        if ratio is None:
            raise HealerError(f"{key}.ratio is required for pattern 'unstructured' (e.g. 0.5 zeros half the weights)")
        if not 0.0 < ratio < 1.0:
            raise HealerError(f"{key}.ratio must be between 0 and 1 (exclusive), got {ratio}")
        return Pattern(float(ratio))
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise HealerError(f"{key}.pattern: {pattern!r} is neither 'unstructured' nor N:M like '2:4' or '4:8'")
    n, m = (int(p) for p in parts)
    if not 0 < n < m:
        raise HealerError(f"{key}.pattern: {pattern!r} must keep N of M weights with 0 < N < M (e.g. '2:4')")
    implied = 1.0 - n / m
    if ratio is not None and abs(ratio - implied) > 1e-9:
        raise HealerError(f"{key}.ratio {ratio} contradicts pattern {pattern!r}, which zeros {implied:g} of the "
                          "weights; leave the ratio out")
    return Pattern(implied, n, m)


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

"""SparseGPT (Frantar & Alistarh, 2023): prune one linear layer and update the weights that stay.

For a layer ``y = W x`` with calibration inputs ``X`` the goal is a sparse ``W'`` minimising
``||W X - W' X||^2``. SparseGPT walks the input columns left to right; zeroing a weight is compensated by
the Optimal Brain Surgeon update of the columns not yet visited, using the inverse of the Hessian
``H = 2 X^T X`` (damped so it inverts). Only the upper Cholesky factor of ``H^-1`` is needed, because the
columns already visited are frozen. Columns are handled in blocks of ``blocksize``: inside a block the
update is applied column by column, and to the columns right of the block once, as one matrix product
(the "lazy batch" update), which is what makes it fast. The mask for unstructured sparsity is chosen per
block from ``w^2 / [H^-1]_jj^2`` (the OBS saliency), so the pruned fraction is exact in every block.
"""

from __future__ import annotations

import torch

from healer.core.errors import HealerError
from healer.prune.pattern import Pattern
from healer.prune.sparse_scores import layer_mask


class Hessian:
    """Running ``2/n * X^T X`` over every token a linear layer sees (fed by a forward hook)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.matrix = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        n = x.shape[0]
        # Keep it a mean so the scale (and fp32 range) does not grow with the calibration size.
        self.matrix.mul_(self.tokens / (self.tokens + n))
        self.tokens += n
        x = x * (2.0 / self.tokens) ** 0.5
        self.matrix.addmm_(x.t(), x)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, *, blocksize: int = 128,
                    percdamp: float = 0.01, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune ``weight`` [out, in] given its input Hessian [in, in].

    ``blocksize``: columns updated lazily together (a multiple of M for N:M). ``percdamp``: damping added
    to the diagonal, as a fraction of its mean, so that ``H`` inverts. Returns the new weight (in
    ``weight``'s dtype), the mask (True = pruned) and the OBS estimate of the added squared error.
    """
    if pattern.is_nm and blocksize % pattern.m:
        raise HealerError(f"prune.sparsity.blocksize {blocksize} must be a multiple of M={pattern.m} for {pattern}")
    W = weight.detach().float().clone()
    rows, columns = W.shape
    H = hessian.to(W.device, torch.float32).clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do nothing, prune them for free
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise HealerError(f"SparseGPT: the input Hessian of {name} does not invert; raise "
                          f"prune.sparsity.percdamp (now {percdamp}) or use more calibration samples") from None

    mask = torch.zeros_like(W, dtype=torch.bool)
    loss = torch.zeros(rows, device=W.device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if pattern.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = layer_mask(W1 ** 2 / d1.unsqueeze(0) ** 2, pattern)
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                # Chosen on the already-updated weights of this group, as in the reference implementation.
                saliency = W1[:, i:i + pattern.m] ** 2 / d1[i:i + pattern.m].unsqueeze(0) ** 2
                drop = torch.topk(saliency, pattern.m - pattern.n, dim=1, largest=False).indices
                mask1.scatter_(1, i + drop, True)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            loss += (w - q) ** 2 / Hinv1[i, i] ** 2 / 2
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    mask |= dead.unsqueeze(0)
    return W.to(weight.dtype), mask, float(loss.sum())

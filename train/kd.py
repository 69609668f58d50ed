"""Distillation math: ``alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)`` per token.

Two forms of the same loss:

* :func:`distill_loss` takes full ``[batch, seq, vocab]`` logits and returns means. It is the reference
  the tests and ``bench/kd_memory.py`` compare against; with a 128K vocabulary its fp32 temporaries alone
  are several GiB per micro-batch.
* :func:`chunked_head_loss` takes final hidden states and the output head, and walks the positions in
  chunks, so at most one chunk of logits is alive at any time. For a plain linear head the gradient is
  computed chunk by chunk during the forward pass (the closed form of the CE and KL gradients, pushed
  through the head at once); for a head partitioned by ZeRO-3 each chunk is recomputed in backward
  (``torch.utils.checkpoint``) so DeepSpeed's module hooks gather the weight. It returns sums, which the
  training loop normalises over its accumulation window.

What ``top_k`` means (both forms): only the teacher's ``k`` largest logits at a position are kept; the
teacher distribution is renormalised over those ``k`` tokens (softmax of the ``k`` logits divided by T),
and the student's log-probabilities are the full-vocabulary ``log_softmax(student / T)`` read at those
same ``k`` token ids (not renormalised). The term stays >= 0 and is zero only when the student's
probabilities at the teacher's top-k tokens equal the renormalised teacher's -- i.e. when the student
puts all its mass there, in the teacher's proportions.

The teacher's top-k can also come precomputed (:class:`TopK`, read from a logit cache by
:mod:`healer.train.logit_cache`): its values are the raw logits (temperature 1), divided by T here exactly as
the live path divides before its ``topk``, so cached and live top-k give the same loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 512  # positions per chunk: 512 x 128K vocab x 4 bytes = 256 MiB per fp32 temporary


class TopK(NamedTuple):
    """A teacher's k largest logits per position, ``[..., k]`` each, largest first: the raw logits
    (temperature 1, fp32 or the cache's dtype) and their token ids."""

    values: torch.Tensor
    indices: torch.Tensor


def teacher_top_k(teacher_logits: torch.Tensor, k: int) -> TopK:
    """The :class:`TopK` a logit cache stores for ``teacher_logits`` (``[..., V]``), in fp32."""
    values, indices = teacher_logits.float().topk(k, dim=-1)
    return TopK(values, indices)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor | TopK, temperature: float = 1.0,
             top_k: int | None = None) -> torch.Tensor:
    """KL(p_teacher || p_student) at ``temperature`` for every position (``[..., V]`` -> ``[...]``), in fp32.

    ``top_k`` restricts the teacher to its k largest logits, as the module docstring defines; a
    :class:`TopK` teacher is that restriction already made (``top_k`` is then not read).
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher_logits, TopK):
        log_p = F.log_softmax(teacher_logits.values.float() / temperature, dim=-1)
        log_q = log_q.gather(-1, teacher_logits.indices.long())
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    t = teacher_logits.float() / temperature
    if top_k is not None and top_k < t.shape[-1]:
        t_vals, t_idx = t.topk(top_k, dim=-1)
        log_p = F.log_softmax(t_vals, dim=-1)
        log_q = log_q.gather(-1, t_idx)
    else:
        log_p = F.log_softmax(t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                       top_k: int | None = None) -> torch.Tensor:
    """Mean over positions of :func:`token_kl`."""
    return token_kl(student_logits, teacher_logits, temperature, top_k).mean()


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor, *,
                 alpha: float, temperature: float = 1.0, top_k: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kl)``, means over every position of ``input_ids`` ([B, S]) that has a next token.

    The unchunked reference: it materialises several fp32 ``[B, S, V]`` tensors.
    """
    s = student_logits[:, :-1]
    t = teacher_logits[:, :-1]
    if t.shape[-1] != s.shape[-1]:
        raise ValueError(f"teacher vocabulary {t.shape[-1]} != student vocabulary {s.shape[-1]}")
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]).float(), input_ids[:, 1:].reshape(-1))
    kl = kl_teacher_student(s, t, temperature, top_k)
    loss = alpha * ce + (1 - alpha) * temperature**2 * kl
    return loss, ce.detach(), kl.detach()


def cut_points(removed: list[int], num_blocks: int) -> list[tuple[int, int]]:
    """Where a depth-pruned student must agree with its teacher: one ``(student, teacher)`` pair of hidden-state
    indices per contiguous run of removed blocks (HF ``output_hidden_states`` indexing: n = after n blocks).

    For a run ``a..b`` removed from a ``num_blocks``-block teacher, the student's state after its copy of block
    ``a - 1`` (the block before the cut) is paired with the teacher's state after block ``b`` (the end of the
    removed span): what the cut skipped is exactly what the student must learn to produce there.
    """
    removed = sorted(set(removed))
    if any(not 0 <= b < num_blocks for b in removed) or len(removed) >= num_blocks:
        raise ValueError(f"removed blocks {removed} do not fit a teacher of {num_blocks} blocks")
    runs: list[list[int]] = []  # [first, last] of each contiguous run
    for b in removed:
        if runs and runs[-1][1] == b - 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    pairs = [(a - sum(r < a for r in removed), b + 1) for a, b in runs]
    return pairs


def cut_points_of(report: dict | None) -> list[tuple[int, int]]:
    """:func:`cut_points` of a depth prune's ``prune_report.json`` (its ``removed`` and ``kept`` blocks); none for
    any other input (width, sparse, unpruned) or a span replaced by a trained block (``replacement``), whose
    state the replace stage already matches."""
    if not report or report.get("method") != "depth" or report.get("replacement") or not report.get("removed"):
        return []
    removed = list(report["removed"])
    return cut_points(removed, len(removed) + len(report.get("kept", [])))


def cut_points_of_input(recipe, source: str) -> list[tuple[int, int]]:
    """The cut points of the checkpoint a stage starts from: ``source/prune_report.json``, else the recipe's
    prune stage's report when ``source`` descends from it; none when there is no depth prune."""
    from pathlib import Path

    from healer.core.manifest import read_json_report

    report = read_json_report(Path(source) / "prune_report.json")
    if report is None and recipe.prune is not None and source != recipe.model.source:
        report = read_json_report(recipe.stage_dir("prune") / "prune_report.json")
    return cut_points_of(report)


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per position ``||s - t||^2 / ||t||^2`` over the last dim (``[..., H]`` -> ``[...]``), in fp32.

    Scale-free, so one weight fits every model and layer (raw residual-stream norms grow with depth), and a
    student that copies the teacher's state scores 0, one that outputs zeros scores 1.
    """
    t = teacher.float()
    return (student.float() - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)


Head = Callable[[torch.Tensor], torch.Tensor]


class SoftcappedHead(torch.nn.Module):
    """``cap * tanh(linear(x) / cap)``: the output head of a family that soft-caps its logits (Gemma 2 and 3).

    ``linear`` stays the model's own head module (ZeRO-3 hooks, LoRA and the tied embedding keep working);
    :func:`chunked_head_loss` folds the cap into its closed-form gradient when the linear head allows that.
    """

    def __init__(self, linear: torch.nn.Module, cap: float):
        super().__init__()
        self.linear, self.cap = linear, float(cap)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(hidden) / self.cap) * self.cap


def _unwrap(head) -> tuple[torch.nn.Module, float | None]:
    """(the linear head, its logit cap or None)."""
    return (head.linear, head.cap) if isinstance(head, SoftcappedHead) else (head, None)


def _chunk_sums(hidden: torch.Tensor, teacher_hidden: torch.Tensor | None, targets: torch.Tensor, head: Head,
                teacher_head: Head | None, temperature: float, top_k: int | None,
                t_values: torch.Tensor | None = None, t_indices: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum, KL sum) of one chunk of positions; the KL is 0 without a teacher (head or cached top-k)."""
    logits = head(hidden)  # calling the module (not its weight) lets ZeRO-3's hooks gather a partitioned head
    ce = F.cross_entropy(logits.float(), targets, reduction="sum")
    if t_values is not None:
        return ce, token_kl(logits, TopK(t_values, t_indices), temperature).sum()
    if teacher_head is None:
        return ce, ce.new_zeros(())
    with torch.no_grad():
        t_logits = teacher_head(teacher_hidden)
    _same_vocab(t_logits, logits)
    return ce, token_kl(logits, t_logits, temperature, top_k).sum()


def _same_vocab(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> None:
    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(f"teacher vocabulary {teacher_logits.shape[-1]} != student vocabulary "
                         f"{student_logits.shape[-1]}")


def _loss_and_logit_grad(logits: torch.Tensor, targets: torch.Tensor, t_logits: torch.Tensor | TopK | None,
                         alpha: float, temperature: float, top_k: int | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE sum, KL sum, d loss_sum / d logits) of one chunk. Works in place on ``logits`` and ``t_logits``
    (fp32 temporaries the caller gives up) so about five chunk-sized tensors are alive, not ten.
    ``t_logits`` may be a cached :class:`TopK` (then ``top_k`` is not read)."""
    rows = torch.arange(targets.shape[0], device=targets.device)
    lse = logits.logsumexp(-1)
    ce = (lse - logits[rows, targets]).sum()
    if t_logits is None:
        kl, log_q = ce.new_zeros(()), None
    else:
        if not isinstance(t_logits, TopK):
            _same_vocab(t_logits, logits)
        log_q = F.log_softmax(logits / temperature, dim=-1)
    grad = logits.sub_(lse[:, None]).exp_().mul_(alpha)  # alpha * (softmax(s) - onehot), in the logits' memory
    grad[rows, targets] -= alpha
    if log_q is None:
        return ce, kl, grad
    scale = (1 - alpha) * temperature  # d(T^2 KL)/ds = T (q - p)
    if isinstance(t_logits, TopK):  # the cached top-k: the same division by T the live branch makes before topk
        t_vals, t_idx, t = t_logits.values.float().div(temperature), t_logits.indices.long(), None
    else:
        t = t_logits.float().div_(temperature)
        t_vals = t_idx = None
        if top_k is not None and top_k < t.shape[-1]:
            t_vals, t_idx = t.topk(top_k, dim=-1)
    if t_vals is not None:
        log_p = F.log_softmax(t_vals, dim=-1)
        p = log_p.exp()
        kl = (p * (log_p - log_q.gather(-1, t_idx))).sum()
        q = log_q.exp_().mul_(scale).scatter_add_(-1, t_idx, p.mul_(-scale))
    else:
        log_p = F.log_softmax(t, dim=-1)
        p = log_p.exp()
        kl = torch.dot(p.view(-1), log_p.sub_(log_q).view(-1))  # sum p (log p - log q), no [n, V] temporary
        del log_p
        q = log_q.exp_().sub_(p).mul_(scale)
    return ce, kl, grad.add_(q)


class _FusedHeadLoss(torch.autograd.Function):
    """The chunked loss of a plain linear head with its gradient computed during the forward pass.

    Per chunk the gradient w.r.t. the logits is known in closed form -- CE: softmax(s) - onehot(y);
    T^2 * KL: T * (q - p) with q = softmax(s/T) and p the teacher's (top-k: p scattered into zeros, which
    is exact because the renormalised p sums to 1) -- so it is pushed through the head at once and the
    chunk's logits are freed. Backward only scales the stored gradients: no recomputation, the same
    three head matmuls as the unchunked loss.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_hidden, teacher_head, alpha, temperature, top_k, chunk_size,
                teacher_topk=None, softcap=None):
        want_h, want_w = ctx.needs_input_grad[:2]  # a frozen head (LoRA) needs no [V, H] gradient buffer
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kl_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.shape[0], chunk_size):
            h, y = hidden[start:start + chunk_size], targets[start:start + chunk_size]
            if teacher_topk is not None:
                t_logits = TopK(*(t[start:start + chunk_size] for t in teacher_topk))
            else:
                t_logits = None if teacher_head is None else teacher_head(teacher_hidden[start:start + chunk_size])
            logits = F.linear(h, weight).float()
            if softcap is not None:  # d(c tanh(s/c))/ds = 1 - tanh^2(s/c)
                logits = logits.div_(softcap).tanh_()
                slope = 1 - logits.square()
                logits = logits.mul_(softcap)
            ce, kl, d_logits = _loss_and_logit_grad(logits, y, t_logits, alpha, temperature, top_k)
            del t_logits, logits
            if softcap is not None:
                d_logits = d_logits.mul_(slope)
                del slope
            ce_sum += ce
            kl_sum += kl
            d_logits = d_logits.to(weight.dtype)
            if want_h:
                grad_h[start:start + chunk_size] = d_logits @ weight
            if want_w and grad_w.dtype == d_logits.dtype:
                grad_w.addmm_(d_logits.t(), h)
            elif want_w:  # a 16-bit head: each chunk's product in 16 bits (as autograd would), summed in fp32
                grad_w += d_logits.t() @ h
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        loss = alpha * ce_sum + (1 - alpha) * temperature**2 * kl_sum
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return loss, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        grad_h, grad_w = ctx.grads
        del ctx.grads

        def scale(g):  # the buffers are ours: scale in place
            return None if g is None else g.mul_(grad_loss)

        return scale(grad_h), scale(grad_w), None, None, None, None, None, None, None, None, None


def _plain_linear(head) -> bool:
    """A bias-free ``nn.Linear`` whose weight is a whole tensor here (not partitioned by ZeRO-3)."""
    return (type(head) is torch.nn.Linear and head.bias is None  # exactly Linear: a LoRA-wrapped head is not
            and not hasattr(head.weight, "ds_id"))


def _frozen_partitioned_linear(head) -> bool:
    """A bias-free ``nn.Linear`` head partitioned by ZeRO-3 and frozen (LoRA under ZeRO-3)."""
    return (type(head) is torch.nn.Linear and head.bias is None and hasattr(head.weight, "ds_id")
            and not head.weight.requires_grad)


def chunked_head_loss(hidden: torch.Tensor, targets: torch.Tensor, head: Head, *,
                      teacher_hidden: torch.Tensor | None = None, teacher_head: Head | None = None,
                      alpha: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
                      chunk_size: int = DEFAULT_CHUNK_SIZE, fused: bool | None = None,
                      teacher_topk: TopK | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss_sum, ce_sum, kl_sum)`` over the positions of ``targets`` that are not -100.

    hidden: the student's final hidden states (after the final norm), ``[..., H]``, aligned with ``targets``
        (position i predicts ``targets[i]``; the caller has already shifted).
    targets: next-token ids ``[...]``; -100 positions are skipped before the head ever sees them.
    head: the student's output head module.
    teacher_hidden / teacher_head: the frozen teacher's final hidden states (same shape as ``hidden``) and
        head; without them (and without ``teacher_topk``) the loss is plain CE (``kl_sum`` is 0) and ``alpha``
        must be 1.
    teacher_topk: the teacher's cached top-k logits (:class:`TopK`, ``[..., k]`` aligned with ``targets``) in
        place of ``teacher_hidden``/``teacher_head``: the KL is the top-k KL over those k tokens.
    alpha, temperature, top_k: the distillation mix, as in :func:`distill_loss`.
    chunk_size: positions per chunk; the memory of the loss is about a handful of ``chunk_size x V`` fp32
        tensors instead of ``positions x V``.
    fused: True = gradients computed in the forward pass (:class:`_FusedHeadLoss`; needs a plain bias-free
        ``nn.Linear`` head, alone or in a :class:`SoftcappedHead`); False = each chunk recomputed in backward
        by ``torch.utils.checkpoint``, calling the head module again, which is what a ZeRO-3-partitioned head
        needs (its hooks gather the weight and route its gradient). None picks fused whenever the head allows it.
    ``ce_sum`` and ``kl_sum`` are detached; ``loss_sum = alpha*ce_sum + (1-alpha)*T^2*kl_sum`` carries the grad.
    """
    if teacher_head is None and teacher_topk is None and alpha != 1.0:
        raise ValueError("chunked_head_loss: alpha < 1 needs a teacher")
    keep = targets.reshape(-1) != -100
    hidden = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = targets.reshape(-1)[keep]
    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[keep]
    if teacher_topk is not None:
        teacher_topk = TopK(*(t.reshape(-1, t.shape[-1])[keep] for t in teacher_topk))
    elif teacher_head is None:
        alpha = 1.0
    linear, softcap = _unwrap(head)
    training = torch.is_grad_enabled() and (hidden.requires_grad or getattr(linear, "weight", hidden).requires_grad)
    if fused is None:
        fused = _plain_linear(linear)
    if fused and training:
        return _FusedHeadLoss.apply(hidden, linear.weight, targets, teacher_hidden, teacher_head, alpha, temperature,
                                    top_k, chunk_size, teacher_topk, softcap)
    if training and _frozen_partitioned_linear(linear):
        # A recomputed chunk would find a frozen ZeRO-3 head partitioned again (no hook gathers it in backward);
        # fused needs it whole only during this forward, since its backward merely scales stored gradients.
        import deepspeed

        with deepspeed.zero.GatheredParameters([linear.weight]):
            return _FusedHeadLoss.apply(hidden, linear.weight, targets, teacher_hidden, teacher_head, alpha,
                                        temperature, top_k, chunk_size, teacher_topk, softcap)
    ce_sum = hidden.new_zeros((), dtype=torch.float32)
    kl_sum = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], chunk_size):
        end = start + chunk_size
        args = (hidden[start:end], None if teacher_hidden is None else teacher_hidden[start:end],
                targets[start:end], head, teacher_head, temperature, top_k,
                *((None, None) if teacher_topk is None else (t[start:end] for t in teacher_topk)))
        if training:
            ce, kl = checkpoint(_chunk_sums, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            ce, kl = _chunk_sums(*args)
        ce_sum = ce_sum + ce
        kl_sum = kl_sum + kl
    loss = alpha * ce_sum + (1 - alpha) * temperature**2 * kl_sum
    return loss, ce_sum.detach(), kl_sum.detach()

"""Distillation math: ``alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)`` per token.

Two forms of the same loss:

* :func:`distill_loss` takes full ``[batch, seq, vocab]`` logits and returns means. It is the reference
  the tests and ``bench/kd_memory.py`` compare against; with a 128K vocabulary its fp32 temporaries alone
  are several GiB per micro-batch.
* :func:`chunked_head_loss` takes final hidden states and the output head, and walks the positions in
  chunks. Each chunk's logits are computed, reduced to per-token losses and dropped; the backward pass
  recomputes them chunk by chunk (``torch.utils.checkpoint``), so at most one chunk of logits is alive
  at any time. It returns sums, which the training loop normalises over its accumulation window.

What ``top_k`` means (both forms): only the teacher's ``k`` largest logits at a position are kept; the
teacher distribution is renormalised over those ``k`` tokens (softmax of the ``k`` logits divided by T),
and the student's log-probabilities are the full-vocabulary ``log_softmax(student / T)`` read at those
same ``k`` token ids (not renormalised). The term stays >= 0 and is zero only when the student's
probabilities at the teacher's top-k tokens equal the renormalised teacher's -- i.e. when the student
puts all its mass there, in the teacher's proportions.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 512  # positions per chunk: 512 x 128K vocab x 4 bytes = 256 MiB per fp32 temporary


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
             top_k: int | None = None) -> torch.Tensor:
    """KL(p_teacher || p_student) at ``temperature`` for every position (``[..., V]`` -> ``[...]``), in fp32.

    ``top_k`` restricts the teacher to its k largest logits, as the module docstring defines.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
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


Head = Callable[[torch.Tensor], torch.Tensor]


def _chunk_sums(hidden: torch.Tensor, teacher_hidden: torch.Tensor | None, targets: torch.Tensor, head: Head,
                teacher_head: Head | None, temperature: float, top_k: int | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum, KL sum) of one chunk of positions; the KL is 0 without a teacher."""
    logits = head(hidden)  # calling the module (not its weight) lets ZeRO-3's hooks gather a partitioned head
    ce = F.cross_entropy(logits.float(), targets, reduction="sum")
    if teacher_head is None:
        return ce, ce.new_zeros(())
    with torch.no_grad():
        t_logits = teacher_head(teacher_hidden)
    if t_logits.shape[-1] != logits.shape[-1]:
        raise ValueError(f"teacher vocabulary {t_logits.shape[-1]} != student vocabulary {logits.shape[-1]}")
    return ce, token_kl(logits, t_logits, temperature, top_k).sum()


def chunked_head_loss(hidden: torch.Tensor, targets: torch.Tensor, head: Head, *,
                      teacher_hidden: torch.Tensor | None = None, teacher_head: Head | None = None,
                      alpha: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss_sum, ce_sum, kl_sum)`` over the positions of ``targets`` that are not -100.

    hidden: the student's final hidden states (after the final norm), ``[..., H]``, aligned with ``targets``
        (position i predicts ``targets[i]``; the caller has already shifted).
    targets: next-token ids ``[...]``; -100 positions are skipped before the head ever sees them.
    head: the student's output head (a module; called once per chunk, and once more per chunk in backward).
    teacher_hidden / teacher_head: the frozen teacher's final hidden states (same shape as ``hidden``) and
        head; without them the loss is plain CE (``kl_sum`` is 0) and ``alpha`` must be 1.
    alpha, temperature, top_k: the distillation mix, as in :func:`distill_loss`.
    chunk_size: positions per chunk; the memory of the loss is about a handful of ``chunk_size x V`` fp32
        tensors instead of ``positions x V``.
    ``ce_sum`` and ``kl_sum`` are detached; ``loss_sum = alpha*ce_sum + (1-alpha)*T^2*kl_sum`` carries the grad.
    """
    if teacher_head is None and alpha != 1.0:
        raise ValueError("chunked_head_loss: alpha < 1 needs a teacher")
    keep = targets.reshape(-1) != -100
    hidden = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = targets.reshape(-1)[keep]
    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[keep]
    ce_sum = hidden.new_zeros((), dtype=torch.float32)
    kl_sum = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], chunk_size):
        end = start + chunk_size
        args = (hidden[start:end], None if teacher_hidden is None else teacher_hidden[start:end],
                targets[start:end], head, teacher_head, temperature, top_k)
        if torch.is_grad_enabled() and hidden.requires_grad:
            ce, kl = checkpoint(_chunk_sums, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            ce, kl = _chunk_sums(*args)
        ce_sum = ce_sum + ce
        kl_sum = kl_sum + kl
    loss = alpha * ce_sum + (1 - alpha) * temperature**2 * kl_sum if teacher_head is not None else ce_sum
    return loss, ce_sum.detach(), kl_sum.detach()

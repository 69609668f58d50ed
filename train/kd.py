"""Distillation loss: ``alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)``.

Both models see the same batch; the teacher is frozen. CE and KL are averaged over
the same positions (every position that has a next token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                       top_k: int | None = None) -> torch.Tensor:
    """Mean over positions of KL(p_teacher || p_student) at ``temperature``, in float32.

    With ``top_k`` only the teacher's k largest logits are kept: the teacher distribution is renormalised
    over them and compared with the student's full-softmax log-probabilities at the same token ids. That
    term is still >= 0 and zero only when the student puts the teacher's mass on exactly those tokens;
    it saves the memory of a second full-vocabulary softmax.
    """
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    log_q = F.log_softmax(s, dim=-1)
    if top_k is not None and top_k < t.shape[-1]:
        t_vals, t_idx = t.topk(top_k, dim=-1)
        log_p = F.log_softmax(t_vals, dim=-1)
        log_q = log_q.gather(-1, t_idx)
    else:
        log_p = F.log_softmax(t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.mean()


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor, *,
                 alpha: float, temperature: float = 1.0, top_k: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kl)`` for next-token prediction on ``input_ids`` ([B, S]) given [B, S, V] logits."""
    s = student_logits[:, :-1]
    t = teacher_logits[:, :-1]
    if t.shape[-1] != s.shape[-1]:
        raise ValueError(f"teacher vocabulary {t.shape[-1]} != student vocabulary {s.shape[-1]}")
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]).float(), input_ids[:, 1:].reshape(-1))
    kl = kl_teacher_student(s, t, temperature, top_k)
    loss = alpha * ce + (1 - alpha) * temperature**2 * kl
    return loss, ce.detach(), kl.detach()

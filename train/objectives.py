"""Training objectives: what one micro-batch's loss is, and how many tokens it is averaged over.

An objective returns the loss SUMMED over its tokens; the training loop adds up ``tokens(batch)`` over the
accumulation window and all ranks and divides once, so a short reply weighs as much per token as a long
one (a mean of per-micro-batch means would not). ``model`` is a DeepSpeed engine (ZeRO 0-3), a plain
Hugging Face causal LM, or a PEFT-wrapped one.

Every objective runs the model with ``output_hidden_states=True, logits_to_keep=1``: the model never
builds its own ``[batch, seq, vocab]`` logits; the output head is applied chunk by chunk in
:func:`healer.train.kd.chunked_head_loss`, so a 128K vocabulary costs a chunk of logits, not a sequence.

    objective = make_objective("kd", teacher=teacher, alpha=0.5, temperature=2.0)
    n = objective.tokens(batch)                  # before any forward
    loss_sum, parts = objective(engine, batch)   # parts: {"ce": .., "kl": ..}, sums, detached
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch

from healer.core.errors import HealerError
from healer.train.kd import DEFAULT_CHUNK_SIZE, SoftcappedHead, TopK, chunked_head_loss, relative_mse

Batch = dict[str, torch.Tensor]

# Config keys by which some families scale their logits after the head; the chunked head applies the head only.
# (Gemma's final_logit_softcapping is applied: see SoftcappedHead.)
_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling")


class Objective(Protocol):
    name: str

    def tokens(self, batch: Batch) -> int:
        """Tokens this micro-batch's loss is summed over, from the batch alone (before any forward)."""

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss summed over the counted tokens, with grad; named parts, also sums, detached)."""


def _hf_model(model) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine (``.module``); PEFT models forward the HF accessors."""
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:  # plain-module use without DeepSpeed installed
        return model
    return model.module if isinstance(model, DeepSpeedEngine) else model


def output_head(model) -> torch.nn.Module:
    """The module that maps ``model``'s final hidden states to its logits: the output head, inside a
    :class:`~healer.train.kd.SoftcappedHead` for a family that soft-caps its logits. Refuses families whose
    logits are transformed in other ways."""
    hf = _hf_model(model)
    config = hf.config
    for key in _LOGIT_TRANSFORMS:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0):
            raise HealerError(f"model config {key}={value}: healer's chunked loss applies the output head only; "
                              "this family transforms its logits after the head and is not supported")
    head = hf.get_output_embeddings()
    if head is None:
        raise HealerError(f"{type(hf).__name__} has no output head (get_output_embeddings() is None); "
                          "training needs a *ForCausalLM model")
    cap = getattr(config, "final_logit_softcapping", None)
    return SoftcappedHead(head, cap) if cap else head


def _forward_hidden(model, batch: Batch) -> tuple[torch.Tensor, ...]:
    """``hidden_states`` of one forward (HF indexing: 0 = embeddings, last = after the final norm)."""
    return _forward(model, batch).hidden_states


def _forward(model, batch: Batch, router_balance: bool = False):
    """One forward with the hidden states; with ``router_balance``, an MoE's load-balancing loss as ``aux_loss``
    (transformers' own, over the router logits of every block)."""
    kwargs = {k: batch[k] for k in ("position_ids", "attention_mask") if batch.get(k) is not None}
    if router_balance:
        kwargs["output_router_logits"] = True
    # logits_to_keep=1: the model's own head runs on one position only; ours runs chunked.
    return model(input_ids=batch["input_ids"], use_cache=False, output_hidden_states=True, logits_to_keep=1,
                 **kwargs)


def _with_router_balance(loss: torch.Tensor, parts: dict, out, coef: float, tokens: int) -> torch.Tensor:
    """``loss + coef * aux * tokens``: the balance term per supervised token, like every other part, so the
    loop's division by the window's tokens leaves ``coef * aux``."""
    if not coef:
        return loss
    aux = getattr(out, "aux_loss", None)
    if aux is None:
        raise HealerError("router_aux_loss_coef > 0 but the model returned no router load-balancing loss; it "
                          "applies to mixture-of-experts models only")
    term = coef * aux.float() * tokens
    parts["router_balance"] = term.detach()
    return loss + term


def _router_coef(coef: float) -> float:
    if coef < 0:
        raise HealerError(f"router_aux_loss_coef={coef}: must be >= 0")
    return float(coef)


def _next_token_targets(batch: Batch, use_labels: bool) -> torch.Tensor:
    """``[B, S-1]`` ids each position must predict; -100 where nothing is supervised."""
    if use_labels:
        return batch["labels"][:, 1:]
    targets = batch["input_ids"][:, 1:]
    mask = batch.get("attention_mask")
    if mask is not None:  # padding predicts nothing and is never predicted
        targets = targets.masked_fill(mask[:, 1:] == 0, -100)
    return targets


def _require_labels(name: str, batch: Batch) -> None:
    if batch.get("labels") is None:
        raise HealerError(f"objective {name!r} needs batches with `labels` (-100 = not supervised); "
                          "this data has none -- use objective 'ce' for plain next-token training")


def _positive_chunk(chunk_size: int) -> int:
    if chunk_size < 1:
        raise HealerError(f"chunk_size={chunk_size}: must be >= 1 (positions per chunk of logits)")
    return chunk_size


def _need_teacher(kind: str, teacher) -> None:
    if teacher is None:
        raise HealerError(f"objective {kind!r} needs a teacher model (the frozen unpruned model); got none")


class NextTokenCE:
    """Cross-entropy on every next token of ``input_ids`` (padding excluded); batch ``labels`` are ignored."""

    name = "ce"
    use_labels = False

    def __init__(self, *, chunk_size: int = DEFAULT_CHUNK_SIZE, router_aux_loss_coef: float = 0.0):
        self.chunk_size = _positive_chunk(chunk_size)
        self.router_aux_loss_coef = _router_coef(router_aux_loss_coef)

    def _targets(self, batch: Batch) -> torch.Tensor:
        return _next_token_targets(batch, self.use_labels)

    def tokens(self, batch: Batch) -> int:
        return int((self._targets(batch) != -100).sum())

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = self._targets(batch)
        out = _forward(model, batch, router_balance=self.router_aux_loss_coef > 0)
        loss, ce, _ = chunked_head_loss(out.hidden_states[-1][:, :-1], targets, output_head(model),
                                        chunk_size=self.chunk_size)
        parts = {"ce": ce}
        loss = _with_router_balance(loss, parts, out, self.router_aux_loss_coef, int((targets != -100).sum()))
        return loss, parts


class ReplyCE(NextTokenCE):
    """Cross-entropy on the tokens whose ``labels`` are not -100 (SFT: the replies), counted per token."""

    name = "reply_ce"
    use_labels = True

    def _targets(self, batch: Batch) -> torch.Tensor:
        _require_labels(self.name, batch)
        return super()._targets(batch)


class Distill:
    """``alpha*CE + (1-alpha)*T^2*KL(teacher || student) + hidden_weight*H`` per supervised token, summed; parts
    "ce", "kl" and, with hidden pairs, "hidden".

    teacher: a frozen model (DeepSpeed engine or module) with the student's vocabulary; it sees the same batch.
    alpha: weight of the CE on the true next token; ``1 - alpha`` goes to the KL.
    temperature: softens both distributions; the KL is scaled by T^2 so its gradient keeps its size.
    top_k: keep only the teacher's k largest logits per position (see :mod:`healer.train.kd`).
    hidden_pairs: ``(student, teacher)`` hidden-state indices (HF ``output_hidden_states``: n = after n blocks)
        that must agree, e.g. a depth prune's cut points (:func:`healer.train.kd.cut_points`). H is the mean over
        the pairs of :func:`healer.train.kd.relative_mse` at a token (Minitron distils logits plus states).
    hidden_weight: weight of H; 0 (or no pairs) leaves the logit loss alone.
    chunk_size: positions per chunk of logits.
    router_aux_loss_coef: weight of an MoE student's router load-balancing loss per supervised token (part
        "router_balance"); 0 leaves it out.
    cached: the teacher's top-k logits come with each batch (``kd_values``, ``kd_indices``: ``[B, S-1, k]``, from
        :class:`healer.train.logit_cache.CachedTeacherBatches`) and ``teacher`` is None: no teacher runs. Needs
        ``top_k`` (the cache's k) and no hidden pairs.
    Supervised tokens are every next token, or those with ``labels != -100`` when the batch has labels; H is
    taken at the same positions, so every part is summed over the tokens :meth:`tokens` counts.
    """

    name = "kd"

    def __init__(self, teacher, *, alpha: float, temperature: float = 1.0, top_k: int | None = None,
                 hidden_pairs: list[tuple[int, int]] | None = None, hidden_weight: float = 0.0,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, cached: bool = False, router_aux_loss_coef: float = 0.0):
        if cached:
            if top_k is None:
                raise HealerError("kd from a logit cache needs top_k (the cache's k); got null")
            if hidden_weight > 0:
                raise HealerError(f"kd hidden_weight={hidden_weight}: hidden-state KD needs the live teacher, not a "
                                  "logit cache")
        else:
            _need_teacher("kd", teacher)
        self.cached = cached
        if hidden_weight < 0:
            raise HealerError(f"kd hidden_weight={hidden_weight}: must be >= 0")
        self.hidden_pairs = [tuple(p) for p in hidden_pairs or []] if hidden_weight > 0 else []
        self.hidden_weight = hidden_weight
        if not 0.0 <= alpha <= 1.0:
            raise HealerError(f"kd alpha={alpha}: must be within [0, 1]")
        if temperature <= 0:
            raise HealerError(f"kd temperature={temperature}: must be > 0")
        if top_k is not None and top_k < 1:
            raise HealerError(f"kd top_k={top_k}: must be >= 1 (or null for the full vocabulary)")
        self.teacher = teacher
        self.alpha, self.temperature, self.top_k = alpha, temperature, top_k
        self.chunk_size = _positive_chunk(chunk_size)
        self.router_aux_loss_coef = _router_coef(router_aux_loss_coef)

    def tokens(self, batch: Batch) -> int:
        return int((_next_token_targets(batch, batch.get("labels") is not None) != -100).sum())

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = _next_token_targets(batch, batch.get("labels") is not None)
        out = _forward(model, batch, router_balance=self.router_aux_loss_coef > 0)
        loss, parts = self._logit_and_hidden(model, batch, out.hidden_states, targets)
        loss = _with_router_balance(loss, parts, out, self.router_aux_loss_coef, int((targets != -100).sum()))
        return loss, parts

    def _logit_and_hidden(self, model, batch: Batch, states, targets: torch.Tensor):
        if self.cached:
            return self._from_cache(model, batch, states, targets)
        with torch.no_grad():
            t_states = _forward_hidden(self.teacher, batch)
        try:
            loss, ce, kl = chunked_head_loss(
                states[-1][:, :-1], targets, output_head(model), teacher_hidden=t_states[-1][:, :-1],
                teacher_head=output_head(self.teacher), alpha=self.alpha, temperature=self.temperature,
                top_k=self.top_k, chunk_size=self.chunk_size)
        except ValueError as err:  # a vocabulary mismatch found at the first chunk
            raise HealerError(f"kd teacher: {err}; the teacher must share the student's tokenizer") from None
        parts = {"ce": ce, "kl": kl}
        if self.hidden_pairs:
            hidden = self._hidden_sum(states, t_states, targets != -100)
            loss = loss + self.hidden_weight * hidden
            parts["hidden"] = hidden.detach()
        return loss, parts

    def _from_cache(self, model, batch: Batch, states, targets: torch.Tensor):
        """The logit loss against the teacher's top-k that came with the batch."""
        values, indices = batch.get("kd_values"), batch.get("kd_indices")
        if values is None or indices is None:
            raise HealerError("kd from a logit cache: the batch carries no kd_values/kd_indices (wrap the batches in "
                              "healer.train.logit_cache.CachedTeacherBatches)")
        if values.shape[-1] != self.top_k:
            raise HealerError(f"kd top_k={self.top_k} but the cached top-k has {values.shape[-1]} logits per position")
        loss, ce, kl = chunked_head_loss(
            states[-1][:, :-1], targets, output_head(model), teacher_topk=TopK(values, indices), alpha=self.alpha,
            temperature=self.temperature, chunk_size=self.chunk_size)
        return loss, {"ce": ce, "kl": kl}

    def _hidden_sum(self, states, t_states, keep: torch.Tensor) -> torch.Tensor:
        """H summed over the supervised positions (``keep``: ``[B, S-1]``, position i predicts token i+1)."""
        total = 0.0
        for s, t in self.hidden_pairs:
            if not (0 <= s < len(states) and 0 <= t < len(t_states)):
                raise HealerError(f"kd hidden pair (student {s}, teacher {t}): the student has hidden states "
                                  f"0..{len(states) - 1} and the teacher 0..{len(t_states) - 1}; the cut points do "
                                  "not fit these models (was cpt.input pruned from cpt.kd.teacher?)")
            total = total + relative_mse(states[s][:, :-1][keep], t_states[t][:, :-1][keep]).sum()
        return total / len(self.hidden_pairs)


class HiddenMSE:
    """MSE between a student hidden state and a teacher hidden state, mean over the hidden size, summed over
    the (non-padding) positions; part "mse".

    teacher: a frozen model (DeepSpeed engine or module) with the student's hidden size.
    student_layer / teacher_layer: indices as in HF ``output_hidden_states``: 0 = the embeddings, i = the
        output of block i; the last index is after the final norm (as Hugging Face returns it).
    """

    name = "hidden_mse"

    def __init__(self, teacher, *, student_layer: int, teacher_layer: int):
        _need_teacher("hidden_mse", teacher)
        self.teacher = teacher
        self.student_layer, self.teacher_layer = student_layer, teacher_layer

    def _mask(self, batch: Batch) -> torch.Tensor | None:
        return batch.get("attention_mask")

    def tokens(self, batch: Batch) -> int:
        mask = self._mask(batch)
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    @staticmethod
    def _pick(states: tuple[torch.Tensor, ...], index: int, key: str) -> torch.Tensor:
        if not 0 <= index < len(states):
            raise HealerError(f"hidden_mse {key}={index}: the model has hidden states 0..{len(states) - 1} "
                              "(0 = embeddings, i = after block i)")
        return states[index]

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student = self._pick(_forward_hidden(model, batch), self.student_layer, "student_layer")
        with torch.no_grad():
            teacher = self._pick(_forward_hidden(self.teacher, batch), self.teacher_layer, "teacher_layer")
        if student.shape != teacher.shape:
            raise HealerError(f"hidden_mse: student hidden state {tuple(student.shape)} and teacher's "
                              f"{tuple(teacher.shape)} differ; both models need the same hidden size")
        per_token = (student.float() - teacher.float()).pow(2).mean(-1)
        mask = self._mask(batch)
        loss = (per_token * mask).sum() if mask is not None else per_token.sum()
        return loss, {"mse": loss.detach()}


OBJECTIVES: dict[str, type] = {"ce": NextTokenCE, "reply_ce": ReplyCE, "kd": Distill, "hidden_mse": HiddenMSE}


def make_objective(kind: str, **kwargs: Any) -> Objective:
    """The objective ``kind`` (a key of :data:`OBJECTIVES`) built from its keyword arguments."""
    cls = OBJECTIVES.get(kind)
    if cls is None:
        raise HealerError(f"objective {kind!r} is unknown; choose one of: {', '.join(OBJECTIVES)}")
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(kwargs) - set(params) - {"self"})
    if unknown:
        accepted = ", ".join(p for p in params if p != "self")
        raise HealerError(f"objective {kind!r} does not take {', '.join(unknown)}; it takes: {accepted}")
    missing = [p.name for p in params.values()
               if p.name != "self" and p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise HealerError(f"objective {kind!r} needs {', '.join(missing)}")
    return cls(**kwargs)

"""Loss-driven domain mixing (``data.dynamic``): Sheared-LLaMA's dynamic batch loading, written for healer.

Every ``every`` optimizer steps the student's validation loss is measured on each domain of
``data.validation`` and compared with a reference loss per domain; the training weights then move
toward the domains that lag it most (Xia et al. 2023, Algorithm 1, after DoReMi)::

    excess_i = max(loss_i - reference_i, 0)
    w <- (1 - c) * softmax(log w + eta * excess) + c / k

The reference is by default the dense teacher's loss on the same validation domains, measured once at
step 0: healing a pruned model means recovering the dense model, so the gap to it per domain is the
work left per domain, it needs no scaling-law fit (Sheared-LLaMA predicts a target-size loss instead,
which ``reference: {domain: loss}`` accepts), and under KD the teacher is loaded anyway.

The numbers every rank sees are all-reduced losses and the update is plain float arithmetic, so every
rank computes the same weights. The new weights reach each stream at its next batch of documents
(:meth:`~healer.train.data.stream.PackedStream.set_weights`); the batch being packed keeps the weights it
was read with, so a resume re-reads it identically. The mixture (weights, reference, history) is saved
beside the data position in every checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from healer.core.errors import HealerError
from healer.train.data.config import DataConfig, DynamicMixConfig
from healer.train.data.stream import Entry


def update_weights(weights: list[float], excess: list[float], *, eta: float, smoothing: float) -> list[float]:
    """One mixture update: ``(1 - smoothing) * softmax(log w + eta * max(excess, 0)) + smoothing / k``.

    Args:
        weights: the current weights, one per domain (positive, summing to 1).
        excess: each domain's validation loss minus its reference; a domain already at or below its
            reference (negative excess) counts as 0, so being ahead never costs a domain its share.
        eta: the step size.
        smoothing: the uniform share mixed in, so that no domain's weight ever reaches 0.
    """
    logits = [math.log(w) + eta * max(x, 0.0) for w, x in zip(weights, excess, strict=True)]
    top = max(logits)  # softmax of shifted logits: no overflow for large excess * eta
    exps = [math.exp(v - top) for v in logits]
    total = sum(exps)
    mixed = [(1.0 - smoothing) * e / total + smoothing / len(weights) for e in exps]
    norm = sum(mixed)
    return [m / norm for m in mixed]


def validation_of_domain(cfg: DataConfig, domain: str) -> DataConfig:
    """``cfg`` with ``data.validation`` narrowed to the records of ``domain`` (for a per-domain loss)."""
    sources = [src.model_copy(update={"domains": {domain: 1.0}})
               for src in cfg.validation if src.domains and src.domains.get(domain, 0) > 0]
    return cfg.model_copy(update={"validation": sources, "dynamic": None})


class DomainMixer:
    """The mixture's state: weights per training entry, the reference loss per domain, and every update.

    Args:
        cfg: the recipe's ``data.dynamic``.
        entries: the training mixture (``plan_entries(data.sources)``), each one domain of a source.
    """

    def __init__(self, cfg: DynamicMixConfig, entries: list[Entry]):
        if any(e.domain is None for e in entries):
            raise HealerError("data.dynamic: every data.sources entry must be split by `domains`")
        self.cfg = cfg
        self.names = [e.name for e in entries]
        self.domains = [e.domain for e in entries]
        self.initial = [e.weight for e in entries]
        self.weights = list(self.initial)
        self.reference: dict[str, float] | None = dict(cfg.reference) if isinstance(cfg.reference, dict) else None
        self.history: list[dict[str, Any]] = []

    def unique_domains(self) -> list[str]:
        return list(dict.fromkeys(self.domains))

    def measure_reference(self, loss_of: Callable[[str], float]) -> None:
        """Set the reference from ``loss_of(domain)`` (the teacher's loss) unless the recipe or a checkpoint gave it."""
        if self.reference is None:
            self.reference = {d: loss_of(d) for d in self.unique_domains()}

    def due(self, step: int) -> bool:
        return step > 0 and step % self.cfg.every == 0

    def update(self, step: int, losses: dict[str, float]) -> dict[str, float]:
        """Move the weights given the student's loss per domain; returns the scalars to log."""
        if self.reference is None:
            raise HealerError("data.dynamic: no reference loss was measured before the first update")
        loss = [losses[d] for d in self.domains]
        excess = [v - self.reference[d] for v, d in zip(loss, self.domains)]
        if all(math.isfinite(x) for x in excess):
            self.weights = update_weights(self.weights, excess, eta=self.cfg.eta, smoothing=self.cfg.smoothing)
        # else (a diverged loss): the weights stay; the NaN/inf goes to the log, never into the mixture
        self.history.append({"step": step, "weights": list(self.weights), "loss": loss, "excess": excess})
        out: dict[str, float] = {}
        for name, domain, v, x in zip(self.names, self.domains, loss, excess):
            out.update({f"mix/loss/{name}": v, f"mix/reference/{name}": self.reference[domain],
                        f"mix/excess/{name}": x})
        return out

    def weight_scalars(self) -> dict[str, float]:
        return {f"mix/weight/{n}": w for n, w in zip(self.names, self.weights)}

    def summary(self) -> dict[str, Any]:
        """What the stage manifest records."""
        return {"weights": dict(zip(self.names, self.weights)), "initial": dict(zip(self.names, self.initial)),
                "reference": self.reference, "updates": len(self.history),
                "eta": self.cfg.eta, "every": self.cfg.every}

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "weights": list(self.weights), "reference": self.reference,
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if list(sd["names"]) != self.names:
            raise HealerError(f"data checkpoint: the mixture was saved for domains {list(sd['names'])}, the recipe "
                              f"has {self.names}; resume with the same data.sources (or start afresh)")
        self.weights = [float(w) for w in sd["weights"]]
        self.reference = sd["reference"] if self.reference is None else self.reference
        self.history = [dict(h) for h in sd["history"]]


class MixedBatches:
    """The loop's ``Batches`` under ``data.dynamic``: the corpus batches, whose mixture a :class:`DomainMixer`
    moves, saved together (the mixture under the data state's ``mixture`` key).

    Args:
        batches: the stage's corpus batches (``.loader``, a ``StreamLoader``; ``.it``, its iterator).
        mixer: the mixture.
    """

    def __init__(self, batches, mixer: DomainMixer):
        self.batches, self.mixer = batches, mixer

    def next(self):
        return self.batches.next()

    def state_dict(self) -> dict[str, Any]:
        return {**self.batches.state_dict(), "mixture": self.mixer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loader = self.batches.loader
        loader.load_state_dict(state)  # the loader reads its own keys only
        mixture = state.get("mixture")
        if mixture is None and "ranks" in state:  # a checkpoint's positions of every rank that wrote it
            mixture = state["ranks"][0].get("mixture")  # the same on every rank: the update is all-reduced
        if mixture is not None:
            self.mixer.load_state_dict(mixture)
            loader.set_weights(self.mixer.weights)  # idempotent: the streams' saved states hold them already
        self.batches.it = iter(loader)

    def source_tokens(self) -> dict[str, int]:
        return self.batches.source_tokens()

    def skipped(self):
        return self.batches.skipped()

    def step(self, step: int, loss_of: Callable[[str], float]) -> dict[str, float]:
        """Collective, at every optimizer step: at an update step, measure the student per domain with
        ``loss_of(domain)`` and hand the new weights to the streams. Returns the scalars to log."""
        out: dict[str, float] = {}
        if self.mixer.due(step):
            out.update(self.mixer.update(step, {d: loss_of(d) for d in self.mixer.unique_domains()}))
            self.batches.loader.set_weights(self.mixer.weights)
            self.batches.it = iter(self.batches.loader)  # batches prefetched under the old weights are dropped
            out.update({f"data/tokens/{k}": v for k, v in self.source_tokens().items()})
        out.update(self.mixer.weight_scalars())
        return out


def plot_weights(mixer: DomainMixer, out_png: str | Path) -> Path | None:
    """Draw each domain's weight over the steps (a step line from step 0); None before the first update."""
    if not mixer.history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from healer.core.plots import save_figure

    steps = [0] + [h["step"] for h in mixer.history]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, name in enumerate(mixer.names):
        ax.step(steps, [mixer.initial[i]] + [h["weights"][i] for h in mixer.history], where="post", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("weight")
    ax.set_title(f"domain weights (data.dynamic, eta={mixer.cfg.eta})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out_png)

"""How sparse a model's block projections are, measured on the weights themselves (eval.json, the model card).

Perplexity of a sparse model means little without how many weights are zero, and a healed model must still
have them: this is the number ``healer eval`` and ``healer release`` put beside perplexity.
"""

from __future__ import annotations

from healer.core.errors import HealerError


def measure_sparsity(model, pattern: str | None = None, ratio: float | None = None) -> dict | None:
    """Zeros in the linear projections of every block: overall, per projection type, and the N:M check.

    ``model``: a causal LM in memory. ``pattern``/``ratio``: what the prune stage aimed at (``prune.sparsity``),
    checked when given; None only counts. Returns None for a family the architecture adapter does not know
    (evaluation still runs on it).
    """
    from healer.model.modeling import count_parameters
    from healer.prune.sparse import verify_sparsity

    try:
        found = verify_sparsity(model, pattern, ratio)["sparsity"]
    except HealerError:
        return None
    return {
        "overall": found["overall"],
        "zeros": found["zeros"],
        "weights": found["weights"],
        "by_type": found["by_type"],
        "pattern": pattern,
        "pattern_holds": found["pattern_holds"],
        "problems": found["problems"][:5],
        "nonzero_parameters": count_parameters(model) - found["zeros"],
    }


def sparsity_target(recipe) -> tuple[str | None, float | None]:
    """(pattern, ratio) the recipe's sparse prune aimed at, else (None, None)."""
    prune = getattr(recipe, "prune", None)
    if prune is None or prune.method != "sparse" or prune.sparsity is None:
        return None, None
    return prune.sparsity.pattern, prune.sparsity.ratio

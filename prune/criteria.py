"""Every pruning criterion, in one dict.

Adding a criterion is one function (in ``depth.py``, ``width.py`` or ``sparse.py``, with that method's signature)
plus one entry in :data:`CRITERIA`. Everything that lists criteria reads this dict: recipe
validation of ``prune.criterion``, its description (``healer schema``, ``healer prune --help``), the
choices offered on the command line, the stage's dispatch and what the report says, and the table
in docs/pruning.md (:func:`criteria_table`; a test keeps the page equal to it).

Signatures, by method:

- depth: ``score(stack, tokens, candidates, count, progress) -> {block: score}``, LOWER = removed
  first; the entry's ``select(scores, count)`` turns scores into the blocks to drop.
- width: ``score(stack, tokens, progress) -> [tensor per block]``, one score per unit of the entry's
  ``target`` (an MLP neuron, a key-value group), HIGHER = kept.
- sparse: ``score(name, weight, statistics, options) -> (pruned weight, extra report fields)`` for one linear
  layer of a block; ``statistics`` is an instance of the entry's ``statistics`` class that saw every
  calibration token the layer received (None for a criterion without data). :func:`healer.prune.sparse.sparsify`
  runs it layer-sequentially; shapes never change, weights become zeros.

``stack`` is a :class:`~healer.prune.blockwise.BlockStack`, read from disk one block at a time when the
entry says ``reads_shards`` and the model is a local directory, else built on the model in memory
(``stack.model``). ``tokens`` are the calibration tokens ``[samples, seq_len]``, or None when the
criterion does not ``need_data`` and no calibration file was given.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _resolve(ref: str) -> Any:
    """The object a ``"module:name"`` reference names, imported now."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Criterion:
    """One criterion: its scoring function and what the rest of healer needs to know about it.

    ``score``, ``select`` and ``statistics`` may be given as ``"module:name"`` references, imported when
    first read: the table itself needs no torch, so validating a recipe against it loads none.
    """

    score: Callable | str
    description: str  # one line: what it scores (docs/pruning.md, `healer schema`, the report)
    needs_data: bool  # scores on calibration text
    reads_shards: bool  # looks at one block at a time, so it can score a model larger than memory
    target: str = "blocks"  # what surgery removes: blocks (depth), mlp neurons, attention KV groups or experts
    keep_ends: tuple[int, int] = (0, 0)  # default prune.keep_first / keep_last (Shortened LLaMA's "+")
    select: Callable[[dict[int, float], int], list[int]] | str = "healer.prune.depth:choose_lowest"  # depth
    scores_are: str | None = None  # what one score value means, when the method's default does not say it
    statistics: type | str | None = None  # sparse: what hooks collect per linear layer from the calibration tokens

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        return _resolve(value) if name in _REFERENCES and isinstance(value, str) else value


_REFERENCES = frozenset({"score", "select", "statistics"})


CRITERIA: dict[str, dict[str, Criterion]] = {
    "depth": {
        "ppl": Criterion(
            "healer.prune.depth:ppl_scores",
            "calibration perplexity with that one block removed; the prefix before "
            "the block is computed once", needs_data=True, reads_shards=False, keep_ends=(4, 2)),
        "taylor": Criterion(
            "healer.prune.depth:taylor_scores",
            "Σ|w · ∂L/∂w| over the block's weights (Shortened LLaMA "
            "Taylor+)", needs_data=True, reads_shards=False, keep_ends=(4, 2)),
        "magnitude": Criterion(
            "healer.prune.depth:magnitude_scores",
            "L2 norm of the block's weights", needs_data=False,
            reads_shards=True),
        "block_influence": Criterion(
            "healer.prune.depth:block_influence_scores",
            "mean 1 − cos(block input, block output) "
            "(ShortGPT)", needs_data=True, reads_shards=True),
        "angular": Criterion(
            "healer.prune.depth:angular_scores",
            "the contiguous span of n blocks with the smallest input/output "
            "angular distance (Gromov et al.)", needs_data=True, reads_shards=True,
            select="healer.prune.depth:lowest_span", scores_are="angular distance across the span of the removed "
            "number of blocks starting at each index; lower = removed first"),
    },
    "width": {
        "maw": Criterion(
            "healer.prune.width:maw_scores",
            "max(w) + |min(w)| of each neuron's gate and up rows",
            needs_data=False, reads_shards=True, target="mlp"),
        "l2": Criterion(
            "healer.prune.width:l2_scores",
            "L2 norm of the neuron's gate row, up row and down column",
            needs_data=False, reads_shards=True, target="mlp"),
        "activation": Criterion(
            "healer.prune.width:activation_scores",
            "mean |act(gate·x) · up·x| on calibration data "
            "(Minitron)", needs_data=True, reads_shards=True, target="mlp"),
        "head_norm": Criterion(
            "healer.prune.width:head_output_scores",
            "norm of each query head's contribution to the residual "
            "stream, summed per KV group", needs_data=True, reads_shards=True, target="attention"),
        "frequency": Criterion(
            "healer.prune.experts:frequency_scores",
            "share of calibration tokens the router sends to each expert",
            needs_data=True, reads_shards=False, target="experts"),
        "reap": Criterion(
            "healer.prune.experts:reap_scores",
            "mean routing weight × ‖expert output‖ over the tokens routed to the "
            "expert (REAP, Lasby et al.)", needs_data=True, reads_shards=False, target="experts"),
    },
    "sparse": {
        "wanda": Criterion(
            "healer.prune.sparse:prune_wanda",
            "|W|·‖X‖ compared within each output row, no weight update "
            "(Sun et al.)", needs_data=True, reads_shards=True, target="weights",
            statistics="healer.prune.sparse:ColumnNorms"),
        "sparsegpt": Criterion(
            "healer.prune.sparse:prune_sparsegpt",
            "OBS saliency with the damped Hessian XᵀX, the remaining "
            "weights updated to compensate (Frantar & Alistarh)", needs_data=True,
            reads_shards=True, target="weights", statistics="healer.prune.sparsegpt:Hessian"),
        "magnitude": Criterion(
            "healer.prune.sparse:prune_magnitude",
            "|W| compared over the whole layer, no data, no update",
            needs_data=False, reads_shards=True, target="weights"),
    },
}

METHODS = tuple(CRITERIA)
WIDTH_TARGETS = tuple(dict.fromkeys(c.target for c in CRITERIA["width"].values()))
DEFAULT_SCORES_ARE = {"depth": "lower = less important, removed first", "width": "higher = more important, kept",
                      "sparse": "lower = set to zero"}


def criterion_names() -> tuple[str, ...]:
    """Every criterion name, once each (``magnitude`` is both depth and sparse), for command-line choices."""
    return tuple(dict.fromkeys(name for table in CRITERIA.values() for name in table))


def get_criterion(method: str, name: str, target: str | None = None) -> Criterion:
    """The entry for ``name`` under ``method`` (and ``target``, for width); ValueError naming prune.criterion."""
    table = CRITERIA[method]
    spec = table.get(name)
    if spec is None:
        other = next((m for m, t in CRITERIA.items() if name in t and m != method), None)
        hint = f" ({name!r} is a {other} criterion: set prune.method: {other})" if other else ""
        raise ValueError(f"prune.criterion: unknown {method} criterion {name!r}; choose one of "
                         f"{', '.join(table)}{hint}")
    if target is not None and spec.target != target:
        allowed = [n for n, c in table.items() if c.target == target]
        raise ValueError(f"prune.criterion: {name!r} prunes {spec.target}, not {target} (prune.target); for "
                         f"{target} choose one of {', '.join(allowed)}")
    return spec


def describe_choices() -> str:
    """One line listing the criteria of every method, for the field description of prune.criterion."""
    parts = []
    for method, table in CRITERIA.items():
        names = [n if c.target in ("blocks", "weights") else f"{n} ({c.target})" for n, c in table.items()]
        parts.append(f"{method}: {', '.join(names)}")
    free = list(dict.fromkeys(n for t in CRITERIA.values() for n, c in t.items() if not c.needs_data))
    return f"{'; '.join(parts)}. All but {', '.join(free)} need prune.calibration.path"


def criteria_table() -> str:
    """The criteria table of docs/pruning.md, in Markdown."""
    removes = {"blocks": "blocks", "mlp": "MLP neurons", "attention": "KV groups", "weights": "weights (zeroed)"}
    rows = ["| method | criterion | removes | what it scores | data | scored from disk, one block at a time |",
            "| --- | --- | --- | --- | --- | --- |"]
    for method, table in CRITERIA.items():
        for name, c in table.items():
            what = c.description.replace("|", "\\|")
            rows.append(f"| {method} | `{name}` | {removes.get(c.target, c.target)} | {what} | "
                        f"{'yes' if c.needs_data else 'no'} | {'yes' if c.reads_shards else 'no'} |")
    return "\n".join(rows)

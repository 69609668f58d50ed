"""Recipe section ``prune:``: what to remove and how to choose it.

Which methods, criteria and targets exist comes from :data:`healer.prune.criteria.CRITERIA`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from healer.core.config_base import Section
from healer.core.errors import HealerError
from healer.prune.criteria import (
    CRITERIA,
    METHODS,
    WIDTH_TARGETS,
    Criterion,
    criterion_names,
    describe_choices,
    get_criterion,
)
from healer.prune.pattern import parse_pattern

# The roles healer.model.adapter.projection_paths resolves per family (qkv_proj and gate_up_proj: fused ones).
PROJECTION_ROLES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                    "down_proj")


def _end_defaults(side: int) -> str:
    """'4 for ppl, taylor; else 0': the registry's default protected blocks at one end."""
    by_value: dict[int, list[str]] = {}
    for table in CRITERIA.values():
        for name, spec in table.items():
            if spec.keep_ends[side]:
                by_value.setdefault(spec.keep_ends[side], []).append(name)
    return "; ".join(f"{v} for {', '.join(names)}" for v, names in by_value.items()) + "; else 0"



def is_span(blocks: list[int]) -> bool:
    """Whether ``blocks`` are consecutive indices (in any order, no repeats)."""
    b = sorted(set(blocks))
    return len(b) == len(blocks) and b == list(range(b[0], b[0] + len(b)))


class CalibrationConfig(Section):
    """Text the data-driven criteria score on: N samples of L tokens, drawn with a seed."""

    path: str | None = Field(None, description="jsonl with a text field, or a plain-text file")
    text_field: str = Field("text", description="key of the text in each jsonl record")
    num_samples: int = Field(10, gt=0, description="calibration samples drawn")
    seq_len: int = Field(128, gt=1, description="tokens per sample")
    seed: int = Field(0, description="which samples are drawn")
    max_documents: int = Field(20000, gt=0, description="documents read from the file before shuffling")


class SparsityConfig(Section):
    """``prune.method: sparse``: which weights of the block projections become zero; shapes never change."""

    pattern: str = Field("unstructured", description="unstructured (a ratio of each layer's weights), or N:M such "
                         "as \"2:4\" / \"4:8\": at most N nonzeros in every M consecutive input weights of a row")
    ratio: float | None = Field(None, description="unstructured: fraction of weights set to zero (e.g. 0.5); "
                                "N:M implies 1 - N/M")
    layers: list[str] | None = Field(None, description=f"projections to prune, of {', '.join(PROJECTION_ROLES)}; "
                                     "default all (embeddings and lm_head never)")
    blocksize: int = Field(128, gt=0, description="sparsegpt: columns updated together (a multiple of M for N:M)")
    percdamp: float = Field(0.01, ge=0, lt=1, description="sparsegpt: Hessian damping, a fraction of its mean "
                            "diagonal")

    @field_validator("pattern", mode="before")
    @classmethod
    def _sexagesimal(cls, value):
        # YAML 1.1 (and so `--pattern 2:4`) reads an unquoted N:M as the base-60 integer N*60+M; nobody means
        # a number here, so read it back as the N:M it came from.
        if isinstance(value, int) and not isinstance(value, bool):
            n, m = divmod(value, 60)
            if not 0 < n < m:
                raise ValueError(f"prune.sparsity.pattern is the number {value}; give 'unstructured' or N:M in "
                                 "quotes, e.g. pattern: \"2:4\"")
            return f"{n}:{m}"
        return value

    @model_validator(mode="after")
    def _check(self) -> "SparsityConfig":
        try:
            pattern = parse_pattern(self.pattern, self.ratio)
        except HealerError as err:
            raise ValueError(str(err)) from None
        if self.layers is not None:
            unknown = [name for name in self.layers if name not in PROJECTION_ROLES]
            if unknown or not self.layers:
                raise ValueError(f"prune.sparsity.layers: {unknown or '[]'} not projections of a block; choose from "
                                 f"{', '.join(PROJECTION_ROLES)} (embeddings and lm_head are never pruned)")
        if pattern.is_nm and self.blocksize % pattern.m:
            raise ValueError(f"prune.sparsity.blocksize {self.blocksize} must be a multiple of M={pattern.m} for "
                             f"pattern {self.pattern!r}")
        return self


class ReplaceConfig(Section):
    """LLM-Streamline: cut one contiguous span and put one standard block, trained by the ``replace`` stage, in
    its place."""

    kind: Literal["none", "layer", "ffn"] = Field(
        "none", description="none: plain cut; layer: one decoder block of the same family replaces the span "
        "(num_hidden_layers = kept + 1); ffn is refused: a lone MLP is no standard block (see docs/pruning.md)")
    init: Literal["closest", "first", "last"] = Field(
        "closest", description="which block of the span the replacement starts as: closest (its output nearest "
        "the span's on calibration, needs prune.calibration.path), first or last")


def parse_tokens(value) -> int:
    """``50M``, ``1.5B``, ``200k`` or a plain number -> a token count (YAML reads ``50M`` as a string)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a token count")
    if isinstance(value, (int, float)):
        count = value
    else:
        text = str(value).strip().replace("_", "").replace(",", "")
        scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}.get(text[-1:].lower(), 1)
        try:
            count = float(text[:-1] if scale > 1 else text) * scale
        except ValueError:
            raise ValueError(f"{value!r} is not a token count; write e.g. 50M, 1.5B or 200000") from None
    if count < 0 or count != count:
        raise ValueError(f"{value!r} is not a token count (>= 0)")
    return int(round(count))


class RoundConfig(Section):
    """One round of an iterative schedule: prune ``ratio`` of the ORIGINAL model, then heal on ``heal_tokens``."""

    ratio: float = Field(description="fraction of the original model's blocks (depth) or MLP neurons / KV groups "
                         "(width) this round removes; the rounds' ratios add up")
    heal_tokens: int = Field(0, description="tokens this round heals on with the cpt: settings (50M, 1.5B, ...): "
                             "ceil(tokens / (cpt.global_batch_size * data.seq_len)) optimizer steps; 0: no heal "
                             "before the next round (after the last one, the cpt: stage is the heal)")

    @field_validator("heal_tokens", mode="before")
    @classmethod
    def _tokens(cls, value):
        return parse_tokens(value)

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, value):
        if not 0.0 < value < 1.0:
            raise ValueError(f"a round's ratio must be between 0 and 1 (exclusive), got {value}")
        return value


class PruneConfig(Section):
    method: Literal[METHODS] = Field("depth", description=f"{' or '.join(METHODS)}: remove whole blocks, shrink "
                                     "every block's MLP / attention, or zero weights inside the projections")
    criterion: str = Field("ppl", description=f"how to choose what goes (default: the method's first); "
                           f"{describe_choices()}",
                           json_schema_extra={"choices": list(criterion_names())})
    target: Literal[WIDTH_TARGETS] | None = Field(
        None, description=f"width only: {' or '.join(WIDTH_TARGETS)}; default: what the criterion prunes")
    ratio: float | None = Field(None, description="fraction of blocks (depth) or of neurons/KV groups/experts (width)")
    experts: int | None = Field(None, gt=0, description="expert pruning (criterion frequency or reap): experts kept "
                                "in every mixture-of-experts block, in place of prune.ratio")
    num_blocks: int | None = Field(None, gt=0, description="depth: number of blocks to remove")
    blocks: list[int] | None = Field(None, description="depth: explicit block indices to remove")
    keep_first: int | None = Field(None, ge=0, description=f"depth: blocks never removed at the start (default "
                                   f"{_end_defaults(0)})")
    keep_last: int | None = Field(None, ge=0, description=f"depth: blocks never removed at the end (default "
                                  f"{_end_defaults(1)})")
    round_to: int = Field(256, gt=0, description="width: kept intermediate size is a multiple of this; 256 lets "
                          "llama.cpp k-quantise ffn_down (QK_K=256) and fits Marlin/AWQ (128); smaller values are "
                          "warned about in prune_report.json")
    sparsity: SparsityConfig | None = Field(None, description="sparse only: pattern, ratio, layers (and sparsegpt's "
                                            "blocksize, percdamp)")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    output: str | None = Field(None, description="stage directory; defaults to <run_dir>/prune")
    verify_atol: float = Field(1e-3, gt=0, description="max |logit difference| allowed after reload")
    replace: ReplaceConfig = Field(default_factory=ReplaceConfig,
                                   description="depth: replace the removed span by one trained block")
    rounds: list[RoundConfig] | None = Field(
        None, description="iterative pruning instead of one shot: [{ratio: 0.2, heal_tokens: 50M}, ...]; each "
        "round prunes the previous round's healed model (criteria recomputed on it) into <run_dir>/roundK/prune "
        "and heals it into <run_dir>/roundK/cpt; ratios are of the original model and add up; `healer run` "
        "runs them, then cpt:, sft:, eval:, release:")

    @model_validator(mode="before")
    @classmethod
    def _default_criterion(cls, data):
        # The default criterion is the method's first entry (ppl, maw, wanda), not depth's for every method.
        if isinstance(data, dict) and data.get("criterion") is None and data.get("method") in CRITERIA:
            data = {**data, "criterion": next(iter(CRITERIA[data["method"]]))}
        return data

    @model_validator(mode="after")
    def _check(self) -> "PruneConfig":
        get_criterion(self.method, self.criterion, self.target if self.method == "width" else None)
        if self.rounds is not None:
            self._check_rounds()
            return self
        if self.method != "sparse" and self.sparsity is not None:
            raise ValueError(f"prune.sparsity applies to method: sparse only (prune.method is {self.method})")
        if self.method == "sparse":
            given = [k for k in ("ratio", "num_blocks", "blocks", "experts", "target") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"prune.{given[0]} does not apply to method: sparse; say how many weights to zero "
                                 "under prune.sparsity (pattern, ratio; --pattern / --sparsity on the command line)")
            if self.sparsity is None:
                raise ValueError("prune.sparsity is required for method: sparse, e.g. {pattern: unstructured, "
                                 "ratio: 0.5} or {pattern: \"2:4\"}")
        elif self.method == "depth":
            if self.experts is not None:
                raise ValueError("prune.experts applies to expert pruning (method: width, criterion frequency or "
                                 "reap); depth takes ratio, num_blocks or blocks")
            given = [k for k in ("ratio", "num_blocks", "blocks") if getattr(self, k) is not None]
            if len(given) > 1:
                raise ValueError(f"prune: give only one of ratio, num_blocks, blocks (got {', '.join(given)})")
            if not given:
                raise ValueError("prune: say how much to remove: prune.ratio (fraction of blocks), prune.num_blocks "
                                 "or prune.blocks (indices)")
        else:
            if self.num_blocks is not None or self.blocks is not None:
                raise ValueError("prune.num_blocks / prune.blocks apply to method: depth only; width takes prune.ratio")
            experts = self.spec.target == "experts"
            if self.experts is not None and not experts:
                raise ValueError(f"prune.experts applies to expert pruning (criterion frequency or reap), not "
                                 f"criterion {self.criterion}; give prune.ratio")
            if self.experts is not None and self.ratio is not None:
                raise ValueError("prune: give only one of ratio, experts (the experts kept per block)")
            if self.ratio is None and self.experts is None:
                raise ValueError("prune.ratio is required for method: width (the fraction of neurons / KV groups"
                                 + (" / experts), or prune.experts (experts kept per block)" if experts else ")"))
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ValueError(f"prune.ratio must be between 0 and 1 (exclusive), got {self.ratio}")
        if self.blocks is not None:
            if not self.blocks:
                raise ValueError("prune.blocks is empty, so nothing would be removed; list the block indices to "
                                 "remove (e.g. [3, 7]) or use prune.ratio / prune.num_blocks")
            repeated = sorted({b for b in self.blocks if self.blocks.count(b) > 1})
            if repeated:
                raise ValueError(f"prune.blocks lists {repeated} more than once; list each block to remove once")
        return self

    def _check_rounds(self) -> None:
        if not self.rounds:
            raise ValueError("prune.rounds is empty; list the rounds ([{ratio: 0.2, heal_tokens: 50M}, ...]) or "
                             "drop the key for one-shot pruning")
        if self.method == "sparse":
            raise ValueError("prune.rounds applies to method: depth or width; sparse pruning is one-shot "
                             "(prune.sparsity)")
        given = [k for k in ("ratio", "num_blocks", "blocks", "experts", "output") if getattr(self, k) is not None]
        if given:
            raise ValueError(f"prune.{given[0]} and prune.rounds both say what to remove; with rounds each "
                             "round's ratio does (and each round writes <run_dir>/roundK/prune), drop "
                             f"prune.{given[0]}")
        if self.replace.kind != "none":
            raise ValueError("prune.rounds with prune.replace: a replacement block stands in for one one-shot "
                             "span; use one round, or replace.kind: none")
        total = sum(r.ratio for r in self.rounds)
        if total >= 1.0:
            raise ValueError(f"prune.rounds remove {total:g} of the original model in total "
                             f"({' + '.join(f'{r.ratio:g}' for r in self.rounds)}); the ratios are of the "
                             "original model and must add up to less than 1")

    @property
    def total_ratio(self) -> float | None:
        """What the whole prune removes, as a fraction of the original model (the rounds' sum, or ``ratio``)."""
        return sum(r.ratio for r in self.rounds) if self.rounds else self.ratio

    @model_validator(mode="after")
    def _check_replace(self) -> "PruneConfig":
        kind = self.replace.kind
        if kind == "none":
            return self
        if kind == "ffn":
            raise ValueError("prune.replace.kind: ffn (an MLP without attention) is not a standard decoder block, so "
                             "the checkpoint would need code only healer has; use kind: layer (see docs/pruning.md, "
                             "LLM-Streamline)")
        if self.method != "depth":
            raise ValueError(f"prune.replace.kind: {kind} replaces removed blocks; it needs prune.method: depth")
        if self.blocks is not None and not is_span(self.blocks):
            raise ValueError(f"prune.blocks {self.blocks} are not consecutive; prune.replace.kind: {kind} replaces "
                             "one contiguous span (e.g. [4, 5, 6])")
        if self.replace.init == "closest" and self.calibration.path is None:
            raise ValueError("prune.replace.init: closest compares the span's blocks on calibration text; give "
                             "prune.calibration.path or choose init: first / last")
        return self

    @property
    def replacing(self) -> bool:
        """Whether the removed span gets a replacement block."""
        return self.method == "depth" and self.replace.kind != "none"

    @property
    def spec(self) -> Criterion:
        """This criterion's entry in the registry."""
        return get_criterion(self.method, self.criterion)

    @property
    def protected(self) -> tuple[int, int]:
        """(first, last) blocks kept whatever their score: Shortened LLaMA's '+' heuristic by default."""
        first, last = self.spec.keep_ends
        return (self.keep_first if self.keep_first is not None else first,
                self.keep_last if self.keep_last is not None else last)

    @property
    def needs_calibration(self) -> bool:
        return self.blocks is None and self.spec.needs_data

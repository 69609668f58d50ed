"""Recipe section ``prune:``: what to remove and how to choose it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from healer.config_base import Section

DEPTH_CRITERIA = ("ppl", "taylor", "magnitude", "block_influence", "angular")
WIDTH_CRITERIA = {"mlp": ("maw", "l2", "activation"), "attention": ("head_norm",)}
DATA_FREE_CRITERIA = ("magnitude", "maw", "l2")


class CalibrationConfig(Section):
    """Text the data-driven criteria score on: N samples of L tokens, drawn with a seed."""

    path: str | None = Field(None, description="jsonl with a text field, or a plain-text file")
    text_field: str = "text"
    num_samples: int = Field(10, gt=0)
    seq_len: int = Field(128, gt=1)
    seed: int = 0
    max_documents: int = Field(20000, gt=0, description="documents read from the file before shuffling")


class PruneConfig(Section):
    method: Literal["depth", "width"] = "depth"
    criterion: str = "ppl"
    target: Literal["mlp", "attention"] = Field("mlp", description="width only: what to shrink")
    ratio: float | None = Field(None, description="fraction of blocks (depth) or of neurons/KV groups (width)")
    num_blocks: int | None = Field(None, gt=0, description="depth: number of blocks to remove")
    blocks: list[int] | None = Field(None, description="depth: explicit block indices to remove")
    keep_first: int | None = Field(None, ge=0, description="blocks never removed at the start (default 4 for ppl/taylor)")
    keep_last: int | None = Field(None, ge=0, description="blocks never removed at the end (default 2 for ppl/taylor)")
    round_to: int = Field(8, gt=0, description="width: kept intermediate size is a multiple of this")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    output: str | None = Field(None, description="stage directory; defaults to <run_dir>/prune")
    verify_atol: float = Field(1e-3, gt=0, description="max |logit difference| allowed after reload")

    @model_validator(mode="after")
    def _check(self) -> "PruneConfig":
        if self.method == "depth":
            if self.criterion not in DEPTH_CRITERIA:
                raise ValueError(
                    f"prune.criterion: unknown depth criterion {self.criterion!r}; choose one of {', '.join(DEPTH_CRITERIA)}"
                )
            given = [k for k in ("ratio", "num_blocks", "blocks") if getattr(self, k) is not None]
            if len(given) > 1:
                raise ValueError(f"prune: give only one of ratio, num_blocks, blocks (got {', '.join(given)})")
        else:
            allowed = WIDTH_CRITERIA[self.target]
            if self.criterion not in allowed:
                raise ValueError(
                    f"prune.criterion: {self.criterion!r} does not prune {self.target}; choose one of {', '.join(allowed)}"
                )
            if self.num_blocks is not None or self.blocks is not None:
                raise ValueError("prune.num_blocks / prune.blocks apply to method: depth only; width takes prune.ratio")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ValueError(f"prune.ratio must be between 0 and 1 (exclusive), got {self.ratio}")
        return self

    @property
    def protected(self) -> tuple[int, int]:
        """(first, last) blocks kept whatever their score: Shortened LLaMA's '+' heuristic."""
        plus = self.criterion in ("ppl", "taylor")
        first = self.keep_first if self.keep_first is not None else (4 if plus else 0)
        last = self.keep_last if self.keep_last is not None else (2 if plus else 0)
        return first, last

    @property
    def needs_calibration(self) -> bool:
        return self.blocks is None and self.criterion not in DATA_FREE_CRITERIA

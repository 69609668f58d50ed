"""Recipe section ``eval:``."""

from __future__ import annotations

from pydantic import Field

from healer.config_base import Section


class EvalConfig(Section):
    input: str | None = Field(None, description="checkpoint to evaluate; defaults to the last stage's output")
    output: str | None = None
    perplexity_files: list[str] = Field(default_factory=list, description="plain text or jsonl files")
    context_lengths: list[int] = Field(default_factory=lambda: [128, 2048])
    max_tokens: int | None = Field(None, gt=0, description="cap on tokens read per file")
    tasks: dict[str, str] = Field(
        default_factory=dict, description="zero-shot task name -> local data file (HF schema), e.g. arc_easy: path"
    )
    limit: int | None = Field(None, gt=0, description="examples per task")
    batch_size: int = Field(8, gt=0)
    compare_to: str | None = Field(None, description="eval.json of the dense model, or 'dense' to evaluate it")

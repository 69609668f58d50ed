"""Recipe section ``eval:``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from healer.core.config_base import Section


class EvalConfig(Section):
    input: str | None = Field(None, description="checkpoint to evaluate; defaults to the last stage's output")
    output: str | None = Field(None, description="stage directory; defaults to <run_dir>/eval")
    perplexity_files: list[str] = Field(
        default_factory=list, description=".jsonl/.json/.parquet (field `text`) or .txt (a document a line) files, "
                                          ".zst/.gz allowed; documents are joined with a blank line"
    )
    context_lengths: list[int] = Field(
        default_factory=lambda: [128, 2048],
        description="perplexity window sizes; one above the model's max positions is skipped with a note",
    )
    max_tokens: int | None = Field(None, gt=0, description="cap on tokens read per file")
    bos: Literal["auto", "always", "never"] = Field(
        "auto",
        description="BOS at the start of each perplexity window and lm-eval request: auto = as the tokenizer "
        "does by default; the policy used is written into eval.json",
    )
    tasks: dict[str, str] = Field(
        default_factory=dict,
        description="zero-shot task -> local data file in the HF schema (arc_easy, arc_challenge, piqa, boolq, "
        "hellaswag, winogrande, openbookqa, lambada_openai, lambada_standard; lambada = lambada_openai), e.g. "
        "arc_easy: data/arc_easy/validation.jsonl; run through lm-eval's own task YAML for that name",
    )
    limit: int | None = Field(None, gt=0, description="examples per task (the first N; lm_eval --limit)")
    batch_size: int = Field(8, gt=0, description="windows (perplexity) or requests (tasks) per forward pass")
    compare_to: str | None = Field(
        None, description="eval.json of the dense model, or 'dense' to evaluate model.source with the same settings"
    )

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: dict[str, str]) -> dict[str, str]:
        # An unknown name is refused when the recipe is read, not after the perplexity pass.
        from healer.core.errors import HealerError
        from healer.eval.tasks import task_spec

        for name in tasks:
            try:
                task_spec(name)
            except HealerError as err:
                raise ValueError(str(err).removeprefix("eval.tasks: ")) from None
        return tasks

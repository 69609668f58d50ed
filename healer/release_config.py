"""Recipe section ``release:``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from healer.config_base import Section


class ReleaseConfig(Section):
    input: str | None = Field(None, description="checkpoint to release; defaults to the last training stage's output")
    output: str | None = Field(None, description="release directory; defaults to <run_dir>/release")
    model_name: str | None = Field(None, description="name in the model card; defaults to the recipe's name")
    repo_id: str | None = Field(None, description="hub id the card's usage snippet loads, e.g. org/name")
    base_model: str | None = Field(
        None, description="hub id of the base model for the card's front matter; guessed from model.source when unset"
    )
    dtype: str | None = Field(None, description="dtype of the released weights (float32, bfloat16, float16); "
                              "defaults to model.dtype")
    license: str | None = Field(None, description="defaults to the base model's licence when known")
    tags: list[str] = Field(default_factory=lambda: ["pruned", "healer"])
    gguf: list[Literal["f32", "f16", "bf16", "q8_0"]] = Field(
        default_factory=list,
        description="GGUF files to write beside the weights, e.g. [f16, q8_0], as gguf/<name>-<type>.gguf; each is "
        "loaded back and its logits checked against the checkpoint before the release is written",
    )

    @field_validator("gguf")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"lists a type twice ({', '.join(value)}); name each GGUF type once")
        return value

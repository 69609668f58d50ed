"""Recipe section ``release:``."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from healer.core.config_base import Section

# A Hub repository id as the Hub accepts it: one namespace, one name, no path, no URL.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
# A model name as the Hub spells a repository name; it also names the GGUF files and titles the card.
MODEL_NAME = re.compile(r"[A-Za-z0-9][\w.+-]{0,95}")


class ReleaseConfig(Section):
    input: str | None = Field(None, description="checkpoint to release; defaults to the last training stage's output")
    output: str | None = Field(None, description="release directory; defaults to <run_dir>/release")
    model_name: str | None = Field(None, description="name in the model card; defaults to the recipe's name")
    repo_id: str | None = Field(None, description="hub id the card's usage snippet loads, e.g. org/name")
    base_model: str | None = Field(
        None, description="hub id of the base model for the card's front matter; guessed from model.source when unset"
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the released weights: bfloat16 (half the download of float32, the range "
        "of float32), float16 (checked for overflow) or float32")
    license: str | None = Field(None, description="defaults to the base model's licence when known")
    tags: list[str] = Field(default_factory=lambda: ["pruned", "healer"], description="tags in the model card's "
                                                                                        "front matter")
    language: list[str] | None = Field(None, description="ISO 639-1 codes for the card; defaults to the base model's")
    push: str | None = Field(None, description="Hub repo (org/name) to upload the finished release to with "
                             "HfApi.upload_folder; the token comes from HF_TOKEN or `hf auth login`, never the recipe")
    private: bool = Field(False, description="create the pushed repo private (an existing repo keeps its visibility)")
    revision: str | None = Field(None, description="branch to push to (created if missing); default the main branch")
    commit_message: str | None = Field(None, description="commit message of the push; default names the release folder")

    gguf: list[Literal["f32", "f16", "bf16", "q8_0"]] = Field(
        default_factory=list,
        description="GGUF files to write beside the weights, e.g. [f16, q8_0], as gguf/<name>-<type>.gguf; each is "
        "loaded back and its logits checked against the checkpoint before the release is written",
    )

    @field_validator("revision")
    @classmethod
    def _branch(cls, value: str | None) -> str | None:
        bad = value is not None and (not re.fullmatch(r"\w[\w.\-/]*", value) or ".." in value
                                     or value.endswith(("/", ".lock")))
        if bad:
            raise ValueError(f"release.revision {value!r} is not a usable branch name; use letters, digits, '-', "
                             "'_', '.' and '/' (e.g. v1 or pruned-20pct)")
        return value

    @field_validator("push", "repo_id", "base_model")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        # Each goes into the card (front matter, the usage snippet's quotes): a quote or newline would rewrite it.
        if value is not None and not REPO_ID.fullmatch(value):
            raise ValueError(f"{value!r} is not a Hub repo id; give org/name (e.g. myorg/my-model)")
        return value

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        if value is not None and not MODEL_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a model name: letters, digits and . _ - + only, at most 96 "
                             "(e.g. SmolLM2-113M-healed)")
        return value

    @field_validator("gguf")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"lists a type twice ({', '.join(value)}); name each GGUF type once")
        return value

"""Recipe section ``release:``."""

from __future__ import annotations

from pydantic import Field

from healer.config_base import Section


class ReleaseConfig(Section):
    input: str | None = None
    output: str | None = None
    model_name: str | None = None
    license: str | None = Field(None, description="defaults to the base model's licence when known")
    tags: list[str] = Field(default_factory=lambda: ["pruned", "healer"])

"""Recipe section ``data:``: where the continued-pretraining tokens come from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from healer.config_base import Section


class SourceConfig(Section):
    """One corpus: files, a directory, a glob, a URL or a hub dataset id."""

    path: str = Field(description="file, directory, glob (train/chunk*/*.jsonl.zst), URL or hub id (hf://org/name)")
    name: str | None = Field(None, description="label used in logs; defaults to the path's stem or the domain")
    weight: float = Field(1.0, gt=0, description="share of the mixture, by tokens")
    text_field: str = "text"
    domain_field: str | None = Field(
        "meta.redpajama_set_name", description="dotted field that names a record's domain, for per-domain mixing"
    )
    domains: dict[str, float] | None = Field(
        None, description="split this source by domain, each with its own token weight (e.g. SlimPajama's)"
    )
    split: str = "train"


class DataConfig(Section):
    """A token stream for training: sources, mixture, tokenization and packing."""

    sources: list[SourceConfig] = Field(default_factory=list)
    validation: list[SourceConfig] = Field(default_factory=list, description="held-out stream for validation loss")
    seq_len: int = Field(2048, gt=1)
    on_exhausted: Literal["repeat", "stop"] = "repeat"
    bad_records: Literal["skip", "strict"] = "skip"
    reset_position_ids: bool = False
    tokenizer_batch_size: int = Field(256, gt=0)
    num_workers: int = Field(0, ge=0)
    seed: int = 0

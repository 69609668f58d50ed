"""Recipe section ``data:``: where the continued-pretraining tokens come from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from healer.config_base import Section


class SourceConfig(Section):
    """One corpus: files, a directory, a glob, or a remote path (s3://, https://, hf://datasets/org/name/...)."""

    path: str = Field(description="file, directory, glob (train/chunk*/*.jsonl.zst) or fsspec URL "
                                  "(hf://datasets/cerebras/SlimPajama-627B/train/chunk1/*.jsonl.zst)")
    name: str | None = Field(None, description="label used in logs; defaults to the path's stem or the domain")
    weight: float = Field(1.0, gt=0, allow_inf_nan=False, description="share of the mixture, by tokens")
    text_field: str = Field("text", description="dotted key of the document text in each JSON record")
    domain_field: str | None = Field(
        "meta.redpajama_set_name", description="dotted field that names a record's domain, for per-domain mixing"
    )
    domains: dict[str, float] | None = Field(
        None, description="split this source by domain, each with its own token weight (e.g. SlimPajama's); "
                          "records of other domains are left out, and so are domains of weight 0"
    )

    @field_validator("domains")
    @classmethod
    def _weights_are_shares(cls, domains: dict[str, float] | None) -> dict[str, float] | None:
        # the error is reported under this source's `domains` key, so the message names the domain
        if domains is None:
            return None
        for name, weight in domains.items():
            if not weight >= 0 or weight == float("inf"):  # `not >=` also catches NaN
                raise ValueError(f"weight of domain {name!r} is {weight}; give a share >= 0")
        if not domains or sum(domains.values()) <= 0:
            raise ValueError("the domain weights sum to 0, so nothing would be read; give at least one domain "
                             "a weight above 0 (or leave `domains` out to read every record)")
        return domains


class DataConfig(Section):
    """A token stream for training: sources, mixture, tokenization and packing."""

    sources: list[SourceConfig] = Field(default_factory=list)
    validation: list[SourceConfig] = Field(default_factory=list, description="held-out stream for validation loss")
    seq_len: int = Field(2048, gt=1)
    on_exhausted: Literal["repeat", "stop", "drain"] = Field(
        "repeat", description="when a source runs out: repeat it (new epoch), stop the stream, or drain "
                              "(go on with the others until all are out: one pass)")
    bad_records: Literal["skip", "strict"] = Field(
        "skip", description="skip: skip and count malformed records, corrupt shards, empty texts; "
                            "strict: stop at the first one, naming file and line")
    reset_position_ids: bool = Field(False, description="also return position_ids restarting at each document")
    bos: bool = Field(False, description="put the tokenizer's BOS token before every document (EOS always ends one)")
    tokenizer_batch_size: int = Field(256, gt=0, description="documents tokenized per call")
    num_workers: int = Field(0, ge=0, description="dataloader worker processes per rank (0: read in the trainer)")
    shuffle_files: bool = Field(True, description="shuffle each worker's shard order every epoch (seeded)")
    repeat_cache_mb: int = Field(
        16, ge=0, description="from its 2nd epoch on, keep a source's (domain's) documents in memory when a "
                              "worker's share is at most this many MB of text: upsampled small domains are "
                              "then not re-read from the shards; 0 = off")
    seed: int = 0

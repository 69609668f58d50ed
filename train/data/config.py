"""Recipe section ``data:``: where the continued-pretraining tokens come from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from healer.config_base import Section


class SourceConfig(Section):
    """One corpus: files, a directory, a glob, or a remote path (s3://, https://, hf://datasets/org/name/...)."""

    path: str = Field(description="file, directory, glob (train/chunk*/*.jsonl.zst) or fsspec URL "
                                  "(hf://datasets/cerebras/SlimPajama-627B/train/chunk1/*.jsonl.zst)")
    name: str | None = Field(None, description="label used in logs; defaults to the path's stem or the domain")
    weight: float = Field(1.0, gt=0, description="share of the mixture, by tokens")
    text_field: str = Field("text", description="dotted key of the document text in each JSON record")
    domain_field: str | None = Field(
        "meta.redpajama_set_name", description="dotted field that names a record's domain, for per-domain mixing"
    )
    domains: dict[str, float] | None = Field(
        None, description="split this source by domain, each with its own token weight (e.g. SlimPajama's); "
                          "records of other domains are left out"
    )


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

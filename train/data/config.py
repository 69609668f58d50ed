"""Recipe section ``data:``: where the continued-pretraining tokens come from."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from healer.core.config_base import Section


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


class DynamicMixConfig(Section):
    """Loss-driven domain mixing (Sheared-LLaMA's dynamic batch loading): every ``every`` steps the training
    domains' weights move toward the domains where the student's validation loss exceeds a reference most."""

    every: int = Field(50, gt=0, description="optimizer steps between weight updates (each one evaluates the "
                                              "student on every validation domain, cpt.eval_batches batches each)")
    eta: float = Field(1.0, gt=0, allow_inf_nan=False, description="step size: w <- softmax(log w + eta * "
                                                                    "max(loss - reference, 0)), per domain")
    smoothing: float = Field(1e-4, ge=0, lt=1, description="mixed in uniformly after each update, "
                                                            "w <- (1 - c) w + c / domains, so no domain starves")
    reference: Literal["teacher"] | dict[str, float] = Field(
        "teacher", description="per-domain reference loss: `teacher` measures the dense teacher once at step 0 on "
                               "the validation domains (the loss healing tries to recover), or give "
                               "{domain: loss} (e.g. Sheared-LLaMA's scaling-law predictions)")


class DataConfig(Section):
    """A token stream for training: sources, mixture, tokenization and packing."""

    sources: list[SourceConfig] = Field(default_factory=list)
    validation: list[SourceConfig] = Field(default_factory=list, description="held-out stream for validation loss")
    seq_len: int = Field(2048, gt=1, description="tokens per packed training block (at most the model's context)")
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
    shuffle_blocks: bool = Field(
        True, description="hand out the seq_len blocks of each batch of tokenizer_batch_size documents in a seeded "
                          "random order (training stream only), so a long document's consecutive blocks do not "
                          "fill whole optimizer steps; false: in reading order")
    repeat_cache_mb: int = Field(
        16, ge=0, description="from its 2nd epoch on, keep a source's (domain's) documents in memory when a "
                              "worker's share is at most this many MB of text: upsampled small domains are "
                              "then not re-read from the shards; 0 = off")
    seed: int = Field(0, description="shard order, mixture draws and block shuffling")
    dynamic: DynamicMixConfig | None = Field(
        None, description="move the domain weights of data.sources toward the domains whose validation loss "
                          "lags the reference most (needs every source split by `domains` and data.validation "
                          "split by the same domains); null: the weights stay as given")

    @model_validator(mode="after")
    def _dynamic_has_domains(self) -> "DataConfig":
        if self.dynamic is None:
            return self
        for k, src in enumerate(self.sources):
            if not src.domains:
                raise ValueError(f"data.dynamic moves weights between domains, but data.sources[{k}] ({src.path}) "
                                 "is not split by domain; give it `domains: {name: weight}` or drop data.dynamic")
        train = training_domains(self.sources)
        if len(train) < 2:
            raise ValueError(f"data.dynamic needs at least 2 training domains with weight > 0, data.sources has "
                             f"{train}; add domains or drop data.dynamic")
        if not self.validation:
            raise ValueError("data.dynamic measures each domain's loss on data.validation, which is empty; give "
                             "held-out data split by the same `domains` as data.sources")
        held_out: set[str] = set()
        for k, src in enumerate(self.validation):
            if not src.domains:
                raise ValueError(f"data.dynamic needs per-domain validation loss, but data.validation[{k}] "
                                 f"({src.path}) is not split by domain; give it `domains:` like data.sources")
            held_out |= {d for d, w in src.domains.items() if w > 0}
        missing = [d for d in train if d not in held_out]
        if missing:
            raise ValueError(f"data.dynamic: training domain(s) {missing} have no held-out data: add them to "
                             "a data.validation source's `domains`")
        if isinstance(self.dynamic.reference, dict):
            bad = {d: v for d, v in self.dynamic.reference.items() if not math.isfinite(v)}
            if bad:
                raise ValueError(f"data.dynamic.reference: {bad} is not a loss; give finite numbers")
            missing = [d for d in train if d not in self.dynamic.reference]
            if missing:
                raise ValueError(f"data.dynamic.reference gives no loss for domain(s) {missing}; give one per "
                                 "training domain, or say `teacher`")
        return self


def training_domains(sources: list[SourceConfig]) -> list[str]:
    """The distinct domains of ``sources`` that have weight > 0, in recipe order."""
    out: list[str] = []
    for src in sources:
        for domain, weight in (src.domains or {}).items():
            if weight > 0 and domain not in out:
                out.append(domain)
    return out

"""Every verb of the ``healer`` command, declared once.

A *stage* is a verb with a recipe section that writes a stage directory and a manifest; ``healer run``
chains the stages in the order they are declared here. ``STAGES``, ``DISTRIBUTED_STAGES``,
``TRAINING_STAGES``, the CLI's verb table and ``recipe.STAGES`` are all derived from ``VERBS``, so adding
a stage is one ``Verb(...)`` entry (plus its recipe section in ``healer/recipe.py``).

Each verb's own flags are the fields of an ``Options`` dataclass in its target module (see
``healer/cli.py`` for how a field becomes a flag). This module imports nothing heavy: targets are
``"module:function"`` strings resolved only when the verb runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Verb:
    name: str
    # "module:function" taking (recipe, opts) -> exit code | None; a stage's takes (recipe, opts, inputs=...)
    target: str = field(repr=False)
    help: str = ""
    stage: bool = False  # writes <stage dir>/manifest.json; part of `healer run` in declaration order
    distributed: bool = False  # `healer run` starts it on the ranks of `launch:`
    trains: bool = False  # resumable from checkpoints; `healer run --force` passes `--resume none`
    model_subdir: str | None = None  # where in its stage dir a stage leaves a HF model for the next ("" = the dir)
    reads: tuple[str, ...] = ()  # top-level recipe keys (besides its own section) a stage's result depends on
    # training stages: the keys that give a finished run more steps to train (the rest of a change is refused)
    trains_on: tuple[str, ...] = ()
    flags: dict[str, str] = field(default_factory=dict, repr=False)  # short flag -> recipe key
    needs_recipe: bool = True

    def load(self) -> tuple[Callable[..., Any], type]:
        """The verb's function and its ``Options`` dataclass."""
        module_name, func_name = self.target.split(":")
        module = importlib.import_module(module_name)
        return getattr(module, func_name), module.Options


_MODEL = {"--model": "model.source", "--gguf-file": "model.gguf_file", "--dtype": "model.dtype",
          "--run-dir": "run_dir", "--seed": "seed"}


def _io(stage: str) -> dict[str, str]:
    return {"--input": f"{stage}.input", "--output": f"{stage}.output"}


_DECLARED = (
    Verb("run", "healer.run.pipeline:run_pipeline",
         "the whole recipe: prune -> cpt -> sft -> eval -> release; skips finished stages, resumes the rest",
         flags=dict(_MODEL)),
    Verb("prune", "healer.prune.stage:run_prune_stage",
         "one-shot pruning: depth (drop blocks), width (shrink MLPs / attention heads) or sparse (zero weights)",
         stage=True, model_subdir="", reads=("model", "seed"),
         flags={**_MODEL, "--method": "prune.method", "--criterion": "prune.criterion",
                "--target": "prune.target", "--ratio": "prune.ratio", "--num-blocks": "prune.num_blocks",
                "--blocks": "prune.blocks", "--keep-first": "prune.keep_first", "--keep-last": "prune.keep_last",
                "--round-to": "prune.round_to", "--pattern": "prune.sparsity.pattern",
                "--sparsity": "prune.sparsity.ratio", "--calibration": "prune.calibration.path",
                "--num-samples": "prune.calibration.num_samples", "--seq-len": "prune.calibration.seq_len",
                "--output": "prune.output"}),
    Verb("replace", "healer.train.replace:run_replace",
         "LLM-Streamline: train the block prune put in place of the removed span to map the span's input to its "
         "output (MSE against the dense model)",
         stage=True, distributed=True, trains=True, model_subdir="hf", reads=("model", "data", "seed"),
         trains_on=("replace.max_steps",),
         flags={**_MODEL, **_io("replace"), "--zero-stage": "replace.zero_stage", "--max-steps": "replace.max_steps",
                "--lr": "replace.lr"}),
    Verb("data", "healer.train.data.cli:main",
         "the corpus stream: `data stats` (tokens per source, skips, a decoded block), "
         "`data build-corpus --output DIR`",
         flags={**_MODEL, "--seq-len": "data.seq_len", "--workers": "data.num_workers"}, needs_recipe=False),
    Verb("cpt", "healer.train.cpt:run_cpt",
         "continued pretraining under DeepSpeed ZeRO (optional KD from the unpruned model)",
         stage=True, distributed=True, trains=True, model_subdir="hf", reads=("model", "data", "seed"),
         trains_on=("cpt.max_steps",),
         flags={**_MODEL, **_io("cpt"), "--zero-stage": "cpt.zero_stage", "--max-steps": "cpt.max_steps",
                "--lr": "cpt.lr", "--micro-batch-size": "cpt.micro_batch_size",
                "--global-batch-size": "cpt.global_batch_size", "--save-every": "cpt.save_every"}),
    Verb("distill-cache", "healer.train.distill_cache:run_distill_cache",
         "run the KD teacher once over the cpt stream and cache its top-k logits (cpt.kd.cache): KD without a teacher",
         flags={**_MODEL, "--max-steps": "cpt.max_steps", "--global-batch-size": "cpt.global_batch_size"}),
    Verb("instruct", "healer.train.self_distill:main",
         "instruction data without downloads: `instruct build` (the unpruned model answers corpus prompts)",
         flags={**_MODEL, "--teacher": "sft.self_distill.teacher", "--corpus": "sft.self_distill.corpus",
                "--num-examples": "sft.self_distill.num_examples",
                "--max-new-tokens": "sft.self_distill.max_new_tokens", "--output": "sft.self_distill.output"}),
    Verb("sft", "healer.train.sft:run_sft",
         "LoRA instruction tuning (PEFT) under DeepSpeed -> adapter/ + merged/ HF model",
         stage=True, distributed=True, trains=True, model_subdir="merged", reads=("model", "data", "seed"),
         trains_on=("sft.max_steps", "sft.epochs"),
         flags={**_MODEL, **_io("sft"), "--data": "sft.data", "--lr": "sft.lr", "--rank": "sft.rank",
                "--epochs": "sft.epochs", "--max-steps": "sft.max_steps", "--zero-stage": "sft.zero_stage",
                "--max-samples": "sft.max_samples", "--prompt-format": "sft.prompt_format"}),
    Verb("eval", "healer.eval.stage:run_eval_stage",
         "perplexity at each context length and zero-shot tasks (lm-eval, local files) -> eval.json",
         stage=True, reads=("model", "seed"),
         flags={**_MODEL, **_io("eval"), "--compare-to": "eval.compare_to", "--limit": "eval.limit",
                "--batch-size": "eval.batch_size", "--max-tokens": "eval.max_tokens", "--bos": "eval.bos"}),
    Verb("release", "healer.release.stage:run_release_stage",
         "package the final checkpoint with a model card, learning curves and a hash manifest",
         stage=True, reads=("model", "name"),
         flags={**_MODEL, **_io("release"), "--name": "release.model_name", "--license": "release.license"}),
    Verb("launch", "healer.launch.cli:main",
         "run STAGE on many ranks: --nproc N here, --hostfile [--no-ssh --node-rank K], --slurm [--dry-run]",
         flags={"--run-dir": "run_dir"}),
    Verb("sweep", "healer.run.sweep:run_sweep",
         "run the recipe at each value of --over KEY=V1,V2 (own run dirs) -> sweep.json, sweep.md, frontier.png",
         flags=dict(_MODEL)),
    Verb("forecast", "healer.run.forecast:run_forecast",
         "fit a heal's validation loss to a power law in tokens: tokens to recover X% of the pruned-dense gap",
         needs_recipe=False),
    Verb("schema", "healer.schema:run_schema", "print every recipe key with its type and default",
         needs_recipe=False),
)

VERBS: dict[str, Verb] = {v.name: v for v in _DECLARED}
STAGES: tuple[str, ...] = tuple(v.name for v in _DECLARED if v.stage)
DISTRIBUTED_STAGES: tuple[str, ...] = tuple(v.name for v in _DECLARED if v.distributed)
TRAINING_STAGES: tuple[str, ...] = tuple(v.name for v in _DECLARED if v.trains)
MODEL_STAGES: tuple[str, ...] = tuple(v.name for v in _DECLARED if v.model_subdir is not None)

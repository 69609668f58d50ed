"""Recipe sections ``cpt:`` and ``sft:``: how the pruned model is healed.

Both stages run on one training loop, so what they share is written once, as field groups that each
stage's section inherits (the keys stay flat: ``cpt.lr``, ``sft.micro_batch_size``). A stage changes a
shared default by redeclaring the field, which keeps its own defaults next to its name.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from healer.core.config_base import Section
from healer.train.trackers import ReportTo

Schedule = Literal["cosine", "wsd", "linear", "constant"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Beta = Annotated[float, Field(ge=0, lt=1)]  # AdamW's moment decay: 1 or more never forgets, and diverges


class OptimizerFields(Section):
    """AdamW and its learning-rate schedule."""

    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW beta1, beta2")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay (not on biases and norms)")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this; 0 turns clipping off")
    schedule: Schedule = Field("cosine", description="cosine, wsd (warmup-stable-decay), linear or constant after "
                                                     "the warmup")
    warmup_steps: int = Field(10, ge=0, description="optimizer steps of linear warmup")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the LR at the end of the decay, as a fraction of lr")
    decay_fraction: float = Field(0.1, gt=0, le=1, description="wsd: fraction of the steps spent decaying")


class BatchFields(Section):
    """How many sequences make one optimizer step."""

    micro_batch_size: int = Field(1, gt=0, description="sequences per rank per forward pass")
    global_batch_size: int = Field(8, gt=0, description="sequences per optimizer step over all ranks; gradient "
                                                         "accumulation = global / (micro * ranks), must divide")


class CheckpointFields(Section):
    """Cadence of checkpoints and logs."""

    save_every: int = Field(50, gt=0, description="optimizer steps between resumable checkpoints (and at the end)")
    keep_last: int = Field(2, gt=0, description="complete checkpoints kept; older ones are deleted")
    log_every: int = Field(1, gt=0, description="optimizer steps between logged metrics")
    report_to: ReportTo = Field(default_factory=lambda: ["tensorboard"], description=(
        "where per-step metrics go: tensorboard (default; the release draws its curves from it), wandb, mlflow "
        "(pip install 'healer[trackers]'; see train/trackers.py for their environment variables)"))


class DeepSpeedFields(Section):
    """The DeepSpeed engine."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also "
                                                              "gradients, 3 also parameters (the KD teacher too)")
    offload_optimizer: bool = Field(False, description="optimizer state + step on the CPU (DeepSpeed CPU Adam)")
    offload_params: bool = Field(False, description="parameters on the CPU between uses; needs zero_stage: 3")
    deepspeed_config: str | dict[str, Any] | None = Field(
        None, description="a DeepSpeed JSON file, preset name (zero1, zero2, zero3, zero3_offload) or dict passed "
                          "through; recipe knobs fill what it leaves out")
    precision: Precision = Field("auto", description="auto: bf16 on a GPU that has it, fp32 on CPU")


class TrainingFields(OptimizerFields, BatchFields, CheckpointFields, DeepSpeedFields):
    """Everything the training loop reads; a stage section adds its own model/data keys."""

    seed: int | None = Field(None, description="seeds model init noise, dropout and data order; defaults to the "
                                               "recipe's top-level seed")


class KDConfig(Section):
    """Distillation from the unpruned teacher: loss = alpha*CE + (1-alpha)*T^2*KL(teacher||student) (+ hidden).

    The defaults are what recovered the most of the pruning gap per token in bench/heal_quality.py (docs/healing.md,
    "Healing defaults"): pure logit KD (alpha 0) at T 1.
    """

    teacher: str | None = Field(None, description="teacher model; defaults to the recipe's unpruned model.source")
    alpha: float = Field(0.0, ge=0.0, le=1.0, description="weight of the next-token CE; 1-alpha goes to the KL")
    temperature: float = Field(1.0, gt=0.0, description="softens both distributions; the KL is scaled by T^2")
    top_k: int | None = Field(None, gt=0, description="keep only the teacher's top-k logits to save memory")
    hidden_weight: float = Field(
        0.0, ge=0.0, description="weight of the hidden-state loss at a depth prune's cut points (read from the "
        "input's prune_report.json): the student's state after the block before each cut against the teacher's "
        "after the removed span, as ||s-t||^2/||t||^2 per token; 0 = logits only; other inputs have no cuts")
    cache: str | None = Field(
        None, description="directory of the teacher's cached top-k logits (`healer distill-cache` writes it): "
        "the teacher is then not loaded; needs top_k equal to the cache's k and hidden_weight 0")

    @model_validator(mode="after")
    def _cache_serves_logits_only(self) -> "KDConfig":
        if self.cache is not None and self.hidden_weight > 0:
            raise ValueError(f"cache is set and hidden_weight is {self.hidden_weight}: hidden-state KD needs the live "
                             "teacher; set hidden_weight: 0 or cache: null")
        return self


class LoRAFields(Section):
    """A PEFT LoRA adapter on the frozen base: what ``healer.train.lora.lora_config`` reads."""

    rank: int = Field(8, gt=0, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (the update is scaled by alpha/rank)")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt; all-linear = every linear projection except lm_head")


class LoRAConfig(LoRAFields):
    """``cpt.lora``: train an adapter on the corpus stream instead of every weight, then merge it.

    Defaults are the Wanda paper's healing (locuslab/wanda ``lora_ft/finetune_lm.py``: r 8, alpha 16,
    dropout 0.05, q_proj and v_proj).
    """

    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "v_proj"], description="module names to adapt (name suffixes, as PEFT matches them); "
                                          "all-linear = every linear projection except lm_head")


class CPTConfig(TrainingFields):
    """Continued pretraining under DeepSpeed ZeRO (Shortened LLaMA: AdamW 0.9/0.95, wd 0.1), by default distilling
    from the unpruned model, lr 3e-4 warmup-stable-decay (measured: docs/healing.md).
    """

    input: str | None = Field(None, description="checkpoint to heal; defaults to the prune stage's output")
    output: str | None = Field(None, description="stage directory; defaults to <run_dir>/cpt")
    max_steps: int = Field(100, gt=0, description="optimizer steps; tokens = max_steps * global_batch * seq_len")
    activation_checkpointing: bool = Field(False, description="recompute block activations in backward to save memory")
    attn_implementation: str = Field(
        "auto", description="auto: flash_attention_2 on a GPU in bf16/fp16 when flash-attn is installed, else sdpa")
    eval_every: int = Field(50, gt=0, description="steps between validation passes over data.validation")
    eval_batches: int = Field(8, gt=0, description="validation micro-batches per rank per pass")
    lr: float = Field(3e-4, gt=0, description="peak learning rate (docs/healing.md, \"Healing defaults\")")
    schedule: Schedule = Field("wsd", description="wsd (default: warmup, stable at lr, linear decay over the last "
                                                  "decay_fraction of the steps), cosine, linear or constant; a "
                                                  "short heal recovered more without cosine's long decay")
    train_embeddings: bool = Field(
        False, description="also train the token embeddings and output head; false (default) freezes them: "
                           "pruning leaves them intact, and frozen they healed more of the gap "
                           "(docs/healing.md), with no optimizer state for a large vocabulary")
    kd: KDConfig | None = Field(default_factory=KDConfig, description="distil from a teacher (default: the unpruned "
                                "model.source); null = plain next-token CE")
    router_aux_loss_coef: float | None = Field(
        None, ge=0, description="mixture-of-experts students: weight of the router's load-balancing loss (per token, "
        "added to the KD/CE loss); default: the model config's router_aux_loss_coef; 0 turns it off")
    stop_at_recovery: float | None = Field(
        None, gt=0, le=1, description="stop once the validation loss has recovered this fraction of the gap between "
        "the input's and the dense model's (both measured on data.validation at step 0); e.g. 0.9")
    lora: LoRAConfig | None = Field(
        None, description="train a LoRA adapter on the frozen model instead of every weight; the export is the merge "
                          "(W + dW), times the mask on a sparse input")


class SelfDistillConfig(Section):
    """Instruction data made offline: prompts built from corpus text, answered by the unpruned teacher."""

    teacher: str | None = Field(None, description="model that writes the answers; defaults to model.source")
    corpus: str | None = Field(
        None, description="directory/glob/file of .jsonl(.zst)/.txt text; defaults to the first data source, "
                          "else the Python docs every install carries (pydoc_data)")
    output: str | None = Field(
        None, description="Alpaca JSON written here; defaults to <sft stage dir>/self_distill.json")
    num_examples: int = Field(128, gt=0, description="instructions to write and answer")
    max_new_tokens: int = Field(96, gt=0, description="longest answer, in tokens")
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding")
    batch_size: int = Field(8, gt=0, description="prompts the teacher answers at once")
    passage_chars: int = Field(500, gt=50, description="length of the corpus passage quoted in a prompt")
    dtype: str = Field("auto", description="teacher weights while generating: auto = bfloat16 on a GPU or a CPU "
                                           "with native bf16 (less memory traffic when decoding), else float32")
    seed: int | None = Field(None, description="passage choice and sampling; defaults to the recipe's seed")


class SFTConfig(TrainingFields, LoRAFields):
    """LoRA instruction tuning (PEFT) with the Shortened LLaMA defaults: rank 8, lr 1e-4, batch 64, 2 epochs."""

    input: str | None = Field(None, description="checkpoint to tune; defaults to the cpt stage's export")
    output: str | None = Field(None, description="stage directory; defaults to <run_dir>/sft")
    data: str | None = Field(None, description="Alpaca-style JSON/JSONL or chat-style `messages` records")
    self_distill: SelfDistillConfig | None = Field(
        None, description="build the data with the teacher when `data` is not given (the offline demo)")
    prompt_format: Literal["auto", "alpaca", "chat"] = Field(
        "auto", description="auto: the tokenizer's chat template when it has one, else the Alpaca template")
    max_samples: int | None = Field(None, gt=0, description="train on a seeded random subset of this many records")
    max_seq_len: int = Field(512, gt=8, description="longer examples are cut; ones left with no reply are dropped")
    epochs: float = Field(2.0, gt=0, description="passes over the data (when max_steps is not set)")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (overrides epochs)")
    # The SFT seed's defaults differ from CPT's: a short LoRA run with Adam's usual betas, no decay.
    schedule: Schedule = Field("linear", description="cosine, wsd, linear or constant after the warmup")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warmup")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the LR at the end of the decay, as a fraction of lr")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW beta1, beta2")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    micro_batch_size: int = Field(4, gt=0, description="examples per rank per forward pass")
    global_batch_size: int = Field(64, gt=0, description="examples per optimizer step over all ranks")
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage (the adapter is small: 0 is fine)")


class ReplaceTrainConfig(TrainingFields):
    """How the replacement block is trained (LLM-Streamline's MSE stage); only that block is trainable."""

    input: str | None = Field(None, description="pruned checkpoint with prune_report.json whose `replacement` says "
                                                "where the block is; defaults to the prune stage's output")
    output: str | None = Field(None, description="stage directory; defaults to <run_dir>/replace")
    teacher: str | None = Field(None, description="the dense model whose span is imitated; defaults to model.source")
    max_steps: int = Field(100, gt=0, description="optimizer steps; tokens = max_steps * global_batch * seq_len")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (0: fit the span, do not "
                                                       "shrink the block)")
    eval_every: int = Field(25, gt=0, description="steps between held-out MSE / cosine passes")
    eval_batches: int = Field(4, gt=0, description="held-out micro-batches per rank per pass (data.validation, "
                                                   "else the first training batches)")
    attn_implementation: str = Field("auto", description="auto: flash_attention_2 on a GPU in bf16/fp16 when "
                                                         "flash-attn is installed, else sdpa")

"""Recipe sections ``cpt:`` and ``sft:``: how the pruned model is healed."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from healer.config_base import Section


class KDConfig(Section):
    """Distillation from the unpruned teacher: loss = alpha*CE + (1-alpha)*T^2*KL(teacher||student)."""

    teacher: str | None = Field(None, description="teacher model; defaults to the recipe's unpruned model.source")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the next-token CE; 1-alpha goes to the KL")
    temperature: float = Field(1.0, gt=0.0, description="softens both distributions; the KL is scaled by T^2")
    top_k: int | None = Field(None, gt=0, description="keep only the teacher's top-k logits to save memory")


class CPTConfig(Section):
    """Continued pretraining under DeepSpeed ZeRO."""

    input: str | None = Field(None, description="checkpoint to heal; defaults to the prune stage's output")
    output: str | None = Field(None, description="stage directory; defaults to <run_dir>/cpt")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also "
                                                              "gradients, 3 also parameters (the KD teacher too)")
    offload_optimizer: bool = Field(False, description="optimizer state + step on the CPU (DeepSpeed CPU Adam)")
    offload_params: bool = Field(False, description="parameters on the CPU between uses; needs zero_stage: 3")
    deepspeed_config: str | dict[str, Any] | None = Field(
        None, description="a DeepSpeed JSON file, preset name (zero1, zero2, zero3, zero3_offload) or dict passed "
                          "through; recipe knobs fill what it leaves out"
    )
    micro_batch_size: int = Field(1, gt=0, description="sequences per rank per forward pass")
    global_batch_size: int = Field(8, gt=0, description="sequences per optimizer step over all ranks; gradient "
                                                         "accumulation = global / (micro * ranks), must divide")
    max_steps: int = Field(100, gt=0, description="optimizer steps; tokens = max_steps * global_batch * seq_len")
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = Field(0.1, gt=0, le=1, description="wsd: fraction of steps spent decaying")
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 on a GPU that has "
                                                                                  "it, fp32 on CPU")
    activation_checkpointing: bool = Field(False, description="recompute block activations in backward to save memory")
    attn_implementation: str = Field(
        "auto", description="auto: flash_attention_2 on a GPU in bf16/fp16 when flash-attn is installed, else sdpa")
    save_every: int = Field(50, gt=0, description="optimizer steps between resumable checkpoints (and at the end)")
    keep_last: int = Field(2, gt=0, description="complete checkpoints kept; older ones are deleted")
    eval_every: int = Field(50, gt=0, description="steps between validation passes over data.validation")
    eval_batches: int = Field(8, gt=0, description="validation micro-batches per rank per pass")
    log_every: int = Field(1, gt=0)
    kd: KDConfig | None = None
    seed: int = 0


class SelfDistillConfig(Section):
    """Instruction data made offline: prompts built from corpus text, answered by the unpruned teacher."""

    teacher: str | None = Field(None, description="model that writes the answers; defaults to model.source")
    corpus: str | None = Field(
        None, description="directory/glob/file of .jsonl(.zst)/.txt text; defaults to the first data source, "
                          "else the Python docs every install carries (pydoc_data)")
    output: str | None = Field(None, description="Alpaca JSON written here; defaults to <sft stage dir>/self_distill.json")
    num_examples: int = Field(128, gt=0)
    max_new_tokens: int = Field(96, gt=0)
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding")
    batch_size: int = Field(8, gt=0)
    passage_chars: int = Field(500, gt=50, description="length of the corpus passage quoted in a prompt")
    dtype: str = Field("auto", description="teacher weights while generating: auto = bfloat16 on a GPU or a CPU "
                                           "with native bf16 (less memory traffic when decoding), else float32")
    seed: int = 0


class SFTConfig(Section):
    """LoRA instruction tuning (PEFT) with the Shortened LLaMA defaults: rank 8, lr 1e-4, batch 64, 2 epochs."""

    input: str | None = Field(None, description="checkpoint to tune; defaults to the cpt stage's export")
    output: str | None = None
    data: str | None = Field(None, description="Alpaca-style JSON/JSONL or chat-style `messages` records")
    self_distill: SelfDistillConfig | None = Field(
        None, description="build the data with the teacher when `data` is not given (the offline demo)")
    prompt_format: Literal["auto", "alpaca", "chat"] = Field(
        "auto", description="auto: the tokenizer's chat template when it has one, else the Alpaca template")
    max_samples: int | None = Field(None, gt=0, description="train on a seeded random subset of this many records")
    max_seq_len: int = Field(512, gt=8, description="longer examples are cut; ones left with no reply are dropped")
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt; all-linear = every linear projection except lm_head")
    lr: float = Field(1e-4, gt=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    epochs: float = Field(2.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (overrides epochs)")
    micro_batch_size: int = Field(4, gt=0)
    global_batch_size: int = Field(64, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 0
    deepspeed_config: str | dict[str, Any] | None = Field(
        None, description="a DeepSpeed JSON file, preset name or dict; recipe knobs fill what it leaves out")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    save_every: int = Field(50, gt=0, description="optimizer steps between resumable checkpoints")
    keep_last: int = Field(2, gt=0)
    log_every: int = Field(1, gt=0)
    seed: int = 0

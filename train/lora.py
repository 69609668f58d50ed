"""LoRA adapters on a frozen base (PEFT): build one, save it in PEFT's format, fold it into a plain HF directory.

``healer sft`` (on instruction data) and ``healer cpt`` with ``cpt.lora`` (on the corpus stream) both train an
adapter with the shared loop and end here. On a sparse base the merge writes ``(W + dW) * mask``, so the
merged model holds exactly the pruned zeros although the adapter's update is dense.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from healer.core.errors import HealerError
from healer.core.swap import new_partial_dir, swap_in
from healer.train.config import LoRAFields

ADAPTER = "adapter"  # the adapter's directory inside a stage directory


# A family that fuses projections (Phi-3) has one module where others have several.
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj"}


def lora_config(cfg: LoRAFields, targets: list[str] | str | None = None):
    """PEFT's ``LoraConfig`` for a causal LM from the recipe's rank, alpha, dropout and target modules
    (``targets``, when given, in place of ``cfg.target_modules``)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                      target_modules=cfg.target_modules if targets is None else targets, task_type="CAUSAL_LM")


def fused_targets(model: nn.Module, targets: list[str] | str, key: str) -> list[str] | str:
    """``targets`` with ``q_proj``/``k_proj``/``v_proj`` read as ``qkv_proj`` and ``gate_proj``/``up_proj`` as
    ``gate_up_proj`` where ``model`` has only the fused module (said on the terminal): adapting the fused
    matrix adapts the projections named."""
    if isinstance(targets, str):
        return targets
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out: list[str] = []
    for target in targets:
        fused = FUSED.get(target)
        use = fused if target not in leaves and fused in leaves else target
        if use != target:
            print(f"healer: {key}: this model fuses {target} into {fused}; adapting {fused}", file=sys.stderr)
        if use not in out:
            out.append(use)
    return out


def check_targets(model: nn.Module, targets: list[str] | str, key: str) -> None:
    """Refuse target module names that match no module of ``model`` (``key`` names the recipe key).

    PEFT matches a name as a suffix of module paths and complains only when *no* name matches, so a typo
    beside a correct name (``[q_proj, vproj]``) would train fewer modules than the recipe says.
    """
    if targets == "all-linear":
        return
    if not targets:
        raise HealerError(f"{key} is empty: name the modules to adapt (e.g. [q_proj, v_proj]) or give all-linear")
    # What LoRA adapts in a decoder LLM: linear projections (and, if asked for, the embedding).
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise HealerError(f"{key}: {target!r} names no linear layer of the model; its linear layers are "
                              f"{', '.join(linear)} (or give all-linear)")


def attach(model: nn.Module, cfg: LoRAFields, key: str):
    """``model`` wrapped by PEFT with a fresh adapter; only the adapter is trainable. ``key`` prefixes errors."""
    from peft import get_peft_model

    targets = fused_targets(model, cfg.target_modules, key)
    check_targets(model, targets, key)
    try:
        return get_peft_model(model, lora_config(cfg, targets))
    except ValueError as err:  # a name that also matches a module PEFT cannot adapt (a norm, a whole block ...)
        if "ParamWrapper" in str(err) and "dropout" in str(err):
            section = key.rsplit(".", 1)[0]
            raise HealerError(f"{key}: {cfg.target_modules!r} also adapts this mixture-of-experts model's fused "
                              "expert weights, which PEFT does only without dropout: set "
                              f"{section}.dropout: 0, or name the attention projections (e.g. [q_proj, k_proj, "
                              "v_proj, o_proj])") from None
        raise HealerError(f"{key}: PEFT cannot adapt {cfg.target_modules!r} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]})") from None


def load_base(location, dtype: torch.dtype):
    """The base model (a ``healer.model.modeling.ModelLocation``) in ``dtype``, as the merge reloads it."""
    from healer.model.modeling import load_model

    return load_model(location, dtype=dtype)


def save_adapter(engine, adapter_dir: Path, is_main: bool) -> None:
    """Collective: write the engine's adapter in PEFT's format to ``adapter_dir`` (gathering ZeRO-3 shards first).

    Every rank calls it; ``is_main`` writes. The directory appears whole or not at all.
    """
    from peft import get_peft_model_state_dict

    model = engine.module
    lora = [p for p in model.parameters() if p.requires_grad]
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(lora, modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    else:
        state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    if is_main:
        tmp = new_partial_dir(adapter_dir)
        model.save_pretrained(str(tmp), state_dict=state)
        swap_in(tmp, adapter_dir)


def merge_adapter(location, adapter_dir: Path, merged_dir: Path, tokenizer, dtype: torch.dtype,
                  keep_sparsity: dict | None = None) -> float:
    """Load the base fresh, apply the saved adapter, fold it into the weights and save a plain HF directory.

    ``location``: the base (``ModelLocation``); ``merged_dir`` is replaced whole; ``dtype``: the merged weights'.
    Going through the adapter directory proves it loads with ``PeftModel.from_pretrained``; the merged
    directory is then reloaded with plain transformers and its logits compared (``save_and_verify``).
    ``keep_sparsity`` (``healer.train.masks.sparsity_to_keep``): the base's zeros are restored after folding,
    ``(W + dW) * mask``. Returns the largest logit difference seen (fold, then reload).
    """
    from peft import PeftModel

    from healer.model.modeling import probe_batch, save_and_verify

    base = load_base(location, dtype)
    masks = None
    if keep_sparsity is not None:
        from healer.train.masks import masks_of

        masks = masks_of(base, keep_sparsity)
    tuned = PeftModel.from_pretrained(base, str(adapter_dir))
    tuned.eval()
    probe = probe_batch(base.config.vocab_size)
    with torch.no_grad():
        expected = tuned(probe).logits.float()
    merged = tuned.merge_and_unload()
    with torch.no_grad():
        folded = (merged(probe).logits.float() - expected).abs().max().item()
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    if folded > tol:
        raise HealerError(f"merging the adapter changed the logits by {folded:.3g}; the adapter in {adapter_dir} "
                          "is fine, but the merged model is not written")
    if masks is not None:  # after the fold check: the mask changes the function on purpose
        from healer.train.masks import mask_merged

        mask_merged(merged, masks)
    tmp = new_partial_dir(merged_dir)
    diff = save_and_verify(merged, tokenizer, tmp, atol=tol, probe=probe)
    swap_in(tmp, merged_dir)
    return max(diff, folded)

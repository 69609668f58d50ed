"""Export a training engine's weights as a Hugging Face directory that ``from_pretrained`` loads.

Under ZeRO-3 the weights are gathered one parameter at a time onto rank 0's CPU, so the
export needs the model's weights in their training dtype on one host — never the fp32
optimizer state (no ``zero_to_fp32`` consolidation step).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def gather_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Collective: the full state dict on rank 0 (CPU tensors), None on the other ranks."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, torch.Tensor] = {}
    params = dict(module.named_parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params.values())
    if zero3:
        import deepspeed

        for name, p in params.items():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    out[name] = p.data.detach().to("cpu", copy=True)
    elif rank == 0:
        out = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
    if rank != 0:
        return None
    persistent = module.state_dict(keep_vars=True).keys()
    for name, buf in module.named_buffers():
        if name in persistent:
            out[name] = buf.detach().to("cpu", copy=True)
    return out


def export_hf(module: torch.nn.Module, tokenizer, out_dir: str | Path, *, verify: bool = True) -> Path | None:
    """Collective: write ``module`` (a transformers causal LM, possibly ZeRO-3 partitioned) to ``out_dir``.

    Rank 0 rebuilds the model from its config on the CPU, loads the gathered weights, saves safetensors +
    config + tokenizer, and (``verify``) reloads the directory with plain transformers to check the logits.
    The directory appears whole or not at all: it is built beside ``out_dir`` and swapped in
    (:func:`healer.core.swap.swap_in`).
    """
    from transformers import AutoModelForCausalLM

    from healer.core.swap import new_partial_dir, swap_in
    from healer.model.modeling import save_and_verify

    state = gather_state_dict(module)
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = Path(out_dir)
    if rank == 0:
        config = module.config
        dtype = next(iter(state.values())).dtype if state else torch.float32
        config.use_cache = True
        fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
        missing, unexpected = fresh.load_state_dict(state, strict=False)
        tied = set(getattr(fresh, "_tied_weights_keys", None) or {})
        missing = [k for k in missing if k not in tied and not (config.tie_word_embeddings and "lm_head" in k)]
        if missing or unexpected:
            raise RuntimeError(f"export: weights do not match the config: missing {missing}, unexpected {unexpected}")
        fresh.eval()
        tmp = new_partial_dir(out)
        if verify:
            atol = 1e-3 if dtype == torch.float32 else 5e-2
            save_and_verify(fresh, tokenizer, tmp, atol=atol)
        else:
            fresh.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        swap_in(tmp, out)
    if dist.is_initialized():
        dist.barrier()
    return out if rank == 0 else None

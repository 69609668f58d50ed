"""Running a decoder one block at a time.

Every data-driven criterion walks the same path: embed the calibration tokens, push the hidden
states through block 0, 1, 2, ... and look at what each block does. :class:`BlockStack` is that
walk. Its blocks come either from a model already in memory or straight from the safetensors shards
of a checkpoint directory, one block resident at a time, so a model larger than memory can be scored.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from healer.core.errors import HealerError
from healer.model.adapter import Architecture, architecture_for, get_module
from healer.model.modeling import ModelLocation, load_config, safetensors_files, stored_in_another_layout


def _output_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _materialise(skeleton: nn.Module, module: nn.Module) -> None:
    """Give a meta-device ``module`` real (uninitialised) CPU memory for its weights, and the values of its
    non-persistent buffers, which no checkpoint holds (Gemma's embedding scale): the family's own init sets them."""
    module.to_empty(device="cpu")
    for sub in module.modules():
        if sub._non_persistent_buffers_set:
            skeleton._init_weights(sub)


class BlockStack:
    """Embedding, blocks, final norm and LM head of a causal LM, usable block by block.

    Build it with :meth:`from_model` or :meth:`from_pretrained_dir`. Hidden states are kept in
    ``[batch, seq, hidden]`` on CPU/the model's device; callers choose the batch chunking.
    """

    def __init__(self, config, arch: Architecture, embed: nn.Module, rotary: nn.Module, norm: nn.Module,
                 lm_head: nn.Module, block_loader, num_blocks: int, model: nn.Module | None = None):
        self.config = config
        self.model = model  # the whole model when built from memory (criteria that need a full backward use it)
        self.arch = arch
        self.embed_tokens = embed
        self.rotary = rotary
        self.norm = norm
        self.lm_head = lm_head
        self._block_loader = block_loader
        self.num_blocks = num_blocks

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module) -> "BlockStack":
        arch = architecture_for(model.config)
        blocks = get_module(model, arch.blocks)

        @contextlib.contextmanager
        def loader(i: int):
            yield blocks[i]

        return cls(model.config, arch, get_module(model, arch.embed_tokens), get_module(model, arch.rotary),
                   get_module(model, arch.final_norm), get_module(model, arch.lm_head), loader, len(blocks), model)

    @classmethod
    def from_pretrained_dir(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "BlockStack":
        """Read only the non-block weights now; each block is read from its shard when asked for."""
        from transformers import AutoModelForCausalLM

        path = Path(path)
        config = load_config(ModelLocation(str(path)))
        arch = architecture_for(config)
        if stored_in_another_layout(config):  # per-expert files, fused parameters: transformers converts on load
            raise FileNotFoundError(f"{path} stores {config.model_type} tensors in another layout than its modules; "
                                    "it is scored in memory")
        shards = _ShardIndex(path)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
        resident = {}
        for mod_path in (arch.embed_tokens, arch.final_norm, arch.lm_head):
            module = get_module(skeleton, mod_path)
            _materialise(skeleton, module)
            resident[mod_path] = module
        shards.load_into(resident[arch.embed_tokens], arch.embed_tokens, dtype)
        shards.load_into(resident[arch.final_norm], arch.final_norm, dtype)
        if shards.has(f"{arch.lm_head}.weight"):
            shards.load_into(resident[arch.lm_head], arch.lm_head, dtype)
        else:  # tied embeddings
            resident[arch.lm_head].weight = resident[arch.embed_tokens].weight
        rotary_cls = type(get_module(skeleton, arch.rotary))
        rotary = rotary_cls(config=config)  # inv_freq is a non-persistent buffer: rebuild it for real
        blocks = get_module(skeleton, arch.blocks)

        @contextlib.contextmanager
        def loader(i: int):
            block = blocks[i]
            _materialise(skeleton, block)
            shards.load_into(block, f"{arch.blocks}.{i}", dtype)
            try:
                yield block
            finally:
                block.to("meta")  # give the memory back before the next block is read

        return cls(config, arch, resident[arch.embed_tokens], rotary, resident[arch.final_norm],
                   resident[arch.lm_head], loader, len(blocks))

    # -- running -----------------------------------------------------------------------------------
    def block(self, i: int):
        """Context manager giving block ``i`` (resident only inside the ``with``)."""
        return self._block_loader(i)

    def blocks(self) -> Iterator[tuple[int, nn.Module]]:
        for i in range(self.num_blocks):
            with self.block(i) as block:
                yield i, block

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def context(self, hidden: torch.Tensor) -> "BlockContext":
        """Rotary embeddings and attention masks for hidden states of this shape (computed once)."""
        return BlockContext(self, hidden)

    def run_block(self, block: nn.Module, index: int, hidden: torch.Tensor, ctx: "BlockContext") -> torch.Tensor:
        out = block(hidden, attention_mask=ctx.mask_for(index), position_ids=ctx.position_ids,
                    position_embeddings=ctx.rotary_for(index), use_cache=False)
        return _output_tensor(out)

    @torch.no_grad()
    def nll(self, hidden: torch.Tensor, input_ids: torch.Tensor, chunk_tokens: int = 1024) -> tuple[float, int]:
        """Summed next-token negative log-likelihood of ``input_ids`` given final hidden states, and the count.

        The vocabulary projection is done in chunks of tokens, so a 49K- or 128K-token vocabulary never
        materialises logits for the whole batch at once.
        """
        h = self.norm(hidden)[:, :-1].reshape(-1, hidden.shape[-1])
        targets = input_ids[:, 1:].reshape(-1).to(h.device)
        cap = getattr(self.config, "final_logit_softcapping", None)
        total = 0.0
        for start in range(0, h.shape[0], chunk_tokens):
            logits = self.lm_head(h[start:start + chunk_tokens]).float()
            if cap:  # Gemma: the model's own forward squashes its logits into (-cap, cap)
                logits = torch.tanh(logits / cap) * cap
            total += torch.nn.functional.cross_entropy(logits, targets[start:start + chunk_tokens],
                                                       reduction="sum").item()
        return total, targets.numel()


class BlockContext:
    """Per-shape inputs every block needs besides the hidden states: rotary cos/sin and masks."""

    def __init__(self, stack: BlockStack, hidden: torch.Tensor):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        batch, seq = hidden.shape[:2]
        self.position_ids = torch.arange(seq, device=hidden.device).unsqueeze(0).expand(batch, -1)
        config = stack.config
        self.layer_types = getattr(config, "layer_types", None)
        with torch.no_grad():
            if "layer_type" in inspect.signature(stack.rotary.forward).parameters:
                # Gemma 3, OLMo 3: each attention kind has its own rotary base, chosen per block by its type.
                self.rotary_by_type = {kind: stack.rotary(hidden, self.position_ids, kind)
                                       for kind in set(self.layer_types)}
                self.position_embeddings = None
            else:
                self.rotary_by_type = None
                self.position_embeddings = stack.rotary(hidden, self.position_ids)
        kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=None,
                      position_ids=self.position_ids)
        self.masks = {"full_attention": create_causal_mask(**kwargs)}
        needs_sliding = (self.layer_types and "sliding_attention" in self.layer_types) or (
            not self.layer_types and getattr(config, "sliding_window", None))
        if needs_sliding:
            self.masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)

    def rotary_for(self, index: int):
        """The rotary (cos, sin) block ``index`` takes."""
        if self.rotary_by_type is not None:
            return self.rotary_by_type[self.layer_types[index]]
        return self.position_embeddings

    def mask_for(self, index: int):
        if self.layer_types:
            return self.masks[self.layer_types[index]]
        return self.masks.get("sliding_attention", self.masks["full_attention"])


class _ShardIndex:
    """Which safetensors file holds which tensor, and lazy reads of the tensors under a prefix."""

    def __init__(self, path: Path):
        files = safetensors_files(path)
        if files is None:
            raise FileNotFoundError(f"{path} has no safetensors weights to read block by block")
        self.files = files

    def has(self, key: str) -> bool:
        return key in self.files

    def load_into(self, module: nn.Module, prefix: str, dtype: torch.dtype) -> None:
        from safetensors import SafetensorError, safe_open

        wanted = {name: f"{prefix}.{name}" for name, _ in module.named_parameters()}
        by_file: dict[Path, list[str]] = {}
        for name, key in wanted.items():
            if key not in self.files:
                raise HealerError(f"the checkpoint has no tensor {key} although config.json implies it; "
                                  "the weights are incomplete or belong to another config")
            by_file.setdefault(self.files[key], []).append(name)
        for file, names in by_file.items():
            try:
                with safe_open(file, "pt") as fh:
                    for name in names:
                        tensor = fh.get_tensor(f"{prefix}.{name}").to(dtype)
                        target = module.get_parameter(name)
                        if tensor.shape != target.shape:  # assigning .data would accept any shape
                            raise HealerError(
                                f"{file}: tensor {prefix}.{name} has shape {list(tensor.shape)} but config.json "
                                f"implies {list(target.shape)}; the config does not describe these weights")
                        target.data = tensor
            except (SafetensorError, OSError) as err:
                raise HealerError(f"{file}: cannot read {prefix} ({err}); the file is truncated or corrupt: "
                                  "copy or download the model again") from None

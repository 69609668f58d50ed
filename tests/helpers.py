"""Test helpers: tiny random models of every supported family, a tiny tokenizer, and sample text.

Nothing here downloads anything: models are built from a config in-process. Tests import these
(`from helpers import save_tiny`); the pytest fixtures built on them live in conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes blocks; healing trains them back.\n"
    "def add(a, b):\n    return a + b\n"
    "Large language models predict the next token. 0123456789 !?;:,.-_()[]{}<>'\"/\\|@#$%^&*+=~`\n"
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ~300) trained in-process on a few sentences."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([SAMPLE_TEXT] * 4, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    return tok


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(family: str = "llama", layers: int = 6, hidden: int = 64, intermediate: int = 128, heads: int = 4,
                kv_heads: int = 2, vocab: int = 320, **extra):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  tie_word_embeddings=False, eos_token_id=0, pad_token_id=0, bos_token_id=None)
    if family in ("qwen2", "qwen3"):
        kwargs["head_dim"] = hidden // heads
    kwargs.update(extra)
    return cls(**kwargs)


def tiny_model(family: str = "llama", seed: int = 0, **config_kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_kwargs), attn_implementation="sdpa")
    # Random init gives near-identical blocks; spread the weights so criteria have something to rank.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def save_tiny(tmp_path: Path, family: str = "llama", name: str = "model", **kwargs) -> Path:
    """A tiny model + tokenizer saved as a Hugging Face directory."""
    out = tmp_path / name
    model = tiny_model(family, **kwargs)
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def logged_steps(stage: Path) -> list[int]:
    """The steps a training stage has logged to ``<stage>/metrics.jsonl`` so far ([] before its first)."""
    path = stage / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a test's own torchrun rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""Evaluation: perplexity at stated context lengths and zero-shot tasks through lm-eval.

``from healer.eval import evaluate, perplexity`` works; the imports are lazy so that
loading a recipe (which imports ``healer.eval.config``) does not import torch.
"""

from __future__ import annotations

_EXPORTS = {"evaluate": "healer.eval.suite", "evaluate_loaded": "healer.eval.suite",
            "compare": "healer.eval.suite", "read_eval": "healer.eval.suite",
            "perplexity": "healer.eval.ppl", "read_text": "healer.eval.ppl"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'healer.eval' has no attribute {name!r}")

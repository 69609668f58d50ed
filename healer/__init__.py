"""healer: prune a pretrained LLM, heal it, release a plain transformers checkpoint."""

__version__ = "0.1.0"

"""healer: prune a pretrained LLM, heal it, release a plain transformers checkpoint.

From Python, ``healer.api`` has the verbs as functions (``from healer.api import prune, heal, evaluate,
release``); they are not attributes of ``healer`` itself because ``healer.prune`` is the pruning package
and ``healer.release`` the release package.
"""

__version__ = "0.1.0"

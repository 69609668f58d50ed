"""Keep secrets out of everything healer writes for others to read: release files, model cards, logs.

A value is a secret when it sits under ``launch.env`` (the documented place for ``HF_TOKEN`` and
``WANDB_API_KEY``), when its key names one (``token``, ``secret``, ``password``, ``api_key`` ...), or when
it looks like one (``hf_...``, ``sk-...``, ``ghp_...``, a JWT, ``user:pass@`` in a URL, or a long random
base64 string). Secrets become ``<redacted>``; everything else is left exactly as it was.

The value rules are a safety net, not the contract: a secret with an ordinary-looking value is only
caught by its place (``launch.env``) or its key name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

REDACTED = "<redacted>"

# Where every value is a secret, whatever it looks like: (section, key) paths into the recipe.
SECRET_SECTIONS: tuple[tuple[str, ...], ...] = (("launch", "env"),)

# Key words that name a secret. Matched against the key's words (split at `_`, `-`, `.` and case
# changes), so `HF_TOKEN` and `hubToken` are secrets but `max_tokens` and `tokenizer` are not.
_SECRET_WORDS = {"token", "secret", "password", "passwd", "passphrase", "credential", "credentials", "auth",
                 "apikey", "cookie", "pat"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("client", "secret")}

# Values that are secrets by their shape; (?<![A-Za-z0-9]) keeps `disk-...` from matching `sk-`.
_EDGE = r"(?<![A-Za-z0-9_])"
_TOKEN_SHAPES = [
    _EDGE + r"hf_[A-Za-z0-9]{20,}",                      # Hugging Face
    _EDGE + r"sk-[A-Za-z0-9_-]{20,}",                    # OpenAI, Anthropic (sk-ant-...)
    _EDGE + r"gh[pousr]_[A-Za-z0-9]{30,}",               # GitHub
    _EDGE + r"github_pat_[A-Za-z0-9_]{30,}",
    _EDGE + r"glpat-[A-Za-z0-9_-]{20,}",                 # GitLab
    _EDGE + r"xox[abposr]-[A-Za-z0-9-]{10,}",            # Slack
    _EDGE + r"AKIA[0-9A-Z]{16}",                         # AWS access key id
    _EDGE + r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWT
]
_TOKENS = re.compile("|".join(f"(?:{shape})" for shape in _TOKEN_SHAPES))
_URL_PASSWORD = re.compile(r"(?<=://)([^/\s:@]+):([^/\s@]+)@")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/=_-]{32,}")


def _words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return [w for w in re.split(r"[\s_.\-]+", spaced.lower()) if w]


def is_secret_key(key: str) -> bool:
    """True when the name ``key`` says its value is a secret (``HF_TOKEN``, ``wandb_api_key``, ``password``)."""
    words = _words(key)
    return any(w in _SECRET_WORDS for w in words) or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def _class_changes(text: str) -> float:
    """How often neighbouring letters/digits change class (upper, lower, digit): high for random strings."""
    kinds = ["u" if c.isupper() else "l" if c.islower() else "d" for c in text if c.isalnum()]
    return sum(a != b for a, b in zip(kinds, kinds[1:])) / max(1, len(kinds) - 1)


def _random_looking(run: str) -> bool:
    """A long base64-ish run holding a long piece of mixed case and digits that is not a hex digest.

    Hex digests (git commits, sha256 in manifests) are not secrets. Paths and hub ids are short words
    joined by ``/``, ``-`` and ``_`` (``deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct``), so each piece
    between those is judged alone and must itself be long.
    """
    for piece in re.split(r"[/_-]", run):
        if len(piece) < 20 or re.fullmatch(r"[0-9a-fA-F]+=*", piece):
            continue
        mixed = (any(c.isupper() for c in piece) and any(c.islower() for c in piece)
                 and any(c.isdigit() for c in piece))
        if mixed and _class_changes(piece) >= 0.3:
            return True
    return False


def redact_text(text: str, known: Iterable[str] = ()) -> str:
    """``text`` with every secret-looking token, and every literal value in ``known``, replaced by <redacted>.

    ``known`` holds values already known to be secret (from :func:`secret_values`); values shorter than
    6 characters are not replaced in free text, where they would hit ordinary words and numbers.
    """
    for value in sorted({v for v in known if len(v) >= 6}, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    text = _TOKENS.sub(REDACTED, text)
    text = _URL_PASSWORD.sub(lambda m: f"{m[1]}:{REDACTED}@", text)
    return _BASE64_RUN.sub(lambda m: REDACTED if _random_looking(m[0]) else m[0], text)


def looks_secret(value: str) -> bool:
    """True when ``value`` holds something :func:`redact_text` would hide."""
    return redact_text(value) != value


def _walk(node: Any, path: tuple[str, ...], found: list[str], under_secret: bool) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            sub = (*path, str(key))
            secret = under_secret or sub in SECRET_SECTIONS or (is_secret_key(str(key)) and isinstance(value, str))
            out[key] = _walk(value, sub, found, secret)
        return out
    if isinstance(node, list):
        return [_walk(value, path, found, under_secret) for value in node]
    if under_secret and node is not None and not isinstance(node, (dict, list)):
        found.append(str(node))
        return REDACTED
    if isinstance(node, str):
        return redact_text(node)
    return node


def redact_tree(tree: Any) -> Any:
    """A copy of a plain recipe tree (dicts, lists, scalars) with every secret value replaced by <redacted>."""
    return _walk(tree, (), [], False)


def secret_values(tree: Any) -> list[str]:
    """The values :func:`redact_tree` hides because of their place or key (not their shape), as text.

    Pass them to :func:`redact_text` as ``known`` so the same value is hidden in free text too (a log
    line, a path that happens to contain the token).
    """
    found: list[str] = []
    _walk(tree, (), found, False)
    return found


def public_yaml(tree: Any) -> str:
    """``tree`` (a recipe as plain data) as YAML with every secret <redacted>: the copy others may read."""
    return yaml.safe_dump(redact_tree(tree), sort_keys=False)


def write_text(path: str | Path, text: str, *, private: bool = False) -> None:
    """Write ``text`` to ``path`` atomically; ``private``: readable by the owner only (mode 0600).

    The file is created with its final mode before any byte is written, so a secret is never readable
    by others, not even for a moment; an existing file (whatever its mode) is replaced, not rewritten.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    # O_EXCL: a fresh file, so its mode is the one given here (narrowed by the umask, never widened).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        with os.fdopen(os.open(tmp, flags, 0o600 if private else 0o666), "w", encoding="utf-8") as fh:
            fh.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)

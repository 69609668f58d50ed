"""The offline demo's corpus, made from text every Python installation carries.

Two domains, written as SlimPajama-style shards so the demo reads them with the same code as the real corpus:

- ``PydocTopics``: the language reference topics of ``pydoc_data.topics`` (what ``help("if")`` shows);
- ``StdlibDocstrings``: per standard-library module, its docstring and those of its public classes,
  functions and methods.

Modules are imported in a separate, isolated interpreter (``python -I -S``, no display, stdin closed,
their output thrown away), so nothing they do at import touches the caller; modules with side effects
(GUIs, browsers, printing poems) are never imported. The output depends only on the Python version.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from healer.core.errors import HealerError

# Imports that open windows or browsers, print, or take long for no text worth having.
SKIP_MODULES = frozenset({
    "antigravity", "this", "tkinter", "turtle", "turtledemo", "idlelib", "test", "lib2to3", "ensurepip",
    "pydoc_data", "__hello__", "__phello__", "xxsubtype", "xxlimited", "xxlimited_35", "msilib", "winreg",
    "winsound", "msvcrt", "nt", "_winapi",
})

_HARVEST = r"""
import inspect, io, json, re, sys, warnings, contextlib
warnings.simplefilter("ignore")
names, out_path = json.loads(sys.argv[1]), sys.argv[2]

def clean(doc):
    if not isinstance(doc, str) or not doc.strip():
        return ""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", inspect.cleandoc(doc).strip())

class Opaque:
    def __repr__(self):
        return "..."

OPAQUE = Opaque()

def signature(obj):
    # Only plain literal defaults are shown: an object's repr can carry a memory address (not
    # reproducible) or, like os.environ, the environment of the machine (never into a corpus).
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    params = []
    for p in sig.parameters.values():
        d = p.default
        if d is not p.empty and not (type(d) in (int, float, bool, str, bytes, type(None)) and len(repr(d)) <= 40):
            p = p.replace(default=OPAQUE)
        params.append(p)
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(sig.replace(parameters=params)))

def describe(name, module):
    parts = [f"Module {name}", clean(module.__doc__)]
    for attr in sorted(vars(module)):
        obj = vars(module)[attr]
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        doc = clean(getattr(obj, "__doc__", None))
        if doc:
            parts.append(f"{name}.{attr}{signature(obj)}\n{doc}")
        if inspect.isclass(obj):
            for meth in sorted(vars(obj)):
                fn = vars(obj)[meth]
                if meth.startswith("_") or not inspect.isroutine(fn):
                    continue
                mdoc = clean(getattr(fn, "__doc__", None))
                if mdoc:
                    parts.append(f"{name}.{attr}.{meth}{signature(fn)}\n{mdoc}")
    return "\n\n".join(p for p in parts if p)

docs = {}
for name in names:
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            module = __import__(name)
        docs[name] = describe(name, module)
    except BaseException:
        continue
with open(out_path, "w", encoding="utf-8") as fh:
    json.dump(docs, fh)
"""


def stdlib_module_names() -> list[str]:
    """Public top-level standard-library modules worth importing for their documentation."""
    return sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP_MODULES)


def harvest_docstrings(names: list[str], timeout: float = 300.0) -> dict[str, str]:
    """``{module: text}`` for the modules that import cleanly in an isolated interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER", "PYTHONSTARTUP")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "docs.json"
        try:
            subprocess.run([sys.executable, "-I", "-S", "-c", _HARVEST, json.dumps(names), str(out)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=env, cwd=tmp, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise HealerError(f"reading standard-library docstrings took over {timeout:.0f} s; "
                              "retry, or pass fewer modules") from None
        if not out.is_file():
            raise HealerError("reading standard-library docstrings failed (the helper interpreter wrote nothing)")
        return json.loads(out.read_text(encoding="utf-8"))


def demo_documents(max_docs: int | None = None) -> list[dict]:
    """The corpus records, in a fixed order: topics first, then modules, each sorted by name."""
    from pydoc_data.topics import topics

    records = [{"text": topics[name].strip(), "meta": {"redpajama_set_name": "PydocTopics", "title": name}}
               for name in sorted(topics) if topics[name].strip()]
    for name, text in sorted(harvest_docstrings(stdlib_module_names()).items()):
        if len(text) > len(f"Module {name}") + 20:  # a name and nothing to read is not a document
            records.append({"text": text, "meta": {"redpajama_set_name": "StdlibDocstrings", "title": name}})
    seen: set[str] = set()
    unique = []
    for record in records:  # some topics share a text ("if" and "elif"): train and holdout must not share one
        if record["text"] not in seen:
            seen.add(record["text"])
            unique.append(record)
    records = unique
    if max_docs is not None:
        # keep both domains: every k-th record rather than the first ones
        step = max(1, len(records) // max_docs)
        records = records[::step][:max_docs]
    return records


def _write_shard(path: Path, records: list[dict]) -> None:
    import zstandard

    body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(zstandard.ZstdCompressor(level=10).compress(body))
    os.replace(tmp, path)


def build_demo_corpus(output_dir: str | Path, *, max_docs: int | None = None, validation_fraction: float = 0.05,
                      docs_per_shard: int = 48, seed: int = 0) -> dict:
    """Write ``output_dir/train/chunk1/example_train_{i}.jsonl.zst`` and
    ``output_dir/validation/chunk1/example_holdout_0.jsonl.zst``; return the counts.

    Args:
        max_docs: keep at most this many documents (spread over both domains); None keeps all (~2-3 M chars).
        validation_fraction: share of documents held out (at least one).
        docs_per_shard: documents per training shard; several shards let ranks and workers split the work.
        seed: the shuffle of documents across shards. Same seed and Python version, same bytes.
    """
    out = Path(output_dir)
    records = demo_documents(max_docs)
    if len(records) < 2:
        raise HealerError("the demo corpus needs at least 2 documents (one to train on, one to hold out)")
    random.Random(seed).shuffle(records)  # shards mix both domains, as SlimPajama's do
    n_val = max(1, round(len(records) * validation_fraction))
    validation, train = records[:n_val], records[n_val:]

    train_dir, val_dir = out / "train" / "chunk1", out / "validation" / "chunk1"
    train_dir.mkdir(parents=True, exist_ok=True)
    val_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(train_dir.glob("example_train_*.jsonl.zst")) + list(val_dir.glob("example_holdout_*.jsonl.zst")):
        stale.unlink()  # a rebuild with fewer documents must not leave old shards behind
    shards = [train[i:i + docs_per_shard] for i in range(0, len(train), docs_per_shard)]
    for i, shard in enumerate(shards):
        _write_shard(train_dir / f"example_train_{i}.jsonl.zst", shard)
    _write_shard(val_dir / "example_holdout_0.jsonl.zst", validation)

    domains: dict[str, int] = {}
    for r in records:
        d = r["meta"]["redpajama_set_name"]
        domains[d] = domains.get(d, 0) + 1
    counts = {
        "output": str(out),
        "train_documents": len(train),
        "validation_documents": len(validation),
        "train_shards": len(shards),
        "characters": sum(len(r["text"]) for r in records),
        "train_characters": sum(len(r["text"]) for r in train),
        "documents_per_domain": dict(sorted(domains.items())),
        "python": sys.version.split()[0],
    }
    (out / "corpus.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts

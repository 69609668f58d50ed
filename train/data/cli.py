"""``healer data ACTION``: look at a corpus stream, or build the offline demo corpus.

    healer data stats --config recipe.yaml [--batches 16] [--split train|validation]
    healer data build-corpus --output DIR [--max-docs N]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from healer.core.errors import HealerError

USAGE = ("usage: healer data stats --config recipe.yaml [--batches N] [--split train|validation]\n"
         "       healer data build-corpus --output DIR [--max-docs N]   (or: healer data build-corpus demo)")


@dataclass
class Options:
    action: str = field(default="stats", metadata={
        "help": "stats: what the stream yields; build-corpus: write the offline demo corpus",
        "positional": True, "choices": ("stats", "build-corpus")})
    output: str | None = field(default=None, metadata={
        "help": "build-corpus: directory for train/ and validation/ shards (default: build_corpus.output)"})
    max_docs: int | None = field(default=None, metadata={"help": "build-corpus: at most this many documents"})
    batches: int = field(default=16, metadata={"help": "stats: micro-batches to read"})
    split: str = field(default="train", metadata={"help": "stats: which stream to read",
                                                  "choices": ("train", "validation")})


def main(recipe, opts: Options) -> int:
    """The ``healer data`` verb; ``recipe`` may be None for ``build-corpus --output DIR``."""
    if opts.action == "build-corpus":
        section = getattr(recipe, "build_corpus", None)  # the recipe's `build_corpus:` fills what flags leave out
        output = opts.output or (section.output if section is not None else None)
        max_docs = opts.max_docs if opts.max_docs is not None else getattr(section, "max_docs", None)
        if not output:
            raise HealerError(f"build-corpus needs --output DIR (or a recipe with build_corpus.output)\n{USAGE}")
        from healer.train.data.corpus import build_demo_corpus

        counts = build_demo_corpus(output, max_docs=max_docs)
        print(json.dumps(counts, indent=2))
        return 0
    if recipe is None or recipe.data is None:
        raise HealerError("healer data stats needs a recipe with a `data:` section: --config recipe.yaml")
    return stats(recipe, batches=opts.batches, split=opts.split)


def stats(recipe, *, batches: int, split: str) -> int:
    """Read ``batches`` micro-batches as rank 0 of 1 and print what came out of the stream."""
    from tqdm import tqdm

    from healer.model.modeling import load_tokenizer, resolve_source
    from healer.train.data import build_loader
    from healer.train.data.loader import plan_entries

    cfg = recipe.data
    if split not in ("train", "validation"):
        raise HealerError(f"--split must be train or validation, not {split!r}")
    # a wrong path fails here, before the tokenizer takes its seconds to load
    plan_entries(cfg.sources if split == "train" else cfg.validation,
                 f"data.{'sources' if split == 'train' else split}")
    tokenizer = load_tokenizer(resolve_source(recipe.model.source, recipe.model.gguf_file, recipe.model.revision))
    loader = build_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=1, split=split)
    last, read = None, 0
    for batch in tqdm(loader, total=batches, desc=f"reading {split} blocks", unit="block"):
        last, read = batch, read + 1
        if read >= batches:
            break
    s = loader.stats()
    total = sum(s["tokens"].values()) or 1
    weights = {e.name: e.weight for e in loader.entries}
    print(f"\n{split} stream: {len(loader.entries)} source(s), seq_len {cfg.seq_len}, "
          f"{total:,} tokens in {read} block(s)" + ("" if read == batches else " (the stream ended)"))
    print(f"{'source':<32} {'documents':>10} {'tokens':>12} {'share':>7} {'weight':>7}")
    for name, tokens in s["tokens"].items():
        print(f"{name:<32} {s['documents'][name]:>10,} {tokens:>12,} {tokens / total:>7.1%} {weights[name]:>7.1%}")
    if s["skipped"]:
        print("skipped: " + ", ".join(f"{kind} {n}" for kind, n in sorted(s["skipped"].items())))
        for example in s["skipped_examples"]:
            print(f"  {example}")
    else:
        print("skipped: none")
    if last is not None:
        text = tokenizer.decode(last["input_ids"][0].tolist())
        print(f"\nsample block ({cfg.seq_len} tokens, decoded; EOS marks document ends):\n{'-' * 60}")
        print(text[:1500] + (" [...]" if len(text) > 1500 else ""))
        print("-" * 60)
    else:
        print("\nthe stream gave no complete block (fewer tokens than seq_len?)")
    return 0

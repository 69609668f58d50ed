"""The corpus stream for continued pretraining: shards -> mixture -> tokens -> packed blocks.

``build_loader(cfg, tokenizer, rank=, world_size=, micro_batch_size=)`` is the one entry point the
trainer uses; ``build_demo_corpus`` writes the offline demo's corpus from the Python standard library.
"""

from healer.train.data.config import DataConfig, SourceConfig

__all__ = ["DataConfig", "SourceConfig", "StreamLoader", "build_loader", "build_demo_corpus"]


def __getattr__(name):
    # The loader (torch) and the corpus builder are imported when used: a recipe's `data:` section is
    # validated from the config alone.
    if name in ("StreamLoader", "build_loader"):
        from healer.train.data import loader

        return getattr(loader, name)
    if name == "build_demo_corpus":
        from healer.train.data.corpus import build_demo_corpus

        return build_demo_corpus
    raise AttributeError(name)

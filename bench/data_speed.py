"""How fast is the corpus stream, against the tokenizer alone and against what a user would write?

On the shared SlimPajama-style sample with SmolLM2's tokenizer, in one run:

  (a) bare:     the tokenizer's batch encode of the same texts, already in memory (the ceiling);
  (b) pipeline: healer's stream, read + decompress + parse + mix (by domain) + tokenize + pack,
                one pass over the sample, as the trainer would get it (and once per worker setting);
  (c) baseline: `datasets` streaming + `.map(tokenize, batched=True)` + `group_texts` (run_clm.py's recipe).

Prints tokens/s of each and the ratios b/a (target >= 0.9) and b/c.

    python bench/data_speed.py [--corpus DIR] [--seq-len 2048] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from itertools import chain
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "slimpajama-sample" / "train"
# SlimPajama's token proportions by RedPajama set (the paper's table), used to re-balance the skewed sample
SLIMPAJAMA = {"RedPajamaCommonCrawl": 0.521, "RedPajamaC4": 0.267, "RedPajamaGithub": 0.052,
              "RedPajamaBook": 0.042, "RedPajamaArXiv": 0.046, "RedPajamaWikipedia": 0.038,
              "RedPajamaStackExchange": 0.033}


def read_texts(files: list[str]) -> list[str]:
    import zstandard

    texts = []
    for f in files:
        with open(f, "rb") as fh:
            body = zstandard.ZstdDecompressor().stream_reader(fh).read()
        texts += [json.loads(line)["text"] for line in body.splitlines() if line.strip()]
    return texts


def bare(tokenizer, texts: list[str], batch: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), batch):
        ids = tokenizer(texts[i:i + batch], add_special_tokens=False)["input_ids"]
        tokens += sum(len(x) + 1 for x in ids)  # + EOS, as the pipeline adds one per document
    return tokens, time.perf_counter() - t0


def pipeline(tokenizer, corpus: Path, seq_len: int, workers: int, batch: int) -> tuple[int, float]:
    from healer.train.data import DataConfig, build_loader

    cfg = DataConfig(sources=[{"path": str(corpus), "domains": SLIMPAJAMA}], seq_len=seq_len,
                     on_exhausted="drain", num_workers=workers, tokenizer_batch_size=batch)
    t0 = time.perf_counter()
    tokens = 0
    for b in build_loader(cfg, tokenizer, micro_batch_size=4):
        tokens += b["input_ids"].numel()
    return tokens, time.perf_counter() - t0


def datasets_baseline(tokenizer, files: list[str], seq_len: int, batch: int) -> tuple[int, float]:
    from datasets import load_dataset

    t0 = time.perf_counter()
    ds = load_dataset("json", data_files=files, split="train", streaming=True)

    def tokenize(examples):
        out = tokenizer(examples["text"], add_special_tokens=False)
        return {"input_ids": [ids + [tokenizer.eos_token_id] for ids in out["input_ids"]]}

    def group_texts(examples):
        concatenated = list(chain(*examples["input_ids"]))
        total = (len(concatenated) // seq_len) * seq_len
        return {"input_ids": [concatenated[i:i + seq_len] for i in range(0, total, seq_len)]}

    ds = ds.map(tokenize, batched=True, batch_size=batch, remove_columns=["text", "meta"])
    ds = ds.map(group_texts, batched=True, batch_size=1000)
    tokens = sum(len(ex["input_ids"]) for ex in ds)
    return tokens, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=SAMPLE)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256, help="documents per tokenizer call, everywhere")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    if not args.corpus.exists():
        raise SystemExit(f"no corpus at {args.corpus}; pass --corpus DIR of .jsonl.zst shards")

    from healer.modeling import load_tokenizer, resolve_source

    tokenizer = load_tokenizer(resolve_source("smollm2"))
    files = sorted(glob.glob(str(args.corpus / "**" / "*.jsonl.zst"), recursive=True))
    texts = read_texts(files)
    chars = sum(map(len, texts))
    print(f"corpus: {len(files)} shards, {len(texts):,} documents, {chars / 1e6:.1f} M chars; "
          f"tokenizer SmolLM2-135M ({type(tokenizer).__name__}); seq_len {args.seq_len}; {os.cpu_count()} CPUs")

    bare(tokenizer, texts[:64], args.batch)  # warm-up
    a_tok, a_s = bare(tokenizer, texts, args.batch)
    a = a_tok / a_s
    print(f"(a) bare batch encode, texts in memory:  {a_tok:>10,} tokens {a_s:7.2f} s {a:>12,.0f} tok/s")
    c_tok, c_s = datasets_baseline(tokenizer, files, args.seq_len, args.batch)
    c = c_tok / c_s
    print(f"(c) datasets streaming + map + group:    {c_tok:>10,} tokens {c_s:7.2f} s {c:>12,.0f} tok/s")
    for workers in args.workers:
        b_tok, b_s = pipeline(tokenizer, args.corpus, args.seq_len, workers, args.batch)
        b = b_tok / b_s
        print(f"(b) healer stream, num_workers={workers}:      {b_tok:>10,} tokens {b_s:7.2f} s {b:>12,.0f} tok/s"
              f"   b/a = {b / a:.2f}   b/c = {b / c:.2f}")


if __name__ == "__main__":
    main()

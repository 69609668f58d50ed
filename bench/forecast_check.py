"""Does ``healer forecast`` predict a heal from its first quarter? A CPU check on a small model and real text.

1. a byte-level BPE tokenizer and a small Llama are built and pretrained (``healer cpt``) on the SlimPajama
   sample: the "dense" model;
2. ``healer prune`` removes 3 of its 8 blocks (block influence);
3. ``healer cpt`` heals it with a validation pass every few steps and ``cpt.stop_at_recovery: 1.0``
   (so it measures the pruned and dense validation losses at step 0 into recovery.json);
4. the curve's first quarter (in tokens) is fitted and compared with the measured rest: the loss error on the
   later points, and the tokens the forecast gives for 50/70/80% recovery against where the curve got there.

    python bench/forecast_check.py --out /tmp/forecast-check [--dense-steps 300 --heal-steps 160 --seq-len 64]
    python bench/forecast_check.py --out /tmp/forecast-smollm2 --model smollm2 --prune-blocks 6 --keep-first 4 \
        --keep-last 2 --seq-len 256 --micro-batch 4 --heal-steps 40 --eval-every 2 --eval-batches 2 --lr 5e-4

``--model`` skips step 1 and prunes that model instead (a real one: a tiny model trained for minutes on CPU
barely uses its blocks, so removing three moves its loss by thousandths and there is no gap to forecast).

Input is /work/shared/data (or --data); the product never reads it. Prints one block to paste into a note.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

from healer.cli import main  # noqa: E402
from healer.run.forecast import forecast, read_curve  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "slimpajama-sample"


def _texts(folder: Path, limit: int) -> list[str]:
    import zstandard

    out = []
    for shard in sorted(folder.rglob("*.jsonl.zst")):
        with open(shard, "rb") as fh:
            text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8")
            out += [json.loads(line)["text"] for line in text]
        if len(out) >= limit:
            break
    return out[:limit]


def build_dense_start(out: Path, data: Path, vocab: int, hidden: int) -> Path:
    """A random small Llama with a tokenizer trained on the corpus, saved as a HF directory."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    start = out / "start"
    if (start / "config.json").is_file():
        return start
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_texts(data / "train", 1500), vocab_size=vocab, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=0, pad_token_id=0, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(start)
    tok.save_pretrained(start)
    return start


def write_recipe(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def measured_tokens(tokens: list[float], losses: list[float], target: float) -> float:
    """The first logged token count whose validation loss is at or below ``target`` (inf: never)."""
    return next((t for t, y in zip(tokens, losses) if y <= target), math.inf)


def run(out: Path, data: Path, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    seq_len = args.seq_len
    # Validation is a held-out shard of the training split: the sample's own validation file is a handful of
    # long documents (books, arXiv) whose first blocks say little about how far a heal has come.
    shards = sorted((data / "train").rglob("*.jsonl.zst"))
    common = {"data": {"sources": [{"path": str(f)} for f in shards[:-1]], "validation": [{"path": str(shards[-1])}],
                       "seq_len": seq_len}}
    cpt = {"zero_stage": 0, "micro_batch_size": args.micro_batch, "global_batch_size": args.micro_batch,
           "warmup_steps": 20, "eval_batches": args.eval_batches, "save_every": 100}
    if args.model:
        dense_model = args.model
    else:
        start = build_dense_start(out, data, args.vocab, args.hidden)
        dense = write_recipe(out / "dense.yaml", {
            **common, "model": {"source": str(start)}, "run_dir": str(out / "dense"),
            "cpt": {**cpt, "input": str(start), "max_steps": args.dense_steps, "lr": 3e-3, "eval_every": 100,
                    "kd": None}})
        dense_model = str(out / "dense" / "cpt" / "hf")
        if not (Path(dense_model) / "config.json").is_file():  # (or `healer cpt export` of a stopped one)
            assert main(["cpt", str(dense)]) == 0
    calib = out / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(data / "train", 64)))
    heal = write_recipe(out / "heal.yaml", {
        **common, "model": {"source": dense_model}, "run_dir": str(out / "heal"),
        "prune": {"method": "depth", "criterion": "block_influence", "num_blocks": args.prune_blocks,
                  "keep_first": args.keep_first, "keep_last": args.keep_last,
                  "calibration": {"path": str(calib), "num_samples": 16, "seq_len": seq_len}},
        "cpt": {**cpt, "max_steps": args.heal_steps, "lr": args.lr, "eval_every": args.eval_every,
                "schedule": "constant", "warmup_steps": 0, "stop_at_recovery": 1.0}})
    assert main(["prune", str(heal)]) == 0
    assert main(["cpt", str(heal)]) == 0

    stage = out / "heal" / "cpt"
    base = json.loads((stage / "recovery.json").read_text())
    pruned, dense_loss = base["pruned_val_loss"], base["dense_val_loss"]
    tokens, losses = read_curve(stage / "metrics.jsonl")
    quarter = tokens[-1] / 4
    fit_t = [t for t in tokens if t <= quarter]
    fit_y = losses[:len(fit_t)]
    print(f"\nforecast check: dense val loss {dense_loss:.4f}, pruned {pruned:.4f} (gap {pruned - dense_loss:.4f}); "
          f"{len(tokens)} validation points over {tokens[-1]:,.0f} tokens, fit on the first {len(fit_t)} "
          f"(<= {quarter:,.0f} tokens)")
    for recovery in (0.5, 0.7, 0.8):
        fc = forecast(fit_t, fit_y, pruned_loss=pruned, dense_loss=dense_loss, recovery=recovery, boots=200)
        seen = measured_tokens(tokens, losses, fc.target_loss)
        err = f"{fc.tokens / seen - 1:+.0%}" if math.isfinite(seen) and math.isfinite(fc.tokens) else "-"
        print(f"  {recovery:.0%} recovery (loss {fc.target_loss:.4f}): forecast {fc.tokens:,.0f} tokens "
              f"[80%: {fc.low:,.0f} .. {fc.high:,.0f}], measured {seen:,.0f} ({err})")
    rest = [(t, y) for t, y in zip(tokens, losses) if t > quarter]
    fit = fc.fit
    errors = [abs(fit.loss(t) - y) for t, y in rest]
    print(f"  fit: {fit.l_inf:.4f} + {fit.a:.4g} * t^-{fit.alpha:.3f}; on the {len(rest)} later points mean "
          f"|loss error| {sum(errors) / len(errors):.4f}, at the last point {errors[-1]:.4f} "
          f"({errors[-1] / rest[-1][1]:.2%}); full-run fit for comparison:")
    sys.stdout.flush()
    main(["forecast", str(stage), "--recovery", "0.5,0.7,0.8"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/forecast-check"))
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--dense-steps", type=int, default=300)
    parser.add_argument("--heal-steps", type=int, default=160)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--model", help="prune this model (e.g. smollm2) instead of pretraining a tiny one")
    parser.add_argument("--prune-blocks", type=int, default=3)
    parser.add_argument("--keep-first", type=int, default=0)
    parser.add_argument("--keep-last", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per step (one micro-batch)")
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4, help="the heal's constant learning rate")
    args = parser.parse_args()
    run(args.out, args.data, args)

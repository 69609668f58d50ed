"""Fixed vs loss-driven domain weights (``data.dynamic``) for the same tokens: held-out perplexity per domain.

1. a byte-level BPE tokenizer and a small Llama are built and pretrained (``healer cpt``) on the SlimPajama
   sample with the sample's own skew: the "dense" model (as ``bench/forecast_check.py`` does);
2. ``healer prune`` removes 4 of its 8 blocks (block influence);
3. ``healer cpt`` heals it for the same steps (so the same tokens), KD from the dense model: once with the
   recipe's domain weights fixed, and once per ``--eta`` with ``data.dynamic`` moving them every ``--every`` steps;
4. every model is scored on held-out text per domain (``meta.redpajama_set_name``).

The held-out documents are cut in halves: ``data.dynamic`` steers on the first halves, the perplexities are
measured on the second halves, so the dynamic run is not scored on the text it steered by.

    python bench/dynamic_mixing.py --out /tmp/dynamic-mixing [--dense-steps 1500 --heal-steps 300 --every 25 --eta 1,20]

Input is /work/shared/data (or --data); the product never reads it. Prints one block to paste into a note.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from forecast_check import build_dense_start, write_recipe  # noqa: E402  (the forecast check's tiny dense start)

from healer.cli import main  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "slimpajama-sample"
FIELD = "meta.redpajama_set_name"
# the recipe's weights: roughly the sample's own token skew (C4 and StackExchange dominate)
WEIGHTS = {"RedPajamaC4": 0.40, "RedPajamaStackExchange": 0.35, "RedPajamaGithub": 0.13, "RedPajamaArXiv": 0.06,
           "RedPajamaWikipedia": 0.03, "RedPajamaCommonCrawl": 0.03}


def _records(folder: Path) -> list[dict]:
    import zstandard

    out = []
    for shard in sorted(folder.rglob("*.jsonl.zst")):
        with open(shard, "rb") as fh:
            out += [json.loads(line) for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh),
                                                                  encoding="utf-8")]
    return out


def split_held_out(data: Path, out: Path) -> tuple[Path, Path]:
    """``steer.jsonl`` (first half of every held-out document) and ``report.jsonl`` (second half)."""
    steer, report = out / "steer.jsonl", out / "report.jsonl"
    with open(steer, "w") as a, open(report, "w") as b:
        for rec in _records(data / "validation"):
            text = rec["text"]
            cut = text.find("\n", len(text) // 2)
            cut = len(text) // 2 if cut < 0 else cut
            for fh, part in ((a, text[:cut]), (b, text[cut:])):
                fh.write(json.dumps({"text": part, "meta": rec["meta"]}) + "\n")
    return steer, report


def held_out_loss(model_dir: str | Path, report: Path, seq_len: int) -> dict[str, tuple[float, int]]:
    """Per domain: (mean next-token CE over the report halves packed in ``seq_len`` blocks, tokens scored)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ids: dict[str, list[int]] = {}
    for line in report.read_text().splitlines():
        rec = json.loads(line)
        ids.setdefault(rec["meta"]["redpajama_set_name"], []).extend(tok(rec["text"])["input_ids"]
                                                                     + [tok.eos_token_id])
    out = {}
    with torch.no_grad():
        for domain, flat in sorted(ids.items()):
            n = len(flat) // seq_len
            if n == 0:
                continue
            blocks = torch.tensor(flat[: n * seq_len]).view(n, seq_len)
            total, count = 0.0, 0
            for chunk in blocks.split(32):
                logits = model(input_ids=chunk).logits[:, :-1].float()
                total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           chunk[:, 1:].reshape(-1), reduction="sum").item()
                count += chunk[:, 1:].numel()
            out[domain] = (total / count, count)
    return out


def run(out: Path, data: Path, dense_steps: int, heal_steps: int, every: int, etas: list[float], vocab: int,
        hidden: int, seq_len: int, heal_batch: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    start = build_dense_start(out, data, vocab, hidden)
    steer, report = split_held_out(data, out)
    train = {"path": str(data / "train"), "domain_field": FIELD, "domains": WEIGHTS}
    held = {"path": str(steer), "domain_field": FIELD, "domains": {d: 1.0 for d in WEIGHTS}}
    cpt = {"zero_stage": 0, "micro_batch_size": 8, "global_batch_size": 8, "warmup_steps": 20, "eval_batches": 4,
           "save_every": 1000, "report_to": ["tensorboard"]}
    dense = write_recipe(out / "dense.yaml", {
        "data": {"sources": [train], "seq_len": seq_len}, "model": {"source": str(start)},
        "run_dir": str(out / "dense"),
        "cpt": {**cpt, "input": str(start), "max_steps": dense_steps, "lr": 3e-3, "kd": None}})
    dense_model = out / "dense" / "cpt" / "hf"
    if not (dense_model / "config.json").is_file():
        assert main(["cpt", str(dense)]) == 0
    calib = out / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in _records(data / "train")[:64]))
    prune = {"method": "depth", "criterion": "block_influence", "num_blocks": 4, "keep_first": 0, "keep_last": 0,
             "calibration": {"path": str(calib), "num_samples": 16, "seq_len": seq_len}}
    heal = {**cpt, "max_steps": heal_steps, "lr": 1e-3, "warmup_steps": 10, "micro_batch_size": heal_batch,
            "global_batch_size": heal_batch}
    runs = {}
    for name, dynamic in [("fixed", None)] + [(f"eta {eta:g}", {"every": every, "eta": eta}) for eta in etas]:
        folder = name.replace(" ", "")
        recipe = write_recipe(out / f"{folder}.yaml", {
            # small document batches: a new mixture applies from each stream's next batch of documents, and
            # 256 documents (the default) would outlast this whole short run
            "data": {"sources": [train], "validation": [held], "seq_len": seq_len, "dynamic": dynamic,
                     "tokenizer_batch_size": 8},
            "model": {"source": str(dense_model)}, "run_dir": str(out / folder), "prune": prune,
            "cpt": {**heal, "eval_every": every}})
        if not (out / folder / "prune" / "config.json").is_file():
            assert main(["prune", str(recipe)]) == 0
        assert main(["cpt", str(recipe), "--resume", "none"]) == 0
        runs[name] = json.loads((out / folder / "cpt" / "manifest.json").read_text())["outputs"]

    models = {"dense": dense_model, "pruned": out / "fixed" / "prune",
              **{name: Path(r["hf_dir"]) for name, r in runs.items()}}
    scores = {k: held_out_loss(v, report, seq_len) for k, v in models.items()}
    tokens = runs["fixed"]["tokens_trained"]
    each = ", ".join(f"{k} {r['tokens_trained']:,}" for k, r in runs.items())
    print(f"\ndynamic mixing check: {heal_steps} heal steps x {tokens // heal_steps:,} tokens = {tokens:,} tokens per "
          f"run ({each}), KD from the dense model; "
          f"data.dynamic every {every} steps")
    dyn = [k for k in runs if k != "fixed"]
    ref = runs[dyn[0]]["mixture"]["reference"] if dyn else {}
    print("  reference (dense) loss on the steering halves: " + ", ".join(f"{d[9:]} {v:.3f}" for d, v in ref.items()))
    print(f"  {'':<14} {'weight':>7} " + " ".join(f"{'-> ' + k:>9}" for k in dyn) + " "
          + " ".join(f"{'tok ' + k:>11}" for k in runs) + "  " + " ".join(f"{'ppl ' + k:>11}" for k in scores))
    for domain in WEIGHTS:
        ppl = " ".join(f"{math.exp(scores[k][domain][0]) if domain in scores[k] else float('nan'):>11.2f}"
                       for k in scores)
        print(f"  {domain[9:]:<14} {WEIGHTS[domain]:>7.3f} "
              + " ".join(f"{runs[k]['mixture']['weights'][domain]:>9.3f}" for k in dyn) + " "
              + " ".join(f"{runs[k]['tokens_per_source'].get(domain, 0):>11,}" for k in runs) + "  " + ppl)
    pad = 14 + 8 + 10 * len(dyn) + 12 * len(runs)
    for label, weigh in (("overall", lambda n: n), ("domain mean", lambda n: 1)):
        row = []
        for k in scores:
            w = {d: weigh(n) for d, (_, n) in scores[k].items()}
            row.append(math.exp(sum(scores[k][d][0] * w[d] for d in w) / sum(w.values())))
        print(f"  {label:<{pad}} " + " ".join(f"{v:>11.2f}" for v in row))
    print("  (ppl: held-out second halves, packed in seq_len blocks; overall weighs domains by their tokens)")
    for k in dyn:
        print(f"  weights plot ({k}): {out / k.replace(' ', '') / 'cpt' / 'domain_weights.png'}")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/dynamic-mixing"))
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--dense-steps", type=int, default=1500)
    parser.add_argument("--heal-steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--eta", type=lambda v: [float(x) for x in v.split(",")], default=[1.0, 20.0],
                        help="one dynamic run per value, e.g. 1,20 (Sheared-LLaMA uses 1 with gaps of ~0.1-1 nat)")
    parser.add_argument("--heal-batch", type=int, default=16, help="sequences per heal step")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    run(args.out, args.data, args.dense_steps, args.heal_steps, args.every, args.eta, args.vocab, args.hidden,
        args.seq_len, args.heal_batch)

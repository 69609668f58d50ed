"""Step time of KD-CPT from the teacher-logit cache against the live teacher and plain CPT, and the KD loss both give.

A tiny Llama teacher (``--teacher-layers`` blocks) and a student with fewer blocks, saved as Hugging Face
directories with a byte-level tokenizer, a generated corpus, and one recipe. The real verbs run in this process:

  build   ``healer distill-cache`` over the stream cpt.max_steps will read (timed once)
  plain   ``healer cpt`` with ``cpt.kd: null`` (next-token CE)
  live    ``healer cpt`` with KD from the live teacher at ``cpt.kd.top_k``
  cached  ``healer cpt`` with ``cpt.kd.cache`` (the teacher is never loaded)

Step time is what each stage's manifest reports (global batch x seq_len / tokens_per_s, the mean of every step
after the first); ratios are against plain CPT in the same run. The KD loss is compared step by step between
live and cached (same init, same data): it must agree to fp32 rounding.

    python bench/kd_cache.py                    # 1 rank, ZeRO-0, 12 steps of 8 x 128 tokens, vocab 32000, k 64
    python bench/kd_cache.py --ranks 2 --zero-stage 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _model(out: Path, layers: int, args, seed: int) -> Path:
    from helpers import tiny_model, tiny_tokenizer

    model = tiny_model(seed=seed, layers=layers, hidden=args.hidden, intermediate=args.hidden * 3, heads=8,
                       kv_heads=4, vocab=args.vocab)
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def _run(verb: str, recipe: Path, *extra: str, ranks: int = 1) -> float:
    from healer.cli import main

    t0 = time.perf_counter()
    if ranks > 1:  # one process per rank, as `healer launch --nproc N` would start them
        import socket
        import subprocess

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        code = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "healer", verb,
                               str(recipe), *extra], check=False).returncode
    else:
        code = main([verb, str(recipe), *extra])
    if code != 0:
        raise SystemExit(f"healer {verb} {' '.join(extra)} exited {code}")
    return time.perf_counter() - t0


def _stage(run_dir: Path) -> tuple[float, list[float]]:
    out = json.loads((run_dir / "cpt" / "manifest.json").read_text())["outputs"]
    rows = [json.loads(line) for line in (run_dir / "cpt" / "metrics.jsonl").read_text().splitlines()]
    return out["tokens_per_s"], [r["train/kl"] for r in rows if "train/kl" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--teacher-layers", type=int, default=8)
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=1, help="cpt ranks (2 with --zero-stage 3: a sharded teacher)")
    args = parser.parse_args()

    import yaml
    from helpers import SAMPLE_TEXT

    tmp = Path(tempfile.mkdtemp(prefix="kd_cache_bench_"))
    teacher = _model(tmp / "teacher", args.teacher_layers, args, seed=0)
    student = _model(tmp / "student", args.student_layers, args, seed=1)
    corpus = tmp / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Record {i}: " + SAMPLE_TEXT * (1 + i % 5)}) + "\n"
                              for i in range(400)))
    base = {"model": {"source": str(teacher)}, "data": {"sources": [{"path": str(corpus)}], "seq_len": args.seq_len},
            "cpt": {"input": str(student), "max_steps": args.steps, "micro_batch_size": args.micro,
                    "global_batch_size": args.global_batch, "zero_stage": args.zero_stage, "warmup_steps": 0,
                    "save_every": 10**6, "eval_every": 10**6}}
    kd = {"top_k": args.top_k, "alpha": 0.0, "temperature": 1.0}
    recipes = {}
    for name, kd_section in (("plain", None), ("live", kd), ("cached", {**kd, "cache": str(tmp / "cache")})):
        recipe = tmp / f"{name}.yaml"
        section = {**base, "run_dir": str(tmp / name), "cpt": {**base["cpt"], "kd": kd_section}}
        recipe.write_text(yaml.safe_dump(section))
        recipes[name] = recipe

    build_s = _run("distill-cache", recipes["cached"], "--ranks", str(args.ranks))
    times, kls = {}, {}
    for name in ("plain", "live", "cached"):
        _run("cpt", recipes[name], ranks=args.ranks)
        tps, kls[name] = _stage(tmp / name)
        times[name] = args.global_batch * args.seq_len / tps
    cache_mb = sum(f.stat().st_size for f in (tmp / "cache").iterdir()) / 2**20
    load = os.getloadavg()
    print(f"\nkd_cache bench: {args.steps} steps of {args.global_batch} x {args.seq_len} tokens, vocab {args.vocab}, "
          f"teacher {args.teacher_layers} / student {args.student_layers} blocks (hidden {args.hidden}), "
          f"top_k {args.top_k}, {args.ranks} rank(s) ZeRO-{args.zero_stage}, CPU; load average {load[0]:.2f}")
    print(f"  cache build: {build_s:.1f} s, {cache_mb:.1f} MiB on disk")
    for name in ("plain", "live", "cached"):
        print(f"  {name:<7} step {times[name] * 1000:8.1f} ms   {times[name] / times['plain']:.2f}x plain")
    diffs = [abs(a - b) for a, b in zip(kls["live"], kls["cached"])]
    print(f"  KD loss (train/kl per token) live vs cached over {len(diffs)} steps: step 1 {kls['live'][0]:.6f} vs "
          f"{kls['cached'][0]:.6f}; max |diff| {max(diffs):.2e} (max relative "
          f"{max(d / abs(a) for d, a in zip(diffs, kls['live'])):.2e})")


if __name__ == "__main__":
    main()

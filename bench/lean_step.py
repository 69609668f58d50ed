"""One rank: does `healer cpt` cost more per step, or more memory, than a plain PyTorch AdamW loop?

Each variant runs in its own process (peak memory is per process), on the same model, batch and tokens:
  (p) a plain loop: model(ids, labels) / backward / clip_grad_norm_ / AdamW.step / zero_grad;
  (a) the bare DeepSpeed loop at the real ZeRO stage (engine(batch) / backward / step): what one rank
      would run if healer did not run ZeRO-1/2 as stage 0 there (nothing to shard on one rank);
  (h) `healer cpt`'s training function, real data pipeline, metrics and all.
Step time is the median over the timed steps (checkpoint/eval steps never happen: their cadence is set past
the end); memory is the process's peak RSS. Prints h/p (targets: time <= 1.1, memory <= 1.3) and h/a.

    python bench/lean_step.py                         # ZeRO-2, 135M-shaped Llama with 12 blocks, fp32, CPU
    python bench/lean_step.py --zero-stage 0 1 2      # every single-rank stage
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from trainer_overhead import _corpus, _save_model, _tokenizer  # noqa: E402


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _configs(args, corpus: str, domain: str | None):
    from healer.train.config import CPTConfig
    from healer.train.data import DataConfig, SourceConfig

    cfg = CPTConfig(zero_stage=args.zero_stage, micro_batch_size=args.micro_batch,
                    global_batch_size=args.micro_batch * args.accum, max_steps=args.warmup + args.steps + 1,
                    save_every=10**6, eval_every=10**6, warmup_steps=2, kd=None)
    data_cfg = DataConfig(sources=[SourceConfig(path=corpus, domain_field=domain)], seq_len=args.seq_len)
    return cfg, data_cfg


def _batches(data_cfg, tokenizer, micro: int, n: int) -> list[torch.Tensor]:
    from healer.train.data import build_loader

    it = iter(build_loader(data_cfg, tokenizer, rank=0, world_size=1, micro_batch_size=micro))
    return [next(it)["input_ids"] for _ in range(n)]


def _load(model_dir: Path):
    from healer.model.modeling import load_model, resolve_source

    model = load_model(resolve_source(str(model_dir)), torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model.train()
    return model


def plain_loop(args, model_dir: Path, cfg, data_cfg, tokenizer) -> list[float]:
    """(p): what a person writes by hand, with the same optimizer groups and clipping as healer."""
    from healer.train.engine import param_groups

    model = _load(model_dir)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    batches = _batches(data_cfg, tokenizer, cfg.micro_batch_size, (args.warmup + args.steps) * args.accum)
    times = []
    for s in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        for m in range(args.accum):
            ids = batches[s * args.accum + m]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss / args.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return times[args.warmup:]


def bare_deepspeed(args, model_dir: Path, cfg, data_cfg, tokenizer) -> list[float]:
    """(a): the engine alone at the real ZeRO stage (as healer ran one rank before the stage-0 path), on tensors
    built before the clock starts."""
    from healer.train.engine import build_ds_config, init_distributed, init_engine, make_optimizer

    init_distributed()
    model = _load(model_dir)
    ds = build_ds_config(zero_stage=cfg.zero_stage, micro_batch_size=cfg.micro_batch_size,
                         global_batch_size=cfg.global_batch_size, world_size=1, grad_clip=cfg.grad_clip,
                         base={"zero_optimization": {"stage": cfg.zero_stage}})
    engine = init_engine(model, ds, make_optimizer(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay))
    batches = _batches(data_cfg, tokenizer, cfg.micro_batch_size, (args.warmup + args.steps) * args.accum)
    times = []
    for s in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        for m in range(args.accum):
            ids = batches[s * args.accum + m]
            loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
            engine.backward(loss)
            engine.step()
        loss.item()
        times.append(time.perf_counter() - t0)
    return times[args.warmup:]


def healer_cpt(args, model_dir: Path, cfg, data_cfg, tokenizer) -> list[float]:
    """(h): the real trainer; step times are the gaps between consecutive logged steps."""
    from healer.model.modeling import resolve_source
    from healer.train.cpt import Options, heal

    stage = Path(tempfile.mkdtemp(prefix="healer-lean-"))
    heal(cfg, data_cfg, location=resolve_source(str(model_dir)), teacher_location=None, stage_dir=stage,
         hf_dir=stage / "hf", opts=Options(resume="none"))
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    gaps = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    return gaps[args.warmup:args.warmup + args.steps]


VARIANTS = {"p": plain_loop, "a": bare_deepspeed, "h": healer_cpt}
LABELS = {"p": "(p) plain PyTorch AdamW loop", "a": "(a) bare DeepSpeed, real", "h": "(h) healer cpt"}


def worker(args) -> int:
    torch.set_num_threads(args.threads)
    tokenizer = _tokenizer("local")[0]
    cfg, data_cfg = _configs(args, args.corpus, args.domain)
    times = VARIANTS[args.worker](args, Path(args.model), cfg, data_cfg, tokenizer)
    print("RESULT " + json.dumps({"times": times, "peak_rss_mib": _peak_rss_mib()}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12, help="blocks of the 135M-shaped Llama (576 hidden, 1536 MLP)")
    ap.add_argument("--zero-stage", type=int, nargs="+", default=[2], choices=(0, 1, 2))
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per variant and round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="the variants run in turn this many times")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--domain", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.zero_stage = args.zero_stage[0]
        return worker(args)

    root = Path(tempfile.mkdtemp(prefix="healer-lean-bench-"))
    tokenizer = _tokenizer("local")[0]
    model_dir = _save_model(root, "model", "135m", args.layers, len(tokenizer), tokenizer)
    corpus, domain = _corpus(root)
    results: dict[tuple[str, int], dict] = {}
    for _ in range(args.rounds):  # variants in turn, so a drift in the machine's load hits them alike
        for stage in args.zero_stage:
            for v in ("p", "a", "h"):
                if v == "p" and (v, -1) in results and stage != args.zero_stage[0]:
                    continue  # the plain loop has no ZeRO stage: once per round is enough
                cmd = [sys.executable, __file__, "--worker", v, "--model", str(model_dir), "--corpus", corpus,
                       "--zero-stage", str(stage), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
                       "--accum", str(args.accum), "--threads", str(args.threads)]
                if domain:
                    cmd += ["--domain", domain]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "1"})
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if out.returncode or line is None:
                    print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                    return 1
                got = json.loads(line[len("RESULT "):])
                key = (v, -1 if v == "p" else stage)
                slot = results.setdefault(key, {"times": [], "peak": 0.0})
                slot["times"] += got["times"]
                slot["peak"] = max(slot["peak"], got["peak_rss_mib"])
    med = statistics.median
    tokens = args.micro_batch * args.accum * args.seq_len
    p = results[("p", -1)]
    print(f"CPU, {args.threads} threads | Llama 576x1536, {args.layers} blocks, vocab {len(tokenizer)} | fp32 | "
          f"batch {args.micro_batch} x {args.accum} x {args.seq_len} = {tokens} tokens | "
          f"{len(p['times'])} timed steps per variant in {args.rounds} rounds")
    print(f"{LABELS['p']:<34}: {med(p['times']) * 1e3:8.1f} ms/step | peak RSS {p['peak']:7.0f} MiB")
    for stage in args.zero_stage:
        a, h = results[("a", stage)], results[("h", stage)]
        for v, r in (("a", a), ("h", h)):
            print(f"{LABELS[v] + f' ZeRO-{stage}':<34}: {med(r['times']) * 1e3:8.1f} ms/step | "
                  f"peak RSS {r['peak']:7.0f} MiB")
        print(f"ZeRO-{stage}: healer/plain time {med(h['times']) / med(p['times']):.3f} (target <= 1.1), memory "
              f"{h['peak'] / p['peak']:.3f} (target <= 1.3) | healer/bare DeepSpeed time "
              f"{med(h['times']) / med(a['times']):.3f}")
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

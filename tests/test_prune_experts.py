"""Expert pruning: removing experts is exact surgery, the criteria rank what the router actually uses, and the
stage writes a checkpoint plain transformers loads with the kept experts listed per block."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import MOE_FAMILIES, SAMPLE_TEXT, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from healer.core.errors import HealerError
from healer.model.adapter import ModelAdapter
from healer.model.experts import expert_width_key, keep_experts, moe_parts, shrink_experts
from healer.model.modeling import save_and_verify
from healer.prune.blockwise import BlockStack
from healer.prune.config import PruneConfig
from healer.prune.experts import frequency_scores, reap_scores
from healer.prune.stage import prune

TOKENS = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))


def _keep(model, kept: list[int]) -> None:
    adapter = ModelAdapter(model)
    keep_experts(adapter.arch, adapter.blocks, model.config, {i: torch.tensor(kept) for i in range(adapter.num_blocks)})


def _routers(model):
    adapter = ModelAdapter(model)
    return [moe_parts(adapter.arch, block)[0] for block in adapter.blocks]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_keeping_every_expert_is_the_identity(family):
    model = tiny_model(family, layers=2)
    with torch.no_grad():
        before = model(TOKENS).logits
    _keep(model, list(range(8)))
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, before)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_keeping_k_of_e_experts_equals_the_dense_model_whose_router_never_picks_the_others(family, tmp_path):
    model = tiny_model(family, layers=3)
    removed = [1, 4, 6]
    masked = copy.deepcopy(model)
    for router in _routers(masked):
        router.forward = _rerouted(router, removed)
    with torch.no_grad():
        expected = masked(TOKENS).logits
    _keep(model, [e for e in range(8) if e not in removed])
    with torch.no_grad():
        got = model(TOKENS).logits
    assert model.config.num_experts == 5 and all(r.weight.shape[0] == 5 for r in _routers(model))
    assert torch.allclose(got, expected, atol=1e-5)
    save_and_verify(model, None, tmp_path / "out")  # config.json describes the weights: plain transformers reloads
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.num_experts == 5 and reloaded.config.num_experts_per_tok == 2


def _rerouted(router, removed: list[int]):
    """The router's forward with the ``removed`` experts' logits at -inf before its softmax and top-k (and its
    renormalisation of the top-k weights where the family does it: Mixtral always, Qwen/OLMoE with
    norm_topk_prob)."""
    def forward(hidden_states):
        logits = torch.nn.functional.linear(hidden_states.reshape(-1, router.weight.shape[1]), router.weight)
        logits = logits.index_fill(-1, torch.tensor(removed), float("-inf"))
        top, idx = torch.topk(torch.softmax(logits.float(), dim=-1), router.top_k, dim=-1)
        if getattr(router, "norm_topk_prob", True):
            top = top / top.sum(-1, keepdim=True)
        return logits, top.to(logits.dtype), idx
    return forward


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_experts_the_router_never_picks_score_zero_and_go_first(family):
    model = tiny_model(family, layers=2)
    never = [2, 5]
    for router in _routers(model):
        router.forward = _rerouted(router, never)
    stack = BlockStack.from_model(model)
    freq, reap = frequency_scores(stack, TOKENS, progress=False), reap_scores(stack, TOKENS, progress=False)
    for block_freq, block_reap in zip(freq, reap):
        assert block_freq.sum().item() == pytest.approx(2.0)  # each token picks num_experts_per_tok = 2
        assert block_freq[never].tolist() == [0.0, 0.0] and block_reap[never].tolist() == [0.0, 0.0]
        assert (block_freq[[0, 1, 3, 4, 6, 7]] > 0).all() and (block_reap[[0, 1, 3, 4, 6, 7]] > 0).all()


def test_reap_scales_with_the_experts_output_and_frequency_does_not():
    model = tiny_model("qwen3_moe", layers=2)
    stack = BlockStack.from_model(model)
    freq, reap = frequency_scores(stack, TOKENS, progress=False), reap_scores(stack, TOKENS, progress=False)
    with torch.no_grad():  # expert 3 of the last block writes 10x louder; routing (the router's input) is unchanged
        moe_parts(stack.arch, ModelAdapter(model).blocks[1])[1].down_proj[3] *= 10
    freq2, reap2 = frequency_scores(stack, TOKENS, progress=False), reap_scores(stack, TOKENS, progress=False)
    assert torch.equal(freq2[1], freq[1]) and torch.equal(reap2[0], reap[0])
    assert reap2[1][3].item() == pytest.approx(10 * reap[1][3].item(), rel=1e-5)
    others = [e for e in range(8) if e != 3]
    assert torch.allclose(reap2[1][others], reap[1][others])


@pytest.fixture
def calibration(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": f"Document {i}. " + SAMPLE_TEXT}) + "\n" for i in range(8)))
    return {"path": str(path), "num_samples": 4, "seq_len": 32}


@pytest.mark.parametrize("criterion", ["frequency", "reap"])
def test_expert_pruning_stage_writes_a_loadable_checkpoint_listing_the_kept_experts(criterion, tmp_path,
                                                                                    calibration):
    src = save_tiny(tmp_path, "qwen2_moe", layers=3)
    cfg = PruneConfig(method="width", criterion=criterion, ratio=0.5, calibration=calibration)
    report = prune(str(src), cfg, tmp_path / "out", progress=False)
    assert report["target"] == "experts" and report["experts"] == [8, 4]
    assert report["scored_from"] == "memory"  # its files hold one tensor per expert; the modules fuse them
    kept = report["kept_experts_per_block"]
    assert len(kept) == 3 and all(len(k) == 4 and k == sorted(k) for k in kept)
    # each block keeps its own four highest-scoring experts
    for block_kept, scores in zip(kept, report["expert_scores"]):
        assert sorted(block_kept) == sorted(sorted(range(8), key=lambda e: -scores[e])[:4])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_experts == 4 and model.config.num_experts_per_tok == 2
    assert report["config_changes"]["num_experts"] == [8, 4]
    shared = ModelAdapter(model).blocks[0].mlp.shared_expert.gate_proj.weight
    assert shared.shape[0] == 64  # the shared expert is never pruned
    assert report["params_after"] < report["params_before"]


def test_expert_pruning_requests_that_cannot_work_are_refused_in_one_line(tmp_path, calibration):
    moe = save_tiny(tmp_path, "mixtral", name="moe", layers=2)
    dense = save_tiny(tmp_path, "llama", name="dense", layers=2)
    cases = [
        (moe, dict(method="width", criterion="reap", ratio=0.9), "prune.ratio 0.9 keeps 1 of 8 experts per block, "
                                                                 "fewer than the 2"),
        (moe, dict(method="width", criterion="reap", experts=1), "prune.experts 1 keeps 1 of 8 .* fewer than the 2"),
        (moe, dict(method="width", criterion="reap", experts=8), "prune.experts 8 keeps every one of the model's 8"),
        (dense, dict(method="width", criterion="frequency", ratio=0.5), "llama: prune.target experts needs a "
                                                                         "mixture-of-experts model"),
        (moe, dict(method="width", criterion="activation", ratio=0.5), "mixtral: prune.criterion activation scores "
                                                                          "dense MLP neurons.*use criterion maw or l2"),
        (moe, dict(method="sparse", criterion="wanda", sparsity={"pattern": "2:4"}),
         "mixtral: sparse pruning of mixture-of-experts MLPs is not supported"),
    ]
    for source, keys, message in cases:
        with pytest.raises(HealerError, match=message):
            prune(str(source), PruneConfig(**keys, calibration=calibration), tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()


def test_depth_pruning_a_qwen_moe_lists_the_dense_blocks_that_survive(tmp_path):
    model = tiny_model("qwen3_moe", layers=6, decoder_sparse_step=2, mlp_only_layers=[4])
    adapter = ModelAdapter(model)
    assert [i for i, b in enumerate(adapter.blocks) if moe_parts(adapter.arch, b) is None] == [0, 2, 4]
    with torch.no_grad():
        handles = [ModelAdapter(model).blocks[i].register_forward_hook(lambda m, args, out: args[0]) for i in (1, 2)]
        skipped = model(TOKENS).logits
        for h in handles:
            h.remove()
    edited = ModelAdapter(model).remove_blocks([1, 2])
    assert "mlp_only_layers" in edited
    assert (model.config.decoder_sparse_step, model.config.mlp_only_layers) == (1, [0, 2])
    with torch.no_grad():
        assert torch.allclose(model(TOKENS).logits, skipped, atol=1e-5)
    save_and_verify(model, None, tmp_path / "out")  # the reloaded model builds the same dense/MoE blocks


def test_an_moe_checkpoint_missing_or_holding_extra_tensors_is_refused_at_load(tmp_path):
    from safetensors.torch import load_file, save_file

    from healer.model.modeling import load_model, resolve_source

    src = save_tiny(tmp_path, "mixtral", layers=2)
    weights = load_file(src / "model.safetensors")
    expert = next(k for k in weights if ".experts.3." in k)  # stored one tensor per expert
    for gone, message in ((expert, "cannot read the weights .*conversion"),
                          ("model.layers.1.input_layernorm.weight", "the safetensors lack 1 tensor")):
        save_file({k: v for k, v in weights.items() if k != gone}, src / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(HealerError, match=message):
            load_model(resolve_source(str(src)))
    save_file({**weights, "model.layers.2.input_layernorm.weight": torch.ones(64)}, src / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(HealerError, match="hold tensor.* that config.json does not describe"):
        load_model(resolve_source(str(src)))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_removing_silent_neurons_of_every_expert_leaves_logits_unchanged(family, tmp_path):
    model = tiny_model(family, layers=2)
    adapter = ModelAdapter(model)
    key = expert_width_key(model.config)
    width = getattr(model.config, key)
    # each expert has its own dead neurons: expert e's neurons e, e+4, e+8, ... write nothing
    dead = [torch.arange(e % 4, width, 4) for e in range(8)]
    with torch.no_grad():
        for block in adapter.blocks:
            experts = moe_parts(adapter.arch, block)[1]
            for e, neurons in enumerate(dead):
                experts.down_proj[e][:, neurons] = 0
        before = model(TOKENS).logits
    keep = torch.stack([torch.tensor([i for i in range(width) if i % 4 != e % 4]) for e in range(8)])
    shrink_experts(adapter.arch, adapter.blocks, model.config, [keep] * adapter.num_blocks)
    with torch.no_grad():
        after = model(TOKENS).logits
    assert getattr(model.config, key) == width * 3 // 4
    assert torch.allclose(before, after, atol=1e-5)
    save_and_verify(model, None, tmp_path / "out")


def test_expert_width_pruning_by_weights_keeps_each_experts_own_neurons(tmp_path, calibration):
    src = save_tiny(tmp_path, "qwen3_moe", layers=2)
    cfg = PruneConfig(method="width", criterion="l2", ratio=0.5, round_to=8)
    report = prune(str(src), cfg, tmp_path / "out", progress=False)
    assert report["expert_intermediate_size"] == [32, 16] and report["config_key"] == "moe_intermediate_size"
    removed = report["removed_per_block"]
    assert len(removed) == 2 and all(len(per_expert) == 8 and all(len(r) == 16 for r in per_expert)
                                     for per_expert in removed)
    assert len({tuple(r) for r in removed[0]}) > 1  # experts keep different neurons
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.moe_intermediate_size == 16 and model.config.num_experts == 8


def test_a_count_of_experts_kept_is_the_same_as_the_ratio_that_keeps_it(tmp_path, calibration):
    src = save_tiny(tmp_path, "olmoe", layers=2)
    by_count = prune(str(src), PruneConfig(method="width", criterion="frequency", experts=6, calibration=calibration),
                     tmp_path / "count", progress=False)
    by_ratio = prune(str(src), PruneConfig(method="width", criterion="frequency", ratio=0.25, calibration=calibration),
                     tmp_path / "ratio", progress=False)
    assert by_count["experts"] == by_ratio["experts"] == [8, 6]
    assert by_count["kept_experts_per_block"] == by_ratio["kept_experts_per_block"]


@pytest.mark.parametrize("keys,message", [
    (dict(criterion="maw", experts=4), "prune.experts applies to expert pruning .*not criterion maw"),
    (dict(criterion="reap", experts=4, ratio=0.5), "give only one of ratio, experts"),
    (dict(criterion="reap"), "prune.ratio is required .* or prune.experts"),
    (dict(method="depth", criterion="magnitude", experts=4), "prune.experts applies to expert pruning"),
    (dict(method="sparse", criterion="wanda", experts=4, sparsity={"pattern": "2:4"}),
     "prune.experts does not apply to method: sparse"),
])
def test_bad_expert_amounts_are_refused_naming_the_key(keys, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        PruneConfig(**{"method": "width", **keys})

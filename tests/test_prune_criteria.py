"""Each criterion, on a model built to have one obvious answer, picks that answer."""

from __future__ import annotations

import pytest
import torch
from helpers import ALL_FAMILIES, tiny_model

from healer.model.adapter import ModelAdapter
from healer.model.modeling import stored_in_another_layout
from healer.prune import depth, width
from healer.prune.blockwise import BlockStack
from healer.prune.criteria import CRITERIA

TOKENS = torch.randint(0, 320, (6, 32), generator=torch.Generator().manual_seed(1))


def own_text(model, n=8, length=32):
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(TOKENS[:n, :1], max_new_tokens=length - 1, do_sample=True, temperature=0.7,
                             top_k=0, pad_token_id=0)
    return out


def silence_block(model, i):
    """Make block ``i`` the identity: nothing it computes reaches the residual stream."""
    block = ModelAdapter(model).blocks[i]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("criterion", ["ppl", "taylor", "block_influence", "magnitude"])
def test_depth_criterion_picks_the_silent_block(criterion):
    model = tiny_model("llama", layers=6)
    silence_block(model, 3)
    if criterion == "magnitude":  # magnitude sees weights only: shrink them instead
        with torch.no_grad():
            for p in ModelAdapter(model).blocks[3].parameters():
                p.mul_(0.01)
    stack = BlockStack.from_model(model)
    candidates = list(range(6))
    # A random model is no better than chance on random text, so dropping a noisy block can *lower*
    # perplexity. On text the model itself wrote, every block that acts moves it off its own choices.
    tokens = own_text(model) if criterion == "ppl" else TOKENS
    spec = CRITERIA["depth"][criterion]
    scores = spec.score(stack, tokens, candidates, 1, progress=False)
    assert spec.select(scores, 1) == [3], scores


def test_ppl_of_silent_block_equals_dense_perplexity():
    model = tiny_model("llama", layers=6)
    silence_block(model, 2)
    scores = depth.ppl_scores(BlockStack.from_model(model), TOKENS, [2, 3], 1, progress=False)
    assert scores[2] == pytest.approx(depth.perplexity(model, TOKENS), rel=1e-4)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_cached_prefix_ppl_matches_naive_full_forward(family, tmp_path):
    # Block by block, from memory or read from disk one block at a time, each family computes what its own
    # forward does: Gemma's scaled embeddings and soft-capped logits, per-layer rotary and sliding masks included.
    model = tiny_model(family, layers=5)
    candidates = [1, 2, 3]
    naive = depth.ppl_scores_naive(model, TOKENS, candidates)
    assert model.config.num_hidden_layers == 5 and len(model.model.layers) == 5  # naive put everything back
    model.save_pretrained(tmp_path / family)
    stacks = [BlockStack.from_model(model)]
    if not stored_in_another_layout(model.config):  # MoE files hold one tensor per expert: scored in memory
        stacks.append(BlockStack.from_pretrained_dir(tmp_path / family))
    for stack in stacks:
        fast = depth.ppl_scores(stack, TOKENS, candidates, 1, progress=False)
        for i in candidates:
            assert fast[i] == pytest.approx(naive[i], rel=1e-4)


def test_angular_picks_the_silent_span():
    model = tiny_model("mistral", layers=7)
    silence_block(model, 3)
    silence_block(model, 4)
    scores = depth.angular_scores(BlockStack.from_model(model), TOKENS, list(range(7)), 2, progress=False)
    assert sorted(scores) == [0, 1, 2, 3, 4, 5]  # every start whose span of 2 fits
    assert depth.lowest_span(scores, 2) == [3, 4]
    assert scores[3] == pytest.approx(0.0, abs=1e-3)


def test_angular_spans_stay_inside_the_candidates():
    model = tiny_model("mistral", layers=7)
    scores = depth.angular_scores(BlockStack.from_model(model), TOKENS, [1, 2, 3, 4], 3, progress=False)
    assert sorted(scores) == [1, 2]


def _dim_neurons(model, neurons):
    with torch.no_grad():
        for block in ModelAdapter(model).blocks:
            block.mlp.gate_proj.weight[neurons] *= 0.01
            block.mlp.up_proj.weight[neurons] *= 0.01
            block.mlp.down_proj.weight[:, neurons] *= 0.01


@pytest.mark.parametrize("criterion", ["maw", "l2", "activation"])
def test_width_criterion_drops_the_dim_neurons(criterion):
    model = tiny_model("llama", layers=3)
    dim = torch.arange(5, 128, 8)  # 16 neurons
    _dim_neurons(model, dim)
    scores = CRITERIA["width"][criterion].score(BlockStack.from_model(model), TOKENS, progress=False)
    kept = width.top_indices(scores, 112)
    for k in kept:
        assert set(k.tolist()).isdisjoint(dim.tolist())


def test_head_norm_drops_the_silent_group():
    model = tiny_model("qwen3", layers=2, heads=8, kv_heads=4)
    head_dim = ModelAdapter(model).head_dim
    with torch.no_grad():
        for block in ModelAdapter(model).blocks:  # group 2 = query heads 4, 5
            block.self_attn.o_proj.weight[:, 4 * head_dim:6 * head_dim] = 0
    scores = width.head_output_scores(BlockStack.from_model(model), TOKENS, progress=False)
    for s in scores:
        assert s[2] == 0 and (s[[0, 1, 3]] > 0).all()
    assert all(2 not in k.tolist() for k in width.top_indices(scores, 3))


def test_kept_width_rounds_and_refuses_zero():
    assert width.kept_width(1536, 0.2, 8) == 1232
    assert width.kept_width(1536, 0.2, 64) == 1216
    with pytest.raises(ValueError, match="rounds to 0"):
        width.kept_width(16, 0.9, 8)
    with pytest.raises(ValueError, match="rounds to removing none"):
        width.kept_width(128, 0.01, 8)  # 126.7 rounds up to all 128


def test_default_width_is_one_llama_cpp_k_quantises_and_smaller_ones_are_warned_about():
    from healer.prune.config import PruneConfig

    default = PruneConfig(method="width", criterion="maw", ratio=0.2).round_to
    keep = width.kept_width(1536, 0.2, default)  # SmolLM2's MLP: round_to 8 gave 1232, not even a multiple of 32
    assert keep == 1280 and width.kernel_warnings(keep) == []
    assert width.width_divisibility({"intermediate_size": keep})["intermediate_size"]["divisible_by"] == {
        "32": True, "64": True, "128": True, "256": True}
    assert "cannot quantise ffn_down" in " ".join(width.kernel_warnings(1232))
    k_quant, marlin = width.kernel_warnings(1216)  # round_to 64: q8_0 works, Q4_K falls back, Marlin refuses
    assert "k-quants" in k_quant and "falls back" in k_quant and "Marlin" in marlin
    assert len(width.kernel_warnings(1152)) == 1  # a multiple of 128 but not of 256


def test_block_count_refusals():
    with pytest.raises(ValueError, match="rounds to 0"):
        depth.blocks_to_remove(6, 0.05, None)
    with pytest.raises(ValueError, match="leave none"):
        depth.blocks_to_remove(6, None, 6)

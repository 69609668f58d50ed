"""Surgery is exact: what the pruned model computes is what the original computes without the removed parts."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import ALL_FAMILIES, FAMILIES, tiny_model

from healer.core.errors import UnsupportedArchitecture
from healer.model.adapter import ARCHITECTURES, ModelAdapter, architecture_for, mlp_weights
from healer.model.modeling import save_and_verify

TOKENS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_removing_blocks_equals_skipping_them(family):
    model = tiny_model(family)
    with torch.no_grad():
        handles = [ModelAdapter(model).blocks[i].register_forward_hook(lambda m, args, out: args[0])
                   for i in (1, 4)]
        skipped = model(TOKENS).logits
        for h in handles:
            h.remove()
        full = model(TOKENS).logits
    pruned = copy.deepcopy(model)
    ModelAdapter(pruned).remove_blocks([1, 4])
    with torch.no_grad():
        got = pruned(TOKENS).logits
    assert pruned.config.num_hidden_layers == 4
    assert torch.allclose(got, skipped, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-3)  # the blocks did matter


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_dead_mlp_neurons_leaves_logits_unchanged(family):
    model = tiny_model(family)
    adapter = ModelAdapter(model)
    dead = torch.arange(0, 128, 4)  # every 4th neuron: 32 of 128
    with torch.no_grad():
        for block in adapter.blocks:
            block.mlp.down_proj.weight[:, dead] = 0
        before = model(TOKENS).logits
    keep = torch.tensor([i for i in range(128) if i % 4])
    adapter.shrink_mlp([keep] * adapter.num_blocks)
    with torch.no_grad():
        after = model(TOKENS).logits
    assert model.config.intermediate_size == 96
    gate, up, down = mlp_weights(adapter.arch, adapter.blocks[0])
    assert gate.shape == up.shape == (96, 64) and down.shape == (64, 96)
    assert torch.allclose(before, after, atol=1e-5)


HEAD_PRUNABLE = tuple(f for f in ALL_FAMILIES if not ARCHITECTURES[f].qk_norm_spans_heads)


@pytest.mark.parametrize("family", HEAD_PRUNABLE)
def test_removing_silent_kv_group_leaves_logits_unchanged(family, tmp_path):
    model = tiny_model(family, heads=4, kv_heads=2)
    adapter = ModelAdapter(model)
    head_dim = adapter.head_dim
    with torch.no_grad():
        for block in adapter.blocks:  # KV group 1 owns query heads 2 and 3
            block.self_attn.o_proj.weight[:, 2 * head_dim:4 * head_dim] = 0
        before = model(TOKENS).logits
    adapter.shrink_attention([torch.tensor([0])] * adapter.num_blocks)
    with torch.no_grad():
        after = model(TOKENS).logits
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    assert torch.allclose(before, after, atol=1e-5)
    # The edited config must describe the new shapes to plain transformers.
    save_and_verify(model, None, tmp_path / "out")


@pytest.mark.parametrize("family", sorted(set(ALL_FAMILIES) - set(HEAD_PRUNABLE)))
def test_head_pruning_is_refused_where_q_k_norms_span_all_heads(family):
    model = tiny_model(family)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(UnsupportedArchitecture, match=f"{family}: attention heads cannot be pruned.*prune.target: mlp"):
        ModelAdapter(model).shrink_attention([torch.tensor([0])] * model.config.num_hidden_layers)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_round_trips_after_depth_and_width_surgery(family, tmp_path):
    model = tiny_model(family)
    adapter = ModelAdapter(model)
    adapter.remove_blocks([0, 5])
    adapter.shrink_mlp([torch.arange(0, 128, 2)] * adapter.num_blocks)
    diff = save_and_verify(model, None, tmp_path / family)
    assert diff < 1e-4
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / family)
    assert reloaded.config.num_hidden_layers == 4 and reloaded.config.intermediate_size == 64
    # layer_idx is renumbered so the KV cache works when generating
    assert [b.self_attn.layer_idx for b in ModelAdapter(model).blocks] == [0, 1, 2, 3]
    out = model.generate(TOKENS[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 9


def test_qwen2_sliding_layer_lists_stay_consistent(tmp_path):
    model = tiny_model("qwen2", layers=6, use_sliding_window=True, sliding_window=8, max_window_layers=3)
    assert model.config.layer_types[3:] == ["sliding_attention"] * 3
    edited = ModelAdapter(model).remove_blocks([1, 4])
    assert "layer_types" in edited and "max_window_layers" in edited
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert model.config.max_window_layers == 2
    save_and_verify(model, None, tmp_path / "q")


def test_tied_embeddings_survive(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)
    ModelAdapter(model).remove_blocks([2])
    save_and_verify(model, None, tmp_path / "tied")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_unknown_family_is_refused_by_name():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitecture, match="'gpt2'.*supported: gemma2, gemma3_text, llama, "):
        architecture_for(GPT2Config())


def test_every_supported_family_is_built_by_the_tests():
    assert set(ALL_FAMILIES) == set(ARCHITECTURES)

"""Sparse pruning: Wanda, SparseGPT and magnitude at unstructured and N:M patterns, on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import FAMILIES, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from healer.core.errors import HealerError
from healer.model.adapter import architecture_for
from healer.prune.blockwise import BlockStack
from healer.prune.pattern import parse_pattern
from healer.prune.sparse import ShardWriter, plan_sparsity, projection_paths, save_sparse, sparsify, verify_sparsity
from healer.prune.sparse_scores import magnitude_mask, wanda_mask
from healer.prune.sparsegpt import Hessian, sparsegpt_prune

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def calib(n: int = 6, seq: int = 24, vocab: int = 320, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def block_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}


@pytest.mark.parametrize("family", FAMILIES)
def test_wanda_half_of_every_row_and_nothing_else_touched(family):
    model = tiny_model(family, layers=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = sparsify(model, calib(), criterion="wanda", pattern="unstructured", ratio=0.5, progress=False)

    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            zeros_per_row = (p == 0).sum(1)
            assert torch.equal(zeros_per_row, torch.full_like(zeros_per_row, p.shape[1] // 2)), name
            kept = p != 0
            assert torch.equal(p[kept], before[name][kept]), f"{name}: wanda must not update kept weights"
        else:  # embeddings, lm_head, norms, qwen2's q/k/v biases
            assert torch.equal(p, before[name]), f"{name} changed"
    assert report["sparsity"]["overall"] == 0.5 and report["sparsity"]["pattern_holds"]
    roles = projection_paths(architecture_for(model.config))  # phi3: qkv_proj and gate_up_proj, fused
    assert len(report["sparsity"]["per_layer"]) == 3 * len(roles)
    assert set(report["sparsity"]["by_type"]) == set(roles)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt", "magnitude"])
@pytest.mark.parametrize("pattern,keep", [("2:4", 2), ("4:8", 4)])
def test_nm_every_group_holds(criterion, pattern, keep):
    model = tiny_model("llama", layers=2)
    report = sparsify(model, calib(), criterion=criterion, pattern=pattern, progress=False)
    m = int(pattern.split(":")[1])
    for name, w in block_weights(model).items():
        groups = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert (groups <= keep).all(), name
    check = verify_sparsity(model, pattern)["sparsity"]
    assert check["pattern_holds"] and check["overall"] >= 0.5
    assert report["sparsity"]["pattern_holds"] and report["ratio"] == 0.5


def test_verify_finds_one_broken_group():
    model = tiny_model("llama", layers=2)
    sparsify(model, calib(), criterion="wanda", pattern="2:4", progress=False)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4:8] = 1.0
    check = verify_sparsity(model.state_dict(), "2:4")["sparsity"]
    assert not check["pattern_holds"]
    assert check["per_layer"]["model.layers.1.mlp.up_proj"]["bad_groups"] == 1
    assert check["problems"] == ["model.layers.1.mlp.up_proj: 1 groups of 4 hold more than 2 nonzeros"]


def test_wanda_keeps_small_weights_on_loud_inputs():
    """Feature 0 is 100x louder than the rest and its weights 10x smaller: magnitude cuts them, Wanda keeps them."""
    torch.manual_seed(0)
    weight = torch.randn(16, 32).abs() + 0.5
    weight[:, 0] *= 0.1
    x = torch.randn(256, 32)
    x[:, 0] *= 100
    norms = x.pow(2).sum(0)
    pattern = parse_pattern("unstructured", 0.5)
    by_magnitude, by_wanda = magnitude_mask(weight, pattern), wanda_mask(weight, norms, pattern)
    assert by_magnitude[:, 0].all() and not by_wanda[:, 0].any()

    def error(mask):  # what the user notices: the layer's output moves far less with Wanda's choice
        return (x @ weight.masked_fill(mask, 0).T - x @ weight.T).norm()

    assert error(by_wanda) < 0.5 * error(by_magnitude)


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda():
    torch.manual_seed(0)
    inputs = torch.randn(1024, 16) @ torch.randn(16, 64)  # correlated features: the OBS update has work to do
    inputs += 0.1 * torch.randn_like(inputs)
    weight = torch.randn(48, 64)
    h = Hessian(64)
    for chunk in inputs.split(100):
        h.add(chunk)
    assert torch.allclose(h.matrix, 2 * inputs.T @ inputs / len(inputs), rtol=1e-4, atol=1e-3)
    norms = inputs.pow(2).sum(0)
    for spec, ratio in (("unstructured", 0.5), ("2:4", None)):
        pattern = parse_pattern(spec, ratio)
        new, mask, _ = sparsegpt_prune(weight, h.matrix, pattern)
        assert (new[mask] == 0).all()
        assert (new == 0).float().mean() >= 0.5

        def error(w):
            return (inputs @ w.T - inputs @ weight.T).norm().item()

        err_sgpt = error(new)
        err_mag = error(weight.masked_fill(magnitude_mask(weight, pattern), 0))
        err_wanda = error(weight.masked_fill(wanda_mask(weight, norms, pattern), 0))
        assert err_sgpt < 0.7 * err_mag and err_sgpt < 0.7 * err_wanda, (spec, err_sgpt, err_wanda, err_mag)


def test_second_block_is_scored_on_the_pruned_first_block():
    model = tiny_model("llama", layers=2)
    dense = copy.deepcopy(model)
    tokens = calib(n=4)
    seen = []
    q1 = model.model.layers[1].self_attn.q_proj
    handle = q1.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    sparsify(model, tokens, criterion="wanda", pattern="unstructured", ratio=0.5, progress=False)
    handle.remove()

    def q1_input(m):
        stack = BlockStack.from_model(m)
        h = stack.embed(tokens)
        with torch.no_grad():
            h = stack.run_block(m.model.layers[0], 0, h, stack.context(h))
            return m.model.layers[1].input_layernorm(h)

    assert len(seen) == 1  # one statistics pass over the only chunk; block 1's output is never recomputed
    assert torch.allclose(seen[0], q1_input(model), atol=1e-5)  # block 0 already pruned
    assert not torch.allclose(seen[0], q1_input(dense), atol=1e-2)


def test_only_the_named_layers_are_pruned():
    model = tiny_model("qwen2", layers=2)
    before = block_weights(model)
    report = sparsify(model, None, criterion="magnitude", pattern="unstructured", ratio=0.25,
                      layers=["down_proj", "o_proj"], progress=False)
    for name, w in block_weights(model).items():
        if "down_proj" in name or "o_proj" in name:
            assert (w == 0).float().mean() == 0.25
        else:
            assert torch.equal(w, before[name])
    assert set(report["sparsity"]["by_type"]) == {"down_proj", "o_proj"}


def test_from_disk_shards_equals_in_memory(tmp_path):
    source = save_tiny(tmp_path, "llama", layers=3)
    # Several shards, so the writer has to keep every tensor in its own file.
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(source, max_shard_size="60KB")
    assert (source / "model.safetensors.index.json").is_file()
    tokens = calib()
    reference = AutoModelForCausalLM.from_pretrained(source)
    sparsify(reference, tokens, criterion="sparsegpt", pattern="2:4", progress=False)

    out = tmp_path / "sparse"
    writer = ShardWriter(source, out)
    report = sparsify(BlockStack.from_pretrained_dir(source), tokens, criterion="sparsegpt", pattern="2:4",
                      write=writer, progress=False)
    writer.finish()
    assert not (out / ".sparse-staging").exists()
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), (_, b) in zip(reference.named_parameters(), reloaded.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    check = verify_sparsity(out, "2:4")["sparsity"]
    assert check["pattern_holds"] and check["zeros"] == report["sparsity"]["zeros"]


def test_save_sparse_reload_keeps_every_zero(tmp_path, tokenizer):
    model = tiny_model("qwen2", layers=2)
    report = sparsify(model, calib(), criterion="wanda", pattern="4:8", progress=False)
    saved = save_sparse(model, tokenizer, tmp_path / "out", "4:8")
    assert saved["sparsity"]["zeros"] == report["sparsity"]["zeros"] and saved["reload_max_logit_diff"] < 1e-4
    assert verify_sparsity(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), "4:8")["sparsity"]["pattern_holds"]


@pytest.mark.parametrize("kwargs,match", [
    ({"criterion": "wanda", "pattern": "unstructured", "ratio": 1.5}, "ratio must be between 0 and 1"),
    ({"criterion": "wanda", "pattern": "unstructured"}, "ratio is required"),
    ({"criterion": "wanda", "pattern": "4:2"}, "0 < N < M"),
    ({"criterion": "wanda", "pattern": "2:4", "ratio": 0.3}, "contradicts pattern"),
    ({"criterion": "wanda", "pattern": "half"}, "neither 'unstructured' nor N:M"),
    ({"criterion": "wandaa", "pattern": "2:4"}, "unknown sparse criterion 'wandaa'"),
    ({"criterion": "wanda", "pattern": "2:4", "layers": ["lm_head"]}, "lm_head"),
    ({"criterion": "wanda", "pattern": "3:5"}, "not a multiple of 5"),
])
def test_bad_requests_are_refused_before_any_change(kwargs, match):
    model = tiny_model("llama", layers=2)
    before = block_weights(model)
    with pytest.raises(HealerError, match=match):
        sparsify(model, calib(), progress=False, **kwargs)
    assert all(torch.equal(w, before[n]) for n, w in block_weights(model).items())


def test_disk_stack_without_a_writer_and_wanda_without_data_are_refused(tmp_path):
    source = save_tiny(tmp_path, "llama", layers=2)
    with pytest.raises(HealerError, match="write=ShardWriter"):
        sparsify(BlockStack.from_pretrained_dir(source), calib(), criterion="wanda", pattern="2:4", progress=False)
    with pytest.raises(HealerError, match="calibration.path is required"):
        sparsify(tiny_model("llama", layers=2), None, criterion="sparsegpt", pattern="2:4", progress=False)
    with pytest.raises(HealerError, match="is the source checkpoint"):
        ShardWriter(source, source)


def test_projection_roles_come_from_the_adapter():
    from healer.model.adapter import ARCHITECTURES

    assert tuple(projection_paths(ARCHITECTURES["qwen3"])) == PROJECTIONS
    assert projection_paths(ARCHITECTURES["llama"])["down_proj"] == "mlp.down_proj"
    assert tuple(projection_paths(ARCHITECTURES["phi3"])) == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def test_a_role_the_family_does_not_have_is_refused_naming_its_roles():
    model = tiny_model("phi3", layers=2)
    before = block_weights(model)
    with pytest.raises(HealerError, match="q_proj.*qkv_proj, o_proj, gate_up_proj, down_proj"):
        sparsify(model, None, criterion="magnitude", pattern="2:4", layers=["q_proj"], progress=False)
    assert all(torch.equal(w, before[n]) for n, w in block_weights(model).items())
    sparsify(model, None, criterion="magnitude", pattern="2:4", layers=["qkv_proj"], progress=False)
    for name, w in block_weights(model).items():
        assert (w == 0).float().mean() == (0.5 if "qkv_proj" in name else 0), name


def test_disk_prune_keeps_the_checkpoint_dtype_and_refuses_a_used_output(tmp_path):
    source = tmp_path / "bf16"
    tiny_model("qwen2", layers=2).to(torch.bfloat16).save_pretrained(source)
    out = tmp_path / "sparse"
    writer = ShardWriter(source, out)
    sparsify(BlockStack.from_pretrained_dir(source), None, criterion="magnitude", pattern="2:4", write=writer,
             progress=False)
    writer.finish()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    assert verify_sparsity(reloaded, "2:4")["sparsity"]["pattern_holds"]

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "model-00001-of-00002.safetensors").write_bytes(b"old")
    with pytest.raises(HealerError, match="already holds other weights"):
        ShardWriter(source, tmp_path / "used")


@pytest.mark.parametrize("recipe,pattern,ratio", [("wanda-llama2-7b-50.yaml", "unstructured", 0.5),
                                                  ("wanda-llama2-7b-2of4.yaml", "2:4", None)])
def test_paper_recipes_validate_and_plan_on_llama2_7b(recipe, pattern, ratio, tmp_path):
    """The whole recipe passes the schema, `healer run` would start every stage in order, and the sparse
    prune plans on Llama-2-7B's shapes (no download: LlamaConfig's defaults are Llama-2-7B's)."""
    from pathlib import Path

    from transformers import LlamaConfig

    from healer.recipe import load_recipe
    from healer.run.pipeline import Options, plan, stages_of

    path = Path(__file__).parents[1] / "configs" / recipe
    loaded = load_recipe(path, [f"run_dir={tmp_path}"])
    cfg = loaded.prune
    assert (cfg.method, cfg.criterion, cfg.sparsity.pattern, cfg.sparsity.ratio) == ("sparse", "wanda", pattern, ratio)
    assert (cfg.calibration.num_samples, cfg.calibration.seq_len) == (128, 2048)
    assert loaded.cpt.max_steps * loaded.cpt.global_batch_size == 30000 and loaded.data.seq_len == 1024
    assert loaded.cpt.kd is None and loaded.cpt.lora is not None  # the paper's LoRA heal is plain CE, not KD
    stages = stages_of(loaded)
    assert plan(loaded, stages, None, Options().force) == [(s, True) for s in ("prune", "cpt", "eval", "release")]
    assert loaded.stage_input("cpt") == str(tmp_path / "prune")
    # 32 blocks, hidden 4096, MLP 11008; the calibration length is the recipe's, within the 4096 context.
    plan_ = plan_sparsity(LlamaConfig(), cfg.sparsity.pattern, cfg.sparsity.ratio, layers=cfg.sparsity.layers)
    assert plan_["blocks"] == 32 and plan_["layers"]["down_proj"] == [4096, 11008]
    assert plan_["weights"] == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert plan_["zeros_at_least"] == plan_["weights"] // 2
    assert cfg.calibration.seq_len <= LlamaConfig().max_position_embeddings


def test_plan_refuses_a_width_that_does_not_fit_the_groups():
    from helpers import tiny_config

    from healer.prune.sparse import plan_sparsity

    with pytest.raises(HealerError, match="model.layers.0.mlp.down_proj has 100 inputs, not a multiple of 8"):
        plan_sparsity(tiny_config("llama", intermediate=100), "4:8")
    assert plan_sparsity(tiny_config("llama", intermediate=100), "2:4")["zeros_at_least"] > 0


def test_prune_sparse_writes_a_checked_directory_and_report_from_disk_and_from_memory(tmp_path):
    import json

    from helpers import tiny_tokenizer

    from healer.model.modeling import resolve_source
    from healer.prune.sparse import prune_sparse

    source = save_tiny(tmp_path, "qwen3", layers=2)
    tokens = calib()
    disk = prune_sparse(resolve_source(str(source)), tmp_path / "disk", tokens, None, criterion="sparsegpt",
                        pattern="unstructured", ratio=0.5, progress=False)
    memory = prune_sparse(resolve_source(str(source)), tmp_path / "memory", tokens, tiny_tokenizer(),
                          criterion="sparsegpt", pattern="unstructured", ratio=0.5, from_disk=False, progress=False)
    assert (disk["pruned_from"], memory["pruned_from"]) == ("disk, one block at a time", "memory")
    assert disk["sparsity"]["zeros"] == memory["sparsity"]["zeros"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "disk")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "memory")
    ids = tokens[:2]
    assert torch.allclose(a(ids).logits, b(ids).logits, atol=1e-4)
    written = json.loads((tmp_path / "disk" / "prune_report.json").read_text())
    assert written["sparsity"]["pattern_holds"] and written["sparsity"]["overall"] >= 0.5
    assert (tmp_path / "disk" / "tokenizer.json").is_file()

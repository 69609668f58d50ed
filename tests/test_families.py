"""Every family, MoE included, goes through prune, KD-CPT and LoRA SFT and comes out a plain checkpoint.

The families' own features are on in their tiny configs (tests/helpers.py): Gemma's scaled embeddings, sandwich
norms, soft-capped logits and sliding/global layers, Phi-3's fused projections, OLMo's post-sublayer norms and
q/k norms over all heads, SmolLM3's layers without RoPE, and 8 experts (2 per token) in every MoE block.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FAMILIES, MOE_FAMILIES, tiny_recipe, write_calibration, write_pipeline_inputs
from safetensors.torch import load_file

from healer.cli import main

OTHER_THAN_LLAMA = [f for f in FAMILIES if f != "llama"]  # llama: tests/test_pipeline.py and the stage tests
PROBE = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def _recipe(tmp_path, family: str, prune: str):
    corpus, heldout, instruct = write_pipeline_inputs(tmp_path)
    calibration = write_calibration(tmp_path / "calib.jsonl")
    return tiny_recipe(tmp_path, prune.format(calibration=calibration), f"""
        data:
          sources: [{{path: {corpus}}}]
          seq_len: 32
        cpt:
          micro_batch_size: 2
          global_batch_size: 2
          max_steps: 2
          warmup_steps: 1
          kd: {{alpha: 0.5, temperature: 2.0}}
        sft:
          data: {instruct}
          target_modules: all-linear
          dropout: 0.0
          micro_batch_size: 4
          global_batch_size: 4
          max_steps: 2
          max_seq_len: 320
        eval:
          perplexity_files: [{heldout}]
          context_lengths: [32]
        release: {{model_name: tiny-{family}}}
    """, family=family)


WIDTH = """
    prune: {{method: width, target: mlp, criterion: activation, ratio: 0.25, round_to: 8,
             calibration: {{path: {calibration}, num_samples: 4, seq_len: 32}}}}
"""
EXPERTS = """
    prune: {{method: width, criterion: reap, ratio: 0.5,
             calibration: {{path: {calibration}, num_samples: 4, seq_len: 32}}}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", OTHER_THAN_LLAMA + list(MOE_FAMILIES))
def test_prune_kd_heal_and_lora_tune_each_family(family, tmp_path):
    """MLP width (experts for an MoE), 2 KD-CPT steps from the unpruned teacher, 2 LoRA SFT steps, eval, release."""
    from transformers import AutoModelForCausalLM

    moe = family in MOE_FAMILIES
    recipe, src = _recipe(tmp_path, family, EXPERTS if moe else WIDTH)
    assert main(["run", "--config", str(recipe)]) == 0
    run = tmp_path / "run"
    pruned = AutoModelForCausalLM.from_pretrained(run / "prune")
    assert pruned.config.model_type == family
    assert (pruned.config.num_experts == 4) if moe else (pruned.config.intermediate_size == 96)
    healed = load_file(str(run / "cpt" / "hf" / "model.safetensors"))
    before = load_file(str(run / "prune" / "model.safetensors"))
    assert healed.keys() == before.keys()
    moved = [name for name in before if not torch.equal(before[name], healed[name])]
    assert any("experts" in name if moe else ".mlp." in name for name in moved)
    assert any("self_attn" in name for name in moved)
    merged = AutoModelForCausalLM.from_pretrained(run / "sft" / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        tuned, base = merged(PROBE).logits, AutoModelForCausalLM.from_pretrained(run / "cpt" / "hf")(PROBE).logits
    assert torch.isfinite(tuned).all() and (tuned - base).abs().max() > 1e-5
    scores = json.loads((run / "eval" / "eval.json").read_text())
    assert scores["source"] == str(run / "sft" / "merged")
    # the release is the merged model in bf16: the same tensors, rounded
    released = load_file(str(run / "release" / "model.safetensors"))
    tuned_weights = load_file(str(run / "sft" / "merged" / "model.safetensors"))
    assert released.keys() == tuned_weights.keys()
    assert all(torch.equal(released[k], tuned_weights[k].to(torch.bfloat16)) for k in released)
    AutoModelForCausalLM.from_pretrained(run / "release")  # plain transformers loads it
    card = (run / "release" / "README.md").read_text()
    assert f"tiny-{family}" in card
    if moe:
        kept = json.loads((run / "prune" / "prune_report.json").read_text())["kept_experts_per_block"]
        assert "removed whole experts: 8 -> 4 experts in every mixture-of-experts block" in card
        assert f"| 0 | {', '.join(map(str, kept[0]))} |" in card


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_moe"])
def test_depth_prune_and_heal_keep_per_layer_attention_kinds(family, tmp_path):
    from transformers import AutoConfig

    recipe, src = _recipe(tmp_path, family, """
        prune: {{method: depth, criterion: block_influence, num_blocks: 1, keep_first: 1, keep_last: 1,
                 calibration: {{path: {calibration}, num_samples: 4, seq_len: 32}}}}
    """)
    assert main(["run", "--config", str(recipe), "--only", "prune,cpt"]) == 0
    report = json.loads((tmp_path / "run" / "prune" / "prune_report.json").read_text())
    dense, healed = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(tmp_path / "run" / "cpt" / "hf")
    assert healed.num_hidden_layers == 3
    if getattr(dense, "layer_types", None):
        assert healed.layer_types == [t for i, t in enumerate(dense.layer_types) if i not in report["removed"]]

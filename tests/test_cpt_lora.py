"""``cpt.lora``: the Wanda paper's healing -- a LoRA adapter trained on plain corpus text -- on a sparse prune.

What a user would notice: the exported model holds exactly the pruned zeros (and a valid N:M pattern), the
adapter directory is a standard PEFT adapter, the loss falls, a resumed run continues the same adapter, and
a recipe that names a module the model does not have is refused in one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_sparse_heal import _corpus, _run, _sparse, _zeros
from transformers import AutoModelForCausalLM

from healer.core.errors import HealerError
from healer.model.modeling import resolve_source
from healer.train.masks import sparsity_to_keep

CONFIGS = Path(__file__).parents[1] / "configs"


def _heal(root: Path, model: Path, *, max_steps: int, lora: dict | None, action: str = "train", resume: str = "auto",
          stage: str = "cpt", teacher: Path | None = None, **cpt):
    from healer.train.config import CPTConfig
    from healer.train.cpt import Options, heal
    from healer.train.data.config import DataConfig, SourceConfig

    cfg = CPTConfig(**{"zero_stage": 2, "micro_batch_size": 2, "global_batch_size": 4, "save_every": 2,
                       "warmup_steps": 0, "lr": 1e-2, "schedule": "constant", "seed": 0, "max_steps": max_steps,
                       "lora": lora, "kd": None, **cpt})
    data = DataConfig(sources=[SourceConfig(path=str(root / "train.jsonl"))], seq_len=32)
    return heal(cfg, data, location=resolve_source(str(model)),
                teacher_location=resolve_source(str(teacher)) if teacher else None, stage_dir=root / stage,
                hf_dir=root / stage / "hf", opts=Options(action=action, resume=resume),
                keep_sparsity=sparsity_to_keep(None, str(model)))


def _losses(stage: Path) -> list[float]:
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("pattern,lora,kd", [("unstructured", {}, False),
                                             ("2:4", {"target_modules": "all-linear", "rank": 4}, True)])
def test_lora_on_text_heals_a_sparse_prune_and_keeps_every_zero(tmp_path, pattern, lora, kd):
    from peft import PeftModel

    _corpus(tmp_path / "train.jsonl")
    dense, pruned, zeros = _sparse(tmp_path, pattern)
    out = _heal(tmp_path, pruned, max_steps=8, lora=lora, teacher=dense if kd else None,
                kd={"alpha": 0.5, "temperature": 2.0} if kd else None)
    assert out["sparsity"]["zeros"] == zeros and out["sparsity"]["pattern_holds"]
    assert _zeros(tmp_path / "cpt" / "hf", pattern) == (zeros, True)
    losses = _losses(tmp_path / "cpt")
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < losses[0] - 0.05, losses

    # A standard PEFT adapter: it loads on the pruned base and was trained (B is zero at init).
    base = AutoModelForCausalLM.from_pretrained(pruned)
    tuned = PeftModel.from_pretrained(base, out["adapter_dir"])
    b = tuned.base_model.model.model.layers[0].self_attn.v_proj.lora_B["default"].weight
    assert b.abs().sum() > 0
    assert out["lora"]["rank"] == (4 if lora else 8) and out["trainable_parameters"] < out["parameters"] / 5

    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "cpt" / "hf")
    before = AutoModelForCausalLM.from_pretrained(pruned)
    v_new, v_old = healed.model.layers[0].self_attn.v_proj.weight, before.model.layers[0].self_attn.v_proj.weight
    assert not torch.equal(v_new, v_old) and torch.equal(v_new == 0, v_old == 0)  # merged, under the mask
    if not lora:  # the paper's q_proj/v_proj: every other weight is the pruned one, untouched
        assert torch.equal(healed.model.layers[1].mlp.down_proj.weight, before.model.layers[1].mlp.down_proj.weight)
    # Checkpoints hold the adapter, not a copy of the frozen base.
    (states,) = (tmp_path / "cpt" / "checkpoints" / "step00000008").glob("*model_states.pt")
    saved = torch.load(states, map_location="cpu", weights_only=False)["module"]  # written by this test
    assert saved and all("lora_" in k for k in saved), sorted(saved)[:3]


@pytest.mark.slow
def test_a_resumed_lora_run_continues_the_same_adapter_and_refuses_another_rank(tmp_path, capfd):
    """4 steps, then resumed to 8 (the constant LR makes that the same run) == 8 steps at once; resuming with
    another rank or without LoRA is refused naming the key; `healer cpt export` re-merges the newest adapter."""
    from safetensors.torch import load_file

    _corpus(tmp_path / "train.jsonl")
    _, pruned, zeros = _sparse(tmp_path, "unstructured")
    _heal(tmp_path, pruned, max_steps=8, lora={}, stage="straight")
    _heal(tmp_path, pruned, max_steps=4, lora={})
    capfd.readouterr()
    resumed = _heal(tmp_path, pruned, max_steps=8, lora={})
    assert "step00000004 at step 4" in capfd.readouterr().err  # resumed, not started over
    assert resumed["steps"] == 8 and resumed["sparsity"]["zeros"] == zeros
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cpt" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(HealerError, match=r"cpt\.lora\.rank: 8 -> 4"):
        _heal(tmp_path, pruned, max_steps=10, lora={"rank": 4})
    with pytest.raises(HealerError, match=r"cpt\.lora: True -> False"):
        _heal(tmp_path, pruned, max_steps=10, lora=None)

    hf = tmp_path / "cpt" / "hf"
    trained = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(hf).state_dict().items()}
    for f in hf.glob("*.safetensors"):
        f.unlink()  # export must rebuild the directory from the checkpoint, not leave it
    _heal(tmp_path, pruned, max_steps=8, lora={}, action="export")
    exported = AutoModelForCausalLM.from_pretrained(hf).state_dict()
    assert all(torch.equal(trained[k], exported[k]) for k in trained)
    assert _zeros(hf, "unstructured") == (zeros, True)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_zero3_lora_heal_survives_a_kill_and_keeps_the_zeros(tmp_path):
    """`healer cpt` on 2 ranks, ZeRO-3 (the adapter partitioned too), rank 1 SIGKILLed after step 3: the rerun
    resumes the step-2 adapter checkpoint, and the merged export holds exactly the pruned 2:4 zeros."""
    from peft import PeftModel

    _corpus(tmp_path / "train.jsonl")
    dense, pruned, zeros = _sparse(tmp_path)
    out = tmp_path / "cpt"
    recipe = {"model": {"source": str(dense)},
              "data": {"sources": [{"path": str(tmp_path / "train.jsonl")}], "seq_len": 32},
              "cpt": {"input": str(pruned), "output": str(out), "zero_stage": 3, "micro_batch_size": 2,
                      "global_batch_size": 8, "max_steps": 5, "lr": 1e-2, "warmup_steps": 0, "save_every": 2,
                      "lora": {"target_modules": "all-linear"}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    killed = _run(tmp_path, path, fault="kill_at_step:3:1")
    latest = out / "checkpoints" / "latest"
    assert killed.returncode != 0 and latest.is_file() and latest.read_text() == "step00000002", killed.stderr[-3000:]
    final = _run(tmp_path, path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resumed from" in final.stderr
    assert _zeros(out / "hf") == (zeros, True)
    manifest = json.loads((out / "manifest.json").read_text())["outputs"]
    assert manifest["sparsity"]["zeros"] == zeros and manifest["steps"] == 5 and manifest["lora"]["rank"] == 8
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pruned), manifest["adapter_dir"])


def test_a_target_module_the_model_lacks_is_refused_naming_the_key(tmp_path):
    _corpus(tmp_path / "train.jsonl", docs=10)
    _, pruned, _ = _sparse(tmp_path, "unstructured")
    with pytest.raises(HealerError, match=r"^cpt\.lora\.target_modules: 'vproj' names no linear layer of the model; "
                                          r"its linear layers are .*v_proj"):
        _heal(tmp_path, pruned, max_steps=2, lora={"target_modules": ["q_proj", "vproj"]})
    with pytest.raises(HealerError, match=r"^cpt\.lora\.target_modules: 'input_layernorm' names no linear layer"):
        _heal(tmp_path, pruned, max_steps=2, lora={"target_modules": ["input_layernorm"]})
    with pytest.raises(HealerError, match=r"^cpt\.lora\.target_modules is empty"):
        _heal(tmp_path, pruned, max_steps=2, lora={"target_modules": []})
    assert not (tmp_path / "cpt" / "checkpoints").exists()


def test_lora_settings_make_steps_incomparable():
    from healer.train.config import CPTConfig
    from healer.train.cpt import settings_of
    from healer.train.data.config import DataConfig, SourceConfig

    data = DataConfig(sources=[SourceConfig(path="x.jsonl")], seq_len=32)
    plain = settings_of(CPTConfig(), data)
    assert plain["cpt.lora"] is False and not any(k.startswith("cpt.lora.") for k in plain)
    lora = settings_of(CPTConfig(lora={"rank": 16}), data)
    assert lora["cpt.lora"] is True and lora["cpt.lora.rank"] == 16
    assert lora["cpt.lora.target_modules"] == ["q_proj", "v_proj"]  # the Wanda paper's


@pytest.mark.parametrize("recipe", ["wanda-llama2-7b-50.yaml", "wanda-llama2-7b-2of4.yaml"])
def test_the_wanda_recipes_heal_with_the_papers_lora_on_c4(recipe, tmp_path):
    """locuslab/wanda lora_ft: r 8, alpha 16, dropout 0.05 on q_proj/v_proj, lr 1e-4, 30,000 C4 sequences of
    1024 tokens, one epoch."""
    from healer.recipe import load_recipe

    loaded = load_recipe(CONFIGS / recipe, [f"run_dir={tmp_path}"])
    lora = loaded.cpt.lora
    assert (lora.rank, lora.alpha, lora.dropout, lora.target_modules) == (8, 16.0, 0.05, ["q_proj", "v_proj"])
    assert loaded.cpt.lr == 1e-4 and loaded.data.seq_len == 1024
    assert loaded.cpt.max_steps * loaded.cpt.global_batch_size == 30000
    assert "c4" in loaded.data.sources[0].path


def test_the_model_card_says_a_lora_heal_is_a_merged_adapter(tmp_path):
    from healer.core.manifest import write_stage_manifest
    from healer.recipe import load_recipe
    from healer.release.stage import training_stages

    recipe = load_recipe(None, {"model.source": "x", "run_dir": str(tmp_path), "cpt": {"lora": {"rank": 8}}})
    write_stage_manifest(recipe.stage_dir("cpt"), "cpt", None, {"lora": {"rank": 8}, "kd": None, "steps": 3})
    (cpt,) = training_stages(recipe)
    assert cpt["how"] == "continued pretraining of a LoRA adapter (rank 8), merged into the weights"


def test_the_papers_q_v_targets_adapt_the_fused_qkv_of_a_family_that_fuses_them(capsys):
    from helpers import tiny_model

    from healer.train.config import LoRAConfig
    from healer.train.lora import attach

    model = attach(tiny_model("phi3", layers=2), LoRAConfig(), "cpt.lora.target_modules")
    def adapted(peft_model) -> list[str]:
        return sorted({n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters()
                       if "lora_A" in n})

    assert adapted(model) == ["qkv_proj"]
    from healer.train.cpt import adapted_modules

    assert adapted_modules(model) == ["qkv_proj"]  # what the cpt banner names
    err = capsys.readouterr().err
    assert "cpt.lora.target_modules: this model fuses q_proj into qkv_proj; adapting qkv_proj" in err
    assert adapted(attach(tiny_model("llama", layers=2), LoRAConfig(), "cpt.lora.target_modules")) == ["q_proj",
                                                                                                       "v_proj"]


def test_lora_on_an_moe_says_which_setting_lets_peft_adapt_its_experts():
    from helpers import tiny_model

    from healer.train.config import LoRAFields
    from healer.train.lora import attach

    with pytest.raises(HealerError, match=r"^sft.target_modules: 'all-linear' also adapts .* set sft.dropout: 0"):
        attach(tiny_model("qwen3_moe", layers=2), LoRAFields(), "sft.target_modules")
    model = attach(tiny_model("qwen3_moe", layers=2), LoRAFields(dropout=0.0), "sft.target_modules")
    assert any("experts" in n and "lora" in n for n, _ in model.named_parameters())
    attention_only = attach(tiny_model("qwen3_moe", layers=2), LoRAFields(target_modules=["q_proj", "v_proj"]),
                            "sft.target_modules")
    assert not any("experts" in n and "lora" in n for n, _ in attention_only.named_parameters())

"""`healer release`: a directory plain transformers loads, an honest model card, curves, and a hash manifest."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml
from helpers import save_tiny

from healer.cli import main
from healer.core.errors import HealerError
from healer.core.manifest import read_stage_manifest, write_stage_manifest


def write_events(log_dir, steps: int = 12, with_val: bool = True) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    writer.add_text("config/ds_config", "secret-config")
    for step in range(1, steps + 1):
        writer.add_scalar("train/loss", 5.0 / step, step)
        writer.add_scalar("train/lr", 1e-4 * min(1.0, step / 4), step)
        writer.add_scalar("train/grad_norm", 1.0 + 0.1 * step, step)
        if with_val and step % 4 == 0:
            writer.add_scalar("val/loss", 5.5 / step, step)
    writer.close()


@pytest.fixture
def run(tmp_path):
    """A finished prune -> cpt -> sft -> eval run on disk, as the stages leave it."""
    run_dir = tmp_path / "run"
    dense = save_tiny(tmp_path, name="dense", layers=4)
    (dense / "README.md").write_text("---\nlicense: mit\nbase_model: someorg/tiny-base\nlanguage: en\n---\n# tiny\n")
    merged = save_tiny(tmp_path / "run" / "sft", name="merged", layers=3)
    (run_dir / "prune").mkdir(parents=True)
    (run_dir / "prune" / "prune_report.json").write_text(json.dumps({
        "method": "depth", "criterion": "ppl", "target": "blocks", "ratio": 0.25, "removed": [2], "kept": [0, 1, 3],
        "scores": {"1": 3.5, "2": 1.25}, "protected": {"keep_first": 1, "keep_last": 1, "applied": True},
        "params_before": 123456, "params_after": 100000, "calibration_ppl_before": 12.5,
        "calibration_ppl_after": 19.0, "seed": 0, "source": str(dense),
        "config_changes": {"num_hidden_layers": [4, 3]}}))
    write_stage_manifest(run_dir / "prune", "prune", None, {"params_before": 123456, "params_after": 100000})
    write_events(run_dir / "cpt" / "tensorboard")
    write_stage_manifest(run_dir / "cpt", "cpt", None, {"tokens_trained": 65536, "steps": 12, "final_loss": 0.41})
    write_events(run_dir / "sft" / "tensorboard", steps=6, with_val=False)
    write_stage_manifest(run_dir / "sft", "sft", None, {"tokens_trained": 4096, "steps": 6, "final_loss": 0.9,
                                                 "lora": {"rank": 4}})
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "eval.json").write_text(json.dumps({
        "source": str(merged), "parameters": 100000, "bos": {"policy": "auto", "prepended": False},
        "perplexity": {"wiki.txt": {"128": {"ppl": 30.0}, "2048": {"skipped": "context length 2048 skipped"}}},
        "tasks": {"arc_easy": {"acc": 0.4, "acc_norm": 0.38}},
        "notes": ["context length 2048 skipped: the model has max_position_embeddings=512"],
        "settings": {"limit": 50},
        "dense": {"parameters": 123456, "perplexity": {"wiki.txt": {"128": {"ppl": 20.0}}},
                  "tasks": {"arc_easy": {"acc": 0.5, "acc_norm": 0.45}}}}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny-healed", "run_dir": str(run_dir), "model": {"source": str(dense)},
        "prune": {"method": "depth", "ratio": 0.25}, "cpt": {},
        "data": {"sources": [{"path": "hf://datasets/cerebras/SlimPajama-627B/train/chunk1/*.jsonl.zst"},
                             {"path": "/data/local/*.jsonl"}]},
        "sft": {"data": "hf://datasets/yahma/alpaca-cleaned@main/alpaca_data_cleaned.json"},
        "eval": {"compare_to": "dense"},
        "release": {"tags": ["pruned", "healer", "tiny"]}}))
    return recipe, run_dir, merged


def test_release_directory_loads_and_its_card_tells_the_story(run):
    recipe, run_dir, merged = run
    assert main(["release", str(recipe)]) == 0
    out = run_dir / "release"
    assert not (run_dir / "release.partial").exists()

    # plain transformers loads it and it is the model that was released, weights unchanged
    from transformers import AutoModelForCausalLM, AutoTokenizer

    released = AutoModelForCausalLM.from_pretrained(out)
    assert released.dtype == torch.bfloat16  # the default: half the download of float32
    original = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
    probe = torch.randint(0, 300, (1, 12))
    assert torch.equal(released(probe).logits, original(probe).logits)
    assert AutoTokenizer.from_pretrained(out)("fox").input_ids
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "recipe.yaml"):
        assert (out / name).is_file(), name

    card = (out / "README.md").read_text()
    from huggingface_hub import ModelCard

    hub = ModelCard.load(out / "README.md").data  # what the Hub will read from the front matter
    assert hub.library_name == "transformers" and hub.pipeline_tag == "text-generation"
    assert hub.license == "mit" and hub.base_model == "someorg/tiny-base"  # carried from the base
    assert hub.base_model_relation == "finetune" and hub.language == ["en"]
    assert hub.datasets == ["cerebras/SlimPajama-627B", "yahma/alpaca-cleaned"]  # hf:// sources only
    assert {"pruned", "healer", "tiny", "depth-pruning"} <= set(hub.tags)
    results = {(r.dataset_name, r.metric_type, r.metric_config): r for r in hub.eval_results}
    assert results[("wiki.txt", "perplexity", "context 128")].metric_value == 30.0
    assert ("wiki.txt", "perplexity", "context 2048") not in results  # skipped, so not a number
    arc = results[("arc_easy", "acc", "first 50 examples")]
    assert arc.metric_value == 0.4 and arc.dataset_type == "allenai/ai2_arc" and arc.dataset_config == "ARC-Easy"
    assert results[("arc_easy", "acc_norm", "first 50 examples")].metric_value == 0.38
    assert "The weights are stored in **bfloat16**, cast from float32" in card
    assert ("is [someorg/tiny-base](https://huggingface.co/someorg/tiny-base) after structured pruning (removed 1 of 4 "
            "decoder blocks (block 2)), then continued pretraining, then LoRA instruction tuning (rank 4)") in card
    assert "123,456" in card and "100,000" in card
    assert "| cpt | continued pretraining | 65,536 | 12 |" in card
    assert "| sft | LoRA instruction tuning (rank 4), merged into the weights | 4,096 | 6 |" in card
    assert "| perplexity `wiki.txt` @ 128 tokens | 20 | 30 | +50.0% |" in card
    assert "| arc_easy acc | 0.5 | 0.4 | -0.100 |" in card
    assert "max_position_embeddings=512" in card
    assert "name: tiny-healed" in card  # the recipe
    for png in ("images/cpt_curves.png", "images/sft_curves.png"):
        assert f"]({png})" in card
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    manifest = read_stage_manifest(out)
    assert manifest["stage"] == "release" and manifest["versions"]["torch"]
    files = manifest["outputs"]["files"]
    assert set(files) == {p.relative_to(out).as_posix() for p in out.rglob("*")
                          if p.is_file() and p.name != "manifest.json"}
    weights = out / "model.safetensors"
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert manifest["outputs"]["tokens_trained"] == {"cpt": 65536, "sft": 4096}
    assert manifest["outputs"]["precision"]["dtype"] == "bfloat16"

    # the stages' TensorBoard scalars ship under runs/ for the Hub's metrics tab, text notes and host names not
    from healer.core.plots import read_scalars

    runs = manifest["outputs"]["runs"]
    assert set(runs) == {"cpt", "sft"} and all(f in files for f in runs["cpt"] + runs["sft"])
    assert all(f.startswith(f"runs/{stage}/events.out.tfevents.") and f.endswith(".healer")
               for stage, names in runs.items() for f in names)
    published = read_scalars(out / "runs" / "cpt")
    assert published["train/loss"] == read_scalars(run_dir / "cpt" / "tensorboard")["train/loss"]
    assert b"secret-config" not in b"".join((out / f).read_bytes() for f in runs["cpt"])
    assert "`runs/cpt/`, `runs/sft/`" in card

    # releasing again replaces the earlier release
    assert main(["release", str(recipe), "--release.model_name", "second"]) == 0
    assert "# second" in (out / "README.md").read_text()


HF_TOKEN = "hf_" + "Zq7Lk2Vw9Xp4Rt6Ym1Nb3Cd5Fg8Hj0Ks2"
WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"  # hex, so only its place gives it away


def test_secrets_in_the_recipe_never_reach_the_release(run, capsys):
    recipe, run_dir, _ = run
    tree = yaml.safe_load(recipe.read_text())
    tree["launch"] = {"env": {"HF_TOKEN": HF_TOKEN, "WANDB_API_KEY": WANDB_KEY, "NCCL_IB_HCA": "mlx5_0"}}
    tree["release"]["repo_id"] = "someorg/tiny-healed"
    recipe.write_text(yaml.safe_dump(tree))
    # A secret can also leak through another stage's report: an eval note quoting the token.
    eval_json = run_dir / "eval" / "eval.json"
    result = json.loads(eval_json.read_text())
    result["notes"].append(f"read with token {WANDB_KEY}")
    eval_json.write_text(json.dumps(result))

    assert main(["release", str(recipe)]) == 0
    out = run_dir / "release"
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert HF_TOKEN.encode() not in data and WANDB_KEY.encode() not in data, path
    published = yaml.safe_load((out / "recipe.yaml").read_text())
    assert published["launch"]["env"] == {"HF_TOKEN": "<redacted>", "WANDB_API_KEY": "<redacted>",
                                          "NCCL_IB_HCA": "<redacted>"}
    assert published["release"]["repo_id"] == "someorg/tiny-healed"  # ordinary values stay as they were
    card = (out / "README.md").read_text()
    assert "WANDB_API_KEY: <redacted>" in card and "read with token <redacted>" in card
    assert 'from_pretrained("someorg/tiny-healed")' in card

    # Launching from the published recipe would hand the ranks "<redacted>" as a token: refused instead.
    capsys.readouterr()
    assert main(["launch", "--nproc", "1", "cpt", str(out / "recipe.yaml"), "--run-dir", str(run_dir / "again")]) == 2
    err = capsys.readouterr().err
    assert "launch.env.HF_TOKEN is <redacted>" in err and "your own recipe" in err


def test_missing_inputs_are_said_in_the_card_not_a_crash(tmp_path):
    model = save_tiny(tmp_path, name="plain", layers=2)
    out = tmp_path / "rel"
    assert main(["release", "--model", str(model), "--output", str(out), "--run-dir", str(tmp_path / "empty"),
                 "--release.license", "apache-2.0", "--release.dtype", "bfloat16"]) == 0
    card = (out / "README.md").read_text()
    assert "packaged by healer, with no pruning or training recorded" in card
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as weights:
        assert all(weights.get_tensor(k).dtype == torch.bfloat16 for k in weights.keys())
    assert "No pruning report was found" in card
    assert "No `eval.json` was found" in card
    assert "No TensorBoard logs were found" in card
    assert "license: apache-2.0" in card
    assert read_stage_manifest(out)["outputs"]["inputs_found"]["eval"] is False


def test_refuses_to_overwrite_a_directory_that_is_not_a_release(tmp_path, capsys):
    model = save_tiny(tmp_path, name="plain", layers=2)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    code = main(["release", "--model", str(model), "--output", str(precious), "--run-dir", str(tmp_path / "r")])
    assert code == 2 and "is not a healer release" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "mine"


def test_curves_come_from_every_event_file_of_a_resumed_run(tmp_path):
    from healer.core.plots import read_scalars

    write_events(tmp_path / "tb", steps=4)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"), purge_step=5)  # the resumed process appends from step 5
    for step in range(5, 9):
        writer.add_scalar("train/loss", 1.0 / step, step)
    writer.close()
    steps, values = read_scalars(tmp_path / "tb")["train/loss"]
    assert steps == list(range(1, 9))
    assert values[-1] == pytest.approx(1 / 8)




def test_card_for_width_pruning_without_a_dense_baseline():
    from healer.prune.width import kernel_warnings, width_divisibility
    from healer.release.model_card import render

    report = {"method": "width", "criterion": "maw", "target": "mlp", "ratio": 0.2, "intermediate_size": [1536, 1232],
              "removed_per_block": [[1, 2]] * 2, "params_before": 1000, "params_after": 800,
              "widths": width_divisibility({"intermediate_size": 1232}), "warnings": kernel_warnings(1232)}
    card = render({"name": "w", "base_model": None, "base_source": "/models/base", "license": None, "tags": ["x"],
                   "params_before": 1000, "params_after": 800, "prune_report": report, "training": [],
                   "eval": {"parameters": 800, "perplexity": {"t.txt": {"128": {"ppl": 9.5}}}, "tasks": {}},
                   "recipe_yaml": "name: w\n"})
    assert "shrank every GLU MLP from 1536 to 1232 neurons" in card
    assert "base_model" not in card.split("---")[1]  # a local path is not a hub id
    assert "licence could not be determined" in card
    assert "| perplexity `t.txt` @ 128 tokens | 9.5 |" in card and "No dense baseline was evaluated" in card
    assert "| removed | 200 (20.0%) |" in card
    assert "| `intermediate_size` divisible by | none of 32, 64, 128, 256 |" in card
    assert "**Deployment warning:** intermediate_size 1232 is not a multiple of 32: llama.cpp cannot quantise" in card


def test_push_uploads_the_verified_release_and_nothing_when_the_release_fails(run, monkeypatch, capsys):
    from healer.recipe import load_recipe
    from healer.release.stage import Options, run_release_stage

    recipe_path, run_dir, merged = run
    tree = yaml.safe_load(recipe_path.read_text())
    tree["release"].update({"push": "someorg/tiny-healed", "private": True, "revision": "v1"})
    recipe_path.write_text(yaml.safe_dump(tree))
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    calls = []

    def fake_upload(**kwargs):
        folder = kwargs["folder"]
        calls.append({**kwargs, "files": sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                                                if p.is_file())})
        return "https://huggingface.co/someorg/tiny-healed/commit/abc"

    assert run_release_stage(load_recipe(recipe_path), Options(), upload=fake_upload) == 0
    out = run_dir / "release"
    (call,) = calls
    assert call["folder"] == out and call["repo_id"] == "someorg/tiny-healed"
    assert call["private"] is True and call["revision"] == "v1"
    assert {"model.safetensors", "README.md", "manifest.json"} <= set(call["files"])
    assert "pushed to https://huggingface.co/someorg/tiny-healed/commit/abc" in capsys.readouterr().out
    manifest_text = (out / "manifest.json").read_text()
    assert HF_TOKEN not in manifest_text
    assert json.loads(manifest_text)["outputs"]["push"] == {"repo_id": "someorg/tiny-healed", "private": True,
                                                            "revision": "v1"}

    # a release that was changed after it was written is not pushed, and no longer counts as finished
    (out / "README.md").write_text("edited by hand")
    from healer.release.stage import push

    with pytest.raises(HealerError, match=r"changed after it was written \(README.md\)"):
        push(load_recipe(recipe_path).release, out, upload=fake_upload)
    assert len(calls) == 1 and read_stage_manifest(out).get("superseded")

    # a release that fails (the checkpoint to release is corrupt) uploads nothing
    (merged / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(HealerError):
        run_release_stage(load_recipe(recipe_path), Options(), upload=fake_upload)
    assert len(calls) == 1


def test_push_without_a_token_or_offline_is_one_clear_line(tmp_path, monkeypatch):
    import huggingface_hub

    from healer.release.hub_push import hub_upload

    kwargs = dict(folder=tmp_path, repo_id="someorg/x", private=False, revision=None, commit_message="m")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HealerError, match="^release.push someorg/x: HF_HUB_OFFLINE is set"):
        hub_upload(**kwargs)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HealerError, match="^release.push someorg/x: no Hugging Face token; set HF_TOKEN"):
        hub_upload(**kwargs)


def test_push_names_a_hub_repo(tmp_path):
    from healer.release.config import ReleaseConfig

    for bad in ("https://huggingface.co/org/name", "org/name\n", "name", "org/name/extra"):
        with pytest.raises(ValueError, match="is not a Hub repo id; give org/name"):
            ReleaseConfig(push=bad)
    for bad in ("../main", "v1\n", "a b", "refs/"):
        with pytest.raises(ValueError, match="is not a usable branch name"):
            ReleaseConfig(push="org/name", revision=bad)
    assert ReleaseConfig(push="org/name", revision="pruned/20pct").revision == "pruned/20pct"


def test_float16_overflow_is_refused_and_a_cast_is_measured():
    from helpers import tiny_model

    from healer.release.stage import cast_for_release

    model = tiny_model("llama")
    facts = cast_for_release(model, "bfloat16")
    assert facts["cast_from"] == "float32" and 0 < facts["max_abs_logit_diff"] < 1
    assert next(model.parameters()).dtype == torch.bfloat16
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(1e6)  # logits beyond float16's 65504
    with pytest.raises(HealerError, match="release.dtype float16: the model's logits overflow"):
        cast_for_release(model, "float16")


def test_card_says_the_base_came_from_a_dequantised_gguf():
    from healer.release.model_card import render

    card = render({"name": "g", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "base_source": "smollm2",
                   "license": "apache-2.0", "tags": [], "params_before": None, "params_after": 10, "prune_report": None,
                   "training": [], "eval": None, "recipe_yaml": "",
                   "precision": {"dtype": "bfloat16", "cast_from": "bfloat16", "max_abs_logit_diff": 0.0,
                                 "top1_agreement": 1.0},
                   "base_gguf": {"file": "SmolLM2-135M-Instruct.Q4_1.gguf", "type": "Q4_1"}})
    assert "dequantised from the GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf` (Q4_1)" in card
    assert "The weights are stored in **bfloat16**." in card


def test_a_model_with_nan_weights_is_refused_naming_the_tensor_in_any_dtype(run, capsys):
    from safetensors.torch import load_file, save_file

    recipe, run_dir, merged = run
    weights = load_file(merged / "model.safetensors")
    weights["model.layers.2.self_attn.o_proj.weight"][1, :3] = float("nan")
    save_file(weights, merged / "model.safetensors", metadata={"format": "pt"})
    for dtype in ("bfloat16", "float32"):
        assert main(["release", str(recipe), f"release.dtype={dtype}"]) == 2
        err = capsys.readouterr().err
        assert "holds 3 NaN/inf weights in 1 tensors (first: model.layers.2.self_attn.o_proj.weight)" in err
        assert "use bfloat16" not in err
    assert not (run_dir / "release").exists()


def test_a_directory_named_like_a_build_dir_is_not_healers_to_delete(run):
    recipe, run_dir, merged = run
    mine = run_dir / "release.partial"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my work")
    stale = run_dir / ".release.partial-abc"  # an interrupted release's own build dir, marked as healer's
    stale.mkdir()
    (stale / ".healer-partial").write_text("")
    assert main(["release", str(recipe)]) == 0
    assert (mine / "notes.txt").read_text() == "my work" and not stale.exists()
    assert not list(run_dir.glob(".release.*")) and not (run_dir / "release" / ".healer-partial").exists()
    assert ".healer-partial" not in json.loads((run_dir / "release" / "manifest.json").read_text())["outputs"]["files"]


def test_a_release_of_another_model_does_not_publish_the_runs_eval(run, tmp_path, capsys):
    from huggingface_hub import ModelCard

    recipe, run_dir, merged = run
    other = save_tiny(tmp_path, name="other", layers=3)
    assert main(["release", str(recipe), f"release.input={other}"]) == 0
    assert f"eval.json measured {merged}, not the released {other}" in capsys.readouterr().err
    hub = ModelCard.load(run_dir / "release" / "README.md").data
    assert not hub.eval_results  # no model-index numbers measured on other weights
    assert "30.0" not in (run_dir / "release" / "README.md").read_text()

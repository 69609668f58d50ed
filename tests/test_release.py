"""`healer release`: a directory plain transformers loads, an honest model card, curves, and a hash manifest."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml
from helpers import save_tiny

from healer.cli import main
from healer.manifest import read_stage_manifest, write_stage_manifest


def write_events(log_dir, steps: int = 12, with_val: bool = True) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
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
    (dense / "README.md").write_text("---\nlicense: mit\nbase_model: someorg/tiny-base\n---\n# tiny\n")
    merged = save_tiny(tmp_path / "run" / "sft", name="merged", layers=3)
    (run_dir / "prune").mkdir(parents=True)
    (run_dir / "prune" / "prune_report.json").write_text(json.dumps({
        "method": "depth", "criterion": "ppl", "target": "blocks", "ratio": 0.25, "removed": [2], "kept": [0, 1, 3],
        "scores": {"1": 3.5, "2": 1.25}, "protected": {"keep_first": 1, "keep_last": 1, "applied": True},
        "params_before": 123456, "params_after": 100000, "calibration_ppl_before": 12.5,
        "calibration_ppl_after": 19.0, "seed": 0, "source": str(dense),
        "config_changes": {"num_hidden_layers": [4, 3]}}))
    write_stage_manifest(run_dir / "prune", "prune", {"params_before": 123456, "params_after": 100000})
    write_events(run_dir / "cpt" / "tensorboard")
    write_stage_manifest(run_dir / "cpt", "cpt", {"tokens_trained": 65536, "steps": 12, "final_loss": 0.41})
    write_events(run_dir / "sft" / "tensorboard", steps=6, with_val=False)
    write_stage_manifest(run_dir / "sft", "sft", {"tokens_trained": 4096, "steps": 6, "final_loss": 0.9,
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
        "prune": {"method": "depth", "ratio": 0.25}, "cpt": {}, "sft": {}, "eval": {"compare_to": "dense"},
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
    original = AutoModelForCausalLM.from_pretrained(merged)
    probe = torch.randint(0, 300, (1, 12))
    assert torch.allclose(released(probe).logits, original(probe).logits, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out)("fox").input_ids
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "recipe.yaml"):
        assert (out / name).is_file(), name

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "mit" and meta["base_model"] == "someorg/tiny-base"  # carried from the base
    assert {"pruned", "healer", "tiny", "depth-pruning"} <= set(meta["tags"])
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
    from healer.plots import read_scalars

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
    from healer.model_card import render

    report = {"method": "width", "criterion": "maw", "target": "mlp", "ratio": 0.2, "intermediate_size": [1536, 1232],
              "removed_per_block": [[1, 2]] * 2, "params_before": 1000, "params_after": 800}
    card = render({"name": "w", "base_model": None, "base_source": "/models/base", "license": None, "tags": ["x"],
                   "params_before": 1000, "params_after": 800, "prune_report": report, "training": [],
                   "eval": {"parameters": 800, "perplexity": {"t.txt": {"128": {"ppl": 9.5}}}, "tasks": {}},
                   "recipe_yaml": "name: w\n"})
    assert "shrank every GLU MLP from 1536 to 1232 neurons" in card
    assert "base_model" not in card.split("---")[1]  # a local path is not a hub id
    assert "licence could not be determined" in card
    assert "| perplexity `t.txt` @ 128 tokens | 9.5 |" in card and "No dense baseline was evaluated" in card
    assert "| removed | 200 (20.0%) |" in card

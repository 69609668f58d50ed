"""The Shortened LLaMA and pruned Llama-3.2 recipes under configs/: each loads, says what its release card
says, plans every stage from a fresh run directory, and launches (dry run) without a download."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaConfig

from healer.cli import main
from healer.recipe import load_recipe
from healer.run.pipeline import plan, stages_of

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# file -> (blocks removed of LLaMA-7B's 32, healing stages)
SHORTENED = {
    "shortened-llama-7b-20.yaml": (6, ["prune", "sft", "eval", "release"]),
    "shortened-llama-7b-35.yaml": (11, ["prune", "sft", "eval", "release"]),
    "shortened-vicuna-7b-20.yaml": (6, ["prune", "sft", "eval", "release"]),
    "shortened-vicuna-7b-35.yaml": (11, ["prune", "sft", "eval", "release"]),
    "shortened-vicuna-7b-20-cpt.yaml": (6, ["prune", "cpt", "sft", "eval", "release"]),
}


@pytest.mark.parametrize("name", sorted(SHORTENED))
@pytest.mark.parametrize("criterion", ["ppl", "taylor"])  # the cards' PPL and Taylor+ releases
def test_shortened_llama_recipes_are_the_cards_setting(tmp_path, name, criterion, capsys):
    from healer.prune.depth import blocks_to_remove

    blocks, stages = SHORTENED[name]
    recipe = load_recipe(CONFIGS / name, [f"run_dir={tmp_path}", f"prune.criterion={criterion}"])
    cfg = recipe.prune
    assert (cfg.method, cfg.criterion) == ("depth", criterion)
    assert blocks_to_remove(32, cfg.ratio, cfg.num_blocks) == blocks
    assert cfg.protected == (4, 2)  # the "+" of PPL / Taylor+: first 4 and last 2 blocks kept
    assert (cfg.calibration.num_samples, cfg.calibration.seq_len) == (10, 128)
    sft = recipe.sft  # LoRA: rank 8, lr 1e-4, batch 64, 2 epochs
    assert (sft.rank, sft.lr, sft.global_batch_size, sft.epochs) == (8, 1e-4, 64, 2.0)
    if recipe.cpt is not None:  # CPT on SlimPajama: AdamW (0.9, 0.95), lr 1e-4, wd 0.1, batch 512, 37B tokens
        cpt = recipe.cpt
        assert (tuple(cpt.betas), cpt.lr, cpt.weight_decay, cpt.global_batch_size) == ((0.9, 0.95), 1e-4, 0.1, 512)
        tokens = cpt.max_steps * cpt.global_batch_size * recipe.data.seq_len
        assert 37e9 <= tokens < 37e9 + cpt.global_batch_size * recipe.data.seq_len
        assert recipe.stage_input("sft") == str(recipe.model_dir("cpt"))
    assert stages_of(recipe) == stages
    assert plan(recipe, stages_of(recipe), None, force=False) == [(s, True) for s in stages]
    assert main(["run", str(CONFIGS / name), f"run_dir={tmp_path}", "--dry-run"]) == 0
    assert f"prune          run             -> {tmp_path / 'prune'}" in capsys.readouterr().out
    for stage in ("cpt", "sft"):
        if stage in stages:
            assert main(["launch", "--slurm", "--dry-run", stage, str(CONFIGS / name), f"run_dir={tmp_path}"]) == 0
            assert f"-m healer {stage} --config" in capsys.readouterr().out
    assert not (tmp_path / "prune").exists()


def test_pruned_llama32_mlp20_recipe_matches_the_release(tmp_path, capsys):
    from healer.prune.stage import plan_width

    recipe = load_recipe(CONFIGS / "pruned-llama3.2-3b-mlp20.yaml", [f"run_dir={tmp_path}"])
    cfg = recipe.prune
    assert (cfg.method, cfg.criterion, cfg.spec.target, cfg.ratio) == ("width", "maw", "mlp", 0.2)
    # Llama-3.2-3B: 28 blocks, hidden 3072, MLP 8192 -> 6554 kept; 3.21B -> 2.79B parameters as the card says.
    llama3b = LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28)
    kept = plan_width(cfg, llama3b)
    assert kept == 6554
    removed = 28 * 3 * 3072 * (8192 - kept)
    assert abs(3.21e9 - removed - 2.79e9) < 0.01e9
    assert set(recipe.eval.tasks) == {"arc_easy", "boolq", "lambada"} and recipe.eval.compare_to == "dense"
    assert stages_of(recipe) == ["prune", "eval", "release"]
    assert recipe.stage_input("eval") == str(recipe.stage_dir("prune"))
    assert main(["run", str(CONFIGS / "pruned-llama3.2-3b-mlp20.yaml"), f"run_dir={tmp_path}", "--dry-run"]) == 0
    assert "release        run" in capsys.readouterr().out


def test_smollm2_rounds_recipe_compares_like_with_like(tmp_path):
    """The CPU measurement: 2 x 20% and one-shot 40% remove the same 12 of 30 blocks with the same
    criterion and train the same number of tokens."""
    from healer.prune.depth import blocks_to_remove
    from healer.run.rounds import blocks_per_round, heal_steps

    path = CONFIGS / "smollm2-40-rounds.yaml"
    rounds = load_recipe(path, [f"run_dir={tmp_path / 'rounds'}"])
    oneshot = load_recipe(path, [f"run_dir={tmp_path / 'oneshot'}", "prune.rounds=null", "prune.ratio=0.4",
                                 "cpt.max_steps=40"])
    assert rounds.prune.criterion == oneshot.prune.criterion == "ppl"
    assert blocks_per_round([r.ratio for r in rounds.prune.rounds], 30) == [6, 6]
    assert blocks_to_remove(30, oneshot.prune.ratio, None) == 12
    tokens_per_step = rounds.cpt.global_batch_size * rounds.data.seq_len
    round_steps = [heal_steps(r.heal_tokens, rounds.cpt.global_batch_size, rounds.data.seq_len)
                   for r in rounds.prune.rounds if r.heal_tokens]
    assert round_steps == [20] and rounds.prune.rounds[0].heal_tokens == 20 * tokens_per_step
    assert sum(round_steps) + rounds.cpt.max_steps == oneshot.cpt.max_steps
    assert rounds.model_dir("prune") == tmp_path / "rounds" / "round2" / "prune"  # what the final cpt heals
    assert rounds.stage_input("cpt") == str(tmp_path / "rounds" / "round2" / "prune")


# file -> (blocks of the dense model, hidden, intermediate, kv width, vocabulary, blocks removed, GPUs)
OWN_MODEL = {
    "llama3.1-8b-one-node.yaml": (32, 4096, 14336, 1024, 128256, 8, 8),
    "llama3.1-70b-slurm.yaml": (80, 8192, 28672, 1024, 128256, 20, 32),
}


@pytest.mark.parametrize("name", sorted(OWN_MODEL))
def test_the_readme_recipes_plan_and_launch_as_their_comments_say(tmp_path, name, capsys):
    from healer.prune.depth import blocks_to_remove

    blocks, hidden, mlp, kv, vocab, removed, gpus = OWN_MODEL[name]
    recipe = load_recipe(CONFIGS / name, [f"run_dir={tmp_path}"])
    assert blocks_to_remove(blocks, recipe.prune.ratio, recipe.prune.num_blocks) == removed
    per_block = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp
    dense, pruned = blocks * per_block + 2 * vocab * hidden, (blocks - removed) * per_block + 2 * vocab * hidden
    text = (CONFIGS / name).read_text()  # its comments state the sizes and the token budget
    assert f"{dense / 1e9:.1f}B -> {pruned / 1e9:.1f}B parameters" in text
    cpt = recipe.cpt
    assert cpt.global_batch_size % (cpt.micro_batch_size * gpus) == 0
    tokens = cpt.max_steps * cpt.global_batch_size * recipe.data.seq_len
    assert f"{tokens / 1e9:.1f}B tokens" in text
    assert stages_of(recipe) == ["prune", "cpt", "sft", "eval", "release"]
    assert main(["run", str(CONFIGS / name), f"run_dir={tmp_path}", "--dry-run"]) == 0
    assert "release        run" in capsys.readouterr().out
    if recipe.launch.backend == "slurm":
        assert main(["launch", "--dry-run", "cpt", str(CONFIGS / name), f"run_dir={tmp_path}"]) == 0
        script = capsys.readouterr().out
        assert f"#SBATCH --nodes={recipe.launch.nodes}" in script and "#SBATCH --gpus-per-node=8" in script
    assert not (tmp_path / "prune").exists()


@pytest.mark.parametrize("name", sorted(OWN_MODEL))
def test_the_readme_shows_each_recipe_as_it_is_in_configs(name):
    readme = (CONFIGS.parent / "README.md").read_text()
    body = (CONFIGS / name).read_text().split("\nname:", 1)[1]
    assert "name:" + body in readme, f"README.md does not show configs/{name} as it is"

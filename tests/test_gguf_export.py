"""GGUF export (`release.gguf`): files llama.cpp and transformers load, proven against the safetensors weights."""

from __future__ import annotations

import hashlib
import json
import math
from types import SimpleNamespace

import gguf
import pytest
import torch
import yaml
from helpers import GGUF_FAMILIES, save_tiny, tiny_model, tiny_tokenizer

import healer.release.gguf_export as gguf_export
from healer.cli import main
from healer.core.errors import HealerError
from healer.core.manifest import read_stage_manifest

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"


def confident_model(tmp_path, family: str, name: str = "model", **kwargs):
    """A tiny model that predicts with a clear margin, as a trained one does (a random one hesitates between
    near-equal logits, where any rounding flips the top token): the embedding dominates the residual stream."""
    model = tiny_model(family, tie_word_embeddings=True, **kwargs)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(4)
        for block in model.model.layers:
            block.self_attn.o_proj.weight.mul_(0.5)
            block.mlp.down_proj.weight.mul_(0.5)
    out = tmp_path / name
    model.save_pretrained(out)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, reader


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_every_family_exports_f16_and_q8_0_that_match_the_checkpoint(family, tmp_path):
    src = confident_model(tmp_path, family, layers=3)
    records = gguf_export.export_and_check(src, tmp_path / "gguf", "tiny/healed 1", ["f16", "q8_0"])

    assert [r["file"] for r in records] == ["tiny-healed-1-f16.gguf", "tiny-healed-1-q8_0.gguf"]
    for record in records:
        path = tmp_path / "gguf" / record["file"]
        assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert record["bytes"] == path.stat().st_size
        transformers_check = record["parity"][0]
        assert transformers_check["loader"] == "transformers" and transformers_check["passed"]
        assert transformers_check["positions"] == 256 and transformers_check["tokenizer_agrees"]
        assert transformers_check["top1_agreement"] >= 0.99
    f16, q8 = records[0]["parity"][0], records[1]["parity"][0]
    assert f16["relative_dlogit"] < 1e-3  # f16 rounding only: far inside the 2e-2 bound
    assert q8["max_abs_dlogit"] > f16["max_abs_dlogit"]  # q8_0 really is quantised

    meta, reader = fields(tmp_path / "gguf" / records[1]["file"])
    arch = {"mistral": "llama"}.get(family, family)
    assert meta["general.architecture"] == arch and meta["general.name"] == "tiny/healed 1"
    assert meta[f"{arch}.block_count"] == 3 and meta[f"{arch}.attention.head_count_kv"] == 2
    assert len(meta["tokenizer.ggml.tokens"]) == 320  # padded to the embedding's rows
    assert meta["tokenizer.ggml.tokens"][-1] == "[PAD319]" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.eos_token_id"] == 0 and meta["tokenizer.chat_template"] == TEMPLATE
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    query = "attn_qkv" if family == "phi3" else "attn_q"  # phi3: q, k and v fused, as llama.cpp's graph takes them
    assert types[f"blk.0.{query}.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


def test_the_check_fails_a_file_whose_attention_layout_is_wrong(tmp_path, monkeypatch):
    src = save_tiny(tmp_path, "llama", layers=3)
    good = gguf_export.export_and_check(src, tmp_path / "good", "m", ["f16"])[0]["parity"][0]
    monkeypatch.setattr(gguf_export, "permute_qk", lambda weight, heads: weight)  # forget llama.cpp's rope layout
    with pytest.raises(HealerError, match=r"m-f16.gguf failed the parity check: transformers logits differ") as err:
        gguf_export.export_and_check(src, tmp_path / "bad", "m", ["f16"])
    relative = float(str(err.value).split("(")[1].split(" ")[0])
    assert relative > 10 * gguf_export.RELATIVE_TOLERANCE["f16"] > 10 * good["relative_dlogit"]


def test_a_file_with_wrong_metadata_fails_before_its_logits_are_compared(tmp_path, monkeypatch):
    src = confident_model(tmp_path, "qwen2", layers=2)
    real = gguf.GGUFWriter.add_layer_norm_rms_eps
    monkeypatch.setattr(gguf.GGUFWriter, "add_layer_norm_rms_eps", lambda self, value: real(self, value * 10))
    with pytest.raises(HealerError, match=r"metadata disagrees with config.json: rms_norm_eps"):
        gguf_export.export_and_check(src, tmp_path / "gguf", "m", ["f32"])


def test_pruned_models_export(tmp_path, calibration_file):
    from healer.prune.config import PruneConfig
    from healer.prune.stage import prune

    src = confident_model(tmp_path, "llama", layers=4)
    prune(str(src), PruneConfig(blocks=[1, 2]), tmp_path / "depth", progress=False)
    # 128 -> 80 neurons: ffn_down rows 80 wide cannot be cut into q8_0's blocks of 32, so they stay f16
    prune(str(src), PruneConfig(method="width", target="mlp", criterion="maw", ratio=0.375, round_to=8),
          tmp_path / "width", progress=False)
    qwen = confident_model(tmp_path, "qwen2", name="qwen", layers=2)
    # fewer heads, same head_dim: transformers' qwen2 GGUF reader cannot know head_dim, the check supplies it
    prune(str(qwen), PruneConfig(method="width", target="attention", criterion="head_norm", ratio=0.5,
                                 calibration={"path": str(calibration_file), "num_samples": 4, "seq_len": 32}),
          tmp_path / "heads", progress=False)

    depth = gguf_export.export_and_check(tmp_path / "depth", tmp_path / "g1", "d", ["q8_0"])[0]
    assert fields(tmp_path / "g1" / "d-q8_0.gguf")[0]["llama.block_count"] == 2 and depth["kept_f16"] == 0
    width = gguf_export.export_and_check(tmp_path / "width", tmp_path / "g2", "w", ["q8_0"])[0]
    meta, reader = fields(tmp_path / "g2" / "w-q8_0.gguf")
    assert meta["llama.feed_forward_length"] == 80 and width["parity"][0]["passed"]
    assert width["kept_f16"] == 4 and "not a multiple of 32" in width["notes"][0]
    assert {t.name: t.tensor_type.name for t in reader.tensors}["blk.0.ffn_down.weight"] == "F16"
    heads = gguf_export.export_and_check(tmp_path / "heads", tmp_path / "g3", "h", ["f16"])[0]["parity"][0]
    assert heads["passed"] and heads["config_from_checkpoint"] == ["head_dim"]


def test_llama3_rope_scaling_travels_as_llama_cpp_reads_it(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    src = confident_model(tmp_path, "llama", layers=2, rope_parameters=rope)
    check = gguf_export.export_and_check(src, tmp_path / "gguf", "r", ["f32"])[0]["parity"][0]
    # transformers' GGUF reader knows no rope scaling: the check hands it the checkpoint's, and says so
    assert check["passed"] and check["config_from_checkpoint"] == ["rope_parameters"]
    _, reader = fields(tmp_path / "gguf" / "r-f32.gguf")
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    # llama.cpp divides each rotary frequency by its factor: 1 for short wavelengths, `factor` for long ones,
    # smoothly in between (wavelength 2*pi*10000**(2i/16) against 64/4 and 64/1 positions)
    expected = []
    for i in range(8):
        wavelength = 2 * math.pi * 10000 ** (2 * i / 16)
        smooth = (64 / wavelength - 1) / 3
        expected.append(1 if wavelength < 16 else 8 if wavelength > 64 else 1 / ((1 - smooth) / 8 + smooth))
    assert factors.tolist() == pytest.approx(expected, rel=1e-5)


def test_what_gguf_cannot_express_is_refused_in_one_line(tmp_path):
    from transformers import GPT2Config

    with pytest.raises(HealerError, match=r"release.gguf: model type 'gpt2' has no GGUF export"):
        gguf_export.check_exportable(GPT2Config())
    # transformers' own configs hold one width; a config from elsewhere may not
    with pytest.raises(HealerError, match=r"config.intermediate_size differs between blocks"):
        gguf_export.check_exportable(SimpleNamespace(model_type="llama", intermediate_size=[64, 32]))
    with pytest.raises(HealerError, match=r"rope scaling 'yarn' is not exported"):
        gguf_export.check_exportable(SimpleNamespace(model_type="qwen2", rope_parameters={"rope_type": "yarn"}))
    # weights whose blocks differ in width (whatever config.json says) cannot be described to llama.cpp
    src = save_tiny(tmp_path, "llama", layers=2)
    from safetensors.torch import load_file, save_file

    weights = load_file(src / "model.safetensors")
    for name in ("gate_proj", "up_proj"):
        weights[f"model.layers.1.mlp.{name}.weight"] = weights[f"model.layers.1.mlp.{name}.weight"][:96]
    weights["model.layers.1.mlp.down_proj.weight"] = weights["model.layers.1.mlp.down_proj.weight"][:, :96].contiguous()
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HealerError, match=r"blk.N.ffn_down.weight has different shapes in different blocks"):
        gguf_export.export_gguf(src, tmp_path / "x.gguf", "f16", "x")
    src = save_tiny(tmp_path, "llama", name="metaspace", layers=1)
    spec = json.loads((src / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}  # a split llama.cpp has no name for
    (src / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(HealerError, match=r"tokenizer.json is not a byte-level BPE tokenizer"):
        gguf_export.export_gguf(src, tmp_path / "x.gguf", "f16", "x")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.partial").exists()


def release_recipe(tmp_path, model, **release) -> str:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "tiny-gguf", "run_dir": str(tmp_path / "run"),
                                      "model": {"source": str(model)},
                                      "release": {"input": str(model), "repo_id": "someorg/tiny-gguf", **release}}))
    return str(recipe)


def test_release_ships_proven_gguf_files_in_manifest_and_card(tmp_path):
    recipe = release_recipe(tmp_path, confident_model(tmp_path, "llama", layers=2), gguf=["f16", "q8_0"])
    assert main(["release", recipe]) == 0
    out = tmp_path / "run" / "release"
    outputs = read_stage_manifest(out)["outputs"]
    assert [g["file"] for g in outputs["gguf"]] == ["tiny-gguf-f16.gguf", "tiny-gguf-q8_0.gguf"]
    for record in outputs["gguf"]:
        assert outputs["files"][f"gguf/{record['file']}"]["sha256"] == record["sha256"]
        assert all(check["passed"] for check in record["parity"])
    card = (out / "README.md").read_text()
    assert "## Run it with llama.cpp" in card and "llama-cli -m gguf/tiny-gguf-q8_0.gguf -cnv" in card
    assert "llama-cli --hf-repo someorg/tiny-gguf --hf-file gguf/tiny-gguf-q8_0.gguf" in card
    assert "| `gguf/tiny-gguf-f16.gguf` | f16 |" in card and "| transformers |" in card and "| passed |" in card


def test_a_release_whose_gguf_fails_parity_is_not_written(tmp_path, monkeypatch, capsys):
    recipe = release_recipe(tmp_path, save_tiny(tmp_path, "mistral", layers=2), gguf=["f16"])
    monkeypatch.setattr(gguf_export, "permute_qk", lambda weight, heads: weight)
    assert main(["release", recipe]) != 0
    assert "tiny-gguf-f16.gguf failed the parity check" in capsys.readouterr().err
    assert not (tmp_path / "run" / "release").exists()  # no card claiming anything


@pytest.mark.parametrize("value,message", [("[q4_k]", "release.gguf"), ("[f16, f16]", "lists a type twice")])
def test_release_gguf_key_is_checked(tmp_path, value, message, capsys):
    recipe = release_recipe(tmp_path, tmp_path / "none", gguf=yaml.safe_load(value))
    assert main(["release", recipe]) == 2
    assert message in capsys.readouterr().err


def test_a_quantised_file_that_reorders_near_tied_tokens_passes_on_perplexity():
    """A correct q8_0 of a small model may flip many argmaxes between two tokens the model barely separates;
    what quantisation may cost is quality, so the prompt's perplexity decides (the old top-1 rule refused this)."""
    torch.manual_seed(0)
    positions, vocab = 256, 50
    ids = torch.randint(10, vocab, (positions,)).tolist()
    reference = torch.randn(positions, vocab)
    reference[:, 0], reference[:, 1] = 8.0, 7.3  # two near-equal favourites, 0.7 logit apart (not a near-tie)
    got = reference.clone()
    flipped = torch.arange(positions) % 8 == 0  # an eighth of the positions: 87.5% agreement
    got[flipped, 0], got[flipped, 1] = 7.3, 8.0
    result = gguf_export._compare(reference, got, "q8_0", ids)
    assert result["top1_agreement_with_ties"] == 0.875 and abs(result["ppl_ratio"] - 1) < 1e-6
    assert result["passed"]
    wrecked = gguf_export._compare(reference, reference[torch.randperm(positions)], "q8_0", ids)
    assert not wrecked["passed"] and wrecked["ppl_ratio"] > gguf_export.QUANTISED_PPL_RATIO
    better = reference.clone()
    better[torch.arange(positions - 1), torch.tensor(ids[1:])] += 3.0  # a file that "knows the answers" is wrong too
    assert not gguf_export._compare(reference, better, "q8_0", ids)["passed"]




@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_moe"])
def test_a_family_without_gguf_export_is_refused_before_any_stage_runs(family, tmp_path, capsys):
    from healer.cli import main

    src = save_tiny(tmp_path, family, layers=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "g", "run_dir": str(tmp_path / "run"), "model": {"source": str(src)},
                                      "prune": {"method": "depth", "criterion": "magnitude", "num_blocks": 1,
                                                "keep_first": 0, "keep_last": 0},
                                      "release": {"gguf": ["f16"]}}))
    assert main(["run", "--config", str(recipe)]) == 2
    assert f"release.gguf: model type '{family}' has no GGUF export" in capsys.readouterr().err
    assert not (tmp_path / "run" / "prune").exists()

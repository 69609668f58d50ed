"""Model files that cannot be trusted are refused with one line naming the file, never a stack dump
or (worse) a model that loads with random weights where the checkpoint was incomplete."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import save_tiny, tiny_model, tiny_tokenizer
from safetensors.torch import load_file, save_file

from healer.core.errors import HealerError
from healer.model.modeling import (
    check_output_dir,
    check_seq_len,
    check_weights,
    load_config,
    load_model,
    load_tokenizer,
    resolve_source,
    smollm2_gguf_path,
)
from healer.prune.blockwise import BlockStack


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("good"), "llama", layers=2)


def copy_of(good, tmp_path, name="m"):
    return shutil.copytree(good, tmp_path / name)


CORRUPT_WEIGHTS = {
    "truncated": lambda data: data[: len(data) // 2],
    "header only": lambda data: data[:20],
    "garbage": lambda data: os.urandom(4096),
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("kind", CORRUPT_WEIGHTS)
def test_corrupt_safetensors_is_named_at_every_load_boundary(kind, good, tmp_path):
    model_dir = copy_of(good, tmp_path)
    file = model_dir / "model.safetensors"
    file.write_bytes(CORRUPT_WEIGHTS[kind](file.read_bytes()))
    location = resolve_source(str(model_dir))
    for load in (lambda: check_weights(location, load_config(location)), lambda: load_model(location),
                 lambda: BlockStack.from_pretrained_dir(model_dir)):
        with pytest.raises(HealerError) as err:
            load()
        assert "model.safetensors" in one_line(err) and "truncated or corrupt" in str(err.value)


CORRUPT_CONFIGS = {
    "not json": "{not json",
    "empty": "",
    "binary": os.urandom(200),
    "a list": "[1, 2]",
    "unknown model_type": {"model_type": "no_such_family"},
    "bad value": {"num_hidden_layers": "four"},
}


@pytest.mark.parametrize("kind", CORRUPT_CONFIGS)
def test_invalid_config_json_is_one_line_naming_it(kind, good, tmp_path):
    model_dir = copy_of(good, tmp_path)
    config = model_dir / "config.json"
    content = CORRUPT_CONFIGS[kind]
    if isinstance(content, dict):
        config.write_text(json.dumps(json.loads(config.read_text()) | content))
    elif isinstance(content, bytes):
        config.write_bytes(content)
    else:
        config.write_text(content)
    location = resolve_source(str(model_dir))
    for load in (lambda: load_config(location), lambda: load_model(location),
                 lambda: BlockStack.from_pretrained_dir(model_dir)):
        with pytest.raises(HealerError) as err:
            load()
        assert str(model_dir) in one_line(err) and "config.json" in str(err.value)


def test_weights_the_config_does_not_describe_are_refused(good, tmp_path):
    wider = copy_of(good, tmp_path, "wider")
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps(config | {"intermediate_size": 256}))
    location = resolve_source(str(wider))
    with pytest.raises(HealerError, match=r"gate_proj.weight has shape \[128, 64\] but .* implies \[256, 64\]") as err:
        load_model(location)
    one_line(err)
    deeper = copy_of(good, tmp_path, "deeper")  # config says 3 blocks, files hold 2: block 2 would be random
    (deeper / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    with pytest.raises(HealerError, match=r"lack 9 tensor\(s\).*model\.layers\.2\.") as err:
        load_model(resolve_source(str(deeper)))
    one_line(err)
    shallower = copy_of(good, tmp_path, "shallower")  # config says 1 block, files hold 2: block 1 would be dropped
    (shallower / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1}))
    with pytest.raises(HealerError, match=r"hold 9 tensor\(s\) that config.json does not describe \(first: "
                                          r"model\.layers\.1\..*num_hidden_layers=1") as err:
        load_model(resolve_source(str(shallower)))
    one_line(err)


def test_a_tensor_missing_from_the_file_is_refused(good, tmp_path):
    model_dir = copy_of(good, tmp_path)
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HealerError, match="lack 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        load_model(resolve_source(str(model_dir)))


def _sharded(tmp_path):
    out = tmp_path / "sharded"
    tiny_model("llama", layers=2).save_pretrained(out, max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(out)
    assert len(list(out.glob("model-*.safetensors"))) > 2
    return out


def test_sharded_checkpoint_index_problems(tmp_path):
    model_dir = _sharded(tmp_path)
    location = resolve_source(str(model_dir))
    check_weights(location, load_config(location))  # the healthy one passes
    index = model_dir / "model.safetensors.index.json"
    shard = sorted(model_dir.glob("model-*.safetensors"))[1]
    saved = index.read_text()
    hidden = shard.with_suffix(".bak")
    for breakage, expected in ((lambda: index.write_text("{{"), "not a valid safetensors index"),
                               (lambda: index.write_text("{}"), "not a valid safetensors index"),
                               (lambda: shard.rename(hidden), f"names {shard.name} but it is missing")):
        breakage()
        for load in (lambda: load_model(location), lambda: BlockStack.from_pretrained_dir(model_dir)):
            with pytest.raises(HealerError, match=expected) as err:
                load()
            one_line(err)
        index.write_text(saved)
        if hidden.exists():
            hidden.rename(shard)
    check_weights(location, load_config(location))  # repaired, it passes again


def test_tied_embeddings_are_not_reported_missing(tmp_path):
    model_dir = tmp_path / "tied"
    tiny_model("llama", layers=2, tie_word_embeddings=True).save_pretrained(model_dir)
    location = resolve_source(str(model_dir))
    check_weights(location, load_config(location))
    model = load_model(location)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_garbage_tokenizer_is_one_line(good, tmp_path):
    model_dir = copy_of(good, tmp_path)
    (model_dir / "tokenizer.json").write_text("garbage{")
    with pytest.raises(HealerError, match="cannot read the tokenizer") as err:
        load_tokenizer(resolve_source(str(model_dir)))
    assert str(model_dir) in one_line(err)


@pytest.mark.parametrize("kind", ["cut after the header", "garbage", "empty"])
def test_broken_gguf_is_one_line_naming_the_file(kind, tmp_path):
    try:
        real = smollm2_gguf_path()
    except HealerError as err:
        pytest.skip(str(err))
    with open(real, "rb") as fh:
        head = fh.read(1_000_000)
    data = {"cut after the header": head, "garbage": os.urandom(4096), "empty": b""}[kind]
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(data)
    location = resolve_source(str(gguf))
    for load in (lambda: load_config(location), lambda: load_model(location), lambda: load_tokenizer(location)):
        with pytest.raises(HealerError, match="GGUF file") as err:
            load()
        assert str(gguf) in one_line(err)


def test_sequence_longer_than_the_model_positions_is_refused():
    config = tiny_model("llama", layers=1).config  # max_position_embeddings 512
    check_seq_len(512, config, "prune.calibration.seq_len")
    with pytest.raises(HealerError, match=r"prune.calibration.seq_len: 513 tokens .* max_position_embeddings \(512\)"):
        check_seq_len(513, config, "prune.calibration.seq_len")


def test_output_directory_checks(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (tmp_path / "file").write_text("x")
    keep = {"the input model (model.source)": model_dir}
    for out, expected in ((tmp_path / "file", "is a file, not a directory"),
                          (tmp_path / "file" / "sub", "cannot be created because .* is a file"),
                          (model_dir, "out: .* is the input model"),
                          (model_dir / "pruned", "is inside the input model"),
                          (tmp_path / "link", "is the input model")):
        if out.name == "link":
            out.symlink_to(model_dir)
        with pytest.raises(HealerError, match=expected) as err:
            check_output_dir(out, "out", keep)
        one_line(err)
    gguf = {"the input model (model.source)": tmp_path / "gguf" / "m.gguf"}
    with pytest.raises(HealerError, match="is the folder of the input model .* would shadow the GGUF"):
        check_output_dir(tmp_path / "gguf", "out", gguf)
    check_output_dir(tmp_path / "gguf" / "pruned", "out", gguf)  # beside the GGUF's folder's files: fine
    check_output_dir(tmp_path / "new" / "deeper", "out", keep)  # created later: fine
    check_output_dir(tmp_path, "out", keep)  # the input inside the output is not overwritten
    assert not (tmp_path / "new").exists()  # checking writes nothing


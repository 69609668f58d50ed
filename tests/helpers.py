"""Test helpers: tiny random models of every supported family, a tiny tokenizer, and sample text.

Nothing here downloads anything: models are built from a config in-process. Tests import these
(`from helpers import save_tiny`); the pytest fixtures built on them live in conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes blocks; healing trains them back.\n"
    "def add(a, b):\n    return a + b\n"
    "Large language models predict the next token. 0123456789 !?;:,.-_()[]{}<>'\"/\\|@#$%^&*+=~`\n"
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ~300) trained in-process on a few sentences."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([SAMPLE_TEXT] * 4, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    return tok


# Every family the adapter supports, each built tiny in-process with the features that set it apart switched on:
# Gemma's scaled embeddings, sandwich norms, soft-capped logits and sliding/global layers; Phi-3's fused
# projections; OLMo's norms after each sublayer and q/k norms over all heads; SmolLM3's layers without RoPE.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma2", "gemma3_text", "phi3", "olmo2", "olmo3")
# The families healer writes GGUF files for (llama.cpp's architectures of the same tensor layout).
GGUF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
# Mixture-of-experts families: 8 experts, 2 per token, in every block (Qwen2-MoE with its shared expert).
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")
ALL_FAMILIES = FAMILIES + MOE_FAMILIES


def tiny_config(family: str = "llama", layers: int = 6, hidden: int = 64, intermediate: int = 128, heads: int = 4,
                kv_heads: int = 2, vocab: int = 320, **extra):
    from transformers import AutoConfig

    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  tie_word_embeddings=False, eos_token_id=0, pad_token_id=0, bos_token_id=None)
    if family not in ("llama", "mistral", "phi3", "olmo2"):
        kwargs["head_dim"] = hidden // heads
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if family in ("gemma2", "gemma3_text"):
        kwargs.update(query_pre_attn_scalar=hidden // heads, sliding_window=8, layer_types=alternating,
                      final_logit_softcapping=30.0, attn_logit_softcapping=50.0 if family == "gemma2" else None)
    elif family == "olmo3":
        kwargs.update(sliding_window=8, layer_types=alternating)
    elif family == "smollm3":
        kwargs.update(no_rope_layers=[int(i % 3 != 2) for i in range(layers)])
    if family in MOE_FAMILIES:
        kwargs.update(num_experts=8, num_experts_per_tok=2)
        if family in ("qwen3_moe", "qwen2_moe"):  # the experts' width; mixtral and olmoe use intermediate_size
            kwargs.update(moe_intermediate_size=intermediate // 4, decoder_sparse_step=1, mlp_only_layers=[])
        if family == "qwen2_moe":
            kwargs.update(shared_expert_intermediate_size=intermediate // 2)
        if family in ("mixtral", "olmoe"):
            kwargs["intermediate_size"] = intermediate // 4
    kwargs.update(extra)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str = "llama", seed: int = 0, **config_kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # transformers' default attention: sdpa, or eager for a family without it (Gemma 2), as load_model loads
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_kwargs))
    # Random init gives near-identical blocks; spread the weights so criteria have something to rank.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # 3-D: the fused experts of an MoE block
                p.normal_(0, 0.08)
    return model.eval()


def save_tiny(tmp_path: Path, family: str = "llama", name: str = "model", **kwargs) -> Path:
    """A tiny model + tokenizer saved as a Hugging Face directory."""
    out = tmp_path / name
    model = tiny_model(family, **kwargs)
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def logged_steps(stage: Path) -> list[int]:
    """The steps a training stage has logged to ``<stage>/metrics.jsonl`` so far ([] before its first)."""
    path = stage / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a test's own torchrun rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], *, ranks: int = 2, timeout: int = 300, fault: str | None = None,
             cwd: str | Path | None = None):
    """Run ``args`` (a script, or ``-m module ...``) on ``ranks`` local processes under torchrun.

    Each rank gets one thread (two torch processes on two cores otherwise oversubscribe them), the CPU
    DeepSpeed accelerator and its own free loopback port; ``HEALER_FAULT`` is ``fault`` or unset. The run is
    killed after ``timeout`` seconds. Returns the finished process, output captured.
    """
    import os
    import subprocess
    import sys

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("HEALER_FAULT", None)
    if fault:
        env["HEALER_FAULT"] = fault
    cmd = ["timeout", str(timeout), sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)


def healer_on_ranks(verb: str, recipe: str | Path, *flags: str, **kwargs):
    """``healer VERB --config RECIPE FLAGS`` on local ranks (:func:`torchrun`'s keywords)."""
    return torchrun(["-m", "healer", verb, "--config", str(recipe), *flags], **kwargs)


# -- tiny recipes for the pipeline tests ----------------------------------------------------------------

def write_corpus(directory: Path, shards: int = 1, docs: int = 20, meta: dict | None = None) -> Path:
    """A corpus of ``shards`` jsonl files with ``docs`` numbered documents each (SAMPLE_TEXT after a header)."""
    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with open(directory / f"part_{shard}.jsonl", "w") as fh:
            for i in range(docs):
                record = {"text": f"Shard {shard} document {i}. " + SAMPLE_TEXT}
                fh.write(json.dumps({**record, "meta": meta} if meta else record) + "\n")
    return directory


def write_calibration(path: Path) -> Path:
    """40 numbered calibration documents (SAMPLE_TEXT twice after a header) as jsonl."""
    path.write_text("".join(json.dumps({"text": f"Document {i}. " + SAMPLE_TEXT * 2}) + "\n" for i in range(40)))
    return path


def write_pipeline_inputs(tmp_path: Path, meta: dict | None = None) -> tuple[Path, Path, Path]:
    """(corpus, held-out text, instruction data) for a whole-pipeline recipe: 2 shards of 30 documents (``meta``
    on each record, if given), SAMPLE_TEXT 20 times, 16 alpaca records."""
    corpus = write_corpus(tmp_path / "corpus", shards=2, docs=30, meta=meta)
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(SAMPLE_TEXT * 20)
    instruct = tmp_path / "instruct.json"
    instruct.write_text(json.dumps([{"instruction": f"Repeat the number {i}.", "input": "", "output": f"{i}"}
                                    for i in range(16)]))
    return corpus, heldout, instruct


def depth_prune_section(calibration_file: Path, **keys) -> str:
    """A recipe's ``prune:`` section: depth by block influence on 4 calibration samples of 32 tokens, plus
    ``keys`` (values written as YAML flow, e.g. ``ratio=0.25``, ``rounds="[{ratio: 0.25}]"``)."""
    lines = ["prune:", "  method: depth", "  criterion: block_influence"]
    lines += [f"  {key}: {value}" for key, value in keys.items()]
    lines.append(f"  calibration: {{path: {calibration_file}, num_samples: 4, seq_len: 32}}")
    return "\n".join(lines) + "\n"


def tiny_recipe(tmp_path: Path, *sections: str, layers: int = 4, family: str = "llama") -> tuple[Path, Path]:
    """Write ``tmp_path/recipe.yaml``: run ``tiny`` in ``tmp_path/run`` on a tiny ``family`` model of ``layers``
    blocks (hidden 64, MLP 128), then ``sections`` (YAML text, dedented). Returns (recipe, model directory)."""
    import textwrap

    src = save_tiny(tmp_path, family, layers=layers, hidden=64, intermediate=128)
    text = f"name: tiny\nrun_dir: {tmp_path / 'run'}\nmodel: {{source: {src}}}\n"
    text += "".join(textwrap.dedent(section).strip("\n") + "\n" for section in sections)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    return recipe, src


def one_rank_cpt_recipe(tmp_path: Path, model: Path | None = None, **cpt) -> Path:
    """Write ``tmp_path/r.yaml``: `healer cpt` on one rank of a tiny llama (2 blocks, hidden 32; ``model`` if
    given) over 40 numbered SAMPLE_TEXT documents, 2 sequences of 32 tokens a step, ZeRO-0, plus ``cpt`` keys."""
    import yaml

    model = model or save_tiny(tmp_path, "llama", layers=2, hidden=32, intermediate=64)
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{i} {SAMPLE_TEXT}"}) + "\n" for i in range(40)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"source": str(model)}, "run_dir": str(tmp_path / "run"),
                                      "data": {"sources": [{"path": str(corpus)}], "seq_len": 32},
                                      "cpt": {"input": str(model), "micro_batch_size": 2, "global_batch_size": 2,
                                              "zero_stage": 0, **cpt}}))
    return recipe

"""Instruction data without a download: prompts from corpus text, answered by the unpruned teacher.

Self-data distillation: the dense model writes the replies its pruned copy is then tuned on, so tuning
pulls the student back towards the teacher's behaviour instead of towards someone else's data set.
Prompts are built from passages of the corpus (in the offline demo: the Python documentation every
installation carries), e.g. "Summarize the following passage" with the passage as the Alpaca ``input``.

    healer instruct build --model smollm2 --output runs/demo/instruct.json --num-examples 128

or from Python, :func:`build_self_distilled_instructions`.
"""

from __future__ import annotations

import glob
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from healer.core import textio
from healer.core.errors import HealerError
from healer.core.manifest import write_json_atomic
from healer.core.textio import BadRecords

# (instruction, whether the passage goes in as the Alpaca `input`). {title} is the passage's heading.
TEMPLATES = (
    ("Summarize the following passage from the Python documentation in two or three sentences.", True),
    ("Explain in simple words what the following Python documentation passage is about.", True),
    ("Explain what the Python topic \"{title}\" is about.", False),
    ("List the key points of the following text as short bullet points.", True),
    ("What is \"{title}\" in Python? Answer briefly.", False),
    ("Write one question that the following passage answers, and then answer it.", True),
)


# ---------------------------------------------------------------- corpus text

def default_corpus(data_cfg) -> str | None:
    """The first local training source of the recipe's ``data:`` section, if it exists on disk."""
    for source in getattr(data_cfg, "sources", None) or []:
        if Path(source.path).exists() or glob.glob(source.path):
            return source.path
    return None


def self_distill_output(sd_cfg, stage_dir: str | Path) -> Path:
    return Path(sd_cfg.output) if sd_cfg.output else Path(stage_dir) / "self_distill.json"


def pydoc_texts() -> list[str]:
    """The Python documentation topics shipped with every CPython (``pydoc_data``), as a fallback corpus."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions strip it
        raise HealerError("no corpus given and this Python has no pydoc_data; set sft.self_distill.corpus") from err
    return [topics[k] for k in sorted(topics)]


def read_texts(corpus: str | Path, text_field: str = "text", limit: int = 20000) -> list[str]:
    """Up to ``limit`` texts of a corpus: a file, a directory (searched recursively) or a glob, read by
    :mod:`healer.core.textio` (``.jsonl``/``.json``/``.parquet`` records, ``.txt`` one document per line).

    A bad record costs one prompt, not the run: it is skipped, counted and reported in one line.
    """
    from healer.train.data.shards import resolve_files

    files = resolve_files(str(corpus), "sft.self_distill.corpus")
    bad = BadRecords(setting=None)
    texts = textio.read_texts(files, bad, text_field=text_field, max_docs=limit, what="sft.self_distill.corpus")
    if bad.counts:
        print(f"self-distillation corpus {corpus}: {bad.summary()}", file=sys.stderr)
    return texts


# ---------------------------------------------------------------- prompts

def title_of(text: str) -> str:
    """A document's heading: its first line with reST/markdown decoration stripped."""
    for line in text.splitlines():
        line = line.strip().strip("#*=-~`").strip()
        if len(line) >= 3:
            return line[:80].rstrip(" .:")
    return ""


def passage_of(text: str, rng: random.Random, chars: int) -> str:
    """About ``chars`` characters from a random paragraph onwards, cut at a sentence end when one is near."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 40]
    if not paragraphs:
        return ""
    start = rng.randrange(len(paragraphs))
    passage = ""
    for p in paragraphs[start:]:
        passage = f"{passage}\n\n{p}" if passage else p
        if len(passage) >= chars:
            break
    if len(passage) > chars:
        cut = passage[:chars]
        end = max(cut.rfind(". "), cut.rfind(".\n"))
        passage = cut[:end + 1] if end > chars // 2 else cut.rsplit(" ", 1)[0]
    return passage.strip()


def build_prompts(texts: list[str], n: int, seed: int = 0, passage_chars: int = 500) -> list[dict]:
    """Up to ``n`` distinct Alpaca prompts (``instruction``, ``input``), spread over documents and templates."""
    rng = random.Random(seed)
    docs = [t for t in texts if len(t) >= 200]
    if not docs:
        raise HealerError("the corpus has no document of 200 characters or more to build prompts from")
    rng.shuffle(docs)
    prompts, seen = [], set()
    for round_ in range(len(TEMPLATES)):
        for i, doc in enumerate(docs):
            instruction, with_passage = TEMPLATES[(i + round_) % len(TEMPLATES)]
            title = title_of(doc)
            if "{title}" in instruction and not title:
                continue
            record = {"instruction": instruction.format(title=title),
                      "input": passage_of(doc, rng, passage_chars) if with_passage else ""}
            key = (record["instruction"], record["input"])
            if (with_passage and not record["input"]) or key in seen:
                continue
            seen.add(key)
            prompts.append(record)
            if len(prompts) == n:
                return prompts
    return prompts


# ---------------------------------------------------------------- answers

def generation_dtype() -> torch.dtype:
    """bfloat16 where the hardware computes it natively (GPU, AVX512-BF16 or AMX CPUs), else float32.

    Decoding is bound by reading the weights, and bf16 halves the bytes; on a 2-core CPU it
    measured between 1x and 3x faster than float32 (bench/self_distill_speed.py; noisy), never slower.
    The replies only need to be good text, not bit-exact.
    """
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if native else torch.float32


def tidy_reply(text: str, finished: bool) -> str:
    """Strip the reply; one cut off by max_new_tokens loses its unfinished last sentence."""
    text = text.strip()
    if not finished:
        end = max(text.rfind(". "), text.rfind(".\n"), text.rfind("\n"))
        if text.endswith((".", "!", "?")):
            end = len(text) - 1
        if end > 0:  # a reply ending mid-sentence would teach the student to stop mid-sentence
            text = text[:end + 1].strip()
    return text


@torch.no_grad()
def answer(model, tokenizer, prompts: list[dict], *, max_new_tokens: int, temperature: float = 0.0,
           batch_size: int = 8, seed: int = 0) -> list[str]:
    """The teacher's reply to each prompt, in the teacher's own chat template when it has one."""
    from tqdm.auto import tqdm

    from healer.train.instruct import alpaca_prompt, to_messages

    def render(p: dict) -> str:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(to_messages({**p, "output": ""})[:1], tokenize=False,
                                                 add_generation_prompt=True)
        return alpaca_prompt(p["instruction"], p["input"])

    texts = [render(p) for p in prompts]
    # Batch prompts of similar length so little compute goes to padding; answers go back in order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    replies: list[str] = [""] * len(texts)
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95} if temperature > 0 else \
        {"do_sample": False}
    bar = tqdm(total=len(texts), desc="teacher answers", unit="prompt")
    # A prompt that leaves no room for the reply inside the model's context is skipped (its reply stays "").
    room = getattr(model.config, "max_position_embeddings", None)
    if room:
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        order = [i for i in order if lengths[i] + max_new_tokens <= room]
        bar.update(len(texts) - len(order))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                        add_special_tokens=not getattr(tokenizer, "chat_template", None))
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=eos, repetition_penalty=1.1, **sampling)
        new = out[:, enc["input_ids"].shape[1]:]
        for row, i in enumerate(idx):
            finished = eos is not None and bool((new[row] == eos).any())
            replies[i] = tidy_reply(tokenizer.decode(new[row], skip_special_tokens=True), finished)
        bar.update(len(idx))
    bar.close()
    return replies


def build_self_distilled_instructions(teacher_source: str, corpus_dir_or_texts: str | Path | list[str] | None,
                                      out_file: str | Path, n: int = 128, max_new_tokens: int = 96,
                                      seed: int = 0, *, temperature: float = 0.0, batch_size: int = 8,
                                      passage_chars: int = 500, gguf_file: str | None = None,
                                      dtype: str = "auto") -> Path:
    """Write ``n`` Alpaca records (instruction, input, output) to ``out_file`` and return its path.

    Args:
        teacher_source: the unpruned model (any ``model.source``: HF dir, hub id, .gguf, ``smollm2``).
        corpus_dir_or_texts: a corpus directory/glob/file, a list of texts, or None for ``pydoc_data``.
        n: records wanted; fewer when the corpus has fewer distinct prompts.
        max_new_tokens: length cap of a reply; a cut-off reply is trimmed to its last full sentence.
        seed: picks documents, passages and (when ``temperature`` > 0) the sampled tokens.
        temperature: 0 decodes greedily (the default, deterministic); above 0 samples with top-p 0.95.
        dtype: the teacher's weights while generating; ``auto`` picks :func:`generation_dtype`.
    """
    from healer.model.modeling import load_model, load_tokenizer, resolve_source, torch_dtype

    t0 = time.perf_counter()
    if corpus_dir_or_texts is None:
        texts = pydoc_texts()
    elif isinstance(corpus_dir_or_texts, (list, tuple)):
        texts = list(corpus_dir_or_texts)
    else:
        texts = read_texts(corpus_dir_or_texts)
    prompts = build_prompts(texts, n, seed=seed, passage_chars=passage_chars)
    location = resolve_source(teacher_source, gguf_file)
    tokenizer = load_tokenizer(location)
    model = load_model(location, dtype=generation_dtype() if dtype == "auto" else torch_dtype(dtype))
    replies = answer(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                     batch_size=batch_size, seed=seed)
    records = [{**p, "output": r} for p, r in zip(prompts, replies) if len(r) >= 10]  # empty, too long or junk
    if not records:
        raise HealerError(f"the teacher {teacher_source} gave no usable reply to {len(prompts)} prompts")
    write_json_atomic(out_file, records)
    print(f"instruct: {len(records)} records ({len(prompts) - len(records)} empty replies dropped) from "
          f"{len(texts)} documents, answered by {location} ({model.dtype}) in {time.perf_counter() - t0:.0f}s "
          f"-> {out_file}")
    return Path(out_file)


# ---------------------------------------------------------------- CLI

@dataclass
class Options:
    action: str = field(default="build", metadata={
        "help": "build: write the instruction file (sft.self_distill.output)", "positional": True,
        "choices": ("build",)})


def main(recipe, opts: Options) -> int:
    """``healer instruct build [--output F] [--num-examples N] [--corpus DIR] [--teacher M]``."""
    from healer.train.config import SelfDistillConfig

    sd = (recipe.sft.self_distill if recipe.sft and recipe.sft.self_distill else SelfDistillConfig())
    out = self_distill_output(sd, recipe.stage_dir("sft"))
    build_self_distilled_instructions(
        sd.teacher or recipe.model.source, sd.corpus or default_corpus(recipe.data), out, n=sd.num_examples,
        max_new_tokens=sd.max_new_tokens, seed=sd.seed, temperature=sd.temperature, batch_size=sd.batch_size,
        passage_chars=sd.passage_chars, gguf_file=None if sd.teacher else recipe.model.gguf_file, dtype=sd.dtype)
    return 0

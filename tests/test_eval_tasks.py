"""Zero-shot tasks from local HF-schema files through lm-eval: right prompts, right gold, honest accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_model, tiny_tokenizer

from healer.errors import HealerError
from healer.eval.harness import run_tasks
from healer.eval.tasks import load_docs


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ARC = [
    {"id": "q1", "question": "Which is a fox?", "choices": {"text": ["dog", "fox", "cat"], "label": ["A", "B", "C"]},
     "answerKey": "B"},
    {"id": "q2", "question": "What adds two numbers?", "choices": {"text": ["add", "return a", "b", "def"],
                                                                  "label": ["1", "2", "3", "4"]}, "answerKey": "1"},
    {"id": "q3", "question": "The lazy what?", "choices": {"text": ["dog", "token", "model"], "label": ["A", "B", "C"]},
     "answerKey": "A"},
    {"id": "q4", "question": "Models predict the next?", "choices": {"text": ["block", "token"], "label": ["A", "B"]},
     "answerKey": "B"},
    {"id": "q5", "question": "Pruning removes?", "choices": {"text": ["blocks", "foxes", "numbers", "dogs"],
                                                            "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    {"id": "q6", "question": "Healing trains them?", "choices": {"text": ["back", "over"], "label": ["A", "B"]},
     "answerKey": "A"},
]


def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) the way lm-eval scores a causal LM: encode the whole, split at the context."""
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(logprobs[len(whole) - len(cont) - 1 + i, t].item() for i, t in enumerate(cont))


def test_arc_accuracy_matches_hand_scored_loglikelihoods(tmp_path):
    model, tok = tiny_model(layers=2), tiny_tokenizer()
    data = write_jsonl(tmp_path / "arc.jsonl", ARC)
    got = run_tasks(model, tok, {"arc_easy": str(data)}, tmp_path / "out", batch_size=4)["arc_easy"]
    hits, hits_norm = [], []
    for row in ARC:
        context = f"Question: {row['question']}\nAnswer:"
        lls = np.array([loglikelihood(model, tok, context, " " + c) for c in row["choices"]["text"]])
        gold = row["choices"]["label"].index(row["answerKey"])
        lengths = np.array([len(c) for c in row["choices"]["text"]], dtype=float)
        hits.append(int(np.argmax(lls) == gold))
        hits_norm.append(int(np.argmax(lls / lengths) == gold))
    assert got["n"] == len(ARC)
    assert got["acc"] == pytest.approx(np.mean(hits))
    assert got["acc_norm"] == pytest.approx(np.mean(hits_norm))
    assert got["acc_stderr"] is not None
    # the converted data and an lm-eval YAML that reproduces the run sit in the output folder
    assert (tmp_path / "out" / "tasks" / "arc_easy.yaml").is_file()


def all_task_files(tmp_path):
    files = {
        "arc_challenge": write_jsonl(tmp_path / "arc_c.jsonl", ARC[:2]),
        "boolq": write_jsonl(tmp_path / "boolq.jsonl", [
            {"question": "is a fox a dog", "passage": "The quick brown fox.", "label": 0},
            {"question": "does add return a + b", "passage": "def add(a, b): return a + b", "answer": True}]),
        "hellaswag": write_jsonl(tmp_path / "hs.jsonl", [
            {"activity_label": "Jumping", "ctx_a": "The fox runs.", "ctx_b": "it", "endings":
             ["jumps over the dog.", "sleeps [title] now.", "adds numbers.", "prunes blocks."], "label": "0"}] * 2),
        "winogrande": write_jsonl(tmp_path / "wg.jsonl", [
            {"sentence": "The fox jumped over the dog because _ was quick.", "option1": "the fox",
             "option2": "the dog", "answer": "1"},
            {"sentence": "The model beat the block because _ was trained.", "option1": "the block",
             "option2": "the model", "answer": "2"}]),
        "openbookqa": write_jsonl(tmp_path / "obqa.jsonl", [
            {"id": "1", "question_stem": "Foxes are", "choices": {"text": ["quick", "lazy"], "label": ["A", "B"]},
             "answerKey": "A"},
            {"id": "2", "question_stem": "Dogs are", "choices": {"text": ["quick", "lazy"], "label": ["A", "B"]},
             "answerKey": "B"}]),
        "lambada": write_jsonl(tmp_path / "lambada.jsonl", [
            {"text": "The quick brown fox jumps over the lazy dog"}, {"text": "Models predict the next token"}]),
    }
    # PIQA as its original release ships it: labels in a separate file beside the records
    files["piqa"] = write_jsonl(tmp_path / "valid.jsonl", [
        {"id": "a", "goal": "Add two numbers", "sol1": "def add(a, b): return a + b", "sol2": "jump over a dog"},
        {"id": "b", "goal": "Be lazy", "sol1": "jump", "sol2": "sleep"}])
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    return {name: str(path) for name, path in files.items()}


def test_every_schema_is_read_and_scored(tmp_path):
    files = all_task_files(tmp_path)
    assert [d["gold"] for d in load_docs("piqa", files["piqa"])] == [0, 1]
    assert [d["gold"] for d in load_docs("boolq", files["boolq"])] == [0, 1]
    wino = load_docs("winogrande", files["winogrande"])
    assert wino[1]["query"] == 1 and wino[1]["choices"][1] == "The model beat the block because the model"
    assert wino[1]["gold"] == "was trained."
    assert load_docs("hellaswag", files["hellaswag"])[0]["choices"][1] == "sleeps. now."
    assert load_docs("lambada", files["lambada"])[1] == {"query": "Models predict the next", "target": " token"}

    results = run_tasks(tiny_model(layers=2), tiny_tokenizer(), files, tmp_path / "out", batch_size=8)
    assert set(results) == set(files)
    for name, entry in results.items():
        assert entry["n"] == 2, name
        assert 0.0 <= entry["acc"] <= 1.0, name
        if name == "lambada":
            assert entry["perplexity"] > 1.0
        else:
            assert 0.0 <= entry["acc_norm"] <= 1.0, name


def test_a_record_outside_the_schema_is_named(tmp_path):
    bad = write_jsonl(tmp_path / "arc.jsonl", ARC[:1] + [{"question": "no choices", "answerKey": "A"}])
    with pytest.raises(HealerError, match=r"arc_easy: .*arc.jsonl record 2 lacks choices"):
        load_docs("arc_easy", bad)
    lone_piqa = write_jsonl(tmp_path / "test.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}])
    with pytest.raises(HealerError, match="no `label` field and no test-labels.lst"):
        load_docs("piqa", lone_piqa)
    with pytest.raises(HealerError, match="unknown task 'mmlu'.*arc_easy"):
        load_docs("mmlu", bad)


@pytest.mark.slow
def test_real_arc_easy_and_piqa_with_smollm2_score_as_computed_by_hand(tmp_path, shared_data):
    """The real dev files, the real 135M model and its tokenizer: lm-eval's accuracy is the hand-scored one.

    Few examples (CPU time), but each is scored both ways, so a wrong prompt, gold index or
    tokenizer boundary (BOS, the space before the answer) shows as a mismatch.
    """
    from healer.eval.tasks import load_docs
    from healer.modeling import load_model, load_tokenizer, resolve_source

    location = resolve_source("smollm2")
    model, tok = load_model(location), load_tokenizer(location)
    tasks = {"arc_easy": str(shared_data / "eval" / "arc-easy" / "validation.jsonl"),
             "piqa": str(shared_data / "eval" / "piqa" / "valid.jsonl")}
    limit = 4
    results = run_tasks(model, tok, tasks, tmp_path, limit=limit, batch_size=8)
    for name, path in tasks.items():
        hits, hits_norm = [], []
        for doc in load_docs(name, path, limit):
            lls = np.array([loglikelihood(model, tok, doc["query"], " " + c) for c in doc["choices"]])
            lengths = np.array([len(c) for c in doc["choices"]], dtype=float)
            hits.append(int(np.argmax(lls) == doc["gold"]))
            hits_norm.append(int(np.argmax(lls / lengths) == doc["gold"]))
        assert results[name]["n"] == limit
        assert results[name]["acc"] == pytest.approx(np.mean(hits)), name
        assert results[name]["acc_norm"] == pytest.approx(np.mean(hits_norm)), name

"""Zero-shot tasks from local HF-schema files through lm-eval: right prompts, right gold, honest accuracy."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import save_tiny, tiny_model, tiny_tokenizer

from healer.core.errors import HealerError
from healer.eval.harness import run_tasks
from healer.eval.tasks import data_source, prepare_tasks


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


def test_every_schema_runs_through_lm_evals_own_task_yaml(tmp_path):
    files = all_task_files(tmp_path)
    results = run_tasks(tiny_model(layers=2), tiny_tokenizer(), files, tmp_path / "out", batch_size=8)
    assert set(results) == set(files)
    for name, entry in results.items():
        assert entry["n"] == 2, name
        assert 0.0 <= entry["acc"] <= 1.0, name
    # the metrics are the ones lm-eval's YAML defines, not a list healer keeps
    assert results["lambada"]["perplexity"] > 1.0 and "acc_norm" not in results["lambada"]
    assert "acc_norm" not in results["boolq"] and "acc_norm" not in results["winogrande"]
    assert 0.0 <= results["hellaswag"]["acc_norm"] <= 1.0
    folder = tmp_path / "out" / "tasks"
    import lm_eval

    for name in files:
        written = yaml.safe_load((folder / f"{name}.yaml").read_text())
        # lm-eval's installed definition, with only the data source replaced
        assert written["include"].startswith(str(Path(lm_eval.__file__).parent / "tasks"))
        assert written["dataset_path"] == "json"
        assert not {"doc_to_text", "doc_to_target", "doc_to_choice", "process_docs"} & set(written), name
    # files lm-eval reads as they are are used in place; PIQA's separate labels and google/boolq's `answer`
    # are merged into a copy
    assert yaml.safe_load((folder / "arc_challenge.yaml").read_text())["dataset_kwargs"]["data_files"]["eval"] \
        == str(Path(files["arc_challenge"]).resolve())
    piqa = [json.loads(line) for line in (folder / "piqa.jsonl").read_text().splitlines()]
    assert [r["label"] for r in piqa] == [0, 1]
    boolq = [json.loads(line) for line in (folder / "boolq.jsonl").read_text().splitlines()]
    assert [r["label"] for r in boolq] == [0, 1]


def test_a_record_outside_the_schema_is_named(tmp_path):
    bad = write_jsonl(tmp_path / "arc.jsonl", ARC[:1] + [{"question": "no choices", "answerKey": "A"}])
    with pytest.raises(HealerError, match=r"arc_easy: .*arc.jsonl record 2 lacks choices"):
        data_source("arc_easy", bad, tmp_path)
    lone_piqa = write_jsonl(tmp_path / "test.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}])
    with pytest.raises(HealerError, match="no `label` field and no test-labels.lst"):
        data_source("piqa", lone_piqa, tmp_path)
    with pytest.raises(HealerError, match="unknown task 'mmlu'.*arc_easy"):
        data_source("mmlu", bad, tmp_path)
    with pytest.raises(HealerError, match=r"task name 'arc_easy_/../x' may hold only letters, digits and _"):
        data_source("arc_easy_/../x", bad, tmp_path)
    binary = tmp_path / "arc_bin.jsonl"
    binary.write_bytes(b"\x00\xff\xfe garbage\n")
    with pytest.raises(HealerError, match="arc_bin.jsonl"):
        data_source("arc_easy", binary, tmp_path)


def test_a_rerun_with_fewer_tasks_leaves_no_stale_task_yaml(tmp_path):
    files = all_task_files(tmp_path)
    prepare_tasks({"piqa": files["piqa"], "arc_easy": files["arc_challenge"]}, tmp_path / "out")
    folder = prepare_tasks({"arc_easy": files["arc_challenge"]}, tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == ["arc_easy.yaml"]


def test_a_json_list_is_handed_to_lm_eval_as_json_lines(tmp_path):
    listed = tmp_path / "arc.json"
    listed.write_text(json.dumps({"data": ARC}))
    kind, file = data_source("arc_easy", listed, tmp_path)
    assert kind == "json" and file == (tmp_path / "arc_easy.jsonl").resolve()
    assert [json.loads(line) for line in file.read_text().splitlines()] == ARC


def hand_docs(name: str, path: str, limit: int) -> list[dict]:
    """The prompt, choices and gold of the first ``limit`` rows, written out from lm-eval's YAMLs by hand."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()[:limit]]
    if name == "piqa":  # the original release: labels in valid-labels.lst
        labels = Path(path).with_name("valid-labels.lst").read_text().split()
        return [{"query": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"], r["sol2"]], "gold": int(lab)}
                for r, lab in zip(rows, labels)]
    return [{"query": f"Question: {r['question']}\nAnswer:", "choices": r["choices"]["text"],
             "gold": r["choices"]["label"].index(r["answerKey"])} for r in rows]


@pytest.mark.slow
def test_real_arc_easy_and_piqa_with_smollm2_score_as_computed_by_hand(tmp_path, shared_data):
    """The real dev files, the real 135M model and its tokenizer: lm-eval's accuracy is the hand-scored one.

    Few examples (CPU time), but each is scored both ways, so a wrong prompt, gold index or
    tokenizer boundary (BOS, the space before the answer) shows as a mismatch.
    """
    from healer.model.modeling import load_model, load_tokenizer, resolve_source

    location = resolve_source("smollm2")
    model, tok = load_model(location), load_tokenizer(location)
    tasks = {"arc_easy": str(shared_data / "eval" / "arc-easy" / "validation.jsonl"),
             "piqa": str(shared_data / "eval" / "piqa" / "valid.jsonl")}
    limit = 4
    results = run_tasks(model, tok, tasks, tmp_path, limit=limit, batch_size=8)
    for name, path in tasks.items():
        hits, hits_norm = [], []
        for doc in hand_docs(name, path, limit):
            lls = np.array([loglikelihood(model, tok, doc["query"], " " + c) for c in doc["choices"]])
            lengths = np.array([len(c) for c in doc["choices"]], dtype=float)
            hits.append(int(np.argmax(lls) == doc["gold"]))
            hits_norm.append(int(np.argmax(lls / lengths) == doc["gold"]))
        assert results[name]["n"] == limit
        assert results[name]["acc"] == pytest.approx(np.mean(hits)), name
        assert results[name]["acc_norm"] == pytest.approx(np.mean(hits_norm)), name


def test_recorded_lm_eval_command_parses_and_gives_healers_numbers(tmp_path):
    """eval.json's `lm_eval` command, parsed by lm-eval's own CLI parser and run by lm-eval from the saved
    checkpoint, gives the accuracies healer reported from the model it had in memory."""
    from helpers import save_tiny
    from lm_eval import simple_evaluate
    from lm_eval._cli import HarnessCLI
    from lm_eval.tasks import TaskManager

    from healer.eval.config import EvalConfig
    from healer.eval.suite import evaluate

    model_dir = save_tiny(tmp_path, layers=2, name="model, with a comma")  # the command must survive the path
    files = all_task_files(tmp_path)
    tasks = {"arc_easy": str(write_jsonl(tmp_path / "arc.jsonl", ARC)), "piqa": files["piqa"],
             "boolq": files["boolq"]}
    cfg = EvalConfig(tasks=tasks, limit=5, batch_size=3, context_lengths=[])
    result = evaluate(str(model_dir), cfg, tmp_path / "eval")
    recorded = json.loads((tmp_path / "eval" / "eval.json").read_text())["lm_eval"]
    assert recorded["argv"] == shlex.split(recorded["command"])

    argv = shlex.split(recorded["command"])
    assert argv[0] == "lm_eval"
    args = HarnessCLI()._parser.parse_args(["run", *argv[1:]])  # what `lm_eval ...` inserts, 'run' first
    assert args.model_args["pretrained"] == str(model_dir.resolve())
    assert args.tasks == ["arc_easy", "piqa", "boolq"] and args.limit == 5 and args.num_fewshot == 0
    # lm-eval's CLI also indexes its built-in tasks (20 s here); our include path's YAMLs win over them
    manager = TaskManager(include_path=args.include_path, include_defaults=False)
    theirs = simple_evaluate(model=args.model, model_args=args.model_args, tasks=args.tasks, limit=args.limit,
                             num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=args.device,
                             task_manager=manager, random_seed=args.seed[0], numpy_random_seed=args.seed[1],
                             torch_random_seed=args.seed[2], fewshot_random_seed=args.seed[3])["results"]
    for name in tasks:
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in theirs[name] or metric in result["tasks"][name]:
                assert result["tasks"][name][metric] == theirs[name][f"{metric},none"], (name, metric)
    assert result["tasks"]["arc_easy"]["n"] == 5


def test_the_model_card_prints_the_lm_eval_command(tmp_path):
    from healer.eval.harness import lm_eval_command
    from healer.release.model_card import eval_section

    argv = lm_eval_command("/runs/x/cpt/hf", ["arc_easy"], tmp_path / "tasks", batch_size=4, limit=100)
    command = shlex.join(argv)
    result = {"parameters": 10, "tasks": {"arc_easy": {"acc": 0.5, "acc_norm": 0.5, "n": 100}},
              "lm_eval": {"version": "0.4.13", "include_path": str(tmp_path / "tasks"), "argv": argv,
                          "command": command}}
    section = eval_section(result)
    assert f"```bash\n{command}\n```" in section
    assert '"pretrained": "/runs/x/cpt/hf"' in command and "--limit 100" in command
    # In a release card of that same checkpoint the command names the released model, not the run's directory
    # (which a reader of the card does not have); the rest of the line is unchanged and still parses.
    from lm_eval._cli import HarnessCLI

    result["source"] = "/runs/x/cpt/hf"
    section = eval_section(result, "/runs/x/cpt/hf", "org/tiny-pruned")
    released = section.split("```bash\n")[1].split("\n```")[0]
    args = HarnessCLI()._parser.parse_args(["run", *shlex.split(released)[1:]])
    assert args.model_args == {"pretrained": "org/tiny-pruned", "dtype": "float32"} and args.limit == 100
    assert "/runs/x" not in released
    # A card of another checkpoint than the one evaluated keeps the evaluated path: that is what was measured.
    assert command in eval_section(result, "/runs/x/sft/hf", "org/tiny-pruned")


@pytest.mark.parametrize("task,row,says", [
    ("arc_easy", {"question": "q", "choices": ["a", "b"], "answerKey": "A"}, "choices is not {text: [...], label"),
    ("arc_easy", {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"},
     "answerKey 'C' is not one of the labels"),
    ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": 2}, "label 2 is not an answer index 0..1"),
    ("hellaswag", {"ctx_a": "a", "ctx_b": "b", "activity_label": "x", "endings": "one", "label": 0},
     "endings is not a list of strings"),
    ("winogrande", {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}, "sentence has no _ blank"),
    ("boolq", {"question": "q", "passage": "p", "label": "yes"}, "label 'yes' is not an answer index"),
])
def test_a_record_lm_eval_would_crash_on_is_named_with_its_line(tmp_path, task, row, says):
    good = {"arc_easy": ARC[0], "piqa": {"goal": "g", "sol1": "a", "sol2": "b", "label": 1},
            "hellaswag": {"ctx_a": "a", "ctx_b": "b", "activity_label": "x", "endings": ["e", "f"], "label": 1},
            "winogrande": {"sentence": "the _ sat", "option1": "a", "option2": "b", "answer": "2"},
            "boolq": {"question": "q", "passage": "p", "label": 0}}[task]
    path = write_jsonl(tmp_path / f"{task}.jsonl", [good, good, row])
    with pytest.raises(HealerError, match=rf"eval.tasks.{task}: .*{task}.jsonl record 3: " + re.escape(says)):
        data_source(task, path, tmp_path)
    data_source(task, write_jsonl(tmp_path / "good.jsonl", [good]), tmp_path)  # a good file passes


def test_tasks_are_checked_before_the_perplexity_pass(tmp_path, capsys):
    from healer.cli import main

    model = save_tiny(tmp_path, "llama", layers=2, hidden=32, intermediate=64)
    bad = write_jsonl(tmp_path / "arc.jsonl", [ARC[0], {"question": "q", "choices": [], "answerKey": "A"}])
    text = tmp_path / "wiki.txt"
    text.write_text("some words " * 200)
    common = ["eval", "--model", str(model), f"run_dir={tmp_path / 'run'}", f"eval.perplexity_files=[{text}]",
              "eval.context_lengths=[16]"]
    assert main([*common, f"eval.tasks={{arcc_easy: {bad}}}"]) == 2
    assert "eval.tasks: unknown task 'arcc_easy'; known: arc_easy" in capsys.readouterr().err
    assert main([*common, f"eval.tasks={{arc_easy: {bad}}}"]) == 2
    err = capsys.readouterr().err
    assert "arc.jsonl record 2: choices is not" in err and "ppl@16" not in err and "Traceback" not in err
    assert not (tmp_path / "run" / "eval" / "eval.json").exists()

"""Zero-shot tasks read from local files in the Hugging Face schemas, turned into lm-eval task configs.

lm-eval's own task YAMLs point at the Hub. Here each task's rows are read from a
local file (``.jsonl``, ``.json`` list or ``.parquet``, as the Hub serves them),
turned into one flat multiple-choice shape ``{query, choices, gold}`` with the
same prompt lm-eval's YAML builds, and written to ``<out>/tasks/<task>.jsonl``.
lm-eval then loads that file through ``dataset_path: json`` + ``data_files``: no
network, and the written YAML next to it reproduces the run with ``lm_eval
--include_path``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from healer.errors import HealerError
from healer.textio import BadRecords, iter_file_records


def read_records(path: str | Path) -> list[dict]:
    """Rows of a ``.jsonl``, ``.json`` (a list, or ``{"data": [...]}``) or ``.parquet`` file (read by
    :mod:`healer.textio`); a broken row is refused naming the file and line: a task's score must not
    quietly be over fewer examples."""
    path = Path(path)
    if not path.is_file():
        raise HealerError(f"eval.tasks: data file {path} does not exist")
    return [record for record, _where in iter_file_records(str(path), BadRecords(strict=True, setting=None))]


def _need(row: dict, keys: tuple[str, ...], task: str, path: Path, index: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise HealerError(f"eval.tasks.{task}: {path} record {index + 1} lacks {', '.join(missing)}; "
                          f"the {task} schema needs {', '.join(keys)}")


# --- one converter per schema: HF row -> {query, choices, gold}; prompts as in lm-eval 0.4's task YAMLs ---

def _arc(row: dict) -> dict:
    labels = row["choices"]["label"]
    return {"query": f"Question: {row['question']}\nAnswer:", "choices": list(row["choices"]["text"]),
            "gold": labels.index(str(row["answerKey"]).strip())}


def _openbookqa(row: dict) -> dict:
    labels = row["choices"]["label"]
    return {"query": row["question_stem"], "choices": list(row["choices"]["text"]),
            "gold": labels.index(str(row["answerKey"]).strip())}


def _piqa(row: dict) -> dict:
    return {"query": f"Question: {row['goal']}\nAnswer:", "choices": [row["sol1"], row["sol2"]],
            "gold": int(row["label"])}


def _boolq(row: dict) -> dict:
    # super_glue/boolq has `label` (0/1); google/boolq has `answer` (bool)
    gold = int(row["label"]) if "label" in row else int(bool(row["answer"]))
    return {"query": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", "choices": ["no", "yes"],
            "gold": gold}


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> dict:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"query": _hellaswag_clean(row["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in row["endings"]], "gold": int(row["label"])}


def _winogrande(row: dict) -> dict:
    # Partial scoring: the options differ in the context; the model scores the shared rest of the sentence.
    cut = row["sentence"].index("_")
    return {"query": {"1": 0, "2": 1}[str(row["answer"])],
            "choices": [row["sentence"][:cut] + row["option1"], row["sentence"][:cut] + row["option2"]],
            "gold": row["sentence"][cut + 1:].strip()}


def _lambada(row: dict) -> dict:
    words = row["text"].split(" ")
    return {"query": " ".join(words[:-1]), "target": " " + words[-1]}


@dataclass(frozen=True)
class TaskKind:
    convert: Callable[[dict], dict]
    fields: tuple[str, ...]  # what a row of the HF schema must have
    output_type: str = "multiple_choice"
    metrics: tuple[str, ...] = ("acc", "acc_norm")


TASKS: dict[str, TaskKind] = {
    "arc_easy": TaskKind(_arc, ("question", "choices", "answerKey")),
    "arc_challenge": TaskKind(_arc, ("question", "choices", "answerKey")),
    "piqa": TaskKind(_piqa, ("goal", "sol1", "sol2", "label")),
    "boolq": TaskKind(_boolq, ("question", "passage")),
    "hellaswag": TaskKind(_hellaswag, ("ctx_a", "ctx_b", "activity_label", "endings", "label")),
    "winogrande": TaskKind(_winogrande, ("sentence", "option1", "option2", "answer")),
    "openbookqa": TaskKind(_openbookqa, ("question_stem", "choices", "answerKey")),
    "lambada": TaskKind(_lambada, ("text",), output_type="loglikelihood", metrics=("acc", "perplexity")),
}
TASKS["lambada_openai"] = TASKS["lambada"]


def task_kind(name: str) -> TaskKind:
    """The schema of task ``name``: a known name, or one of them plus a suffix (``arc_easy_dev``)."""
    for known in sorted(TASKS, key=len, reverse=True):
        if name == known or name.startswith(known + "_"):
            return TASKS[known]
    raise HealerError(f"eval.tasks: unknown task {name!r}; known: {', '.join(TASKS)} "
                      "(a name may add a suffix, e.g. arc_easy_dev)")


def _piqa_labels(path: Path, rows: list[dict]) -> None:
    """The original PIQA release keeps labels in ``<split>-labels.lst`` beside ``<split>.jsonl``; merge them."""
    if not rows or "label" in rows[0]:
        return
    labels_file = path.with_name(path.stem + "-labels.lst")
    if not labels_file.is_file():
        raise HealerError(f"eval.tasks.piqa: {path} has no `label` field and no {labels_file.name} beside it")
    labels = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
    if len(labels) != len(rows):
        raise HealerError(f"eval.tasks.piqa: {labels_file} has {len(labels)} labels for {len(rows)} records")
    for row, label in zip(rows, labels):
        row["label"] = int(label)


def load_docs(name: str, path: str | Path, limit: int | None = None) -> list[dict]:
    """Read task ``name``'s rows from ``path`` and convert them to the flat shape lm-eval is given."""
    kind = task_kind(name)
    path = Path(path)
    rows = read_records(path)
    if kind is TASKS["piqa"]:
        _piqa_labels(path, rows)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise HealerError(f"eval.tasks.{name}: {path} has no records")
    docs = []
    for i, row in enumerate(rows):
        _need(row, kind.fields, name, path, i)
        try:
            docs.append(kind.convert(row))
        except (KeyError, ValueError, IndexError, TypeError) as err:
            raise HealerError(f"eval.tasks.{name}: {path} record {i + 1} does not fit the schema ({err!r})") from None
    return docs


def task_config(name: str, data_file: str | Path) -> dict:
    """The lm-eval task config for ``name`` reading the converted ``data_file``."""
    kind = task_kind(name)
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test",
        "output_type": kind.output_type,
        "doc_to_text": "query",
        "doc_to_target": "target" if kind.output_type == "loglikelihood" else "gold",
        "metric_list": [
            {"metric": m, "aggregation": "perplexity" if m == "perplexity" else "mean",
             "higher_is_better": m != "perplexity"} for m in kind.metrics
        ],
        "metadata": {"version": 1.0},
    }
    if kind.output_type == "multiple_choice":
        config["doc_to_choice"] = "choices"
    return config


def prepare_tasks(tasks: dict[str, str], out_dir: str | Path, limit: int | None = None) -> list[dict]:
    """Convert every task's local file into ``out_dir/tasks/`` and return their lm-eval configs.

    A YAML per task is written beside its data so the same run can be repeated with the
    ``lm_eval`` CLI (``--include_path out_dir/tasks``).
    """
    folder = Path(out_dir) / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    configs = []
    for name, path in tasks.items():
        docs = load_docs(name, path, limit)
        data_file = folder / f"{name}.jsonl"
        with open(data_file, "w", encoding="utf-8") as fh:
            for doc in docs:
                fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
        config = task_config(name, data_file)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        configs.append(config)
    return configs

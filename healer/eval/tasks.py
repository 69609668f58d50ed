"""Zero-shot tasks run through lm-eval's own task definitions, on local files.

For each task healer writes ``<out>/tasks/<task>.yaml``, which ``include:``\\ s the YAML that the
installed lm-eval ships for that task (its prompt, target, choices, metrics, any ``process_docs``) and
overrides only where the rows come from: ``dataset_path: json`` (or ``parquet``) with ``data_files``
naming the local file, and the split to score. No prompt is re-typed here, so healer's numbers are
lm-eval's numbers, and ``lm_eval --include_path <out>/tasks --tasks ...`` re-runs them.

The local file is handed to lm-eval as it is when lm-eval's YAML can read its rows. A few published
variants of a schema need a plain data fix first (PIQA's original release keeps its labels in a
``-labels.lst`` file; google/boolq says ``answer: true`` where super_glue says ``label: 1``); those
rows are written, fixed and nothing else, to ``<out>/tasks/<task>.jsonl`` and that file is the source.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from healer.core.errors import HealerError
from healer.core.textio import BadRecords, iter_file_records


def _boolq_label(row: dict) -> dict:
    # super_glue/boolq (what lm-eval's YAML reads) has `label` 0/1; google/boolq has `answer` true/false.
    if "label" not in row and "answer" in row:
        return {**row, "label": int(bool(row["answer"]))}
    return row


def _winogrande_answer(row: dict) -> dict:
    # lm-eval's winogrande functions look the answer up as the string "1"/"2"; some exports store an int.
    return {**row, "answer": str(row["answer"])} if not isinstance(row.get("answer"), str) else row


def _choices_problem(row: dict) -> str | None:
    # ARC / OpenBookQA: {"text": [...], "label": [...]} and an answerKey among the labels
    choices = row["choices"]
    if not (isinstance(choices, dict) and isinstance(choices.get("text"), list)
            and isinstance(choices.get("label"), list) and len(choices["text"]) == len(choices["label"]) > 0):
        return "choices is not {text: [...], label: [...]} with as many labels as texts"
    if row["answerKey"] not in choices["label"]:
        return f"answerKey {row['answerKey']!r} is not one of the labels {choices['label']}"
    return None


def _label_problem(count: int) -> Callable[[dict], str | None]:
    def problem(row: dict) -> str | None:
        label = row["label"]
        if isinstance(label, str) and label.isdigit():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < count:
            return f"label {row['label']!r} is not an answer index 0..{count - 1}"
        return None
    return problem


def _hellaswag_problem(row: dict) -> str | None:
    endings = row["endings"]
    if not (isinstance(endings, list) and endings and all(isinstance(e, str) for e in endings)):
        return "endings is not a list of strings"
    return _label_problem(len(endings))(row)


def _winogrande_problem(row: dict) -> str | None:
    if not isinstance(row["sentence"], str) or "_" not in row["sentence"]:
        return "sentence has no _ blank for the options"
    return None if str(row["answer"]) in ("1", "2") else f"answer {row['answer']!r} is not 1 or 2"


@dataclass(frozen=True)
class TaskSpec:
    yaml: str  # lm-eval's YAML for the task, relative to lm_eval/tasks
    fields: tuple[str, ...]  # what a row must have for that YAML (checked first, so a bad file is named)
    fix: Callable[[dict], dict] | None = None  # a variant schema's row -> the row lm-eval's YAML reads
    problem: Callable[[dict], str | None] | None = None  # what is wrong with a (fixed) row's values, or None


TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("arc/arc_easy.yaml", ("question", "choices", "answerKey"), problem=_choices_problem),
    "arc_challenge": TaskSpec("arc/arc_challenge.yaml", ("question", "choices", "answerKey"),
                              problem=_choices_problem),
    "piqa": TaskSpec("piqa/piqa.yaml", ("goal", "sol1", "sol2", "label"), problem=_label_problem(2)),
    "boolq": TaskSpec("super_glue/boolq/default.yaml", ("question", "passage", "label"), _boolq_label,
                      _label_problem(2)),
    "hellaswag": TaskSpec("hellaswag/hellaswag.yaml", ("ctx_a", "ctx_b", "activity_label", "endings", "label"),
                          problem=_hellaswag_problem),
    "winogrande": TaskSpec("winogrande/default.yaml", ("sentence", "option1", "option2", "answer"),
                           _winogrande_answer, _winogrande_problem),
    "openbookqa": TaskSpec("openbookqa/openbookqa.yaml", ("question_stem", "choices", "answerKey"),
                           problem=_choices_problem),
    "lambada_openai": TaskSpec("lambada/lambada_openai.yaml", ("text",)),
    "lambada_standard": TaskSpec("lambada/lambada_standard.yaml", ("text",)),
}
TASKS["lambada"] = TASKS["lambada_openai"]  # lm-eval's own `lambada` is a group of both; here it means openai

# The split name healer gives the local file in every generated YAML.
SPLIT = "eval"


def task_spec(name: str) -> TaskSpec:
    """The lm-eval task behind ``name``: a known name, or one of them plus a suffix (``arc_easy_dev``)."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):  # it names files and an lm-eval task: no paths, no spaces
        raise HealerError(f"eval.tasks: task name {name!r} may hold only letters, digits and _")
    for known in sorted(TASKS, key=len, reverse=True):
        if name == known or name.startswith(known + "_"):
            return TASKS[known]
    raise HealerError(f"eval.tasks: unknown task {name!r}; known: {', '.join(TASKS)} "
                      "(a name may add a suffix, e.g. arc_easy_dev)")


def lm_eval_yaml(spec: TaskSpec) -> Path:
    """The installed lm-eval's YAML for ``spec``; refused naming the version when that lm-eval lacks it."""
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / spec.yaml
    if not path.is_file():
        raise HealerError(f"eval.tasks: the installed lm-eval {lm_eval.__version__} has no {spec.yaml}; "
                          "install the version healer supports: pip install 'healer[eval]'")
    return path


def read_records(path: str | Path) -> list[dict]:
    """Rows of a ``.jsonl``, ``.json`` (a list, or ``{"data": [...]}``) or ``.parquet`` file (read by
    :mod:`healer.core.textio`); a broken row is refused naming the file and line: a task's score must not
    quietly be over fewer examples."""
    path = Path(path)
    if not path.is_file():
        raise HealerError(f"eval.tasks: data file {path} does not exist")
    return [record for record, _where in iter_file_records(str(path), BadRecords(strict=True, setting=None))]


def _piqa_labels(path: Path, rows: list[dict]) -> bool:
    """The original PIQA release keeps labels in ``<split>-labels.lst`` beside ``<split>.jsonl``: merge them.

    Returns whether rows were changed."""
    if not rows or "label" in rows[0]:
        return False
    labels_file = path.with_name(path.stem + "-labels.lst")
    if not labels_file.is_file():
        raise HealerError(f"eval.tasks.piqa: {path} has no `label` field and no {labels_file.name} beside it")
    labels = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
    if len(labels) != len(rows):
        raise HealerError(f"eval.tasks.piqa: {labels_file} has {len(labels)} labels for {len(rows)} records")
    for row, label in zip(rows, labels):
        row["label"] = int(label)
    return True


def data_source(name: str, path: str | Path, folder: Path) -> tuple[str, Path]:
    """(lm-eval ``dataset_path``, file) that lm-eval's YAML for ``name`` reads the rows of ``path`` from.

    Every row is checked against the fields the YAML reads first, so a wrong file is refused naming its
    record rather than failing inside lm-eval. The file itself is used when it is ``.jsonl`` or
    ``.parquet`` and its rows need no fix; otherwise the rows (fixed) go to ``folder/<name>.jsonl``.
    """
    spec = task_spec(name)
    path = Path(path)
    rows = read_records(path)
    if not rows:
        raise HealerError(f"eval.tasks.{name}: {path} has no records")
    changed = _piqa_labels(path, rows) if spec is TASKS["piqa"] else False
    for i, row in enumerate(rows):
        fixed = spec.fix(row) if spec.fix else row
        missing = [k for k in spec.fields if k not in fixed]
        if missing:
            raise HealerError(f"eval.tasks.{name}: {path} record {i + 1} lacks {', '.join(missing)}; "
                              f"lm-eval's {spec.yaml} reads {', '.join(spec.fields)}")
        wrong = spec.problem(fixed) if spec.problem else None
        if wrong:
            raise HealerError(f"eval.tasks.{name}: {path} record {i + 1}: {wrong}")
        if fixed is not row:
            rows[i], changed = fixed, True
    if not changed and path.name.endswith(".parquet"):
        return "parquet", path.resolve()
    if not changed and path.name.endswith(".jsonl"):
        return "json", path.resolve()
    # .json lists, compressed files and fixed rows: lm-eval gets one plain JSON-lines file.
    out = folder / f"{name}.jsonl"
    with open(out, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return "json", out.resolve()


def task_yaml(name: str, dataset_path: str, data_file: Path) -> dict:
    """The task YAML for ``name``: lm-eval's own definition with only its data source replaced."""
    return {
        "include": str(lm_eval_yaml(task_spec(name))),
        "task": name,
        "dataset_path": dataset_path,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {SPLIT: str(data_file)}},
        "training_split": None,
        "validation_split": None,
        "test_split": SPLIT,
        # the included YAML may name few-shot splits of the Hub's copy; zero-shot needs none
        "fewshot_split": None,
    }


def prepare_tasks(tasks: dict[str, str], out_dir: str | Path) -> Path:
    """Write a task YAML (and, where needed, a fixed data file) per task into ``out_dir/tasks``; return it.

    That folder is what ``lm_eval --include_path`` takes. Files from an earlier run that no task of this
    run names are removed, so the folder never offers lm-eval a stale task.
    """
    folder = Path(out_dir) / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    written = set()
    for name, path in tasks.items():
        dataset_path, data_file = data_source(name, path, folder)
        target = folder / f"{name}.yaml"
        target.write_text(yaml.safe_dump(task_yaml(name, dataset_path, data_file), sort_keys=False))
        written |= {target, data_file}
    for stale in [*folder.glob("*.yaml"), *folder.glob("*.jsonl")]:
        if stale.resolve() not in {w.resolve() for w in written}:
            stale.unlink()
    return folder

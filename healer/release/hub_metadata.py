"""The model card's front matter, built with ``huggingface_hub.ModelCardData`` so the Hub reads it as it means.

What the Hub shows from it: the model tree (``base_model`` + ``base_model_relation``), the dataset links
(``datasets``), the licence and language filters, and the evaluation widget (``model-index``, from
``eval.json``). :func:`card_data` takes plain values gathered by ``healer.release.stage``.
"""

from __future__ import annotations

import re

# A Hub dataset referenced through fsspec: hf://datasets/org/name[@revision]/path...
HF_DATASET = re.compile(r"^hf://datasets/([A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@[^/]+)?(?:/|$)")

# lm-eval's zero-shot tasks -> the Hub dataset (and config) their documents come from, for model-index.
TASK_DATASETS = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "piqa": ("ybisk/piqa", None),
    "boolq": ("google/boolq", None),
    "hellaswag": ("Rowan/hellaswag", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
    "openbookqa": ("allenai/openbookqa", "main"),
    "lambada": ("EleutherAI/lambada_openai", "default"),
}
TASK_METRICS = ("acc", "acc_norm", "perplexity")

# The Hub knows adapter, merge, quantized and finetune. A pruned and healed model is none exactly; its
# weights are the base's, cut and then trained further, which is what "finetune" means in the model tree
# ("quantized" would tell people it is the same network at lower precision, and it is not).
BASE_MODEL_RELATION = "finetune"


def hub_datasets(paths: list[str | None]) -> list[str]:
    """The Hub dataset ids among ``paths`` (``hf://datasets/org/name/...``), in order, each once."""
    found = [m.group(1) for p in paths if isinstance(p, str) and (m := HF_DATASET.match(p.strip()))]
    return list(dict.fromkeys(found))


def recipe_data_paths(recipe) -> list[str | None]:
    """Every data path a recipe trains or calibrates on: data.sources, data.validation, sft.data, calibration."""
    paths: list[str | None] = []
    data = getattr(recipe, "data", None)
    if data is not None:
        paths += [s.path for s in data.sources]
        paths += [s.path for s in data.validation]
    sft = getattr(recipe, "sft", None)
    if sft is not None:
        paths.append(getattr(sft, "data", None))
    prune = getattr(recipe, "prune", None)
    if prune is not None:
        paths.append(prune.calibration.path)
    return paths


def eval_results(result: dict | None) -> list:
    """``eval.json`` as ``huggingface_hub.EvalResult`` entries: perplexity per file and context, task metrics."""
    from huggingface_hub import EvalResult

    if not result:
        return []
    out = []
    limit = (result.get("settings") or {}).get("limit")
    for file, per_ctx in (result.get("perplexity") or {}).items():
        for ctx, entry in per_ctx.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("ppl"), (int, float)):
                continue
            name = file.rsplit("/", 1)[-1]
            dataset = hub_datasets([file])
            out.append(EvalResult(task_type="text-generation", task_name="Perplexity",
                                  dataset_type=dataset[0] if dataset else name, dataset_name=name,
                                  metric_type="perplexity", metric_name=f"perplexity @ {ctx} tokens",
                                  metric_value=float(entry["ppl"]), metric_config=f"context {ctx}"))
    for task, entry in (result.get("tasks") or {}).items():
        base = next((t for t in sorted(TASK_DATASETS, key=len, reverse=True) if task.startswith(t)), None)
        dataset_type, config = TASK_DATASETS.get(base, (task, None))
        for metric in TASK_METRICS:
            value = (entry or {}).get(metric)
            if isinstance(value, (int, float)):
                out.append(EvalResult(task_type="text-generation", task_name=f"{task} (zero-shot)",
                                      dataset_type=dataset_type, dataset_name=task, dataset_config=config,
                                      metric_type=metric, metric_value=float(value),
                                      metric_config=f"first {limit} examples" if limit else None))
    return out


def card_data(*, name: str, base_model: str | None, license: str | None, language: list[str] | None,
              datasets: list[str], tags: list[str], eval_result: dict | None):
    """The ``ModelCardData`` of a release. ``base_model`` must be a Hub id (a local path is left out);
    ``eval_result`` is ``eval.json`` as read, or None."""
    from huggingface_hub import ModelCardData

    results = eval_results(eval_result)
    return ModelCardData(
        base_model=base_model, base_model_relation=BASE_MODEL_RELATION if base_model else None,
        library_name="transformers", pipeline_tag="text-generation", license=license,
        language=language or None, datasets=datasets or None, tags=tags,
        model_name=name if results else None, eval_results=results or None)

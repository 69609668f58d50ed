"""``healer release``: package the final checkpoint as a directory ready to publish on the Hugging Face Hub.

The release directory holds the weights (safetensors), config, generation config,
tokenizer, ``recipe.yaml``, the learning-curve PNGs under ``images/``, a model card
``README.md`` and, written last, ``manifest.json``: the stage-completion manifest,
whose ``outputs.files`` maps every other file to its SHA-256 and size (package
versions and the git commit sit beside it, as in every stage manifest).

It reads, when present, ``<prune>/prune_report.json``, the ``cpt``/``sft``
TensorBoard logs and manifests, and ``<eval>/eval.json``; a missing one is said so
in the card. The directory is built in a fresh ``.<output>.partial-*`` beside it and moved into place
at the end, so an interrupted release never leaves a half-written one behind.
Nothing secret is published: ``recipe.yaml`` and the card go through :mod:`healer.core.redact`.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from healer.core.errors import HealerError
from healer.core.hashing import file_hashes
from healer.core.manifest import read_json_if_present, read_json_report, read_stage_manifest, write_stage_manifest
from healer.core.swap import PARTIAL_MARK, new_partial_dir, swap_in
from healer.release.config import ReleaseConfig
from healer.stages import MODEL_STAGES, TRAINING_STAGES

# model.source shortcuts whose hub id is known (the GGUF file does not carry it).
KNOWN_BASES = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _front_matter(readme: Path) -> dict:
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    import yaml

    from healer.core.yamlio import YAMLRefused, load_yaml

    try:
        meta = load_yaml(text.split("---", 2)[1])
    except (yaml.YAMLError, YAMLRefused):  # a base model's card we cannot read says nothing, as none would
        return {}
    return meta if isinstance(meta, dict) else {}


def base_identity(source: str, gguf_file: str | None) -> dict:
    """What can be known offline about the base model: ``hub_id``, ``license``, ``language`` and, when its
    weights come from a GGUF file, ``gguf`` (file name and quantisation type: the dequantised weights carry
    that quantisation's error).

    The licence and language come from the base's own metadata: a GGUF's ``general.license`` /
    ``general.languages``, or the README front matter of a local model directory.
    """
    from healer.model.modeling import resolve_source

    facts: dict = {"hub_id": KNOWN_BASES.get(source), "license": None, "language": None, "gguf": None}
    try:
        location = resolve_source(source, gguf_file)
    except HealerError:
        return facts
    if location.gguf_file:
        facts["gguf"] = {"file": location.gguf_file, "type": None}
        try:
            import gguf

            fields = gguf.GGUFReader(str(Path(location.path) / location.gguf_file)).fields

            def field(key):
                return fields[key].contents() if key in fields else None

            facts["license"], facts["language"] = field("general.license"), field("general.languages")
            file_type = field("general.file_type")
            if isinstance(file_type, int):
                facts["gguf"]["type"] = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except Exception:  # an unreadable GGUF header only costs these lines of the card
            pass
    elif Path(location.path).is_dir():
        meta = _front_matter(Path(location.path) / "README.md")
        facts["license"], facts["language"] = meta.get("license"), meta.get("language")
        base = meta.get("base_model")
        facts["hub_id"] = facts["hub_id"] or (base if isinstance(base, str) else None)
    elif HUB_ID.match(source):
        facts["hub_id"] = source
    if not isinstance(facts["license"], str):
        facts["license"] = None
    language = facts["language"]
    language = [language] if isinstance(language, str) else language
    facts["language"] = [x for x in language if isinstance(x, str)] if isinstance(language, list) else None
    return facts


def training_stages(recipe) -> list[dict]:
    """What each training stage's manifest says it did; a stage in the recipe without a manifest is 'missing'."""
    out = []
    for stage in TRAINING_STAGES:
        manifest = read_stage_manifest(recipe.stage_dir(stage))
        if manifest is None:
            if getattr(recipe, stage) is not None:
                out.append({"stage": stage, "missing": True})
            continue
        o = manifest.get("outputs", {})
        if stage == "cpt":
            how = "continued pretraining" + (" with knowledge distillation from the dense model" if o.get("kd") else "")
            if o.get("lora"):  # cpt.lora: only an adapter trained on the corpus text
                how += f" of a LoRA adapter (rank {o['lora'].get('rank')}), merged into the weights"
        elif stage == "replace":
            how = ("training the block that replaced the span alone to reproduce the dense span's output "
                   "(LLM-Streamline)")
        else:
            rank = (o.get("lora") or {}).get("rank")
            how = "LoRA instruction tuning" + (f" (rank {rank})" if rank else "") + ", merged into the weights"
        out.append({"stage": stage, "how": how, "tokens_trained": o.get("tokens_trained"), "steps": o.get("steps"),
                    "final_loss": o.get("final_loss"), "finished_at": manifest.get("finished_at")})
    return out


def round_reports(recipe) -> dict:
    """``prune.rounds``: every round's prune report, combined into one against the original model
    (:func:`healer.prune.report.combined_report`); a round without its report is an error naming it."""
    from healer.prune.report import combined_report

    reports = []
    round_prune_dirs = [directory for label, directory in recipe.step_dirs("prune") if label.endswith("/prune")]
    for k, directory in enumerate(round_prune_dirs, start=1):
        path = directory / "prune_report.json"
        report = read_json_report(path)
        if report is None:
            raise HealerError(f"release: {path} is missing; the card describes every round of prune.rounds. Run "
                              f"`healer run RECIPE --only prune` to rebuild round {k}")
        reports.append(report)
    return combined_report(reports)


def released_sparsity(folder: Path, prune_report: dict | None) -> dict | None:
    """Zeros in the written release's block projections, checked against what a sparse prune left.

    None when the model was not sparse-pruned. ``kept`` is True when the release has at least the pruned zero
    count and the N:M pattern still holds; ``lost`` counts pruned zeros that healing filled in.
    """
    if (prune_report or {}).get("method") != "sparse":
        return None
    from healer.prune.sparse import verify_sparsity

    pattern, ratio = prune_report.get("pattern"), prune_report.get("ratio")
    found = verify_sparsity(folder, pattern, ratio, layers=prune_report.get("layers_pruned"))["sparsity"]
    pruned = (prune_report.get("sparsity") or {}).get("zeros")
    lost = max(0, pruned - found["zeros"]) if isinstance(pruned, int) else None
    return {"pattern": pattern, "ratio": ratio, "overall": found["overall"], "zeros": found["zeros"],
            "weights": found["weights"], "by_type": found["by_type"], "pattern_holds": found["pattern_holds"],
            "pruned_zeros": pruned, "lost": lost, "kept": lost == 0 and bool(found["pattern_holds"])}


# Ordinary prose for measuring what the dtype cast changes: random tokens give near-flat distributions whose
# top-1 flips with any rounding, which says little about text.
PROBE_TEXT = (
    "The river rises in the hills to the north and flows south through farmland for about two hundred "
    "kilometres before it reaches the sea. Most of the towns along its banks grew up around mills, and many "
    "of the old stone bridges still carry traffic today. In spring the water is high and fast; by late "
    "summer it is slow enough that children swim in it. The museum in the harbour town keeps a record of "
    "every flood since the seventeenth century, and its small library is open to visitors on weekdays."
)


def probe_tokens(tokenizer, vocab_size: int):
    """``PROBE_TEXT`` as a [1, n] batch of ``tokenizer``'s ids; random tokens when it cannot be encoded."""
    import torch

    from healer.model.modeling import probe_batch

    try:
        ids = tokenizer(PROBE_TEXT).input_ids if tokenizer is not None else []
    except Exception:  # an odd tokenizer only costs the realism of the probe
        ids = []
    if len(ids) < 16 or max(ids) >= vocab_size:
        return probe_batch(vocab_size)
    return torch.tensor([ids[:128]])


def refuse_non_finite_weights(model, source: str) -> None:
    """A model holding NaN or inf weights is broken, whatever dtype it is released in: say which tensor."""
    import torch

    bad = {name: int((~torch.isfinite(p)).sum()) for name, p in model.named_parameters()
           if p.is_floating_point() and not torch.isfinite(p).all()}
    if bad:
        first = next(iter(bad))
        raise HealerError(f"release: {source} holds {sum(bad.values()):,} NaN/inf weights in {len(bad)} tensors "
                          f"(first: {first}); it is not releasable in any dtype. Heal it again from a good "
                          "checkpoint (training stops at the first non-finite loss) or release another model")


def cast_for_release(model, dtype: str, probe=None) -> dict:
    """Cast ``model`` in place to the release ``dtype`` and measure what that costs on ``probe`` (token ids;
    default random tokens).

    Returns ``dtype``, ``cast_from`` and, when the dtype changed, the largest |logit difference| and the
    share of probe positions whose top-1 token is unchanged. A cast that overflows (float16) is refused.
    """
    import torch

    from healer.model.modeling import probe_batch, torch_dtype

    target, loaded = torch_dtype(dtype), next(model.parameters()).dtype
    facts = {"dtype": dtype, "cast_from": str(loaded).removeprefix("torch."), "max_abs_logit_diff": 0.0,
             "top1_agreement": 1.0, "probe_positions": 0}
    if target == loaded:
        return facts
    probe = probe if probe is not None else probe_batch(model.config.vocab_size)
    facts["probe_positions"] = int(probe.numel())
    model.eval()
    with torch.no_grad():
        before = model(probe).logits.float()
        # Parameters only: model.to() would also round the float32 buffers (rotary inv_freq) that
        # from_pretrained keeps in float32, and the in-memory model would no longer be what a user loads.
        for param in model.parameters():
            param.data = param.data.to(target)
        after = model(probe).logits.float()
    if not torch.isfinite(after).all():
        raise HealerError(f"release.dtype {dtype}: the model's logits overflow (inf/nan) in {dtype}; use "
                          "bfloat16 (same range as float32) or float32")
    facts["max_abs_logit_diff"] = float((after - before).abs().max())
    facts["top1_agreement"] = float((after.argmax(-1) == before.argmax(-1)).float().mean())
    return facts


def publish_stage_runs(recipe, folder: Path, stages: tuple[str, ...] = TRAINING_STAGES) -> dict[str, list[str]]:
    """Each training stage's (of ``stages``) TensorBoard scalars under ``folder/runs/<stage>/`` -> the files,
    relative."""
    from healer.release.runs import publish_runs

    runs = {}
    for stage in (s for s in TRAINING_STAGES if s in stages):
        files = publish_runs(recipe.stage_dir(stage) / "tensorboard", folder / "runs" / stage)
        if files:
            runs[stage] = [f.relative_to(folder).as_posix() for f in files]
    return runs


def hub_metadata(recipe, base: dict, info: dict):
    """The card's ``ModelCardData``: base model and relation, Hub datasets the recipe read, eval results."""
    from healer.release.hub_metadata import card_data, hub_datasets, recipe_data_paths

    return card_data(name=info["name"], base_model=info["base_model"], license=info["license"],
                     language=(recipe.release.language if recipe.release else None) or base["language"],
                     datasets=hub_datasets(recipe_data_paths(recipe)), tags=info["tags"],
                     eval_result=info["eval"])


def _check_output(out: Path) -> None:
    """Refuse to replace a directory that is not an earlier release: it may hold someone's work."""
    if out.is_file() or (out.is_dir() and any(out.iterdir())
                         and (read_stage_manifest(out) or {}).get("stage") != "release"):
        raise HealerError(f"release.output: {out} exists and is not a healer release; pick another "
                          "release.output or remove it")


def _replace_dir(partial: Path, out: Path) -> None:
    """Swap the finished ``partial`` in for ``out`` (the old release or none after a crash, never a mix), once
    ``out`` is still nothing but an earlier release."""
    _check_output(out)
    swap_in(partial, out)


def _same_model(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def made_by(recipe, source: str) -> tuple[str, ...] | None:
    """The recipe's model stages that made ``source``: every stage of the chain up to the one whose output it
    is (all of them when ``release.input`` is left to its default); () for the dense model itself; None for a
    model this pipeline did not make (its prune report, training and curves describe other weights)."""
    present = tuple(s for s in MODEL_STAGES if getattr(recipe, s, None) is not None)
    if recipe.release is None or recipe.release.input is None:
        return present
    if _same_model(source, recipe.model.source):
        return ()
    for index, stage in enumerate(present):
        if _same_model(source, str(recipe.model_dir(stage))):
            return present[:index + 1]
    return None


def measured_on_release(eval_result: dict | None, source: str) -> dict | None:
    """``eval.json`` when it measured the weights being released; None (said on the terminal) when it measured
    another model: the card and model-index must not publish another checkpoint's numbers."""
    if eval_result is None or _same_model(eval_result.get("source"), source):
        return eval_result
    print(f"healer release: eval.json measured {eval_result.get('source')}, not the released {source}; its "
          f"numbers are left out of the card and model-index (run `healer eval` with eval.input={source})",
          file=sys.stderr, flush=True)
    return None


def release_ggufs(folder: Path, name: str, kinds: list[str]) -> list[dict]:
    """``release.gguf``: write each GGUF type under ``folder/gguf`` and prove it against the weights in ``folder``.

    Raises (and so fails the release before any card is written) when a file fails its parity check.
    """
    if not kinds:
        return []
    from healer.release.gguf_export import export_and_check

    return export_and_check(folder, folder / "gguf", name, kinds)


def build_release(recipe, out: Path, inputs: dict | None = None) -> dict:
    """Write the release directory ``out``, its manifest recording ``inputs``; returns the manifest outputs."""
    from healer.core.plots import plot_curves, read_scalars
    from healer.core.redact import public_yaml, redact_text, secret_values
    from healer.model.modeling import (
        count_parameters,
        load_model,
        load_tokenizer,
        resolve_source,
        save_and_verify,
        torch_dtype,
    )
    from healer.release.model_card import render

    cfg = recipe.release or ReleaseConfig()
    source = recipe.stage_input("release")
    gguf = recipe.model.gguf_file if source == recipe.model.source else None
    _check_output(out)
    partial = new_partial_dir(out)

    print(f"healer release: packaging {source}")
    location = resolve_source(source, gguf, key="model.source" if gguf else "release.input")
    model = load_model(location, torch_dtype(recipe.model.dtype))
    refuse_non_finite_weights(model, source)
    tokenizer = load_tokenizer(location)
    precision = cast_for_release(model, cfg.dtype, probe_tokens(tokenizer, model.config.vocab_size))
    save_and_verify(model, tokenizer, partial)  # safetensors + config + tokenizer, proven to reload as saved
    if not (partial / "generation_config.json").is_file():
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(model.config).save_pretrained(partial)
    params_after = count_parameters(model)
    del model
    made = made_by(recipe, source)
    stages = made or ()
    if "prune" not in stages:  # the dense model, or one this pipeline did not make: no pruning of ours to report
        prune_report = None
        if made is None:
            print(f"healer release: {source} (release.input) is not an output of this recipe's stages; the card "
                  "describes no pruning or training", file=sys.stderr)
    elif recipe.prune is not None and recipe.prune.rounds:
        prune_report = round_reports(recipe)  # the last round's alone counts from round K's input, not the base
    else:  # the replace stage's copy adds how the replacement block was trained (LLM-Streamline)
        prune_report = ((read_json_report(recipe.stage_dir("replace") / "prune_report.json")
                         if recipe.replace else None)
                        or read_json_report(recipe.stage_dir("prune") / "prune_report.json"))
    # Measured on the files being published: they must hold the zeros the card claims.
    sparsity = released_sparsity(partial, prune_report)

    for path in partial.iterdir():  # transformers writes weights owner-only; a release is for everyone to read
        path.chmod(0o644)
    # A release is published: launch.env and anything that looks like a token are <redacted> in it.
    tree = recipe.model_dump(mode="json", exclude_none=True)
    secrets = secret_values(tree)
    recipe_yaml = public_yaml(tree)
    (partial / "recipe.yaml").write_text(recipe_yaml)
    gguf_files = release_ggufs(partial, cfg.model_name or recipe.name, cfg.gguf)

    eval_result = measured_on_release(read_json_report(recipe.stage_dir("eval") / "eval.json"), source)
    dense_eval = (eval_result or {}).get("dense") or {}
    params_before = (prune_report or {}).get("params_before") or dense_eval.get("parameters")
    curves, curves_missing = [], []
    for stage in (s for s in TRAINING_STAGES if s in stages):
        scalars = read_scalars(recipe.stage_dir(stage) / "tensorboard")
        png = plot_curves(scalars, partial / "images" / f"{stage}_curves.png", f"{stage}: {recipe.name}")
        if png is not None:
            curves.append((stage, f"images/{png.name}"))
        elif getattr(recipe, stage) is not None:
            curves_missing.append(stage)

    runs = publish_stage_runs(recipe, partial, stages)
    base = base_identity(recipe.model.source, recipe.model.gguf_file)
    base_model = cfg.base_model or base["hub_id"]
    license = cfg.license or base["license"]
    method = (prune_report or {}).get("method")
    tags = list(dict.fromkeys([*cfg.tags, *([f"{method}-pruning"] if method in ("depth", "width", "sparse")
                                             else [])]))
    info = {
        "name": cfg.model_name or recipe.name, "repo_id": cfg.repo_id, "base_model": base_model,
        "base_source": recipe.model.source, "license": license, "tags": tags, "source": source,
        "params_before": params_before, "params_after": params_after, "prune_report": prune_report,
        "sparsity": sparsity,
        "training": [t for t in training_stages(recipe) if t["stage"] in stages],
        "curves": curves, "curves_missing": curves_missing,
        "eval": eval_result, "recipe_yaml": recipe_yaml,
        # written by `healer run`: the whole pipeline's rows, so only for its final model
        "summary": (read_json_if_present(Path(recipe.run_dir) / "summary.json")
                    if made == tuple(s for s in MODEL_STAGES if getattr(recipe, s, None) is not None) else None),
        "precision": precision, "base_gguf": base["gguf"], "runs": runs, "gguf": gguf_files,
    }
    info["card_data"] = hub_metadata(recipe, base, info)
    (partial / "README.md").write_text(redact_text(render(info), secrets), encoding="utf-8")

    outputs = {
        "source": source, "base_model": base_model, "license": license,
        "parameters_before": params_before, "parameters_after": params_after,
        "sparsity": {k: v for k, v in sparsity.items() if k != "by_type"} if sparsity else None,
        "tokens_trained": {s["stage"]: s.get("tokens_trained") for s in info["training"]},
        "curves": [png for _, png in curves],
        "inputs_found": {"prune_report": prune_report is not None, "eval": eval_result is not None,
                         **{f"{s}_tensorboard": s not in curves_missing and any(c[0] == s for c in curves)
                            for s in TRAINING_STAGES}},
        "precision": precision, "base_gguf": base["gguf"], "runs": runs,
        "push": {"repo_id": cfg.push, "private": cfg.private, "revision": cfg.revision} if cfg.push else None,
        "gguf": gguf_files,
        "files": {name: digest for name, digest in file_hashes(partial).items() if name != PARTIAL_MARK},
    }
    write_stage_manifest(partial, "release", inputs, outputs)
    _replace_dir(partial, out)
    return outputs


@dataclass
class Options:
    """``healer release`` has no flags of its own: everything it does is a recipe key (``--release.KEY``)."""


def run_release_stage(recipe, opts: Options, inputs: dict | None = None, upload=None) -> int:
    """The ``healer release`` verb: package the final checkpoint and every report into the release dir, then
    upload it when ``release.push`` names a Hub repo. ``inputs``: what its manifest records it was built
    from; ``upload`` stands in for the Hub upload (tests)."""
    out = recipe.stage_dir("release")
    outputs = build_release(recipe, out, inputs)
    print(f"healer release: {len(outputs['files'])} files, {outputs['parameters_after']:,} parameters"
          + (f" (base {outputs['parameters_before']:,})" if outputs["parameters_before"] else "")
          + f", {outputs['precision']['dtype']}\nwrote {out} (model card: {out / 'README.md'})")
    for record in outputs["gguf"]:
        checks = ", ".join(f"{c['loader']} top-1 {c['top1_agreement']:.1%}, max |dlogit| {c['max_abs_dlogit']:.3g}"
                           for c in record["parity"])
        print(f"  gguf/{record['file']}: {record['bytes'] / 1e6:,.1f} MB, parity passed ({checks})")
    if recipe.release is not None and recipe.release.push:
        push(recipe.release, out, upload)
    return 0


def push(cfg: ReleaseConfig, out: Path, upload=None) -> str:
    """Upload the finished release ``out`` to ``cfg.push``. On failure the release stops counting as finished,
    so the next ``healer run`` builds and pushes it again instead of skipping it."""
    from healer.core.manifest import supersede_stage_manifest
    from healer.release.hub_push import push_release

    try:
        url = push_release(out, cfg.push, private=cfg.private, revision=cfg.revision,
                           commit_message=cfg.commit_message, upload=upload)
    except HealerError as err:
        supersede_stage_manifest(out)
        raise HealerError(f"{err}; {out} is kept but no longer marked finished, so `healer run` or `healer "
                          "release` builds and pushes it again") from None
    print(f"healer release: pushed to {url}")
    return url

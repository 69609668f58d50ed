"""The model card (``README.md``) of a release: Hugging Face front matter, then what was done, measured and how.

:func:`render` takes plain data (gathered by ``healer.release.stage``) and returns Markdown.
Every section says so when its input is missing instead of leaving a hole.
"""

from __future__ import annotations

import json


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def front_matter(data) -> str:
    """The YAML header of the card from a ``huggingface_hub.ModelCardData`` (see :mod:`healer.release.hub_metadata`)."""
    return "---\n" + data.to_yaml() + "\n---\n"


def precision_section(precision: dict | None, base_gguf: dict | None) -> str:
    """The dtype of the published weights and what casting to it cost; the GGUF the base came from, if any."""
    lines = []
    if precision:
        line = f"The weights are stored in **{precision['dtype']}**"
        if precision.get("cast_from") and precision["cast_from"] != precision["dtype"]:
            line += (f", cast from {precision['cast_from']}: on a fixed probe of "
                     f"{precision.get('probe_positions') or 'some'} token positions the top-1 next token is "
                     f"unchanged at {precision['top1_agreement']:.1%} of them, the largest logit change is "
                     f"{_num(precision['max_abs_logit_diff'])}")
        lines.append(line + ".")
    if base_gguf:
        kind = f" ({base_gguf['type']})" if base_gguf.get("type") else ""
        lines.append(f"**The base weights were dequantised from the GGUF file `{base_gguf['file']}`{kind}**, not "
                     "read from the original checkpoint: that quantisation's rounding is in every weight of this "
                     "model, and the dense baseline in the tables below is the dequantised model too.")
    return "\n\n".join(lines)


def runs_section(runs: dict[str, list[str]] | None) -> str:
    if not runs:
        return ""
    where = ", ".join(f"`runs/{stage}/`" for stage in runs)
    return (f"The TensorBoard scalars of every training stage are in {where} (the Hub shows them in the "
            "\"Training metrics\" tab; `tensorboard --logdir runs` locally).")


def pruning_summary(report: dict) -> str:
    """One sentence: what was removed."""
    if "removed" in report:
        removed = report["removed"]
        which = ("block " if len(removed) == 1 else "blocks ") + ", ".join(map(str, removed))
        return f"removed {len(removed)} of {len(removed) + len(report.get('kept', []))} decoder blocks ({which})"
    if "intermediate_size" in report:
        before, after = report["intermediate_size"]
        return f"shrank every GLU MLP from {before} to {after} neurons (gate, up and down projections together)"
    if "attention_heads" in report:
        before, after = report["attention_heads"]
        return f"removed attention heads: {before} -> {after} query heads per block"
    if "experts" in report:
        before, after = report["experts"]
        return f"removed whole experts: {before} -> {after} experts in every mixture-of-experts block"
    if "expert_intermediate_size" in report:
        before, after = report["expert_intermediate_size"]
        return f"shrank every expert's MLP from {before} to {after} neurons (each expert keeps its own)"
    if report.get("method") == "sparse":
        overall = (report.get("sparsity") or {}).get("overall")
        how = "unstructured" if report.get("pattern") == "unstructured" else f"{report.get('pattern')} semi-structured"
        share = f"{overall:.1%} of" if isinstance(overall, float) else "part of"
        return (f"set {share} the weights of the block projections to zero ({how}, by "
                f"{report.get('criterion', '?')}; shapes unchanged)")
    return "pruned (the report does not say which structures)"


def sparsity_section(report: dict, released: dict | None) -> str:
    """Zeros per projection type after pruning and in the released files, and whether healing kept them."""
    pruned = report.get("sparsity") or {}
    by_type = pruned.get("by_type") or {}
    now = (released or {}).get("by_type") or {}
    rows = [[kind, f"{value:.2%}", f"{now[kind]:.2%}" if kind in now else "-"] for kind, value in by_type.items()]
    rows.append(["**all pruned projections**", f"{pruned.get('overall', 0):.2%}",
                 f"{released['overall']:.2%}" if released else "-"])
    lines = [_table(["projection", "zeros after pruning", "zeros in this release"], rows), ""]
    pattern = report.get("pattern")
    if released is None:
        lines.append("*The released weights were not checked for sparsity.*")
    elif released.get("kept"):
        lines.append(f"The released weights hold all {_num(released['pruned_zeros'])} zeros pruning wrote "
                     f"({_num(released['zeros'])} now)" + (f"; every group of {pattern} holds the pattern, as GPU "
                                                          "2:4 sparse kernels need." if pattern != "unstructured"
                                                          else "."))
    else:
        broken = "" if released.get("pattern_holds") else f" and the {pattern} pattern no longer holds"
        lines.append(f"**Warning: healing did not keep the sparsity**: {_num(released.get('lost'))} of the "
                     f"{_num(released.get('pruned_zeros'))} pruned weights are no longer zero{broken}.")
    return "\n".join(lines)


def replacement_summary(rep: dict) -> str:
    """LLM-Streamline's replacement block in one sentence: where it came from and how it was trained."""
    text = (f"; in their place one standard decoder block, initialised from block {rep.get('init_from_block')} "
            f"({rep.get('init')})")
    if rep.get("span_cosine") is not None:
        text += f"; the span's input/output cosine on calibration text was {_num(rep['span_cosine'])}"
    trained = rep.get("training")
    if not trained:
        return text + "; the block was not trained."
    before, after = trained.get("before_training") or {}, trained.get("after_training") or {}
    return (text + f". It was trained alone for {_num(trained.get('tokens_trained'))} tokens to map the span's input "
            f"hidden states to its output (MSE): held-out cosine to the dense span's output "
            f"{_num(before.get('cosine'))} -> {_num(after.get('cosine'))} (a plain cut: "
            f"{_num(before.get('cosine_plain_cut'))}), MSE {_num(before.get('mse'))} -> {_num(after.get('mse'))}.")


def pruning_section(report: dict | None, released_sparsity: dict | None = None) -> str:
    if report is None:
        return "No pruning report was found (`prune_report.json`); this checkpoint may not have been pruned by healer."
    rep = report.get("replacement")
    if rep:
        lines = [f"**{pruning_summary(report)}**" + replacement_summary(rep), ""]
    else:
        update = ", the remaining weights updated to compensate" if report.get("criterion") == "sparsegpt" \
            else ", no weight update"
        how = f"in {len(report['rounds'])} rounds (below)" if report.get("rounds") else "one-shot"
        lines = [f"**{pruning_summary(report)}**, {how}{update}.", ""]
    rows = [["method", str(report.get("method", "-"))], ["criterion", str(report.get("criterion", "-"))],
            ["target", str(report.get("target", "-"))]]
    if report.get("pattern") is not None:
        rows.append(["pattern", str(report["pattern"])])
    if report.get("layers_pruned"):
        rows.append(["projections pruned", ", ".join(report["layers_pruned"])])
    if report.get("ratio") is not None:
        rows.append(["ratio", str(report["ratio"])])
    if "kept" in report:
        rows.append(["blocks kept", ", ".join(map(str, report["kept"]))])
    protected = report.get("protected")
    if isinstance(protected, dict) and not protected.get("keep_first") and not protected.get("keep_last"):
        rows.append(["protected", "none"])
    elif isinstance(protected, dict):
        rows.append(["protected", f"first {protected.get('keep_first', 0)}, last {protected.get('keep_last', 0)} "
                     "blocks never removed"])
    elif protected:
        rows.append(["protected", str(protected)])
    calib = report.get("calibration")
    if isinstance(calib, dict):
        rows.append(["calibration", f"{calib.get('path') or 'built-in text'}, {_num(calib.get('tokens'))} tokens"])
    if report.get("calibration_ppl_before") is not None:
        rows.append(["calibration perplexity", f"{_num(report['calibration_ppl_before'])} before -> "
                     f"{_num(report.get('calibration_ppl_after'))} right after pruning"])
    for key, (old, new) in (report.get("config_changes") or {}).items():
        rows.append([f"config `{key}`", f"{old} -> {new}"])
    for name, width in (report.get("widths") or {}).items():
        divides = [m for m, ok in (width.get("divisible_by") or {}).items() if ok]
        rows.append([f"`{name}` divisible by", ", ".join(divides) or "none of 32, 64, 128, 256"])
    if report.get("seed") is not None:
        rows.append(["seed", str(report["seed"])])
    lines.append(_table(["", ""], rows))
    if report.get("rounds"):
        lines += ["", rounds_table(report["rounds"])]
    for warning in report.get("warnings") or []:
        lines += ["", f"**Deployment warning:** {warning}."]
    if report.get("method") == "sparse":
        lines += ["", sparsity_section(report, released_sparsity)]
    kept_experts = report.get("kept_experts_per_block")
    if kept_experts:
        rows = [[str(i), ", ".join(map(str, k))] for i, k in enumerate(kept_experts)]
        lines += ["", "Experts kept (indices among the experts of the model this prune started from):", "",
                  _table(["block", "experts kept"], rows)]
    scores = report.get("scores")
    if isinstance(scores, dict) and scores:
        lines += ["", f"Block importance ({report.get('score_meaning', 'as computed by the criterion')}):", "",
                  _table(["block", "score"], [[k, _num(v)] for k, v in scores.items()])]
    return "\n".join(lines)


def rounds_table(rounds: list[dict]) -> str:
    """``prune.rounds``: what each round removed (depth: in its input's and in the original numbering) and
    the parameters and calibration perplexity of its input and output."""
    depth = any("removed" in r for r in rounds)
    header = ["round", *(["blocks removed (of its input)", "same blocks, original numbering"] if depth else []),
              "parameters", "calibration perplexity"]
    rows = []
    for r in rounds:
        row = [str(r["round"])]
        if depth:
            row += [", ".join(map(str, r.get("removed") or [])), ", ".join(map(str, r.get("removed_original") or []))]
        row += [f"{_num(r.get('params_before'))} -> {_num(r.get('params_after'))}",
                f"{_num(r.get('calibration_ppl_before'))} -> {_num(r.get('calibration_ppl_after'))}"]
        rows.append(row)
    return (f"Pruned in {len(rounds)} rounds; each round scored the model the round before left (healed, where it "
            "healed), so its perplexities are of that model:\n\n" + _table(header, rows))


def training_section(stages: list[dict]) -> str:
    if not stages:
        return "No training stage left a manifest; the pruned weights are released as they are."
    rows = []
    for s in stages:
        if s.get("missing"):
            rows.append([s["stage"], "not run (no manifest)", "-", "-", "-"])
            continue
        rows.append([s["stage"], s.get("how", "-"), _num(s.get("tokens_trained")), _num(s.get("steps")),
                     _num(s.get("final_loss"))])
    return _table(["stage", "how", "tokens trained", "optimizer steps", "final train loss"], rows)


def curves_section(curves: list[tuple[str, str]], missing: list[str]) -> str:
    lines = [f"![{stage} learning curves]({png})" for stage, png in curves]
    lines += [f"*{stage}: no TensorBoard log was found, so there is no curve.*" for stage in missing]
    return "\n\n".join(lines) if lines else "No TensorBoard logs were found."


def released_command(argv: list[str], model_ref: str) -> str:
    """eval.json's ``lm_eval`` argv with ``pretrained`` set to the released model (``model_ref``: its hub id or
    the path a reader puts it at) instead of the directory the run evaluated; the release is plain
    safetensors, so a GGUF file or revision of the evaluated source no longer applies."""
    import shlex

    argv = list(argv)
    if "--model_args" in argv:
        i = argv.index("--model_args") + 1
        args = json.loads(argv[i])
        args = {"pretrained": model_ref, **{k: v for k, v in args.items()
                                            if k not in ("pretrained", "gguf_file", "revision")}}
        argv[i] = json.dumps(args)
    return shlex.join(argv)


def eval_section(result: dict | None, released_source: str | None = None, model_ref: str | None = None) -> str:
    if result is None:
        return "No `eval.json` was found: run `healer eval` before `healer release` to get this table."
    dense = result.get("dense") or {}
    has_dense = bool(dense)
    header = ["metric", "dense", "this model", "change"] if has_dense else ["metric", "this model"]
    rows = []

    def row(name: str, value, dense_value, lower_is_better: bool = False, percent: bool = False):
        if percent:  # a share, shown as one, and its change in percentage points
            shown = [f"{v:.1%}" if isinstance(v, float) else _num(v) for v in (value, dense_value)]
            if not has_dense:
                rows.append([name, shown[0]])
                return
            change = f"{(value - dense_value) * 100:+.1f} pp" if isinstance(value, float) and isinstance(
                dense_value, float) else "-"
            rows.append([name, shown[1], shown[0], change])
            return
        if not has_dense:
            rows.append([name, _num(value)])
            return
        change = "-"
        if isinstance(value, (int, float)) and isinstance(dense_value, (int, float)) and dense_value:
            change = f"{(value - dense_value) / dense_value:+.1%}" if lower_is_better or name.endswith("parameters") \
                else f"{value - dense_value:+.3f}"
        rows.append([name, _num(dense_value), _num(value), change])

    row("parameters", result.get("parameters"), dense.get("parameters"))
    sparse, dense_sparse = result.get("sparsity") or {}, dense.get("sparsity") or {}
    if sparse.get("zeros"):
        row("nonzero parameters", sparse.get("nonzero_parameters"), dense_sparse.get("nonzero_parameters"))
        row("sparsity of the block projections", sparse.get("overall"), dense_sparse.get("overall"), percent=True)
        for kind, value in (sparse.get("by_type") or {}).items():
            row(f"sparsity `{kind}`", value, (dense_sparse.get("by_type") or {}).get(kind), percent=True)
    for file, per_ctx in (result.get("perplexity") or {}).items():
        for ctx, entry in per_ctx.items():
            if "skipped" in entry:
                continue
            other = (dense.get("perplexity") or {}).get(file, {}).get(ctx, {})
            row(f"perplexity `{file}` @ {ctx} tokens", entry.get("ppl"), other.get("ppl"), lower_is_better=True)
    for task, entry in (result.get("tasks") or {}).items():
        other = (dense.get("tasks") or {}).get(task, {})
        for metric in ("acc", "acc_norm", "perplexity"):
            if metric in entry:
                row(f"{task} {metric}", entry.get(metric), other.get(metric), lower_is_better=metric == "perplexity")
    lines = [_table(header, rows), ""]
    bos = result.get("bos") or {}
    limit = (result.get("settings") or {}).get("limit")
    bos_how = "prepended to" if bos.get("prepended") else "not added to"
    how = f"Perplexity: non-overlapping windows; BOS {bos_how} each window (policy `{bos.get('policy', '?')}`)."
    if result.get("tasks"):
        how += (" Tasks: zero-shot, lm-evaluation-harness's own task definitions on local files, "
                "acc_norm = length-normalised accuracy"
                + (f", first {limit} examples per task" if limit else "") + ".")
    lines.append(how)
    lm_eval = result.get("lm_eval") or {}
    if lm_eval.get("command"):  # the task numbers come from lm-eval's own task YAMLs; say how to get them again
        command = lm_eval["command"]
        if model_ref and lm_eval.get("argv") and released_source and result.get("source") == released_source:
            command = released_command(lm_eval["argv"], model_ref)  # the run's local path means nothing to a reader
        lines += ["", f"Re-run the task numbers with lm-evaluation-harness {lm_eval.get('version', '')} "
                  f"(the task YAMLs in `{lm_eval.get('include_path')}` of the run that made this model include "
                  "lm-eval's own and name the local data files):", "", "```bash", command, "```"]
    for note in result.get("notes") or []:
        lines.append(f"\n*{note}.*")
    if not has_dense:
        lines.append("\n*No dense baseline was evaluated (set `eval.compare_to: dense`).*")
    if released_source and result.get("source") and result["source"] != released_source:
        lines.append(f"\n*The evaluated checkpoint ({result['source']}) is not the released input "
                     f"({released_source}).*")
    return "\n".join(lines)


def stages_section(summary: dict | None) -> str:
    """Dense vs pruned vs healed vs tuned, from the pipeline's summary.json."""
    if not summary or not summary.get("rows"):
        return ""
    rows = [[r["label"], _num(r.get("params")), _num(r.get("layers")), _num(r.get("perplexity"))]
            for r in summary["rows"]]
    text = _table(["model", "parameters", "blocks", "perplexity"], rows)
    if summary.get("text"):
        text += (f"\n\nPerplexity on `{summary['text'].split('/')[-1]}` in {summary['context_length']}-token "
                 "windows, measured the same way for every row.")
    if summary.get("rounds"):  # prune.rounds: each round scored and pruned the model the round before left
        text += (f"\n\nPruned in {len(summary['rounds'])} rounds, each scoring the model the round before left: "
                 + "; ".join(f"round {r['round']} removed {r['ratio']:.0%} of the original model"
                             + (f" and healed on {_num(r['tokens_trained'])} tokens" if r.get("tokens_trained") else "")
                             for r in summary["rounds"]) + ".")
    return text


def gguf_section(files: list[dict], repo_id: str | None) -> str:
    """How to run the GGUF files with llama.cpp, and what their parity check measured (``gguf_export``)."""
    rows, native = [], False
    for f in files:
        for p in f.get("parity") or []:
            native |= p.get("loader") == "llama.cpp"
            dlogit = f"{_num(p.get('max_abs_dlogit'))} ({p.get('relative_dlogit', 0):.2%} of max)"
            agree = f"{p.get('top1_agreement', 0):.1%} ({p.get('top1_agreement_with_ties', 0):.1%} with near-ties)"
            rows.append([f"`gguf/{f['file']}`", f["type"], f"{f['bytes'] / 1e6:,.1f} MB", p.get("loader", "-"),
                         dlogit, agree, _num(p.get("positions")),
                         "passed" if p.get("passed") else "**failed**"])
    pick = next((f for f in files if f["type"] == "q8_0"), files[0])["file"]
    lines = ["Each GGUF file was loaded back after it was written and its logits compared with these safetensors "
             "weights on a fixed English prompt (float types: max |logit difference| within a bound relative to the "
             "largest logit; q8_0: the same next token at 99% of positions or more, where a token the weights rate "
             "within 0.5 logit of their top one is a near-tie and counts as the same):", "",
             _table(["file", "type", "size", "loaded by", "max abs logit diff", "top-1 agreement", "positions",
                     "check"], rows), ""]
    if not native:
        lines += ["*llama.cpp itself did not run this check (`llama-cpp-python` was not installed); transformers' "
                  "GGUF loader did.*", ""]
    for f in files:
        lines += [f"*`{f['file']}`: {note}.*" for note in f.get("notes") or []]
    lines += ["```sh"]
    if repo_id:
        lines.append(f"llama-cli --hf-repo {repo_id} --hf-file gguf/{pick} -cnv")
    lines += [f"llama-cli -m gguf/{pick} -cnv     # chat, with the chat template stored in the file",
              f"llama-server -m gguf/{pick}       # OpenAI-compatible server on port 8080", "```"]
    return "\n".join(lines)


def render(info: dict) -> str:
    """The whole card. ``info`` keys: name, base_model, base_source, license, tags, params_before, params_after,
    prune_report, sparsity (``healer.release.stage.released_sparsity``), training, curves, curves_missing, eval,
    summary, recipe_yaml, source; optional: card_data (``ModelCardData``; built from the keys above when
    absent), precision (``healer.release.stage.cast_for_release``), base_gguf, runs, gguf
    (``healer.release.gguf_export.export_and_check``'s records)."""
    name = info["name"]
    base = info.get("base_model") or info.get("base_source") or "an unnamed base model"
    report = info.get("prune_report")
    before, after = info.get("params_before"), info.get("params_after")
    intro = f"`{name}` is " + (f"[{base}](https://huggingface.co/{base}) " if info.get("base_model") else f"{base} ")
    data = info.get("card_data")
    if data is None:
        from healer.release.hub_metadata import card_data

        data = card_data(name=name, base_model=info.get("base_model"), license=info.get("license"), language=None,
                         datasets=[], tags=info.get("tags") or [], eval_result=info.get("eval"))
    parts = [front_matter(data), f"# {name}", "", intro]
    kind = "sparse" if (report or {}).get("method") == "sparse" else "structured"
    steps = [f"{kind} pruning ({pruning_summary(report)})"] if report else []
    steps += [s["how"] for s in info.get("training") or [] if not s.get("missing") and s.get("how")]
    parts[-1] += (f"after {', then '.join(steps)}, done with healer." if steps
                  else "packaged by healer, with no pruning or training recorded.")
    parts[-1] += " It is a plain `transformers` checkpoint; no custom code is needed."
    precision = precision_section(info.get("precision"), info.get("base_gguf"))
    if precision:
        parts += ["", precision]
    if not info.get("license"):
        parts += ["", "*The base model's licence could not be determined; set `release.license` in the recipe.*"]
    parts += ["", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{info.get("repo_id") or "path/to/" + name}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{info.get("repo_id") or "path/to/" + name}")', "```", ""]
    parts += ["## Parameters", ""]
    released = info.get("sparsity")
    if before and after:
        removed = f"{_num(before - after)} ({(before - after) / before:.1%})"
        rows = [["base", _num(before)], ["this model", _num(after)], ["removed", removed]]
        if released:  # zeros are stored densely: the count is unchanged, the nonzeros are what shrank
            share = f"{_num(released['zeros'])} ({released['overall']:.1%} of those projections)"
            rows.append(["of them zero (block projections)", share])
        parts.append(_table(["", "parameters"], rows))
    else:
        parts.append(f"This model has {_num(after)} parameters; the base model's count is unknown (no pruning report).")
    stages = stages_section(info.get("summary"))
    if stages:
        parts += ["", "## Stage by stage", "", stages]
    parts += ["", "## What was pruned and how", "", pruning_section(report, released), ""]
    parts += ["## Training", "", training_section(info.get("training") or []), ""]
    parts += ["## Learning curves", "", curves_section(info.get("curves") or [], info.get("curves_missing") or []), ""]
    runs = runs_section(info.get("runs"))
    if runs:
        parts += [runs, ""]
    parts += ["## Evaluation", "", eval_section(info.get("eval"), info.get("source"),
                                                info.get("repo_id") or f"path/to/{name}"), ""]
    if info.get("gguf"):
        parts += ["## Run it with llama.cpp", "", gguf_section(info["gguf"], info.get("repo_id")), ""]
    parts += ["## Recipe", "", "The healer recipe that produced this checkpoint (also in `recipe.yaml`):", "",
              "```yaml", info.get("recipe_yaml", "").rstrip(), "```", ""]
    parts += ["## Files", "", "`manifest.json` lists every file of this directory with its SHA-256 and size "
              "(`outputs.files`), the package versions and the healer git commit that wrote it.", ""]
    return "\n".join(parts)

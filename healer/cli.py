"""``healer VERB [recipe.yaml | --config recipe.yaml] [flags] [--key.sub value ...]``: one verb per job.

Every verb reads the same recipe. Any recipe key can be overridden on the command line, as
``--prune.ratio 0.3``, ``--prune.ratio=0.3`` or ``prune.ratio=0.3``; common ones also have short flags
(``--ratio``, declared with the verb in ``healer/stages.py``).

A verb's own flags (not recipe keys) are the fields of the ``Options`` dataclass in the module that
implements it: field ``resume_from`` is the flag ``--resume-from``; a ``bool`` field is a switch; an
``int``/``float``/``str`` field (or ``X | None``) takes a value of that type. ``metadata`` says
``help`` (required), ``positional: True`` (filled from the positional arguments in field order),
``choices`` and ``aliases`` (more flag names). The verb is called as ``func(recipe, opts)``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from healer.errors import HealerError, RecipeError
from healer.stages import VERBS, Verb

USAGE = """usage: healer VERB [recipe.yaml | --config recipe.yaml] [flags] [--KEY VALUE ...]

verbs:
{verbs}
`healer VERB --help` lists a verb's flags and recipe keys. Any recipe key can be overridden:
--prune.ratio 0.3, --model.source path/to/model, cpt.max_steps=10. `healer schema` prints every key.
"""

# Set by the DeepSpeed launcher on every rank's command line; the engine reads LOCAL_RANK from the
# environment instead, so the flag is accepted and dropped.
_LAUNCHER_FLAGS = ("--local_rank", "--local-rank")


@dataclass
class Parsed:
    config: str | None
    overrides: list[str]
    opts: Any  # the verb's Options instance (or, for a module without one, its remaining argv)


@dataclass(frozen=True)
class _Flag:
    field: dataclasses.Field
    kind: type  # bool, int, float or str

    @property
    def meta(self) -> typing.Mapping[str, Any]:
        return self.field.metadata


def option_flags(options: type) -> dict[str, _Flag]:
    """``--flag`` -> field for every non-positional field of an ``Options`` dataclass (contract 1)."""
    hints = typing.get_type_hints(options)
    flags: dict[str, _Flag] = {}
    for f in dataclasses.fields(options):
        if "help" not in f.metadata:
            raise TypeError(f"{options.__module__}.Options.{f.name}: metadata needs a 'help' text")
        if f.metadata.get("positional"):
            continue
        flag = _Flag(f, _scalar_type(hints[f.name], f"{options.__module__}.Options.{f.name}"))
        for name in ("--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())):
            flags[name] = flag
    return flags


def _scalar_type(hint: Any, where: str) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    if len(args) == 1 and args[0] in (bool, int, float, str):
        return args[0]
    raise TypeError(f"{where}: an option is bool, int, float or str (or one of them | None), not {hint}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _convert(flag: str, f: _Flag, raw: str) -> Any:
    """``raw`` as the field's type; ``flag`` names it in errors (a positional field's name, or ``--flag``)."""
    try:
        value = f.kind(raw)
    except ValueError:
        raise HealerError(f"{flag}: {raw!r} is not {'an' if f.kind is int else 'a'} {f.kind.__name__}") from None
    choices = f.meta.get("choices")
    if choices and value not in choices:
        if flag.startswith("-"):
            raise HealerError(f"{flag}: {raw!r} is not one of {', '.join(map(str, choices))}")
        article = "an" if flag[0] in "aeiou" else "a"
        raise HealerError(f"{raw!r} is not {article} {flag}; one of: {', '.join(map(str, choices))}")
    return value


def _looks_like_recipe(arg: str) -> bool:
    """A recipe file, or the name of a recipe shipped in healer.configs (``demo``)."""
    if arg.endswith((".yaml", ".yml")) or Path(arg).is_file():
        return True
    return "/" not in arg and (importlib.resources.files("healer.configs") / f"{arg}.yaml").is_file()


def _is_override(arg: str) -> bool:
    key, eq, _ = arg.partition("=")
    return bool(eq) and key.replace(".", "").replace("_", "").replace("-", "").isalnum() and not key[0].isdigit()


def parse_command_line(verb: Verb, argv: list[str], options: type | None) -> Parsed:
    """Split ``argv`` into the recipe, recipe overrides and the verb's ``Options``; anything unknown is an error."""
    from healer.recipe import Recipe

    flags = option_flags(options) if options is not None else {}
    values: dict[str, Any] = {}
    config: str | None = None
    overrides: list[str] = []
    positional: list[str] = []
    legacy: list[str] = []  # argv, in order, for a verb module that has no Options dataclass yet
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")

        def value() -> str:
            nonlocal i
            if eq:
                return inline
            if i + 1 >= len(argv):
                raise HealerError(f"{name} needs a value")
            i += 1
            return argv[i]

        if name in ("--config", "-c"):
            if config is not None:
                raise HealerError(f"two recipes given: {config} and {value()}")
            config = value()
        elif name in _LAUNCHER_FLAGS:
            if not value().isdigit():
                raise HealerError(f"{name} takes a number")
        elif name in flags:
            f = flags[name]
            if f.kind is bool:
                if eq:
                    raise HealerError(f"{name} is a switch; give it without a value")
                values[f.field.name] = True
            else:
                values[f.field.name] = _convert(name, f, value())
        elif name in verb.flags:
            overrides.append(f"{verb.flags[name]}={value()}")
        elif arg.startswith("--") and ("." in name or name[2:].replace("-", "_") in Recipe.model_fields):
            overrides.append(f"{name[2:].replace('-', '_')}={value()}")
        elif arg.startswith("-") and arg != "-":
            if options is None:  # the module parses its own flags (and refuses what it does not know)
                legacy.append(arg)
            else:
                raise HealerError(f"unknown option {name}; {_known_flags(verb, flags)}")
        elif _is_override(arg):
            overrides.append(arg)
        else:
            positional.append(arg)
            legacy.append(arg)
        i += 1

    given_config = config
    config, rest = _take_recipe(verb, config, positional, options)
    if options is None:  # hand the module its arguments in their order, minus the recipe
        if config is not None and config != given_config:
            legacy.remove(config)
        return Parsed(config, overrides, legacy)
    slots = [f for f in dataclasses.fields(options) if f.metadata.get("positional")]
    hints = typing.get_type_hints(options)
    for f, raw in zip(slots, rest):
        values[f.name] = _convert(f.name.replace("_", "-"), _Flag(f, _scalar_type(hints[f.name], f.name)), raw)
    if len(rest) > len(slots):
        stray = " ".join(repr(a) for a in rest[len(slots):])
        what = f"it takes {', '.join(f.name.upper() for f in slots)}" if slots else "it takes no positional arguments"
        raise HealerError(f"unexpected argument {stray}: {what} (see `healer {verb.name} --help`)")
    return Parsed(config, overrides, options(**values))


def _take_recipe(verb: Verb, config: str | None, positional: list[str], options: type | None
                 ) -> tuple[str | None, list[str]]:
    """Pick the recipe out of the positional arguments; the rest fill the verb's positional fields."""
    # A value that is one of a positional field's choices (`cpt`, `stats`) is never taken for a recipe.
    choices = {str(c) for f in (dataclasses.fields(options) if options else ())
               for c in f.metadata.get("choices", ()) if f.metadata.get("positional")}
    if config is not None:
        second = next((a for a in positional if a not in choices and _looks_like_recipe(a)), None)
        if second is not None:
            raise HealerError(f"two recipes given: {config} and {second}")
        return config, positional
    for k, arg in enumerate(positional):
        if arg not in choices and _looks_like_recipe(arg):
            return arg, positional[:k] + positional[k + 1:]
    slots = sum(1 for f in dataclasses.fields(options) if f.metadata.get("positional")) if options else 0
    if verb.needs_recipe and len(positional) > slots:
        # No argument looks like a recipe and one is left over: it is meant as one (a missing file is
        # then named by the loader rather than called a stray argument).
        k = next((k for k, a in enumerate(positional) if a not in choices), len(positional) - 1)
        return positional[k], positional[:k] + positional[k + 1:]
    return None, positional


def _known_flags(verb: Verb, flags: dict[str, _Flag]) -> str:
    known = sorted({*flags, *verb.flags})
    listed = f"flags of healer {verb.name}: {', '.join(known)}; " if known else ""
    return f"{listed}any recipe key works as --section.key (`healer {verb.name} --help`)"


# -- help ---------------------------------------------------------------------------------------------

def verb_help(verb: Verb, options: type | None) -> str:
    """``healer VERB --help``: usage, the verb's flags, its short flags and its recipe section's keys."""
    from healer.recipe import Recipe
    from healer.schema import schema_lines

    slots = [f for f in dataclasses.fields(options) if f.metadata.get("positional")] if options else []
    args = " ".join(f.name.upper() for f in slots)
    recipe = "[recipe.yaml | --config recipe.yaml]" if verb.needs_recipe else "[--config recipe.yaml]"
    lines = [f"usage: healer {verb.name} {args + ' ' if args else ''}{recipe} [flags] [--KEY VALUE ...]", "",
             verb.help, ""]
    if slots or options:
        lines.append("arguments and flags:")
        for f in slots:
            choices = f" ({' | '.join(map(str, f.metadata['choices']))})" if f.metadata.get("choices") else ""
            default = f" [default: {f.default}]" if f.default is not None else ""
            lines.append(_row(f.name.upper() + choices, f.metadata["help"] + default))
        seen = set()
        for name, flag in option_flags(options).items():
            if flag.field.name in seen:
                continue
            seen.add(flag.field.name)
            names = ", ".join(n for n, g in option_flags(options).items() if g.field.name == flag.field.name)
            arg = "" if flag.kind is bool else f" {flag.kind.__name__.upper()}"
            choices = f" ({' | '.join(map(str, flag.meta['choices']))})" if flag.meta.get("choices") else ""
            default = "" if flag.kind is bool or flag.field.default is None else f" [default: {flag.field.default}]"
            lines.append(_row(names + arg + choices, flag.meta["help"] + default))
        lines.append("")
    if verb.flags:
        lines.append("short flags for recipe keys:")
        lines += [_row(f"{flag} VALUE", f"--{key}") for flag, key in verb.flags.items()]
        lines.append("")
    section = verb.name if verb.name in Recipe.model_fields else None
    if section:
        lines.append(f"recipe keys of `{section}:` (override any as --{section}.KEY VALUE):")
        lines += ["  " + line for line in schema_lines(Recipe.model_fields[section].annotation, section + ".")]
    lines.append("`healer schema` lists every recipe key.")
    return "\n".join(lines)


def _row(left: str, right: str) -> str:
    return f"  {left:<30} {right}" if len(left) <= 30 else f"  {left}\n  {'':<30} {right}"


# -- running a verb -----------------------------------------------------------------------------------

def is_main_process() -> bool:
    """Rank 0 of a distributed job, or a single process (the launchers set RANK)."""
    return os.environ.get("RANK", "0") == "0"


def invoke(verb: Verb, recipe, opts) -> int:
    """Call ``verb`` with ``recipe`` and ``opts``; a stage holds its directory's lock and records its inputs."""
    func, _ = verb.load()
    if not verb.stage or recipe is None:
        return int(func(recipe, opts) or 0)
    from healer.lock import DirectoryLock
    from healer.manifest import expect_inputs
    from healer.stage_inputs import stage_inputs

    expect_inputs(verb.name, stage_inputs(recipe, verb.name))
    try:
        if not is_main_process():
            return int(func(recipe, opts) or 0)
        with DirectoryLock(recipe.stage_dir(verb.name), f"healer {verb.name}"):
            return int(func(recipe, opts) or 0)
    finally:
        expect_inputs(verb.name, None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The DeepSpeed launcher puts --local_rank=N before everything else: `-m healer --local_rank=0 cpt ...`.
    while argv and argv[0].partition("=")[0] in _LAUNCHER_FLAGS:
        argv = argv[1:] if "=" in argv[0] else argv[2:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(verbs="".join(f"  {n:<9} {v.help}\n" for n, v in VERBS.items())))
        return 0
    name, argv = argv[0], argv[1:]
    verb = VERBS.get(name)
    if verb is None:
        print(f"healer: unknown verb {name!r}; verbs: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    try:
        _, options = verb.load()
        if "-h" in argv or "--help" in argv:
            print(verb_help(verb, options))
            return 0
        parsed = parse_command_line(verb, argv, options)
        from healer.recipe import load_recipe

        if verb.needs_recipe and parsed.config is None and not parsed.overrides:
            raise RecipeError(f"which recipe? healer {name} recipe.yaml (or an embedded one: demo); "
                              f"`healer {name} --help` lists the flags")
        wanted = verb.needs_recipe or parsed.config or parsed.overrides
        recipe = load_recipe(parsed.config, parsed.overrides) if wanted else None
        return invoke(verb, recipe, parsed.opts)
    except RecipeError as err:
        print(f"healer {name}: {err}", file=sys.stderr)
        return 2
    except HealerError as err:
        print(f"healer {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

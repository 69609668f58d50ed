"""A verb's own flags, from the ``Options`` dataclass in the module that implements it.

Field ``resume_from`` is the flag ``--resume-from``; a ``bool`` field is a switch; an ``int``/``float``/
``str`` field (or ``X | None``) takes a value of that type. ``metadata`` says ``help`` (required),
``positional: True`` (filled from the positional arguments in field order), ``choices`` and ``aliases``
(more flag names). Recipe overrides (``--prune.ratio 0.3``, ``prune.ratio=0.3``, a verb's short flags)
and the recipe itself are picked out of the same command line; anything else is an error naming it.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from healer.core.errors import HealerError
from healer.stages import Verb

# Set by the DeepSpeed launcher on every rank's command line; the engine reads LOCAL_RANK from the
# environment instead, so the flag is accepted and dropped.
LAUNCHER_FLAGS = ("--local_rank", "--local-rank")


@dataclass
class Parsed:
    config: str | None
    overrides: list[str]
    opts: Any  # the verb's Options instance


@dataclass(frozen=True)
class _Flag:
    field: dataclasses.Field
    kind: type  # bool, int, float or str

    @property
    def meta(self) -> typing.Mapping[str, Any]:
        return self.field.metadata


def option_flags(options: type) -> dict[str, _Flag]:
    """``--flag`` -> field for every non-positional field of an ``Options`` dataclass."""
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


def parse_command_line(verb: Verb, argv: list[str], options: type) -> Parsed:
    """Split ``argv`` into the recipe, recipe overrides and the verb's ``Options``; anything unknown is an error."""
    from healer.recipe import Recipe

    flags = option_flags(options)
    values: dict[str, Any] = {}
    config: str | None = None
    overrides: list[str] = []
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")

        def value(name: str = name, eq: str = eq, inline: str = inline) -> str:
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
        elif name in LAUNCHER_FLAGS:
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
            raise HealerError(f"unknown option {name}; {_known_flags(verb, flags)}")
        elif _is_override(arg):
            overrides.append(arg)
        else:
            positional.append(arg)
        i += 1

    config, rest = _take_recipe(verb, config, positional, options)
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
    choices = {str(c) for f in dataclasses.fields(options)
               for c in f.metadata.get("choices", ()) if f.metadata.get("positional")}
    if config is not None:
        second = next((a for a in positional if a not in choices and _looks_like_recipe(a)), None)
        if second is not None:
            raise HealerError(f"two recipes given: {config} and {second}")
        return config, positional
    for k, arg in enumerate(positional):
        if arg not in choices and _looks_like_recipe(arg):
            return arg, positional[:k] + positional[k + 1:]
    slots = sum(1 for f in dataclasses.fields(options) if f.metadata.get("positional"))
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

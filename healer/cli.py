"""``healer VERB [recipe.yaml | --config recipe.yaml] [flags] [--key.sub value ...]``: one verb per job.

Every verb reads the same recipe. Any recipe key can be overridden on the command line, as
``--prune.ratio 0.3``, ``--prune.ratio=0.3`` or ``prune.ratio=0.3``; common ones also have short flags
(``--ratio``, declared with the verb in ``healer/stages.py``).

A verb's own flags (not recipe keys) are the fields of the ``Options`` dataclass in the module that
implements it (``healer/options.py`` turns them into a parser); the verb is called as
``func(recipe, opts)``.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from healer.core.errors import HealerError, RecipeError
from healer.options import LAUNCHER_FLAGS, option_flags, parse_command_line
from healer.run.invoke import invoke
from healer.stages import VERBS, Verb

USAGE = """usage: healer VERB [recipe.yaml | --config recipe.yaml] [flags] [--KEY VALUE ...]

verbs:
{verbs}
`healer VERB --help` lists a verb's flags and recipe keys. Any recipe key can be overridden:
--prune.ratio 0.3, --model.source path/to/model, cpt.max_steps=10. `healer schema` prints every key.
"""


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
        for _, flag in option_flags(options).items():
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

def _page(text: str) -> int:
    """Print help; a reader that stops early (`| head`) is not an error worth a traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The DeepSpeed launcher puts --local_rank=N before everything else: `-m healer --local_rank=0 cpt ...`.
    while argv and argv[0].partition("=")[0] in LAUNCHER_FLAGS:
        argv = argv[1:] if "=" in argv[0] else argv[2:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        return _page(USAGE.format(verbs="".join(f"  {n:<9} {v.help}\n" for n, v in VERBS.items())))
    name, argv = argv[0], argv[1:]
    verb = VERBS.get(name)
    if verb is None:
        print(f"healer: unknown verb {name!r}; verbs: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    try:
        _, options = verb.load()
        if "-h" in argv or "--help" in argv:
            return _page(verb_help(verb, options))
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
    except BrokenPipeError:  # `healer schema | head`: the reader stopped early, nothing failed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:  # Ctrl-C: a stop the user asked for, not a crash to show a traceback for
        print(f"healer {name}: interrupted; run the same command again to continue (finished stages are kept, "
              "training resumes from its last checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

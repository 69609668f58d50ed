"""Until ``healer.cli`` builds each verb's parser from its ``Options`` dataclass (contract 1), this turns the
argument list today's CLI hands a verb into that dataclass, by the same rules, so ``run_cpt``/``run_sft``
already take ``Options``. The lead drops this file once the CLI does it."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from healer.errors import HealerError


def options_from_args(cls, args: list[str], verb: str):
    """``cls`` (a dataclass of verb flags, contract 1) filled from ``args``; a bad argument is a HealerError."""
    parser = argparse.ArgumentParser(prog=f"healer {verb}", add_help=False, exit_on_error=False)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, kind = dict(f.metadata), hints[f.name]
        kwargs: dict = {"default": f.default, "help": meta["help"]}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
            kwargs["type"] = base
        if meta.get("positional"):
            parser.add_argument(f.name, nargs="?", **kwargs)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    try:
        parsed, extra = parser.parse_known_args(args)
    except (argparse.ArgumentError, SystemExit) as err:
        raise HealerError(f"healer {verb}: {err}") from None
    if extra:
        raise HealerError(f"healer {verb}: unexpected argument {extra[0]!r}; see `healer {verb} --help`")
    return cls(**vars(parsed))

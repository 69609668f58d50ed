"""``healer schema``: every recipe key with its type, default and description (also used by ``--help``)."""

from __future__ import annotations

import typing
from dataclasses import dataclass


@dataclass
class Options:
    """``healer schema`` takes no flags."""


def _section_type(annotation) -> type | None:
    """The pydantic model inside ``annotation`` (``PruneConfig | None`` -> PruneConfig), if any."""
    for arg in typing.get_args(annotation) or (annotation,):
        if isinstance(arg, type) and hasattr(arg, "model_fields"):
            return arg
    return None


def _type_name(annotation) -> str:
    if not typing.get_args(annotation) and isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def schema_lines(section: type, prefix: str = "") -> list[str]:
    """``key: type = default  # description`` for every key of ``section`` (a pydantic model or ``X | None``)."""
    model = _section_type(section)
    if model is None:
        return []
    out = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        desc = f"  # {info.description}" if info.description else ""
        nested = _section_type(info.annotation)
        if nested is not None:
            out.append(f"{key}:{desc}")
            out += schema_lines(nested, key + ".")
            continue
        default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
        out.append(f"{key}: {_type_name(info.annotation)} = {default}{desc}")
    return out


def run_schema(recipe, opts: Options) -> int:
    """Print the recipe's keys; ``recipe`` and ``opts`` are unused (the verb takes neither)."""
    from healer.recipe import Recipe

    print("\n".join(schema_lines(Recipe)))
    return 0

"""YAML as healer reads it: safe types only, no key given twice, and a bound on what aliases expand to."""

from __future__ import annotations

from typing import Any

import yaml

# A recipe holds hundreds of values. Aliases (&a / *a) let a few hundred bytes stand for billions of them, and
# everything that walks the tree afterwards (validation, ${run_dir}, the manifest's hashes) would expand them.
MAX_YAML_VALUES = 100_000


class YAMLRefused(Exception):
    """A document healer will not read: a key given twice, or aliases expanding past :data:`MAX_YAML_VALUES`."""


def _expanded_size(node, memo: dict[int, int]) -> int:
    """Values ``node`` stands for once every alias is expanded (memoised: linear in the document's size)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once instead of looping
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(item, memo) for item in node.value)
    else:
        size = 1
    memo[id(node)] = size
    if size > MAX_YAML_VALUES:
        raise YAMLRefused(f"its aliases (&name / *name) expand it to more than {MAX_YAML_VALUES:,} values; a "
                          "recipe is far smaller: write the values out or drop the aliases")
    return size


class _StrictLoader(yaml.SafeLoader):
    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, {})
        return node

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise YAMLRefused(f"{key!s} is given twice (lines {seen[key]} and {line}); "
                                  "merge them into one, YAML would keep only the last")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises :class:`YAMLRefused` for a duplicate key or an alias bomb
    (and ``yaml.YAMLError`` for a syntax error, as safe_load does)."""
    return yaml.load(text, Loader=_StrictLoader)

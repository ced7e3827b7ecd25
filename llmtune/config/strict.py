"""Strict reading of config files: a key given twice is an error (not "the last one wins"), and YAML aliases
may not expand a file into an unbounded value (a "billion laughs" file).

Sources: YAML 1.2 section 3.2.1.1 (mapping keys are unique); PyYAML's ``SafeLoader`` (anchors and aliases
are built as shared objects, so a file of a few lines can stand for 9**9 values that a later copy or
``str()`` expands).
"""

from __future__ import annotations

import json
from typing import Any

from llmtune.errors import LLMTuneError

#: most values (list items, mapping entries, scalars) a config may hold once its aliases are expanded
MAX_EXPANDED_VALUES = 100_000


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` that refuses a mapping key given twice and a document whose aliases expand beyond
    :data:`MAX_EXPANDED_VALUES` values.

    Raises:
        LLMTuneError: naming ``where``, the line and column of the repeated key, or the expansion.
        yaml.YAMLError: invalid YAML (the caller reports it with its position).
    """
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                k = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(k)
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
                if first is not None:
                    raise LLMTuneError(f"{where}: line {key_node.start_mark.line + 1}: key {k!r} is given twice "
                                       f"(first on line {first}); keep one")
                seen[k] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    n = expanded_size(data)
    if n > MAX_EXPANDED_VALUES:
        raise LLMTuneError(f"{where}: its YAML aliases (*name) expand to more than {MAX_EXPANDED_VALUES:,} values; "
                           "a config needs no such thing: write the values out without anchors and aliases")
    return data


def expanded_size(obj: Any, _memo: dict | None = None) -> int:
    """The number of values ``obj`` holds once every shared (aliased) list or dict is copied out; counted
    with a memo, so a value shared 9**9 times is visited once."""
    memo = {} if _memo is None else _memo
    if not isinstance(obj, (list, dict)):
        return 1
    if id(obj) in memo:
        return memo[id(obj)]
    items = list(obj.keys()) + list(obj.values()) if isinstance(obj, dict) else obj
    memo[id(obj)] = total = 1 + sum(expanded_size(x, memo) for x in items)
    return total


def load_json(text: str, where: str) -> Any:
    """``json.loads`` that refuses an object key given twice.

    Raises:
        LLMTuneError: naming ``where`` and the key; json.JSONDecodeError: invalid JSON (the caller reports it).
    """
    def pairs(items):
        out = {}
        for k, v in items:
            if k in out:
                raise LLMTuneError(f"{where}: key {k!r} is given twice; keep one")
            out[k] = v
        return out

    return json.loads(text, object_pairs_hook=pairs)


__all__ = ["load_yaml", "load_json", "expanded_size", "MAX_EXPANDED_VALUES"]

"""The schema of a configuration: how a key is declared and how a raw value becomes the key's type.

A leaf module (standard library and :mod:`llmtune.errors` only): :mod:`llmtune.config.keys` declares every key
of :class:`~llmtune.config.keys.TrainConfig` with :func:`key`, and :mod:`llmtune.config.checks` converts and
checks a config through :func:`user_fields`, :func:`field_types` and :func:`coerce_value`, without knowing the
table itself. So the table imports its checks and the checks never import the table (no import circle).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from dataclasses import field
from typing import Any, Optional, Union

from llmtune.errors import LLMTuneError

#: topics of ``--help``, in the order they are listed
GROUPS = {
    "model": "Model: what to load and how",
    "finetuning": "Fine-tuning method: LoRA, freeze or full",
    "data": "Data: datasets, template, lengths",
    "training": "Training loop: steps, optimizer, schedule, precision, saving, logging",
    "preference": "Preference stages: dpo, kto, rm (and their reference model)",
    "rl": "Online RL stages: ppo and grpo (rewards, rollouts, losses)",
    "generation": "Generation: sampling in chat, predict_with_generate and RL rollouts",
    "chat": "Chat (llmtune chat)",
    "export": "Export (llmtune export)",
    "distributed": "Distributed training (torchrun)",
}

BOOL_WORDS = {"true": True, "yes": True, "1": True, "on": True, "false": False, "no": False, "0": False,
              "off": False}


def key(default: Any = None, help: str = "", *, group: str, choices: Optional[tuple] = None,
        value_aliases: Optional[dict] = None, multi: bool = False, ge: Optional[float] = None,
        gt: Optional[float] = None, le: Optional[float] = None, lt: Optional[float] = None,
        hint: str = "", show_default: Optional[str] = None) -> Any:
    """A :func:`dataclasses.field` carrying a key's help, group, allowed values and bounds (module docstring).

    ``show_default`` replaces the default in ``--help`` where the real default is computed (e.g.
    ``lora_alpha``: 2 x lora_rank).
    """
    if group not in GROUPS:
        raise ValueError(f"unknown key group {group!r}")
    meta = {"help": help, "group": group, "choices": choices, "value_aliases": value_aliases or {},
            "multi": multi, "ge": ge, "gt": gt, "le": le, "lt": lt, "hint": hint, "show_default": show_default}
    return field(default=default, metadata=meta)


class KeyedConfig:
    """Base of a config dataclass whose fields are declared with :func:`key` (``TrainConfig``): lets
    :func:`llmtune.config.checks.validate` recognise one without importing the table."""


@functools.lru_cache(maxsize=None)
def user_fields(cls: type) -> dict[str, dataclasses.Field]:
    """Every user key of the config dataclass ``cls`` -> its field (fields starting with ``_`` are bookkeeping)."""
    return {f.name: f for f in dataclasses.fields(cls) if not f.name.startswith("_")}


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """Every user key of ``cls`` -> its annotated type (``Optional[int]`` etc.)."""
    keys = user_fields(cls)
    return {name: tp for name, tp in typing.get_type_hints(cls).items() if name in keys}


def base_type(tp: Any) -> tuple[Any, bool]:
    """``(underlying type, optional?)`` of a field annotation (``Optional[int]`` -> ``(int, True)``)."""
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def coerce_value(tp_annotation: Any, key: str, value: Any, source: str) -> Any:
    """Convert ``value`` (often a string from the command line or YAML) to ``tp_annotation``, the annotated type
    of key ``key`` (``Optional[int]``, ``bool``, ``str``...).

    ``None``/``"none"``/``"null"``/``"~"`` give None for an optional key. Booleans accept true/false, yes/no,
    on/off, 1/0. Lists become comma-joined strings for string keys.

    Raises: :class:`LLMTuneError` naming ``source`` and ``key`` when the value does not convert.
    """
    tp, optional = base_type(tp_annotation)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
        if optional or tp is str:
            return None if optional else value
        raise LLMTuneError(f"{source}: {key} needs a value of type {tp.__name__}, got {value!r}")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
                return BOOL_WORDS[value.strip().lower()]
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
                return int(value.strip())   # exact, also beyond 2**53
            if isinstance(value, (float, str)) and not isinstance(value, bool):
                number = float(str(value).strip())
                if number.is_integer():
                    return int(number)
        elif tp is float:
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                return float(value)
        elif tp is str:
            if isinstance(value, (list, tuple)):
                return ",".join(str(v) for v in value)
            if isinstance(value, (str, int, float, bool)):
                return str(value)
            if isinstance(value, os.PathLike):   # pathlib.Path from the Python API
                return os.fspath(value)
    except (TypeError, ValueError, OverflowError):
        pass
    want = "true/false" if tp is bool else {int: "a whole number", float: "a number", str: "text"}.get(tp, tp)
    raise LLMTuneError(f"{source}: {key} expects {want}, got {value!r}")

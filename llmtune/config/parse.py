"""Reading a config from the command line, a YAML/JSON file or a dict: keys, aliases, files.

``parse_config`` maps each given key to a :class:`~llmtune.config.keys.TrainConfig` field (the seed
document's and LLaMA-Factory's spellings through :data:`~llmtune.config.keys.ALIASES`; keys that mean nothing
here with one notice; an unknown key is an error naming the nearest known ones), converts the values, and
builds a new config, which normalises and checks every value (:mod:`llmtune.config.checks`) and then the keys
the command requires. The caller's dict, file or config is never changed.

Sources: LLaMA-Factory's ``hparams`` (key names and defaults); YAML 1.1 as PyYAML's ``safe_load`` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from llmtune.config.checks import notice_mapped_keys, validate
from llmtune.config.keys import ALIASES, IGNORED_KEYS, IGNORED_WHY, KEYS, TYPES, TrainConfig
from llmtune.config.relevance import check_relevance
from llmtune.config.schema import base_type, coerce_value
from llmtune.config.strict import load_json, load_yaml
from llmtune.errors import LLMTuneError, nearest, notice

#: the value of a ``--flag`` given with no value: true for a boolean key, an error for any other
BARE_FLAG = object()

_SEED_COMMENT_HINT = ("a lone ' ' argument: the command still has the seed document's inline '\\  # comment' "
                      "line endings, which no shell can run; remove the '# ...' comments (keep the '\\' at "
                      "the very end of each line) and run it again")


def coerce(key: str, value: Any, source: str) -> Any:
    """``value`` converted to the type of key ``key`` (:func:`llmtune.config.schema.coerce_value`).

    Raises: :class:`LLMTuneError` naming ``source`` and ``key`` when the value does not convert.
    """
    return coerce_value(TYPES[key], key, value, source)


def _normalise_key(raw: str, source: str, notices: list[str]) -> Optional[str]:
    key = raw.strip().lstrip("-").replace("-", "_")
    if key in ALIASES:
        return ALIASES[key]
    if key in KEYS:
        return key
    if key in IGNORED_KEYS:
        notices.append(f"{source}: '{key}' has no effect in llmtune and is ignored" + IGNORED_WHY.get(key, ""))
        return None
    if key in ("load_in_4bit", "load_in_8bit"):
        return key
    shown = f"--{key}" if source == "command line" else f"'{raw.strip()}'"
    raise LLMTuneError(f"{source}: unknown key {shown}."
                       + (nearest(key, list(KEYS) + list(ALIASES)) or " Run `llmtune train --help` for the keys."))


def _apply(values: dict[str, Any], key: str, value: Any, source: str, explicit: set) -> None:
    if value is BARE_FLAG:
        if key not in ("load_in_4bit", "load_in_8bit") and base_type(TYPES[key])[0] is not bool:
            raise LLMTuneError(f"{source}: needs a value (--{key} VALUE); a flag alone means true only for "
                               "true/false keys")
        value = True
    if key == "load_in_4bit":
        if coerce("double_quantization", value, source):  # a boolean
            values["quantization_bit"] = 4
            explicit.add("quantization_bit")
        return
    if key == "load_in_8bit":
        if coerce("double_quantization", value, source):
            raise LLMTuneError(f"{source}: load_in_8bit: llmtune quantizes to 4 bits only (NF4/FP4); use "
                               "--quantization_bit 4 (or --load_in_4bit True)")
        return
    values[key] = coerce(key, value, source)
    explicit.add(key)


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``, or any other name) or JSON (``.json``) config file.

    Raises:
        LLMTuneError: one line naming the file: missing or unreadable, bytes that are not UTF-8 (with the byte
            offset), invalid YAML/JSON (with line and column), or a top level that is not a mapping.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LLMTuneError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise LLMTuneError(f"{path}: is a folder; give a .yaml or .json config file") from None
    except OSError as e:
        raise LLMTuneError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LLMTuneError(f"{path}: not UTF-8 text (byte {e.start}: 0x{raw[e.start]:02x}); save the config file "
                           "as UTF-8") from None
    if path.suffix == ".json":
        try:
            data = load_json(text, str(path))
        except json.JSONDecodeError as e:
            raise LLMTuneError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
    else:
        import yaml

        try:
            data = load_yaml(text, str(path))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise LLMTuneError(f"{path}: {where}invalid YAML ({what})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LLMTuneError(f"{path}: a config file must be a mapping of keys to values, got a "
                           f"{type(data).__name__}")
    return data


def split_argv(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Split command-line words into config files and ``key -> value`` pairs.

    Accepts ``--key value``, ``--key=value``, ``key=value`` and a bare ``--flag`` (meaning true).

    Raises:
        LLMTuneError: a lone ``' '`` word or a ``#`` comment word (the seed's inline comments pasted), or a
            stray word that is no key.
    """
    files: list[str] = []
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word.strip() == "" or word.startswith("#"):
            raise LLMTuneError(f"argument {i + 1} is {word!r}: {_SEED_COMMENT_HINT}")
        if word.startswith("--"):
            body = word[2:]
            if "=" in body:
                k, v = body.split("=", 1)
                pairs.append((k, v))
                i += 1
                continue
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt == "":
                raise LLMTuneError(f"--{body}: the value is empty; give one (--{body} VALUE) or leave the key out "
                                   "for its default")
            if nxt is not None and nxt.strip() == "":
                raise LLMTuneError(f"the value of --{body} is {nxt!r}: {_SEED_COMMENT_HINT}")
            if nxt is None or (nxt.startswith("--") and len(nxt) > 2):
                pairs.append((body, BARE_FLAG))
                i += 1
            else:
                pairs.append((body, nxt))
                i += 2
            continue
        if "=" in word and not word.endswith((".yaml", ".yml", ".json")):
            k, v = word.split("=", 1)
            pairs.append((k, v))
        elif word.endswith((".yaml", ".yml", ".json")):
            files.append(word)
        else:
            raise LLMTuneError(f"unexpected argument {word!r}: give keys as --key value (or key=value), and a "
                               "config file as a .yaml/.json path")
        i += 1
    last: dict[str, Any] = {}
    for k, v in pairs:   # a flag given twice: the last value wins, with a notice; kept at its last position
        if k in last and last[k] != v:
            notice(f"--{k} is given twice ({last.pop(k)!r:.40}, then {v!r:.40}); using the last value")
        last.pop(k, None)
        last[k] = v
    return files, last




def parse_config(source: Union[list[str], tuple, dict, str, Path, TrainConfig, None] = None,
                 command: Optional[str] = "train", **overrides: Any) -> TrainConfig:
    """Build a new, validated :class:`TrainConfig`; the caller's ``source`` is never changed.

    Args:
        source: command-line words (``["config.yaml", "--lora_rank", "16"]``; flags override the file),
            a dict of keys, a YAML/JSON path, an existing TrainConfig (copied), or None (all defaults).
        command: ``train``, ``chat``, ``export`` (decides which keys are required), ``trainer`` (only
            ``output_dir``) or None (nothing required).
        overrides: more keys, applied last.

    Raises:
        LLMTuneError: ``source`` of another type, an unknown key (nearest ones suggested), a value of the wrong
            type, an invalid choice or range, a missing required key, an unreadable config file.
    """
    values: dict[str, Any] = {}
    explicit: set = set()
    notices: list[str] = []
    layers: list[tuple[str, dict[str, Any]]] = []
    if isinstance(source, TrainConfig):
        for raw_key, value in overrides.items():
            key = _normalise_key(str(raw_key), "arguments", notices)
            if key is not None:
                _apply(values, key, value, "arguments", explicit)
        cfg = source.replace(**values)   # a new, re-checked config
        validate(cfg, command)
        return cfg
    if source is None:
        pass
    elif isinstance(source, (str, Path)):
        layers.append((str(source), read_config_file(Path(source))))
    elif isinstance(source, dict):
        layers.append(("config", dict(source)))
    elif isinstance(source, (list, tuple)) and all(isinstance(w, str) for w in source):
        files, pairs = split_argv(list(source))
        for f in files:
            layers.append((f, read_config_file(Path(f))))
        layers.append(("command line", pairs))
    else:
        raise LLMTuneError(f"config: got {type(source).__name__} {source!r:.60}; give a dict of keys, a YAML/JSON "
                           "file path, a list of command-line words, or an llmtune.config.TrainConfig")
    if overrides:
        layers.append(("arguments", overrides))
    for where, data in layers:
        spelled: dict[str, tuple[str, Any]] = {}
        for raw_key, value in data.items():
            key = _normalise_key(str(raw_key), where, notices)
            if key is not None and key in spelled and spelled[key][1] != value:   # lora_rank: 8 and lora_r: 4
                flag = "--" if where == "command line" else ""
                raise LLMTuneError(f"{where}: {key} is given twice, as {flag}{spelled[key][0]} {spelled[key][1]} "
                                   f"and {flag}{raw_key} {value} (spellings of one key); keep one")
            if key is not None:
                spelled[key] = (str(raw_key), value)
                _apply(values, key, value, where if where != "command line" else f"--{raw_key}", explicit)
    for msg in dict.fromkeys(notices):
        notice(msg)
    cfg = TrainConfig(**values, _explicit=explicit)
    validate(cfg, command)
    check_relevance(cfg, command)   # keys this command or stage would ignore: a notice; contradictions: an error
    notice_mapped_keys(cfg, command)   # flash_attn, deepspeed, infer_backend, use_vllm: what runs instead
    return cfg

"""Dataset registry: ``dataset_info.json`` entries (LLaMA-Factory's format) -> :class:`DatasetAttr`.

An entry (format: LLaMA-Factory's ``data/README.md``) names where the rows are and how to read them::

    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}
    "dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": true, "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}
    "kto_en_demo": {..., "columns": {"messages": "messages", "kto_tag": "label"},
                    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}
    "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en"}

Keys: ``file_name`` (file or folder in ``dataset_dir``), ``hf_hub_url`` / ``ms_hub_url`` / ``om_hub_url``,
``script_url``, ``cloud_file_name``, ``load_from``, ``formatting`` (``alpaca`` default, ``sharegpt``, ``openai``),
``ranking``, ``columns``, ``tags``, ``subset``, ``split``, ``folder``, ``num_samples``; an unknown key gets a
one-line notice. The seed document's registrations also work: ``"type": "sft"|"pretrain"|"dpo"|...`` (a hint
checked against the stage) and the column names ``instruction``/``input``/``output``/``text`` (aliases of
``prompt``/``query``/``response``/``prompt``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from llmtune.fileio import read_text
from llmtune.errors import LLMTuneError, nearest, notice

KNOWN_KEYS = {"file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "load_from",
              "formatting", "ranking", "columns", "tags", "subset", "split", "folder", "num_samples", "type",
              "file_sha1"}
COLUMN_KEYS = {"prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos",
               "audios", "chosen", "rejected", "kto_tag"}
COLUMN_ALIASES = {"instruction": "prompt", "input": "query", "output": "response", "text": "prompt"}
TAG_KEYS = {"role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag"}
DEFAULT_COLUMNS = {"alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
                   "sharegpt": {"messages": "conversations"}}
DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"}
#: seed ``type`` hint -> the stages such data serves
TYPE_STAGES = {"pretrain": {"pt"}, "pt": {"pt"}, "sft": {"sft", "ppo", "grpo", "pt", "dpo"}, "rm": {"rm", "dpo", "kto"},
               "reward": {"rm", "dpo", "kto"}, "dpo": {"rm", "dpo", "kto"}, "preference": {"rm", "dpo", "kto"},
               "pairwise": {"rm", "dpo", "kto"}, "ranking": {"rm", "dpo", "kto"}, "kto": {"kto"},
               "ppo": {"ppo", "grpo"}, "rlhf": {"ppo", "grpo"}}
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".txt", ".parquet")


@dataclass
class DatasetAttr:
    """One dataset to load: where (``load_from`` + ``path``) and how (``formatting``, ``columns``, ``tags``).

    ``columns`` maps our column roles (``prompt``, ``query``, ``response``, ``history``, ``messages``, ``system``,
    ``tools``, ``chosen``, ``rejected``, ``kto_tag``) to the row keys; ``explicit`` holds the roles the user
    mapped (a mapped column missing from the rows is an error, a default one is just absent).
    """

    name: str
    load_from: str  # "file" | "hf_hub" | "ms_hub" | "om_hub" | "script" | "cloud_file"
    path: str
    formatting: str = "alpaca"
    ranking: bool = False
    columns: dict = field(default_factory=dict)
    explicit: set = field(default_factory=set)
    tags: dict = field(default_factory=dict)
    explicit_tags: bool = False
    subset: Optional[str] = None
    split: str = "train"
    folder: Optional[str] = None
    num_samples: Optional[int] = None
    type_hint: Optional[str] = None
    dataset_dir: str = "data"

    def fingerprint(self) -> dict:
        """A JSON-able description used in cache keys."""
        d = dict(self.__dict__)
        d["explicit"] = sorted(self.explicit)
        return d


def load_registry(dataset_dir: str) -> Optional[dict]:
    """Read ``dataset_dir/dataset_info.json``; None when the file does not exist.

    Raises:
        LLMTuneError: the file is not UTF-8 (byte offset named), not valid JSON (file and line named) or not
            an object.
    """
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(read_text(path, "dataset_dir", "re-save dataset_info.json as UTF-8"))
    except json.JSONDecodeError as err:
        raise LLMTuneError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}.") from err
    if not isinstance(info, dict):
        raise LLMTuneError(f"{path}: expected a JSON object mapping dataset names to their descriptions.")
    return info


def parse_entry(name: str, entry: dict, dataset_dir: str, where: str = "dataset_info.json") -> DatasetAttr:
    """Build a :class:`DatasetAttr` from one registry entry (see the module docstring for the keys).

    Raises:
        LLMTuneError: a malformed entry (names the dataset and the key).
    """
    if not isinstance(entry, dict):
        raise LLMTuneError(f"{where}: the entry of dataset {name!r} must be a JSON object.")
    for key in entry:
        if key not in KNOWN_KEYS:
            notice(f"{where}: dataset {name!r}: unknown key {key!r} ignored." + nearest(key, KNOWN_KEYS))
    if entry.get("load_from") == "file" and "file_name" in entry:
        load_from, path = "file", entry["file_name"]
    elif "hf_hub_url" in entry:
        load_from, path = "hf_hub", entry["hf_hub_url"]
    elif "ms_hub_url" in entry or "om_hub_url" in entry:
        load_from = "ms_hub" if "ms_hub_url" in entry else "om_hub"
        path = entry.get("ms_hub_url") or entry.get("om_hub_url")
    elif "script_url" in entry:
        load_from, path = "script", entry["script_url"]
    elif "cloud_file_name" in entry:
        load_from, path = "cloud_file", entry["cloud_file_name"]
    elif "file_name" in entry:
        load_from, path = "file", entry["file_name"]
    else:
        raise LLMTuneError(f"{where}: dataset {name!r} has no file_name (a file or folder in {dataset_dir}) "
                           "and no hf_hub_url; add one of them.")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise LLMTuneError(f"{where}: dataset {name!r}: formatting must be 'alpaca' or 'sharegpt', got "
                           f"{formatting!r}." + nearest(str(formatting), ["alpaca", "sharegpt"]))
    base = "alpaca" if formatting == "alpaca" else "sharegpt"
    columns = dict(DEFAULT_COLUMNS[base])
    explicit = set()
    raw_cols = entry.get("columns") or {}
    if not isinstance(raw_cols, dict):
        raise LLMTuneError(f"{where}: dataset {name!r}: columns must be an object like {{\"prompt\": \"instruction\"}}.")
    for key, col in raw_cols.items():
        role = COLUMN_ALIASES.get(key, key)
        if role not in COLUMN_KEYS:
            notice(f"{where}: dataset {name!r}: unknown column key {key!r} ignored." + nearest(key, COLUMN_KEYS))
            continue
        columns[role] = col
        explicit.add(role)
    raw_tags = entry.get("tags") or {}
    tags = dict(OPENAI_TAGS if formatting == "openai" else DEFAULT_TAGS)
    for key, val in raw_tags.items():
        if key not in TAG_KEYS:
            notice(f"{where}: dataset {name!r}: unknown tag key {key!r} ignored." + nearest(key, TAG_KEYS))
            continue
        tags[key] = val
    type_hint = entry.get("type")
    if type_hint is not None and type_hint not in TYPE_STAGES:
        notice(f"{where}: dataset {name!r}: unknown type {type_hint!r} ignored (known: {', '.join(TYPE_STAGES)}).")
        type_hint = None
    ranking = bool(entry.get("ranking", False)) or ("chosen" in explicit and "rejected" in explicit)
    num = entry.get("num_samples")
    return DatasetAttr(name=name, load_from=load_from, path=str(path), formatting=base, ranking=ranking,
                       columns=columns, explicit=explicit, tags=tags, explicit_tags=bool(raw_tags),
                       subset=entry.get("subset"), split=entry.get("split", "train"), folder=entry.get("folder"),
                       num_samples=int(num) if num is not None else None, type_hint=type_hint,
                       dataset_dir=str(dataset_dir))


def resolve(name: str, dataset_dir: str) -> DatasetAttr:
    """Find dataset ``name``: a key of ``dataset_dir/dataset_info.json``, or a path to a data file/folder.

    A path (``.json``/``.jsonl``/``.csv``/``.txt``/``.parquet``) gets an auto-detected format at load time.

    Raises:
        LLMTuneError: unknown name (nearest registered names suggested) or no registry to look in.
    """
    name = name.strip()
    info = load_registry(dataset_dir)
    if info is not None and name in info:
        return parse_entry(name, info[name], dataset_dir, where=str(Path(dataset_dir) / "dataset_info.json"))
    p = Path(name).expanduser()
    if p.suffix.lower() in DATA_SUFFIXES or p.exists():
        if not p.exists():
            raise LLMTuneError(f"dataset {name!r}: file not found ({p.resolve()}).")
        return DatasetAttr(name=name, load_from="file", path=str(p.resolve()), formatting="auto",
                           dataset_dir=str(dataset_dir))
    if info is None:
        raise LLMTuneError(f"dataset {name!r}: {Path(dataset_dir) / 'dataset_info.json'} does not exist; set "
                           "dataset_dir to the folder holding dataset_info.json, or pass a path to a .json/.jsonl "
                           "data file as the dataset.")
    raise LLMTuneError(f"dataset {name!r} is not registered in {Path(dataset_dir) / 'dataset_info.json'}."
                       + nearest(name, info.keys()))

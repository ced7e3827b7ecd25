"""``llmtune <command> --help [KEYWORD]``: the keys of a command, grouped by topic, from the config's own fields.

Each line is ``--key VALUE  description [default: ...]`` taken from the key's metadata in
:mod:`llmtune.config.keys`, so the help cannot disagree with the config. ``train`` lists the training
topics, ``chat`` the model, generation and chat keys, ``export`` the export and model keys. A keyword keeps
the keys whose name, alias or description contains it (case-insensitive).
"""

from __future__ import annotations

from typing import Optional

from llmtune.config.keys import ALIASES, GROUPS, KEYS, STAGE_ALIASES, TYPES
from llmtune.config.schema import base_type
from llmtune.errors import nearest

#: command -> (its topics in order, keys of other topics it also uses)
COMMAND_KEYS = {
    "train": (("model", "finetuning", "data", "training", "preference", "rl", "generation", "distributed"), ()),
    "chat": (("model", "generation", "chat"), ("finetuning_type", "template", "default_system", "cutoff_len",
                                               "seed")),
    "export": (("export", "model"), ("finetuning_type", "template")),
}

USAGES = {
    "train": "usage: llmtune train [config.yaml] [--key value ...] [key=value ...]\n"
             "Train or fine-tune a model (stages pt, sft, rm, dpo, kto, ppo, grpo); flags override the file.",
    "chat": "usage: llmtune chat [config.yaml] --model_name_or_path PATH [--key value ...]\n"
            "Chat with a model in the terminal (reads one prompt per line when stdin is piped).\n"
            "Commands while chatting: `/clear` (forget the history), `/exit` (quit).",
    "export": "usage: llmtune export [config.yaml] --model_name_or_path M [--adapter_name_or_path A,...] "
              "--export_dir DIR [--key value ...]\nMerge adapters and write a Hugging Face folder or a GGUF file.",
}

_WIDTH = 36


def _value_word(name: str) -> str:
    meta = KEYS[name].metadata
    if meta["choices"]:
        return "|".join(map(str, meta["choices"]))
    tp = base_type(TYPES[name])[0]
    return {bool: "true|false", int: "INT", float: "NUMBER", str: "TEXT"}.get(tp, "VALUE")


def _default_text(name: str) -> str:
    meta = KEYS[name].metadata
    if meta["show_default"]:
        return meta["show_default"]
    default = KEYS[name].default
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return str(default).lower()
    return f"{default:g}" if isinstance(default, float) else str(default)


def key_line(name: str) -> str:
    """One help line: ``  --key VALUE    description [default: X] (also --alias)``."""
    head = f"  --{name} {_value_word(name)}"
    aliases = sorted(a for a, k in ALIASES.items() if k == name)
    tail = f" [default: {_default_text(name)}]" + (f" (also --{', --'.join(aliases)})" if aliases else "")
    text = KEYS[name].metadata["help"] + tail
    if len(head) >= _WIDTH:
        return f"{head}\n{'':{_WIDTH}}{text}"
    return f"{head:{_WIDTH}}{text}"


def _matches(name: str, word: str) -> bool:
    word = word.lower()
    aliases = [a for a, k in ALIASES.items() if k == name]
    return any(word in s.lower() for s in [name, KEYS[name].metadata["help"], *aliases])


def command_keys(command: str) -> dict[str, list[str]]:
    """``{group: [keys]}`` that ``llmtune <command> --help`` lists, in order (``train``, ``chat``, ``export``)."""
    groups, extra = COMMAND_KEYS[command]
    out: dict[str, list[str]] = {}
    for group in groups:
        out[group] = [n for n, f in KEYS.items() if f.metadata["group"] == group]
    if extra:
        out["other"] = list(extra)
    return out


def config_help(command: str = "train", keyword: Optional[str] = None) -> str:
    """The ``--help`` text of ``command`` (``train``, ``chat`` or ``export``), optionally only the keys matching
    ``keyword``; see the module docstring. Raises ``KeyError`` for another command."""
    sections = command_keys(command)
    lines = [USAGES[command], ""]
    if keyword:
        found = {g: [n for n in names if _matches(n, keyword)] for g, names in sections.items()}
        found = {g: names for g, names in found.items() if names}
        if not found:   # the keyword may belong to another command's keys
            found = {}
            for n, f in KEYS.items():
                if _matches(n, keyword):
                    found.setdefault(f.metadata["group"], []).append(n)
        if not found:
            return "\n".join(lines + [f"No key matches {keyword!r}."
                                      + nearest(keyword, list(KEYS) + list(ALIASES))
                                      + f" Run `llmtune {command} --help` for all keys."])
        lines.append(f"Keys matching {keyword!r}:")
        sections = found
    else:
        lines.append(f"Keys (LLaMA-Factory names) as --key value, key=value or in a YAML file. `llmtune {command} "
                     "--help WORD` lists only the keys whose name or description contains WORD.")
    for group, names in sections.items():
        lines += ["", GROUPS.get(group, "Also used")]
        lines += [key_line(n) for n in names]
    if not keyword and command == "train":
        lines += ["", "Seed spellings: " + ", ".join(f"--stage {a} -> {b}" for a, b in STAGE_ALIASES.items())
                  + ", --load_in_4bit True -> --quantization_bit 4."]
    if not keyword:
        others = [c for c in COMMAND_KEYS if c != command]
        lines += ["", f"See also `llmtune {others[0]} --help` and `llmtune {others[1]} --help`."]
    return "\n".join(lines)

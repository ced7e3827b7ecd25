"""The seed document's ``llama_factory-cli`` commands, extracted from the document itself (not retyped).

As printed, each command line ends in ``\\  # comment``; "as written" means (DESIGN.md, "The seed's commands"):
the inline comments removed, the continuation lines joined, then the model path / datasets replaced by what
we have and, in tests, short-run flags added. Usage::

    from seed_commands import find_seed_command
    rm = find_seed_command("train", stage="rm")
    argv = rm.argv(replace={"model_name_or_path": str(sft_dir), "dataset": "my_rm_data"},
                   add={"max_steps": 2, "cutoff_len": 64, "dataset_dir": str(data)})
    subprocess.run(argv, cwd=tmp_path, ...)          # python -m llmtune train --stage rm ...

Every engineer's seed test should go through this helper so that a change in the document shows up.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

_START = re.compile(r"^\s*llama_factory-cli\s+(\w+)")
_COMMENT = re.compile(r"\s+#.*$")


@dataclass
class SeedCommand:
    """One ``llama_factory-cli <subcommand> --key value ...`` command of the seed document.

    Attributes: ``subcommand`` (train/chat/export/version), ``args`` (``--key`` -> value strings, in the
    document's order; a bare flag maps to ``"True"``), ``text`` (the cleaned single line), ``line`` (1-based
    line of the document where it starts), ``raw`` (the lines as printed).
    """

    subcommand: str
    args: dict[str, str]
    text: str
    line: int
    raw: list[str] = field(default_factory=list)

    def get(self, key: str, default: Optional[str] = None) -> Optional[str]:
        return self.args.get(key, default)

    def argv(self, replace: Optional[dict[str, Any]] = None, add: Optional[dict[str, Any]] = None,
             drop: tuple[str, ...] = (), cli: Optional[list[str]] = None) -> list[str]:
        """The command for ``subprocess``: ``[python, -m, llmtune, subcommand, --key, value, ...]``.

        ``replace`` changes values of keys the document sets (KeyError when it does not set them: the
        document changed), ``add`` appends keys (or overrides, e.g. a smaller ``cutoff_len``), ``drop`` removes.
        """
        args = dict(self.args)
        for k, v in (replace or {}).items():
            if k not in args:
                raise KeyError(f"the seed's `{self.subcommand}` command (line {self.line}) has no --{k}")
            args[k] = str(v)
        for k in drop:
            args.pop(k, None)
        for k, v in (add or {}).items():
            args[k] = str(v)
        words = list(cli or [sys.executable, "-m", "llmtune"]) + [self.subcommand]
        for k, v in args.items():
            words += [f"--{k}", v]
        return words


def clean_lines(lines: list[str]) -> str:
    """Join a printed command: drop each line's ``  # comment``, its trailing ``\\``, and join with spaces."""
    parts = []
    for ln in lines:
        ln = _COMMENT.sub("", ln.rstrip()).rstrip()
        if ln.endswith("\\"):
            ln = ln[:-1].rstrip()
        parts.append(ln.strip())
    return " ".join(p for p in parts if p)


def parse_seed_commands(text: str) -> list[SeedCommand]:
    """Every ``llama_factory-cli`` command in ``text`` (a block continues while a line, its comment removed,
    ends with ``\\``)."""
    lines = text.splitlines()
    out: list[SeedCommand] = []
    i = 0
    while i < len(lines):
        m = _START.match(lines[i])
        if not m:
            i += 1
            continue
        start, block = i, [lines[i]]
        while _COMMENT.sub("", lines[i].rstrip()).rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            block.append(lines[i])
        i += 1
        joined = clean_lines(block)
        words = shlex.split(joined)[2:]  # drop llama_factory-cli <sub>
        args: dict[str, str] = {}
        j = 0
        while j < len(words):
            key = words[j][2:] if words[j].startswith("--") else words[j]
            if j + 1 < len(words) and not words[j + 1].startswith("--"):
                args[key] = words[j + 1]
                j += 2
            else:
                args[key] = "True"
                j += 1
        out.append(SeedCommand(m.group(1), args, joined, start + 1, block))
    return out


def seed_commands(path: Optional[Path] = None) -> list[SeedCommand]:
    """The seed document's commands (``shared_inputs.seed_document()`` by default; skips when absent)."""
    if path is None:
        from shared_inputs import seed_document

        path = seed_document()
    return parse_seed_commands(Path(path).read_text(encoding="utf-8"))


def find_seed_command(subcommand: str = "train", **match: str) -> SeedCommand:
    """The one seed command of ``subcommand`` whose args have all ``match`` values (e.g. ``stage="rm"``,
    ``output_dir="./kto_output"``); AssertionError when there is not exactly one."""
    hits = [c for c in seed_commands() if c.subcommand == subcommand
            and all(c.args.get(k) == str(v) for k, v in match.items())]
    assert len(hits) == 1, f"expected one seed `{subcommand}` command with {match}, found {len(hits)}"
    return hits[0]

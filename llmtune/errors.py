"""User-facing errors.

Every mistake a user can make (a bad path, an unknown key, a malformed dataset) is raised as
:class:`LLMTuneError` with one message that names the file, key or flag and says how to fix it.
The CLI prints that message alone (no traceback) and exits with status 2.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class LLMTuneError(Exception):
    """An error caused by the user's input; ``str(err)`` is the whole message shown to the user."""


def nearest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return a ``" Did you mean: a, b?"`` suffix naming the closest ``choices`` to ``name`` ("" if none).

    Uses :func:`difflib.get_close_matches` (ratio >= 0.6), case-insensitively.
    """
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.6)
    if not hits:
        return ""
    return " Did you mean: " + ", ".join(lowered[h] for h in hits) + "?"


def notice(message: str) -> None:
    """Print a one-line notice to stderr (``llmtune: notice: ...``); used for accepted-but-adjusted input."""
    import sys

    print(f"llmtune: notice: {message}", file=sys.stderr, flush=True)


class Terminated(KeyboardInterrupt):
    """Raised by ``llmtune.train.trainer.Trainer.train`` when the process receives SIGTERM (a cluster's
    preemption or time limit, a container's stop, ``kill``), after the checkpoint of the last completed step is
    saved, as for Ctrl-C. A ``KeyboardInterrupt``, so code that handles Ctrl-C handles it too; the CLI exits
    with status 143 (128 + SIGTERM), as a process killed by the signal would."""

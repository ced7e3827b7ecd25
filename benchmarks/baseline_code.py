"""Load llmtune's generation code as it was at a git commit, beside today's, for side-by-side benchmarks.

``old_modules(ref)`` reads ``llmtune/generation.py`` and ``llmtune/rollout.py`` of ``ref`` with ``git show`` and
imports them as the modules ``_baseline_generation`` and ``_baseline_rollout`` (the old rollout's import of
``llmtune.generation`` is pointed at the old generation module). Both drive today's model class, whose forward
still takes the old callers' arguments (a growing ``KVCache`` and an ``attention_mask``).

The default ref, ``cb17e34``, is the last commit before the generation engine (issue 24, item 1).
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

BASELINE_REF = "cb17e34"
_REPO = Path(__file__).resolve().parents[1]


def _load(name: str, source: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__file__ = f"<{name}>"
    sys.modules[name] = mod
    exec(compile(source, mod.__file__, "exec"), mod.__dict__)
    return mod


def old_modules(ref: str = BASELINE_REF) -> tuple[types.ModuleType, types.ModuleType]:
    """``(generation, rollout)`` modules of commit ``ref`` (raises ``subprocess.CalledProcessError`` if absent)."""
    def show(path: str) -> str:
        return subprocess.run(["git", "show", f"{ref}:{path}"], cwd=_REPO, check=True, capture_output=True,
                              text=True).stdout

    gen = _load("_baseline_generation", show("llmtune/generation.py"))
    src = show("llmtune/rollout.py").replace("from llmtune.generation import", "from _baseline_generation import")
    return gen, _load("_baseline_rollout", src)

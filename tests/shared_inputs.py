"""The one place tests find the real inputs in ``../shared`` (model, datasets, seed document).

Set ``LLMTUNE_SHARED`` to point elsewhere. When the folder is absent (a fresh clone elsewhere) the tests
that need it skip with a clear reason; in CI (``CI=true``) ``.ci/run`` checks it exists first, so they run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMTUNE_SHARED", REPO.parent / "shared")).resolve()
REAL_MODEL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_DIR = SHARED / "data"
SEED_DIR = SHARED / "seed"


def _need(path: Path) -> Path:
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must run the real-input tests (see .ci/run)")
        pytest.skip(f"real input {path} is absent (set LLMTUNE_SHARED to the folder holding models/ and data/)")
    return path


def real_model() -> Path:
    """Path of the real GGUF model; skips the test when absent."""
    return _need(REAL_MODEL)


def data_dir() -> Path:
    """Path of the real demo datasets folder (with dataset_info.json); skips the test when absent."""
    return _need(DATA_DIR / "dataset_info.json").parent


def seed_document() -> Path:
    """Path of the seed document (a text file); skips the test when absent."""
    _need(SEED_DIR)
    files = sorted(SEED_DIR.glob("*.txt"))
    if not files:
        return _need(SEED_DIR / "seed.txt")
    return files[0]

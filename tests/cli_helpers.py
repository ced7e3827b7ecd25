"""Running ``llmtune`` as a user does, in a subprocess: one environment, one runner, one small dataset folder.

Used by the command-line tests (the seed's commands, torchrun runs) instead of a private copy in each file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

#: torchrun's variables: a test's subprocess starts without them (the test sets its own, or none)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def subprocess_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without torchrun's variables, offline, one OpenMP thread, no tokenizer threads; plus
    ``extra``."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for k in TORCHRUN_VARS:
        env.pop(k, None)
    env.update(extra)
    return env


def run_cli(argv: list[str], cwd, ok: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``argv`` (a whole command line, e.g. ``[sys.executable, "-m", "llmtune", "train", ...]``) in ``cwd``
    with its own ``LLMTUNE_CACHE`` there; with ``ok`` assert exit code 0, showing the command and the ends of
    stdout and stderr otherwise. Returns the ``CompletedProcess`` (text)."""
    env = dict(os.environ, LLMTUNE_CACHE=str(Path(cwd) / ".cache"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"{' '.join(argv)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def identity_data(shared_data_dir: Path, folder: Path) -> Path:
    """``folder`` with the shared ``identity.json`` (placeholders filled: Zorbly by Quill) registered as dataset
    ``identity`` in its ``dataset_info.json``; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    text = (shared_data_dir / "identity.json").read_text(encoding="utf-8")
    (folder / "identity.json").write_text(text.replace("{{name}}", "Zorbly").replace("{{author}}", "Quill"),
                                          encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"identity": {"file_name": "identity.json"}}))
    return folder

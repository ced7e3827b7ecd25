"""Small file helpers shared by every writer of weights and output folders.

``safetensors.torch.save_file`` creates files readable by their owner only (mode 0600) and
``tempfile.mkdtemp`` creates 0700 folders; llmtune's outputs (adapters, merged models, checkpoints) are meant
to be read by other users and serving processes, so they get the ordinary permissions the umask allows
(0644 files, 0755 folders with the usual umask 022).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path,
                 metadata: Optional[dict[str, str]] = None) -> Path:
    """Write ``tensors`` (name -> contiguous tensor) to the safetensors file ``path`` with umask permissions.

    Format: the safetensors specification (8-byte header length, JSON header, raw little-endian data).
    Raises whatever ``safetensors.torch.save_file`` raises (e.g. for non-contiguous or shared tensors).
    """
    from safetensors.torch import save_file

    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())
    return path


def make_public_dir(folder: str | Path) -> None:
    """Give ``folder`` (e.g. from ``tempfile.mkdtemp``, mode 0700) the permissions the umask allows (0755)."""
    os.chmod(folder, 0o777 & ~_umask())


def read_text(path: str | Path, what: str = "", fix: str = "save it as UTF-8") -> str:
    """The text of ``path`` decoded as UTF-8 (a leading BOM dropped), or one :class:`LLMTuneError`.

    Args:
        path: the file. what: the config key or role naming it in the message (``dataset 'x'``,
            ``dataset_info.json``, ``tokenizer config``). fix: how to fix bytes that are not UTF-8.

    Raises:
        LLMTuneError: bytes that are not UTF-8 (message: file, byte offset, the bytes, ``fix``); an unreadable
            file (missing, a folder, permission denied).
    """
    from llmtune.errors import LLMTuneError

    path = Path(path)
    label = f"{what}: " if what else ""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise LLMTuneError(f"{label}cannot read {path} ({err.strerror or type(err).__name__}); check the path and "
                           "its permissions") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise LLMTuneError(f"{label}{path} is not UTF-8 text: byte {err.start} (line {line}) is "
                           f"{raw[err.start:err.start + 4]!r}; {fix}") from None

"""Small file helpers shared by every writer of weights and output folders.

``safetensors.torch.save_file`` creates files readable by their owner only (mode 0600) and
``tempfile.mkdtemp`` creates 0700 folders; llmtune's outputs (adapters, merged models, checkpoints) are meant
to be read by other users and serving processes, so they get the ordinary permissions the umask allows
(0644 files, 0755 folders with the usual umask 022).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path,
                 metadata: Optional[dict[str, str]] = None) -> Path:
    """Write ``tensors`` (name -> contiguous tensor) to the safetensors file ``path`` with umask permissions.

    Format: the safetensors specification (8-byte header length, JSON header, raw little-endian data).
    Written to a temporary name in the same folder and renamed, so ``path`` is never a truncated file.
    Raises ``OSError`` (errno, file name) for an I/O failure such as a full disk, else whatever
    ``safetensors.torch.save_file`` raises (e.g. for non-contiguous or shared tensors).
    """
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)  # a full disk or a kill never leaves a truncated file under the real name
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if type(err).__name__ == "SafetensorError" and "os error" in str(err):
            raise _as_os_error(err, path) from None
        raise
    return path


def _as_os_error(err: BaseException, path: Path) -> OSError:
    """safetensors' I/O error (``... (os error 28)``) as the ``OSError`` it wraps, naming ``path``."""
    import errno
    import re

    m = re.search(r"os error (\d+)", str(err))
    code = int(m.group(1)) if m else errno.EIO
    return OSError(code, os.strerror(code), str(path))


def make_public_dir(folder: str | Path) -> None:
    """Give ``folder`` (e.g. from ``tempfile.mkdtemp``, mode 0700) the permissions the umask allows (0755)."""
    os.chmod(folder, 0o777 & ~_umask())


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON with a final newline (the ``*_results.json`` and metadata files)."""
    Path(path).write_text(strict_dumps(data, indent=2) + "\n")  # strict JSON: NaN/inf -> null


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


def strict_dumps(obj: Any, **kw: Any) -> str:
    """``json.dumps`` that writes strict JSON (RFC 8259): NaN/inf floats become ``null`` (``allow_nan=False``)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kw)


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None, recursively through dicts and lists."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj

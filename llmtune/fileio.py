"""Small file helpers shared by every writer of weights and output folders: durability in one place.

Publishing a folder (:func:`publish_dir`: fsync every file, then one rename, so a reader never sees half a
checkpoint or export), flushing (:func:`fsync_tree`, :func:`fsync_dir`), the one-line reason of an I/O
failure (:func:`io_reason`: disk full, read-only, permission), JSON reading with one clear error
(:func:`read_json`), path identity (:func:`same_path`) and weight identity (:func:`same_base`: the same path, or
weight files with the same bytes) live here, used by training checkpoints, export and the run records alike.

``safetensors.torch.save_file`` creates files readable by their owner only (mode 0600) and
``tempfile.mkdtemp`` creates 0700 folders; llmtune's outputs (adapters, merged models, checkpoints) are meant
to be read by other users and serving processes, so they get the ordinary permissions the umask allows
(0644 files, 0755 folders with the usual umask 022).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
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


def same_path(a: Any, b: Any) -> bool:
    """True when ``a`` and ``b`` (paths, ``~`` expanded) name the same file or folder: compared resolved when
    both exist, else as text with any trailing ``/`` dropped (Hub ids, moved folders)."""
    pa, pb = Path(os.path.expanduser(str(a))), Path(os.path.expanduser(str(b)))
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return str(a).rstrip("/") == str(b).rstrip("/")


_FINGERPRINTS: dict[tuple, str] = {}
_GGUF_HEAD = 16 * 2**20


def _weight_files(path: Path) -> list[Path]:
    """The weight files of a local base: the file itself (``.gguf``), else the folder's ``*.safetensors`` but an
    adapter's ``adapter_model*``."""
    if path.is_file():
        return [path]
    return sorted(f for f in path.glob("*.safetensors") if not f.name.startswith("adapter_model"))


def base_fingerprint(path: str | os.PathLike) -> Optional[str]:
    """A SHA-256 hex digest of a local base model's weights (None when ``path`` is not a local model).

    A folder: the names and bytes of its ``*.safetensors`` weight files; a ``.gguf`` file: its size and first
    16 MiB (header, metadata and the first tensors). Cached per process by path, size and mtime.
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        return None
    files = _weight_files(p.resolve())
    if not files:
        return None
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.name if p.is_dir() else ''}:{size}\n".encode())
            with open(f, "rb") as fh:
                left = min(size, _GGUF_HEAD) if f.suffix == ".gguf" else size
                while left > 0:
                    block = fh.read(min(left, 2**22))
                    if not block:
                        break
                    h.update(block)
                    left -= len(block)
        _FINGERPRINTS[key] = h.hexdigest()
    return _FINGERPRINTS[key]


def same_base(a: Any, b: Any) -> bool:
    """True when ``a`` and ``b`` name the same base model: the same path (or Hub id), or local models whose
    weight files have the same size and bytes (:func:`base_fingerprint`)."""
    if a is None or b is None:
        return False
    if same_path(a, b):
        return True
    pa, pb = Path(os.path.expanduser(str(a))), Path(os.path.expanduser(str(b)))
    if not (pa.exists() and pb.exists()) or pa.is_file() != pb.is_file():
        return False
    sizes = [sorted(f.stat().st_size for f in _weight_files(p.resolve())) for p in (pa, pb)]
    if sizes[0] != sizes[1] or not sizes[0]:
        return False
    return base_fingerprint(pa) == base_fingerprint(pb)


def read_json(path: str | Path, what: str = "", fix: str = "copy the file again from its source",
              missing: Optional[dict] = None) -> dict:
    """The JSON object in ``path``, or one :class:`~llmtune.errors.LLMTuneError` naming the file.

    Args:
        path: the file (UTF-8, a leading BOM dropped). what: the config key or role naming it in the message.
        fix: how to repair a file that is not valid JSON or not an object.
        missing: returned when ``path`` does not exist (None: a missing file is an error too).

    Returns: the decoded object (a ``dict``).

    Raises:
        LLMTuneError: a missing (unless ``missing`` is given) or unreadable file, bytes that are not UTF-8,
            text that is not JSON (message: line and column), or JSON that is not an object.
    """
    from llmtune.errors import LLMTuneError

    path = Path(path)
    if missing is not None and not path.exists():
        return missing
    label = f"{what}: " if what else ""
    if not path.exists():
        raise LLMTuneError(f"{label}{path}: no such file; {fix}")
    try:
        data = json.loads(read_text(path, what, fix=f"re-save it as UTF-8 or {fix}"))
    except json.JSONDecodeError as e:
        raise LLMTuneError(f"{label}{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                           f"{fix}") from None
    if not isinstance(data, dict):
        raise LLMTuneError(f"{label}{path}: expected a JSON object, found {type(data).__name__}; {fix}")
    return data


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (new names, renames) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """``fsync`` every file under ``folder``, then the folder itself (before it is published by a rename)."""
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


def publish_dir(tmp: str | Path, final: str | Path, *, replace_only: Optional[tuple[str, ...]] = None,
                keep: tuple[str, ...] = ()) -> None:
    """Publish the finished folder ``tmp`` (in the same file system) as ``final``, durably and atomically.

    Every file of ``tmp`` is flushed (:func:`fsync_tree`) first. A new ``final`` is one rename. An existing
    ``final`` is either swapped whole (``replace_only`` None: moved aside to ``tmp-old-<name>``, the rename,
    then the old folder removed, so a process killed at any moment leaves the old or the new folder under
    ``final``'s name, never half of one) or, with ``replace_only`` (glob patterns of the files a writer of ours
    owns, e.g. an export), updated file by file: each new file renamed in, the earlier files matching
    ``replace_only`` that the new one lacks removed, every other file (and the names in ``keep``) left as it was.

    Raises: ``OSError`` from the file system (a full or read-only disk), with nothing under ``final`` lost.
    """
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if not final.exists():
        os.replace(tmp, final)
    elif replace_only is None:
        old = final.parent / f"tmp-old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        new = {p.name for p in tmp.iterdir()}
        for p in sorted(tmp.iterdir()):
            os.replace(p, final / p.name)
        for p in final.iterdir():
            if p.is_file() and p.name not in new and p.name not in keep and any(
                    fnmatch.fnmatchcase(p.name, pat) for pat in replace_only):
                p.unlink()
        os.rmdir(tmp)
        fsync_dir(final)
    fsync_dir(final.parent)


def is_io_error(err: BaseException) -> bool:
    """True for a failure of the file system (``OSError``, or safetensors' I/O error) rather than of the data."""
    if isinstance(err, OSError):
        return True
    return type(err).__name__ == "SafetensorError" and ("IoError" in str(err) or "os error" in str(err).lower())


def io_reason(err: BaseException) -> str:
    """The short reason of an I/O failure for a one-line message: ``No space left on device``, ``Read-only file
    system``, ``Permission denied``, ``Disk quota exceeded`` (also when safetensors wraps them), else the
    error's first line."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err)
    for word, reason in (("StorageFull", "No space left on device"), ("No space", "No space left on device"),
                         ("ReadOnly", "Read-only file system"), ("Read-only", "Read-only file system"),
                         ("PermissionDenied", "Permission denied"), ("QuotaExceeded", "Disk quota exceeded")):
        if word in text:
            return reason
    return text.splitlines()[0][:200] if text else type(err).__name__

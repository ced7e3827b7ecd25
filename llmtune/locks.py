"""An exclusive lock on an output folder for the life of a run (``llmtune train`` / ``llmtune export``).

The lock is the file ``<folder>/.llmtune.lock`` holding the holder's pid and host as JSON. It is taken with
``fcntl.flock(LOCK_EX | LOCK_NB)`` on an open descriptor, which the kernel drops when the holder exits for
any reason (``kill -9`` included), so a lock left by a dead process is recovered by the next run without any
stale-pid guess. Where ``fcntl`` is missing (Windows), ``O_CREAT | O_EXCL`` creation is used and a file whose
pid is no longer alive is taken over.

A second run on a held folder fails at once with one :class:`~llmtune.errors.LLMTuneError` naming the folder
and the holder's pid. Source: POSIX ``flock(2)`` / ``open(2)`` semantics.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Optional

from llmtune.errors import LLMTuneError

LOCK_NAME = ".llmtune.lock"

try:  # pragma: no cover - platform
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """Exclusive lock on ``folder`` (created if missing); use as a context manager or call
    :meth:`acquire` / :meth:`release`.

    Args:
        folder: the output folder to lock.
        key: the config key or flag that named it (``output_dir``, ``export_dir``), used in messages.

    Raises (from :meth:`acquire`):
        LLMTuneError: another live process holds the folder; the folder cannot be created or written
            (read-only file system, permission denied).

    Re-entrant within one process: acquiring a folder this process already holds is a no-op counted once.
    """

    _held: dict[str, "FolderLock"] = {}

    def __init__(self, folder: str | os.PathLike, key: str = "output_dir") -> None:
        self.folder = Path(folder).expanduser()
        self.key = key
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None
        self._created_folder = False
        self._nested = False

    def acquire(self) -> "FolderLock":
        """Take the lock (see class docstring)."""
        if self.folder.exists() and not self.folder.is_dir():
            raise LLMTuneError(f"{self.key}: {self.folder} is a file; give a folder path")
        real = str(self.folder.resolve())
        if real in FolderLock._held:
            self._nested = True
            return self
        if not self.folder.exists():
            try:
                self.folder.mkdir(parents=True)
                self._created_folder = True
            except FileExistsError:  # another run created it first: the lock below decides
                pass
            except OSError as err:
                raise self._unwritable(err) from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | (0 if fcntl else os.O_EXCL), 0o644)
            except FileExistsError:  # no fcntl: an O_EXCL file exists
                holder = self._holder()
                if holder is not None and _pid_alive(holder):
                    raise self._busy(holder) from None
                self.path.unlink(missing_ok=True)  # its holder is dead: take it over
                continue
            except OSError as err:
                raise self._unwritable(err) from None
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._busy(self._holder()) from None
            try:  # the holder may have released and unlinked the file between our open and flock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        FolderLock._held[real] = self
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        except OSError as err:  # e.g. a full disk: undo everything, one line
            self.release()
            raise self._unwritable(err) from None
        return self

    def _unwritable(self, err: OSError) -> LLMTuneError:
        return LLMTuneError(f"{self.key}: cannot write to {self.folder} ({err.strerror}); choose a folder you can "
                            "write to, or free space on its disk")

    def _holder(self) -> Optional[int]:
        try:
            return int(json.loads(self.path.read_text(encoding="utf-8"))["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _busy(self, pid: Optional[int]) -> LLMTuneError:
        who = f"process {pid}" if pid else "another process"
        return LLMTuneError(f"{self.key}: {self.folder} is in use by {who} (another llmtune run writing there); "
                            f"wait for it to finish or choose another {self.key}")

    def release(self) -> None:
        """Drop the lock and remove the lock file (and the folder, if this lock created it and it is empty)."""
        if self._nested or self._fd is None:
            return
        FolderLock._held.pop(str(self.folder.resolve()), None)
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        if self._created_folder:
            try:
                self.folder.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output(folder: Optional[str | os.PathLike], key: str = "output_dir"):
    """The lock of an output folder for the main process (``RANK`` 0 or unset); a no-op context on other
    ranks of a ``torchrun`` job (rank 0 writes) and when ``folder`` is None."""
    import contextlib

    if folder is None or int(os.environ.get("RANK", "0") or 0) != 0:
        return contextlib.nullcontext()
    return FolderLock(folder, key)


def lock_folder(folder: str | os.PathLike, key: str = "output_dir") -> FolderLock:
    """``FolderLock(folder, key)`` (a context manager); see :class:`FolderLock`."""
    return FolderLock(folder, key)

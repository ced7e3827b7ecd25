"""Which files in an ``output_dir`` a run of ours wrote: the manifest ``.llmtune_outputs.json``.

``overwrite_output_dir`` may remove only what an llmtune run wrote. A file is known to be ours when

* the manifest lists it with its size and SHA-256 and its content still has that hash (the log
  ``trainer_log.jsonl`` grows by appending: its first recorded bytes must still hash to the record), or
* it is a ``checkpoint-N`` folder holding an llmtune ``trainer_state.json`` (integer ``global_step``) and
  ``trainable.safetensors``, or a ``tmp-checkpoint-N`` / ``tmp-old-checkpoint-N`` leftover of our atomic
  save, or
* it is ``trainer_log.jsonl`` whose every line is a JSON object with ``current_steps`` (a run killed
  before it could write the manifest).

Anything else carrying a name a run writes (a saved model's ``config.json``, ``model.safetensors`` or
tokenizer files, a project's ``config.json``) is *foreign*: the run is refused with the list, and nothing
is removed (:func:`check_no_foreign_files`). Files with other names are never touched.

The manifest is written by :func:`record_outputs` at the end of each run (also one that failed or was
interrupted), for the files the run created or changed (compared with :func:`snapshot` taken at its start).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Optional

from llmtune.errors import LLMTuneError

MANIFEST = ".llmtune_outputs.json"
LOG_NAME = "trainer_log.jsonl"
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")
_TMP = ("tmp-checkpoint-", "tmp-old-checkpoint-")


def _sha256(path: Path, limit: Optional[int] = None) -> str:
    """SHA-256 (hex) of the file, or of its first ``limit`` bytes."""
    h, left = hashlib.sha256(), limit
    with path.open("rb") as f:
        while left is None or left > 0:
            chunk = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def read_manifest(out: Path) -> dict:
    """``{file name: {"size": bytes, "sha256": hex}}`` from ``out/.llmtune_outputs.json`` (``{}`` when absent
    or unreadable: then no file counts as recorded)."""
    try:
        data = json.loads((Path(out) / MANIFEST).read_text(encoding="utf-8"))
        files = data.get("files", {}) if isinstance(data, dict) else {}
        return {k: v for k, v in files.items() if isinstance(v, dict)}
    except (OSError, ValueError):
        return {}


def snapshot(out: Path, patterns: Iterable[str]) -> dict[str, tuple[int, int]]:
    """``{name: (size, mtime_ns)}`` of the files in ``out`` whose names a run writes: taken at a run's start,
    so :func:`record_outputs` records only what the run itself created or changed."""
    out = Path(out)
    if not out.is_dir():
        return {}
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.iterdir()
            if p.is_file() and _matches(p.name, patterns)}


def record_outputs(out: Path, patterns: Iterable[str], before: dict[str, tuple[int, int]]) -> dict:
    """Add to the manifest every file in ``out`` matching ``patterns`` that is new or changed since ``before``
    (:func:`snapshot`), with its size and SHA-256; drop entries whose file is gone. Returns the manifest."""
    from llmtune.fileio import write_json

    out = Path(out)
    files = {k: v for k, v in read_manifest(out).items() if (out / k).is_file()}
    for p in sorted(out.iterdir()) if out.is_dir() else []:
        if p.is_file() and _matches(p.name, patterns):
            st = p.stat()
            if before.get(p.name) != (st.st_size, st.st_mtime_ns):
                files[p.name] = {"size": st.st_size, "sha256": _sha256(p)}
    if files != read_manifest(out) or not (out / MANIFEST).is_file():   # a run that wrote nothing changes nothing
        write_json(out / MANIFEST, {"written_by": "llmtune", "files": files})
    return files


def _log_is_ours(path: Path) -> bool:
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return all(isinstance(r := json.loads(line), dict) and "current_steps" in r for line in lines)
    except (OSError, ValueError):
        return False


def _checkpoint_is_ours(p: Path) -> bool:
    try:
        state = json.loads((p / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(state, dict) and isinstance(state.get("global_step"), int)
            and (p / "trainable.safetensors").is_file())


def classify(out: Path, patterns: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(ours, foreign)``: names in ``out`` a run of ours wrote (removable by ``overwrite_output_dir``) and
    names a run writes that no run of ours is known to have written (see the module docstring)."""
    out = Path(out)
    ours, foreign = [], []
    if not out.is_dir():
        return ours, foreign
    record = read_manifest(out)
    for p in sorted(out.iterdir()):
        if p.is_dir():
            if p.name.startswith(_TMP) or (_CHECKPOINT.match(p.name) and _checkpoint_is_ours(p)):
                ours.append(p.name)
            elif _CHECKPOINT.match(p.name) and (p / "trainer_state.json").exists():   # another trainer's
                foreign.append(p.name + "/")
            continue
        if not p.is_file() or not _matches(p.name, patterns):
            continue
        rec = record.get(p.name)
        size = p.stat().st_size
        if rec is not None and isinstance(rec.get("size"), int):
            if p.name == LOG_NAME:
                known = size >= rec["size"] and _sha256(p, rec["size"]) == rec.get("sha256")
            else:
                known = size == rec["size"] and _sha256(p) == rec.get("sha256")
        else:
            known = p.name == LOG_NAME and _log_is_ours(p)
        (ours if known else foreign).append(p.name)
    return ours, foreign


def check_no_foreign_files(out: Path, patterns: Iterable[str]) -> list[str]:
    """The names ``overwrite_output_dir`` may remove in ``out``.

    Raises:
        LLMTuneError: ``out`` holds files with names a run writes that no llmtune run recorded writing (a
            saved model, a project's ``config.json``, a file edited since): naming them; nothing is removed.
    """
    ours, foreign = classify(out, patterns)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise LLMTuneError(
            f"overwrite_output_dir: {out} holds files that no llmtune run recorded writing ({shown}); they are "
            f"not removed: move them out of the folder or choose a new output_dir (only files listed in "
            f"{MANIFEST} with unchanged content, and checkpoint-N folders, are replaced)")
    return ours


#: file names (glob patterns) a training run of ours writes into ``output_dir``
RUN_OUTPUTS = ("trainer_log.jsonl", "adapter_config.json", "adapter_model.safetensors", "model.safetensors",
               "model-*-of-*.safetensors", "model.safetensors.index.json", "value_head.safetensors", "config.json",
               "generation_config.json", "train_results.json", "eval_results.json", "all_results.json",
               "training_args.yaml", "llmtune.json", "generated_predictions.jsonl", "predict_results.json",
               "training_*.png",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def clear_previous_run(output_dir: str | os.PathLike, patterns: tuple = RUN_OUTPUTS) -> list[str]:
    """Remove what an earlier run of ours wrote in ``output_dir`` (``overwrite_output_dir``), nothing else.

    Removed: files whose names match ``patterns`` (:data:`RUN_OUTPUTS`) and that the run's manifest records
    with unchanged content, ``checkpoint-N`` folders of ours and ``tmp-checkpoint-N`` leftovers
    (:func:`llmtune.train.manifest.classify`). Any other file or folder is kept. Call it only once the config,
    model, adapters and data have all been checked (so a typo never costs a run), while holding the folder's
    lock. Returns the removed names.

    Raises:
        LLMTuneError: the folder holds files with a name a run writes that no run of ours recorded writing
            (nothing is removed then).
    """
    out = Path(output_dir)
    removed = check_no_foreign_files(out, patterns)
    for name in removed:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    if removed and (out / MANIFEST).is_file():
        (out / MANIFEST).unlink()
    return removed


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Remove ``tmp-checkpoint-N`` / ``tmp-old-checkpoint-N`` folders left by a run killed while saving.

    Called at the start of a run (the caller holds the folder's lock, :mod:`llmtune.locks`, so no other
    run is writing them). Returns the removed folders.
    """
    out = Path(output_dir)
    gone = []
    if out.is_dir():
        for p in out.iterdir():
            if p.is_dir() and (p.name.startswith("tmp-checkpoint-") or p.name.startswith("tmp-old-checkpoint-")):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


__all__ = ["MANIFEST", "read_manifest", "snapshot", "record_outputs", "classify", "check_no_foreign_files", "RUN_OUTPUTS",
           "clear_previous_run", "remove_stale_temporaries"]

"""On-disk cache of tokenized datasets (JSON, never pickle).

Key: SHA-256 of a JSON description of everything the encoded rows depend on: the dataset entry, each data
file's absolute path, size and content hash, the tokenizer (name, vocab size, special ids and the ids of a probe
text), the template (its definition, or the Jinja source), the stage, ``cutoff_len`` and the encoding options.
Any change gives a new file; ``overwrite_cache`` rebuilds. Files: ``<cache_dir>/<dataset>-<key16>.json``
holding ``{"key", "rows", "stats"}``, written to a temporary name then renamed (atomic).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

_PROBE = "Hello, world! 123 <|im_start|> \n\t ünïcode 漢字"
CACHE_VERSION = 2


def default_cache_dir() -> Path:
    """``$LLMTUNE_CACHE/datasets`` or ``$XDG_CACHE_HOME/llmtune/datasets`` or ``~/.cache/llmtune/datasets``."""
    root = os.environ.get("LLMTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "llmtune")
    return Path(root) / "datasets"


def tokenizer_fingerprint(tok) -> dict:
    """What identifies a tokenizer's encoding (no vocabulary dump needed)."""
    return {"name": str(getattr(tok, "name_or_path", "")), "vocab_size": getattr(tok, "vocab_size", None),
            "bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": getattr(tok, "pad_token_id", None),
            "probe": list(tok.encode(_PROBE, add_special_tokens=False))}


def template_fingerprint(template) -> Any:
    """The template's definition (built-in fields, or the Jinja source) plus its stop ids."""
    if dataclasses.is_dataclass(template):
        fields = {f.name: repr(getattr(template, f.name)) for f in dataclasses.fields(template)
                  if f.name not in ("tokenizer", "_stop_ids")}
    else:
        src = getattr(template.tokenizer, "chat_template", "") or ""
        fields = {"jinja": hashlib.sha256(str(src).encode()).hexdigest(),
                  "tool_format": template.tool_format, "default_system": template.default_system}
    return {"fields": fields, "stop": list(template.stop_token_ids)}


#: files up to this size are hashed whole; a larger one by :data:`SAMPLES` evenly spaced 1 MiB pieces + its size
FULL_HASH_BYTES = 256 << 20
SAMPLES = 64


def content_hash(path: Path) -> str:
    """SHA-256 (hex) of the file's bytes (files over :data:`FULL_HASH_BYTES`: of its size and 64 evenly spaced
    1 MiB pieces, first and last included), so an edit that keeps the size and the mtime is still seen."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            for i in range(SAMPLES):
                f.seek((size - (1 << 20)) * i // (SAMPLES - 1))
                h.update(f.read(1 << 20))
    return h.hexdigest()


def file_fingerprint(paths) -> list:
    """``[(absolute path, size, content hash), ...]`` of the data files (:func:`content_hash`; not the mtime:
    an edit that keeps size and mtime, e.g. a copy with ``cp -p``, still gives a new key)."""
    return [[str(Path(p).resolve()), Path(p).stat().st_size, content_hash(Path(p))] for p in paths]


def cache_key(description: dict) -> str:
    """SHA-256 hex digest of ``description`` serialised as sorted-key JSON."""
    blob = json.dumps({"v": CACHE_VERSION, **description}, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _path(cache_dir: Path, name: str, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name)[:60]
    return Path(cache_dir) / f"{safe}-{key[:16]}.json"


def load(cache_dir: Path, name: str, key: str) -> Optional[dict]:
    """The cached payload ``{"rows", "stats"}`` for ``key``, or None (absent, unreadable or another key)."""
    path = _path(cache_dir, name, key)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return payload if payload.get("key") == key else None


def save(cache_dir: Path, name: str, key: str, rows: list, stats: dict) -> None:
    """Write the payload atomically; a cache that cannot be written is skipped silently (it is only a cache)."""
    path = _path(cache_dir, name, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "rows": rows, "stats": stats}, separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass

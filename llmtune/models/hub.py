"""Resolve ``name_or_path`` (local folder, ``.gguf`` file, or Hugging Face Hub repo id) to a local path.

Hub downloads use ``huggingface_hub.snapshot_download`` restricted to config, safetensors, tokenizer,
generation-config and adapter files (never pickled ``*.bin``/``*.pt`` weights). Source: the Hugging Face
Hub repository layout (``config.json``, ``model.safetensors[.index.json]``, ``tokenizer.json``, ...).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llmtune.errors import LLMTuneError

#: files fetched from the Hub (safetensors only: llmtune never unpickles).
HUB_ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "adapter_config.json", "training_args.yaml",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """True when ``name`` has the form ``owner/repo`` (and is not an existing local path)."""
    return bool(_REPO_ID.match(name)) and not name.startswith((".", "/")) and not name.endswith(".gguf")


def resolve_path(name_or_path: str | os.PathLike, revision: str | None = None, what: str = "model_name_or_path"
                 ) -> Path:
    """Return an existing local path for ``name_or_path``.

    Order: an existing local file/folder (``~`` expanded); else, when it looks like ``owner/repo``, a Hub
    snapshot (``revision`` = branch, tag or commit; cached under ``HF_HOME``; offline mode uses the cache).

    Args:
        name_or_path: local folder, ``.gguf`` file, or Hub repo id.
        revision: Hub revision (ignored for local paths).
        what: the config key named in error messages.

    Raises:
        LLMTuneError: the path does not exist and is not a downloadable Hub repo (offline, unknown repo,
            no network), with the reason.
    """
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.exists():
        return path.resolve()
    name = str(name_or_path)
    if not is_hub_id(name):
        raise LLMTuneError(f"{what} {name!r}: no such file or folder (give a local model folder, a .gguf "
                           "file, or a Hugging Face Hub repo id like 'HuggingFaceTB/SmolLM2-135M-Instruct')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise LLMTuneError(f"{what} {name!r}: not a local path, and huggingface_hub is not installed to "
                           "download it (pip install huggingface_hub)") from None
    try:
        local = snapshot_download(name, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS)
    except Exception as e:  # noqa: BLE001 - offline, 404, 401, connection errors all end here
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (" HF_HUB_OFFLINE is set and the repo is not in the local cache;" if offline else "")
        raise LLMTuneError(
            f"{what} {name!r}: not a local path, and downloading it from the Hugging Face Hub failed "
            f"({type(e).__name__}).{hint} Check the spelling and your network, or download the model and "
            "pass its local folder") from None
    return Path(local)

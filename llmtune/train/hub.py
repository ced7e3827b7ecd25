"""``push_to_hub``: upload a finished run's output folder to the Hugging Face Hub.

What is uploaded is what the output folder holds for its user (the adapter or model, the run record, the
tokenizer, the logs and plots), without the resume state (``checkpoint-N``, ``tmp-checkpoint-N``) and llmtune's
own bookkeeping (``.llmtune.lock``, ``.llmtune_outputs.json``). Source: huggingface_hub's ``HfApi.create_repo``
(``exist_ok=True``) and ``HfApi.upload_folder`` (one commit, ``ignore_patterns`` as fnmatch globs), the calls
the Hugging Face Trainer's ``push_to_hub`` makes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmtune.config.checks import check_hub_model_id
from llmtune.errors import LLMTuneError, notice

#: left out of the upload: resume state and llmtune's bookkeeping files
IGNORE_PATTERNS = ["checkpoint-*", "tmp-checkpoint-*", "**/checkpoint-*", ".llmtune*", "*.lock"]


def check_ready(cfg: Any) -> None:
    """Before training: ``push_to_hub`` needs ``hub_model_id``, Hub access (not ``HF_HUB_OFFLINE``) and a token,
    so a run does not learn of a missing login only after it trained.

    Raises:
        LLMTuneError: one line naming ``push_to_hub``/``hub_model_id`` and what to do.
    """
    if not cfg.hub_model_id:
        raise LLMTuneError("push_to_hub: true needs hub_model_id (the Hub repo to upload to, owner/name); set it, "
                           "or push_to_hub false")
    check_hub_model_id(cfg.hub_model_id)
    if os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no", "off"):
        raise LLMTuneError("push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or set "
                           "push_to_hub false (and upload later: hf upload REPO OUTPUT_DIR)")
    from huggingface_hub import get_token

    if not get_token():
        raise LLMTuneError("push_to_hub: no Hugging Face token (HF_TOKEN, or `hf auth login`); log in, or set "
                           "push_to_hub false")


def push_output(cfg: Any, out: Path) -> str:
    """Upload ``out`` to the Hub repo ``cfg.hub_model_id`` (created when missing, with the Hub's default
    visibility) in one commit; returns the commit URL.

    Raises:
        LLMTuneError: the repo cannot be created or the upload fails (no network, no write access), naming
            the repo and the kept output folder, with the command to upload it later.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    repo = str(cfg.hub_model_id)
    message = f"llmtune train: stage {cfg.stage}, {cfg.finetuning_type}"
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(out),
                                 ignore_patterns=IGNORE_PATTERNS, commit_message=message)
    except Exception as e:  # noqa: BLE001 - network, auth and HTTP errors all end here, as one line
        why = type(e).__name__ + (f": {str(e).splitlines()[0][:200]}" if str(e).strip() else "")
        raise LLMTuneError(f"push_to_hub: uploading {out} to {repo} failed ({why}); the run is saved in {out}: "
                           f"upload it later with `hf upload {repo} {out}`") from None
    url = str(getattr(info, "commit_url", None) or info)
    notice(f"push_to_hub: uploaded {out} to {repo} ({url})")
    return url


__all__ = ["IGNORE_PATTERNS", "check_ready", "push_output"]

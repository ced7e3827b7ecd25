"""Read the raw rows of a dataset: local files (json, jsonl, csv, txt, parquet) or the Hugging Face Hub.

Formats: ``.json`` a JSON list of objects (JSON Lines in a ``.json`` file are accepted too), ``.jsonl`` one
object per line, ``.csv`` a header row then rows (all values strings), ``.txt`` one document per non-empty line
(rows ``{"text": line}``), ``.parquet`` via pyarrow when installed. A folder holds several such files (read in
name order, concatenated). Hub datasets (``hf_hub_url``) are fetched with
``huggingface_hub.snapshot_download(repo_type="dataset")`` and their json/jsonl/parquet/csv/txt files read.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from llmtune.data.registry import DATA_SUFFIXES, DatasetAttr
from llmtune.errors import LLMTuneError
from llmtune.fileio import read_text


def data_files(attr: DatasetAttr) -> list[Path]:
    """The local files of ``attr`` (downloading hub datasets first).

    Raises:
        LLMTuneError: missing file/folder (names dataset, path and dataset_dir), Hub unreachable, ModelScope /
            Modelers / script / cloud entries (not supported: register a local file instead).
    """
    if attr.load_from == "file":
        path = Path(attr.path)
        if not path.is_absolute():
            path = Path(attr.dataset_dir) / path
        if not path.exists():
            raise LLMTuneError(f"dataset {attr.name!r}: file {str(path)!r} not found (file_name {attr.path!r} is "
                               f"read from dataset_dir {str(attr.dataset_dir)!r}); put the file there or fix "
                               "file_name / dataset_dir.")
        files = _collect(path)
        if not files:
            raise LLMTuneError(f"dataset {attr.name!r}: folder {str(path)!r} holds no {'/'.join(DATA_SUFFIXES)} files.")
        return files
    if attr.load_from == "hf_hub":
        return _hub_files(attr)
    if attr.load_from in ("ms_hub", "om_hub"):
        hub = "ModelScope" if attr.load_from == "ms_hub" else "Modelers"
        raise LLMTuneError(f"dataset {attr.name!r} is only on {hub} ({attr.path}), which llmtune does not download "
                           "from; download it yourself and register the local file with file_name in "
                           "dataset_info.json.")
    raise LLMTuneError(f"dataset {attr.name!r}: loading from {attr.load_from} ({attr.path}) is not supported; "
                       "register a local file with file_name in dataset_info.json.")


def _collect(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                  and not p.name.startswith(".") and p.name != "dataset_info.json")


def _hub_files(attr: DatasetAttr) -> list[Path]:
    offline_msg = (f"dataset {attr.name!r} is hosted on the Hugging Face Hub ({attr.path}) and the Hub can't be "
                   "reached{why}; run once with network access (it is then cached), or download the files and "
                   "register them with file_name in dataset_info.json.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - a dependency
        raise LLMTuneError(offline_msg.format(why=" (huggingface_hub is not installed)")) from err
    try:
        local = Path(snapshot_download(repo_id=attr.path, repo_type="dataset",
                                       allow_patterns=["*" + s for s in DATA_SUFFIXES] + ["**/*" + s for s in DATA_SUFFIXES]))
    except Exception as err:  # noqa: BLE001 - offline, missing repo, network: one clear message
        why = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") else \
            f" ({type(err).__name__})"
        raise LLMTuneError(offline_msg.format(why=why)) from err
    root = local / attr.folder if attr.folder else local
    files = _collect(root)
    if attr.subset:
        sub = [f for f in files if attr.subset in f.relative_to(root).parts or f.stem.startswith(attr.subset)]
        files = sub or files
    split = [f for f in files if attr.split in f.stem or attr.split in f.relative_to(root).parts]
    files = split or files
    if not files:
        raise LLMTuneError(f"dataset {attr.name!r}: the Hub repository {attr.path} holds no "
                           f"{'/'.join(DATA_SUFFIXES)} files llmtune can read.")
    return files


def read_file(path: Path) -> list[dict]:
    """Rows of one data file as a list of dicts (see the module docstring for the formats).

    Raises:
        LLMTuneError: bytes that are not UTF-8 (file, byte offset), malformed JSON (file and line), a JSON file
            that is not a list of objects, malformed CSV, parquet without pyarrow or damaged, another extension.
    """
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".csv", ".json", ".jsonl", ".parquet"):
        raise LLMTuneError(f"{path}: llmtune reads dataset files ending in .json, .jsonl, .csv, .parquet or .txt, "
                           f"not {suffix or 'a name without an extension'}; rename or convert the file (an "
                           "NDJSON file is .jsonl) and fix file_name in dataset_info.json")
    if suffix in (".txt", ".csv", ".json", ".jsonl"):
        text = read_text(path, "dataset", "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or remove "
                         "those bytes")
    if suffix == ".txt":
        return [{"text": line.rstrip("\r")} for line in text.split("\n") if line.strip()]
    if suffix == ".csv":
        try:
            return [dict(r) for r in csv.DictReader(io.StringIO(text, newline=""))]
        except csv.Error as err:
            raise LLMTuneError(f"{path}: invalid CSV ({err}); fix the file or convert it to .jsonl.") from None
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise LLMTuneError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow), or convert "
                               "the file to .jsonl.") from err
        try:
            return pq.read_table(path).to_pylist()
        except Exception as err:  # noqa: BLE001 - pyarrow's errors for a damaged file: one line naming it
            raise LLMTuneError(f"{path}: not a readable parquet file ({str(err).splitlines()[0][:160]}); replace "
                               "it or convert it to .jsonl.") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg.startswith("Extra data"):
                return _read_jsonl(path, text)
            raise LLMTuneError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}.") from err
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) == 1:
                data = lists[0]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise LLMTuneError(f"{path}: expected a JSON list of objects (one per example).")
        return data
    return _read_jsonl(path, text)


def _read_jsonl(path: Path, text: str) -> list[dict]:
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise LLMTuneError(f"{path}: invalid JSON at line {i}, column {err.colno}: {err.msg}.") from err
        if not isinstance(row, dict):
            raise LLMTuneError(f"{path}: line {i} is not a JSON object.")
        rows.append(row)
    return rows


def load_rows(attr: DatasetAttr) -> tuple[list[dict], list[Path]]:
    """All rows of ``attr`` (files concatenated) and the files they came from."""
    files = data_files(attr)
    rows: list[dict] = []
    for f in files:
        rows += read_file(f)
    return rows, files

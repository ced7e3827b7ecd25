"""report_to trackers (llmtune/train/reporters.py): TensorBoard, wandb (offline) and MLflow (file store) with the
real packages, read back through each library's own reader and compared with trainer_log.jsonl."""

from __future__ import annotations

import json

import pytest

from test_train_run import base_cfg, data_dir, tiny_folder  # noqa: F401  (fixtures)

from llmtune.errors import LLMTuneError
from llmtune.train import reporters
from llmtune.train.reporters import resolve_report_to


def test_report_to_values():
    assert resolve_report_to("none") == [] and resolve_report_to(None) == []
    with pytest.raises(LLMTuneError, match="report_to: 'swanlab' is not supported"):
        resolve_report_to("swanlab")


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(reporters, "_installed", lambda b: b != "wandb")
    with pytest.raises(LLMTuneError, match=r"pip install 'llmtune\[wandb\]'"):
        resolve_report_to("mlflow,wandb")
    assert resolve_report_to("all") == ["mlflow", "tensorboard"]
    assert resolve_report_to(["MLflow", "tensorboard"]) == ["mlflow", "tensorboard"]


def test_config_accepts_the_backends(tiny_folder, data_dir, tmp_path):  # noqa: F811
    from llmtune.config import parse_config

    cfg = parse_config(base_cfg(tiny_folder, data_dir, tmp_path / "o", report_to="wandb,mlflow"), command="train")
    assert cfg.report_to == "wandb,mlflow"
    with pytest.raises(LLMTuneError, match="report_to"):
        parse_config(base_cfg(tiny_folder, data_dir, tmp_path / "o", report_to="comet"), command="train")


def _losses(out):
    return [(r["current_steps"], r["loss"]) for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
            if "loss" in r]


def test_tensorboard_wandb_offline_and_mlflow_file_store(tiny_folder, data_dir, tmp_path, monkeypatch):  # noqa: F811
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed")
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    import llmtune

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "llmtune-test")
    (tmp_path / "wb").mkdir()
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "llmtune-test")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    out = tmp_path / "run"
    llmtune.train(base_cfg(tiny_folder, data_dir, out, report_to="tensorboard,wandb,mlflow"))
    expected = _losses(out)
    assert len(expected) == 4

    # TensorBoard: the event file, read by tensorboard's own accumulator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "runs"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)

    # MLflow: the file store, read by MlflowClient; params carry the config
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("llmtune-test")
    (run,) = client.search_runs([exp.experiment_id])
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert [s for s, _ in hist] == [s for s, _ in expected]
    assert [v for _, v in hist] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert run.data.params["lora_rank"] == "4" and run.info.run_name == "run"
    assert run.info.status == "FINISHED"

    # wandb offline: one offline run folder under WANDB_DIR; its .wandb transaction log read back record by record
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (log,) = runs[0].glob("run-*.wandb")
    history, config = _wandb_records(log)
    got = [(s, h["train/loss"]) for s, h in history if "train/loss" in h]
    assert [s for s, _ in got] == [s for s, _ in expected], history
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert config["lora_rank"] in (4, {"value": 4}), config
    assert wandb.run is None  # the run was finished


def _wandb_records(path):
    """(history [(step, {key: value})], config {key: value}) of a .wandb file: a LevelDB-format log (a 7-byte
    ':W&B' header, then 32 KiB blocks of records: crc32 (4), length (2, little-endian), type (1: full,
    2: first, 3: middle, 4: last), data) whose records are wandb's protobuf ``Record`` messages."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, chunks = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:
            chunks.append(chunk)
        elif kind in (2, 3):
            buf = chunk if kind == 2 else buf + chunk
        elif kind == 4:
            chunks.append(buf + chunk)
    history, config = [], {}
    for chunk in chunks:
        rec = pb.Record()
        rec.ParseFromString(chunk)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append((rec.history.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                                   for i in rec.history.item}))
        elif kind == "run":
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                           for i in rec.run.config.update})
    return history, config

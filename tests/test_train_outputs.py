"""Output-folder rules of run_train and the notebook API (no model needed)."""

from __future__ import annotations

import hashlib

import pytest

from llmtune.config import parse_config
from llmtune.errors import LLMTuneError
from llmtune.train.checkpoint import clear_for_overwrite
from llmtune.train.outputs import prepare_output_dir


def cfg(tmp_path, **kw):
    base = dict(stage="sft", model_name_or_path=str(tmp_path / "model"), dataset="x", output_dir=str(tmp_path / "out"))
    base.update(kw)
    return parse_config(base, command="train")


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def previous_run(out):
    out.mkdir(parents=True)
    (out / "adapter_model.safetensors").write_bytes(b"weights")
    (out / "trainer_log.jsonl").write_text('{"current_steps": 1, "loss": 2.0}\n')
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
    (out / "checkpoint-5" / "trainable.safetensors").write_bytes(b"weights")
    record(out)


def record(out):
    """The run's manifest (issue 25: overwrite_output_dir removes only files a run of ours recorded writing)."""
    from llmtune.train.manifest import RUN_OUTPUTS, record_outputs

    record_outputs(out, RUN_OUTPUTS, {})


def test_output_dir_with_a_previous_run_is_an_error_and_nothing_is_touched(tmp_path):
    out = tmp_path / "out"
    previous_run(out)
    before = snapshot(out)
    with pytest.raises(LLMTuneError) as err:
        prepare_output_dir(cfg(tmp_path))
    msg = str(err.value)
    assert str(out) in msg and "overwrite_output_dir" in msg and "resume_from_checkpoint" in msg
    assert snapshot(out) == before


def test_overwrite_output_dir_clears_old_checkpoints_and_log(tmp_path, capsys):
    out = tmp_path / "out"
    previous_run(out)
    c = cfg(tmp_path, overwrite_output_dir=True)
    before = snapshot(out)
    prepare_output_dir(c)
    assert snapshot(out) == before  # issue 15: nothing is removed before the model and data have loaded
    clear_for_overwrite(c, out)
    assert not (out / "checkpoint-5").exists() and not (out / "trainer_log.jsonl").exists()
    assert "overwrite_output_dir" in capsys.readouterr().err


def test_overwrite_output_dir_removes_the_previous_runs_files_and_keeps_the_users(tmp_path):
    out = tmp_path / "out"
    previous_run(out)
    old = ["model.safetensors", "model-00001-of-00002.safetensors", "eval_results.json", "value_head.safetensors",
           "training_loss.png", "adapter_config.json"]
    for name in old:
        (out / name).write_bytes(b"old")
    (out / "my_notes.txt").write_text("keep me")
    (out / "data").mkdir()
    (out / "data" / "eval_results.json").write_text("{}")
    record(out)
    c = cfg(tmp_path, overwrite_output_dir=True)
    prepare_output_dir(c)
    clear_for_overwrite(c, out)
    assert not any((out / name).exists() for name in old + ["adapter_model.safetensors"])
    assert (out / "my_notes.txt").read_text() == "keep me" and (out / "data" / "eval_results.json").is_file()


def test_resume_accepts_a_non_empty_output_dir(tmp_path):
    out = tmp_path / "out"
    previous_run(out)
    before = snapshot(out)
    assert prepare_output_dir(cfg(tmp_path, resume_from_checkpoint="true")) == out
    assert snapshot(out) == before


def test_empty_or_new_output_dir_is_fine_and_a_file_is_not(tmp_path):
    assert prepare_output_dir(cfg(tmp_path)).is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(LLMTuneError, match="is a file"):
        prepare_output_dir(cfg(tmp_path, output_dir=str(tmp_path / "f")))


def test_llmtune_train_is_callable_after_submodule_imports():
    import llmtune
    import llmtune.train.trainer  # noqa: F401  (binds llmtune.train to the package)

    assert callable(llmtune.train)
    with pytest.raises(LLMTuneError, match="model_name_or_path"):
        llmtune.train({"stage": "sft", "dataset": "x", "output_dir": "o"})


def test_output_dir_that_the_run_reads_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "out"
    previous_run(out)
    before = snapshot(out)
    for key in ("adapter_name_or_path", "model_name_or_path"):
        with pytest.raises(LLMTuneError, match=f"the {key} folder"):
            prepare_output_dir(cfg(tmp_path, overwrite_output_dir=True, **{key: f"{tmp_path / 'x'},{out}"
                                                                             if key == "adapter_name_or_path"
                                                                             else str(out)}))
    assert snapshot(out) == before

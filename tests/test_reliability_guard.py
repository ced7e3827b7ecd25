"""The finite-loss guard, strict JSON logs, checkpoint rotation, overwrite rules, locks and small no-op fixes
(issue 15). A NaN is injected by a wrapping stage at a chosen step, so the expected behaviour is known by
construction (hand-computed references: which step is named, which weights must stay bit-equal)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmtune.errors import LLMTuneError
from llmtune.train import checkpoint as ckpt
from llmtune.train.stages.causal_lm import causal_lm_stage
from llmtune.train.trainer import Trainer
from config_helpers import make_config
from tiny_helpers import rows, tiny_model


def config(tmp_path, **kw):
    base = dict(stage="sft", output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                gradient_accumulation_steps=1, learning_rate=1e-2, max_steps=4, logging_steps=1, save_steps=1000,
                seed=7, lr_scheduler_type="constant", report_to="none", disable_tqdm=True)
    base.update(kw)
    return make_config(**base)


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def poisoned_stage(bad_step: int, kind: str = "loss"):
    """The sft stage, except that optimizer step ``bad_step`` (1-based) gets a NaN loss or an inf gradient."""
    def stage(model, batch, ctx):
        loss, n, metrics = causal_lm_stage(model, batch, ctx)
        if ctx.global_step + 1 == bad_step and ctx.training:
            loss = loss * float("nan") if kind == "loss" else _InfGrad.apply(loss)
        return loss, n, metrics
    stage.count_items = None
    return stage


def strict_records(path):
    def refuse(token):
        raise AssertionError(f"non-strict JSON token {token}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


def trainable(model):
    return {k: v.clone() for k, v in ckpt.trainable_state_dict(model).items()}


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_non_finite_step_stops_the_run_naming_the_step_and_the_last_finite_checkpoint(tmp_path, kind):
    model = tiny_model()
    tr = Trainer(model, config(tmp_path, max_steps=6, save_steps=2), rows([6] * 12), stage=poisoned_stage(5, kind))
    with pytest.raises(LLMTuneError) as err:
        tr.train()
    msg = str(err.value)
    out = tmp_path / "out"
    assert msg.startswith("step 5:") and str(out / "checkpoint-4") in msg and "nonfinite_policy: skip" in msg
    assert "\n" not in msg
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step never reached the weights
    strict_records(out / "trainer_log.jsonl")


def test_skip_policy_drops_exactly_the_bad_step(tmp_path, capsys):
    data = rows([6] * 12)
    ref = tiny_model()
    Trainer(ref, config(tmp_path / "a", max_steps=2), data).train()
    model = tiny_model()
    tr = Trainer(model, config(tmp_path / "b", max_steps=3, nonfinite_policy="skip"), data, stage=poisoned_stage(3))
    tr.train()
    # reference: with a constant schedule, skipping step 3 leaves the weights of a 2-step run, bit for bit
    for (n, a), b in zip(trainable(ref).items(), trainable(model).values()):
        assert torch.equal(a, b), n
    recs = strict_records(tmp_path / "b" / "out" / "trainer_log.jsonl")
    assert [r["current_steps"] for r in recs] == [1, 2, 3] and recs[2]["loss"] is None
    assert "step 3: loss nan is not finite; skipped" in capsys.readouterr().err


def test_non_finite_weights_are_never_saved(tmp_path):
    from llmtune.train.guard import check_weights_finite

    model = tiny_model()
    tr = Trainer(model, config(tmp_path, max_steps=2, save_steps=1), rows([6] * 4))
    tr.train()
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("inf")
    tr.global_step = 3
    with pytest.raises(LLMTuneError, match="NaN/inf.*checkpoint-2"):
        tr.save_checkpoint()
    assert not (tmp_path / "out" / "checkpoint-3").exists() and not (tmp_path / "out" / "tmp-checkpoint-3").exists()
    with pytest.raises(LLMTuneError, match="the final model"):
        check_weights_finite(model.state_dict().items(), "the final model")
    # the final save scans what training changed (the trainable weights) and writes nothing
    from llmtune.train.outputs import save_model

    with pytest.raises(LLMTuneError, match="the final model"):
        save_model(model, tmp_path / "final", tr.config, base="base")
    assert not (tmp_path / "final").exists()


def test_rotation_never_deletes_the_newest_checkpoint(tmp_path):
    out = tmp_path / "out"
    for step in (2, 4, 6):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    # the best checkpoint (kept) and the newest: both survive a limit of 1
    deleted = ckpt.rotate_checkpoints(out, 1, keep=str(out / "checkpoint-2"))
    assert [p.name for p in deleted] == ["checkpoint-4"]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-6"]


def test_rotation_after_resuming_from_an_earlier_checkpoint_keeps_the_resumed_runs_own(tmp_path):
    """Resumed from checkpoint-4 in a folder still holding 5..12 of the first run: the resumed run has just
    written checkpoint-5 (replacing the old one). With a limit of 2 the survivors must be 4 and 5, the newest
    of this run's history (the first run deleted 5 and 6 as they were written and kept the stale 11 and 12,
    which resume_from_checkpoint: true then picked)."""
    out = tmp_path / "out"
    for step in range(1, 13):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    ckpt.rotate_checkpoints(out, 2, newest=out / "checkpoint-5")
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-5"]
    # the best checkpoint is still never deleted; without newest the highest number counts as the newest
    ckpt.rotate_checkpoints(out, 1, keep=str(out / "checkpoint-4"))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-5"]


def test_logs_and_results_are_strict_json(tmp_path):
    from llmtune.train.logging import TrainLogger
    from llmtune.fileio import write_json

    log = TrainLogger(tmp_path, 3, progress=False)
    log.log(1, 0.5, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    log.close()
    rec = strict_records(tmp_path / "trainer_log.jsonl")[0]
    assert rec["loss"] is None and rec["grad_norm"] is None and rec["lr"] == 1e-3
    write_json(tmp_path / "all_results.json", {"train_loss": float("nan"), "x": [1.0, float("-inf")]})
    assert json.loads((tmp_path / "all_results.json").read_text(), parse_constant=lambda t: 1 / 0) == {
        "train_loss": None, "x": [1.0, None]}


def test_disable_tqdm_shows_no_progress_bar(tmp_path, capsys):
    Trainer(tiny_model(), config(tmp_path, max_steps=2, disable_tqdm=True), rows([6] * 4)).train()
    assert "it/s" not in capsys.readouterr().err
    Trainer(tiny_model(), config(tmp_path / "b", max_steps=2, disable_tqdm=False), rows([6] * 4)).train()
    assert "it/s" in capsys.readouterr().err


def test_all_masked_labels_give_zero_items_and_callers_stay_finite(tmp_path):
    from llmtune.losses import causal_lm_loss

    h = torch.randn(2, 5, 8, requires_grad=True)
    loss, n = causal_lm_loss(h, torch.randn(10, 8), torch.full((2, 5), -100))
    assert float(loss) == 0.0 and int(n) == 0
    loss.backward()
    assert torch.equal(h.grad, torch.zeros_like(h))
    masked = [dict(r, labels=[-100] * len(r["labels"])) for r in rows([6] * 4)]
    tr = Trainer(tiny_model(), config(tmp_path, max_steps=1), masked, eval_dataset=masked)
    ev = tr.evaluate()
    assert math.isfinite(ev["eval_loss"])
    with pytest.raises(LLMTuneError, match="no loss tokens"):
        tr.train()


def test_positions_past_max_position_embeddings_get_one_notice(capsys):
    from llmtune.models import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8)
    model = Transformer(cfg)
    model(torch.randint(0, 20, (1, 8)))
    assert "max_position_embeddings" not in capsys.readouterr().err
    model(torch.randint(0, 20, (1, 12)))
    model(torch.randint(0, 20, (1, 12)))
    assert capsys.readouterr().err.count("past the model's max_position_embeddings 8") == 1


def test_clear_previous_run_removes_only_our_files(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')   # issue 25: an llmtune
    (out / "checkpoint-3" / "trainable.safetensors").write_text("x")                 # state and weights file
    (out / "checkpoint-9").mkdir()  # not ours: no trainer_state.json
    (out / "tmp-checkpoint-4").mkdir()
    for name in ("adapter_model.safetensors", "trainer_log.jsonl", "training_loss.png", "notes.txt", "my.yaml"):
        (out / name).write_text("x")
    from llmtune.train.manifest import RUN_OUTPUTS, record_outputs

    record_outputs(out, RUN_OUTPUTS, {})   # issue 25: only files a run of ours recorded writing are removed
    removed = ckpt.clear_previous_run(out)
    assert sorted(removed) == ["adapter_model.safetensors", "checkpoint-3", "tmp-checkpoint-4", "trainer_log.jsonl",
                               "training_loss.png"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-9", "my.yaml", "notes.txt"]


def test_folder_lock_is_exclusive_across_processes_and_reentrant_within_one(tmp_path):
    import subprocess
    import sys

    from llmtune.locks import FolderLock

    d = tmp_path / "out"
    with FolderLock(d):
        with FolderLock(d):  # the same process (e.g. run_train inside a notebook's own lock): fine
            pass
        assert (d / ".llmtune.lock").is_file()
        code = ("import sys\nfrom llmtune.locks import FolderLock\nfrom llmtune.errors import LLMTuneError\n"
                "try:\n    FolderLock(sys.argv[1]).acquire()\nexcept LLMTuneError as e:\n    print(e)\n")
        res = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=120)
        import os

        assert f"in use by process {os.getpid()}" in res.stdout
    assert not d.exists()  # created by the lock, empty: removed on release

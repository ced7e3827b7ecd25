"""Fault injection (issue 15): kill -9 at random points and resume with identical losses, a full disk while
saving, two runs on one folder, a NaN/inf loss.

Reference for "identical": the same run without a kill (its ``trainer_log.jsonl``, compared value for value).
Kills happen in real subprocesses (``SIGKILL``: no handler runs, no lock is released by the process itself).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reliability_helpers import cli_env, make_data_dir, make_model_folder, train_args, tree_hash

#: runs the CLI, SIGKILLing itself inside the Nth checkpoint save ("save") or right after optimizer step N ("step"),
#: or sending itself SIGTERM there ("term": a cluster's preemption)
DRIVER = r"""
import os, signal, sys
mode, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
from llmtune.train import checkpoint as ck, trainer as tr
if mode == "save":
    orig, n = ck.save_rng_state, [0]
    def killer(*a, **k):
        n[0] += 1
        if n[0] == at:  # trainable + optimizer files are written, the rest is not: a half checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(*a, **k)
    ck.save_rng_state = killer
elif mode in ("step", "term"):
    orig_step = tr.Trainer.optimizer_step
    def killer(self, *a, **k):
        out = orig_step(self, *a, **k)
        if self.global_step + 1 == at:
            os.kill(os.getpid(), signal.SIGKILL if mode == "step" else signal.SIGTERM)
        return out
    tr.Trainer.optimizer_step = killer
elif mode == "term0":  # SIGTERM while the first step is being prepared: no step has completed
    orig_next = tr.Trainer.next_step
    def killer(self, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return orig_next(self, *a, **k)
    tr.Trainer.next_step = killer
from llmtune.cli import main
sys.exit(main(argv))
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return {"model": make_model_folder(root / "model"), "data": make_data_dir(root / "data"), "root": root}


def _args(inputs, out, **kw):
    c = dict(max_steps=10, save_steps=3, per_device_train_batch_size=2, lora_dropout=0.1, learning_rate=5e-3)
    c.update(kw)
    return train_args(inputs["model"], inputs["data"], out, **c)[1:]  # without the leading "train"


def _log(out: Path) -> list[tuple]:
    recs = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    return [(r["current_steps"], r["loss"], r["grad_norm"]) for r in recs if "loss" in r]


def _driver(mode: str, at: int, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, mode, str(at), "train", *args], capture_output=True,
                          env=cli_env(), timeout=300)


def _train_in_process(args: list[str]) -> int:
    """``llmtune train`` in this process with one thread, as the subprocesses run (OMP_NUM_THREADS=1), so the
    float reductions happen in the same order; saves the ~2 s import of a subprocess."""
    import torch

    from llmtune.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(["train", *args])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(inputs):
    out = inputs["root"] / "reference"
    assert _train_in_process(_args(inputs, out)) == 0
    return _log(out)


def _resume_and_compare(inputs, out: Path, reference: list) -> None:
    assert _train_in_process(_args(inputs, out, resume_from_checkpoint=True)) == 0
    assert _log(out) == reference  # same losses and gradient norms, to the last digit
    assert not list(out.glob("tmp-*")), "leftover temporary checkpoint folders"
    assert not (out / ".llmtune.lock").exists()


def test_kill_between_steps_then_resume_gives_identical_losses(inputs, reference, tmp_path):
    out = tmp_path / "out"
    proc = _driver("step", 5, _args(inputs, out))
    assert proc.returncode == -signal.SIGKILL
    assert (out / "checkpoint-3").is_dir() and not (out / "checkpoint-6").exists()
    _resume_and_compare(inputs, out, reference)


def test_sigterm_saves_the_last_completed_step_exits_143_and_resumes_with_identical_losses(inputs, reference,
                                                                                         tmp_path):
    """SIGTERM (a cluster's preemption, a container's stop) right after step 5's optimizer update, before the
    step is counted: the signal is held until step 5 is whole (its weights are already updated), then the run
    saves checkpoint-5, says so, exits with 143, and the resumed run logs the uninterrupted run's losses to the
    last digit (before, an interrupt in that window saved step 5's weights as checkpoint-4)."""
    out = tmp_path / "out"
    proc = _driver("term", 5, _args(inputs, out))
    err = proc.stderr.decode()
    assert proc.returncode == 143, err[-2000:]
    assert f"terminated (SIGTERM): saved {out / 'checkpoint-5'}" in err and "llmtune: terminated (SIGTERM)" in err
    assert json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())["global_step"] == 5
    _resume_and_compare(inputs, out, reference)


def test_kill_during_a_checkpoint_save_leaves_no_half_checkpoint_and_resumes(inputs, reference, tmp_path):
    out = tmp_path / "out"
    proc = _driver("save", 2, _args(inputs, out))  # killed while writing checkpoint-6
    assert proc.returncode == -signal.SIGKILL
    assert (out / "tmp-checkpoint-6").is_dir() and not (out / "checkpoint-6").exists()
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()
    _resume_and_compare(inputs, out, reference)  # also: tmp-checkpoint-6 is cleaned at the start


@pytest.mark.parametrize("seed", [0])
def test_kill_at_a_random_moment_then_resume_gives_identical_losses(inputs, reference, tmp_path, seed):
    out = tmp_path / "out"
    rng = random.Random(seed)
    args = _args(inputs, out)
    proc = subprocess.Popen([sys.executable, "-m", "llmtune", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=cli_env())
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint-3").is_dir() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere after the first checkpoint: a step, a save, the end
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the kill landed (machine too fast for this seed)")
    if (out / "all_results.json").exists() and (out / "checkpoint-9").is_dir():
        assert _log(out) == reference
        return
    _resume_and_compare(inputs, out, reference)


# -- two runs on one folder ------------------------------------------------------------------------------
HOLDER = r"""
import sys, time
from llmtune.locks import FolderLock
FolderLock(sys.argv[1], sys.argv[2]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _hold(folder: Path, key: str = "output_dir") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), key], stdout=subprocess.PIPE, env=cli_env())
    assert proc.stdout.readline().strip() == b"held"
    return proc


def test_a_second_run_on_a_held_output_dir_is_refused_and_a_dead_holders_lock_is_recovered(inputs, tmp_path, capsys):
    from llmtune.cli import main

    out = tmp_path / "out"
    holder = _hold(out)
    try:
        before = tree_hash(out)
        rc = main(["train", *_args(inputs, out, max_steps=2)])
        err = capsys.readouterr().err
        assert rc == 2 and f"in use by process {holder.pid}" in err and err.count("llmtune: error:") == 1
        assert tree_hash(out) == before  # the holder's folder is untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".llmtune.lock").is_file()  # the dead holder's file stays; its flock died with it
    assert main(["train", *_args(inputs, out, max_steps=2)]) == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / ".llmtune.lock").exists()


def test_two_real_runs_started_together_one_wins_one_is_refused(inputs, tmp_path):
    out = tmp_path / "out"
    args = ["train", *_args(inputs, out, max_steps=12, save_steps=1000)]
    procs = [subprocess.Popen([sys.executable, "-m", "llmtune", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=cli_env()) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    if codes == [0, 0]:  # the first finished before the second reached the lock: the second is refused then
        pytest.fail("both runs wrote the same output_dir")
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "llmtune: error:" in loser and "Traceback" not in loser
    assert ("in use by process" in loser) or ("not empty" in loser)
    assert len(_log(out)) == 12  # one run's log, not two interleaved


def test_a_second_export_into_a_held_export_dir_is_refused(inputs, tmp_path, capsys):
    from llmtune.cli import main

    exp = tmp_path / "exp"
    holder = _hold(exp, "export_dir")
    try:
        rc = main(["export", "--model_name_or_path", str(inputs["model"]), "--export_dir", str(exp)])
        err = capsys.readouterr().err
        assert rc == 2 and "export_dir" in err and "in use by process" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# -- full disk / read-only folder -------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip() or 'needs root'}); the disk-full "
                    "test needs a small file system")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path, leave_pages: int) -> None:
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(mnt / "filler.bin", "wb") as f:
        f.write(b"\0" * max(free - leave_pages * st.f_frsize, 0))


@pytest.mark.parametrize("save_steps", [2, 1000], ids=["during-checkpoint", "during-final-save"])
def test_a_full_disk_while_saving_is_one_line_and_leaves_no_temporary_folder(inputs, small_tmpfs, capsys, save_steps):
    from llmtune.cli import main

    out = small_tmpfs / "out"
    _fill(small_tmpfs, leave_pages=3)  # room for the lock file and the log, not for a checkpoint or adapter
    rc = main(["train", *_args(inputs, out, max_steps=4, save_steps=save_steps)])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert err.count("llmtune: error:") == 1 and "Traceback" not in err
    assert "No space left on device" in err
    assert ("checkpoint-2" in err) == (save_steps == 2), err  # the checkpoint save, or the final save, failed
    assert not list(out.glob("tmp-*")) and not list(out.glob("checkpoint-*"))
    assert not (out / ".llmtune.lock").exists()


def test_a_full_disk_then_resume_from_the_last_complete_checkpoint(inputs, reference, small_tmpfs, capsys):
    """A checkpoint that no longer fits stops the run naming the last complete one; with space freed, resuming
    from it reproduces the reference losses."""
    import llmtune.train.checkpoint as ck

    out = small_tmpfs / "out"

    calls = [0]
    orig = ck.save_optimizer

    def fill_then_save(*a, **k):  # the disk fills up between the first and the second checkpoint
        calls[0] += 1
        if calls[0] == 2:
            _fill(small_tmpfs, leave_pages=0)
        return orig(*a, **k)

    ck.save_optimizer = fill_then_save
    try:
        rc = _train_in_process(_args(inputs, out))
    finally:
        ck.save_optimizer = orig
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and str(out / "checkpoint-3") in err, err[-2000:]
    assert not list(out.glob("tmp-*"))
    (small_tmpfs / "filler.bin").unlink()
    _resume_and_compare(inputs, out, reference)


# -- overwrite_output_dir replaces only what a run of ours wrote (issue 25) ---------------------------------------
def test_overwrite_output_dir_replaces_our_own_run_and_keeps_the_users_files(inputs, tmp_path, capsys):
    """A finished run's outputs (recorded in its manifest with their hashes) are replaced; a user's notes and a
    sub-folder are kept. The manifest names every file the run wrote, each with its SHA-256."""
    import hashlib

    from llmtune.train.manifest import MANIFEST

    out = tmp_path / "out"
    assert _train_in_process(_args(inputs, out, max_steps=2, save_steps=1)) == 0
    record = json.loads((out / MANIFEST).read_text())["files"]
    assert {"adapter_model.safetensors", "adapter_config.json", "trainer_log.jsonl", "llmtune.json"} <= set(record)
    for name, rec in record.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == rec["sha256"], name
    (out / "my_notes.txt").write_text("keep me")
    (out / "data").mkdir()
    (out / "data" / "config.json").write_text("{}")
    assert _train_in_process(_args(inputs, out, max_steps=1, overwrite_output_dir=True)) == 0
    assert "removed the previous run's files" in capsys.readouterr().err
    assert (out / "my_notes.txt").read_text() == "keep me" and (out / "data" / "config.json").read_text() == "{}"
    assert not (out / "checkpoint-1").exists() and len(_log(out)) == 1


# -- a data file edited in place, same size and mtime (issue 25: the stale tokenized cache was used) -----------
def test_data_edited_with_the_same_size_and_mtime_is_read_again(inputs, tmp_path):
    """The cache key holds the file's content hash: after an edit that keeps the size and the mtime, the run's
    first loss is the loss of a run on the edited data without any cache (reference), not the cached one."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(inputs["data"], data)
    cache = tmp_path / "cache"
    common = dict(max_steps=1, overwrite_cache=False, data_cache_dir=cache)

    def first_loss(out, **kw):
        args = train_args(inputs["model"], data, out, **{**common, **kw})[1:]
        assert _train_in_process(args) == 0
        return _log(out)[0][1]

    before = first_loss(tmp_path / "a")
    f = data / "toy.json"
    st = f.stat()
    text = f.read_text()
    f.write_text(text.replace("blue", "snow").replace("green", "white"))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    edited = first_loss(tmp_path / "b")
    reference = first_loss(tmp_path / "c", overwrite_cache=True)
    assert edited == reference and edited != before


# -- resume: what may change, and how it is honoured (issue 25) -------------------------------------------------
def _lrs(out: Path) -> dict:
    recs = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    return {r["current_steps"]: r["lr"] for r in recs if "lr" in r}


@pytest.mark.parametrize("change", [dict(learning_rate=1e-2), dict(max_steps=8)], ids=["learning_rate", "max_steps"])
def test_a_resume_with_a_new_learning_rate_or_length_follows_the_new_schedule(inputs, tmp_path, capsys, change):
    """Reference: a fresh run with the new value; its learning rate at steps 4..N is a function of the step
    alone (warmup + linear decay over max_steps), so the resumed run must log the same rates there. Before,
    the old schedule's rate ran and nothing was said."""
    kw = dict(max_steps=6, save_steps=3, lr_scheduler_type="linear", warmup_steps=2)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert _train_in_process(_args(inputs, out, **kw)) == 0
    capsys.readouterr()
    new = {**kw, **change}
    assert _train_in_process(_args(inputs, out, **new, resume_from_checkpoint=str(out / "checkpoint-3"),
                                   overwrite_output_dir=False)) == 0
    err = capsys.readouterr().err
    assert f"resumed from {out / 'checkpoint-3'} at step 3" in err and "changed since checkpoint-3" in err, err
    assert _train_in_process(_args(inputs, fresh, **new)) == 0
    got, want = _lrs(out), _lrs(fresh)
    steps = range(4, new["max_steps"] + 1)
    assert all(abs(got[s] - want[s]) <= 1e-12 * want[s] for s in steps), (got, want)


def test_train_loss_after_a_resume_is_the_mean_of_every_step_of_the_run(inputs, reference, tmp_path):
    """SIGTERM after step 5, resume to 10: train_loss is the mean of the 10 logged step losses (each logged
    with 6 decimals), not of the resumed session's 5."""
    out = tmp_path / "out"
    assert _driver("term", 5, _args(inputs, out)).returncode == 143
    assert _train_in_process(_args(inputs, out, resume_from_checkpoint=True)) == 0
    losses = [loss for _, loss, _ in reference]
    assert len(losses) == 10
    got = json.loads((out / "train_results.json").read_text())["train_loss"]
    assert abs(got - sum(losses) / 10) <= 1e-6, (got, sum(losses) / 10, sum(losses[5:]) / 5)


def test_sigterm_before_any_step_writes_no_checkpoint_0(inputs, tmp_path):
    out = tmp_path / "out"
    proc = _driver("term0", 0, _args(inputs, out))
    err = proc.stderr.decode()
    assert proc.returncode == 143, err[-2000:]
    assert "before any step completed: nothing to save" in err
    assert not list(out.glob("checkpoint-*")) and not list(out.glob("tmp-*"))


# -- checkpoints are adapters too (issue 25) ------------------------------------------------------------------
def test_a_lora_checkpoint_is_an_adapter_folder_for_peft_chat_and_export(inputs, tmp_path, capsys, monkeypatch):
    """A LoRA run that the NaN guard stops at step 3: its finite checkpoint-2 is an adapter folder. peft loads it
    without a warning and gives llmtune's logits (fp32, 1e-5); export and chat take it as adapter_name_or_path;
    the adapter's tensors are stored once (trainable.safetensors holds none of them) and the run's record
    travels with it."""
    import warnings

    import torch
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    from llmtune.cli import main
    from llmtune.runs import load_model

    import llmtune.train.trainer as tr
    from llmtune.train.stages.causal_lm import causal_lm_stage

    def nan_at_step_3(model, batch, ctx):   # the loss of step 3 is NaN: nonfinite_policy stop ends the run
        loss, n, metrics = causal_lm_stage(model, batch, ctx)
        return (loss * float("nan") if ctx.global_step == 2 and ctx.training else loss), n, metrics

    monkeypatch.setattr(tr, "get_stage", lambda name: nan_at_step_3)
    out = tmp_path / "out"
    assert _train_in_process(_args(inputs, out, max_steps=4, save_steps=1)) == 2
    assert "not finite" in capsys.readouterr().err and not (out / "checkpoint-3").exists()
    monkeypatch.undo()
    ck = out / "checkpoint-2"
    assert {"adapter_model.safetensors", "adapter_config.json", "llmtune.json", "tokenizer.json"} <= {
        p.name for p in ck.iterdir()}
    assert load_file(str(ck / "trainable.safetensors")) == {}   # no second copy of the adapter
    ids = torch.tensor([[4, 9, 10, 11, 12, 13, 3]])
    ours = load_model(str(inputs["model"]), dtype=torch.float32, adapter_name_or_path=str(ck)).eval()
    with torch.no_grad():
        mine = ours.lm_head(ours(ids)).float()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(inputs["model"]), dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(hf, str(ck)).eval()
    assert not [w for w in caught if "peft" in str(w.filename)], [str(w.message) for w in caught]
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits.float()
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    capsys.readouterr()
    assert main(["export", "--model_name_or_path", str(inputs["model"]), "--adapter_name_or_path", str(ck),
                 "--export_dir", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "model.safetensors").is_file()
    import io
    import sys as _sys

    stdin = _sys.stdin
    _sys.stdin = io.StringIO("hello\n")
    try:
        assert main(["chat", "--model_name_or_path", str(inputs["model"]), "--adapter_name_or_path", str(ck),
                     "--max_new_tokens", "3"]) == 0
    finally:
        _sys.stdin = stdin


def test_a_full_fine_tuning_checkpoint_is_a_model_folder_and_resumes_exactly(inputs, tmp_path):
    """checkpoint-2 of a full run: transformers loads it and gives the logits of the run's final model (saved
    at the same step 2; fp32, 1e-5); no second copy of the weights; resuming from it to step 4 logs the losses
    of the uninterrupted 4-step run."""
    import torch
    import transformers
    from safetensors.torch import load_file

    from llmtune.runs import load_model

    kw = dict(finetuning_type="full", learning_rate=1e-3, save_steps=2)
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train_in_process(_args(inputs, a, max_steps=2, **kw)) == 0
    ck = a / "checkpoint-2"
    assert (ck / "config.json").is_file() and load_file(str(ck / "trainable.safetensors")) == {}
    ids = torch.tensor([[4, 9, 10, 11, 12, 13, 3]])
    ours = load_model(str(a), dtype=torch.float32).eval()
    with torch.no_grad():
        mine = ours.lm_head(ours(ids)).float()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(mine, theirs.float(), atol=1e-5, rtol=1e-5)
    assert _train_in_process(_args(inputs, b, max_steps=4, **kw)) == 0
    c = tmp_path / "c"
    import shutil

    shutil.copytree(b, c)
    assert _train_in_process(_args(inputs, c, max_steps=4, resume_from_checkpoint=str(c / "checkpoint-2"), **kw)) == 0
    assert _log(c) == _log(b)


def test_a_freeze_checkpoint_is_a_model_for_chat_and_export(inputs, tmp_path, capsys):
    """checkpoint-2 of a freeze run (3 steps) stores only the trained layer and the run's record, no second copy
    of the weights; as model_name_or_path it is the recorded base with those tensors laid over: llmtune's logits
    and the export's equal transformers' on the base with the checkpoint's tensors loaded by their Hugging Face
    names (fp32, 1e-5); chat takes it; as adapter_name_or_path one line says to pass it as model_name_or_path."""
    import io
    import sys as _sys

    import torch
    import transformers
    from safetensors.torch import load_file

    from llmtune.cli import main
    from llmtune.errors import LLMTuneError
    from llmtune.runs import load_model

    out = tmp_path / "out"
    assert _train_in_process(_args(inputs, out, max_steps=3, save_steps=2, finetuning_type="freeze",
                                   freeze_trainable_layers=1, learning_rate=1e-2)) == 0
    ck = out / "checkpoint-2"
    names = {p.name for p in ck.iterdir()}
    assert {"llmtune.json", "training_args.yaml", "tokenizer.json", "trainable.safetensors"} <= names
    assert not names & {"config.json", "model.safetensors", "adapter_config.json"}
    trained = load_file(str(ck / "trainable.safetensors"))
    assert trained and all(n.startswith("model.layers.1.") for n in trained)   # the trained layer only
    ids = torch.tensor([[4, 9, 10, 11, 12, 13, 3]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(inputs["model"]), dtype=torch.float32)
    with torch.no_grad():
        before = hf(input_ids=ids).logits
        assert hf.load_state_dict(trained, strict=False).unexpected_keys == []
        theirs = hf(input_ids=ids).logits
    assert (theirs - before).abs().max() > 1e-3   # the checkpoint's layer moved
    capsys.readouterr()
    ours = load_model(str(ck), dtype=torch.float32)
    assert "freeze fine-tuning checkpoint" in capsys.readouterr().err
    with torch.no_grad():
        torch.testing.assert_close(ours.lm_head(ours(ids)).float(), theirs, atol=1e-5, rtol=1e-5)
    assert main(["export", "--model_name_or_path", str(ck), "--export_dir", str(tmp_path / "exp")]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exp"), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, theirs, atol=1e-5, rtol=1e-5)
    stdin = _sys.stdin
    _sys.stdin = io.StringIO("hello\n")
    try:
        assert main(["chat", "--model_name_or_path", str(ck), "--max_new_tokens", "3"]) == 0
    finally:
        _sys.stdin = stdin
    with pytest.raises(LLMTuneError) as err:
        load_model(str(inputs["model"]), adapter_name_or_path=str(ck))
    msg = str(err.value)
    assert msg.startswith("adapter_name_or_path:") and f"--model_name_or_path {ck}" in msg and "\n" not in msg

    # a LoRA stage trained on the checkpoint: its output folder brings the checkpoint (recorded as a parent) and
    # equals transformers+peft on the base + the checkpoint's tensors + the adapter; api serves it unmerged
    from peft import PeftModel

    from llmtune.config import parse_config
    from llmtune.serve.server import load_served_model

    lora = tmp_path / "lora"
    assert _train_in_process(_args(inputs, lora, max_steps=2, model_name_or_path=str(ck))) == 0
    chained = load_model(str(lora), dtype=torch.float32)
    assert [str(a) for a in chained.adapter_chain.adapters] == [str(ck.resolve()), str(lora.resolve())]
    with torch.no_grad():
        expect = PeftModel.from_pretrained(hf, str(lora)).eval()(input_ids=ids).logits
        torch.testing.assert_close(chained.lm_head(chained(ids)).float(), expect, atol=1e-5, rtol=1e-5)
    specs, served, _, _ = load_served_model(parse_config(["--model_name_or_path", str(inputs["model"]),
                                                          "--adapter_name_or_path", str(lora)], command="chat"))
    assert [str(a) for a in served.adapter_chain.adapters] == [str(ck.resolve())] and len(specs) == 1


@pytest.mark.real
def test_a_freeze_checkpoint_of_the_real_model_is_the_runs_model_at_that_step(real_model_path, shared_data_dir,
                                                                               tmp_path):
    """SmolLM2 (GGUF base), freeze_trainable_layers 2, one step, save_steps 1: checkpoint-1 stores the two trained
    layers only (about 28 MB in float32; the final model folder is about 514 MB) and, as model_name_or_path, has
    weights bit-equal to the run's final output folder of the same step, which is written and loaded by the other
    path (a whole model folder)."""
    import torch

    from llmtune.runs import load_model

    out = tmp_path / "real"
    args = ["--stage", "sft", "--model_name_or_path", str(real_model_path), "--dataset", "identity",
            "--dataset_dir", str(shared_data_dir), "--template", "chatml", "--finetuning_type", "freeze",
            "--freeze_trainable_layers", "2", "--output_dir", str(out), "--cutoff_len", "64",
            "--per_device_train_batch_size", "1", "--max_steps", "1", "--save_steps", "1", "--max_samples", "8",
            "--report_to", "none", "--disable_tqdm", "true"]
    assert _train_in_process(args) == 0
    ck = out / "checkpoint-1"
    assert (ck / "trainable.safetensors").stat().st_size * 10 < (out / "model.safetensors").stat().st_size
    laid, final = load_model(str(ck), dtype=torch.float32).state_dict(), load_model(str(out), dtype=torch.float32)
    final = final.state_dict()
    assert sorted(laid) == sorted(final)
    assert all(torch.equal(laid[k], final[k]) for k in final), [k for k in final if not torch.equal(laid[k], final[k])][:3]


# -- push_to_hub (issue 25: accepted with a notice, nothing uploaded) ------------------------------------------
class _HubStandIn:
    """A local stand-in of the Hub API: records create_repo/upload_folder calls and the files upload_folder would
    send (huggingface_hub's own filter_repo_objects applied to the folder, as upload_folder does)."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple] = []
        self.fail = fail

    def create_repo(self, api, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, api, *, repo_id, folder_path, ignore_patterns=None, **kw):
        from huggingface_hub.utils import filter_repo_objects

        if self.fail:
            raise ConnectionError("the Hub cannot be reached")
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        sent = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        self.calls.append(("upload_folder", repo_id, sent))
        return f"https://huggingface.co/{repo_id}/commit/0"


def _stand_in(monkeypatch, fail=False) -> _HubStandIn:
    import huggingface_hub

    hub = _HubStandIn(fail)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: hub.create_repo(self, repo_id, **kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: hub.upload_folder(self, **kw))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_standin")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return hub


def test_push_to_hub_uploads_the_output_folder_without_checkpoints(inputs, tmp_path, monkeypatch, capsys):
    from llmtune.cli import main

    out = tmp_path / "out"
    hub = _stand_in(monkeypatch)
    assert main(["train", *_args(inputs, out, max_steps=2, save_steps=1, push_to_hub=True,
                                 hub_model_id="me/tiny-lora")]) == 0
    assert [c[:2] for c in hub.calls] == [("create_repo", "me/tiny-lora"), ("upload_folder", "me/tiny-lora")]
    sent = hub.calls[1][2]
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "trainer_log.jsonl"} <= set(sent)
    assert (out / "checkpoint-2").is_dir() and not [f for f in sent if "checkpoint" in f or f.startswith(".llmtune")]
    assert "push_to_hub: uploaded" in capsys.readouterr().err


def test_push_to_hub_failure_keeps_the_run_and_says_how_to_upload(inputs, tmp_path, monkeypatch, capsys):
    from llmtune.cli import main

    out = tmp_path / "out"
    _stand_in(monkeypatch, fail=True)
    assert main(["train", *_args(inputs, out, max_steps=1, push_to_hub=True, hub_model_id="me/tiny-lora")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("llmtune: error:")]
    assert len(err) == 1 and "hf upload me/tiny-lora" in err[0] and "ConnectionError" in err[0], err
    assert (out / "adapter_model.safetensors").is_file()

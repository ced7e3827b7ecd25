"""Trainer loop: gradient accumulation, resume, schedules, precision notices, checkpoints (tiny models, CPU)."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_helpers import VOCAB, rows, tiny_model

from llmtune.errors import LLMTuneError
from llmtune.train import checkpoint as ckpt
from llmtune.train.logging import read_log
from llmtune.train.optim import lr_lambda
from llmtune.train.precision import resolve_precision
from llmtune.train.trainer import Trainer
from config_helpers import make_config


def config(tmp_path, **kw):
    base = dict(stage="sft", output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                gradient_accumulation_steps=1, learning_rate=1e-2, max_steps=4, logging_steps=1,
                save_steps=1000, seed=7, lr_scheduler_type="constant", report_to="none")
    base.update(kw)
    return make_config(**base)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_diff(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# -- gradient accumulation ---------------------------------------------------------------------------
def test_gradient_accumulation_equals_big_batch_and_hand_gradient(tmp_path):
    data = rows([5, 11, 17, 8])  # different lengths -> different token counts per micro-batch
    base = tiny_model()
    got = {}
    for bs, ga in ((4, 1), (1, 4)):
        model = copy.deepcopy(base)
        tr = Trainer(model, config(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga), data)
        step = tr.epoch_steps(0)[0]
        assert sorted(i for mb in step for i in mb) == [0, 1, 2, 3]
        tr.accumulate_gradients([tr.collate(ix) for ix in step])
        got[(bs, ga)] = grads(model)

    # reference by hand: full-logits cross-entropy, mean over ALL label tokens of the 4 sequences
    ref_model = copy.deepcopy(base)
    t = max(len(r["input_ids"]) for r in data)
    ids = torch.tensor([r["input_ids"] + [0] * (t - len(r["input_ids"])) for r in data])
    mask = torch.tensor([r["attention_mask"] + [0] * (t - len(r["input_ids"])) for r in data])
    labels = torch.tensor([r["labels"] + [-100] * (t - len(r["input_ids"])) for r in data])
    logits = ref_model.lm_head(ref_model(ids, attention_mask=mask))
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    loss.backward()
    ref = grads(ref_model)

    assert set(got[(4, 1)]) == set(ref)
    for name in ref:
        assert rel_diff(got[(4, 1)][name], got[(1, 4)][name]) <= 1e-5, name
        assert rel_diff(got[(4, 1)][name], ref[name]) <= 1e-5, name
        assert rel_diff(got[(1, 4)][name], ref[name]) <= 1e-5, name

    # the test discriminates: the per-micro-batch mean (the 2024 bug) gives a different gradient
    bug_model = copy.deepcopy(base)
    for r in data:
        one = {k: torch.tensor([v]) for k, v in r.items()}
        lg = bug_model.lm_head(bug_model(one["input_ids"]))
        (F.cross_entropy(lg[0, :-1], one["labels"][0, 1:], ignore_index=-100) / 4).backward()
    bug = grads(bug_model)
    assert max(rel_diff(bug[n], ref[n]) for n in ref) > 1e-2


def test_stage_without_item_counter_gives_same_gradient(tmp_path):
    from llmtune.train.stages.causal_lm import causal_lm_stage

    data = rows([6, 12, 9, 15])
    base = tiny_model()
    out = []
    for stage in (None, lambda m, b, c: causal_lm_stage(m, b, c)):  # the lambda has no count_items
        model = copy.deepcopy(base)
        tr = Trainer(model, config(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=4),
                     data, stage=stage)
        assert (tr.count_items is None) == (stage is not None)
        tr.accumulate_gradients([tr.collate(ix) for ix in tr.epoch_steps(0)[0]])
        out.append(grads(model))
    for name in out[0]:
        assert rel_diff(out[1][name], out[0][name]) <= 1e-6


def test_all_labels_masked_is_a_clear_error(tmp_path):
    data = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, -100, -100]}] * 4
    tr = Trainer(tiny_model(), config(tmp_path), data)
    with pytest.raises(LLMTuneError, match="no loss tokens"):
        tr.train()


# -- resume -----------------------------------------------------------------------------------------
class NoisyStage:
    """sft loss times a factor drawn from torch, numpy and Python RNGs: resume must restore all three."""

    def __init__(self, interrupt_at_call=None):
        from llmtune.train.stages.causal_lm import causal_lm_stage

        self.inner, self.calls, self.interrupt_at = causal_lm_stage, 0, interrupt_at_call

    def __call__(self, model, batch, ctx):
        self.calls += 1
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        loss_sum, n, m = self.inner(model, batch, ctx)
        w = 1 + 0.3 * float(torch.rand(())) + 0.3 * random.random() + 0.3 * float(np.random.rand())
        return loss_sum * w, n, {"noise": w}


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, capsys):
    data = rows([5, 9, 7, 12, 6, 10, 8, 4, 11, 9], seed=3)  # 10 rows, bs 2 x ga 2 -> steps of 2, 2, 1 micro-batches per epoch
    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=8,
              lr_scheduler_type="cosine", warmup_steps=2, learning_rate=5e-3, weight_decay=0.1)

    def run(out, stage, resume=None):
        torch.manual_seed(0)
        model = tiny_model(1)
        random.seed(5), np.random.seed(5)
        cfg = config(tmp_path, output_dir=str(out), resume_from_checkpoint=resume, **kw)
        return Trainer(model, cfg, data, stage=stage).train()

    run(tmp_path / "a", NoisyStage())
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in step 5 (call 9 = its 2nd micro-batch): saves checkpoint-4
        run(tmp_path / "b", NoisyStage(interrupt_at_call=9))
    assert "interrupted: saved" in capsys.readouterr().err
    assert ckpt.latest_checkpoint(tmp_path / "b").name == "checkpoint-4"
    run(tmp_path / "b", NoisyStage(), resume=True)

    full = {r["current_steps"]: r for r in read_log(tmp_path / "a") if "loss" in r}
    resumed = {r["current_steps"]: r for r in read_log(tmp_path / "b") if "loss" in r}
    assert sorted(full) == sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-6, abs=1e-7), step
        assert resumed[step]["noise"] == pytest.approx(full[step]["noise"], rel=1e-9), step
        assert resumed[step]["lr"] == pytest.approx(full[step]["lr"], rel=1e-9), step


def test_data_order_is_a_function_of_seed_and_epoch(tmp_path):
    data = rows([4] * 9)
    a = Trainer(tiny_model(), config(tmp_path, per_device_train_batch_size=2), data)
    b = Trainer(tiny_model(), config(tmp_path, per_device_train_batch_size=2), data)
    assert a.epoch_order(0) == b.epoch_order(0) and a.epoch_order(1) == b.epoch_order(1)
    assert a.epoch_order(0) != a.epoch_order(1)
    assert sorted(a.epoch_order(1)) == list(range(9))


# -- schedules ----------------------------------------------------------------------------------------
def hf_formula(kind, step, warmup, total):
    """The schedules as written in Hugging Face transformers.optimization (num_cycles 0.5)."""
    if kind in ("linear", "cosine", "constant_with_warmup") and step < warmup:
        return step / max(1, warmup)
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if kind == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    return 1.0


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_lr_schedule_matches_formula_and_transformers(kind):
    from transformers import get_scheduler

    total, warmup = 20, 4
    f = lr_lambda(kind, warmup, total)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total)
    for s in range(total + 1):
        assert f(s) == pytest.approx(hf_formula(kind, s, warmup, total), abs=1e-12), s
        assert f(s) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), s
        opt.step()
        sched.step()


def test_trainer_logs_the_scheduled_lr_with_warmup_ratio(tmp_path):
    data = rows([6] * 8)
    cfg = config(tmp_path, per_device_train_batch_size=1, max_steps=6, lr_scheduler_type="linear",
                 warmup_ratio=0.34, learning_rate=1e-3)
    Trainer(tiny_model(), cfg, data).train()
    logs = [r for r in read_log(tmp_path / "out") if "loss" in r]
    warmup = math.ceil(0.34 * 6)  # HF: ceil(warmup_ratio * total_steps) = 3
    for r in logs:  # "lr" is the rate used for that step: multiplier at (current_steps - 1)
        s = r["current_steps"] - 1
        assert r["lr"] == pytest.approx(1e-3 * hf_formula("linear", s, warmup, 6), abs=1e-12)
    keys = {"current_steps", "total_steps", "loss", "lr", "epoch", "percentage", "elapsed_time", "remaining_time",
            "throughput", "grad_norm"}
    assert keys <= set(logs[0])
    assert logs[-1]["percentage"] == 100.0 and logs[-1]["total_steps"] == 6


def test_unknown_scheduler_is_a_clear_error():
    with pytest.raises(LLMTuneError, match="lr_scheduler_type.*cosine"):
        lr_lambda("cosin", 0, 10)


# -- precision --------------------------------------------------------------------------------------
def test_fp16_on_cpu_gives_one_notice_and_bf16_or_float32(capsys, monkeypatch):
    import llmtune.train.precision as precision

    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    assert resolve_precision(False, True, "cpu") is torch.bfloat16
    err = capsys.readouterr().err
    assert err.count("llmtune: notice:") == 1 and "fp16" in err and "bfloat16" in err
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    assert resolve_precision(False, True, "cpu") is None
    assert capsys.readouterr().err.count("llmtune: notice:") == 1
    assert resolve_precision(True, False, "cpu") is torch.bfloat16
    assert resolve_precision(False, False, "cpu") is None
    assert capsys.readouterr().err == ""
    assert resolve_precision(False, True, "cuda") is torch.float16
    with pytest.raises(LLMTuneError, match="bf16 and fp16"):
        resolve_precision(True, True, "cpu")


def test_bf16_autocast_training_keeps_float32_params_and_learns(tmp_path):
    data = rows([8] * 4)
    model = tiny_model()
    Trainer(model, config(tmp_path, bf16=True, max_steps=12, per_device_train_batch_size=4,
                          learning_rate=3e-2), data).train()
    logs = [r["loss"] for r in read_log(tmp_path / "out") if "loss" in r]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert logs[-1] < logs[0] * 0.8


# -- evaluation -------------------------------------------------------------------------------------
def test_evaluate_is_the_token_mean_over_the_eval_set(tmp_path):
    train, ev = rows([6] * 4), rows([5, 9, 13], seed=9)
    model = tiny_model()
    tr = Trainer(model, config(tmp_path, per_device_eval_batch_size=2, eval_strategy="steps", eval_steps=2), train, ev)
    got = tr.evaluate()["eval_loss"]
    total, n = 0.0, 0
    with torch.no_grad():
        for r in ev:
            ids, lab = torch.tensor([r["input_ids"]]), torch.tensor(r["labels"])
            lg = model.lm_head(model(ids))[0, :-1]
            total += float(F.cross_entropy(lg, lab[1:], ignore_index=-100, reduction="sum"))
            n += int((lab[1:] != -100).sum())
    assert got == pytest.approx(total / n, rel=1e-5)
    tr.train()
    evals = [r for r in read_log(tmp_path / "out") if "eval_loss" in r]
    assert [r["current_steps"] for r in evals] == [2, 4]


def test_eval_flags_without_eval_data_give_a_notice(tmp_path, capsys):
    tr = Trainer(tiny_model(), config(tmp_path, eval_strategy="steps", load_best_model_at_end=True), rows([6] * 4))
    assert tr.eval_strategy == "no" and not tr.load_best
    assert "no evaluation data" in capsys.readouterr().err


def test_load_best_model_at_end_restores_the_best_weights(tmp_path):
    train, ev = rows([7] * 4), rows([7] * 2, seed=4)
    model = tiny_model()
    # a huge lr makes later evals worse than an earlier one
    cfg = config(tmp_path, max_steps=6, learning_rate=0.5, eval_strategy="steps", eval_steps=1,
                 load_best_model_at_end=True, per_device_eval_batch_size=2)
    tr = Trainer(model, cfg, train, ev)
    tr.train()
    evals = {r["current_steps"]: r["eval_loss"] for r in read_log(tmp_path / "out") if "eval_loss" in r}
    best_step = min(evals, key=evals.get)
    assert tr.best_step == best_step
    assert tr.evaluate()["eval_loss"] == pytest.approx(evals[best_step], rel=1e-5)


# -- checkpoints -------------------------------------------------------------------------------------
def test_checkpoint_atomicity_and_latest(tmp_path, monkeypatch):
    data = rows([6] * 8)
    out = tmp_path / "out"
    Trainer(tiny_model(), config(tmp_path, max_steps=4, save_steps=2, per_device_train_batch_size=2), data).train()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    # leftovers of a killed run: a temp folder (even with a state file) and a folder without trainer_state
    (out / "tmp-checkpoint-9").mkdir()
    (out / "tmp-checkpoint-9" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-7").mkdir()
    assert ckpt.latest_checkpoint(out).name == "checkpoint-4"
    # a crash in the middle of writing leaves no checkpoint-N behind
    tr = Trainer(tiny_model(), config(tmp_path, per_device_train_batch_size=2), data)
    tr.global_step = 6

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_rng_state", boom)
    with pytest.raises(LLMTuneError, match="could not write checkpoint-6 .*disk full.*checkpoint-4"):
        tr.save_checkpoint()  # one clear line; the half-written temp folder is removed (issue 15)
    assert not (out / "checkpoint-6").exists() and not (out / "tmp-checkpoint-6").exists()
    assert ckpt.latest_checkpoint(out).name == "checkpoint-4"
    assert ckpt.resolve_resume(True, out).name == "checkpoint-4"


def test_save_total_limit_keeps_the_newest(tmp_path):
    Trainer(tiny_model(), config(tmp_path, max_steps=5, save_steps=1, save_total_limit=2,
                                 per_device_train_batch_size=1), rows([6] * 8)).train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "out")] == ["checkpoint-4", "checkpoint-5"]


def test_checkpoint_files_are_not_pickles_and_roundtrip(tmp_path):
    model = tiny_model()
    tr = Trainer(model, config(tmp_path, max_steps=2, save_steps=2, per_device_train_batch_size=2), rows([6] * 4))
    tr.train()
    folder = tmp_path / "out" / "checkpoint-2"
    names = sorted(p.name for p in folder.iterdir())
    assert all(n.endswith((".json", ".safetensors")) for n in names), names
    # optimizer state: same tensors after a load into a fresh optimizer
    tr2 = Trainer(tiny_model(5), config(tmp_path, max_steps=2, per_device_train_batch_size=2), rows([6] * 4))
    ckpt.load_checkpoint(folder, model=tr2.model, optimizer=tr2.optimizer, scheduler=tr2.scheduler)
    a, b = tr.optimizer.state_dict(), tr2.optimizer.state_dict()
    for idx in a["state"]:
        for key, val in a["state"][idx].items():
            assert torch.equal(val, b["state"][idx][key]), (idx, key)
    assert [g["lr"] for g in a["param_groups"]] == [g["lr"] for g in b["param_groups"]]
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), tr2.model.named_parameters()):
        assert torch.equal(p1, p2), n1
    # RNG snapshot roundtrip through files
    st = ckpt.capture_rng_state()
    ckpt.save_rng_state(st, tmp_path)
    x = (torch.rand(3), np.random.rand(), random.random())
    ckpt.restore_rng_state(ckpt.load_rng_state(tmp_path))
    assert torch.equal(torch.rand(3), x[0]) and np.random.rand() == x[1] and random.random() == x[2]


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(LLMTuneError, match="no complete checkpoint"):
        ckpt.resolve_resume(True, tmp_path)
    with pytest.raises(LLMTuneError, match="does not exist"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)
    assert ckpt.resolve_resume(None, tmp_path) is None and ckpt.resolve_resume("false", tmp_path) is None


def test_loraplus_gives_lora_b_a_higher_lr(tmp_path):
    from llmtune.train.optim import build_optimizer

    m = torch.nn.Module()
    m.lora_A = torch.nn.Parameter(torch.zeros(2, 3))
    m.lora_B = torch.nn.Parameter(torch.zeros(3, 2))
    m.bias = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer(m, config(tmp_path, learning_rate=1e-3, loraplus_lr_ratio=16, weight_decay=0.1))
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(m.lora_B)]["lr"] == pytest.approx(1.6e-2)
    assert by_param[id(m.lora_A)]["lr"] == pytest.approx(1e-3)
    assert by_param[id(m.bias)]["weight_decay"] == 0.0 and by_param[id(m.lora_A)]["weight_decay"] == 0.1


@pytest.mark.parametrize("impl", [dict(fused=True), dict(foreach=True), dict(foreach=False)])
def test_adamw_without_dynamo_wrappers_matches_torch_adamw(impl):
    """llmtune's AdamW (torch's methods minus their dynamo wrappers) against torch.optim.AdamW itself: the
    same parameters bit for bit over 4 steps with two groups, the same state_dict, and a reload continues
    identically."""
    from llmtune.train.optim import AdamW

    def make():
        torch.manual_seed(0)
        w, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))
        return [w, b], [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0, "lr": 3e-2}]

    (ours_p, ours_g), (ref_p, ref_g) = make(), make()
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6, **impl)
    ours, ref = AdamW(ours_g, **kw), torch.optim.AdamW(ref_g, **kw)
    grads = torch.Generator().manual_seed(1)
    for step in range(4):
        for a, r in zip(ours_p, ref_p):
            g = torch.randn(a.shape, generator=grads)
            a.grad, r.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        ours.zero_grad()
        ref.zero_grad()
        assert all(torch.equal(a, r) and a.grad is None for a, r in zip(ours_p, ref_p)), step
        if step == 1:  # a reload of our own state_dict continues exactly
            ours.load_state_dict(ours.state_dict())
    sd, rsd = ours.state_dict(), ref.state_dict()
    assert sd["param_groups"] == rsd["param_groups"]
    assert all(torch.equal(sd["state"][i][k], rsd["state"][i][k]) for i in rsd["state"] for k in rsd["state"][i])


def test_value_head_lr_applies_to_the_value_head_only(tmp_path):
    from llmtune.models.value_head import add_value_head
    from llmtune.train.optim import build_optimizer

    m = tiny_model()
    add_value_head(m, torch.float32)
    opt = build_optimizer(m, config(tmp_path, learning_rate=1e-4, value_head_lr=3e-3))
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert by_param[id(m.v_head.summary.weight)] == pytest.approx(3e-3)
    assert by_param[id(m.v_head.summary.bias)] == pytest.approx(3e-3)
    assert {by_param[id(p)] for n, p in m.named_parameters() if not n.startswith("v_head.")} == {1e-4}
    with pytest.raises(LLMTuneError, match="value_head_lr"):
        build_optimizer(m, config(tmp_path, value_head_lr=0))


def test_plot_loss_writes_pngs(tmp_path):
    from llmtune.train.plotting import plot_loss

    out = tmp_path / "out"
    Trainer(tiny_model(), config(tmp_path, max_steps=3), rows([6] * 4), rows([6] * 2),).train()
    written = plot_loss(out)
    assert [p.name for p in written] == ["training_loss.png"]
    assert (out / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_signal_during_a_steps_updates_is_held_until_the_step_is_whole_and_a_second_stops_at_once():
    """The rule of llmtune.train.interrupt, by hand: outside a step's updates a signal stops at once
    (SIGINT -> KeyboardInterrupt, SIGTERM -> Terminated); inside them the first is held and raised once the step
    is counted, a second one stops at once."""
    import signal

    from llmtune.errors import Terminated
    from llmtune.train.interrupt import Interrupt

    it = Interrupt()
    with pytest.raises(KeyboardInterrupt):
        it.on_signal(signal.SIGINT, 1)
    it.defer = True
    it.on_signal(signal.SIGTERM, 1)
    assert it.pending is Terminated
    with pytest.raises(KeyboardInterrupt) as second:
        it.on_signal(signal.SIGINT, 1)
    assert type(second.value) is KeyboardInterrupt
    it.start_step({"rng": 1}, None)
    it.step_counted()
    assert (it.defer, it.rng_at_step_start, it.updates_done) == (False, None, 0)
    with pytest.raises(Terminated):
        it.raise_pending()
    it.raise_pending()   # nothing held any more: returns
    assert it.pending is None


def test_one_process_checkpoints_take_the_single_process_format(tmp_path):
    """checkpointer picks the format; in one process (offline and online stages alike) it is the single-process
    one: trainable.safetensors + optimizer.* + trainer_state.json, no fsdp_shards/, no rank<r>/ parts."""
    from llmtune.train import checkpointer

    tr = Trainer(tiny_model(), config(tmp_path, max_steps=1), rows([6] * 4))
    assert checkpointer.format_for_save(tr, None) == "single"
    assert checkpointer.format_for_save(tr, ({}, [])) == "single"
    tr.train()
    path = checkpointer.save(tr)
    assert path == tmp_path / "out" / "checkpoint-1"
    assert {p.name for p in path.iterdir()} >= {"optimizer.safetensors", "optimizer.json", ckpt.TRAINER_STATE}
    assert not (path / "fsdp_shards").exists() and not list(path.glob("rank*"))

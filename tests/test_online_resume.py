"""resume_from_checkpoint for the online stages (grpo, ppo): a run stopped at step k (a save_steps checkpoint, or
Ctrl-C) and resumed must train exactly as the uninterrupted run: the same losses for steps k+1..N and the same
final trainable weights (tiny random LoRA models, sampled rollouts, CPU).

The reference is the uninterrupted run itself (a different code path: no checkpoint is read); the rollouts are
sampled (do_sample), so equality also checks that the RNG, the prompt cursor, the KL controller, the running
score moments and GRPO's queue of pending steps (num_iterations 2) are restored."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmtune.errors import LLMTuneError
from llmtune.models.value_head import add_value_head
from llmtune.train import checkpoint as ckpt
from llmtune.train.ppo import PPOStage, RewardModel
from llmtune.train.stages.grpo import GRPOStage
from llmtune.train.trainer import Trainer
from test_grpo import ROWS, grpo_config
from test_ppo import EOS, PAD, PROMPTS, FakeTokenizer, lora_model, ppo_config

LOGGED = ("loss", "grad_norm", "lr", "reward", "kl")


def length_reward(prompts, completions, **kwargs):
    return [float(len(c.split())) for c in completions]


class Interrupt:
    """Wraps a callable; raises KeyboardInterrupt (Ctrl-C) on its ``at``-th call."""

    def __init__(self, fn, at=None):
        self.fn, self.at, self.calls = fn, at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.at is not None and self.calls == self.at:
            raise KeyboardInterrupt
        return self.fn(*args, **kwargs)


def grpo_trainer(tmp_path, out, loss_interrupt=None, **kw):
    cfg = grpo_config(tmp_path, output_dir=str(out), num_iterations=2, do_sample=True, beta=0.04, **kw)
    model = lora_model()
    torch.manual_seed(0)
    stage = GRPOStage(cfg, ROWS, [("length_reward", length_reward)], [1.0], FakeTokenizer(), PAD, EOS)
    stage.loss = Interrupt(stage.loss, loss_interrupt)  # the trainer takes the stage's loss at construction
    return Trainer(model, cfg, ROWS, online=stage), model


def ppo_trainer(tmp_path, out, reward_interrupt=None, **kw):
    cfg = ppo_config(tmp_path, output_dir=str(out), do_sample=True, ppo_epochs=2, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, ppo_target=0.5, ppo_kl_coeff=0.1, ppo_score_norm=True, **kw)
    model = lora_model()
    add_value_head(model)
    rows = [{"input_ids": p, "attention_mask": [1] * len(p)} for p in PROMPTS]
    torch.manual_seed(0)
    fn = Interrupt(lambda prompts, responses: [float(len(r.split())) for r in responses], reward_interrupt)
    stage = PPOStage(model, cfg, rows, RewardModel("fn", fn=fn, tokenizer=FakeTokenizer()), PAD, EOS)
    return Trainer(model, cfg, rows, online=stage), model


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def logs(trainer, first):
    return [{k: e[k] for k in LOGGED if k in e} for e in trainer.log_history if e["current_steps"] >= first]


def assert_same(resumed, model, reference, ref_model, first):
    got, want = logs(resumed, first), logs(reference, first)
    assert len(got) == len(want) == reference.total_steps - first + 1
    assert got == want  # float32, same operations in the same order: exact
    a, b = trainable(model), trainable(ref_model)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def uninterrupted(tmp_path_factory, make, name, max_steps):
    """The reference: ``make``'s run of ``max_steps`` saving every step, in ``<tmp>/ref``; ``(tmp, trainer,
    model)``."""
    tmp = tmp_path_factory.mktemp(name)
    trainer, model = make(tmp, tmp / "ref", max_steps=max_steps, save_steps=1)
    trainer.train()
    return tmp, trainer, model


@pytest.fixture(scope="module")
def grpo_reference(tmp_path_factory):
    return uninterrupted(tmp_path_factory, grpo_trainer, "grpo", 4)


@pytest.mark.parametrize("k", [1, 2])  # 1: one of the rollout's two steps still queued; 2: the queue is empty
def test_grpo_resumed_from_a_save_steps_checkpoint_trains_as_the_uninterrupted_run(grpo_reference, tmp_path, k):
    tmp, reference, ref_model = grpo_reference
    folder = tmp / "ref" / f"checkpoint-{k}"
    meta = json.loads((folder / ckpt.ONLINE_STATE).read_text())
    assert len(meta["queue"]) == (1 if k == 1 else 0)  # num_iterations 2: the rollout's second step waits
    assert meta["stage_state"]["stage"] == "grpo" and meta["stage_state"]["epoch"] == 1
    trainer, model = grpo_trainer(tmp_path, tmp_path / "o", max_steps=4, resume_from_checkpoint=str(folder))
    trainer.train()
    assert_same(trainer, model, reference, ref_model, k + 1)


def test_grpo_interrupted_mid_queue_then_resumed_trains_as_the_uninterrupted_run(grpo_reference, tmp_path, capsys):
    _, reference, ref_model = grpo_reference
    out = tmp_path / "o"
    # 2 micro-batches per step: call 3 is the first micro-batch of step 2, a step popped from the queue
    first, _ = grpo_trainer(tmp_path, out, loss_interrupt=3, max_steps=4, save_steps=100)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert "interrupted: saved" in capsys.readouterr().err
    meta = json.loads((out / "checkpoint-1" / ckpt.ONLINE_STATE).read_text())
    assert len(meta["queue"]) == 1  # the interrupted step's rollout is saved, not lost
    trainer, model = grpo_trainer(tmp_path, out, max_steps=4, save_steps=100, resume_from_checkpoint=True)
    trainer.train()
    assert_same(trainer, model, reference, ref_model, 2)


@pytest.fixture(scope="module")
def ppo_reference(tmp_path_factory):
    return uninterrupted(tmp_path_factory, ppo_trainer, "ppo", 3)


def test_ppo_resumed_from_a_save_steps_checkpoint_trains_as_the_uninterrupted_run(ppo_reference, tmp_path):
    tmp, reference, ref_model = ppo_reference
    folder = tmp / "ref" / "checkpoint-1"
    state = json.loads((folder / ckpt.ONLINE_STATE).read_text())["stage_state"]
    assert state["kl_coef"] != 0.1 and state["score_moments"][2] == pytest.approx(4)  # adapted, 4 scores seen
    assert any(n.startswith("v_head") for n in ckpt.read_checkpoint_tensors(folder / "trainable.safetensors"))
    trainer, model = ppo_trainer(tmp_path, tmp_path / "o", max_steps=3, resume_from_checkpoint=str(folder))
    trainer.train()
    assert_same(trainer, model, reference, ref_model, 2)
    assert trainer.online.kl_ctl.value == reference.online.kl_ctl.value


def test_ppo_interrupted_in_a_rollout_then_resumed_trains_as_the_uninterrupted_run(ppo_reference, tmp_path, capsys):
    _, reference, ref_model = ppo_reference
    out = tmp_path / "o"
    first, _ = ppo_trainer(tmp_path, out, reward_interrupt=5, max_steps=3, save_steps=100)  # 2 calls per rollout
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert "interrupted: saved" in capsys.readouterr().err and (out / "checkpoint-2").is_dir()
    trainer, model = ppo_trainer(tmp_path, out, max_steps=3, save_steps=100, resume_from_checkpoint=True)
    trainer.train()
    assert_same(trainer, model, reference, ref_model, 3)


def test_ctrl_c_during_a_ppo_iterations_updates_finishes_the_iteration_then_saves_it(ppo_reference, tmp_path,
                                                                                    capsys):
    import os
    import signal

    _, reference, ref_model = ppo_reference
    out = tmp_path / "o"
    first, _ = ppo_trainer(tmp_path, out, max_steps=3, save_steps=100)
    calls = []

    def loss(*args):  # 2 updates x 2 mini-batches per iteration: call 6 is step 2's first update, 2nd mini-batch
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C
        return inner(*args)

    inner = first.online.loss
    first.stage = loss
    before = signal.getsignal(signal.SIGINT)   # Python's handler, or SIG_IGN when started in the background
    with pytest.raises(KeyboardInterrupt):
        first.train()
    err = capsys.readouterr().err
    assert "finishing the optimizer updates of step 2" in err and "interrupted: saved" in err
    assert len(calls) == 8 and first.global_step == 2  # the iteration was completed, then saved
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    trainer, model = ppo_trainer(tmp_path, out, max_steps=3, save_steps=100, resume_from_checkpoint=True)
    trainer.train()
    assert_same(trainer, model, reference, ref_model, 3)


def test_ppo_interrupted_between_its_updates_saves_no_half_step(tmp_path, capsys):
    trainer, _ = ppo_trainer(tmp_path, tmp_path / "o", max_steps=3, save_steps=100)
    # an exception within update 2 of step 1 (a second Ctrl-C, or a kill of the process group)
    trainer.online.loss = trainer.stage = Interrupt(trainer.online.loss, 3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert "no checkpoint of it is saved" in capsys.readouterr().err
    assert ckpt.list_checkpoints(tmp_path / "o") == []


def test_another_stages_checkpoint_another_prompt_set_or_no_online_state_is_one_clear_error(grpo_reference, tmp_path):
    from llmtune.config import parse_config

    tmp, _, _ = grpo_reference
    rows = [{"input_ids": p, "attention_mask": [1] * len(p), "labels": p} for p in PROMPTS]
    cfg = parse_config(dict(stage="sft", model_name_or_path=str(tmp_path / "m"), dataset="x", max_steps=1, save_steps=1,
                            output_dir=str(tmp_path / "sft"), per_device_train_batch_size=2), command="train")
    Trainer(lora_model(), cfg, rows).train()
    sft = tmp_path / "sft" / "checkpoint-1"
    assert sft.is_dir()
    trainer, model = grpo_trainer(tmp_path, tmp_path / "o", max_steps=4, resume_from_checkpoint=str(sft))
    before = trainable(model)
    with pytest.raises(LLMTuneError, match=r"checkpoint-1 is a checkpoint of stage sft, not grpo"):
        trainer.train()
    assert all(torch.equal(p, trainable(model)[n]) for n, p in before.items())  # nothing was loaded
    trainer, _ = grpo_trainer(tmp_path, tmp_path / "o3", max_steps=4, resume_from_checkpoint=str(tmp / "ref" /
                                                                                                 "checkpoint-1"))
    trainer.online.prompts = ROWS[:3]  # another prompt set (e.g. a changed max_samples)
    with pytest.raises(LLMTuneError, match="not that of stage grpo on these 3 prompts"):
        trainer.train()
    multi = tmp_path / "multi" / "checkpoint-2"  # as written under torchrun with 2 processes
    shutil.copytree(tmp / "ref" / "checkpoint-2", multi)
    state = json.loads((multi / ckpt.TRAINER_STATE).read_text())
    (multi / ckpt.TRAINER_STATE).write_text(json.dumps(dict(state, world_size=2)))
    trainer, _ = grpo_trainer(tmp_path, tmp_path / "o4", max_steps=4, resume_from_checkpoint=str(multi))
    with pytest.raises(LLMTuneError, match=r"written by 2 process\(es\), this run has 1.*--nproc_per_node 2"):
        trainer.train()
    bare = tmp_path / "checkpoint-2"
    shutil.copytree(tmp / "ref" / "checkpoint-2", bare)
    (bare / ckpt.ONLINE_STATE).unlink()
    trainer, _ = grpo_trainer(tmp_path, tmp_path / "o2", max_steps=4, resume_from_checkpoint=str(bare))
    with pytest.raises(LLMTuneError, match=rf"{bare} has no online_state.json"):
        trainer.train()


# -- the real model through the setup path (bf16 autocast, LoRA, the output folder) -------------------------------
def _outputs(folder):
    from safetensors.torch import load_file

    return {f: load_file(str(folder / f)) for f in ("adapter_model.safetensors", "value_head.safetensors")
            if (folder / f).is_file()}


def _resume_real(tmp_path, train, cfg, k, **kw):
    """Run ``cfg`` with save_steps 1 into ``a``; copy a/checkpoint-k into ``b`` and resume there; return both
    folders' (log, saved tensors)."""
    from test_grpo_real import log_entries

    train(dict(cfg, output_dir=str(tmp_path / "a"), save_steps=1), **kw)
    shutil.copytree(tmp_path / "a" / f"checkpoint-{k}", tmp_path / "b" / f"checkpoint-{k}")
    train(dict(cfg, output_dir=str(tmp_path / "b"), save_steps=1, resume_from_checkpoint=True), **kw)
    return [(log_entries(tmp_path / d), _outputs(tmp_path / d)) for d in ("a", "b")]


def _assert_real_same(runs, k, keys):
    (log_a, out_a), (log_b, out_b) = runs
    assert [e["current_steps"] for e in log_b[-(len(log_a) - k):]] == list(range(k + 1, len(log_a) + 1))
    for x, y in zip(log_a[k:], log_b[-(len(log_a) - k):]):
        assert {key: x[key] for key in keys} == {key: y[key] for key in keys}
    assert out_a.keys() == out_b.keys() and out_a
    for f in out_a:
        assert all(torch.equal(out_a[f][n], out_b[f][n]) for n in out_a[f]), f


@pytest.mark.real
def test_real_grpo_resumed_mid_queue_through_run_train_is_exact(tmp_path, real_model_path):
    """135M model, bf16 autocast, LoRA, sampled, num_iterations 2: resumed from checkpoint-1 (its rollout's second
    step queued), steps 2-3 log the same loss/reward and the saved adapter is bit-equal (about 11 s here)."""
    from llmtune.train.setup import run_train
    from test_grpo_real import short_reply, write_data

    cfg = dict(stage="grpo", model_name_or_path=str(real_model_path), dataset="greet",
               dataset_dir=str(write_data(tmp_path / "d")), template="chatml", finetuning_type="lora", lora_rank=8,
               per_device_train_batch_size=4, gradient_accumulation_steps=1, num_generations=4, learning_rate=2e-3,
               max_steps=3, max_completion_length=8, temperature=1.0, top_k=0, top_p=1.0, beta=0.04, logging_steps=1,
               seed=0, cutoff_len=64, bf16=True, num_iterations=2)
    runs = _resume_real(tmp_path, run_train, cfg, 1, reward_funcs=[short_reply])
    _assert_real_same(runs, 1, ("loss", "reward", "kl", "grad_norm"))


@pytest.mark.real
def test_real_ppo_resumed_through_train_ppo_is_exact(tmp_path, real_model_path):
    """135M model, bf16, LoRA + value head, sampled, adaptive KL and score normalisation: resumed from
    checkpoint-1, steps 2-3 log the same numbers and the adapter and value head are bit-equal."""
    from llmtune.train.ppo import train_ppo
    from test_grpo_real import write_data

    cfg = dict(model_name_or_path=str(real_model_path), dataset="greet", dataset_dir=str(write_data(tmp_path / "d")),
               template="chatml", finetuning_type="lora", lora_rank=8, per_device_train_batch_size=2,
               gradient_accumulation_steps=2, ppo_epochs=2, learning_rate=5e-4, max_steps=3, max_new_tokens=8,
               temperature=0.9, top_k=0, top_p=0.8, bf16=True, logging_steps=1, seed=0, cutoff_len=64,
               ppo_target=1.0, ppo_score_norm=True)
    runs = _resume_real(tmp_path, train_ppo, cfg, 1, reward_fn=lambda p, r: [-len(x) / 40 for x in r])
    _assert_real_same(runs, 1, ("loss", "reward", "kl", "grad_norm", "ppo/kl_coef"))

"""Stages grpo and ppo under data parallelism: 2 gloo ranks (spawned, CPU). Each rank generates its share of the step's
completions (a group of num_generations spans both ranks here); the group statistics must be those of the
whole step: the advantages each rank trains on equal the DeepSeekMath formula (float64, written here) applied
to the rewards of BOTH ranks, and the logged reward metrics are the same on both ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_distributed import WORLD, _init, spawn

G = 4


def _grpo_worker(rank, init_file, tmp, _unused=None):
    _init(rank, init_file)
    from llmtune.train.stages.grpo import GRPOStage
    from llmtune.train.trainer import Trainer
    from test_grpo import ROWS, grpo_config
    from test_ppo import EOS, PAD, FakeTokenizer, lora_model

    seen = []

    def fn(prompts, completions, solution, **kw):
        out = [float(len(c)) + float(s) for c, s in zip(completions, solution)]
        seen.append({"prompts": prompts, "rewards": out})
        return out

    cfg = grpo_config(Path(tmp), per_device_train_batch_size=2, gradient_accumulation_steps=1, num_generations=G,
                      max_steps=2, output_dir=str(Path(tmp) / "out"))
    model = lora_model()
    torch.manual_seed(100 + rank)  # each rank samples its own completions
    stage = GRPOStage(cfg, ROWS, [("fn", fn)], [1.0], FakeTokenizer(), PAD, EOS)
    trainer = Trainer(model, cfg, ROWS, online=stage)
    steps = []
    original = stage.make_experience

    def spy(tr):
        out = original(tr)
        steps.append([b["advantages"].tolist() for b in out[0].updates[0]])
        return out

    stage.make_experience = spy
    trainer.train()
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "adv": steps, "log": trainer.log_history}))
    torch.distributed.destroy_process_group()


def test_grpo_two_ranks_share_exact_group_statistics(tmp_path):
    spawn(_grpo_worker, tmp_path)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for step in range(2):
        # the step's completions in rank order: rank 0 holds completions 0-1 of the group, rank 1 completions 2-3
        prompts = sum((r["seen"][step]["prompts"] for r in res), [])
        rewards = torch.tensor(sum((r["seen"][step]["rewards"] for r in res), []), dtype=torch.float64)
        assert len(rewards) == G and len(set(prompts)) == 1  # one group, split across the two ranks
        assert float(rewards.std()) > 0  # informative: the ranks sampled different completions
        expect = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        got = torch.tensor(sum((sum(r["adv"][step], []) for r in res), []), dtype=torch.float64)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
        logs = [r["log"][step] for r in res]
        assert logs[0]["reward"] == logs[1]["reward"] == pytest_approx(float(rewards.mean()))
        assert logs[0]["reward_std"] == logs[1]["reward_std"]
        assert logs[0]["loss"] == logs[1]["loss"]  # the step's loss is reduced over both ranks


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-6)


def _ppo_worker(rank, init_file, tmp, _unused=None):
    _init(rank, init_file)
    from safetensors.torch import save_file

    from llmtune.models.value_head import add_value_head
    from llmtune.train.stages.ppo import PPOStage
    from llmtune.train.stages.ppo_reward import RewardModel
    from llmtune.train.trainer import Trainer
    from test_ppo import EOS, PAD, PROMPTS, FakeTokenizer, lora_model, ppo_config

    seen = []

    def fn(prompts, responses):
        out = [float(len(r.split())) for r in responses]
        seen.append({"prompts": prompts, "rewards": out})
        return out

    model = lora_model()
    add_value_head(model)
    cfg = ppo_config(Path(tmp), max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                     ppo_epochs=2, ppo_target=1.0, output_dir=str(Path(tmp) / "out"))
    rows = [{"input_ids": p, "attention_mask": [1] * len(p)} for p in PROMPTS]
    torch.manual_seed(100 + rank)
    stage = PPOStage(model, cfg, rows, RewardModel("fn", fn=fn, tokenizer=FakeTokenizer()), PAD, EOS)
    trainer = Trainer(model, cfg, rows, online=stage)
    trainer.train()
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
              str(Path(tmp) / f"ppo-rank{rank}.safetensors"))
    (Path(tmp) / f"ppo-rank{rank}.json").write_text(json.dumps({"seen": seen, "log": trainer.log_history,
                                                               "kl_coef": stage.kl_ctl.value}))
    torch.distributed.destroy_process_group()


def test_ppo_two_ranks_split_the_rollout_and_share_statistics_and_weights(tmp_path):
    from safetensors.torch import load_file

    spawn(_ppo_worker, tmp_path)
    res = [json.loads((tmp_path / f"ppo-rank{r}.json").read_text()) for r in range(WORLD)]
    for step in range(2):
        # the reward function is called once per mini-batch of 1: two calls per rank and rollout
        calls = [r["seen"][2 * step:2 * step + 2] for r in res]
        p0, p1 = ([p for c in cs for p in c["prompts"]] for cs in calls)
        assert len(p0) == len(p1) == 2 and not set(p0) & set(p1)  # each rank rolls out its own prompts
        rewards = [x for cs in calls for c in cs for x in c["rewards"]]
        logs = [r["log"][step] for r in res]
        for key in ("reward", "kl", "entropy", "response_length", "ppo/kl_coef", "loss"):
            assert logs[0][key] == pytest_approx(logs[1][key]), key
        assert logs[0]["reward"] == pytest_approx(sum(rewards) / 4)
    assert res[0]["kl_coef"] == res[1]["kl_coef"] != 0.05  # the adaptive controller moved, the same on both
    w0, w1 = (load_file(str(tmp_path / f"ppo-rank{r}.safetensors")) for r in range(WORLD))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)  # DDP kept the replicas equal


# -- resume of a data-parallel online run: every rank's rollout state is in the checkpoint ------------------
def _grpo_resume_worker(rank, init_file, tmp, name, resume_from=None):
    _init(rank, init_file)
    from safetensors.torch import save_file

    from llmtune.train.stages.grpo import GRPOStage
    from llmtune.train.trainer import Trainer
    from test_grpo import ROWS, grpo_config
    from test_ppo import EOS, PAD, FakeTokenizer, lora_model

    cfg = grpo_config(Path(tmp), per_device_train_batch_size=2, gradient_accumulation_steps=1, num_generations=G,
                      max_steps=4, save_steps=1, num_iterations=2, do_sample=True, beta=0.04,
                      output_dir=str(Path(tmp) / name), resume_from_checkpoint=resume_from)
    model = lora_model()
    torch.manual_seed(100 + rank)  # each rank samples its own completions
    stage = GRPOStage(cfg, ROWS, [("length", lambda prompts, completions, **kw: [float(len(c)) for c in completions])],
                      [1.0], FakeTokenizer(), PAD, EOS)
    trainer = Trainer(model, cfg, ROWS, online=stage)
    trainer.train()
    logs = [{k: e[k] for k in ("current_steps", "loss", "grad_norm", "reward", "kl") if k in e}
            for e in trainer.log_history]
    (Path(tmp) / f"{name}-rank{rank}.json").write_text(json.dumps(logs))
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
              str(Path(tmp) / f"{name}-rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


def test_grpo_two_ranks_resumed_mid_queue_train_as_the_uninterrupted_run(tmp_path):
    """2 ranks, sampled completions, num_iterations 2: checkpoint-1 holds one queued step per rank (each rank's
    own rollouts, in rank<r>/ for rank 1, with that rank's RNG). Resumed from it on 2 ranks, steps 2-4 log the
    same values and end at the same weights as the uninterrupted run (reference: that run; exact, float32).
    A single process cannot resume it (one clear error)."""
    from safetensors.torch import load_file

    from llmtune.errors import LLMTuneError
    from llmtune.train import checkpoint as ckpt

    spawn(_grpo_resume_worker, tmp_path, "ref")
    folder = tmp_path / "ref" / "checkpoint-1"
    for part in (folder, folder / "rank1"):
        assert len(json.loads((part / ckpt.ONLINE_STATE).read_text())["queue"]) == 1, part
    assert (folder / "rank1" / "rng_state.json").is_file() and not list((tmp_path / "ref").glob("tmp-*"))
    spawn(_grpo_resume_worker, tmp_path, "resumed", str(folder))
    for r in range(WORLD):
        ref = json.loads((tmp_path / f"ref-rank{r}.json").read_text())
        got = json.loads((tmp_path / f"resumed-rank{r}.json").read_text())
        assert [e for e in ref if e["current_steps"] >= 2] == [e for e in got if e["current_steps"] >= 2]
        a, b = (load_file(str(tmp_path / f"{n}-rank{r}.safetensors")) for n in ("ref", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), r
    # the ranks sampled different completions: rank 1's state is its own, not a copy of rank 0's
    q0, q1 = (load_file(str(part / ckpt.ONLINE_QUEUE)) for part in (folder, folder / "rank1"))
    assert any(not torch.equal(q0[k], q1[k]) for k in q0 if q0[k].shape == q1[k].shape)

    from llmtune.train.stages.grpo import GRPOStage
    from llmtune.train.trainer import Trainer
    from test_grpo import ROWS, grpo_config
    from test_ppo import EOS, PAD, FakeTokenizer, lora_model

    cfg = grpo_config(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1, num_generations=G,
                      max_steps=4, num_iterations=2, output_dir=str(tmp_path / "single"),
                      resume_from_checkpoint=str(folder))
    stage = GRPOStage(cfg, ROWS, [("length", lambda prompts, completions, **kw: [1.0] * len(completions))], [1.0],
                      FakeTokenizer(), PAD, EOS)
    with pytest.raises(LLMTuneError, match=r"written by 2 process\(es\), this run has 1"):
        Trainer(lora_model(), cfg, ROWS, online=stage).train()


def _grpo_disk_full_worker(rank, init_file, tmp):
    import errno

    _init(rank, init_file)
    from llmtune.errors import LLMTuneError
    from llmtune.train import checkpoint as ckpt
    from llmtune.train.stages.grpo import GRPOStage
    from llmtune.train.trainer import Trainer
    from test_grpo import ROWS, grpo_config
    from test_ppo import EOS, PAD, FakeTokenizer, lora_model

    if rank == 1:  # this rank's disk is full when it writes its rollout state
        def full(online, folder):
            raise OSError(errno.ENOSPC, "No space left on device")

        ckpt.save_online_state = full
    cfg = grpo_config(Path(tmp), per_device_train_batch_size=2, gradient_accumulation_steps=1, num_generations=G,
                      max_steps=2, save_steps=1, output_dir=str(Path(tmp) / "out"))
    stage = GRPOStage(cfg, ROWS, [("length", lambda prompts, completions, **kw: [float(len(c)) for c in completions])],
                      [1.0], FakeTokenizer(), PAD, EOS)
    trainer = Trainer(lora_model(), cfg, ROWS, online=stage)
    try:
        trainer.train()
        message = "no error"
    except LLMTuneError as err:
        message = str(err)
    (Path(tmp) / f"err{rank}.txt").write_text(message)
    torch.distributed.destroy_process_group()


def test_grpo_two_ranks_a_rank_that_cannot_write_its_part_stops_both_and_publishes_nothing(tmp_path):
    spawn(_grpo_disk_full_worker, tmp_path)
    err0, err1 = ((tmp_path / f"err{r}.txt").read_text() for r in range(WORLD))
    assert "another rank could not write its rollout state" in err0, err0
    assert "rank 1: could not write" in err1 and "rank1" in err1 and "No space left" in err1, err1
    out = tmp_path / "out"
    assert not list(out.glob("checkpoint-*")) and not list(out.glob("tmp-checkpoint-*"))


def _grpo_ctrl_c_worker(rank, init_file, tmp):
    _init(rank, init_file)
    from llmtune.train.stages.grpo import GRPOStage
    from llmtune.train.trainer import Trainer
    from test_grpo import ROWS, grpo_config
    from test_ppo import EOS, PAD, FakeTokenizer, lora_model

    cfg = grpo_config(Path(tmp), per_device_train_batch_size=2, gradient_accumulation_steps=1, num_generations=G,
                      max_steps=4, save_steps=2, output_dir=str(Path(tmp) / "out"))
    stage = GRPOStage(cfg, ROWS, [("length", lambda prompts, completions, **kw: [float(len(c)) for c in completions])],
                      [1.0], FakeTokenizer(), PAD, EOS)
    loss, calls = stage.loss, []

    def interrupted_in_step_3(*args, **kwargs):  # Ctrl-C reaches both ranks during step 3
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loss(*args, **kwargs)

    stage.loss = interrupted_in_step_3
    trainer = Trainer(lora_model(), cfg, ROWS, online=stage)
    try:
        trainer.train()
        outcome = "finished"
    except KeyboardInterrupt:
        outcome = "interrupted"
    (Path(tmp) / f"outcome{rank}.txt").write_text(outcome)
    torch.distributed.destroy_process_group()


def test_grpo_two_ranks_ctrl_c_keeps_the_last_periodic_checkpoint_and_saves_no_other(tmp_path, capfd):
    spawn(_grpo_ctrl_c_worker, tmp_path)
    assert [(tmp_path / f"outcome{r}.txt").read_text() for r in range(WORLD)] == ["interrupted"] * WORLD
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "rank1" / "online_state.json").is_file()
    err = capfd.readouterr().err
    assert "saves no checkpoint on Ctrl-C" in err and str(out / "checkpoint-2") in err, err[-2000:]

"""Stages grpo and ppo under data parallelism: 2 gloo ranks (spawned, CPU). Each rank generates its share of the step's
completions (a group of num_generations spans both ranks here); the group statistics must be those of the
whole step: the advantages each rank trains on equal the DeepSeekMath formula (float64, written here) applied
to the rewards of BOTH ranks, and the logged reward metrics are the same on both ranks."""

from __future__ import annotations

import json
from pathlib import Path

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

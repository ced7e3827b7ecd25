"""Stage grpo on the shared Trainer with a tiny random LoRA model (CPU, fast): the step's batch rule, what reward
functions receive (decoded completions, dataset columns by name), the advantages and loss it trains on (checked
against the formulas written here), num_iterations reuse, the reference KL and the one-line errors.

The loss functions themselves are tested against the papers and TRL in test_losses_grpo*.py / test_rewards.py."""

from __future__ import annotations

import math

import pytest
import torch

from llmtune.config import parse_config
from llmtune.errors import LLMTuneError
from llmtune.train.stages.grpo import GRPOStage, check_grpo_config, scale_rewards_value
from llmtune.train.trainer import Trainer
from test_ppo import EOS, PAD, PROMPTS, FakeTokenizer, lora_model


def grpo_config(tmp_path, **kw):
    base = dict(stage="grpo", model_name_or_path=str(tmp_path / "m"), dataset="x", output_dir=str(tmp_path / "o"),
                per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4, learning_rate=1e-3,
                max_steps=2, max_completion_length=6, temperature=1.0, top_p=1.0, top_k=0, logging_steps=1, seed=0,
                reward_funcs="unused", loss_type="grpo")
    base.update(kw)
    return parse_config(base, command="train")


ROWS = [{"input_ids": p, "attention_mask": [1] * len(p), "columns": {"solution": str(i), "instruction": f"q{i}"}}
        for i, p in enumerate(PROMPTS)]


def run(tmp_path, funcs, weights=None, **kw):
    cfg = grpo_config(tmp_path, **kw)
    model = lora_model()
    torch.manual_seed(0)
    stage = GRPOStage(cfg, ROWS, funcs, weights or [1.0] * len(funcs), FakeTokenizer(), PAD, EOS)
    trainer = Trainer(model, cfg, ROWS, online=stage)
    trainer.train()
    return stage, trainer


def test_a_step_holds_a_multiple_of_num_generations_completions(tmp_path):
    with pytest.raises(LLMTuneError, match="multiple of num_generations"):
        check_grpo_config(grpo_config(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=1))
    with pytest.raises(LLMTuneError, match="reward_funcs"):
        check_grpo_config(grpo_config(tmp_path, reward_funcs=None))
    check_grpo_config(grpo_config(tmp_path))
    assert [scale_rewards_value(v) for v in ("true", "false", "batch", True)] == ["group", "none", "batch", "group"]
    with pytest.raises(LLMTuneError, match="scale_rewards"):
        scale_rewards_value("groups")


def test_reward_functions_see_completions_and_columns_and_the_step_trains_on_group_advantages(tmp_path):
    calls = []

    def length_reward(prompts, completions, solution, instruction, **kwargs):
        calls.append((prompts, completions, solution, instruction))
        return [float(len(c.split())) for c in completions]

    def parity(prompts, completions, **kwargs):
        return [None if len(c.split()) % 2 else 1.0 for c in completions]

    stage, trainer = run(tmp_path, [("length_reward", length_reward), ("parity", parity)], weights=[1.0, 0.5])
    assert len(calls) == 2 and stage.prompts_per_step == 2  # 4 x 2 completions per step, 4 per prompt
    prompts, completions, solution, instruction = calls[0]
    assert len(completions) == 8 and prompts[0] == prompts[3] != prompts[4]  # groups are consecutive
    # the prompt text is the decoded prompt; the row's columns follow their prompt
    for i in range(8):
        k = [j for j, p in enumerate(PROMPTS) if " ".join(f"t{t}" for t in p) == prompts[i]][0]
        assert solution[i] == str(k) and instruction[i] == f"q{k}"
    log = trainer.log_history[0]
    lengths = [len(c.split()) for c in completions]
    par = [math.nan if n % 2 else 1.0 for n in lengths]
    total = [n + (0.5 * p if p == p else 0.0) for n, p in zip(lengths, par)]
    assert log["reward"] == pytest.approx(sum(total) / 8, rel=1e-6)
    mean_std = torch.tensor(total).std().item()
    assert log["reward_std"] == pytest.approx(mean_std, rel=1e-5)
    assert log["rewards/length_reward/mean"] == pytest.approx(sum(lengths) / 8, rel=1e-6)
    assert log["completions/mean_length"] == pytest.approx(sum(lengths) / 8, rel=1e-6)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy",
                "completions/clipped_ratio", "frac_reward_zero_std", "grad_norm"):
        assert math.isfinite(log[key]), key
    assert "kl" not in log  # beta = 0: no reference, no KL
    # on-policy (num_iterations 1), loss_type grpo: the loss is -mean_i A_i (ratios are 1); group-normalised
    # advantages sum to 0 within each group
    assert abs(log["loss"]) < 1e-5
    assert log["clip_ratio/region_mean"] == 0.0


def test_num_iterations_reuses_one_rollout_with_old_logps_and_beta_adds_the_reference_kl(tmp_path):
    calls = []

    def fn(prompts, completions, **kw):
        calls.append(1)
        return [float(len(c)) for c in completions]

    _, trainer = run(tmp_path, [("fn", fn)], max_steps=4, num_iterations=2, beta=0.1, learning_rate=0.05,
                     epsilon=0.01)
    assert len(calls) == 2  # 4 steps, one rollout per 2
    log = trainer.log_history
    assert all(math.isfinite(e["kl"]) and e["kl"] >= 0 for e in log)
    assert log[0]["kl"] > 0  # lora_model's adapter is non-zero: the policy is not the reference
    # the first step of a rollout runs at ratio 1; the second after an update (lr 0.05) clips some tokens
    assert log[0]["clip_ratio/region_mean"] == 0.0
    assert log[1]["clip_ratio/region_mean"] > 0.0
    # the rollout metrics are those of the rollout the step trains on
    assert log[0]["reward"] == log[1]["reward"] and log[0]["completions/mean_length"] == log[1]["completions/mean_length"]


def test_a_reward_function_that_fails_is_one_clear_error_naming_it(tmp_path):
    def broken(prompts, completions, **kw):
        raise KeyError("answer")

    with pytest.raises(LLMTuneError, match=r"reward function broken \(.*test_grpo.py:\d+\) raised KeyError"):
        run(tmp_path, [("broken", broken)])

    def short(prompts, completions, **kw):
        return [1.0]

    with pytest.raises(LLMTuneError, match="returned 1 values for 8 completions"):
        run(tmp_path, [("short", short)], output_dir=str(tmp_path / "o2"))


def test_mask_truncated_completions_leaves_them_out_of_the_loss(tmp_path):
    seen = []

    def fn(prompts, completions, **kw):
        seen.append(completions)
        return [float(len(c)) for c in completions]

    cfg = grpo_config(tmp_path, max_steps=1, mask_truncated_completions=True, loss_type="dapo")
    stage = GRPOStage(cfg, ROWS, [("fn", fn)], [1.0], FakeTokenizer(), PAD, EOS)
    model = lora_model()
    torch.manual_seed(0)

    class Host:  # what make_experience needs of the trainer
        def __init__(self):
            self.model = model

        def autocast(self):
            import contextlib
            return contextlib.nullcontext()

    (step,) = stage.make_experience(Host())
    micro = step.updates[0]
    kinds = set()
    for b in micro:
        comp = b["input_ids"][:, b["prompt_len"]:]
        for row, m in zip(comp.tolist(), b["completion_mask"].tolist()):
            stopped = any(t in EOS for t in row)
            kinds.add(stopped)
            # a completion without a stop token (truncated) contributes no token; the others all theirs
            assert sum(m) == (0 if not stopped else row.index(next(t for t in row if t in EOS)) + 1)
    assert kinds == {True, False}  # the case is informative: some completions were truncated, some stopped
    assert sum(stage.count_items(b) for b in micro) == sum(int(b["completion_mask"].sum()) for b in micro) > 0


def test_an_rm_output_folder_is_a_reward_function_scoring_prompt_plus_completion(tmp_path):
    from llmtune import peft
    from llmtune.rewards import load_reward_funcs
    from llmtune.runs import AdapterChain
    from llmtune.train.stages.grpo import reward_model_func
    from test_ppo import save_head

    class Tok(FakeTokenizer):
        def encode(self, text, add_special_tokens=False):
            return [int(w[1:]) for w in text.split()]

    base = tmp_path / "base"
    base.mkdir()
    policy = lora_model(0)
    policy.adapter_chain = AdapterChain(base=str(base))
    rm = tmp_path / "rm_output"
    save_head(rm)  # a value head alone (the seed's --lora_target value): scores with the adapters disabled
    cfg = grpo_config(tmp_path, reward_funcs=str(rm))
    adapters = []
    ((name, fn),) = load_reward_funcs(str(rm), reward_model_loader=lambda d: reward_model_func(policy, cfg, Tok(),
                                                                                           d, adapters))
    assert name == "rm_output" and adapters == []
    scores = fn(prompts=["t5 t9", "t7"], completions=[" t14 t3", " t22 t40"])
    from safetensors.torch import load_file

    head = load_file(str(rm / "value_head.safetensors"))
    for seq, got in zip(([5, 9, 14, 3], [7, 22, 40]), scores):
        with torch.no_grad(), peft.disable_adapters(policy):
            h = policy.eval()(torch.tensor([seq]))[0, -1]
        expect = float(h @ head["v_head.summary.weight"][0] + head["v_head.summary.bias"][0])
        assert got == pytest.approx(expect, rel=1e-5, abs=1e-5)

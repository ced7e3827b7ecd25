"""PPO loop pieces that are the ppo stage's own (tiny random models, CPU, fast).

The losses (GAE, clipped losses, KL placement) are tested in test_losses.py and the rollouts in
test_rollout.py; here: the alignment of log-probs/values/reward scores with the
response tokens, running score normalisation, PPO on the shared Trainer (one step, and the numbers of its
former own loop), and the reward-model checks.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmtune import peft
from llmtune.config import parse_config
from llmtune.errors import LLMTuneError
from llmtune.models import ModelConfig, Transformer
from llmtune.models.value_head import ValueHead, add_value_head
from llmtune.rollout import generate_rollouts
from llmtune.train.ppo import PPOStage, RewardModel, RunningMoments, load_reward_model, policy_forward
from llmtune.train.trainer import Trainer
from config_helpers import make_config

VOCAB = 53
PAD = 0


def tiny_model(seed: int = 0, hidden: int = 32) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Transformer(cfg).float()
    with torch.no_grad():  # spread the logits so that sampling visits many tokens
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.2)
    return model


def lora_model(seed: int = 0) -> Transformer:
    model = tiny_model(seed)
    peft.apply_lora(model, lora_rank=4, lora_target="all")
    with torch.no_grad():  # a non-zero adapter, so policy != reference
        for _, layer in peft.lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.1)
    return model


PROMPTS = [[5, 9, 14, 3], [7, 22], [11, 12, 13, 40, 41, 8], [30]]
EOS = list(range(40, 53))  # a quarter of the vocabulary stops a row, so rows end at different steps


def test_policy_forward_logps_values_and_reward_scores_are_aligned_with_response_tokens():
    model = lora_model()
    add_value_head(model)
    with torch.no_grad():
        model.v_head.summary.weight.normal_(0, 1.0)
    head = ValueHead(32)
    with torch.no_grad():
        head.summary.weight.normal_(0, 1.0)
    torch.manual_seed(2)
    ro = generate_rollouts(model, PROMPTS, max_new_tokens=8, eos_token_ids=EOS, pad_token_id=PAD)
    p = ro.prompt_len
    model.eval()
    with torch.no_grad():
        out = policy_forward(model, ro.input_ids, ro.attention_mask, p, ro.completion_mask, values=True, entropy=True)
        scores = RewardModel("base", head=head).score(model, ro.input_ids, ro.attention_mask, p)
    torch.testing.assert_close(out["logps"], ro.logps, atol=1e-5, rtol=1e-5)
    for b, prompt in enumerate(PROMPTS):
        n = int(ro.completion_lengths[b])
        seq = torch.tensor([prompt + ro.completion_ids[b, :n].tolist()])
        with torch.no_grad():
            h = model(seq)[0]
            with peft.disable_adapters(model):
                h_ref = model(seq)[0]
        # value of the state before response token t: hidden at the token before it
        v = (h[len(prompt) - 1:-1] @ model.v_head.summary.weight[0] + model.v_head.summary.bias).float()
        torch.testing.assert_close(out["values"][b, :n], v, atol=1e-5, rtol=1e-5)
        assert bool((out["values"][b, n:] == 0).all())
        probs = torch.softmax(model.lm_head(h[len(prompt) - 1:-1]).float(), -1)
        ent = -(probs * probs.log()).sum(-1)
        torch.testing.assert_close(out["entropy"][b, :n], ent, atol=1e-4, rtol=1e-4)
        # reward: the head on the reference (adapters disabled) at the last response token
        s = h_ref[-1] @ head.summary.weight[0] + head.summary.bias[0]
        torch.testing.assert_close(scores[b], s.float(), atol=1e-5, rtol=1e-5)


def test_policy_forward_at_temperature_matches_the_sampled_logps():
    model = lora_model()
    torch.manual_seed(3)
    hot = generate_rollouts(model, PROMPTS, max_new_tokens=5, do_sample=True, temperature=2.0, pad_token_id=PAD)
    with torch.no_grad():
        out = policy_forward(model.eval(), hot.input_ids, hot.attention_mask, hot.prompt_len, hot.completion_mask,
                             temperature=2.0, values=False)
    torch.testing.assert_close(out["logps"], hot.logps, atol=1e-5, rtol=1e-5)


def test_running_moments_match_numpy_over_all_batches():
    rm = RunningMoments()
    rng = np.random.default_rng(0)
    seen = []
    for n in (4, 7, 1, 9):
        x = rng.normal(3.0, 2.0, n)
        seen.extend(x)
        rm.update(torch.tensor(x))
        assert rm.mean == pytest.approx(np.mean(seen), rel=1e-9)
        if len(seen) > 1:
            assert rm.std == pytest.approx(np.std(seen, ddof=1), rel=1e-9)


class FakeTokenizer:
    pad_token_id = PAD
    eos_token_id = 40
    eos_token_ids = [40]

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"t{i}" for i in ids)


def ppo_config(tmp_path, **kw):
    base = dict(stage="ppo", model_name_or_path=str(tmp_path / "m"), dataset="x", output_dir=str(tmp_path / "o"),
                per_device_train_batch_size=4, gradient_accumulation_steps=1, ppo_epochs=1, learning_rate=1e-3,
                max_steps=2, max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0, logging_steps=1, seed=0)
    base.update(kw)
    return parse_config(base, command="train")


def ppo_run(model, cfg, reward_fn, seed=0):
    """A PPOStage on the shared Trainer; returns (stage, trainer) after training ``max_steps`` iterations."""
    rows = [{"input_ids": p, "attention_mask": [1] * len(p)} for p in PROMPTS]
    torch.manual_seed(seed)
    stage = PPOStage(model, cfg, rows, RewardModel("fn", fn=reward_fn, tokenizer=FakeTokenizer()), PAD, EOS)
    trainer = Trainer(model, cfg, rows, online=stage)
    trainer.train()
    return stage, trainer


def test_one_ppo_step_first_minibatch_has_ratio_one_and_updates_policy_and_critic(tmp_path):
    model = lora_model()
    add_value_head(model)
    calls = []

    def reward_fn(prompts, responses):
        calls.append((prompts, responses))
        return [float(len(r.split())) for r in responses]

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ref_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    stage, trainer = ppo_run(model, ppo_config(tmp_path, max_steps=1), reward_fn)
    assert stage.rollout_size == 4 and trainer.total_steps == 1 and trainer.global_step == 1
    metrics = trainer.log_history[-1]
    # one epoch, one mini-batch: the policy has not moved when its loss is computed, so ratio = 1, nothing is
    # clipped, and the loss is -mean(advantages) = 0 for whitened advantages
    assert metrics["clipfrac"] == 0.0
    assert abs(metrics["ppo/loss/policy"]) < 1e-5
    assert metrics["ppo/loss/value"] > 0
    # the reward function saw the decoded responses; the logged reward is their mean
    prompts, responses = calls[0]
    assert len(responses) == 4 and any("t5 t9 t14 t3" in p for p in prompts)
    assert metrics["reward"] == pytest.approx(np.mean([len(r.split()) for r in responses]))
    assert metrics["response_length"] == pytest.approx(np.mean([len(r.split()) for r in responses]))
    for key in ("kl", "entropy", "lr", "grad_norm", "loss", "ppo/kl_coef"):
        assert np.isfinite(metrics[key])
    after = dict(model.named_parameters())
    changed = {n for n, p in before.items() if not torch.equal(p, after[n])}
    assert any("lora_" in n for n in changed) and any(n.startswith("v_head") for n in changed)
    assert all(torch.equal(p, after[n]) for n, p in ref_before.items())  # the base (= reference) is frozen


def test_adaptive_kl_controller_is_used_with_ppo_target(tmp_path):
    model = lora_model()
    add_value_head(model)
    stage, trainer = ppo_run(model, ppo_config(tmp_path, max_steps=1, ppo_target=0.01, ppo_kl_coeff=0.1),
                             lambda p, r: [0.0] * len(r))
    kl = trainer.log_history[-1]["kl"]
    err = min(max(kl / 0.01 - 1, -0.2), 0.2)
    assert stage.kl_ctl.value == pytest.approx(0.1 * (1 + err * 4 / 10000))
    fixed, _ = ppo_run(model, ppo_config(tmp_path, max_steps=1, ppo_kl_coeff=0.1, output_dir=str(tmp_path / "o2")),
                       lambda p, r: [0.0] * len(r))
    assert fixed.kl_ctl.value == 0.1


#: per-iteration metrics of PPO's own loop (``PPOTrainer.step()`` at commit 7430d0c, before PPO moved onto the
#: shared Trainer): lora_model(), value head, seed 0, greedy rollouts, 3 iterations, ppo_epochs 2, batch 2 x
#: accumulation 2, reward = number of response tokens
PPO_LOOP_BASELINE = [
    {"loss": 1.3878588296473027, "reward": 4.75, "kl": 1.92087721824646,
     "ppo/loss/policy": 0.041935358196496964, "ppo/loss/value": 13.459234714508057, "grad_norm": 3.487522602081299},
    {"loss": 1.3896868728101255, "reward": 6.0, "kl": 3.9953606128692627,
     "ppo/loss/policy": -0.014941427856683731, "ppo/loss/value": 14.04628300666809, "grad_norm": 2.562516450881958},
    {"loss": 1.3192452609539034, "reward": 5.0, "kl": 2.702240467071533,
     "ppo/loss/policy": 0.07712611556053162, "ppo/loss/value": 12.421191453933716, "grad_norm": 3.1413180828094482},
]


def test_ppo_on_the_shared_trainer_gives_the_numbers_of_its_former_own_loop(tmp_path):
    torch.manual_seed(0)
    model = lora_model()
    add_value_head(model)
    cfg = ppo_config(tmp_path, do_sample=False, max_steps=3, ppo_epochs=2, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2)
    _, trainer = ppo_run(model, cfg, lambda p, r: [float(len(x.split())) for x in r])
    assert len(trainer.log_history) == 3
    for got, want in zip(trainer.log_history, PPO_LOOP_BASELINE):
        for key, value in want.items():
            # abs 1e-6: the logged loss is rounded to 6 decimals, and padded rows now attend one span at a time
            # (one SDPA call per row) instead of through one masked SDPA call, which moves float32 results ~1e-7
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


# -- reward model checks ------------------------------------------------------------------------------
def save_head(folder, hidden=32):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"v_head.summary.weight": torch.randn(1, hidden), "v_head.summary.bias": torch.zeros(1)},
              str(folder / "value_head.safetensors"))


def rm_cfg(folder, **kw):
    base = dict(reward_model=str(folder) if folder else None, reward_model_type="lora", reward_model_adapters=None,
                finetuning_type="lora")
    base.update(kw)
    return make_config(**base)


def test_reward_model_without_value_head_is_a_clear_error(tmp_path):
    model = lora_model()
    rm = tmp_path / "rm_output"
    peft.save_adapter(lora_model(1), rm, base_model_name_or_path=str(tmp_path / "base"))
    with pytest.raises(LLMTuneError) as err:
        load_reward_model(model, rm_cfg(rm), str(tmp_path / "base"), [])
    msg = str(err.value)
    assert str(rm) in msg and "value_head.safetensors" in msg and "--stage rm" in msg
    with pytest.raises(LLMTuneError, match="reward_model"):
        load_reward_model(model, rm_cfg(tmp_path / "nowhere"), "b", [])
    with pytest.raises(LLMTuneError, match="rm_path"):
        load_reward_model(model, rm_cfg(None), "b", [])


def test_full_weights_reward_model_given_as_lora_is_loaded_as_full(tmp_path, capsys):
    """An rm run with finetuning_type freeze/full writes model.safetensors + config.json, no adapter: with the
    default reward_model_type lora its trained layers would be dropped, so it is loaded as full (notice)."""
    from safetensors.torch import save_file

    trained = tiny_model(3)
    rm = tmp_path / "rm_freeze"
    save_head(rm)
    sd = {k: v for k, v in trained.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(rm / "model.safetensors"))
    (rm / "config.json").write_text(json.dumps(trained.config.to_hf_dict()))
    reward = load_reward_model(lora_model(), rm_cfg(rm), str(tmp_path / "base"), [])
    assert reward.kind == "full" and "reward_model_type: full" in capsys.readouterr().err
    for name, p in reward.model.named_parameters():
        if not name.startswith("v_head."):
            assert torch.equal(p, trained.state_dict()[name]), name


def test_reward_model_on_another_base_is_a_clear_error(tmp_path):
    model = lora_model()
    (tmp_path / "base").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "sft").mkdir()
    rm = tmp_path / "rm_output"
    save_head(rm)
    (rm / "llmtune.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "other"),
                                                 "parent_adapters": []}))
    with pytest.raises(LLMTuneError) as err:
        load_reward_model(model, rm_cfg(rm), str(tmp_path / "base"), [])
    msg = str(err.value)
    assert str(tmp_path / "other") in msg and str(tmp_path / "base") in msg and "reward_model_type" in msg
    # same root but another adapter chain (rm trained on the base, policy on base + sft) is another model too
    (rm / "llmtune.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "base"),
                                                 "parent_adapters": []}))
    with pytest.raises(LLMTuneError, match="sft"):
        load_reward_model(model, rm_cfg(rm), str(tmp_path / "base"), [str(tmp_path / "sft")])
    # a value head of another hidden size (no record): another base as well
    rm2 = tmp_path / "rm2"
    save_head(rm2, hidden=48)
    with pytest.raises(LLMTuneError, match="hidden size"):
        load_reward_model(model, rm_cfg(rm2), str(tmp_path / "base"), [])
    # lora reward model with a fully trained policy: the shared weights would move
    with pytest.raises(LLMTuneError, match="reward_model_type"):
        load_reward_model(model, rm_cfg(rm, finetuning_type="full"), str(tmp_path / "base"), [])


def test_reward_adapter_is_a_second_adapter_on_the_same_weights(tmp_path):
    (tmp_path / "base").mkdir()
    policy = lora_model(0)
    rm_source = lora_model(0)  # same base weights, its own adapter
    peft.delete_adapter(rm_source, "default")
    peft.apply_lora(rm_source, lora_rank=2, lora_target="q_proj,v_proj", adapter_name="default")
    with torch.no_grad():
        for _, layer in peft.lora_layers(rm_source):
            layer.lora_B["default"].weight.normal_(0, 0.3)
    rm = tmp_path / "rm_output"
    peft.save_adapter(rm_source, rm, base_model_name_or_path=str(tmp_path / "base"))
    save_head(rm)
    (rm / "llmtune.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "base"),
                                                 "parent_adapters": []}))
    reward = load_reward_model(policy, rm_cfg(rm), str(tmp_path / "base"), [])
    assert reward.kind == "adapter"
    assert sorted(peft.list_adapters(policy)) == ["default", "reward"]
    assert peft.get_active_adapters(policy) == ["default"]
    assert not any(p.requires_grad for n, p in policy.named_parameters() if ".reward" in n)
    ro = generate_rollouts(policy, PROMPTS, max_new_tokens=4, pad_token_id=PAD)
    scores = reward.score(policy, ro.input_ids, ro.attention_mask, ro.prompt_len)
    assert peft.get_active_adapters(policy) == ["default"]  # back to the policy after scoring
    # reference: the rm source model (base + its adapter) with the head, row by row without padding
    for b, prompt in enumerate(PROMPTS):
        seq = torch.tensor([prompt + ro.completion_ids[b, :int(ro.completion_lengths[b])].tolist()])
        with torch.no_grad():
            h = rm_source.eval()(seq)[0, -1]
        expect = h @ reward.head.summary.weight[0] + reward.head.summary.bias[0]
        torch.testing.assert_close(scores[b], expect.float(), atol=1e-5, rtol=1e-5)

"""PPO loop pieces that are the ppo stage's own (tiny random models, CPU, fast).

The losses (GAE, clipped losses, KL placement) are tested in test_losses.py; here: the rollout (KV-cache
sampling, logps, masks at the stop token), the alignment of log-probs/values/reward scores with the
response tokens, running score normalisation, one PPO step, and the reward-model checks.
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
from llmtune.train.ppo import (PPOTrainer, RewardModel, RunningMoments, load_reward_model, policy_forward,
                               sample_responses)
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


def left_padded(prompts):
    t = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (t - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


PROMPTS = [[5, 9, 14, 3], [7, 22], [11, 12, 13, 40, 41, 8], [30]]
EOS = list(range(40, 53))  # a quarter of the vocabulary stops a row, so rows end at different steps


def test_rollout_logps_equal_an_unpadded_forward_and_masks_stop_at_the_eos():
    model = lora_model()
    ids, mask = left_padded(PROMPTS)
    torch.manual_seed(1)
    ro = sample_responses(model, ids, mask, max_new_tokens=12, do_sample=True, temperature=1.0,
                          eos_token_ids=EOS, pad_token_id=PAD)
    lengths = ro.lengths.tolist()
    assert len(set(lengths)) > 1  # the case is informative: rows stop at different steps
    assert ro.response_ids.shape[1] == max(lengths)  # the loop ends when every row has stopped
    model.eval()
    for b, prompt in enumerate(PROMPTS):
        resp = ro.response_ids[b].tolist()
        # the mask covers the tokens up to and including the first stop id; padding after it
        first_eos = next((i for i, t in enumerate(resp) if t in EOS), None)
        n = (first_eos + 1) if first_eos is not None else 12
        assert lengths[b] == n
        assert ro.response_mask[b].tolist() == [True] * n + [False] * (len(resp) - n)
        assert resp[n:] == [PAD] * (len(resp) - n)
        # reference: one forward of this row alone (no padding, no cache), log-softmax at the sampled tokens
        seq = torch.tensor([prompt + resp[:n]])
        with torch.no_grad():
            logits = model.lm_head(model(seq)).float()[0]
        ref = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(1, seq[0, len(prompt):, None]).squeeze(1)
        torch.testing.assert_close(ro.gen_logps[b, :n], ref, atol=1e-5, rtol=1e-5)
        assert bool((ro.gen_logps[b, n:] == 0).all())


def test_policy_forward_logps_values_and_reward_scores_are_aligned_with_response_tokens():
    model = lora_model()
    add_value_head(model)
    with torch.no_grad():
        model.v_head.summary.weight.normal_(0, 1.0)
    head = ValueHead(32)
    with torch.no_grad():
        head.summary.weight.normal_(0, 1.0)
    ids, mask = left_padded(PROMPTS)
    torch.manual_seed(2)
    ro = sample_responses(model, ids, mask, max_new_tokens=8, eos_token_ids=EOS, pad_token_id=PAD)
    p = ids.shape[1]
    model.eval()
    with torch.no_grad():
        out = policy_forward(model, ro.input_ids, ro.attention_mask, p, ro.response_mask, values=True, entropy=True)
        scores = RewardModel("base", head=head).score(model, ro)
    torch.testing.assert_close(out["logps"], ro.gen_logps, atol=1e-5, rtol=1e-5)
    for b, prompt in enumerate(PROMPTS):
        n = int(ro.lengths[b])
        seq = torch.tensor([prompt + ro.response_ids[b, :n].tolist()])
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


def test_greedy_rollout_is_deterministic_and_temperature_scales_logps():
    model = lora_model()
    ids, mask = left_padded(PROMPTS)
    a = sample_responses(model, ids, mask, max_new_tokens=5, do_sample=False, eos_token_ids=[], pad_token_id=PAD)
    b = sample_responses(model, ids, mask, max_new_tokens=5, do_sample=False, eos_token_ids=[], pad_token_id=PAD)
    assert torch.equal(a.response_ids, b.response_ids) and a.response_mask.all()
    torch.manual_seed(3)
    hot = sample_responses(model, ids, mask, max_new_tokens=5, do_sample=True, temperature=2.0, pad_token_id=PAD)
    p = ids.shape[1]
    with torch.no_grad():
        out = policy_forward(model.eval(), hot.input_ids, hot.attention_mask, p, hot.response_mask, temperature=2.0,
                             values=False)
    torch.testing.assert_close(out["logps"], hot.gen_logps, atol=1e-5, rtol=1e-5)
    with pytest.raises(LLMTuneError, match="temperature"):
        sample_responses(model, ids, mask, max_new_tokens=5, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="left-padded"):
        sample_responses(model, ids.flip(1), mask.flip(1), max_new_tokens=5)


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


def test_one_ppo_step_first_minibatch_has_ratio_one_and_updates_policy_and_critic(tmp_path):
    model = lora_model()
    add_value_head(model)
    calls = []

    def reward_fn(prompts, responses):
        calls.append((prompts, responses))
        return [float(len(r.split())) for r in responses]

    cfg = ppo_config(tmp_path)
    rows = [{"input_ids": p, "attention_mask": [1] * len(p)} for p in PROMPTS]
    trainer = PPOTrainer(model, cfg, rows, RewardModel("fn", fn=reward_fn, tokenizer=FakeTokenizer()),
                         FakeTokenizer(), EOS)
    assert trainer.total_steps == 2 and trainer.rollout_size == 4
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ref_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    metrics = trainer.step()
    # one epoch, one mini-batch: the policy has not moved when its loss is computed, so ratio = 1, nothing is
    # clipped, and the loss is -mean(advantages) = 0 for whitened advantages
    assert metrics["clipfrac"] == 0.0
    assert abs(metrics["ppo/loss/policy"]) < 1e-5
    assert metrics["ppo/loss/value"] > 0
    # the reward function saw the decoded responses; the logged reward is their mean
    prompts, responses = calls[0]
    assert len(responses) == 4 and "t5 t9 t14 t3" in prompts[0] or any("t5 t9 t14 t3" in p for p in prompts)
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
    rows = [{"input_ids": p, "attention_mask": [1] * len(p)} for p in PROMPTS]
    fn = RewardModel("fn", fn=lambda p, r: [0.0] * len(r), tokenizer=FakeTokenizer())
    trainer = PPOTrainer(model, ppo_config(tmp_path, ppo_target=0.01, ppo_kl_coeff=0.1), rows, fn,
                         FakeTokenizer(), EOS)
    m = trainer.step()
    kl = m["kl"]
    err = min(max(kl / 0.01 - 1, -0.2), 0.2)
    assert trainer.kl_ctl.value == pytest.approx(0.1 * (1 + err * 4 / 10000))
    fixed = PPOTrainer(model, ppo_config(tmp_path, ppo_kl_coeff=0.1), rows, fn, FakeTokenizer(), EOS)
    fixed.step()
    assert fixed.kl_ctl.value == 0.1


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
    ids, mask = left_padded(PROMPTS)
    ro = sample_responses(policy, ids, mask, max_new_tokens=4, pad_token_id=PAD)
    scores = reward.score(policy, ro)
    assert peft.get_active_adapters(policy) == ["default"]  # back to the policy after scoring
    # reference: the rm source model (base + its adapter) with the head, row by row without padding
    for b, prompt in enumerate(PROMPTS):
        seq = torch.tensor([prompt + ro.response_ids[b, :int(ro.lengths[b])].tolist()])
        with torch.no_grad():
            h = rm_source.eval()(seq)[0, -1]
        expect = h @ reward.head.summary.weight[0] + reward.head.summary.bias[0]
        torch.testing.assert_close(scores[b], expect.float(), atol=1e-5, rtol=1e-5)

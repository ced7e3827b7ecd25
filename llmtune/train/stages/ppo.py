"""Stage ``ppo`` (seed: ``rlhf``): RLHF with PPO as an online stage of the shared :class:`Trainer`.

One PPO iteration is one trainer step, with LLaMA-Factory's batch meaning (mini-batch =
``per_device_train_batch_size``, backward batch = mini-batch x ``gradient_accumulation_steps``, rollout batch
= backward batch x ``ppo_buffer_size``):

1. **rollout** (:meth:`PPOStage.make_experience`, no gradient, eval mode): all prompts of the rollout batch
   are decoded together by :func:`llmtune.rollout.generate_rollouts` (KV cache, stops at the template's
   end-of-turn ids and the tokenizer's eos); one forward of the policy gives the old per-token log-probs and
   the critic's values (:func:`policy_forward`), one with the adapters disabled (or the frozen reference copy)
   the reference log-probs, and the reward model scores each prompt + response at its last response token
   (:class:`~llmtune.train.stages.ppo_reward.RewardModel`);
2. **advantages**: optional running score normalisation (``ppo_score_norm``), the per-token KL penalty folded
   into the rewards (``kl_penalty_rewards``), optional reward whitening (``ppo_whiten_rewards``), GAE
   (``ppo_gamma``, ``ppo_lam``) and whitened advantages; the KL controller (adaptive with ``ppo_target``, else
   fixed ``ppo_kl_coeff``) is updated with the rollout's KL for the next rollout;
3. **optimisation** (the trainer): ``ppo_epochs`` passes over the rollout in shuffled mini-batches; each
   backward batch is one optimizer update whose micro-batches are the mini-batches; the loss of a mini-batch
   (:meth:`PPOStage.loss`) is the clipped policy loss + ``ppo_vf_coef`` x the clipped value loss (masked
   means over its tokens), counted as one item, so an update's gradient is the mean over its mini-batches.
   The trainer owns autocast, the gradient scaler, clipping (``max_grad_norm``), the LR schedule (one step per
   iteration), logging and checkpoints.

``max_steps`` counts PPO iterations; without it, ``num_train_epochs x ceil(prompts / rollout batch)``
(LLaMA-Factory's rule). The critic is ``model.v_head`` on the policy's own backbone (trained with the LoRA).
Under ``torchrun`` each process rolls out its own slice of a common prompt order (the rollout batch is per
process); advantages are whitened per process (as TRL's PPOTrainer), the logged statistics and the KL
controller use all processes' sums.

Sources: Schulman et al., 2017 (PPO); Ziegler et al., 2019 (KL-penalised reward, adaptive KL); Ouyang et al.,
2022 (InstructGPT RLHF); batch and step semantics of TRL's ``PPOTrainer`` (v0.8) as LLaMA-Factory uses it.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

from llmtune.constants import IGNORE_INDEX
from llmtune.errors import LLMTuneError
from llmtune.losses import (AdaptiveKLController, FixedKLController, gae_advantages,
                            kl_penalty_rewards, ppo_policy_loss, ppo_value_loss, token_logps, token_logps_entropy,
                            whiten)
from llmtune.rollout import generate_rollouts
from llmtune.train.distributed import all_reduce_sum, rank, world_size
from llmtune.train.wrap import unwrap
from llmtune.train.precision import frozen_weights_cast
from llmtune.train.stages.base import OnlineStep, StageContext
from llmtune.train.stages.ppo_reward import (RewardFn, RewardModel, RunningMoments, check_reward_folder,
                                             load_reward_model)

__all__ = ["response_labels", "policy_forward", "PPOStage", "build_ppo_stage", "check_ppo_config"]


def response_labels(input_ids: torch.Tensor, prompt_len: int, response_mask: torch.Tensor) -> torch.Tensor:
    """Labels ``(B, P + R)``: the response tokens where ``response_mask``, -100 on the prompt and padding."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    resp = input_ids[:, prompt_len:]
    labels[:, prompt_len:] = torch.where(response_mask.bool(), resp, torch.full_like(resp, IGNORE_INDEX))
    return labels


def policy_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                   response_mask: torch.Tensor, temperature: float = 1.0, values: bool = True,
                   entropy: bool = False, **vision: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward over prompt + response: per-token log-probs, critic values and entropy of the response.

    Response token ``t`` sits at column ``P + t``; its log-prob and the critic's value of the state before
    it are read from the hidden state at column ``P + t - 1`` (the convention of TRL's PPOTrainer).

    Args:
        model: the policy (``model.v_head`` is the critic, needed when ``values``).
        input_ids, attention_mask: ``(B, P + R)`` (:class:`llmtune.rollout.Rollout` layout).
        prompt_len: ``P``. response_mask: ``(B, R)`` bool/int.
        temperature: log-probs of ``logits / temperature`` (the sampling temperature, as generation used).
        values: also return ``values``; entropy: also return ``entropy`` (no gradient).
        vision: a vision-language model's ``pixel_values`` / ``image_grid_thw`` of the rows' prompt images.

    Returns: ``{"logps": (B, R) float32, "values": (B, R) float32, "entropy": (B, R) float32}`` (only the
    asked keys), 0 at masked positions; differentiable unless called under ``no_grad``.
    """
    hidden = model(input_ids, attention_mask=attention_mask, **vision)
    labels = response_labels(input_ids, prompt_len, response_mask)
    if entropy:   # the entropy at the label positions = the response positions (one projection pass)
        lp, ent = token_logps_entropy(hidden, model.lm_head.weight, labels, temperature=temperature)
        out = {"logps": lp[:, prompt_len:], "entropy": ent[:, prompt_len:]}
    else:
        out = {"logps": token_logps(hidden, model.lm_head.weight, labels, temperature=temperature)[:, prompt_len:]}
    if values:
        out["values"] = model.v_head(hidden[:, prompt_len - 1:-1]).float() * response_mask.bool()
    return out


class PPOStage:
    """The PPO online stage (see the module docstring for one iteration).

    Args:
        model: the policy (LoRA adapter ``"default"`` trainable, or all weights for full fine-tuning) with a
            critic ``model.v_head`` (:func:`llmtune.models.value_head.add_value_head`).
        config: the run's ``TrainConfig`` (``ppo_*``, generation keys, batch keys, ``seed``).
        prompts: rows with ``input_ids``: chat prompts ending with the assistant header.
        reward: a :class:`~llmtune.train.stages.ppo_reward.RewardModel`.
        pad_token_id: filler of prompts and responses.
        stop_token_ids: generation stops (template end-of-turn ids + tokenizer eos).
        ref_model: a frozen reference policy (full fine-tuning); None = the policy with adapters disabled.

    Raises: :class:`LLMTuneError` for an empty prompt set or batch sizes below 1.
    """

    def __init__(self, model: nn.Module, config: Any, prompts: Sequence[dict], reward: RewardModel,
                 pad_token_id: int, stop_token_ids: Sequence[int], ref_model: Optional[nn.Module] = None) -> None:
        self.cfg, self.prompts, self.reward, self.ref_model = config, prompts, reward, ref_model
        self.pad = int(pad_token_id)
        self.stop_ids = sorted({int(i) for i in stop_token_ids})
        self.bs, self.ga = int(config.per_device_train_batch_size), int(config.gradient_accumulation_steps)
        if min(self.bs, self.ga, int(config.ppo_buffer_size), int(config.ppo_epochs)) < 1:
            raise LLMTuneError("per_device_train_batch_size, gradient_accumulation_steps, ppo_buffer_size and "
                               "ppo_epochs must all be >= 1")
        self.rollout_size = self.bs * self.ga * int(config.ppo_buffer_size)  # prompts per process
        self.rank, self.world = rank(), world_size()
        if len(prompts) == 0:
            raise LLMTuneError("stage ppo: the prompt dataset is empty: check dataset, max_samples and cutoff_len")
        self.steps_per_epoch = math.ceil(len(prompts) / (self.rollout_size * self.world))
        self.kl_ctl = (AdaptiveKLController(config.ppo_kl_coeff, config.ppo_target, 10000.0)
                       if config.ppo_target else FixedKLController(config.ppo_kl_coeff))
        self.score_moments = RunningMoments() if config.ppo_score_norm else None
        self.temperature = float(config.temperature) if config.do_sample else 1.0
        self._order: list[int] = []
        self._epoch = 0

    def next_prompts(self) -> list[dict]:
        """This process's ``rollout_size`` prompt rows of the next ``rollout_size x world`` of a seeded shuffled
        order (``randperm`` seeded by ``seed + epoch``, reshuffled when exhausted, so a prompt set smaller than
        the rollout batch repeats); every process draws the same order and takes its own slice."""
        rows = []
        while len(rows) < self.rollout_size * self.world:
            if not self._order:
                g = torch.Generator().manual_seed(int(self.cfg.seed) + self._epoch)
                self._order = torch.randperm(len(self.prompts), generator=g).tolist()
                self._epoch += 1
            rows.append(self.prompts[self._order.pop(0)])
        return rows[self.rank * self.rollout_size:(self.rank + 1) * self.rollout_size]

    def state_dict(self) -> dict[str, Any]:
        """What this stage carries between iterations, as JSON (saved in checkpoints as ``online_state.json``):
        the prompt cursor (``order``, ``epoch``; ``num_prompts`` to check the dataset), the KL controller's
        coefficient (``kl_coef``; adaptive with ``ppo_target``) and the running score moments of
        ``ppo_score_norm`` (``[mean, var, count]`` or None)."""
        m = self.score_moments
        return {"stage": "ppo", "num_prompts": len(self.prompts), "order": list(self._order), "epoch": self._epoch,
                "kl_coef": self.kl_ctl.value, "score_moments": None if m is None else [m.mean, m.var, m.count]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Raises :class:`LLMTuneError` for the state of another stage, prompt set
        or ``ppo_score_norm`` setting."""
        bad = (state.get("stage") != "ppo" or (state.get("score_moments") is None) != (self.score_moments is None)
               or state.get("num_prompts") != len(self.prompts))
        if bad:
            raise LLMTuneError(f"resume_from_checkpoint: the saved online state is not that of stage ppo on these "
                               f"{len(self.prompts)} prompts with ppo_score_norm {bool(self.cfg.ppo_score_norm)}; "
                               "resume with the dataset and settings it was trained with")
        self._order, self._epoch = [int(i) for i in state["order"]], int(state["epoch"])
        self.kl_ctl.value = float(state["kl_coef"])
        if self.score_moments is not None:
            self.score_moments.mean, self.score_moments.var, self.score_moments.count = (
                float(v) for v in state["score_moments"])

    def _ref_logps(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, p: int,
                   resp_mask: torch.Tensor) -> torch.Tensor:
        from llmtune import peft

        if self.ref_model is not None:
            return policy_forward(self.ref_model, ids, mask, p, resp_mask, self.temperature, values=False)["logps"]
        with peft.disable_adapters(model):
            return policy_forward(model, ids, mask, p, resp_mask, self.temperature, values=False)["logps"]

    @torch.no_grad()
    def make_experience(self, trainer: Any) -> list[OnlineStep]:
        """Roll out the next prompts, score them, compute advantages; return one step of ``ppo_epochs`` x
        backward batches of updates (mini-batch dicts for :meth:`loss`) and the rollout's metrics
        (``reward``, ``kl``, ``entropy``, ``response_length``, ``ppo/kl_coef``)."""
        c = self.cfg
        model = unwrap(trainer.model)
        rows = self.next_prompts()
        with trainer.autocast(), frozen_weights_cast(model, getattr(trainer, "amp_dtype", None), merge_adapters=True,
                                                        pack=True):
            ro = generate_rollouts(model, [r["input_ids"] for r in rows], max_new_tokens=int(c.max_new_tokens),
                                   do_sample=bool(c.do_sample), temperature=float(c.temperature),
                                   top_k=int(c.top_k), top_p=float(c.top_p), eos_token_ids=self.stop_ids,
                                   pad_token_id=self.pad, return_logps=False)
        ids, attn, p, resp_mask = ro.input_ids, ro.attention_mask, ro.prompt_len, ro.completion_mask.bool()
        n = ids.shape[0]
        old_logps, old_values, ref, scores, ent = [], [], [], [], []
        model.eval()
        try:
            for i in range(0, n, self.bs):
                sl = slice(i, i + self.bs)
                with trainer.autocast():
                    out = policy_forward(model, ids[sl], attn[sl], p, resp_mask[sl], self.temperature,
                                         values=True, entropy=True)
                    ref.append(self._ref_logps(model, ids[sl], attn[sl], p, resp_mask[sl]))
                    scores.append(self.reward.score(model, ids[sl], attn[sl], p))
                old_logps.append(out["logps"])
                old_values.append(out["values"])
                ent.append(out["entropy"])
        finally:
            model.train()
        old_logps, old_values, ref_logps = torch.cat(old_logps), torch.cat(old_values), torch.cat(ref)
        raw_scores, entropy = torch.cat(scores), torch.cat(ent)
        scores_used = raw_scores
        if self.score_moments is not None:
            self.score_moments.update(raw_scores)
            scores_used = (raw_scores - self.score_moments.mean) / (self.score_moments.std + 1e-8)
        kl_coef = self.kl_ctl.value
        rewards, kl = kl_penalty_rewards(scores_used, old_logps, ref_logps, resp_mask, kl_coef)
        if c.ppo_whiten_rewards:
            rewards = whiten(rewards, resp_mask, shift_mean=False)
        adv, returns = gae_advantages(rewards, old_values, resp_mask, float(c.ppo_gamma), float(c.ppo_lam))
        adv = whiten(adv, resp_mask)
        # rollout statistics over every process (advantages are whitened per process, as TRL's PPOTrainer does)
        sums = all_reduce_sum(torch.stack([kl.sum(1).sum(), raw_scores.sum(), (entropy * resp_mask).sum(),
                                           resp_mask.sum().to(kl.dtype), torch.tensor(float(n), device=kl.device)])
                              .double()).tolist()
        kl_per_seq, reward_mean = sums[0] / sums[4], sums[1] / sums[4]
        self.kl_ctl.update(kl_per_seq, int(sums[4]))  # the next rollout's coefficient, equal on every process

        def micro(idx: list[int]) -> dict:
            ix = torch.tensor(idx, device=ids.device)
            return {"input_ids": ids[ix], "attention_mask": attn[ix], "response_mask": resp_mask[ix],
                    "old_logps": old_logps[ix], "old_values": old_values[ix], "advantages": adv[ix],
                    "returns": returns[ix], "prompt_len": p}

        updates = []
        for _ in range(int(c.ppo_epochs)):
            perm = torch.randperm(n).tolist()
            for s in range(0, n, self.bs * self.ga):
                back = perm[s:s + self.bs * self.ga]
                updates.append([micro(back[j:j + self.bs]) for j in range(0, len(back), self.bs)])
        metrics = {"reward": reward_mean, "kl": kl_per_seq, "entropy": sums[2] / max(sums[3], 1.0),
                   "response_length": sums[3] / sums[4], "ppo/kl_coef": kl_coef}
        return [OnlineStep(updates=updates, metrics=metrics)]

    def loss(self, model: nn.Module, batch: dict, ctx: StageContext) -> tuple[torch.Tensor, int, dict]:
        """Clipped policy loss + ``ppo_vf_coef`` x clipped value loss of one mini-batch, as one item.

        Returns ``(pl + vf * vl, 1, {"ppo/loss/policy", "ppo/loss/value", "clipfrac"})`` (Schulman et al. 2017,
        eq. 7 and the clipped value loss of TRL's PPOTrainer; :mod:`llmtune.losses.ppo`).
        """
        c = self.cfg
        out = policy_forward(model, batch["input_ids"], batch["attention_mask"], batch["prompt_len"],
                             batch["response_mask"], self.temperature, values=True)
        m = batch["response_mask"]
        pl, clipfrac = ppo_policy_loss(out["logps"], batch["old_logps"], batch["advantages"], m,
                                       float(c.ppo_clip_ratio))
        vl = ppo_value_loss(out["values"], batch["old_values"], batch["returns"], m, float(c.ppo_value_clip))
        loss = pl + float(c.ppo_vf_coef) * vl
        return loss, 1, {"ppo/loss/policy": pl.detach(), "ppo/loss/value": vl.detach(), "clipfrac": clipfrac}

    def count_items(self, batch: dict) -> int:
        """One item per mini-batch (its loss is already a mean over its tokens)."""
        return 1

    def before_save(self, model: nn.Module) -> None:
        """Drop the reward adapter and make the policy's adapter active again (LoRA)."""
        if self.reward.kind == "adapter":
            from llmtune import peft

            peft.delete_adapter(model, "reward")
            peft.set_adapter(model, "default")


def build_ppo_stage(model: nn.Module, cfg: Any, tokenizer: Any, template: Any, rows: Sequence[dict], extra: dict,
                    reward_fn: Optional[RewardFn] = None) -> PPOStage:
    """The :class:`PPOStage` of a run (the stage table's ``build`` for ``ppo``): loads the reward model
    (``reward_model`` / ``reward_model_type``, or ``reward_fn``) and adds the critic ``model.v_head``.

    Raises:
        LLMTuneError: reward-model mistakes (:func:`~llmtune.train.stages.ppo_reward.load_reward_model`).
    """
    from llmtune.chat import chat_stop_ids
    from llmtune.models.value_head import add_value_head

    chain = model.adapter_chain
    reward = load_reward_model(model, cfg, chain.base, chain.parents, reward_fn=reward_fn, tokenizer=tokenizer)
    add_value_head(model)  # the critic: trainable, float32, on the policy's backbone
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    return PPOStage(model, cfg, rows, reward, pad, chat_stop_ids(tokenizer, template), ref_model=extra.get("ref_model"))


def check_ppo_config(cfg: Any, reward_fn: Optional[RewardFn] = None) -> None:
    """Checks of stage ppo before any weights load: the reward model folder
    (:func:`~llmtune.train.stages.ppo_reward.check_reward_folder`) unless ``reward_fn`` is given.

    Raises:
        LLMTuneError: a wrong ``reward_model``.
    """
    from llmtune.runs import resolve_chain

    if reward_fn is None:
        chain = resolve_chain(cfg.model_name_or_path, cfg.adapter_name_or_path, quiet=True)  # load says it
        check_reward_folder(cfg, chain.base, chain.parents)

"""Stage ``ppo`` (seed: ``rlhf``): RLHF with PPO on a LoRA (or fully trained) policy, read top to bottom.

One PPO iteration (:meth:`PPOTrainer.step`), with LLaMA-Factory's batch meaning (mini-batch =
``per_device_train_batch_size``, backward batch = mini-batch x ``gradient_accumulation_steps``, rollout batch
= backward batch x ``ppo_buffer_size``):

1. **rollout** (no gradient, eval mode): sample responses to the rollout batch's prompts with the KV cache,
   stopping at the template's end-of-turn ids and the tokenizer's eos (:func:`sample_responses`); one
   forward of the policy gives the old per-token log-probs and the critic's values (:func:`policy_forward`),
   one with the adapters disabled (or the frozen reference copy) the reference log-probs, and the reward
   model scores each prompt + response at its last response token (:class:`RewardModel`);
2. **advantages**: optional running score normalisation (``ppo_score_norm``), the per-token KL penalty folded
   into the rewards (``kl_penalty_rewards``), optional reward whitening (``ppo_whiten_rewards``), GAE
   (``ppo_gamma``, ``ppo_lam``) and whitened advantages;
3. **optimisation**: ``ppo_epochs`` passes over the rollout in shuffled mini-batches of clipped policy loss
   + ``ppo_vf_coef`` x clipped value loss, an AdamW step (gradient clipped to ``max_grad_norm``) every
   backward batch; then the KL controller (adaptive with ``ppo_target``, else fixed ``ppo_kl_coeff``) and the
   LR schedule step once.

``max_steps`` counts PPO iterations; without it, ``num_train_epochs x ceil(prompts / rollout batch)``
(LLaMA-Factory's rule). The critic is ``model.v_head`` on the policy's own backbone (trained with the
LoRA). The reward model is (a) an rm-stage output folder on the same base: its LoRA adapter is loaded as a
second adapter ``"reward"`` on the same weights (the base is never loaded twice) and its value head as a
separate module; a folder with a value head and no adapter (the seed's ``--lora_target value``) scores with
the adapters disabled; (b) ``reward_model_type: full``: a separate model folder with ``value_head.safetensors``;
(c) a Python function ``reward_fn(prompts, responses) -> scores`` (:func:`train_ppo`).

Sources: Schulman et al., 2017 (PPO); Ziegler et al., 2019 (KL-penalised reward, adaptive KL); Ouyang et al.,
2022 (InstructGPT RLHF); batch and step semantics of TRL's ``PPOTrainer`` (v0.8) as LLaMA-Factory uses it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from llmtune.constants import IGNORE_INDEX
from llmtune.errors import LLMTuneError, notice
from llmtune.kernels import set_enabled as set_kernels_enabled
from llmtune.losses import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_hidden,
    gae_advantages,
    kl_penalty_rewards,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    token_logps,
    value_head_scores,
    whiten,
)

#: ``reward_fn(prompts, responses) -> one float per response`` (decoded text; see :func:`train_ppo`)
RewardFn = Callable[[list[str], list[str]], Sequence[float]]


# ---------------------------------------------------------------------------------------------------
# rollout pieces (pure functions of a model and tensors)
# ---------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """Prompts and sampled responses of one generation call.

    Attributes:
        prompt_ids: ``(B, P)`` int64, left-padded prompts; ``prompt_mask`` ``(B, P)`` 1 at tokens.
        response_ids: ``(B, R)`` int64, right-padded with ``pad_token_id`` after each row's stop token.
        response_mask: ``(B, R)`` bool, True for the generated tokens up to and including the stop token.
        gen_logps: ``(B, R)`` float32 log-probs of the sampled tokens under the policy at the sampling
            temperature (log-softmax of ``logits / temperature``, before top-k/top-p), 0 where masked.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    gen_logps: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        """``(B, P + R)`` prompt followed by response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """``(B, P + R)`` int64: 1 at prompt and response tokens, 0 at padding (left and right)."""
        return torch.cat([self.prompt_mask.long(), self.response_mask.long()], dim=1)

    @property
    def lengths(self) -> torch.Tensor:
        """``(B,)`` int64 response lengths (stop token included)."""
        return self.response_mask.sum(1)


@torch.no_grad()
def sample_responses(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     max_new_tokens: int, *, do_sample: bool = True, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                     generator: Optional[torch.Generator] = None) -> Rollout:
    """Sample one response per prompt with the KV cache, recording each sampled token's log-prob.

    Each step projects the last position only, processes the scores as ``transformers.generate`` does
    (:func:`llmtune.generation.process_logits`: temperature, top-k, top-p) and samples (or takes the argmax
    when ``do_sample`` is False). A row stops after emitting any id of ``eos_token_ids`` (kept in the
    response); later positions hold ``pad_token_id`` and are masked. Runs in eval mode (restored after).

    Args:
        model: an llmtune ``Transformer`` (LoRA-wrapped or not) whose active adapters are the policy.
        input_ids, attention_mask: ``(B, P)`` left-padded prompts (each row ends at column ``P - 1``).
        max_new_tokens: most tokens per response (>= 1).
        do_sample, temperature, top_k, top_p: sampling settings (LLaMA-Factory's generation keys).
        eos_token_ids: stop ids (the template's end-of-turn ids and the tokenizer's eos).
        pad_token_id: filler after a row's stop token.
        generator: optional RNG for reproducible sampling.

    Returns: a :class:`Rollout` (``R <= max_new_tokens``: the loop ends when every row has stopped).
    ``gen_logps`` are log-softmax of ``logits / temperature`` (``logits`` for greedy) at the sampled token:
    at ``temperature = 1`` and without top-k/top-p they equal the policy's log-probs recomputed with one
    forward over prompt + response.

    Raises:
        LLMTuneError: invalid sampling settings (the key is named) or ``max_new_tokens < 1``.
        ValueError: prompts that are not left-padded.

    Source: autoregressive sampling with a key/value cache (as ``transformers``' ``GenerationMixin._sample``).
    """
    from llmtune.generation import check_generation_args, process_logits

    check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p)
    if max_new_tokens < 1:
        raise LLMTuneError(f"max_new_tokens must be >= 1 for PPO (got {max_new_tokens})")
    mask = attention_mask.long()
    if not bool((mask[:, -1] > 0).all()):
        raise ValueError("sample_responses: prompts must be left-padded (every row ends at the last column)")
    device = input_ids.device
    b = input_ids.shape[0]
    eos = torch.tensor(sorted({int(i) for i in eos_token_ids}), dtype=torch.long, device=device)
    temp = float(temperature) if do_sample else 1.0
    was_training = model.training
    model.eval()
    tokens, logps, alive = [], [], []
    done = torch.zeros(b, dtype=torch.bool, device=device)
    try:
        hidden, cache = model(input_ids, attention_mask=mask, use_cache=True)
        for step in range(max_new_tokens):
            logits = model.lm_head(hidden[:, -1]).float()
            scores = process_logits(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
            if do_sample:
                nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
            else:
                nxt = scores.argmax(-1)
            lp = torch.log_softmax(logits / temp, dim=-1).gather(1, nxt[:, None]).squeeze(1)
            live = ~done
            nxt = torch.where(live, nxt, torch.full_like(nxt, pad_token_id))
            tokens.append(nxt)
            logps.append(torch.where(live, lp, torch.zeros_like(lp)))
            alive.append(live)
            if eos.numel():
                done = done | (live & torch.isin(nxt, eos))
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            hidden, cache = model(nxt[:, None], attention_mask=mask, past_key_values=cache, use_cache=True)
    finally:
        model.train(was_training)
    return Rollout(prompt_ids=input_ids, prompt_mask=attention_mask.long(), response_ids=torch.stack(tokens, 1),
                   response_mask=torch.stack(alive, 1), gen_logps=torch.stack(logps, 1).float())


def response_labels(input_ids: torch.Tensor, prompt_len: int, response_mask: torch.Tensor) -> torch.Tensor:
    """Labels ``(B, P + R)``: the response tokens where ``response_mask``, -100 on the prompt and padding."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    resp = input_ids[:, prompt_len:]
    labels[:, prompt_len:] = torch.where(response_mask.bool(), resp, torch.full_like(resp, IGNORE_INDEX))
    return labels


def policy_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                   response_mask: torch.Tensor, temperature: float = 1.0, values: bool = True,
                   entropy: bool = False) -> dict[str, torch.Tensor]:
    """One forward over prompt + response: per-token log-probs, critic values and entropy of the response.

    Response token ``t`` sits at column ``P + t``; its log-prob and the critic's value of the state before
    it are read from the hidden state at column ``P + t - 1`` (the convention of TRL's PPOTrainer).

    Args:
        model: the policy (``model.v_head`` is the critic, needed when ``values``).
        input_ids, attention_mask: ``(B, P + R)`` (:attr:`Rollout.input_ids` / ``attention_mask``).
        prompt_len: ``P``. response_mask: ``(B, R)`` bool.
        temperature: log-probs of ``logits / temperature`` (the sampling temperature, as generation used).
        values: also return ``values``; entropy: also return ``entropy`` (no gradient).

    Returns: ``{"logps": (B, R) float32, "values": (B, R) float32, "entropy": (B, R) float32}`` (only the
    asked keys), 0 at masked positions; differentiable unless called under ``no_grad``.
    """
    hidden = model(input_ids, attention_mask=attention_mask)
    labels = response_labels(input_ids, prompt_len, response_mask)
    out = {"logps": token_logps(hidden, model.lm_head.weight, labels, temperature=temperature)[:, prompt_len:]}
    state = hidden[:, prompt_len - 1:-1]
    m = response_mask.bool()
    if values:
        out["values"] = model.v_head(state).float() * m
    if entropy:
        out["entropy"] = entropy_from_hidden(state.detach(), model.lm_head.weight.detach(), mask=m,
                                             temperature=temperature)
    return out


class RunningMoments:
    """Running mean and (unbiased) standard deviation of all scores seen, merged batch by batch.

    Used for ``ppo_score_norm``: ``(score - mean) / std`` with the statistics of every batch so far
    (TRL's ``RunningMoments`` with ``use_score_scaling`` + ``use_score_norm``, as LLaMA-Factory sets them).
    Source: Chan et al., 1979 (parallel merge of means and variances).
    """

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, x: torch.Tensor) -> tuple[float, float]:
        """Merge the batch ``x`` (1-D); return the batch's ``(mean, std)``."""
        x = x.double()
        n = x.numel()
        b_mean = float(x.mean())
        b_var = float(x.var(unbiased=False)) if n > 1 else 0.0
        delta, total = b_mean - self.mean, self.count + n
        m2 = self.var * self.count + b_var * n + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total
        return b_mean, math.sqrt(b_var * n / max(n - 1, 1))

    @property
    def std(self) -> float:
        """Unbiased running standard deviation."""
        return math.sqrt(self.var * self.count / max(self.count - 1, 1))


# ---------------------------------------------------------------------------------------------------
# reward model
# ---------------------------------------------------------------------------------------------------
class RewardModel:
    """Scores ``prompt + response`` sequences: ``(input_ids, attention_mask) -> (B,)`` float32.

    Kinds: ``"adapter"`` (the rm adapter ``"reward"`` on the policy's own weights, activated only while
    scoring), ``"base"`` (the policy's weights with every adapter disabled: an rm output holding only a value
    head), ``"full"`` (a separate frozen model with its own ``v_head``), ``"fn"`` (a Python function of the
    decoded text). Build it with :func:`load_reward_model`. The score is the value head's output at each
    sequence's last token (:func:`llmtune.losses.value_head_scores`; Ouyang et al., 2022).
    """

    def __init__(self, kind: str, model: Optional[nn.Module] = None, head: Optional[nn.Module] = None,
                 fn: Optional[RewardFn] = None, tokenizer: Any = None) -> None:
        self.kind, self.model, self.head, self.fn, self.tokenizer = kind, model, head, fn, tokenizer

    @torch.no_grad()
    def score(self, policy: nn.Module, rollout: Rollout) -> torch.Tensor:
        """``(B,)`` float32 scores of the rollout (on the rollout's device)."""
        ids, mask = rollout.input_ids, rollout.attention_mask
        if self.kind == "fn":
            tok = self.tokenizer
            prompts = [tok.decode([t for t, m in zip(r.tolist(), mk.tolist()) if m], skip_special_tokens=False)
                       for r, mk in zip(rollout.prompt_ids, rollout.prompt_mask)]
            responses = [tok.decode(r[:n].tolist(), skip_special_tokens=True)
                         for r, n in zip(rollout.response_ids, rollout.lengths.tolist())]
            scores = [float(s) for s in self.fn(prompts, responses)]
            if len(scores) != len(responses):
                raise LLMTuneError(f"reward_fn returned {len(scores)} scores for {len(responses)} responses")
            return torch.tensor(scores, dtype=torch.float32, device=ids.device)
        from llmtune import peft

        if self.kind == "full":
            hidden = self.model(ids, attention_mask=mask)
            return value_head_scores(self.model.v_head(hidden), mask).float()
        ctx = peft.active_adapter(policy, "reward") if self.kind == "adapter" else peft.disable_adapters(policy)
        was = policy.training
        policy.eval()
        try:
            with ctx:
                hidden = policy(ids, attention_mask=mask)
        finally:
            policy.train(was)
        return value_head_scores(self.head(hidden), mask).float()


def _run_record(folder: Path) -> Optional[tuple[str, list[str]]]:
    """``(base, parent_adapters)`` recorded by an llmtune run in ``folder`` (``llmtune.json``, else the
    adapter's ``adapter_config.json``); None when neither records a base."""
    for name, base_key, parents_key in (("llmtune.json", "base_model_name_or_path", "parent_adapters"),
                                        ("adapter_config.json", "base_model_name_or_path", "llmtune_parent_adapters")):
        f = folder / name
        if f.is_file():
            try:
                rec = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if rec.get(base_key):
                return str(rec[base_key]), [str(p) for p in (rec.get(parents_key) or [])]
    return None


def _same_path(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return str(a) == str(b)


def _describe(base: str, parents: Sequence[str]) -> str:
    return base + (f" + adapters {', '.join(parents)}" if parents else "")


def _read_head(folder: Path, hidden_size: int, device: Any) -> nn.Module:
    """The value head of ``folder`` as a standalone frozen float32 ``ValueHead``."""
    from llmtune.models.value_head import VALUE_HEAD_FILE, load_value_head

    if not (folder / VALUE_HEAD_FILE).is_file():
        raise LLMTuneError(f"reward_model: {folder} has no {VALUE_HEAD_FILE}; point reward_model (seed: --rm_path) "
                           "at the output_dir of an `llmtune train --stage rm` run")
    holder = nn.Module()
    holder.config = type("Cfg", (), {"hidden_size": hidden_size})()
    holder.lm_head = nn.Linear(1, 1, device=device)
    try:
        head = load_value_head(holder, folder)
    except LLMTuneError as e:
        raise LLMTuneError(f"reward_model: {e}") from None
    return head.requires_grad_(False).eval()


def check_reward_folder(cfg: Any, base: str, parents: Sequence[str]) -> Path:
    """Check ``reward_model`` before any weights are loaded; return the folder.

    Checks: it is set and is a folder with ``value_head.safetensors``; ``reward_model_type`` is lora or full
    (lora with a folder of full weights and no adapter, the output of a freeze/full rm run, becomes full, with a
    notice, since its trained layers would otherwise be dropped);
    for lora, the policy is a LoRA policy and the base recorded by the rm run (``llmtune.json``, else
    ``adapter_config.json``: root base + merged adapter chain) is the policy's ``base`` + ``parents``.

    Raises: :class:`LLMTuneError` naming the key and the folder, saying how to fix it.
    """
    from llmtune.models.value_head import VALUE_HEAD_FILE

    if not cfg.reward_model:
        raise LLMTuneError("stage ppo needs a reward model: set reward_model (seed: --rm_path) to the output_dir of "
                           "an `llmtune train --stage rm` run, or call llmtune.train.ppo.train_ppo(config, "
                           "reward_fn=...) with a Python reward function")
    folder = Path(str(cfg.reward_model)).expanduser()
    if not folder.is_dir():
        raise LLMTuneError(f"reward_model: {folder} is not a folder; give the output_dir of an "
                           "`llmtune train --stage rm` run")
    if not (folder / VALUE_HEAD_FILE).is_file():
        raise LLMTuneError(f"reward_model: {folder} has no {VALUE_HEAD_FILE}; point reward_model (seed: --rm_path) "
                           "at the output_dir of an `llmtune train --stage rm` run")
    kind = str(cfg.reward_model_type).lower()
    full_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    if kind == "lora" and full_weights and not (folder / "adapter_config.json").is_file():
        notice(f"reward_model: {folder} holds full weights (an rm run with finetuning_type freeze or full), not a "
               "LoRA adapter; loading it as reward_model_type: full")
        cfg.reward_model_type = kind = "full"
    if kind not in ("lora", "full"):
        raise LLMTuneError(f"reward_model_type: {cfg.reward_model_type!r} is not supported; use lora (an rm-stage "
                           "output on the policy's base) or full (a separate model folder)")
    if kind == "lora":
        if cfg.finetuning_type != "lora":
            raise LLMTuneError(f"reward_model_type lora shares the policy's weights, which finetuning_type "
                               f"{cfg.finetuning_type} changes; use finetuning_type: lora or reward_model_type: full")
        record = _run_record(folder)
        if record is not None:
            rm_base, rm_parents = record
            same = _same_path(rm_base, base) and len(rm_parents) == len(parents) and all(
                _same_path(a, b) for a, b in zip(rm_parents, parents))
            if not same:
                raise LLMTuneError(
                    f"reward_model: {folder} was trained on {_describe(rm_base, rm_parents)} but the policy is "
                    f"{_describe(base, parents)}; a reward_model_type lora reward model must be trained from the "
                    "same model_name_or_path as the policy (or set reward_model_type: full to load it as its own "
                    "model)")
    return folder


def load_reward_model(policy: nn.Module, cfg: Any, base: str, parents: Sequence[str],
                      reward_fn: Optional[RewardFn] = None, tokenizer: Any = None) -> RewardModel:
    """Build the reward model of a PPO run from ``reward_model`` / ``reward_model_type`` (or ``reward_fn``).

    Args:
        policy: the policy model, already carrying its trainable LoRA adapter ``"default"``.
        cfg: the run config (``reward_model``, ``reward_model_type``, ``reward_model_adapters``,
            ``finetuning_type``).
        base, parents: the policy's root base model and merged adapter chain (``run.adapter_chain``).
        reward_fn: a Python reward function; overrides ``reward_model``.

    Returns: a :class:`RewardModel`. For ``lora`` the rm adapter is loaded as adapter ``"reward"`` (frozen)
    and ``"default"`` is made active again.

    Raises:
        LLMTuneError: no reward model given; the folder is missing or has no ``value_head.safetensors``; its
            recorded base differs from the policy's, or its value head's hidden size does; ``reward_model_type
            lora`` with a non-LoRA policy; an unknown ``reward_model_type``.
    """
    if reward_fn is not None:
        return RewardModel("fn", fn=reward_fn, tokenizer=tokenizer)
    folder = check_reward_folder(cfg, base, parents)
    device = next(policy.parameters()).device
    hidden = policy.config.hidden_size
    if str(cfg.reward_model_type).lower() == "full":
        from llmtune.models.value_head import load_value_head
        from llmtune.runs import load_model

        rm = load_model(str(folder), dtype=next(policy.parameters()).dtype, device=device,
                        adapter_name_or_path=cfg.reward_model_adapters)
        if rm.config.vocab_size != policy.config.vocab_size:
            raise LLMTuneError(f"reward_model: {folder} has a vocabulary of {rm.config.vocab_size} tokens but the "
                               f"policy has {policy.config.vocab_size}: the reward model must share the tokenizer")
        load_value_head(rm, folder)
        rm.requires_grad_(False).eval()
        return RewardModel("full", model=rm)
    head = _read_head(folder, hidden, device)
    if (folder / "adapter_config.json").is_file():
        from llmtune import peft

        try:
            peft.load_adapter(policy, folder, adapter_name="reward", is_trainable=False)
        except LLMTuneError as e:
            raise LLMTuneError(f"reward_model: {e}") from None
        peft.set_adapter(policy, "default")
        return RewardModel("adapter", head=head)
    return RewardModel("base", head=head)


# ---------------------------------------------------------------------------------------------------
# the PPO loop
# ---------------------------------------------------------------------------------------------------
class PPOTrainer:
    """PPO loop over prompt rows (see the module docstring for one iteration).

    Args:
        model: the policy (LoRA adapter ``"default"`` trainable, or all weights for full fine-tuning) with a
            critic ``model.v_head`` (:func:`llmtune.models.value_head.add_value_head`).
        config: the run's ``TrainConfig`` (LLaMA-Factory keys: ``ppo_*``, generation keys, optimizer keys).
        prompts: rows with ``input_ids`` (and ``attention_mask``): chat prompts ending with the assistant header.
        reward: a :class:`RewardModel`.
        tokenizer: for ``pad_token_id`` / ``eos_token_ids`` (and decoding for a reward function).
        stop_token_ids: generation stops (template end-of-turn ids + tokenizer eos).
        ref_model: a frozen reference policy for full fine-tuning; None = the policy with adapters disabled.

    Raises: :class:`LLMTuneError` for an empty prompt set, bad batch sizes or nothing to train.
    """

    def __init__(self, model: nn.Module, config: Any, prompts: Sequence[dict], reward: RewardModel,
                 tokenizer: Any, stop_token_ids: Sequence[int], ref_model: Optional[nn.Module] = None) -> None:
        from llmtune.data.collator import get_collator
        from llmtune.train.logging import resolve_report_to
        from llmtune.train.optim import build_optimizer, lr_lambda, num_warmup_steps
        from llmtune.train.precision import resolve_precision

        self.model, self.cfg, self.prompts, self.reward = model, config, prompts, reward
        self.tokenizer, self.ref_model = tokenizer, ref_model
        self.stop_ids = sorted({int(i) for i in stop_token_ids})
        self.pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
        self.collate = get_collator("ppo", self.pad)
        self.device = next(model.parameters()).device
        self.bs, self.ga = int(config.per_device_train_batch_size), int(config.gradient_accumulation_steps)
        self.buffer = int(config.ppo_buffer_size)
        if min(self.bs, self.ga, self.buffer, int(config.ppo_epochs)) < 1:
            raise LLMTuneError("per_device_train_batch_size, gradient_accumulation_steps, ppo_buffer_size and "
                               "ppo_epochs must all be >= 1")
        self.rollout_size = self.bs * self.ga * self.buffer
        if len(prompts) == 0:
            raise LLMTuneError("stage ppo: the prompt dataset is empty: check dataset, max_samples and cutoff_len")
        self.steps_per_epoch = math.ceil(len(prompts) / self.rollout_size)
        if config.max_steps and config.max_steps > 0:
            self.total_steps = int(config.max_steps)
        else:
            self.total_steps = math.ceil(float(config.num_train_epochs) * self.steps_per_epoch)
        if self.total_steps <= 0:
            raise LLMTuneError("nothing to train: set num_train_epochs > 0 or max_steps > 0")
        self.amp_dtype = resolve_precision(bool(config.bf16), bool(config.fp16), self.device.type)
        self.optimizer = build_optimizer(model, config)
        warm = num_warmup_steps(int(config.warmup_steps or 0), float(config.warmup_ratio or 0), self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(str(config.lr_scheduler_type), warm, self.total_steps))
        self.kl_ctl = (AdaptiveKLController(config.ppo_kl_coeff, config.ppo_target, 10000.0)
                       if config.ppo_target else FixedKLController(config.ppo_kl_coeff))
        self.score_moments = RunningMoments() if config.ppo_score_norm else None
        self.report_to = resolve_report_to(config.report_to)
        self.global_step, self.tokens_seen = 0, 0
        self.log_history: list[dict] = []
        self._order: list[int] = []
        self._epoch = 0

    # -- helpers ----------------------------------------------------------------------------------
    def autocast(self):
        """``torch.autocast`` for the configured precision (no-op context in float32)."""
        import contextlib

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def next_prompts(self) -> list[dict]:
        """The next ``rollout_size`` prompt rows of a seeded shuffled order (``randperm`` seeded by ``seed + epoch``,
        reshuffled when exhausted, so a prompt set smaller than the rollout batch is repeated)."""
        rows = []
        while len(rows) < self.rollout_size:
            if not self._order:
                g = torch.Generator().manual_seed(int(self.cfg.seed) + self._epoch)
                self._order = torch.randperm(len(self.prompts), generator=g).tolist()
                self._epoch += 1
            rows.append(self.prompts[self._order.pop(0)])
        return rows

    def ref_logps(self, rollout: Rollout) -> torch.Tensor:
        """``(B, R)`` reference log-probs: the frozen copy, else the policy with adapters disabled."""
        from llmtune import peft

        ids, mask, p = rollout.input_ids, rollout.attention_mask, rollout.prompt_ids.shape[1]
        temp = float(self.cfg.temperature) if self.cfg.do_sample else 1.0
        if self.ref_model is not None:
            return policy_forward(self.ref_model, ids, mask, p, rollout.response_mask, temp, values=False)["logps"]
        with peft.disable_adapters(self.model):
            return policy_forward(self.model, ids, mask, p, rollout.response_mask, temp, values=False)["logps"]

    # -- one PPO iteration ------------------------------------------------------------------------
    @torch.no_grad()
    def make_experience(self, rows: list[dict]) -> dict[str, Any]:
        """Rollout + scoring + advantages for ``rows`` (module docstring, steps 1-2); tensors ``(N, ...)``."""
        c = self.cfg
        temp = float(c.temperature) if c.do_sample else 1.0
        parts = []
        self.model.eval()
        for i in range(0, len(rows), self.bs):
            batch = self.collate(rows[i:i + self.bs])
            ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            with self.autocast():
                ro = sample_responses(self.model, ids, mask, int(c.max_new_tokens), do_sample=bool(c.do_sample),
                                      temperature=float(c.temperature), top_k=int(c.top_k), top_p=float(c.top_p),
                                      eos_token_ids=self.stop_ids, pad_token_id=self.pad)
            parts.append(ro)
        # one tensor set: prompts left-padded to a common P, responses right-padded to a common R
        p_len = max(r.prompt_ids.shape[1] for r in parts)
        r_len = max(r.response_ids.shape[1] for r in parts)

        def lpad(x, n, v):
            return torch.nn.functional.pad(x, (n - x.shape[1], 0), value=v)

        def rpad(x, n, v):
            return torch.nn.functional.pad(x, (0, n - x.shape[1]), value=v)

        ro = Rollout(prompt_ids=torch.cat([lpad(r.prompt_ids, p_len, self.pad) for r in parts]),
                     prompt_mask=torch.cat([lpad(r.prompt_mask, p_len, 0) for r in parts]),
                     response_ids=torch.cat([rpad(r.response_ids, r_len, self.pad) for r in parts]),
                     response_mask=torch.cat([rpad(r.response_mask, r_len, False) for r in parts]),
                     gen_logps=torch.cat([rpad(r.gen_logps, r_len, 0.0) for r in parts]))
        old_logps, old_values, ref, scores, ent = [], [], [], [], []
        for i in range(0, ro.prompt_ids.shape[0], self.bs):
            sub = Rollout(*(t[i:i + self.bs] for t in (ro.prompt_ids, ro.prompt_mask, ro.response_ids,
                                                      ro.response_mask, ro.gen_logps)))
            with self.autocast():
                out = policy_forward(self.model, sub.input_ids, sub.attention_mask, p_len, sub.response_mask, temp,
                                     values=True, entropy=True)
                ref.append(self.ref_logps(sub))
                scores.append(self.reward.score(self.model, sub))
            old_logps.append(out["logps"])
            old_values.append(out["values"])
            ent.append(out["entropy"])
        self.model.train()
        old_logps, old_values, ref_logps = torch.cat(old_logps), torch.cat(old_values), torch.cat(ref)
        raw_scores, entropy = torch.cat(scores), torch.cat(ent)
        mask = ro.response_mask
        scores_used = raw_scores
        if self.score_moments is not None:
            self.score_moments.update(raw_scores)
            scores_used = (raw_scores - self.score_moments.mean) / (self.score_moments.std + 1e-8)
        rewards, kl = kl_penalty_rewards(scores_used, old_logps, ref_logps, mask, self.kl_ctl.value)
        if c.ppo_whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        adv, returns = gae_advantages(rewards, old_values, mask, float(c.ppo_gamma), float(c.ppo_lam))
        adv = whiten(adv, mask)
        self.tokens_seen += int(ro.attention_mask.sum())
        return {"rollout": ro, "old_logps": old_logps, "old_values": old_values, "advantages": adv,
                "returns": returns, "mask": mask, "scores": raw_scores, "kl": kl, "entropy": entropy}

    def optimize(self, exp: dict[str, Any]) -> dict[str, float]:
        """``ppo_epochs`` passes of shuffled mini-batches; an optimizer step every backward batch (step 3)."""
        c = self.cfg
        ro, n = exp["rollout"], exp["mask"].shape[0]
        p_len = ro.prompt_ids.shape[1]
        temp = float(c.temperature) if c.do_sample else 1.0
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        limit = float(c.max_grad_norm) if c.max_grad_norm and c.max_grad_norm > 0 else float("inf")
        stats = {"pl": [], "vl": [], "cf": [], "gn": []}
        self.model.train()
        for _ in range(int(c.ppo_epochs)):
            perm = torch.randperm(n).tolist()
            for s in range(0, n, self.bs * self.ga):
                back = perm[s:s + self.bs * self.ga]
                minis = [back[j:j + self.bs] for j in range(0, len(back), self.bs)]
                for idx in minis:
                    ix = torch.tensor(idx, device=self.device)
                    with self.autocast():
                        out = policy_forward(self.model, ro.input_ids[ix], ro.attention_mask[ix], p_len,
                                             ro.response_mask[ix], temp, values=True)
                    m = exp["mask"][ix]
                    pl, clipfrac = ppo_policy_loss(out["logps"], exp["old_logps"][ix], exp["advantages"][ix], m,
                                                   float(c.ppo_clip_ratio))
                    vl = ppo_value_loss(out["values"], exp["old_values"][ix], exp["returns"][ix], m,
                                        float(c.ppo_value_clip))
                    ((pl + float(c.ppo_vf_coef) * vl) / len(minis)).backward()
                    stats["pl"].append(float(pl.detach()))
                    stats["vl"].append(float(vl.detach()))
                    stats["cf"].append(float(clipfrac))
                stats["gn"].append(float(torch.nn.utils.clip_grad_norm_(params, limit)))
                from llmtune.train.guard import nonfinite_step  # NaN/inf: stop (naming the step) or skip

                if not nonfinite_step(self.global_step + 1, stats["pl"][-1] + stats["vl"][-1], stats["gn"][-1],
                                      c.output_dir, getattr(c, "nonfinite_policy", "stop")):
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        return {"ppo/loss/policy": mean(stats["pl"]), "ppo/loss/value": mean(stats["vl"]),
                "clipfrac": mean(stats["cf"]), "grad_norm": mean(stats["gn"])}

    def step(self) -> dict[str, float]:
        """One PPO iteration; returns its metrics (reward, kl, losses, entropy, clipfrac, response_length...)."""
        rows = self.next_prompts()
        exp = self.make_experience(rows)
        lr = self.scheduler.get_last_lr()[0]
        kl_coef = self.kl_ctl.value
        opt = self.optimize(exp)
        mask = exp["mask"]
        kl_per_seq = float(exp["kl"].sum(1).mean())
        self.kl_ctl.update(kl_per_seq, mask.shape[0])
        self.scheduler.step()
        self.global_step += 1
        vf = float(self.cfg.ppo_vf_coef)
        return {"loss": opt["ppo/loss/policy"] + vf * opt["ppo/loss/value"], "reward": float(exp["scores"].mean()),
                "kl": kl_per_seq, "ppo/loss/policy": opt["ppo/loss/policy"], "ppo/loss/value": opt["ppo/loss/value"],
                "entropy": float(masked_mean(exp["entropy"], mask)), "clipfrac": opt["clipfrac"],
                "response_length": float(mask.sum(1).float().mean()), "lr": lr, "grad_norm": opt["grad_norm"],
                "ppo/kl_coef": kl_coef}

    def train(self, output_dir: Union[str, Path]) -> dict[str, Any]:
        """Run ``total_steps`` PPO iterations, logging to the progress bar and ``trainer_log.jsonl``.

        Returns LLaMA-Factory-style train results (``train_loss``, ``train_runtime``, ``reward``...).
        """
        from llmtune.train.logging import TrainLogger

        logger = TrainLogger(output_dir, self.total_steps, self.report_to, run_config=self.cfg,
                             progress=not self.cfg.disable_tqdm)
        logging_steps = max(1, int(self.cfg.logging_steps if self.cfg.logging_steps >= 1
                                   else math.ceil(self.cfg.logging_steps * self.total_steps)))
        start = time.time()
        losses, window = [], []
        try:
            while self.global_step < self.total_steps:
                metrics = self.step()
                logger.advance()
                losses.append(metrics["loss"])
                window.append(metrics)
                if self.global_step % logging_steps == 0 or self.global_step == self.total_steps:
                    avg = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                    avg["lr"] = window[-1]["lr"]
                    self.log_history.append(logger.log(self.global_step, self.global_step / self.steps_per_epoch,
                                                       avg, self.tokens_seen))
                    window = []
        finally:
            logger.close()
        runtime = time.time() - start
        return {"epoch": round(self.global_step / self.steps_per_epoch, 4),
                "train_loss": sum(losses) / max(len(losses), 1), "train_runtime": round(runtime, 4),
                "train_samples_per_second": round(self.global_step * self.rollout_size / runtime, 3) if runtime else 0.0,
                "train_steps_per_second": round(self.global_step / runtime, 3) if runtime else 0.0}


# ---------------------------------------------------------------------------------------------------
# the run: config -> model, reward model, prompts -> PPOTrainer -> output folder
# ---------------------------------------------------------------------------------------------------
def train_ppo(config: Any, reward_fn: Optional[RewardFn] = None) -> dict[str, Any]:
    """Run one PPO job (``llmtune train --stage ppo``, seed ``--stage rlhf``) and return its results.

    Args:
        config: a ``TrainConfig``, a dict of LLaMA-Factory keys or a YAML path; ``stage`` is set to ``ppo``.
        reward_fn: optional ``reward_fn(prompts, responses) -> list[float]`` used instead of ``reward_model``:
            ``prompts`` are the decoded chat prompts (template text included), ``responses`` the decoded
            responses without special tokens; one float per response, higher is better.

    Writes to ``output_dir``: the LoRA adapter (PEFT format) or the full model, ``value_head.safetensors``
    (the critic, keys ``v_head.summary.*``), ``training_args.yaml``, ``llmtune.json`` (template, base,
    parents), tokenizer files, ``generation_config.json``, ``trainer_log.jsonl``, ``train_results.json``,
    ``all_results.json`` and, with ``plot_loss``, ``training_loss.png`` / ``training_reward.png``.

    Raises:
        LLMTuneError: any configuration, data or reward-model mistake (one message naming the key/file).
    """
    from llmtune.config import parse_config
    from llmtune.data import get_dataset
    from llmtune.data.templates import get_template
    from llmtune.fileio import write_json
    from llmtune.generation import chat_stop_ids
    from llmtune.models.value_head import add_value_head, save_value_head
    from llmtune.runs import load_model, recorded_template, resolve_chain, save_metadata
    from llmtune.tokenizer import load_tokenizer
    from llmtune.train.finetuning import apply_finetuning_type
    from llmtune.train.outputs import prepare_output_dir, save_model
    from llmtune.train.precision import load_dtype, train_device
    from llmtune.train.seed import set_seed

    if isinstance(config, dict):
        config = {**config, "stage": "ppo"}
    cfg = parse_config(config, command="train")
    if cfg.stage != "ppo":
        cfg = cfg.replace(stage="ppo")
    if cfg.resume_from_checkpoint not in (None, False):
        raise LLMTuneError("resume_from_checkpoint is not supported for stage ppo yet; start a new run")
    chain = resolve_chain(cfg.model_name_or_path, cfg.adapter_name_or_path)
    base, parents = chain.base, chain.parents
    if reward_fn is None:
        check_reward_folder(cfg, base, parents)  # a wrong reward model fails before any weights are loaded
    out = prepare_output_dir(cfg)
    set_seed(cfg.seed)
    device = train_device(cfg)
    set_kernels_enabled(cfg.use_kernels)  # Triton kernels on CUDA (llmtune.kernels); off: PyTorch references

    model = load_model(cfg.model_name_or_path, dtype=load_dtype(cfg, device.split(":")[0]), device=device,
                       adapter_name_or_path=cfg.adapter_name_or_path, quantization_bit=cfg.quantization_bit,
                       quantization_type=cfg.quantization_type, double_quantization=cfg.double_quantization)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    template = get_template(cfg.template or recorded_template(cfg.model_name_or_path, *reversed(parents)),
                            tokenizer)
    prompts = get_dataset(cfg, tokenizer, template, "ppo").train

    set_seed(cfg.seed)
    ref_model = None
    if cfg.finetuning_type != "lora":
        import copy

        ref_model = copy.deepcopy(model).requires_grad_(False).eval()
    apply_finetuning_type(model, cfg)
    reward = load_reward_model(model, cfg, base, parents, reward_fn=reward_fn, tokenizer=tokenizer)
    add_value_head(model)  # the critic: trainable, float32, on the policy's backbone
    trainer = PPOTrainer(model, cfg, prompts, reward, tokenizer, chat_stop_ids(tokenizer, template),
                         ref_model=ref_model)
    from llmtune.train.checkpoint import clear_for_overwrite

    clear_for_overwrite(cfg, out)  # everything is loaded and checked: only now clear an earlier run
    from llmtune.train import summary

    summary.report_start(cfg, model, trainer, device)
    results = trainer.train(out)

    if cfg.finetuning_type == "lora":
        from llmtune import peft

        if reward.kind == "adapter":
            peft.delete_adapter(model, "reward")
        peft.set_adapter(model, "default")
    head = model.v_head
    del model.v_head  # the policy's weights are saved without the critic; the critic goes beside them
    try:
        save_model(model, out, cfg, base, parents)
    finally:
        model.v_head = head
    save_value_head(model, out)
    save_metadata(out, cfg, tokenizer, template, base, parents)
    write_json(out / "train_results.json", results)
    write_json(out / "all_results.json", results)
    if cfg.plot_loss:
        from llmtune.train.plotting import plot_loss

        plot_loss(out, keys=("loss", "reward"))
    summary.report_end(cfg, results, out, trainer, device)
    return results


def run_ppo(cfg: Any) -> dict[str, Any]:
    """Entry of ``run_train`` for ``stage: ppo``: :func:`train_ppo` with the configured reward model."""
    return train_ppo(cfg)


__all__ = ["Rollout", "sample_responses", "response_labels", "policy_forward", "RunningMoments", "RewardModel",
           "check_reward_folder", "load_reward_model", "PPOTrainer", "train_ppo", "run_ppo"]

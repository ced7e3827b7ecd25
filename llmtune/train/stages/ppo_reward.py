"""PPO's reward side: the reward model (an rm adapter, a value head on the base, a full model or a Python
function), the checks of ``reward_model`` before any weights load, and running score normalisation.

Sources: Ouyang et al., 2022 (a reward model's score is its value head at the last token); Chan et al., 1979
(running moments); TRL's ``RunningMoments`` as LLaMA-Factory configures it (``ppo_score_norm``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from llmtune.errors import LLMTuneError, notice
from llmtune.fileio import same_path
from llmtune.losses import value_head_scores

#: ``reward_fn(prompts, responses) -> one float per response`` (decoded text; see :func:`llmtune.train.ppo.train_ppo`)
RewardFn = Callable[[list[str], list[str]], Sequence[float]]

__all__ = ["RewardFn", "RunningMoments", "RewardModel", "check_reward_folder", "load_reward_model"]


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
    def score(self, policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              prompt_len: int) -> torch.Tensor:
        """``(B,)`` float32 scores of prompt + response rows (on ``input_ids``' device).

        Args:
            policy: the policy (its weights score for kinds ``adapter`` and ``base``).
            input_ids, attention_mask: ``(B, P + R)`` left-padded prompts then right-padded responses
                (:class:`llmtune.rollout.Rollout` layout). prompt_len: ``P``.

        Raises:
            LLMTuneError: a reward function that returns the wrong number of scores.
        """
        ids, mask = input_ids, attention_mask
        if self.kind == "fn":
            tok = self.tokenizer
            rows, masks = ids.tolist(), mask.tolist()
            prompts = [tok.decode([t for t, m in zip(r[:prompt_len], mk[:prompt_len]) if m], skip_special_tokens=False)
                       for r, mk in zip(rows, masks)]
            responses = [tok.decode([t for t, m in zip(r[prompt_len:], mk[prompt_len:]) if m], skip_special_tokens=True)
                         for r, mk in zip(rows, masks)]
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
            same = same_path(rm_base, base) and len(rm_parents) == len(parents) and all(
                same_path(a, b) for a, b in zip(rm_parents, parents))
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

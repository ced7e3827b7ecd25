"""Stage ``grpo``: Group Relative Policy Optimization as an online stage of the shared :class:`Trainer`.

One rollout (:meth:`GRPOStage.make_experience`) serves ``num_iterations`` trainer steps, each one optimizer
update of ``gradient_accumulation_steps`` micro-batches of ``per_device_train_batch_size`` completions:

1. the next ``B x GA / num_generations`` prompts (a seeded shuffled order of the dataset's prompts, the
   template's prompt of each row) get ``num_generations`` completions each, all decoded together by
   :func:`llmtune.rollout.generate_rollouts` (stops at the template's end-of-turn ids and the tokenizer's eos,
   at most ``max_new_tokens`` = TRL's ``max_completion_length``);
2. the reward functions (``reward_funcs``: built-ins, ``file.py:fn``, ``module:fn``, an rm output folder; or
   Python callables given to :func:`llmtune.train.setup.run_train`) score the decoded completions; the
   dataset row's other columns reach them by name (TRL's convention); ``reward_weights`` combine them
   (:func:`llmtune.rewards.compute_rewards`);
3. group-relative advantages (:func:`llmtune.losses.group_advantages`, ``scale_rewards``); with
   ``num_iterations > 1`` the sampling policy's log-probs (one forward), with ``beta > 0`` the reference's
   (adapters disabled for LoRA, else a frozen copy or ``ref_model``); ``mask_truncated_completions`` drops
   completions without a stop token from the loss (unless that is all of them: then a notice, and they stay);
4. the loss of a micro-batch is :func:`llmtune.losses.grpo_loss` (``loss_type``, ``epsilon``,
   ``epsilon_high``, ``beta``, ``importance_sampling_level``) as ``(loss_sum, num_items)``, counted by
   :func:`llmtune.losses.grpo_num_items`, so accumulation gives the variant's loss of the whole step.

With ``tools`` (:mod:`llmtune.rl_tools`), step 1 is multi-turn: tool calls in the template's format are run and
their results appended as tool turns (``completion_mask`` 0) until an answer or ``max_tool_turns``; the reward
functions get each completion as messages, and ``tools/call_frequency`` / ``tools/failure_frequency`` are logged.

Logged with TRL's names: ``reward``, ``reward_std``, ``rewards/<fn>/mean`` / ``std``, ``frac_reward_zero_std``,
``completions/mean_length`` ... ``completions/clipped_ratio``, ``clip_ratio/low_mean`` / ``high_mean`` /
``region_mean``, ``kl`` (``beta > 0``), ``entropy``.

Sources: Shao et al. 2024 (DeepSeekMath, GRPO); Yu et al. 2025 (DAPO); Liu et al. 2025 (Dr. GRPO); Zheng et al.
2025 (GSPO); the batch, key and metric conventions of TRL's ``GRPOTrainer``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from llmtune.data.multimodal import vision_inputs
from llmtune.errors import LLMTuneError, notice
from llmtune.losses.grpo import GRPO_LOSS_TYPES, SCALE_REWARDS, group_advantages, grpo_loss, grpo_num_items
from llmtune.models.shared_prefix import shared_prompt_layout
from llmtune.rewards import RewardFunc, compute_rewards, load_reward_funcs, parse_reward_weights, reward_metrics
from llmtune.rl_tools import ToolsTemplate, function_schema, generate_tool_rollouts, load_tools, tool_metrics
from llmtune.rollout import completion_metrics, generate_rollouts
from llmtune.train.distributed import all_reduce_sum, rank, world_size
from llmtune.train.wrap import unwrap
from llmtune.train.precision import frozen_weights_cast
from llmtune.train.stages.base import OnlineStep, StageContext
from llmtune.train.stages.ppo import policy_forward, response_labels

__all__ = ["GRPOStage", "build_grpo_stage", "check_grpo_config", "completion_forward", "drop_vision_completions",
           "micro_batch_slices", "scale_rewards_value"]


def _cat_vision(rows: Sequence[dict]) -> dict:
    """The model's vision arguments of several rows (each ``{}`` or one prompt's ``pixel_values`` /
    ``image_grid_thw``), concatenated in row order; ``{}`` when no row has images."""
    rows = [r for r in rows if r]
    return {k: torch.cat([r[k] for r in rows]) for k in ("pixel_values", "image_grid_thw")} if rows else {}


def drop_vision_completions(ids: torch.Tensor, mask: torch.Tensor, prompt_len: int, vision_ids: Sequence[int],
                            pad_token_id: int) -> int:
    """Completions of a vision-language policy that sampled an image/video pad token: such a token makes the
    model look for image features it does not have, so it is replaced by ``pad_token_id`` in ``ids`` ``(N, P + C)``
    and the completion leaves the loss (its row of ``mask`` ``(N, C)`` set to 0), in place. Returns how many."""
    comp = ids[:, prompt_len:]
    bad = torch.isin(comp, torch.tensor(list(vision_ids), device=ids.device))
    rows = bad.any(1)
    comp[bad] = pad_token_id
    mask[rows] = 0
    return int(rows.sum())


def scale_rewards_value(value: Any) -> str:
    """``scale_rewards`` as one of group/batch/none (TRL also accepts true = group, false = none).

    Raises:
        LLMTuneError: any other value.
    """
    v = str(value).strip().lower()
    v = {"true": "group", "false": "none", "1": "group", "0": "none"}.get(v, v)
    if v not in SCALE_REWARDS:
        raise LLMTuneError(f"scale_rewards: {value!r} is not one of group, batch, none (true = group, false = none)")
    return v


def check_grpo_config(cfg: Any, reward_funcs: Optional[Sequence[Any]] = None) -> None:
    """Checks of stage grpo before any weights load: keys in range, a reward function named, and the step's
    completions (``per_device_train_batch_size x gradient_accumulation_steps x`` world size) a multiple of
    ``num_generations``.

    Raises:
        LLMTuneError: one message naming the key and how to fix it.
    """
    g = int(cfg.num_generations)
    if g < 2:
        raise LLMTuneError(f"num_generations must be >= 2 for stage grpo (got {g}): the advantages compare the "
                           "completions of one prompt")
    per_step = int(cfg.per_device_train_batch_size) * int(cfg.gradient_accumulation_steps) * world_size()
    if per_step % g:
        raise LLMTuneError(f"stage grpo: the completions of one optimizer step (per_device_train_batch_size "
                           f"{cfg.per_device_train_batch_size} x gradient_accumulation_steps "
                           f"{cfg.gradient_accumulation_steps} x {world_size()} process(es) = {per_step}) must be a "
                           f"multiple of num_generations ({g}); e.g. set per_device_train_batch_size to {g}")
    if int(cfg.num_iterations) < 1:
        raise LLMTuneError(f"num_iterations must be >= 1 (got {cfg.num_iterations})")
    if str(cfg.loss_type) not in GRPO_LOSS_TYPES:
        raise LLMTuneError(f"loss_type: {cfg.loss_type!r} is not one of {', '.join(GRPO_LOSS_TYPES)} for stage grpo")
    if str(cfg.importance_sampling_level) not in ("token", "sequence"):
        raise LLMTuneError(f"importance_sampling_level: {cfg.importance_sampling_level!r} is not token or sequence")
    scale_rewards_value(cfg.scale_rewards)
    if float(cfg.beta) < 0 or float(cfg.epsilon) < 0 or (cfg.epsilon_high is not None and float(cfg.epsilon_high) < 0):
        raise LLMTuneError("beta, epsilon and epsilon_high must be >= 0")
    if getattr(cfg, "tools", None):   # a bad tools entry fails before the weights load
        load_tools(cfg.tools)
        if not float(cfg.tool_timeout) > 0:
            raise LLMTuneError(f"tool_timeout must be > 0 seconds (got {cfg.tool_timeout}); e.g. tool_timeout: 5")
    if not reward_funcs and not cfg.reward_funcs:
        raise LLMTuneError("stage grpo needs reward functions: set reward_funcs (a comma list of built-in names "
                           "accuracy/format, path/to/file.py:function, package.module:function or an rm output "
                           "folder)")


def completion_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                       completion_mask: torch.Tensor, temperature: float = 1.0, entropy: bool = False,
                       packed: bool = True, share_prompts: bool = True, **vision: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
    """Per-token log-probs (and entropy) of the completions of a rollout micro-batch, padding-free by default.

    ``packed``: the rows' real tokens (``attention_mask > 0``: the prompt without its left padding, the completion
    up to its stop token) are concatenated into one ``(1, K)`` row with segment ids ``1..N`` (segment-aware
    attention, positions from 0 per segment, as the padding-free collator packs training rows), so no padding
    column is computed; the log-probs are scattered back to the ``(N, C)`` completion layout. ``packed=False``:
    :func:`llmtune.train.stages.ppo.policy_forward` on the padded ``(N, P + C)`` rows. Both give the same
    values up to floating-point rounding (the same tokens attend to the same tokens).

    ``share_prompts`` (with ``packed``): consecutive rows with the same prompt (a GRPO group) share one copy of it:
    the prompt is computed once and its completions attend to it (:mod:`llmtune.models.shared_prefix`), the same
    log-probs up to rounding for fewer tokens (a group of ``G``: ``G - 1`` prompt copies fewer). Not for sliding-
    window attention, mixture-of-experts models (their load-balancing loss counts tokens) or vision inputs.

    Args:
        model: the policy (or reference) transformer with ``lm_head``.
        input_ids, attention_mask: ``(N, P + C)`` (:class:`llmtune.rollout.Rollout` layout; mask 0/1).
        prompt_len: ``P``. completion_mask: ``(N, C)``: tokens whose log-prob is returned (0 elsewhere).
        temperature: log-probs of ``logits / temperature``. entropy: also return the per-token entropy.
        **vision: a vision-language policy's ``pixel_values`` / ``image_grid_thw`` (then the padded path).

    Returns: ``{"logps": (N, C) float32}`` (+ ``"entropy": (N, C) float32``, no gradient), 0 where
    ``completion_mask`` is 0; differentiable unless called under ``no_grad``.

    Source: the rollout layout of :mod:`llmtune.rollout`; token log-probs as :func:`llmtune.losses.token_logps`.
    """
    if not packed or vision:   # images: the padded rows (M-RoPE positions are per row)
        return policy_forward(model, input_ids, attention_mask, prompt_len, completion_mask, temperature,
                              values=False, entropy=entropy, **vision)
    from llmtune.losses import token_logps, token_logps_entropy

    cfg = getattr(model, "config", None)
    if share_prompts and cfg is not None and getattr(cfg, "sliding_window", None) is None \
            and not getattr(cfg, "num_experts", 0) and getattr(model, "visual", None) is None:
        lay = shared_prompt_layout(input_ids, attention_mask, prompt_len, completion_mask)
        if lay is not None:
            return _shared_prompt_forward(model, lay, completion_mask, temperature, entropy)
    keep = attention_mask > 0                                                    # (N, P + C)
    n = input_ids.shape[0]
    seg = torch.repeat_interleave(torch.arange(1, n + 1, device=input_ids.device), keep.sum(1))[None]
    hidden = model(input_ids[keep][None], attention_mask=seg)                    # (1, K, H)
    labels = response_labels(input_ids, prompt_len, completion_mask)[keep][None]  # -100 on every prompt token
    if not entropy:
        lp = token_logps(hidden, model.lm_head.weight, labels, temperature=temperature)[0]
        return {"logps": lp.new_zeros(keep.shape).masked_scatter(keep, lp)[:, prompt_len:]}
    lp, ent = token_logps_entropy(hidden, model.lm_head.weight, labels, temperature=temperature)
    return {"logps": lp[0].new_zeros(keep.shape).masked_scatter(keep, lp[0])[:, prompt_len:],
            "entropy": ent[0].new_zeros(keep.shape).masked_scatter(keep, ent[0])[:, prompt_len:]}


def _shared_prompt_forward(model: nn.Module, lay: Any, completion_mask: torch.Tensor, temperature: float,
                           entropy: bool) -> dict[str, torch.Tensor]:
    """:func:`completion_forward` on a :class:`llmtune.models.shared_prefix.SharedPromptLayout`."""
    from llmtune.losses import label_logps_entropy

    hidden = model(lay.input_ids, position_ids=lay.position_ids, spans=lay.spans)[0]     # (K, H)
    lp, ent = label_logps_entropy(hidden[lay.src], model.lm_head.weight, lay.targets, temperature, entropy)
    out = {"logps": lp.new_zeros(completion_mask.shape).index_put((lay.rows, lay.cols), lp)}
    if ent is not None:
        out["entropy"] = ent.new_zeros(completion_mask.shape).index_put((lay.rows, lay.cols), ent)
    return out


def micro_batch_slices(tokens: Sequence[int], batch_size: int, max_tokens: Optional[int]) -> list[slice]:
    """Consecutive row slices: at most ``batch_size`` rows each and, with ``max_tokens``, at most that many tokens
    (``tokens[i]``: what row ``i`` costs the forward), a batch_size chunk split greedily where it would exceed.

    Raises:
        LLMTuneError: a row alone over ``max_tokens`` (naming the key and the row's size).
    """
    out: list[slice] = []
    for s in range(0, len(tokens), batch_size):
        start, used = s, 0
        for i in range(s, min(s + batch_size, len(tokens))):
            t = int(tokens[i])
            if max_tokens and t > max_tokens:
                raise LLMTuneError(f"max_tokens_per_micro_batch: completion {i} of this step needs {t} tokens "
                                   f"(prompt + completion), more than max_tokens_per_micro_batch {max_tokens}; "
                                   f"raise it to at least {t} or lower cutoff_len / max_completion_length")
            if max_tokens and used + t > max_tokens and i > start:
                out.append(slice(start, i))
                start, used = i, 0
            used += t
        out.append(slice(start, min(s + batch_size, len(tokens))))
    return out


class GRPOStage:
    """The GRPO online stage (see the module docstring).

    Args:
        config: the run's ``TrainConfig`` (GRPO keys, generation keys, batch keys, ``seed``).
        prompts: rows with ``input_ids`` (the template's prompt) and ``columns`` (the dataset row).
        reward_funcs: ``[(name, fn)]`` (:func:`llmtune.rewards.load_reward_funcs`); weights: one float each.
        tokenizer: decodes prompts and completions for the reward functions.
        pad_token_id, stop_token_ids: filler and generation stops.
        ref_model: frozen reference (full fine-tuning with ``beta > 0``); None = adapters disabled.
        on_save: called with the model before it is saved (drops a reward adapter).
        processor: the image processor of a vision-language model (:func:`llmtune.data.multimodal.model_processor`)
            when prompt rows hold ``images``: rollouts prefill with them, the policy/reference forwards see them,
            and reward functions get them as the ``images`` column (absolute paths, one list per completion).
        tools: ``{name: function}`` the policy may call (the ``tools`` key): multi-turn rollouts
            (:func:`llmtune.rl_tools.generate_tool_rollouts`, ``max_tool_turns``, ``tool_timeout``), tool-result
            tokens masked from the loss, completions passed to the reward functions as messages; template: the
            chat template the calls are parsed and the tool turns rendered with. None = single-turn rollouts.

    Raises: :class:`LLMTuneError` for an empty prompt set.
    """

    #: rollouts under autocast hold the frozen weights cast once (:func:`llmtune.train.precision.frozen_weights_cast`)
    cast_frozen: bool = True
    #: ... and run each LoRA layer on its merged weight (one product per layer; tokens equal up to bf16 rounding)
    merge_adapters: bool = True
    #: ... and on the CPU run the bf16 linear layers on oneDNN-prepacked weights (bitwise the same products)
    pack_weights: bool = True
    #: the policy/reference forwards compute each group's prompt once for its completions (:func:`completion_forward`)
    share_prompts: bool = True

    def __init__(self, config: Any, prompts: Sequence[dict], reward_funcs: list[tuple[str, RewardFunc]],
                 weights: list[float], tokenizer: Any, pad_token_id: int, stop_token_ids: Sequence[int],
                 ref_model: Optional[nn.Module] = None, on_save: Optional[Callable[[nn.Module], None]] = None,
                 processor: Any = None, tools: Optional[dict] = None, template: Any = None) -> None:
        self.cfg, self.prompts, self.funcs, self.weights = config, prompts, reward_funcs, weights
        self.tokenizer, self.pad, self.ref_model, self.on_save = tokenizer, int(pad_token_id), ref_model, on_save
        self.stop_ids = sorted({int(i) for i in stop_token_ids})
        self.bs, self.ga = int(config.per_device_train_batch_size), int(config.gradient_accumulation_steps)
        self.G = int(config.num_generations)
        self.rank, self.world = rank(), world_size()
        self.local = self.bs * self.ga  # completions this process generates per step
        self.prompts_per_step = self.local * self.world // self.G  # prompts of a step, all processes
        if len(prompts) == 0:
            raise LLMTuneError("stage grpo: the prompt dataset is empty: check dataset, max_samples and cutoff_len")
        self.num_iterations = int(config.num_iterations)
        self.steps_per_epoch = math.ceil(len(prompts) / self.prompts_per_step) * self.num_iterations
        self.beta = float(config.beta)
        self.scale_rewards = scale_rewards_value(config.scale_rewards)
        self.temperature = float(config.temperature) if config.do_sample else 1.0
        self.packed = bool(getattr(config, "padding_free", True))
        self.max_tokens = getattr(config, "max_tokens_per_micro_batch", None)
        self._order: list[int] = []
        self._epoch = 0
        #: prompts with images (vision-language models): the image processor and each row's processed images
        self.processor, self._pixels = processor, {}
        #: ``{name: function}`` the policy may call (the ``tools`` key; :mod:`llmtune.rl_tools`) and the template
        #: whose tool format its calls are parsed in; None = plain single-turn rollouts
        self.tools, self.template = tools, template

    def next_prompts(self) -> list[dict]:
        """The next step's prompt rows of a seeded shuffled order (``randperm`` seeded by ``seed + epoch``)."""
        rows = []
        while len(rows) < self.prompts_per_step:
            if not self._order:
                g = torch.Generator().manual_seed(int(self.cfg.seed) + self._epoch)
                self._order = torch.randperm(len(self.prompts), generator=g).tolist()
                self._epoch += 1
            rows.append(self.prompts[self._order.pop(0)])
        return rows

    def state_dict(self) -> dict[str, Any]:
        """What this stage carries between steps, as JSON (saved in checkpoints as ``online_state.json``):
        the prompt cursor (``order``: the rest of the current shuffled order; ``epoch``: passes drawn so far;
        ``num_prompts``: the prompt set's size, checked at resume)."""
        return {"stage": "grpo", "num_prompts": len(self.prompts), "order": list(self._order), "epoch": self._epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Raises :class:`LLMTuneError` for the state of another stage or prompt set."""
        if state.get("stage") != "grpo" or state.get("num_prompts") != len(self.prompts):
            raise LLMTuneError(f"resume_from_checkpoint: the saved online state is not that of stage grpo on these "
                               f"{len(self.prompts)} prompts; resume with the dataset and stage it was trained with")
        self._order, self._epoch = [int(i) for i in state["order"]], int(state["epoch"])

    def _logps(self, model: nn.Module, ids: torch.Tensor, attn: torch.Tensor, p: int, mask: torch.Tensor,
               trainer: Any, reference: bool, slices: Sequence[slice], vision: Sequence[dict]) -> torch.Tensor:
        """``(N, C)`` log-probs of the completions in the training micro-batches ``slices`` and the training
        layout (:func:`completion_forward`), no gradient (policy or reference)."""
        from llmtune import peft

        out = []
        for sl in slices:
            vis = _cat_vision(vision[sl])
            with trainer.autocast():
                if reference and self.ref_model is not None:
                    lp = completion_forward(self.ref_model, ids[sl], attn[sl], p, mask[sl], self.temperature,
                                            packed=self.packed, share_prompts=self.share_prompts, **vis)
                elif reference:
                    with peft.disable_adapters(model):
                        lp = completion_forward(model, ids[sl], attn[sl], p, mask[sl], self.temperature,
                                                packed=self.packed, share_prompts=self.share_prompts, **vis)
                else:
                    lp = completion_forward(model, ids[sl], attn[sl], p, mask[sl], self.temperature,
                                            packed=self.packed, share_prompts=self.share_prompts, **vis)
            out.append(lp["logps"].float())
        return torch.cat(out)

    def _vision(self, row: dict, model: nn.Module) -> dict:
        """A prompt row's ``pixel_values`` / ``image_grid_thw`` on the model's device (computed once per row and
        kept), ``{}`` for a text-only row."""
        if not row.get("images"):
            return {}
        key = id(row)
        if key not in self._pixels:
            if self.processor is None:
                raise LLMTuneError("stage grpo: prompts with images need a vision-language model_name_or_path")
            device = next(model.parameters()).device
            self._pixels[key] = {k: v.to(device) for k, v in self.processor(row["images"]).items()}
        return self._pixels[key]

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        """``(local, ...)`` rows of every process in rank order: ``(world * local, ...)`` (exact: a sum of
        zero-padded buffers, NaN stays in its own row)."""
        if self.world == 1:
            return local
        buf = local.new_zeros((self.world * local.shape[0],) + tuple(local.shape[1:]))
        buf[self.rank * local.shape[0]:(self.rank + 1) * local.shape[0]] = local
        return all_reduce_sum(buf)

    @torch.no_grad()
    def make_experience(self, trainer: Any) -> list[OnlineStep]:
        """Generate, score and turn one rollout into ``num_iterations`` steps (module docstring, 1-3).

        Under ``torchrun`` every process draws the same prompts; completion ``j`` of the step belongs to prompt
        ``j // num_generations`` and process ``j // (B x GA)`` generates it, so a group may span processes. The
        rewards (and lengths) of all processes are gathered before the group statistics, so advantages and
        metrics are those of the whole step.
        """
        model = unwrap(trainer.model)
        was_training = model.training
        model.eval()   # one switch for the rollout, the rewards and the reference/old forwards (each walks the model)
        try:
            return self._experience(trainer, model)
        finally:
            if was_training:
                model.train()

    def _experience(self, trainer: Any, model: nn.Module) -> list[OnlineStep]:
        """:meth:`make_experience` with ``model`` (unwrapped) in eval mode."""
        c = self.cfg
        step_rows = self.next_prompts()
        rows = [step_rows[j // self.G] for j in range(self.rank * self.local, (self.rank + 1) * self.local)]
        vision = [self._vision(r, model) for r in rows]   # per completion: its prompt's images (or {})
        images = model.generation_images(vision) if any(vision) else contextlib.nullcontext()
        amp = getattr(trainer, "amp_dtype", None) if self.cast_frozen else None
        gen = dict(max_new_tokens=int(c.max_new_tokens), do_sample=bool(c.do_sample), temperature=float(c.temperature),
                   top_k=int(c.top_k), top_p=float(c.top_p), eos_token_ids=self.stop_ids, pad_token_id=self.pad,
                   return_logps=False)
        with trainer.autocast(), frozen_weights_cast(model, amp, self.merge_adapters, self.pack_weights), images:
            if self.tools is None:
                ro, tro = generate_rollouts(model, [r["input_ids"] for r in rows], **gen), None
            else:   # multi-turn: tool-result tokens stay in the sequence with completion_mask 0
                tro = generate_tool_rollouts(model, [r["input_ids"] for r in rows], tokenizer=self.tokenizer,
                                             template=self.template, tools=self.tools,
                                             max_tool_turns=int(c.max_tool_turns), tool_timeout=float(c.tool_timeout),
                                             **gen)
                ro = tro.rollout
        ids, attn, p = ro.input_ids, ro.attention_mask, ro.prompt_len
        prompts = [self.tokenizer.decode(list(r["input_ids"]), skip_special_tokens=False) for r in rows]
        # with tools, reward functions get the whole completion as messages (TRL's conversational completions)
        completions = tro.conversations if tro is not None else \
            [self.tokenizer.decode(t, skip_special_tokens=True) for t in ro.completions()]
        names = sorted({k for r in rows for k in (r.get("columns") or {})})
        columns = {k: [(r.get("columns") or {}).get(k) for r in rows] for k in names}
        if any(r.get("images") for r in rows):   # reward functions get each completion's prompt images (paths)
            columns["images"] = [list(r.get("images") or []) for r in rows]
        rewards, per_func = compute_rewards(self.funcs, self.weights, prompts, completions, columns)
        scored = self._gather(torch.cat([rewards[:, None], per_func], dim=1).to(ids.device)).cpu()
        rewards, per_func = scored[:, 0], scored[:, 1:]
        lengths = self._gather(torch.stack([ro.completion_lengths.float(), ro.truncated.float()], 1)).cpu()
        mine = slice(self.rank * self.local, (self.rank + 1) * self.local)
        adv = group_advantages(rewards, self.G, self.scale_rewards)[mine].to(ids.device)
        mask = ro.completion_mask
        if c.mask_truncated_completions:
            if bool(lengths[:, 1].all()):  # nothing would be left to train on: keep them for this step
                notice("mask_truncated_completions: every completion of this step reached max_completion_length "
                       f"({c.max_new_tokens}); training on them anyway (raise max_completion_length)")
            else:
                mask = mask * (~ro.truncated).long()[:, None]
        if getattr(model, "visual", None) is not None:
            v = model.config.vision
            n_bad = drop_vision_completions(ids, mask, p, (v["image_token_id"], v["video_token_id"]), self.pad)
            if n_bad:
                notice(f"stage grpo: {n_bad} completion(s) sampled an image/video pad token; they are left out of "
                       "the loss (their tokens cannot be scored without image features)")
        cost = attn.sum(1).tolist() if self.packed else [ids.shape[1]] * ids.shape[0]
        slices = micro_batch_slices(cost, self.bs, self.max_tokens)
        # with num_iterations 1 the ratio is exp(logps - logps.detach()): no old-policy forward
        old = self._logps(model, ids, attn, p, mask, trainer, False, slices, vision) if self.num_iterations > 1 else None
        ref = self._logps(model, ids, attn, p, mask, trainer, True, slices, vision) if self.beta > 0 else None
        metrics = reward_metrics(rewards, per_func, [n for n, _ in self.funcs], self.G)
        metrics.update(completion_metrics(lengths[:, 0].long(), lengths[:, 1].bool()))
        if tro is not None:
            counts = self._gather(torch.stack([tro.tool_calls, tro.tool_failures], 1).to(ids.device)).cpu()
            metrics.update(tool_metrics(counts[:, 0], counts[:, 1]))
        metrics = {k: v for k, v in metrics.items() if not math.isnan(v)}

        def micro(sl: slice) -> dict:
            b = {"input_ids": ids[sl], "attention_mask": attn[sl], "completion_mask": mask[sl], "prompt_len": p,
                 "advantages": adv[sl]}
            b.update(_cat_vision(vision[sl]))
            if old is not None:
                b["old_logps"] = old[sl]
            if ref is not None:
                b["ref_logps"] = ref[sl]
            return b

        return [OnlineStep(updates=[[micro(sl) for sl in slices]], metrics=dict(metrics))
                for _ in range(self.num_iterations)]

    def loss(self, model: nn.Module, batch: dict, ctx: StageContext) -> tuple[torch.Tensor, int, dict]:
        """:func:`llmtune.losses.grpo_loss` of one micro-batch (``(loss_sum, num_items, metrics)``)."""
        c = self.cfg
        out = completion_forward(model, batch["input_ids"], batch["attention_mask"], batch["prompt_len"],
                                 batch["completion_mask"], self.temperature, entropy=True, packed=self.packed,
                                 share_prompts=self.share_prompts,
                                 **vision_inputs(batch))
        return grpo_loss(out["logps"], batch.get("old_logps"), batch.get("ref_logps"), batch["advantages"],
                         batch["completion_mask"], loss_type=str(c.loss_type), epsilon=float(c.epsilon),
                         epsilon_high=c.epsilon_high, beta=self.beta,
                         importance_sampling_level=str(c.importance_sampling_level),
                         max_completion_length=int(c.max_new_tokens), entropies=out["entropy"])

    def count_items(self, batch: dict) -> int:
        """:func:`llmtune.losses.grpo_num_items` of the micro-batch's completion mask."""
        return grpo_num_items(batch["completion_mask"], str(self.cfg.loss_type))

    def before_save(self, model: nn.Module) -> None:
        """Drop a reward model's adapter (an rm folder among ``reward_funcs``)."""
        if self.on_save is not None:
            self.on_save(model)


def reward_model_func(model: nn.Module, cfg: Any, tokenizer: Any, folder: str, adapters: list) -> RewardFunc:
    """An rm-stage output folder as a reward function: ``prompt + completion`` text, re-tokenized, scored by
    the reward model at its last token (:class:`~llmtune.train.stages.ppo_reward.RewardModel`; TRL re-tokenizes
    text for model rewards too). A LoRA rm on the policy's base is a second adapter ``"reward"`` (recorded in
    ``adapters`` so that it is dropped before saving)."""
    from llmtune.train.stages.ppo_reward import load_reward_model

    chain = model.adapter_chain
    sub = cfg.replace(reward_model=folder) if hasattr(cfg, "replace") else cfg
    rm = load_reward_model(model, sub, chain.base, chain.parents, tokenizer=tokenizer)
    if rm.kind == "adapter":
        adapters.append("reward")
    device = next(model.parameters()).device

    def score(prompts: list, completions: list, **_: Any) -> list[float]:
        completions = [co if isinstance(co, str) else "\n".join(str(m.get("content") or "") for m in co)
                       for co in completions]   # with tools: the messages' texts
        seqs = [tokenizer.encode(pr + co, add_special_tokens=False) or [0] for pr, co in zip(prompts, completions)]
        t = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (t - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in seqs], device=device)
        return rm.score(model, ids, mask, t).tolist()

    score.__name__ = folder.rstrip("/").split("/")[-1] or "reward_model"
    return score


def grpo_needs_reference(config: Any) -> bool:
    """Stage grpo's :attr:`~llmtune.train.stages.base.Stage.reference` rule: a reference policy when the KL
    term is on (``beta > 0``, TRL's rule)."""
    return float(config.beta or 0.0) > 0


def build_grpo_stage(model: nn.Module, cfg: Any, tokenizer: Any, template: Any, rows: Sequence[dict], extra: dict,
                     reward_funcs: Optional[Sequence[Any]] = None) -> GRPOStage:
    """The :class:`GRPOStage` of a run (the stage table's ``build`` for ``grpo``).

    Args:
        reward_funcs: Python callables (TRL convention) used instead of the ``reward_funcs`` key.

    Raises:
        LLMTuneError: a reward function that cannot be loaded, weights of the wrong count.
    """
    from llmtune.chat import chat_stop_ids

    adapters: list = []
    if reward_funcs:
        funcs = [(getattr(f, "__name__", f"reward_{i}"), f) for i, f in enumerate(reward_funcs)]
    else:
        funcs = load_reward_funcs(str(cfg.reward_funcs),
                                  reward_model_loader=lambda d: reward_model_func(model, cfg, tokenizer, d, adapters))
    weights = parse_reward_weights(cfg.reward_weights, len(funcs))

    def drop_adapters(m: nn.Module) -> None:
        if adapters:
            from llmtune import peft

            peft.delete_adapter(m, "reward")
            peft.set_adapter(m, "default")

    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    processor = None
    if any(r.get("images") for r in rows):
        from llmtune.data.multimodal import model_processor

        processor = model_processor(cfg.model_name_or_path, cfg.image_max_pixels, cfg.image_min_pixels)
    tools, tool_template = None, template
    if getattr(cfg, "tools", None):
        if processor is not None:
            raise LLMTuneError("tools: tool calls in rollouts are not supported with image prompts yet; drop the "
                               "tools key or the images column")
        tools = dict(load_tools(cfg.tools))
        tool_template, rows = tool_prompt_rows(cfg, tokenizer, template, list(tools.values()))
    return GRPOStage(cfg, rows, funcs, weights, tokenizer, pad, chat_stop_ids(tokenizer, template),
                     ref_model=extra.get("ref_model"), on_save=drop_adapters, processor=processor, tools=tools,
                     template=tool_template)


def tool_prompt_rows(cfg: Any, tokenizer: Any, template: Any, functions: Sequence[Callable]) -> tuple[Any, list]:
    """``(template, prompt rows)`` of a run with the ``tools`` key: the template (``tool_format`` and
    ``default_system`` applied) wrapped in :class:`llmtune.rl_tools.ToolsTemplate` with the functions' schemas, and
    the dataset's prompt rows encoded with it (each prompt lists the tools; a row's own ``tools`` column first).
    The rows are encoded again into a throwaway cache folder, so the shared data cache never holds them."""
    import tempfile

    from llmtune.data import get_dataset
    from llmtune.data.dataset import _with_overrides

    wrapped = ToolsTemplate(_with_overrides(template, cfg), [function_schema(f) for f in functions])
    with tempfile.TemporaryDirectory(prefix="llmtune-tool-prompts-") as tmp:
        sub = cfg.replace(data_cache_dir=tmp, overwrite_cache=True, tool_format=None, default_system=None)
        return wrapped, list(get_dataset(sub, tokenizer, wrapped, "grpo").train)

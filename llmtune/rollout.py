"""Rollouts for online RL (GRPO, PPO): many prompts, several completions each, sampled log-probs.

The decoding is the generation engine's (:class:`llmtune.engine.Engine`): ``batch_size`` slots, continuous
batching (a completion that stops frees its slot for the next one at once), and the ``num_return_sequences``
completions of one prompt prefilled once and copied into their slots (prefix sharing). This module keeps only
the batching choice and the :class:`Rollout` layout.

Source: the rollout layout (left-padded prompts, right-padded completions, a completion mask up to and
including the stop token, log-probs of ``logits / temperature``) is TRL's ``GRPOTrainer`` one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from llmtune.engine import Engine, Request
from llmtune.errors import LLMTuneError
from llmtune.sampling import SamplingParams, check_generation_args, stop_id_list

__all__ = ["Rollout", "generate_rollouts", "completion_metrics"]


@dataclass
class Rollout:
    """The completions of one rollout call, ready for a training forward over ``input_ids``.

    Row ``i`` is completion ``i % num_return_sequences`` of prompt ``i // num_return_sequences`` (the
    completions of one prompt are consecutive, as GRPO's groups expect).

    Attributes:
        input_ids: ``(N, P + C)`` int64: the prompt left-padded to ``P`` columns, then the completion
            right-padded to ``C`` columns (``pad_token_id`` on both sides).
        attention_mask: ``(N, P + C)`` int64: 1 at prompt tokens and at completion tokens up to and
            including the stop token, 0 at padding.
        prompt_len: ``P``, the column where completions start (the longest prompt).
        completion_mask: ``(N, C)`` int64: 1 for generated tokens up to and including the stop token.
        logps: ``(N, C)`` float32 log-probs of the sampled tokens, ``log_softmax(logits / temperature)``
            when sampling (``log_softmax(logits)`` when greedy), i.e. the policy before top-k/top-p
            filtering, as TRL computes ``per_token_logps``; 0 where ``completion_mask`` is 0. ``None``
            when not asked for.
        truncated: ``(N,)`` bool: no stop token within ``max_new_tokens``.
        completion_lengths: ``(N,)`` int64 generated tokens per row (the stop token included).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    completion_mask: torch.Tensor
    logps: Optional[torch.Tensor]
    truncated: torch.Tensor
    completion_lengths: torch.Tensor

    @property
    def prompt_ids(self) -> torch.Tensor:
        """``(N, P)`` left-padded prompts."""
        return self.input_ids[:, : self.prompt_len]

    @property
    def completion_ids(self) -> torch.Tensor:
        """``(N, C)`` right-padded completions."""
        return self.input_ids[:, self.prompt_len:]

    def completions(self) -> list[list[int]]:
        """Each row's generated token ids (the stop token included), as Python lists."""
        ids, lens = self.completion_ids.tolist(), self.completion_lengths.tolist()
        return [row[:n] for row, n in zip(ids, lens)]


def generate_rollouts(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                      do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                      eos_token_ids: Optional[Iterable[int] | int] = None, pad_token_id: int = 0,
                      num_return_sequences: int = 1, batch_size: Optional[int] = None, return_logps: bool = True,
                      generator: Optional[torch.Generator] = None) -> Rollout:
    """Generate ``num_return_sequences`` completions of every prompt, in batches, with the sampled log-probs.

    Args:
        model: a :class:`llmtune.models.transformer.Transformer` (LoRA-wrapped or not; its active adapters are
            the policy). Runs in eval mode under ``torch.inference_mode`` (the training flag is restored); the
            returned tensors are ordinary ones.
        prompts: token ids of each prompt (a list of int lists, unpadded, each non-empty).
        max_new_tokens: the most tokens per completion (>= 1).
        do_sample: sample from the processed distribution; False = greedy (argmax).
        temperature, top_p, top_k: sampling settings (``transformers.generate`` semantics; see
            :func:`llmtune.generation.process_logits`).
        eos_token_ids: ids that end a completion (kept in it, inside ``completion_mask``): the tokenizer's eos
            and the template's end-of-turn ids. ``None`` or empty = every completion runs to ``max_new_tokens``.
        pad_token_id: fills left padding of prompts and positions after a completion's stop token.
        num_return_sequences: completions per prompt (GRPO's ``num_generations``), consecutive in the output.
        batch_size: rows (prompt x completion) decoded together, the engine's slots: a finished row's slot goes
            to the next waiting completion at once; ``None`` = all ``N`` rows at once. The completions of one
            prompt, and equal consecutive prompts (GRPO passes one per completion), share one prefill (as many as
            free slots allow at a time).
        return_logps: compute :attr:`Rollout.logps` (one ``log_softmax`` over the vocabulary per step and row).
        generator: a :class:`torch.Generator` on the model's device for reproducible sampling. Sampled tokens
            are drawn by :func:`llmtune.sampling.inverse_cdf_draw` (the same distribution as
            ``torch.multinomial``, one uniform per row; a seed gives other draws than ``generate``'s).

    Vision-language models: rows queued by ``QwenVL.generation_images`` (one entry per output row) are taken from
    the model and passed as each request's :attr:`~llmtune.engine.Request.images` (prefilled one prompt per row,
    decoded with per-slot M-RoPE offsets); rows share a prefill only when prompt and images are equal.

    Returns:
        a :class:`Rollout` with ``N = len(prompts) * num_return_sequences`` rows; ``P`` is the longest prompt
        and ``C`` the longest completion (``<= max_new_tokens``). Under greedy decoding a row's tokens do not
        depend on ``batch_size`` or on the other prompts (left padding is masked out).

    Raises:
        LLMTuneError: ``max_new_tokens < 1``, ``num_return_sequences < 1``, ``batch_size < 1``, no prompts, an
            empty prompt, or an invalid sampling setting (the key is named).
    """
    check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p)
    if max_new_tokens < 1:
        raise LLMTuneError(f"max_new_tokens must be >= 1 for rollouts (got {max_new_tokens})")
    if num_return_sequences < 1:
        raise LLMTuneError(f"num_generations / num_return_sequences must be >= 1 (got {num_return_sequences})")
    if batch_size is not None and batch_size < 1:
        raise LLMTuneError(f"rollout batch_size must be >= 1 (got {batch_size})")
    if not prompts:
        raise LLMTuneError("generate_rollouts: no prompts given")
    for i, r in enumerate(prompts):
        if len(r) == 0:
            raise LLMTuneError(f"generate_rollouts: prompt {i} is empty (0 tokens)")
    device = next(model.parameters()).device
    n = len(prompts) * num_return_sequences
    p = max(len(r) for r in prompts)
    engine = Engine(model, max_slots=min(n, batch_size or n), max_len=p + max_new_tokens, draw="inverse_cdf")
    params = SamplingParams(do_sample, temperature, top_k, top_p)
    stop = stop_id_list(eos_token_ids)
    take = getattr(model, "take_generation_images", None)   # QwenVL.generation_images: each row's images
    vision = (take(n) if take is not None else None) or [None] * n
    runs: list[list] = []   # consecutive equal prompts (GRPO passes each completion's prompt) share one prefill
    for r, v in zip((list(r) for r in prompts for _ in range(num_return_sequences)), vision):
        v = v or None
        if runs and runs[-1][0] == r and _same_images(runs[-1][2], v):
            runs[-1][1] += 1
        else:
            runs.append([r, 1, v])
    done = engine.run([Request(r, max_new_tokens, params, stop, generator, logprobs=return_logps, images=v)
                       for r, _, v in runs], num_return_sequences=[k for _, k, _ in runs])

    lengths = torch.tensor([len(c.tokens) for c in done], dtype=torch.long, device=device)
    c = int(lengths.max())
    rows = [list(r) for r in prompts for _ in range(num_return_sequences)]
    input_ids = torch.full((n, p + c), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros(n, p + c, dtype=torch.long, device=device)
    for i, (r, d) in enumerate(zip(rows, done)):
        input_ids[i, p - len(r):p] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, p - len(r):p] = 1
        input_ids[i, p:p + len(d.tokens)] = torch.tensor(d.tokens, dtype=torch.long)
    completion_mask = (torch.arange(c, device=device)[None, :] < lengths[:, None]).long()
    attention_mask[:, p:] = completion_mask
    logps = None
    if return_logps:
        logps = torch.zeros(n, c, dtype=torch.float32, device=device)
        for i, d in enumerate(done):
            logps[i, :len(d.logprobs)] = torch.tensor(d.logprobs, dtype=torch.float32)
    stopped = torch.tensor([d.finish_reason == "stop" for d in done], dtype=torch.bool, device=device)
    return Rollout(input_ids=input_ids, attention_mask=attention_mask, prompt_len=p,
                   completion_mask=completion_mask, logps=logps, truncated=~stopped, completion_lengths=lengths)


def _same_images(a: Optional[dict], b: Optional[dict]) -> bool:
    """Whether two rows' vision inputs (None or dicts of tensors) are the same, so the rows may share a prefill."""
    if a is b:
        return True
    if a is None or b is None or a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def completion_metrics(completion_lengths: torch.Tensor, truncated: torch.Tensor) -> dict[str, float]:
    """Length statistics of a step's completions under TRL's ``GRPOTrainer`` metric names.

    Args:
        completion_lengths: ``(N,)`` int tokens per completion (stop token included); pass all ranks' values
            (gathered) for the step's statistics.
        truncated: ``(N,)`` bool, True for completions without a stop token.

    Returns:
        ``completions/mean_length``, ``/min_length``, ``/max_length`` over all completions;
        ``completions/clipped_ratio`` the share of truncated ones; ``completions/mean_terminated_length``,
        ``/min_terminated_length``, ``/max_terminated_length`` over completions that stopped (0 when none did).
    """
    lengths = completion_lengths.float()
    term = lengths[~truncated.bool()]
    if term.numel() == 0:
        term = lengths.new_zeros(1)
    return {"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(truncated.float().mean()),
            "completions/mean_terminated_length": float(term.mean()),
            "completions/min_terminated_length": float(term.min()),
            "completions/max_terminated_length": float(term.max())}

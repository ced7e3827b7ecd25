"""Batched rollouts for online RL (GRPO, PPO): many prompts, several completions each, sampled log-probs.

All completions of a step are generated in batches of ``batch_size`` rows. Each batch is left-padded to its
longest prompt, decodes with a KV cache preallocated for ``prompt + max_new_tokens`` positions (written in
place, :class:`llmtune.models.transformer.KVCache`) and an attention mask buffer allocated once; a row that
emits a stop token stops there (its later positions hold ``pad_token_id``) and is dropped from the batch and
the cache, so a batch costs no more than its live rows. Each step projects only the last position to the
vocabulary. The logits processing (temperature, top-k, top-p) is :func:`llmtune.generation.process_logits`,
i.e. ``transformers.generate``'s order; the log-prob of each sampled token is read from the same logits.

Source: autoregressive sampling with a key/value cache as in ``transformers``' ``GenerationMixin._sample``;
the rollout layout (left-padded prompts, right-padded completions, a completion mask up to and including the
stop token, log-probs of ``logits / temperature``) is TRL's ``GRPOTrainer`` one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from llmtune.errors import LLMTuneError
from llmtune.generation import check_generation_args, new_kv_cache, process_logits

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


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _generate_batch(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, do_sample: bool,
                    temperature: float, top_k: int, top_p: float, eos: torch.Tensor, pad_token_id: int,
                    return_logps: bool, generator: Optional[torch.Generator]):
    """Decode one batch; returns ``(prompt_ids, prompt_mask, tokens, logps, lengths, stopped)``."""
    device = eos.device
    b = len(prompts)
    p = max(len(r) for r in prompts)
    ids = torch.full((b, p), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(b, p + max_new_tokens, dtype=torch.long, device=device)  # prompt + completion, once
    for i, r in enumerate(prompts):
        ids[i, p - len(r):] = torch.as_tensor(list(r), dtype=torch.long, device=device)
        mask[i, p - len(r):p] = 1
    prompt_mask = mask[:, :p].clone()
    tokens = torch.full((b, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros(b, max_new_tokens, dtype=torch.float32, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    stopped = torch.zeros(b, dtype=torch.bool, device=device)
    temp = float(temperature) if do_sample else 1.0

    active = torch.arange(b, device=device)  # original row of each live batch row
    next_pos = prompt_mask.sum(1)  # position id of each live row's next token
    hidden, cache = model(ids, attention_mask=mask[:, :p], past_key_values=new_kv_cache(model, p + max_new_tokens),
                          use_cache=True)
    for step in range(max_new_tokens):
        logits = model.lm_head(hidden[:, -1]).float()
        scores = process_logits(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        if do_sample:
            nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        tokens[active, step] = nxt
        lengths[active] = step + 1
        if return_logps:
            lp = torch.log_softmax(logits / temp if temp != 1.0 else logits, dim=-1)
            logps[active, step] = lp.gather(1, nxt[:, None]).squeeze(1)
        done = torch.isin(nxt, eos) if eos.numel() else torch.zeros_like(nxt, dtype=torch.bool)
        stopped[active] = done
        if step == max_new_tokens - 1:
            break
        keep = ~done
        n_keep = int(keep.sum())
        if n_keep == 0:
            break
        if n_keep < active.shape[0]:
            idx = keep.nonzero().squeeze(1)
            cache.reorder(idx)
            mask, nxt, active, next_pos = mask[idx], nxt[idx], active[idx], next_pos[idx]
        mask[:, p + step] = 1
        hidden, cache = model(nxt[:, None], attention_mask=mask[:, : p + step + 1], position_ids=next_pos[:, None],
                              past_key_values=cache, use_cache=True)
        next_pos = next_pos + 1
    return ids, prompt_mask, tokens, logps, lengths, stopped


def generate_rollouts(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                      do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                      eos_token_ids: Optional[Iterable[int] | int] = None, pad_token_id: int = 0,
                      num_return_sequences: int = 1, batch_size: Optional[int] = None, return_logps: bool = True,
                      generator: Optional[torch.Generator] = None) -> Rollout:
    """Generate ``num_return_sequences`` completions of every prompt, in batches, with the sampled log-probs.

    Args:
        model: a :class:`llmtune.models.transformer.Transformer` (LoRA-wrapped or not; its active adapters are
            the policy). Runs in eval mode under ``torch.no_grad`` (the training flag is restored).
        prompts: token ids of each prompt (a list of int lists, unpadded, each non-empty).
        max_new_tokens: the most tokens per completion (>= 1).
        do_sample: sample from the processed distribution; False = greedy (argmax).
        temperature, top_p, top_k: sampling settings (``transformers.generate`` semantics; see
            :func:`llmtune.generation.process_logits`).
        eos_token_ids: ids that end a completion (kept in it, inside ``completion_mask``): the tokenizer's eos
            and the template's end-of-turn ids. ``None`` or empty = every completion runs to ``max_new_tokens``.
        pad_token_id: fills left padding of prompts and positions after a completion's stop token.
        num_return_sequences: completions per prompt (GRPO's ``num_generations``), consecutive in the output.
        batch_size: rows (prompt x completion) decoded together; ``None`` = all ``N`` rows in one batch.
        return_logps: compute :attr:`Rollout.logps` (one ``log_softmax`` over the vocabulary per step).
        generator: a :class:`torch.Generator` on the model's device for reproducible sampling.

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
    device = _model_device(model)
    if eos_token_ids is None:
        eos_list: list[int] = []
    elif isinstance(eos_token_ids, int):
        eos_list = [eos_token_ids]
    else:
        eos_list = sorted({int(i) for i in eos_token_ids if i is not None})
    eos = torch.tensor(eos_list, dtype=torch.long, device=device)
    rows = [list(p) for p in prompts for _ in range(num_return_sequences)]
    n = len(rows)
    bs = n if batch_size is None else batch_size

    was_training = model.training
    model.eval()
    try:
        parts = [_generate_batch(model, rows[s:s + bs], max_new_tokens, do_sample, temperature, top_k, top_p,
                                 eos, pad_token_id, return_logps, generator) for s in range(0, n, bs)]
    finally:
        model.train(was_training)

    p = max(len(r) for r in rows)
    c = max(int(part[4].max()) for part in parts)
    input_ids = torch.full((n, p + c), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros(n, p + c, dtype=torch.long, device=device)
    logps = torch.zeros(n, c, dtype=torch.float32, device=device) if return_logps else None
    lengths = torch.cat([part[4] for part in parts])
    stopped = torch.cat([part[5] for part in parts])
    row = 0
    for ids, pmask, toks, lps, _, _ in parts:
        b, pb = ids.shape
        input_ids[row:row + b, p - pb:p] = ids
        attention_mask[row:row + b, p - pb:p] = pmask
        input_ids[row:row + b, p:] = toks[:, :c]
        if logps is not None:
            logps[row:row + b] = lps[:, :c]
        row += b
    completion_mask = (torch.arange(c, device=device)[None, :] < lengths[:, None]).long()
    attention_mask[:, p:] = completion_mask
    if logps is not None:
        logps = logps * completion_mask
    return Rollout(input_ids=input_ids, attention_mask=attention_mask, prompt_len=p,
                   completion_mask=completion_mask, logps=logps, truncated=~stopped, completion_lengths=lengths)


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

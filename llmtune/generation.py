"""``generate``: continuations of a batch of prompts, on the generation engine (:mod:`llmtune.engine`).

Prompts come as a ``(batch, prompt_len)`` tensor with an attention mask (left or right padding: only the tokens
with mask 1 are used, in order); each row becomes one request of one :class:`llmtune.engine.Engine` with as
many slots as rows, so rows that produce a stop token leave the batch at once. Token selection (repetition
penalty, temperature, top-k, top-p) is :mod:`llmtune.sampling`, in ``transformers.generate``'s order; greedy
output equals ``transformers``' greedy output.

The logits processors are re-exported here (``from llmtune.generation import process_logits`` keeps working);
the chat helpers live in :mod:`llmtune.chat` (``chat_stop_ids``, ``encode_chat_prompt``, ``stream_reply``,
``generate_reply``), also importable from here.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from llmtune.engine import Engine, Request
from llmtune.sampling import (SamplingParams, apply_repetition_penalty, apply_temperature, apply_top_k,  # noqa: F401
                              apply_top_p, check_generation_args, process_logits, stop_id_list)

__all__ = [
    "generate",
    "generate_steps",
    "process_logits",
    "check_generation_args",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "chat_stop_ids",
    "encode_chat_prompt",
    "generate_reply",
    "stream_reply",
]


def _prompt_rows(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> list[list[int]]:
    """Each row's tokens (mask > 0), validated; raises ValueError for malformed tensors."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError("generate: the prompt is empty (input_ids has 0 columns)")
    if attention_mask is None:
        return input_ids.tolist()
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                         f"{tuple(input_ids.shape)}")
    rows = [[t for t, m in zip(ids, ms) if m > 0] for ids, ms in zip(input_ids.tolist(), attention_mask.tolist())]
    if any(not r for r in rows):
        raise ValueError("generate: a prompt row has no tokens (attention_mask all 0)")
    return rows


def generate_steps(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   max_new_tokens: int = 512, do_sample: bool = False, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                   eos_token_ids: Optional[Iterable[int] | int] = None, pad_token_id: int = 0,
                   generator: Optional[torch.Generator] = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Decode step by step; yield ``(tokens, alive)`` after each step (see :func:`generate` for args).

    Yields:
        ``tokens``: ``(batch,)`` int64 on the model's device, this step's token of every row
        (``pad_token_id`` for a row that already stopped at an earlier step); ``alive``: ``(batch,)`` bool, True
        for the rows that produced a real token at this step (including the stop token that ends them).

    The engine runs the model in eval mode under :func:`torch.inference_mode` (the training flag is restored
    after every step). Yielded tensors are ordinary (non-inference) tensors.
    """
    check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty)
    prompts = _prompt_rows(input_ids, attention_mask)
    if max_new_tokens == 0:
        return
    device = next(model.parameters()).device
    b = len(prompts)
    engine = Engine(model, max_slots=b, max_len=max(len(p) for p in prompts) + max_new_tokens)
    params = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty)
    stop = stop_id_list(eos_token_ids)
    row_of = {engine.add_request(Request(p, max_new_tokens, params, stop, generator)): i
              for i, p in enumerate(prompts)}
    for events in engine.iter_steps():
        tokens = torch.full((b,), pad_token_id, dtype=torch.long, device=device)
        alive = torch.zeros(b, dtype=torch.bool, device=device)
        idx = torch.tensor([row_of[e.request_id] for e in events], device=device)
        tokens[idx] = torch.tensor([e.token for e in events], device=device)
        alive[idx] = True
        yield tokens, alive


def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             max_new_tokens: int = 512, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, repetition_penalty: float = 1.0,
             eos_token_ids: Optional[Iterable[int] | int] = None, pad_token_id: int = 0,
             streamer: Optional[Callable[[list[int]], Any]] = None,
             generator: Optional[torch.Generator] = None, return_lengths: bool = False):
    """Generate continuations of a batch of prompts on the generation engine (:class:`llmtune.engine.Engine`).

    Args:
        model: a :class:`llmtune.models.transformer.Transformer` (LoRA-wrapped or not; see
            :class:`llmtune.engine.Engine` for what the engine calls).
        input_ids: ``(batch, prompt_len)`` int64 prompts, padded on either side (a row's prompt is its
            tokens where ``attention_mask`` is 1, in order).
        attention_mask: ``(batch, prompt_len)``, 1 for tokens, 0 for padding; ``None`` = all ones.
        max_new_tokens: the most tokens generated per row.
        do_sample: sample from the processed distribution; False = greedy (argmax).
        temperature: divides the logits when sampling (> 0).
        top_k: keep the ``top_k`` most likely tokens when sampling (0 = off).
        top_p: nucleus mass when sampling ((0, 1]; 1.0 = off).
        repetition_penalty: CTRL penalty over the prompt (non-padding) and generated tokens, applied in
            greedy decoding too (1.0 = off).
        eos_token_ids: ids that end a row (the stop token itself is kept in the output, as in
            ``transformers``); ``None`` = never stop early.
        pad_token_id: fills a row's positions after its stop token.
        streamer: called after every step that row 0 is still alive with ``[token_id]`` (a list of row
            0's new ids, the stop token included); for chat display use :func:`stream_reply`.
        generator: a :class:`torch.Generator` for reproducible sampling (all rows draw from it, in one call
            per step).
        return_lengths: also return the number of generated tokens of each row.

    Returns:
        ``tokens``: ``(batch, new_len)`` int64 on the model's device, ``new_len <= max_new_tokens`` the
        longest row (generation stops once every row has hit a stop id); positions after a row's stop
        token hold ``pad_token_id``. With ``return_lengths``: ``(tokens, lengths)``, ``lengths`` ``(batch,)``
        int64 counting each row's generated tokens including its stop token (``tokens[i, :lengths[i]]``
        is row ``i``'s response).

    Raises:
        LLMTuneError: an invalid sampling setting (``temperature <= 0`` when sampling, ``top_p`` outside
            (0, 1], ``top_k < 0``, ``repetition_penalty <= 0``, ``max_new_tokens < 0``).
        ValueError: malformed tensors (wrong rank/shape, an all-padding row).

    Source: the decoding loop and logits processors of Hugging Face ``transformers.generate``
    (``GenerationMixin._sample``); the processing order is documented in :func:`process_logits`.
    """
    steps, alive = [], []
    for tok, live in generate_steps(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                    do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty, eos_token_ids=eos_token_ids,
                                    pad_token_id=pad_token_id, generator=generator):
        steps.append(tok)
        alive.append(live)
        if streamer is not None and bool(live[0]):
            streamer([int(tok[0])])
    device = next(model.parameters()).device
    b = input_ids.shape[0]
    if steps:
        tokens = torch.stack(steps, dim=1)
        lengths = torch.stack(alive, dim=1).sum(dim=1)
    else:
        tokens = torch.empty(b, 0, dtype=torch.long, device=device)
        lengths = torch.zeros(b, dtype=torch.long, device=device)
    return (tokens, lengths) if return_lengths else tokens


def __getattr__(name: str) -> Any:
    """The chat helpers moved to :mod:`llmtune.chat`; importing them from here keeps working."""
    if name in ("chat_stop_ids", "encode_chat_prompt", "generate_reply", "stream_reply"):
        import llmtune.chat as chat

        return getattr(chat, name)
    raise AttributeError(f"module 'llmtune.generation' has no attribute {name!r}")

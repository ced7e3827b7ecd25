"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p, repetition penalty.

The logits processing follows the semantics of Hugging Face ``transformers``' logits processors, in
the same order as its ``generate``: repetition penalty (Keskar et al., 2019, CTRL, section 4.1), then,
when sampling, temperature, top-k (Fan et al., 2018) and top-p / nucleus (Holtzman et al., 2020).
Greedy decoding is the argmax of the (repetition-penalised) logits.

Prompts are batched with left padding (``attention_mask`` 0 on the left); right-padded prompts are
moved to the left first. The KV cache is preallocated for prompt + ``max_new_tokens`` positions and
written in place. Only the last position is projected to the vocabulary
(``model.lm_head(hidden[:, -1])``); rows that have produced a stop token are dropped from the KV cache
(:meth:`llmtune.models.transformer.KVCache.reorder`), so a batch costs no more than its live rows.

Chat helpers (:func:`generate_reply`, :func:`stream_reply`) build the prompt with a template from
``llmtune.data.templates`` (or the tokenizer's own ``chat_template``) and stop on the tokenizer's eos ids
plus the template's end-of-turn ids (``<|im_end|>`` for ChatML).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "generate",
    "generate_steps",
    "new_kv_cache",
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


# ---------------------------------------------------------------------------------------------------
# logits processing (pure functions on (batch, vocab) tensors)
# ---------------------------------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise tokens already present in the sequence (CTRL, Keskar et al. 2019, sec. 4.1).

    For every token ``v`` with ``seen[b, v]``: ``x / penalty`` if ``x >= 0`` else ``x * penalty``
    (as ``transformers.RepetitionPenaltyLogitsProcessor``; ``penalty > 1`` discourages repeats).

    Args:
        logits: ``(batch, vocab)`` float scores.
        seen: ``(batch, vocab)`` bool, True for tokens of the prompt (non-padding) or generated so far.
        penalty: the penalty (> 0); 1.0 returns ``logits`` unchanged.

    Returns:
        ``(batch, vocab)`` new tensor (the input is not modified).
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` (``(batch, vocab)``; temperature > 0, 1.0 is a no-op)."""
    if temperature == 1.0:
        return logits
    return logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest scores per row, set the rest to ``-inf`` (Fan et al., 2018).

    Ties with the k-th score are kept (as ``transformers.TopKLogitsWarper``). ``top_k <= 0`` or
    ``>= vocab`` is a no-op. Input/output ``(batch, vocab)``.
    """
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al., 2020): keep the smallest set of most likely tokens whose
    probability mass reaches ``top_p``; the rest get ``-inf``.

    Exactly ``transformers.TopPLogitsWarper``: sort ascending, cumulative softmax, remove tokens whose
    cumulative probability is ``<= 1 - top_p``, always keep the ``min_tokens_to_keep`` most likely.
    ``top_p >= 1`` is a no-op. Input/output ``(batch, vocab)``.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1.0 - top_p)
    remove_sorted[..., -min_tokens_to_keep:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, seen: Optional[torch.Tensor] = None, *, do_sample: bool = False,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   repetition_penalty: float = 1.0) -> torch.Tensor:
    """All processing of one step's next-token scores, in ``transformers.generate``'s order.

    repetition penalty (greedy and sampling) -> if ``do_sample``: temperature -> top-k -> top-p.

    Args:
        logits: ``(batch, vocab)`` scores (any float dtype; computed as given).
        seen: ``(batch, vocab)`` bool mask of tokens in prompt + generated text (needed only when
            ``repetition_penalty != 1``).
        do_sample, temperature, top_k, top_p, repetition_penalty: see :func:`generate`.

    Returns:
        ``(batch, vocab)`` processed scores (``-inf`` for filtered tokens); ``softmax`` of it is the
        sampling distribution.
    """
    if repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("process_logits: repetition_penalty needs the `seen` token mask")
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if do_sample:
        logits = apply_temperature(logits, temperature)
        logits = apply_top_k(logits, top_k)
        logits = apply_top_p(logits, top_p)
    return logits


# ---------------------------------------------------------------------------------------------------
# the decoding loop
# ---------------------------------------------------------------------------------------------------
def check_generation_args(max_new_tokens: int = 512, do_sample: bool = False, temperature: float = 1.0,
                          top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0) -> None:
    """Validate generation settings (see :func:`generate`).

    Raises:
        LLMTuneError: ``max_new_tokens < 0``, ``temperature <= 0`` while sampling, ``top_k < 0``,
            ``top_p`` outside (0, 1], or ``repetition_penalty <= 0``; the message names the key.
    """
    from llmtune.errors import LLMTuneError

    if max_new_tokens < 0:
        raise LLMTuneError(f"max_new_tokens must be >= 0 (got {max_new_tokens})")
    if do_sample and not temperature > 0:
        raise LLMTuneError(f"temperature must be > 0 when sampling (got {temperature}); "
                           "for deterministic output use do_sample=False")
    if top_k < 0:
        raise LLMTuneError(f"top_k must be >= 0 (0 disables it; got {top_k})")
    if not 0.0 < top_p <= 1.0:
        raise LLMTuneError(f"top_p must be in (0, 1] (got {top_p})")
    if not repetition_penalty > 0:
        raise LLMTuneError(f"repetition_penalty must be > 0 (1.0 disables it; got {repetition_penalty})")


def _to_left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's tokens (mask > 0) to the right end; padding (id kept) goes to the left."""
    if bool((attention_mask[:, -1] > 0).all()):
        return input_ids, attention_mask
    keep = attention_mask > 0
    # stable sort puts padding (False -> 0) first and keeps token order
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def _eos_tensor(eos_token_ids: Optional[Iterable[int] | int], device: torch.device) -> torch.Tensor:
    if eos_token_ids is None:
        ids: list[int] = []
    elif isinstance(eos_token_ids, int):
        ids = [eos_token_ids]
    else:
        ids = sorted({int(i) for i in eos_token_ids if i is not None})
    return torch.tensor(ids, dtype=torch.long, device=device)


def new_kv_cache(model: nn.Module, max_len: int) -> Any:
    """A :class:`~llmtune.models.transformer.KVCache` preallocated for ``max_len`` positions, or ``None``.

    ``None`` (the model then makes its own growing cache) when ``model.config`` has no ``num_hidden_layers``.
    """
    from llmtune.models.transformer import KVCache

    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return None if n is None else KVCache(int(n), max_len=max_len)


def _next_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache: Any):
    out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    hidden, cache = out
    return model.lm_head(hidden[:, -1]).float(), cache


def generate_steps(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   max_new_tokens: int = 512, do_sample: bool = False, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                   eos_token_ids: Optional[Iterable[int] | int] = None, pad_token_id: int = 0,
                   generator: Optional[torch.Generator] = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Decode step by step; yield ``(tokens, alive)`` after each step (see :func:`generate` for args).

    Yields:
        ``tokens``: ``(batch,)`` int64, this step's token of every row (``pad_token_id`` for a row that
        already stopped at an earlier step); ``alive``: ``(batch,)`` bool, True for the rows that produced
        a real token at this step (including the stop token that ends them).

    The model runs under :func:`torch.inference_mode` and in eval mode (its training flag is restored
    when the iterator is exhausted or closed). Yielded tensors are ordinary (non-inference) tensors.
    """
    check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    b, t = input_ids.shape
    if t == 0:
        raise ValueError("generate: the prompt is empty (input_ids has 0 columns)")
    mask = (torch.ones_like(input_ids) if attention_mask is None
            else attention_mask.to(device=device, dtype=torch.long))
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    if bool((mask.sum(1) == 0).any()):
        raise ValueError("generate: a prompt row has no tokens (attention_mask all 0)")
    mask = (mask > 0).long()
    input_ids, mask = _to_left_padding(input_ids, mask)
    eos = _eos_tensor(eos_token_ids, device)
    if max_new_tokens == 0:
        return

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits, cache = _next_logits(model, input_ids, mask, new_kv_cache(model, t + max_new_tokens))
            vocab = logits.shape[-1]
            seen = None
            if repetition_penalty != 1.0:
                # tokens >= vocab (embedding larger than lm_head) and padding go to a dropped extra column
                idx = torch.where(mask > 0, input_ids.clamp(max=vocab), vocab)
                seen = torch.zeros(b, vocab + 1, dtype=torch.bool, device=device)
                seen.scatter_(1, idx, True)
                seen = seen[:, :vocab].contiguous()
        active = torch.arange(b, device=device)  # original row of each live cache row
        for step in range(max_new_tokens):
            with torch.inference_mode():
                scores = process_logits(logits, None if seen is None else seen[active], do_sample=do_sample,
                                        temperature=temperature, top_k=top_k, top_p=top_p,
                                        repetition_penalty=repetition_penalty)
                if do_sample:
                    probs = scores.softmax(dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                else:
                    nxt = scores.argmax(dim=-1)
                tokens = torch.full((b,), pad_token_id, dtype=torch.long, device=device)
                tokens[active] = nxt
                alive = torch.zeros(b, dtype=torch.bool, device=device)
                alive[active] = True
                if seen is not None:
                    seen[active, nxt] = True
                done = torch.isin(nxt, eos) if eos.numel() else torch.zeros_like(nxt, dtype=torch.bool)
            yield tokens.clone(), alive.clone()
            if step == max_new_tokens - 1:
                break
            with torch.inference_mode():
                keep = ~done
                n_keep = int(keep.sum())
                if n_keep == 0:
                    break
                if n_keep < active.shape[0]:
                    idx = keep.nonzero().squeeze(1)
                    cache.reorder(idx)
                    mask, nxt, active = mask[idx], nxt[idx], active[idx]
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                logits, cache = _next_logits(model, nxt[:, None], mask, cache)
    finally:
        model.train(was_training)


def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             max_new_tokens: int = 512, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, repetition_penalty: float = 1.0,
             eos_token_ids: Optional[Iterable[int] | int] = None, pad_token_id: int = 0,
             streamer: Optional[Callable[[list[int]], Any]] = None,
             generator: Optional[torch.Generator] = None, return_lengths: bool = False):
    """Generate continuations of a batch of prompts with the KV cache.

    Args:
        model: a :class:`llmtune.models.transformer.Transformer` (or anything with its
            ``forward(input_ids, attention_mask, past_key_values, use_cache) -> (hidden, cache)`` and
            ``lm_head``; LoRA-wrapped models included).
        input_ids: ``(batch, prompt_len)`` int64 prompts, left-padded (right padding is moved left).
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
        generator: a :class:`torch.Generator` for reproducible sampling.
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


# ---------------------------------------------------------------------------------------------------
# chat helpers
# ---------------------------------------------------------------------------------------------------
#: end-of-turn tokens of common chat formats, used only when no llmtune template is given and the
#: tokenizer's ``chat_template`` mentions them (ChatML, Llama 3, Phi-3, Gemma).
_KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _tokenizer_eos_ids(tokenizer: Any) -> list[int]:
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is None:
        ids = [getattr(tokenizer, "eos_token_id", None)]
    if isinstance(ids, int):
        ids = [ids]
    return [int(i) for i in ids if i is not None]


def chat_stop_ids(tokenizer: Any, template: Any = None) -> list[int]:
    """Token ids that end an assistant reply: the tokenizer's eos ids plus the template's end-of-turn ids.

    Args:
        tokenizer: an :class:`llmtune.tokenizer.Tokenizer` (uses ``eos_token_ids``, else ``eos_token_id``).
        template: an ``llmtune.data.templates`` template (uses ``stop_token_ids``) or ``None``; with
            ``None``, the end-of-turn tokens of known formats (``<|im_end|>``, ``<|eot_id|>``, ...) that
            appear in the tokenizer's ``chat_template`` are added.

    Returns:
        sorted list of distinct int ids (may be empty).
    """
    ids = set(_tokenizer_eos_ids(tokenizer))
    if template is not None:
        ids.update(int(i) for i in (getattr(template, "stop_token_ids", None) or []))
    else:
        chat_template = getattr(tokenizer, "chat_template", None) or ""
        if not isinstance(chat_template, str):
            chat_template = str(chat_template)
        for tok in _KNOWN_END_OF_TURN:
            if tok in chat_template:
                tid = tokenizer.convert_tokens_to_ids(tok)
                if isinstance(tid, int) and tid >= 0 and tid != getattr(tokenizer, "unk_token_id", None):
                    ids.add(tid)
    return sorted(ids)


def encode_chat_prompt(tokenizer: Any, template: Any, messages: Sequence[dict],
                       system: Optional[str] = None, tools: Optional[Any] = None) -> list[int]:
    """Token ids of a chat prompt ending with the assistant header (ready for generation).

    Args:
        tokenizer: an :class:`llmtune.tokenizer.Tokenizer`.
        template: an ``llmtune.data.templates`` template (its ``encode_prompt(messages, system, tools)``)
            or ``None`` to render the tokenizer's own ``chat_template`` with ``add_generation_prompt=True``.
        messages: ``[{"role": "user"|"assistant"|"system", "content": str}, ...]`` ending with a user turn.
        system: a system prompt (overrides none given in ``messages``; ``None`` = the template default).
        tools: tool descriptions passed to the template (optional).

    Returns:
        list of int token ids.

    Raises:
        LLMTuneError: no template given and the tokenizer has no ``chat_template``.
    """
    from llmtune.errors import LLMTuneError

    messages = [dict(m) for m in messages]
    if template is not None:
        return list(template.encode_prompt(messages, system=system, tools=tools))
    if not getattr(tokenizer, "chat_template", None):
        raise LLMTuneError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} has no chat_template: "
            "pass --template (e.g. --template chatml, llama3, qwen)")
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}] + messages
    kw = {} if tools is None else {"tools": tools}
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)
    return list(tokenizer.encode(text, add_special_tokens=False))


def stream_reply(model: nn.Module, tokenizer: Any, template: Any, messages: Sequence[dict],
                 system: Optional[str] = None, tools: Optional[Any] = None, **gen: Any) -> Iterator[str]:
    """Generate the assistant's reply to a chat and yield its text piece by piece as tokens arrive.

    The prompt is :func:`encode_chat_prompt`; generation stops on :func:`chat_stop_ids` (the stop
    token is not part of the text). Pieces are yielded only when they decode to whole characters (a
    multi-byte character split across tokens waits for its last token), so ``"".join(pieces)`` equals
    ``tokenizer.decode(reply_ids, skip_special_tokens=True)``.

    Args:
        model, tokenizer, template, messages, system, tools: as :func:`encode_chat_prompt`.
        **gen: keyword arguments of :func:`generate` (``max_new_tokens``, ``do_sample``, ``temperature``,
            ``top_k``, ``top_p``, ``repetition_penalty``, ``generator``; ``eos_token_ids`` overrides
            the stop ids).

    Yields:
        str pieces of the reply.
    """
    prompt = encode_chat_prompt(tokenizer, template, messages, system=system, tools=tools)
    stop = gen.pop("eos_token_ids", None)
    stop = chat_stop_ids(tokenizer, template) if stop is None else list(stop)
    stop_set = set(stop)
    gen.setdefault("pad_token_id", stop[0] if stop else 0)
    ids = torch.tensor([prompt], dtype=torch.long)
    reply: list[int] = []
    emitted = ""
    for tokens, alive in generate_steps(model, ids, eos_token_ids=stop, **gen):
        if not bool(alive[0]):
            break
        tid = int(tokens[0])
        if tid in stop_set:
            break
        reply.append(tid)
        text = tokenizer.decode(reply, skip_special_tokens=True)
        # wait while the text ends in a partial character, or (rarely) is not prefix-stable
        if text.endswith("\ufffd") or not text.startswith(emitted):
            continue
        piece, emitted = text[len(emitted):], text
        if piece:
            yield piece
    text = tokenizer.decode(reply, skip_special_tokens=True)
    if text.startswith(emitted) and len(text) > len(emitted):
        yield text[len(emitted):]


def generate_reply(model: nn.Module, tokenizer: Any, template: Any, messages: Sequence[dict],
                   system: Optional[str] = None, tools: Optional[Any] = None, **gen: Any) -> str:
    """The assistant's whole reply (str) to ``messages``; the non-streaming form of :func:`stream_reply`."""
    return "".join(stream_reply(model, tokenizer, template, messages, system=system, tools=tools, **gen))

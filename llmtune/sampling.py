"""Next-token selection: the logits processors and the per-row sampler of the generation engine.

The processing follows the semantics of Hugging Face ``transformers``' logits processors, in the same order as
its ``generate``: repetition penalty (Keskar et al., 2019, CTRL, section 4.1), then, when sampling,
temperature, top-k (Fan et al., 2018) and top-p / nucleus (Holtzman et al., 2020). Greedy decoding is the
argmax of the (repetition-penalised) logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

from llmtune.errors import LLMTuneError

__all__ = ["SamplingParams", "apply_repetition_penalty", "apply_temperature", "apply_top_k", "apply_top_p",
           "process_logits", "check_generation_args", "select_tokens", "stop_id_list"]


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
        do_sample, temperature, top_k, top_p, repetition_penalty: see :class:`SamplingParams`.

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
def check_generation_args(max_new_tokens: int = 512, do_sample: bool = False, temperature: float = 1.0,
                          top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0) -> None:
    """Validate generation settings (see :func:`llmtune.generation.generate`).

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


@dataclass(frozen=True)
class SamplingParams:
    """How one row picks its next token (``transformers.generate``'s settings and semantics).

    Attributes:
        do_sample: sample from the processed distribution; False = greedy (argmax of the penalised logits).
        temperature: divides the logits when sampling (> 0).
        top_k: keep the ``top_k`` most likely tokens when sampling (0 = off).
        top_p: nucleus mass when sampling, in (0, 1] (1.0 = off).
        repetition_penalty: CTRL penalty over the prompt and generated tokens, greedy too (1.0 = off).

    Hashable: rows with equal settings are processed together, with Python-scalar settings, so their scores are
    bit-equal to :func:`process_logits` on the row alone.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def check(self, max_new_tokens: int = 1) -> None:
        """Raise :class:`llmtune.errors.LLMTuneError` naming the bad key (:func:`check_generation_args`)."""
        check_generation_args(max_new_tokens, self.do_sample, self.temperature, self.top_k, self.top_p,
                              self.repetition_penalty)

    @property
    def logprob_temperature(self) -> float:
        """The temperature of the reported log-probs: ``temperature`` when sampling, else 1 (TRL's convention)."""
        return float(self.temperature) if self.do_sample else 1.0

    def kwargs(self) -> dict:
        """The settings as :func:`process_logits` keyword arguments."""
        return dict(do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                    repetition_penalty=self.repetition_penalty)


def _groups(keys: list) -> list[tuple[object, list[int]]]:
    """``[(key, [row, ...]), ...]`` in order of first appearance."""
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return list(out.items())


def inverse_cdf_draw(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of ``probs`` by inversion of its cumulative distribution.

    ``probs``: ``(rows, vocab)`` non-negative float weights (each row with a positive sum; need not sum to 1).
    Returns ``(rows,)`` int64: the first index ``i`` with ``cdf[i] > u``, ``u = U * cdf[-1]``, ``U ~ Uniform[0, 1)``
    one float64 draw per row from ``generator``, ``cdf`` the float64 running sum. Index ``i`` is drawn with
    probability ``probs[i] / sum(probs)`` (inverse transform sampling; Devroye, Non-Uniform Random Variate
    Generation, 1986, ch. II.2), and a zero-weight index never (its interval is empty; the ``U * cdf[-1] ==
    cdf[-1]`` rounding case maps to the last positive index). One uniform per row instead of the exponential
    per vocabulary entry that ``torch.multinomial`` draws (13 ns each on this CPU: 5 ms a step for 8 rows of a
    49,152-token vocabulary), so the draws differ from ``torch.multinomial``'s for the same seed: rollouts use
    it, ``generate`` keeps ``transformers.generate``'s draw.
    """
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=generator, device=probs.device) * total
    idx = torch.searchsorted(cdf, u, right=True)
    return torch.minimum(idx, torch.searchsorted(cdf, total)).squeeze(1)


def _draw(scores: torch.Tensor, generators: Optional[list], draw: str = "multinomial") -> torch.Tensor:
    """One draw per row of ``softmax(scores)`` (``torch.multinomial``, or :func:`inverse_cdf_draw` for
    ``draw="inverse_cdf"``), rows sharing a generator drawn together."""
    probs = scores.softmax(dim=-1)
    one = (lambda p, g: torch.multinomial(p, 1, generator=g).squeeze(1)) if draw == "multinomial" else inverse_cdf_draw
    gens = [None] * probs.shape[0] if generators is None else generators
    groups = _groups([id(g) for g in gens])
    if len(groups) == 1:
        return one(probs, gens[0])
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    for _, rows in groups:
        idx = torch.tensor(rows, device=probs.device)
        out[idx] = one(probs[idx], gens[rows[0]])
    return out


def select_tokens(logits: torch.Tensor, params: list, seen: Optional[torch.Tensor] = None,
                  generators: Optional[list] = None, draw: str = "multinomial") -> torch.Tensor:
    """Each row's next token under its own :class:`SamplingParams`.

    Args:
        logits: ``(rows, vocab)`` float scores of the next position.
        params: one :class:`SamplingParams` per row.
        seen: ``(rows, vocab)`` bool, tokens of each row's prompt and output (needed only by rows with a
            repetition penalty).
        generators: one :class:`torch.Generator` (or None = the global generator) per row; rows sharing one
            generator draw with one ``torch.multinomial`` call, in row order.
        draw: ``"multinomial"`` (``transformers.generate``'s draw) or ``"inverse_cdf"``
            (:func:`inverse_cdf_draw`: the same distribution, cheaper, different draws for a seed).

    Returns:
        ``(rows,)`` int64 token ids. Rows with equal settings are processed as one batch with the scalar
        processors, so a single row's draw is exactly ``transformers.generate``'s.
    """
    groups = _groups(list(params))
    if len(groups) == 1:
        p = params[0]
        scores = process_logits(logits, seen if p.repetition_penalty != 1.0 else None, **p.kwargs())
        return _draw(scores, generators, draw) if p.do_sample else scores.argmax(dim=-1)
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for p, rows in groups:
        idx = torch.tensor(rows, device=logits.device)
        out[idx] = select_tokens(logits[idx], [p] * len(rows), None if seen is None else seen[idx],
                                 None if generators is None else [generators[i] for i in rows], draw)
    return out


def eos_id_list(*values: Any, where: str = "") -> list[int]:
    """Distinct token ids in first-seen order from ``values``, each None, one id, or an iterable of ids (None
    entries skipped): the one reading of every eos/stop list (``eos_token_id`` of ``config.json`` and
    ``generation_config.json``, which is an int or a list; a tokenizer's ``eos_token_ids``; a template's
    ``stop_token_ids``). The first id stays first (``config.json``'s primary eos).

    Raises:
        LLMTuneError: an entry that is not a token id, naming the value and ``where`` it came from.
    """
    out: list[int] = []
    for value in values:
        if value is None:
            continue
        items = [value] if isinstance(value, (int, str)) or not hasattr(value, "__iter__") else value
        for item in items:
            if item is None:
                continue
            try:
                i = int(item)
            except (TypeError, ValueError):
                raise LLMTuneError(f"eos_token_id: {value!r}{where} is not a token id or a list of ids; fix "
                                   "that file") from None
            if i not in out:
                out.append(i)
    return out


def stop_id_list(eos_token_ids: Optional[Iterable[int] | int]) -> list[int]:
    """Sorted distinct stop ids from ``None`` (none), one int, or an iterable of ints (None entries skipped)."""
    return sorted(eos_id_list(eos_token_ids))

"""The generation engine: prefill, decode over a slot KV cache, rows joining and leaving, per-row sampling.

Every caller that produces tokens drives this one loop: :func:`llmtune.generation.generate` (and so
predict), chat (:mod:`llmtune.chat`), PPO/GRPO rollouts (:mod:`llmtune.rollout`) and a serving scheduler.

* **Slots.** :class:`SlotKVCache` preallocates, per layer, key and value buffers of ``(max_slots, kv_heads,
  max_len, head_dim)``. A running sequence owns one slot; its tokens sit at positions ``0..length-1`` of it
  (no padding anywhere). The live rows are always the slots ``0..n-1``: when a row finishes, the last live
  row's cache is moved into its slot, so a decode step attends over plain views of the buffers.
* **Prefill.** Requests that join are packed into one row (segment ids ``2, 3, ...``: the model's
  segment-aware attention keeps them apart, positions restart per segment) and each token's keys and values
  are written straight into its slot(s). A prefix-shared group (:meth:`Engine.add_group`, GRPO's
  ``num_generations``) prefills its prompt once and writes it into all of its ``n`` slots. A prompt with images
  (:attr:`Request.images`) is prefilled alone in its row, and the model's M-RoPE offset for it becomes its
  slots' :attr:`SlotKVCache.offsets` (copied with the keys when slots move), which the model adds at decode.
* **Decode.** One forward over all live rows, one token each, with per-row position ids (the row's length)
  and, when lengths differ, a ``(n, 1, 1, L)`` mask hiding each row's unused tail.
* **Per row**: :class:`~llmtune.sampling.SamplingParams`, stop ids, ``max_new_tokens``, a generator or seed,
  log-probs of the sampled tokens (and the top-k log-probs), and an ``adapter`` name. A model with LoRA
  adapters runs each row with its own (:func:`llmtune.peft.row_adapters`: rows of different adapters and of
  none decode in one forward, the base product once); another model gets the names as
  ``model(..., adapters=[one per input row])`` when any row has one. A prefill packs the prompts of one adapter.

Step API (what a scheduler drives): :meth:`Engine.add_request` / :meth:`Engine.add_group` queue work,
:meth:`Engine.step` admits queued rows into free slots (within ``max_prefill_tokens``), decodes one token for
every running row and returns one :class:`TokenEvent` per row, and :meth:`Engine.cancel` frees a row at once.
:meth:`Engine.run` is the batch call (queue everything, step until done).

Source: the static KV cache and decode loop of gpt-fast / ``transformers.StaticCache``; continuous batching
(Orca, Yu et al., OSDI 2022) with slots as in vLLM's scheduler; token selection as ``transformers.generate``
(:mod:`llmtune.sampling`).
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from llmtune.errors import LLMTuneError
from llmtune.peft.rows import has_lora_config, row_adapters
from llmtune.sampling import SamplingParams, select_tokens

__all__ = ["SlotKVCache", "Request", "TokenEvent", "Completion", "Engine"]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside, back in training mode after if it was (no module walk when already eval)."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train(True)


class SlotKVCache:
    """Key/value buffers organised in slots, written in place; the cache object the engine hands the model.

    Each layer's buffers have shape ``(num_slots, kv_heads, max_len, head_dim)`` in the dtype of the first keys
    written (allocated then, zero-filled). The engine calls :meth:`prefill` or :meth:`decode` before each forward;
    the model reads :attr:`seq_len` (cached length it sees) and :attr:`step_mask`, and calls :meth:`update` per layer.
    """

    #: on the CPU: half-precision keys/values held in float32, and a decode write of rows of different lengths as
    #: one ``index_copy_`` (False: the buffers in the keys' dtype and an advanced-index write; for A/B benchmarks)
    decode_shortcuts = True

    def __init__(self, num_layers: int, num_slots: int, max_len: int) -> None:
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"SlotKVCache: num_slots ({num_slots}) and max_len ({max_len}) must be >= 1")
        self.num_slots, self.max_len = num_slots, max_len
        self.layers: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * num_layers
        #: the cached length the model sees in this forward (0 in a prefill; the longest row in a decode)
        self.seq_len = 0
        #: ``(n, 1, 1, L)`` bool attention mask of a decode step whose rows differ in length, else None
        self.step_mask: Optional[torch.Tensor] = None
        #: ``(max_slots,)`` int64 position offset per slot (M-RoPE models: decoding continues at ``length +
        #: offset``), allocated by the first :meth:`set_offsets` with a nonzero offset; None = all 0
        self.offsets: Optional[torch.Tensor] = None
        #: what the model reads in a decode: ``(n, 1)`` int64 offsets of the live slots, or None (all 0); a model
        #: may set it in a prefill (``QwenVL`` stores the prompt's offset there)
        self.rope_deltas: Optional[torch.Tensor] = None
        self._plan: tuple = ()
        self._flat: Optional[torch.Tensor] = None

    def prefill(self, slots: torch.Tensor, positions: torch.Tensor, sources: torch.Tensor) -> None:
        """Plan a packed prefill forward (``input_ids`` of shape ``(1, T)``): token ``sources[j]`` of it is
        written to slot ``slots[j]`` at position ``positions[j]`` (all three ``(N,)`` int64; a token may go to
        several slots). The attention of that forward uses its own keys only."""
        self.seq_len, self.step_mask, self.rope_deltas = 0, None, None
        self._plan = ("prefill", slots, positions, sources)

    def set_offsets(self, slots: Sequence[int], offset: int, device: torch.device) -> None:
        """Give ``slots`` (int list) the position offset ``offset`` (int; M-RoPE's ``rope_deltas`` of the prompt
        just prefilled into them, as in ``transformers``' Qwen2-VL ``get_rope_index``). Allocates
        :attr:`offsets` on ``device`` only for a nonzero offset, so text-only use costs nothing."""
        if self.offsets is None:
            if offset == 0:
                return
            self.offsets = torch.zeros(self.num_slots, dtype=torch.long, device=device)
        self.offsets[torch.tensor(list(slots), device=self.offsets.device)] = int(offset)

    def decode(self, lengths: torch.Tensor, longest: int, uniform: bool, window: Optional[int]) -> None:
        """Plan a decode forward of the live slots ``0..n-1`` (``lengths`` ``(n,)`` int64 cached positions per
        row; ``longest`` its max, ``uniform`` whether all are equal): row ``i``'s new key goes to position
        ``lengths[i]`` and it attends to positions ``<= lengths[i]`` (and, with a sliding ``window``, within it)."""
        n = lengths.shape[0]
        self.seq_len = longest
        self.step_mask = None
        self.rope_deltas = None if self.offsets is None else self.offsets[:n, None]
        if not uniform:
            cols = torch.arange(longest + 1, device=lengths.device)[None, :]
            m = cols <= lengths[:, None]
            if window is not None:
                m = m & (cols > lengths[:, None] - window)
            self.step_mask = m[:, None, None, :]
        self._plan = ("decode", n, longest, None if uniform else lengths)
        self._flat = None   # the step's flat write positions, made by the first layer's update

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys/values ``(batch, kv_heads, new, head_dim)`` of ``layer`` as planned.

        Returns the keys/values to attend to: in a prefill, ``k, v`` themselves; in a decode, views
        ``(n, kv_heads, longest + 1, head_dim)`` of the buffers."""
        buf = self.layers[layer]
        if buf is None:
            shape = (self.num_slots, k.shape[1], self.max_len, k.shape[3])
            # on the CPU, half-precision keys/values are held in float32 (exact): the decode attention computes in
            # float32 (llmtune.models.decode_attention.attend_one_query) and then reads them without a cast per step
            up = self.decode_shortcuts and k.device.type == "cpu"
            # zeros, not empty: a masked position still meets the attention's product with V, and 0 * NaN from
            # uninitialised memory would be NaN
            buf = self.layers[layer] = tuple(
                x.new_zeros(shape, dtype=torch.float32 if up and x.dtype in (torch.bfloat16, torch.float16) else None)
                for x in (k, v))
        kb, vb = buf
        if self._plan[0] == "prefill":
            _, slots, pos, src = self._plan
            kb[slots, :, pos] = k[0][:, src].transpose(0, 1).to(kb.dtype)
            vb[slots, :, pos] = v[0][:, src].transpose(0, 1).to(vb.dtype)
            return k, v
        _, n, longest, lengths = self._plan
        if lengths is None:                       # all rows at the same position: one slice write
            kb[:n, :, longest:longest + 1] = k
            vb[:n, :, longest:longest + 1] = v
        elif not self.decode_shortcuts:
            rows = torch.arange(n, device=k.device)
            kb[rows, :, lengths] = k[:, :, 0]
            vb[rows, :, lengths] = v[:, :, 0]
        else:
            # one flat row per (slot, head) at that row's length: index_copy_ of (n * kv_heads, head_dim) rows
            s, hk, cap, d = kb.shape
            if self._flat is None or self._flat.shape[0] != n * hk:   # the same for every layer of this step
                heads = torch.arange(n * hk, device=k.device)
                self._flat = heads * cap + lengths.repeat_interleave(hk)
            kb.view(s * hk * cap, d).index_copy_(0, self._flat, k.reshape(n * hk, d).to(kb.dtype))
            vb.view(s * hk * cap, d).index_copy_(0, self._flat, v.reshape(n * hk, d).to(vb.dtype))
        return kb[:n, :, :longest + 1], vb[:n, :, :longest + 1]

    def move(self, dst: Sequence[int], src: Sequence[int], upto: int) -> None:
        """Copy positions ``0..upto-1`` of slots ``src`` into slots ``dst`` (same-length int lists), and their
        position offsets."""
        if not dst:
            return
        d = torch.tensor(list(dst))
        s = torch.tensor(list(src))
        if self.offsets is not None:
            od, osrc = d.to(self.offsets.device), s.to(self.offsets.device)
            self.offsets[od] = self.offsets[osrc]
        for buf in self.layers:
            if buf is not None:
                d, s = d.to(buf[0].device), s.to(buf[0].device)
                for b in buf:
                    b[d, :, :upto] = b[s, :, :upto]


@dataclass
class Request:
    """One sequence to generate.

    Attributes:
        prompt: token ids (non-empty list of int).
        max_new_tokens: the most tokens generated (>= 1); the stop token counts.
        sampling: :class:`~llmtune.sampling.SamplingParams` (greedy by default).
        stop_ids: ids that end the row (the stop token is emitted, as ``transformers`` does).
        generator: a :class:`torch.Generator` on the model's device for reproducible sampling (rows sharing
            one draw from it in one call); ``seed`` makes a fresh one instead; neither = torch's global RNG.
        seed: an int seed (ignored when ``generator`` is given).
        logprobs: report each sampled token's log-prob, ``log_softmax(logits / T)`` with ``T`` the sampling
            temperature (1 when greedy), before repetition penalty and top-k/top-p filtering (TRL's and
            OpenAI's convention).
        top_logprobs: also report the ``k`` most likely tokens with their log-probs (same distribution).
        adapter: name of the LoRA adapter this row runs with (None = the model as it is: its active adapter).
        images: extra model arguments of the prompt's prefill, e.g. ``{"pixel_values": ..., "image_grid_thw":
            ...}`` of a :class:`~llmtune.models.qwen_vl.QwenVL` (None or ``{}`` = text only). Such a prompt is
            prefilled alone in its row (never packed with others); the ``rope_deltas`` the model leaves on the
            cache after that forward (``(1, 1)`` int64, M-RoPE) becomes its slots' position offset.
    """

    prompt: Sequence[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: Sequence[int] = ()
    generator: Optional[torch.Generator] = None
    seed: Optional[int] = None
    logprobs: bool = False
    top_logprobs: int = 0
    adapter: Optional[str] = None
    images: Optional[dict] = None


@dataclass
class TokenEvent:
    """One new token of one request, as returned by :meth:`Engine.step`.

    ``logprob`` (float) and ``top_logprobs`` (``[(id, logprob), ...]`` most likely first) are None unless
    asked for. ``finish_reason``: None while the row runs, ``"stop"`` (a stop id; it is ``token``) or
    ``"length"`` (``max_new_tokens`` reached); the row has left the engine when it is set."""

    request_id: int
    token: int
    logprob: Optional[float] = None
    top_logprobs: Optional[list] = None
    finish_reason: Optional[str] = None


@dataclass
class Completion:
    """A finished request of :meth:`Engine.run`: ``tokens`` (stop token included), per-token ``logprobs`` and
    ``top_logprobs`` lists (None unless asked for), ``finish_reason`` ``"stop"`` or ``"length"``."""

    request_id: int
    tokens: list
    logprobs: Optional[list]
    top_logprobs: Optional[list]
    finish_reason: Optional[str]


class _Row:
    """A queued or running sequence."""

    __slots__ = ("rid", "req", "stop", "generator", "length", "last", "produced")

    def __init__(self, rid: int, req: Request, generator: Optional[torch.Generator]) -> None:
        self.rid, self.req, self.generator = rid, req, generator
        self.stop = frozenset(int(i) for i in req.stop_ids)
        self.length = 0          # positions of this row in its slot
        self.last = -1           # the sampled token not yet fed to the model
        self.produced = 0


class Engine:
    """Continuous-batching generation over a :class:`SlotKVCache` (see the module docstring).

    Args:
        model: a :class:`llmtune.models.transformer.Transformer` (LoRA-wrapped or not): ``model(input_ids,
            attention_mask, position_ids, past_key_values, use_cache) -> (hidden, cache)`` and ``lm_head``.
        max_slots: rows decoded together (the KV cache holds this many sequences).
        max_len: positions per slot: prompt + ``max_new_tokens`` of every request must fit.
        max_prefill_tokens: prompt tokens admitted per :meth:`step` (None = as many as slots allow); a longer
            prompt is still admitted alone.
        draw: how sampled tokens are drawn: ``"multinomial"`` (``transformers.generate``'s ``torch.multinomial``:
            ``generate`` and serving) or ``"inverse_cdf"`` (:func:`llmtune.sampling.inverse_cdf_draw`: the same
            distribution at one uniform per row; RL rollouts).

    The engine runs the model in eval mode under :func:`torch.inference_mode` inside :meth:`step` (the
    training flag is restored after each step); everything it returns is plain Python values.
    """

    def __init__(self, model: nn.Module, max_slots: int, max_len: int,
                 max_prefill_tokens: Optional[int] = None, draw: str = "multinomial") -> None:
        if draw not in ("multinomial", "inverse_cdf"):
            raise LLMTuneError(f"generation engine: draw must be 'multinomial' or 'inverse_cdf' (got {draw!r})")
        self.draw = draw
        if max_slots < 1:
            raise LLMTuneError(f"generation engine: max_slots must be >= 1 (got {max_slots})")
        if max_len < 2:
            raise LLMTuneError(f"generation engine: max_len must be >= 2 (got {max_len})")
        self.model = model
        self.device = next(model.parameters()).device
        n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if n_layers is None:
            raise LLMTuneError("generation engine: the model has no config.num_hidden_layers (not an llmtune "
                               "Transformer?)")
        self.window = getattr(model.config, "sliding_window", None)
        self.cache = SlotKVCache(int(n_layers), max_slots, max_len)
        self.max_slots, self.max_len, self.max_prefill_tokens = max_slots, max_len, max_prefill_tokens
        self.rows: list[_Row] = []                  # row i runs in slot i
        self.waiting: deque[list[_Row]] = deque()   # groups of rows sharing one prompt
        self.seen: Optional[torch.Tensor] = None    # (max_slots, vocab) bool, for repetition penalties
        self._next_id = 0

    # -- queueing -------------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> int:
        """Queue one request; returns its id (int). Raises :class:`LLMTuneError` for bad settings."""
        return self.add_group(request, 1)[0]

    def add_group(self, request: Request, n: int) -> list[int]:
        """Queue ``n`` completions of one prompt that share its prefill (the prompt's keys and values are
        computed once and copied into each row's slot; GRPO's ``num_generations``). With a ``seed``, the ``n``
        rows share one generator. Returns the ``n`` request ids (int).

        Raises:
            LLMTuneError: ``n < 1``, an empty prompt, ``max_new_tokens < 1``, prompt + ``max_new_tokens`` over
                ``max_len``, or a bad sampling setting (the key is named).
        """
        if n < 1:
            raise LLMTuneError(f"generation engine: a group needs n >= 1 completions (got {n})")
        if len(request.prompt) == 0:
            raise LLMTuneError("generation engine: the prompt is empty (0 tokens)")
        if request.max_new_tokens < 1:
            raise LLMTuneError(f"max_new_tokens must be >= 1 (got {request.max_new_tokens})")
        request.sampling.check(request.max_new_tokens)
        if request.top_logprobs < 0:
            raise LLMTuneError(f"top_logprobs must be >= 0 (got {request.top_logprobs})")
        if len(request.prompt) + request.max_new_tokens > self.max_len:
            raise LLMTuneError(f"prompt ({len(request.prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) "
                               f"exceed the engine's max_len {self.max_len}: shorten the prompt or lower "
                               "max_new_tokens")
        gen = request.generator
        if gen is None and request.seed is not None:
            gen = torch.Generator(self.device).manual_seed(int(request.seed))
        rows = []
        for _ in range(n):
            rows.append(_Row(self._next_id, request, gen))
            self._next_id += 1
        self.waiting.append(rows)
        return [r.rid for r in rows]

    def cancel(self, request_id: int) -> bool:
        """Drop a queued or running request now (its slot is free for the next step). Returns whether found."""
        for group in self.waiting:
            for r in group:
                if r.rid == request_id:
                    group.remove(r)
                    if not group:
                        self.waiting.remove(group)
                    return True
        for i, r in enumerate(self.rows):
            if r.rid == request_id:
                self._release({i})
                return True
        return False

    @property
    def num_running(self) -> int:
        """Rows holding a slot."""
        return len(self.rows)

    @property
    def num_waiting(self) -> int:
        """Rows queued for a slot."""
        return sum(len(g) for g in self.waiting)

    def has_work(self) -> bool:
        """True while any request is running or queued."""
        return bool(self.rows or self.waiting)

    # -- one step -------------------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Decode one token for every running row, admit queued rows into free slots (their prefill gives
        their first token), and retire the rows that finished. Returns one :class:`TokenEvent` per row that
        produced a token this step (running rows first, in slot order, then the admitted ones)."""
        with _eval_mode(self.model), torch.inference_mode():
            return self._step()

    def _call(self, input_ids: torch.Tensor, adapters: list, pick: Callable[[torch.Tensor], torch.Tensor],
              **kw: Any) -> torch.Tensor:
        """The forward of ``input_ids`` and ``lm_head(pick(hidden)).float()``. ``adapters``: one name per input
        row (or one for a packed row): a model with LoRA adapters runs them per row
        (:func:`llmtune.peft.row_adapters`), another model gets them as ``adapters=`` when any is named."""
        named = any(a is not None for a in adapters)
        ctx = contextlib.nullcontext()
        if named and has_lora_config(self.model):
            ctx, named = row_adapters(self.model, adapters), False
        if named:
            kw["adapters"] = adapters
        with ctx:
            try:
                hidden, _ = self.model(input_ids, past_key_values=self.cache, use_cache=True, **kw)
            except TypeError as e:
                if "adapters" in kw and "adapters" in str(e):
                    raise LLMTuneError("a request names an adapter, but this model has no LoRA adapters and takes "
                                       "no per-row adapters: load the model with its adapters "
                                       "(llmtune.peft.load_adapter) for serving") from None
                raise
            return self.model.lm_head(pick(hidden)).float()

    def _decode(self) -> Optional[torch.Tensor]:
        if not self.rows:
            return None
        lens = [r.length for r in self.rows]
        longest = max(lens)
        lengths = torch.tensor(lens, device=self.device)
        self.cache.decode(lengths, longest, min(lens) == longest, self.window)
        ids = torch.tensor([[r.last] for r in self.rows], device=self.device)
        logits = self._call(ids, [r.req.adapter for r in self.rows], lambda h: h[:, -1], position_ids=lengths[:, None])
        for r in self.rows:
            r.length += 1
        return logits

    def _admit(self) -> list[list[_Row]]:
        free = self.max_slots - len(self.rows)
        budget = self.max_prefill_tokens
        taken: list[list[_Row]] = []
        while self.waiting and free > 0:
            group = self.waiting[0]
            plen = len(group[0].req.prompt)
            if taken and budget is not None and plen > budget:
                break
            k = min(free, len(group))
            taken.append(group[:k])
            del group[:k]
            if not group:
                self.waiting.popleft()
            free -= k
            if budget is not None:
                budget -= plen
        return taken

    def _prefill(self, groups: list[list[_Row]]) -> Optional[torch.Tensor]:
        if not groups:
            return None
        by_adapter: dict = {}
        for g in groups:   # prompts with images: one forward each (M-RoPE offsets are per prompt)
            key = ("images", len(by_adapter)) if g[0].req.images else g[0].req.adapter
            by_adapter.setdefault(key, []).append(g)
        out = []
        for gs in by_adapter.values():
            adapter, images = gs[0][0].req.adapter, gs[0][0].req.images or {}
            ids, seg, slots, pos, src, last, spans = [], [], [], [], [], [], []
            for j, g in enumerate(gs):
                prompt = [int(t) for t in g[0].req.prompt]
                off = len(ids)
                spans.append(list(range(len(self.rows), len(self.rows) + len(g))))
                for r in g:
                    slot = len(self.rows)
                    self.rows.append(r)
                    r.length = len(prompt)
                    slots += [slot] * len(prompt)
                    pos += range(len(prompt))
                    src += range(off, off + len(prompt))
                    last.append(off + len(prompt) - 1)
                ids += prompt
                seg += [j + 2] * len(prompt)
            dev = self.device
            self.cache.prefill(torch.tensor(slots, device=dev), torch.tensor(pos, device=dev),
                               torch.tensor(src, device=dev))
            # segment ids from 2: even a lone prompt takes the segment-span attention that packed prompts take, so
            # a prompt's numerics do not depend on what it is packed with (bf16 greedy is batch-invariant)
            # the shared hidden state is projected once per group, then repeated for its rows
            uniq = torch.tensor(sorted(set(last)), device=dev)
            logits = self._call(torch.tensor([ids], device=dev), [adapter], lambda h: h[0, uniq],
                                attention_mask=torch.tensor([seg], device=dev), **images)
            delta = self.cache.rope_deltas
            for span in spans:   # a new row's offset: the model's (images) or 0, replacing the slot's old one
                self.cache.set_offsets(span, 0 if delta is None else int(delta.reshape(-1)[0]), dev)
            rank = {p: i for i, p in enumerate(sorted(set(last)))}
            out.append(logits[torch.tensor([rank[p] for p in last], device=dev)])
        return out[0] if len(out) == 1 else torch.cat(out)

    def _step(self) -> list[TokenEvent]:
        first_new = len(self.rows)
        dec = self._decode()
        pre = self._prefill(self._admit())
        if dec is None and pre is None:
            return []
        logits = dec if pre is None else pre if dec is None else torch.cat([dec, pre])
        rows = self.rows
        params = [r.req.sampling for r in rows]
        if self.seen is None and any(p.repetition_penalty != 1.0 for p in params):
            self.seen = torch.zeros(self.max_slots, logits.shape[-1], dtype=torch.bool, device=self.device)
            first_new = 0
        if self.seen is not None:
            vocab = self.seen.shape[1]
            for i in range(first_new, len(rows)):
                self.seen[i] = False
                self.seen[i, [t for t in rows[i].req.prompt if 0 <= t < vocab]] = True
        gens = [r.generator for r in rows]
        tokens = select_tokens(logits, params, None if self.seen is None else self.seen[:len(rows)],
                               None if all(g is None for g in gens) else gens, self.draw)
        if self.seen is not None:
            self.seen[torch.arange(len(rows), device=self.device), tokens] = True
        lps, tops = self._logprobs(logits, tokens, rows)
        events, done = [], set()
        for i, (r, t) in enumerate(zip(rows, tokens.tolist())):
            r.last = t
            r.produced += 1
            reason = "stop" if t in r.stop else "length" if r.produced >= r.req.max_new_tokens else None
            if reason is not None:
                done.add(i)
            events.append(TokenEvent(r.rid, t, lps.get(i), tops.get(i), reason))
        if done:
            self._release(done)
        return events

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, rows: list[_Row]) -> tuple[dict, dict]:
        want = [i for i, r in enumerate(rows) if r.req.logprobs or r.req.top_logprobs]
        if not want:
            return {}, {}
        idx = torch.tensor(want, device=self.device)
        sub = logits if len(want) == len(rows) else logits[idx]
        temps = [rows[i].req.sampling.logprob_temperature for i in want]
        if len(set(temps)) == 1:
            sub = sub / temps[0] if temps[0] != 1.0 else sub
        else:
            sub = sub / torch.tensor(temps, device=self.device, dtype=sub.dtype)[:, None]
        lp = torch.log_softmax(sub, dim=-1)
        chosen = lp.gather(1, tokens[idx][:, None]).squeeze(1).tolist()
        lps = {i: c for i, c in zip(want, chosen) if rows[i].req.logprobs}
        tops: dict = {}
        k = max(rows[i].req.top_logprobs for i in want)
        if k:
            vals, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
            for j, i in enumerate(want):
                n = rows[i].req.top_logprobs
                if n:
                    tops[i] = list(zip(ids[j, :n].tolist(), vals[j, :n].tolist()))
        return lps, tops

    def _release(self, done: set) -> None:
        """Free the slots ``done``: the last live rows move into the holes so the live slots stay ``0..n-1``."""
        n_new = len(self.rows) - len(done)
        holes = [s for s in sorted(done) if s < n_new]
        movers = [s for s in range(n_new, len(self.rows)) if s not in done]
        if holes:
            upto = max(self.rows[s].length for s in movers)
            with torch.inference_mode():
                self.cache.move(holes, movers, upto)
                if self.seen is not None:
                    self.seen[torch.tensor(holes, device=self.device)] = self.seen[torch.tensor(movers,
                                                                                             device=self.device)]
            for h, m in zip(holes, movers):
                self.rows[h] = self.rows[m]
        del self.rows[n_new:]

    # -- batch calls ----------------------------------------------------------------------------------------
    def iter_steps(self) -> Iterator[list[TokenEvent]]:
        """:meth:`step` until no work is left; yields each step's events (list of :class:`TokenEvent`).

        The model is put in eval mode once for the whole loop (and back in train mode when the loop ends or the
        iterator is closed), not at every step: ``Module.train``/``eval`` walk every submodule, which cost a
        GRPO rollout of 48 steps on the 135M LoRA model about 0.3 s."""
        with _eval_mode(self.model):
            while self.has_work():
                yield self.step()

    def run(self, requests: Sequence[Request], num_return_sequences: int | Sequence[int] = 1) -> list[Completion]:
        """Generate every request to the end, ``num_return_sequences`` prefix-shared completions each (an int for
        all, or one int per request).

        Returns a list of :class:`Completion`, request-major: request ``i``'s completions follow those of
        requests ``0..i-1``, in order."""
        counts = [num_return_sequences] * len(requests) if isinstance(num_return_sequences, int) \
            else list(num_return_sequences)
        out: dict = {}
        for req, n in zip(requests, counts):
            for rid in self.add_group(req, n):
                out[rid] = Completion(rid, [], [] if req.logprobs else None, [] if req.top_logprobs else None, None)
        for events in self.iter_steps():
            for e in events:
                c = out.get(e.request_id)
                if c is None:             # another caller's request on the same engine
                    continue
                c.tokens.append(e.token)
                if c.logprobs is not None:
                    c.logprobs.append(e.logprob)
                if c.top_logprobs is not None:
                    c.top_logprobs.append(e.top_logprobs)
                c.finish_reason = e.finish_reason
        return list(out.values())

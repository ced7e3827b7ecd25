"""The key/value cache of incremental decoding (one sequence batch): :class:`KVCache`.

The engine's many-request cache with slots is :class:`llmtune.engine.SlotKVCache`.
"""

from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    """Key/value cache for incremental decoding, written in place into buffers allocated once per layer.

    Each layer's buffer has shape ``(batch, num_key_value_heads, capacity, head_dim)`` in the dtype of the
    first keys written (the model's or autocast dtype); the first ``seq_len`` positions are filled.
    With ``max_len`` the capacity is ``max_len`` (allocated at the first :meth:`update`, writing past it
    raises); without, it starts at the first write's length rounded up to 256 positions and doubles when
    full (amortised copies, never one ``torch.cat`` per token). ``attention_mask`` given to later forward
    calls must cover cached plus new tokens.

    Source: the static (preallocated) KV cache of gpt-fast / ``transformers.StaticCache``, where decoding
    writes each step's keys and values into a fixed buffer instead of concatenating.
    """

    def __init__(self, num_layers: int, max_len: Optional[int] = None) -> None:
        if max_len is not None and max_len < 1:
            raise ValueError(f"KVCache: max_len must be >= 1 (got {max_len})")
        self.max_len = max_len
        self.layers: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * num_layers
        self.lengths = [0] * num_layers
        #: per-row ``(batch, 1)`` M-RoPE offsets of a vision-language prefill (``QwenVL``); follows :meth:`reorder`
        self.rope_deltas: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.lengths[0]

    @property
    def seq_len(self) -> int:
        """Number of cached positions."""
        return self.lengths[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` (batch, kv_heads, new_len, head_dim) after layer ``layer``'s cached positions.

        Returns views ``(batch, kv_heads, cached + new_len, head_dim)`` of the buffers (valid until the next
        update of this layer). Raises ValueError when a preallocated cache (``max_len``) would overflow.
        """
        start, new = self.lengths[layer], k.shape[2]
        end = start + new
        buf = self.layers[layer]
        cap = 0 if buf is None else buf[0].shape[2]
        if end > cap:
            if self.max_len is not None:
                if end > self.max_len:
                    raise ValueError(f"KVCache: {end} positions exceed the preallocated max_len {self.max_len}")
                cap = self.max_len
            else:
                cap = max(2 * cap, -(-end // 256) * 256)
            b, h, _, d = k.shape
            grown = (k.new_empty(b, h, cap, d), v.new_empty(b, h, cap, d))
            if buf is not None:
                grown[0][:, :, :start] = buf[0][:, :, :start]
                grown[1][:, :, :start] = buf[1][:, :, :start]
            buf = self.layers[layer] = grown
        buf[0][:, :, start:end] = k
        buf[1][:, :, start:end] = v
        self.lengths[layer] = end
        return buf[0][:, :, :end], buf[1][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (LongTensor) of every layer (for dropping finished sequences).

        Copies the filled positions of the kept rows into new buffers of the same capacity.
        """
        def keep(buf: torch.Tensor, filled: int) -> torch.Tensor:
            out = buf.new_empty((index.shape[0],) + tuple(buf.shape[1:]))
            out[:, :, :filled] = buf[index, :, :filled]
            return out

        self.layers = [None if kv is None else (keep(kv[0], n), keep(kv[1], n))
                       for kv, n in zip(self.layers, self.lengths)]
        if self.rope_deltas is not None:
            self.rope_deltas = self.rope_deltas[index.to(self.rope_deltas.device)]

"""Collators: lists of encoded rows (dicts of lists of ints) -> dicts of int64 tensors.

Padding never changes a loss: padded ``labels`` are -100 and padded ``attention_mask`` entries are 0, so the
pad id (any value) is never attended to nor predicted. ``position_ids`` count from 0 in every sequence (and in
every packed segment: ``attention_mask`` holds segment ids 1, 2, ... then); padding positions get 0.

Padding-free batches (``padding_free=True``, the default of :func:`get_collator` for pt, sft, rm, dpo, kto):
the rows of a micro-batch are concatenated into ONE sequence, ``input_ids (1, N)`` with ``N`` the sum of the
row lengths, ``attention_mask (1, N)`` holding segment ids 1, 2, 3, ... (one per row, or one per packed
example of a row), ``position_ids`` restarting at 0 in each segment, ``labels (1, N)`` with each row's first
label set to -100 (in a padded batch the first label of a row is never predicted either), and
``cu_seqlens (R + 1,)`` int64, the start offsets of the ``R`` rows (``cu_seqlens[-1] == N``). The model never
attends across segments and no compute goes to padding; losses are unchanged (the same sums). Stages that
need per-row values (rm, dpo, kto) call :func:`unpack_rows` on the hidden states (and labels), which gives
back the right-padded ``(R, T, ...)`` layout; :func:`num_rows` counts rows in either layout. A micro-batch
whose rows all have the same length has no padding to remove: it keeps the ``(B, T)`` layout (one batched
causal attention call is faster than a loop over its rows).

* :class:`SFTCollator` (pt, sft, and the prompt+completion of any stage): right padding.
* :class:`PairwiseCollator` (rm, dpo): chosen rows then rejected rows stacked, ``input_ids (2B, T)`` with
  ``[:B]`` chosen and ``[B:]`` rejected.
* :class:`KTOCollator`: the completion keys plus ``kl_input_ids, kl_attention_mask, kl_labels, kl_position_ids``
  and ``kto_tags`` (bool tensor ``(B,)``).
* :class:`LeftPadCollator` (generation, ppo prompts): left padding, so every prompt ends at the last column.
* :class:`DPOMixCollator` (the seed's dpo + ``kto_alpha`` mix): pair rows as :class:`PairwiseCollator`
  (keys present only when the batch has pairs) and ``sft_only`` rows as ``sft_input_ids, sft_attention_mask,
  sft_labels, sft_position_ids`` (present only when it has such rows).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from llmtune.constants import IGNORE_INDEX


def _positions(mask: Sequence[int]) -> list[int]:
    out, prev, start = [], None, 0
    for i, seg in enumerate(mask):
        if seg != prev:
            start, prev = i, seg
        out.append(i - start if seg > 0 else 0)
    return out


def _pad(seqs: Sequence[Sequence[int]], value: int, left: bool = False, length: Optional[int] = None) -> torch.Tensor:
    t = length if length is not None else max((len(s) for s in seqs), default=0)
    rows = [([value] * (t - len(s)) + list(s)) if left else (list(s) + [value] * (t - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long).reshape(len(seqs), t)


def num_rows(batch: dict, prefix: str = "") -> int:
    """Rows (examples) of a collated batch: ``len(cu_seqlens) - 1`` when padding-free, else
    ``input_ids.shape[0]``; ``prefix`` reads ``kl_``/``sft_`` keys."""
    cu = batch.get(prefix + "cu_seqlens")
    return int(cu.numel() - 1) if cu is not None else int(batch[prefix + "input_ids"].shape[0])


def unpack_rows(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor], fill: float = 0) -> torch.Tensor:
    """A padding-free ``(1, N, ...)`` tensor back to right-padded rows ``(R, T, ...)``, ``T`` the longest row.

    ``cu_seqlens`` ``(R + 1,)`` int64 row offsets (the collator's key); None returns ``x`` unchanged (a padded
    batch). Positions past a row's end hold ``fill``. Differentiable (an index copy); dtype and device of ``x``.
    Raises ValueError when ``x`` is not ``(1, N, ...)`` with ``N == cu_seqlens[-1]``.
    """
    if cu_seqlens is None:
        return x
    cu = cu_seqlens.to(x.device)
    n = int(cu[-1])
    if x.dim() < 2 or x.shape[0] != 1 or x.shape[1] != n:
        raise ValueError(f"unpack_rows: expected (1, {n}, ...), got {tuple(x.shape)}")
    lengths = cu[1:] - cu[:-1]
    r, t = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    row = torch.repeat_interleave(torch.arange(r, device=x.device), lengths)
    col = torch.arange(n, device=x.device) - cu[:-1][row]
    out = x.new_full((r, t) + tuple(x.shape[2:]), fill)
    out[row, col] = x[0]
    return out


def _pack(rows_ids, rows_masks, rows_labels, rows_pos, pad_multiple=None) -> dict:
    """Concatenate rows into one ``(1, N)`` sequence (see the module docstring)."""
    ids, mask, labels, pos, cu, offset = [], [], [], [], [0], 0
    for i, (r_ids, r_mask) in enumerate(zip(rows_ids, rows_masks)):
        ids += r_ids
        seen = {}
        for m in r_mask:   # renumber the row's segments after the previous rows' ones
            if m > 0 and m not in seen:
                seen[m] = offset + len(seen) + 1
        mask += [seen.get(m, 0) for m in r_mask]
        offset += len(seen)
        if rows_labels is not None:
            labels += [IGNORE_INDEX] + list(rows_labels[i][1:]) if r_ids else []
        pos += rows_pos[i]
        cu.append(cu[-1] + len(r_ids))
    batch = {"input_ids": torch.tensor([ids], dtype=torch.long).reshape(1, -1),
             "attention_mask": torch.tensor([mask], dtype=torch.long).reshape(1, -1),
             "position_ids": torch.tensor([pos], dtype=torch.long).reshape(1, -1),
             "cu_seqlens": torch.tensor(cu, dtype=torch.long)}
    if rows_labels is not None:
        batch["labels"] = torch.tensor([labels], dtype=torch.long).reshape(1, -1)
    return batch


def _target_len(n: int, multiple: Optional[int]) -> int:
    if multiple and n % multiple:
        n += multiple - n % multiple
    return n


class SFTCollator:
    """Right-padding (or padding-free) collator for rows with ``input_ids, attention_mask[, labels][, position_ids]``.

    Returns ``input_ids (B, T)``, ``attention_mask (B, T)`` (0 pad, else the row's segment ids),
    ``labels (B, T)`` (-100 pad; only when rows have labels), ``position_ids (B, T)``; all int64.

    Args:
        pad_token_id: id written in padded ``input_ids`` (any value; it never affects a loss).
        pad_to_multiple_of: round ``T`` up to a multiple of this.
        prefix: key prefix to read (``"kl_"`` reads ``kl_input_ids`` ...); outputs use the same prefix.
        padding_free: pack the rows into one ``(1, N)`` sequence with ``cu_seqlens`` (module docstring).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None, prefix: str = "",
                 padding_free: bool = False) -> None:
        self.pad_token_id = int(pad_token_id)
        self.multiple = pad_to_multiple_of
        self.prefix = prefix
        self.padding_free = bool(padding_free)

    def __call__(self, rows: Sequence[dict], out_prefix: Optional[str] = None, pack: Optional[bool] = None) -> dict:
        """Collate ``rows``; ``pack`` overrides the padding-free choice (None: pack when lengths differ)."""
        p, o = self.prefix, self.prefix if out_prefix is None else out_prefix
        ids = [r[p + "input_ids"] for r in rows]
        masks = [r.get(p + "attention_mask") or [1] * len(r[p + "input_ids"]) for r in rows]
        if pack is None:   # equal lengths: nothing to pad, keep (B, T)
            pack = self.padding_free and len({len(s) for s in ids}) > 1
        if pack:
            labels = [r[p + "labels"] for r in rows] if all(p + "labels" in r for r in rows) else None
            pos = [r.get(p + "position_ids") or _positions(m) for r, m in zip(rows, masks)]
            return {o + k: v for k, v in _pack(ids, masks, labels, pos).items()}
        t = _target_len(max((len(s) for s in ids), default=0), self.multiple)
        batch = {o + "input_ids": _pad(ids, self.pad_token_id, length=t),
                 o + "attention_mask": _pad(masks, 0, length=t)}
        if all(p + "labels" in r for r in rows):
            batch[o + "labels"] = _pad([r[p + "labels"] for r in rows], IGNORE_INDEX, length=t)
        pos = [r.get(p + "position_ids") or _positions(m) for r, m in zip(rows, masks)]
        batch[o + "position_ids"] = _pad(pos, 0, length=t)
        return batch


class PairwiseCollator:
    """Stack ``chosen_*`` rows then ``rejected_*`` rows: ``input_ids, attention_mask, labels, position_ids``
    of shape ``(2B, T)`` int64, rows ``[:B]`` chosen and ``[B:]`` rejected (one shared ``T``)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None,
                 padding_free: bool = False) -> None:
        self.inner = SFTCollator(pad_token_id, pad_to_multiple_of, padding_free=padding_free)

    def __call__(self, rows: Sequence[dict]) -> dict:
        flat = [{k[len(side) + 1:]: v for k, v in r.items() if k.startswith(side + "_")}
                for side in ("chosen", "rejected") for r in rows]
        return self.inner(flat)


class KTOCollator:
    """KTO batches: completion ``input_ids, attention_mask, labels, position_ids`` ``(B, T)``, the mismatched
    completions ``kl_input_ids, kl_attention_mask, kl_labels, kl_position_ids`` ``(B, T_kl)`` and
    ``kto_tags`` bool ``(B,)`` (True = desirable)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None,
                 padding_free: bool = False) -> None:
        self.main = SFTCollator(pad_token_id, pad_to_multiple_of, padding_free=padding_free)
        self.kl = SFTCollator(pad_token_id, pad_to_multiple_of, prefix="kl_", padding_free=padding_free)

    def __call__(self, rows: Sequence[dict]) -> dict:
        # both parts in one layout: the stage stacks them for its one reference forward
        lengths = {len(r["input_ids"]) for r in rows} | {len(r["kl_input_ids"]) for r in rows}
        pack = self.main.padding_free and len(lengths) > 1
        batch = self.main(rows, pack=pack)
        batch.update(self.kl(rows, pack=pack))
        batch["kto_tags"] = torch.tensor([bool(r["kto_tag"]) for r in rows], dtype=torch.bool)
        return batch


class LeftPadCollator:
    """Left-padding collator for prompts (generation / ppo): ``input_ids, attention_mask, position_ids``
    ``(B, T)`` int64, each prompt ending at column ``T - 1``."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None) -> None:
        self.pad_token_id = int(pad_token_id)
        self.multiple = pad_to_multiple_of

    def __call__(self, rows: Sequence[dict]) -> dict:
        ids = [r["input_ids"] for r in rows]
        masks = [r.get("attention_mask") or [1] * len(r["input_ids"]) for r in rows]
        t = _target_len(max((len(s) for s in ids), default=0), self.multiple)
        return {"input_ids": _pad(ids, self.pad_token_id, left=True, length=t),
                "attention_mask": _pad(masks, 0, left=True, length=t),
                "position_ids": _pad([_positions(m) for m in masks], 0, left=True, length=t)}


class DPOMixCollator:
    """dpo batches mixing pairs and ``sft_only`` rows (the seed's ``--kto_alpha`` knowledge term): pairs as
    :class:`PairwiseCollator`, sft rows as ``sft_input_ids, sft_attention_mask, sft_labels, sft_position_ids``;
    each group's keys are present only when the batch holds such rows."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None,
                 padding_free: bool = False) -> None:
        self.pairs = PairwiseCollator(pad_token_id, pad_to_multiple_of, padding_free)
        self.sft = SFTCollator(pad_token_id, pad_to_multiple_of, padding_free=padding_free)

    def __call__(self, rows: Sequence[dict]) -> dict:
        pairs = [r for r in rows if not r.get("sft_only")]
        sft = [r for r in rows if r.get("sft_only")]
        batch = self.pairs(pairs) if pairs else {}
        if sft:
            batch.update(self.sft(sft, out_prefix="sft_"))
        return batch


def get_collator(stage: str, pad_token_id: Optional[int], pad_to_multiple_of: Optional[int] = None,
                 padding_free: bool = False):
    """The collator for ``stage`` (pt/sft -> SFT, rm -> pairwise, dpo -> DPO mix (plain pairwise batches when
    no row is ``sft_only``), kto -> KTO, ppo -> left padding). ``pad_token_id`` None -> 0 (never seen by a loss).
    ``padding_free`` (the config key, llmtune's own) packs each micro-batch into one sequence (module
    docstring) for every stage where that is exact (all but ppo, whose prompts are left-padded for generation).
    Raises ValueError for an unknown stage."""
    pad = 0 if pad_token_id is None else int(pad_token_id)
    stage = {"pretrain": "pt", "rlhf": "ppo"}.get(stage, stage)
    table = {"pt": SFTCollator, "sft": SFTCollator, "rm": PairwiseCollator, "dpo": DPOMixCollator,
             "kto": KTOCollator, "ppo": LeftPadCollator}
    if stage not in table:
        raise ValueError(f"unknown stage {stage!r}")
    if stage in PADDING_FREE_STAGES:
        return table[stage](pad, pad_to_multiple_of, padding_free=padding_free)
    return table[stage](pad, pad_to_multiple_of)


#: stages whose collators can pack micro-batches padding-free with exactly the same losses and gradients
PADDING_FREE_STAGES = ("pt", "sft", "rm", "dpo", "kto")


def pad_collate(rows: Sequence[dict[str, Sequence[int]]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad rows of ``input_ids, attention_mask, labels`` (and ``position_ids``) into int64 tensors.

    Padding: ``pad_token_id`` for input ids, 0 for attention mask and positions, -100 for labels.
    A minimal collator for pt/sft rows (the :class:`~llmtune.train.trainer.Trainer`'s default);
    :func:`get_collator` gives each stage's own.
    """
    t = max(len(r["input_ids"]) for r in rows)
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, "position_ids": 0}
    out = {}
    for key, pad in pads.items():
        if key in rows[0]:
            out[key] = torch.tensor([list(r[key]) + [pad] * (t - len(r[key])) for r in rows], dtype=torch.long)
    return out

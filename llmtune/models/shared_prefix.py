"""Shared-prompt packing: a group's prompt computed once for all of its completions, in training-style forwards.

GRPO samples ``num_generations`` completions of each prompt; its policy, reference and old-policy forwards then
score every completion after its prompt. Packed one row after another (:func:`llmtune.train.stages.grpo.
completion_forward`), the prompt of a group is computed ``G`` times: with short completions (an arithmetic reward
task: ~30 prompt tokens, 5-48 completion tokens) most of a step's tokens are prompt copies. Here each group is one
prompt span followed by its completion spans in one packed row::

    [prompt_1 | completion_1,1 | ... | completion_1,G | prompt_2 | completion_2,1 | ...]

A prompt span attends causally within itself; a completion span attends to all of its prompt's keys and causally
within itself, with positions continuing the prompt's (``P_g, P_g + 1, ...``). Each completion token therefore sees
exactly the tokens it sees in its own ``prompt + completion`` row, so the per-token log-probs are the same function
(up to floating-point rounding), and gradients reach the shared prompt's activations from every completion (summed
by autograd, as the separate copies' would be).

Source: the causal attention of a decoder (Vaswani et al., 2017) restricted per span, as in packed ("padding-free")
training; prefix sharing across samples of one prompt as in tree/shared-prefix attention (e.g. Hydragen, Juravsky
et al., 2024) here for training forwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from llmtune.models.spans import SegmentSpans


@dataclass
class SharedPromptLayout:
    """Where the tokens of ``(N, P + C)`` rollout rows go in one packed row with shared prompts.

    Attributes:
        input_ids: ``(1, K)`` int64 packed tokens; position_ids: ``(1, K)`` int64.
        spans: the :class:`llmtune.models.spans.SegmentSpans` of the row (``parents`` set).
        src: ``(M,)`` int64: for each scored completion token, the packed position whose hidden state predicts it
            (the prompt's last token for a completion's first token).
        rows, cols: ``(M,)`` int64: where each scored token sits in the ``(N, C)`` completion layout.
        targets: ``(M,)`` int64 token ids (the scored tokens).
        tokens_unshared: ``K`` of the row-after-row packing, for reports.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    spans: object
    src: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    tokens_unshared: int


def shared_prompt_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                         completion_mask: torch.Tensor) -> Optional[SharedPromptLayout]:
    """The shared-prompt packing of rollout rows, or None when no two consecutive rows share their prompt.

    Args:
        input_ids, attention_mask: ``(N, P + C)`` (the :class:`llmtune.rollout.Rollout` layout: prompts left-padded
            to ``P``, completions right-padded to ``C``; mask 0/1). Consecutive rows whose prompt tokens are equal
            form one group (GRPO passes each prompt's ``num_generations`` rows together).
        prompt_len: ``P``. completion_mask: ``(N, C)``: the tokens to score (a subset of the completion's tokens).

    Returns: a :class:`SharedPromptLayout` (its tensors on ``input_ids``' device), or None (no two consecutive
    rows share a prompt, or a prompt is empty). One host sync.
    """
    n, width = input_ids.shape
    keep = attention_mask > 0
    ids_l, keep_l = input_ids.tolist(), keep.tolist()
    prompts = [tuple(t for t, k in zip(ids_l[i][:prompt_len], keep_l[i][:prompt_len]) if k) for i in range(n)]
    if all(prompts[i] != prompts[i - 1] for i in range(1, n)) or not all(prompts):
        return None   # nothing shared, or an empty prompt (its first completion token has no predicting position)
    score_l = completion_mask.tolist()
    flat: list[int] = []        # flat index into input_ids of each packed token
    pos: list[int] = []
    spans, parents = [], []
    src: list[int] = []
    rows: list[int] = []
    cols: list[int] = []
    tokens_unshared = int(keep.sum())
    i = 0
    while i < n:
        j = i
        while j + 1 < n and prompts[j + 1] == prompts[i]:
            j += 1
        start, plen = len(flat), len(prompts[i])
        flat.extend(i * width + c for c in range(prompt_len) if keep_l[i][c])
        pos.extend(range(plen))
        prompt_span = len(spans)
        spans.append((0, start, start + plen))
        parents.append(-1)
        for r in range(i, j + 1):
            length = sum(keep_l[r][prompt_len:])    # the completion's tokens (right-padded, contiguous)
            if not length:
                continue
            s = len(flat)
            flat.extend(r * width + prompt_len + c for c in range(length))
            pos.extend(range(plen, plen + length))
            spans.append((0, s, s + length))
            parents.append(prompt_span)
            for c in range(length):
                if score_l[r][c]:
                    src.append(start + plen - 1 if c == 0 else s + c - 1)
                    rows.append(r)
                    cols.append(c)
        i = j + 1
    dev = input_ids.device
    idx = torch.tensor(flat, dtype=torch.long, device=dev)
    k = len(flat)
    segs = SegmentSpans(spans, 1, k, None, None, max(e - s for _, s, e in spans), parents=parents)
    rows_t = torch.tensor(rows, dtype=torch.long, device=dev)
    cols_t = torch.tensor(cols, dtype=torch.long, device=dev)
    return SharedPromptLayout(
        input_ids=input_ids.reshape(-1)[idx][None], position_ids=torch.tensor(pos, dtype=torch.long, device=dev)[None],
        spans=segs, src=torch.tensor(src, dtype=torch.long, device=dev), rows=rows_t, cols=cols_t,
        targets=input_ids[rows_t, prompt_len + cols_t], tokens_unshared=tokens_unshared)


_MASKS: dict = {}


def _lower_right_causal(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean ``(q_len, kv_len)``: query ``i`` (the last ``q_len`` positions) may attend key ``j <= kv_len - q_len
    + i`` (causal aligned at the bottom right)."""
    key = (q_len, kv_len, str(device))
    m = _MASKS.get(key)
    if m is None:
        i = torch.arange(q_len, device=device)[:, None]
        m = torch.arange(kv_len, device=device)[None, :] <= i + (kv_len - q_len)
        if len(_MASKS) > 256:
            _MASKS.clear()
        _MASKS[key] = m
    return m


def prefix_span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segs, fp32_span: int) -> torch.Tensor:
    """Attention over one packed row of spans some of which extend a parent span (:class:`SharedPromptLayout`).

    Args:
        q: ``(1, H, T, D)``; k, v: ``(1, H_kv, T, D)`` (RoPE applied); segs: ``SegmentSpans`` whose spans tile the
            row in order and whose ``parents[i]`` is the index of an earlier span whose keys span ``i`` also sees
            (all of them, before its own), or -1.
        fp32_span: on the CPU, half-precision spans whose key length is at most this run in float32 (as the
            unshared spans do: :func:`llmtune.models.transformer._span_attention`).

    Returns: ``(1, T, H, D)`` in ``q``'s dtype.

    Raises: ValueError: more than one row, or spans that do not tile the row in order.
    """
    b, h, t, d = q.shape
    sizes = [e - s for _, s, e in segs.spans]
    if b != 1 or sum(sizes) != t or any(r != 0 for r, _, _ in segs.spans):
        raise ValueError(f"prefix_span_attention: one packed row whose spans tile it in order is required "
                         f"(batch {b}, {t} positions, spans {segs.spans[:4]}...)")
    gqa = k.shape[1] != h
    qs, ks, vs = (x.split(sizes, dim=2) for x in (q, k, v))
    outs = []
    for i, n in enumerate(sizes):
        par = segs.parents[i]
        qi, ki, vi = qs[i], ks[i], vs[i]
        if par >= 0:
            ki, vi = torch.cat((ks[par], ki), dim=2), torch.cat((vs[par], vi), dim=2)
        up = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and ki.shape[2] <= fp32_span
        qi, ki, vi = (x.float() if up else x.contiguous() for x in (qi, ki, vi))
        with torch.autocast("cpu", enabled=False) if up else contextlib.nullcontext():
            if par < 0:
                o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=gqa)
            else:
                g = gqa
                if gqa and q.device.type == "cuda":   # CUDA's masked fused kernel takes no grouped heads (as attend)
                    rep = h // ki.shape[1]
                    ki, vi, g = ki.repeat_interleave(rep, dim=1), vi.repeat_interleave(rep, dim=1), False
                o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=_lower_right_causal(n, ki.shape[2], q.device),
                                                   enable_gqa=g)
        outs.append(o.transpose(1, 2).to(q.dtype))
    return torch.cat(outs, dim=1).view(b, t, h, d)

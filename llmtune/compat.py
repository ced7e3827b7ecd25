"""Call sites of torch APIs whose signature or presence depends on the torch release.

llmtune supports the torch range in ``pyproject.toml``; an API that appeared later, or whose keywords changed,
is called through a function here that inspects the installed signature once (cached per function object)
and adapts, or reports that it cannot, so the caller falls back. The signatures of every release are in
``tests/fixtures/torch_api.json`` (read from the wheels by ``tests/fixtures/torch_api_extract.py``), and
``tests/test_torch_api.py`` calls these functions with stand-ins of each release's exact signature.

Source: the PyTorch documentation of ``torch.nn.attention.varlen.varlen_attn`` and its signature in each
release's wheel (2.10: ``is_causal``; 2.11: ``window_size`` (left, right), -1 = unbounded; 2.12:
``enable_gqa``).
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Callable, Optional

import torch


@functools.lru_cache(maxsize=32)
def accepted_params(fn: Callable) -> Optional[frozenset]:
    """The parameter names ``fn`` accepts (None when it takes ``**kwargs`` or has no inspectable signature,
    i.e. "accepts anything"). Cached per function object."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


# FSDP2 shards frozen integer parameters (QLoRA's uint8 NF4 storage) from torch 2.12 on; before it
# ``fully_shard`` re-creates every shard as a parameter that requires grad, which fails for integer dtypes
FSDP_INTEGER_PARAMS_TORCH = (2, 12)


def torch_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed torch (``torch.__version__``, e.g. ``"2.11.0+cu128"`` -> ``(2, 11)``)."""
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return int(major), int(minor)


def is_cuda(t: torch.Tensor) -> bool:
    """True when ``t`` lives on a CUDA device: the one device test of the CUDA-only attention path (tests
    patch it to run that path on CPU tensors with a stand-in kernel)."""
    return t.device.type == "cuda"


_VARLEN_STATE = {"missing": False, "broken": None}


def _varlen_fn() -> Optional[Callable]:
    if _VARLEN_STATE["missing"]:
        return None
    try:
        from torch.nn.attention import varlen
    except ImportError:   # torch < 2.10: no such module; remembered (a failed import is slow)
        _VARLEN_STATE["missing"] = True
        return None
    fn = getattr(varlen, "varlen_attn", None)
    return None if fn is None or fn is _VARLEN_STATE["broken"] else fn


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_len: int, window: Optional[int]) -> Optional[torch.Tensor]:
    """Causal variable-length attention over packed sequences with ``torch.nn.attention.varlen.varlen_attn``
    (flash attention, CUDA), adapted to the installed torch's signature; None when it cannot be used here.

    Args:
        q: ``(N, H, D)`` queries of every sequence, concatenated along the token axis; fp16 or bf16.
        k, v: ``(N, H_kv, D)`` with ``H % H_kv == 0`` (grouped-query heads: ``enable_gqa`` where the function
            takes it, else the key/value heads are expanded with ``repeat_interleave``, SDPA's convention).
        cu_seqlens: ``(S + 1,)`` int32 start offsets of the ``S`` sequences in ``N`` (last = ``N``).
        max_len: the longest sequence's length. window: sliding window ``W`` (a query sees keys less than
            ``W`` positions back) or None.

    Returns: ``(N, H, D)`` in ``q``'s dtype, or None when: the function is missing (torch < 2.10), the dtype
    is not fp16/bf16, a window is needed and the function takes no ``window_size``, neither ``window_size``
    nor ``is_causal`` is accepted, or the call raised ``TypeError`` (then it is not tried again in this
    process). Errors of the kernel itself (``RuntimeError``, e.g. an unsupported head size) propagate.
    """
    fn = _varlen_fn()
    if fn is None or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    names = accepted_params(fn)
    kw: dict = {}
    if names is None or "window_size" in names:
        kw["window_size"] = (-1, 0) if window is None else (window - 1, 0)
    elif window is None and "is_causal" in names:
        kw["is_causal"] = True
    else:
        return None
    if k.shape[1] != q.shape[1]:
        if names is None or "enable_gqa" in names:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    try:
        return fn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kw)
    except TypeError:
        _VARLEN_STATE["broken"] = fn
        return None

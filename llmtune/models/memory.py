"""Activation memory that grows as little as possible with sequence length (long-context training).

Three pieces, used by :class:`llmtune.models.transformer.Transformer` when gradient checkpointing is on:

* :func:`checkpoint_layer`: gradient checkpointing (Chen et al., 2016, "Training deep nets with sublinear
  memory cost") that keeps only each decoder layer's input, in the compute dtype (the autocast dtype under
  autocast: a float32 residual stream is rounded to bf16 at each layer boundary, as in a model loaded in
  bf16), and recomputes the layer in the backward pass. RoPE tables and the attention mask are shared by
  every layer (one copy). With ``offload_activations`` on CUDA the kept inputs go to pinned CPU memory and come
  back for the recompute (the "offloaded gradient checkpointing" of Unsloth, LLaMA-Factory's
  ``use_unsloth_gc``), so GPU memory holds one layer's activations whatever the depth.
* :func:`tiled_mlp`: the SwiGLU MLP ``down(silu(gate(x)) * up(x))`` (Shazeer, 2020) computed in tiles of
  ``TILE_TOKENS`` rows of the sequence, in the forward pass and again tile by tile in the backward pass, so the
  ``(tokens, intermediate_size)`` activations never exist whole (the tiled MLP of Arctic Long Sequence
  Training, Bekman et al., 2025, and Unsloth). Same math: every row of the MLP is independent.
* attention never stores ``T x T``: :func:`llmtune.models.transformer.attend` calls SDPA with ``is_causal`` (the
  flash kernels on CPU and CUDA keep only a ``(heads, T)`` log-sum-exp), and the loss never stores the
  ``(tokens, vocab)`` logits (:func:`llmtune.losses.logps.causal_lm_loss`, chunked).

Tiling is active only inside a checkpointed layer (its forward and its recompute) and only for sequences longer
than ``TILE_TOKENS`` rows; shorter batches take the plain path unchanged.

And one allocator setting, :func:`set_mmap_threshold`: on Linux with glibc, CPU tensors of 128 KiB or more each
get their own ``mmap`` (returned to the OS when freed), so the freed activations of a long step do not pile up
as fragmented heap that the process keeps resident.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from typing import Any, Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

#: rows (batch x tokens) per MLP tile: a 2048 x 14336 bf16 tile of an 8B model is 56 MiB per intermediate
TILE_TOKENS = 2048

_TILING = [False]   # True while a checkpointed layer runs (forward or recompute): the MLP then tiles


def mlp_tile_rows(x: torch.Tensor) -> int:
    """Rows per tile for an MLP input ``x`` ``(..., hidden)``: :data:`TILE_TOKENS` inside a checkpointed layer
    (its forward, with or without autograd, and its recompute) when ``x`` has more rows than that, else 0."""
    if _TILING[0] and x.numel() // max(x.shape[-1], 1) > TILE_TOKENS:
        return TILE_TOKENS
    return 0


def _autocast_state(device_type: str) -> tuple[bool, Optional[torch.dtype]]:
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return False, None
    return True, torch.get_autocast_dtype(device_type)


class _ReplayState:
    """The RNG and autocast state at a forward pass, restored for its recompute (dropout masks and dtypes
    match). CPU generator always; the current CUDA device's too for CUDA tensors."""

    def __init__(self, device: torch.device) -> None:
        self.device_type = device.type
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.cuda_index = device.index if device.index is not None else (
            torch.cuda.current_device() if device.type == "cuda" else None)
        self.autocast = _autocast_state(device.type)

    @contextlib.contextmanager
    def replay(self):
        devices = [self.cuda_index] if self.cuda_rng is not None else []
        enabled, dtype = self.autocast
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.cuda_index)
            amp = torch.autocast(self.device_type, dtype=dtype) if enabled else contextlib.nullcontext()
            with amp, torch.enable_grad():
                yield


def _trainable(module: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    return tuple(p for p in module.parameters() if p.requires_grad)


class _TiledMLP(torch.autograd.Function):
    """``fn`` over row tiles of ``x``; backward recomputes each tile and back-propagates it alone."""

    @staticmethod
    def forward(ctx, fn: Callable, tile: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.tile, ctx.params = fn, tile, params
        ctx.state = _ReplayState(x.device)
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        out = None
        with torch.no_grad():
            for i in range(0, flat.shape[0], tile):
                o = fn(flat[i:i + tile])
                if out is None:
                    out = o.new_empty(flat.shape[0], o.shape[-1])
                out[i:i + tile] = o
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        params, tile = ctx.params, ctx.tile
        flat = x.detach().reshape(-1, x.shape[-1])
        g = grad.reshape(-1, grad.shape[-1])
        gx = torch.empty_like(flat) if ctx.needs_input_grad[2] else None
        gp: list[Optional[torch.Tensor]] = [None] * len(params)
        with ctx.state.replay():
            for i in range(0, flat.shape[0], tile):
                xt = flat[i:i + tile].requires_grad_(gx is not None)
                out = ctx.fn(xt)
                wrt = ([xt] if gx is not None else []) + list(params)
                grads = torch.autograd.grad(out, wrt, g[i:i + tile], allow_unused=True) if wrt else ()
                if gx is not None:
                    gx[i:i + tile] = grads[0]
                    grads = grads[1:]
                for j, gj in enumerate(grads):
                    if gj is not None:
                        gp[j] = gj if gp[j] is None else gp[j] + gj
        return (None, None, None if gx is None else gx.view_as(x), *gp)


def tiled_mlp(mlp: torch.nn.Module, x: torch.Tensor, tile: int = TILE_TOKENS) -> torch.Tensor:
    """``mlp.swiglu(x)`` computed in tiles of ``tile`` rows of ``x`` ``(..., hidden)`` (any float dtype).

    Returns ``(..., out_features)`` in ``mlp.swiglu``'s output dtype, equal to the untiled result up to the
    rounding of differently sized matrix products. Memory: the input is kept (it is the MLP's input, stored
    anyway) plus one tile's intermediate activations in the backward pass, instead of the whole
    ``(rows, intermediate_size)`` activations. Gradients flow to ``x`` and to every trainable parameter of
    ``mlp`` (LoRA adapters included), summed over tiles. Costs one more MLP forward (the tile recompute).
    Source: the tiled MLP of Arctic Long Sequence Training (Bekman et al., 2025).
    """
    return _TiledMLP.apply(mlp.swiglu, int(tile), x, *_trainable(mlp))


class PinnedOffload:
    """Where :func:`checkpoint_layer` keeps an offloaded layer input: a pinned CPU copy (non-blocking device to
    host copy) brought back to the tensor's device for the recompute. Tests substitute an object with the same
    two methods (e.g. a device-to-device copy) to check the gradients on the CPU."""

    def pack(self, x: torch.Tensor) -> Any:
        """``x`` (a CUDA tensor) -> a pinned CPU copy."""
        buf = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
        buf.copy_(x, non_blocking=True)
        return buf

    def unpack(self, stored: Any, device: torch.device) -> torch.Tensor:
        """The stored copy back on ``device``."""
        return stored.to(device, non_blocking=True)


class _OffloadedCheckpoint(torch.autograd.Function):
    """Reentrant-style checkpoint of ``run(x)`` whose only kept tensor is ``x``, stored by ``offload``."""

    @staticmethod
    def forward(ctx, run: Callable, offload: Any, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.offload, ctx.params, ctx.device = run, offload, params, x.device
        ctx.state = _ReplayState(x.device)
        with torch.no_grad():
            out = run(x)
        ctx.stored = offload.pack(x.detach())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x = ctx.offload.unpack(ctx.stored, ctx.device).detach()
        ctx.stored = None
        need_x = ctx.needs_input_grad[2]
        with ctx.state.replay():
            x.requires_grad_(need_x)
            out = ctx.run(x)
            wrt = ([x] if need_x else []) + list(ctx.params)
            grads = list(torch.autograd.grad(out, wrt, grad, allow_unused=True)) if wrt else []
        gx = grads.pop(0) if need_x else None
        return (None, None, gx, *grads)


def _tiling(fn: Callable) -> Callable:
    def run(*args):
        prev, _TILING[0] = _TILING[0], True
        try:
            return fn(*args)
        finally:
            _TILING[0] = prev
    return run


def checkpoint_layer(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, *args: Any) -> torch.Tensor:
    """``layer(x, *args)`` with its activations recomputed in the backward pass, keeping only ``x``.

    Args:
        model: the :class:`~llmtune.models.transformer.Transformer` (its ``offload_activations`` attribute:
            False, True = :class:`PinnedOffload` on CUDA and a no-op on the CPU, or an object with
            ``pack``/``unpack`` methods; its config's ``num_experts``: MoE layers are never offloaded, their
            router's load-balancing loss needs the forward's graph).
        layer: a decoder layer; x: ``(B, T, hidden)`` its input (float32 under autocast is first cast to the
            autocast dtype, so the kept copy is bf16/fp16); args: RoPE tables, mask, cache (shared, not copied).

    Returns: the layer's output ``(B, T, hidden)``. Inside the layer (forward and recompute) the dense MLP runs
    tiled (:func:`tiled_mlp`) for more than :data:`TILE_TOKENS` rows.
    """
    enabled, dtype = _autocast_state(x.device.type)
    if enabled and x.dtype == torch.float32 and dtype is not None:
        x = x.to(dtype)
    offload = getattr(model, "offload_activations", False)
    if offload is True:
        offload = PinnedOffload() if x.device.type == "cuda" else None
    if offload and not getattr(model.config, "num_experts", 0):
        run = _tiling(lambda h: layer(h, *args))
        return _OffloadedCheckpoint.apply(run, offload, x, *_trainable(layer))
    return checkpoint(_tiling(layer), x, *args, use_reentrant=False)


#: the M_MMAP_THRESHOLD (bytes) that :func:`set_mmap_threshold` sets by default: glibc's initial value, made fixed
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3          # <malloc.h>
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2): mallopt refuses more


def set_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc malloc's mmap threshold at ``nbytes`` (``mallopt(M_MMAP_THRESHOLD, nbytes)``) for this process.

    Every later ``malloc`` of ``nbytes`` bytes or more (a CPU tensor's storage) is then its own anonymous
    ``mmap``, unmapped when freed. glibc's default threshold starts at 128 KiB but rises to the size of the
    largest mmapped block freed so far (up to 32 MiB), after which the activations of a training step come from
    the heap, whose freed middle is kept resident; a long checkpointed step (tiles and recomputes of different
    sizes) left 0.15-0.7 MiB per token of such heap on SmolLM2-135M (docs/performance.md, "Long context").
    The cost is a page fault per new page of each large block (measured in ``benchmarks/train_throughput.py``).

    Args: nbytes: the threshold in bytes, an ``int`` in ``[0, 32 MiB]``.
    Returns: True if glibc accepted it; False, with nothing changed, off Linux, without glibc (musl's
    ``mallopt`` is a stub), when ``MALLOC_MMAP_THRESHOLD_`` is in the environment (the user's own setting,
    which glibc applied at start-up, stays), or for a value glibc would refuse. Never raises.
    Source: glibc manual, "Malloc Tunable Parameters" (``M_MMAP_THRESHOLD`` = -3, the dynamic threshold,
    ``MALLOC_MMAP_THRESHOLD_``); mallopt(3).
    """
    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes <= _MMAP_THRESHOLD_MAX:
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            return False
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        return mallopt(_M_MMAP_THRESHOLD, nbytes) == 1
    except (OSError, AttributeError, ValueError):
        return False


def long_context_malloc(device_type: str, cutoff_len: int) -> bool:
    """At the start of CPU training with gradient checkpointing: :func:`set_mmap_threshold` when rows may be longer
    than :data:`TILE_TOKENS` (``cutoff_len`` > 2048 tokens), where it pays; otherwise nothing.

    Measured (SmolLM2-135M, LoRA r8, bf16, checkpointing, one thread; ``benchmarks/results/mmap_threshold_s6.json``):
    one row of 4096 tokens, peak RSS 915 MiB instead of 1744, CPU time per step +24%; 4 rows of 512, peak RSS
    852 MiB instead of 1068-1131 but CPU time +45% (a fresh mapping is page-faulted for every large tensor),
    hence not applied to short rows. ``MALLOC_MMAP_THRESHOLD_`` in the environment overrides either way.

    Args: device_type: the training device's type (``"cpu"``, ``"cuda"``, ...); cutoff_len: the longest row.
    Returns: whether the threshold was set (False off the CPU, for short rows, and where
    :func:`set_mmap_threshold` declines). Never raises.
    """
    if device_type != "cpu" or int(cutoff_len or 0) <= TILE_TOKENS:
        return False
    return set_mmap_threshold()

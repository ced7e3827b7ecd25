"""``Linear4bit``: a frozen 4-bit (NF4/FP4) linear layer for QLoRA, and the loader hook ``place_quantized``.

Source: Dettmers et al., 2023, "QLoRA" (arXiv:2305.14314), eq. 5-6: ``Y = X @ doubleDequant(c1, c2, W).T``
with the 4-bit weight frozen; gradients flow to the input (and to LoRA adapters around the layer), never
to the quantized weight. Storage follows bitsandbytes' ``Linear4bit`` (``weight`` packed uint8 plus
``absmax`` / ``quant_map`` / ``nested_*``), so ``llmtune.quant.bnb`` converts to and from its checkpoints.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from llmtune.errors import LLMTuneError
from llmtune.kernels import nf4 as K
from llmtune.quant.nf4 import QuantState, quantize_4bit


class _Linear4bitFunction(torch.autograd.Function):
    """``y = x @ W.T`` with a frozen 4-bit ``W``; backward gives ``grad_x = grad_y @ W`` only. ``nested``
    (``llmtune.kernels.nf4.Nested`` or None): ``absmax`` holds double-quantized uint8 codes, which the
    kernels expand themselves (no float32 copy of the scales per call)."""

    @staticmethod
    def forward(ctx, x2d, packed, absmax, code, out_features, blocksize, *nested):
        # ``nested`` is optional (callers with the six float-absmax arguments keep working)
        ctx.n_inputs = 6 + len(nested)
        nested = nested[0] if nested else None
        ctx.save_for_backward(packed, absmax, code)
        ctx.in_features = x2d.shape[-1]
        ctx.blocksize = blocksize
        ctx.nested = nested
        return K.matmul_4bit(x2d, packed, absmax, code, out_features, blocksize, nested=nested)

    @staticmethod
    def backward(ctx, grad_out):
        packed, absmax, code = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = K.matmul_4bit_grad_input(grad_out.contiguous(), packed, absmax, code, ctx.in_features,
                                              ctx.blocksize, nested=ctx.nested)
        return (grad_x,) + (None,) * (ctx.n_inputs - 1)


class Linear4bit(nn.Module):
    """A linear layer ``y = x @ W.T + b`` whose weight ``W (out_features, in_features)`` is stored in 4 bits.

    Buffers (not trainable; names as bitsandbytes' checkpoint keys): ``weight`` packed uint8
    ``(ceil(out*in/2),)`` two codes per byte, first value in the high nibble; ``absmax`` float32
    ``(nblocks,)`` or, with double quantization, uint8 codes; ``quant_map`` float32 ``(16,)``; with double
    quantization also ``nested_absmax`` float32 ``(ceil(nblocks/256),)``, ``nested_quant_map`` float32
    ``(256,)`` and ``nested_offset`` float32 0-d. ``nblocks = ceil(out*in / blocksize)``.

    ``in_features`` need not be a multiple of ``blocksize``: the flattened weight is cut into blocks of
    ``blocksize`` (blocks then straddle rows) and the last block may be partial, which is the same as
    padding the flattened weight with zeros to a multiple of ``blocksize`` (bitsandbytes' layout).

    ``forward(x)``: ``x (..., in_features)`` of any float dtype is cast to ``compute_dtype`` (bfloat16 by
    default), multiplied by the dequantized weight (CUDA: the NF4 decode kernel for up to 16 rows, else the
    tiled kernel or dequantize-then-cuBLAS as ``llmtune.kernels.nf4.training_path`` picks; CPU:
    dequantize-then-matmul), the bias added, and the result cast back to ``x.dtype``: ``(..., out_features)``.
    Double-quantized scales are passed to the kernels as stored (expanded inside them).
    Autograd reaches ``x`` (``grad_x = grad_y @ W``) and a trainable bias, never the 4-bit weight.

    Memory: 0.5 byte/param + 1/64 byte (uint8 absmax) + 4/(64*256) byte = 4.127 bits/param with double
    quantization; 0.5 + 4/64 = 4.5 bits/param without.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16, quant_type: str = "nf4", blocksize: int = 64,
                 double_quant: bool = True, weight_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.nested_blocksize = 256
        self.weight_dtype = weight_dtype  # the dtype of the original weight (bitsandbytes' QuantState.dtype)
        n = in_features * out_features
        nblocks = -(-n // blocksize)
        self.register_buffer("weight", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(nblocks, dtype=torch.uint8 if double_quant else torch.float32,
                                                   device=device))
        self.register_buffer("quant_map", torch.zeros(16, dtype=torch.float32, device=device))
        if double_quant:
            self.register_buffer("nested_absmax", torch.zeros(-(-nblocks // 256), dtype=torch.float32, device=device))
            self.register_buffer("nested_quant_map", torch.zeros(256, dtype=torch.float32, device=device))
            self.register_buffer("nested_offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.nested_absmax = self.nested_quant_map = self.nested_offset = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   compute_dtype: torch.dtype = torch.bfloat16, quant_type: str = "nf4", double_quant: bool = True,
                   blocksize: int = 64) -> "Linear4bit":
        """Quantize a dense ``weight (out_features, in_features)`` (any float dtype/device) into a new layer.

        ``bias (out_features,)`` is copied in ``compute_dtype`` (frozen). The layer lives on
        ``weight.device``. Raises :class:`LLMTuneError` for a weight that is not 2-D float, a bias of the
        wrong length, or an unknown ``quant_type``.
        """
        if weight.dim() != 2 or not weight.is_floating_point():
            raise LLMTuneError(f"Linear4bit.from_float needs a 2-D float weight (out, in), got "
                               f"{tuple(weight.shape)} {weight.dtype}.")
        out_f, in_f = weight.shape
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise LLMTuneError(f"Linear4bit.from_float: bias has shape {tuple(bias.shape)}, expected ({out_f},).")
        packed, state = quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
        layer = cls(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype, quant_type=quant_type,
                    blocksize=blocksize, double_quant=double_quant, weight_dtype=weight.dtype, device=weight.device)
        layer.load_quant_state(packed, state)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias.to(compute_dtype))
        return layer

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None,
                         compute_dtype: torch.dtype = torch.bfloat16) -> "Linear4bit":
        """A layer holding an already-quantized 2-D weight (``state.shape == (out, in)``)."""
        if len(state.shape) != 2:
            raise LLMTuneError(f"Linear4bit needs a 2-D quantized weight, got shape {tuple(state.shape)}.")
        out_f, in_f = (int(s) for s in state.shape)
        layer = cls(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype, quant_type=state.quant_type,
                    blocksize=state.blocksize, double_quant=state.nested, weight_dtype=state.dtype,
                    device=packed.device)
        layer.load_quant_state(packed, state)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias.to(compute_dtype))
        return layer

    def load_quant_state(self, packed: torch.Tensor, state: QuantState) -> None:
        """Copy a packed weight and its :class:`QuantState` into this layer's buffers (shapes must match)."""
        if tuple(state.shape) != (self.out_features, self.in_features) or state.nested != self.double_quant:
            raise LLMTuneError(f"quantized weight of shape {tuple(state.shape)} (double_quant={state.nested}) does "
                               f"not fit Linear4bit({self.in_features}, {self.out_features}, "
                               f"double_quant={self.double_quant}).")
        if packed.numel() != self.weight.numel() or state.absmax.numel() != self.absmax.numel():
            raise LLMTuneError(f"quantized weight has {packed.numel()} bytes and {state.absmax.numel()} scales; "
                               f"Linear4bit({self.in_features}, {self.out_features}, blocksize={self.blocksize}) "
                               f"expects {self.weight.numel()} and {self.absmax.numel()}.")
        self.quant_type, self.blocksize, self.weight_dtype = state.quant_type, state.blocksize, state.dtype
        self.nested_blocksize = state.nested_blocksize
        dev = self.weight.device
        weight = packed.reshape(-1).to(device=dev, dtype=torch.uint8).clone()
        absmax = state.absmax.reshape(-1).to(dev).clone()
        # after shardable_storage() these are frozen parameters: keep them so
        self.weight = nn.Parameter(weight, requires_grad=False) if isinstance(self.weight, nn.Parameter) else weight
        self.absmax = nn.Parameter(absmax, requires_grad=False) if isinstance(self.absmax, nn.Parameter) else absmax
        self.quant_map = state.code.float().to(dev).clone()
        if state.nested:
            self.nested_absmax = state.nested_absmax.float().to(dev).clone()
            self.nested_quant_map = state.nested_code.float().to(dev).clone()
            self.nested_offset = torch.as_tensor(state.offset, dtype=torch.float32).reshape(()).to(dev).clone()

    def shardable_storage(self, absmax: bool = True) -> "Linear4bit":
        """Turn the packed ``weight`` (uint8 ``(ceil(out*in/2),)``) and ``absmax`` (``(nblocks,)``) buffers into
        frozen ``nn.Parameter`` s (``requires_grad=False``), in place; returns ``self``.

        FSDP2 (``torch.distributed.fsdp.fully_shard``) shards parameters only, each along dim 0; both tensors
        are flat, so every rank then keeps ``1/world`` of the 4-bit storage and FSDP2 all-gathers the whole
        flat tensor before this layer's forward (and backward), which therefore sees the usual unsharded
        layout. Names, dtypes, values and ``state_dict`` keys are unchanged; the small code books
        (``quant_map``, ``nested_*``) stay replicated buffers. ``absmax=False`` converts ``weight`` alone.
        Idempotent. Used by ``llmtune.train.wrap.apply_fsdp``; single-process runs keep buffers.
        """
        for name in ("weight", "absmax") if absmax else ("weight",):
            t = getattr(self, name)
            if not isinstance(t, nn.Parameter):
                del self._buffers[name]
                setattr(self, name, nn.Parameter(t, requires_grad=False))
        return self

    # -- use --------------------------------------------------------------------------------------------
    @property
    def quant_state(self) -> QuantState:
        """The :class:`QuantState` view of the buffers (tensors shared, not copied)."""
        return QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                          dtype=self.weight_dtype, blocksize=self.blocksize, quant_type=self.quant_type,
                          code=self.quant_map, offset=self.nested_offset, nested_absmax=self.nested_absmax,
                          nested_code=self.nested_quant_map, nested_blocksize=self.nested_blocksize)

    def absmax_float(self) -> torch.Tensor:
        """De-nested float32 block scales ``(nblocks,)``."""
        return self.quant_state.get_absmax()

    def nested(self) -> Optional[K.Nested]:
        """The double quantization of ``absmax`` as the kernels take it (``llmtune.kernels.nf4.Nested``:
        nested absmax, nested code, offset, nested block size), or None without double quantization."""
        if not self.double_quant:
            return None
        return K.Nested(self.nested_absmax, self.nested_quant_map, self.nested_offset, self.nested_blocksize)

    def dequantize(self) -> torch.Tensor:
        """The dense weight ``(out_features, in_features)`` in ``compute_dtype``."""
        w = K.dequantize_4bit(self.weight, self.absmax, self.quant_map, self.out_features * self.in_features,
                              self.blocksize, self.compute_dtype, nested=self.nested())
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in_features)`` -> ``(..., out_features)`` in ``x.dtype`` (see the class docstring)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear4bit expects last dim {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features).to(self.compute_dtype)
        # the scales go to the kernels as stored (uint8 + nested state when double-quantized): the decode and
        # dequantization kernels expand them in registers, so no float32 copy is made per call
        y = _Linear4bitFunction.apply(x2d, self.weight, self.absmax, self.quant_map, self.out_features,
                                      self.blocksize, self.nested())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def storage_bytes(self) -> int:
        """Bytes of the 4-bit weight and its scales/code books (the bias not included)."""
        ts = [self.weight, self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map, self.nested_offset]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")


#: Decoder-layer linear names the loader hook quantizes (HF checkpoint names).
_QUANT_NAME = re.compile(
    r"^(?P<module>model\.layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|"
    r"mlp\.(?:experts\.\d+\.|shared_expert\.)?(?:gate|up|down)_proj))\.(?P<kind>weight|bias)$")


def place_quantized(model: nn.Module, name: str, tensor: torch.Tensor, compute_dtype: torch.dtype,
                    quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64) -> bool:
    """Loader hook: quantize a decoder-layer linear weight into a :class:`Linear4bit` placed in ``model``.

    For ``name`` = ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`` or ``model.layers.{i}.mlp.{gate,up,
    down}_proj.weight``, the target module (an ``nn.Linear``, possibly on the meta device) is replaced by
    ``Linear4bit.from_float(tensor, ...)`` on ``tensor.device`` and True is returned. Biases (Qwen2's q/k/v):
    a ``.bias`` arriving after its weight is copied into the Linear4bit (True); one arriving before returns
    False, the loader fills the ``nn.Linear`` as usual, and the weight's call then keeps that bias. A bias
    that never arrives stays zero. Every other name (embeddings, norms, ``lm_head``) returns False and stays
    dense.

    Args:
        model: a :class:`llmtune.models.transformer.Transformer` (HF module names).
        name: checkpoint tensor name. tensor: its value (float, ``(out, in)`` for a weight).
        compute_dtype: the dtype of the layer's matmuls and bias (the model's dtype, e.g. bfloat16).
        quant_type: "nf4" or "fp4". double_quant: 8-bit absmax scales. blocksize: 64.
    Raises:
        LLMTuneError: the tensor's shape does not match the module's ``(out_features, in_features)``.
    """
    m = _QUANT_NAME.match(name)
    if m is None:
        return False
    parent_name, _, child = m.group("module").rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        return False
    target = getattr(parent, child, None)
    if m.group("kind") == "bias":
        if isinstance(target, Linear4bit) and target.bias is not None:
            if tuple(tensor.shape) != (target.out_features,):
                raise LLMTuneError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                                   f"({target.out_features},): the checkpoint does not match the config.")
            with torch.no_grad():
                target.bias.copy_(tensor.to(target.bias.dtype))
            return True
        return False
    if isinstance(target, Linear4bit):
        old_bias = target.bias
        expect = (target.out_features, target.in_features)
        has_bias = old_bias is not None
    elif isinstance(target, nn.Linear):
        old_bias = target.bias
        expect = (target.out_features, target.in_features)
        has_bias = old_bias is not None
    else:
        return False
    if tuple(tensor.shape) != expect:
        raise LLMTuneError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model expects {expect}: "
                           f"the checkpoint does not match the config.")
    bias = None
    if has_bias:
        bias = torch.zeros(expect[0], dtype=compute_dtype, device=tensor.device)
        if old_bias is not None and not old_bias.is_meta:
            bias = old_bias.detach().to(device=tensor.device, dtype=compute_dtype)
    layer = Linear4bit.from_float(tensor, bias=bias, compute_dtype=compute_dtype, quant_type=quant_type,
                                  double_quant=double_quant, blocksize=blocksize)
    setattr(parent, child, layer)
    return True

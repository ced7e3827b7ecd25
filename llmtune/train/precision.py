"""Devices and dtypes of a training run: where it runs, the dtype the base is loaded in (and the base loaded
there: step 3 of :func:`llmtune.train.setup.run_train`), the autocast dtype.

Sources: mixed precision with ``torch.autocast`` and ``GradScaler`` (Micikevicius et al., 2018); oneDNN's
bfloat16 support query for the CPU.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, Optional

import torch
from torch import nn

from llmtune import runs
from llmtune.errors import LLMTuneError, notice
from llmtune.kernels import set_enabled as set_kernels_enabled


def train_device(config: Any) -> str:
    """The device of a run: ``config.device`` when set, else ``cuda`` when available, else ``cpu``."""
    if config.device:
        return str(config.device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_supports_bf16() -> bool:
    """True when this CPU runs bfloat16 matrix products natively (oneDNN AVX512-BF16/AMX or AVX512 core)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - builds without oneDNN
        return False


def load_dtype(config: Any, device_type: str) -> torch.dtype:
    """The dtype to load the base model in.

    Full fine-tuning: float32 (the trained weights are float32; bf16/fp16 then mean autocast). LoRA/freeze:
    bfloat16 for ``bf16`` (and for ``fp16`` on a CPU that supports bfloat16), float16 for ``fp16`` on CUDA,
    else float32; the trainable parameters are upcast to float32 by ``apply_lora``/``apply_freeze``.
    """
    if config.finetuning_type == "full":
        return torch.float32
    if config.bf16:
        return torch.bfloat16
    if config.fp16:
        if device_type == "cpu":
            return torch.bfloat16 if cpu_supports_bf16() else torch.float32
        return torch.float16
    return torch.float32


def load_base_model(cfg: Any, reference: bool = False) -> torch.nn.Module:
    """Step 3 of a run: the base model with its adapter chain merged (a LoRA output folder as
    ``model_name_or_path`` loads its base and merges the chain; ``adapter_name_or_path`` adds adapters), on
    :func:`train_device` in :func:`load_dtype`, 4-bit when ``quantization_bit``; the Triton kernels switched
    on or off (``use_kernels``) first. ``model.adapter_chain`` is the chain applied: the one the outputs record.

    ``reference``: the reference policy ``ref_model`` instead, with ``ref_model_adapters`` merged, loaded the
    same way (same dtype and device) but never quantized (the stage freezes it:
    :func:`llmtune.train.stages.pref.reference_policy`).

    Raises:
        LLMTuneError: the errors of :func:`llmtune.runs.load_model` (paths, formats, shapes, quantization).
    """
    device = train_device(cfg)
    dtype = load_dtype(cfg, device.split(":")[0])
    set_kernels_enabled(cfg.use_kernels)  # Triton kernels on CUDA (llmtune.kernels); off: PyTorch references
    name, adapters = (cfg.ref_model, cfg.ref_model_adapters) if reference else (cfg.model_name_or_path,
                                                                                cfg.adapter_name_or_path)
    return runs.load_model(name, dtype=dtype, device=device, adapter_name_or_path=adapters,
                           quantization_bit=None if reference else cfg.quantization_bit,
                           quantization_type=cfg.quantization_type, double_quantization=cfg.double_quantization)


def resolve_precision(bf16: bool, fp16: bool, device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype for the ``bf16``/``fp16`` flags on ``device_type`` (None = float32, no autocast).

    ``fp16`` on a CPU: float16 arithmetic there is about 18x slower than float32, so bfloat16 autocast is
    used where the CPU supports it (else float32), with one notice. Raises :class:`LLMTuneError` when
    both flags are set.
    """
    if bf16 and fp16:
        raise LLMTuneError("bf16 and fp16 are both true; set only one of them")
    if bf16:
        return torch.bfloat16
    if fp16:
        if device_type == "cpu":
            if cpu_supports_bf16():
                notice("fp16 on a CPU: float16 arithmetic is ~18x slower than float32 there; training with "
                       "bfloat16 autocast instead (set bf16: true to silence this)")
                return torch.bfloat16
            notice("fp16 on a CPU: float16 arithmetic is ~18x slower than float32 there and this CPU lacks "
                   "bfloat16 support; training in float32 instead (remove fp16 to silence this)")
            return None
        return torch.float16
    return None


@contextlib.contextmanager
def frozen_weights_cast(model: nn.Module, dtype: Optional[torch.dtype], merge_adapters: bool = False,
                        pack: bool = False) -> Iterator[None]:
    """Inside the context every frozen float32 ``nn.Linear`` weight of ``model`` is a ``dtype`` copy, cast once.

    Under ``torch.autocast(dtype=dtype)`` a linear layer casts its float32 weight to ``dtype`` on every call;
    autocast caches that cast only for leaf tensors that require grad, so a frozen base (LoRA) is cast again at
    every decode step of a rollout (on the CPU the cast costs more than the bf16 matmul). Holding the cast copy
    gives the same ``dtype`` operands, hence the same outputs, once per context instead of once per call. A tied
    ``lm_head`` gets its own copy (the embedding keeps its float32 weight); the original parameters are put back
    on exit, whatever happens. Memory: one ``dtype`` copy of the frozen linear weights while inside.

    With ``merge_adapters`` every :class:`~llmtune.peft.LoraLinear` over a frozen, unquantized ``nn.Linear`` runs
    on one copy of its merged weight ``W0 + s B A`` (LoRA, Hu et al. 2021, section 4.1; DoRA rows rescaled:
    :meth:`~llmtune.peft.LoraLinear.merged_weight`, computed in float32, then cast to ``dtype``) with its adapter
    path switched off, so a decode step does one product per layer instead of three (on this CPU, at 8 rows, the
    two rank-r products and their casts took about half the time of the base product). The layer then computes
    ``x @ bf16(W0 + s B A)`` instead of ``x @ bf16(W0) + s (x @ bf16(A)) @ bf16(B)``: the same function up to
    bfloat16 rounding, not bitwise the same logits. Meant for rollouts, whose tokens only need to be samples of
    the current policy (GRPO/PPO recompute the log-probs they train on). Quantized bases, disabled adapters,
    adapters merged in place and sharded (FSDP) weights are left as they are. Memory: one merged copy of each
    adapted weight while inside.

    Args:
        model: any module; only ``nn.Linear`` layers whose weight is float32 and frozen are touched.
        dtype: the autocast dtype; ``None`` or float32 = nothing is cast (merged weights stay float32).
            Use it only inside that autocast.
        merge_adapters: merge the active adapters into the copies (above); no gradient flows to the adapters
            inside (``torch.no_grad``/``inference_mode`` use only).
        pack: on the CPU with ``dtype`` bfloat16, every frozen bfloat16 ``nn.Linear`` (the cast and merged
            copies included) runs on oneDNN's prepacked (blocked) copy of its weight
            (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``): the same bfloat16 products
            bitwise (checked once per process on a probe, else nothing is packed), 1.4-1.7x faster at decode's
            few rows on this CPU, which is what a rollout's decode step spends most of its time in. The packed
            copy replaces the cast or merged copy (the module keeps its original weight meanwhile); the output
            head's packed copy is kept between contexts while its weight is unchanged (one bf16 copy of it for
            the run). Inference only: a packed layer raises ``RuntimeError`` if asked for a gradient. Each
            decoder layer's q|k|v and gate|up projections, when all of them are packed, run as one packed product
            each (attributes ``packed_qkv`` / ``packed_gate_up`` of the attention / MLP module, removed on exit):
            the same columns bitwise, fewer and wider weight reads (:func:`_fuse_projections`).

    Source: ``torch.autocast``'s weight-cast cache rule (leaf tensors with ``requires_grad``), PyTorch AMP docs.
    """
    from llmtune.peft import LoraLinear
    from llmtune.peft.layers import is_quantized

    cast = dtype is not None and dtype != torch.float32
    swapped: list[tuple[nn.Linear, nn.Parameter]] = []
    silenced: list[tuple[nn.Module, list]] = []
    packed: list[nn.Module] = []
    owners: list[tuple[nn.Module, str]] = []
    modules = list(model.modules())   # one walk of the model for the steps below
    try:
        if merge_adapters:
            for m in modules:
                base = getattr(m, "base_layer", None)
                if not isinstance(m, LoraLinear) or m.adapters_disabled or m.merged_adapters \
                        or not isinstance(base, nn.Linear) or is_quantized(base) or base.weight.requires_grad \
                        or type(base.weight) is not nn.Parameter \
                        or not [n for n in m.active_adapters if n in m.lora_A]:
                    continue
                w = base.weight
                with torch.autocast(w.device.type, enabled=False):   # the merge itself in float32
                    merged = _merged_copy(m, w, dtype if cast else w.dtype)
                base.weight = nn.Parameter(merged, requires_grad=False)
                swapped.append((base, w))
                silenced.append((m, m.active_adapters))
                m.active_adapters = []
        if cast:
            for m in modules:
                w = m.weight if isinstance(m, nn.Linear) else None   # (a LoRA layer's ``weight`` is computed)
                if isinstance(w, nn.Parameter) and w.dtype == torch.float32 and not w.requires_grad:
                    m.weight = nn.Parameter(w.detach().to(dtype), requires_grad=False)
                    swapped.append((m, w))
        if pack and cast and dtype == torch.bfloat16 and packed_linear_available():
            originals = {id(m): w for m, w in swapped}
            _fuse_projections(modules, dtype, {id(m) for m, _ in silenced}, originals, packed, owners)
            for m in modules:
                if _packable(m, dtype):
                    w = m.weight
                    # the output head's own weight (tied to the embedding, frozen): packed once while unchanged
                    mine = id(m) not in originals and m is getattr(model, "lm_head", None)
                    hit = _PACKED.get(m) if mine else None
                    if hit is None or hit[0] is not w or hit[1] != w._version:
                        hit = (w, w._version, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 8))
                        if mine:
                            _PACKED[m] = hit
                    m.forward = _packed_forward(hit[2], dtype, None if m.bias is None else m.bias.detach().to(dtype))
                    packed.append(m)
                    if id(m) in originals:   # the packed copy stands for the cast/merged one: free that
                        m.weight = originals[id(m)]
        yield
    finally:
        for m in packed:
            del m.forward
        for m, name in owners:
            delattr(m, name)
        for m, w in reversed(swapped):
            m.weight = w
        for m, names in silenced:
            m.active_adapters = names


_PACK_OK: Optional[bool] = None


def packed_linear_available() -> bool:
    """Whether oneDNN's prepacked bfloat16 linear works in this torch build and gives ``F.linear``'s values
    bitwise (probed once per process on small random operands; any error = False)."""
    global _PACK_OK
    if _PACK_OK is None:
        try:
            g = torch.Generator().manual_seed(0)
            w = torch.randn(40, 72, generator=g).to(torch.bfloat16)
            x = torch.randn(3, 72, generator=g).to(torch.bfloat16)
            b = torch.randn(40, generator=g).to(torch.bfloat16)
            p = torch.ops.mkldnn._reorder_linear_weight(w, 8)
            _PACK_OK = bool(torch.backends.mkldnn.is_available() and torch.equal(
                torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], ""), nn.functional.linear(x, w, b)))
        except Exception:   # builds without oneDNN, or without these ops
            _PACK_OK = False
    return _PACK_OK


#: the packed output head weight kept between contexts (a frozen, usually tied ``lm_head`` is packed once a run)
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _packable(m: nn.Module, dtype: torch.dtype) -> bool:
    """Whether ``m`` is a frozen ``dtype`` CPU ``nn.Linear`` with its own forward (what ``pack`` packs)."""
    if not isinstance(m, nn.Linear):   # first: a LoRA layer's ``weight`` is a computed merge
        return False
    w = m.weight
    return isinstance(w, nn.Parameter) and w.dtype == dtype and not w.requires_grad \
        and w.device.type == "cpu" and "forward" not in m.__dict__


def _fuse_projections(modules: list, dtype: torch.dtype, silenced: set, originals: dict, packed: list,
                      owners: list) -> None:
    """``pack``'s fused products: per decoder layer, q|k|v of :class:`~llmtune.models.transformer.Attention` and
    gate|up of its dense :class:`~llmtune.models.transformer.MLP` as one prepacked weight (their rows
    concatenated, biases too) when each projection is a packable linear (:func:`_packable`) or a LoRA layer
    merged here (``silenced``: its base layer). Concatenating output rows leaves each output column's product
    as it was (the same bfloat16 values bitwise, checked in tests); one wide product reads the weights at a
    higher bandwidth than three narrow ones (30 layers at 8 rows: 20.7 -> 17.0 ms a step on this CPU).

    The owner gets the fused forward ``x [..., in] -> [..., sum(out)]`` as attribute ``packed_qkv`` /
    ``packed_gate_up`` (its forward splits the output); each projection's linear gets a forward that slices
    its columns out of the fused product (correct if called alone) and, like a packed linear, its original
    weight back (``originals``). Appends those linears to ``packed`` and the ``(owner, attribute)`` pairs to
    ``owners`` (the context removes both on exit). ``modules``: the model's modules.
    """
    from llmtune.models.transformer import MLP, Attention

    kinds = {Attention: (("q_proj", "k_proj", "v_proj"), "packed_qkv"), MLP: (("gate_proj", "up_proj"),
                                                                              "packed_gate_up")}
    for mod in modules:
        kind = kinds.get(type(mod))
        if kind is None:
            continue
        lins = [getattr(mod, n) for n in kind[0]]
        lins = [m.base_layer if id(m) in silenced else m for m in lins]
        if not all(_packable(m, dtype) for m in lins) or len({m.bias is None for m in lins}) != 1 \
                or len({m.in_features for m in lins}) != 1:
            continue
        w = torch.cat([m.weight.detach() for m in lins])
        bias = None if lins[0].bias is None else torch.cat([m.bias.detach().to(dtype) for m in lins])
        whole = _packed_forward(torch.ops.mkldnn._reorder_linear_weight(w, 8), dtype, bias)
        setattr(mod, kind[1], whole)
        owners.append((mod, kind[1]))
        start = 0
        for m in lins:
            m.forward = _sliced(whole, start, start + m.out_features)
            start += m.out_features
            packed.append(m)
            if id(m) in originals:
                m.weight = originals[id(m)]


def _sliced(whole, start: int, end: int):
    """A forward returning columns ``start:end`` of ``whole(x)`` (a fused projection called alone)."""
    return lambda x: whole(x)[..., start:end].contiguous()


#: the float32 merge runs on row blocks of this many elements (1 MiB: the temporary stays in a core's cache)
_MERGE_ELEMENTS = 2**18


def _merged_copy(m: nn.Module, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W0 + s B A`` computed in float32 and rounded once to ``dtype`` (a new tensor). For a single plain LoRA
    adapter on an unmerged layer: one ``addmm_`` per block of rows (:data:`_MERGE_ELEMENTS`), so the float32
    temporary stays in the cache. Each element is its own rank-``r`` sum, so the values are those of merging the
    whole matrix at once (bitwise, checked on the 135M model); on this CPU the merge of its 210 layers took 176 ->
    103 ms (one thread, median of 10). Else :meth:`~llmtune.peft.LoraLinear.merged_weight` (DoRA, several
    adapters, merged ones)."""
    names = [n for n in m.active_adapters if n in m.lora_A]
    if len(names) != 1 or m.use_dora[names[0]] or m.merged_adapters:
        return m.merged_weight().to(dtype)
    n = names[0]
    a, b, s = m.lora_A[n].weight.float(), m.lora_B[n].weight.float(), m.scaling[n]
    w = w.detach()
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    step = max(1, _MERGE_ELEMENTS // max(1, w.shape[1]))
    for r in range(0, w.shape[0], step):
        out[r : r + step] = w[r : r + step].to(torch.float32, copy=True).addmm_(b[r : r + step], a, alpha=s)
    return out


def _packed_forward(packed: torch.Tensor, dtype: torch.dtype, bias: Optional[torch.Tensor]):
    """A linear forward on a prepacked ``dtype`` weight: ``x [..., in]`` -> ``[..., out]`` in ``dtype``."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("frozen_weights_cast(pack=True) is for inference: a packed linear has no gradient")
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, bias, "none", [], "")
    return forward

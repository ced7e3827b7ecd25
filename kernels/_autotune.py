"""Tile configurations for the Triton matmul-shaped kernels (NF4 and fused LoRA); imported lazily with them.

On a GPU the tiled kernels are wrapped in ``triton.autotune`` over :func:`matmul_configs` (the NF4 decode
kernel picks its tile by a rule, ``_nf4_decode``): the first call for a new key (:func:`matmul_key`: the
size bucket of M, N, K, the variant flags, and the tensors' dtypes) benchmarks every config of the variant
that fits and keeps the fastest, so each layer shape is tuned once per process and variant. The lists
cover Ampere (A100: 164 KiB shared memory per SM) and
Hopper (H100/H200: 228 KiB): large 128 x 256 tiles with 3 stages and 8 warps for Hopper's wider tensor
cores, 64-128 tiles with 4-5 stages for Ampere; a config that does not fit a GPU's shared memory is
skipped by the autotuner (``OutOfResources`` counts as infinitely slow).

Under Triton's interpreter (``TRITON_INTERPRET=1``: CPU tensors, the tests) the list is ONE small fixed
config, so nothing is benchmarked (autotuning in the interpreter would take minutes) and small test shapes
still span several tiles. The choice is made when the kernel module is imported (the tests reload the
modules after setting the variable). ``LLMTUNE_AUTOTUNE=0`` gives one fixed config per variant on the GPU too (one
compilation per variant instead of five: the compiled kernel tests of ``benchmarks/gpu_check.py`` use it,
since they would otherwise tune every small test shape).
"""

from __future__ import annotations

import inspect
import os

import triton


def quick_bench(fn, quantiles=None, reps: int = 8):
    """Milliseconds of one call of ``fn`` on the current CUDA device: median (and the 20th/80th percentiles
    when ``quantiles`` is given, as ``triton.testing.do_bench`` returns them) of ``reps`` calls timed with
    CUDA events after one warm-up call. Unlike ``do_bench`` it allocates nothing (no 256 MiB L2-flush
    buffer, which would land inside a training step's peak memory when a new shape is tuned mid-step)."""
    import torch

    fn()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(start, end))
    pick = lambda q: times[min(reps - 1, int(q * reps))]  # noqa: E731
    return [pick(q) for q in quantiles] if quantiles is not None else pick(0.5)


def tuner_kwargs(prune: bool = True) -> dict:
    """Keyword arguments of ``triton.autotune`` shared by the kernels: :func:`quick_bench` (a few calls per
    config: a training step tunes a few dozen keys, and the fastest config stands out well within that)
    and, for the tiled kernels, :func:`prune_matmul`."""
    out: dict = {"prune_configs_by": {"early_config_prune": prune_matmul}} if prune else {}
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        out["do_bench"] = quick_bench
    else:  # Triton < 3.2: its own benchmark, with short timings
        out.update(warmup=5, rep=25)
    return out


def interpreting() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def autotuning() -> bool:
    """False when ``LLMTUNE_AUTOTUNE`` is ``0``/``false``/``no``/``off`` (one fixed config on the GPU)."""
    return os.environ.get("LLMTUNE_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def m_bucket(m: int) -> int:
    """Autotuning key for the row count ``M``: the next power of two, at least 16 and at most 8192, so a
    training run whose token count changes every batch is tuned a handful of times, not once per batch."""
    return max(16, min(8192, triton.next_power_of_2(max(1, int(m)))))


def matmul_configs(interpret_block: int = 32, nf4: bool = False) -> list:
    """Configs of the tiled kernels (meta-parameters ``BM``, ``BN``, ``BK``, ``GROUP_M``).

    Two groups in one list, told apart by :func:`for_variant` (the tuners' ``early_config_prune``):
    the half-precision configs (bf16/fp16 operands, tensor cores) and the float32 configs (float32
    operands; with ``IEEE=True`` full float32 products, which Triton lowers to FMA loops whose operands
    live in registers, so the tiles are smaller: 64 x 64 x 16(-32) with 8 warps; larger ones spill, as ``benchmarks/kernels_compile.py``
    shows). Every config is compiled once per process and kernel variant (1-4 s each on the host CPU).
    Every config here compiles without register spills for sm_80 and sm_90 with Triton 3.6 and 3.9.
    GPU, dense operands (the fused LoRA kernel): BLOCK_M x BLOCK_N x BLOCK_K in 64-128 x 64-128 x 32-64,
    num_warps 4/8, num_stages 3-4.
    GPU, 4-bit weight (``nf4=True``): the weight tile is gathered element by element (packed byte, code,
    block scale), and Triton's software pipeline stages every gather in registers and shared memory:
    64-128 x 64-128 x 32-64 tiles, 8 warps for the large ones, 3 stages (40-128 KiB of shared memory,
    under an A100's 163 KiB).
    The LoRA-fused variants keep one float32 accumulator (the rank-r term initialises it, in chunks of
    ``BR = 16`` ranks), so they need about the registers of the plain kernel.
    Interpreter: one config with ``interpret_block`` in every dimension; ``LLMTUNE_AUTOTUNE=0``: 64 x 64 x 64,
    4 warps (4-bit weight: 8 warps), 3 stages (float32: 64 x 64 x 16, 8 warps), which fit every GPU."""
    if interpreting():
        b = interpret_block
        return [_config(b, b, b, 4, 1, group_m=4)]
    f32 = [_config(64, 64, 16, 8, 3)]
    if not nf4:  # BK = 32 spills in the 4-bit kernels (their gathered tile is staged in registers too)
        f32.append(_config(64, 64, 32, 8, 3))
    if not autotuning():
        return _mark([_config(64, 64, 64, 8 if nf4 else 4, 3)], f32[:1])
    return _mark([_config(*t) for t in (_HALF_NF4 if nf4 else _HALF_DENSE)], f32)


#: The autotuned half-precision configs on the GPU, (BM, BN, BK, num_warps, num_stages) with GROUP_M = 8.
#: 4-bit weight: 8 warps for the large tiles: with 4 warps these tiles need 255+ registers and spill (the
#: gathered weight tile is staged in registers by the software pipeline), on sm_80 with Triton 3.6 at least.
_HALF_NF4 = ((128, 128, 32, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 8, 3), (64, 64, 32, 4, 3))
#: Dense operands: Hopper and Ampere 128 x 128 tiles (a 128 x 256 x 64 tile with 8 warps spills on sm_80),
#: then two for smaller problems.
_HALF_DENSE = ((128, 128, 64, 8, 4), (128, 128, 32, 4, 4), (64, 128, 64, 8, 4), (64, 64, 64, 4, 3))


def _config(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    """One tile config of the tiled kernels (a new object each call: :func:`_mark` tags it)."""
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages)


def _mark(half: list, fp32: list) -> list:
    """``half + fp32``, the float32 configs tagged (an attribute on the config object) for :func:`for_variant`."""
    for c in fp32:
        c.llmtune_fp32 = True
    return half + fp32


def for_variant(configs: list, fp32: bool) -> list:
    """The configs of ``configs`` that a variant launches: the float32 ones for float32 operands (full
    float32 ``IEEE`` products, or TF32 when allowed: float32 tiles of the half-precision sizes spill or
    exceed shared memory), the half-precision ones otherwise; a one-config list (the interpreter's) is
    kept as is."""
    if len(configs) <= 1:
        return list(configs)
    return [c for c in configs if getattr(c, "llmtune_fp32", False) == bool(fp32)]


def _fp32_operands(named_args: dict, kwargs: dict) -> bool:
    """Whether a launch multiplies float32 operands: ``IEEE`` set, or its first operand (``x_ptr``,
    ``a_ptr`` or ``g_ptr``) is a float32 tensor."""
    if kwargs.get("IEEE", named_args.get("IEEE", False)):
        return True
    for name in ("x_ptr", "a_ptr", "g_ptr"):
        t = named_args.get(name)
        if t is not None:
            return str(getattr(t, "dtype", "")) == "torch.float32"
    return False


def matmul_key(*flags: str) -> list:
    """Autotuning key of a tiled kernel: the M bucket, N, K and the kernel's variant flags ``flags`` (its
    constexpr arguments such as ``HAS_LORA``, ``HAS_BIAS``, ``UPCAST``, ``IEEE``, ``BR``), so the plain and
    the LoRA-fused variants (and bias / float32-mode / rank-block variants) never share a tuning entry.
    (Triton adds the tensors' dtypes itself.)"""
    return ["M_BUCKET", "N", "K", *flags]


def prune_matmul(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` of the tiled kernels: the configs of the variant (:func:`for_variant`: float32
    operands or not), then for few rows (M <= 64) drop the 128-row tiles (they would compute mostly
    padding), keeping at least one config."""
    configs = for_variant(configs, _fp32_operands(named_args, kwargs)) or configs[:1]
    m = named_args.get("M")
    if m is None or m > 64 or len(configs) <= 1:
        return configs
    kept = [c for c in configs if c.kwargs.get("BM", 0) <= 64]
    return kept or configs[:1]

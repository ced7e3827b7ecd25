"""Tile configurations for the Triton matmul-shaped kernels (NF4 and fused LoRA); imported lazily with them.

On a GPU the kernels are wrapped in ``triton.autotune`` over :func:`matmul_configs` (or
:func:`matvec_configs` for the NF4 decode kernel): the first call for a new key (the size bucket of M,
then N and K, and the tensors' dtypes) benchmarks every config that fits and keeps the fastest, so each
layer shape is tuned once per process. The lists cover Ampere (A100: 164 KiB shared memory per SM) and
Hopper (H100/H200: 228 KiB): large 128 x 256 tiles with 3 stages and 8 warps for Hopper's wider tensor
cores, 64-128 tiles with 4-5 stages for Ampere; a config that does not fit a GPU's shared memory is
skipped by the autotuner (``OutOfResources`` counts as infinitely slow).

Under Triton's interpreter (``TRITON_INTERPRET=1``: CPU tensors, the tests) the list is ONE small fixed
config, so nothing is benchmarked (autotuning in the interpreter would take minutes) and small test shapes
still span several tiles. The choice is made when the kernel module is imported (the tests reload the
modules after setting the variable). ``LLMTUNE_AUTOTUNE=0`` gives one fixed config on the GPU too (no
benchmarking at the first call: the compiled kernel tests of ``benchmarks/gpu_check.py`` use it, since
they would otherwise tune every small test shape).
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

    Five configs per list: every config is compiled once per process and kernel variant (1-4 s each on
    the host CPU), which the prepared GPU check pays inside its 5-minute budget.
    GPU, dense operands (the fused LoRA kernel): BLOCK_M x BLOCK_N x BLOCK_K in 64-128 x 64-256 x 32-64,
    num_warps 4/8, num_stages 3-4 (shared memory 48-144 KiB as compiled for sm_90 at a Llama-8B shape).
    GPU, 4-bit weight (``nf4=True``): the weight tile is gathered element by element (packed byte, code,
    block scale), and Triton's software pipeline stages every gather, so a stage costs about 9 bytes per
    weight element: 2-3 stages keep shared memory at 56-208 KiB (Hopper's 227 KiB; a config over an
    A100's 163 KiB is skipped there by the autotuner).
    Interpreter: one config with ``interpret_block`` in every dimension; ``LLMTUNE_AUTOTUNE=0``: 64 x 64 x 64,
    4 warps, 3 stages (fits every GPU)."""
    C = triton.Config
    if interpreting():
        b = interpret_block
        return [C({"BM": b, "BN": b, "BK": b, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    if not autotuning():
        return [C({"BM": 64, "BN": 64, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=3)]
    if nf4:
        return [
            C({"BM": 128, "BN": 128, "BK": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
            C({"BM": 128, "BN": 256, "BK": 32, "GROUP_M": 8}, num_warps=8, num_stages=2),
            C({"BM": 128, "BN": 64, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
            C({"BM": 128, "BN": 128, "BK": 32, "GROUP_M": 8}, num_warps=4, num_stages=2),
            C({"BM": 64, "BN": 64, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
        ]
    return [
        # Hopper: large tiles, deep enough pipelines (228 KiB of shared memory)
        C({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        C({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        # Ampere and smaller problems
        C({"BM": 128, "BN": 128, "BK": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        C({"BM": 64, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        C({"BM": 64, "BN": 64, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    ]


def prune_matmul(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` of the tiled kernels: for few rows (M <= 64) drop the 128-row tiles (they
    would compute mostly padding), keeping at least one config."""
    m = named_args.get("M")
    if m is None or m > 64 or len(configs) <= 1:
        return configs
    kept = [c for c in configs if c.kwargs.get("BM", 0) <= 64]
    return kept or configs[:1]


def matvec_configs() -> list:
    """Configs of the NF4 decode kernel (meta-parameters ``BN``, ``BK``): GPU: small ``BN`` so an 8B
    projection (N = 4096) gives several programs per SM of a 132-SM H100/H200, ``BK`` 128-512 so each
    program streams long runs of packed bytes. Interpreter: ``BN=64, BK=128``."""
    C = triton.Config
    if interpreting():
        return [C({"BN": 64, "BK": 128}, num_warps=4, num_stages=1)]
    if not autotuning():
        return [C({"BN": 32, "BK": 256}, num_warps=4, num_stages=3)]
    return [
        C({"BN": 16, "BK": 256}, num_warps=4, num_stages=3),
        C({"BN": 16, "BK": 512}, num_warps=4, num_stages=2),
        C({"BN": 32, "BK": 256}, num_warps=4, num_stages=3),
        C({"BN": 64, "BK": 128}, num_warps=4, num_stages=3),
    ]

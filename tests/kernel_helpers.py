"""Shared by the kernel tests: make sure the Triton kernels run under the interpreter on the CPU."""

import importlib


def interpret_fused_kernels(dev: str) -> None:
    """On the CPU (``dev == "cpu"``), re-define ``llmtune.kernels._fused_triton``'s kernels if they were
    defined before ``TRITON_INTERPRET=1`` was set (they would then be compiled for a GPU). No-op on CUDA."""
    if dev != "cpu":
        return
    from triton.runtime.interpreter import InterpretedFunction

    from llmtune.kernels import _fused_triton

    if not isinstance(_fused_triton._ce_kernel, InterpretedFunction):
        importlib.reload(_fused_triton)


def assert_close_scaled(got, want, tol: float, what: str = "") -> None:
    """``max |got - want| <= tol * max |want|`` (both moved to float64 on the CPU; shapes must match)."""
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = want.abs().max().item() + 1e-12
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"

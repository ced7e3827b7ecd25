"""Triton kernels, each beside its PyTorch reference; installed as the subpackage ``llmtune.kernels``.

Import as ``llmtune.kernels.<module>``, never as a top-level ``kernels`` (that name belongs to another
PyPI package). Triton is optional and imported only when a kernel is first launched on a CUDA tensor.

* ``nf4``: 4-bit (NF4/FP4) dequantization, fused matmuls and the input gradient (see docs/quantization.md).
"""

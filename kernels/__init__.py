"""Triton kernels, each beside its PyTorch reference; installed as the subpackage ``llmtune.kernels``.

Import as ``llmtune.kernels.<module>``, never as a top-level ``kernels`` (that name belongs to another
PyPI package). Triton is optional and imported only when a kernel is first launched on a CUDA tensor.

* ``nf4``: 4-bit (NF4/FP4) dequantization, fused matmuls and the input gradient, the decode kernel for
  M <= 16 (``_nf4_decode``) and the measured choice of training path (``training_path``, table
  ``nf4_paths.json``); see docs/quantization.md.
* ``rmsnorm``: RMSNorm forward/backward (also Qwen3's per-head q/k norm).
* ``rope``: rotary embedding of q and k (rotate-half), forward/backward.
* ``swiglu``: ``silu(gate) * up`` forward/backward.
* ``cross_entropy``: fused linear cross entropy and label log-probs (logits never stored).
* ``lora``: LoRA fused into the frozen layer's matmul (``x W^T + s (x A^T) B^T`` in one tiled matmul, and
  its input gradient; also on a 4-bit base), used by ``LoraLinear`` on CUDA.
* ``dispatch``: the switch (:func:`set_enabled`, env ``LLMTUNE_KERNELS=0``, config key ``use_kernels``) and
  the rule: Triton on CUDA when installed and enabled, the PyTorch reference elsewhere.
"""

from llmtune.kernels.dispatch import is_enabled, set_enabled, triton_available, use_triton

__all__ = ["is_enabled", "set_enabled", "triton_available", "use_triton"]

"""4-bit quantization for QLoRA: NF4/FP4 block-wise formats, ``Linear4bit``, the loader hook, bitsandbytes I/O.

See ``docs/quantization.md``. Public API:
``quantize_4bit``, ``dequantize_4bit``, ``quantize_nf4``, ``dequantize_nf4``, ``QuantState``, ``Linear4bit``,
``place_quantized`` (loader hook), and in ``llmtune.quant.bnb``: ``is_bnb_4bit_config``,
``linear4bit_from_bnb_tensors``, ``bnb_tensors_from_linear4bit``, ``BnbPlacer``.
"""

from llmtune.quant.linear4bit import Linear4bit, place_quantized
from llmtune.quant.nf4 import (FP4_CODE_VALUES, NF4_CODE_VALUES, QuantState, create_dynamic_map, dequantize_4bit,
                               dequantize_nf4, get_4bit_code, quantize_4bit, quantize_fp4, quantize_nf4)

__all__ = [
    "FP4_CODE_VALUES", "NF4_CODE_VALUES", "QuantState", "create_dynamic_map", "dequantize_4bit", "dequantize_nf4",
    "get_4bit_code", "quantize_4bit", "quantize_fp4", "quantize_nf4", "Linear4bit", "place_quantized",
]

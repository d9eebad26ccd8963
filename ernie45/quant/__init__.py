"""Weight-only quantization (int8 / int4 / 2-bit): packed format, RTN / GPTQ / HQQ methods, runtime modules with
a fused CPU kernel, checkpoint integration (`quantization_config`) and QAT building blocks.

    from ernie45.quant import quantize
    quantize("model_dir", "model_dir-int4", bits=4, method="gptq", calib="calib.jsonl")
    ernie45.load_model("model_dir-int4")   # quantized modules swapped in from config.json
"""

from .config import QuantizationConfig, default_spec
from .modules import dequantize_model, set_use_kernel
from .packing import PackedWeight, dequantize, pack_codes, unpack_codes
from .qat import convert_qat, prepare_qat
from .quantize import build_config, quantize, quantize_model
from .quantized_linear import QuantizedExperts, QuantizedLinear
from .spec import QuantSpec

__all__ = [
    "PackedWeight",
    "QuantSpec",
    "QuantizationConfig",
    "QuantizedExperts",
    "QuantizedLinear",
    "build_config",
    "convert_qat",
    "default_spec",
    "dequantize",
    "dequantize_model",
    "pack_codes",
    "prepare_qat",
    "quantize",
    "quantize_model",
    "set_use_kernel",
    "unpack_codes",
]

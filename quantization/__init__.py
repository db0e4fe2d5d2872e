"""dsv41.quantization: DeepSeek FP8 block (V3 float / V4 ue8m0 scales), FP4 e2m1 experts
(DeepSeek layout written, gpt-oss MXFP4 read), weight-only int8 / int4 (RTN and GPTQ) and
bitsandbytes NF4 / int8; streaming checkpoint conversion, dequantizing loaders and a quality report.

Checkpoint-level entry points (safetensors folder in -> folder out, bounded memory)::

    quantize_checkpoint(model_dir, out_dir, QuantSpec("fp8"))
    dequantize_checkpoint(quantized_dir, out_dir)
    load_dequantized_state_dict(path, dtype)         # official names, any supported format
    load_quantized_model(DeepseekV4ForCausalLM, path) # a model on CPU from any supported format
"""

from .checkpoint import (
    METHODS,
    QuantSpec,
    checkpoint_format,
    dequantize_checkpoint,
    is_quantized_checkpoint,
    iter_dequantized_tensors,
    load_dequantized_state_dict,
    quantize_checkpoint,
)
from .codecs import QuantizationError
from .loading import load_quantized_model

__all__ = [
    "METHODS",
    "QuantSpec",
    "QuantizationError",
    "checkpoint_format",
    "dequantize_checkpoint",
    "is_quantized_checkpoint",
    "iter_dequantized_tensors",
    "load_dequantized_state_dict",
    "load_quantized_model",
    "quantize_checkpoint",
]

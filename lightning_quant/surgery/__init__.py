"""Model surgery: swap Conv/Linear layers for quantized ones, the per-layer recipe, summaries and blocks."""

from lightning_quant.surgery.blocks import find_blocks
from lightning_quant.surgery.capture import Call, Capture, capture, modes_kept, quantizers_disabled
from lightning_quant.surgery.coverage import unquantized_layers
from lightning_quant.surgery.fold import find_conv_bn_pairs, fold_batchnorm
from lightning_quant.surgery.layers import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantizedLayer,
    QuantLinear,
    quantized_layers,
    quantizers,
)
from lightning_quant.surgery.quantize import (
    calibrate,
    dequantize_model,
    is_quantized,
    layer_candidates,
    quantizable_layers,
    quantize_model,
    set_observing,
)
from lightning_quant.surgery.requests import QuantizationRequest, explicit_fields, merge_requests
from lightning_quant.surgery.serialization import SPEC_KEY, load_quantized, save_quantized
from lightning_quant.surgery.spec import LayerSpec, QuantSpec
from lightning_quant.surgery.summary import QuantizationSummary, quantization_summary

__all__ = [
    "SPEC_KEY",
    "Call",
    "Capture",
    "LayerSpec",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantLinear",
    "QuantSpec",
    "QuantizationRequest",
    "QuantizationSummary",
    "QuantizedLayer",
    "calibrate",
    "capture",
    "dequantize_model",
    "explicit_fields",
    "find_blocks",
    "find_conv_bn_pairs",
    "fold_batchnorm",
    "is_quantized",
    "layer_candidates",
    "load_quantized",
    "merge_requests",
    "modes_kept",
    "quantizable_layers",
    "quantization_summary",
    "quantize_model",
    "quantized_layers",
    "quantizers",
    "quantizers_disabled",
    "save_quantized",
    "set_observing",
    "unquantized_layers",
]

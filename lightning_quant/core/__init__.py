"""Quantization numerics: fake-quant functions with straight-through gradients, quantizers, observers, errors."""

from lightning_quant.core.errors import QuantizationConfigError, UnsupportedModuleError
from lightning_quant.core.functional import (
    binarize,
    fake_quantize,
    lsq_fake_quantize,
    quant_range,
    quantize_to_int,
    scale_zero_point_from_bounds,
)
from lightning_quant.core.observers import (
    OBSERVERS,
    MinMaxObserver,
    MovingAverageObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from lightning_quant.core.quantizers import UniformQuantizer
from lightning_quant.core.thresholds import ThresholdFactors

__all__ = [
    "OBSERVERS",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageObserver",
    "Observer",
    "PercentileObserver",
    "QuantizationConfigError",
    "ThresholdFactors",
    "UniformQuantizer",
    "UnsupportedModuleError",
    "binarize",
    "fake_quantize",
    "lsq_fake_quantize",
    "make_observer",
    "quant_range",
    "quantize_to_int",
    "scale_zero_point_from_bounds",
]

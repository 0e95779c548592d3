"""Quantization numerics: fake-quant functions with straight-through gradients, the quantizer protocol and its
kinds (uniform, codebook), k-means, observers, errors."""

from lightning_quant.core.codebook import (
    CodebookQuantizer,
    fit_shared_codebook,
    index_bits_for,
    power_of_two_entries,
    share_codebook,
)
from lightning_quant.core.errors import NonFiniteError, QuantizationConfigError, UnsupportedModuleError
from lightning_quant.core.functional import (
    binarize,
    fake_quantize,
    lsq_fake_quantize,
    quant_range,
    quantize_to_int,
    scale_zero_point_from_bounds,
)
from lightning_quant.core.kmeans import KMeansResult, kmeans, kmeans_plus_plus
from lightning_quant.core.observers import (
    OBSERVERS,
    MinMaxObserver,
    MovingAverageObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from lightning_quant.core.quantizers import (
    QUANTIZER_KINDS,
    Quantizer,
    UniformGrid,
    UniformQuantizer,
    build_weight_quantizer,
    register_quantizer,
)
from lightning_quant.core.thresholds import ThresholdFactors

__all__ = [
    "OBSERVERS",
    "QUANTIZER_KINDS",
    "CodebookQuantizer",
    "KMeansResult",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageObserver",
    "NonFiniteError",
    "Observer",
    "PercentileObserver",
    "QuantizationConfigError",
    "Quantizer",
    "ThresholdFactors",
    "UniformGrid",
    "UniformQuantizer",
    "UnsupportedModuleError",
    "binarize",
    "build_weight_quantizer",
    "fake_quantize",
    "fit_shared_codebook",
    "index_bits_for",
    "kmeans",
    "kmeans_plus_plus",
    "lsq_fake_quantize",
    "make_observer",
    "power_of_two_entries",
    "quant_range",
    "quantize_to_int",
    "register_quantizer",
    "scale_zero_point_from_bounds",
    "share_codebook",
]

"""lightning-quant: a PyTorch Lightning callback suite for neural-network quantization.

Add a callback to your ``Trainer`` and get a low-bit model, with no change to your model's code::

    trainer = L.Trainer(callbacks=[QuantizationAwareTraining(weight_bits=4, act_bits=4)])
    trainer.fit(model, datamodule)
"""

from lightning_quant.allocation.orthogonality import orthogonal_allocation
from lightning_quant.callbacks import (
    AutoQBCallback,
    BitReallocationCallback,
    BlockReplacementCallback,
    DistillationCallback,
    IncrementalQuantizationCallback,
    KernelQuantizationCallback,
    OrthogonalMixedPrecision,
    QuantizationAwareTraining,
    QuantizationCallback,
    QuantizationLossMixin,
    QuantizedExport,
    ThresholdTuningCallback,
)
from lightning_quant.core.errors import NonFiniteError, QuantizationConfigError, UnsupportedModuleError
from lightning_quant.core.quantizers import Quantizer, register_quantizer
from lightning_quant.datamodules.generator import GeneratorDataModule
from lightning_quant.surgery import (
    LayerSpec,
    QuantizationRequest,
    QuantSpec,
    calibrate,
    dequantize_model,
    find_blocks,
    load_quantized,
    quantization_summary,
    quantize_model,
    save_quantized,
)

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # the search drivers import Optuna: loaded on first use, so `import lightning_quant` stays light
    if name == "MixedPrecisionSearch":
        from lightning_quant.search import MixedPrecisionSearch

        return MixedPrecisionSearch
    raise AttributeError(f"module 'lightning_quant' has no attribute {name!r}")


__all__ = [
    "AutoQBCallback",
    "BitReallocationCallback",
    "BlockReplacementCallback",
    "DistillationCallback",
    "GeneratorDataModule",
    "IncrementalQuantizationCallback",
    "KernelQuantizationCallback",
    "LayerSpec",
    "MixedPrecisionSearch",
    "NonFiniteError",
    "OrthogonalMixedPrecision",
    "QuantSpec",
    "QuantizationAwareTraining",
    "QuantizationCallback",
    "QuantizationConfigError",
    "QuantizationLossMixin",
    "QuantizationRequest",
    "QuantizedExport",
    "Quantizer",
    "ThresholdTuningCallback",
    "UnsupportedModuleError",
    "__version__",
    "calibrate",
    "dequantize_model",
    "find_blocks",
    "load_quantized",
    "orthogonal_allocation",
    "quantization_summary",
    "quantize_model",
    "register_quantizer",
    "save_quantized",
]

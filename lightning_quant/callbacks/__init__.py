"""Lightning callbacks, one technique per file, on the shared template of :mod:`.base`."""

from lightning_quant.callbacks.autoqb import AutoQBCallback
from lightning_quant.callbacks.base import QuantizationCallback, QuantizationLossMixin
from lightning_quant.callbacks.bit_reallocation import BitReallocationCallback
from lightning_quant.callbacks.block_replacement import BlockReplacementCallback
from lightning_quant.callbacks.distillation import DistillationCallback
from lightning_quant.callbacks.export import QuantizedExport
from lightning_quant.callbacks.incremental_quantization import IncrementalQuantizationCallback
from lightning_quant.callbacks.kernel_quantization import KernelQuantizationCallback
from lightning_quant.callbacks.orthogonal_mixed_precision import OrthogonalMixedPrecision
from lightning_quant.callbacks.qat import QuantizationAwareTraining
from lightning_quant.callbacks.threshold_tuning import ThresholdTuningCallback

__all__ = [
    "AutoQBCallback",
    "BitReallocationCallback",
    "BlockReplacementCallback",
    "DistillationCallback",
    "IncrementalQuantizationCallback",
    "KernelQuantizationCallback",
    "OrthogonalMixedPrecision",
    "QuantizationAwareTraining",
    "QuantizationCallback",
    "QuantizationLossMixin",
    "QuantizedExport",
    "ThresholdTuningCallback",
]

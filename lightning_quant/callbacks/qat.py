"""Quantization-aware training: fake-quantize every Conv/Linear layer and train through the quantizers."""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_quant.callbacks.base import QuantizationCallback
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.functional import validate_bits
from lightning_quant.core.validation import check_int
from lightning_quant.surgery.layers import activation_quantizers, quantized_layers
from lightning_quant.surgery.requests import QuantizationRequest, explicit_fields
from lightning_quant.surgery.spec import Granularity, LayerSpec, ObserverName, QuantSpec, ScaleMode
from lightning_quant.surgery.summary import quantization_summary

log = logging.getLogger(__name__)


class QuantizationAwareTraining(QuantizationCallback):
    """Fake-quantization QAT with learned step sizes (LSQ) on every Conv/Linear layer of the model.

    Paper: S. K. Esser et al., "Learned Step Size Quantization", ICLR 2020 (the default ``scale_mode="lsq"``);
    observer-driven fixed ranges (``scale_mode="observer"``) follow Jacob et al., CVPR 2018.

    The layers are swapped in ``setup`` (so the new step sizes are in the optimizer and in checkpoints);
    during the first ``num_calibration_batches`` training batches the activation observers set the step sizes
    (LSQ then learns them; observer mode freezes them, while weight ranges keep following the weights). The
    first and last layers stay at ``first_last_bits``.

    Args:
        weight_bits: weight bit width, 2-8 (1 with ``binary_weights=True``).
        act_bits: input-activation bit width, 2-8, or ``None`` for weight-only quantization.
        binary_weights: binary weights (``scale * sign(w)``, XNOR-Net scales); needs ``weight_bits=1``.
        weight_granularity: ``per_channel`` or ``per_tensor`` weight step sizes.
        scale_mode: ``lsq`` (learned) or ``observer`` (fixed by the observers).
        weight_observer: ``minmax``, ``moving_average``, ``percentile`` or ``mse``.
        act_observer: same choices, for activations.
        num_calibration_batches: training batches during which activation observers run.
        freeze_bn_after_epochs: from this epoch on, BatchNorm layers use (and stop updating) their running
            statistics; ``None`` never freezes them.
        first_last_bits: bits of the first and last layer; ``None`` quantizes them like the rest.
        include: name patterns of the layers to quantize (default: all).
        exclude: name patterns of layers to keep in float.
        exclude_types: layer types to keep in float, e.g. ``["Linear"]``.
        quantize_residuals: also quantize the tensors that convolutions (and their BatchNorms) feed into
            residual additions. Turn it on for int8 deployment: without it an int8 runtime keeps the
            convolutions before each addition in float (see :class:`~lightning_quant.surgery.QuantSpec`).
        spec: a whole :class:`QuantSpec` instead of the arguments above (they must then stay at defaults).
        on_nonfinite: a training step with a NaN/Inf loss ``raise``s :class:`~lightning_quant.NonFiniteError` naming
            the first layer whose output is not finite, or is ``skip``ped (its gradients dropped, buffers restored).

    Example:
        >>> trainer = L.Trainer(callbacks=[QuantizationAwareTraining(weight_bits=4, act_bits=4)])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
    """

    TECHNIQUE = "qat"

    def __init__(
        self,
        weight_bits: int = 8,
        act_bits: int | None = 8,
        *,
        binary_weights: bool = False,
        weight_granularity: Granularity = "per_channel",
        scale_mode: ScaleMode = "lsq",
        weight_observer: ObserverName = "mse",
        act_observer: ObserverName = "moving_average",
        num_calibration_batches: int = 16,
        freeze_bn_after_epochs: int | None = None,
        first_last_bits: int | None = 8,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        exclude_types: list[str] | None = None,
        quantize_residuals: bool = False,
        spec: QuantSpec | None = None,
        on_nonfinite: Literal["raise", "skip"] = "raise",
    ) -> None:
        super().__init__(on_nonfinite)
        validate_bits("weight_bits", weight_bits, allow_binary=binary_weights)
        if binary_weights and weight_bits != 1:
            raise QuantizationConfigError(
                f"`binary_weights=True` quantizes weights to 1 bit, but `weight_bits={weight_bits}`. "
                "HINT: pass `weight_bits=1` with `binary_weights=True`."
            )
        check_int(
            "num_calibration_batches", num_calibration_batches, minimum=0, fix="pass e.g. `num_calibration_batches=16`."
        )
        check_int(
            "freeze_bn_after_epochs",
            freeze_bn_after_epochs,
            minimum=0,
            allow_none=True,
            fix="pass an epoch, e.g. `freeze_bn_after_epochs=3`, or None to never freeze BatchNorm.",
        )
        if spec is None:
            spec = QuantSpec(
                default=LayerSpec(
                    weight_bits=weight_bits,
                    act_bits=act_bits,
                    weight_granularity=weight_granularity,
                    scale_mode=scale_mode,
                    weight_observer=weight_observer,
                    act_observer=act_observer,
                ),
                include=tuple(include) if include else ("*",),
                exclude=tuple(exclude or ()),
                exclude_types=tuple(exclude_types or ()),
                first_last_bits=first_last_bits,
                quantize_residuals=quantize_residuals,
            )
        elif not isinstance(spec, QuantSpec):
            raise QuantizationConfigError(f"`spec` must be a QuantSpec, got {type(spec).__name__}.")
        self.spec = spec
        self.num_calibration_batches = num_calibration_batches
        self.freeze_bn_after_epochs = freeze_bn_after_epochs
        self._calibration_batches_seen = 0
        self._observing: bool | None = None

    @override
    def identity(self) -> dict[str, Any]:
        d = self.spec.default
        return {"weight_bits": d.weight_bits, "act_bits": d.act_bits}

    @property
    def calibrating(self) -> bool:
        """Whether the next training batch still calibrates the activation ranges."""
        return self._calibration_batches_seen < self.num_calibration_batches

    # -- surgery ---------------------------------------------------------------------------------------------
    @override
    def quantization_request(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> QuantizationRequest:
        # the recipe's fields the user set must hold; the rest are preferences that win over other callbacks'
        return QuantizationRequest(type(self).__name__, self.spec, explicit_fields(self.spec), priority=0)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(f"Quantization-aware training:\n{quantization_summary(pl_module)}")

    # -- calibration and BatchNorm freezing ------------------------------------------------------------------
    def _set_observing(self, pl_module: pl.LightningModule, observing: bool) -> None:
        if observing == self._observing:
            return
        for quantizer in activation_quantizers(pl_module).values():
            quantizer.observing = observing
        for layer in quantized_layers(pl_module).values():
            # weight ranges: LSQ learns them after a one-batch initialisation; observer mode tracks the weights
            layer.weight_quantizer.observing = not layer.weight_quantizer.learnable
        self._observing = observing

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._set_observing(pl_module, self.calibrating)
        # observers update only in training mode, and Lightning keeps each module's own mode at fit start: the
        # quantizers of a model quantized earlier and then put in eval mode would silently stop observing
        for layer in quantized_layers(pl_module).values():
            layer.weight_quantizer.train()
        for quantizer in activation_quantizers(pl_module).values():
            quantizer.train()
        if self.freeze_bn_after_epochs is not None and trainer.current_epoch >= self.freeze_bn_after_epochs:
            # re-applied every batch: Lightning restores train mode after validation
            for module in pl_module.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                    module.eval()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        calibrated_this_batch = self.calibrating
        if calibrated_this_batch:
            self._calibration_batches_seen += 1
        self.log_metric(pl_module, "calibrating", float(calibrated_this_batch))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        summary = quantization_summary(pl_module)
        self.log_metric(pl_module, "avg_weight_bits", summary.avg_weight_bits)
        self.log_metric(pl_module, "size_kib", summary.quantized_bits / 8192)
        self.log_metric(pl_module, "compression", summary.compression)
        frozen = self.freeze_bn_after_epochs is not None and trainer.current_epoch >= self.freeze_bn_after_epochs
        self.log_metric(pl_module, "bn_frozen", float(frozen))

    # -- state -----------------------------------------------------------------------------------------------
    @override
    def state(self) -> dict[str, Any]:
        return {"calibration_batches_seen": self._calibration_batches_seen, "spec": self.spec.to_dict()}

    @override
    def load_state(self, state: dict[str, Any]) -> None:
        self._calibration_batches_seen = int(state["calibration_batches_seen"])
        self._observing = None

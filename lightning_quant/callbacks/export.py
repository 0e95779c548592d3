"""``QuantizedExport``: export the trained quantized model to QDQ ONNX at the end of fit, and check it.

Paper trail: the QDQ format is ONNX's representation of quantized models (QuantizeLinear/DequantizeLinear,
opset 13+); the check follows the "accuracy after export" verification that deployment toolkits recommend.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_quant.callbacks.base import QuantizationCallback
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.export.onnx import (
    PREFER,
    WEIGHT_STORAGE,
    VerificationResult,
    export_onnx,
    int8_ready,
    onnx_metadata,
    verify_onnx,
)

log = logging.getLogger(__name__)


class ExportVerificationError(RuntimeError):
    """The exported model disagrees with the PyTorch model more than ``min_agreement`` allows."""


class QuantizedExport(QuantizationCallback):
    """At the end of ``fit`` (rank zero): export the quantized model to QDQ ONNX and verify it in onnxruntime.

    The model is exported with :func:`~lightning_quant.export.export_onnx` (BatchNorm folded, learned scales
    frozen) using one batch of the validation loader as the example input; with ``verify=True`` the first
    ``num_batches`` validation batches are run through onnxruntime and the PyTorch model
    (:func:`~lightning_quant.export.verify_onnx`). The figures are logged as ``quant/export/<quantity>``
    through the trainer's loggers (``pl_module.log`` is not allowed in ``on_fit_end``) and :mod:`logging`.
    If top-1 agreement is below ``min_agreement``, ``on_failure="error"`` raises
    :class:`ExportVerificationError` and ``"warn"`` logs a warning.

    Args:
        path: the ``.onnx`` file to write (its directory is created).
        verify: run the onnxruntime check.
        num_batches: validation batches to verify on (``None``: all).
        min_agreement: the smallest acceptable top-1 agreement, in [0, 1].
        on_failure: ``error`` or ``warn``.
        overwrite: replace an existing file (otherwise an existing file is an error, raised before training).
        opset: ONNX opset; ``None``: 18, or 21 when INT4 weights are stored (see ``export_onnx``).
        fold_batchnorm: fold BatchNorm into the convolutions (needed for int8 speed); ``auto`` folds only when
            every quantized activation is 8-bit, where folding keeps the export exact (see ``export_onnx``).
        weight_storage: ``int8``, ``int4`` (every weight grid must fit 4 bits) or ``auto`` (INT4 where it fits,
            int8 elsewhere): the weight integers' type in the file (see ``export_onnx``).
        prefer: what ``weight_storage="auto"`` optimises: ``size`` or ``speed``.

    Besides the verification figures it logs ``quant/export/file_kib`` (the ONNX file) and
    ``quant/export/packed_kib`` (the file :func:`~lightning_quant.export.save_packed_model` would write).

    Example:
        >>> export = QuantizedExport("model.onnx", num_batches=4)
        >>> trainer = L.Trainer(callbacks=[QuantizationAwareTraining(), export])  # doctest: +SKIP
    """

    TECHNIQUE = "export"
    ON_FAILURE: ClassVar[tuple[str, ...]] = ("error", "warn")

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        verify: bool = True,
        num_batches: int | None = 8,
        min_agreement: float = 0.999,
        on_failure: Literal["error", "warn"] = "error",
        overwrite: bool = False,
        opset: int | None = None,
        fold_batchnorm: bool | Literal["auto"] = "auto",
        weight_storage: Literal["int8", "int4", "auto"] = "int8",
        prefer: Literal["size", "speed"] = "size",
    ) -> None:
        super().__init__()
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise QuantizationConfigError(f"`path` must be a file path, got {path!r}. HINT: `path='model.onnx'`.")
        if num_batches is not None and (
            isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
        ):
            raise QuantizationConfigError(f"`num_batches` must be a positive integer or None, got {num_batches!r}.")
        if (
            isinstance(min_agreement, bool)
            or not isinstance(min_agreement, (int, float))
            or not 0 <= min_agreement <= 1
        ):
            raise QuantizationConfigError(f"`min_agreement` must be within [0, 1], got {min_agreement!r}.")
        if on_failure not in self.ON_FAILURE:
            raise QuantizationConfigError(f"`on_failure` must be one of {list(self.ON_FAILURE)}, got {on_failure!r}.")
        if weight_storage not in WEIGHT_STORAGE:
            raise QuantizationConfigError(
                f'`weight_storage` must be one of {list(WEIGHT_STORAGE)}, got {weight_storage!r}. HINT: "auto" '
                "stores INT4 where a layer's weights fit 4 bits and int8 elsewhere."
            )
        if prefer not in PREFER:
            raise QuantizationConfigError(f"`prefer` must be one of {list(PREFER)}, got {prefer!r}.")
        if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 13):
            raise QuantizationConfigError(f"`opset` must be an integer >= 13 or None, got {opset!r}.")
        self.path = Path(path)
        self.verify = verify
        self.num_batches = num_batches
        self.min_agreement = float(min_agreement)
        self.on_failure = on_failure
        self.overwrite = overwrite
        self.opset = opset
        self.fold_batchnorm = fold_batchnorm
        self.weight_storage = weight_storage
        self.prefer = prefer
        self._result: VerificationResult | None = None
        self._exported = False

    @override
    def identity(self) -> dict[str, Any]:
        return {"path": os.fspath(self.path)}

    @property
    def result(self) -> VerificationResult | None:
        """The verification of the last export (``None`` before, or with ``verify=False``)."""
        return self._result

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero and self.path.exists() and not self.overwrite:
            # fail before training, not after it
            raise QuantizationConfigError(
                f"QuantizedExport: {os.fspath(self.path)!r} already exists. HINT: pass `overwrite=True` or "
                "another `path`."
            )

    def _val_loader(self, trainer: pl.Trainer) -> Any:
        loaders = trainer.val_dataloaders
        if loaders is None and trainer.datamodule is not None:
            loaders = trainer.datamodule.val_dataloader()
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if isinstance(loaders, dict):
            loaders = next(iter(loaders.values()), None)
        if loaders is None:
            raise QuantizationConfigError(
                "QuantizedExport needs a validation dataloader (for the example input and the check). HINT: pass "
                "`val_dataloaders` to `fit` or use a datamodule with `val_dataloader`."
            )
        return loaders

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        keyed = {f"quant/{self.TECHNIQUE}/{k}": float(v) for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(keyed, step=trainer.global_step)
        log.info("QuantizedExport: %s", ", ".join(f"{k}={v:.6g}" for k, v in keyed.items()))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.export(trainer, pl_module)
        trainer.strategy.barrier("quantized_export")

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> VerificationResult | None:
        """Export (and verify) now; what ``on_fit_end`` runs on rank zero."""
        loader = self._val_loader(trainer)
        batch = next(iter(loader))
        example = batch[0] if isinstance(batch, (list, tuple)) else batch
        if not isinstance(example, torch.Tensor):
            raise QuantizationConfigError(
                f"QuantizedExport: the validation batches hold {type(example).__name__}, not tensors. HINT: yield "
                "(inputs, labels) pairs."
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(
            pl_module,
            self.path,
            example[:1].clone(),
            overwrite=self.overwrite or self._exported,
            opset=self.opset,
            fold_batchnorm=self.fold_batchnorm,
            weight_storage=self.weight_storage,
            prefer=self.prefer,
        )
        self._exported = True
        metrics: dict[str, float] = {"file_kib": self.path.stat().st_size / 1024}
        packed = onnx_metadata(self.path).get("lightning_quant.packed_bytes", "None")
        if packed != "None":
            metrics["packed_kib"] = int(packed) / 1024
        if self.verify:
            self._result = verify_onnx(pl_module, self.path, loader, max_batches=self.num_batches)
            metrics.update(self._result.as_metrics())
        self._log(trainer, metrics)
        if self._result is not None and self._result.float_convs and int8_ready(pl_module):
            rank_zero_warn(
                f"QuantizedExport: {self._result.float_convs} of {self._result.float_convs + self._result.int8_convs}"
                " convolutions run in float in onnxruntime (no QuantizeLinear after them), which makes the int8 model"
                " slow. HINT: train with `QuantizationAwareTraining(..., quantize_residuals=True)` (or"
                " `QuantSpec(quantize_residuals=True)`) so the tensors entering residual additions are quantized."
            )
        if self._result is not None and self._result.agreement < self.min_agreement:
            message = (
                f"QuantizedExport: onnxruntime agrees with the PyTorch model on {self._result.agreement:.4%} of "
                f"top-1 predictions, below `min_agreement={self.min_agreement}`. "
                f"Max logit difference {self._result.max_abs_diff:.4g}. HINT: run "
                "`verify_onnx(model, path, loader, per_layer=True)` to find the first diverging layer."
            )
            if self.on_failure == "error":
                raise ExportVerificationError(message)
            log.warning(message)
        return self._result

    @override
    def state(self) -> dict[str, Any]:
        return {"exported": self._exported}

    @override
    def load_state(self, state: dict[str, Any]) -> None:
        self._exported = bool(state.get("exported", False))

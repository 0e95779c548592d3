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
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_quant.callbacks.base import QuantizationCallback
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.quantizers import UniformQuantizer
from lightning_quant.core.validation import check_bool
from lightning_quant.export.onnx import (
    PREFER,
    TASKS,
    WEIGHT_STORAGE,
    Task,
    VerificationResult,
    export_onnx,
    int8_blockers,
    int8_ready,
    onnx_metadata,
    resolve_example_input,
    verify_onnx,
)

log = logging.getLogger(__name__)


class ExportVerificationError(RuntimeError):
    """The exported model disagrees with the PyTorch model more than ``min_agreement`` allows."""


class QuantizedExport(QuantizationCallback):
    """At the end of ``fit`` (rank zero): export the quantized model to QDQ ONNX and verify it in onnxruntime.

    The model (or its submodule ``module``) is exported with :func:`~lightning_quant.export.export_onnx`
    (BatchNorm folded, learned scales frozen, a dynamic batch axis checked at a second batch size). The export
    input is ``example_input`` when given, else the module's ``example_input_array`` (Lightning's convention),
    else the first element of the first validation batch. It is tried in ``setup``, before training (one forward
    in eval mode with the quantizers switched off, no gradient), so a module that cannot take it fails at once
    with the input named; an input from the validation loader is tried when the loader is known (a datamodule's
    in ``setup``, otherwise at the start of training).

    With ``verify=True`` the first ``num_batches`` validation batches (or, without validation data, the export
    input) are run through onnxruntime and the PyTorch model (:func:`~lightning_quant.export.verify_onnx`).
    The figures are logged as ``quant/export/<quantity>`` through the trainer's loggers (``pl_module.log`` is
    not allowed in ``on_fit_end``) and :mod:`logging`. Classifier outputs are judged by their agreement
    (arg-max of multi-class logits, sign of one logit) against ``min_agreement``; other outputs (images,
    sequences, regression) by their relative error against ``max_relative_error``. On failure
    ``on_failure="error"`` raises :class:`ExportVerificationError` and ``"warn"`` logs a warning.

    Args:
        path: the ``.onnx`` file to write (its directory is created).
        example_input: the inputs to export with (a tensor or a tuple of tensors in ``forward``'s order);
            ``None``: ``example_input_array`` or the validation data (see above).
        module: qualified name of the submodule to export (``""``: the LightningModule's own ``forward``), e.g.
            ``"model"`` for a module whose ``training_step`` calls ``self.model(x)``.
        verify: run the onnxruntime check.
        num_batches: validation batches to verify on (``None``: all).
        min_agreement: the smallest acceptable agreement of classifier outputs, in [0, 1].
        max_relative_error: the largest acceptable ``||onnx - torch|| / ||torch||`` for outputs without an
            agreement (anything but classifier logits).
        task: how outputs are compared (``auto``, ``multiclass``, ``binary``, ``regression``; see
            :func:`~lightning_quant.export.verify_onnx`).
        on_failure: ``error`` or ``warn``.
        overwrite: replace an existing file (otherwise an existing file is an error, raised before training).
        opset: ONNX opset; ``None``: 18, or 21 when INT4 weights are stored (see ``export_onnx``).
        fold_batchnorm: fold BatchNorm into the convolutions (needed for int8 speed); ``auto`` folds only when
            every quantized activation is 8-bit, where folding keeps the export exact (see ``export_onnx``).
        dynamo: export with PyTorch's dynamo exporter (the default); ``False`` uses the TorchScript exporter, which
            is much faster on small models (seconds less per export) but deprecated by PyTorch.
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
        example_input: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        module: str = "",
        verify: bool = True,
        num_batches: int | None = 8,
        min_agreement: float = 0.999,
        max_relative_error: float = 0.05,
        task: Task = "auto",
        on_failure: Literal["error", "warn"] = "error",
        overwrite: bool = False,
        opset: int | None = None,
        fold_batchnorm: bool | Literal["auto"] = "auto",
        dynamo: bool = True,
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
        if (
            isinstance(max_relative_error, bool)
            or not isinstance(max_relative_error, (int, float))
            or not max_relative_error >= 0
        ):
            raise QuantizationConfigError(f"`max_relative_error` must be a number >= 0, got {max_relative_error!r}.")
        if task not in TASKS:
            raise QuantizationConfigError(f"`task` must be one of {list(TASKS)}, got {task!r}.")
        if not isinstance(module, str):
            raise QuantizationConfigError(f"`module` must be a submodule name (str), got {module!r}.")
        if example_input is not None:
            resolve_example_input(torch.nn.Module(), example_input)  # a tensor or a tuple of tensors
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
        self.example_input = example_input
        self.module = module
        self.verify = verify
        self.num_batches = num_batches
        self.min_agreement = float(min_agreement)
        self.max_relative_error = float(max_relative_error)
        self.task = task
        self.on_failure = on_failure
        self.overwrite = overwrite
        self.opset = opset
        self.fold_batchnorm = fold_batchnorm
        self.dynamo = check_bool("dynamo", dynamo)
        self.weight_storage = weight_storage
        self.prefer = prefer
        self._result: VerificationResult | None = None
        self._exported = False
        self._tried = False

    @override
    def identity(self) -> dict[str, Any]:
        return {"path": os.fspath(self.path)}

    @property
    def result(self) -> VerificationResult | None:
        """The verification of the last export (``None`` before, or with ``verify=False``)."""
        return self._result

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.is_global_zero and self.path.exists() and not self.overwrite:
            # fail before training, not after it
            raise QuantizationConfigError(
                f"QuantizedExport: {os.fspath(self.path)!r} already exists. HINT: pass `overwrite=True` or "
                "another `path`."
            )
        target = self._target(pl_module)
        self._tried = False
        if self._explicit_input(target) is not None or _has_val_dataloader(getattr(trainer, "datamodule", None)):
            self._try_input(trainer, target)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._tried:  # the input comes from validation dataloaders given to `fit`: known only now
            self._try_input(trainer, self._target(pl_module))

    def _target(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        """The module to export: ``pl_module`` or its submodule ``module``, checked to have a ``forward``."""
        if self.module:
            try:
                target = pl_module.get_submodule(self.module)
            except AttributeError as err:
                raise QuantizationConfigError(
                    f"QuantizedExport: `module` {self.module!r} is not a submodule of {type(pl_module).__name__}."
                ) from err
        else:
            target = pl_module
        if type(target).forward in (pl.LightningModule.forward, torch.nn.Module.forward):
            children = ", ".join(repr(n) for n, _ in target.named_children()) or "none"
            raise QuantizationConfigError(
                f"QuantizedExport: {type(target).__name__} has no `forward` of its own, so there is nothing to "
                f"export. HINT: export the submodule that `training_step` calls with `QuantizedExport(..., "
                f"module=<name>)` (its children: {children}), or define `forward` in {type(target).__name__}."
            )
        return target

    def _explicit_input(self, target: torch.nn.Module) -> tuple[tuple[torch.Tensor, ...], str] | None:
        """``example_input`` or the target's ``example_input_array``, with where it came from; else ``None``."""
        if self.example_input is None and getattr(target, "example_input_array", None) is None:
            return None
        return resolve_example_input(target, self.example_input)

    def _example(self, trainer: pl.Trainer, target: torch.nn.Module) -> tuple[tuple[torch.Tensor, ...], str]:
        explicit = self._explicit_input(target)
        if explicit is not None:
            return explicit
        batch = next(iter(self._val_loader(trainer)), None)
        if batch is None:
            raise QuantizationConfigError(
                "QuantizedExport: the validation dataloader is empty, so there is no example input to export with. "
                "HINT: pass a non-empty `val_dataloaders` (or check `limit_val_batches`), set `example_input_array` "
                "in the module, or pass `example_input=`."
            )
        example = batch[0] if isinstance(batch, (list, tuple)) else batch
        if not isinstance(example, torch.Tensor):
            raise QuantizationConfigError(
                f"QuantizedExport: the validation batches hold {type(example).__name__}, not tensors. HINT: yield "
                "(inputs, labels) pairs, set `example_input_array` in the module, or pass `example_input=`."
            )
        return (example,), "the first element of the first validation batch"

    def _try_input(self, trainer: pl.Trainer, target: torch.nn.Module) -> None:
        """Call ``target`` once on the export input (eval mode, quantizers off, no gradient): fail before training."""
        self._tried = True
        args, source = self._example(trainer, target)
        device = next((p.device for p in target.parameters()), torch.device("cpu"))
        modes = {m: m.training for m in target.modules()}
        switched = [q for q in target.modules() if isinstance(q, UniformQuantizer) and q.enabled]
        target.eval()
        for q in switched:
            q.enabled = False  # a never-calibrated quantizer would initialise itself from this input
        try:
            with torch.no_grad():
                target(*(a.to(device) for a in args))
        except Exception as err:  # any error of the user's forward: the input is what we name and the fix
            shapes = ", ".join(f"{tuple(a.shape)} {a.dtype}" for a in args)
            raise QuantizationConfigError(
                f"QuantizedExport: {type(target).__name__} cannot be called on the export input, {source} "
                f"({shapes}): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. HINT: set "
                "`self.example_input_array` in the module's `__init__` to one batch of what `forward` takes "
                "(e.g. `torch.randn(2, 784)` for flattened images, `torch.randn(2, latent_dim)` for a generator), or "
                "pass `QuantizedExport(..., example_input=...)`."
            ) from err
        finally:
            for q in switched:
                q.enabled = True
            for m, training in modes.items():
                m.training = training

    def _val_loader(self, trainer: pl.Trainer, required: bool = True) -> Any:
        loaders = trainer.val_dataloaders
        if loaders is None and _has_val_dataloader(trainer.datamodule):
            loaders = trainer.datamodule.val_dataloader()
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if isinstance(loaders, dict):
            loaders = next(iter(loaders.values()), None)
        if loaders is None and required:
            raise QuantizationConfigError(
                "QuantizedExport needs an export input: without `example_input` or the module's "
                "`example_input_array` it takes one from the validation data, and there is none. HINT: set "
                "`self.example_input_array` in the module, pass `example_input=`, or give validation data."
            )
        return loaders

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        keyed = {f"quant/{self.TECHNIQUE}/{k}": float(v) for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(keyed, step=trainer.global_step)
        log.info("QuantizedExport: %s", ", ".join(f"{k}={v:.6g}" for k, v in keyed.items()))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        if trainer.is_global_zero:
            self.export(trainer, pl_module)
        trainer.strategy.barrier("quantized_export")

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> VerificationResult | None:
        """Export (and verify) now; what ``on_fit_end`` runs on rank zero."""
        target = self._target(pl_module)
        args, _ = self._example(trainer, target)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(
            target,
            self.path,
            tuple(a[:2].clone() if a.dim() else a for a in args),  # a batch of 2 exports a dynamic batch axis
            overwrite=self.overwrite or self._exported,
            opset=self.opset,
            fold_batchnorm=self.fold_batchnorm,
            dynamo=self.dynamo,
            weight_storage=self.weight_storage,
            prefer=self.prefer,
        )
        self._exported = True
        metrics: dict[str, float] = {"file_kib": self.path.stat().st_size / 1024}
        packed = onnx_metadata(self.path).get("lightning_quant.packed_bytes", "None")
        if packed != "None":
            metrics["packed_kib"] = int(packed) / 1024
        if self.verify:
            loader = self._val_loader(trainer, required=False)
            if loader is not None and not _takes_batches_like(loader, args):
                log.info(
                    "QuantizedExport: the validation batches do not hold the export input's shape %s (the module "
                    "transforms them in its steps); verifying on the export input.",
                    [tuple(a.shape[1:]) for a in args],
                )
                loader = None
            if loader is None:
                loader = [args]  # no validation data the exported module takes: the export input itself
            self._result = verify_onnx(target, self.path, loader, max_batches=self.num_batches, task=self.task)
            metrics.update(self._result.as_metrics())
        self._log(trainer, metrics)
        result = self._result if self.verify else None
        if result is not None and result.float_convs and int8_ready(target):
            self._warn_float_convs(target, result)
        message = None if result is None else self._failure(result)
        if message is not None:
            if self.on_failure == "error":
                raise ExportVerificationError(message)
            log.warning(message)
        return result

    @staticmethod
    def _warn_float_convs(target: torch.nn.Module, result: VerificationResult) -> None:
        """Say which quantized convolutions run in float in onnxruntime, and why (once, at export)."""
        blockers = int8_blockers(target)
        convs = sum(isinstance(m, torch.nn.modules.conv._ConvNd) for m in target.modules())
        if not blockers and result.int8_convs >= convs:
            return  # every conv of the model is integer; onnxruntime made the others (a BatchNorm after pooling)
        listed = "; ".join(f"{name}: {reason}" for name, reason in list(blockers.items())[:8])
        more = f" (and {len(blockers) - 8} more)" if len(blockers) > 8 else ""
        rank_zero_warn(
            f"QuantizedExport: {result.float_convs} of {result.float_convs + result.int8_convs} convolutions run in "
            f"float in onnxruntime, which makes the int8 model slow. {listed}{more}. HINT: train with "
            "`QuantizationAwareTraining(..., quantize_residuals=True)` (or `QuantSpec(quantize_residuals=True)`), "
            "which places a quantizer after every convolution whose output an int8 runtime would otherwise see in "
            "float."
        )

    def _failure(self, result: VerificationResult) -> str | None:
        """The failure message for ``result``, or ``None`` when it passes."""
        hint = "HINT: run `verify_onnx(model, path, loader, per_layer=True)` to find the first diverging layer."
        if result.agreement is not None:
            if result.agreement >= self.min_agreement:
                return None
            return (
                f"QuantizedExport: onnxruntime agrees with the PyTorch model on {result.agreement:.4%} of samples "
                f"({result.agreement_name}), below `min_agreement={self.min_agreement}`. Max output difference "
                f"{result.max_abs_diff:.4g}. {hint}"
            )
        if result.relative_error is None:
            return (
                f"QuantizedExport: the PyTorch outputs are all zero while onnxruntime's differ by up to "
                f"{result.max_abs_diff:.4g}, so no relative error can be computed. {hint}"
            )
        if result.relative_error <= self.max_relative_error:
            return None
        return (
            f"QuantizedExport: onnxruntime's outputs ({result.task}) differ from the PyTorch model's by a relative "
            f"error of {result.relative_error:.4g}, above `max_relative_error={self.max_relative_error}`. {hint}"
        )

    @override
    def state(self) -> dict[str, Any]:
        return {"exported": self._exported}

    @override
    def load_state(self, state: dict[str, Any]) -> None:
        self._exported = bool(state.get("exported", False))


def _has_val_dataloader(datamodule: Any) -> bool:
    """Whether ``datamodule`` defines validation data (``LightningDataModule``'s own method only raises)."""
    if datamodule is None or not callable(getattr(datamodule, "val_dataloader", None)):
        return False
    return not isinstance(datamodule, pl.LightningDataModule) or is_overridden("val_dataloader", datamodule)


def _takes_batches_like(loader: Any, args: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``loader``'s first batch holds inputs of the export input's per-sample shapes and dtype kinds."""
    batch = next(iter(loader), None)
    if isinstance(batch, torch.Tensor):
        inputs: Any = (batch,)
    elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], (list, tuple)):
        inputs = batch[0]
    elif isinstance(batch, (list, tuple)):
        inputs = batch[: len(args)]
    else:
        return True  # dicts and the like: verify_onnx decides
    return len(inputs) == len(args) and all(
        isinstance(t, torch.Tensor) and t.shape[1:] == a.shape[1:] and t.is_floating_point() == a.is_floating_point()
        for t, a in zip(inputs, args, strict=True)
    )

"""One search episode on a real model: apply an allocation, recalibrate, optionally fine-tune, evaluate.

:class:`ModelEnvironment` is the model side of a reinforcement-learning bit search
(:class:`~lightning_quant.allocation.rl.PolicySearch` calls :meth:`ModelEnvironment.evaluate`). Each episode starts
from the same snapshot of the model (weights, BatchNorm statistics, quantizer state), so episodes do not influence
each other, and works on batches fixed when the environment is built, so that equal allocations always get equal
metrics (a resumed search included). Per episode:

1. restore the snapshot; set the weight widths of every unit (per output channel where they differ) and the searched
   input widths;
2. re-derive each allocated layer's weight step sizes from its weights at the new widths (the weight observer, per
   group of equal-width channels) -- our choice: a width kept at the range of another width wastes most of a
   2-bit grid;
3. recalibrate on ``calibration`` batches in training mode, without gradients: every BatchNorm's running statistics
   are re-estimated from scratch (cumulative average) and every activation quantizer's range is re-observed (HAQ
   calibrates the quantized model on training batches; NNCF's AutoQ adapts BatchNorm statistics);
4. optionally fine-tune a few steps on ``finetune`` batches (SGD with momentum, cross-entropy), as HAQ's
   environment can (``finetune_steps``; off by default, as in NNCF);
5. evaluate on ``evaluation`` batches in eval mode: top-1 accuracy (or minus the cross-entropy).

The model is left at the snapshot after :meth:`ModelEnvironment.restore`; :meth:`ModelEnvironment.apply` applies an
allocation with steps 1-3 and keeps it (the final policy, before QAT).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_quant.allocation.units import UnitLayout, apply_unit_widths
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.quantizers import UniformQuantizer
from lightning_quant.surgery.capture import modes_kept, quantizers_disabled
from lightning_quant.surgery.layers import activation_quantizers, quantized_layers

log = logging.getLogger(__name__)

Metric = Literal["accuracy", "cross_entropy"]
METRICS: tuple[str, ...] = ("accuracy", "cross_entropy")


def split_batch(batch: Any, where: str = "batch") -> tuple[Tensor, Tensor]:
    """``(inputs, labels)`` of a batch: a ``(x, y, ...)`` tuple/list or a dict with ``x``/``y`` (or ``image``/
    ``label``) entries."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[0], Tensor):
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in ("x", "image", "images", "input", "inputs") if k in batch), None)
        y = next((batch[k] for k in ("y", "label", "labels", "target", "targets") if k in batch), None)
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            return x, y
    raise QuantizationConfigError(
        f"The {where} must hold inputs and class labels, `(x, y)` or a dict with `x` and `y`, got "
        f"{type(batch).__name__}. HINT: evaluate on a labelled dataloader (the search rewards accuracy)."
    )


def _to(batch: tuple[Tensor, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    return batch[0].to(device), batch[1].to(device)


class ModelEnvironment:
    """The model side of an allocation search (see the module docs).

    Args:
        model: the quantized model (its state now is the snapshot every episode starts from).
        layout: the allocation units.
        calibration: batches for BatchNorm and activation-range recalibration.
        evaluation: labelled batches the metric is measured on.
        finetune: labelled batches for the optional fine-tune (cycled).
        finetune_steps: SGD steps per episode (0: none).
        finetune_lr: their learning rate (momentum 0.9).
        recalibrate_bn: re-estimate BatchNorm statistics in step 3.
        metric: ``"accuracy"`` (top-1) or ``"cross_entropy"`` (minus the mean loss), from the model's logits.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: UnitLayout,
        calibration: Sequence[Any],
        evaluation: Sequence[Any],
        finetune: Sequence[Any] = (),
        *,
        finetune_steps: int = 0,
        finetune_lr: float = 1e-3,
        recalibrate_bn: bool = True,
        metric: Metric = "accuracy",
    ) -> None:
        if metric not in METRICS:
            raise QuantizationConfigError(f"`metric` must be one of {list(METRICS)}, got {metric!r}.")
        if not evaluation:
            raise QuantizationConfigError("No evaluation batches: the search needs labelled batches to measure on.")
        if finetune_steps and not finetune:
            raise QuantizationConfigError("`finetune_steps` > 0 needs fine-tuning batches.")
        self.model = model
        self.layout = layout
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.calibration = [_inputs(b) for b in calibration]
        self.evaluation = [split_batch(b, "evaluation batch") for b in evaluation]
        self.finetune = [split_batch(b, "fine-tuning batch") for b in finetune]
        self.finetune_steps = int(finetune_steps)
        self.finetune_lr = float(finetune_lr)
        self.recalibrate_bn = bool(recalibrate_bn)
        self.metric = metric
        self.snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.evaluations = 0

    # -- model state -------------------------------------------------------------------------------------------
    def restore(self) -> None:
        """The model back at the snapshot (widths included)."""
        self.model.load_state_dict(self.snapshot)

    @torch.no_grad()
    def _reobserve_weights(self) -> None:
        found = quantized_layers(self.model)
        for name in self.layout.layers:
            layer = found[name]
            quantizer = layer.weight_quantizer
            if isinstance(quantizer, UniformQuantizer) and quantizer.threshold_factors is None:
                quantizer.recalibrate(layer.weight.detach())

    @torch.no_grad()
    def recalibrate(self) -> None:
        """Re-estimate BatchNorm statistics and activation ranges on the calibration batches (training mode)."""
        if not self.calibration:
            return
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [bn.momentum for bn in norms]
        quantizers = list(activation_quantizers(self.model).values())
        observing = [q.observing for q in quantizers]
        with modes_kept(self.model, training=True):
            for m in self.model.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.eval()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not self.recalibrate_bn:
                    m.eval()
            if self.recalibrate_bn:
                for bn in norms:
                    if bn.track_running_stats:
                        bn.reset_running_stats()
                        bn.momentum = None  # cumulative average over the calibration batches
            for q in quantizers:
                if q.threshold_factors is None:
                    q.observer.reset()
                    q.observing = True
            try:
                for x in self.calibration:
                    self.model(x.to(self.device))
            finally:
                for bn, momentum in zip(norms, momenta, strict=True):
                    bn.momentum = momentum
                for q, was in zip(quantizers, observing, strict=True):
                    q.observing = was

    def _finetune(self) -> None:
        if not self.finetune_steps:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=self.finetune_lr, momentum=0.9)
        with modes_kept(self.model, training=True):
            for step in range(self.finetune_steps):
                x, y = _to(self.finetune[step % len(self.finetune)], self.device)
                loss = F.cross_entropy(_logits(self.model(x)), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        for p in params:
            p.grad = None

    @torch.no_grad()
    def measure(self) -> float:
        """The metric of the model as it is, on the evaluation batches (eval mode)."""
        total, correct, loss = 0, 0.0, 0.0
        with modes_kept(self.model, training=False):
            for batch in self.evaluation:
                x, y = _to(batch, self.device)
                logits = _logits(self.model(x))
                total += y.shape[0]
                if self.metric == "accuracy":
                    correct += float((logits.argmax(dim=1) == y).sum())
                else:
                    loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        return correct / total if self.metric == "accuracy" else -loss / total

    def reference(self) -> float:
        """The metric of the float model (every quantizer off) at the snapshot: the rewards' reference."""
        self.restore()
        with quantizers_disabled(self.model):
            return self.measure()

    # -- episodes ----------------------------------------------------------------------------------------------
    def apply(self, unit_bits: np.ndarray, act_bits: np.ndarray | None = None) -> None:
        """Restore the snapshot, set the widths, re-observe the weights and recalibrate (steps 1-3)."""
        self.restore()
        apply_unit_widths(self.model, self.layout, unit_bits, act_bits)
        self._reobserve_weights()
        self.recalibrate()

    def evaluate(self, unit_bits: np.ndarray, act_bits: np.ndarray | None = None) -> float:
        """One episode's metric for an allocation (steps 1-5); the model is left in that state."""
        self.apply(unit_bits, act_bits)
        self._finetune()
        self.evaluations += 1
        return self.measure()


def _inputs(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    return split_batch(batch, "calibration batch")[0]


def _logits(output: Any) -> Tensor:
    logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = f" of shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else ""
        raise QuantizationConfigError(
            f"The search measures classification accuracy from the model's logits [batch, classes], got "
            f"{type(logits).__name__}{shape}. HINT: the model must return class logits."
        )
    return logits


__all__ = ["METRICS", "Metric", "ModelEnvironment", "split_batch"]

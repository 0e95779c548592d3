"""A minimal image-classification ``LightningModule`` around any backbone."""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_quant.core.io import load_weights_only

__all__ = ["ImageClassifier"]

log = logging.getLogger(__name__)

_OPTIMIZERS = ("adam", "sgd")
_SCHEDULERS = ("none", "cosine")


def _is_real(value: Any) -> bool:
    """Whether ``value`` is an int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ImageClassifier(L.LightningModule):
    """Cross-entropy classification with accuracy metrics, for any ``nn.Module`` backbone.

    The backbone maps images to ``num_classes`` logits. Usable from a LightningCLI YAML, the backbone
    given by ``class_path``/``init_args``::

        model:
          class_path: lightning_quant.models.ImageClassifier
          init_args:
            backbone:
              class_path: lightning_quant.models.CifarResNet
              init_args: {depth: 20}
            lr: 0.1
            optimizer: sgd

    Logged metrics: ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss`` and
    ``test/acc`` (top-1 accuracy over all samples, ``average="micro"``). The optimizer is built over
    ``self.parameters()`` in :meth:`configure_optimizers`, which Lightning calls after the callbacks'
    ``setup()``: parameters that a quantization callback adds there (learned step sizes, thresholds)
    are trained too.

    Args:
        backbone: Network mapping ``(N, C, H, W)`` images to ``(N, num_classes)`` logits.
        num_classes: Number of classes, at least 2.
        lr: Learning rate, > 0.
        optimizer: ``"adam"`` (``torch.optim.Adam``) or ``"sgd"`` (``torch.optim.SGD`` with momentum).
        weight_decay: L2 weight decay, >= 0.
        momentum: SGD momentum in [0, 1); ignored by Adam.
        scheduler: ``"none"`` or ``"cosine"`` (cosine annealing to 0 over ``trainer.max_epochs``,
            or per step over ``trainer.max_steps`` when the epoch count is unbounded).
        weights: path of trained *float* weights to start from: a Lightning ``.ckpt`` of this module, or a
            ``torch.save`` file of its ``state_dict()`` or of the backbone's. Loaded (strictly) here, before any
            callback copies the model, so FP teachers (block replacement, FAT, data-free) are the trained
            model; how to start the techniques that need a trained model from a LightningCLI YAML. Not saved
            as a hyperparameter (a checkpoint of this module holds the weights themselves).

    Raises:
        TypeError: If ``backbone`` is not an ``nn.Module``.
        ValueError: If another argument is out of range; the message names the argument, the value
            and the fix.
        FileNotFoundError: If ``weights`` does not exist.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 10,
        lr: float = 1e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: Literal["none", "cosine"] = "none",
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(
                f"`backbone` must be a torch.nn.Module, got {type(backbone).__name__}. Pass a model "
                "instance (in YAML: `class_path` and `init_args`)."
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
        if not _is_real(lr) or not lr > 0:
            raise ValueError(f"`lr` must be a positive number, got {lr!r}. Use e.g. lr=1e-3 for Adam.")
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {_OPTIMIZERS}, got {optimizer!r}.")
        if not _is_real(weight_decay) or not weight_decay >= 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}. Use 0.0 to disable it.")
        if not _is_real(momentum) or not 0 <= momentum < 1:
            raise ValueError(f"`momentum` must be within [0, 1), got {momentum!r}. Use e.g. momentum=0.9.")
        if scheduler not in _SCHEDULERS:
            raise ValueError(f"`scheduler` must be one of {_SCHEDULERS}, got {scheduler!r}.")
        self.save_hyperparameters(ignore=["backbone", "weights"])
        self.backbone = backbone
        self.num_classes = num_classes
        self.lr = float(lr)
        self.optimizer_name = optimizer
        self.weight_decay = float(weight_decay)
        self.momentum = float(momentum)
        self.scheduler_name = scheduler
        # Top-1 accuracy over all samples (torchmetrics' default would be the per-class "macro" mean).
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self._warned_unlabeled = False
        if weights is not None:
            self._load_float_weights(weights)

    def _load_float_weights(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"`weights` file {path!r} does not exist. Pass the path of a trained float checkpoint "
                "(a Lightning .ckpt or a torch.save'd state_dict), or leave `weights` unset."
            )
        state = load_weights_only(path, "weights")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise ValueError(f"`weights` file {path!r} holds a {type(state).__name__}, not a state_dict.")
        target: nn.Module = self if any(k.startswith("backbone.") for k in state) else self.backbone
        try:
            target.load_state_dict(state, strict=True)
        except RuntimeError as err:
            detail = " ".join(str(err).split())
            detail = detail if len(detail) <= 300 else detail[:300] + " ..."
            raise ValueError(
                f"`weights` file {path!r} does not fit this model ({detail}). It must hold float weights of the same "
                "backbone; load a *quantized* checkpoint with `lightning_quant.load_quantized` instead."
            ) from err
        log.info("ImageClassifier: loaded float weights from %s", path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the backbone's logits for images ``x``."""
        return self.backbone(x)

    def _shared_step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        """Compute and log loss and accuracy of one ``(x, y)`` batch for ``stage``."""
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        # Lightning's defaults: per step in training, per epoch (averaged) in validation and test.
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train")
        self.log(f"{stage}/acc", metric, prog_bar=stage == "val")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Cross-entropy loss of an ``(x, y)`` batch; logs ``train/loss`` and ``train/acc``.

        A batch of images only (a tensor, or a 1-tuple) has no labels, so the module's own loss is zero (still
        attached to the graph): that is for label-free callbacks that supply the loss themselves, such as
        :class:`~lightning_quant.ThresholdTuningCallback` (FAT's distillation). A warning says so once.
        """
        if isinstance(batch, torch.Tensor) or (isinstance(batch, (list, tuple)) and len(batch) == 1):
            if not self._warned_unlabeled:
                log.warning(
                    "ImageClassifier: training batches hold images only (no labels), so its own loss is 0. That is "
                    "right with a label-free callback (ThresholdTuningCallback); otherwise yield (images, labels)."
                )
                self._warned_unlabeled = True
            images = batch if isinstance(batch, torch.Tensor) else batch[0]
            return self(images).sum() * 0.0
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Logs ``val/loss`` and ``val/acc`` for an ``(x, y)`` batch."""
        return self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Logs ``test/loss`` and ``test/acc`` for an ``(x, y)`` batch."""
        return self._shared_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Predicted class indices.

        Args:
            batch: Images ``x``, a 1-tuple ``(x,)`` or an ``(x, y)`` pair (labels are ignored).
            batch_idx: Index of the batch.
            dataloader_idx: Index of the dataloader.

        Returns:
            ``(N,)`` tensor of class indices.
        """
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)

    def configure_optimizers(self) -> Any:
        """Adam or SGD over all parameters, optionally with cosine annealing.

        Returns:
            The optimizer, or a dict with the optimizer and its ``lr_scheduler`` config.
        """
        # Every parameter, frozen ones included: a parameter without a gradient is not updated, and a
        # callback may unfreeze it later (or add it in `setup`, as quantizers do).
        params = list(self.parameters())
        optimizer: torch.optim.Optimizer
        if self.optimizer_name == "adam":
            optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            momentum, weight_decay = self.momentum, self.weight_decay
            optimizer = torch.optim.SGD(params, lr=self.lr, momentum=momentum, weight_decay=weight_decay)
        if self.scheduler_name == "none":
            return optimizer

        trainer = self._trainer
        max_epochs = getattr(trainer, "max_epochs", None)
        max_steps = getattr(trainer, "max_steps", -1)
        if max_epochs is not None and max_epochs > 0:
            t_max, interval = max_epochs, "epoch"
        elif max_steps is not None and max_steps > 0:
            t_max, interval = max_steps, "step"
        else:
            log.warning(
                "ImageClassifier: scheduler='cosine' needs a bounded run (trainer.max_epochs or "
                "trainer.max_steps > 0); training with a constant learning rate instead."
            )
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

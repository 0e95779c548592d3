"""Model factories: how a search builds the ``LightningModule`` of one architecture from its choices."""

from __future__ import annotations

import abc
import importlib
import inspect
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
from torch import nn

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.models.classifier import ImageClassifier

__all__ = ["ImageClassifierFactory", "ModelFactory", "import_object"]


class ModelFactory(abc.ABC):
    """Builds a fresh ``LightningModule`` for one architecture: ``factory(**choices)``.

    A search calls it with one value for each architecture choice it searches (``width_multiplier=0.5``,
    ``depth=14``, ...) and with no argument when it searches no architecture. Each call must return a new,
    untrained model (the search loads or trains its float weights). Any callable with this signature works in
    Python; subclass this class to configure a factory from a YAML file (``class_path`` / ``init_args``).
    """

    @abc.abstractmethod
    def __call__(self, **choices: Any) -> pl.LightningModule:
        """A new model of the architecture given by ``choices``."""


def import_object(path: str, argument: str) -> Any:
    """The object at a dotted import path (``"lightning_quant.models.CifarResNet"``), or a clear error."""
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise QuantizationConfigError(
            f"`{argument}` must be a dotted import path like 'package.module.Class', got {path!r}."
        )
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise QuantizationConfigError(f"`{argument}` = {path!r} cannot be imported: {err}.") from err


class ImageClassifierFactory(ModelFactory):
    """An :class:`~lightning_quant.models.ImageClassifier` around a backbone built from the architecture choices.

    Each choice is a keyword argument of the backbone (``depth=14`` for
    :class:`~lightning_quant.models.CifarResNet`), except ``width_multiplier``, which scales the backbone's
    ``width_argument`` (its value in ``backbone_args``, else the backbone's default) and rounds to an integer of at
    least 1: ``width_multiplier=0.5`` gives a CIFAR ResNet ``width=8`` instead of 16.

    Args:
        backbone: dotted import path of the backbone class (or a function returning an ``nn.Module``).
        backbone_args: keyword arguments of every backbone (``in_channels``, ``num_classes``, ...).
        num_classes: classes of the classifier.
        lr: learning rate of the float training and of the QAT fine-tuning.
        optimizer: ``"adam"`` or ``"sgd"``.
        scheduler: ``"none"`` or ``"cosine"``.
        weight_decay: L2 weight decay.
        width_argument: the backbone argument that ``width_multiplier`` scales.

    Example:
        >>> factory = ImageClassifierFactory(backbone_args={"depth": 8, "in_channels": 1})
        >>> factory(width_multiplier=0.5).backbone.width
        8
    """

    WIDTH_MULTIPLIER = "width_multiplier"

    def __init__(
        self,
        backbone: str = "lightning_quant.models.CifarResNet",
        backbone_args: dict[str, Any] | None = None,
        num_classes: int = 10,
        lr: float = 3e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
        scheduler: Literal["none", "cosine"] = "cosine",
        weight_decay: float = 0.0,
        width_argument: str = "width",
    ) -> None:
        self.backbone = backbone
        self.backbone_class = import_object(backbone, "backbone")
        if not callable(self.backbone_class):
            raise QuantizationConfigError(f"`backbone` = {backbone!r} is not a class or function.")
        self.backbone_args = dict(backbone_args or {})
        self.num_classes = num_classes
        self.lr = lr
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.weight_decay = weight_decay
        self.width_argument = width_argument

    def _base_width(self) -> int:
        if self.width_argument in self.backbone_args:
            return int(self.backbone_args[self.width_argument])
        parameter = inspect.signature(self.backbone_class).parameters.get(self.width_argument)
        if parameter is None or not isinstance(parameter.default, int):
            raise QuantizationConfigError(
                f"`width_multiplier` scales the backbone argument `{self.width_argument}`, which "
                f"{self.backbone!r} does not have with an integer default. HINT: set `width_argument` to the "
                f"backbone's width argument, or give it in `backbone_args`."
            )
        return parameter.default

    def backbone_kwargs(self, choices: Mapping[str, Any]) -> dict[str, Any]:
        """The backbone's keyword arguments for one architecture."""
        kwargs = dict(self.backbone_args)
        for name, value in choices.items():
            if name == self.WIDTH_MULTIPLIER:
                kwargs[self.width_argument] = max(1, round(self._base_width() * float(value)))
            else:
                kwargs[name] = value
        return kwargs

    def __call__(self, **choices: Any) -> pl.LightningModule:
        backbone = self.backbone_class(**self.backbone_kwargs(choices))
        if not isinstance(backbone, nn.Module):
            raise QuantizationConfigError(f"`backbone` {self.backbone!r} returned a {type(backbone).__name__}.")
        return ImageClassifier(
            backbone,
            num_classes=self.num_classes,
            lr=self.lr,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            weight_decay=self.weight_decay,
        )

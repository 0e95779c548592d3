"""Save a quantized model and load it back, strictly, into a freshly built float model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.io import load_weights_only
from lightning_quant.surgery.quantize import quantize_model
from lightning_quant.surgery.spec import QuantSpec

#: key of the exact per-layer recipe in a Lightning checkpoint or a file written by :func:`save_quantized`
SPEC_KEY = "lightning_quant_spec"


def save_quantized(model: nn.Module, path: str | Path) -> None:
    """Write ``{"state_dict", "lightning_quant_spec"}``: everything :func:`load_quantized` needs."""
    torch.save({"state_dict": model.state_dict(), SPEC_KEY: QuantSpec.from_model(model).to_dict()}, path)


def load_quantized(model: nn.Module, checkpoint: str | Path | Mapping[str, Any], *, strict: bool = True) -> nn.Module:
    """Quantize a freshly built float ``model`` with the recipe stored in ``checkpoint`` and load its state.

    Works with Lightning checkpoints written while a quantization callback was attached (``model`` is then
    the ``LightningModule``) and with files from :func:`save_quantized`. Bit widths changed during training
    and learned step sizes come back exactly; loading is strict by default.

    Args:
        model: the float model, built as for training (not yet quantized).
        checkpoint: a path, or an already loaded checkpoint dict.
        strict: passed to ``load_state_dict``.

    Example:
        >>> model = load_quantized(ImageClassifier(LeNet5()), "epoch=9.ckpt")  # doctest: +SKIP
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = load_weights_only(checkpoint, "checkpoint")
    if SPEC_KEY not in checkpoint:
        raise QuantizationConfigError(
            f"`checkpoint` has no {SPEC_KEY!r} entry, so it was not saved from a quantized model. "
            "Save with `save_quantized(model, path)`, or train with a quantization callback attached."
        )
    quantize_model(model, QuantSpec.from_dict(checkpoint[SPEC_KEY]))
    model.load_state_dict(checkpoint["state_dict"], strict=strict)
    return model

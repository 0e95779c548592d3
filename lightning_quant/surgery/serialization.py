"""Save a quantized model and load it back, strictly, into a freshly built float model."""

from __future__ import annotations

import warnings
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


def load_quantized(
    model: nn.Module | type[nn.Module],
    checkpoint: str | Path | Mapping[str, Any],
    *,
    strict: bool = True,
    **init_kwargs: Any,
) -> nn.Module:
    """Build (or take) the float model, quantize it with the recipe stored in ``checkpoint``, and load its state.

    Two forms:

    * ``load_quantized(MyModel, "epoch=9.ckpt", **init_kwargs)`` mirrors Lightning's
      ``MyModel.load_from_checkpoint("epoch=9.ckpt", **init_kwargs)``: a ``LightningModule`` class is built by
      ``load_from_checkpoint`` itself (saved hyper-parameters, ``init_kwargs`` overriding them, ``map_location``,
      ``hparams_file`` and the other keywords of ``load_from_checkpoint``), loading only the float part of the state
      at first; then it is quantized with the stored recipe and the whole state is loaded. Any other ``nn.Module``
      class is built as ``model(**init_kwargs)``. ``MyModel.load_from_checkpoint`` alone fails on a quantized
      checkpoint (``Unexpected key(s) in state_dict: "...weight_quantizer.scale"``): no callback runs there to
      quantize the model first.
    * ``load_quantized(fresh_model, path)``: a freshly built float model (not yet quantized).

    Works with Lightning checkpoints written while a quantization callback was attached and with files from
    :func:`save_quantized`. Bit widths changed during training and learned step sizes come back exactly; loading is
    strict by default.

    Args:
        model: a float model, or the class to build it from.
        checkpoint: a path, or an already loaded checkpoint dict (for a ``LightningModule`` class, a path or a
            file-like object: ``load_from_checkpoint`` reads it).
        strict: passed to ``load_state_dict`` (of the whole, quantized state).
        init_kwargs: with a class: the keywords of ``load_from_checkpoint`` (a ``LightningModule``) or of the
            class's ``__init__``.

    Example:
        >>> model = load_quantized(LitClassifier, "epoch=9.ckpt")  # doctest: +SKIP
        >>> model = load_quantized(ImageClassifier(LeNet5()), "epoch=9.ckpt")  # doctest: +SKIP
    """
    if not isinstance(model, type) and init_kwargs:
        raise QuantizationConfigError(
            f"`load_quantized` got keyword arguments {sorted(init_kwargs)} with an already built "
            f"{type(model).__name__}; they are for building it. HINT: pass the class, "
            f"`load_quantized({type(model).__name__}, path, ...)`, or build the model yourself."
        )
    if isinstance(model, type) and not issubclass(model, nn.Module):
        raise QuantizationConfigError(f"`model` must be an nn.Module or an nn.Module class, got {model!r}.")
    loaded = checkpoint if isinstance(checkpoint, Mapping) else _load(checkpoint)
    if SPEC_KEY not in loaded:
        raise QuantizationConfigError(
            f"`checkpoint` has no {SPEC_KEY!r} entry, so it was not saved from a quantized model. "
            "Save with `save_quantized(model, path)`, or train with a quantization callback attached."
        )
    if isinstance(model, type):
        model = _build(model, checkpoint, loaded, init_kwargs)
    quantize_model(model, QuantSpec.from_dict(loaded[SPEC_KEY]))
    model.load_state_dict(loaded["state_dict"], strict=strict)
    return model


def _load(checkpoint: Any) -> Mapping[str, Any]:
    position = checkpoint.tell() if hasattr(checkpoint, "tell") else None
    loaded = load_weights_only(checkpoint, "checkpoint")
    if position is not None:
        checkpoint.seek(position)  # a file-like object is read again by load_from_checkpoint
    return loaded


def _build(cls: type[nn.Module], source: Any, loaded: Mapping[str, Any], init_kwargs: dict[str, Any]) -> nn.Module:
    """``cls`` built as ``load_from_checkpoint`` builds it (a LightningModule), else ``cls(**init_kwargs)``."""
    load_from_checkpoint = getattr(cls, "load_from_checkpoint", None)
    if load_from_checkpoint is None:
        return cls(**init_kwargs)
    if isinstance(source, Mapping):
        raise QuantizationConfigError(
            f"`load_quantized({cls.__name__}, ...)` builds the module with `{cls.__name__}.load_from_checkpoint`, "
            "which reads a path or a file, got a dict. HINT: pass the checkpoint's path, or build the module and "
            f"call `load_quantized({cls.__name__}(...), checkpoint)`."
        )
    with warnings.catch_warnings():
        # the quantizer entries are loaded by the caller once the module is quantized; Lightning warns about each
        warnings.filterwarnings("ignore", message="Found keys that are (not )?in the model state dict")
        return load_from_checkpoint(source, strict=False, **init_kwargs)

"""What :func:`~lightning_quant.surgery.quantize_model` leaves in float, and why.

:func:`unquantized_layers` lists the weight layers of a model that stay in float for a reason of the suite's
(not because the spec excluded them):

* module types with weights that the suite does not quantize (:data:`UNSUPPORTED_TYPES`: recurrent cells,
  ``nn.EmbeddingBag``, transposed convolutions, ``nn.Bilinear``);
* layers of a quantizable type configured in a way the quantized layer does not support (attention with
  ``kdim``/``vdim``/``bias_k``, LSTM projections: :func:`~lightning_quant.surgery.layers.unsupported_reason`);
* subclasses of the quantizable types with their own code (only exact types are swapped);
* layers whose parent reads their weight directly instead of calling them (torchvision's Swin calls
  ``F.linear(x, self.qkv.weight, ...)``): a module swap cannot reach such a read, so the layer would be reported
  as quantized but never run quantized. :func:`directly_read_layers` finds them and ``quantize_model`` leaves them
  in float.

``quantize_model`` warns once with this list and :func:`~lightning_quant.surgery.quantization_summary` shows it.
Everything else with weights of a quantizable type (Conv, Linear, Embedding, MultiheadAttention, LSTM/GRU/RNN)
runs quantized when selected; ``nn.TransformerEncoderLayer``'s fused inference path is kept off for blocks that
hold quantized layers (:mod:`~lightning_quant.surgery.fastpath`).

How a direct read is found (our choice; cheap and static): the source of the parent's class, less its set-up
methods (``__init__``, ``reset_parameters``, ...), mentions ``self.<name>.weight`` (or the layer's own quantized
Parameter, e.g. ``self.<name>.in_proj_weight``) and never calls ``self.<name>(...)`` or ``self.<name>.forward(...)``.
Classes without retrievable source are skipped.
"""

from __future__ import annotations

import functools
import inspect
import re

from torch import nn

from lightning_quant.surgery.layers import QUANTIZED_TYPES, QuantizedLayer, unsupported_reason

__all__ = ["UNSUPPORTED_TYPES", "directly_read_layers", "unquantized_layers"]

_RECURRENT_CELL = "recurrent cells are not quantized (nn.LSTM/nn.GRU/nn.RNN are: use them for whole sequences)"

#: module types with weights that the suite does not quantize, and the reason users are shown
UNSUPPORTED_TYPES: dict[type[nn.Module], str] = {
    nn.EmbeddingBag: "nn.EmbeddingBag weights are not quantized (nn.Embedding weights are)",
    nn.LSTMCell: _RECURRENT_CELL,
    nn.GRUCell: _RECURRENT_CELL,
    nn.RNNCell: _RECURRENT_CELL,
    nn.ConvTranspose1d: "transposed convolutions are not quantized",
    nn.ConvTranspose2d: "transposed convolutions are not quantized",
    nn.ConvTranspose3d: "transposed convolutions are not quantized",
    nn.Bilinear: "nn.Bilinear is not quantized",
}

_SWAPPABLE_BASES = tuple(QUANTIZED_TYPES)


#: methods that set weights up rather than compute with them: their reads of ``.weight`` are not a bypass
_SETUP_METHODS = ("__init__", "reset_parameters", "_reset_parameters", "init_weights", "_init_weights")


@functools.cache
def _class_source(cls: type) -> str | None:
    """The source of ``cls`` without its set-up methods (``None``: not retrievable)."""
    try:
        source = inspect.getsource(cls)
        for method in _SETUP_METHODS:
            if method in cls.__dict__:
                source = source.replace(inspect.getsource(cls.__dict__[method]), "")
    except (OSError, TypeError):
        return None
    return source


def _float_type(module: nn.Module) -> type[nn.Module]:
    return module.float_type if isinstance(module, QuantizedLayer) else type(module)


def _direct_read_reason(parent: nn.Module, attr: str, child: nn.Module) -> str | None:
    """Why ``child`` (``parent.<attr>``) never runs quantized: ``parent``'s class reads its weight itself and never
    calls it (``None``: it is called, or the source is not available)."""
    source = _class_source(type(parent))
    if source is None or not attr.isidentifier():
        return None
    name = re.escape(attr)
    if re.search(rf"self\.{name}(\.forward)?\s*\(", source):
        return None
    weight_names = {"weight", QUANTIZED_TYPES[_float_type(child)].WEIGHT_NAME}
    for weight in sorted(weight_names):
        if re.search(rf"self\.{name}\.{weight}\b", source):
            return (
                f"its parent {type(parent).__name__} reads `self.{attr}.{weight}` directly instead of calling the "
                "layer, so the layer would never run quantized"
            )
    return None


def directly_read_layers(model: nn.Module) -> dict[str, str]:
    """Layers of a quantizable type whose parent reads their weight directly instead of calling them, by name, with
    the reason; :func:`~lightning_quant.surgery.quantize_model` leaves them in float.

    Example (the parent's source must be readable, from a file: not run as a doctest):
        >>> import torch.nn.functional as F  # doctest: +SKIP
        >>> from torch import nn  # doctest: +SKIP
        >>> class Block(nn.Module):  # doctest: +SKIP
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.qkv = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return F.linear(x, self.qkv.weight, self.qkv.bias)
        >>> list(directly_read_layers(nn.Sequential(Block())))  # doctest: +SKIP
        ['0.qkv']
    """
    found: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if _float_type(child) in QUANTIZED_TYPES:
                reason = _direct_read_reason(parent, attr, child)
                if reason is not None:
                    found[f"{parent_name}.{attr}" if parent_name else attr] = reason
    return found


def unquantized_layers(model: nn.Module) -> dict[str, str]:
    """The weight layers of ``model`` that stay in float for a reason of the suite's, by name, with that reason.

    Layers the spec excludes are not listed (that is the user's choice); modules inside a listed module, or inside a
    layer of a quantizable type, are not listed again (the ``out_proj`` of an ``nn.MultiheadAttention``).

    Example:
        >>> from torch import nn
        >>> unquantized_layers(nn.Sequential(nn.EmbeddingBag(10, 4), nn.Linear(4, 2)))
        {'0': 'nn.EmbeddingBag weights are not quantized (nn.Embedding weights are)'}
    """
    found: dict[str, str] = {}
    covered: list[str] = []  # listed layers and layers of a quantizable type: their submodules are theirs
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            name = f"{parent_name}.{attr}" if parent_name else attr
            if any(name.startswith(f"{done}.") for done in covered):
                continue
            reason = UNSUPPORTED_TYPES.get(type(child))
            if _float_type(child) in QUANTIZED_TYPES:
                covered.append(name)
                unsupported = None if isinstance(child, QuantizedLayer) else unsupported_reason(child)
                if unsupported is not None:
                    reason = f"{type(child).__name__}: {unsupported}"
                else:
                    reason = _direct_read_reason(parent, attr, child)
            elif reason is None and isinstance(child, _SWAPPABLE_BASES):
                reason = (
                    f"{type(child).__name__} is a subclass of {type(child).__mro__[1].__name__} with its own code; "
                    "only exact types are swapped"
                )
            if reason is not None:
                found[name] = reason
                covered.append(name)
    return found

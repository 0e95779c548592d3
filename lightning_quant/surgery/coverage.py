"""What :func:`~lightning_quant.surgery.quantize_model` leaves in float, and why.

:func:`unquantized_layers` lists the weight layers of a model that stay in float for a reason of the suite's
(not because the spec excluded them): module types it does not quantize yet (:data:`UNSUPPORTED_TYPES`; the list
shrinks as layer kinds are added), subclasses of Conv/Linear with their own code (only exact types are swapped),
and Conv/Linear layers whose parent reads their ``.weight`` directly instead of calling them (torchvision's Swin
calls ``F.linear(x, self.qkv.weight, ...)``), which a module swap cannot reach: such a layer would be reported
as quantized but never run quantized. ``quantize_model`` warns once with this list and
:func:`~lightning_quant.surgery.quantization_summary` shows it.

How a direct read is found (our choice; cheap and static): the source of the parent's class mentions
``self.<name>.weight`` and never calls ``self.<name>(...)``. Classes without retrievable source are skipped.
"""

from __future__ import annotations

import functools
import inspect
import re

from torch import nn

from lightning_quant.surgery.layers import QUANTIZED_TYPES, QuantizedLayer

__all__ = ["UNSUPPORTED_TYPES", "unquantized_layers"]

_RECURRENT = "recurrent weights are not quantized yet (their gates' matrix products run in float)"

#: module types with weights that the suite does not quantize yet, and the reason users are shown
UNSUPPORTED_TYPES: dict[type[nn.Module], str] = {
    nn.MultiheadAttention: (
        "nn.MultiheadAttention is not quantized yet: its packed input projection (`in_proj_weight`) and its output "
        "projection (`out_proj`) stay in float"
    ),
    nn.Embedding: "nn.Embedding weights are not quantized yet",
    nn.EmbeddingBag: "nn.EmbeddingBag weights are not quantized yet",
    nn.LSTM: _RECURRENT,
    nn.GRU: _RECURRENT,
    nn.RNN: _RECURRENT,
    nn.LSTMCell: _RECURRENT,
    nn.GRUCell: _RECURRENT,
    nn.RNNCell: _RECURRENT,
    nn.ConvTranspose1d: "transposed convolutions are not quantized yet",
    nn.ConvTranspose2d: "transposed convolutions are not quantized yet",
    nn.ConvTranspose3d: "transposed convolutions are not quantized yet",
    nn.Bilinear: "nn.Bilinear is not quantized yet",
}

_SWAPPABLE_BASES = tuple(QUANTIZED_TYPES)


@functools.cache
def _class_source(cls: type) -> str | None:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return None


def _reads_weight_directly(parent: nn.Module, attr: str) -> bool:
    """Whether ``parent``'s class reads ``self.<attr>.weight`` and never calls ``self.<attr>(...)``."""
    source = _class_source(type(parent))
    if source is None or not attr.isidentifier():
        return False
    name = re.escape(attr)
    return bool(re.search(rf"self\.{name}\.weight\b", source)) and not re.search(rf"self\.{name}\s*\(", source)


def unquantized_layers(model: nn.Module) -> dict[str, str]:
    """The weight layers of ``model`` that stay in float for a reason of the suite's, by name, with that reason.

    Layers the spec excludes are not listed (that is the user's choice); modules inside a listed module are not
    listed again (``out_proj`` of a listed ``nn.MultiheadAttention``).

    Example:
        >>> from torch import nn
        >>> unquantized_layers(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)))
        {'0': 'nn.Embedding weights are not quantized yet'}
    """
    found: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            name = f"{parent_name}.{attr}" if parent_name else attr
            if any(name.startswith(f"{listed}.") for listed in found):
                continue
            reason = UNSUPPORTED_TYPES.get(type(child))
            if reason is None and isinstance(child, _SWAPPABLE_BASES):
                if _reads_weight_directly(parent, attr):
                    reason = (
                        f"its parent {type(parent).__name__} reads `self.{attr}.weight` directly instead of calling "
                        "the layer, so the layer would never run quantized"
                    )
                elif type(child) not in QUANTIZED_TYPES and not isinstance(child, QuantizedLayer):
                    reason = (
                        f"{type(child).__name__} is a subclass of {type(child).__mro__[1].__name__} with its own code; "
                        "only exact Conv/Linear types are swapped"
                    )
            if reason is not None:
                found[name] = reason
    return found

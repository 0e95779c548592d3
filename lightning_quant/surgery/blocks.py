"""Block discovery: the units that block-wise techniques (block replacement, feature capture) work on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.surgery.layers import QUANTIZED_TYPES, QuantizedLayer


def _has_layer(module: nn.Module) -> bool:
    return any(type(m) in QUANTIZED_TYPES or isinstance(m, QuantizedLayer) for m in module.modules())


def _auto_blocks(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    children = dict(model.named_children())
    # torchvision ResNets and the CIFAR ResNets of this package: the residual stages
    stages = [n for n in ("layer1", "layer2", "layer3", "layer4") if n in children]
    if len(stages) >= 2:
        return [(prefix + n, children[n]) for n in stages]
    # torchvision MobileNets / EfficientNets: the entries of `features`
    features = children.get("features")
    if isinstance(features, nn.Sequential) and len(features) >= 2 and children.get("classifier") is not None:
        return [(f"{prefix}features.{n}", m) for n, m in features.named_children() if _has_layer(m)]
    with_layers = [(n, m) for n, m in children.items() if _has_layer(m)]
    # a wrapper with a single child that holds every layer (a LightningModule's `backbone`): look inside it
    if len(with_layers) == 1 and not isinstance(with_layers[0][1], (QuantizedLayer, *QUANTIZED_TYPES)):
        name, child = with_layers[0]
        return _auto_blocks(child, f"{prefix}{name}.")
    return [(prefix + n, m) for n, m in with_layers]


def find_blocks(model: nn.Module, blocks: Literal["auto"] | Sequence[str] = "auto") -> list[tuple[str, nn.Module]]:
    """The model's blocks as ``(qualified name, module)``, in order.

    Args:
        model: the model (a ``LightningModule`` included: a single child that holds every layer, such as a
            ``backbone``, is looked into).
        blocks: ``"auto"`` -- the residual stages ``layer1..layer4`` of ResNets, the entries of ``features``
            of MobileNets/EfficientNets, and otherwise the top-level children that contain a Conv/Linear
            layer -- or the qualified names of the blocks, in forward order.

    Raises:
        QuantizationConfigError: a named block does not exist, is named twice, or fewer than two blocks exist.
    """
    if isinstance(blocks, str):
        if blocks != "auto":
            raise QuantizationConfigError(
                f'`blocks` must be "auto" or a list of module names, got {blocks!r}. '
                f'HINT: blocks=["{blocks}"] names one block.'
            )
        found = _auto_blocks(model)
    else:
        modules = dict(model.named_modules())
        missing = [b for b in blocks if b not in modules]
        if missing:
            tops = [n for n, _ in model.named_children()]
            raise QuantizationConfigError(
                f"`blocks` names modules that do not exist: {missing}. Top-level modules are {tops}; "
                "print `model` for the full names."
            )
        if len(set(blocks)) != len(blocks):
            raise QuantizationConfigError(f"`blocks` names a module twice: {list(blocks)}.")
        found = [(b, modules[b]) for b in blocks]
    if len(found) < 2:
        raise QuantizationConfigError(
            f"Found {len(found)} block(s) in {type(model).__name__}; block-wise techniques need at least two. "
            "Name them explicitly with `blocks=[...]`."
        )
    return found

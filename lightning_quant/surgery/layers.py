"""Quantized Conv/Linear layers: subclasses of the torch layers that fake-quantize the weight and the input.

A quantized layer *is* the original layer (``isinstance(QuantConv2d(...), nn.Conv2d)``) with the same
``Parameter`` objects, the same state-dict keys for them and two extra submodules, ``weight_quantizer`` and
``input_quantizer``. So optimizers built before or after the swap, float checkpoints, BatchNorm folding and
``torchvision`` helpers keep working; only the forward changes.
"""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_quant.core.quantizers import UniformQuantizer
from lightning_quant.surgery.spec import LayerSpec


class QuantizedLayer(nn.Module):
    """Mixin of the quantized layers: quantizers built from a :class:`LayerSpec` and the swap from/to float."""

    weight: nn.Parameter
    weight_quantizer: UniformQuantizer
    input_quantizer: UniformQuantizer | nn.Identity
    layer_spec: LayerSpec
    float_type: type[nn.Module]

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> QuantizedLayer:
        """A quantized copy of ``module`` that shares its parameters, buffers, submodules and hooks.

        ``module`` itself is not modified, so a failed model surgery can leave the model as it was.
        """
        layer = cls.__new__(cls)
        layer.__dict__.update(module.__dict__)
        for attr in ("_parameters", "_buffers", "_modules"):
            layer.__dict__[attr] = dict(module.__dict__[attr])
        layer.float_type = type(module)
        layer.layer_spec = spec
        weight = module.weight
        per_channel = spec.weight_granularity == "per_channel"
        layer.weight_quantizer = UniformQuantizer(
            spec.weight_bits,
            symmetric=spec.weight_symmetric,
            signed=True,
            ch_axis=0 if per_channel else None,
            num_channels=weight.shape[0] if per_channel else 1,
            learnable=spec.scale_mode == "lsq",
            observer=spec.weight_observer,
        ).to(weight.device)
        if spec.act_bits is None:
            layer.input_quantizer = nn.Identity()
        else:
            layer.input_quantizer = UniformQuantizer(
                spec.act_bits,
                symmetric=spec.act_symmetric,
                signed=spec.act_signed,
                learnable=spec.scale_mode == "lsq",
                observer=spec.act_observer,
            ).to(weight.device)
        return layer

    def to_float(self) -> nn.Module:
        """The float layer again (same parameter objects), without the quantizers."""
        module = self.float_type.__new__(self.float_type)
        module.__dict__.update(self.__dict__)
        module.__dict__["_modules"] = {
            k: v for k, v in self._modules.items() if k not in ("weight_quantizer", "input_quantizer")
        }
        for attr in ("float_type", "layer_spec"):
            module.__dict__.pop(attr, None)
        return module

    def quantized_weight(self) -> Tensor:
        """The fake-quantized weight used in forward."""
        return self.weight_quantizer(self.weight)

    def current_spec(self) -> LayerSpec:
        """This layer's recipe with its current bit widths (which callbacks may have changed)."""
        act_bits = self.input_quantizer.bits if isinstance(self.input_quantizer, UniformQuantizer) else None
        return dataclasses.replace(self.layer_spec, weight_bits=self.weight_quantizer.bits, act_bits=act_bits)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w{self.weight_quantizer.bits}a{self.current_spec().act_bits or 'fp'}"


class _QuantConvNd(QuantizedLayer):
    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)  # type: ignore[attr-defined]


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """:class:`torch.nn.Conv1d` with fake-quantized weight and input."""


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """:class:`torch.nn.Conv2d` with fake-quantized weight and input (grouped and depthwise included)."""


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    """:class:`torch.nn.Conv3d` with fake-quantized weight and input."""


class QuantLinear(QuantizedLayer, nn.Linear):
    """:class:`torch.nn.Linear` with fake-quantized weight and input."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)


#: float layer type -> its quantized counterpart (exact types: subclasses may have their own forward)
QUANTIZED_TYPES: dict[type[nn.Module], type[QuantizedLayer]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.Linear: QuantLinear,
}


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """The quantized layers of ``model`` by qualified name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def quantizers(model: nn.Module) -> dict[str, UniformQuantizer]:
    """Every quantizer module of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, UniformQuantizer)}

"""What model surgery reads from a model's dataflow: a :mod:`torch.fx` trace with layers kept whole.

Two things need the graph rather than the module tree: which BatchNorm directly follows which convolution
(:mod:`~lightning_quant.surgery.fold`), and which tensors enter a residual addition
(:func:`residual_producers`). The tracer keeps convolutions, linear layers, BatchNorms and quantized layers
as single ``call_module`` nodes, so node targets are the module names users see.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from lightning_quant.core.errors import QuantizationConfigError

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


class LeafTracer(fx.Tracer):
    """fx tracer that keeps Conv/Linear/BatchNorm layers (float or quantized) as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (*CONV_TYPES, *BN_TYPES, nn.Linear)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.Graph:
    """The fx graph of ``model`` (raises whatever fx raises on an untraceable model)."""
    return LeafTracer().trace(model)


# ops that commute with a quantizer in front of them (monotonic, elementwise or max-pooling), so a quantizer
# placed before them serves every consumer after them
_PASSTHROUGH_FUNCTIONS = (torch.relu, torch.nn.functional.relu, torch.nn.functional.max_pool2d)
_PASSTHROUGH_MODULES = (nn.ReLU, nn.ReLU6, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def _is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _PASSTHROUGH_MODULES)
    if node.op == "call_function":
        return node.target in _PASSTHROUGH_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in _ADD_METHODS


def residual_producers(model: nn.Module) -> dict[str, str]:
    """The layers whose output goes straight into a residual addition, mapped to the layer that feeds them.

    For ``out = bn2(conv2(x)) + shortcut(x)`` with a projection shortcut ``conv -> bn`` this returns
    ``{"bn2": "conv2", "shortcut.1": "shortcut.0"}``; a Conv/Linear output added directly maps to itself.
    The path back from the addition may pass through ReLUs, max-pooling and ``nn.Identity``: a stem
    ``conv -> bn -> relu`` whose output both enters the first block's convolution and its identity shortcut
    gives ``{"bn1": "conv1"}`` (its
    convolution has two consumers, so only a quantizer before the ReLU lets it run in int8). Inputs that are
    no such layer's output (the sum of the previous block) are left out: no convolution writes them, so
    they cost an int8 runtime nothing in float.

    Raises:
        QuantizationConfigError: fx cannot trace ``model`` (data-dependent control flow, for example).
    """
    try:
        graph = trace(model)
    except Exception as err:  # fx raises many kinds of errors on untraceable models
        raise QuantizationConfigError(
            f"Finding the residual additions of {type(model).__name__} needs a torch.fx trace, which failed "
            f"({type(err).__name__}: {err}). HINT: set `quantize_residuals=False`, or give the layers that feed "
            "an addition an output quantizer yourself with `LayerSpec(output_bits=8)` in `QuantSpec.layers`."
        ) from err
    modules = dict(model.named_modules())
    producers: dict[str, str] = {}
    for node in graph.nodes:
        if not _is_add(node):
            continue
        for arg in node.args:
            while isinstance(arg, fx.Node) and _is_passthrough(arg, modules) and arg.args:
                arg = arg.args[0]
            if not (isinstance(arg, fx.Node) and arg.op == "call_module" and len(arg.users) == 1):
                continue
            module = modules.get(str(arg.target))
            if isinstance(module, (*CONV_TYPES, nn.Linear)):
                producers[str(arg.target)] = str(arg.target)
            elif isinstance(module, BN_TYPES):
                source = arg.args[0] if arg.args else None
                if (
                    isinstance(source, fx.Node)
                    and source.op == "call_module"
                    and isinstance(modules.get(str(source.target)), CONV_TYPES)
                ):
                    producers[str(arg.target)] = str(source.target)
    return producers


__all__ = ["BN_TYPES", "CONV_TYPES", "LeafTracer", "residual_producers", "trace"]

"""What model surgery reads from a model's dataflow: a :mod:`torch.fx` trace with layers kept whole.

Some questions need the graph rather than the module tree: which BatchNorm directly follows which convolution
(:mod:`~lightning_quant.surgery.fold`), which layers feed a residual addition (:func:`residual_producers`),
which ReLUs sit at one and which layers they feed (:func:`residual_activations`), and which modules call one
ReLU twice (:func:`shared_activation_owners`, :func:`unshared_copy`). The tracer keeps convolutions, linear
layers, BatchNorms, ReLUs, max-pooling and quantizers as single ``call_module`` nodes, so node targets are the
module names users see.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx, nn

from lightning_quant.core.errors import QuantizationConfigError

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
# ops that commute with a quantizer in front of them (monotonic, elementwise or max-pooling), so a quantizer
# placed before them serves every consumer after them
_PASSTHROUGH_FUNCTIONS = (torch.relu, torch.nn.functional.relu, torch.nn.functional.max_pool2d)
_PASSTHROUGH_MODULES = (*_ACTIVATION_MODULES, nn.Identity, *_POOL_MODULES)


class LeafTracer(fx.Tracer):
    """fx tracer that keeps Conv/Linear/BatchNorm layers (float or quantized) as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # quantizers too: their forward branches on Python state that fx would try to trace through
        leaf_types = (*CONV_TYPES, *BN_TYPES, nn.Linear, *_ACTIVATION_MODULES, *_POOL_MODULES)
        if isinstance(m, leaf_types) or type(m).__name__.endswith("Quantizer"):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.Graph:
    """The fx graph of ``model`` (raises whatever fx raises on an untraceable model)."""
    return LeafTracer().trace(model)


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


def _residual_trace(model: nn.Module) -> tuple[fx.Graph, dict[str, nn.Module]]:
    try:
        graph = trace(model)
    except Exception as err:  # fx raises many kinds of errors on untraceable models
        raise QuantizationConfigError(
            f"Finding the residual additions of {type(model).__name__} needs a torch.fx trace, which failed "
            f"({type(err).__name__}: {err}). HINT: set `quantize_residuals=False`, or give the layers that feed "
            "an addition an output quantizer yourself with `LayerSpec(output_bits=8)` in `QuantSpec.layers`."
        ) from err
    return graph, dict(model.named_modules())


def _call_counts(graph: fx.Graph) -> dict[str, int]:
    """How often each module is called in one forward."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    return calls


def _once_called_activations(graph: fx.Graph, modules: dict[str, nn.Module]) -> set[str]:
    """ReLU modules called exactly once that take a residual sum or whose output reaches a residual addition.

    A ReLU module used twice (torchvision's ``BasicBlock.relu``) cannot get a quantizer of its own per use.
    """
    calls = _call_counts(graph)
    found = set()
    for node in graph.nodes:
        target = str(node.target)
        if node.op != "call_module" or calls[target] != 1 or not isinstance(modules.get(target), _ACTIVATION_MODULES):
            continue
        source = node.args[0] if node.args else None
        if (isinstance(source, fx.Node) and _is_add(source)) or any(_is_add(u) for u in _reached(node, modules)):
            found.add(target)
    return found


def _reached(node: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node]:
    """The nodes that consume ``node``'s value, looking through pass-through ops (identity, max-pooling)."""
    out = []
    for user in node.users:
        if _is_passthrough(user, modules) and not isinstance(modules.get(str(user.target)), _ACTIVATION_MODULES):
            out += _reached(user, modules)
        else:
            out.append(user)
    return out


def shared_activation_owners(model: nn.Module) -> list[str]:
    """Names of the modules whose forward calls one ReLU child twice or more (torchvision's ``BasicBlock``).

    Raises:
        QuantizationConfigError: fx cannot trace ``model``.
    """
    graph, modules = _residual_trace(model)
    calls = _call_counts(graph)
    owners = [
        target.rpartition(".")[0]
        for target, count in calls.items()
        if count > 1 and isinstance(modules.get(target), _ACTIVATION_MODULES)
    ]
    return list(dict.fromkeys(owners))


def unshared_copy(module: nn.Module) -> fx.GraphModule:
    """``module`` as a :class:`torch.fx.GraphModule` in which every further call of a ReLU child gets a copy.

    ``relu`` called twice becomes ``relu`` and ``relu_1``: same computation, same parameters and state-dict
    keys (ReLUs have none), but each use is a module of its own that can carry an output quantizer. The
    GraphModule keeps the original class name; ``module`` itself is not changed.
    """
    graph = LeafTracer().trace(module)
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        target = str(node.target)
        if node.op != "call_module" or "." in target or not isinstance(gm.get_submodule(target), _ACTIVATION_MODULES):
            continue
        seen[target] = seen.get(target, 0) + 1
        if seen[target] > 1:
            name = f"{target}_{seen[target] - 1}"
            gm.add_submodule(name, copy.deepcopy(gm.get_submodule(target)))
            node.target = name
    gm.recompile()
    return gm


def residual_activations(model: nn.Module) -> dict[str, list[str]]:
    """The ReLU modules at residual additions, each with the Conv/Linear layers that consume its output.

    A ReLU (or ReLU6) module called once whose input is a residual sum, or whose output enters a residual
    addition (through identity or max-pooling), e.g. ``relu2`` of a CIFAR ResNet block and the stem's ReLU:
    quantizing its output -- with the same quantizer as the layers it feeds -- puts both inputs and the output
    of the next addition on integer grids. The consumer lists name every Conv/Linear layer fed directly
    (through identity or max-pooling). A max-pooling module right after such a ReLU is listed too, with the
    same consumers (it gets the same quantizer).

    Raises:
        QuantizationConfigError: fx cannot trace ``model``.
    """
    graph, modules = _residual_trace(model)
    calls = _call_counts(graph)
    activations = _once_called_activations(graph, modules)
    result = {}
    for node in graph.nodes:
        if node.op == "call_module" and str(node.target) in activations:
            consumers = [
                str(u.target)
                for u in _reached(node, modules)
                if u.op == "call_module" and isinstance(modules.get(str(u.target)), (*CONV_TYPES, nn.Linear))
            ]
            result[str(node.target)] = consumers
            # a max-pooling right after (the stem of torchvision's ResNet) gets the same quantizer: max-pooling
            # on-grid values stays on the grid, and the runtime then pools in int8 for every consumer
            (user,) = node.users if len(node.users) == 1 else (None,)
            if user is not None and user.op == "call_module" and calls[str(user.target)] == 1:
                if isinstance(modules.get(str(user.target)), _POOL_MODULES):
                    result[str(user.target)] = consumers
    return result


def residual_producers(model: nn.Module) -> dict[str, str]:
    """The layers whose output goes straight into a residual addition, mapped to the layer that feeds them.

    For ``out = bn2(conv2(x)) + shortcut(x)`` with a projection shortcut ``conv -> bn`` this returns
    ``{"bn2": "conv2", "shortcut.1": "shortcut.0"}``; a Conv/Linear output added directly maps to itself.
    The path back from the addition may pass through ReLUs, max-pooling and ``nn.Identity`` -- but not
    through a ReLU module that :func:`residual_activations` quantizes itself. A stem
    ``conv -> bn -> relu`` whose (shared, or functional) ReLU output both enters the first block's convolution
    and its identity shortcut gives ``{"bn1": "conv1"}`` (its
    convolution has two consumers, so only a quantizer before the ReLU lets it run in int8). Inputs that are
    no such layer's output (the sum of the previous block) are left out: no convolution writes them, so
    they cost an int8 runtime nothing in float.

    Raises:
        QuantizationConfigError: fx cannot trace ``model`` (data-dependent control flow, for example).
    """
    graph, modules = _residual_trace(model)
    own_activations = _once_called_activations(graph, modules)
    producers: dict[str, str] = {}
    for node in graph.nodes:
        if not _is_add(node):
            continue
        for arg in node.args:
            # walk back through ReLUs and pooling, but not through a ReLU module that gets its own quantizer
            while (
                isinstance(arg, fx.Node)
                and _is_passthrough(arg, modules)
                and arg.args
                and str(arg.target) not in own_activations
            ):
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


__all__ = [
    "BN_TYPES",
    "CONV_TYPES",
    "LeafTracer",
    "residual_activations",
    "residual_producers",
    "shared_activation_owners",
    "trace",
    "unshared_copy",
]

"""What model surgery reads from a model's dataflow: a :mod:`torch.fx` trace with layers kept whole.

Some questions need the graph rather than the module tree: which BatchNorm directly follows which convolution
(:mod:`~lightning_quant.surgery.fold`), which layers feed a residual addition (:func:`residual_producers`),
which ReLUs sit at one and which layers they feed (:func:`residual_activations`), which convolutions need an
output quantizer for an int8 runtime in any graph (:func:`conv_output_placements`), and which modules call one
ReLU twice or apply a functional ReLU at one (:func:`retrace_owners`, :func:`unshared_copy`). The tracer keeps
convolutions, linear layers, BatchNorms, ReLUs, max-pooling and quantizers as single ``call_module`` nodes, so
node targets are the module names users see.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Collection

import torch
from torch import fx, nn

from lightning_quant.core.errors import QuantizationConfigError

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_RELU_FUNCTIONS = (torch.relu, torch.nn.functional.relu)
# reshapes and slices: a per-tensor grid before them is the grid after them
_RESHAPE_FUNCTIONS = (
    torch.flatten,
    torch.reshape,
    torch.transpose,
    torch.permute,
    torch.squeeze,
    torch.unsqueeze,
    torch.chunk,
    torch.split,
    operator.getitem,
)
_RESHAPE_METHODS = (
    "view",
    "reshape",
    "flatten",
    "transpose",
    "permute",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "chunk",
    "split",
)
_SHAPE_METHODS = ("size", "dim", "numel")
_MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul)
_MUL_METHODS = ("mul", "mul_")
_CAT_FUNCTIONS = (torch.cat, torch.concat)
#: activations an int8 runtime computes from quantized inputs into a quantized output (``QLinearSigmoid``; ORT
#: runs HardSigmoid in float between Q/DQ, which still lets the product after it run as ``QLinearMul``)
_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
#: activations ``x * gate(x)`` that exporters write as a gate and a product (SiLU, hardswish)
_GATED_MODULES = (nn.SiLU, nn.Hardswish)
_AVG_POOL_MODULES = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_PASSTHROUGH_MODULES = (*_ACTIVATION_MODULES, nn.Identity, nn.Flatten, *_DROPOUT_MODULES, *_POOL_MODULES)


def _is_stochastic_depth(m: nn.Module) -> bool:
    """torchvision's ``StochasticDepth`` (EfficientNet, ConvNeXt...): the identity in eval mode, like dropout."""
    return type(m).__name__ == "StochasticDepth"


class OpOutput(nn.Module):
    """Marks the output of an addition, product or concatenation where the deployment recipe quantizes it.

    :func:`with_op_outputs` inserts one after such an operation in a re-traced module; it is the identity until
    quantization swaps it for its output-quantized counterpart (``QuantOpOutput``).
    """

    def __init__(self, op: str = "") -> None:
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return self.op


class LeafTracer(fx.Tracer):
    """fx tracer that keeps Conv/Linear/BatchNorm layers (float or quantized) as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # quantizers too: their forward branches on Python state that fx would try to trace through
        leaf_types = (
            *CONV_TYPES,
            *BN_TYPES,
            nn.Linear,
            *_ACTIVATION_MODULES,
            *_POOL_MODULES,
            *_GATE_MODULES,
            *_GATED_MODULES,
            OpOutput,
        )
        if isinstance(m, leaf_types) or type(m).__name__.endswith("Quantizer") or _is_stochastic_depth(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.Graph:
    """The fx graph of ``model`` (raises whatever fx raises on an untraceable model)."""
    return LeafTracer().trace(model)


def _is_functional_relu(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Ops that commute with a per-tensor quantizer in front of them (monotonic elementwise, max-pooling, the
    identity in eval mode, reshapes): a quantizer placed before them serves every consumer after them."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return isinstance(module, _PASSTHROUGH_MODULES) or (module is not None and _is_stochastic_depth(module))
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS or _is_functional_relu(node)
    return node.op == "call_function" and (
        node.target in _RESHAPE_FUNCTIONS or node.target is torch.nn.functional.max_pool2d or _is_functional_relu(node)
    )


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in _ADD_METHODS


def _elementwise_kind(node: fx.Node) -> str | None:
    """``"add"``, ``"mul"`` or ``"cat"`` for a functional addition, product or concatenation, else ``None``."""
    if _is_add(node):
        return "add"
    if node.op == "call_function":
        return "mul" if node.target in _MUL_FUNCTIONS else "cat" if node.target in _CAT_FUNCTIONS else None
    return "mul" if node.op == "call_method" and node.target in _MUL_METHODS else None


def _is_slice(node: fx.Node) -> bool:
    """One part of ``x.chunk(...)`` / ``x.split(...)`` / ``torch.chunk`` / ``torch.split``."""
    if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[0], fx.Node):
        return False
    source = node.args[0]
    if source.op == "call_method":
        return source.target in ("chunk", "split")
    return source.op == "call_function" and source.target in (torch.chunk, torch.split)


def _site_kind(node: fx.Node) -> str | None:
    """``"add"``, ``"mul"``, ``"cat"`` or ``"slice"``: the operations after which an :class:`OpOutput` may go."""
    return _elementwise_kind(node) or ("slice" if _is_slice(node) else None)


def _is_shape_query(node: fx.Node) -> bool:
    """``x.size()``, ``x.shape``, ``x.dim()``...: reads metadata, not values (no quantizer serves it)."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1:2] in (("shape",), ("dtype",))


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
        if _at_residual(node, modules):
            found.add(target)
    return found


def _reached(node: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node]:
    """The nodes that consume ``node``'s value, looking through pass-through ops (identity, max-pooling)."""
    out = []
    for user in node.users:
        if _is_shape_query(user):
            continue
        if _is_passthrough(user, modules) and not isinstance(modules.get(str(user.target)), _ACTIVATION_MODULES):
            out += _reached(user, modules)
        else:
            out.append(user)
    return out


def _at_residual(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` takes a residual sum or its output reaches a residual addition."""
    source = node.args[0] if node.args else None
    return (isinstance(source, fx.Node) and _is_add(source)) or any(_is_add(u) for u in _reached(node, modules))


def retrace_owners(model: nn.Module) -> list[str]:
    """Names of the submodules to re-trace with :func:`unshared_copy` before residual quantizers are placed.

    A submodule qualifies when its forward calls one ReLU child twice or more (torchvision's ``BasicBlock``), or
    applies a functional ReLU (``F.relu``, ``torch.relu``, ``x.relu()``) at a residual addition -- the common
    ``return F.relu(out + self.shortcut(x))`` -- and holds no residual addition in a submodule of its own. Neither
    has a module of its own per use that could carry an output quantizer. The last condition keeps whole
    networks out: a backbone whose own forward applies ``F.relu`` to its stem (feeding the first block's
    shortcut) is not turned into a GraphModule, so that one addition stays in float. A functional ReLU in
    ``model``'s own forward is left alone too.

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
    add_owners = {_owner(node) for node in graph.nodes if _is_add(node)}
    for node in graph.nodes:
        owner = _owner(node)
        if owner and _is_functional_relu(node) and _at_residual(node, modules):
            if not any(a.startswith(owner + ".") for a in add_owners):
                owners.append(owner)
    return list(dict.fromkeys(owners))


def _owner(node: fx.Node) -> str:
    """The qualified name of the innermost module whose forward made ``node`` (``""``: the traced model's own)."""
    stack = list(node.meta.get("nn_module_stack", {}))
    return stack[-1] if stack else ""


def unshared_copy(module: nn.Module) -> fx.GraphModule:
    """``module`` as a :class:`torch.fx.GraphModule` in which every ReLU use is a module of its own.

    ``relu`` called twice becomes ``relu`` and ``relu_1``, and a functional ReLU (``F.relu(...)``,
    ``torch.relu``, ``x.relu()``) becomes a call of a new ``nn.ReLU`` child (``relu``, or ``relu_<k>`` when
    that name is taken): same computation, same parameters and state-dict keys (ReLUs have none), but each use
    can carry an output quantizer. The GraphModule keeps the original class name; ``module`` is not changed.
    """
    graph = LeafTracer().trace(module)
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)

    def free_name(base: str) -> str:
        names = dict(gm.named_children())
        k = 0
        while (f"{base}_{k}" if k else base) in names:
            k += 1
        return f"{base}_{k}" if k else base

    seen: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        if _is_functional_relu(node):
            name = free_name("relu")
            gm.add_submodule(name, nn.ReLU())
            with gm.graph.inserting_before(node):
                call = gm.graph.call_module(name, args=(node.args[0],))
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
            continue
        target = str(node.target)
        if node.op != "call_module" or "." in target or not isinstance(gm.get_submodule(target), _ACTIVATION_MODULES):
            continue
        seen[target] = seen.get(target, 0) + 1
        if seen[target] > 1:
            name = free_name(target)
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


def conv_output_placements(model: nn.Module, quantized_inputs: Collection[str]) -> dict[str, tuple[str, list[str]]]:
    """Where each convolution needs an output quantizer for an int8 runtime to run it in integers.

    An int8 runtime fuses a convolution into an integer kernel (``QLinearConv``) only when its input is quantized
    and its output -- after a BatchNorm folded into it, and a ReLU the kernel applies -- goes to exactly one
    quantizer. For every convolution in ``quantized_inputs`` (the layers whose input is quantized) called once, this
    follows its output through a BatchNorm right after it and then a ReLU/ReLU6 module right after those (each
    called once) to the tensor that leaves them (the *end*; a shared or functional ReLU after it is looked past). If
    that tensor reaches exactly one quantized layer (directly, or through identity, dropout, stochastic depth,
    max-pooling or reshapes), its input quantizer already follows the convolution and nothing is needed. Otherwise
    -- it reaches a concatenation, an element-wise product (squeeze-excitation), an addition, an activation such as
    SiLU, hardswish, sigmoid or GELU, an average pooling, or several quantized layers (onnxruntime fuses a conv
    whose output goes to several QuantizeLinear nodes only when they share scale and zero point, which trained step
    sizes do not) -- the end gets an output quantizer: returned as ``{end module name: (the convolution, the
    quantized layers its output reaches)}``, and those layers share it (one grid for the tensor, one QuantizeLinear
    in the exported graph). A convolution whose output is only the model's output is left in float (float logits or
    maps, as users expect).

    Example: for ``conv -> bn -> SiLU -> conv2`` this returns ``{"bn": ("conv", [])}``; for
    ``conv -> relu -> cat`` ``{"relu": ("conv", [])}``; for ``conv -> bn -> (conv2, add)``
    ``{"bn": ("conv", ["conv2"])}``; for ``conv -> relu -> (conv2, conv3)`` ``{"relu": ("conv", ["conv2", "conv3"])}``.

    Raises:
        QuantizationConfigError: fx cannot trace ``model``.
    """
    graph, modules = _residual_trace(model)
    calls = _call_counts(graph)

    def single_module_user(node: fx.Node, kinds: tuple[type[nn.Module], ...]) -> fx.Node | None:
        (user,) = node.users if len(node.users) == 1 else (None,)
        if user is None or user.op != "call_module" or calls[str(user.target)] != 1:
            return None
        return user if isinstance(modules.get(str(user.target)), kinds) else None

    placements: dict[str, tuple[str, list[str]]] = {}
    for node in graph.nodes:
        target = str(node.target)
        if node.op != "call_module" or target not in quantized_inputs or calls[target] != 1:
            continue
        if not isinstance(modules.get(target), CONV_TYPES):
            continue
        end = node
        for kinds in (BN_TYPES, _ACTIVATION_MODULES):
            end = single_module_user(end, kinds) or end
        tail = end
        (user,) = end.users if len(end.users) == 1 else (None,)
        if user is not None and (
            _is_functional_relu(user)
            or (user.op == "call_module" and isinstance(modules.get(str(user.target)), _ACTIVATION_MODULES))
        ):
            tail = user  # a ReLU that cannot carry a quantizer (shared, or functional): the runtime fuses it too
        reached = _reached(tail, modules)
        layers = [str(u.target) for u in reached if u.op == "call_module" and str(u.target) in quantized_inputs]
        if len(reached) == 1 and len(layers) == 1:
            continue  # the input quantizer of the one layer it feeds follows it
        if all(u.op == "output" for u in reached):
            continue
        placements[str(end.target)] = (target, list(dict.fromkeys(layers)))
    return placements


def _integer_ready(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Ops an int8 runtime runs on quantized inputs (``QLinearAdd``, ``QLinearMul``, ``QLinearConcat``,
    ``QLinearSigmoid``), or that take a quantized input at no cost (average pooling, an op output quantizer)."""
    if _elementwise_kind(node) is not None:
        return True
    kinds = (*_GATE_MODULES, *_GATED_MODULES, *_AVG_POOL_MODULES, OpOutput)
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), kinds)


def _output_consumers(
    node: fx.Node, modules: dict[str, nn.Module], quantized_inputs: Collection[str]
) -> list[str] | None:
    """The quantized layers that should share an output quantizer on ``node``'s value, or ``None`` for none.

    A quantizer is needed when the value goes to integer-ready ops (see :func:`_integer_ready`) or to several
    places, and only there: not when it reaches exactly one quantized layer (that layer's input quantizer
    follows it already), only the model's output, or any op that runs in float anyway (a LayerNorm, a ReLU with
    its own placement rules), where a new grid would cost accuracy and buy no integer kernel.
    """
    reached = _reached(node, modules)
    layers = [str(u.target) for u in reached if u.op == "call_module" and str(u.target) in quantized_inputs]
    if not reached or all(u.op == "output" for u in reached) or (len(reached) == 1 and len(layers) == 1):
        return None
    ready = (u.op == "output" or str(u.target) in layers or _integer_ready(u, modules) for u in reached)
    return list(dict.fromkeys(layers)) if all(ready) else None


def _slice_consumers(
    node: fx.Node, modules: dict[str, nn.Module], quantized_inputs: Collection[str], part: fx.Node | None = None
) -> list[str] | None:
    """For a slice of a tensor (``x1, x2 = x.chunk(2)``) that reaches an addition, product or concatenation: the
    quantized layers fed by the sliced tensor, whose grid the slice should carry again; ``None`` when there is none.

    onnxruntime runs a ``Split`` in integers only when every part is followed by a QuantizeLinear of the grid before
    it: ShuffleNet's shortcut half goes straight into a concatenation while the other half enters a conv. Quantizing
    the part with the *same* quantizer changes no value (it is on that grid already) and lets the concatenation run
    as ``QLinearConcat``. ``part`` is the slice itself when ``node`` is the marker after it.
    """
    reached = _reached(node, modules)
    if not any(_elementwise_kind(u) is not None for u in reached):
        return None
    layers = [u for u in reached if u.op == "call_module" and str(u.target) in quantized_inputs]
    if len(reached) == 1 and len(layers) == 1:
        return None
    source = node if part is None else part
    while _is_passthrough(source, modules) and source.args and isinstance(source.args[0], fx.Node):
        source = source.args[0]
    shared = [str(u.target) for u in _reached(source, modules) if u.op == "call_module"]
    shared = [name for name in shared if name in quantized_inputs]
    return list(dict.fromkeys(shared)) or None


def op_output_sites(model: nn.Module, quantized_inputs: Collection[str]) -> tuple[dict[str, list[int]], list[str]]:
    """The additions, products and concatenations whose output the deployment recipe quantizes, by owner.

    For each functional ``+``, ``*`` or ``torch.cat`` whose value goes to integer-ready ops (further additions,
    products, concatenations, sigmoid gates, average pooling) or to several places including such ops -- a
    MobileNet/EfficientNet residual sum that feeds the next block's convolution and its shortcut, a ShuffleNet
    concatenation that is shuffled and split into the next block -- and each part of a ``chunk``/``split`` that
    goes into such an op (:func:`_slice_consumers`), returns the module whose own ``forward`` performs it (the
    *owner*) and the operation's index among that forward's additions, products, concatenations and slices, in
    call order: ``{owner: [index, ...]}``. Operations already followed by an :class:`OpOutput`
    are skipped. The second value describes the operations the model's own ``forward`` performs: they have no
    submodule to re-trace and stay in float.

    Raises:
        QuantizationConfigError: fx cannot trace ``model``.
    """
    graph, modules = _residual_trace(model)
    counters: dict[str, int] = {}
    sites: dict[str, list[int]] = {}
    at_root: list[str] = []
    for node in graph.nodes:
        kind = _site_kind(node)
        if kind is None:
            continue
        owner = _owner(node)
        index = counters.get(owner, 0)
        counters[owner] = index + 1
        (user,) = node.users if len(node.users) == 1 else (None,)
        if user is not None and user.op == "call_module" and isinstance(modules.get(str(user.target)), OpOutput):
            continue
        rule = _slice_consumers if kind == "slice" else _output_consumers
        if rule(node, modules, quantized_inputs) is None:
            continue
        if owner:
            sites.setdefault(owner, []).append(index)
        else:
            at_root.append(f"{kind} {node.name!r}")
    return sites, at_root


class _OwnForwardTracer(LeafTracer):
    """Traces only the root's own ``forward``: every submodule call stays one call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def with_op_outputs(module: nn.Module, indices: Collection[int]) -> fx.GraphModule | None:
    """``module`` as a :class:`torch.fx.GraphModule` with an :class:`OpOutput` after some of its operations.

    ``indices`` count the additions, products, concatenations and slices of ``module``'s own ``forward`` in call
    order (as :func:`op_output_sites` returns them). Submodules are called, not traced through, so the GraphModule
    holds the same submodule objects under the same names; it keeps the class name, and its state-dict keys are
    ``module``'s plus none (an ``OpOutput`` has no state). ``None`` when ``module``'s own forward cannot be traced
    or the result would not hold every submodule (a child the forward never calls), so nothing is changed.
    """
    try:
        graph = _OwnForwardTracer().trace(module)
    except Exception:  # fx raises many kinds of errors on untraceable forwards
        return None
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    ops = [node for node in gm.graph.nodes if _site_kind(node) is not None]
    if set(gm.state_dict()) != set(module.state_dict()) or any(i >= len(ops) for i in indices):
        return None
    for i in sorted(set(indices)):
        node = ops[i]
        kind = _site_kind(node)
        names = dict(gm.named_children())
        k = 0
        while (f"{kind}_output_{k}" if k else f"{kind}_output") in names:
            k += 1
        name = f"{kind}_output_{k}" if k else f"{kind}_output"
        gm.add_submodule(name, OpOutput(str(kind)))
        with gm.graph.inserting_after(node):
            marker = gm.graph.call_module(name, args=(node,))
        node.replace_all_uses_with(marker, delete_user_cb=lambda user, marker=marker: user is not marker)
    gm.recompile()
    return gm


def activation_output_placements(
    model: nn.Module, quantized_inputs: Collection[str]
) -> dict[str, tuple[bool, list[str]]]:
    """Where the deployment recipe quantizes the outputs of op markers and gating activations.

    For every :class:`OpOutput`, sigmoid/hard-sigmoid and SiLU/hardswish module called once, returns
    ``{name: (needs an output quantizer, the quantized layers that share it)}``, following the rule of
    :func:`op_output_sites`. SiLU and hardswish (``x * gate(x)``) are listed even without an output quantizer:
    they quantize their gate, so an int8 runtime runs their product as ``QLinearMul``.

    Raises:
        QuantizationConfigError: fx cannot trace ``model``.
    """
    graph, modules = _residual_trace(model)
    calls = _call_counts(graph)
    placements: dict[str, tuple[bool, list[str]]] = {}
    for node in graph.nodes:
        target = str(node.target)
        module = modules.get(target) if node.op == "call_module" else None
        if module is None or calls[target] != 1 or not isinstance(module, (OpOutput, *_GATE_MODULES, *_GATED_MODULES)):
            continue
        if isinstance(module, OpOutput) and module.op == "slice":
            consumers = _slice_consumers(node, modules, quantized_inputs, part=node.args[0])  # type: ignore[arg-type]
        else:
            consumers = _output_consumers(node, modules, quantized_inputs)
        if consumers is not None or isinstance(module, _GATED_MODULES):
            placements[target] = (consumers is not None, consumers or [])
    return placements


__all__ = [
    "BN_TYPES",
    "CONV_TYPES",
    "LeafTracer",
    "OpOutput",
    "activation_output_placements",
    "conv_output_placements",
    "op_output_sites",
    "residual_activations",
    "residual_producers",
    "retrace_owners",
    "trace",
    "unshared_copy",
    "with_op_outputs",
]

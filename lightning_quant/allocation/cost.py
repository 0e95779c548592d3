"""Cost models of a bit allocation: weight size, parameter-weighted average bit width and BOPs.

Every cost here is *monotone non-decreasing in every bit width* and of the form
``offset + sum_u coefficient_u * bits_u ** power`` over the allocated units ``u`` (``power`` 1, or 2 for
BOPs when a layer's weight and input bits move together). The solvers in :mod:`.solvers` rely on both facts: the
all-minimum allocation is the cheapest one (so feasibility is decided by it alone), and lowering bits never
breaks a budget (so flooring a relaxed solution keeps it feasible).

Costs are kept in integer-valued units (bits, parameter-bits, bit-operations), which float64 represents exactly
up to 2**53, so "meets the budget" is an exact comparison; :attr:`BudgetConstraint.display_scale` turns them into
the user's unit (an average bit width, for instance) for messages and logs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_quant.core.quantizers import Quantizer
from lightning_quant.core.validation import check_real
from lightning_quant.surgery.capture import Call, Capture, modes_kept, quantizers_disabled
from lightning_quant.surgery.layers import quantized_layers

#: bits of an activation that is not quantized (a float32 input)
FLOAT_ACT_BITS = 32


@dataclass(frozen=True)
class BudgetConstraint:
    """One resource budget, ``offset + sum(coefficients * bits ** power) <= budget``.

    Args:
        name: ``"avg_weight_bits"``, ``"size_bits"`` or ``"bops"`` (used in messages and logs).
        coefficients: one non-negative coefficient per allocated unit (parameter count, MACs x act bits, ...).
        budget: the limit, in the same internal unit as the cost.
        offset: the cost of what the allocator does not change (frozen layers at their fixed bits).
        power: per unit (or one for all), 1 (linear in the bits) or 2 (a layer whose weight and input bits are
            one variable, for BOPs).
        display_scale: multiply internal costs by this to get the user's unit (``1 / total_params`` for an
            average bit width).
        argument: the user-facing argument that set this budget, for error messages.
    """

    name: str
    coefficients: np.ndarray
    budget: float
    offset: float = 0.0
    power: int | np.ndarray = 1
    display_scale: float = 1.0
    argument: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "coefficients", np.asarray(self.coefficients, dtype=np.float64))
        power = np.broadcast_to(np.asarray(self.power, dtype=np.int64), self.coefficients.shape).copy()
        if not np.all((power == 1) | (power == 2)):
            raise ValueError(f"`power` must be 1 or 2, got {self.power}.")
        object.__setattr__(self, "power", power)
        if np.any(self.coefficients < 0):
            raise ValueError("cost coefficients must be non-negative")

    def cost(self, bits: np.ndarray) -> float:
        """The cost of an allocation (one bit width per unit), internal unit."""
        return float(self.offset + np.dot(self.coefficients, np.asarray(bits, dtype=np.float64) ** self.power))

    def feasible(self, bits: np.ndarray) -> bool:
        """Whether ``bits`` meets this budget (exact comparison)."""
        return self.cost(bits) <= self.budget

    def display(self, value: float) -> float:
        """An internal cost in the user's unit."""
        return value * self.display_scale


@dataclass(frozen=True)
class LayerCosts:
    """What the cost models need to know about each quantized layer of a model.

    Args:
        names: the quantized layers, in registration order.
        params: weight elements per layer.
        weight_bits: current weight bit width per layer.
        act_bits: current input bit width per layer (:data:`FLOAT_ACT_BITS` for a float input).
        frozen: whether an allocator must leave the layer alone (``LayerSpec.frozen``, and every layer whose
            weight quantizer is not one uniform width: per-channel widths, codebooks).
        macs: multiply-accumulates per sample per layer (from :func:`trace_macs`), or ``None`` if not traced.
        payload_bits: the weight's storage bits per layer, the quantizer's own account (``weight_bits`` is
            ``payload_bits / params``, the average bits per parameter); what frozen layers cost.
    """

    names: tuple[str, ...]
    params: np.ndarray
    weight_bits: np.ndarray
    act_bits: np.ndarray
    frozen: np.ndarray
    macs: np.ndarray | None = field(default=None)
    payload_bits: np.ndarray | None = field(default=None)

    @property
    def free(self) -> np.ndarray:
        """Boolean mask of the layers an allocator may change."""
        return ~self.frozen

    @property
    def weight_payload(self) -> np.ndarray:
        """Storage bits of each layer's weight (``params x weight_bits`` when not given)."""
        return self.payload_bits if self.payload_bits is not None else self.params * self.weight_bits

    def with_macs(self, macs: Mapping[str, int]) -> LayerCosts:
        """A copy with the MACs of each layer (layers never called by the forward count 0)."""
        values = np.array([float(macs.get(n, 0)) for n in self.names])
        return dataclasses.replace(self, macs=values)


def layer_costs(model: nn.Module, macs: Mapping[str, int] | None = None) -> LayerCosts:
    """Collect the cost-model inputs of a quantized model's layers (shared layers counted once)."""
    layers = quantized_layers(model)
    names, params, payload, abits, frozen = [], [], [], [], []
    seen: set[int] = set()
    for name, layer in layers.items():
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        names.append(name)
        weights = layer.quantized_parameters()
        params.append(sum(param.numel() for _, param, _ in weights))
        weight_quantizer = layer.weight_quantizer
        payload.append(sum(q.payload_bits(param) for _, param, q in weights))
        quantizer = layer.input_quantizer
        abits.append(quantizer.bits if isinstance(quantizer, Quantizer) else FLOAT_ACT_BITS)
        # a layer allocators can change has one quantized weight of one uniform width (they set `bits`); others
        # count at their own size
        allocatable = len(weights) == 1 and weight_quantizer.WIDTH_SETTABLE and isinstance(weight_quantizer.bits, int)
        frozen.append(bool(layer.layer_spec.frozen) or not allocatable)
    param_array = np.array(params, dtype=np.float64)
    payload_array = np.array(payload, dtype=np.float64)
    costs = LayerCosts(
        tuple(names),
        param_array,
        payload_array / np.maximum(param_array, 1.0),
        np.array(abits, dtype=np.float64),
        np.array(frozen, dtype=bool),
        payload_bits=payload_array,
    )
    return costs.with_macs(macs) if macs is not None else costs


# -- MACs from shapes ---------------------------------------------------------------------------------------------
def layer_macs(layer: nn.Module, output: Tensor) -> int:
    """Multiply-accumulates per sample of a Conv/Linear layer, from its output's shape.

    Conv: ``output elements x in_channels / groups x kernel volume``; Linear: ``output elements x in_features``
    (the leading dimension is the batch; further leading dimensions of a Linear input count as positions).

    >>> layer_macs(nn.Conv2d(3, 8, 3, padding=1), torch.zeros(2, 8, 5, 5))
    5400
    >>> layer_macs(nn.Linear(16, 4), torch.zeros(2, 4))
    64
    """
    if isinstance(layer, nn.Embedding):
        return 0  # a table lookup
    if isinstance(layer, nn.RNNBase):  # every weight matrix is used once per time step
        steps = output.shape[1] if layer.batch_first and output.dim() == 3 else output.shape[0]
        matrices = sum(w.numel() for n, w in layer.named_parameters(recurse=False) if n.startswith("weight_"))
        return int(steps * matrices)
    if isinstance(layer, nn.MultiheadAttention):  # the in-projection (the output projection is its own layer)
        tokens = output.shape[1] if layer.batch_first and output.dim() == 3 else output.shape[0]
        return int(tokens * 3 * layer.embed_dim * layer.embed_dim)
    per_sample = output[0].numel() if output.dim() > 1 else output.numel()
    if isinstance(layer, nn.modules.conv._ConvNd):
        kernel = int(np.prod(layer.kernel_size))
        return int(per_sample * (layer.in_channels // layer.groups) * kernel)
    if isinstance(layer, nn.Linear):
        return int(per_sample * layer.in_features)
    raise TypeError(f"no MAC count for {type(layer).__name__}")


class MacTracer:
    """Forward hooks (a :class:`~lightning_quant.surgery.capture.Capture`) that record each quantized layer's MACs
    per sample during the next forward(s).

    Used by :func:`trace_macs` (one forward of its own) and by callbacks, which attach it to a training forward
    that runs anyway. A layer called several times (a shared layer) accumulates its MACs per call.

    Example:
        >>> tracer = MacTracer(model)  # doctest: +SKIP
        >>> model(x); tracer.remove(); tracer.macs  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module) -> None:
        self.macs: dict[str, int] = {}
        self._capture = Capture(model, quantized_layers(model), on_call=self._record)

    def _record(self, name: str, module: nn.Module, call: Call) -> None:
        output = call.output[0] if isinstance(call.output, tuple) and call.output else call.output
        if isinstance(output, Tensor):
            self.macs[name] = self.macs.get(name, 0) + layer_macs(module, output)

    @property
    def traced(self) -> bool:
        """Whether a forward has run since the hooks were attached."""
        return bool(self.macs)

    def remove(self) -> None:
        self._capture.remove()


@torch.no_grad()
def trace_macs(model: nn.Module, example_input: Any) -> dict[str, int]:
    """MACs per sample of each quantized layer, traced by one forward of ``example_input`` with hooks.

    The forward runs in eval mode with every quantizer disabled, so no observer, BatchNorm statistic or
    uninitialised step size is touched; the model's modes are restored afterwards.
    """
    tracer = MacTracer(model)
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    try:
        with quantizers_disabled(model), modes_kept(model, training=False):
            model(*args)
    finally:
        tracer.remove()
    return tracer.macs


# -- the three budgets --------------------------------------------------------------------------------------------
def check_budget(argument: str, value: object) -> float | None:
    """``value`` as a float if it is a positive finite number (a budget argument of an allocating callback, named
    ``argument``), ``None`` if it is ``None``; otherwise a :class:`QuantizationConfigError`."""
    return check_real(
        argument,
        value,
        minimum=0,
        minimum_inclusive=False,
        allow_none=True,
        fix=f"a budget is the most the model may use: pass a positive value, e.g. `{argument}=3.0`.",
    )


def avg_bits_constraint(costs: LayerCosts, avg_bits: float) -> BudgetConstraint:
    """Average weight bit width over *all* quantized layers (frozen ones at their bits), weighted by parameters.

    Internal unit: parameter-bits (``sum params x bits``); the budget is ``avg_bits x total params``.
    """
    total = float(costs.params.sum())
    free = costs.free
    return BudgetConstraint(
        "avg_weight_bits",
        costs.params[free],
        avg_bits * total,
        offset=float(costs.weight_payload[~free].sum()),
        display_scale=1.0 / total,
        argument="avg_weight_bits",
    )


def size_constraint(costs: LayerCosts, size_bits: float) -> BudgetConstraint:
    """Size of the quantized weights in bits (frozen layers at their bits; biases and step sizes not counted)."""
    free = costs.free
    return BudgetConstraint(
        "size_bits",
        costs.params[free],
        float(size_bits),
        offset=float(costs.weight_payload[~free].sum()),
        argument="size_budget",
    )


def bops_constraint(costs: LayerCosts, bops: float, *, tie_activations: bool = False) -> BudgetConstraint:
    """Bit operations per sample, ``sum MACs x weight bits x input bits``.

    With ``tie_activations`` a free layer with a quantized input gets input bits equal to its weight bits (one
    variable per layer), so its term is ``MACs x bits**2``; otherwise (and for float inputs, which count 32 bits)
    the input bits stay as they are and the term is linear.
    """
    if costs.macs is None:
        raise ValueError("BOPs need the layers' MACs: pass `macs` to `layer_costs` (see `trace_macs`).")
    free = costs.free
    offset = float(np.sum(costs.macs[~free] * costs.weight_bits[~free] * costs.act_bits[~free]))
    act_bits = costs.act_bits[free]
    tied = (act_bits != FLOAT_ACT_BITS) if tie_activations else np.zeros_like(act_bits, dtype=bool)
    coefficients = np.where(tied, costs.macs[free], costs.macs[free] * act_bits)
    return BudgetConstraint(
        "bops", coefficients, float(bops), offset=offset, power=np.where(tied, 2, 1), argument="bops_budget"
    )


__all__ = [
    "FLOAT_ACT_BITS",
    "BudgetConstraint",
    "LayerCosts",
    "MacTracer",
    "avg_bits_constraint",
    "bops_constraint",
    "check_budget",
    "layer_costs",
    "layer_macs",
    "size_constraint",
    "trace_macs",
]

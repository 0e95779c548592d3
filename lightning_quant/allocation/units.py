"""Allocation units below a layer: groups of output channels, their costs, and the budget-safe projection.

A channel-level allocator (AutoQB, Lou et al. 2019) gives every output channel -- or every group of
``channels_per_unit`` channels -- its own weight bit width; a layer-level one (HAQ, Wang et al. 2019) gives one width
per layer. :class:`UnitLayout` says which channels of which layer each *unit* holds; both levels are layouts (a
layer-level layout has one unit per layer holding all its channels), so the same costs, projection and agents serve
both.

Costs. Size and BOPs are linear in each output channel's weight width: a channel of layer ``l`` stores
``params_l / c_out_l`` weights and performs ``MACs_l / c_out_l`` multiply-accumulates per sample. So a layer's
budget coefficient (:mod:`.cost`) splits exactly over its units in proportion to their channel counts
(:meth:`UnitLayout.split`); the offsets (frozen layers) stay as they are. Every cost stays an integer number of bits
or bit-operations, so "meets the budget" remains an exact comparison.

The projection (:meth:`AllocationProblem.project`) turns any proposal -- one continuous width per unit, and
optionally one input width per layer -- into an allocation that **meets every budget** and spends it:

1. the proposal is shifted by the one offset ``t`` (in bits, common to every unit, widths clipped to
   ``[b_min, b_max]``) at which its continuous cost meets the tightest budget (bisection; costs are monotone in
   ``t``), so only the *differences* between the proposed widths matter;
2. the suite's budget-keeping solver (:func:`~lightning_quant.allocation.solvers.allocate`) rounds the shifted
   widths: it minimises ``sum_u (proposal_u + t - beta_u)**2`` over the allowed widths ``beta`` under the budgets
   (ties broken towards the wider width), and its result always meets every budget.

Both steps are our choice. HAQ (Wang et al., 2019) keeps proposals under the budget and lowers the others (every
layer by one bit, from the last one backwards, until the budget holds). With a reward for accuracy alone, each step's
critic then learns that more bits for *its* unit help, while the lowering takes the price from every unit: measured
on the synthetic sensitivity problem of the tests, the actors drift to the largest widths and the lowering flattens
the allocation to nearly uniform. The shift removes that incentive -- a unit gets more bits only by asking for more
than the others -- and the budget is always spent. Input (activation) widths enter only the BOPs budget, which is
bilinear in weight and input widths: when the proposed input widths leave no feasible weight allocation at all,
they are lowered first, one step at a time on the layer whose step saves most BOPs (our choice), until the
all-minimum weight allocation fits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from lightning_quant.allocation.cost import (
    FLOAT_ACT_BITS,
    BudgetConstraint,
    LayerCosts,
    bops_constraint,
    size_constraint,
)
from lightning_quant.allocation.solvers import allocate, check_feasible, validate_bit_choices
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.quantizers import UniformQuantizer
from lightning_quant.surgery.layers import QuantizedLayer, quantized_layers

#: names of the columns of :func:`layer_descriptors`
LAYER_FEATURES: tuple[str, ...] = (
    "index",
    "in_channels",
    "out_channels",
    "kernel",
    "stride",
    "params",
    "macs",
    "linear",
    "depthwise",
)
#: names of the columns of :func:`unit_descriptors`
UNIT_FEATURES: tuple[str, ...] = ("position", "relative_norm", "relative_max", "channels")


@dataclass(frozen=True)
class UnitLayout:
    """Which output channels of which layer each allocation unit holds.

    Args:
        layers: the allocated layers, in order.
        out_channels: output channels of each layer.
        unit_layer: the layer (index into ``layers``) of each unit; a layer's units are consecutive.
        unit_channels: the output-channel indices of each unit.
    """

    layers: tuple[str, ...]
    out_channels: tuple[int, ...]
    unit_layer: np.ndarray
    unit_channels: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "unit_layer", np.asarray(self.unit_layer, dtype=np.int64))
        if len(self.layers) != len(self.out_channels):
            raise ValueError("`layers` and `out_channels` must have the same length")
        if self.unit_layer.shape != (len(self.unit_channels),):
            raise ValueError("one layer index per unit")
        if np.any(np.diff(self.unit_layer) < 0):
            raise ValueError("the units of a layer must be consecutive, layers in order")
        for index, channels in enumerate(self.out_channels):
            owned = sorted(c for u in self.units_of(index) for c in self.unit_channels[u])
            if owned != list(range(channels)):
                raise ValueError(f"the units of layer {self.layers[index]!r} must hold each of its channels once")

    @property
    def num_units(self) -> int:
        return len(self.unit_channels)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def sizes(self) -> np.ndarray:
        """Channels per unit."""
        return np.array([len(c) for c in self.unit_channels], dtype=np.float64)

    @property
    def fractions(self) -> np.ndarray:
        """Each unit's share of its layer's channels."""
        return self.sizes / np.array(self.out_channels, dtype=np.float64)[self.unit_layer]

    def units_of(self, layer: int) -> np.ndarray:
        """The unit indices of layer number ``layer``."""
        return np.flatnonzero(self.unit_layer == layer)

    def split(self, constraint: BudgetConstraint) -> BudgetConstraint:
        """A layer-level budget (one coefficient per layer of :attr:`layers`) as a unit-level one.

        Exact for costs linear in the width (``power == 1``): a unit of ``k`` of a layer's ``c_out`` channels gets
        ``k / c_out`` of the layer's coefficient (an integer for size and BOPs: the per-channel parameters and MACs).
        """
        if constraint.coefficients.shape != (self.num_layers,):
            raise ValueError(f"the budget has {constraint.coefficients.shape[0]} coefficients, not {self.num_layers}")
        if np.any(constraint.power != 1):
            raise QuantizationConfigError(
                f"`{constraint.argument or constraint.name}` ties input and weight widths (power 2), which does not "
                "split over channels. HINT: keep activation widths per layer (`tie_activations=False`)."
            )
        sizes = self.sizes
        channels = np.array(self.out_channels, dtype=np.float64)[self.unit_layer]
        coefficients = constraint.coefficients[self.unit_layer] * sizes / channels
        return dataclasses.replace(constraint, coefficients=coefficients, power=1)

    def channel_widths(self, unit_bits: Sequence[int] | np.ndarray) -> dict[str, int | tuple[int, ...]]:
        """Per layer: one width (all channels equal) or one per output channel, from one width per unit."""
        bits = np.asarray(unit_bits, dtype=np.int64)
        if bits.shape != (self.num_units,):
            raise ValueError(f"one width per unit: {self.num_units}, got {bits.shape}")
        out: dict[str, int | tuple[int, ...]] = {}
        for index, name in enumerate(self.layers):
            widths = np.zeros(self.out_channels[index], dtype=np.int64)
            for u in self.units_of(index):
                widths[list(self.unit_channels[u])] = bits[u]
            out[name] = int(widths[0]) if np.all(widths == widths[0]) else tuple(int(w) for w in widths)
        return out

    def layer_mean_bits(self, unit_bits: Sequence[float] | np.ndarray) -> np.ndarray:
        """The channel-weighted average width of each layer."""
        bits = np.asarray(unit_bits, dtype=np.float64)
        total = np.bincount(self.unit_layer, weights=bits * self.sizes, minlength=self.num_layers)
        return total / np.array(self.out_channels, dtype=np.float64)


def layer_layout(layers: Sequence[str], out_channels: Sequence[int]) -> UnitLayout:
    """One unit per layer, holding all of its channels (layer-level allocation)."""
    return UnitLayout(
        tuple(layers),
        tuple(int(c) for c in out_channels),
        np.arange(len(layers)),
        tuple(tuple(range(int(c))) for c in out_channels),
    )


def channel_layout(model: nn.Module, layers: Sequence[str], channels_per_unit: int = 1) -> UnitLayout:
    """Units of ``channels_per_unit`` output channels (the last unit of a layer may hold fewer).

    With more than one channel per unit, a layer's channels are sorted by the L2 norm of their weights (largest
    first) before they are cut into units, so each unit holds channels of similar magnitude (our choice: a unit's
    channels then want similar widths, and the unit's norm feature stays informative).
    """
    if isinstance(channels_per_unit, bool) or not isinstance(channels_per_unit, int) or channels_per_unit < 1:
        raise QuantizationConfigError(f"`channels_per_unit` must be a positive integer, got {channels_per_unit!r}.")
    found = quantized_layers(model)
    unit_layer: list[int] = []
    unit_channels: list[tuple[int, ...]] = []
    out_channels: list[int] = []
    for index, name in enumerate(layers):
        weight = found[name].weight.detach()
        c_out = int(weight.shape[0])
        out_channels.append(c_out)
        if channels_per_unit == 1:
            order = list(range(c_out))
        else:
            norms = weight.float().flatten(1).norm(dim=1)
            order = torch.argsort(-norms, stable=True).tolist()
        for start in range(0, c_out, channels_per_unit):
            unit_layer.append(index)
            unit_channels.append(tuple(sorted(order[start : start + channels_per_unit])))
    return UnitLayout(tuple(layers), tuple(out_channels), np.array(unit_layer), tuple(unit_channels))


# -- state features ---------------------------------------------------------------------------------------------
def layer_descriptors(model: nn.Module, layers: Sequence[str], macs: Mapping[str, int] | None = None) -> np.ndarray:
    """Raw static features of each layer (columns :data:`LAYER_FEATURES`): the state of HAQ and AutoQ's agents.

    Index, input channels per group, output channels, kernel volume, stride, weight elements, MACs per sample
    (0 when not traced), whether it is a Linear layer, whether it is depthwise.
    """
    found = quantized_layers(model)
    rows = []
    for index, name in enumerate(layers):
        layer = found[name]
        weight = layer.weight
        if isinstance(layer, nn.modules.conv._ConvNd):
            kernel = float(np.prod(layer.kernel_size))
            stride = float(np.prod(layer.stride))
            depthwise = float(layer.groups > 1 and layer.groups == layer.in_channels)
            linear = 0.0
        else:
            kernel, stride, depthwise, linear = 1.0, 0.0, 0.0, 1.0
        rows.append(
            [
                float(index),
                float(weight.shape[1]),
                float(weight.shape[0]),
                kernel,
                stride,
                float(weight.numel()),
                float((macs or {}).get(name, 0)),
                linear,
                depthwise,
            ]
        )
    return np.array(rows, dtype=np.float64).reshape(len(layers), len(LAYER_FEATURES))


def unit_descriptors(model: nn.Module, layout: UnitLayout) -> np.ndarray:
    """Raw static features of each unit (columns :data:`UNIT_FEATURES`), our choice for the channel-level agent.

    The unit's position among its layer's units, the mean L2 norm and the largest magnitude of its channels'
    weights relative to the layer's mean, and its channel count relative to the largest unit.
    """
    found = quantized_layers(model)
    rows = np.zeros((layout.num_units, len(UNIT_FEATURES)), dtype=np.float64)
    largest = float(layout.sizes.max()) if layout.num_units else 1.0
    for index, name in enumerate(layout.layers):
        weight = found[name].weight.detach().float().flatten(1)
        norms = weight.norm(dim=1).cpu().numpy()
        peaks = weight.abs().amax(dim=1).cpu().numpy()
        mean_norm, mean_peak = max(float(norms.mean()), 1e-12), max(float(peaks.mean()), 1e-12)
        units = layout.units_of(index)
        for position, u in enumerate(units):
            channels = list(layout.unit_channels[u])
            rows[u] = [
                position / max(len(units) - 1, 1),
                float(norms[channels].mean()) / mean_norm,
                float(peaks[channels].max()) / mean_peak,
                len(channels) / largest,
            ]
    return rows


def normalize_columns(features: np.ndarray) -> np.ndarray:
    """Each column scaled to ``[0, 1]`` by its minimum and maximum (HAQ's normalisation); constant columns -> 0."""
    features = np.asarray(features, dtype=np.float64)
    if features.size == 0:
        return features.copy()
    low, high = features.min(axis=0), features.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    return np.where(high > low, (features - low) / span, 0.0)


# -- applying an allocation to a model ----------------------------------------------------------------------------
def apply_unit_widths(
    model: nn.Module,
    layout: UnitLayout,
    unit_bits: Sequence[int] | np.ndarray,
    act_bits: Sequence[int] | np.ndarray | None = None,
) -> None:
    """Set each allocated layer's weight widths (one per output channel where they differ) and input widths.

    ``act_bits`` (one per layer of the layout) is applied only to layers with a quantized input; ``None`` keeps
    the input widths. Setting a width keeps each channel's represented range (``UniformQuantizer.bits``).
    """
    found = quantized_layers(model)
    for name, widths in layout.channel_widths(unit_bits).items():
        found[name].weight_quantizer.bits = widths  # type: ignore[union-attr]
    if act_bits is not None:
        for name, bits in zip(layout.layers, np.asarray(act_bits).tolist(), strict=True):
            quantizer = found[name].input_quantizer
            if isinstance(quantizer, UniformQuantizer):
                quantizer.bits = int(bits)


def check_channel_widths_supported(model: nn.Module, layers: Sequence[str], allow_binary: bool) -> None:
    """Raise a clear error if a layer's weight quantizer cannot take one width per output channel."""
    found = quantized_layers(model)
    for name in layers:
        quantizer = found[name].weight_quantizer
        if not isinstance(quantizer, UniformQuantizer) or quantizer.ch_axis != 0:
            kind = type(quantizer).__name__ if not isinstance(quantizer, UniformQuantizer) else "a per-tensor"
            raise QuantizationConfigError(
                f"Layer {name!r}: channel-level allocation gives every output channel its own width, which needs a "
                f"per-channel uniform weight quantizer, got {kind} quantizer. HINT: quantize with "
                "`weight_granularity='per_channel'` (the default), or pass `level='layer'`."
            )
        if allow_binary and not (quantizer.symmetric and quantizer.signed):
            raise QuantizationConfigError(
                f"Layer {name!r}: binary channels (1 in `bit_choices`) need a symmetric signed weight grid. HINT: "
                "quantize with `weight_symmetric=True`, or leave 1 out of `bit_choices`."
            )


def free_layers(model: nn.Module, costs: LayerCosts) -> list[QuantizedLayer]:
    """The layers an allocator may change (not frozen), in order."""
    found = quantized_layers(model)
    return [found[n] for n, frozen in zip(costs.names, costs.frozen, strict=True) if not frozen]


# -- the problem -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Projection:
    """An allocation that meets every budget.

    Args:
        unit_bits: one weight width per unit.
        act_bits: one input width per layer of the layout (``None``: input widths not searched).
        costs: each budget's cost, in the user's unit, by budget name.
        budgets: each budget, in the user's unit.
        shift: the common offset (bits) added to the proposed widths before rounding.
    """

    unit_bits: np.ndarray
    act_bits: np.ndarray | None
    costs: dict[str, float]
    budgets: dict[str, float]
    shift: float = 0.0

    @property
    def budget_used(self) -> float:
        """The largest fraction of a budget used (``<= 1``)."""
        return max((self.costs[k] / self.budgets[k] if self.budgets[k] else 0.0) for k in self.costs)


@dataclass(frozen=True)
class AllocationProblem:
    """The budgets, widths and units of a search (what an agent chooses, and what it may spend).

    Args:
        layout: the units (channel groups, or whole layers) and the layers they belong to; its layers are exactly
            the non-frozen layers of ``costs``, in the same order.
        costs: the cost-model inputs of every quantized layer (frozen ones count at their fixed widths); needs MACs
            for a BOPs budget.
        bit_choices: the weight widths a unit may take (1 = binary).
        size_budget: the most bits the quantized weights may take (frozen layers included), or ``None``.
        bops_budget: the most bit operations per sample, ``sum MACs x weight bits x input bits``, or ``None``.
        act_bit_choices: the input widths a layer with a quantized input may take, or ``None`` to keep them.
        layer_features: raw static features per layer (:func:`layer_descriptors`); zeros when not given.
        unit_features: raw static features per unit (:func:`unit_descriptors`); zeros when not given.
    """

    layout: UnitLayout
    costs: LayerCosts
    bit_choices: tuple[int, ...]
    size_budget: float | None = None
    bops_budget: float | None = None
    act_bit_choices: tuple[int, ...] | None = None
    layer_features: np.ndarray | None = field(default=None)
    unit_features: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bit_choices", validate_bit_choices(self.bit_choices, allow_binary=True))
        if self.act_bit_choices is not None:
            object.__setattr__(self, "act_bit_choices", validate_bit_choices(self.act_bit_choices, "act_bit_choices"))
        free = tuple(n for n, f in zip(self.costs.names, self.costs.frozen, strict=True) if not f)
        if free != self.layout.layers:
            raise ValueError(f"the layout's layers {self.layout.layers} are not the free layers {free}")
        if self.size_budget is None and self.bops_budget is None:
            raise QuantizationConfigError(
                "No budget given. HINT: pass `size_budget=...` (bits of the quantized weights) or `bops_budget=...` "
                "(bit operations per sample)."
            )
        if self.bops_budget is not None and self.costs.macs is None:
            raise QuantizationConfigError("A BOPs budget needs the layers' MACs: pass `macs` to `layer_costs`.")
        layers, units = self.layout.num_layers, self.layout.num_units
        for name, value, rows in (
            ("layer_features", self.layer_features, layers),
            ("unit_features", self.unit_features, units),
        ):
            array = np.zeros((rows, 1)) if value is None else np.asarray(value, dtype=np.float64)
            if array.ndim != 2 or array.shape[0] != rows:
                raise ValueError(f"`{name}` must have one row per {name.split('_')[0]} ({rows}), got {array.shape}")
            object.__setattr__(self, name, array)

    # -- views --------------------------------------------------------------------------------------------------
    @property
    def free_index(self) -> np.ndarray:
        return np.flatnonzero(~self.costs.frozen)

    @property
    def default_act_bits(self) -> np.ndarray:
        """The current input width of each layer of the layout (32: a float input)."""
        return self.costs.act_bits[self.free_index].astype(np.int64)

    @property
    def act_searchable(self) -> np.ndarray:
        """Which layers of the layout get a searched input width (a quantized input, and choices given)."""
        if self.act_bit_choices is None:
            return np.zeros(self.layout.num_layers, dtype=bool)
        return self.costs.act_bits[self.free_index] != FLOAT_ACT_BITS

    def constraints(self, act_bits: np.ndarray | None = None) -> list[BudgetConstraint]:
        """The unit-level budgets, with the layout's layers at input widths ``act_bits`` (default: as they are)."""
        costs = self.costs
        if act_bits is not None:
            values = costs.act_bits.copy()
            searchable = self.act_searchable
            values[self.free_index[searchable]] = np.asarray(act_bits, dtype=np.float64)[searchable]
            costs = dataclasses.replace(costs, act_bits=values)
        out = []
        if self.size_budget is not None:
            out.append(self.layout.split(size_constraint(costs, self.size_budget)))
        if self.bops_budget is not None:
            out.append(self.layout.split(bops_constraint(costs, self.bops_budget)))
        return out

    def lowest_act_bits(self) -> np.ndarray | None:
        """Every searched input at its smallest width (the cheapest), or ``None`` when inputs are not searched."""
        if self.act_bit_choices is None:
            return None
        return np.where(self.act_searchable, min(self.act_bit_choices), self.default_act_bits)

    def check(self) -> None:
        """Raise a :class:`QuantizationConfigError` naming the budget if no allocation can meet it."""
        if self.layout.num_units == 0:
            raise QuantizationConfigError(
                "There is no layer to allocate bits to: every quantized layer is frozen (`LayerSpec.frozen`, e.g. by "
                "`first_last_bits`). HINT: quantize more layers, or set `first_last_bits=None`."
            )
        check_feasible(self.constraints(self.lowest_act_bits()), self.bit_choices)

    def measure(self, unit_bits: np.ndarray, act_bits: np.ndarray | None) -> tuple[dict[str, float], dict[str, float]]:
        """Each budget's cost and limit, in the user's unit."""
        constraints = self.constraints(act_bits)
        costs = {c.name: float(c.display(c.cost(unit_bits))) for c in constraints}
        budgets = {c.name: float(c.display(c.budget)) for c in constraints}
        return costs, budgets

    # -- the projection ---------------------------------------------------------------------------------------
    def snap(self, bits: np.ndarray, choices: Sequence[int]) -> np.ndarray:
        """Each width rounded to the nearest allowed one (ties to the lower)."""
        allowed = np.array(sorted(choices), dtype=np.float64)
        index = np.argmin(np.abs(np.asarray(bits, dtype=np.float64)[:, None] - allowed[None, :]), axis=1)
        return allowed[index].astype(np.int64)

    def project(self, widths: np.ndarray, act_bits: np.ndarray | None = None) -> Projection:
        """The allocation that spends the budget closest to the proposal's shape (see the module docs).

        Args:
            widths: one (continuous) proposed weight width per unit.
            act_bits: one proposed input width per layer of the layout (used when ``act_bit_choices`` is set).
        """
        low, high = float(min(self.bit_choices)), float(max(self.bit_choices))
        proposal = np.clip(np.asarray(widths, dtype=np.float64), low, high)
        if proposal.shape != (self.layout.num_units,):
            raise ValueError(f"one width per unit: {self.layout.num_units}, got {proposal.shape}")
        acts = None
        if self.act_bit_choices is not None:
            proposed = self.default_act_bits if act_bits is None else np.asarray(act_bits)
            acts = np.where(self.act_searchable, self.snap(proposed, self.act_bit_choices), self.default_act_bits)
            acts = self._fit_act_bits(acts)
        constraints = self.constraints(acts)
        shift = self._shift(proposal, constraints, low, high)
        target = np.clip(proposal + shift, low, high)
        choices = np.array(self.bit_choices, dtype=np.float64)
        # a target half-way between two widths is a tie: the tiny tilt towards the wider one lets the rounding
        # spend what the budget leaves (uniform targets of 2.5 bits become a mix of 2 and 3 bits, not all 2 bits)
        table = (target[:, None] - choices[None, :]) ** 2 - 1e-6 * choices[None, :]
        bits = allocate(table, constraints, self.bit_choices, "relaxed").bits.astype(np.int64)
        costs, budgets = self.measure(bits, acts)
        return Projection(bits, acts, costs, budgets, float(shift))

    @staticmethod
    def _shift(proposal: np.ndarray, constraints: Sequence[BudgetConstraint], low: float, high: float) -> float:
        """The largest common offset at which the clipped continuous proposal meets every budget (bisection)."""

        def fits(t: float) -> bool:
            widths = np.clip(proposal + t, low, high)
            return all(c.cost(widths) <= c.budget for c in constraints)

        lower, upper = -(high - low), high - low
        if fits(upper):
            return upper
        for _ in range(50):
            mid = 0.5 * (lower + upper)
            if fits(mid):
                lower = mid
            else:
                upper = mid
        return lower

    def _fit_act_bits(self, acts: np.ndarray) -> np.ndarray:
        """Lower input widths until the all-minimum weight allocation meets every budget (BOPs only)."""
        assert self.act_bit_choices is not None
        acts = acts.copy()
        lowest = np.full(self.layout.num_units, min(self.bit_choices), dtype=np.float64)
        choices = sorted(self.act_bit_choices)
        macs = self.costs.macs[self.free_index] if self.costs.macs is not None else np.zeros(len(acts))
        while not all(c.feasible(lowest) for c in self.constraints(acts)):
            lower = np.array([max([b for b in choices if b < a], default=a) for a in acts])
            saving = np.where(self.act_searchable & (lower < acts), macs * (acts - lower), -1.0)
            layer = int(np.argmax(saving))
            if saving[layer] < 0:  # check() rules this out
                raise QuantizationConfigError("The budgets cannot be met at the smallest input widths.")
            acts[layer] = lower[layer]
        return acts


__all__ = [
    "LAYER_FEATURES",
    "UNIT_FEATURES",
    "AllocationProblem",
    "Projection",
    "UnitLayout",
    "apply_unit_widths",
    "channel_layout",
    "check_channel_widths_supported",
    "free_layers",
    "layer_descriptors",
    "layer_layout",
    "normalize_columns",
    "unit_descriptors",
]

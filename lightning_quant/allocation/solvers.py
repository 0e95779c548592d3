"""Bit-allocation solvers over an objective table: an LP relaxation with budget-keeping rounding, and an exact MILP.

The problem: every unit ``u`` (a layer, a group of output channels -- whatever the caller allocates) takes one
width ``b_u`` from the allowed set :math:`\\mathcal{B} = (\\beta_1 < \\dots < \\beta_m)` (``1`` allowed: binary), and

.. math::

    \\min_{j}\\ \\sum_u T_{u, j_u} \\quad\\text{s.t.}\\quad
    \\text{offset}_k + \\sum_u c_{ku}\\, \\beta_{j_u}^{p_{ku}} \\le B_k\\ \\ \\forall k

with ``T`` the caller's **objective table** ``T[unit, choice]`` (float64, ``[units, len(bit_choices)]``, any
finite values, not necessarily monotone in the bits) and each budget one of :mod:`.cost`'s costs, monotone
non-decreasing in every unit's bits. Two builders of ``T``:

* :func:`noise_objective_table` -- QBitOpt's noise model (Peters et al., 2023, see
  :class:`~lightning_quant.callbacks.BitReallocationCallback`): ``T[u, j] = s_u 4**-beta_j``, the expected loss
  increase of unit ``u``'s quantization noise (its step, hence the noise's standard deviation, halves with every
  extra bit; :mod:`.sensitivity` estimates ``s_u``).
* :func:`linear_objective_table` -- ``T[u, j] = -w_u beta_j``: minimising it maximises ``sum_u w_u b_u``, the
  importance-times-bits objective of OMPQ (Ma et al., 2023).

**Dominated choices.** Costs are monotone in the bits, so a choice whose table value is not below that of some
lower width is never needed (the lower width costs no more in any budget and is at least as good). Each unit's
*ladder* is the choices whose value is strictly below that of every lower width: along it more bits always cost
more and lower the objective. Removing the rest changes neither the integer nor the relaxed optimum; the
rounding moves along the ladders and the MILP sees only ladder choices.

* :func:`solve_relaxed` -- the **LP relaxation** of this multiple-choice knapsack: a one-hot ``z[u, j]`` relaxed
  to ``[0, 1]`` with every row summing to 1, objective ``sum T z`` and costs ``sum cost z`` (cvxpy, HiGHS's primal
  simplex; the problem is compiled once per shape and re-solved with new data). Its optimum is a **lower bound**
  of every integer allocation, for any table; :attr:`Allocation.lower_bound` evaluates it from the LP's budget
  duals ``y`` as ``sum_u min_j (T + y . cost) - y . budget`` (weak duality: a valid bound for any ``y >= 0``, so
  solver tolerances can only loosen it). ``Allocation.relaxed_bits`` are the expected widths
  ``sum_j z[u, j] beta_j``. For the noise table the LP is at least as tight as relaxing the widths themselves to
  continuous values (``s 4**-b`` on an exponential cone): by Jensen, the expected widths are feasible there with
  no larger objective (measured on the benchmark's random problems: the LP bound lies 0.01-0.8 % below the MILP
  optimum, the continuous one 6-7 %; the rounded results were the same). Then :func:`round_to_budget` from three
  starts, keeping the best: the floor of the expected widths, each unit's lowest-width choice in the LP's support,
  and the discrete Lagrangian allocation (each unit minimises ``T + t x cost`` with the smallest multiplier ``t``
  that meets the budgets; it lies on the lower convex hull of each unit's (cost, objective) points); last, a local
  search with large steps (:func:`_big_steps`).
* :func:`round_to_budget` -- snap each start to its ladder (down), **repair** (while a budget is exceeded, lower
  the unit that loses least objective per budget share saved; this ends, since the all-minimum allocation is
  feasible), then **fill** (raise one unit one ladder step at a time, the best objective decrease per budget share
  used first, while every budget still holds). Every accepted step is checked with the budgets' own exact cost
  (:meth:`BudgetConstraint.feasible`), so the result **always meets every budget, for any table**.

  Gap bounds (``K`` = the number of budgets that depend on the allocation), up to the LP solver's tolerance:

  - *Any table*: a vertex of the LP (HiGHS's simplex returns one) has at most ``n + K`` non-zero entries, so at most
    ``K`` units take more than one choice. Giving each of them its lowest-width choice in the support keeps every
    budget (costs are monotone: that choice is the cheapest of its support in every budget) and adds at most the
    unit's range ``T[u, 0] - min_j T[u, j]``. So ``objective(rounded) <= lower bound + the sum of the K largest
    ranges <= MILP optimum + the same``. No multiplicative bound holds for general tables (they may be negative).
  - *Noise table* (``s >= 0``): the expected widths meet every budget (costs ``c b`` and ``c b**2`` are convex), so
    does their floor (costs are monotone), and flooring multiplies each term by at most ``4**g`` (``g`` = the
    largest step between consecutive allowed widths), while ``s 4**-E[b] <= E[s 4**-b]``. So ``objective(rounded)
    <= 4**g x lower bound <= 4**g x MILP optimum`` (4x for consecutive widths). Measured on random problems the
    gap is a fraction of a percent on average, about 1 % at most with 20 layers and less with more
    (``benchmarks/qbitopt.py``; tests pin both bounds).

  The fill, the Lagrangian start and the local search only ever lower the objective of a feasible start.
* :func:`solve_milp` -- the exact optimum over the discrete set (one-hot choice per unit over the ladders) with
  HiGHS through cvxpy (relative MIP gap ``1e-4`` of the objective above the row minima): for comparison, and for
  small problems.
* :func:`solve_monotone` -- an allocation that is **monotone in the budgets**: a larger budget never gives a unit
  fewer bits. Neither the rounding above nor the exact MILP has that property (a knapsack's optimum for a larger
  budget may drop an item to fit two others; on random OMPQ-style tables both break it in about a fifth of
  budget increases). Each unit's ladder points, in (cost, objective), are reduced to their lower convex hull
  (collinear points kept, so a linear table moves one ladder step at a time); all hull steps of all units are put
  in one *chain*, best objective decrease per unit of cost first (ties by unit, then by step; each unit's steps
  stay in order because its hull is convex); the allocation is the longest prefix of the chain that meets every
  budget. The chain does not depend on the budgets (several budgets are combined with weights from their cost
  *ranges*, not their limits), so a larger budget can only lengthen the prefix. Every chain point minimises
  ``T + t x cost`` for some ``t >= 0``, so with one budget it is the exact optimum at its own cost, and the
  objective lies above the LP bound by at most the blocking step's objective decrease (reported as
  :attr:`Allocation.lower_bound`); the price is the budget left unused, less than the blocking step's cost. No
  budget-monotone rule does better in the worst case: just below the budget at which a monotone rule first raises
  a unit past width ``a``, its allocation is at most the one just above minus that step, so nearly the step's cost
  goes unused there.

Feasibility is decided before any solve (:func:`check_feasible`): the all-minimum allocation is the cheapest, so
a budget below its cost is impossible, and the error names the smallest and largest achievable values.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from lightning_quant.allocation.cost import BudgetConstraint
from lightning_quant.core.errors import QuantizationConfigError

log = logging.getLogger(__name__)

SolverName = Literal["relaxed", "milp"]
SOLVERS: tuple[str, ...] = ("relaxed", "milp")
#: every solver :func:`allocate` takes: :data:`SOLVERS` and the budget-monotone chain (:func:`solve_monotone`)
AllocationSolver = Literal["relaxed", "milp", "monotone"]
ALLOCATION_SOLVERS: tuple[str, ...] = ("relaxed", "milp", "monotone")
#: a relaxed bit width this close above an allowed width floors to it (solver round-off)
_SNAP = 1e-6
#: an LP entry above this belongs to the solution's support
_SUPPORT = 1e-6
#: the LP solvers tried in turn: HiGHS's primal simplex (fastest here, and a vertex), its default, then CLARABEL
_LP_SOLVERS: tuple[tuple[str, dict[str, Any]], ...] = (
    (cp.HIGHS, {"simplex_strategy": 4}),
    (cp.HIGHS, {}),
    (cp.CLARABEL, {}),
)
_HINT_TABLE = (
    "HINT: build it with `noise_objective_table(sensitivities, bit_choices)` or "
    "`linear_objective_table(weights, bit_choices)`."
)


@dataclass(frozen=True)
class Allocation:
    """A solved allocation.

    Args:
        bits: the bit width of each unit (integers from the allowed set).
        objective: the table's value at ``bits``, ``sum_u objective[u, choice of bits_u]`` (for the noise table
            ``sum(s * 4**-bits)``, the estimated loss increase from quantization noise).
        costs: each budget's cost of ``bits``, in the user's unit (e.g. the average bit width), by budget name.
        budgets: each budget, in the user's unit.
        solver: ``"relaxed"``, ``"milp"`` or ``"monotone"``.
        seconds: wall time of the solve (rounding included).
        relaxed_bits: the LP relaxation's expected widths ``sum_j z[u, j] beta_j`` (``relaxed`` only).
        lower_bound: the LP relaxation's optimum, a lower bound of every integer allocation (``relaxed``: from
            its duals, ``None`` if the LP did not solve; ``monotone``: from the chain, with one budget only).
    """

    bits: np.ndarray
    objective: float
    costs: dict[str, float]
    budgets: dict[str, float]
    solver: str
    seconds: float
    relaxed_bits: np.ndarray | None = field(default=None)
    lower_bound: float | None = None

    @property
    def budget_used(self) -> float:
        """The largest fraction of a budget used (``<= 1`` always)."""
        return max((self.costs[k] / self.budgets[k] if self.budgets[k] else 0.0) for k in self.costs)


# -- objective tables ---------------------------------------------------------------------------------------------
def _unit_vector(values: object, argument: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise QuantizationConfigError(f"`{argument}` must be one finite number per unit, got {values!r}.") from err
    if array.ndim != 1 or not np.all(np.isfinite(array)):
        raise QuantizationConfigError(
            f"`{argument}` must be a 1-D array of finite numbers (one per unit), got shape {array.shape} "
            f"with {int(np.sum(~np.isfinite(array)))} non-finite value(s)."
        )
    return array


def _choice_vector(bit_choices: Sequence[int]) -> np.ndarray:
    validate_bit_choices(bit_choices, allow_binary=True)
    return np.array([int(b) for b in bit_choices], dtype=np.float64)


def noise_objective_table(sensitivities: np.ndarray, bit_choices: Sequence[int]) -> np.ndarray:
    """QBitOpt's table ``T[u, j] = s_u * 4**-bit_choices[j]`` (columns in the order of ``bit_choices``).

    >>> noise_objective_table(np.array([16.0]), (2, 4)).tolist()
    [[1.0, 0.0625]]
    """
    s = _unit_vector(sensitivities, "sensitivities")
    return s[:, None] * 4.0 ** -_choice_vector(bit_choices)[None, :]


def linear_objective_table(weights: np.ndarray, bit_choices: Sequence[int]) -> np.ndarray:
    """``T[u, j] = -w_u * bit_choices[j]``: minimising it maximises ``sum_u w_u b_u`` (importance x bits, OMPQ).

    >>> linear_objective_table(np.array([0.5, 2.0]), (2, 8)).tolist()
    [[-1.0, -4.0], [-4.0, -16.0]]
    """
    w = _unit_vector(weights, "weights")
    return -w[:, None] * _choice_vector(bit_choices)[None, :]


def noise_objective(sensitivities: np.ndarray, bits: np.ndarray) -> float:
    """``sum(s * 4**-bits)``: the noise model's estimated loss increase of an allocation."""
    return float(np.dot(np.asarray(sensitivities, dtype=np.float64), 4.0 ** -np.asarray(bits, dtype=np.float64)))


def objective_value(objective: np.ndarray, bits: np.ndarray, bit_choices: Sequence[int]) -> float:
    """``sum_u objective[u, j_u]`` with ``bit_choices[j_u] == bits[u]``: an allocation's value on a table."""
    table = np.asarray(objective, dtype=np.float64)
    choices = [int(b) for b in bit_choices]
    bits = np.asarray(bits).tolist()
    if not set(bits) <= set(choices):
        raise QuantizationConfigError(f"`bits` must be widths from `bit_choices` = {choices}, got {bits}.")
    columns = [choices.index(int(b)) for b in bits]
    return float(table[np.arange(table.shape[0]), columns].sum())


def validate_bit_choices(
    bit_choices: object, argument: str = "bit_choices", *, allow_binary: bool = False
) -> tuple[int, ...]:
    """Sorted, de-duplicated allowed bit widths in [2, 8] ([1, 8] with ``allow_binary``), or an error."""
    low = 1 if allow_binary else 2
    if isinstance(bit_choices, (str, bytes)) or not isinstance(bit_choices, Sequence):
        raise QuantizationConfigError(
            f"`{argument}` must be a list of integer bit widths in [{low}, 8], got {bit_choices!r}. "
            f"HINT: `{argument}=[2, 3, 4, 8]`."
        )
    if len(bit_choices) == 0:
        raise QuantizationConfigError(
            f"`{argument}` is empty: the allocator needs at least one bit width to choose from. "
            f"HINT: `{argument}=[2, 3, 4, 5, 6, 7, 8]`."
        )
    for b in bit_choices:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not low <= b <= 8:
            raise QuantizationConfigError(
                f"`{argument}` must hold integer bit widths in [{low}, 8], got {b!r} in {list(bit_choices)}."
            )
    return tuple(sorted({int(b) for b in bit_choices}))


# -- feasibility --------------------------------------------------------------------------------------------------
def achievable_range(constraint: BudgetConstraint, bit_choices: Sequence[int]) -> tuple[float, float]:
    """The smallest and largest cost of any allocation, in the user's unit."""
    n = constraint.coefficients.shape[0]
    low = constraint.cost(np.full(n, min(bit_choices), dtype=np.float64))
    high = constraint.cost(np.full(n, max(bit_choices), dtype=np.float64))
    return constraint.display(low), constraint.display(high)


def check_feasible(constraints: Sequence[BudgetConstraint], bit_choices: Sequence[int]) -> None:
    """Raise a :class:`QuantizationConfigError` if some budget is below its cheapest allocation.

    Costs are monotone, so the all-minimum allocation meets every budget that can be met at all -- and then
    meets them all at once: budgets of this kind never contradict each other unless one is infeasible alone.
    """
    if not constraints:
        raise QuantizationConfigError("No budget given: pass `avg_weight_bits`, `size_budget` or `bops_budget`.")
    n = constraints[0].coefficients.shape[0]
    if n == 0:
        raise QuantizationConfigError(
            "There is no layer to allocate bits to: every quantized layer is frozen (`LayerSpec.frozen`, e.g. by "
            "`first_last_bits`). HINT: quantize more layers, or set `first_last_bits=None`."
        )
    low_alloc = np.full(n, min(bit_choices), dtype=np.float64)
    for c in constraints:
        if not c.feasible(low_alloc):
            low, high = achievable_range(c, bit_choices)
            raise QuantizationConfigError(
                f"`{c.argument or c.name}` = {c.display(c.budget):.6g} cannot be met: with bit_choices "
                f"{list(bit_choices)} (frozen layers at their fixed bits) the smallest achievable {c.name} is "
                f"{low:.6g} and the largest {high:.6g}. HINT: pass a budget in [{low:.6g}, {high:.6g}], allow fewer "
                "bits, or freeze fewer layers."
            )


# -- the prepared problem -----------------------------------------------------------------------------------------
def _cost_matrix(constraint: BudgetConstraint, choices: np.ndarray) -> np.ndarray:
    """``[units, choices]`` cost of each unit at each allowed width."""
    return constraint.coefficients[:, None] * choices[None, :] ** constraint.power[:, None]


class _Instance:
    """A validated problem with its columns in increasing width, the cost matrices and each unit's ladder."""

    def __init__(self, objective: object, constraints: Sequence[BudgetConstraint], bit_choices: Sequence[int]) -> None:
        choices = validate_bit_choices(bit_choices, allow_binary=True)
        given = [int(b) for b in bit_choices]
        if len(choices) != len(given):
            raise QuantizationConfigError(
                f"`bit_choices` must not repeat a width (the table has one column per choice), got {given}. "
                f"HINT: `bit_choices={list(choices)}` with the table's columns in that order."
            )
        n = constraints[0].coefficients.shape[0] if constraints else 0
        for c in constraints:
            if c.coefficients.shape != (n,):
                raise QuantizationConfigError(
                    f"Every budget needs one coefficient per unit: `{c.argument or c.name}` has "
                    f"{c.coefficients.shape[0]}, the first budget {n}. HINT: build all budgets from the same units."
                )
        check_feasible(constraints, choices)
        table = _validate_table(objective, given, n)
        order = np.argsort(np.array(given), kind="stable")
        self.order = order  # column j here is column order[j] of the caller's table
        self.bit_choices = choices
        self.choices = np.array(choices, dtype=np.float64)
        self.table = table[:, order]
        self.constraints = list(constraints)
        self.n, self.m = self.table.shape
        self.rows = np.arange(self.n)
        self.cost = np.stack([_cost_matrix(c, self.choices) for c in constraints])  # [K, n, m]
        self.room = np.array([c.budget - c.offset for c in constraints], dtype=np.float64)
        # the normaliser of a "budget share" (the allocatable part of each budget); at least the all-minimum's
        # cost, which rounding can leave above the room when tiny coefficients vanish in the exact sum
        self.shares = np.maximum(np.maximum(self.room, self.cost[:, :, 0].sum(axis=1)), 1e-300)
        self.active = [k for k, c in enumerate(constraints) if np.any(c.coefficients > 0)]
        columns = np.arange(self.m)
        prefix = np.minimum.accumulate(self.table, axis=1)
        useful = np.ones((self.n, self.m), dtype=bool)
        useful[:, 1:] = self.table[:, 1:] < prefix[:, :-1]
        self.useful = useful
        #: the largest ladder index <= j (column 0 is always on the ladder)
        self.snap = np.maximum.accumulate(np.where(useful, columns, -1), axis=1)
        #: the next ladder index below / above j, or -1
        self.down = np.full((self.n, self.m), -1)
        self.down[:, 1:] = self.snap[:, :-1]
        at_or_above = np.minimum.accumulate(np.where(useful, columns, self.m)[:, ::-1], axis=1)[:, ::-1]
        self.up = np.full((self.n, self.m), -1)
        self.up[:, :-1] = np.where(at_or_above[:, 1:] < self.m, at_or_above[:, 1:], -1)

    def value(self, index: np.ndarray) -> float:
        return float(self.table[self.rows, index].sum())

    def bits(self, index: np.ndarray) -> np.ndarray:
        return self.choices[index].astype(np.int64)

    def fits(self, index: np.ndarray) -> bool:
        """Every budget holds, by the budgets' own exact cost."""
        bits = self.choices[index]
        return all(c.feasible(bits) for c in self.constraints)

    def violated(self, index: np.ndarray) -> np.ndarray:
        bits = self.choices[index]
        return np.array([not c.feasible(bits) for c in self.constraints])

    def floor_index(self, widths: np.ndarray) -> np.ndarray:
        """The allowed width at or below each (continuous) width, as a column index."""
        index = np.searchsorted(self.choices, np.asarray(widths, dtype=np.float64) + _SNAP, side="right") - 1
        return np.clip(index, 0, self.m - 1)

    def unpermute(self, z: np.ndarray) -> np.ndarray:
        """A ``[units, choices]`` array back in the caller's column order."""
        out = np.empty_like(z)
        out[:, self.order] = z
        return out


def _validate_table(objective: object, bit_choices: Sequence[int], units: int) -> np.ndarray:
    try:
        table = np.array(objective, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise QuantizationConfigError(
            f"`objective` must be a float table [units, len(bit_choices)], got {type(objective).__name__}. "
            f"{_HINT_TABLE}"
        ) from err
    expected = (units, len(bit_choices))
    if table.shape != expected:
        raise QuantizationConfigError(
            f"`objective` must have shape [units, len(bit_choices)] = [{expected[0]}, {expected[1]}] (one row per "
            f"unit of the budgets, one column per width in {list(bit_choices)}), got shape {table.shape}. "
            f"{_HINT_TABLE}"
        )
    bad = np.argwhere(~np.isfinite(table))
    if bad.size:
        u, j = (int(v) for v in bad[0])
        raise QuantizationConfigError(
            f"`objective` must hold finite values, got {table[u, j]} at unit {u}, {bit_choices[j]} bits "
            f"({bad.shape[0]} non-finite in all). HINT: replace infinite values by a large finite penalty."
        )
    if table.size and not np.isfinite(table.max() - table.min()):
        raise QuantizationConfigError(
            f"`objective` spans [{table.min():.3g}, {table.max():.3g}], whose difference overflows float64. "
            "HINT: divide the table by a constant (the allocation does not change)."
        )
    return table


# -- rounding -----------------------------------------------------------------------------------------------------
def _round(inst: _Instance, index: np.ndarray, locked: np.ndarray | None = None, fill: bool = True) -> np.ndarray:
    """Snap to the ladders, repair until every budget holds, then fill greedily (see the module docstring)."""
    rows = inst.rows
    index = inst.snap[rows, np.asarray(index, dtype=np.int64)]
    # repair: lower the unit that loses least objective per budget share saved, until every budget holds
    while True:
        violated = inst.violated(index)
        if not violated.any():
            break
        lower = inst.down[rows, index]
        can = lower >= 0
        low = np.where(can, lower, index)
        cost = inst.cost[violated]
        saved = ((cost[:, rows, index] - cost[:, rows, low]) / inst.shares[violated, None]).sum(axis=0)
        loss = inst.table[rows, low] - inst.table[rows, index]
        ok = can & (saved > 0)
        if locked is not None and (ok & ~locked).any():
            ok = ok & ~locked
        if not ok.any():  # cannot happen when the all-minimum allocation is feasible
            raise QuantizationConfigError("The budgets cannot be met by any allocation (check_feasible first).")
        with np.errstate(over="ignore"):  # a tiny saving: an infinite score, ranked last
            score = np.where(ok, loss / np.where(ok, saved, 1.0), np.inf)
        u = int(np.argmin(score)) if np.isfinite(score).any() else int(np.argmax(np.where(ok, saved, -1.0)))
        index[u] = lower[u]
    if not fill:
        return index
    # fill: one ladder step up for the unit with the best objective decrease per budget share, while it fits
    while True:
        upper = inst.up[rows, index]
        can = upper >= 0
        if not can.any():
            break
        high = np.where(can, upper, index)
        extra = inst.cost[:, rows, high] - inst.cost[:, rows, index]  # [K, n]
        totals = inst.cost[:, rows, index].sum(axis=1)
        fits = can & np.all(totals[:, None] + extra <= inst.room[:, None], axis=0)
        if not fits.any():
            break
        gain = inst.table[rows, index] - inst.table[rows, high]
        used = (extra / inst.shares[:, None]).sum(axis=0)
        with np.errstate(over="ignore"):  # a tiny share used: an infinite score, taken first
            score = np.where(used > 0, gain / np.where(used > 0, used, 1.0), np.inf)
        score = np.where(fits, score, -np.inf)
        moved = False
        for u in _best_first(score, int(fits.sum())):
            trial = index.copy()
            trial[u] = upper[u]
            if inst.fits(trial):  # the exact check (the totals above are summed in another order)
                index, moved = trial, True
                break
        if not moved:
            break
    return index


def _best_first(score: np.ndarray, count: int) -> Iterator[int]:
    """The indices of the ``count`` highest scores, best first (ties in index order); sorts only if asked past one."""
    best = int(np.argmax(score))
    yield best
    for u in np.argsort(-score, kind="stable")[:count]:
        if u != best:
            yield int(u)


def round_to_budget(
    relaxed: np.ndarray,
    objective: np.ndarray,
    constraints: Sequence[BudgetConstraint],
    bit_choices: Sequence[int],
    *,
    locked: np.ndarray | None = None,
    fill: bool = True,
) -> np.ndarray:
    """Integer bit widths from ``relaxed`` that meet every budget: floor, repair, then greedy fill.

    Args:
        relaxed: a (nearly) feasible continuous allocation, one width per unit.
        objective: the table ``[units, len(bit_choices)]`` to minimise (columns in the order of ``bit_choices``).
        constraints: the budgets (all feasible at the all-minimum allocation; see :func:`check_feasible`).
        bit_choices: the allowed widths.
        locked: units the repair must not lower (if the budgets cannot be met otherwise, they are lowered too).
        fill: raise units again while the budgets allow (the greedy fill); ``False`` stops after the repair, so
            a feasible ``relaxed`` on the ladders comes back unchanged and an infeasible one is only lowered (the
            search's feasibility repair of a sampled allocation).

    Returns:
        The bit width of each unit, meeting every budget exactly (the budgets' own cost, no tolerance).
    """
    inst = _Instance(objective, constraints, bit_choices)
    locked = None if locked is None else np.asarray(locked, dtype=bool)
    return inst.bits(_round(inst, inst.floor_index(relaxed), locked, fill))


# -- output silencing ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Send what native solver libraries print (HiGHS's banner) to ``os.devnull`` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved: list[tuple[int, int]] = []
    devnull = None
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(devnull, fd)
    except OSError:  # no usable file descriptors (an embedded interpreter): run unsilenced
        pass
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        if devnull is not None:
            os.close(devnull)


# -- the LP relaxation --------------------------------------------------------------------------------------------
class _LinearRelaxation:
    """A parametrised cvxpy LP (compiled once per shape, re-solved with new data: cvxpy's DPP cache)."""

    def __init__(self, n: int, m: int, budgets: int) -> None:
        self.z = cp.Variable((n, m), nonneg=True)
        self.table = cp.Parameter((n, m))
        self.costs = [cp.Parameter((n, m), nonneg=True) for _ in range(budgets)]
        self.budgets = [cp.sum(cp.multiply(c, self.z)) <= 1 for c in self.costs]
        objective = cp.Minimize(cp.sum(cp.multiply(self.table, self.z)))
        self.problem = cp.Problem(objective, [cp.sum(self.z, axis=1) == 1, *self.budgets])


_CACHE: OrderedDict[tuple[int, int, int], _LinearRelaxation] = OrderedDict()
_CACHE_SIZE = 16


def _relaxation(n: int, m: int, budgets: int) -> _LinearRelaxation:
    key = (n, m, budgets)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    problem = _LinearRelaxation(n, m, budgets)
    _CACHE[key] = problem
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return problem


def _normalised(table: np.ndarray) -> tuple[np.ndarray, float]:
    """The table minus its row minima (a constant of every allocation), scaled to a largest entry of 1; the scale."""
    shifted = table - table.min(axis=1, keepdims=True)
    scale = float(shifted.max()) if shifted.size else 0.0
    return (shifted / scale, scale) if scale > 0 else (shifted, 1.0)


def _dual_bound(inst: _Instance, multipliers: np.ndarray) -> float:
    """The Lagrangian lower bound ``sum_u min_j (T + y . cost) - y . budget`` for multipliers ``y >= 0``.

    Weak duality makes it a lower bound of every allocation (integer or relaxed) for *any* ``y >= 0``, so solver
    tolerances can only loosen it; at the LP's optimal duals it equals the LP optimum (the one-hot rows are the
    only other constraints, and their polytope has integer vertices).
    """
    table, scale = _normalised(inst.table)
    y = np.maximum(np.asarray(multipliers, dtype=np.float64), 0.0)
    penalty = sum((y_k * inst.cost[k] / inst.shares[k] for y_k, k in zip(y, inst.active, strict=True)), 0.0)
    bound = float(np.min(table + penalty, axis=1).sum() - y.sum())
    return scale * bound + float(inst.table.min(axis=1).sum())


def _solve_lp(inst: _Instance) -> tuple[np.ndarray, float] | None:
    """The LP relaxation's ``z`` (``[units, choices]``, rows summing to 1) and its lower bound (from the duals), or
    ``None`` if every solver failed."""
    if inst.m == 1 or not inst.active:  # nothing to trade: every unit takes its best choice
        z = np.zeros((inst.n, inst.m))
        z[inst.rows, np.argmin(inst.table, axis=1)] = 1.0
        return z, float(inst.table.min(axis=1).sum())
    problem = _relaxation(inst.n, inst.m, len(inst.active))
    problem.table.value = _normalised(inst.table)[0]
    for parameter, k in zip(problem.costs, inst.active, strict=True):
        parameter.value = inst.cost[k] / inst.shares[k]
    for solver, options in _LP_SOLVERS:
        try:
            with quiet_native_output():
                problem.problem.solve(solver=solver, **options)
        except cp.error.SolverError as err:
            log.debug("LP relaxation of the bit allocation: %s %s failed: %s", solver, options, err)
            continue
        if problem.problem.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) and problem.z.value is not None:
            z = np.clip(np.asarray(problem.z.value, dtype=np.float64), 0.0, 1.0)
            duals = [0.0 if c.dual_value is None else float(np.asarray(c.dual_value).item()) for c in problem.budgets]
            return z / np.maximum(z.sum(axis=1, keepdims=True), 1e-300), _dual_bound(inst, np.array(duals))
    return None


def relax(
    objective: np.ndarray, constraints: Sequence[BudgetConstraint], bit_choices: Sequence[int]
) -> np.ndarray | None:
    """The LP relaxation's optimal ``z[unit, choice]`` (columns in the order of ``bit_choices``; each row a
    distribution over the choices), or ``None`` if the solvers failed.

    ``sum(objective * z)`` is a lower bound of every integer allocation's objective, up to the LP solver's
    tolerance (:attr:`Allocation.lower_bound` is the dual bound, which holds regardless).
    """
    inst = _Instance(objective, constraints, bit_choices)
    solved = _solve_lp(inst)
    return None if solved is None else inst.unpermute(solved[0])


def _lagrangian(inst: _Instance) -> np.ndarray:
    """The discrete Lagrangian allocation: each unit minimises ``T + t x cost`` on its own, with the smallest
    multiplier ``t`` (bisection) at which every budget holds.

    The budgets are combined with equal weight per share of their allocatable room. Its points lie on the lower
    convex hull of each unit's (cost, objective) points, so it avoids the floor's failure on a few very large
    units (whose floored step is too big for the room the greedy fill leaves).
    """
    if not inst.active:
        return np.argmin(inst.table, axis=1)
    cost = sum(inst.cost[k] / inst.shares[k] for k in inst.active)
    objective = _normalised(inst.table)[0]

    def pick(t: float) -> np.ndarray:
        return np.argmin(objective + t * cost, axis=1)

    low, high = -30.0, 30.0  # log10 of the multiplier, relative to the normalised objective
    if not inst.fits(pick(10.0**high)):
        return np.zeros(inst.n, dtype=np.int64)
    for _ in range(60):
        mid = 0.5 * (low + high)
        if inst.fits(pick(10.0**mid)):
            high = mid
        else:
            low = mid
    return pick(10.0**high)


def _big_steps(inst: _Instance, index: np.ndarray, tries: int = 8) -> np.ndarray:
    """Local search for the rounding's blind spot: a unit whose next step is a large share of a budget.

    Greedy fill never takes such a step once smaller ones have used the room, although raising it and lowering
    several small units can be better (a knapsack effect, large with few units of very different sizes). For
    the ``tries`` units with the largest next-step budget share: raise it one ladder step, repair by lowering the
    others, fill, and keep the result if the objective improved. Every candidate meets every budget.
    """
    if not inst.active or inst.m < 2:
        return index
    rows = inst.rows
    best, best_value = index.copy(), inst.value(index)
    upper = inst.up[rows, best]
    can = upper >= 0
    high = np.where(can, upper, best)
    share = sum((inst.cost[k, rows, high] - inst.cost[k, rows, best]) / inst.shares[k] for k in inst.active)
    share = np.where(can, share, -np.inf)
    for u in np.argsort(-share, kind="stable")[:tries]:
        if not np.isfinite(share[u]) or share[u] <= 0:
            break
        start = best.copy()
        start[u] = inst.up[u, best[u]] if inst.up[u, best[u]] >= 0 else best[u]
        locked = np.zeros(inst.n, dtype=bool)
        locked[u] = True
        candidate = _round(inst, start, locked)
        value = inst.value(candidate)
        if value < best_value:
            best, best_value = candidate, value
    return best


def _report(
    inst: _Instance,
    index: np.ndarray,
    solver: str,
    start: float,
    relaxed_bits: np.ndarray | None = None,
    lower_bound: float | None = None,
) -> Allocation:
    bits = inst.bits(index)
    return Allocation(
        bits=bits,
        objective=inst.value(index),
        costs={c.name: float(c.display(c.cost(bits))) for c in inst.constraints},
        budgets={c.name: float(c.display(c.budget)) for c in inst.constraints},
        solver=solver,
        seconds=time.perf_counter() - start,
        relaxed_bits=relaxed_bits,
        lower_bound=lower_bound,
    )


def solve_relaxed(
    objective: np.ndarray, constraints: Sequence[BudgetConstraint], bit_choices: Sequence[int]
) -> Allocation:
    """LP relaxation (cvxpy; HiGHS, CLARABEL as fallback) + :func:`round_to_budget` from three starts + local search.

    Args:
        objective: the table ``[units, len(bit_choices)]`` to minimise, columns in the order of ``bit_choices``.
        constraints: the budgets, one coefficient per unit each.
        bit_choices: the allowed widths (1 to 8; no repeats).

    If every LP solver fails the rounding starts from the all-minimum and the Lagrangian allocations (a warning is
    logged): the result still meets every budget.
    """
    start = time.perf_counter()
    inst = _Instance(objective, constraints, bit_choices)
    solved = _solve_lp(inst)
    starts = [_lagrangian(inst)]
    relaxed_bits = lower_bound = None
    if solved is None:
        log.warning("The relaxed bit allocation did not solve; allocating greedily from the minimum instead.")
        starts.append(np.zeros(inst.n, dtype=np.int64))
    else:
        z, lower_bound = solved
        relaxed_bits = z @ inst.choices
        starts.append(inst.floor_index(relaxed_bits))  # carries the noise table's 4**g bound
        starts.append(np.argmax(z > _SUPPORT, axis=1))  # lowest choice in the support: the additive bound
    rounded = [_round(inst, s) for s in starts]
    index = _big_steps(inst, min(rounded, key=inst.value))
    return _report(inst, index, "relaxed", start, relaxed_bits, lower_bound)


def solve_milp(
    objective: np.ndarray,
    constraints: Sequence[BudgetConstraint],
    bit_choices: Sequence[int],
    *,
    time_limit: float | None = None,
) -> Allocation:
    """The exact optimum over ``bit_choices`` (one-hot choice per unit over its ladder), with HiGHS through cvxpy.

    HiGHS's own output is kept out of the user's terminal. Integrality round-off is repaired exactly as in
    :func:`round_to_budget`, so the result always meets every budget.

    Args:
        objective: the table ``[units, len(bit_choices)]`` to minimise, columns in the order of ``bit_choices``.
        constraints: the budgets, one coefficient per unit each.
        bit_choices: the allowed widths (1 to 8; no repeats).
        time_limit: seconds HiGHS may take; on timeout its best integer solution is used.
    """
    start = time.perf_counter()
    inst = _Instance(objective, constraints, bit_choices)
    units, columns = np.nonzero(inst.useful)  # only ladder choices: the optimum is among them
    x = cp.Variable(units.shape[0], boolean=True)
    entries = units.shape[0]
    one_hot = sp.csr_matrix((np.ones(entries), (units, np.arange(entries))), shape=(inst.n, entries))
    cons = [one_hot @ x == 1]
    for k in inst.active:
        cons.append((inst.cost[k][units, columns] / inst.shares[k]) @ x <= 1)
    problem = cp.Problem(cp.Minimize(_normalised(inst.table)[0][units, columns] @ x), cons)
    options = {} if time_limit is None else {"time_limit": float(time_limit)}
    with quiet_native_output():
        try:
            problem.solve(solver=cp.HIGHS, **options)
        except cp.error.SolverError as err:
            log.warning("The MILP bit allocation failed (%s); allocating greedily from the minimum instead.", err)
    if x.value is None:
        index = np.zeros(inst.n, dtype=np.int64)
    else:
        z = np.full((inst.n, inst.m), -1.0)
        z[units, columns] = np.asarray(x.value, dtype=np.float64)
        index = np.argmax(z, axis=1)
    return _report(inst, _round(inst, index), "milp", start)


@dataclass(frozen=True)
class _Chain:
    """The budget-independent order of ladder steps of :func:`solve_monotone`."""

    units: np.ndarray  # the unit each step raises
    targets: np.ndarray  # the column (increasing-width order) it raises the unit to
    slopes: np.ndarray  # objective change per unit of combined cost (<= 0; -inf for a free step)


def _hull_steps(cost: np.ndarray, value: np.ndarray, columns: np.ndarray) -> list[tuple[int, float]]:
    """The lower convex hull of one unit's ladder points ``(cost, value)`` (cost non-decreasing, value strictly
    decreasing), from the first point on, collinear points kept: ``[(column, slope)]`` of each step."""
    hull = [0]
    for k in range(1, len(columns)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies strictly above the segment a -> k (beyond round-off): it is not on the lower hull
            left = (cost[b] - cost[a]) * (value[k] - value[a])
            right = (value[b] - value[a]) * (cost[k] - cost[a])
            if left - right < -1e-12 * (abs(left) + abs(right)):
                hull.pop()
            else:
                break
        hull.append(k)
    steps = []
    for a, b in itertools.pairwise(hull):
        dc, dv = cost[b] - cost[a], value[b] - value[a]
        steps.append((int(columns[b]), float(dv / dc) if dc > 0 else -np.inf))
    return steps


def _chain(inst: _Instance) -> _Chain:
    # budgets combined by their allocatable ranges (never by their limits: the chain must not depend on them)
    spans = [inst.cost[k, :, -1].sum() - inst.cost[k, :, 0].sum() for k in inst.active]
    cost = sum((inst.cost[k] / max(span, 1e-300) for k, span in zip(inst.active, spans, strict=True)), 0.0)
    cost = np.broadcast_to(np.asarray(cost, dtype=np.float64), inst.table.shape)
    units: list[int] = []
    targets: list[int] = []
    slopes: list[float] = []
    for u in range(inst.n):
        columns = np.flatnonzero(inst.useful[u])
        steps = _hull_steps(cost[u, columns], inst.table[u, columns], columns)
        unit_slopes = np.maximum.accumulate(np.array([s for _, s in steps])) if steps else np.array([])
        for (column, _), slope in zip(steps, unit_slopes, strict=True):
            units.append(u)
            targets.append(column)
            slopes.append(float(slope))
    units_a, targets_a, slopes_a = np.array(units, dtype=np.int64), np.array(targets, dtype=np.int64), np.array(slopes)
    order = np.lexsort((targets_a, units_a, slopes_a))  # best slope first, then unit, then step
    return _Chain(units_a[order], targets_a[order], slopes_a[order])


def solve_monotone(
    objective: np.ndarray, constraints: Sequence[BudgetConstraint], bit_choices: Sequence[int]
) -> Allocation:
    """The longest prefix of the units' convex-hull steps (best first) that meets every budget (module docs).

    Monotone: for the same table, a larger budget (any of them) never gives a unit fewer bits. With one budget the
    result is the exact optimum among allocations costing no more than it does, and its objective exceeds the LP
    bound (:attr:`Allocation.lower_bound`) by at most the objective decrease of the first step that did not fit.

    Args:
        objective: the table ``[units, len(bit_choices)]`` to minimise, columns in the order of ``bit_choices``.
        constraints: the budgets, one coefficient per unit each.
        bit_choices: the allowed widths (1 to 8; no repeats).
    """
    start = time.perf_counter()
    inst = _Instance(objective, constraints, bit_choices)
    chain = _chain(inst)
    index = np.zeros(inst.n, dtype=np.int64)
    rows = inst.rows
    totals = inst.cost[:, rows, index].sum(axis=1)
    blocked = -1
    for step, (u, target) in enumerate(zip(chain.units, chain.targets, strict=True)):
        extra = inst.cost[:, u, target] - inst.cost[:, u, index[u]]
        if np.any(totals + extra > inst.room):
            blocked = step
            break
        trial = index.copy()
        trial[u] = target
        if not inst.fits(trial):  # the exact check (the totals above are summed in another order)
            blocked = step
            break
        index, totals = trial, totals + extra
    bound = None
    if len(inst.active) == 1:
        bound = inst.value(index)
        if blocked >= 0:  # the LP takes the blocking step partly: the fraction of its cost that still fits
            k = inst.active[0]
            u, target = chain.units[blocked], chain.targets[blocked]
            extra = inst.cost[k, u, target] - inst.cost[k, u, index[u]]
            fraction = min(max((inst.room[k] - totals[k]) / extra, 0.0), 1.0) if extra > 0 else 1.0
            bound += fraction * (inst.table[u, target] - inst.table[u, index[u]])
    return _report(inst, index, "monotone", start, lower_bound=bound)


def allocate(
    objective: np.ndarray,
    constraints: Sequence[BudgetConstraint],
    bit_choices: Sequence[int],
    solver: AllocationSolver = "relaxed",
) -> Allocation:
    """Minimise the table ``objective[unit, choice]`` under the budgets with ``solver`` (``"relaxed"``,
    ``"milp"`` or ``"monotone"``, see the module docs); the result always meets every budget.

    >>> from lightning_quant.allocation import BudgetConstraint
    >>> size = BudgetConstraint("size_bits", np.array([100.0, 100.0]), 1000.0)
    >>> table = noise_objective_table(np.array([1.0, 50.0]), (2, 4, 8))
    >>> allocate(table, [size], (2, 4, 8)).bits.tolist()
    [2, 8]
    """
    if solver == "relaxed":
        return solve_relaxed(objective, constraints, bit_choices)
    if solver == "milp":
        return solve_milp(objective, constraints, bit_choices)
    if solver == "monotone":
        return solve_monotone(objective, constraints, bit_choices)
    raise QuantizationConfigError(
        f"`solver` must be one of {list(SOLVERS)} or 'monotone' (the budget-monotone chain), got {solver!r}."
    )


__all__ = [
    "ALLOCATION_SOLVERS",
    "SOLVERS",
    "Allocation",
    "AllocationSolver",
    "SolverName",
    "achievable_range",
    "allocate",
    "check_feasible",
    "linear_objective_table",
    "noise_objective",
    "noise_objective_table",
    "objective_value",
    "quiet_native_output",
    "relax",
    "round_to_budget",
    "solve_milp",
    "solve_monotone",
    "solve_relaxed",
    "validate_bit_choices",
]

"""Bit-allocation solvers: a convex relaxation in cvxpy with budget-keeping rounding, and an exact MILP (HiGHS).

The problem (after QBitOpt, Peters et al., 2023, see :class:`~lightning_quant.callbacks.BitReallocationCallback`):

.. math::

    \\min_{b}\\ \\sum_u s_u\\, 4^{-b_u} \\quad\\text{s.t.}\\quad
    \\text{offset}_k + \\sum_u c_{ku}\\, b_u^{p_{ku}} \\le B_k\\ \\ \\forall k, \\qquad b_u \\in \\mathcal{B}

``s_u 4^{-b_u}`` is the expected loss increase of unit ``u``'s quantization noise (its step size, hence the
noise's standard deviation, halves with every extra bit; :mod:`.sensitivity` estimates ``s_u``), ``\\mathcal{B}``
the allowed bit widths and each budget one of :mod:`.cost`'s monotone costs.

* :func:`solve_relaxed` -- ``b_u`` continuous in ``[min(B), max(B)]``: a convex program (exponential cone;
  CLARABEL) whose optimum is a *lower bound* of every integer allocation; then :func:`round_to_budget`.
* :func:`round_to_budget` -- floor every ``b_u`` to the allowed width below it (costs are monotone, so the floor
  of a feasible point is feasible; solver round-off is repaired by lowering bits, which always ends, since the
  all-minimum allocation is feasible), then greedily add one step of bits to the unit with the best objective
  decrease per budget share used, while every budget still holds. Every step is checked exactly, so the result
  **always meets every budget**. :func:`solve_relaxed` also rounds to the *nearest* allowed width (repaired and
  filled the same way) and keeps the better of the two.

  Gap: flooring multiplies each term by at most ``4**g`` (``g`` = the largest step between consecutive allowed
  widths) and the greedy fill only lowers the objective, so ``objective(rounded) <= 4**g x relaxed optimum <=
  4**g x MILP optimum`` (4x for consecutive widths). Measured on random problems the gap is a few percent
  (``benchmarks/qbitopt.py``; tests pin the bound).
* :func:`solve_milp` -- the exact optimum over the discrete set (one-hot choice per unit) with HiGHS through
  cvxpy: for comparison, and for small models.

Feasibility is decided before any solve (:func:`check_feasible`): the all-minimum allocation is the cheapest, so
a budget below its cost is impossible, and the error names the smallest and largest achievable values.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import cvxpy as cp
import numpy as np

from lightning_quant.allocation.cost import BudgetConstraint
from lightning_quant.core.errors import QuantizationConfigError

log = logging.getLogger(__name__)

SolverName = Literal["relaxed", "milp"]
SOLVERS: tuple[str, ...] = ("relaxed", "milp")
_LN4 = float(np.log(4.0))
#: a relaxed bit width this close above an allowed width floors to it (solver round-off)
_SNAP = 1e-6


@dataclass(frozen=True)
class Allocation:
    """A solved allocation.

    Args:
        bits: the bit width of each unit (integers from the allowed set).
        objective: ``sum(s * 4**-bits)``, the estimated loss increase from quantization noise.
        costs: each budget's cost of ``bits``, in the user's unit (e.g. the average bit width), by budget name.
        budgets: each budget, in the user's unit.
        solver: ``"relaxed"`` or ``"milp"``.
        seconds: wall time of the solve (rounding included).
        relaxed_bits: the continuous optimum before rounding (``relaxed`` only).
        lower_bound: the relaxed optimum's objective, a lower bound of every integer allocation (``relaxed``).
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


def noise_objective(sensitivities: np.ndarray, bits: np.ndarray) -> float:
    """``sum(s * 4**-bits)``: the noise model's estimated loss increase of an allocation."""
    return float(np.dot(np.asarray(sensitivities, dtype=np.float64), 4.0 ** -np.asarray(bits, dtype=np.float64)))


def validate_bit_choices(bit_choices: object, argument: str = "bit_choices") -> tuple[int, ...]:
    """Sorted, de-duplicated allowed bit widths in [2, 8], or a :class:`QuantizationConfigError`."""
    if isinstance(bit_choices, (str, bytes)) or not isinstance(bit_choices, Sequence):
        raise QuantizationConfigError(
            f"`{argument}` must be a list of integer bit widths in [2, 8], got {bit_choices!r}. "
            f"HINT: `{argument}=[2, 3, 4, 8]`."
        )
    if len(bit_choices) == 0:
        raise QuantizationConfigError(
            f"`{argument}` is empty: the allocator needs at least one bit width to choose from. "
            f"HINT: `{argument}=[2, 3, 4, 5, 6, 7, 8]`."
        )
    for b in bit_choices:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 2 <= b <= 8:
            raise QuantizationConfigError(
                f"`{argument}` must hold integer bit widths in [2, 8], got {b!r} in {list(bit_choices)}."
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


# -- rounding -----------------------------------------------------------------------------------------------------
def _cost_matrix(constraint: BudgetConstraint, choices: np.ndarray) -> np.ndarray:
    """``[units, choices]`` cost of each unit at each allowed width."""
    return constraint.coefficients[:, None] * choices[None, :] ** constraint.power[:, None]


def _fits(totals: np.ndarray, budgets: np.ndarray) -> bool:
    return bool(np.all(totals <= budgets))


def round_to_budget(
    relaxed: np.ndarray,
    sensitivities: np.ndarray,
    constraints: Sequence[BudgetConstraint],
    bit_choices: Sequence[int],
    *,
    locked: np.ndarray | None = None,
) -> np.ndarray:
    """Integer bit widths from ``relaxed`` that meet every budget: floor, repair, then greedy fill.

    Args:
        relaxed: a (nearly) feasible continuous allocation, one width per unit.
        sensitivities: ``s_u`` of the objective ``sum(s * 4**-b)``.
        constraints: the budgets (all feasible at the all-minimum allocation; see :func:`check_feasible`).
        bit_choices: the allowed widths.
        locked: units the repair must not lower (if the budgets cannot be met otherwise, they are lowered too).

    Returns:
        The bit width of each unit, meeting every budget exactly (costs compared without tolerance).
    """
    choices = np.array(sorted(bit_choices), dtype=np.float64)
    s = np.asarray(sensitivities, dtype=np.float64)
    n = s.shape[0]
    m = choices.shape[0]
    index = np.clip(np.searchsorted(choices, np.asarray(relaxed, dtype=np.float64) + _SNAP, side="right") - 1, 0, m - 1)
    cost = [_cost_matrix(c, choices) for c in constraints]
    budgets = np.array([c.budget - c.offset for c in constraints], dtype=np.float64)
    # normaliser of "budget share" (the allocatable part of each budget)
    shares = np.maximum(np.abs(budgets), 1e-300)
    objective = s[:, None] * 4.0 ** -choices[None, :]
    rows = np.arange(n)

    def totals(idx: np.ndarray) -> np.ndarray:
        return np.array([c[rows, idx].sum() for c in cost])

    current = totals(index)
    # repair: lower the unit that loses least objective per budget share saved, until every budget holds
    while not _fits(current, budgets):
        can = index > 0
        if locked is not None and (can & ~locked).any():
            can = can & ~locked
        lower = np.maximum(index - 1, 0)
        violated = current > budgets
        saved = np.zeros(n)
        for k, c in enumerate(cost):
            if violated[k]:
                saved += (c[rows, index] - c[rows, lower]) / shares[k]
        loss = objective[rows, lower] - objective[rows, index]
        score = np.where(can & (saved > 0), loss / np.where(saved > 0, saved, 1.0), np.inf)
        u = int(np.argmin(score))
        if not np.isfinite(score[u]):  # cannot happen when the all-minimum allocation is feasible
            raise QuantizationConfigError("The budgets cannot be met by any allocation (check_feasible first).")
        index[u] -= 1
        current = totals(index)
    # greedy fill: one step up for the unit with the best objective decrease per budget share, while it fits
    while True:
        can = index < m - 1
        if not can.any():
            break
        upper = np.minimum(index + 1, m - 1)
        extra = np.stack([c[rows, upper] - c[rows, index] for c in cost])  # [k, n]
        fits = can & np.all(current[:, None] + extra <= budgets[:, None], axis=0)
        if not fits.any():
            break
        gain = objective[rows, index] - objective[rows, upper]
        used = (extra / shares[:, None]).sum(axis=0)
        score = np.where(used > 0, gain / np.where(used > 0, used, 1.0), np.inf)
        score = np.where(fits, score, -np.inf)
        u = int(np.argmax(score))
        index[u] += 1
        current = current + extra[:, u]
    return choices[index].astype(np.int64)


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


# -- the relaxed problem ------------------------------------------------------------------------------------------
class _RelaxedProblem:
    """A parametrised cvxpy problem (compiled once per shape, re-solved with new data: cvxpy's DPP cache)."""

    def __init__(self, n: int, low: float, high: float, kinds: tuple[tuple[bool, bool], ...]) -> None:
        self.bits = cp.Variable(n)
        self.weights = cp.Parameter(n, nonneg=True)
        self.linear: list[cp.Parameter | None] = []
        self.square: list[cp.Parameter | None] = []
        constraints = [self.bits >= low, self.bits <= high]
        for has_linear, has_square in kinds:
            terms = []
            lin = cp.Parameter(n, nonneg=True) if has_linear else None
            sq = cp.Parameter(n, nonneg=True) if has_square else None
            if lin is not None:
                terms.append(lin @ self.bits)
            if sq is not None:
                terms.append(sq @ cp.square(self.bits))
            self.linear.append(lin)
            self.square.append(sq)
            constraints.append(cp.sum(cp.hstack(terms)) <= 1)
        # objective in units of 4**-low: exp(-ln4 (b - low)) lies in [4**-(high-low), 1]
        objective = cp.Minimize(self.weights @ cp.exp(-_LN4 * (self.bits - low)))
        self.problem = cp.Problem(objective, constraints)


_CACHE: OrderedDict[tuple, _RelaxedProblem] = OrderedDict()
_CACHE_SIZE = 16


def _relaxed_problem(n: int, low: float, high: float, kinds: tuple[tuple[bool, bool], ...]) -> _RelaxedProblem:
    key = (n, low, high, kinds)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    problem = _RelaxedProblem(n, low, high, kinds)
    _CACHE[key] = problem
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return problem


def _active(constraints: Sequence[BudgetConstraint]) -> list[BudgetConstraint]:
    """The budgets that depend on the allocation (some unit has a non-zero coefficient)."""
    return [c for c in constraints if np.any(c.coefficients > 0)]


def relax(
    sensitivities: np.ndarray, constraints: Sequence[BudgetConstraint], bit_choices: Sequence[int]
) -> np.ndarray | None:
    """The continuous optimum of the convex relaxation, or ``None`` if the solvers failed."""
    s = np.asarray(sensitivities, dtype=np.float64)
    n = s.shape[0]
    low, high = float(min(bit_choices)), float(max(bit_choices))
    if low == high:
        return np.full(n, low)
    active = _active(constraints)
    if not active:
        return np.full(n, high)
    kinds = tuple((bool(np.any(c.power == 1)), bool(np.any(c.power == 2))) for c in active)
    problem = _relaxed_problem(n, low, high, kinds)
    scale = float(s.max()) if s.size and s.max() > 0 else 1.0
    # a tiny floor keeps the exponential cone well-posed when some sensitivities are exactly zero
    problem.weights.value = np.maximum(s / scale, 1e-12)
    for c, lin, sq in zip(active, problem.linear, problem.square, strict=True):
        room = c.budget - c.offset  # > 0: feasible at the minimum and some coefficient is positive
        if lin is not None:
            lin.value = np.where(c.power == 1, c.coefficients, 0.0) / room
        if sq is not None:
            sq.value = np.where(c.power == 2, c.coefficients, 0.0) / room
    for solver in ("CLARABEL", "SCS"):
        try:
            problem.problem.solve(solver=solver)
        except cp.error.SolverError as err:
            log.debug("relaxed bit allocation: %s failed: %s", solver, err)
            continue
        if problem.problem.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) and problem.bits.value is not None:
            return np.clip(np.asarray(problem.bits.value, dtype=np.float64), low, high)
    return None


def _lagrangian(s: np.ndarray, constraints: Sequence[BudgetConstraint], bit_choices: Sequence[int]) -> np.ndarray:
    """The discrete Lagrangian allocation: each unit minimises ``s 4**-b + t x cost(b)`` on its own, with the
    smallest multiplier ``t`` (bisection) at which every budget holds.

    The budgets are combined with equal weight per share of their allocatable room. Its points lie on the lower
    convex hull of each unit's (cost, noise) curve, so it avoids the floor's failure on a few very large layers
    (whose floored step is too big for the room the greedy fill leaves).
    """
    choices = np.array(bit_choices, dtype=np.float64)
    active = _active(constraints)
    if not active:
        return np.full(s.shape[0], choices[-1])
    cost = sum(_cost_matrix(c, choices) / (c.budget - c.offset) for c in active)
    noise = s[:, None] * 4.0 ** -(choices[None, :] - choices[0])
    rows = np.arange(s.shape[0])

    def pick(t: float) -> np.ndarray:
        return np.argmin(noise + t * cost, axis=1)

    def fits(index: np.ndarray) -> bool:
        return all(c.cost(choices[index]) <= c.budget for c in constraints)

    low, high = -30.0, 30.0  # log10 of the multiplier, relative to the normalised objective
    scale = float(noise.max()) if noise.size and noise.max() > 0 else 1.0
    if not fits(pick(scale * 10.0**high)):
        return np.full(s.shape[0], choices[0])
    for _ in range(60):
        mid = 0.5 * (low + high)
        if fits(pick(scale * 10.0**mid)):
            high = mid
        else:
            low = mid
    return choices[pick(scale * 10.0**high)][rows]


def _big_steps(
    bits: np.ndarray,
    s: np.ndarray,
    constraints: Sequence[BudgetConstraint],
    bit_choices: Sequence[int],
    tries: int = 8,
) -> np.ndarray:
    """Local search for the rounding's blind spot: a unit whose next step is a large share of a budget.

    Greedy fill never takes such a step once smaller ones have used the room, although raising it and lowering
    several small units can be better (a knapsack effect, large with few layers of very different sizes). For
    the ``tries`` units with the largest next-step budget share: raise it one step, repair by lowering the others,
    fill, and keep the result if the objective improved. Every candidate meets every budget.
    """
    choices = np.array(sorted(bit_choices), dtype=np.float64)
    active = _active(constraints)
    if not active or choices.size < 2:
        return bits
    best, best_obj = bits.copy(), noise_objective(s, bits)
    index = np.searchsorted(choices, best.astype(np.float64))
    upper = np.minimum(index + 1, choices.size - 1)
    rows = np.arange(s.shape[0])
    share = sum(
        (_cost_matrix(c, choices)[rows, upper] - _cost_matrix(c, choices)[rows, index]) / (c.budget - c.offset)
        for c in active
    )
    share = np.where(index < choices.size - 1, share, -np.inf)
    for u in np.argsort(-share)[:tries]:
        if not np.isfinite(share[u]) or share[u] <= 0:
            break
        start = best.astype(np.float64)
        start[u] = choices[min(int(np.searchsorted(choices, start[u])) + 1, choices.size - 1)]
        locked = np.zeros(s.shape[0], dtype=bool)
        locked[u] = True
        candidate = round_to_budget(start, s, constraints, bit_choices, locked=locked)
        value = noise_objective(s, candidate)
        if value < best_obj:
            best, best_obj = candidate, value
    return best


def _report(
    bits: np.ndarray,
    s: np.ndarray,
    constraints: Sequence[BudgetConstraint],
    solver: str,
    start: float,
    relaxed: np.ndarray | None = None,
) -> Allocation:
    costs = {c.name: float(c.display(c.cost(bits))) for c in constraints}
    budgets = {c.name: float(c.display(c.budget)) for c in constraints}
    lower = noise_objective(s, relaxed) if relaxed is not None else None
    return Allocation(
        bits=bits,
        objective=noise_objective(s, bits),
        costs=costs,
        budgets=budgets,
        solver=solver,
        seconds=time.perf_counter() - start,
        relaxed_bits=relaxed,
        lower_bound=lower,
    )


def solve_relaxed(
    sensitivities: np.ndarray, constraints: Sequence[BudgetConstraint], bit_choices: Sequence[int]
) -> Allocation:
    """Convex relaxation (cvxpy, CLARABEL with SCS as fallback) + :func:`round_to_budget`.

    If both conic solvers fail the rounding starts from the all-minimum allocation (a warning is logged): the
    result still meets every budget.
    """
    start = time.perf_counter()
    bit_choices = validate_bit_choices(list(bit_choices))
    check_feasible(constraints, bit_choices)
    s = np.asarray(sensitivities, dtype=np.float64)
    relaxed = relax(s, constraints, bit_choices)
    if relaxed is None:
        log.warning("The relaxed bit allocation did not solve; allocating greedily from the minimum instead.")
        bits = round_to_budget(np.full(s.shape[0], float(min(bit_choices))), s, constraints, bit_choices)
    else:
        # two roundings, keep the better: the floor (which carries the gap bound) and the Lagrangian one; both end
        # with the greedy fill and meet every budget
        candidates = [
            round_to_budget(x, s, constraints, bit_choices) for x in (relaxed, _lagrangian(s, constraints, bit_choices))
        ]
        bits = _big_steps(min(candidates, key=lambda b: noise_objective(s, b)), s, constraints, bit_choices)
    return _report(bits, s, constraints, "relaxed", start, relaxed)


def solve_milp(
    sensitivities: np.ndarray,
    constraints: Sequence[BudgetConstraint],
    bit_choices: Sequence[int],
    *,
    time_limit: float | None = None,
) -> Allocation:
    """The exact optimum over ``bit_choices`` (one-hot choice per unit), with HiGHS through cvxpy.

    HiGHS's own output is kept out of the user's terminal. Integrality round-off is repaired exactly as in
    :func:`round_to_budget`, so the result always meets every budget.

    Args:
        time_limit: seconds HiGHS may take; on timeout its best integer solution is used.
    """
    start = time.perf_counter()
    bit_choices = validate_bit_choices(list(bit_choices))
    check_feasible(constraints, bit_choices)
    s = np.asarray(sensitivities, dtype=np.float64)
    n = s.shape[0]
    choices = np.array(bit_choices, dtype=np.float64)
    scale = float(s.max()) if s.size and s.max() > 0 else 1.0
    z = cp.Variable((n, len(choices)), boolean=True)
    objective = cp.Minimize(cp.sum(cp.multiply((s / scale)[:, None] * 4.0 ** -(choices - choices[0])[None, :], z)))
    cons = [cp.sum(z, axis=1) == 1]
    for c in _active(constraints):
        cons.append(cp.sum(cp.multiply(_cost_matrix(c, choices) / (c.budget - c.offset), z)) <= 1)
    problem = cp.Problem(objective, cons)
    options = {} if time_limit is None else {"time_limit": float(time_limit)}
    with quiet_native_output():
        try:
            problem.solve(solver=cp.HIGHS, **options)
        except cp.error.SolverError as err:
            log.warning("The MILP bit allocation failed (%s); allocating greedily from the minimum instead.", err)
    if z.value is None:
        start_point = np.full(n, choices[0])
    else:
        start_point = choices[np.argmax(np.asarray(z.value), axis=1)]
    bits = round_to_budget(start_point, s, constraints, bit_choices)
    return _report(bits, s, constraints, "milp", start)


def allocate(
    sensitivities: np.ndarray,
    constraints: Sequence[BudgetConstraint],
    bit_choices: Sequence[int],
    solver: SolverName = "relaxed",
) -> Allocation:
    """Solve with ``solver`` (``"relaxed"`` or ``"milp"``); the result always meets every budget."""
    if solver == "relaxed":
        return solve_relaxed(sensitivities, constraints, bit_choices)
    if solver == "milp":
        return solve_milp(sensitivities, constraints, bit_choices)
    raise QuantizationConfigError(f"`solver` must be one of {list(SOLVERS)}, got {solver!r}.")


__all__ = [
    "SOLVERS",
    "Allocation",
    "SolverName",
    "achievable_range",
    "allocate",
    "check_feasible",
    "noise_objective",
    "quiet_native_output",
    "relax",
    "round_to_budget",
    "solve_milp",
    "solve_relaxed",
    "validate_bit_choices",
]

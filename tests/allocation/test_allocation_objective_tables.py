"""Solvers on general objective tables: budgets always met, bounds hold, the MILP is exact (against brute force)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_quant import QuantizationConfigError
from lightning_quant.allocation import (
    BudgetConstraint,
    allocate,
    linear_objective_table,
    noise_objective,
    noise_objective_table,
    objective_value,
    relax,
    round_to_budget,
    solve_milp,
    solve_relaxed,
    validate_bit_choices,
)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
CHOICE_SETS = [
    (1, 2, 4, 8),
    (1, 8),
    (1, 2, 3, 4),
    (1,),
    (2, 3, 4, 5, 6, 7, 8),
    (2, 4, 8),
    (3, 4),
    (4,),
]
TABLE_KINDS = ("monotone", "random", "linear", "noise")


def _table(draw, kind: str, n: int, choices: tuple[int, ...]) -> np.ndarray:
    m = len(choices)
    floats = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
    if kind == "monotone":  # decreasing in the bits: a start minus non-negative decrements
        start = np.array(draw(st.lists(floats, min_size=n, max_size=n)))
        steps = np.array(draw(st.lists(st.floats(0, 1e3), min_size=n * m, max_size=n * m))).reshape(n, m)
        steps[:, 0] = 0.0
        return start[:, None] - np.cumsum(steps, axis=1)
    if kind == "random":  # any finite values, not monotone, ties included
        values = draw(st.lists(st.one_of(floats, st.sampled_from([0.0, 1.0])), min_size=n * m, max_size=n * m))
        return np.array(values).reshape(n, m)
    weights = np.array(draw(st.lists(st.floats(0, 1e3), min_size=n, max_size=n)))
    return linear_objective_table(weights, choices) if kind == "linear" else noise_objective_table(weights, choices)


def _coefficients(draw, n: int, integer: bool, wild: bool) -> np.ndarray:
    if integer:
        values = draw(st.lists(st.one_of(st.just(0), st.integers(0, 100_000)), min_size=n, max_size=n))
    else:  # non-integer costs (``wild``: down to subnormal ones, lost in the offset's rounding)
        floats = st.floats(0, 1e4) if wild else st.floats(1e-3, 1e4)
        values = draw(st.lists(st.one_of(st.just(0.0), floats), min_size=n, max_size=n))
    return np.array(values, dtype=np.float64)


@st.composite
def table_problems(draw, max_units: int = 40, choice_sets=tuple(CHOICE_SETS), infeasible: bool = True, wild=False):
    """A table, 1-3 budgets (power 1, or 1/2 per unit), a budget anywhere from below the cheapest allocation to
    the dearest one (``infeasible``) or from the cheapest one."""
    n = draw(st.integers(1, max_units))
    choices = draw(st.sampled_from(choice_sets))
    table = _table(draw, draw(st.sampled_from(TABLE_KINDS)), n, choices)
    integer = draw(st.booleans())
    constraints = []
    for k in range(draw(st.integers(1, 3))):
        coefficients = _coefficients(draw, n, integer, wild)
        power = np.array(draw(st.lists(st.sampled_from([1, 2]), min_size=n, max_size=n))) if k else 1
        offset = float(draw(st.integers(0, 1000)))
        probe = BudgetConstraint("probe", coefficients, 0.0, offset=offset, power=power)
        low = probe.cost(np.full(n, min(choices)))
        high = probe.cost(np.full(n, max(choices)))
        fraction = draw(st.floats(-0.1 if infeasible else 0.0, 1.05))
        budget = low + fraction * (high - low)
        if integer:
            budget = float(np.floor(budget))
        if not infeasible:
            budget = max(budget, low)
        constraints.append(BudgetConstraint(f"budget{k}", coefficients, budget, offset=offset, power=power))
    return table, constraints, choices


def _all_min_feasible(constraints, choices) -> bool:
    n = constraints[0].coefficients.shape[0]
    return all(c.feasible(np.full(n, min(choices), dtype=np.float64)) for c in constraints)


def _check(result, table, constraints, choices) -> None:
    assert set(result.bits.tolist()) <= set(choices)
    for c in constraints:
        assert c.cost(result.bits) <= c.budget  # exact, no tolerance
    assert result.objective == pytest.approx(objective_value(table, result.bits, choices), rel=1e-12, abs=1e-9)


def _ranges(table: np.ndarray, choices) -> np.ndarray:
    """Each unit's range over its choices, ``T[u, lowest width] - min_j T[u, j]`` (the additive bound's term)."""
    lowest = table[:, int(np.argmin(choices))]
    return lowest - table.min(axis=1)


def _tolerance(table: np.ndarray, choices) -> float:
    return 1e-6 * float(_ranges(table, choices).sum()) + 1e-9


@SETTINGS
@given(table_problems(wild=True))
def test_any_table_meets_every_budget_or_raises_the_clear_error(problem) -> None:
    table, constraints, choices = problem
    for solver in ("relaxed", "milp"):
        if _all_min_feasible(constraints, choices):
            _check(allocate(table, constraints, choices, solver=solver), table, constraints, choices)
        else:
            with pytest.raises(QuantizationConfigError, match=r"cannot be met: .*the smallest achievable"):
                allocate(table, constraints, choices, solver=solver)


@SETTINGS
@given(table_problems(infeasible=False))
def test_milp_below_rounding_and_the_lp_bound_below_the_milp(problem) -> None:
    table, constraints, choices = problem
    relaxed = solve_relaxed(table, constraints, choices)
    milp = solve_milp(table, constraints, choices)
    _check(relaxed, table, constraints, choices)
    _check(milp, table, constraints, choices)
    tol = _tolerance(table, choices)
    # HiGHS stops at a relative MIP gap of 1e-4 of the objective above the row minima
    gap = 1e-4 * abs(relaxed.objective - float(table.min(axis=1).sum()))
    assert milp.objective <= relaxed.objective + gap + tol
    assert relaxed.lower_bound is not None
    assert relaxed.lower_bound <= milp.objective + tol
    # the documented additive bound for any table: at most K units are fractional at an LP vertex
    active = sum(bool(np.any(c.coefficients > 0)) for c in constraints)
    worst = np.sort(_ranges(table, choices))[::-1][:active].sum()
    assert relaxed.objective <= relaxed.lower_bound + worst + tol


@st.composite
def tiny_problems(draw):
    choices = tuple(sorted(draw(st.sets(st.integers(1, 8), min_size=1, max_size=4))))
    return draw(table_problems(max_units=5, choice_sets=(choices,), infeasible=False))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_problems())
def test_milp_equals_brute_force_on_tiny_problems(problem) -> None:
    table, constraints, choices = problem
    n = table.shape[0]
    best = min(
        objective_value(table, np.array(bits), choices)
        for bits in itertools.product(choices, repeat=n)
        if all(c.feasible(np.array(bits, dtype=np.float64)) for c in constraints)
    )
    tol = _tolerance(table, choices) + 1e-4 * abs(best - float(table.min(axis=1).sum()))
    milp = solve_milp(table, constraints, choices)
    assert milp.objective == pytest.approx(best, abs=tol)
    relaxed = solve_relaxed(table, constraints, choices)
    assert relaxed.objective >= best - 1e-9 * (1 + abs(best))  # feasible, so never below the optimum
    assert relaxed.lower_bound <= best + _tolerance(table, choices)


def test_builders_match_their_formulas() -> None:
    s = np.array([0.0, 1.5, 300.0])
    choices = (1, 2, 4, 8)
    table = noise_objective_table(s, choices)
    assert table.shape == (3, 4)
    np.testing.assert_array_equal(table, s[:, None] * np.array([4.0**-1, 4.0**-2, 4.0**-4, 4.0**-8])[None, :])
    bits = np.array([8, 1, 4])
    assert objective_value(table, bits, choices) == pytest.approx(noise_objective(s, bits), rel=1e-15)
    w = np.array([2.0, 0.5, 1.0])
    linear = linear_objective_table(w, choices)
    assert objective_value(linear, bits, choices) == -float(np.dot(w, bits))
    with pytest.raises(QuantizationConfigError, match="`sensitivities` must be a 1-D array of finite numbers"):
        noise_objective_table(np.array([1.0, np.nan]), choices)
    with pytest.raises(QuantizationConfigError, match="`weights` must be a 1-D array"):
        linear_objective_table(np.ones((2, 2)), choices)


def test_linear_objective_never_worsens_as_the_budget_grows() -> None:
    """OMPQ-style: maximise importance x bits under a size budget. The exact optimum and the LP bound can only
    improve with more budget (a single unit's bits need not grow: that is not true of knapsacks)."""
    rng = np.random.default_rng(3)
    params = rng.integers(100, 50_000, 12).astype(np.float64)
    table = linear_objective_table(rng.lognormal(0, 1, 12), (2, 3, 4, 6, 8))
    previous_milp = previous_bound = np.inf
    for avg in np.linspace(2.0, 8.0, 13):
        c = BudgetConstraint("size_bits", params, float(np.floor(avg * params.sum())))
        milp = solve_milp(table, [c], (2, 3, 4, 6, 8))
        relaxed = solve_relaxed(table, [c], (2, 3, 4, 6, 8))
        tol = 1e-4 * abs(milp.objective - table.min(axis=1).sum()) + 1e-9
        assert milp.objective <= previous_milp + tol
        assert relaxed.lower_bound <= previous_bound + 1e-9
        assert relaxed.objective >= milp.objective - tol
        previous_milp, previous_bound = milp.objective, relaxed.lower_bound
    assert milp.bits.tolist() == [8] * 12  # the whole budget: every unit at its largest width


def test_non_monotone_table_never_picks_a_dominated_choice() -> None:
    """A width whose value is not below that of a lower width is never chosen; with room for everything every
    unit takes its row minimum (the lowest width among equal minima)."""
    choices = (1, 2, 4, 8)
    table = np.array(
        [
            [5.0, 1.0, 3.0, 0.5],  # 4 bits dominated by 2 bits
            [2.0, 2.0, 2.0, 2.0],  # all equal: 1 bit
            [-1.0, 4.0, -3.0, -3.0],  # minimum at 4 bits (8 ties it and costs more)
            [0.0, -1.0, -2.0, -4.0],  # monotone
        ]
    )
    params = np.array([10.0, 20.0, 30.0, 40.0])
    loose = BudgetConstraint("size_bits", params, 8 * params.sum())
    for solver in ("relaxed", "milp"):
        assert allocate(table, [loose], choices, solver=solver).bits.tolist() == [8, 1, 4, 8]
    for budget in range(100, 801, 20):
        c = BudgetConstraint("size_bits", params, float(budget))
        for solver in ("relaxed", "milp"):
            bits = allocate(table, [c], choices, solver=solver).bits
            assert bits[0] != 4 and bits[1] == 1 and bits[2] in (1, 4), (budget, solver, bits)
            assert c.cost(bits) <= budget


def test_channel_groups_with_a_binary_choice() -> None:
    """AutoQB-style units (groups of output channels of one layer, binary allowed): the least important groups
    go to 1 bit first, and the size budget holds exactly."""
    group_params = np.full(8, 3 * 3 * 16 * 4.0)  # 8 groups of 4 output channels of a 3x3 conv with 16 inputs
    importance = np.array([0.01, 0.02, 5.0, 0.03, 8.0, 0.04, 6.0, 7.0])
    choices = (1, 2, 4, 8)
    table = noise_objective_table(importance, choices)
    c = BudgetConstraint("size_bits", group_params, float(group_params.sum() * 2.5))
    for solver in ("relaxed", "milp"):
        result = allocate(table, [c], choices, solver=solver)
        assert c.cost(result.bits) <= c.budget
        assert set(result.bits[[0, 1, 3, 5]].tolist()) == {1}
        assert min(result.bits[[2, 4, 6, 7]]) >= 2


def test_column_order_follows_bit_choices() -> None:
    rng = np.random.default_rng(0)
    s = rng.lognormal(0, 2, 6)
    params = rng.integers(10, 1000, 6).astype(np.float64)
    c = BudgetConstraint("size_bits", params, float(np.floor(3.5 * params.sum())))
    shuffled = (8, 2, 4, 1)
    for solver in ("relaxed", "milp"):
        a = allocate(noise_objective_table(s, (1, 2, 4, 8)), [c], (1, 2, 4, 8), solver=solver)
        b = allocate(noise_objective_table(s, shuffled), [c], shuffled, solver=solver)
        assert a.bits.tolist() == b.bits.tolist() and a.objective == pytest.approx(b.objective)
    z = relax(noise_objective_table(s, shuffled), [c], shuffled)
    assert z is not None and z.shape == (6, 4)
    np.testing.assert_allclose(z.sum(axis=1), 1.0, atol=1e-9)
    relaxed = solve_relaxed(noise_objective_table(s, shuffled), [c], shuffled)
    assert float(np.sum(noise_objective_table(s, shuffled) * z)) == pytest.approx(relaxed.lower_bound, rel=1e-6)
    np.testing.assert_allclose(z @ np.array(shuffled, dtype=float), relaxed.relaxed_bits, atol=1e-6)
    bits = round_to_budget(np.full(6, 8.0), noise_objective_table(s, shuffled), [c], shuffled)
    assert c.cost(bits) <= c.budget


def test_binary_choices_are_validated() -> None:
    assert validate_bit_choices([8, 1, 2], allow_binary=True) == (1, 2, 8)
    with pytest.raises(QuantizationConfigError, match=r"integer bit widths in \[2, 8\], got 1"):
        validate_bit_choices([1, 2])
    with pytest.raises(QuantizationConfigError, match=r"integer bit widths in \[1, 8\], got 0"):
        validate_bit_choices([0, 2], allow_binary=True)


def test_bad_tables_and_choices_are_clear_errors() -> None:
    c = BudgetConstraint("size_bits", np.ones(3), 12.0)
    with pytest.raises(QuantizationConfigError, match=r"`objective` must have shape \[units, len\(bit_choices\)\] = "):
        allocate(np.ones(3), [c], (2, 4))
    with pytest.raises(QuantizationConfigError, match=r"= \[3, 2\].*got shape \(2, 2\)"):
        solve_milp(np.ones((2, 2)), [c], (2, 4))
    table = np.ones((3, 2))
    table[1, 1] = np.inf
    with pytest.raises(QuantizationConfigError, match="`objective` must hold finite values, got inf at unit 1, 4 bits"):
        solve_relaxed(table, [c], (2, 4))
    with pytest.raises(QuantizationConfigError, match=r"`bit_choices` must not repeat a width.*got \[2, 4, 2\]"):
        allocate(np.ones((3, 3)), [c], (2, 4, 2))
    other = BudgetConstraint("bops", np.ones(4), 100.0, argument="bops_budget")
    with pytest.raises(QuantizationConfigError, match="`bops_budget` has 4, the first budget 3"):
        allocate(np.ones((3, 2)), [c, other], (2, 4))

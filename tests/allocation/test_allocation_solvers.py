"""Solvers: every allocation meets its budgets exactly; relaxed+rounded stays within the proven gap of the MILP."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_quant import QuantizationConfigError
from lightning_quant.allocation import (
    BudgetConstraint,
    achievable_range,
    allocate,
    check_feasible,
    noise_objective,
    noise_objective_table,
    quiet_native_output,
    round_to_budget,
    solve_milp,
    solve_relaxed,
)

CHOICE_SETS = [(2, 3, 4, 5, 6, 7, 8), (2, 3, 4, 8), (2, 4, 8), (3, 4), (4,)]
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _gap(choices) -> float:
    """The proven bound on rounded / optimal objective: 4 ** (largest step between allowed widths)."""
    steps = np.diff(choices)
    return 4.0 ** (steps.max() if steps.size else 0)


@st.composite
def problems(draw, kinds=("avg", "size", "bops", "bops_tied", "avg+bops")):
    n = draw(st.integers(1, 10))
    choices = draw(st.sampled_from(CHOICE_SETS))
    params = np.array(draw(st.lists(st.integers(1, 50_000), min_size=n, max_size=n)), dtype=np.float64)
    macs = np.array(draw(st.lists(st.integers(0, 10**7), min_size=n, max_size=n)), dtype=np.float64)
    sens = np.array(draw(st.lists(st.floats(0, 1e3), min_size=n, max_size=n)), dtype=np.float64)
    frozen_params = float(draw(st.integers(0, 5_000)))
    kind = draw(st.sampled_from(kinds))
    fraction = draw(st.floats(0.0, 1.0))
    constraints = []
    if kind in ("avg", "avg+bops"):
        total = params.sum() + frozen_params
        c = BudgetConstraint("avg_weight_bits", params, 0.0, offset=8 * frozen_params, display_scale=1 / total)
        constraints.append(c)
    if kind == "size":
        constraints.append(BudgetConstraint("size_bits", params, 0.0, offset=8 * frozen_params))
    if kind in ("bops", "avg+bops"):
        act = np.array(draw(st.lists(st.sampled_from([4, 8, 32]), min_size=n, max_size=n)), dtype=np.float64)
        constraints.append(BudgetConstraint("bops", macs * act + 1, 0.0, offset=1e6))
    if kind == "bops_tied":
        power = np.array(draw(st.lists(st.sampled_from([1, 2]), min_size=n, max_size=n)))
        constraints.append(BudgetConstraint("bops", macs + 1, 0.0, offset=1e6, power=power))
    # a budget between the cheapest and the dearest allocation (exactly at the ends included)
    budgeted = []
    for c in constraints:
        low = c.cost(np.full(n, min(choices)))
        high = c.cost(np.full(n, max(choices)))
        budget = np.floor(low + fraction * (high - low))
        budgeted.append(BudgetConstraint(c.name, c.coefficients, max(budget, low), c.offset, c.power, c.display_scale))
    return sens, budgeted, choices


def _check(allocation, constraints, choices) -> None:
    assert set(allocation.bits.tolist()) <= set(choices)
    for c in constraints:
        assert c.cost(allocation.bits) <= c.budget  # exact: costs are integer-valued floats
    assert allocation.budget_used <= 1.0


@SETTINGS
@given(problems())
def test_relaxed_meets_every_budget_exactly(problem) -> None:
    sens, constraints, choices = problem
    _check(solve_relaxed(noise_objective_table(sens, choices), constraints, choices), constraints, choices)


@SETTINGS
@given(problems())
def test_milp_meets_every_budget_and_bounds_the_relaxed_rounding(problem) -> None:
    sens, constraints, choices = problem
    table = noise_objective_table(sens, choices)
    relaxed = solve_relaxed(table, constraints, choices)
    milp = solve_milp(table, constraints, choices)
    _check(milp, constraints, choices)
    tol = 1e-9 * max(1.0, float(sens.sum()))
    # HiGHS stops at a relative MIP gap of 1e-4
    assert milp.objective <= relaxed.objective * (1 + 1e-3) + tol
    assert relaxed.objective <= _gap(choices) * milp.objective * (1 + 1e-6) + tol
    if relaxed.lower_bound is not None:
        assert relaxed.lower_bound <= milp.objective * (1 + 1e-3) + tol


def test_milp_is_the_exact_optimum_on_small_problems() -> None:
    rng = np.random.default_rng(0)
    choices = (2, 3, 4, 8)
    for _ in range(10):
        n = 4
        params = rng.integers(10, 1000, n).astype(np.float64)
        sens = rng.lognormal(0, 2, n)
        budget = float(np.floor(params.sum() * rng.uniform(2.2, 6)))
        c = BudgetConstraint("size_bits", params, budget)
        best = min(
            noise_objective(sens, np.array(b))
            for b in itertools.product(choices, repeat=n)
            if c.cost(np.array(b, dtype=np.float64)) <= budget
        )
        assert solve_milp(noise_objective_table(sens, choices), [c], choices).objective == pytest.approx(best, rel=1e-4)


def test_relaxed_gap_to_milp_is_small_in_practice() -> None:
    """The documented typical gap: on random 12-layer problems the rounding is within 5% of the MILP on average."""
    rng = np.random.default_rng(1)
    gaps = []
    for _ in range(20):
        n = 12
        params = rng.integers(100, 100_000, n).astype(np.float64)
        sens = rng.lognormal(0, 2, n)
        c = BudgetConstraint("avg_weight_bits", params, float(np.floor(params.sum() * rng.uniform(2.5, 6))))
        table = noise_objective_table(sens, range(2, 9))
        gaps.append(solve_relaxed(table, [c], range(2, 9)).objective / solve_milp(table, [c], range(2, 9)).objective)
    assert np.mean(gaps) - 1 < 0.05
    assert max(gaps) <= 4.0


def test_more_sensitive_units_get_more_bits() -> None:
    params = np.full(3, 1000.0)
    c = BudgetConstraint("avg_weight_bits", params, 4 * 3000.0, display_scale=1 / 3000)
    for solver in ("relaxed", "milp"):
        bits = allocate(noise_objective_table([1.0, 30.0, 1000.0], range(2, 9)), [c], range(2, 9), solver=solver).bits
        assert bits[0] < bits[1] < bits[2]
        assert bits.sum() == 12


def test_infeasible_budget_names_the_achievable_range() -> None:
    params = np.array([100.0, 300.0])
    c = BudgetConstraint("avg_weight_bits", params, 1.5 * 400, display_scale=1 / 400, argument="avg_weight_bits")
    assert achievable_range(c, (2, 8)) == (2.0, 8.0)
    match = r"`avg_weight_bits` = 1.5 cannot be met.*smallest achievable avg_weight_bits is 2 and the largest 8"
    for solver in ("relaxed", "milp"):
        with pytest.raises(QuantizationConfigError, match=match):
            allocate(noise_objective_table(np.ones(2), (2, 3, 4, 8)), [c], (2, 3, 4, 8), solver=solver)


def test_no_free_unit_and_no_budget_are_errors() -> None:
    with pytest.raises(QuantizationConfigError, match="every quantized layer is frozen"):
        check_feasible([BudgetConstraint("size_bits", np.zeros(0), 10.0)], (2, 8))
    with pytest.raises(QuantizationConfigError, match="No budget given"):
        check_feasible([], (2, 8))
    with pytest.raises(QuantizationConfigError, match=r"`solver` must be one of \['relaxed', 'milp'\]"):
        allocate(np.ones((1, 2)), [BudgetConstraint("size_bits", np.ones(1), 10.0)], (2, 8), solver="greedy")


def test_rounding_repairs_an_infeasible_start() -> None:
    params = np.array([10.0, 20.0, 30.0])
    c = BudgetConstraint("size_bits", params, 180.0)
    bits = round_to_budget(np.full(3, 8.0), noise_objective_table([1.0, 2.0, 3.0], range(2, 9)), [c], range(2, 9))
    assert c.cost(bits) <= 180.0
    # from the bottom, the greedy fill uses the budget: 3 bits each costs exactly 180
    ones = noise_objective_table(np.ones(3), range(2, 9))
    assert round_to_budget(np.full(3, 2.0), ones, [c], range(2, 9)).tolist() == [3, 3, 3]
    loose = BudgetConstraint("size_bits", params, 8 * 60.0)
    assert round_to_budget(np.full(3, 2.0), ones, [loose], range(2, 9)).tolist() == [8, 8, 8]


def test_rounding_without_fill_only_lowers_and_keeps_feasible_starts() -> None:
    params = np.array([10.0, 20.0, 30.0])
    c = BudgetConstraint("size_bits", params, 180.0)
    ones = noise_objective_table(np.ones(3), range(2, 9))
    # a feasible start comes back as it is (the fill would raise it to [3, 3, 3])
    assert round_to_budget(np.full(3, 2.0), ones, [c], range(2, 9), fill=False).tolist() == [2, 2, 2]
    start = np.array([8.0, 2.0, 5.0])
    bits = round_to_budget(start, ones, [c], range(2, 9), fill=False)
    assert c.cost(bits) <= 180.0 and np.all(bits <= start)
    # no fill after the repair: one step up from the result on any unit would not fit, or the fill's result is higher
    filled = round_to_budget(start, ones, [c], range(2, 9))
    assert c.cost(filled) <= 180.0 and filled.sum() >= bits.sum()


def test_budget_at_the_exact_uniform_cost_is_met() -> None:
    """An average of exactly 3 bits must give exactly 3 bits everywhere with equal sensitivity per parameter."""
    params = np.array([432.0, 2400.0, 48000.0, 10080.0, 850.0])
    c = BudgetConstraint("avg_weight_bits", params, 3.0 * params.sum(), display_scale=1 / params.sum())
    for solver in ("relaxed", "milp"):
        result = allocate(noise_objective_table(params, range(2, 9)), [c], range(2, 9), solver=solver)
        assert result.bits.tolist() == [3] * 5
        assert result.costs["avg_weight_bits"] == 3.0


def test_highs_prints_nothing(capfd) -> None:
    with quiet_native_output():
        os.write(1, b"native banner\n")
        print("python banner")
    c = BudgetConstraint("size_bits", np.ones(3), 12.0)
    solve_milp(noise_objective_table(np.ones(3), (2, 3, 4, 8)), [c], (2, 3, 4, 8))
    out, err = capfd.readouterr()
    assert out == "" and err == ""

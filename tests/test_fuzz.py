"""Property tests (hypothesis): recipes and solvers give a valid result or a clear error, never a crash or a silent
violation. Example counts are small: this runs in the suite."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_quant import QuantizationConfigError, QuantSpec
from lightning_quant.allocation import BudgetConstraint
from lightning_quant.allocation.solvers import allocate, noise_objective_table

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 12), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "per_channel", "per_tensor", "lsq", "observer", "minmax", "mse", "codebook", "conv*", "0"]),
)  # fmt: skip
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.lists(st.integers(1, 8), min_size=1, max_size=4))
LAYER_KEYS = ["weight_bits", "act_bits", "output_bits", "weight_granularity", "scale_mode", "weight_observer",
              "act_observer", "weight_symmetric", "frozen", "weight_kind", "codebook_size", "bogus"]  # fmt: skip
layer_specs = st.dictionaries(st.sampled_from(LAYER_KEYS), values, max_size=4)
quant_specs = st.fixed_dictionaries(
    {},
    optional={
        "default": st.one_of(layer_specs, values),
        "include": values,
        "exclude": values,
        "exclude_types": st.one_of(values, st.lists(st.sampled_from(["Conv2d", "Linear", "LSTM", "Foo"]), max_size=2)),
        "first_last_bits": values,
        "layers": st.one_of(st.dictionaries(st.sampled_from(["0", "fc", "x.y"]), layer_specs, max_size=2), values),
        "quantize_residuals": values,
        "fold_batchnorm": values,
        "unknown": values,
    },
)


def _parse(data):
    try:
        return QuantSpec.from_dict(data)
    except QuantizationConfigError:
        return None


@FAST
@given(quant_specs)
def test_quant_spec_from_dict_is_valid_or_a_clear_error(data) -> None:
    spec = _parse(data)
    if spec is not None:
        assert QuantSpec.from_dict(spec.to_dict()) == spec  # what parses, round-trips
        assert QuantSpec.from_yaml(spec.to_yaml()) == spec


@FAST
@given(quant_specs)
def test_quant_spec_from_yaml_is_valid_or_a_clear_error(data) -> None:
    try:
        text = yaml.safe_dump(data)
    except yaml.YAMLError:
        return
    try:
        spec = QuantSpec.from_yaml(text)
    except QuantizationConfigError:
        return
    assert QuantSpec.from_dict(spec.to_dict()) == spec


finite = st.floats(0.0, 1e6, allow_nan=False)


@st.composite
def problems(draw):
    units = draw(st.integers(1, 5))
    choices = tuple(sorted(draw(st.sets(st.integers(1, 8), min_size=1, max_size=4))))
    sensitivities = np.array(draw(st.lists(st.floats(0.0, 1e3), min_size=units, max_size=units)))
    sizes = np.array(draw(st.lists(st.floats(0.0, 1e4), min_size=units, max_size=units)))
    budget = draw(st.one_of(finite, st.floats(-10.0, 0.0), st.just(float("nan")), st.just(float("inf"))))
    offset = draw(st.floats(0.0, 1e3))
    power = draw(st.sampled_from([1, 2]))
    solver = draw(st.sampled_from(["relaxed", "milp"]))
    return sensitivities, sizes, choices, budget, offset, power, solver


@FAST
@given(problems())
def test_allocate_meets_the_budget_or_raises_clearly(problem) -> None:
    sensitivities, sizes, choices, budget, offset, power, solver = problem
    try:
        table = noise_objective_table(sensitivities, choices)
        constraint = BudgetConstraint("size_bits", sizes, budget, offset=offset, power=power, argument="size_budget")
        result = allocate(table, [constraint], choices, solver=solver)
    except QuantizationConfigError:
        return
    bits = np.asarray(result.bits)
    assert bits.shape == sizes.shape and set(bits.tolist()) <= set(choices)
    cost = offset + float(np.sum(sizes * bits.astype(float) ** power))
    assert cost <= budget * (1 + 1e-9) + 1e-6, f"budget {budget} violated: cost {cost}"


@pytest.mark.parametrize("solver", ["relaxed", "milp"])
def test_nan_sensitivities_are_refused(solver: str) -> None:
    with pytest.raises(QuantizationConfigError):
        table = noise_objective_table(np.array([1.0, float("nan")]), (2, 4))
        allocate(table, [BudgetConstraint("size_bits", np.ones(2), 10.0)], (2, 4), solver=solver)

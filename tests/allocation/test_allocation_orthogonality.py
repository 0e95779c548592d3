"""OMPQ's allocation math: CKA against a direct d x d computation, its invariances, importance, the budget-monotone
solver (against brute force and the MILP), and `orthogonal_allocation` on torchvision models and odd layers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_quant import LayerSpec, QuantizationConfigError, QuantSpec, orthogonal_allocation, quantize_model
from lightning_quant.allocation import (
    MIB_BITS,
    BudgetConstraint,
    centered_gram,
    cka_matrix,
    layer_costs,
    linear_cka,
    linear_objective_table,
    objective_value,
    orthogonality_importance,
    orthogonality_objective_table,
    orthogonality_weights,
    solve_milp,
    solve_monotone,
    solve_relaxed,
)
from lightning_quant.surgery import quantized_layers
from tests.allocation.test_allocation_objective_tables import table_problems

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)  # 42.7 MiB at 32 bits, 10.7 MiB at 8


# -- CKA --------------------------------------------------------------------------------------------------------
def _direct_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA in feature space, with d x d matrices: ||Yc^T Xc||^2 / (||Xc^T Xc|| ||Yc^T Yc||)."""
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    return float(
        np.linalg.norm(yc.T @ xc, "fro") ** 2 / (np.linalg.norm(xc.T @ xc, "fro") * np.linalg.norm(yc.T @ yc, "fro"))
    )


def _features(seed: int, n: int = 12, dims=(5, 9, 30, 3)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 4, generator=g, dtype=torch.float64)
    out = []
    for d in dims:  # correlated through a shared part, so CKAs spread over (0, 1)
        mix = torch.randn(4, d, generator=g, dtype=torch.float64)
        out.append(base @ mix + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64) + 3.0)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cka_from_gram_matrices_equals_the_direct_d_by_d_computation(seed) -> None:
    feats = _features(seed)
    orm = cka_matrix([centered_gram(f) for f in feats])
    for i, j in itertools.product(range(len(feats)), repeat=2):
        assert orm[i, j] == pytest.approx(_direct_cka(feats[i].numpy(), feats[j].numpy()), rel=1e-10, abs=1e-12)
    # features with more dimensions than samples, and extra (spatial) dimensions flattened per sample
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y = x.flatten(1)[:, :40] ** 2
    assert linear_cka(x, y) == pytest.approx(_direct_cka(x.flatten(1).numpy(), y.numpy()), rel=1e-10)


def test_orm_is_symmetric_with_unit_diagonal_in_the_unit_interval() -> None:
    feats = _features(3, n=20, dims=(2, 7, 50, 11, 1))
    orm = cka_matrix([centered_gram(f) for f in feats])
    np.testing.assert_array_equal(orm, orm.T)
    np.testing.assert_array_equal(np.diag(orm), np.ones(len(feats)))
    assert np.all((orm >= 0) & (orm <= 1))
    off = orm[~np.eye(len(feats), dtype=bool)]
    assert off.min() < 0.9 and off.max() > 0.1  # not a degenerate example


def test_cka_is_invariant_to_orthogonal_transforms_isotropic_scaling_and_shifts() -> None:
    g = torch.Generator().manual_seed(5)
    x, y = _features(5, n=16, dims=(8, 6))
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    reference = linear_cka(x, y)
    assert 0.05 < reference < 0.95
    assert linear_cka(x @ q, y) == pytest.approx(reference, rel=1e-12)
    assert linear_cka(7.5 * x, 0.01 * y) == pytest.approx(reference, rel=1e-12)
    assert linear_cka(x + torch.randn(1, 8, generator=g, dtype=torch.float64), y) == pytest.approx(reference, rel=1e-10)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), rel=1e-15)
    # not invariant to a per-feature scaling (a sanity check that the test can fail)
    assert linear_cka(x * torch.linspace(0.1, 10, 8, dtype=torch.float64), y) != pytest.approx(reference, rel=1e-3)


def test_float32_features_agree_with_float64() -> None:
    feats = _features(7, n=32, dims=(200, 50))
    exact = cka_matrix([centered_gram(f) for f in feats])
    single = cka_matrix([centered_gram(f.float()) for f in feats])
    np.testing.assert_allclose(single, exact, atol=1e-5)


def test_constant_features_have_zero_cka_with_other_layers() -> None:
    x = torch.randn(10, 4, dtype=torch.float64)
    constant = torch.full((10, 4), 3.3)  # float32, whose mean is not exact: round-off only
    assert torch.count_nonzero(centered_gram(constant)) == 0
    orm = cka_matrix([centered_gram(x), centered_gram(constant)])
    np.testing.assert_array_equal(orm, [[1.0, 0.0], [0.0, 1.0]])


# -- importance and objective -----------------------------------------------------------------------------------
def test_importance_weights_and_table_follow_the_paper() -> None:
    orm = np.array([[1.0, 0.8, 0.2], [0.8, 1.0, 0.4], [0.2, 0.4, 1.0]])
    beta = 3.0
    gamma, theta = orthogonality_importance(orm, beta)
    np.testing.assert_allclose(gamma, [1.0, 1.2, 0.6])
    paper = np.exp(-beta * gamma)  # exp(-beta gamma_i), up to one positive factor
    np.testing.assert_allclose(theta, paper / paper.max(), rtol=1e-14)
    w = orthogonality_weights(theta)
    expected = [np.mean(theta[i:]) for i in range(3)]  # (1 / (L - i)) sum_{j >= i} theta_j
    np.testing.assert_allclose(w, expected, rtol=1e-14)
    table = orthogonality_objective_table(orm, beta, (4, 6, 8))
    np.testing.assert_allclose(table, linear_objective_table(np.array(expected), (4, 6, 8)))
    # beta = 0: every layer equally important; a huge beta does not underflow to all zeros
    np.testing.assert_array_equal(orthogonality_importance(orm, 0.0)[1], np.ones(3))
    assert orthogonality_importance(orm, 1e4)[1].max() == 1.0


# -- the budget-monotone solver ---------------------------------------------------------------------------------
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(table_problems(infeasible=False), st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4))
def test_monotone_solver_meets_every_budget_and_never_lowers_a_unit_as_budgets_grow(problem, raises) -> None:
    table, constraints, choices = problem
    previous = solve_monotone(table, constraints, choices)
    for c in constraints:
        assert c.cost(previous.bits) <= c.budget
    assert previous.objective == pytest.approx(objective_value(table, previous.bits, choices), rel=1e-12, abs=1e-9)
    n = table.shape[0]
    for fraction in sorted(raises):  # raise every budget towards the all-maximum cost
        grown = [
            BudgetConstraint(
                c.name,
                c.coefficients,
                max(c.budget, c.budget + fraction * (c.cost(np.full(n, max(choices))) - c.budget)),
                offset=c.offset,
                power=c.power,
            )
            for c in constraints
        ]
        result = solve_monotone(table, grown, choices)
        for c in grown:
            assert c.cost(result.bits) <= c.budget
        assert np.all(result.bits >= previous.bits)
        assert result.objective <= previous.objective + 1e-9 * (1 + abs(previous.objective))
        previous = result


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 5), st.sampled_from([(2, 3, 4), (4, 5, 6, 7, 8), (1, 2, 4, 8)]), st.data())
def test_monotone_solver_is_optimal_at_its_own_cost_and_within_one_step_of_the_lp(n, choices, data) -> None:
    """One budget: no allocation that costs at most as much is better, and the LP bound is below the optimum."""
    weights = np.array(data.draw(st.lists(st.floats(0.0, 10.0), min_size=n, max_size=n)))
    table = linear_objective_table(weights, choices)
    params = np.array(data.draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n)), dtype=np.float64)
    low, high = min(choices) * params.sum(), max(choices) * params.sum()
    budget = float(np.floor(low + data.draw(st.floats(0.0, 1.0)) * (high - low)))
    constraint = BudgetConstraint("size_bits", params, budget)
    result = solve_monotone(table, [constraint], choices)
    own = constraint.cost(result.bits)
    feasible = [np.array(b) for b in itertools.product(choices, repeat=n)]
    best_at_own = min(objective_value(table, b, choices) for b in feasible if constraint.cost(b) <= own)
    best = min(objective_value(table, b, choices) for b in feasible if constraint.cost(b) <= budget)
    tol = 1e-9 * (1 + abs(best))
    assert result.objective <= best_at_own + tol
    assert result.lower_bound is not None and result.lower_bound <= best + tol
    step = float(np.max(weights)) * max(np.diff(choices), default=0)  # the largest objective change of one step
    assert result.objective <= result.lower_bound + step + tol


def test_the_exact_optimum_is_not_monotone_in_the_budget_but_the_chain_is() -> None:
    """Why OMPQ's default solver is the chain: a knapsack optimum drops a layer's bits to fit two others."""
    params = np.array([3.0, 2.0, 2.0])
    table = linear_objective_table(np.array([3.3, 2.0, 2.0]), (2, 3))  # one extra bit: 3.3 for 3, 2 + 2 for 4
    base = 2 * params.sum()
    small = BudgetConstraint("size_bits", params, base + 3)
    large = BudgetConstraint("size_bits", params, base + 4)
    assert solve_milp(table, [small], (2, 3)).bits.tolist() == [3, 2, 2]
    assert solve_milp(table, [large], (2, 3)).bits.tolist() == [2, 3, 3]  # the first layer loses a bit
    assert solve_relaxed(table, [large], (2, 3)).bits.tolist() == [2, 3, 3]
    assert solve_monotone(table, [small], (2, 3)).bits.tolist() == [3, 2, 2]
    assert solve_monotone(table, [large], (2, 3)).bits.tolist() == [3, 2, 2]  # keeps it; 1 bit unused


# -- orthogonal_allocation on real architectures ----------------------------------------------------------------
def _images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, before: dict[str, torch.Tensor], training: bool) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=0, rtol=0, msg=key)
    assert all(m.training == training for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_architectures_budget_met_monotone_and_deterministic(arch) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    images = _images()
    before = _state(model)
    probe = quantize_model(getattr(torchvision.models, arch)(num_classes=10), QuantSpec())
    costs = layer_costs(probe)
    free = costs.params[costs.free]
    frozen_bits = float(costs.weight_payload[costs.frozen].sum())
    low, high = (frozen_bits + 4 * free.sum()) / MIB_BITS, (frozen_bits + 8 * free.sum()) / MIB_BITS
    previous = None
    # both ends exactly (sizes in bits are integers, and MIB_BITS a power of two)
    for budget in (low, *(low + f * (high - low) for f in (0.2, 0.5, 0.8)), high):
        spec = orthogonal_allocation(model, images, size_budget_mb=budget, beta=10.0, num_samples=8)
        bits = {name: layer.weight_bits for name, layer in spec.layers.items()}
        size = sum(spec.layers[n].weight_bits * p for n, p in zip(costs.names, costs.params, strict=True))
        assert size <= budget * MIB_BITS
        assert set(bits.values()) <= {4, 5, 6, 7, 8}
        first, last = costs.names[0], costs.names[-1]
        assert bits[first] == 8 and bits[last] == 8 and spec.layers[first].frozen and spec.layers[last].frozen
        if previous is not None:
            assert all(bits[n] >= previous[n] for n in bits), "a larger budget lowered a layer's bits"
        previous = bits
    assert set(previous.values()) == {8}  # the largest budget: everything at 8 bits
    again = orthogonal_allocation(model, images, size_budget_mb=low + 0.5 * (high - low), beta=10.0, num_samples=8)
    middle = low + 0.5 * (high - low)
    assert again == orthogonal_allocation(model, images, size_budget_mb=middle, beta=10, num_samples=8)
    _assert_untouched(model, before, training=True)
    # the recipe quantizes the model as allocated
    quantized = quantize_model(model, again)
    assert {n: m.weight_quantizer.bits for n, m in quantized_layers(quantized).items()} == {
        n: layer.weight_bits for n, layer in again.layers.items()
    }


def test_avg_bits_budget_ptq_range_and_a_quantized_model() -> None:
    torch.manual_seed(0)
    model = quantize_model(torchvision.models.resnet18(num_classes=10), QuantSpec())
    model.eval()
    before = _state(model)
    spec = orthogonal_allocation(model, (_images(), torch.zeros(8)), avg_weight_bits=3.0, mode="ptq", num_samples=8)
    costs = layer_costs(model)
    bits = np.array([spec.layers[n].weight_bits for n in costs.names], dtype=np.float64)
    assert float(np.dot(bits, costs.params) / costs.params.sum()) <= 3.0
    assert set(bits[costs.free].tolist()) <= {2, 3, 4}
    _assert_untouched(model, before, training=False)
    with pytest.raises(QuantizationConfigError, match=r"`model` is already quantized, so `spec` has nothing to do"):
        orthogonal_allocation(model, _images(), avg_weight_bits=3.0, mode="ptq", spec=QuantSpec())


class Shared(nn.Module):
    """`block` runs twice per forward; `unused` never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.unused = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.block(x))
        x = torch.relu(self.mid(x))
        x = torch.relu(self.block(x))
        return self.head(x.mean(dim=(2, 3)))


def test_a_layer_called_twice_contributes_both_calls_and_one_never_called_is_a_clear_error() -> None:
    torch.manual_seed(0)
    model = Shared()
    before = _state(model)
    with pytest.raises(QuantizationConfigError, match=r"'unused', but the forward pass of the batch never called it"):
        orthogonal_allocation(model, _images(), avg_weight_bits=6.0, num_samples=8)
    _assert_untouched(model, before, training=True)
    # frozen (or excluded), it is no longer allocated and needs no features
    spec = QuantSpec(layers={"unused": LayerSpec(frozen=True)})
    result = orthogonal_allocation(model, _images(), avg_weight_bits=6.0, num_samples=8, spec=spec)
    assert result.layers["unused"].weight_bits == 8
    # `block`'s feature is both calls, concatenated per sample: its Gram matrix is the sum of the calls'
    from lightning_quant.allocation import layer_grams

    calls = []
    handle = model.block.register_forward_hook(lambda m, i, o: calls.append(o.detach()))
    recorder = layer_grams(model, _images(), {"block": model.block, "mid": model.mid})
    handle.remove()
    assert recorder.calls == {"block": 2, "mid": 1} and recorder.order == ["block", "mid"]
    concatenated = torch.cat([c.flatten(1) for c in calls], dim=1)
    torch.testing.assert_close(recorder.grams["block"], centered_gram(concatenated), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size_budget_mb": 1e-4}, r"`size_budget_mb` = 0.0001 MiB is below the smallest achievable weight size"),
        ({"size_budget_mb": 50.0}, r"`size_budget_mb` = 50 MiB is above the largest achievable weight size"),
        ({"avg_weight_bits": 4.001}, r"`avg_weight_bits` = 4.001 bits is below the smallest achievable average"),
        ({"avg_weight_bits": 9.0}, r"`avg_weight_bits` must be within \[min_bits, max_bits\] = \[4, 8\], got 9.0"),
        ({"size_budget_mb": 1.0, "beta": -1.0}, r"`beta` must be a finite number >= 0, got -1.0"),
        ({"size_budget_mb": 1.0, "beta": float("inf")}, r"`beta` must be a finite number >= 0, got inf"),
        ({"size_budget_mb": 1.0, "num_samples": 1}, r"`num_samples` must be an integer >= 2"),
        ({}, r"Pass exactly one budget"),
        ({"size_budget_mb": 1.0, "avg_weight_bits": 5.0}, r"Pass exactly one budget"),
        ({"size_budget_mb": -2.0}, r"`size_budget_mb` must be a finite number > 0 or None, got -2\.0\. HINT: a budget"),
        ({"size_budget_mb": 1.0, "mode": "int8"}, r"`mode` must be one of \['qat', 'ptq'\], got 'int8'"),
        ({"size_budget_mb": 1.0, "solver": "slsqp"}, r"`solver` must be one of \['relaxed', 'milp', 'monotone'\]"),
        ({"size_budget_mb": 1.0, "bit_choices": [1, 2]}, r"`bit_choices` must hold integer bit widths in \[2, 8\]"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_model_is_untouched(kwargs, match, resnet18) -> None:
    model = resnet18
    before = _state(model)
    with pytest.raises(QuantizationConfigError, match=match):
        orthogonal_allocation(model, _images(4), **kwargs)
    _assert_untouched(model, before, training=True)


def test_a_batch_of_one_sample_is_a_clear_error(resnet18) -> None:
    model = resnet18
    before = _state(model)
    with pytest.raises(QuantizationConfigError, match=r"needs a batch of at least 2 samples .* got 1"):
        orthogonal_allocation(model, _images(1), size_budget_mb=8.0)
    with pytest.raises(QuantizationConfigError, match=r"cannot find the model inputs in a batch of type str"):
        orthogonal_allocation(model, "images", size_budget_mb=8.0)
    _assert_untouched(model, before, training=True)

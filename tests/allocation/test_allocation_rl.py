"""Reinforcement-learning allocation: DDPG on a toy problem, channel units and their costs, the budget-safe
projection, the search on a synthetic sensitivity problem, resume, bad input."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from lightning_quant import QuantizationConfigError, QuantSpec
from lightning_quant.allocation import layer_costs, trace_macs
from lightning_quant.allocation.cost import LayerCosts
from lightning_quant.allocation.rl import (
    DDPG,
    DDPGConfig,
    HierarchicalAgent,
    LayerAgent,
    PolicySearch,
    action_to_bits,
    random_allocations,
    truncated_normal,
)
from lightning_quant.allocation.solvers import allocate, noise_objective_table
from lightning_quant.allocation.units import (
    AllocationProblem,
    UnitLayout,
    apply_unit_widths,
    channel_layout,
    layer_layout,
)
from lightning_quant.surgery import quantize_model, quantized_layers

FAST = DDPGConfig(hidden=64, actor_lr=1e-3, critic_lr=1e-3, warmup_episodes=10, noise_decay=0.95, updates_per_step=0.5)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is as fast and does not crawl on a shared CPU
    yield
    torch.set_num_threads(threads)


# -- exploration and actions ------------------------------------------------------------------------------------
def test_truncated_normal_matches_scipy() -> None:
    g = torch.Generator().manual_seed(0)
    for mean, std in ((0.9, 0.5), (0.1, 0.2), (0.5, 0.05)):
        x = truncated_normal(torch.full((20000,), mean), std, g).numpy()
        assert x.min() >= 0.0 and x.max() <= 1.0
        a, b = (0.0 - mean) / std, (1.0 - mean) / std
        reference = stats.truncnorm(a, b, loc=mean, scale=std)
        assert abs(x.mean() - reference.mean()) < 4 * reference.std() / np.sqrt(x.size)
        assert stats.kstest(x, reference.cdf).pvalue > 1e-3
    same = truncated_normal(torch.tensor([0.3, 0.7]), 0.0, g)
    assert same.tolist() == pytest.approx([0.3, 0.7])


def test_actions_map_to_equal_bins() -> None:
    choices = (1, 2, 3, 4, 5, 6, 7, 8)
    a = np.array([0.0, 0.124, 0.125, 0.5, 0.999, 1.0])
    assert action_to_bits(a, choices).tolist() == [1, 1, 2, 5, 8, 8]
    # non-consecutive widths: one bin each
    assert action_to_bits(np.array([0.2, 0.4, 0.9]), (2, 4, 8)).tolist() == [2, 4, 8]


# -- DDPG on a toy problem with a known optimum -----------------------------------------------------------------
def test_ddpg_learns_a_toy_problem_with_known_optimum() -> None:
    """One-step episodes: reward -(a - a*(s))**2 with a*(s) = 0.2 + 0.6 s_0; the critic's loss falls and the
    actor's action approaches a*(s) on states it never saw."""
    g = torch.Generator().manual_seed(0)
    agent = DDPG(2, 1, DDPGConfig(hidden=32, actor_lr=3e-3, critic_lr=3e-3, batch_size=64), capacity=1024, seed=0)

    def optimum(s: torch.Tensor) -> torch.Tensor:
        return 0.2 + 0.6 * s[:, :1]

    losses = []
    for _ in range(25):  # episodes of 32 one-step transitions, exploring uniformly (DDPG learns off-policy)
        s = torch.rand(32, 2, generator=g)
        a = torch.rand(32, 1, generator=g)
        r = -((a - optimum(s)) ** 2).squeeze(1)
        agent.buffer.add(s, a, r, s, torch.ones(32))
        losses += [agent.update(g)[0] for _ in range(12)]
    early, late = np.mean(losses[:30]), np.mean(losses[-30:])
    assert late < 0.2 * early, (early, late)
    test = torch.rand(200, 2, generator=g)
    with torch.no_grad():
        error = (agent.actor(test) - optimum(test)).abs()
    assert float(error.mean()) < 0.05 and float(error.max()) < 0.15


# -- units, costs, projection -----------------------------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.c3 = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc(x.mean(dim=(2, 3)))


def _quantized_tiny() -> nn.Module:
    torch.manual_seed(0)
    model = quantize_model(TinyNet(), QuantSpec())
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8))
    return model


def test_channel_units_split_costs_exactly_and_match_the_quantizers_account() -> None:
    model = _quantized_tiny()
    macs = trace_macs(model, torch.randn(1, 1, 8, 8))
    costs = layer_costs(model, macs)
    names = [n for n, f in zip(costs.names, costs.frozen, strict=True) if not f]
    assert names == ["c2", "c3"]  # first and last layer frozen at 8 bits
    layout = channel_layout(model, names, channels_per_unit=4)  # 6 channels -> 4 + 2, 5 -> 4 + 1
    assert layout.sizes.tolist() == [4, 2, 4, 1]
    problem = AllocationProblem(layout, costs, (1, 2, 4, 8), size_budget=1e9, bops_budget=1e12)
    rng = np.random.default_rng(0)
    for _ in range(5):
        unit_bits = rng.choice([1, 2, 4, 8], layout.num_units)
        apply_unit_widths(model, layout, unit_bits)
        measured, _ = problem.measure(unit_bits, None)
        layers = quantized_layers(model)
        # the size account of the quantizers themselves (per-channel widths, binary channels)
        payload = sum(m.weight_quantizer.payload_bits(m.weight) for m in layers.values())
        assert measured["size_bits"] == payload
        # BOPs: each channel's MACs x its width x the layer's input width
        bops = 0.0
        for name, layer in layers.items():
            widths = layer.weight_quantizer.channel_widths().expand(layer.weight.shape[0]).double()
            bops += float(macs[name] / layer.weight.shape[0] * widths.sum() * layer.input_quantizer.bits)
        assert measured["bops"] == bops


def test_channel_layout_groups_channels_of_similar_norm() -> None:
    model = _quantized_tiny()
    with torch.no_grad():
        quantized_layers(model)["c2"].weight.mul_(torch.tensor([1.0, 9.0, 2.0, 8.0, 3.0, 7.0]).view(6, 1, 1, 1))
    layout = channel_layout(model, ["c2"], channels_per_unit=2)
    norms = quantized_layers(model)["c2"].weight.flatten(1).norm(dim=1)
    order = torch.argsort(-norms).tolist()
    assert [sorted(c) for c in layout.unit_channels] == [sorted(order[i : i + 2]) for i in (0, 2, 4)]
    widths = layout.channel_widths(np.array([8, 4, 1]))["c2"]
    assert [widths[c] for c in order] == [8, 8, 4, 4, 1, 1]


def _toy_problem(units: int = 4, budget_avg: float = 2.5, choices: tuple[int, ...] = (1, 2, 3, 4)) -> AllocationProblem:
    params = np.array([10.0, 20.0, 30.0, 40.0][:units])
    costs = LayerCosts(tuple("abcd"[:units]), params, np.full(units, 8.0), np.full(units, 8.0), np.zeros(units, bool))
    layout = layer_layout(costs.names, [1] * units)
    return AllocationProblem(layout, costs, choices, size_budget=budget_avg * params.sum())


def test_projection_spends_the_budget_nearest_to_the_shifted_proposal() -> None:
    problem = _toy_problem()
    (constraint,) = problem.constraints()
    choices = np.array(problem.bit_choices)
    largest_step = float(constraint.coefficients.max())  # one unit one bit up
    rng = np.random.default_rng(0)
    for _ in range(25):
        proposal = rng.uniform(1.0, 4.0, 4)
        projected = problem.project(proposal)
        bits = projected.unit_bits
        assert constraint.feasible(bits) and projected.budget_used <= 1.0
        assert constraint.cost(bits) > constraint.budget - 2 * largest_step  # the budget is spent, up to rounding
        # nearest to the shifted proposal among all feasible allocations, up to the solver's documented additive
        # bound for any table (one unit's range)
        target = np.clip(proposal + projected.shift, 1.0, 4.0)
        distance = float(np.sum((target - bits) ** 2))
        best = min(
            float(np.sum((target - np.array(c)) ** 2))
            for c in itertools.product(choices, repeat=4)
            if constraint.feasible(np.array(c))
        )
        assert distance <= best + float(np.max((target - 1.0) ** 2)) + 1e-9
    # only the differences between the proposed widths matter
    middle = np.array([2.0, 2.6, 2.2, 3.1])
    assert problem.project(middle).unit_bits.tolist() == problem.project(middle + 0.7).unit_bits.tolist()
    assert problem.project(middle).unit_bits.tolist() == problem.project(middle - 0.5).unit_bits.tolist()
    # a proposal far above the budget is shifted down, one far below it up
    assert problem.project(np.full(4, 4.0)).budget_used > 0.8 and problem.project(np.full(4, 1.0)).budget_used > 0.8


def test_bops_budget_with_searched_input_widths_always_holds() -> None:
    params = np.array([100.0, 200.0, 300.0])
    macs = np.array([1e4, 5e3, 2e4])
    costs = LayerCosts(
        ("a", "b", "c"), params, np.full(3, 8.0), np.array([8.0, 8.0, 32.0]), np.zeros(3, bool), macs=macs
    )
    layout = layer_layout(costs.names, [1, 1, 1])
    low = float(np.sum(macs[:2] * 1 * 2) + macs[2] * 1 * 32)
    problem = AllocationProblem(layout, costs, (1, 2, 4, 8), bops_budget=1.5 * low, act_bit_choices=(2, 4, 8))
    assert problem.act_searchable.tolist() == [True, True, False]  # a float input is not searched
    rng = np.random.default_rng(0)
    for _ in range(30):
        proposal = rng.uniform(1.0, 8.0, 3)
        acts = rng.choice([2, 4, 8], 3)
        projected = problem.project(proposal, acts)
        (bops,) = problem.constraints(projected.act_bits)
        assert bops.feasible(projected.unit_bits) and projected.costs["bops"] <= 1.5 * low
        assert projected.act_bits is not None and projected.act_bits[2] == 32
        assert np.all(projected.act_bits[:2] <= acts[:2])


def test_impossible_budgets_and_empty_problems_raise_clearly() -> None:
    with pytest.raises(QuantizationConfigError, match=r"`size_budget` = 50 cannot be met.*smallest achievable"):
        _toy_problem(budget_avg=0.5).check()
    params = np.array([10.0])
    costs = LayerCosts(("a",), params, np.full(1, 8.0), np.full(1, 8.0), np.ones(1, bool))
    empty = UnitLayout((), (), np.zeros(0, dtype=np.int64), ())
    with pytest.raises(QuantizationConfigError, match="There is no layer to allocate bits to"):
        AllocationProblem(empty, costs, (2, 4), size_budget=100.0).check()
    with pytest.raises(QuantizationConfigError, match="No budget given"):
        AllocationProblem(empty, costs, (2, 4))
    with pytest.raises(QuantizationConfigError, match=r"`bit_choices` must hold integer bit widths in \[1, 8\]"):
        AllocationProblem(empty, costs, (0, 4), size_budget=1.0)
    for kwargs, match in (
        ({"hidden": 0}, r"`hidden` must be a positive integer, got 0"),
        ({"tau": 1.5}, r"`tau` must be a finite number in \[0.0, 1.0\], got 1.5"),
        ({"warmup_episodes": -1}, r"`warmup_episodes` must be an integer >= 0, got -1"),
        ({"actor_lr": 0.0}, r"`actor_lr` must be a finite number in \(0.0, inf\]"),
    ):
        with pytest.raises(QuantizationConfigError, match=match):
            DDPGConfig(**kwargs)


# -- the search on a synthetic sensitivity problem --------------------------------------------------------------
def _sensitivity_problem(
    seed: int = 0, channels: tuple[int, int, int] = (8, 8, 16)
) -> tuple[AllocationProblem, np.ndarray]:
    """Three layers of 8, 8 and 16 channels (by default); quantizing channel c at b bits costs s_c 4**-b (known),
    with s_c the squared norm of the channel's weights times a per-layer gain -- the norm is a unit feature."""
    rng = np.random.default_rng(seed)
    params = np.array([c * 36.0 for c in channels])
    costs = LayerCosts(("a", "b", "c"), params, np.full(3, 8.0), np.full(3, 8.0), np.zeros(3, bool))
    unit_layer = np.concatenate([[i] * c for i, c in enumerate(channels)])
    layout = UnitLayout(("a", "b", "c"), channels, unit_layer, tuple((i,) for c in channels for i in range(c)))
    norm = rng.lognormal(0.0, 1.0, layout.num_units)
    sensitivity = rng.lognormal(0.0, 1.0, 3)[unit_layer] * norm**2
    sensitivity /= sensitivity.sum()
    layer_features = np.array(
        [[i, 4, c, 9, 1, p, 0, 0, 0] for i, (c, p) in enumerate(zip(channels, params, strict=True))]
    )
    relative = norm / np.array([norm[unit_layer == i].mean() for i in unit_layer])
    position = np.concatenate([np.arange(c) / (c - 1) for c in channels])
    problem = AllocationProblem(
        layout,
        costs,
        (1, 2, 3, 4, 5, 6, 7, 8),
        size_budget=3.0 * params.sum(),
        layer_features=layer_features,
        unit_features=np.stack([position, relative], axis=1),
    )
    return problem, sensitivity


def test_search_beats_random_allocations_at_the_same_budget_and_every_episode_meets_it() -> None:
    problem, sensitivity = _sensitivity_problem()

    def evaluate(bits: np.ndarray, acts: np.ndarray | None) -> float:
        return -float(np.sum(sensitivity * 4.0 ** -bits.astype(np.float64)))

    episodes = 60
    search = PolicySearch(problem, HierarchicalAgent(problem, FAST, seed=0), evaluate, reward_scale=10.0)
    best = search.run(episodes)
    (size,) = problem.constraints()
    assert all(h["budget_used"] <= 1.0 for h in search.history)
    assert all(size.feasible(np.array(h["bits"])) for h in search.history)
    # the same number of random allocations, projected onto the same budget
    random = random_allocations(problem, episodes, torch.Generator().manual_seed(1))
    random_values = [evaluate(r.unit_bits, None) for r in random]
    assert best["metric"] > max(random_values)
    # and it learned: the last episodes (small exploration) beat the random ones on average, and the greedy policy
    # gives more bits to the channels whose noise costs more
    assert np.mean([h["metric"] for h in search.history[-10:]]) > np.mean(random_values)
    greedy = search.agent.propose(10**6)  # exploration noise 0.5 * 0.95**(10**6) = 0
    assert np.corrcoef(greedy.unit_bits, np.log(sensitivity))[0, 1] > 0.2
    optimum = -allocate(noise_objective_table(sensitivity, problem.bit_choices), [size], problem.bit_choices).objective
    assert best["metric"] <= optimum + 1e-12


def test_layer_agent_beats_random_layer_allocations() -> None:
    problem, sensitivity = _sensitivity_problem()
    layers = layer_layout(problem.layout.layers, problem.layout.out_channels)
    layer_problem = AllocationProblem(
        layers,
        problem.costs,
        problem.bit_choices,
        size_budget=problem.size_budget,
        layer_features=problem.layer_features,
    )
    per_layer = np.bincount(problem.layout.unit_layer, weights=sensitivity)

    def evaluate(bits: np.ndarray, acts: np.ndarray | None) -> float:
        return -float(np.sum(per_layer * 4.0 ** -bits.astype(np.float64)))

    search = PolicySearch(layer_problem, LayerAgent(layer_problem, FAST, seed=0), evaluate)
    best = search.run(40)
    random = random_allocations(layer_problem, 40, torch.Generator().manual_seed(1))
    random_values = [evaluate(r.unit_bits, None) for r in random]
    assert best["metric"] >= max(random_values)
    assert all(h["budget_used"] <= 1.0 for h in search.history)


# -- resume ----------------------------------------------------------------------------------------------------
def _same_history(a: list[dict], b: list[dict]) -> bool:
    """Equal episode records, wall time aside."""
    return [{k: v for k, v in h.items() if k != "seconds"} for h in a] == [
        {k: v for k, v in h.items() if k != "seconds"} for h in b
    ]


def test_a_search_resumed_from_its_state_is_bit_identical() -> None:
    problem, sensitivity = _sensitivity_problem(channels=(4, 4, 8))
    config = DDPGConfig(hidden=16, warmup_episodes=3, batch_size=16)

    def evaluate(bits: np.ndarray, acts: np.ndarray | None) -> float:
        return -float(np.sum(sensitivity * 4.0 ** -bits.astype(np.float64)))

    def build() -> PolicySearch:
        return PolicySearch(problem, HierarchicalAgent(problem, config, seed=3), evaluate)

    straight = build()
    straight.run(8)
    first = build()
    first.run(5)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # through bytes, as a checkpoint or the search file would
    buffer.seek(0)
    resumed = build()
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    resumed.run(8)
    assert _same_history(resumed.history, straight.history)
    assert _same_history([resumed.best], [straight.best])
    a, b = straight.state_dict()["agent"], resumed.state_dict()["agent"]
    for name in ("high", "low"):
        for key in ("actor", "critic", "actor_target", "critic_target"):
            for k, v in a["agents"][name][key].items():
                assert torch.equal(v, b["agents"][name][key][k]), (name, key, k)
        assert torch.equal(a["agents"][name]["buffer"]["rewards"], b["agents"][name]["buffer"]["rewards"])
    assert torch.equal(a["generator"], b["generator"])


def test_zero_episodes_is_an_error() -> None:
    problem, _ = _sensitivity_problem()
    search = PolicySearch(problem, LayerAgent(problem, FAST), lambda b, a: 0.0)
    with pytest.raises(QuantizationConfigError, match="`episodes` must be at least 1, got 0"):
        search.run(0)

"""Cost models: MACs traced from shapes, average bits, size and BOPs budgets, frozen layers as offsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_quant import LayerSpec, QuantSpec, quantization_summary, quantize_model
from lightning_quant.allocation import (
    FLOAT_ACT_BITS,
    BudgetConstraint,
    avg_bits_constraint,
    bops_constraint,
    layer_costs,
    layer_macs,
    size_constraint,
    trace_macs,
)
from lightning_quant.models import LeNet5
from lightning_quant.surgery import quantized_layers


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, groups=1)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.dw(torch.relu(self.conv(x))).mean(dim=(2, 3))
        return self.fc(torch.relu(self.fc(h)))  # a layer called twice


def test_macs_from_shapes_by_hand() -> None:
    model = quantize_model(Shared(), QuantSpec(first_last_bits=None))
    macs = trace_macs(model, torch.randn(2, 3, 8, 8))
    assert macs == {
        "conv": 8 * 8 * 8 * 3 * 9,  # output elements x in_channels x kernel
        "dw": 8 * 4 * 4 * 1 * 9,  # depthwise: in_channels / groups = 1
        "fc": 2 * 8 * 8,  # called twice
    }
    assert layer_macs(nn.Linear(4, 3), torch.zeros(5, 7, 3)) == 7 * 3 * 4  # positions count


def test_tracing_touches_no_state() -> None:
    model = quantize_model(LeNet5(), QuantSpec())
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    macs = trace_macs(model, torch.randn(1, 1, 28, 28))
    assert set(macs) == set(quantized_layers(model))
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0, msg=key)  # no observer, no init
    assert not any(layer._forward_hooks for layer in quantized_layers(model).values())


def test_average_bits_and_size_match_the_summary() -> None:
    model = quantize_model(LeNet5(), QuantSpec(default=LayerSpec(weight_bits=4)))
    costs = layer_costs(model)
    assert costs.frozen.tolist() == [True, False, False, False, True]  # first/last rule
    free_bits = costs.weight_bits[costs.free]
    avg = avg_bits_constraint(costs, 4.0)
    assert avg.display(avg.cost(free_bits)) == pytest.approx(quantization_summary(model).avg_weight_bits)
    size = size_constraint(costs, 1e9)
    rows = quantization_summary(model).rows
    assert size.cost(free_bits) == sum(r.params * r.weight_bits for r in rows)
    # frozen layers are the offset, at their fixed 8 bits
    assert avg.offset == size.offset == 8 * (costs.params[0] + costs.params[-1])


def test_bops_linear_and_tied() -> None:
    model = quantize_model(LeNet5(), QuantSpec(default=LayerSpec(weight_bits=4, act_bits=6)))
    macs = trace_macs(model, torch.randn(1, 1, 28, 28))
    costs = layer_costs(model, macs)
    free = costs.free
    linear = bops_constraint(costs, 1e12)
    expected = float((costs.macs * costs.weight_bits * costs.act_bits).sum())
    assert linear.cost(costs.weight_bits[free]) == expected
    tied = bops_constraint(costs, 1e12, tie_activations=True)
    assert tied.power.tolist() == [2, 2, 2]
    bits = np.array([6.0, 6.0, 6.0])  # tied: input bits = weight bits = 6
    assert tied.cost(bits) == linear.cost(bits)


def test_float_inputs_count_32_bits_and_need_macs() -> None:
    model = quantize_model(LeNet5(), QuantSpec(default=LayerSpec(act_bits=None), first_last_bits=None))
    costs = layer_costs(model)
    assert (costs.act_bits == FLOAT_ACT_BITS).all()
    with pytest.raises(ValueError, match="BOPs need the layers' MACs"):
        bops_constraint(costs, 1e9)
    tied = bops_constraint(costs.with_macs({"conv1": 10}), 1e9, tie_activations=True)
    assert tied.power.tolist() == [1] * 5  # nothing to tie: float inputs stay at 32 bits
    assert tied.coefficients[0] == 10 * 32


def test_constraint_validation() -> None:
    with pytest.raises(ValueError, match="`power` must be 1 or 2"):
        BudgetConstraint("bops", np.ones(2), 1.0, power=3)
    with pytest.raises(ValueError, match="non-negative"):
        BudgetConstraint("bops", -np.ones(2), 1.0)

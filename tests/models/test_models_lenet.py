"""Tests of the LeNet-5 reference model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_quant.models import LeNet5


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("input_size", [4, 7, 8, 10, 12, 16, 28, 32])
def test_output_shape(in_channels: int, input_size: int) -> None:
    torch.manual_seed(0)
    model = LeNet5(in_channels=in_channels, num_classes=7, input_size=input_size)
    out = model(torch.randn(3, in_channels, input_size, input_size))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("input_size", "features"), [(28, 16 * 5 * 5), (32, 16 * 6 * 6), (8, 16), (12, 16)])
def test_flatten_size(input_size: int, features: int) -> None:
    assert LeNet5(input_size=input_size).fc1.in_features == features


def test_classic_layout_and_parameter_count() -> None:
    model = LeNet5()
    assert model.conv2.padding == (0, 0)
    # 156 + 2416 + 48120 + 10164 + 850: the textbook LeNet-5 with a 400-wide fc1.
    assert sum(p.numel() for p in model.parameters()) == 61_706


def test_named_modules_are_distinct_relus() -> None:
    model = LeNet5()
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 4
    assert len({id(m) for m in relus}) == 4
    for name in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        assert hasattr(model, name)
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.fc3, nn.Linear)


def test_small_input_error_names_argument() -> None:
    with pytest.raises(ValueError, match=r"`input_size` must be an integer >= 4 .*got 3"):
        LeNet5(input_size=3)


@pytest.mark.parametrize("name", ["in_channels", "num_classes"])
def test_bad_sizes(name: str) -> None:
    with pytest.raises(ValueError, match=rf"`{name}` must be a positive integer, got 0"):
        LeNet5(**{name: 0})

"""Tests of the CIFAR-style ResNets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_quant.models import CifarResNet, resnet8, resnet20
from lightning_quant.models.resnet import BasicBlock


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("factory", [resnet8, resnet20])
@pytest.mark.parametrize(("in_channels", "size"), [(3, 32), (1, 28), (1, 8), (3, 5)])
def test_output_shape(factory, in_channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = factory(in_channels=in_channels, num_classes=10).eval()
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_parameter_counts() -> None:
    # He et al. 2016, table 6: ResNet-20 has 0.27M parameters on CIFAR-10 (with 1x1 projections: 272,474).
    assert _count(resnet20()) == 272_474
    assert _count(resnet8()) == 78_042
    assert abs(_count(resnet20()) - 0.27e6) < 0.01e6
    # One input channel changes only the stem: 16 * 9 * (3 - 1) fewer weights.
    assert _count(resnet20(in_channels=1)) == 272_474 - 288
    assert _count(CifarResNet(32)) == 466_906


def test_structure() -> None:
    model = resnet20()
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [3, 3, 3]
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert isinstance(model.layer1[1].shortcut, nn.Identity)
    proj = model.layer2[0].shortcut
    assert isinstance(proj, nn.Sequential)
    assert isinstance(proj[0], nn.Conv2d) and proj[0].kernel_size == (1, 1) and proj[0].stride == (2, 2)
    assert isinstance(proj[1], nn.BatchNorm2d)
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == 64
    for name in ("conv1", "bn1", "relu", "flatten"):
        assert hasattr(model, name)
    block = model.layer3[2]
    assert isinstance(block, BasicBlock)
    assert isinstance(block.relu2, nn.ReLU) and block.relu1 is not block.relu2
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 + 2  # 6n + 1 weighted convs plus two projection shortcuts


def test_width_and_init() -> None:
    torch.manual_seed(0)
    model = resnet8(width=8, num_classes=3)
    assert model.fc.in_features == 32 and model.fc.out_features == 3
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    # Kaiming normal, fan_out: std = sqrt(2 / (out_channels * k * k)).
    weight = resnet20().layer3[0].conv2.weight
    expected = (2.0 / (64 * 9)) ** 0.5
    assert abs(weight.std().item() - expected) / expected < 0.05


def test_backward() -> None:
    torch.manual_seed(0)
    model = resnet8(in_channels=1)
    loss = model(torch.randn(4, 1, 8, 8)).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("depth", [7, 9, 2, 21])
def test_bad_depth(depth: int) -> None:
    with pytest.raises(ValueError, match=rf"`depth` must be 6n \+ 2 \(8, 14, 20, .*got {depth}"):
        CifarResNet(depth)


def test_bad_width() -> None:
    with pytest.raises(ValueError, match=r"`width` must be a positive integer, got 0"):
        resnet8(width=0)

"""fold_batchnorm: exact folds of conv+BN, conv(bias)+BN, depthwise+BN, on float and quantized models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.models import resnet8
from lightning_quant.surgery import LayerSpec, QuantSpec, find_conv_bn_pairs, fold_batchnorm, quantize_model


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(n, generator=gen))  # negative gammas included
                m.bias.copy_(torch.randn(n, generator=gen))


CASES = {
    "conv+bn": lambda: nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
    "conv(bias)+bn": lambda: nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8)),
    "depthwise+bn": lambda: nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.BatchNorm2d(8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_float_fold_is_exact(case: str) -> None:
    torch.manual_seed(0)
    net = CASES[case]()
    _randomize_bn(net)
    net.eval()
    x = torch.randn(4, net[0].in_channels, 10, 10)
    with torch.no_grad():
        before = net(x)
        weight = net[0].weight
        assert fold_batchnorm(net) == [("0", "1")]
        after = net(x)
    assert isinstance(net[1], nn.Identity) and net[0].weight is weight  # same Parameter object
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_per_channel_fold_keeps_integers(case: str) -> None:
    torch.manual_seed(0)
    net = CASES[case]()
    _randomize_bn(net)
    quantize_model(net, QuantSpec(default=LayerSpec(weight_bits=4, act_bits=8), first_last_bits=None))
    x = torch.randn(4, net[0].in_channels, 10, 10)
    net.train()
    net[0].weight_quantizer.observing = True
    net(x)  # calibrate
    net.eval()
    with torch.no_grad():
        before = net(x)
        codes = net[0].weight_quantizer.int_repr(net[0].weight)
        exact_channels = net[1].weight > 0  # channels with a positive BatchNorm factor keep every integer
        fold_batchnorm(net)
        after = net(x)
        folded_codes = net[0].weight_quantizer.int_repr(net[0].weight)
    # the integers are the same up to the sign of the BN factor (per channel), except at the ends of the signed
    # grid in channels with a negative factor: [-8, 7] is not symmetric, so -8 <-> 7 (documented in fold.py)
    qmin, qmax = net[0].weight_quantizer.qmin, net[0].weight_quantizer.qmax
    differ = folded_codes.abs() != codes.abs()
    ends = torch.tensor([qmin, qmax], dtype=codes.dtype)
    assert torch.isin(codes[differ], ends).all()
    assert ((folded_codes.abs() - codes.abs()).abs() <= 1).all()
    # ... up to rounding ties: a symmetric observer puts a channel's largest weight exactly on w / s = -7.5
    # (range / ((qmax - qmin) / 2)), and the fold's float rounding may break that tie the other way
    moved = folded_codes[exact_channels] != codes[exact_channels]
    assert int(moved.sum()) <= int(exact_channels.sum())
    assert ((folded_codes[exact_channels] - codes[exact_channels]).abs() <= 1).all()
    assert (after - before)[:, exact_channels].abs().max() <= 0.05 * before.abs().max()


def test_per_tensor_quantized_fold_recalibrates_or_skips_or_raises() -> None:
    def build() -> nn.Sequential:
        torch.manual_seed(0)
        net = CASES["conv+bn"]()
        _randomize_bn(net)
        spec = QuantSpec(default=LayerSpec(weight_granularity="per_tensor", act_bits=None), first_last_bits=None)
        quantize_model(net, spec)
        net.eval()(torch.randn(1, 3, 8, 8))
        return net

    with pytest.raises(QuantizationConfigError, match=r"changes its weight integers \(per-tensor.*inexact="):
        fold_batchnorm(build(), inexact="error")
    skipped = build()
    assert fold_batchnorm(skipped, inexact="skip") == [] and isinstance(skipped[1], nn.BatchNorm2d)
    net = build()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = net(x)
        assert fold_batchnorm(net) == [("0", "1")]
        after = net(x)
    # recalibrated: close, not exact (the step size is set again from the folded weight)
    assert (after - before).abs().max() < 0.1 * before.abs().max()
    with pytest.raises(QuantizationConfigError, match=r"`inexact` must be one of"):
        fold_batchnorm(net, inexact="maybe")  # type: ignore[arg-type]


def test_resnet_pairs_and_untraceable_fallback() -> None:
    model = resnet8()
    pairs = find_conv_bn_pairs(model)
    assert ("layer2.0.shortcut.0", "layer2.0.shortcut.1") in pairs and ("conv1", "bn1") in pairs
    assert len(pairs) == 9

    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent: fx cannot trace it
                return self.body(x)
            return self.body(-x)

    assert find_conv_bn_pairs(Dynamic()) == [("body.0", "body.1")]


def test_bn_fed_by_two_users_is_not_folded() -> None:
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y  # the conv output is used twice

    assert find_conv_bn_pairs(Branch()) == []


def test_spec_fold_batchnorm_folds_before_quantizing_and_is_recorded() -> None:
    from lightning_quant.surgery.fold import FoldedBatchNorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    spec = QuantSpec(fold_batchnorm=True)
    assert QuantSpec.from_json(spec.to_json()) == spec
    quantize_model(net, spec)
    assert isinstance(net[1], FoldedBatchNorm) and net[0].bias is not None
    assert QuantSpec.from_model(net).fold_batchnorm
    assert not QuantSpec.from_model(quantize_model(nn.Sequential(nn.Linear(2, 2)))).fold_batchnorm
    with pytest.raises(QuantizationConfigError, match=r"`fold_batchnorm` must be True or False, got 1"):
        QuantSpec(fold_batchnorm=1)

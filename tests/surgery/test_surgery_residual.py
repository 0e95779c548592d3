"""Residual quantizers (``QuantSpec.quantize_residuals``): where they go, state, folding, export to int8."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from lightning_quant import QuantizationConfigError
from lightning_quant.core.quantizers import UniformQuantizer
from lightning_quant.models import resnet8
from lightning_quant.surgery import (
    QuantSpec,
    dequantize_model,
    fold_batchnorm,
    load_quantized,
    quantize_model,
    quantized_layers,
    save_quantized,
)
from lightning_quant.surgery.graph import (
    residual_activations,
    residual_producers,
    retrace_owners,
    unshared_copy,
)
from lightning_quant.surgery.layers import QuantBatchNorm2d, QuantReLU, activation_quantizers

RESNET8_PRODUCERS = {
    "layer1.0.bn2": "layer1.0.conv2",
    "layer2.0.bn2": "layer2.0.conv2",
    "layer2.0.shortcut.1": "layer2.0.shortcut.0",
    "layer3.0.bn2": "layer3.0.conv2",
    "layer3.0.shortcut.1": "layer3.0.shortcut.0",
}
#: ReLU modules at residual additions -> the layers they feed (the stem's ReLU enters layer1's identity shortcut)
RESNET8_ACTIVATIONS = {
    "relu": ["layer1.0.conv1"],
    "layer1.0.relu2": ["layer2.0.conv1", "layer2.0.shortcut.0"],
    "layer2.0.relu2": ["layer3.0.conv1", "layer3.0.shortcut.0"],
    "layer3.0.relu2": [],  # the last block's output goes to average pooling
}


class NoBatchNormBlock(nn.Module):
    """``relu(conv2(relu(conv1(x))) + x)`` with ``torch.add``: the conv output itself enters the addition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.add(self.conv2(torch.relu(self.conv1(x))), x)
        return self.head(torch.relu(out).mean((2, 3)))


class FunctionalBlock(nn.Module):
    """A user-style block with functional ReLUs: ``F.relu(bn2(conv2(F.relu(bn1(conv1(x))))) + x)``."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class FunctionalNet(nn.Module):
    """A stem (with a functional ReLU in the network's own forward) and two :class:`FunctionalBlock`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.blocks = nn.Sequential(FunctionalBlock(), FunctionalBlock())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(F.relu(self.bn(self.conv(x)))).mean((2, 3)))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.bn(self.conv(x)) + 1
        return self.conv(x)


def _calibrated(model: nn.Module, shape: tuple[int, ...] = (8, 1, 16, 16)) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(shape))
    return model.eval()


def test_producers_of_our_resnet_and_torchvision_resnet() -> None:
    assert residual_producers(resnet8(in_channels=1)) == RESNET8_PRODUCERS
    assert residual_activations(resnet8(in_channels=1)) == RESNET8_ACTIVATIONS
    model = torchvision.models.resnet18()
    found = residual_producers(model)
    # every block's bn2 and the three downsample BatchNorms
    assert found["layer3.0.downsample.1"] == "layer3.0.downsample.0"
    assert sorted(k for k in found if k.endswith("bn2")) == [f"layer{s}.{b}.bn2" for s in (1, 2, 3, 4) for b in (0, 1)]
    assert len(found) == 8 + 3
    # torchvision's blocks call one ReLU module twice: before un-sharing only the stem's ReLU and max-pooling count
    assert residual_activations(model) == {"relu": ["layer1.0.conv1"], "maxpool": ["layer1.0.conv1"]}
    assert residual_producers(NoBatchNormBlock()) == {"conv2": "conv2"}


def test_quantize_residuals_places_output_quantizers() -> None:
    model = quantize_model(resnet8(in_channels=1), QuantSpec(quantize_residuals=True))
    modules = dict(model.named_modules())
    for bn_name in RESNET8_PRODUCERS:
        assert isinstance(modules[bn_name], QuantBatchNorm2d), bn_name
        assert modules[bn_name].output_quantizer.bits == 8
    assert not isinstance(modules["layer1.0.bn1"], QuantBatchNorm2d)  # feeds a ReLU -> conv only
    # the ReLUs at the additions share one quantizer with the layers they feed: one grid per tensor
    for relu_name, consumers in RESNET8_ACTIVATIONS.items():
        assert isinstance(modules[relu_name], QuantReLU), relu_name
        for consumer in consumers:
            assert modules[consumer].input_quantizer is modules[relu_name].output_quantizer, consumer
    # the same parameter objects, and the BatchNorm still normalises
    plain = resnet8(in_channels=1)
    assert set(plain.state_dict()) <= set(model.state_dict())
    # no BatchNorm: the conv's own output quantizer, at its activation bits
    net = quantize_model(NoBatchNormBlock(), QuantSpec(quantize_residuals=True, first_last_bits=None))
    assert isinstance(net.conv2.output_quantizer, UniformQuantizer)
    assert isinstance(net.conv1.output_quantizer, nn.Identity)
    assert quantized_layers(net)["conv2"].current_spec().output_bits == 8
    # off by default
    default = quantize_model(resnet8(in_channels=1))
    assert not any(isinstance(m, QuantBatchNorm2d) for m in default.modules())


def test_residual_quantizers_quantize_and_calibrate() -> None:
    model = _calibrated(quantize_model(resnet8(in_channels=1), QuantSpec(quantize_residuals=True)))
    bn = dict(model.named_modules())["layer2.0.bn2"]
    assert bn.output_quantizer._initialized
    seen = {}
    bn.register_forward_hook(lambda m, i, o: seen.update(out=o))
    with torch.no_grad():
        model(torch.randn(2, 1, 16, 16))
    q = bn.output_quantizer
    steps = seen["out"] / q.effective_scale() + q.zero_point
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # the BatchNorm's output sits on the 8-bit grid
    assert set(activation_quantizers(model)) >= {f"{n}.output_quantizer" for n in RESNET8_PRODUCERS}


def test_idempotent_dequantize_and_atomic_error() -> None:
    model = quantize_model(resnet8(in_channels=1), QuantSpec(quantize_residuals=True))
    before = [type(m) for m in model.modules()]
    quantize_model(model, QuantSpec(quantize_residuals=True))
    assert [type(m) for m in model.modules()] == before
    dequantize_model(model)
    assert not any(isinstance(m, (QuantBatchNorm2d, QuantReLU, UniformQuantizer)) for m in model.modules())
    assert type(dict(model.named_modules())["layer2.0.bn2"]) is nn.BatchNorm2d

    untraceable = Untraceable()
    types = [type(m) for m in untraceable.modules()]
    with pytest.raises(QuantizationConfigError, match=r"torch\.fx trace.*quantize_residuals=False.*output_bits"):
        quantize_model(untraceable, QuantSpec(quantize_residuals=True, first_last_bits=None))
    assert [type(m) for m in untraceable.modules()] == types  # untouched
    with pytest.raises(QuantizationConfigError, match=r"`quantize_residuals` must be True or False"):
        QuantSpec(quantize_residuals="yes")


def test_save_load_round_trip_restores_residual_quantizers(tmp_path: Path) -> None:
    model = _calibrated(quantize_model(resnet8(in_channels=1), QuantSpec(quantize_residuals=True)))
    dict(model.named_modules())["layer3.0.bn2"].output_quantizer.bits = 6  # changed after surgery
    spec = QuantSpec.from_model(model)
    assert spec.quantize_residuals
    assert QuantSpec.from_json(spec.to_json()) == spec
    save_quantized(model, tmp_path / "m.pt")
    fresh = load_quantized(resnet8(in_channels=1), tmp_path / "m.pt").eval()
    assert dict(fresh.named_modules())["layer3.0.bn2"].output_quantizer.bits == 6
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_fold_moves_the_output_quantizer_behind_the_conv() -> None:
    model = _calibrated(quantize_model(resnet8(in_channels=1), QuantSpec(quantize_residuals=True)))
    x = torch.randn(16, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
        folded = fold_batchnorm(model)
        after = model(x)
    assert ("layer2.0.conv2", "layer2.0.bn2") in folded
    assert isinstance(dict(model.named_modules())["layer2.0.bn2"], UniformQuantizer)
    # same prediction; logits within a few activation steps (float rounding of the fold can flip a rounding)
    assert (after.argmax(1) == before.argmax(1)).float().mean() >= 0.9
    assert (after - before).abs().max() < 0.1 * before.abs().max()


def test_torchvision_blocks_get_one_relu_module_per_use(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    block = model.layer2[0]
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        assert torch.equal(unshared_copy(block)(x), block(x))  # the same computation
    assert retrace_owners(model) == [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]
    plain_keys = set(model.state_dict())
    quantize_model(model, QuantSpec(quantize_residuals=True))
    assert retrace_owners(model) == []
    modules = dict(model.named_modules())
    assert type(modules["layer2.0"]).__name__ == "BasicBlock"  # a GraphModule under the block's name
    assert isinstance(modules["layer2.0.relu_1"], QuantReLU) and not isinstance(modules["layer2.0.relu"], QuantReLU)
    assert modules["layer3.0.conv1"].input_quantizer is modules["layer2.1.relu_1"].output_quantizer
    assert modules["layer3.0.downsample.0"].input_quantizer is modules["layer2.1.relu_1"].output_quantizer
    assert modules["maxpool"].output_quantizer is modules["relu"].output_quantizer  # the stem: one grid
    assert plain_keys <= set(model.state_dict())  # every float key is still there
    # a checkpoint of it loads into a freshly built torchvision model, which gets the same surgery
    _calibrated(model, (2, 3, 32, 32))
    save_quantized(model, tmp_path / "r18.pt")
    fresh = load_quantized(torchvision.models.resnet18(num_classes=4), tmp_path / "r18.pt").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))


def test_functional_relus_at_additions_become_quantized_modules(tmp_path: Path) -> None:
    from lightning_quant.export import export_onnx, verify_onnx

    torch.manual_seed(0)
    wrapped = nn.Sequential(FunctionalNet())  # the network below the model, as in a LightningModule
    # the blocks qualify; the network itself does not (its stem ReLU would make it a GraphModule)
    assert retrace_owners(wrapped) == ["0.blocks.0", "0.blocks.1"]
    block = FunctionalBlock().eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(unshared_copy(block)(x), block(x))  # the same computation
    plain_keys = set(wrapped.state_dict())
    quantize_model(wrapped, QuantSpec(quantize_residuals=True, first_last_bits=None))
    modules = dict(wrapped.named_modules())
    assert type(modules["0"]).__name__ == "FunctionalNet" and not isinstance(modules["0"], torch.fx.GraphModule)
    for b in (0, 1):
        # F.relu after bn1 becomes `relu` (not at an addition: no quantizer), the one after the addition `relu_1`
        assert type(modules[f"0.blocks.{b}.relu"]) is nn.ReLU
        assert isinstance(modules[f"0.blocks.{b}.relu_1"], QuantReLU)
    assert modules["0.blocks.1.conv1"].input_quantizer is modules["0.blocks.0.relu_1"].output_quantizer
    assert plain_keys <= set(wrapped.state_dict())
    _calibrated(wrapped, (16, 1, 8, 8))
    path = export_onnx(wrapped, tmp_path / "functional.onnx", torch.randn(1, 1, 8, 8))
    result = verify_onnx(wrapped, path, [torch.randn(16, 1, 8, 8)])
    # every conv in int8; block 1's addition takes two quantized tensors (block 0's sum and its bn2) -> QLinearAdd
    assert result.float_convs == 0 and result.int8_ops.get("QLinearAdd") == 1
    assert result.agreement == 1.0

"""The deployment recipe's quantizers between convolutions: gates, SiLU/hardswish, additions, products, concatenations.

``quantize_residuals=True`` puts a quantizer on the output of an addition/product/concatenation (inside the module
whose forward performs it, re-traced with an ``OpOutput`` marker), on sigmoid gates, and on the gate of SiLU and
hardswish, wherever an int8 runtime needs one to run the op in integers. ``tests/export/test_export_zoo.py``
checks what onnxruntime then runs; these tests check the surgery itself.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torchvision
from torch import nn
from torch.fx import GraphModule
from torchvision.models.efficientnet import EfficientNet, MBConvConfig

from lightning_quant.surgery import LayerSpec, QuantSpec, calibrate, dequantize_model, quantize_model
from lightning_quant.surgery.graph import OpOutput
from lightning_quant.surgery.layers import QuantHardswish, QuantOpOutput, QuantSigmoid, QuantSiLU, activation_quantizer

DEPLOY = QuantSpec(default=LayerSpec(weight_bits=8, act_bits=8), quantize_residuals=True)


def _mobilenet_v2() -> nn.Module:
    setting = [[1, 16, 1, 1], [6, 24, 3, 2]]  # the second stage: two residual blocks in a row
    return torchvision.models.MobileNetV2(num_classes=10, width_mult=0.5, inverted_residual_setting=setting)


def _efficientnet() -> nn.Module:
    setting = [MBConvConfig(1, 3, 1, 32, 16, 1), MBConvConfig(6, 3, 2, 16, 24, 3)]
    return EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.2, num_classes=10, last_channel=64)


@pytest.mark.parametrize(("cls", "gate"), [(nn.SiLU, torch.sigmoid), (nn.Hardswish, nn.functional.hardsigmoid)])
def test_gated_activation_is_x_times_the_fake_quantized_gate(cls: type, gate) -> None:
    spec = LayerSpec()
    quantized = {nn.SiLU: QuantSiLU, nn.Hardswish: QuantHardswish}[cls].from_gated(
        cls(), activation_quantizer(spec, 8), nn.Identity()
    )
    x = torch.linspace(-6, 6, 401)
    quantized.gate_quantizer.train()
    quantized.gate_quantizer.observing = True
    quantized(x)
    quantized.gate_quantizer.observing = False
    quantized.eval()
    grid = quantized.gate_quantizer.uniform_grid()
    scale, zero_point = float(grid.scale.reshape(-1)[0]), int(grid.zero_point.reshape(-1)[0])
    expected = x * torch.fake_quantize_per_tensor_affine(gate(x), scale, zero_point, grid.qmin, grid.qmax)
    torch.testing.assert_close(quantized(x), expected)
    assert 0 < (quantized(x) - cls()(x)).abs().max() <= 3 * scale + 1e-6  # half a gate step x |x|
    assert type(quantized.to_float()) is cls


def test_residual_sums_get_one_quantizer_shared_with_the_next_block() -> None:
    torch.manual_seed(0)
    model = quantize_model(_mobilenet_v2().eval(), DEPLOY)
    plain, first, last = model.features[2], model.features[3], model.features[4]  # stage 2's three blocks
    assert not isinstance(plain, GraphModule)
    assert isinstance(first, GraphModule) and type(first).__name__ == "InvertedResidual"
    marker = first.add_output
    assert isinstance(marker, QuantOpOutput)
    # the sum feeds the next block's first conv and its shortcut: one quantizer, that conv's input quantizer
    assert marker.output_quantizer is last.conv[0][0].input_quantizer
    # the last sum feeds one conv only, whose input quantizer follows it already: no marker
    assert not isinstance(last, GraphModule)


def test_efficientnet_gates_and_sums_behind_stochastic_depth() -> None:
    model = quantize_model(_efficientnet().eval(), DEPLOY)
    block = model.features[2][1]  # MBConv with stochastic depth and a residual sum that feeds the next MBConv
    assert isinstance(block, GraphModule) and isinstance(block.add_output, QuantOpOutput)
    assert block.add_output.output_quantizer is model.features[2][2].block[0][0].input_quantizer
    # the squeeze-excitation product feeds only the projection conv, whose input quantizer serves: no marker
    se = block.block[2]
    assert not isinstance(se, GraphModule)
    assert sum(isinstance(m, OpOutput) for m in model.modules()) == 1
    # its sigmoid gate feeds the product: an output quantizer of its own; every SiLU quantizes its gate
    assert isinstance(se.scale_activation, QuantSigmoid)
    assert not any(type(m) in (nn.SiLU, nn.Sigmoid) for m in model.modules())
    assert isinstance(se.activation, QuantSiLU) and isinstance(se.activation.output_quantizer, nn.Identity)


def test_float_model_unchanged_until_calibrated_and_restored_by_dequantize() -> None:
    torch.manual_seed(0)
    float_model = _efficientnet().eval()
    x = torch.randn(2, 3, 32, 32)
    expected = float_model(x)
    model = quantize_model(_efficientnet().eval(), DEPLOY)
    model.load_state_dict(float_model.state_dict(), strict=False)
    calibrate(model, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    assert not torch.allclose(model(x), expected)
    torch.testing.assert_close(dequantize_model(model)(x), expected)


def test_quantizing_twice_adds_nothing_and_a_fresh_model_loads_the_state() -> None:
    torch.manual_seed(0)
    model = quantize_model(_mobilenet_v2().eval(), DEPLOY)
    calibrate(model, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    names = [n for n, _ in model.named_modules()]
    quantize_model(model, DEPLOY)
    assert [n for n, _ in model.named_modules()] == names
    fresh = quantize_model(_mobilenet_v2().eval(), DEPLOY)
    fresh.load_state_dict(model.state_dict())  # strict: the same keys, op-output quantizers included
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


def test_resnets_and_transformers_get_no_quantizers_between_ops() -> None:
    resnet = quantize_model(torchvision.models.resnet18(num_classes=10), DEPLOY)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, activation="gelu")
    with pytest.warns(UserWarning, match="found no residual addition"):
        transformer = quantize_model(nn.Sequential(nn.TransformerEncoder(layer, 2), nn.Linear(16, 4)), DEPLOY)
    for model in (resnet, transformer):
        assert not any(isinstance(m, (OpOutput, QuantSigmoid, QuantSiLU)) for m in model.modules())


class RootSum(nn.Module):
    """A residual sum in the model's own forward: no submodule to re-trace, so it stays in float."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        s = x + self.b(x)
        return self.c(s) + self.d(s)


def test_sums_in_the_models_own_forward_stay_float_and_are_named(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lightning_quant"):
        model = quantize_model(RootSum(), DEPLOY)
    assert not any(isinstance(m, OpOutput) for m in model.modules())
    assert "keep a float output" in caplog.text and "add 'add'" in caplog.text


def test_efficientnet_trains_with_the_recipe_despite_in_place_sums() -> None:
    # MBConv adds its shortcut in place to a quantized output (`result += input`): autograd must allow it
    torch.manual_seed(0)
    model = quantize_model(_efficientnet(), DEPLOY)
    calibrate(model, [torch.randn(4, 3, 32, 32)])
    model.train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_shufflenet_shortcut_half_carries_the_grid_it_was_split_from() -> None:
    torch.manual_seed(0)
    float_model = torchvision.models.ShuffleNetV2([2, 2, 1], [8, 16, 32, 64, 128], num_classes=10).eval()
    model = quantize_model(copy.deepcopy(float_model), DEPLOY)
    first, second = model.stage2[0], model.stage2[1]  # stride 2 (two branches), then stride 1 (split in halves)
    # the first block's concatenation is shuffled and split into the second: one grid for the whole path, carried
    # again by the half that goes straight into the second block's concatenation
    assert isinstance(first.cat_output, QuantOpOutput) and isinstance(second.slice_output, QuantOpOutput)
    grid = first.cat_output.output_quantizer
    assert second.slice_output.output_quantizer is grid is second.branch2[0].input_quantizer
    calibrate(model, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    x = torch.randn(2, 3, 32, 32)
    quantized = model(x)
    marker = second.slice_output
    second._modules["slice_output"] = OpOutput("slice")  # the half is on that grid already: quantizing changes nothing
    torch.testing.assert_close(model(x), quantized, rtol=0, atol=0)
    second._modules["slice_output"] = marker
    torch.testing.assert_close(dequantize_model(model)(x), float_model(x))

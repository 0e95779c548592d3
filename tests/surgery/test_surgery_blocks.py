"""Block discovery for block-wise techniques."""

from __future__ import annotations

import lightning as L
import pytest
import torchvision
from torch import nn

from lightning_quant import QuantizationConfigError, find_blocks, quantize_model


def _names(blocks):
    return [name for name, _ in blocks]


def test_torchvision_resnet_stages() -> None:
    assert _names(find_blocks(torchvision.models.resnet18())) == ["layer1", "layer2", "layer3", "layer4"]


def test_torchvision_mobilenet_features() -> None:
    names = _names(find_blocks(torchvision.models.mobilenet_v2()))
    assert names[0] == "features.0" and names[-1] == "features.18" and len(names) == 19


def test_generic_top_level_children_and_wrapper_descent() -> None:
    body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.Flatten(), nn.LazyLinear(3))
    assert _names(find_blocks(body)) == ["0", "2"]  # children without a Conv/Linear are not blocks

    class Wrapper(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torchvision.models.resnet18()

    assert _names(find_blocks(Wrapper())) == [f"backbone.layer{i}" for i in range(1, 5)]


def test_named_blocks_and_quantized_models() -> None:
    model = quantize_model(torchvision.models.resnet18())
    blocks = find_blocks(model, ["layer1", "layer3.1"])
    assert _names(blocks) == ["layer1", "layer3.1"] and blocks[1][1] is model.layer3[1]
    assert _names(find_blocks(model)) == ["layer1", "layer2", "layer3", "layer4"]


def test_block_errors() -> None:
    model = torchvision.models.resnet18()
    with pytest.raises(QuantizationConfigError, match=r"names modules that do not exist: \['layer9'\]"):
        find_blocks(model, ["layer1", "layer9"])
    with pytest.raises(QuantizationConfigError, match="names a module twice"):
        find_blocks(model, ["layer1", "layer1"])
    with pytest.raises(QuantizationConfigError, match='`blocks` must be "auto" or a list'):
        find_blocks(model, "layer1")
    with pytest.raises(QuantizationConfigError, match="need at least two"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))

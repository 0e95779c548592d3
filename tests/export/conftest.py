"""Briefly trained quantized models on sklearn digits, shared by the export tests (cached per session)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_quant.datamodules import DigitsDataModule
from lightning_quant.models import LeNet5, resnet8
from lightning_quant.surgery import LayerSpec, QuantSpec, calibrate, quantize_model, quantized_layers

#: "w8a8r": W8A8 with residual quantizers (``quantize_residuals=True``), the int8 deployment recipe
RECIPES = ("w8a8", "w4a4", "mixed", "w8a8r")


@functools.lru_cache(maxsize=1)
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=128, seed=0)
    dm.setup("fit")
    return dm


def all_digits() -> Iterable:
    """Every digits sample (1,797): train, val and test splits, in a fixed order."""
    dm = digits()
    loaders = [
        torch.utils.data.DataLoader(ds, batch_size=256) for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset)
    ]
    return list(itertools.chain.from_iterable(loaders))


def _spec(recipe: str) -> QuantSpec:
    bits = 4 if recipe == "w4a4" else 8
    return QuantSpec(default=LayerSpec(weight_bits=bits, act_bits=bits), quantize_residuals=recipe == "w8a8r")


@functools.cache
def _trained_float(arch: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = resnet8(in_channels=1) if arch == "resnet8" else LeNet5(input_size=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(4):
        for x, y in digits().train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def make_quantized(arch: str, recipe: str) -> nn.Module:
    """A float-trained model, quantized with ``recipe`` and calibrated on four training batches."""
    torch.manual_seed(0)
    model = resnet8(in_channels=1) if arch == "resnet8" else LeNet5(input_size=8)
    model.load_state_dict(_trained_float(arch))
    quantize_model(model, _spec(recipe))
    if recipe == "mixed":
        layers = list(quantized_layers(model).values())
        for layer, bits in zip(layers[1:-1], itertools.cycle((3, 5, 2, 6, 1, 4)), strict=False):
            layer.weight_quantizer.bits = bits
            if isinstance(layer.input_quantizer, nn.Module) and hasattr(layer.input_quantizer, "bits"):
                layer.input_quantizer.bits = 6 if bits < 4 else 8
    return calibrate(model, itertools.islice(digits().train_dataloader(), 4))


@pytest.fixture
def quantized_model():
    return make_quantized

"""``calibrate``: post-training range calibration without a Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_quant import QuantizationConfigError, calibrate
from lightning_quant.surgery import QuantSpec, quantize_model, quantizers


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_calibrate_matches_observing_by_hand_and_leaves_batchnorm_alone():
    batches = [torch.randn(5, 1, 8, 8) * (i + 1) for i in range(3)]
    model = quantize_model(_net(), QuantSpec())
    reference = copy.deepcopy(model)
    bn_before = copy.deepcopy(model[1].state_dict())

    # the reference: every quantizer observing in training mode, the rest of the model in eval mode
    reference.eval()
    for q in quantizers(reference).values():
        q.train()
        q.observing = True
    with torch.no_grad():
        for x in batches:
            reference(x)
    for q in quantizers(reference).values():
        q.observing = False
    reference.eval()

    out = calibrate(model, [(x, torch.zeros(5)) for x in batches])  # (inputs, labels) tuples are accepted
    assert out is model and not model.training
    assert all(not q.observing and not q.training for q in quantizers(model).values())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    for key, value in bn_before.items():  # BatchNorm's running statistics untouched
        torch.testing.assert_close(model[1].state_dict()[key], value)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model(x), reference(x))
    # the ranges moved off their initial values: calibration did something
    fresh = quantize_model(_net(), QuantSpec()).state_dict()
    assert any(not torch.equal(value, fresh[key]) for key, value in model.state_dict().items())


def test_calibrate_refuses_a_float_model():
    with pytest.raises(QuantizationConfigError, match="no quantizer to calibrate"):
        calibrate(_net(), [torch.randn(1, 1, 8, 8)])

"""Export of every quantizer kind: per-channel widths with binary channels, kernel codebooks, float codebooks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from conftest import all_digits, digits
from onnx import numpy_helper
from torch import nn
from torch.nn import functional as F

from lightning_quant.export import export_onnx, load_packed_model, save_packed_model, verify_onnx
from lightning_quant.models import resnet8
from lightning_quant.surgery import LayerSpec, QuantSpec, quantize_model, quantized_layers, quantizers


def _trained(spec: QuantSpec) -> nn.Module:
    """ResNet-8 quantized with ``spec`` and trained briefly (QAT) on the digits, then calibrated in eval mode."""
    torch.manual_seed(0)
    model = quantize_model(resnet8(in_channels=1), spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):
        for x, y in digits().train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    for q in quantizers(model).values():
        q.observing = False
    return model.eval()


def _mixed_spec() -> QuantSpec:
    # every inner conv: half of its output channels binary, the other half 4-bit (alternating); 4-bit activations
    model = quantize_model(resnet8(in_channels=1), QuantSpec(default=LayerSpec(weight_bits=4, act_bits=4)))
    layers = {}
    for name, layer in list(quantized_layers(model).items())[1:-1]:
        channels = layer.weight.shape[0]
        layers[name] = LayerSpec(weight_bits=tuple(1 if c % 2 else 4 for c in range(channels)), act_bits=4)
    return QuantSpec(default=LayerSpec(weight_bits=4, act_bits=4), layers=layers)


def test_binary_and_four_bit_channels_export_and_agree(tmp_path: Path) -> None:
    model = _trained(_mixed_spec())
    path = export_onnx(model, tmp_path / "mixed.onnx", torch.randn(2, 1, 8, 8))
    result = verify_onnx(model, path, all_digits())
    assert result.agreement >= 0.999, str(result)
    assert result.torch_accuracy > 0.5
    # the weights of a mixed layer are int8 integers: +-1 in binary channels, within [-8, 7] in 4-bit ones
    graph = onnx.load(path).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    mixed = [a for a in inits.values() if a.dtype == np.int8 and a.ndim == 4 and set(np.unique(a[1::2])) <= {-1, 1}]
    assert mixed and all(np.abs(a[0::2]).max() <= 8 for a in mixed)
    # packed file round trip: the same outputs
    save_packed_model(model, tmp_path / "mixed.lqp")
    fresh = load_packed_model(resnet8(in_channels=1), tmp_path / "mixed.lqp").eval()
    x = next(iter(digits().val_dataloader()))[0]
    assert torch.equal(fresh(x), model(x))


def test_kernel_codebook_exports_as_integers_and_a_float_codebook_warns(tmp_path: Path, caplog) -> None:
    codebook = LayerSpec(weight_kind="codebook", weight_bits=3, codebook_vector="kernel", codebook_bits=6, act_bits=4)
    spec = QuantSpec(default=LayerSpec(weight_bits=4, act_bits=4), layers={"layer1.0.conv1": codebook})
    model = _trained(spec)
    path = export_onnx(model, tmp_path / "kq.onnx", torch.randn(2, 1, 8, 8))
    assert verify_onnx(model, path, all_digits()).agreement >= 0.999
    float_book = QuantSpec(
        default=LayerSpec(weight_bits=4, act_bits=4),
        layers={"layer1.0.conv1": LayerSpec(weight_kind="codebook", weight_bits=3, act_bits=4)},
    )
    model = _trained(float_book)
    with caplog.at_level(logging.WARNING, logger="lightning_quant.export.onnx"):
        path = export_onnx(model, tmp_path / "float_book.onnx", torch.randn(2, 1, 8, 8))
    assert "the weights of ['layer1.0.conv1'] lie on no uniform grid" in caplog.text
    result = verify_onnx(model, path, all_digits())
    assert result.agreement >= 0.999 and result.float_convs >= 1

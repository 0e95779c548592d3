"""verify_onnx figures, per-layer divergence, int8 conv counting; packed whole-model save/load and sizes."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
import torch
from conftest import all_digits, make_quantized
from onnx import numpy_helper

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.export import (
    PACKED_FILE_PREFIX_BYTES,
    export_onnx,
    load_packed_model,
    model_size_report,
    save_packed_model,
    verify_onnx,
)
from lightning_quant.models import LeNet5, resnet8
from lightning_quant.surgery import quantization_summary, quantized_layers


def test_verify_reports_int8_convs_and_accuracies(tmp_path: Path) -> None:
    model = make_quantized("lenet", "w8a8")
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 1, 8, 8))
    result = verify_onnx(model, path, all_digits(), max_batches=2)
    assert result.num_samples == 512
    assert result.int8_convs == 2 and result.float_convs == 0  # both LeNet convs fuse into QLinearConv
    assert result.int8_ops.get("QLinearConv") == 2
    assert result.torch_accuracy is not None and result.onnx_accuracy is not None
    assert set(result.as_metrics()) >= {"agreement", "max_abs_diff", "int8_convs", "onnx_accuracy"}
    assert "top-1 agreement" in str(result)
    # inputs without labels: no accuracies
    unlabelled = verify_onnx(model, path, [x for x, _ in all_digits()[:1]])
    assert unlabelled.torch_accuracy is None and "onnx_accuracy" not in unlabelled.as_metrics()


def test_residual_quantizers_put_every_conv_in_int8(tmp_path: Path) -> None:
    results = {}
    for recipe in ("w8a8", "w8a8r"):
        model = make_quantized("resnet8", recipe)
        path = export_onnx(model, tmp_path / f"{recipe}.onnx", torch.randn(1, 1, 8, 8))
        results[recipe] = verify_onnx(model, path, all_digits(), max_batches=2)
    # without them the convs before each residual addition (and the stem) have no QuantizeLinear after them
    assert results["w8a8"].float_convs > 0
    assert results["w8a8r"].int8_convs == 9 and results["w8a8r"].float_convs == 0
    assert results["w8a8r"].agreement >= 0.99


def test_per_layer_names_first_divergent_layer(tmp_path: Path) -> None:
    model = make_quantized("lenet", "w8a8")
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 1, 8, 8))
    clean = verify_onnx(model, path, all_digits(), max_batches=1, per_layer=True)
    assert [d.name for d in clean.layers] == list(quantized_layers(model))
    assert clean.first_divergent_layer is None
    # corrupt fc1's weight integers in the file: fc1 is the first layer that diverges
    broken = onnx.load(path)
    for init in broken.graph.initializer:
        if init.name == "fc1.weight_quantized":
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(broken, tmp_path / "broken.onnx")
    result = verify_onnx(model, tmp_path / "broken.onnx", all_digits(), max_batches=1, per_layer=True)
    assert result.first_divergent_layer == "fc1"
    assert [d.diverged for d in result.layers][:2] == [False, False]


def test_verify_errors(tmp_path: Path) -> None:
    model = make_quantized("lenet", "w8a8")
    with pytest.raises(QuantizationConfigError, match=r"does not exist\. Export it first"):
        verify_onnx(model, tmp_path / "missing.onnx", all_digits())
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 1, 8, 8))
    with pytest.raises(QuantizationConfigError, match=r"`max_batches` must be a positive integer"):
        verify_onnx(model, path, all_digits(), max_batches=0)
    with pytest.raises(QuantizationConfigError, match=r"yielded no batch"):
        verify_onnx(model, path, [])


# ---------------------------------------------------------------------------------------- packed models
@pytest.mark.parametrize(
    ("arch", "recipe"), [("lenet", "mixed"), ("resnet8", "w4a4"), ("resnet8", "w8a8"), ("resnet8", "w8a8r")]
)
def test_packed_model_round_trip_is_exact(arch: str, recipe: str, tmp_path: Path) -> None:
    model = make_quantized(arch, recipe)
    path = tmp_path / "model.lqpk"
    written = save_packed_model(model, path)
    assert os.path.getsize(path) == written
    fresh = resnet8(in_channels=1) if arch == "resnet8" else LeNet5(input_size=8)
    load_packed_model(fresh, path)
    fresh.eval()
    x = torch.cat([x for x, _ in all_digits()[:2]])
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # sizes: the file is the report's payload plus its header; the report agrees with quantization_summary
    report = model_size_report(model, encodings=True)
    header = int.from_bytes(path.read_bytes()[8:16], "little")
    assert os.path.getsize(path) == PACKED_FILE_PREFIX_BYTES + header + report.total_bytes
    summary = quantization_summary(model)
    assert abs(report.total_bytes * 8 - summary.quantized_bits) < 8 * len(summary.rows)
    assert report.fp32_bytes * 8 == summary.fp32_bits
    assert report.huffman_bytes is not None and report.zero_run_bytes is not None
    assert "packed" in str(report)


def test_packed_model_errors(tmp_path: Path) -> None:
    with pytest.raises(QuantizationConfigError, match=r"has no quantized layer"):
        save_packed_model(LeNet5(input_size=8), tmp_path / "m.lqpk")
    save_packed_model(make_quantized("lenet", "w8a8"), tmp_path / "m.lqpk")
    with pytest.raises(QuantizationConfigError, match=r"pattern 'conv2' matches no quantizable layer"):
        load_packed_model(resnet8(in_channels=1), tmp_path / "m.lqpk")

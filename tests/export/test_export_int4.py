"""export_onnx(weight_storage=...): INT4/UINT4 weight initializers, agreement, file size, mixed widths, errors."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import all_digits, make_quantized
from onnx import TensorProto, numpy_helper
from torch import nn

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.export import create_session, export_onnx, onnx_metadata, save_packed_model, verify_onnx
from lightning_quant.models import LeNet5, resnet20
from lightning_quant.surgery import LayerSpec, QuantSpec, calibrate, quantize_model, quantized_layers

#: W4A8 on every layer, the first and last included
_W4A8 = QuantSpec(default=LayerSpec(weight_bits=4, act_bits=8), first_last_bits=None)


def _weight_dequantize(path: Path) -> dict[str, tuple[onnx.NodeProto, dict[str, onnx.TensorProto]]]:
    """``{layer: (its weight DequantizeLinear node, {input name: initializer})}`` of an exported file."""
    model = onnx.load(os.fspath(path))
    inits = {i.name: i for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            layer = node.input[0].rstrip("_").removesuffix("_quantized").removesuffix(".weight")
            found[layer] = (node, {name: inits[name] for name in node.input if name in inits})
    return found


def _w4(arch: str) -> nn.Module:
    """The trained digits model of the export tests, W4A4 with the first and last layers' weights at 4 bits too."""
    model = make_quantized(arch, "w4a4")
    for layer in quantized_layers(model).values():
        layer.weight_quantizer.bits = 4
    return model


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _calibrated(model: nn.Module, spec: QuantSpec, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    quantize_model(model, spec)
    return calibrate(model, [torch.randn(*shape) for _ in range(2)])


@pytest.mark.parametrize("arch", ["lenet", "resnet8"])
def test_int4_weights_are_int4_per_channel_and_agree(arch: str, tmp_path: Path) -> None:
    model = _w4(arch)
    int8 = export_onnx(model, tmp_path / "int8.onnx", torch.randn(2, 1, 8, 8))
    int4 = export_onnx(model, tmp_path / "int4.onnx", torch.randn(2, 1, 8, 8), weight_storage="int4")
    assert onnx.load(os.fspath(int4)).opset_import[0].version == 21
    dq8, dq4 = _weight_dequantize(int8), _weight_dequantize(int4)
    layers = quantized_layers(model)
    assert set(dq4) == set(layers)
    for name, (node, inits) in dq4.items():
        weight, scale, zero = (inits[node.input[i]] for i in range(3))
        assert weight.data_type == TensorProto.INT4 and zero.data_type == TensorProto.INT4
        # per-channel axis and scales kept
        assert _axis(node) == _axis(dq8[name][0]) == 0 and len(scale.dims) == 1 and scale.dims[0] == weight.dims[0]
        codes = layers[name].weight_quantizer.int_repr(layers[name].weight).numpy()
        np.testing.assert_array_equal(numpy_helper.to_array(weight).astype(np.int32), codes)
        np.testing.assert_array_equal(numpy_helper.to_array(zero).astype(np.int32), 0)
    result = verify_onnx(model, int4, all_digits())
    assert result.agreement >= 0.999, str(result)
    # before onnxruntime's optimisation the INT4 file computes exactly what the int8 file computes
    x = torch.cat([x for x, _ in all_digits()[:2]]).numpy()
    got4 = create_session(int4, optimization="disable").run(None, {"input": x})[0]
    got8 = create_session(int8, optimization="disable").run(None, {"input": x})[0]
    np.testing.assert_array_equal(got4, got8)
    assert ast.literal_eval(onnx_metadata(int4)["lightning_quant.weight_storage"]) == {
        "int4": len(layers),
        "uint4": 0,
        "int8": 0,
    }


def test_w4_resnet20_int4_file_is_at_most_0_6_of_int8(tmp_path: Path) -> None:
    spec = QuantSpec(default=LayerSpec(weight_bits=4, act_bits=8), first_last_bits=None)
    model = _calibrated(resnet20(), spec, (4, 3, 32, 32))
    example = torch.randn(1, 3, 32, 32)
    int8 = export_onnx(model, tmp_path / "int8.onnx", example)
    int4 = export_onnx(model, tmp_path / "int4.onnx", example, weight_storage="int4")
    size8, size4 = os.path.getsize(int8), os.path.getsize(int4)
    assert size4 <= 0.6 * size8, (size4, size8)
    # the packed size (codes at their real widths) is recorded beside it, and is what save_packed_model writes
    packed = save_packed_model(model, tmp_path / "packed.bin")
    assert (
        int(onnx_metadata(int4)["lightning_quant.packed_bytes"]) == packed == os.path.getsize(tmp_path / "packed.bin")
    )
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    got = create_session(int4).run(None, {"input": x.numpy()})[0]
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_mixed_channel_widths_and_binary_channels_export_as_int4(tmp_path: Path) -> None:
    model = _w4("lenet")
    layers = quantized_layers(model)
    layers["conv1"].weight_quantizer.bits = (1, 2, 4, 2, 4, 1)
    layers["conv2"].weight_quantizer.bits = tuple([2, 4, 3, 1] * 4)
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 1, 8, 8), weight_storage="int4")
    dq = _weight_dequantize(path)
    for name in ("conv1", "conv2"):
        node, inits = dq[name]
        stored = numpy_helper.to_array(inits[node.input[0]]).astype(np.int32)
        assert inits[node.input[0]].data_type == TensorProto.INT4
        quantizer = layers[name].weight_quantizer
        np.testing.assert_array_equal(stored, quantizer.int_repr(layers[name].weight).numpy())
        binary = [c for c, bits in enumerate(quantizer.channel_widths()) if bits == 1]
        assert set(np.unique(stored[binary])) <= {-1, 1}
    # bit-exact before runtime optimisation, and >= 99.9 % top-1 agreement in the deployment session
    x = torch.cat([x for x, _ in all_digits()[:2]])
    got = create_session(path, optimization="disable").run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert verify_onnx(model, path, all_digits()).agreement >= 0.999


def test_unsigned_weight_grid_is_stored_as_uint4(tmp_path: Path) -> None:
    spec = QuantSpec(default=LayerSpec(weight_bits=4, act_bits=8, weight_symmetric=False), first_last_bits=None)
    model = _calibrated(LeNet5(input_size=8), spec, (8, 1, 8, 8))
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 1, 8, 8), weight_storage="int4")
    layers = quantized_layers(model)
    for name, (node, inits) in _weight_dequantize(path).items():
        weight, zero = inits[node.input[0]], inits[node.input[2]]
        assert weight.data_type == zero.data_type == TensorProto.UINT4
        quantizer = layers[name].weight_quantizer
        np.testing.assert_array_equal(
            numpy_helper.to_array(zero).astype(np.int32), quantizer.uniform_grid().zero_point.numpy()
        )
        np.testing.assert_array_equal(
            numpy_helper.to_array(weight).astype(np.int32), quantizer.int_repr(layers[name].weight).numpy()
        )
    x = torch.randn(16, 1, 8, 8)
    got = create_session(path, optimization="disable").run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_auto_keeps_wider_layers_int8_and_prefer_speed(tmp_path: Path) -> None:
    model = make_quantized("lenet", "mixed")  # weights of 8, 3, 5, 2, 8 bits
    bits = {name: layer.weight_quantizer.bits for name, layer in quantized_layers(model).items()}
    path = export_onnx(model, tmp_path / "auto.onnx", torch.randn(2, 1, 8, 8), weight_storage="auto")
    for name, (node, inits) in _weight_dequantize(path).items():
        expected = TensorProto.INT4 if bits[name] <= 4 else TensorProto.INT8
        assert inits[node.input[0]].data_type == expected, (name, bits[name])
    assert verify_onnx(model, path, all_digits()).agreement >= 0.999
    # prefer="speed" on an int8-ready W4A8 model: onnxruntime fuses only int8 weights, so all stay int8 (opset 18)
    ready = _calibrated(LeNet5(input_size=8), _W4A8, (8, 1, 8, 8))
    fast = export_onnx(ready, tmp_path / "fast.onnx", torch.randn(2, 1, 8, 8), weight_storage="auto", prefer="speed")
    assert all(inits[n.input[0]].data_type == TensorProto.INT8 for n, inits in _weight_dequantize(fast).values())
    assert onnx.load(os.fspath(fast)).opset_import[0].version == 18
    small = export_onnx(ready, tmp_path / "small.onnx", torch.randn(2, 1, 8, 8), weight_storage="auto")
    assert all(inits[n.input[0]].data_type == TensorProto.INT4 for n, inits in _weight_dequantize(small).values())


def test_bad_input_fails_before_anything_is_written(tmp_path: Path) -> None:
    mixed = make_quantized("lenet", "mixed")
    w4 = _w4("lenet")
    example = torch.randn(1, 1, 8, 8)
    path = tmp_path / "m.onnx"
    with pytest.raises(QuantizationConfigError, match=r"`weight_storage` must be one of \['int8', 'int4', 'auto'\]"):
        export_onnx(w4, path, example, weight_storage="int2")
    with pytest.raises(QuantizationConfigError, match=r"`prefer` must be one of \['size', 'speed'\], got 'small'"):
        export_onnx(w4, path, example, weight_storage="auto", prefer="small")
    with pytest.raises(
        QuantizationConfigError, match=r"'conv1.weight' \(8 bits\).*'fc1.weight' \(5 bits\).*weight_storage=\"auto\""
    ):
        export_onnx(mixed, path, example, weight_storage="int4")
    with pytest.raises(QuantizationConfigError, match=r"`opset=18` has no INT4/UINT4 tensors.*`opset=21`"):
        export_onnx(w4, path, example, weight_storage="int4", opset=18)
    with pytest.raises(QuantizationConfigError, match=r"`opset=20` has no INT4/UINT4"):
        export_onnx(mixed, path, example, weight_storage="auto", opset=20)
    assert not path.exists()
    # int8 storage still takes the old opsets
    export_onnx(w4, path, example, opset=18)
    assert path.is_file()

"""create_session: int8 products are exact on every CPU (onnxruntime's U8S8 kernels saturate without VNNI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.export.onnx import count_conv_ops
from lightning_quant.export.runtime import create_session, int8_products_saturate

CHANNELS = 16
#: output steps of the two convolutions (their inputs' steps are 1 and the first output step; weights' steps are 1)
STEPS = (2080.0, 2080.0 * 4200.0)


def _qdq_convs(weights: list[np.ndarray]) -> onnx.ModelProto:
    """``x -> Q/DQ (uint8, step 1) -> [Conv 1x1 (int8 weight) -> Q/DQ (uint8)] * len(weights)``.

    The pattern of our exports between quantized layers (onnxruntime fuses each conv into ``QLinearConv``),
    including one weight zero-point initializer (all zeros) shared by the equally wide convs, as in our exports.
    """
    initializers = [
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0, np.uint8), "u8_zero"),
        numpy_helper.from_array(np.zeros(weights[0].shape[0], np.int8), "w_zero"),
        numpy_helper.from_array(np.ones(weights[0].shape[0], np.float32), "w_scale"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "one", "u8_zero"], ["q0"]),
        helper.make_node("DequantizeLinear", ["q0", "one", "u8_zero"], ["dq0"]),
    ]
    for i, (codes, step) in enumerate(zip(weights, STEPS[: len(weights)], strict=True), start=1):
        initializers += [
            numpy_helper.from_array(codes.astype(np.int8), f"w{i}"),
            numpy_helper.from_array(np.array(step, np.float32), f"step{i}"),
        ]
        nodes += [
            helper.make_node("DequantizeLinear", [f"w{i}", "w_scale", "w_zero"], [f"w{i}_dq"], axis=0),
            helper.make_node("Conv", [f"dq{i - 1}", f"w{i}_dq"], [f"conv{i}"]),
            helper.make_node("QuantizeLinear", [f"conv{i}", f"step{i}", "u8_zero"], [f"q{i}"]),
            helper.make_node("DequantizeLinear", [f"q{i}", f"step{i}", "u8_zero"], [f"dq{i}"]),
        ]
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes,
        "qdq_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weights[-1].shape[0], 1, 1])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _reference(x_codes: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """The exact QDQ result: int64 sums of the integer products, requantized to uint8 after each conv."""
    codes, in_step = x_codes.astype(np.int64), 1.0
    for w, step in zip(weights, STEPS[: len(weights)], strict=True):
        ratio = w.reshape(w.shape[0], -1).astype(np.int64) @ codes * in_step / step
        assert np.all(np.abs(ratio - np.floor(ratio) - 0.5) > 1e-3)  # no rounding tie: float requantization agrees
        codes, in_step = np.clip(np.round(ratio), 0, 255).astype(np.int64), step
    return codes * in_step


def test_int8_products_are_exact_on_every_cpu(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # large activation and weight codes; the first output channel of each conv has every weight at 127
    weights = [
        np.concatenate([np.full((1, CHANNELS), 127), rng.integers(90, 128, (CHANNELS - 1, CHANNELS))]).reshape(
            CHANNELS, CHANNELS, 1, 1
        )
        for _ in range(2)
    ]
    x_codes = np.concatenate([np.full(CHANNELS // 2, 255), rng.integers(200, 256, CHANNELS // 2)])
    model = _qdq_convs(weights)
    expected = _reference(x_codes, weights)
    x = {"x": x_codes.astype(np.float32).reshape(1, CHANNELS, 1, 1)}

    session = create_session(model, optimized_model_path=tmp_path / "optimized.onnx")
    int8, flt, _ = count_conv_ops(tmp_path / "optimized.onnx")
    assert (int8, flt) == (2, 0)  # the int8 kernels really ran
    np.testing.assert_array_equal(session.run(None, x)[0].reshape(-1), expected)
    forced = create_session(model, exact_int8=True).run(None, x)[0].reshape(-1)
    np.testing.assert_array_equal(forced, expected)
    # onnxruntime's fast kernels are exact exactly where the probe says they do not saturate
    fast = create_session(model, exact_int8=False).run(None, x)[0].reshape(-1)
    assert np.array_equal(fast, expected) == (not int8_products_saturate())
    # the model passed in is not changed (its shared zero point is copied only for the session)
    assert [i.name for i in model.graph.initializer].count("w_zero") == 1 and len(model.graph.initializer) == 8


def test_exact_int8_argument_is_checked() -> None:
    model = _qdq_convs([np.ones((1, CHANNELS, 1, 1))])
    with pytest.raises(QuantizationConfigError, match=r"`exact_int8` must be True, False or None .*got 'yes'"):
        create_session(model, exact_int8="yes")  # type: ignore[arg-type]


def test_spin_waiting_can_be_turned_off_for_benchmarks() -> None:
    model = _qdq_convs([np.ones((1, CHANNELS, 1, 1))])
    key = "session.intra_op.allow_spinning"
    assert create_session(model).get_session_options().get_session_config_entry(key) == "1"
    session = create_session(model, spin=False)
    assert session.get_session_options().get_session_config_entry(key) == "0"
    x = {"x": np.ones((1, CHANNELS, 1, 1), np.float32)}
    np.testing.assert_array_equal(session.run(None, x)[0], create_session(model).run(None, x)[0])
    with pytest.raises(QuantizationConfigError, match=r"`spin` must be True or False, got 0"):
        create_session(model, spin=0)  # type: ignore[arg-type]


def test_linear_heads_run_as_qgemm_with_their_bias_in_int32(tmp_path: Path) -> None:
    import torch
    from torch import nn

    from lightning_quant.export import export_onnx
    from lightning_quant.surgery import QuantSpec, calibrate, quantize_model

    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), QuantSpec())
    calibrate(model, [torch.randn(64, 16) for _ in range(2)])
    x = torch.randn(256, 16)
    path = export_onnx(model, tmp_path / "mlp.onnx", x[:1])
    counts = {}
    outputs = {}
    for quantize_bias in (True, False):
        optimized = tmp_path / f"optimized_{quantize_bias}.onnx"
        session = create_session(path, optimized_model_path=optimized, quantize_bias=quantize_bias)
        counts[quantize_bias] = [n.op_type for n in onnx.load(optimized).graph.node].count("QGemm")
        outputs[quantize_bias] = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert counts == {True: 2, False: 0}  # onnxruntime itself fuses no Gemm with a float bias
    expected = model(x).detach().numpy()
    step = float(model[2].input_quantizer.uniform_grid().scale.reshape(-1)[0])
    # the int32 bias moves the result by half a step of s_x * s_w at most; the rest is integer rounding
    np.testing.assert_allclose(outputs[True], expected, atol=2 * step)
    np.testing.assert_allclose(outputs[True], outputs[False], atol=2 * step)
    assert [t.name for t in onnx.load(path).graph.initializer if t.data_type == TensorProto.INT32] == []  # file as is

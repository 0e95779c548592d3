"""The int8 deployment path: run an exported QDQ file in ONNX Runtime (and OpenVINO when installed).

What makes int8 really faster than fp32 on a CPU (measured on the project's 2-core AVX512-VNNI machine, see
``BENCHMARKS.md``): every convolution must fuse into ``QLinearConv``. :func:`~lightning_quant.export.export_onnx`
prepares the graph for that (BatchNorm folded, weight integers as initializers, no ``Identity`` on constants,
unsigned activations with signed weights -- U8S8); :func:`create_session` then keeps onnxruntime's full graph
optimisation (``ORT_ENABLE_ALL``, which does the QDQ -> ``QLinearConv`` fusion) and 2 intra-op threads.

``quant_pre_process`` (onnxruntime's symbolic shape inference + graph clean-up) is what ORT recommends on the
*float* graph before its own ``quantize_static``. Our exporter already writes the QDQ graph with inferred shapes
and no removable nodes; :func:`preprocess` applies it anyway when ``preprocess=True`` (shape inference only,
no optimisation pass, so the Q/DQ pairs are not folded away). The benchmark measures both: it changes neither
the fused graph nor the latency of our exports (``benchmarks/export_latency.py``), so it is off by default.

OpenVINO (optional extra ``lightning-quant[openvino]``) runs the same QDQ file with its own int8 kernels:
:func:`create_openvino_model` compiles it for the CPU with ``INFERENCE_PRECISION_HINT=f32`` (OpenVINO defaults
to bf16 on CPUs that have it, which would change the float parts of the graph).

Exact int8 products on every x86 CPU. onnxruntime's fast U8S8 kernels for x86 CPUs *without* VNNI (AVX2-only
CPUs, AVX512 without VNNI) multiply with ``vpmaddubsw``, which adds each pair of ``uint8 * int8`` products in a
saturating int16: two activations near 255 times two weights near 127 overflow, and the convolution's sum is
clipped (measured on an AVX2-only AMD EPYC: a W8A8 LeNet-5 on digits agreed with its fake-quant model on only
90-96 % of the top-1 predictions, logits off by up to 0.36). VNNI CPUs and ARM sum in int32 and are exact. onnxruntime's
session option ``session.x64quantprecision`` rewrites constant int8 weights to uint8 so that its exact (slower)
U8U8 kernels run. :func:`int8_products_saturate` probes once per process whether this CPU's U8S8 kernels saturate,
and :func:`create_session` turns the option on exactly there (our choice: correct results by default, full speed
where the fast kernels are exact -- onnxruntime's own check also switches to U8U8 on VNNI CPUs, where U8U8 is
several times slower).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import onnx

from lightning_quant.core.errors import QuantizationConfigError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_THREADS",
    "create_openvino_model",
    "create_session",
    "int8_products_saturate",
    "openvino_available",
    "preprocess",
]

#: intra-op threads of the deployment session (the measured optimum on the 2-core machine)
DEFAULT_THREADS = 2


def preprocess(onnx_path: str | os.PathLike[str], output_path: str | os.PathLike[str]) -> Path:
    """onnxruntime's ``quant_pre_process`` (symbolic shape inference, no optimisation pass) into ``output_path``."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(os.fspath(onnx_path), os.fspath(output_path), skip_optimization=True, skip_onnx_shape=False)
    return Path(output_path)


#: onnxruntime's session option that replaces its U8S8 kernels by exact U8U8 ones on x86 (see the module docstring)
_EXACT_INT8_OPTION = "session.x64quantprecision"


@functools.cache
def int8_products_saturate() -> bool:
    """Whether onnxruntime's default int8 (U8S8) kernels saturate on this CPU (probed once per process).

    Runs ``MatMulInteger`` of a row of 255s (uint8) by a constant column of 127s (int8) in a default CPU session
    and compares it with the exact integer sum: x86 CPUs without VNNI add product pairs in a saturating int16
    (``32767`` instead of ``2 * 255 * 127 = 64770``).
    """
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 64
    weights = numpy_helper.from_array(np.full((k, 1), 127, np.int8), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "u8s8_probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    got = int(session.run(None, {"a": np.full((1, k), 255, np.uint8)})[0][0, 0])
    saturates = got != 255 * 127 * k
    if saturates:
        log.info(
            "onnxruntime's U8S8 int8 kernels saturate on this CPU (no VNNI): int8 sessions use its exact, slower U8U8 "
            "kernels (`%s`).",
            _EXACT_INT8_OPTION,
        )
    return saturates


def _weight_dequantize_nodes(graph: onnx.GraphProto) -> tuple[list[onnx.NodeProto], dict[str, onnx.TensorProto]]:
    initializers = {t.name: t for t in graph.initializer}
    nodes = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input and n.input[0] in initializers]
    return nodes, initializers


def _shared_weight_dequantize_inputs(model: onnx.ModelProto) -> bool:
    """Whether two weight ``DequantizeLinear`` nodes share an initializer (e.g. one all-zero zero-point tensor)."""
    nodes, initializers = _weight_dequantize_nodes(model.graph)
    names = [name for node in nodes for name in node.input if name in initializers]
    return len(names) != len(set(names))


def _unshare_weight_dequantize_inputs(model: onnx.ModelProto) -> None:
    """Give every weight ``DequantizeLinear`` its own copies of the initializers it shares with another one (in place).

    onnxruntime 1.32's ``session.x64quantprecision`` rewrite turns each int8 weight and its zero point into uint8
    initializers and fails on the second user of a shared zero point ("Attempt to replace the existing tensor");
    our exports share one zero-point tensor among equally wide layers. Copies change no value.
    """
    graph = model.graph
    nodes, initializers = _weight_dequantize_nodes(graph)
    taken = set(initializers) | {name for node in graph.node for name in (*node.input, *node.output)}
    seen: set[str] = set()
    for node in nodes:
        for position, name in enumerate(node.input):
            if name not in initializers:
                continue
            if name not in seen:
                seen.add(name)
                continue
            index = 1
            while f"{name}_copy{index}" in taken:
                index += 1
            duplicate = onnx.TensorProto()
            duplicate.CopyFrom(initializers[name])
            duplicate.name = f"{name}_copy{index}"
            taken.add(duplicate.name)
            graph.initializer.append(duplicate)
            node.input[position] = duplicate.name


def _float_gemm_biases(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, Any, Any]]:
    """The ``Gemm`` nodes between ``DequantizeLinear`` inputs whose bias is a float initializer, each with the
    scale of its input and that of its weight (per tensor, or per output channel along the weight's axis 0 with
    ``transB=1``): onnxruntime fuses such a Gemm into ``QGemm`` only with an int32 bias."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    found = []
    for node in graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in initializers:
            continue
        a, b = producers.get(node.input[0]), producers.get(node.input[1])
        if a is None or b is None or a.op_type != "DequantizeLinear" or b.op_type != "DequantizeLinear":
            continue
        if a.input[1] not in initializers or b.input[1] not in initializers:
            continue
        attributes = {at.name: onnx.helper.get_attribute_value(at) for at in (*node.attribute, *b.attribute)}
        bias = numpy_helper.to_array(initializers[node.input[2]])
        a_scale = numpy_helper.to_array(initializers[a.input[1]])
        b_scale = numpy_helper.to_array(initializers[b.input[1]])
        per_channel = b_scale.size > 1
        if (
            a_scale.size != 1
            or bias.ndim != 1
            or attributes.get("alpha", 1.0) != 1.0
            or attributes.get("beta", 1.0) != 1.0
        ):
            continue
        if per_channel and (
            b_scale.size != bias.size or attributes.get("transB", 0) != 1 or attributes.get("axis", 1) != 0
        ):
            continue
        found.append((node, bias, (a_scale.reshape(()) * b_scale).astype("float32")))
    return found


def _quantize_gemm_biases(model: onnx.ModelProto) -> None:
    """Store each bias of :func:`_float_gemm_biases` as int32 at step ``s_input * s_weight`` behind a
    ``DequantizeLinear`` (in place), as onnxruntime's ``WeightBiasQuantization`` does for convolutions (which it
    leaves out for Gemm): the linear head then runs as ``QGemm`` instead of dequantizing its weight every run."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    for k, (node, bias, scale) in enumerate(_float_gemm_biases(graph)):
        codes = np.clip(np.rint(bias / scale), np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
        names = [f"{node.input[2]}_int32_{k}", f"{node.input[2]}_int32_scale_{k}", f"{node.input[2]}_int32_zp_{k}"]
        graph.initializer.extend(
            [
                numpy_helper.from_array(codes, names[0]),
                numpy_helper.from_array(scale, names[1]),
                numpy_helper.from_array(np.zeros(scale.shape, np.int32), names[2]),
            ]
        )
        output = f"{node.input[2]}_dequantized_{k}"
        dequantize = onnx.helper.make_node("DequantizeLinear", names, [output], axis=0)
        graph.node.insert(list(graph.node).index(node), dequantize)
        node.input[2] = output


def create_session(
    onnx_model: str | os.PathLike[str] | onnx.ModelProto,
    *,
    threads: int = DEFAULT_THREADS,
    optimized_model_path: str | os.PathLike[str] | None = None,
    preprocess_graph: bool = False,
    optimization: str = "all",
    quantize_bias: bool | None = None,
    exact_int8: bool | None = None,
    spin: bool = True,
) -> Any:
    """An onnxruntime CPU ``InferenceSession`` for the int8 deployment of an exported QDQ model.

    Args:
        onnx_model: a path or an in-memory ``onnx.ModelProto``.
        threads: intra-op threads (inter-op is 1, sequential execution).
        optimized_model_path: where onnxruntime saves the graph it really runs (to count fused int8 ops).
        preprocess_graph: run :func:`preprocess` (``quant_pre_process``) first.
        optimization: ``all`` (``ORT_ENABLE_ALL``, the int8 fusions), ``extended``, ``basic`` or ``disable``.
        quantize_bias: let onnxruntime quantize float conv biases to int32 at step ``s_x * s_w``
            (``WeightBiasQuantization``), which ``QLinearConv`` fusion needs, and do the same for the biases of
            ``Gemm`` layers between Q/DQ (a linear head), which ``QGemm`` fusion needs and onnxruntime leaves
            out (at the ``all`` and ``extended`` levels, where it fuses). ``None`` (default): on for files that
            :func:`~lightning_quant.export.export_onnx` marked int8-ready (all activations 8-bit), off otherwise
            -- their convs stay in float anyway, and without the int32 rounding of the bias the session computes
            the fake-quant model exactly.
        exact_int8: make onnxruntime compute int8 products exactly (``session.x64quantprecision``: constant int8
            weights become uint8 and its U8U8 kernels run; weights that share a zero-point initializer get their
            own copies first, which the rewrite needs). ``None`` (default): on where :func:`int8_products_saturate`
            says the fast kernels saturate (x86 CPUs without VNNI), off elsewhere, where they are exact. ``False``
            keeps the fast, saturating kernels.
        spin: let idle intra-op threads spin-wait for the next run (onnxruntime's default: lowest latency for one
            session). ``False`` where sessions take turns on few cores, as latency benchmarks do: the spinning
            threads of the session that just ran otherwise take the cores from the next (on 2 cores this alone
            made one of two equal models time 1.3x slower).

    Returns:
        The ``onnxruntime.InferenceSession``.
    """
    import onnxruntime as ort

    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    if optimization not in levels:
        raise QuantizationConfigError(f"`optimization` must be one of {list(levels)}, got {optimization!r}.")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise QuantizationConfigError(f"`threads` must be a positive integer, got {threads!r}.")
    if exact_int8 is not None and not isinstance(exact_int8, bool):
        raise QuantizationConfigError(f"`exact_int8` must be True, False or None (probe this CPU), got {exact_int8!r}.")
    if not isinstance(spin, bool):
        raise QuantizationConfigError(f"`spin` must be True or False, got {spin!r}.")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if optimized_model_path is not None:
        options.optimized_model_filepath = os.fspath(optimized_model_path)
    if isinstance(onnx_model, onnx.ModelProto):
        proto = onnx_model
        source: Any = onnx_model.SerializeToString()
    else:
        source = os.fspath(onnx_model)
        proto = onnx.load(source, load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if quantize_bias is None:
        quantize_bias = meta.get("lightning_quant.int8_ready", "True") == "True"
    if not quantize_bias:
        options.add_session_config_entry("optimization.disable_specified_optimizers", "WeightBiasQuantization")
    if exact_int8 is None:
        exact_int8 = int8_products_saturate()
    if exact_int8:
        options.add_session_config_entry(_EXACT_INT8_OPTION, "1")
    unshare = exact_int8 and _shared_weight_dequantize_inputs(proto)
    # only where onnxruntime fuses Q/DQ into integer ops (its QGemm fusion runs from the extended level on)
    gemm_biases = quantize_bias and optimization in ("all", "extended") and bool(_float_gemm_biases(proto.graph))
    if unshare or gemm_biases:
        proto = onnx.load(source) if isinstance(source, str) else onnx.load_from_string(source)
        if unshare:
            _unshare_weight_dequantize_inputs(proto)
        if gemm_biases:
            _quantize_gemm_biases(proto)
        source = proto.SerializeToString()
    if preprocess_graph:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.onnx"
            if isinstance(source, bytes):
                raw.write_bytes(source)
            else:
                raw = Path(source)
            out = preprocess(raw, Path(tmp) / "pre.onnx")
            source = out.read_bytes()
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def openvino_available() -> bool:
    """Whether the optional ``openvino`` package can be imported."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def create_openvino_model(
    onnx_path: str | os.PathLike[str], *, threads: int = DEFAULT_THREADS, precision: str = "f32"
) -> Any:
    """Compile an exported QDQ file with OpenVINO for the CPU (int8 kernels for the Q/DQ-wrapped layers).

    Args:
        onnx_path: the file written by :func:`~lightning_quant.export.export_onnx`.
        threads: ``INFERENCE_NUM_THREADS``.
        precision: ``INFERENCE_PRECISION_HINT`` of the float parts: ``f32`` (default, exact) or ``bf16``.

    Returns:
        The ``openvino.CompiledModel``; call it with a numpy batch, e.g. ``compiled(x)[0]``.

    Raises:
        ImportError: OpenVINO is not installed (``pip install lightning-quant[openvino]``).
    """
    try:
        import openvino as ov
    except ImportError as err:
        raise ImportError(
            "create_openvino_model needs OpenVINO: `pip install lightning-quant[openvino]` (or `pip install openvino`)."
        ) from err
    core = ov.Core()
    model = core.read_model(os.fspath(onnx_path))
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    return core.compile_model(model, "CPU", config)

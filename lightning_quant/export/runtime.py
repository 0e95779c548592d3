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
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import onnx

from lightning_quant.core.errors import QuantizationConfigError

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_THREADS", "create_openvino_model", "create_session", "openvino_available", "preprocess"]

#: intra-op threads of the deployment session (the measured optimum on the 2-core machine)
DEFAULT_THREADS = 2


def preprocess(onnx_path: str | os.PathLike[str], output_path: str | os.PathLike[str]) -> Path:
    """onnxruntime's ``quant_pre_process`` (symbolic shape inference, no optimisation pass) into ``output_path``."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(os.fspath(onnx_path), os.fspath(output_path), skip_optimization=True, skip_onnx_shape=False)
    return Path(output_path)


def create_session(
    onnx_model: str | os.PathLike[str] | onnx.ModelProto,
    *,
    threads: int = DEFAULT_THREADS,
    optimized_model_path: str | os.PathLike[str] | None = None,
    preprocess_graph: bool = False,
    optimization: str = "all",
    quantize_bias: bool | None = None,
) -> Any:
    """An onnxruntime CPU ``InferenceSession`` for the int8 deployment of an exported QDQ model.

    Args:
        onnx_model: a path or an in-memory ``onnx.ModelProto``.
        threads: intra-op threads (inter-op is 1, sequential execution).
        optimized_model_path: where onnxruntime saves the graph it really runs (to count fused int8 ops).
        preprocess_graph: run :func:`preprocess` (``quant_pre_process``) first.
        optimization: ``all`` (``ORT_ENABLE_ALL``, the int8 fusions), ``extended``, ``basic`` or ``disable``.
        quantize_bias: let onnxruntime quantize float conv biases to int32 at step ``s_x * s_w``
            (``WeightBiasQuantization``), which ``QLinearConv`` fusion needs. ``None`` (default): on for files
            that :func:`~lightning_quant.export.export_onnx` marked int8-ready (all activations 8-bit), off
            otherwise -- their convs stay in float anyway, and without the int32 rounding of the bias the
            session computes the fake-quant model exactly.

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
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if optimized_model_path is not None:
        options.optimized_model_filepath = os.fspath(optimized_model_path)
    if isinstance(onnx_model, onnx.ModelProto):
        source: Any = onnx_model.SerializeToString()
        meta = {p.key: p.value for p in onnx_model.metadata_props}
    else:
        source = os.fspath(onnx_model)
        meta = {p.key: p.value for p in onnx.load(source, load_external_data=False).metadata_props}
    if quantize_bias is None:
        quantize_bias = meta.get("lightning_quant.int8_ready", "True") == "True"
    if not quantize_bias:
        options.add_session_config_entry("optimization.disable_specified_optimizers", "WeightBiasQuantization")
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

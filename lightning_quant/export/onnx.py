"""Export a quantized model to ONNX with QuantizeLinear/DequantizeLinear, and check it in onnxruntime.

:func:`export_onnx` writes a QDQ ("quantize-dequantize") ONNX model that any runtime with an int8 backend can
run: per-channel int8 weights stored as integers behind a ``DequantizeLinear``, per-tensor activations as
``QuantizeLinear -> DequantizeLinear`` pairs in front of each quantized Conv/Gemm. How the PyTorch model
becomes that graph, on a copy (the model passed in is never changed):

1. BatchNorm layers that follow a convolution are folded into it (:func:`~lightning_quant.surgery.fold_batchnorm`,
   eval-mode statistics). With per-channel weights the fold keeps every weight integer, so it is exact; a pair
   that cannot be folded exactly (per-tensor weight scales) is left unfolded and logged.
2. Learned step sizes (LSQ) and thresholds are frozen: each quantizer is replaced by a constant copy that
   uses only ops which export as Q/DQ (``quantized_decomposed`` per-tensor Q/DQ with Python constants, which
   trace with a dynamic batch dimension; per-channel ``fake_quantize`` for the weights).
3. Widths below 8 bits are exported bit-exactly: activations are clamped to ``[(qmin - z) s, (qmax - z) s]``
   and then quantized on the 8-bit range with the same ``s`` and ``z``; weights are replaced by their
   fake-quantized values, whose 8-bit integers are the low-bit integers. Binary weights become ``+-1`` int8
   integers with the per-channel scale.
4. After export the graph is cleaned for runtimes: every ``QuantizeLinear`` of a constant weight is folded into
   an integer initializer (so ``DequantizeLinear(int8 weight)`` feeds the Conv, the pattern onnxruntime fuses
   into ``QLinearConv``), ``Identity`` nodes on constants are removed, and the exporter's per-node debug records
   (stack traces, FX node text; only the layer scopes are kept) and the shape records of removed tensors are
   dropped.

Weight storage (``weight_storage``). ``"int8"`` (the default) stores every weight as int8/uint8 integers, whatever
its width. ``"int4"`` stores every weight whose integer grid fits in 4 bits (signed grids of 1-4 bits, binary and
per-channel mixed widths included, as ONNX ``INT4``; unsigned asymmetric grids of up to 4 bits as ``UINT4``, with
the zero point in the same type) in the ``DequantizeLinear`` initializers, packed two per byte, per-channel axis
and scales unchanged; a wider layer is an error that names it. ``"auto"`` stores the layers that fit as INT4/UINT4
and the wider ones as int8. INT4 tensors need ONNX opset 21 (and IR version 10): the file is written at opset 21
unless ``opset`` says otherwise, and an explicit ``opset`` below 21 is an error raised before anything is written.

What onnxruntime 1.32 does with such files (checked on toy graphs of ``QuantizeLinear -> DequantizeLinear`` on
the activation, ``DequantizeLinear`` of a per-channel INT4/UINT4 initializer on the weight, then ``Conv``,
``Gemm`` or ``MatMul`` and an output Q/DQ pair): it accepts INT4 and UINT4 weights with a per-channel ``axis``
feeding all three ops and computes them exactly (same outputs as the numpy reference); with ``ORT_ENABLE_ALL`` its
optimizer does *not* fuse them into ``QLinearConv``/``QGemm``/``QLinearMatMul`` (it does for int8 weights): the
weights are dequantized at each run and the layer runs in float. So INT4 storage trades int8 kernels for size
where a layer could have run in int8, and costs only the dequantization where the layer runs in float anyway
(activations below 8 bits). ``prefer`` decides ``"auto"`` (our rule): ``"size"`` (default) stores every layer
that fits as INT4; ``"speed"`` keeps int8 everywhere when the model is int8-ready (every quantized activation
8-bit, so onnxruntime can fuse the convs into ``QLinearConv``) and stores INT4 otherwise. ``benchmarks/
export_latency.py`` measures both files. The export logs the file's size beside the size of
:func:`~lightning_quant.export.packing.save_packed_model`'s file (codes packed at their real widths) and writes
both, with the count of INT4/UINT4/int8 weights, into the file's metadata.

Torch's default (dynamo) exporter is used; if it fails, the TorchScript exporter (``dynamo=False``) is tried,
with a logged warning that names the dynamo error.

Numerics. Without BatchNorm folding and without runtime fusions the graph computes the fake-quant model
exactly (low-bit, binary and mixed widths included; tested). Two things can move an activation by one step:
(1) the fold reorders float arithmetic, and a value that sat on a rounding tie may round the other way;
(2) an int8 runtime quantizes each conv bias to int32 at step ``s_x * s_w`` and re-rounds conv outputs in
``QLinearConv``. One moved activation perturbs later layers a little, so logits differ by a small multiple of
the output step; top-1 agreement stays >= 99.9% on trained models (tested on digits). ``fold_batchnorm="auto"``
therefore folds only int8-ready models (every quantized activation 8-bit): below 8 bits the exported clamp keeps
convs in float anyway, so nothing is gained by folding, and the file stays exact. The same rule switches off
onnxruntime's int32 bias quantization for such files (:func:`lightning_quant.export.runtime.create_session`).

Convs whose output reaches anything but one quantized layer (a residual ``Add``, a concatenation, SiLU...) stay in
float in onnxruntime unless the model was quantized with ``quantize_residuals=True``: layers quantize only their
*inputs*, so no QuantizeLinear follows those convs and onnxruntime cannot form ``QLinearConv``.
:func:`int8_blockers` names them from the PyTorch model; :func:`verify_onnx` reports how many convs really run in
int8.

:func:`verify_onnx` runs the exported file in onnxruntime (the int8 deployment session of
:mod:`lightning_quant.export.runtime`) beside the PyTorch model, and reports agreement, logit differences,
accuracies, how many convolutions really run in int8 after onnxruntime's graph optimisation, and optionally
the first layer whose output diverges.

Example:
    >>> path = export_onnx(model, "model.onnx", torch.randn(1, 1, 28, 28))  # doctest: +SKIP
    >>> print(verify_onnx(model, path, datamodule.val_dataloader()))  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import copy
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from lightning_quant.core.errors import QuantizationConfigError, UnsupportedModuleError
from lightning_quant.core.functional import fake_quantize
from lightning_quant.core.quantizers import Quantizer, UniformGrid
from lightning_quant.export.packing import save_packed_model
from lightning_quant.surgery.capture import capture
from lightning_quant.surgery.fold import fold_batchnorm as _fold_batchnorm
from lightning_quant.surgery.graph import CONV_TYPES, conv_output_placements
from lightning_quant.surgery.layers import activation_quantizers, quantized_layers
from lightning_quant.surgery.quantize import is_quantized

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_OPSET",
    "FLOAT_CONV_OPS",
    "INT4_OPSET",
    "INT8_CONV_OPS",
    "PREFER",
    "TASKS",
    "WEIGHT_STORAGE",
    "LayerDiff",
    "Task",
    "VerificationResult",
    "count_conv_ops",
    "export_onnx",
    "int8_blockers",
    "int8_ready",
    "onnx_metadata",
    "prepare_for_export",
    "resolve_example_input",
    "verify_onnx",
]

#: ONNX opset of the exported file (per-channel QuantizeLinear needs >= 13)
DEFAULT_OPSET = 18
#: the first ONNX opset with INT4/UINT4 tensors (``weight_storage="int4"``/``"auto"``)
INT4_OPSET = 21
#: weight storage choices of :func:`export_onnx`
WEIGHT_STORAGE: tuple[str, ...] = ("int8", "int4", "auto")
#: what ``weight_storage="auto"`` optimises for
PREFER: tuple[str, ...] = ("size", "speed")
#: op types of an optimised onnxruntime graph that run a convolution in integer arithmetic
INT8_CONV_OPS: tuple[str, ...] = ("QLinearConv", "ConvInteger")
#: op types of an optimised onnxruntime graph that run a convolution in float
FLOAT_CONV_OPS: tuple[str, ...] = ("Conv", "FusedConv", "NhwcConv", "NhwcFusedConv")
_METADATA_PRODUCER = "lightning-quant"


# ------------------------------------------------------------------------------------------------ preparation
def _decomposed_ops() -> Any:
    """``torch.ops.quantized_decomposed`` (Q/DQ ops with meta kernels, so dynamic batch sizes trace)."""
    import torch.ao.quantization.fx._decomposed

    return torch.ops.quantized_decomposed


class _ExportQuantizer(nn.Module):
    """A frozen copy of a quantizer's uniform grid (``Quantizer.uniform_grid``) written with ops that export as
    8-bit Q/DQ.

    Per-tensor: ``quantized_decomposed.quantize_per_tensor`` / ``dequantize_per_tensor`` with Python constants
    (aten's fused per-tensor fake-quant has no meta kernel, so torch.export cannot trace it with a dynamic batch
    dimension). Per-channel: the fused ``fake_quantize_per_channel_affine`` with constant buffers (used for
    weights, whose shape is static).

    A grid narrower than 8 bits is exported exactly: ``x`` is first clamped to ``[(qmin - z) s, (qmax - z) s]``
    and then quantized on the int8/uint8 range with the same ``s`` and ``z``, so every value lands on the same
    integer as at ``bits``. ``clamp=False`` skips the clamp for a weight that already holds its fake-quant
    values (which also makes binary weights +-1 integers with step ``s``, per-channel widths and codebook values
    integers of their grids).
    """

    def __init__(self, quantizer: Quantizer, *, clamp: bool) -> None:
        super().__init__()
        grid = quantizer.uniform_grid()
        if grid is None:
            raise UnsupportedModuleError(f"A {quantizer.KIND} quantizer without a uniform grid has no Q/DQ form.")
        scale = grid.scale.detach().clone().float()
        zero_point = grid.zero_point.detach().clone()
        self.bits = quantizer.bits  # read by the layer's summary and repr
        self.ch_axis = grid.ch_axis
        low = int(grid.qmin.min()) if isinstance(grid.qmin, Tensor) else grid.qmin
        self.qmin, self.qmax = (-128, 127) if low < 0 else (0, 255)
        self.dtype = torch.int8 if self.qmin < 0 else torch.uint8
        self.per_tensor = scale.numel() == 1 and grid.ch_axis is None
        # the TorchScript exporter knows aten's fake-quant but not the quantized_decomposed ops
        self.use_decomposed = self.per_tensor
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        # Python constants, read once here (never `.item()` in forward)
        self.scale_value = float(scale.reshape(-1)[0])
        self.zero_point_value = int(zero_point.reshape(-1)[0])
        self.bounds: tuple[float, float] | None = None
        if clamp and (grid.qmin, grid.qmax) != (self.qmin, self.qmax):
            if not self.per_tensor or isinstance(grid.qmin, Tensor):
                raise UnsupportedModuleError("Per-channel activation quantizers below 8 bits cannot be exported.")
            self.bounds = (
                (grid.qmin - self.zero_point_value) * self.scale_value,
                (grid.qmax - self.zero_point_value) * self.scale_value,
            )

    def forward(self, x: Tensor) -> Tensor:
        if self.bounds is not None:
            x = torch.clamp(x, self.bounds[0], self.bounds[1])
        if self.use_decomposed:
            ops = _decomposed_ops()
            args = (self.scale_value, self.zero_point_value, self.qmin, self.qmax, self.dtype)
            return ops.dequantize_per_tensor(ops.quantize_per_tensor(x, *args), *args)
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.ch_axis)


class _FloatWeight(nn.Module):
    """Stands in for a weight quantizer whose values lie on no uniform grid: the weight is exported as its exact
    (dequantized) float values and the layer runs in float."""

    def __init__(self, bits: int | tuple[int, ...]) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, x: Tensor) -> Tensor:
        return x


def _check_exportable(model: nn.Module) -> None:
    if not is_quantized(model):
        raise QuantizationConfigError(
            f"`model` ({type(model).__name__}) has no quantized layer, so there is nothing to export as Q/DQ. "
            "HINT: train with `QuantizationAwareTraining` (or call `quantize_model(model, spec)` and calibrate); "
            "for a float model use `torch.onnx.export` directly."
        )
    for name, quantizer in model.named_modules():
        role = name.rsplit(".", 1)[-1]
        if not isinstance(quantizer, Quantizer) and (
            not role.endswith("_quantizer") or isinstance(quantizer, nn.Identity)
        ):
            continue
        owner = name.rsplit(".", 1)[0] if "." in name else "<model>"
        if not isinstance(quantizer, Quantizer):
            raise UnsupportedModuleError(
                f"Layer {owner!r} has a {role} of type {type(quantizer).__name__}, which is not a lightning-quant "
                "quantizer, so the ONNX exporter cannot express it as QuantizeLinear/DequantizeLinear. HINT: "
                "subclass `lightning_quant.core.Quantizer` (and register it), or dequantize that layer "
                "(`exclude=[...]` in the spec)."
            )
        if not quantizer.is_initialized:
            raise QuantizationConfigError(
                f"The {role} of layer {owner!r} has never seen data, so its step size is arbitrary. HINT: "
                "calibrate first: run a few batches through the model in training mode (a quantization "
                "callback does this during fit)."
            )
        if role != "weight_quantizer" and quantizer.uniform_grid() is None:
            raise UnsupportedModuleError(
                f"The {role} of layer {owner!r} ({quantizer.KIND}) lies on no uniform grid, which ONNX Q/DQ needs "
                "for activations."
            )
        if role != "weight_quantizer" and quantizer.bits == 1:
            raise UnsupportedModuleError(f"Layer {owner!r} has a binary {role}, which ONNX cannot express.")


def int8_ready(model: nn.Module) -> bool:
    """Whether every quantized activation of ``model`` has 8 bits (what int8 runtime kernels take).

    Layers with float inputs (``act_bits=None``) do not count against it; narrower activations (inputs or
    residual outputs) do: they are
    exported as a float clamp before an 8-bit Q/DQ, which keeps their conv out of ``QLinearConv``.
    """
    return all(quantizer.bits == 8 for quantizer in activation_quantizers(model).values())


def int8_blockers(model: nn.Module) -> dict[str, str]:
    """The quantized convolutions of ``model`` that an int8 runtime cannot run in integers, each with the reason.

    A convolution runs as ``QLinearConv`` when its input is quantized to 8 bits, its weights lie on an integer grid
    and its output -- after the BatchNorm folded into it and a ReLU -- goes to exactly one quantizer (see
    :func:`~lightning_quant.surgery.graph.conv_output_placements`, which ``QuantSpec(quantize_residuals=True)``
    uses to place them). Read from the PyTorch model, so it names the layers; it errs on the safe side (a conv whose
    output feeds several quantized layers is named, though onnxruntime fuses it when their input quantizers happen
    to have equal scales). ``verify_onnx`` counts
    what onnxruntime really runs (which may include convolutions it makes itself, e.g. from a BatchNorm after
    pooling).

    Example:
        >>> from lightning_quant.surgery import QuantSpec, quantize_model
        >>> def net():
        ...     return nn.Sequential(nn.Conv2d(1, 4, 3), nn.SiLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 2))
        >>> list(int8_blockers(quantize_model(net(), QuantSpec())))
        ['0']
        >>> int8_blockers(quantize_model(net(), QuantSpec(quantize_residuals=True)))
        {}
    """
    layers = quantized_layers(model)
    quantized_inputs = {name for name, layer in layers.items() if isinstance(layer.input_quantizer, Quantizer)}
    reasons: dict[str, str] = {}
    for name, layer in layers.items():
        if not isinstance(layer, CONV_TYPES):
            continue
        if name not in quantized_inputs:
            reasons[name] = "its input is not quantized (`act_bits=None`)"
        elif layer.input_quantizer.bits != 8:
            reasons[name] = f"its input is quantized to {layer.input_quantizer.bits} bits; int8 kernels take 8"
        elif layer.weight_quantizer.uniform_grid() is None:
            reasons[name] = "its weights lie on no uniform grid (a float codebook)"
    try:
        placements = conv_output_placements(model, quantized_inputs)
    except QuantizationConfigError as err:
        log.info("int8_blockers: cannot trace %s (%s); only layer-local reasons are reported", type(model), err)
        return reasons
    modules = dict(model.named_modules())
    for end, (conv, _) in placements.items():
        if conv not in reasons and not isinstance(getattr(modules[end], "output_quantizer", None), Quantizer):
            reasons[conv] = (
                f"no quantizer follows its output (after {end!r}), which reaches an addition, concatenation, "
                "product, pooling, an activation other than ReLU or several layers. HINT: quantize with "
                "`quantize_residuals=True`"
            )
    return reasons


def _deepcopy(model: nn.Module) -> nn.Module:
    """A deep copy that does not copy an attached Lightning Trainer."""
    memo: dict[int, Any] = {}
    trainer = model.__dict__.get("_trainer")
    if trainer is not None:
        memo[id(trainer)] = None
    return copy.deepcopy(model, memo)


@torch.no_grad()
def prepare_for_export(model: nn.Module, *, fold_batchnorm: bool = True) -> nn.Module:
    """The CPU, eval-mode copy of ``model`` that :func:`export_onnx` traces (``model`` is not changed).

    BatchNorm folded (exact pairs only), weights replaced by their fake-quantized values behind constant
    8-bit weight Q/DQ, activation quantizers (layer inputs, residual outputs) replaced by constant 8-bit Q/DQ
    (with a clamp below 8 bits). Its
    outputs equal ``model``'s in eval mode up to float rounding of the fold.
    """
    _check_exportable(model)
    _decomposed_ops()  # register the ops before an exporter builds its op table
    prepared = _deepcopy(model).cpu().eval()
    if fold_batchnorm:
        folded = _fold_batchnorm(prepared, inexact="skip")
        log.debug("export: folded %d BatchNorm layers", len(folded))
    float_weights = []
    for name, layer in quantized_layers(prepared).items():
        for param_name, param, quantizer in layer.quantized_parameters():
            param.copy_(quantizer(param))
            if quantizer.uniform_grid() is None:
                layer.set_weight_quantizer(param_name, _FloatWeight(quantizer.bits))
                float_weights.append(name)
            else:
                layer.set_weight_quantizer(param_name, _ExportQuantizer(quantizer, clamp=False))
    if float_weights:
        log.warning(
            "export: the weights of %s lie on no uniform grid (float codebooks, or incremental quantization not "
            "finished): they are exported as their exact float values and these layers run in float. HINT: give "
            "codebooks `codebook_bits` (e.g. 6) for integer export.",
            float_weights,
        )
    # activation quantizers: layer inputs and outputs, and those a folded output-quantized BatchNorm left behind
    for parent in list(prepared.modules()):
        for attr, child in list(parent._modules.items()):
            if isinstance(child, Quantizer):
                parent._modules[attr] = _ExportQuantizer(child, clamp=True)
    return prepared


# ----------------------------------------------------------------------------------------------- graph clean-up
def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _quantize_np(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    info = np.iinfo(zero_point.dtype)
    q = np.rint(x.astype(np.float32) / scale.astype(np.float32)) + zero_point.astype(np.int32)
    return np.clip(q, info.min, info.max).astype(zero_point.dtype)


#: node metadata that the dynamo exporter writes and :func:`verify_onnx` reads (per-layer comparison)
_KEPT_NODE_METADATA = ("pkg.torch.onnx.name_scopes",)


def _strip_debug_metadata(graph: onnx.GraphProto) -> None:
    """Drop the exporter's per-node debug records (stack traces with the exporting machine's paths, FX node text,
    class hierarchies): on ResNet-20 they weigh more than half as much as its int8 weights. Only the layer scopes
    that :func:`verify_onnx` reads are kept."""
    for node in graph.node:
        node.doc_string = ""
        kept = [(p.key, p.value) for p in node.metadata_props if p.key in _KEPT_NODE_METADATA]
        del node.metadata_props[:]
        for key, value in kept:
            entry = node.metadata_props.add()
            entry.key, entry.value = key, value


def _clean_graph(model: onnx.ModelProto) -> dict[str, int]:
    """Fold QuantizeLinear of constants into integer initializers; drop Identity nodes of constants and the
    exporter's per-node debug records."""
    graph = model.graph
    _strip_debug_metadata(graph)
    constants = _constants(graph)
    graph_outputs = {o.name for o in graph.output}
    renames: dict[str, str] = {}
    keep = []
    folded_q = dropped_identity = 0
    existing = {init.name for init in graph.initializer}
    for node in graph.node:
        inputs = [renames.get(i, i) for i in node.input]
        del node.input[:]
        node.input.extend(inputs)
        if node.op_type == "Identity" and inputs[0] in constants and node.output[0] not in graph_outputs:
            renames[node.output[0]] = inputs[0]
            constants[node.output[0]] = constants[inputs[0]]
            dropped_identity += 1
            continue
        if (
            node.op_type == "QuantizeLinear"
            and len(inputs) == 3
            and all(i in constants for i in inputs)
            and node.output[0] not in graph_outputs
        ):
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            q = _quantize_np(constants[inputs[0]], constants[inputs[1]], constants[inputs[2]], axis)
            name = f"{inputs[0]}_quantized"
            while name in existing:
                name += "_"
            existing.add(name)
            graph.initializer.append(numpy_helper.from_array(q, name))
            constants[name] = q
            renames[node.output[0]] = name
            folded_q += 1
            continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    for out in graph.output:
        if out.name in renames:  # pragma: no cover - outputs are never renamed above
            raise RuntimeError(f"graph output {out.name} was folded")
    # drop initializers nothing reads any more (the float weights behind the folded QuantizeLinear)
    used = {i for node in graph.node for i in node.input} | graph_outputs
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    # shape records of tensors that are gone (the float weights) and the exporter's records on the rest
    stale = [info for info in graph.value_info if info.name not in used]
    for info in stale:
        graph.value_info.remove(info)
    for info in graph.value_info:
        del info.metadata_props[:]
    return {"folded_quantize": folded_q, "dropped_identity": dropped_identity, "dropped_initializers": len(unused)}


# ------------------------------------------------------------------------------------------------ INT4 weights
#: ONNX 4-bit tensor types by name, with their integer range
_FOUR_BIT_TYPES: dict[str, tuple[int, int, int]] = {
    "int4": (onnx.TensorProto.INT4, -8, 7),
    "uint4": (onnx.TensorProto.UINT4, 0, 15),
}


def _grid_bounds(value: int | Tensor, reduce: str) -> int:
    if isinstance(value, Tensor):
        return int(value.min()) if reduce == "min" else int(value.max())
    return int(value)


def _four_bit_type(grid: UniformGrid) -> str | None:
    """``"int4"``/``"uint4"`` when every code and zero point of ``grid`` fits that ONNX type, else ``None``."""
    low, high = _grid_bounds(grid.qmin, "min"), _grid_bounds(grid.qmax, "max")
    zero_low, zero_high = int(grid.zero_point.min()), int(grid.zero_point.max())
    for name, (_, type_low, type_high) in _FOUR_BIT_TYPES.items():
        if type_low <= min(low, zero_low) and max(high, zero_high) <= type_high:
            return name
    return None


def _weight_storage_plan(
    model: nn.Module, weight_storage: str, prefer: str
) -> tuple[dict[str, str], list[tuple[str, Any]]]:
    """``({"<layer>.<parameter>": "int4" | "uint4" | "int8"}, [(too-wide weight, its bits)])`` for ``model``.

    Weights that lie on no uniform grid are exported as float values and have no entry.
    """
    plan: dict[str, str] = {}
    too_wide: list[tuple[str, Any]] = []
    for name, layer in quantized_layers(model).items():
        for param_name, _, quantizer in layer.quantized_parameters():
            grid = quantizer.uniform_grid()
            if grid is None:
                continue
            key = f"{name}.{param_name}"
            fit = _four_bit_type(grid)
            if fit is None:
                too_wide.append((key, quantizer.bits))
            plan[key] = "int8" if weight_storage == "int8" or fit is None else fit
    if weight_storage == "auto" and prefer == "speed" and int8_ready(model):
        log.info(
            'export_onnx: weight_storage="auto", prefer="speed": the model is int8-ready and onnxruntime fuses only '
            "int8 weights into QLinearConv/QGemm, so every weight is stored as int8."
        )
        plan = dict.fromkeys(plan, "int8")
    return plan, too_wide


def _pack_four_bit(values: np.ndarray) -> bytes:
    """ONNX's INT4/UINT4 raw layout: two values per byte, the first in the low nibble."""
    flat = (values.astype(np.int16).reshape(-1) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _four_bit_tensor(values: np.ndarray, name: str, kind: str) -> onnx.TensorProto:
    data_type, low, high = _FOUR_BIT_TYPES[kind]
    if values.size and (int(values.min()) < low or int(values.max()) > high):
        raise UnsupportedModuleError(
            f"export_onnx: the integers of {name!r} span [{int(values.min())}, {int(values.max())}], outside the "
            f'{kind.upper()} range [{low}, {high}] of its grid. HINT: export with `weight_storage="int8"`.'
        )
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = data_type
    tensor.dims.extend(values.shape)
    tensor.raw_data = _pack_four_bit(values)
    return tensor


def _store_four_bit_weights(model: onnx.ModelProto, plan: dict[str, str]) -> dict[str, int]:
    """Rewrite the integer weight initializers of the weights ``plan`` marks ``int4``/``uint4`` (in place).

    Each such ``DequantizeLinear`` gets its weight initializer re-typed to INT4/UINT4 (same name, values and
    shape) and a zero point of its own in the same type (zero points may be shared between layers).

    Returns:
        How many weights are stored in each type: ``{"int4": ..., "uint4": ..., "int8": ...}``.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    taken = set(initializers) | {name for node in graph.node for name in (*node.input, *node.output)}
    counts = {"int4": 0, "uint4": 0, "int8": 0}
    matched: set[str] = set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not node.input or node.input[0] not in initializers:
            continue
        weight_name = node.input[0]
        key = weight_name.rstrip("_").removesuffix("_quantized")
        if key not in plan:
            continue
        matched.add(key)
        kind = plan[key]
        if kind == "int8":
            counts["int8"] += 1
            continue
        weight = initializers[weight_name]
        initializers[weight_name].CopyFrom(_four_bit_tensor(numpy_helper.to_array(weight), weight_name, kind))
        if len(node.input) > 2 and node.input[2]:
            zero_point = numpy_helper.to_array(initializers[node.input[2]])
        else:
            zero_point = np.zeros((), np.int8)
        zero_name = f"{weight_name}_zero_point"
        while zero_name in taken:
            zero_name += "_"
        taken.add(zero_name)
        graph.initializer.append(_four_bit_tensor(zero_point, zero_name, kind))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = zero_name
        counts[kind] += 1
    missing = sorted(key for key, kind in plan.items() if kind != "int8" and key not in matched)
    if missing:
        raise UnsupportedModuleError(
            f"export_onnx: the weights of {missing} have no integer DequantizeLinear initializer in the exported "
            'graph, so they cannot be stored as INT4. HINT: export with `weight_storage="int8"`.'
        )
    # the int8 zero points that only the re-typed nodes read are now unused
    used = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)
    model.ir_version = max(model.ir_version, 10)  # INT4/UINT4 need IR version 10
    return counts


def _packed_model_bytes(model: nn.Module) -> int | None:
    """The size of :func:`~lightning_quant.export.packing.save_packed_model`'s file for ``model``, or ``None``."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return save_packed_model(model, Path(tmp) / "packed.bin")
        except (QuantizationConfigError, UnsupportedModuleError) as err:  # a size report must not fail an export
            log.info("export_onnx: no packed size to report (%s)", err)
            return None


# ------------------------------------------------------------------------------------------------------ export
def _check_path(path: str | os.PathLike[str], overwrite: bool) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise QuantizationConfigError(
            f"`path` {os.fspath(path)!r} is in a directory that does not exist ({os.fspath(path.parent)!r}). "
            "HINT: create it first, e.g. `Path(path).parent.mkdir(parents=True, exist_ok=True)`."
        )
    if path.exists() and not overwrite:
        raise QuantizationConfigError(
            f"`path` {os.fspath(path)!r} already exists. HINT: pass `overwrite=True` to replace it, or choose "
            "another file name."
        )
    return path


def _as_tuple(example_input: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    if isinstance(example_input, Tensor):
        return (example_input,)
    if isinstance(example_input, Sequence) and example_input and all(isinstance(t, Tensor) for t in example_input):
        return tuple(example_input)
    raise QuantizationConfigError(
        f"`example_input` must be a tensor or a tuple of tensors, got {type(example_input).__name__}. "
        "HINT: pass one batch of inputs, e.g. `torch.randn(2, 3, 32, 32)`."
    )


def resolve_example_input(
    model: nn.Module, example_input: Tensor | Sequence[Tensor] | None = None
) -> tuple[tuple[Tensor, ...], str]:
    """The inputs to export ``model`` with, and where they came from (for messages).

    ``example_input`` when given, else the model's ``example_input_array`` (Lightning's convention for the input
    of an export, set in a ``LightningModule``'s ``__init__``).

    Raises:
        QuantizationConfigError: neither is set, or ``example_input_array`` holds keyword inputs (a dict).
    """
    if example_input is not None:
        return _as_tuple(example_input), "the given `example_input`"
    array = getattr(model, "example_input_array", None)
    source = f"`{type(model).__name__}.example_input_array`"
    if array is None:
        raise QuantizationConfigError(
            f"`example_input` is None and {type(model).__name__} sets no `example_input_array`, so there is no input "
            "to export with. HINT: pass `example_input=` (one batch of what `forward` takes), or set "
            "`self.example_input_array = torch.randn(2, ...)` in the module's `__init__`."
        )
    if isinstance(array, dict):
        raise QuantizationConfigError(
            f"{source} is a dict (keyword inputs), which the ONNX export does not take. HINT: pass the inputs in "
            "`forward`'s positional order as a tuple, e.g. `example_input=(input_ids, attention_mask)`."
        )
    try:
        return _as_tuple(array), source
    except QuantizationConfigError as err:
        raise QuantizationConfigError(f"{source}: {err}") from err


def _batch_of_at_least_two(args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``args`` with a batch of >= 2: tracing from batch 1 can fix the batch axis (attention models' reshapes)."""
    batch = {a.shape[0] if a.dim() else None for a in args}
    if None in batch or len(batch) != 1:
        raise QuantizationConfigError(
            f"`dynamic_batch=True` needs every input batched along dim 0 with one batch size, got shapes "
            f"{[tuple(a.shape) for a in args]}. HINT: pass inputs with a common batch size, or `dynamic_batch=False`."
        )
    return tuple(torch.cat([a, a]) for a in args) if batch == {1} else args


def _check_batch_axis(onnx_model: onnx.ModelProto, args: tuple[Tensor, ...]) -> None:
    """Run the file at the export batch size and one more; raise when only the export batch runs."""
    from lightning_quant.export.runtime import create_session  # runtime imports nothing from here at import time

    session = create_session(onnx_model, threads=1, optimization="basic")
    names = [i.name for i in session.get_inputs()]
    batch = args[0].shape[0]

    def run(inputs: tuple[Tensor, ...]) -> int | None:
        feed = {name: _to_numpy(t) for name, t in zip(names, inputs, strict=False)}
        out = session.run(None, feed)[0]
        return out.shape[0] if out.ndim else None

    larger = tuple(torch.cat([a, a[:1]]) for a in args)
    try:
        got = run(larger)
        error = None if got == batch + 1 else f"the output has batch {got}"
    except Exception as err:  # onnxruntime raises its own exception types; the check below decides
        error = str(err).splitlines()[0]
    if error is None:
        return
    try:
        run(args)
    except Exception as err:  # the file does not run at all: not a batch-axis problem, verification will say more
        log.warning("export_onnx: onnxruntime cannot run the exported graph (%s); batch axis not checked.", err)
        return
    raise UnsupportedModuleError(
        f"export_onnx: the exported graph fixed its batch axis although `dynamic_batch=True`: it runs at the export "
        f"batch size {batch} but not at {batch + 1} ({error}). A reshape with a constant batch size in the model's "
        "forward (e.g. `x.view(64, -1)`) does this. HINT: write it as `x.flatten(1)` or `x.view(x.shape[0], -1)`; "
        "or export a fixed-batch file with `dynamic_batch=False`."
    )


def _to_numpy(t: Tensor, dtype: Any = None) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    array = t.numpy()
    return array if dtype is None else array.astype(dtype, copy=False)


def _export_dynamo(module: nn.Module, args: tuple[Tensor, ...], path: Path, opset: int, dynamic_batch: bool) -> None:
    dynamic_shapes = tuple({0: torch.export.Dim.DYNAMIC} for _ in args) if dynamic_batch else None
    torch.onnx.export(
        module,
        args,
        os.fspath(path),
        dynamo=True,
        opset_version=opset,
        input_names=[f"input{i}" if i else "input" for i in range(len(args))],
        output_names=["output"],
        dynamic_shapes=dynamic_shapes,
        verbose=False,
    )


def _export_torchscript(
    module: nn.Module, args: tuple[Tensor, ...], path: Path, opset: int, dynamic_batch: bool
) -> None:
    for quantizer in module.modules():
        if isinstance(quantizer, _ExportQuantizer):
            quantizer.use_decomposed = False
    input_names = [f"input{i}" if i else "input" for i in range(len(args))]
    dynamic_axes = {name: {0: "batch"} for name in [*input_names, "output"]} if dynamic_batch else None
    torch.onnx.export(
        module,
        args,
        os.fspath(path),
        dynamo=False,
        opset_version=opset,
        input_names=input_names,
        output_names=["output"],
        dynamic_axes=dynamic_axes,
        do_constant_folding=True,
    )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: Tensor | Sequence[Tensor] | None = None,
    *,
    overwrite: bool = False,
    opset: int | None = None,
    fold_batchnorm: bool | Literal["auto"] = "auto",
    dynamic_batch: bool = True,
    dynamo: bool = True,
    weight_storage: Literal["int8", "int4", "auto"] = "int8",
    prefer: Literal["size", "speed"] = "size",
) -> Path:
    """Export a model quantized by this suite to a QDQ ONNX file (see the module docs for what is done).

    Args:
        model: the quantized model (a ``LightningModule`` included); it is not modified.
        path: the ``.onnx`` file to write; its directory must exist.
        example_input: one batch of inputs (a tensor or a tuple of tensors, in their own dtypes: token ids stay
            int64) to trace with; ``None`` takes the model's ``example_input_array`` (Lightning's convention).
            With ``dynamic_batch`` a batch of 1 is repeated to 2: traced from batch 1, attention models get a
            reshape with a constant batch size.
        overwrite: replace an existing file.
        opset: the ONNX opset (>= 13 for per-channel Q/DQ, >= 21 for INT4 weights). ``None``: 18
            (:data:`DEFAULT_OPSET`), or 21 (:data:`INT4_OPSET`) when INT4/UINT4 weights are stored.
        fold_batchnorm: fold BatchNorm layers into the preceding convolutions first. ``"auto"`` folds when the
            model is int8-ready (every quantized activation has 8 bits): only then can a runtime fuse the convs
            into ``QLinearConv``, which needs the fold. Below 8 bits the convs run in float anyway, and leaving
            BatchNorm unfolded keeps the graph numerically identical to the fake-quant model (a fold reorders
            float arithmetic, and one activation moved by a 4-bit step changes later layers noticeably).
        dynamic_batch: make the batch dimension of inputs and output dynamic; the file is then run in onnxruntime
            at the export batch size and one more before it is written, and refused if only the first runs.
        dynamo: try torch's dynamo exporter first (the default); ``False`` uses the TorchScript exporter only.
        weight_storage: ``"int8"`` stores every weight as 8-bit integers; ``"int4"`` stores every weight as
            INT4 (UINT4 for unsigned grids), which needs every weight grid to fit in 4 bits; ``"auto"`` stores
            the weights that fit as INT4/UINT4 and the others as int8 (see the module docs).
        prefer: what ``weight_storage="auto"`` optimises: ``"size"`` (INT4 wherever it fits) or ``"speed"``
            (int8 everywhere when the model is int8-ready, since onnxruntime runs INT4 weights only in float
            layers; INT4 wherever it fits otherwise). Ignored for ``"int8"``/``"int4"``.

    Returns:
        The path written. The info log line gives the file's size beside the size of ``save_packed_model``'s
        file; the file's metadata holds the latter (``lightning_quant.packed_bytes``) and how many weights are
        stored in each type (``lightning_quant.weight_storage``).

    Raises:
        QuantizationConfigError: a model without quantized layers or with an uncalibrated quantizer, a path in
            a missing directory, an existing file without ``overwrite=True``, no example input, an unknown
            ``weight_storage`` or ``prefer``, ``weight_storage="int4"`` for a model with a weight wider than 4 bits,
            an ``opset`` below 21 where INT4 weights would be stored, or a bad argument.
        UnsupportedModuleError: a quantizer the exporter cannot express (an activation quantizer off any uniform
            grid, a binary activation, a module that is not a lightning-quant quantizer), or a graph whose batch
            axis came out fixed although ``dynamic_batch=True``.
    """
    if weight_storage not in WEIGHT_STORAGE:
        raise QuantizationConfigError(
            f"`weight_storage` must be one of {list(WEIGHT_STORAGE)}, got {weight_storage!r}. HINT: "
            '"int4" (every weight as INT4), "auto" (INT4 where a weight fits 4 bits, int8 elsewhere) or "int8".'
        )
    if prefer not in PREFER:
        raise QuantizationConfigError(
            f'`prefer` must be one of {list(PREFER)}, got {prefer!r}: what `weight_storage="auto"` optimises.'
        )
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 13):
        raise QuantizationConfigError(f"`opset` must be an integer >= 13 (per-channel Q/DQ) or None, got {opset!r}.")
    path = _check_path(path, overwrite)
    args, _ = resolve_example_input(model, example_input)
    if dynamic_batch:
        args = _batch_of_at_least_two(args)
    _check_exportable(model)
    plan, too_wide = _weight_storage_plan(model, weight_storage, prefer)
    if weight_storage == "int4" and too_wide:
        listed = ", ".join(f"{name!r} ({bits} bits)" for name, bits in too_wide)
        raise QuantizationConfigError(
            f'`weight_storage="int4"` needs every weight grid to fit in 4 bits; {listed} do not. HINT: use '
            '`weight_storage="auto"` (INT4 where it fits, int8 for those), or quantize them to <= 4 bits.'
        )
    four_bit = any(kind != "int8" for kind in plan.values())
    if opset is None:
        opset = INT4_OPSET if four_bit else DEFAULT_OPSET
    elif four_bit and opset < INT4_OPSET:
        raise QuantizationConfigError(
            f"`opset={opset}` has no INT4/UINT4 tensors, which `weight_storage={weight_storage!r}` stores for "
            f"{sum(kind != 'int8' for kind in plan.values())} weights. HINT: pass `opset={INT4_OPSET}` (or leave it "
            'None), or `weight_storage="int8"`.'
        )
    ready = int8_ready(model)
    if fold_batchnorm == "auto":
        fold_batchnorm = ready
    elif not isinstance(fold_batchnorm, bool):
        raise QuantizationConfigError(f'`fold_batchnorm` must be True, False or "auto", got {fold_batchnorm!r}.')
    prepared = prepare_for_export(model, fold_batchnorm=fold_batchnorm)
    args = tuple(a.detach().cpu() for a in args)
    exporter = "dynamo"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        if dynamo:
            try:
                _export_dynamo(prepared, args, raw, opset, dynamic_batch)
            except Exception as err:  # the dynamo exporter raises many error types; the fallback is the fix
                log.warning(
                    "export_onnx: torch's dynamo exporter failed (%s: %s); falling back to the TorchScript "
                    "exporter (dynamo=False).",
                    type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "",
                )
                exporter = "torchscript"
        else:
            exporter = "torchscript"
        if exporter == "torchscript":
            _export_torchscript(prepared, args, raw, opset, dynamic_batch)
        onnx_model = onnx.load(os.fspath(raw), load_external_data=True)
    stats = _clean_graph(onnx_model)
    storage = _store_four_bit_weights(onnx_model, plan) if four_bit else {"int4": 0, "uint4": 0, "int8": len(plan)}
    packed_bytes = _packed_model_bytes(model)
    onnx_model.producer_name = _METADATA_PRODUCER
    meta = {
        "lightning_quant.exporter": exporter,
        "lightning_quant.int8_ready": str(ready),
        "lightning_quant.batchnorm_folded": str(bool(fold_batchnorm)),
        "lightning_quant.layers": str(list(quantized_layers(model))),
        "lightning_quant.weight_storage": str(storage),
        "lightning_quant.packed_bytes": str(packed_bytes),
    }
    for key, value in meta.items():
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(onnx_model)
    if dynamic_batch:
        _check_batch_axis(onnx_model, args)
    onnx.save(onnx_model, os.fspath(path))
    packed = f"{packed_bytes / 1024:.1f} KiB" if packed_bytes is not None else "n/a"
    log.info(
        "export_onnx: wrote %s (%.1f KiB; save_packed_model: %s; weights: %d INT4, %d UINT4, %d int8; opset %d; "
        "%s exporter, %d weight Q folded into integers)",
        path,
        path.stat().st_size / 1024,
        packed,
        storage["int4"],
        storage["uint4"],
        storage["int8"],
        opset,
        exporter,
        stats["folded_quantize"],
    )
    return path


def onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (what :func:`export_onnx` records: exporter, int8
    readiness, weight storage counts, ``save_packed_model``'s size in ``lightning_quant.packed_bytes``)."""
    return {prop.key: prop.value for prop in onnx.load(os.fspath(path), load_external_data=False).metadata_props}


# ----------------------------------------------------------------------------------------------------- verify
@dataclass(frozen=True)
class LayerDiff:
    """Output difference of one quantized layer between PyTorch (folded export copy) and onnxruntime."""

    name: str
    max_abs_diff: float
    rel_diff: float  # max |diff| / max |reference|
    diverged: bool


#: how :func:`verify_onnx` compares outputs: ``auto`` decides from the output's shape (and the labels)
Task = Literal["auto", "multiclass", "binary", "regression"]
TASKS: tuple[str, ...] = ("auto", "multiclass", "binary", "regression")


@dataclass(frozen=True)
class VerificationResult:
    """What :func:`verify_onnx` measured.

    Attributes:
        num_samples: samples compared.
        agreement: fraction of samples whose predictions agree: the arg-max class for multi-class outputs
            (``[N, C]``, ``C >= 2``), the sign for one logit per sample (``[N]`` or ``[N, 1]``); ``None`` for any
            other output (images, sequences, reconstructions, regression), which ``relative_error`` judges
            instead (see :func:`verify_onnx`).
        max_abs_diff: largest absolute output difference.
        mean_abs_diff: mean absolute output difference.
        torch_accuracy: accuracy of the PyTorch model (``None`` without labels, or labels that do not fit the
            output: integer class ids for multi-class, 0/1 for one logit).
        onnx_accuracy: accuracy of onnxruntime (``None`` likewise).
        int8_convs: convolutions that run in integer arithmetic after onnxruntime's optimisation.
        float_convs: convolutions that still run in float.
        int8_ops: integer op types of the optimised graph and their counts (QLinearConv, QGemm, ...).
        layers: per-layer differences (``per_layer=True`` only), in graph order.
        first_divergent_layer: the first layer whose output diverged beyond the tolerance, or ``None``.
        task: how the outputs were compared: ``multiclass``, ``binary`` or ``regression``.
        relative_error: ``||onnx - torch|| / ||torch||`` over all outputs (``None`` when the PyTorch outputs are
            all zero and the file's are not).
        mse: mean squared output difference.
    """

    num_samples: int
    agreement: float | None
    max_abs_diff: float
    mean_abs_diff: float
    torch_accuracy: float | None
    onnx_accuracy: float | None
    int8_convs: int
    float_convs: int
    int8_ops: dict[str, int] = field(default_factory=dict)
    layers: tuple[LayerDiff, ...] = ()
    first_divergent_layer: str | None = None
    task: str = "multiclass"
    relative_error: float | None = None
    mse: float = 0.0

    @property
    def agreement_name(self) -> str:
        """What :attr:`agreement` counts, in words."""
        return {"multiclass": "top-1 agreement", "binary": "sign agreement (one logit)"}.get(self.task, "agreement")

    def as_metrics(self) -> dict[str, float]:
        """Flat numeric figures, for loggers (undefined figures left out)."""
        metrics = {
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "mse": self.mse,
            "int8_convs": float(self.int8_convs),
            "float_convs": float(self.float_convs),
            "num_samples": float(self.num_samples),
        }
        if self.agreement is not None:
            metrics["agreement"] = self.agreement
        if self.relative_error is not None:
            metrics["relative_error"] = self.relative_error
        if self.torch_accuracy is not None and self.onnx_accuracy is not None:
            metrics["torch_accuracy"] = self.torch_accuracy
            metrics["onnx_accuracy"] = self.onnx_accuracy
        return metrics

    def __str__(self) -> str:
        rel = "undefined" if self.relative_error is None else f"{self.relative_error:.4g}"
        if self.agreement is None:
            head = f"onnxruntime vs PyTorch on {self.num_samples} samples ({self.task} outputs): agreement undefined"
        else:
            head = f"onnxruntime vs PyTorch on {self.num_samples} samples: {self.agreement_name} {self.agreement:.4%}"
        lines = [
            f"{head}, output |diff| max {self.max_abs_diff:.4g} mean {self.mean_abs_diff:.4g}, relative error {rel}",
            f"convolutions in int8 after optimisation: {self.int8_convs} (float: {self.float_convs})",
        ]
        if self.torch_accuracy is not None:
            lines.append(f"accuracy: PyTorch {self.torch_accuracy:.4%}, onnxruntime {self.onnx_accuracy:.4%}")
        if self.layers:
            lines.append(f"first divergent layer: {self.first_divergent_layer or 'none'}")
        return "\n".join(lines)


def count_conv_ops(onnx_model: onnx.ModelProto | str | os.PathLike[str]) -> tuple[int, int, dict[str, int]]:
    """``(int8 convs, float convs, {integer op type: count})`` of an (optimised) ONNX graph."""
    if not isinstance(onnx_model, onnx.ModelProto):
        onnx_model = onnx.load(os.fspath(onnx_model))
    int8 = flt = 0
    integer_ops: dict[str, int] = {}
    for node in onnx_model.graph.node:
        if node.op_type in INT8_CONV_OPS:
            int8 += 1
        elif node.op_type in FLOAT_CONV_OPS:
            flt += 1
        if node.op_type.startswith(("QLinear", "QGemm", "QAttention")) or node.op_type.endswith("Integer"):
            integer_ops[node.op_type] = integer_ops.get(node.op_type, 0) + 1
    return int8, flt, integer_ops


def _split_batch(batch: Any, num_inputs: int = 1) -> tuple[tuple[Tensor, ...], Tensor | None]:
    """``(inputs, labels)`` of a batch, for a graph with ``num_inputs`` inputs."""
    if isinstance(batch, Tensor) and num_inputs == 1:
        return (batch,), None
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        if isinstance(first, (tuple, list)) and len(first) == num_inputs and all(isinstance(t, Tensor) for t in first):
            labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
            return tuple(first), labels  # ((inputs...), labels)
        if len(batch) >= num_inputs and all(isinstance(t, Tensor) for t in batch[:num_inputs]):
            labels = batch[num_inputs] if len(batch) > num_inputs and isinstance(batch[num_inputs], Tensor) else None
            return tuple(batch[:num_inputs]), labels  # (input..., labels)
    if isinstance(batch, dict) and num_inputs == 1 and isinstance(batch.get("x", batch.get("input")), Tensor):
        return (batch.get("x", batch.get("input")),), batch.get("y", batch.get("label"))
    raise QuantizationConfigError(
        f"verify_onnx: cannot find the graph's {num_inputs} input(s) in a batch of type {type(batch).__name__}. "
        "HINT: the dataloader should yield tensors, (inputs, labels) pairs, (input1, input2, ..., labels) tuples, "
        "or dicts with 'x'/'y'."
    )


#: onnxruntime's input type names -> numpy dtypes
_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _feed(session: Any, inputs: tuple[Tensor, ...]) -> dict[str, np.ndarray]:
    """The session's inputs, each in the dtype the graph declares (token ids stay integers)."""
    return {i.name: _to_numpy(t, _ORT_DTYPES.get(i.type)) for i, t in zip(session.get_inputs(), inputs, strict=False)}


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, dict):
        tensor = next((v for v in output.values() if isinstance(v, Tensor)), None)
        if tensor is not None:
            return tensor
    raise QuantizationConfigError(
        f"verify_onnx: the model returned {type(output).__name__}, not a tensor. HINT: verify a module whose forward "
        "returns a tensor (or a tuple whose first element is the exported output)."
    )


def _task_of(ref: Tensor, inputs: tuple[Tensor, ...], labels: Tensor | None, task: str) -> str:
    """The task of ``task="auto"``, from the output's shape (and float labels, which mark values, not classes)."""
    if task != "auto":
        return task
    if labels is not None and labels.is_floating_point():
        return "regression"  # float targets: a score or a reconstruction, not classes
    if ref.dim() == 2 and ref.shape[1] >= 2:
        # an output shaped like the input is a reconstruction (an autoencoder), not class logits
        return "regression" if ref.shape == inputs[0].shape else "multiclass"
    if ref.dim() == 1 or (ref.dim() == 2 and ref.shape[1] == 1):
        return "binary"
    return "regression"


def _predictions(out: Tensor, task: str) -> Tensor | None:
    if task == "multiclass" and out.dim() == 2:
        return out.argmax(dim=1)
    if task == "binary" and out.numel() == out.shape[0]:
        return (out.reshape(-1) > 0).long()
    return None


def _labels_fit(labels: Tensor, pred: Tensor, out: Tensor, task: str) -> bool:
    """Whether ``labels`` are targets of ``out``: class ids in range (multi-class), 0/1 (one logit)."""
    if labels.is_floating_point() or labels.numel() != pred.numel():
        return False
    if task == "multiclass":
        return bool(((labels >= 0) & (labels < out.shape[1])).all())
    return bool(((labels == 0) | (labels == 1)).all())


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                return list(ast.literal_eval(prop.value))
            except (ValueError, SyntaxError):
                return []
    return []


def _layer_outputs(onnx_model: onnx.ModelProto, names: Iterable[str]) -> dict[str, str]:
    """The ONNX tensor holding each layer's output: the last non-Q/DQ node scoped under that layer."""
    wanted = set(names)
    found: dict[str, str] = {}
    for node in onnx_model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Clip", "Constant"):
            continue
        scopes = _scopes(node)
        owners = [s for s in scopes if s in wanted]
        if owners:
            found[owners[-1]] = node.output[0]
    return found


def _per_layer_diffs(
    model: nn.Module, onnx_model: onnx.ModelProto, x: tuple[Tensor, ...], tolerance: float, session_factory: Any
) -> tuple[tuple[LayerDiff, ...], str | None]:
    prepared = prepare_for_export(model)
    layers = quantized_layers(prepared)
    outputs = _layer_outputs(onnx_model, layers)
    if not outputs:
        raise QuantizationConfigError(
            "verify_onnx(per_layer=True) needs the layer scopes that torch's dynamo exporter writes into the "
            "ONNX nodes; this file has none (exported with dynamo=False?). HINT: export with `dynamo=True`."
        )
    calls = capture(prepared, tuple(t.cpu() for t in x), {name: layers[name] for name in outputs}, training=None)
    captured = {name: calls[name][0].output for name in outputs}
    probe = copy.deepcopy(onnx_model)
    existing = {o.name for o in probe.graph.output}
    for tensor_name in outputs.values():
        if tensor_name not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor_name))
    session = session_factory(probe)
    results = session.run(list(outputs.values()), _feed(session, x))
    diffs = []
    first = None
    for (name, _), got in zip(outputs.items(), results, strict=True):
        ref = captured[name].numpy()
        diff = float(np.abs(got.reshape(ref.shape) - ref).max()) if ref.size else 0.0
        rel = diff / max(float(np.abs(ref).max()), 1e-12) if ref.size else 0.0
        diverged = rel > tolerance
        if diverged and first is None:
            first = name
        diffs.append(LayerDiff(name, diff, rel, diverged))
    return tuple(diffs), first


@torch.no_grad()
def verify_onnx(
    model: nn.Module,
    onnx_path: str | os.PathLike[str],
    dataloader: Iterable[Any],
    *,
    max_batches: int | None = None,
    per_layer: bool = False,
    tolerance: float = 0.05,
    threads: int = 2,
    task: Task = "auto",
) -> VerificationResult:
    """Run the exported file in onnxruntime beside the PyTorch fake-quant model and compare them.

    The onnxruntime session is the int8 deployment session of :func:`lightning_quant.export.runtime.create_session`
    (``ORT_ENABLE_ALL``); its optimised graph is saved to a temporary file and counted, so a convolution that
    silently fell back to float is visible in ``float_convs``. Inputs are fed in the dtypes the graph declares
    (token ids as int64). How outputs are compared (``task="auto"``): ``[N, C]`` (``C >= 2``) as multi-class
    logits (arg-max agreement), ``[N]`` or ``[N, 1]`` as one logit (sign agreement), anything else -- images,
    sequences, an output shaped like the input (a reconstruction), any output with float labels -- by the
    relative error alone (agreement ``None``); pass ``task`` where the shape misleads (``"regression"`` for a
    generator's flat images). Accuracies are computed only where the labels fit the output: class ids in
    ``[0, C)``, or 0/1 for one logit.

    Args:
        model: the quantized PyTorch model (evaluated in eval mode; its mode is restored afterwards).
        onnx_path: the file written by :func:`export_onnx`.
        dataloader: yields input tensors, ``(inputs, labels)`` pairs, ``(input1, ..., inputK, labels)`` tuples
            for a graph with K inputs, or dicts with ``x``/``y``.
        max_batches: compare at most this many batches (``None``: all).
        per_layer: also compare every quantized layer's output on the first batch and name the first layer
            whose relative difference ``max|diff| / max|ref|`` exceeds ``tolerance`` (needs a file written by
            the dynamo exporter).
        tolerance: the per-layer relative tolerance.
        threads: onnxruntime intra-op threads.
        task: ``auto``, or force ``multiclass``, ``binary`` (one logit) or ``regression``.

    Returns:
        A :class:`VerificationResult`.

    Raises:
        QuantizationConfigError: a missing file, an empty dataloader, or a bad argument.
    """
    from lightning_quant.export.runtime import create_session  # runtime imports nothing from here at import time

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise QuantizationConfigError(f"`onnx_path` {os.fspath(onnx_path)!r} does not exist. Export it first.")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise QuantizationConfigError(f"`max_batches` must be a positive integer or None, got {max_batches!r}.")
    if task not in TASKS:
        raise QuantizationConfigError(f"`task` must be one of {list(TASKS)}, got {task!r}.")
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session = create_session(onnx_path, threads=threads, optimized_model_path=optimized)
        int8, flt, int8_ops = count_conv_ops(optimized)
    num_inputs = len(session.get_inputs())
    n = agree = torch_correct = onnx_correct = 0
    labelled = comparable = True
    resolved = None
    max_diff = sum_diff = sum_sq_diff = sum_sq_ref = 0.0
    numel = 0
    first_x = None
    try:
        for index, batch in enumerate(dataloader):
            if max_batches is not None and index >= max_batches:
                break
            x, y = _split_batch(batch, num_inputs)
            if first_x is None:
                first_x = x
            ref = _first_tensor(model(*(t.to(device) for t in x))).float().cpu()
            got = torch.from_numpy(session.run(None, _feed(session, x))[0]).float().reshape(ref.shape)
            diff = got - ref
            max_diff = max(max_diff, float(diff.abs().max()) if diff.numel() else 0.0)
            sum_diff += float(diff.abs().sum())
            sum_sq_diff += float(diff.square().sum())
            sum_sq_ref += float(ref.square().sum())
            numel += diff.numel()
            n += x[0].shape[0] if x[0].dim() else 1
            batch_task = _task_of(ref, x, y, task)
            resolved = batch_task if resolved is None else resolved
            pred_ref, pred_got = _predictions(ref, resolved), _predictions(got, resolved)
            if batch_task != resolved or pred_ref is None or pred_got is None:
                comparable = False
                continue
            agree += int((pred_ref == pred_got).sum())
            if y is None or not _labels_fit(y.cpu(), pred_ref, ref, resolved):
                labelled = False
            else:
                y = y.cpu().reshape(pred_ref.shape).long()
                torch_correct += int((pred_ref == y).sum())
                onnx_correct += int((pred_got == y).sum())
        if n == 0:
            raise QuantizationConfigError("verify_onnx: `dataloader` yielded no batch. Pass a non-empty dataloader.")
        layers: tuple[LayerDiff, ...] = ()
        first = None
        if per_layer and first_x is not None:
            layers, first = _per_layer_diffs(
                model, onnx.load(os.fspath(onnx_path)), first_x, tolerance, lambda m: create_session(m, threads=threads)
            )
    finally:
        model.train(was_training)
    classified = comparable and resolved in ("multiclass", "binary")
    if sum_sq_ref > 0:
        relative: float | None = math.sqrt(sum_sq_diff / sum_sq_ref)
    else:
        relative = 0.0 if sum_sq_diff == 0 else None  # all-zero reference: no scale to compare against
    return VerificationResult(
        num_samples=n,
        agreement=agree / n if classified else None,
        max_abs_diff=max_diff,
        mean_abs_diff=sum_diff / max(numel, 1),
        torch_accuracy=torch_correct / n if classified and labelled else None,
        onnx_accuracy=onnx_correct / n if classified and labelled else None,
        int8_convs=int8,
        float_convs=flt,
        int8_ops=int8_ops,
        layers=layers,
        first_divergent_layer=first,
        task=resolved if comparable else "regression",
        relative_error=relative,
        mse=sum_sq_diff / max(numel, 1),
    )

"""``quantization_summary(model)``: what is quantized, at how many bits, and what the model weighs."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lightning_quant.core.quantizers import FLOAT_BITS, Quantizer
from lightning_quant.surgery.coverage import unquantized_layers
from lightning_quant.surgery.layers import quantized_layers, quantizers


@dataclass(frozen=True)
class LayerRow:
    """One quantized layer of a :class:`QuantizationSummary`.

    Attributes:
        weight_bits: the weight's bit width, one per output channel for per-channel widths (codebooks: the
            index bits).
        payload_bits: the weight codes' storage bits (the quantizer's account, as packing writes them).
        size_bits: ``payload_bits`` plus the side tensors (step sizes, zero points, codebooks) of the layer's
            quantizers.
        kind: the weight quantizer's kind (``"uniform"``, ``"codebook"``).
    """

    name: str
    layer_type: str
    weight_bits: int | tuple[int, ...]
    act_bits: int | None
    params: int
    size_bits: int
    payload_bits: int = 0
    kind: str = "uniform"

    @property
    def bits_per_param(self) -> float:
        """Weight storage bits per parameter (the codes only)."""
        return self.payload_bits / max(self.params, 1)


@dataclass(frozen=True)
class QuantizationSummary:
    """Per-layer bit widths and the model's size: float32 vs quantized (packed weights + float32 rest).

    ``quantized_bits`` counts each quantized weight at its quantizer's storage account (codes at their widths:
    per-channel widths and codebook indices included), plus the side tensors of every quantizer (step sizes and
    zero points, codebooks), every bias and all parameters and buffers of float layers (BatchNorm statistics
    included) at 32 bits: the size of the packed model that :mod:`lightning_quant.export.packing` writes, less its
    file header and byte rounding. ``float_layers`` are the weight layers left in float for a reason of the
    suite's, with that reason (:func:`~lightning_quant.surgery.coverage.unquantized_layers`).
    """

    rows: tuple[LayerRow, ...]
    fp32_bits: int
    quantized_bits: int
    float_layers: dict[str, str] = field(default_factory=dict)

    @property
    def compression(self) -> float:
        """fp32 size over quantized size."""
        return self.fp32_bits / max(self.quantized_bits, 1)

    @property
    def avg_weight_bits(self) -> float:
        """Average weight storage bits per parameter over the quantized layers."""
        params = sum(r.params for r in self.rows)
        return sum(r.payload_bits for r in self.rows) / max(params, 1)

    def __str__(self) -> str:
        header = ("layer", "type", "w_bits", "a_bits", "params", "size (KiB)")
        lines = [
            (
                r.name,
                r.layer_type if r.kind == "uniform" else f"{r.layer_type} ({r.kind})",
                str(r.weight_bits) if isinstance(r.weight_bits, int) else f"mixed {r.bits_per_param:.2f}",
                str(r.act_bits or "fp"),
                f"{r.params:,}",
                f"{r.size_bits / 8192:.2f}",
            )
            for r in self.rows
        ]
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
        out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*line) for line in lines]
        out += [f"in float: {name}: {reason}" for name, reason in self.float_layers.items()]
        out.append(
            f"model size: fp32 {self.fp32_bits / 8192:.1f} KiB -> quantized {self.quantized_bits / 8192:.1f} KiB "
            f"({self.compression:.2f}x smaller), average weight bits {self.avg_weight_bits:.2f}"
        )
        return "\n".join(out)


def quantization_summary(model: nn.Module) -> QuantizationSummary:
    """Summarise a quantized model (see :class:`QuantizationSummary`); printing it gives a table.

    Tensors shared between layers are counted once; observer statistics are not part of the model's size.
    """
    layers = quantized_layers(model)
    payload = {
        id(param): quantizer.payload_bits(param)
        for layer in layers.values()
        for _, param, quantizer in layer.quantized_parameters()
    }
    all_quantizers = quantizers(model)
    quantizer_names = tuple(f"{name}." for name in all_quantizers)
    fp32_bits = quantized_bits = 0
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen or not tensor.is_floating_point() or name.startswith(quantizer_names):
            continue
        seen.add(id(tensor))
        fp32_bits += FLOAT_BITS * tensor.numel()
        quantized_bits += payload.get(id(tensor), FLOAT_BITS * tensor.numel())
    rows = []
    for name, layer in layers.items():
        spec = layer.current_spec()
        weights = layer.quantized_parameters()
        quantizer_modules = [q for _, _, q in weights] + [layer.input_quantizer, layer.output_quantizer]
        side_bits = sum(q.side_bits() for q in quantizer_modules if isinstance(q, Quantizer))
        layer_payload = sum(payload[id(param)] for _, param, _ in weights)
        rows.append(
            LayerRow(
                name,
                layer.float_type.__name__,
                spec.weight_bits,
                spec.act_bits,
                sum(param.numel() for _, param, _ in weights),
                layer_payload + side_bits,
                layer_payload,
                layer.weight_quantizer.KIND,
            )
        )
    # side tensors of every quantizer (residual ones on BatchNorms included), each counted once
    quantized_bits += sum(q.side_bits() for q in {id(q): q for q in all_quantizers.values()}.values())
    return QuantizationSummary(tuple(rows), fp32_bits, quantized_bits, unquantized_layers(model))

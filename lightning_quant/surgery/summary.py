"""``quantization_summary(model)``: what is quantized, at how many bits, and what the model weighs."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lightning_quant.core.quantizers import UniformQuantizer
from lightning_quant.surgery.coverage import unquantized_layers
from lightning_quant.surgery.layers import quantized_layers, quantizers

FLOAT_BITS = 32


@dataclass(frozen=True)
class LayerRow:
    """One quantized layer of a :class:`QuantizationSummary`."""

    name: str
    layer_type: str
    weight_bits: int
    act_bits: int | None
    params: int
    size_bits: int


@dataclass(frozen=True)
class QuantizationSummary:
    """Per-layer bit widths and the model's size: float32 vs quantized (packed weights + float32 rest).

    ``quantized_bits`` counts each quantized weight at its bit width, plus every step size, zero point, bias
    and all parameters and buffers of float layers (BatchNorm statistics included) at 32 bits: the size of the
    packed model that :mod:`lightning_quant.export.packing` writes, less its file header. ``float_layers`` are the
    weight layers left in float for a reason of the suite's, with that reason
    (:func:`~lightning_quant.surgery.coverage.unquantized_layers`).
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
        """Average weight bit width over the quantized layers, weighted by parameter count."""
        params = sum(r.params for r in self.rows)
        return sum(r.params * r.weight_bits for r in self.rows) / max(params, 1)

    def __str__(self) -> str:
        header = ("layer", "type", "w_bits", "a_bits", "params", "size (KiB)")
        lines = [
            (
                r.name,
                r.layer_type,
                str(r.weight_bits),
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
    weight_bits = {id(layer.weight): layer.weight_quantizer.bits for layer in layers.values()}
    quantizer_names = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, UniformQuantizer))
    fp32_bits = quantized_bits = 0
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen or not tensor.is_floating_point() or name.startswith(quantizer_names):
            continue
        seen.add(id(tensor))
        fp32_bits += FLOAT_BITS * tensor.numel()
        quantized_bits += weight_bits.get(id(tensor), FLOAT_BITS) * tensor.numel()
    rows = []
    for name, layer in layers.items():
        spec = layer.current_spec()
        numel = layer.weight.numel()
        side_bits = FLOAT_BITS * sum(
            q.scale.numel() + q.zero_point.numel()
            for q in (layer.weight_quantizer, layer.input_quantizer, layer.output_quantizer)
            if isinstance(q, UniformQuantizer)
        )
        rows.append(
            LayerRow(
                name,
                layer.float_type.__name__,
                spec.weight_bits,
                spec.act_bits,
                numel,
                numel * spec.weight_bits + side_bits,
            )
        )
    # step sizes and zero points of every quantizer (residual ones on BatchNorms included)
    quantized_bits += FLOAT_BITS * sum(q.scale.numel() + q.zero_point.numel() for q in quantizers(model).values())
    return QuantizationSummary(tuple(rows), fp32_bits, quantized_bits, unquantized_layers(model))

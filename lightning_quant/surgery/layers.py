"""Quantized Conv/Linear layers: subclasses of the torch layers that fake-quantize the weight and the input.

A quantized layer *is* the original layer (``isinstance(QuantConv2d(...), nn.Conv2d)``) with the same
``Parameter`` objects, the same state-dict keys for them and two extra submodules, ``weight_quantizer`` and
``input_quantizer``. So optimizers built before or after the swap, float checkpoints, BatchNorm folding and
``torchvision`` helpers keep working; only the forward changes.

A third submodule, ``output_quantizer``, is ``nn.Identity`` unless the layer's output enters a residual
addition (``LayerSpec.output_bits``). For a BatchNorm that feeds a residual addition the same is done by
:class:`QuantBatchNorm2d` (and its 1d/3d siblings): a BatchNorm that fake-quantizes its output. An int8
runtime runs a convolution as ``QLinearConv`` only when a QuantizeLinear follows it, and after BatchNorm
folding that is exactly where these quantizers sit. :class:`QuantReLU` quantizes the activation after a
residual addition (and one that enters an identity shortcut) with the quantizer of the layers it feeds, so
the addition itself runs in integers too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_quant.core.quantizers import Quantizer, UniformQuantizer, build_weight_quantizer
from lightning_quant.surgery.graph import OpOutput
from lightning_quant.surgery.spec import LayerSpec


def _shallow_copy(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A ``cls`` instance sharing ``module``'s parameters, buffers, submodules and hooks (``module`` untouched)."""
    copy = cls.__new__(cls)
    copy.__dict__.update(module.__dict__)
    for attr in ("_parameters", "_buffers", "_modules"):
        copy.__dict__[attr] = dict(module.__dict__[attr])
    return copy


def _strip(module: nn.Module, float_type: type[nn.Module], submodules: tuple[str, ...]) -> nn.Module:
    """The ``float_type`` module again (same parameter objects) without the named quantizer submodules."""
    plain = float_type.__new__(float_type)
    plain.__dict__.update(module.__dict__)
    plain.__dict__["_modules"] = {k: v for k, v in module._modules.items() if k not in submodules}
    for attr in ("float_type", "layer_spec"):
        plain.__dict__.pop(attr, None)
    return plain


def activation_quantizer(spec: LayerSpec, bits: int, device: torch.device | None = None) -> UniformQuantizer:
    """A per-tensor activation quantizer with ``spec``'s grid, scale mode and observer at ``bits``."""
    return UniformQuantizer(
        bits,
        symmetric=spec.act_symmetric,
        signed=spec.act_signed,
        learnable=spec.scale_mode == "lsq",
        observer=spec.act_observer,
    ).to(device)


def _optional_activation_quantizer(spec: LayerSpec, bits: int | None, device: torch.device) -> nn.Module:
    return nn.Identity() if bits is None else activation_quantizer(spec, bits, device)


class QuantizedLayer(nn.Module):
    """Mixin of the quantized layers: quantizers built from a :class:`LayerSpec` and the swap from/to float."""

    weight: nn.Parameter
    weight_quantizer: Quantizer
    input_quantizer: UniformQuantizer | nn.Identity
    output_quantizer: UniformQuantizer | nn.Identity
    layer_spec: LayerSpec
    float_type: type[nn.Module]

    #: whether the layer's input is a tensor of activations an input quantizer can quantize (not token ids)
    QUANTIZES_INPUT: bool = True
    #: the name of the quantized Parameter in the layer's state dict
    WEIGHT_NAME: str = "weight"

    @classmethod
    def float_weight(cls, module: nn.Module) -> nn.Parameter:
        """The Parameter of ``module`` that the weight quantizer quantizes."""
        return getattr(module, cls.WEIGHT_NAME)

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec, name: str = "") -> QuantizedLayer:
        """A quantized copy of ``module`` that shares its parameters, buffers, submodules and hooks.

        The weight quantizer is the kind ``spec.weight_kind`` names (the quantizer registry). ``module`` itself is
        not modified, so a failed model surgery can leave the model as it was.

        Raises:
            QuantizationConfigError: a spec that does not fit the layer (e.g. per-channel widths of the wrong
                length), naming ``name``.
        """
        weight = cls.float_weight(module)
        quantizer = build_weight_quantizer(weight, spec, f"Layer {name!r}" if name else type(module).__name__)
        layer = _shallow_copy(module, cls)
        layer.float_type = type(module)
        layer.layer_spec = spec
        layer.weight_quantizer = quantizer
        act_bits = spec.act_bits if cls.QUANTIZES_INPUT else None
        layer.input_quantizer = _optional_activation_quantizer(spec, act_bits, weight.device)
        layer.output_quantizer = _optional_activation_quantizer(spec, spec.output_bits, weight.device)
        layer._adopt(spec, name)
        return layer  # type: ignore[return-value]

    def _adopt(self, spec: LayerSpec, name: str) -> None:
        """Hook for layers that quantize a child of their own as well (attention's output projection)."""

    def to_float(self) -> nn.Module:
        """The float layer again (same parameter objects), without the quantizers."""
        return _strip(self, self.float_type, ("weight_quantizer", "input_quantizer", "output_quantizer"))

    def quantized_weight(self) -> Tensor:
        """The fake-quantized weight used in forward."""
        return self.weight_quantizer(self.weight)

    def quantized_parameters(self) -> list[tuple[str, nn.Parameter, Quantizer]]:
        """Every quantized Parameter of the layer with its quantizer, by its name in the layer's state dict (one,
        ``WEIGHT_NAME``, except for recurrent layers, which quantize every weight matrix)."""
        return [(self.WEIGHT_NAME, self.weight, self.weight_quantizer)]

    def set_weight_quantizer(self, name: str, quantizer: nn.Module) -> None:
        """Replace the quantizer of the quantized Parameter ``name`` (see :meth:`quantized_parameters`)."""
        if name != self.WEIGHT_NAME:
            raise KeyError(f"{type(self).__name__} quantizes no Parameter named {name!r}")
        self.weight_quantizer = quantizer  # type: ignore[assignment]

    def current_spec(self) -> LayerSpec:
        """This layer's recipe with its current bit widths (which callbacks may have changed)."""
        return dataclasses.replace(
            self.layer_spec,
            weight_bits=self.weight_quantizer.bits,
            act_bits=_bits(self.input_quantizer),
            output_bits=_bits(self.output_quantizer),
        )

    def extra_repr(self) -> str:
        bits = self.weight_quantizer.bits
        weight = f"w{bits}" if isinstance(bits, int) else "wmixed"
        return super().extra_repr() + f", {weight}a{self.current_spec().act_bits or 'fp'}"


def _bits(quantizer: nn.Module) -> int | None:
    return quantizer.bits if isinstance(quantizer, UniformQuantizer) else None


class _QuantConvNd(QuantizedLayer):
    def forward(self, x: Tensor) -> Tensor:
        out = self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)  # type: ignore[attr-defined]
        return self.output_quantizer(out)


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """:class:`torch.nn.Conv1d` with fake-quantized weight and input."""


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """:class:`torch.nn.Conv2d` with fake-quantized weight and input (grouped and depthwise included)."""


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    """:class:`torch.nn.Conv3d` with fake-quantized weight and input."""


class QuantLinear(QuantizedLayer, nn.Linear):
    """:class:`torch.nn.Linear` with fake-quantized weight and input."""

    def forward(self, x: Tensor) -> Tensor:
        return self.output_quantizer(F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias))


class QuantEmbedding(QuantizedLayer, nn.Embedding):
    """:class:`torch.nn.Embedding` with a fake-quantized table (per row with per-channel granularity); its inputs are
    token ids, so it has no input quantizer."""

    QUANTIZES_INPUT = False

    def forward(self, x: Tensor) -> Tensor:
        out = F.embedding(
            x, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
            self.sparse,
        )  # fmt: skip
        return self.output_quantizer(out)


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True = masked out) as an additive float mask; a float mask as it is."""
    if mask is None or mask.is_floating_point():
        return mask if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class QuantMultiheadAttention(QuantizedLayer, nn.MultiheadAttention):
    """:class:`torch.nn.MultiheadAttention` with a fake-quantized packed in-projection (``in_proj_weight``, per
    output row), quantized inputs, and its output projection as a :class:`QuantLinear` (input and weight quantized,
    same recipe).

    ``nn.MultiheadAttention`` hands its weights to ``F.multi_head_attention_forward`` (and, in eval mode without
    autograd, to a fused kernel), never calling its ``out_proj``; this layer computes attention itself -- the same
    operations as ``F.multi_head_attention_forward`` (scaled dot products, masks, dropout, head averaging), so with
    its quantizers off it gives the float module's outputs -- and calls ``self.out_proj``. Never a fused fast path.
    Query, key and value share the input quantizer (self-attention passes one tensor; cross-attention shares the
    grid). Attention with ``bias_k``/``bias_v``, ``add_zero_attn`` or separate q/k/v projection weights (``kdim`` or
    ``vdim`` != ``embed_dim``) is not supported: :func:`unsupported_reason` says so and such a layer stays in float.
    """

    WEIGHT_NAME = "in_proj_weight"

    @property
    def weight(self) -> nn.Parameter:  # type: ignore[override]
        """The packed in-projection ``[3E, E]`` (the Parameter ``in_proj_weight``)."""
        return self.in_proj_weight

    def _adopt(self, spec: LayerSpec, name: str) -> None:
        out_proj = self.out_proj
        if not isinstance(out_proj, QuantizedLayer):
            # a Linear subclass that MultiheadAttention reads directly; here it is called, so it can be quantized
            self._modules["out_proj"] = QuantLinear.from_float(out_proj, spec, f"{name}.out_proj" if name else "")

    def to_float(self) -> nn.Module:
        plain = super().to_float()
        if isinstance(plain.out_proj, QuantizedLayer):
            plain._modules["out_proj"] = plain.out_proj.to_float()
        return plain

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        # which inputs are one tensor (self-attention), decided before the transposes below make new views
        key_is_query, value_is_key, value_is_query = key is query, value is key, value is query
        if self.batch_first and batched:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        heads, head_dim = self.num_heads, self.head_dim
        # one quantization per distinct input tensor
        q_in = self.input_quantizer(query)
        k_in = q_in if key_is_query else self.input_quantizer(key)
        v_in = k_in if value_is_key else (q_in if value_is_query else self.input_quantizer(value))
        w_q, w_k, w_v = self.quantized_weight().chunk(3)
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(q_in, w_q, b_q).view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = F.linear(k_in, w_k, b_k).view(src_len, bsz * heads, head_dim).transpose(0, 1)
        v = F.linear(v_in, w_v, b_v).view(src_len, bsz * heads, head_dim).transpose(0, 1)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention).")
        use_causal_hint = is_causal and key_padding_mask is None and not need_weights
        mask = None if use_causal_hint else _additive_mask(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(0)
        padding = _additive_mask(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scaled = q * math.sqrt(1.0 / float(head_dim))
            scores = (
                torch.bmm(scaled, k.transpose(-2, -1))
                if mask is None
                else torch.baddbmm(mask, scaled, k.transpose(-2, -1))
            )
            weights = F.softmax(scores, dim=-1)
            if dropout > 0.0:
                weights = F.dropout(weights, p=dropout)
            out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(tgt_len * bsz, embed_dim)
            attention: Tensor | None = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                attention = attention.mean(dim=1)  # type: ignore[union-attr]
        else:
            if mask is not None:
                mask = mask.unsqueeze(0) if mask.size(0) == 1 else mask.view(bsz, heads, -1, src_len)
            out = F.scaled_dot_product_attention(
                q.view(bsz, heads, tgt_len, head_dim), k.view(bsz, heads, src_len, head_dim),
                v.view(bsz, heads, src_len, head_dim), mask, dropout, use_causal_hint,
            )  # fmt: skip
            out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed_dim)
            attention = None
        out = self.out_proj(out).view(tgt_len, bsz, out.size(1))
        if not batched:
            out = out.squeeze(1)
            if attention is not None:
                attention = attention.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return self.output_quantizer(out), attention


class QuantizedRNN(QuantizedLayer):
    """Mixin of the quantized recurrent layers (LSTM, GRU, RNN): every weight matrix (``weight_ih_l*``,
    ``weight_hh_l*``, reverse directions included) fake-quantized per output row with the layer's recipe, and the
    input sequence quantized; hidden states stay in float (they never leave the fused recurrent kernel).

    ``weight_quantizer`` quantizes ``weight_ih_l0``; ``weight_quantizers`` holds one quantizer for each other
    matrix. Forward runs the float module's own recurrent kernel on the fake-quantized matrices.
    """

    WEIGHT_NAME = "weight_ih_l0"
    weight_quantizers: nn.ModuleDict

    @property
    def weight(self) -> nn.Parameter:  # type: ignore[override]
        """The first input-to-hidden matrix (``weight_ih_l0``)."""
        return self.weight_ih_l0

    def _adopt(self, spec: LayerSpec, name: str) -> None:
        where = f"Layer {name!r}" if name else type(self).__name__
        others = {
            weight: build_weight_quantizer(getattr(self, weight), spec, f"{where} ({weight})")
            for weight in self._flat_weights_names
            if weight.startswith("weight_") and weight != self.WEIGHT_NAME
        }
        self.weight_quantizers = nn.ModuleDict(others)

    def to_float(self) -> nn.Module:
        return _strip(
            self, self.float_type, ("weight_quantizer", "input_quantizer", "output_quantizer", "weight_quantizers")
        )

    def quantized_parameters(self) -> list[tuple[str, nn.Parameter, Quantizer]]:
        entries = [(self.WEIGHT_NAME, self.weight_ih_l0, self.weight_quantizer)]
        entries += [(weight, getattr(self, weight), q) for weight, q in self.weight_quantizers.items()]
        return entries

    def set_weight_quantizer(self, name: str, quantizer: nn.Module) -> None:
        if name == self.WEIGHT_NAME:
            self.weight_quantizer = quantizer  # type: ignore[assignment]
        else:
            self.weight_quantizers[name] = quantizer

    def forward(self, input: Tensor, hx: object = None) -> object:  # type: ignore[override]
        if isinstance(input, nn.utils.rnn.PackedSequence):
            data = self.input_quantizer(input.data)
            input = nn.utils.rnn.PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        else:
            input = self.input_quantizer(input)
        quantizers = {name: q for name, _, q in self.quantized_parameters()}
        saved = self._flat_weights
        # the recurrent kernel reads `_flat_weights`: hand it the fake-quantized matrices for this call
        self._flat_weights = [
            quantizers[name](w) if name in quantizers else w
            for name, w in zip(self._flat_weights_names, saved, strict=True)
        ]
        try:
            return super().forward(input, hx)  # type: ignore[misc]
        finally:
            self._flat_weights = saved


class QuantLSTM(QuantizedRNN, nn.LSTM):
    """:class:`torch.nn.LSTM` with fake-quantized weight matrices and input (see :class:`QuantizedRNN`)."""


class QuantGRU(QuantizedRNN, nn.GRU):
    """:class:`torch.nn.GRU` with fake-quantized weight matrices and input (see :class:`QuantizedRNN`)."""


class QuantRNN(QuantizedRNN, nn.RNN):
    """:class:`torch.nn.RNN` with fake-quantized weight matrices and input (see :class:`QuantizedRNN`)."""


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a module of a quantizable type cannot be quantized as it is configured (``None``: it can)."""
    if type(module) in (nn.LSTM, nn.GRU, nn.RNN) and getattr(module, "proj_size", 0):
        return "LSTM projections (proj_size > 0) are not supported"
    if type(module) is nn.MultiheadAttention:
        if not module._qkv_same_embed_dim:
            return "separate q/k/v projection weights (kdim or vdim != embed_dim) are not supported"
        if module.bias_k is not None or module.add_zero_attn:
            return "bias_k/bias_v and add_zero_attn are not supported"
    return None


#: float layer type -> its quantized counterpart (exact types: subclasses may have their own forward)
QUANTIZED_TYPES: dict[type[nn.Module], type[QuantizedLayer]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.Linear: QuantLinear,
    nn.Embedding: QuantEmbedding,
    nn.MultiheadAttention: QuantMultiheadAttention,
    nn.LSTM: QuantLSTM,
    nn.GRU: QuantGRU,
    nn.RNN: QuantRNN,
}


class OutputQuantized(nn.Module):
    """Mixin of the float modules whose output is fake-quantized: BatchNorms and ReLUs at residual additions,
    and (deployment recipe) sigmoid gates, SiLU/hardswish, and the op markers after additions, products and
    concatenations.

    The quantizer may be shared with the quantized layers that consume the output (their ``input_quantizer`` is
    the same module), so the tensor is quantized once, with one step size, wherever it goes -- what lets an
    int8 runtime keep a residual addition in integers (``QLinearAdd``).
    """

    output_quantizer: UniformQuantizer
    float_type: type[nn.Module]

    @classmethod
    def from_float(cls, module: nn.Module, quantizer: UniformQuantizer) -> OutputQuantized:
        """A copy of ``module`` sharing its parameters and buffers, quantizing its output with ``quantizer``."""
        layer = _shallow_copy(module, cls)
        layer.float_type = type(module)
        layer.output_quantizer = quantizer
        return layer  # type: ignore[return-value]

    def to_float(self) -> nn.Module:
        return _strip(self, self.float_type, ("output_quantizer",))

    def forward(self, x: Tensor) -> Tensor:
        return self.output_quantizer(super().forward(x))  # type: ignore[misc]

    def extra_repr(self) -> str:
        bits = getattr(self.output_quantizer, "bits", None)
        return super().extra_repr() + ("" if bits is None else f", out{bits}")


class QuantizedBatchNorm(OutputQuantized):
    """Marker of the output-quantized BatchNorms (they fold into the conv before them, leaving the quantizer)."""


class QuantBatchNorm1d(QuantizedBatchNorm, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` with a fake-quantized output."""


class QuantBatchNorm2d(QuantizedBatchNorm, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` with a fake-quantized output."""


class QuantBatchNorm3d(QuantizedBatchNorm, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` with a fake-quantized output."""


class QuantReLU(OutputQuantized, nn.ReLU):
    """:class:`torch.nn.ReLU` with a fake-quantized output."""


class QuantReLU6(OutputQuantized, nn.ReLU6):
    """:class:`torch.nn.ReLU6` with a fake-quantized output."""


class QuantMaxPool1d(OutputQuantized, nn.MaxPool1d):
    """:class:`torch.nn.MaxPool1d` with a fake-quantized output."""


class QuantMaxPool2d(OutputQuantized, nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` with a fake-quantized output."""


class QuantMaxPool3d(OutputQuantized, nn.MaxPool3d):
    """:class:`torch.nn.MaxPool3d` with a fake-quantized output."""


class QuantSigmoid(OutputQuantized, nn.Sigmoid):
    """:class:`torch.nn.Sigmoid` with a fake-quantized output (``QLinearSigmoid`` in onnxruntime)."""


class QuantHardsigmoid(OutputQuantized, nn.Hardsigmoid):
    """:class:`torch.nn.Hardsigmoid` with a fake-quantized output."""


class QuantOpOutput(OutputQuantized, OpOutput):
    """An :class:`~lightning_quant.surgery.graph.OpOutput` marker that fake-quantizes the operation's output."""


class GatedActivation(OutputQuantized):
    """Mixin of ``x * gate(x)`` activations computed with a fake-quantized gate: ``x * q_g(gate(x))``.

    Exporters write SiLU as ``Sigmoid`` and ``Mul`` (hardswish as ``HardSigmoid`` and ``Mul``); with a quantizer on
    the gate and on both inputs of the product, onnxruntime runs the gate as ``QLinearSigmoid`` and the product as
    ``QLinearMul``. ``output_quantizer`` is ``nn.Identity`` where the one quantized layer fed quantizes the output
    itself. In float the gate is exact; the quantized gate is on an 8-bit grid over its range ``[0, 1]``.
    """

    gate_quantizer: UniformQuantizer
    gate_function: Callable[[Tensor], Tensor]

    @classmethod
    def from_gated(cls, module: nn.Module, gate: UniformQuantizer, output: nn.Module) -> GatedActivation:
        """A copy of ``module`` with quantizers on its gate and (unless ``output`` is the identity) its output."""
        layer = cls.from_float(module, output)  # type: ignore[arg-type]
        layer.gate_quantizer = gate
        return layer  # type: ignore[return-value]

    def to_float(self) -> nn.Module:
        return _strip(self, self.float_type, ("output_quantizer", "gate_quantizer"))

    def forward(self, x: Tensor) -> Tensor:
        return self.output_quantizer(x * self.gate_quantizer(type(self).gate_function(x)))

    def extra_repr(self) -> str:
        return ", ".join(t for t in (f"gate{self.gate_quantizer.bits}", super().extra_repr().lstrip(", ")) if t)


class QuantSiLU(GatedActivation, nn.SiLU):
    """:class:`torch.nn.SiLU`, ``x * sigmoid(x)``, with a fake-quantized sigmoid gate."""

    gate_function = torch.sigmoid


class QuantHardswish(GatedActivation, nn.Hardswish):
    """:class:`torch.nn.Hardswish`, ``x * hardsigmoid(x)``, with a fake-quantized gate."""

    gate_function = F.hardsigmoid


#: float module type -> its output-quantized counterpart
OUTPUT_QUANTIZED_TYPES: dict[type[nn.Module], type[OutputQuantized]] = {
    nn.BatchNorm1d: QuantBatchNorm1d,
    nn.BatchNorm2d: QuantBatchNorm2d,
    nn.BatchNorm3d: QuantBatchNorm3d,
    nn.ReLU: QuantReLU,
    nn.ReLU6: QuantReLU6,
    nn.MaxPool1d: QuantMaxPool1d,
    nn.MaxPool2d: QuantMaxPool2d,
    nn.MaxPool3d: QuantMaxPool3d,
    nn.Sigmoid: QuantSigmoid,
    nn.Hardsigmoid: QuantHardsigmoid,
    OpOutput: QuantOpOutput,
    nn.SiLU: QuantSiLU,
    nn.Hardswish: QuantHardswish,
}


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """The quantized layers of ``model`` by qualified name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every quantizer module of ``model`` (weights and activations, every kind) by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Quantizer)}


def activation_quantizers(model: nn.Module) -> dict[str, UniformQuantizer]:
    """The quantizers of activations (layer inputs and residual outputs), by qualified name."""
    return {
        name: q
        for name, q in quantizers(model).items()
        if not name.endswith("weight_quantizer") and isinstance(q, UniformQuantizer)
    }

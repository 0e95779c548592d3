"""What stays in float and why (unquantized_layers, the warning, the summary) and spec options that apply to nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant.export import export_onnx
from lightning_quant.models import resnet8
from lightning_quant.surgery import (
    LayerSpec,
    QuantSpec,
    quantization_summary,
    quantize_model,
    quantized_layers,
    unquantized_layers,
)


class WindowAttention(nn.Module):
    """Swin-style attention: the parent reads its projections' weights and calls F.linear itself."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return F.linear(out, self.proj.weight, self.proj.bias)


class SwinBlock(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return self.head((x + self.mlp(x)).mean(dim=1))


class Zoo(nn.Module):
    """The layer kinds users' sequence models are made of (quantized), beside kinds the suite leaves in float."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)  # separate q/k/v weights
        self.projected = nn.LSTM(8, 8, proj_size=4, batch_first=True)
        self.bag = nn.EmbeddingBag(20, 4)
        self.cell = nn.GRUCell(4, 4)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)
        x = self.attention(x, x, x)[0]
        x = self.gru(self.lstm(x)[0])[0]
        memory = self.projected(x)[0]
        x = x + self.cross(x, memory, memory)[0]
        h = self.cell(self.bag(ids))
        return self.head(torch.relu(self.fc(x[:, -1]))) + h[:, :2]


def _float_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "stay in float" in str(w.message)]


def test_layers_whose_weight_the_parent_reads_stay_float_and_are_reported(tmp_path) -> None:
    torch.manual_seed(0)
    model = SwinBlock()
    expected = {"attn.qkv", "attn.proj"}
    assert set(unquantized_layers(model)) == expected
    with pytest.warns(UserWarning, match=r"2 weight layer\(s\) of SwinBlock stay in float") as record:
        quantize_model(model, QuantSpec(first_last_bits=None))
    (message,) = _float_warnings(record)
    assert "attn.qkv (its parent WindowAttention reads `self.qkv.weight` directly" in message
    # they are not swapped: nothing reports them as quantized, and what runs is what the summary says
    assert set(quantized_layers(model)) == {"mlp.0", "mlp.2", "head"}
    assert type(model.attn.qkv) is nn.Linear and type(model.attn.proj) is nn.Linear
    summary = quantization_summary(model)
    assert {r.name for r in summary.rows} == {"mlp.0", "mlp.2", "head"}
    assert "in float: attn.proj: its parent WindowAttention reads `self.proj.weight` directly" in str(summary)
    # such a model exports (the bypassed layers in float) instead of asking for a calibration that cannot help
    model.train()(torch.randn(4, 5, 8))
    export_onnx(model.eval(), tmp_path / "swin.onnx", torch.randn(2, 5, 8))


class ReadsAttentionWeights(nn.Module):
    """A parent that hands attention's packed projection to the functional form itself."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        out = F.multi_head_attention_forward(
            x, x, x, 8, 2, self.attn.in_proj_weight, a.in_proj_bias, None, None, False, 0.0, a.out_proj.weight,
            a.out_proj.bias, training=False,
        )[0]  # fmt: skip
        return self.head(out)


def test_attention_whose_packed_weight_the_parent_reads_stays_float() -> None:
    model = ReadsAttentionWeights()
    with pytest.warns(UserWarning, match=r"attn \(its parent ReadsAttentionWeights reads `self.attn.in_proj_weight`"):
        quantize_model(model, QuantSpec(first_last_bits=None))
    assert type(model.attn) is nn.MultiheadAttention and set(quantized_layers(model)) == {"head"}


class InitialisesAndCalls(nn.Module):
    """Reads `.weight` only to initialise it, and calls its layer through `.forward`: the layer runs quantized."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        nn.init.zeros_(self.fc.weight)
        self.head = nn.Linear(4, 2)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.fc.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc.forward(x))


def test_reads_that_only_initialise_a_weight_are_not_a_bypass() -> None:
    model = nn.Sequential(InitialisesAndCalls())
    assert unquantized_layers(model) == {}
    quantize_model(model, QuantSpec(first_last_bits=None))
    assert set(quantized_layers(model)) == {"0.fc", "0.head"}


def test_sequence_layers_are_quantized_and_only_unsupported_ones_listed() -> None:
    torch.manual_seed(0)
    model = Zoo()
    with pytest.warns(UserWarning) as record:
        quantize_model(model)
    (message,) = _float_warnings(record)
    assert message.startswith("quantize_model: 4 weight layer(s) of Zoo stay in float:")
    assert "cross (MultiheadAttention: separate q/k/v projection weights" in message
    assert "projected (LSTM: LSTM projections (proj_size > 0) are not supported)" in message
    assert "bag (nn.EmbeddingBag weights are not quantized" in message and "cell (recurrent cells" in message
    assert "out_proj" not in message  # attention's projection belongs to its attention, quantized or not
    listed = {"cross", "projected", "bag", "cell"}
    assert set(quantization_summary(model).float_layers) == listed
    # what is not listed runs quantized: every quantizer of the quantized layers sees data in one forward
    quantized = quantized_layers(model)
    assert {"embedding", "attention", "attention.out_proj", "lstm", "gru", "fc", "head"} <= set(quantized)
    assert not listed & set(quantized)
    model.train()(torch.randint(0, 20, (3, 5)))
    for name, layer in quantized.items():
        assert all(q.is_initialized for _, _, q in layer.quantized_parameters()), name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(model)  # idempotent: nothing new is quantized, nothing is said again


def test_a_float_attention_excluded_by_the_spec_is_not_listed() -> None:
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8), nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(model, QuantSpec(exclude=["0"], first_last_bits=None))
    assert type(model[0]) is nn.MultiheadAttention and unquantized_layers(model) == {}


def test_bits_that_apply_to_no_layer_warn() -> None:
    def two_layers() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    spec = QuantSpec(default=LayerSpec(weight_bits=4, act_bits=4))
    with pytest.warns(UserWarning, match=r"W4A4 applies to no layer of Sequential.*\['0', '2'\].*first_last_bits=8"):
        quantize_model(two_layers(), spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = quantize_model(two_layers(), QuantSpec(default=spec.default, first_last_bits=None))
        quantize_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2)), spec)
    assert {layer.weight_quantizer.bits for layer in quantized_layers(model).values()} == {4}


def test_quantize_residuals_without_a_residual_addition_warns() -> None:
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.warns(UserWarning, match=r"`quantize_residuals=True` found no residual addition .* in Sequential"):
        quantize_model(plain, QuantSpec(quantize_residuals=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(resnet8(in_channels=1), QuantSpec(quantize_residuals=True))

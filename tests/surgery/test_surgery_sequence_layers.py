"""Quantized Embedding and MultiheadAttention: float equivalence, recipes, checkpoints, packing, training."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import (
    LayerSpec,
    QuantizationAwareTraining,
    QuantSpec,
    load_quantized,
    quantize_model,
    save_quantized,
)
from lightning_quant.export import load_packed_model, save_packed_model
from lightning_quant.surgery import quantization_summary, quantized_layers
from lightning_quant.surgery.capture import quantizers_disabled
from lightning_quant.surgery.layers import QuantEmbedding, QuantLinear, QuantMultiheadAttention


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MASKS = [
    {},
    {"need_weights": False},
    {"key_padding_mask": "kpm"},
    {"attn_mask": "causal"},
    {"attn_mask": "causal", "key_padding_mask": "kpm", "need_weights": False},
    {"average_attn_weights": False},
    {"attn_mask": "causal", "is_causal": True, "need_weights": False},
]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kwargs", MASKS, ids=lambda k: "-".join(k) or "plain")
def test_quantized_attention_with_quantizers_off_is_the_float_module(batch_first, kwargs):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    holder = quantize_model(nn.Sequential(copy.deepcopy(reference)), QuantSpec(first_last_bits=None))
    attention = holder[0]
    assert isinstance(attention, QuantMultiheadAttention) and isinstance(attention.out_proj, QuantLinear)
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[0, -2:] = True
    masks = {"kpm": kpm, "causal": torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)}
    call = {k: masks.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with quantizers_disabled(holder):
        out, weights = attention(x, x, x, **call)
    expected, expected_weights = reference(x, x, x, **call)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    if expected_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, expected_weights, atol=0, rtol=0)


def test_quantized_attention_quantizes_projections_and_inputs():
    torch.manual_seed(0)
    holder = quantize_model(
        nn.Sequential(nn.MultiheadAttention(8, 2)), QuantSpec(default=LayerSpec(4, 4), first_last_bits=None)
    )
    attention = holder[0]
    x = torch.randn(4, 2, 8)
    attention(x, x, x)  # initialises the step sizes
    w = attention.quantized_weight().detach()
    assert all(row.unique().numel() <= 16 for row in w)  # 4-bit rows of the packed in-projection
    assert attention.input_quantizer.bits == 4 and attention.out_proj.input_quantizer.bits == 4
    with quantizers_disabled(holder):
        float_out = attention(x, x, x)[0]
    assert not torch.equal(attention(x, x, x)[0], float_out)


def test_unsupported_attention_stays_float():
    model = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4), nn.Linear(8, 8), nn.Linear(8, 2))
    quantize_model(model, QuantSpec(first_last_bits=None))
    assert type(model[0]) is nn.MultiheadAttention and isinstance(model[1], QuantLinear)


class TokenClassifier(nn.Module):
    """Token ids -> embedding -> a two-layer Transformer encoder -> mean pooling -> logits."""

    def __init__(self, vocab: int = 12, dim: int = 32, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def test_transformer_recipe_round_trips_through_checkpoints_and_packing(tmp_path):
    torch.manual_seed(0)
    model = quantize_model(TokenClassifier(), QuantSpec(default=LayerSpec(4, 8)))
    kinds = {type(m).__name__ for m in quantized_layers(model).values()}
    assert {"QuantEmbedding", "QuantMultiheadAttention", "QuantLinear"} <= kinds
    assert isinstance(model.embed, QuantEmbedding) and model.embed.input_quantizer.__class__ is nn.Identity
    tokens = torch.randint(0, 12, (6, 7))
    model(tokens)
    # the output projections are rebuilt by their attention layer, so the recipe names only the attention
    spec = QuantSpec.from_model(model)
    assert "encoder.layers.0.self_attn" in spec.layers and "encoder.layers.0.self_attn.out_proj" not in spec.layers
    save_quantized(model, tmp_path / "m.pt")
    restored = load_quantized(TokenClassifier(), tmp_path / "m.pt").eval()
    model.eval()
    assert torch.equal(restored(tokens), model(tokens))
    save_packed_model(model, tmp_path / "m.lqp")
    packed = load_packed_model(TokenClassifier(), tmp_path / "m.lqp").eval()
    assert torch.equal(packed(tokens), model(tokens))
    rows = {r.name: r for r in quantization_summary(model).rows}
    assert rows["encoder.layers.0.self_attn"].params == 3 * 32 * 32
    assert rows["encoder.layers.0.self_attn.out_proj"].params == 32 * 32


class SequenceTask(L.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = TokenClassifier()
        self.lr = lr

    def forward(self, tokens):
        return self.net(tokens)

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        return F.cross_entropy(self(tokens), labels)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _sequence_data(n: int, seed: int) -> TensorDataset:
    """Label 1 when token 3 occurs more often than token 5 (a counting task attention solves)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 12, (n, 10), generator=g)
    labels = ((tokens == 3).sum(1) > (tokens == 5).sum(1)).long()
    return TensorDataset(tokens, labels)


def _accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    # as Lightning evaluates: quantize_model keeps nn.TransformerEncoderLayer off its fused path (which would read
    # the float weights directly), so the figure is the quantized model's
    with torch.no_grad():
        tokens, labels = data.tensors
        return float((model(tokens).argmax(1) == labels).float().mean())


@pytest.mark.slow
def test_transformer_qat_at_w8a8_stays_within_a_point_of_float(tmp_path):
    train, test = _sequence_data(2048, 0), _sequence_data(1000, 1)

    def fit(callbacks: list) -> float:
        L.seed_everything(0)
        model = SequenceTask()
        trainer = L.Trainer(
            max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True))
        return _accuracy(model, test)

    fp = fit([])
    w8a8 = fit([QuantizationAwareTraining(8, 8)])
    w4a4 = fit([QuantizationAwareTraining(4, 4)])
    assert fp > 0.85, fp  # the task is learned
    assert w8a8 >= fp - 0.01, (fp, w8a8)
    assert w4a4 > 0.75, (fp, w4a4)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers_quantize_every_weight_matrix(cls, tmp_path):
    torch.manual_seed(0)
    reference = cls(6, 8, 2, batch_first=True, bidirectional=True)
    holder = quantize_model(
        nn.Sequential(copy.deepcopy(reference)), QuantSpec(default=LayerSpec(4, 4), first_last_bits=None)
    )
    rnn = holder[0]
    names = [name for name, _, _ in rnn.quantized_parameters()]
    assert names == [n for n in reference._flat_weights_names if n.startswith("weight_")]
    x = torch.randn(3, 5, 6)
    with quantizers_disabled(holder):
        torch.testing.assert_close(rnn(x)[0], reference(x)[0], atol=0, rtol=0)
    out = rnn(x)[0]
    out.sum().backward()
    # every matrix is 4-bit per row, and every step size learns
    for _, weight, quantizer in rnn.quantized_parameters():
        assert all(row.unique().numel() <= 16 for row in quantizer(weight).detach())
        assert quantizer.scale.grad is not None
    # packed sequences, summary, packing and checkpoints carry every matrix
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3, 2]), batch_first=True)
    assert rnn(packed)[0].data.shape[0] == 10
    row = quantization_summary(holder).rows[0]
    assert row.params == sum(w.numel() for n, w in reference.named_parameters() if n.startswith("weight_"))
    assert row.payload_bits == 4 * row.params
    holder.eval()
    save_packed_model(holder, tmp_path / "rnn.lqp")
    restored = load_packed_model(
        nn.Sequential(cls(6, 8, 2, batch_first=True, bidirectional=True)), tmp_path / "rnn.lqp"
    )
    assert torch.equal(restored.eval()[0](x)[0], rnn(x)[0])
    save_quantized(holder, tmp_path / "rnn.pt")
    reloaded = load_quantized(nn.Sequential(cls(6, 8, 2, batch_first=True, bidirectional=True)), tmp_path / "rnn.pt")
    assert torch.equal(reloaded.eval()[0](x)[0], rnn(x)[0])


class LSTMTask(SequenceTask):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__(lr)
        self.net = nn.ModuleDict(
            {"embed": nn.Embedding(12, 16), "lstm": nn.LSTM(16, 32, batch_first=True), "head": nn.Linear(32, 2)}
        )

    def forward(self, tokens):
        out, _ = self.net["lstm"](self.net["embed"](tokens))
        return self.net["head"](out[:, -1])


@pytest.mark.slow
def test_lstm_qat_at_w8a8_stays_within_a_point_of_float(tmp_path):
    train, test = _sequence_data(2048, 0), _sequence_data(1000, 1)

    def fit(callbacks: list) -> float:
        L.seed_everything(0)
        model = LSTMTask()
        trainer = L.Trainer(
            max_epochs=8, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True))
        return _accuracy(model, test)

    fp = fit([])
    w8a8 = fit([QuantizationAwareTraining(8, 8)])
    w4a4 = fit([QuantizationAwareTraining(4, 4)])
    assert fp > 0.85, fp
    assert w8a8 >= fp - 0.01, (fp, w8a8)
    assert w4a4 > 0.75, (fp, w4a4)

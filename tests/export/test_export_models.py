"""export_onnx / verify_onnx on the models users bring: attention, token ids, one logit, their own inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_quant.core.errors import QuantizationConfigError, UnsupportedModuleError
from lightning_quant.export import create_session, export_onnx, verify_onnx
from lightning_quant.surgery import LayerSpec, QuantSpec, quantize_model, quantized_layers

VOCAB, SEQ = 40, 10


class TinyViT(nn.Module):
    """The shape of a ViT: patch embedding, class token, pre-norm attention block with an MLP, linear head."""

    def __init__(self, dim: int = 16, heads: int = 2, classes: int = 4, patch: int = 4, image: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.head(x[:, 0])


class GRUClassifier(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 16)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.gru(self.embedding(ids))[0][:, -1]
        return self.head(torch.relu(self.fc(hidden)))


class TransformerClassifier(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(16, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embedding(ids)).mean(dim=1))


def _calibrated(model: nn.Module, *inputs: torch.Tensor, bits: int = 4) -> nn.Module:
    # below 8 bits the file computes the fake-quant model without onnxruntime's integer requantization
    quantize_model(model, QuantSpec(default=LayerSpec(weight_bits=bits, act_bits=bits), first_last_bits=None))
    model.train()
    with torch.no_grad():
        model(*inputs)
    return model.eval()


def test_attention_model_exported_from_batch_one_runs_at_batch_one_two_and_three(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _calibrated(TinyViT(), torch.randn(16, 1, 8, 8))
    assert {"attn", "attn.out_proj", "mlp.0", "mlp.2"} <= set(quantized_layers(model))  # attention quantized too
    path = export_onnx(model, tmp_path / "vit.onnx", torch.randn(1, 1, 8, 8))  # traced from a batch of 2
    session = create_session(path)
    for batch in (1, 2, 3):
        x = torch.randn(batch, 1, 8, 8)
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        torch.testing.assert_close(got, model(x).detach(), atol=1e-4, rtol=1e-4)
    result = verify_onnx(model, path, [(torch.randn(4, 1, 8, 8), torch.arange(4)), torch.randn(3, 1, 8, 8)])
    assert result.num_samples == 7


class FixedBatch(nn.Module):
    """A forward that hard-codes its batch size in a reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).reshape(2, -1))


def test_a_fixed_batch_axis_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _calibrated(FixedBatch(), torch.randn(2, 1, 8, 8))
    with pytest.raises(UnsupportedModuleError, match=r"fixed its batch axis.*at the export batch size 2 but not at 3"):
        export_onnx(model, tmp_path / "fixed.onnx", torch.randn(2, 1, 8, 8))
    assert not (tmp_path / "fixed.onnx").exists()
    export_onnx(model, tmp_path / "fixed.onnx", torch.randn(2, 1, 8, 8), dynamic_batch=False)  # asked for


def test_example_input_array_is_the_default_input(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _calibrated(nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 12)), torch.randn(4, 12))
    with pytest.raises(QuantizationConfigError, match=r"`example_input` is None and Sequential sets no"):
        export_onnx(model, tmp_path / "a.onnx")
    model.example_input_array = torch.randn(1, 12)
    path = export_onnx(model, tmp_path / "a.onnx")
    assert create_session(path).get_inputs()[0].shape[1] == 12


@pytest.mark.parametrize("architecture", [GRUClassifier, TransformerClassifier])
def test_text_classifiers_are_verified_with_token_ids(architecture, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (16, SEQ))
    model = _calibrated(architecture(), ids)
    kinds = {type(layer).__name__ for layer in quantized_layers(model).values()}
    assert "QuantEmbedding" in kinds and ({"QuantGRU"} <= kinds or {"QuantMultiheadAttention"} <= kinds)
    path = export_onnx(model, tmp_path / "text.onnx", ids[:2])
    assert create_session(path).get_inputs()[0].type == "tensor(int64)"
    labels = model(ids).argmax(dim=1)
    batches = [(ids[:8], labels[:8]), (ids[8:13], labels[8:13]), (ids[13:], labels[13:])]
    result = verify_onnx(model, path, batches)
    assert result.num_samples == 16 and result.task == "multiclass"
    assert result.agreement >= 15 / 16 and result.torch_accuracy == 1.0
    assert result.relative_error < 0.05


class Disagrees(nn.Module):
    """One logit per sample; the exported file returns the negated logit (as a broken export would)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(torch.relu(self.fc1(x)))
        return -out if torch.onnx.is_in_onnx_export() else out


def test_one_logit_agreement_is_the_sign_and_labels_give_accuracy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    model = _calibrated(Disagrees(), x)
    path = export_onnx(model, tmp_path / "one.onnx", x[:2])
    labels = (model(x) > 0).long().squeeze(1)
    result = verify_onnx(model, path, [(x, labels)])
    assert result.task == "binary" and result.agreement == 0.0
    assert result.torch_accuracy == 1.0 and result.onnx_accuracy == 0.0
    assert result.relative_error == pytest.approx(2.0, rel=1e-4)  # ||-y - y|| / ||y||
    assert "sign agreement (one logit) 0.0000%" in str(result)
    # labels that do not fit one logit: no accuracy
    unfit = verify_onnx(model, path, [(x, torch.randint(0, 5, (32,)))])
    assert unfit.agreement == 0.0 and unfit.torch_accuracy is None and "torch_accuracy" not in unfit.as_metrics()
    # float targets: values, not classes; the relative error judges them and agreement is undefined
    scores = verify_onnx(model, path, [(x, torch.randn(32))])
    assert scores.task == "regression" and scores.agreement is None and scores.relative_error == pytest.approx(2.0)
    assert "agreement undefined" in str(scores) and "agreement" not in scores.as_metrics()

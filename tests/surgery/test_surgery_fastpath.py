"""nn.TransformerEncoderLayer's fused eval path must not bypass quantized layers (how Lightning validates)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightning_quant.core.quantizers import UniformQuantizer
from lightning_quant.surgery import LayerSpec, QuantSpec, dequantize_model, quantize_model, quantizers
from lightning_quant.surgery.fastpath import takes_fast_path


def _encoder() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2)


def _quantized_w4a4() -> nn.TransformerEncoder:
    encoder = quantize_model(_encoder(), QuantSpec(default=LayerSpec(weight_bits=4, act_bits=4), first_last_bits=None))
    encoder.train()(torch.randn(8, 6, 16))  # calibrate
    return encoder.eval()


def _quantizer_calls(monkeypatch) -> list[int]:
    """Count quantizer calls without hooks (a hook would itself keep the layer off the fused path)."""
    calls: list[int] = []
    forward = UniformQuantizer.forward

    def counting(self, x):
        calls.append(id(self))
        return forward(self, x)

    monkeypatch.setattr(UniformQuantizer, "forward", counting)
    return calls


def test_eval_under_no_grad_runs_the_quantized_layers(monkeypatch) -> None:
    encoder = _quantized_w4a4()
    x = torch.randn(3, 6, 16)
    calls = _quantizer_calls(monkeypatch)
    reference = encoder(x).detach()  # gradients enabled: PyTorch's own slow path, through every submodule
    # each quantizer once: attention's shared input and packed weight, out_proj's, linear1's and linear2's, per layer
    assert sorted(calls) == sorted(id(q) for q in quantizers(encoder).values()) and len(calls) == 16
    calls.clear()
    with torch.no_grad():  # how Lightning validates, tests and predicts
        got = encoder(x)
    assert len(calls) == 16
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
    float_model = copy.deepcopy(encoder)
    dequantize_model(float_model)
    with torch.no_grad():
        assert (float_model(x) - got).abs().max() > 1e-2  # W4A4 matters: the float path would be visibly off


def test_padded_batches_do_not_take_the_nested_tensor_path(monkeypatch) -> None:
    encoder = _quantized_w4a4()
    x = torch.randn(3, 6, 16)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[1, 4:] = True  # sample 1 is padded
    calls = _quantizer_calls(monkeypatch)
    reference = encoder(x, src_key_padding_mask=mask).detach()
    with torch.no_grad():
        got = encoder(x, src_key_padding_mask=mask)
    assert len(calls) == 32
    keep = ~mask
    torch.testing.assert_close(got[keep], reference[keep], atol=1e-5, rtol=1e-5)


def test_dequantizing_gives_the_fast_path_back() -> None:
    encoder = _quantized_w4a4()
    assert not any(takes_fast_path(layer) for layer in encoder.layers) and not encoder.use_nested_tensor
    quantize_model(encoder, QuantSpec(default=LayerSpec(weight_bits=4, act_bits=4), first_last_bits=None))  # again
    assert all(len(layer._forward_pre_hooks) == 1 for layer in encoder.layers)  # idempotent: one hook each
    dequantize_model(encoder)
    assert all(takes_fast_path(layer) for layer in encoder.layers) and encoder.use_nested_tensor
    assert all(not layer._forward_pre_hooks for layer in encoder.layers)

"""Model surgery: parameter identity, idempotence, atomicity, selection, recipes, summaries, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from lightning_quant import QuantizationConfigError
from lightning_quant.core.functional import quant_range
from lightning_quant.surgery import (
    LayerSpec,
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    dequantize_model,
    load_quantized,
    quantizable_layers,
    quantization_summary,
    quantize_model,
    quantized_layers,
    save_quantized,
)


class BranchyNet(nn.Module):
    """A user-style model: two branches, a shared layer used twice, a Conv1d head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.shared = nn.Linear(8, 8)
        self.seq_head = nn.Conv1d(1, 2, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = (self.left(h) + self.right(h)).mean(dim=(2, 3))
        h = self.shared(torch.relu(self.shared(h)))  # the same layer twice
        h = self.seq_head(h.unsqueeze(1)).flatten(1)
        return self.fc(h)


def _ids(model: nn.Module) -> dict[str, int]:
    return {name: id(m) for name, m in model.named_modules()}


def test_parameters_keep_identity_and_keys() -> None:
    model = BranchyNet()
    params = dict(model.named_parameters())
    keys = set(model.state_dict())
    quantize_model(model, QuantSpec(default=LayerSpec(weight_bits=4, act_bits=4)))
    for name, param in model.named_parameters():
        if "quantizer" not in name:
            assert param is params[name]
    assert keys <= set(model.state_dict())  # float keys unchanged, quantizer keys added
    assert isinstance(model.stem, nn.Conv2d) and isinstance(model.stem, QuantConv2d)


def test_quantized_forward_matches_independent_reference() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    model = quantize_model(
        nn.Sequential(layer), QuantSpec(default=LayerSpec(weight_bits=3, act_bits=5), first_last_bits=None)
    )
    model.eval()
    x = torch.randn(4, 6)
    q = model[0]
    y = model(x)  # the first forward initialises the ranges from x and the weight
    # reference: NumPy min/max... the observers' ranges turned into a grid, applied by hand
    w = layer.weight.detach().numpy()
    sw = q.weight_quantizer.scale.detach().numpy()[:, None]
    qmin, qmax = quant_range(3, signed=True)
    wq = (np.clip(np.rint(w * (np.float32(1) / sw)), qmin, qmax) * sw).astype(np.float32)
    sa = q.input_quantizer.scale.detach().numpy()
    za = q.input_quantizer.zero_point.numpy()
    amin, amax = quant_range(5, signed=False)
    xn = x.numpy()
    xq = ((np.clip(np.rint(xn * (np.float32(1) / sa)) + za, amin, amax) - za) * sa).astype(np.float32)
    ref = xq @ wq.T + layer.bias.detach().numpy()
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-5, atol=1e-6)
    # the grid really is 3-bit: at most 8 distinct values per output channel
    assert all(len(np.unique(row)) <= 8 for row in wq)


def test_idempotent_second_call_swaps_nothing() -> None:
    model = BranchyNet()
    spec = QuantSpec(default=LayerSpec(weight_bits=4, act_bits=4), include=["stem", "left.*"])
    quantize_model(model, spec)
    before = _ids(model)
    quantize_model(model, spec)
    assert _ids(model) == before
    assert set(quantized_layers(model)) == {"stem", "left.0"}


def test_atomic_on_error_model_untouched() -> None:
    model = BranchyNet()
    before = _ids(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bad = QuantSpec(layers={"does_not_exist": LayerSpec()})
    with pytest.raises(QuantizationConfigError, match="`layers` key 'does_not_exist' matches no quantizable layer"):
        quantize_model(model, bad)
    assert _ids(model) == before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not quantized_layers(model)


def test_shared_layer_stays_shared() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model.append(model[0])  # the same Linear registered twice
    quantize_model(model, QuantSpec(first_last_bits=None))
    assert isinstance(model[0], QuantLinear) and model[2] is model[0]
    model(torch.randn(2, 4)).sum().backward()


def test_include_exclude_and_types() -> None:
    model = BranchyNet()
    spec = QuantSpec(exclude=["right.*"], exclude_types=["Conv1d"], first_last_bits=None)
    quantize_model(model, spec)
    assert set(quantized_layers(model)) == {"stem", "left.0", "shared", "fc"}
    assert set(quantizable_layers(model)) == {"right.0", "seq_head"}


def test_first_last_layers_at_eight_bits_by_default() -> None:
    model = BranchyNet()
    quantize_model(model, QuantSpec(default=LayerSpec(weight_bits=2, act_bits=3)))
    bits = {n: (m.weight_quantizer.bits, m.input_quantizer.bits) for n, m in quantized_layers(model).items()}
    assert bits["stem"] == (8, 8) and bits["fc"] == (8, 8)
    assert bits["left.0"] == (2, 3) and bits["shared"] == (2, 3)
    assert quantized_layers(model)["stem"].layer_spec.frozen  # allocators keep their hands off


def test_per_layer_override_wins() -> None:
    model = BranchyNet()
    spec = QuantSpec(default=LayerSpec(weight_bits=4), layers={"left.*": LayerSpec(weight_bits=6, act_bits=None)})
    quantize_model(model, spec)
    left = quantized_layers(model)["left.0"]
    assert left.weight_quantizer.bits == 6 and isinstance(left.input_quantizer, nn.Identity)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_bits": 9}, r"`weight_bits` must be within \[2, 8\], got 9"),
        ({"weight_bits": 0}, r"`weight_bits` must be within \[2, 8\], got 0"),
        ({"weight_bits": 3.5}, r"`weight_bits` must be an integer number of bits .* got 3.5"),
        ({"act_bits": 1}, r"`act_bits` must be within \[2, 8\], got 1"),
        ({"weight_granularity": "per_group"}, r"`weight_granularity` must be one of \['per_channel', 'per_tensor'\]"),
        ({"act_observer": "kl"}, r"`act_observer` must be one of"),
    ],
)
def test_layer_spec_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(QuantizationConfigError, match=match):
        LayerSpec(**kwargs)


def test_unknown_pattern_and_empty_model_errors() -> None:
    with pytest.raises(QuantizationConfigError, match=r"`include` pattern 'body\.\*' matches no quantizable layer"):
        quantize_model(BranchyNet(), QuantSpec(include=["body.*"]))
    with pytest.raises(QuantizationConfigError, match="has no layer that can be quantized"):
        quantize_model(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(QuantizationConfigError, match="selects no layer"):
        quantize_model(BranchyNet(), QuantSpec(exclude=["*"]))
    with pytest.raises(QuantizationConfigError, match="`exclude_types` must be one of"):
        QuantSpec(exclude_types=["BatchNorm2d"])


def test_spec_round_trips_json_yaml_and_files(tmp_path) -> None:
    spec = QuantSpec(
        default=LayerSpec(weight_bits=3, act_bits=None, scale_mode="observer"),
        exclude=["fc"],
        layers={"stem": LayerSpec(weight_bits=8, frozen=True)},
    )
    assert QuantSpec.from_json(spec.to_json()) == spec
    assert QuantSpec.from_yaml(spec.to_yaml()) == spec
    for suffix in (".json", ".yaml"):
        spec.save(tmp_path / f"spec{suffix}")
        assert QuantSpec.load(tmp_path / f"spec{suffix}") == spec
    data = json.loads(spec.to_json())
    data["default"]["bits"] = 4
    with pytest.raises(QuantizationConfigError, match=r"Unknown keys \['bits'\] in QuantSpec.default"):
        QuantSpec.from_dict(data)


def test_from_model_records_changed_bits_and_rebuilds_the_same_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = quantize_model(BranchyNet(), QuantSpec(default=LayerSpec(weight_bits=4, act_bits=4)))
    model(torch.randn(2, 3, 8, 8))
    quantized_layers(model)["left.0"].weight_quantizer.bits = 2  # as a bit allocator would
    spec = QuantSpec.from_model(model)
    assert spec.layers["left.0"].weight_bits == 2
    save_quantized(model, tmp_path / "q.pt")
    fresh = load_quantized(BranchyNet(), tmp_path / "q.pt")  # strict
    assert quantized_layers(fresh)["left.0"].weight_quantizer.bits == 2
    x = torch.randn(3, 3, 8, 8)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    with pytest.raises(QuantizationConfigError, match="has no 'lightning_quant_spec' entry"):
        load_quantized(BranchyNet(), {"state_dict": {}})


def test_dequantize_restores_float_layers_with_same_parameters() -> None:
    model = BranchyNet()
    weight = model.stem.weight
    quantize_model(model)
    dequantize_model(model)
    assert type(model.stem) is nn.Conv2d and model.stem.weight is weight
    assert not quantized_layers(model)
    assert set(model.state_dict()) == set(BranchyNet().state_dict())


def test_summary_sizes_by_hand() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    quantize_model(model, QuantSpec(default=LayerSpec(weight_bits=4, act_bits=8), first_last_bits=None))
    summary = quantization_summary(model)
    conv_w, conv_b, fc_w, fc_b = 36, 4, 1440, 10
    bn = 4 * 4  # weight, bias, running mean, running var
    assert summary.fp32_bits == 32 * (conv_w + conv_b + fc_w + fc_b + bn)
    side = 32 * ((4 + 4 + 1 + 1) + (10 + 10 + 1 + 1))  # per-channel weight scale/zp, per-tensor act scale/zp
    assert summary.quantized_bits == 4 * (conv_w + fc_w) + 32 * (conv_b + fc_b + bn) + side
    assert [r.name for r in summary.rows] == ["0", "3"]
    assert summary.avg_weight_bits == 4.0
    text = str(summary)
    assert "w_bits" in text and "smaller" in text


def test_depthwise_and_torchvision_models_quantize_and_run() -> None:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10)
    quantize_model(model, QuantSpec(default=LayerSpec(weight_bits=4, act_bits=4)))
    depthwise = [m for m in quantized_layers(model).values() if getattr(m, "groups", 1) > 1]
    assert depthwise and all(m.weight_quantizer.scale.numel() == m.out_channels for m in depthwise)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert len(quantized_layers(model)) == len(
        [m for m in torchvision.models.mobilenet_v2().modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    )

"""Quantizer kinds through surgery: per-channel widths and codebooks in a spec, one account of sizes, atomic errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_quant import LayerSpec, QuantSpec, load_quantized, quantization_summary, quantize_model, save_quantized
from lightning_quant.allocation import avg_bits_constraint, layer_costs, size_constraint
from lightning_quant.core.codebook import CodebookQuantizer
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.surgery.layers import quantized_layers


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )  # fmt: skip


MIXED = (1, 4, 2, 1)
SPEC = QuantSpec(
    default=LayerSpec(weight_bits=4, act_bits=8),
    first_last_bits=None,
    layers={
        "2": LayerSpec(weight_bits=MIXED, act_bits=8),
        "0": LayerSpec(weight_kind="codebook", weight_bits=2, codebook_vector="kernel", codebook_bits=6, act_bits=8),
    },
)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_spec_builds_each_kind_and_round_trips_through_checkpoints(tmp_path):
    model = quantize_model(_net(), SPEC)
    layers = quantized_layers(model)
    assert isinstance(layers["0"].weight_quantizer, CodebookQuantizer)
    assert layers["2"].weight_quantizer.bits == MIXED
    x = torch.randn(4, 3, 8, 8)
    model(x)
    assert QuantSpec.from_yaml(QuantSpec.from_model(model).to_yaml()) == QuantSpec.from_model(model)
    save_quantized(model, tmp_path / "m.pt")
    restored = load_quantized(_net(), tmp_path / "m.pt")
    model.eval()
    restored.eval()
    assert torch.equal(restored(x), model(x))
    assert quantized_layers(restored)["2"].weight_quantizer.bits == MIXED


def test_one_account_of_sizes_summary_allocation_and_packing(tmp_path):
    from lightning_quant.export import model_size_report, save_packed_model
    from lightning_quant.export.packing import PACKED_FILE_PREFIX_BYTES, load_packed, pack_model

    model = quantize_model(_net(), SPEC)
    model(torch.randn(4, 3, 8, 8))
    summary = quantization_summary(model)
    rows = {r.name: r for r in summary.rows}
    # mixed widths: 6 inputs * 9 kernel elements per output channel at its width
    assert rows["2"].payload_bits == 6 * 9 * sum(MIXED)
    # kernel codebook: one 2-bit index per kernel
    assert rows["0"].payload_bits == 6 * 3 * 2 and rows["0"].kind == "codebook"
    costs = layer_costs(model)
    assert costs.weight_payload.tolist() == [rows[n].payload_bits for n in costs.names]
    assert costs.frozen.tolist() == [True, True, False]  # codebook and mixed widths: not re-allocatable
    total = sum(r.payload_bits for r in summary.rows)
    size = size_constraint(costs, 1e9)
    assert size.cost(costs.weight_bits[costs.free]) == total
    avg = avg_bits_constraint(costs, 8.0)
    assert avg.display(avg.cost(costs.weight_bits[costs.free])) == pytest.approx(summary.avg_weight_bits)
    # packing writes every layer's payload at exactly its bits (rounded up to whole bytes per layer)
    entries = pack_model(model)
    for name in ("0", "2", "5"):
        assert entries[f"{name}.weight"]["packed"].numel() == -(-rows[name].payload_bits // 8)
    report = model_size_report(model)
    assert abs(report.total_bytes * 8 - summary.quantized_bits) < 8 * len(summary.rows)
    written = save_packed_model(model, tmp_path / "m.lqp")
    header = written - PACKED_FILE_PREFIX_BYTES - report.total_bytes
    assert header > 0 and load_packed(tmp_path / "m.lqp")["2.weight"]["bits"] == list(MIXED)


def test_packed_model_loads_back_exactly(tmp_path):
    from lightning_quant.export import load_packed_model, save_packed_model

    model = quantize_model(_net(), SPEC)
    x = torch.randn(4, 3, 8, 8)
    model(x)
    model.eval()
    save_packed_model(model, tmp_path / "m.lqp")
    fresh = load_packed_model(_net(), tmp_path / "m.lqp").eval()
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        (
            {"2": LayerSpec(weight_bits=(4, 4, 2))},
            r"Layer '2': `bits` must give one width per channel: 4 widths, got 3",
        ),
        (
            {"0": LayerSpec(weight_kind="codebook", weight_bits=5, codebook_vector="kernel")},
            r"Layer '0': A codebook of 32 entries is larger than the 18 kernels",
        ),
    ],
)
def test_a_spec_that_does_not_fit_its_layer_fails_before_anything_changes(layers, match):
    model = _net()
    before = _state(model)
    types = [type(m) for m in model.modules()]
    spec = QuantSpec(first_last_bits=None, layers=layers, quantize_residuals=False, fold_batchnorm=True)
    with pytest.raises(QuantizationConfigError, match=match):
        quantize_model(model, spec)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_spec_level_errors_for_widths():
    with pytest.raises(QuantizationConfigError, match=r"must be within \[2, 8\], got 9"):
        LayerSpec(weight_bits=(4, 9))
    with pytest.raises(QuantizationConfigError, match=r"Binary weights \(`weight_bits=1`\) are symmetric"):
        LayerSpec(weight_bits=(1, 4), weight_symmetric=False)
    with pytest.raises(QuantizationConfigError, match=r"per-channel widths need `weight_granularity='per_channel'`"):
        LayerSpec(weight_bits=(2, 4), weight_granularity="per_tensor")
    with pytest.raises(QuantizationConfigError, match=r"`act_bits` must be within \[2, 8\], got 1"):
        LayerSpec(act_bits=1)
    assert LayerSpec(weight_bits=[3, 3]).weight_bits == 3  # one width after all


def _shared_spec(**extra) -> QuantSpec:
    cb = LayerSpec(weight_kind="codebook", weight_bits=3, codebook_vector="kernel", codebook_bits=6, act_bits=8,
                   codebook_share="k3", **extra)  # fmt: skip
    return QuantSpec(default=LayerSpec(weight_bits=4, act_bits=8), first_last_bits=None, layers={"0": cb, "2": cb})


def test_shared_codebook_through_surgery_checkpoints_summary_and_packing(tmp_path):
    from lightning_quant.core.codebook import fit_shared_codebook
    from lightning_quant.export import load_packed_model, model_size_report, save_packed_model
    from lightning_quant.export.packing import load_packed

    model = quantize_model(_net(), _shared_spec())
    layers = quantized_layers(model)
    a, b = layers["0"].weight_quantizer, layers["2"].weight_quantizer
    assert b.codebook_owner is a and "2.weight_quantizer.codebook" not in model.state_dict()
    fit_shared_codebook([a, b], [layers["0"].weight, layers["2"].weight])
    x = torch.randn(4, 3, 8, 8)
    model(x)
    model.eval()
    # the recipe records the sharing: a strict checkpoint round trip rebuilds it
    spec = QuantSpec.from_model(model)
    assert spec.layers["2"].codebook_share == "k3" and QuantSpec.from_yaml(spec.to_yaml()) == spec
    save_quantized(model, tmp_path / "m.pt")
    restored = load_quantized(_net(), tmp_path / "m.pt").eval()
    assert (
        quantized_layers(restored)["2"].weight_quantizer.codebook_owner
        is quantized_layers(restored)["0"].weight_quantizer
    )
    assert torch.equal(restored(x), model(x))
    # sizes count the codebook once: the summary, the size report and the packed file agree
    rows = {r.name: r for r in quantization_summary(model).rows}
    assert rows["0"].size_bits - rows["0"].payload_bits - 2 * 32 == 8 * 9 * 6 + 32  # less its input scale, zero point
    assert rows["2"].size_bits - rows["2"].payload_bits == 2 * 32  # its input quantizer only
    save_packed_model(model, tmp_path / "m.lqp")
    entries = load_packed(tmp_path / "m.lqp")
    assert "codebook" in entries["0.weight"] and "codebook" not in entries["2.weight"]
    assert model_size_report(model).total_bytes * 8 >= quantization_summary(model).quantized_bits
    fresh = load_packed_model(_net(), tmp_path / "m.lqp").eval()
    assert torch.equal(fresh(x), model(x))


def test_shared_codebook_mismatch_fails_before_anything_changes():
    model = _net()
    before = _state(model)
    types = [type(m) for m in model.modules()]
    cb = dict(weight_kind="codebook", codebook_vector="kernel", codebook_bits=6, codebook_share="k3")
    spec = QuantSpec(
        first_last_bits=None, layers={"0": LayerSpec(weight_bits=3, **cb), "2": LayerSpec(weight_bits=4, **cb)}
    )
    with pytest.raises(QuantizationConfigError, match=r"Layer '2' cannot share the codebook of Layer '0'"):
        quantize_model(model, spec)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

"""One owner of quantization: merged requests, order independence, conflicts, and FAT resumed into a fresh module."""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import (
    BitReallocationCallback,
    BlockReplacementCallback,
    LayerSpec,
    QuantizationAwareTraining,
    QuantSpec,
    ThresholdTuningCallback,
)
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.models import ImageClassifier
from lightning_quant.surgery import quantized_layers
from lightning_quant.surgery.requests import QuantizationRequest, explicit_fields, merge_requests


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip


def _model(seed: int = 0) -> ImageClassifier:
    torch.manual_seed(seed)
    return ImageClassifier(_net(), lr=1e-2)


def _loader(n: int = 32, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)), batch
    )


CANDIDATES = {"0": "Conv2d", "3": "Conv2d", "8": "Linear"}


# ---------------------------------------------------------------------------------------------------------------
# merge_requests
# ---------------------------------------------------------------------------------------------------------------
def test_one_request_gives_exactly_its_own_recipe():
    spec = QuantSpec(default=LayerSpec(weight_bits=4, act_bits=4), exclude=["8"])
    merged = merge_requests([QuantizationRequest("A", spec)], CANDIDATES)
    assert merged.resolve(CANDIDATES) == spec.resolve(CANDIDATES)


def test_required_fields_win_over_preferences_and_priority_decides_the_rest():
    qat = QuantizationRequest("QAT", QuantSpec(default=LayerSpec(weight_bits=4)), frozenset({"default.weight_bits"}), 0)
    fat_spec = QuantSpec(default=LayerSpec(weight_bits=8, scale_mode="observer"), fold_batchnorm=True)
    fat = QuantizationRequest("FAT", fat_spec, frozenset({"default.scale_mode", "fold_batchnorm"}), 10)
    for requests in ([qat, fat], [fat, qat]):
        merged = merge_requests(requests, CANDIDATES)
        layer = merged.layers["3"]
        assert (layer.weight_bits, layer.scale_mode, merged.fold_batchnorm) == (4, "observer", True)
    # without requirements the higher priority's preference wins
    weak = QuantizationRequest("W", QuantSpec(default=LayerSpec(weight_bits=2)), priority=50)
    assert merge_requests([weak, qat], CANDIDATES).layers["3"].weight_bits == 4


def test_contradictory_requirements_name_both_callbacks_and_the_fix():
    a = QuantizationRequest("QuantizationAwareTraining", QuantSpec(), frozenset({"default.scale_mode"}), 0)
    b_spec = QuantSpec(default=LayerSpec(scale_mode="observer"))
    b = QuantizationRequest("ThresholdTuningCallback", b_spec, frozenset({"default.scale_mode"}), 10)
    for requests in ([a, b], [b, a]):
        with pytest.raises(
            QuantizationConfigError,
            match=r"`scale_mode`: QuantizationAwareTraining needs 'lsq' and ThresholdTuningCallback needs 'observer'; "
            r"both cannot hold\. HINT: give both callbacks the same `scale_mode`",
        ):
            merge_requests(requests, CANDIDATES)


def test_per_layer_requirements_apply_on_top_and_conflict_clearly():
    codebook = {"weight_kind": "codebook", "weight_bits": 2, "codebook_vector": "kernel", "codebook_bits": 6}
    kq = QuantizationRequest("KQ", QuantSpec(default=LayerSpec(act_bits=None)), layers={"3": codebook}, priority=20)
    qat = QuantizationRequest("QAT", QuantSpec(default=LayerSpec(4, 4)), frozenset({"default.act_bits"}), 0)
    merged = merge_requests([kq, qat], CANDIDATES)
    assert merged.layers["3"].weight_kind == "codebook" and merged.layers["3"].act_bits == 4
    assert merged.layers["0"].weight_kind == "uniform"
    other = QuantizationRequest("Other", QuantSpec(), layers={"3": {"weight_bits": 3}}, priority=30)
    with pytest.raises(QuantizationConfigError, match=r"`weight_bits` of layer '3': KQ needs 2 and Other needs 3"):
        merge_requests([kq, other], CANDIDATES)
    with pytest.raises(QuantizationConfigError, match=r"KQ asks for layer 'nope', which matches no quantizable layer"):
        merge_requests([QuantizationRequest("KQ", QuantSpec(), layers={"nope": {"weight_bits": 2}})], CANDIDATES)


def test_explicit_fields_and_unknown_required_fields():
    spec = QuantSpec(default=LayerSpec(weight_bits=4), quantize_residuals=True)
    assert explicit_fields(spec) == {"default.weight_bits", "quantize_residuals"}
    with pytest.raises(QuantizationConfigError, match=r"unknown required fields \['default.bitz'\]"):
        QuantizationRequest("X", spec, frozenset({"default.bitz"}))


# ---------------------------------------------------------------------------------------------------------------
# through the Trainer
# ---------------------------------------------------------------------------------------------------------------
def _fit_state(callbacks: list, steps: int = 4) -> tuple[dict[str, torch.Tensor], list[str]]:
    L.seed_everything(0)
    model = _model()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, _loader())
    kinds = [f"{n}:{type(m).__name__}:{m.current_spec()}" for n, m in quantized_layers(model).items()]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, kinds


def test_qat_qbitopt_and_block_replacement_give_the_same_model_in_all_six_orders():
    def build(order: tuple[int, ...]) -> list:
        callbacks = [
            QuantizationAwareTraining(4, 8, num_calibration_batches=1),
            BitReallocationCallback(avg_weight_bits=5.0, every_n_steps=2, plot=False),
            BlockReplacementCallback(blocks=["backbone.0", "backbone.3", "backbone.8"]),
        ]
        return [callbacks[i] for i in order]

    reference_state, reference_kinds = _fit_state(build((0, 1, 2)))
    for order in itertools.permutations(range(3)):
        state, kinds = _fit_state(build(order))
        assert kinds == reference_kinds, order
        assert state.keys() == reference_state.keys(), order
        for key, value in state.items():
            torch.testing.assert_close(value, reference_state[key], atol=0, rtol=0, msg=f"{order} {key}")


def test_qat_and_threshold_tuning_in_both_orders():
    def build(first_fat: bool, qat_bits: int | None) -> list:
        qat = QuantizationAwareTraining() if qat_bits is None else QuantizationAwareTraining(weight_bits=qat_bits)
        fat = ThresholdTuningCallback(bits=6, num_calibration_batches=1, check_trained=False)
        return [fat, qat] if first_fat else [qat, fat]

    # QAT's defaults (learned steps, 8 bits) are preferences: FAT's fixed ranges and its 6 bits hold, in both orders
    a, kinds_a = _fit_state(build(True, None))
    b, kinds_b = _fit_state(build(False, None))
    assert kinds_a == kinds_b and all("scale_mode='observer'" in k for k in kinds_a)
    assert any("weight_bits=6" in k for k in kinds_a)
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    # bits set explicitly on both that disagree: the same clear error in both orders
    for first_fat in (True, False):
        with pytest.raises(
            QuantizationConfigError,
            match=r"`weight_bits`: QuantizationAwareTraining needs 4 and ThresholdTuningCallback",
        ):
            _fit_state(build(first_fat, 4))

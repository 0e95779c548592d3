"""MixedPrecisionSearch (BOMP-NAS) in one process: trials end to end, the budget, failures, errors before training."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from lightning_quant import QuantizationAwareTraining, QuantizationConfigError, QuantSpec
from lightning_quant.datamodules import DigitsDataModule
from lightning_quant.export.packing import model_size_report
from lightning_quant.models import ImageClassifier, LeNet5
from lightning_quant.search import (
    ImageClassifierFactory,
    MixedPrecisionSearch,
    SearchResult,
    hypervolume_2d,
    pareto_mask,
)
from lightning_quant.search.storage import HEARTBEAT_ATTR, fail_stale, make_storage
from lightning_quant.surgery import quantization_summary, quantize_model
from lightning_quant.surgery.layers import quantized_layers

#: seconds-long trials: three training batches, two validation batches
TINY_TRAINER = {"accelerator": "cpu", "limit_train_batches": 3, "limit_val_batches": 2, "deterministic": True}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lenet_factory() -> ImageClassifierFactory:
    return ImageClassifierFactory(
        backbone="lightning_quant.models.LeNet5", backbone_args={"in_channels": 1, "input_size": 8}
    )


def make_search(tmp_path: Path, factory=None, **overrides) -> MixedPrecisionSearch:
    kwargs = dict(
        weight_bits=[2, 4, 8],
        max_size_kib=12.0,
        n_trials=5,
        n_startup_trials=3,
        fp_epochs=1,
        qat_epochs=1,
        trainer_kwargs=TINY_TRAINER,
        num_calibration_batches=1,
        workdir=str(tmp_path / "search"),
        progress_bar=False,
    )
    kwargs.update(overrides)
    return MixedPrecisionSearch(factory or lenet_factory(), DigitsDataModule(batch_size=64), **kwargs)


def test_five_trials_end_to_end_every_front_entry_meets_the_budget(tmp_path):
    search = make_search(tmp_path)
    result = search.run()

    states = [r.state for r in result.trials]
    assert states.count("COMPLETE") == 5, states
    # the warm starts ran first: uniform 2- and 4-bit fit 12 KiB, uniform 8-bit (17.8 KiB) does not
    assert [r.origin for r in result.trials[:2]] == ["uniform 2-bit", "uniform 4-bit"]
    assert all(r.origin != "uniform 8-bit" for r in result.trials)
    # the GP sampler took over after the three startup trials; its proposals were repaired to the budget
    assert all(r.feasible and r.size_kib <= 12.0 for r in result.complete)
    assert result.front and all(r.size_kib <= 12.0 and r.feasible for r in result.front)
    assert len(result.front) == int(
        pareto_mask([r.accuracy for r in result.complete], [r.size_kib for r in result.complete]).sum()
    )
    # first and last layer fixed at 8 bits, the others from the choices
    for r in result.complete:
        assert r.weight_bits["backbone.conv1"] == r.weight_bits["backbone.fc3"] == 8
        assert {r.weight_bits[n] for n in ("backbone.conv2", "backbone.fc1", "backbone.fc2")} <= {2, 4, 8}

    # the size known before training is the trained model's own account (and the packed payload)
    study = search.open_study()
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        assert trial.user_attrs["measured_size_bits"] == trial.user_attrs["size_bits"]

    # outputs: table, CSV, plot, and a QuantSpec per front trial that QAT takes as it is
    workdir = tmp_path / "search"
    assert (workdir / "pareto_front.png").stat().st_size > 0
    table = (workdir / "pareto_front.md").read_text()
    assert all(f"| {r.number} |" in table for r in result.front)
    best = result.front[-1]
    spec = QuantSpec.load(workdir / "specs" / f"trial_{best.number}.yaml")
    assert spec == best.spec
    model = ImageClassifier(LeNet5(in_channels=1, num_classes=10, input_size=8))
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        max_epochs=1, callbacks=[QuantizationAwareTraining(spec=spec, num_calibration_batches=1)], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        **{k: v for k, v in TINY_TRAINER.items() if k != "limit_val_batches"}, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    assert {n: layer.weight_quantizer.bits for n, layer in quantized_layers(model).items()} == {
        f"backbone.{n}": b for n, b in ((k.split(".", 1)[1], v) for k, v in best.weight_bits.items())
    }
    assert quantization_summary(model).quantized_bits == round(best.size_kib * 8192)
    packed = model_size_report(model).total_bytes
    assert 0 <= packed * 8 - best.size_kib * 8192 < 8 * len(best.weight_bits)  # byte rounding of each weight only


def test_repair_meets_the_budget_and_changes_feasible_allocations_not_at_all(tmp_path):
    search = make_search(tmp_path, weight_bits=[2, 3, 4, 8], architecture={"input_size": [8, 12]}, max_size_kib=14.0)
    space = search.prepare()
    rng = np.random.default_rng(0)
    repaired_some = False
    for _ in range(200):
        params = {name: int(rng.integers(d.low, d.high + 1)) for name, d in space.distributions.items()}
        fixed = space.repair(params)
        assert space.feasible(fixed)
        arch, weights, _ = space.decode(fixed)
        assert arch.size_bits(weights) <= math.floor(14.0 * 8192)
        if space.feasible(params):
            assert fixed == params
        else:
            repaired_some = True
            # only lowered: the architecture kept when it can meet the budget, no width raised
            if space.arch_feasible(space.decode(params)[0]):
                assert all(fixed[k] <= params[k] for k in params if k.startswith("w:"))
    assert repaired_some
    # size is exact: the cost account of every architecture equals quantize_model + quantization_summary
    for arch in space.architectures.values():
        for bits in itertools.product([2, 8], repeat=len(arch.searched)):
            weights = dict(zip(arch.searched, bits, strict=True)) | arch.fixed_bits
            model = lenet_factory()(**arch.choices)
            quantize_model(model, search.spec_for(arch, weights, {n: 8 for n in arch.layers}))
            assert quantization_summary(model).quantized_bits == arch.size_bits(weights)


def test_an_enqueued_trial_over_budget_is_not_trained(tmp_path):
    calls = []

    class Counting(ImageClassifierFactory):
        def __call__(self, **choices):
            calls.append(choices)
            return super().__call__(**choices)

    search = make_search(
        tmp_path, Counting(backbone="lightning_quant.models.LeNet5", backbone_args={"in_channels": 1, "input_size": 8}),
        n_trials=1, warm_start_uniform=False, sampler="random",
    )  # fmt: skip
    study = search.open_study()
    assert len(calls) == 1  # prepare() measured the architecture
    over = {name: 2 for name in search.space.distributions}  # every searched layer at 8 bits: 17.8 KiB > 12 KiB
    study.enqueue_trial(over)
    result = search.run()
    skipped = result.trials[0]
    assert skipped.state == "PRUNED" and "not trained" in skipped.error and not skipped.feasible
    assert [r.state for r in result.trials[1:]] == ["COMPLETE"]
    assert len(calls) == 1 + 1  # the complete trial only (its float weights are trained in the model it fine-tunes)


class FailsAtTwoBits(ImageClassifier):
    def on_train_start(self):
        if any(layer.weight_quantizer.bits == 2 for layer in quantized_layers(self).values()):
            raise RuntimeError("simulated failure in fit at 2 bits")


def test_a_trial_whose_fit_raises_is_recorded_as_failed_and_the_search_goes_on(tmp_path):
    def factory(**choices):
        return FailsAtTwoBits(LeNet5(in_channels=1, num_classes=10, input_size=8))

    search = make_search(tmp_path, factory, n_trials=3, sampler="random", weight_bits=[2, 4])
    result = search.run()
    failed = [r for r in result.trials if r.state == "FAIL"]
    assert failed and failed[0].origin == "uniform 2-bit"
    assert failed[0].error == "RuntimeError: simulated failure in fit at 2 bits"
    assert result.trials[1].origin == "uniform 4-bit" and result.trials[1].state == "COMPLETE"
    # failed trials count: three finished trials in all, none of them after the study had its three
    assert sum(r.state in ("COMPLETE", "FAIL") for r in result.trials) == 3
    assert all(r.state != "FAIL" for r in result.front)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {"max_size_kib": 4.0},
            r"No configuration of the search space meets the budget \(max_size_kib=4.0\): the smallest is 7\.287 KiB",
        ),
        ({"weight_bits": [4]}, r"The search space is empty: nothing varies"),
        ({"weight_bits": []}, r"`weight_bits` is empty"),
        ({"architecture": {"input_size": []}}, r"`architecture\['input_size'\]` must be a non-empty list"),
        (
            {"architecture": {"input_size": [8, 2]}},
            r"`factory` failed to build the model with \{'input_size': 2\}: ValueError: `input_size`",
        ),
        ({"trainer_kwargs": {"max_epochs": 3}}, r"`trainer_kwargs` must not set \['max_epochs'\]"),
        ({"max_mbops": -1.0}, r"`max_mbops` must be a finite number > 0 or None, got -1\.0\. HINT: a budget"),
    ],
)  # fmt: skip
def test_bad_spaces_fail_before_any_training(tmp_path, overrides, match):
    with pytest.raises(QuantizationConfigError, match=match):
        make_search(tmp_path, **overrides).run()
    assert not (tmp_path / "search" / "fp").exists()  # no float training started
    assert not (tmp_path / "search" / "search.db").exists()


def test_a_factory_that_returns_no_lightning_module_fails_before_training(tmp_path):
    search = make_search(tmp_path, lambda **_: LeNet5(in_channels=1, input_size=8))
    with pytest.raises(QuantizationConfigError, match="`factory` must return a LightningModule, got LeNet5"):
        search.run()


def test_a_study_refuses_to_resume_with_another_budget(tmp_path):
    make_search(tmp_path).open_study()
    with pytest.raises(QuantizationConfigError, match="was created with another search space, budget or objective"):
        make_search(tmp_path, max_size_kib=11.0).open_study()
    make_search(tmp_path).open_study()  # the same settings load it


def test_bops_objective_and_budget_with_searched_activation_bits(tmp_path):
    search = make_search(tmp_path, objective="bops", max_mbops=1.2, max_size_kib=None, act_bits_choices=[4, 8])
    space = search.prepare()
    arch = next(iter(space.architectures.values()))
    # BOPs by hand: MACs per sample of LeNet-5 on 8x8 inputs, times weight and input bits
    macs = {"backbone.conv1": 8 * 8 * 6 * 25, "backbone.conv2": 2 * 2 * 16 * 6 * 25, "backbone.fc1": 120 * 16,
            "backbone.fc2": 84 * 120, "backbone.fc3": 10 * 84}  # fmt: skip
    assert arch.macs == macs
    weights = {n: 8 for n in arch.layers}
    acts = {n: 8 for n in arch.layers}
    assert arch.bops(weights, acts) == 64 * sum(macs.values())
    rng = np.random.default_rng(1)
    for _ in range(100):
        params = space.repair({n: int(rng.integers(d.low, d.high + 1)) for n, d in space.distributions.items()})
        _, w, a = space.decode(params)
        assert arch.bops(w, a) <= 1.2e6
    result = search.run(n_trials=2)
    assert all(r.mbops <= 1.2 for r in result.complete)
    assert result.front[0].cost("bops") == result.front[0].mbops


def test_journal_stale_trials_are_failed_and_retried(tmp_path):
    storage = make_storage(f"journal:///{tmp_path}/s.log", heartbeat_interval=1, grace_period=2, max_retry=1)
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask({"x": optuna.distributions.IntDistribution(0, 3)})
    storage.set_trial_system_attr(trial._trial_id, HEARTBEAT_ATTR, 0.0)  # a worker that died long ago
    fresh = study.ask({"x": optuna.distributions.IntDistribution(0, 3)})
    storage.set_trial_system_attr(fresh._trial_id, HEARTBEAT_ATTR, 1e12)  # alive
    assert fail_stale(study, grace_period=2, max_retry=1) == [trial.number]
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING]
    retry = study.get_trials()[-1]
    assert retry.params == trial.params and retry.system_attrs["failed_trial"] == trial.number


def _grid_hypervolume(acc, cost, reference, n=400):
    """Independent reference: the dominated fraction of a fine grid over the reference box."""
    a_ref, c_ref = reference
    top = max(acc)
    grid_a = np.linspace(a_ref, top, n, endpoint=False) + (top - a_ref) / (2 * n)
    grid_c = np.linspace(0, c_ref, n, endpoint=False) + c_ref / (2 * n)
    aa, cc = np.meshgrid(grid_a, grid_c)
    dominated = np.zeros_like(aa, dtype=bool)
    for a, c in zip(acc, cost, strict=True):
        dominated |= (aa <= a) & (cc >= c)
    return dominated.mean() * (top - a_ref) * c_ref


def test_hypervolume_and_pareto_mask_match_independent_references():
    rng = np.random.default_rng(0)
    for _ in range(5):
        acc, cost = rng.uniform(0.2, 1.0, 12), rng.uniform(0.5, 9.5, 12)
        exact = hypervolume_2d(acc, cost, (0.0, 10.0))
        assert exact == pytest.approx(_grid_hypervolume(acc, cost, (0.0, 10.0)), rel=0.01)
        mask = pareto_mask(acc, cost)
        # the front alone has the same hypervolume, and no front point dominates another
        assert hypervolume_2d(acc[mask], cost[mask], (0.0, 10.0)) == pytest.approx(exact)
        front = np.flatnonzero(mask)
        for i, j in itertools.permutations(front, 2):
            assert not (acc[i] >= acc[j] and cost[i] <= cost[j])


def test_result_reads_back_from_the_storage(tmp_path):
    search = make_search(tmp_path, n_trials=2, sampler="random")
    first = search.run()
    again = make_search(tmp_path, n_trials=2, sampler="random")
    result = again.result()
    assert isinstance(result, SearchResult)
    assert [r.number for r in result.front] == [r.number for r in first.front]
    # running it again with the study complete trains nothing
    assert [r.state for r in again.run().trials] == [r.state for r in first.trials]


def test_image_classifier_factory_scales_the_width_and_names_bad_backbones():
    factory = ImageClassifierFactory(backbone_args={"depth": 8, "in_channels": 1})
    assert factory(width_multiplier=0.5).backbone.width == 8
    assert factory(width_multiplier=0.75, depth=14).backbone.depth == 14
    assert factory().backbone.width == 16
    with pytest.raises(QuantizationConfigError, match=r"`backbone` = 'no_such_module.Net' cannot be imported"):
        ImageClassifierFactory(backbone="no_such_module.Net")
    lenet = ImageClassifierFactory(backbone="lightning_quant.models.LeNet5")
    with pytest.raises(QuantizationConfigError, match=r"`width_multiplier` scales the backbone argument `width`"):
        lenet(width_multiplier=0.5)
    import lightning_quant

    assert lightning_quant.MixedPrecisionSearch is MixedPrecisionSearch

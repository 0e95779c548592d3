"""OrthogonalMixedPrecision (OMPQ): once before the first step, budget met, composes with QAT in either order, leaves
the data order alone, resumes without recomputing, clear errors before any training."""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_quant.callbacks.orthogonal_mixed_precision as ompq_module
from lightning_quant import (
    LayerSpec,
    OrthogonalMixedPrecision,
    QuantizationAwareTraining,
    QuantizationConfigError,
    QuantSpec,
    load_quantized,
    quantization_summary,
)
from lightning_quant.allocation import layer_costs
from lightning_quant.core.quantizers import build_weight_quantizer
from lightning_quant.models import ImageClassifier, resnet8
from lightning_quant.surgery import SPEC_KEY, quantized_layers
from tests.conftest import crash_and_resume

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
ALLOCATED = {
    "backbone.layer1.0.conv1",
    "backbone.layer1.0.conv2",
    "backbone.layer2.0.conv1",
    "backbone.layer2.0.conv2",
    "backbone.layer2.0.shortcut.0",
    "backbone.layer3.0.conv1",
    "backbone.layer3.0.conv2",
    "backbone.layer3.0.shortcut.0",
}


def _loader(n: int = 64, batch: int = 16, size: int = 12, shuffle: bool = False, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    generator = torch.Generator().manual_seed(seed + 1) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=shuffle, generator=generator)


def _model(seed: int = 0) -> ImageClassifier:
    torch.manual_seed(seed)
    return ImageClassifier(resnet8(in_channels=1), lr=1e-2)


def _weight_bits(model: nn.Module) -> dict[str, int]:
    return {n: m.weight_quantizer.bits for n, m in quantized_layers(model).items()}


class BitsAtFirstBatch(Callback):
    """Records the weight widths and step sizes when the first training batch starts (before its forward)."""

    def __init__(self) -> None:
        self.bits: dict[str, int] | None = None
        self.scales: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.bits is None:
            self.bits = _weight_bits(pl_module)
            self.scales = {
                n: m.weight_quantizer.scale.detach().clone()
                for n, m in quantized_layers(pl_module).items()
                if m.weight_quantizer.is_initialized
            }
            self.weights = {n: m.weight.detach().clone() for n, m in quantized_layers(pl_module).items()}


# -- arguments --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"Pass exactly one budget: `size_budget_mb`"),
        ({"size_budget_mb": 0.05, "avg_weight_bits": 5.0}, r"Pass exactly one budget"),
        ({"avg_weight_bits": 3.0}, r"`avg_weight_bits` must be within \[min_bits, max_bits\] = \[4, 8\], got 3.0"),
        ({"avg_weight_bits": 5.0, "mode": "ptq"}, r"= \[2, 4\], got 5.0"),
        ({"size_budget_mb": 0.0}, r"`size_budget_mb` must be a finite number > 0 or None, got 0\.0\. HINT: a budget"),
        (
            {"size_budget_mb": "big"},
            r"`size_budget_mb` must be a finite number > 0 or None, got 'big'\. HINT: a budget",
        ),
        ({"avg_weight_bits": 5.0, "beta": -0.5}, r"`beta` must be a finite number >= 0, got -0\.5\. HINT: `beta=0`"),
        ({"avg_weight_bits": 5.0, "beta": True}, r"`beta` must be a finite number >= 0, got True\. HINT: `beta=0`"),
        ({"avg_weight_bits": 5.0, "num_samples": 1}, r"`num_samples` must be an integer >= 2 .* got 1"),
        ({"avg_weight_bits": 5.0, "mode": "w4"}, r"`mode` must be one of \['qat', 'ptq'\], got 'w4'"),
        ({"avg_weight_bits": 5.0, "solver": "slsqp"}, r"`solver` must be one of \['relaxed', 'milp', 'monotone'\]"),
        ({"avg_weight_bits": 5.0, "bit_choices": []}, r"`bit_choices` is empty"),
        ({"avg_weight_bits": 5.0, "plot": "yes"}, r"`plot` must be True or False, got 'yes'"),
        ({"avg_weight_bits": 5.0, "base_spec": {"weight_bits": 8}}, r"`base_spec` must be a QuantSpec, got dict"),
    ],
)
def test_bad_arguments_fail_fast(kwargs, match) -> None:
    with pytest.raises(QuantizationConfigError, match=match):
        OrthogonalMixedPrecision(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"avg_weight_bits": 4.02}, r"`avg_weight_bits` = 4.02 bits is below the smallest achievable .* \[4.0\d+, 8\]"),
        ({"size_budget_mb": 0.001}, r"`size_budget_mb` = 0.001 MiB is below the smallest achievable weight size"),
        (
            {"size_budget_mb": 1.0},
            r"`size_budget_mb` = 1 MiB is above the largest achievable .*, 0.0735.* in \[0.0371\d*, 0.0735\d*\]",
        ),
    ],
)
def test_budget_outside_the_achievable_range_fails_before_any_training(kwargs, match, trainer_kwargs) -> None:
    model = _model()
    spy = BitsAtFirstBatch()
    trainer = L.Trainer(**trainer_kwargs(max_steps=2, callbacks=[OrthogonalMixedPrecision(**kwargs), spy]))
    with pytest.raises(QuantizationConfigError, match=match):
        trainer.fit(model, _loader(), _loader(n=16))
    assert trainer.global_step == 0 and spy.bits is None
    assert set(_weight_bits(model).values()) == {8}  # quantized by the base recipe, nothing allocated
    assert not any(m.weight_quantizer.is_initialized for m in quantized_layers(model).values())  # no forward ran


# -- behaviour --------------------------------------------------------------------------------------------------
def test_allocates_once_before_the_first_step_within_budget_logged_plotted_checkpointed(tmp_path, trainer_kwargs):
    model = _model()
    callback = OrthogonalMixedPrecision(avg_weight_bits=5.0, num_samples=24)
    spy = BitsAtFirstBatch()
    trainer = L.Trainer(**trainer_kwargs(max_steps=3, callbacks=[callback, spy]))
    trainer.fit(model, _loader())
    result = callback.result
    assert set(result["names"]) == ALLOCATED and result["num_samples"] == 24
    assert callback.allocation == {n: _weight_bits(model)[n] for n in ALLOCATED}
    assert spy.bits == _weight_bits(model)  # in place before the first training forward, unchanged since
    assert set(callback.allocation.values()) <= {4, 5, 6, 7, 8} and len(set(callback.allocation.values())) > 1
    bits = _weight_bits(model)
    assert bits["backbone.conv1"] == 8 and bits["backbone.fc"] == 8
    assert result["costs"]["avg_weight_bits"] <= 5.0 and result["budget_used"] <= 1.0
    assert quantization_summary(model).avg_weight_bits == pytest.approx(result["costs"]["avg_weight_bits"])
    orm = np.array(result["orm"])
    assert orm.shape == (8, 8) and np.allclose(orm, orm.T) and np.all(np.diag(orm) == 1.0)
    for key in ("avg_bits", "weight_size_mib", "budget_used", "bits/backbone.layer3.0.conv2"):
        assert f"quant/ompq/{key}" in trainer.callback_metrics, key
    assert float(trainer.callback_metrics["quant/ompq/avg_bits"]) <= 5.0
    assert callback.plot_path == tmp_path / "ompq_allocation.png" and callback.plot_path.stat().st_size > 1000
    # the recipe: the callback's spec, the checkpoint's spec and state, and a fresh model rebuilt from it
    assert callback.spec == QuantSpec.from_model(model)
    path = tmp_path / "q.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert QuantSpec.from_dict(checkpoint[SPEC_KEY]) == callback.spec
    assert checkpoint["callbacks"][callback.state_key]["record"] == result
    assert _weight_bits(load_quantized(_model(seed=1), path)) == bits


def test_the_same_batch_gives_the_same_allocation_and_a_larger_budget_never_fewer_bits(trainer_kwargs) -> None:
    allocations = []
    for avg in (4.5, 4.5, 5.5, 6.5, 7.5):
        callback = OrthogonalMixedPrecision(avg_weight_bits=avg, plot=False)
        L.Trainer(**trainer_kwargs(max_steps=1, callbacks=[callback])).fit(_model(), _loader())
        allocations.append(callback.result)
    timings = ("seconds", "feature_seconds")
    first, second = ({k: v for k, v in a.items() if k not in timings} for a in allocations[:2])
    assert first == second  # deterministic for a fixed batch
    for smaller, larger in itertools.pairwise(allocations[1:]):
        assert smaller["orm"] == larger["orm"]
        assert all(larger["bits"][n] >= smaller["bits"][n] for n in ALLOCATED)
        assert larger["costs"]["avg_weight_bits"] >= smaller["costs"]["avg_weight_bits"]


def test_step_sizes_are_set_at_the_allocated_widths_despite_the_sanity_check(trainer_kwargs) -> None:
    """Lightning's sanity validation initialises the weights' steps at 8 bits; the first training batch must see
    steps initialised at the allocated widths, as a quantizer built at that width computes from the weights."""
    model = _model()
    callback = OrthogonalMixedPrecision(avg_weight_bits=4.5, plot=False)
    spy = BitsAtFirstBatch()
    trainer = L.Trainer(**trainer_kwargs(max_steps=1, num_sanity_val_steps=1, callbacks=[callback, spy]))
    trainer.fit(model, _loader(), _loader(n=16))
    layers = quantized_layers(model)
    changed = [n for n, b in callback.allocation.items() if b != 8]
    assert changed
    for name in changed:
        weight = spy.weights[name]  # the weights when the first batch started
        reference = build_weight_quantizer(weight, layers[name].current_spec(), name)
        reference.observe(weight)
        torch.testing.assert_close(spy.scales[name], reference.scale.detach(), atol=0, rtol=0, msg=name)


def test_with_qat_in_either_order_gives_the_same_model(trainer_kwargs) -> None:
    states = []
    for qat_first in (True, False):
        L.seed_everything(0)
        model = _model()
        qat = QuantizationAwareTraining(weight_bits=8, act_bits=6, num_calibration_batches=1)
        callback = OrthogonalMixedPrecision(size_budget_mb=0.05, plot=False)
        callbacks = [qat, callback] if qat_first else [callback, qat]
        L.Trainer(**trainer_kwargs(max_steps=3, callbacks=callbacks)).fit(model, _loader())
        assert quantized_layers(model)["backbone.layer2.0.conv1"].input_quantizer.bits == 6  # QAT's recipe
        assert layer_costs(model).weight_payload.sum() <= 0.05 * 8 * 2**20
        states.append((callback.allocation, model.state_dict()))
    (bits_a, state_a), (bits_b, state_b) = states
    assert bits_a == bits_b
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], atol=0, rtol=0, msg=key)


class RecordBatches(Callback):
    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[1].clone())


def test_training_sees_the_same_batches_with_and_without_ompq(trainer_kwargs) -> None:
    """The features come from a separate pass over the shuffled loader; its random draws are undone."""
    seen = []
    for with_ompq in (False, True):
        L.seed_everything(0)
        recorder = RecordBatches()
        callbacks = [QuantizationAwareTraining(8, 8), recorder]
        if with_ompq:
            callbacks.append(OrthogonalMixedPrecision(avg_weight_bits=6.0, num_samples=40, plot=False))
        L.Trainer(**trainer_kwargs(max_epochs=2, callbacks=callbacks)).fit(_model(), _loader(shuffle=True))
        seen.append(torch.cat(recorder.batches))
    torch.testing.assert_close(seen[1], seen[0], atol=0, rtol=0)


def test_two_instances_have_distinct_state_keys() -> None:
    a = OrthogonalMixedPrecision(avg_weight_bits=5.0)
    assert a.state_key != OrthogonalMixedPrecision(avg_weight_bits=6.0).state_key
    assert a.state_key != OrthogonalMixedPrecision(avg_weight_bits=5.0, beta=1.0).state_key
    assert a.state_key != OrthogonalMixedPrecision(size_budget_mb=0.05).state_key


# -- resume -----------------------------------------------------------------------------------------------------
def test_resume_neither_recomputes_nor_changes_the_allocation(tmp_path, trainer_kwargs, monkeypatch) -> None:
    log = tmp_path / "calls.txt"  # a file: the crashed run is a child process (killed by SIGKILL)
    original = ompq_module.allocate_by_orthogonality

    def counted(*args, **kwargs):
        with log.open("a") as f:
            f.write("allocate\n")
        return original(*args, **kwargs)

    monkeypatch.setattr(ompq_module, "allocate_by_orthogonality", counted)

    def build():
        L.seed_everything(0, workers=True)
        qat = QuantizationAwareTraining(8, 8, num_calibration_batches=2)
        return _model(), [qat, OrthogonalMixedPrecision(avg_weight_bits=5.0, plot=False)]

    def disturb(model):  # the resumed run starts from other weights: an allocation from them would differ
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-3.0).add_(0.5)

    data = _loader(n=64, batch=16)  # 4 steps per epoch; crash in the second epoch
    (model_a, [_, cb_a]), (model_c, [_, cb_c]) = crash_and_resume(
        tmp_path, trainer_kwargs, build, data, crash_step=6, max_epochs=2, before_resume=disturb
    )
    calls = log.read_text().split()
    assert calls == ["allocate", "allocate"]  # the straight run and the crashed one; none when resuming
    timings = ("seconds", "feature_seconds")  # the resumed record is the crashed run's, timed on its own

    def untimed(result):
        return {k: v for k, v in result.items() if k not in timings}

    assert untimed(cb_c.result) == untimed(cb_a.result)
    assert _weight_bits(model_c) == _weight_bits(model_a)
    assert cb_c.spec == cb_a.spec
    state_a, state_c = model_a.state_dict(), model_c.state_dict()
    for key in state_a:
        torch.testing.assert_close(state_c[key], state_a[key], atol=0, rtol=0, msg=key)


# -- odd models and data ----------------------------------------------------------------------------------------
class WithUnusedLayer(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.spare = nn.Conv2d(8, 8, 3, padding=1)  # never called
        self.again = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.body(torch.relu(self.stem(x))))
        return self.head(torch.relu(self.again(x)).mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def test_a_layer_that_never_runs_is_a_clear_error_before_the_first_step(trainer_kwargs) -> None:
    model = WithUnusedLayer()
    trainer = L.Trainer(**trainer_kwargs(max_steps=2, callbacks=[OrthogonalMixedPrecision(avg_weight_bits=6.0)]))
    with pytest.raises(QuantizationConfigError, match=r"'spare', but the forward pass .* never called it.*frozen"):
        trainer.fit(model, _loader())
    assert trainer.global_step == 0
    assert set(_weight_bits(model).values()) == {8}
    # frozen, it keeps its bits and the allocation runs
    model = WithUnusedLayer()
    spec = QuantSpec(layers={"spare": LayerSpec(frozen=True)})
    callback = OrthogonalMixedPrecision(avg_weight_bits=6.0, base_spec=spec, plot=False)
    L.Trainer(**trainer_kwargs(max_steps=1, callbacks=[callback])).fit(model, _loader())
    assert set(callback.allocation) == {"body", "again"}


def test_fewer_than_two_training_samples_is_a_clear_error(trainer_kwargs) -> None:
    model = _model()
    trainer = L.Trainer(**trainer_kwargs(max_steps=1, callbacks=[OrthogonalMixedPrecision(avg_weight_bits=6.0)]))
    with pytest.raises(QuantizationConfigError, match=r"needs at least 2 training samples .* gave 1"):
        trainer.fit(model, _loader(n=1, batch=1))
    assert trainer.global_step == 0


def test_samples_are_gathered_over_several_batches(trainer_kwargs) -> None:
    callback = OrthogonalMixedPrecision(avg_weight_bits=6.0, num_samples=20, plot=False)
    L.Trainer(**trainer_kwargs(max_steps=1, callbacks=[callback])).fit(_model(), _loader(batch=8))
    assert callback.result["num_samples"] == 20


# -- DDP and the CLI --------------------------------------------------------------------------------------------
class SaveRankAllocation(Callback):
    def __init__(self, folder, callback) -> None:
        self.folder, self.callback = folder, callback

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {"result": self.callback.result, "bits": _weight_bits(pl_module)},
            self.folder / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.slow
def test_ddp_two_processes_get_identical_allocations(tmp_path, trainer_kwargs) -> None:
    spec = QuantSpec(default=LayerSpec(weight_bits=8, act_bits=8, scale_mode="observer"))
    callback = OrthogonalMixedPrecision(avg_weight_bits=5.0, plot=False, base_spec=spec)
    trainer = L.Trainer(
        **trainer_kwargs(
            devices=2, strategy="ddp_spawn", max_steps=2, callbacks=[callback, SaveRankAllocation(tmp_path, callback)]
        )
    )
    trainer.fit(_model(), _loader())
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert rank1 == rank0
    assert rank0["result"]["costs"]["avg_weight_bits"] <= 5.0


def test_config_parses(capsys) -> None:
    import yaml

    from lightning_quant.cli import main

    configs = ROOT / "configs"
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["fit", "--config", str(configs / "trainer.yaml"), "--config", str(configs / "ompq.yaml"), "--print_config"]
        )
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    (qat, ompq) = printed["trainer"]["callbacks"]
    assert qat["class_path"] == "lightning_quant.callbacks.QuantizationAwareTraining"
    assert ompq["class_path"] == "lightning_quant.callbacks.OrthogonalMixedPrecision"
    assert ompq["init_args"]["avg_weight_bits"] == 5.0


@pytest.mark.slow
def test_config_runs_through_the_cli(tmp_path, mnist_root) -> None:
    """configs/ompq.yaml, shortened to a few steps on a slice of MNIST."""
    from lightning_quant.cli import main

    configs = ROOT / "configs"
    code = main(
        [
            "fit",
            "--config",
            str(configs / "trainer.yaml"),
            "--config",
            str(configs / "ompq.yaml"),
            f"--data.init_args.root={mnist_root}",
            "--data.init_args.train_subset=256",
            "--data.init_args.batch_size=64",
            "--trainer.max_epochs=1",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert code in (0, None)
    (plot,) = tmp_path.rglob("ompq_allocation.png")
    assert plot.stat().st_size > 1000

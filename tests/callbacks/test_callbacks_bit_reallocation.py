"""BitReallocationCallback (QBitOpt): budgets always met, bits follow sensitivities, DDP, resume, bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import (
    BitReallocationCallback,
    LayerSpec,
    QuantizationAwareTraining,
    QuantizationConfigError,
    QuantSpec,
    load_quantized,
    quantization_summary,
)
from lightning_quant.allocation import layer_costs, trace_macs
from lightning_quant.models import ImageClassifier, LeNet5
from lightning_quant.surgery import SPEC_KEY, quantize_model, quantized_layers


def _loader(n: int = 32, channels: int = 1, size: int = 28, classes: int = 10, batch: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _lenet() -> ImageClassifier:
    return ImageClassifier(LeNet5(), lr=1e-2)


def _weight_bits(model: nn.Module) -> dict[str, int]:
    return {n: m.weight_quantizer.bits for n, m in quantized_layers(model).items()}


# -- arguments --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"avg_weight_bits": 1.5}, r"`avg_weight_bits` must be within \[min_bits, max_bits\] = \[2, 8\], got 1.5"),
        ({"avg_weight_bits": 3.0, "bit_choices": [4, 8]}, r"= \[4, 8\], got 3.0"),
        (
            {"avg_weight_bits": -3.0},
            r"`avg_weight_bits` must be a finite number > 0 or None, got -3\.0\. HINT: a budget",
        ),
        ({"size_budget": -1}, r"`size_budget` must be a finite number > 0 or None, got -1\. HINT: a budget"),
        ({"bops_budget": float("nan")}, r"`bops_budget` must be a finite number > 0 or None, got nan\. HINT: a budget"),
        (
            {"avg_weight_bits": "three"},
            r"`avg_weight_bits` must be a finite number > 0 or None, got 'three'\. HINT: a budget",
        ),
        ({"size_budget": True}, r"`size_budget` must be a finite number > 0 or None, got True\. HINT: a budget"),
        ({"avg_weight_bits": 3.0, "size_budget": 10_000}, r"two budgets on the same quantity.*pass only one"),
        ({}, r"No budget given\. HINT: pass `avg_weight_bits=3.0`"),
        ({"avg_weight_bits": 3.0, "bit_choices": []}, r"`bit_choices` is empty"),
        ({"avg_weight_bits": 3.0, "bit_choices": [1, 2]}, r"`bit_choices` must hold integer bit widths in \[2, 8\]"),
        ({"avg_weight_bits": 3.0, "bit_choices": 4}, r"`bit_choices` must be a list of integer bit widths"),
        ({"avg_weight_bits": 3.0, "solver": "gurobi"}, r"`solver` must be one of \['relaxed', 'milp'\]"),
        ({"avg_weight_bits": 3.0, "every_n_steps": 0}, r"`every_n_steps` must be an integer >= 1, got 0"),
        ({"avg_weight_bits": 3.0, "freeze_after": -1}, r"`freeze_after` must be an integer >= 0, got -1"),
        ({"avg_weight_bits": 3.0, "ema_decay": 1.0}, r"`ema_decay` must be a number in \[0, 1\), got 1.0"),
    ],
)
def test_bad_arguments_fail_fast(kwargs, match) -> None:
    with pytest.raises(QuantizationConfigError, match=match):
        BitReallocationCallback(**kwargs)


def test_budget_the_model_cannot_meet_fails_before_training(trainer_kwargs) -> None:
    """First and last layer stay at 8 bits, so an average of 2.05 bits is impossible for LeNet-5."""
    model = _lenet()
    steps = []

    class Count(Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    callback = BitReallocationCallback(avg_weight_bits=2.05)
    trainer = L.Trainer(**trainer_kwargs(max_steps=2, callbacks=[callback, Count()]))
    with pytest.raises(QuantizationConfigError, match=r"`avg_weight_bits` = 2.05 cannot be met.*smallest achievable"):
        trainer.fit(model, _loader())
    assert not steps


def test_bops_budget_the_model_cannot_meet(trainer_kwargs) -> None:
    callback = BitReallocationCallback(bops_budget=1e3)
    trainer = L.Trainer(**trainer_kwargs(max_steps=2, callbacks=[callback]))
    with pytest.raises(QuantizationConfigError, match=r"`bops_budget` = 1000 cannot be met.*smallest achievable bops"):
        trainer.fit(_lenet(), _loader())


# -- behaviour --------------------------------------------------------------------------------------------------
def test_budget_met_after_every_solve_logged_plotted_and_exported(tmp_path, trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = _lenet()
    callback = BitReallocationCallback(avg_weight_bits=3.0, every_n_steps=2)
    trainer = L.Trainer(**trainer_kwargs(max_steps=6, callbacks=[callback]))
    trainer.fit(model, _loader())
    history = callback.history
    assert [h["step"] for h in history] == [0, 2, 4, 6]
    assert [h["reason"] for h in history] == ["initial", "solve", "solve", "solve"]
    for h in history:
        assert h["costs"]["avg_weight_bits"] <= 3.0
        assert h["budget_used"] <= 1.0
    assert quantization_summary(model).avg_weight_bits <= 3.0
    assert set(history[-1]["bits"]) == {"backbone.conv2", "backbone.fc1", "backbone.fc2"}  # conv1, fc3 frozen
    assert _weight_bits(model)["backbone.conv1"] == 8 and _weight_bits(model)["backbone.fc3"] == 8
    for key in ("avg_bits", "budget_used", "objective", "frozen"):
        assert f"quant/qbitopt/{key}" in trainer.callback_metrics
    assert trainer.callback_metrics["quant/qbitopt/avg_bits"] <= 3.0
    assert callback.plot_path is not None and callback.plot_path.stat().st_size > 1000
    assert callback.plot_path.parent == tmp_path
    # the final recipe: the callback's spec, the checkpoint's spec, and a fresh model rebuilt from it
    assert callback.spec == QuantSpec.from_model(model)
    path = tmp_path / "q.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert QuantSpec.from_dict(checkpoint[SPEC_KEY]) == callback.spec
    assert checkpoint["callbacks"][callback.state_key]["history"] == history
    fresh = load_quantized(_lenet(), path)
    assert _weight_bits(fresh) == _weight_bits(model)


class TwoBranches(L.LightningModule):
    """Two equal linear layers; the loss sees branch `loud`'s output 100x more strongly than `quiet`'s."""

    def __init__(self) -> None:
        super().__init__()
        self.loud = nn.Linear(16, 16, bias=False)
        self.quiet = nn.Linear(16, 16, bias=False)

    def forward(self, x):
        return 10.0 * self.loud(x) + 0.1 * self.quiet(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)


@pytest.mark.parametrize("solver", ["relaxed", "milp"])
def test_the_layer_whose_noise_matters_more_gets_more_bits(solver, trainer_kwargs) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    data = DataLoader(TensorDataset(x, torch.randn(64, 16)), batch_size=16)
    spec = QuantSpec(default=LayerSpec(weight_bits=8, act_bits=None), first_last_bits=None)
    callback = BitReallocationCallback(avg_weight_bits=4.0, every_n_steps=4, solver=solver, base_spec=spec)
    trainer = L.Trainer(**trainer_kwargs(max_steps=4, callbacks=[callback]))
    model = TwoBranches()
    trainer.fit(model, data)
    initial, solved = callback.history
    assert initial["bits"] == {"loud": 4, "quiet": 4}  # equal sizes: uniform
    assert solved["bits"]["loud"] > solved["bits"]["quiet"]
    assert solved["bits"]["loud"] + solved["bits"]["quiet"] == 8  # the budget is used, not exceeded
    assert solved["sensitivities"]["loud"] > 100 * solved["sensitivities"]["quiet"]


def test_no_extra_forward_or_backward(trainer_kwargs) -> None:
    """Sensitivities come from the training's own gradients: one forward per step, as without the callback."""
    calls = []
    model = _lenet()
    model.backbone.register_forward_hook(lambda *args: calls.append(1))
    callback = BitReallocationCallback(avg_weight_bits=4.0, every_n_steps=1)
    L.Trainer(**trainer_kwargs(max_steps=3, callbacks=[callback])).fit(model, _loader())
    assert len(calls) == 3
    assert len(callback.history) == 4


def test_freeze_after_stops_changes(trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = _lenet()
    callback = BitReallocationCallback(avg_weight_bits=3.5, every_n_steps=1, freeze_after=2)
    trainer = L.Trainer(**trainer_kwargs(max_steps=5, callbacks=[callback]))
    trainer.fit(model, _loader())
    assert [h["step"] for h in callback.history] == [0, 1, 2]
    assert trainer.callback_metrics["quant/qbitopt/frozen"] == 1.0
    assert _weight_bits(model) == {**_weight_bits(model), **callback.allocation}


@pytest.mark.parametrize("qat_first", [True, False], ids=["qat_first", "qat_last"])
def test_with_qat_in_either_order(qat_first, trainer_kwargs) -> None:
    model = _lenet()
    qat = QuantizationAwareTraining(weight_bits=4, act_bits=6, num_calibration_batches=1)
    callback = BitReallocationCallback(avg_weight_bits=3.5, every_n_steps=2)
    callbacks = [qat, callback] if qat_first else [callback, qat]
    L.Trainer(**trainer_kwargs(max_steps=2, callbacks=callbacks)).fit(model, _loader())
    layers = quantized_layers(model)
    assert layers["backbone.conv2"].input_quantizer.bits == 6  # QAT's recipe was used
    assert len(callback.history) == 2
    assert quantization_summary(model).avg_weight_bits <= 3.5


def test_bops_budget_with_tied_activation_bits(trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = _lenet()
    probe = quantize_model(_lenet(), QuantSpec())
    macs = trace_macs(probe, torch.randn(1, 1, 28, 28))
    costs = layer_costs(probe, macs)
    full = float((costs.macs * costs.weight_bits * costs.act_bits).sum())  # W8A8 everywhere
    callback = BitReallocationCallback(bops_budget=0.45 * full, every_n_steps=2, activations=True, solver="milp")
    trainer = L.Trainer(**trainer_kwargs(max_steps=4, callbacks=[callback]))
    trainer.fit(model, _loader())
    # MACs are traced by hooks during the first training forward: the initial allocation follows that step
    assert [h["step"] for h in callback.history] == [1, 2, 4]
    for h in callback.history:
        assert h["costs"]["bops"] <= 0.45 * full
    for name, layer in quantized_layers(model).items():
        assert layer.input_quantizer.bits == layer.weight_quantizer.bits, name
    costs = layer_costs(model, macs)
    assert float((costs.macs * costs.weight_bits * costs.act_bits).sum()) <= 0.45 * full


def test_two_instances_have_distinct_state_keys() -> None:
    a = BitReallocationCallback(avg_weight_bits=3.0)
    assert a.state_key != BitReallocationCallback(avg_weight_bits=2.5).state_key
    assert a.state_key != BitReallocationCallback(avg_weight_bits=3.0, solver="milp").state_key


class SaveRankHistory(Callback):
    def __init__(self, folder, callback) -> None:
        self.folder = folder
        self.callback = callback

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {"history": self.callback.history, "bits": _weight_bits(pl_module)},
            self.folder / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.slow
def test_config_runs_through_the_cli(tmp_path, mnist_root) -> None:
    """configs/bit_reallocation.yaml, shortened to a few steps on a slice of MNIST."""
    from pathlib import Path

    from lightning_quant.cli import main

    configs = Path(__file__).resolve().parents[2] / "configs"
    code = main(
        [
            "fit",
            "--config",
            str(configs / "trainer.yaml"),
            "--config",
            str(configs / "bit_reallocation.yaml"),
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
    plots = list(tmp_path.rglob("qbitopt_allocation.png"))
    assert len(plots) == 1


def test_activation_bits_with_shared_residual_quantizers_raise(trainer_kwargs) -> None:
    from lightning_quant.models import resnet8

    model = ImageClassifier(resnet8(in_channels=1), lr=1e-2)
    qat = QuantizationAwareTraining(8, 8, quantize_residuals=True)  # layer2.0.conv1 and its shortcut share one
    callback = BitReallocationCallback(avg_weight_bits=4.0, activations=True)
    trainer = L.Trainer(**trainer_kwargs(max_steps=1, callbacks=[qat, callback]))
    with pytest.raises(QuantizationConfigError, match=r"share one input quantizer.*activations=False"):
        trainer.fit(model, _loader(size=16))
    assert trainer.global_step == 0

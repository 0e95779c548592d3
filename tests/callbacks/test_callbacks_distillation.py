"""DistillationCallback: KD from a frozen FP teacher through the one-backward mechanism; the data-free QAT recipe."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import QuantizationAwareTraining, QuantizationConfigError
from lightning_quant.callbacks import DistillationCallback
from lightning_quant.callbacks.base import distillation_loss, frozen_fp_copy
from lightning_quant.datamodules import GeneratorDataModule
from lightning_quant.models import ImageClassifier, resnet8
from lightning_quant.surgery import is_quantized


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))


def _loader(n: int = 64, batch: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g)), batch
    )


class _KDOnly(L.LightningModule):
    """A model whose own loss is zero (with a graph): only the callback's term trains it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return 0.0 * self(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class _DirectNet(_KDOnly):
    def training_step(self, batch, batch_idx):
        return 0.0 * self.net(batch[0]).sum()  # does not go through self(x)


class _LossSpy(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.losses.append(float(loss))


def _kl(student: nn.Module, teacher: nn.Module) -> float:
    x = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        return float(distillation_loss(student(x), teacher(x)))


def test_kd_pulls_the_students_logits_toward_the_teachers(trainer_kwargs):
    teacher, model = _net(1), _KDOnly(_net(2))
    before = _kl(model.net, teacher)
    trainer = L.Trainer(**trainer_kwargs(max_epochs=15), callbacks=[DistillationCallback(teacher=teacher)])
    trainer.fit(model, _loader())
    after = _kl(model.net, teacher)
    assert after < 0.2 * before
    assert "quant/kd/loss" in trainer.callback_metrics
    assert all(not p.requires_grad for p in trainer.callbacks[0].teacher_model.parameters())


def test_added_term_is_weight_times_kd_of_the_steps_logits(trainer_kwargs):
    teacher, model = _net(1), _KDOnly(_net(2))
    start = copy.deepcopy(model.net)
    spy = _LossSpy()
    callbacks = [DistillationCallback(teacher=teacher, temperature=2.0, weight=0.5), spy]
    L.Trainer(**trainer_kwargs(max_steps=1), callbacks=callbacks).fit(model, _loader())
    x = next(iter(_loader()))[0]
    with torch.no_grad():
        expected = 0.5 * distillation_loss(start(x), teacher(x), temperature=2.0)
    assert spy.losses[0] == pytest.approx(float(expected), rel=1e-5)


def test_copy_teacher_is_the_fp_model_before_qat(trainer_kwargs):
    model = ImageClassifier(resnet8(in_channels=1, num_classes=10, width=4))
    initial = copy.deepcopy(model.state_dict())
    kd = DistillationCallback(teacher="copy")
    trainer = L.Trainer(**trainer_kwargs(max_steps=2), callbacks=[QuantizationAwareTraining(4, 4), kd])
    data = DataLoader(TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))), batch_size=8)
    trainer.fit(model, data)
    assert is_quantized(model) and not is_quantized(kd.teacher_model)
    for name, value in kd.teacher_model.state_dict().items():
        torch.testing.assert_close(value, initial[name], atol=0, rtol=0, msg=name)


def test_data_free_recipe_runs_and_starts_from_the_teacher(trainer_kwargs):
    torch.manual_seed(0)
    teacher = ImageClassifier(resnet8(in_channels=1, num_classes=10, width=4)).eval()
    dm = GeneratorDataModule(
        teacher, 10, (1, 8, 8), samples_per_epoch=32, batch_size=16, generator_steps=2, generator_batch_size=16,
        latent_dim=8, generator_width=8, val_samples=16, generator_trainer_kwargs={"enable_progress_bar": False},
    )  # fmt: skip
    student = ImageClassifier(resnet8(in_channels=1, num_classes=10, width=4))
    kd = DistillationCallback(student_init="teacher", temperature=4.0)
    # the student's weights when fit starts (after QAT's swap, before its first step): the teacher's
    seen: dict[str, bool] = {}

    class _Check(Callback):
        def on_fit_start(self, trainer, pl_module):
            fp = frozen_fp_copy(pl_module).state_dict()  # the quantized student's float weights
            seen["same"] = all(torch.equal(fp[k], v) for k, v in teacher.state_dict().items())

    trainer = L.Trainer(**trainer_kwargs(max_epochs=1), callbacks=[kd, QuantizationAwareTraining(4, 4), _Check()])
    trainer.fit(student, datamodule=dm)
    assert seen["same"] and is_quantized(student) and trainer.global_step == 2
    assert kd.teacher_model is not teacher  # a frozen copy, the datamodule's teacher stays on its own


@pytest.mark.parametrize("distillation_first", [True, False])
def test_student_init_works_in_either_callback_order(trainer_kwargs, distillation_first):
    torch.manual_seed(0)
    teacher = ImageClassifier(resnet8(in_channels=1, num_classes=10, width=4))
    student = ImageClassifier(resnet8(in_channels=1, num_classes=10, width=4))
    qat = QuantizationAwareTraining(4, 4)
    kd = DistillationCallback(teacher=teacher, student_init="teacher")
    callbacks = [kd, qat] if distillation_first else [qat, kd]
    data = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))), batch_size=8)
    L.Trainer(**trainer_kwargs(max_steps=0), callbacks=callbacks).fit(student, data)
    # the student was quantized after it took the teacher's weights, whatever the order
    assert is_quantized(student)
    weights = {k: v for k, v in student.state_dict().items() if "quantizer" not in k}
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in weights.items())


def test_logits_module_names_the_submodule_called_by_training_step(trainer_kwargs):
    teacher = _net(1)
    with pytest.raises(QuantizationConfigError, match=r"saw no call of '_DirectNet'.*logits_module"):
        L.Trainer(**trainer_kwargs(max_steps=1), callbacks=[DistillationCallback(teacher=teacher)]).fit(
            _DirectNet(_net(2)), _loader()
        )
    model = _DirectNet(_net(2))
    L.Trainer(**trainer_kwargs(max_steps=2), callbacks=[DistillationCallback(teacher, logits_module="net")]).fit(
        model, _loader()
    )


def test_teacher_weights_are_kept_in_the_state_for_resume(trainer_kwargs, tmp_path: Path):
    model = _KDOnly(_net(2))
    kd = DistillationCallback(teacher="copy")
    L.Trainer(**trainer_kwargs(max_steps=3), callbacks=[kd]).fit(model, _loader())
    state = kd.state_dict()
    resumed = DistillationCallback(teacher="copy")
    resumed.load_state_dict(state)
    # the model has trained since: a fresh copy would differ, the restored teacher does not
    L.Trainer(**trainer_kwargs(max_steps=1), callbacks=[resumed]).fit(model, _loader())
    for a, b in zip(resumed.teacher_model.state_dict().values(), kd.teacher_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert kd.state_key == resumed.state_key != DistillationCallback(temperature=2.0).state_key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"teacher": "fp"}, r"`teacher` must be one of \('copy', 'datamodule'\), None or an nn.Module, got 'fp'"),
        ({"temperature": 0}, "`temperature` must be a number > 0, got 0"),
        ({"weight": -1}, "`weight` must be a number >= 0, got -1"),
        ({"student_init": "random"}, r"`student_init` must be one of \('keep', 'teacher'\)"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(QuantizationConfigError, match=match):
        DistillationCallback(**kwargs)


def test_datamodule_teacher_requires_a_datamodule_with_one(trainer_kwargs):
    with pytest.raises(QuantizationConfigError, match=r'`teacher="datamodule"` needs a datamodule with a `teacher`'):
        L.Trainer(**trainer_kwargs(max_steps=1), callbacks=[DistillationCallback("datamodule")]).fit(
            _KDOnly(_net(2)), _loader()
        )


# -- data-free training watches itself --------------------------------------------------------------------------
def _digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def digits_teacher():
    """A small BatchNorm CNN trained on the 8x8 digits for a few seconds, and the digits."""
    from lightning_quant.datamodules import DigitsDataModule

    torch.manual_seed(0)
    digits = DigitsDataModule(batch_size=64, seed=0)
    digits.setup("fit")
    teacher = ImageClassifier(_digits_cnn())
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(5):
        for x, y in digits.train_dataloader():
            optimizer.zero_grad()
            nn.functional.cross_entropy(teacher(x), y).backward()
            optimizer.step()
    return teacher.eval(), digits


def _real_accuracy(model: nn.Module, digits) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in digits.val_dataloader())
    return correct / len(digits.val_dataset)


@pytest.mark.parametrize(("lr", "collapses"), [(3e-2, True), (2e-4, False)])
def test_data_free_run_logs_agreement_and_warns_when_the_student_drifts(lr, collapses, digits_teacher, trainer_kwargs):
    teacher, digits = digits_teacher
    L.seed_everything(0)
    dm = GeneratorDataModule(
        teacher, 10, (1, 8, 8), samples_per_epoch=256, batch_size=64, generator_steps=100, generator_batch_size=64,
        latent_dim=8, generator_width=8, val_samples=0,
        generator_trainer_kwargs={"enable_progress_bar": False, "logger": False},
    )  # fmt: skip
    student = ImageClassifier(_digits_cnn(), lr=lr)  # the README recipe, with the module's own learning rate
    kd = DistillationCallback(student_init="teacher", temperature=4.0)
    seen: list[float] = []

    class _Agreement(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(float(trainer.callback_metrics["quant/kd/teacher_agreement"]))

    callbacks = [kd, QuantizationAwareTraining(8, 8, freeze_bn_after_epochs=0), _Agreement()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(**trainer_kwargs(max_epochs=2), callbacks=callbacks).fit(student, datamodule=dm)
    drift = [str(w.message) for w in caught if "drifting away from the teacher" in str(w.message)]
    assert len(seen) == 2 and all(0 <= a <= 1 for a in seen)  # logged every epoch
    assert kd.state()["start_agreement"] > 0.9  # the student starts as the teacher
    # the effect the warning reports is real: the high learning rate destroys the student on real data
    real, teacher_real = _real_accuracy(student, digits), _real_accuracy(teacher, digits)
    if collapses:
        assert real < teacher_real - 0.3
        assert len(drift) == 1 and "HINT: lower the optimizer's learning rate" in drift[0]
        assert "data-free benchmarks use Adam at 2e-4" in drift[0]
    else:
        assert real > teacher_real - 0.05
        assert not drift

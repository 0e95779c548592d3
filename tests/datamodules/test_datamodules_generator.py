"""GeneratorDataModule (ZS-CGAN): shapes, labels, determinism, ranks, learning, save/load, resume, errors."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_quant import QuantizationAwareTraining, QuantizationConfigError
from lightning_quant.callbacks import DistillationCallback
from lightning_quant.datamodules import ConditionalGenerator, DigitsDataModule, GeneratorDataModule
from lightning_quant.datamodules.generator import bn_layers, mode_seeking_loss
from lightning_quant.models import ImageClassifier, LeNet5, resnet8
from tests.conftest import tiny_trainer_kwargs

QUIET = {"enable_progress_bar": False}


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: one thread is as fast, and does not crawl when the CPU is shared
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> ImageClassifier:
    """A ResNet-8 (width 8, with BatchNorm) trained briefly on the 8x8 digits: ~90 % validation accuracy."""
    torch.set_num_threads(1)
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    model = ImageClassifier(resnet8(in_channels=1, num_classes=10, width=8), lr=3e-3)
    L.Trainer(**tiny_trainer_kwargs(tmp_path_factory.mktemp("teacher"), max_epochs=8)).fit(model, dm)
    return model.eval()


@pytest.fixture(scope="module")
def trained(teacher) -> GeneratorDataModule:
    """A generator trained for a few seconds against the teacher (with the default diversity term)."""
    dm = _dm(teacher, generator_steps=200, generator_lr=3e-3)
    dm.setup("fit")
    return dm


def _dm(teacher: nn.Module, **kwargs) -> GeneratorDataModule:
    defaults = dict(
        num_classes=10,
        input_shape=(1, 8, 8),
        samples_per_epoch=256,
        batch_size=64,
        generator_steps=2,
        generator_batch_size=64,
        latent_dim=32,
        generator_width=32,
        val_samples=64,
        generator_trainer_kwargs=QUIET,
    )
    defaults.update(kwargs)
    return GeneratorDataModule(teacher, **defaults)


def _epoch(dm: GeneratorDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(dm.train_dataloader())
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_batches_have_the_teachers_input_shape_dtype_and_labels_in_range(teacher):
    dm = _dm(teacher)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataloader()) == 4
    for x, y in batches:
        assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 10
    (xv, _), *_ = list(dm.val_dataloader())
    assert xv.shape == (64, 1, 8, 8)
    with torch.no_grad():
        assert teacher(x).shape == (64, 10)


def test_generator_output_shape_for_sizes_not_multiple_of_four():
    g = ConditionalGenerator(latent_dim=8, num_classes=3, out_shape=(3, 13, 10), width=8)
    x, y = g.sample(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 3, 13, 10) and int(y.max()) < 3


def test_deterministic_with_a_seed_fresh_per_epoch_and_fixed_pool(teacher):
    a, b, c = _dm(teacher, seed=1), _dm(teacher, seed=1), _dm(teacher, seed=2)
    for dm in (a, b, c):
        dm.setup("fit")
    xa, ya = _epoch(a)
    xb, yb = _epoch(b)
    torch.testing.assert_close(xa, xb, atol=0, rtol=0)
    assert torch.equal(ya, yb)
    assert not torch.equal(_epoch(c)[0], xa)
    # a fresh stream each epoch, the same again on a second pass over the same epoch
    a.current_epoch = lambda: 1  # type: ignore[method-assign]
    assert not torch.equal(_epoch(a)[0], xa)
    pool = _dm(teacher, fixed_pool=True)
    pool.setup("fit")
    first = _epoch(pool)[0]
    pool.current_epoch = lambda: 3  # type: ignore[method-assign]
    assert torch.equal(_epoch(pool)[0], first)


def test_distinct_samples_per_rank(teacher):
    ranks = [_dm(teacher, rank=r, world_size=2) for r in (0, 1)]
    for dm in ranks:
        dm.setup("fit")
    (x0, _), (x1, _) = (_epoch(dm) for dm in ranks)
    # the samples per epoch are split over the ranks, and every rank's are its own
    assert x0.shape[0] == x1.shape[0] == 128
    assert not torch.isclose(x0[:, None], x1[None]).flatten(2).all(-1).any()
    # the same generator on both ranks (same seed)
    for (k, v0), v1 in zip(
        ranks[0].generator.state_dict().items(), ranks[1].generator.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(v0, v1, atol=0, rtol=0, msg=k)


def test_short_training_makes_the_teacher_recognise_the_labels_and_bn_loss_falls(trained, teacher):
    history = trained.training_history
    assert len(history) == 200
    first = sum(h["bn"] for h in history[:10]) / 10
    last = sum(h["bn"] for h in history[-10:]) / 10
    assert last < 0.7 * first
    x, y = _epoch(trained)
    with torch.no_grad():
        accuracy = (teacher(x).argmax(dim=1) == y).float().mean().item()
    assert accuracy > 0.6  # chance: 0.1


def test_mode_seeking_loss_matches_a_reference_loop():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 5, generator=g)
    # reference: pairs (i, i + 3); mean absolute differences over all their elements
    dx = sum(float((x[i] - x[i + 3]).abs().sum()) for i in range(3)) / (3 * 16)
    dz = sum(float((z[i] - z[i + 3]).abs().sum()) for i in range(3)) / (3 * 5)
    assert mode_seeking_loss(x, z).item() == pytest.approx(1 / (dx / dz + 1e-5), rel=1e-5)
    # an odd batch ignores its last sample; pairs that come out alike are penalised hard
    assert mode_seeking_loss(torch.cat([x, x[:1]]), torch.cat([z, z[:1]])).item() == pytest.approx(
        mode_seeking_loss(x, z).item(), rel=1e-6
    )
    collapsed = x[:3].repeat(2, 1, 1, 1)
    assert mode_seeking_loss(collapsed, z).item() > 1e4


def _within_class_spread(dm: GeneratorDataModule) -> float:
    """Mean pairwise distance of 32 samples of the same label, averaged over the labels (fixed latents)."""
    generator = dm.generator.eval()
    z = torch.randn(32, generator.latent_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        spreads = [torch.pdist(generator(z, torch.full((32,), c)).flatten(1)).mean() for c in range(10)]
    return float(torch.stack(spreads).mean())


def test_diversity_term_spreads_the_samples_of_a_class(trained, teacher):
    assert "diversity" in trained.training_history[0]  # on by default
    plain = _dm(teacher, generator_steps=200, generator_lr=3e-3, diversity_weight=0.0)
    diverse = _dm(teacher, generator_steps=200, generator_lr=3e-3, diversity_weight=1.0)
    for dm in (plain, diverse):
        dm.setup("fit")
    assert "diversity" not in plain.training_history[0]
    assert _within_class_spread(diverse) > 1.2 * _within_class_spread(plain)
    # the samples stay recognisable: the teacher still labels them as conditioned
    x, y = _epoch(diverse)
    with torch.no_grad():
        assert (teacher(x).argmax(dim=1) == y).float().mean().item() > 0.6


def test_save_load_and_state_dict_resume(trained, teacher, tmp_path: Path):
    path = tmp_path / "gen.pt"
    trained.generator.save(path)
    loaded = _dm(teacher, generator_path=str(path))
    loaded.setup("fit")
    assert loaded.training_history == []  # loaded, not trained
    torch.testing.assert_close(_epoch(loaded)[0], _epoch(trained)[0], atol=0, rtol=0)
    # datamodule state (what a checkpoint keeps) restores the same generator into a fresh module
    fresh = _dm(teacher)
    fresh.load_state_dict(trained.state_dict())
    fresh.setup("fit")
    torch.testing.assert_close(_epoch(fresh)[0], _epoch(trained)[0], atol=0, rtol=0)


def test_train_saves_to_generator_path_and_teacher_checkpoint_is_loaded(teacher, tmp_path: Path):
    ckpt = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": teacher.state_dict()}, ckpt)
    blank = ImageClassifier(resnet8(in_channels=1, num_classes=10, width=8))
    dm = _dm(blank, teacher_checkpoint=str(ckpt), generator_path=str(tmp_path / "g" / "gen.pt"))
    dm.setup("fit")
    assert (tmp_path / "g" / "gen.pt").exists()
    for a, b in zip(blank.state_dict().values(), teacher.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_noise_source_labels_by_the_teacher_and_needs_no_bn():
    lenet = LeNet5(in_channels=1, input_size=8).eval()
    dm = _dm(lenet, source="noise")
    dm.setup("fit")
    x, y = _epoch(dm)
    with torch.no_grad():
        assert torch.equal(lenet(x).argmax(dim=1), y)
    assert dm.generator is None


def test_distilled_source_matches_the_bn_statistics_and_resumes(teacher):
    from lightning_quant.datamodules.generator import _BNStatistics

    dm = _dm(teacher, source="distilled", samples_per_epoch=128, generator_steps=120, generator_batch_size=64)
    dm.setup("fit")
    x, y = dm.pool
    assert x.shape == (128, 1, 8, 8) and y.shape == (128,) and dm.generator is None
    with torch.no_grad():
        assert torch.equal(teacher(x).argmax(dim=1), y)  # labelled by the teacher
        stats = _BNStatistics(teacher, "l2")
        teacher(x)
        distilled_loss = stats.pop().item()
        teacher(torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
        noise_loss = stats.pop().item()
        stats.remove()
    assert distilled_loss < 0.5 * noise_loss  # the optimisation matched the BN statistics far better than noise
    batch_x, batch_y = _epoch(dm)
    for row, label in zip(batch_x[:8], batch_y[:8], strict=True):  # batches are drawn from the pool, with its labels
        (match,) = (row == x).flatten(1).all(1).nonzero()[:1].flatten().tolist()
        assert y[match] == label
    restored = _dm(teacher, source="distilled", samples_per_epoch=128)
    restored.load_state_dict(dm.state_dict())
    restored.setup("fit")  # the restored pool is used, nothing is optimised again
    assert restored.generator_seconds is None and torch.equal(restored.pool[0], x)
    assert torch.equal(_epoch(restored)[0], batch_x)


def test_teacher_without_batchnorm_is_refused():
    lenet = LeNet5(in_channels=1, input_size=8)
    assert not bn_layers(lenet)
    for source in ("generator", "distilled"):
        with pytest.raises(QuantizationConfigError, match=r"has no BatchNorm layer.*running|mean and variance stored"):
            _dm(lenet, source=source)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_shape": (8, 8)}, r"`input_shape` must be the \(channels, height, width\)"),
        (
            {"samples_per_epoch": 0},
            r"`samples_per_epoch` must be an integer >= 1, got 0\. HINT: pass e\.g\. `samples_per_epoch=10_000`",
        ),
        ({"source": "gan"}, r"`source` must be one of \('generator', 'distilled', 'noise'\), got 'gan'"),
        ({"bn_loss": "l1"}, r"`bn_loss` must be one of \('kl', 'l2'\)"),
        ({"bn_weight": -1.0}, "`bn_weight` must be >= 0, got -1.0"),
        ({"diversity_weight": -0.5}, "`diversity_weight` must be >= 0, got -0.5. HINT: 0 turns"),
    ],
)
def test_argument_errors(teacher, kwargs, match):
    with pytest.raises(QuantizationConfigError, match=match):
        _dm(teacher, **kwargs)


def test_drops_into_trainer_fit_in_place_of_real_data(trained, teacher, tmp_path: Path):
    student = ImageClassifier(resnet8(in_channels=1, num_classes=10, width=8))
    student.load_state_dict(teacher.state_dict())
    trainer = L.Trainer(**tiny_trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1))
    trainer.fit(student, datamodule=trained)
    assert trainer.global_step == 2


class _SaveFirstBatch(Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            gen = trainer.datamodule.generator.state_dict()
            torch.save({"x": batch[0], "gen": gen}, self.folder / f"rank{trainer.global_rank}.pt")


def test_ddp_two_processes_distinct_samples_same_generator(tmp_path: Path):
    torch.manual_seed(0)
    teacher = ImageClassifier(resnet8(in_channels=1, num_classes=10, width=4)).eval()
    student = ImageClassifier(resnet8(in_channels=1, num_classes=10, width=4))
    dm = _dm(teacher, samples_per_epoch=64, batch_size=16, latent_dim=8, generator_width=8, val_samples=0)
    callbacks = [
        DistillationCallback(student_init="teacher"),
        QuantizationAwareTraining(4, 4, num_calibration_batches=1),
        _SaveFirstBatch(tmp_path),
    ]
    kwargs = tiny_trainer_kwargs(tmp_path, devices=2, strategy="ddp_spawn", max_steps=2, callbacks=callbacks)
    L.Trainer(**kwargs).fit(student, datamodule=dm)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["x"].shape == r1["x"].shape == (16, 1, 8, 8) and not torch.equal(r0["x"], r1["x"])
    for key, value in r0["gen"].items():
        torch.testing.assert_close(r1["gen"][key], value, atol=0, rtol=0, msg=key)


def test_resume_restores_the_generator_from_the_checkpoint(teacher, tmp_path: Path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = _dm(teacher, samples_per_epoch=64, seed=0)
    student = ImageClassifier(resnet8(in_channels=1, num_classes=10, width=8))
    L.Trainer(**tiny_trainer_kwargs(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[ckpt])).fit(
        student, datamodule=first
    )
    # another seed would train another generator: the checkpoint's wins
    resumed = _dm(teacher, samples_per_epoch=64, seed=5)
    student2 = ImageClassifier(resnet8(in_channels=1, num_classes=10, width=8))
    L.Trainer(**tiny_trainer_kwargs(tmp_path, max_epochs=2)).fit(
        student2, datamodule=resumed, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    for key, value in first.generator.state_dict().items():
        torch.testing.assert_close(resumed.generator.state_dict()[key], value, atol=0, rtol=0, msg=key)

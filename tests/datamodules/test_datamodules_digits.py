"""Tests of DigitsDataModule (scikit-learn's 8x8 digits, offline) and the shared loader code."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from lightning_quant.datamodules import DigitsDataModule


def _all(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset.tensors


def test_shapes_labels_and_split_sizes() -> None:
    dm = DigitsDataModule(batch_size=32)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 8)
    dm.setup("fit")
    sizes = [len(d) for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)]
    assert sum(sizes) == 1797
    assert sizes[2] == pytest.approx(0.2 * 1797, abs=1) and sizes[1] == pytest.approx(0.2 * 1797, abs=1)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9
    # Stratified: every class in every split, in about the same proportion.
    for dataset in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        counts = torch.bincount(_all(dataset)[1], minlength=10).float()
        assert counts.min() > 0
        assert (counts / counts.sum() - 0.1).abs().max() < 0.02


def test_normalization_uses_train_statistics() -> None:
    dm = DigitsDataModule()
    dm.setup()
    train_x = _all(dm.train_dataset)[0]
    assert train_x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert train_x.std().item() == pytest.approx(1.0, abs=1e-5)
    assert 0.2 < dm.mean < 0.4 and 0.3 < dm.std < 0.5
    # Reconstruct raw pixels: (x * std + mean) * 16 are the integers 0..16 of load_digits.
    raw = (train_x * dm.std + dm.mean) * 16
    assert torch.allclose(raw, raw.round(), atol=1e-4)
    assert raw.min().round() == 0 and raw.max().round() == 16


def test_split_matches_sklearn_images() -> None:
    dm = DigitsDataModule(seed=3)
    dm.setup()
    digits = load_digits()
    x, y = _all(dm.test_dataset)
    raw = ((x * dm.std + dm.mean) * 16).round().squeeze(1)
    images = torch.as_tensor(digits.images, dtype=torch.float32)
    # Every served test image is one of the originals, with its own label.
    for i in range(5):
        match = (images == raw[i]).flatten(1).all(1).nonzero().flatten()
        assert len(match) >= 1
        assert y[i].item() in {int(digits.target[j]) for j in match}


def test_same_seed_same_split_different_seed_different() -> None:
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(_all(a.val_dataset)[0], _all(b.val_dataset)[0])
    assert torch.equal(_all(a.test_dataset)[1], _all(b.test_dataset)[1])
    assert not torch.equal(_all(a.val_dataset)[1], _all(c.val_dataset)[1])
    # The shuffled training order is seeded too, and repeats for each new loader.
    xa, _ = next(iter(a.train_dataloader()))
    xb, _ = next(iter(b.train_dataloader()))
    assert torch.equal(xa, xb)
    assert torch.equal(xa, next(iter(a.train_dataloader()))[0])
    # Validation and test loaders keep their order.
    assert torch.equal(next(iter(a.val_dataloader()))[0], _all(a.val_dataset)[0][: a.batch_size])


@pytest.mark.parametrize("size", [16, 28, 32])
def test_resize(size: int) -> None:
    dm = DigitsDataModule(image_size=size, batch_size=8)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, size, size)
    assert dm.image_size == size
    assert _all(dm.train_dataset)[0].mean().item() == pytest.approx(0.0, abs=1e-5)


def test_setup_is_idempotent_and_predict_serves_test() -> None:
    dm = DigitsDataModule()
    dm.setup("fit")
    train = dm.train_dataset
    dm.setup("test")
    assert dm.train_dataset is train
    x, _ = next(iter(dm.predict_dataloader()))
    assert torch.equal(x, _all(dm.test_dataset)[0][: dm.batch_size])


def test_loader_before_setup_raises() -> None:
    with pytest.raises(RuntimeError, match=r"no train split yet: call `setup\('fit'\)` first"):
        DigitsDataModule().train_dataloader()
    with pytest.raises(RuntimeError, match=r"no test split yet: call `setup\('test'\)` first"):
        DigitsDataModule().predict_dataloader()


def test_workers_are_persistent() -> None:
    dm = DigitsDataModule(num_workers=1)
    dm.setup()
    assert dm.train_dataloader().persistent_workers and dm.val_dataloader().num_workers == 1
    dm0 = DigitsDataModule(num_workers=0)
    dm0.setup()
    assert not dm0.train_dataloader().persistent_workers


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"`batch_size` must be an integer >= 1, got 0\. HINT: pass e\.g\. `batch_size=64`"),
        ({"num_workers": -1}, r"`num_workers` must be an integer >= 0, got -1"),
        (
            {"val_fraction": 1.0},
            r"`val_fraction` must be a finite number > 0 and < 1, got 1\.0\. HINT: pass a fraction",
        ),
        ({"test_fraction": 0}, r"`test_fraction` must be a finite number > 0 and < 1, got 0\. HINT: pass a fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"`val_fraction` \+ `test_fraction` must be below 1"),
        ({"image_size": 0}, r"`image_size` must be an integer >= 1, got 0"),
        ({"seed": 1.5}, r"`seed` must be an integer, got 1\.5\. HINT: pass e\.g\. `seed=0`"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)

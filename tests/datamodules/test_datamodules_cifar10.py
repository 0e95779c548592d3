"""Tests of CIFAR10DataModule on tiny batches written in the `cifar-10-batches-py` pickle format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_quant.datamodules import CIFAR10DataModule
from tests.conftest import CIFAR10_CLASSES, write_cifar10

MEAN = torch.tensor(CIFAR10DataModule.MEAN).view(3, 1, 1)
STD = torch.tensor(CIFAR10DataModule.STD).view(3, 1, 1)


def _expected(row: np.ndarray) -> torch.Tensor:
    """The normalized CHW image of one 3072-byte row."""
    return (torch.from_numpy(row.reshape(3, 32, 32).copy()).float() / 255 - MEAN) / STD


def test_reads_tiny_batches(tmp_path: Path) -> None:
    batches = write_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=tmp_path, batch_size=4, val_size=5, augment=False, seed=0)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 3, 32)
    dm.setup("fit")
    assert dm.classes == CIFAR10_CLASSES
    assert len(dm.train_dataset) == 15 and len(dm.val_dataset) == 5

    rows = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    labels = [label for i in range(1, 6) for label in batches[f"data_batch_{i}"]["labels"]]
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist()
    for i in range(3):
        x, y = dm.val_dataset[i]
        assert torch.allclose(x, _expected(rows[perm[i]]), atol=1e-5)
        assert y == labels[perm[i]]
        x, y = dm.train_dataset[i]
        assert torch.allclose(x, _expected(rows[perm[5 + i]]), atol=1e-5)

    dm.setup("test")
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    test = batches["test_batch"]
    assert torch.allclose(x[2], _expected(test["data"][2]), atol=1e-5)
    assert y.tolist() == test["labels"][:4]
    assert len(dm.test_dataset) == 6


def test_augmentation_on_train_only(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=tmp_path, batch_size=15, val_size=5, augment=True, seed=0)
    dm.setup("fit")
    plain = CIFAR10DataModule(root=tmp_path, batch_size=15, val_size=5, augment=False, seed=0)
    plain.setup("fit")
    torch.manual_seed(0)
    augmented = torch.stack([dm.train_dataset[i][0] for i in range(15)])
    reference = torch.stack([plain.train_dataset[i][0] for i in range(15)])
    assert augmented.shape == reference.shape == (15, 3, 32, 32)
    assert not torch.equal(augmented, reference)
    # Validation images are never augmented.
    assert torch.equal(dm.val_dataset[0][0], plain.val_dataset[0][0])
    # Shuffled order is the same for the same seed.
    assert torch.equal(next(iter(plain.train_dataloader()))[1], next(iter(plain.train_dataloader()))[1])


def test_missing_files_name_root_and_download(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(root=tmp_path, val_size=5)
    dm.prepare_data()  # download=False: no network
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 files .*data_batch_1.* pass download=True"):
        dm.setup("fit")
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    dm.setup("fit")
    with pytest.raises(FileNotFoundError, match=r"\['test_batch'\] not found .*root="):
        dm.setup("test")


def test_val_size_checked(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    with pytest.raises(ValueError, match=r"`val_size` must be smaller than the 20 training samples found"):
        CIFAR10DataModule(root=tmp_path, val_size=25).setup("fit")
    with pytest.raises(ValueError, match=r"`val_size` must be an integer >= 1, got 0"):
        CIFAR10DataModule(val_size=0)


def test_train_subset_keeps_the_first_training_images_of_the_split(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    full = CIFAR10DataModule(root=tmp_path, val_size=5, seed=3, augment=False)
    full.setup("fit")
    part = CIFAR10DataModule(root=tmp_path, val_size=5, seed=3, augment=False, train_subset=6)
    part.setup("fit")
    assert len(full.train_dataset) == 15 and len(part.train_dataset) == 6
    for i in range(6):  # the same images, in the same order: the split does not depend on the subset
        torch.testing.assert_close(part.train_dataset[i][0], full.train_dataset[i][0])
        assert part.train_dataset[i][1] == full.train_dataset[i][1]
    assert [part.val_dataset[i][1] for i in range(5)] == [full.val_dataset[i][1] for i in range(5)]
    with pytest.raises(ValueError, match=r"`train_subset` must be at most the 15 training images .* got 16"):
        CIFAR10DataModule(root=tmp_path, val_size=5, train_subset=16).setup("fit")
    with pytest.raises(ValueError, match=r"`train_subset` must be an integer >= 1, got 0"):
        CIFAR10DataModule(train_subset=0)

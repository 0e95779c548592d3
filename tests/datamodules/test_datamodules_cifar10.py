"""Tests of CIFAR10DataModule on tiny batches written in the `cifar-10-batches-py` pickle format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_quant.datamodules import CIFAR10DataModule

MEAN = torch.tensor(CIFAR10DataModule.MEAN).view(3, 1, 1)
STD = torch.tensor(CIFAR10DataModule.STD).view(3, 1, 1)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_cifar(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0) -> dict[str, dict]:
    """Write the archive's layout: pickled dicts with `data` (N x 3072 uint8: R, G, B planes) and `labels`."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        batch = {
            "batch_label": f"{name} of 5",
            "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{name}_{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        batches[name] = batch
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return batches


def _expected(row: np.ndarray) -> torch.Tensor:
    """The normalized CHW image of one 3072-byte row."""
    return (torch.from_numpy(row.reshape(3, 32, 32).copy()).float() / 255 - MEAN) / STD


def test_reads_tiny_batches(tmp_path: Path) -> None:
    batches = _write_cifar(tmp_path)
    dm = CIFAR10DataModule(root=tmp_path, batch_size=4, val_size=5, augment=False, seed=0)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 3, 32)
    dm.setup("fit")
    assert dm.classes == CLASSES
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
    _write_cifar(tmp_path)
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
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    dm.setup("fit")
    with pytest.raises(FileNotFoundError, match=r"\['test_batch'\] not found .*root="):
        dm.setup("test")


def test_val_size_checked(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    with pytest.raises(ValueError, match=r"`val_size` must be smaller than the 20 training samples found"):
        CIFAR10DataModule(root=tmp_path, val_size=25).setup("fit")
    with pytest.raises(ValueError, match=r"`val_size` must be an integer >= 1, got 0"):
        CIFAR10DataModule(val_size=0)

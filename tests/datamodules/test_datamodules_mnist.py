"""Tests of MNISTDataModule on tiny IDX files in torchvision's raw layout, and on the real copy if present."""

from __future__ import annotations

import struct
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lightning_quant.datamodules import MNISTDataModule
from lightning_quant.models import ImageClassifier, LeNet5

SHARED_DATA = Path(__file__).parents[2].parent / "shared" / "data"


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format: magic (0, 0, 0x08 = ubyte, ndim), big-endian sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        _write_idx(raw / name, array)
    return arrays


def _expected(images: np.ndarray, i: int) -> torch.Tensor:
    return ((torch.from_numpy(images[i]).float() / 255 - 0.1307) / 0.3081).unsqueeze(0)


def test_reads_tiny_idx_files(tmp_path: Path) -> None:
    arrays = _write_mnist(tmp_path)
    dm = MNISTDataModule(root=tmp_path, batch_size=4, val_size=5, seed=0)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 28)
    dm.setup("fit")
    assert len(dm.train_dataset) == 15 and len(dm.val_dataset) == 5
    assert dm.test_dataset is None
    dm.setup("test")
    assert len(dm.test_dataset) == 10

    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist()
    assert list(dm.val_dataset.indices) == perm[:5]
    assert list(dm.train_dataset.indices) == perm[5:]
    x, y = dm.val_dataset[0]
    assert x.shape == (1, 28, 28)
    assert torch.allclose(x, _expected(arrays["train-images-idx3-ubyte"], perm[0]), atol=1e-6)
    assert y == arrays["train-labels-idx1-ubyte"][perm[0]]

    xb, yb = next(iter(dm.test_dataloader()))
    assert xb.shape == (4, 1, 28, 28) and yb.dtype == torch.int64
    assert torch.allclose(xb[3], _expected(arrays["t10k-images-idx3-ubyte"], 3), atol=1e-6)
    assert yb.tolist() == arrays["t10k-labels-idx1-ubyte"][:4].tolist()


def test_seeded_split_and_subset(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    a = MNISTDataModule(root=tmp_path, val_size=5, seed=0, train_subset=6)
    b = MNISTDataModule(root=tmp_path, val_size=5, seed=0)
    c = MNISTDataModule(root=tmp_path, val_size=5, seed=1)
    for dm in (a, b, c):
        dm.setup("fit")
    assert list(a.val_dataset.indices) == list(b.val_dataset.indices)
    assert list(a.val_dataset.indices) != list(c.val_dataset.indices)
    assert len(a.train_dataset) == 6
    assert list(a.train_dataset.indices) == list(b.train_dataset.indices)[:6]


def test_trains_through_trainer(tmp_path: Path) -> None:
    _write_mnist(tmp_path, n_train=24, n_test=8)
    L.seed_everything(0)
    dm = MNISTDataModule(root=str(tmp_path), batch_size=8, val_size=8)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = ImageClassifier(LeNet5())
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 and "val/acc" in trainer.callback_metrics
    trainer.test(model, datamodule=dm, verbose=False)
    assert "test/acc" in trainer.callback_metrics


def test_missing_files_name_root_and_download(tmp_path: Path) -> None:
    dm = MNISTDataModule(root=tmp_path / "nowhere")
    dm.prepare_data()  # download=False: nothing to do, no network
    with pytest.raises(FileNotFoundError, match=r"root='.*nowhere'\): pass download=True to download them"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte"):
        dm.setup("test")
    with pytest.raises(FileNotFoundError, match=r"call prepare_data\(\) before setup\(\)"):
        MNISTDataModule(root=tmp_path / "nowhere", download=True).setup("fit")


def test_sizes_checked_against_the_files(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    with pytest.raises(ValueError, match=r"`val_size` must be smaller than the 20 training samples .*got 20"):
        MNISTDataModule(root=tmp_path, val_size=20).setup("fit")
    with pytest.raises(ValueError, match=r"`train_subset` must be at most the 15 training images .* got 16"):
        MNISTDataModule(root=tmp_path, val_size=5, train_subset=16).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_size": 0}, r"`val_size` must be an integer >= 1, got 0\. HINT: pass e\.g\. `val_size=5000`"),
        ({"train_subset": 0}, r"`train_subset` must be an integer >= 1, got 0\. HINT: pass None"),
        ({"batch_size": -2}, r"`batch_size` must be an integer >= 1, got -2"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MNISTDataModule(**kwargs)


def test_real_mnist_copy() -> None:
    if not (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"no MNIST copy at {SHARED_DATA}/MNIST/raw (torchvision's raw layout)")
    dm = MNISTDataModule(root=SHARED_DATA, batch_size=256, train_subset=512, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (512, 5000, 10000)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (256, 1, 28, 28)
    assert set(y.tolist()) == set(range(10))
    # Normalized with MNIST's own statistics: roughly zero mean and unit variance.
    assert abs(x.mean().item()) < 0.15 and 0.85 < x.std().item() < 1.15

"""Tests of ImageFolderDataModule on a few PNG/JPEG files written with PIL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_quant.datamodules import ImageFolderDataModule


def _write_images(folder: Path, classes: dict[str, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c, (name, count) in enumerate(classes.items()):
        (folder / name).mkdir(parents=True)
        for i in range(count):
            size = (20 + 3 * i, 24 + c)
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            if i == 0:
                image.convert("L").save(folder / name / f"{i}.png")  # grayscale is served as RGB
            elif i % 2:
                image.save(folder / name / f"{i}.jpg")
            else:
                image.save(folder / name / f"{i}.png")


def test_split_without_val_folder(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"cat": 4, "dog": 4})
    dm = ImageFolderDataModule(root=tmp_path, image_size=16, batch_size=3, val_fraction=0.25, seed=0)
    assert dm.num_classes == 2 and dm.classes == ["cat", "dog"]  # known before setup
    assert dm.in_channels == 3 and dm.image_size == 16
    dm.setup("fit")
    assert len(dm.train_dataset) == 6 and len(dm.val_dataset) == 2
    assert not set(dm.train_dataset.indices) & set(dm.val_dataset.indices)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    assert set(y.tolist()) <= {0, 1}
    dm.setup("test")
    assert dm.test_dataset is dm.val_dataset  # no root/test: test on the validation split

    again = ImageFolderDataModule(root=tmp_path, image_size=16, val_fraction=0.25, seed=0)
    again.setup("fit")
    assert list(again.val_dataset.indices) == list(dm.val_dataset.indices)


def test_val_and_test_folders(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"a": 3, "b": 2, "c": 2})
    _write_images(tmp_path / "val", {"a": 1, "b": 1, "c": 2}, seed=1)
    _write_images(tmp_path / "test", {"a": 2, "b": 1, "c": 1}, seed=2)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=12, batch_size=8)
    dm.setup("fit")
    assert len(dm.train_dataset) == 7 and len(dm.val_dataset) == 4
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 12, 12) and y.tolist() == [0, 1, 2, 2]
    dm.setup("predict")
    x, y = next(iter(dm.predict_dataloader()))
    assert x.shape == (4, 3, 12, 12) and y.tolist() == [0, 0, 1, 2]


def test_eval_transform_resizes_and_center_crops(tmp_path: Path) -> None:
    (tmp_path / "train" / "only").mkdir(parents=True)
    (tmp_path / "val" / "only").mkdir(parents=True)
    # Left half black, right half white: the center crop keeps both halves, the normalization is ImageNet's.
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, 40:] = 255
    for split in ("train", "val"):
        Image.fromarray(pixels).save(tmp_path / split / "only" / "0.png")
    dm = ImageFolderDataModule(root=tmp_path, image_size=8, batch_size=1)
    dm.setup("validate")
    x, _ = dm.val_dataset[0]
    assert x.shape == (3, 8, 8)
    mean = torch.tensor(ImageFolderDataModule.MEAN).view(3, 1)
    std = torch.tensor(ImageFolderDataModule.STD).view(3, 1)
    assert torch.allclose(x[:, :, 0], (0 - mean) / std, atol=1e-5)
    assert torch.allclose(x[:, :, -1], (1 - mean) / std, atol=1e-5)


def test_augment(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"cat": 3, "dog": 3})
    dm = ImageFolderDataModule(root=tmp_path, image_size=10, batch_size=5, val_fraction=0.2, augment=True)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 10, 10)


def test_missing_and_mismatched_folders(tmp_path: Path) -> None:
    dm = ImageFolderDataModule(root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"No class folders found in .*root/train/<class>/<image>"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match=r"No class folders"):
        _ = dm.num_classes
    _write_images(tmp_path / "train", {"cat": 2, "dog": 2})
    _write_images(tmp_path / "val", {"cat": 1, "bird": 1})
    with pytest.raises(ValueError, match=r"\['bird', 'cat'\] differ from those of .*\['cat', 'dog'\]"):
        dm.setup("fit")


def test_single_image_cannot_be_split(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"cat": 1})
    with pytest.raises(ValueError, match=r"has 1 image: at least 2 are needed .* or a root/val folder"):
        ImageFolderDataModule(root=tmp_path).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, r"`image_size` must be an integer >= 1, got 0\. HINT: pass e\.g\. `image_size=224`"),
        (
            {"val_fraction": 0.0},
            r"`val_fraction` must be a finite number > 0 and < 1, got 0\.0\. HINT: pass a fraction",
        ),
        ({"batch_size": 2.5}, r"`batch_size` must be an integer >= 1, got 2.5"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageFolderDataModule(root=tmp_path, **kwargs)

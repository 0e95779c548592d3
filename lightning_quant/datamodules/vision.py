"""LightningDataModules for the image-classification data sets used by examples, tests and benchmarks.

Every module reads a local ``root`` like torchvision's data sets and downloads only in
:meth:`~lightning.pytorch.core.LightningDataModule.prepare_data` (when ``download=True``). All share one
private base class for argument checks, seeded splits and data loaders:

* :class:`DigitsDataModule`: scikit-learn's 8x8 digits, shipped inside scikit-learn (no network).
* :class:`MNISTDataModule`: MNIST in torchvision's raw layout (``root/MNIST/raw``).
* :class:`CIFAR10DataModule`: CIFAR-10 in its python-pickle layout (``root/cifar-10-batches-py``).
* :class:`ImageFolderDataModule`: ``root/train/<class>/<image>`` folders (optional ``root/val``).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets, transforms

from lightning_quant.core.validation import check_fraction, check_int

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
]

_FIT_STAGES = (None, "fit", "validate")
_TEST_STAGES = (None, "test", "predict")


class _VisionDataModule(L.LightningDataModule):
    """Shared argument checks, seeded splits and data loaders of the vision data modules.

    Subclasses set ``num_classes``, ``in_channels`` and ``image_size`` and fill ``train_dataset``,
    ``val_dataset`` and ``test_dataset`` in ``setup``; the predict loader serves the test split.

    Args:
        batch_size: Samples per batch, >= 1.
        seed: Seed of the train/validation split and of the training-set shuffling.
        num_workers: Data-loading worker processes, >= 0 (workers persist between epochs when > 0).
    """

    def __init__(self, batch_size: int, seed: int, num_workers: int) -> None:
        super().__init__()
        check_int("batch_size", batch_size, minimum=1, fix="pass e.g. `batch_size=64`.")
        check_int("num_workers", num_workers, minimum=0, fix="pass 0 to load data in the main process.")
        check_int("seed", seed, fix="pass e.g. `seed=0`.")
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    @staticmethod
    def _first(train_idx: list[int], train_subset: int | None) -> list[int]:
        """The first ``train_subset`` training indices after the split (all with ``None``)."""
        if train_subset is None:
            return train_idx
        if train_subset > len(train_idx):
            raise ValueError(
                f"`train_subset` must be at most the {len(train_idx)} training images left after the validation "
                f"split, got {train_subset}. Use None to keep them all."
            )
        return train_idx[:train_subset]

    def _split_indices(self, n: int, val_size: int) -> tuple[list[int], list[int]]:
        """Seeded random split of ``range(n)`` into ``(train_indices, val_indices)``.

        Args:
            n: Number of samples to split.
            val_size: Number of validation samples, ``1 <= val_size < n``.

        Returns:
            The training and validation indices.

        Raises:
            ValueError: If the split would leave no training sample.
        """
        if val_size >= n:
            raise ValueError(
                f"`val_size` must be smaller than the {n} training samples found, got {val_size}. "
                "Use a smaller validation split."
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return perm[val_size:], perm[:val_size]

    def _loader(self, dataset: Dataset | None, split: str, shuffle: bool = False) -> DataLoader:
        """Build the data loader of one split (shuffled with a seeded generator for training)."""
        if dataset is None:
            stage = "fit" if split in ("train", "val") else "test"
            raise RuntimeError(
                f"{type(self).__name__} has no {split} split yet: call `setup({stage!r})` first "
                "(a Trainer does this for you)."
            )
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) loader over the training split."""
        return self._loader(self.train_dataset, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Loader over the validation split, in a fixed order."""
        return self._loader(self.val_dataset, "val")

    def test_dataloader(self) -> DataLoader:
        """Loader over the test split, in a fixed order."""
        return self._loader(self.test_dataset, "test")

    def predict_dataloader(self) -> DataLoader:
        """Loader over the test split (``(x, y)`` batches), in a fixed order."""
        return self._loader(self.test_dataset, "test")


class _ImageArrayDataset(Dataset):
    """``(transform(image), label)`` samples from an ``(N, H, W, C)`` uint8 array and integer labels.

    Args:
        images: Array of shape ``(N, H, W, 3)`` and dtype uint8.
        targets: Integer labels, one per image.
        indices: Which rows of ``images`` this data set serves, in this order.
        transform: Applied to each ``PIL.Image``.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: Sequence[int],
        indices: Sequence[int],
        transform: Callable[[Image.Image], Any],
    ) -> None:
        self.images = images
        self.targets = targets
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        row = self.indices[i]
        return self.transform(Image.fromarray(self.images[row])), int(self.targets[row])


class DigitsDataModule(_VisionDataModule):
    """scikit-learn's handwritten digits (1,797 images of 8x8 pixels, 10 classes), fully offline.

    Pixel values are scaled from [0, 16] to [0, 1], optionally resized (bilinear, once in ``setup``)
    to ``image_size``, then standardized with the mean and standard deviation of the training split
    (a single scalar each, available as ``mean`` and ``std`` after ``setup``). The stratified split
    into train/validation/test is deterministic in ``seed``.

    Args:
        batch_size: Samples per batch.
        val_fraction: Fraction of all samples used for validation, in (0, 1).
        test_fraction: Fraction of all samples used for testing, in (0, 1); with ``val_fraction``
            below 1 in total.
        image_size: Height and width of the served images (8 keeps the originals).
        seed: Seed of the split and of the training-set shuffling.
        num_workers: Data-loading worker processes.

    Raises:
        ValueError: If an argument is out of range.

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), y.dtype
        ((32, 1, 8, 8), torch.int64)
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        image_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        check_fraction("val_fraction", val_fraction)
        check_fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 1:
            raise ValueError(
                f"`val_fraction` + `test_fraction` must be below 1 to leave training data, got "
                f"{val_fraction} + {test_fraction}. Use e.g. val_fraction=0.2, test_fraction=0.2."
            )
        check_int("image_size", image_size, minimum=1, fix="pass 8 for the original digits or e.g. 28 or 32.")
        self.save_hyperparameters()
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.image_size = image_size
        self.num_classes = 10
        self.in_channels = 1
        self.mean: float | None = None
        self.std: float | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load, split, resize and standardize the digits (once; later calls do nothing).

        Args:
            stage: Lightning stage; all splits are built whatever the stage (the data set is tiny).
        """
        if self.train_dataset is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.as_tensor(digits.target, dtype=torch.long)
        indices = np.arange(len(y))
        rest, test_idx = train_test_split(
            indices, test_size=self.test_fraction, stratify=digits.target, random_state=self.seed
        )
        train_idx, val_idx = train_test_split(
            rest,
            test_size=self.val_fraction / (1.0 - self.test_fraction),
            stratify=digits.target[rest],
            random_state=self.seed,
        )
        if self.image_size != x.shape[-1]:
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        train_x = x[torch.as_tensor(train_idx)]
        mean, std = train_x.mean(), train_x.std()
        x = (x - mean) / std
        self.mean, self.std = float(mean), float(std)

        def subset(idx: np.ndarray) -> TensorDataset:
            sel = torch.as_tensor(idx)
            return TensorDataset(x[sel].contiguous(), y[sel].contiguous())

        self.train_dataset = subset(train_idx)
        self.val_dataset = subset(val_idx)
        self.test_dataset = subset(test_idx)


class MNISTDataModule(_VisionDataModule):
    """MNIST (28x28 grayscale digits) from a local ``root`` in torchvision's raw layout.

    ``root/MNIST/raw/`` holds the uncompressed IDX files (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), read by
    ``torchvision.datasets.MNIST``. Images are normalized with mean 0.1307 and standard deviation 0.3081.
    The official training set is split into train/validation by a ``torch.Generator`` seeded with
    ``seed``; the official test set is the test split.

    Args:
        root: Folder that contains (or will contain, with ``download=True``) ``MNIST/raw``.
        download: Download the files in :meth:`prepare_data` when they are missing.
        batch_size: Samples per batch.
        val_size: Number of training images held out for validation.
        seed: Seed of the split and of the training-set shuffling.
        num_workers: Data-loading worker processes.
        train_subset: Keep only the first ``train_subset`` training images after the split (short runs);
            ``None`` keeps all.

    Raises:
        ValueError: If an argument is out of range.
    """

    MEAN = (0.1307,)
    STD = (0.3081,)
    _FILES: ClassVar[dict[bool, tuple[str, str]]] = {
        True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def __init__(
        self,
        root: str | Path = "data",
        download: bool = False,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        train_subset: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        check_int("val_size", val_size, minimum=1, fix="pass e.g. `val_size=5000`.")
        if train_subset is not None:
            check_int("train_subset", train_subset, minimum=1, fix="pass None to keep the whole training split.")
        self.save_hyperparameters()
        self.root = Path(root)
        self.download = bool(download)
        self.val_size = val_size
        self.train_subset = train_subset
        self.num_classes = 10
        self.in_channels = 1
        self.image_size = 28
        normalize = transforms.Normalize(self.MEAN, self.STD)
        self.transform = transforms.Compose([transforms.ToTensor(), normalize])

    def prepare_data(self) -> None:
        """Download MNIST into ``root`` when ``download=True`` (called on one process only)."""
        if self.download:
            datasets.MNIST(self.root, train=True, download=True)
            datasets.MNIST(self.root, train=False, download=True)

    def _open(self, train: bool) -> datasets.MNIST:
        """Open the training or test set, with a clear error when its files are missing."""
        raw = self.root / "MNIST" / "raw"
        missing = [name for name in self._FILES[train] if not (raw / name).is_file()]
        if missing:
            hint = (
                "call prepare_data() before setup() (a Trainer does this) to download them"
                if self.download
                else "pass download=True to download them, or point `root` at a folder that has them"
            )
            raise FileNotFoundError(
                f"MNIST files {missing} not found in {str(raw)!r} (root={str(self.root)!r}): {hint}."
            )
        return datasets.MNIST(self.root, train=train, download=False, transform=self.transform)

    def setup(self, stage: str | None = None) -> None:
        """Open the splits that ``stage`` needs (train/validation for fit and validate, test otherwise).

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or ``None`` for all.

        Raises:
            FileNotFoundError: If the MNIST files are not under ``root``.
            ValueError: If ``val_size`` or ``train_subset`` do not fit the training set.
        """
        if stage in _FIT_STAGES and self.train_dataset is None:
            full = self._open(train=True)
            train_idx, val_idx = self._split_indices(len(full), self.val_size)
            train_idx = self._first(train_idx, self.train_subset)
            self.train_dataset = Subset(full, train_idx)
            self.val_dataset = Subset(full, val_idx)
        if stage in _TEST_STAGES and self.test_dataset is None:
            self.test_dataset = self._open(train=False)


def _read_cifar10(folder: Path, files: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """Read CIFAR-10 python-pickle batches.

    Each file holds a dict with ``data`` (``N x 3072`` uint8, the red, green, then blue 32x32 planes
    of each image) and ``labels``. The files are pickles: read only trusted folders.

    Args:
        folder: The ``cifar-10-batches-py`` folder.
        files: Batch file names to read, in order.

    Returns:
        Images ``(N, 32, 32, 3)`` uint8 and their labels.
    """
    chunks, labels = [], []
    for name in files:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        chunks.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(int(label) for label in entry["labels"])
    images = np.ascontiguousarray(np.concatenate(chunks).transpose(0, 2, 3, 1))
    return images, labels


class CIFAR10DataModule(_VisionDataModule):
    """CIFAR-10 (32x32 colour images, 10 classes) from a local ``root``.

    ``root/cifar-10-batches-py/`` holds the python-pickle batches of the official archive
    (``data_batch_1`` ... ``data_batch_5``, ``test_batch``, ``batches.meta``); ``download=True`` fetches
    and checks them with ``torchvision.datasets.CIFAR10`` in :meth:`prepare_data`. ``setup`` reads the
    batches directly (no per-run checksum of the 170 MB archive contents), once for both the training
    and the validation split. Normalization uses the training set's per-channel mean
    (0.4914, 0.4822, 0.4465) and standard deviation (0.2470, 0.2435, 0.2616); with ``augment`` the
    training split adds a random 32x32 crop of the 4-pixel zero-padded image and a horizontal flip.

    Args:
        root: Folder that contains (or will contain, with ``download=True``) ``cifar-10-batches-py``.
        download: Download the archive in :meth:`prepare_data` when it is missing.
        batch_size: Samples per batch.
        val_size: Number of training images held out for validation (seeded split).
        seed: Seed of the split and of the training-set shuffling.
        num_workers: Data-loading worker processes.
        augment: Random crop and horizontal flip on the training split.
        train_subset: Keep only the first ``train_subset`` training images after the split (short runs);
            ``None`` keeps them all.

    Raises:
        ValueError: If an argument is out of range.
    """

    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2470, 0.2435, 0.2616)
    FOLDER = "cifar-10-batches-py"
    TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
    TEST_FILES = ("test_batch",)
    META_FILE = "batches.meta"

    def __init__(
        self,
        root: str | Path = "data",
        download: bool = False,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = True,
        train_subset: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        check_int("val_size", val_size, minimum=1, fix="pass e.g. `val_size=5000`.")
        if train_subset is not None:
            check_int("train_subset", train_subset, minimum=1, fix="pass None to keep the whole training split.")
        self.save_hyperparameters()
        self.root = Path(root)
        self.download = bool(download)
        self.val_size = val_size
        self.augment = bool(augment)
        self.train_subset = train_subset
        self.num_classes = 10
        self.in_channels = 3
        self.image_size = 32
        self.classes: list[str] | None = None
        normalize = [transforms.ToTensor(), transforms.Normalize(self.MEAN, self.STD)]
        self.eval_transform = transforms.Compose(normalize)
        augmentation = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        self.train_transform = transforms.Compose((augmentation if self.augment else []) + normalize)

    def prepare_data(self) -> None:
        """Download and extract CIFAR-10 into ``root`` when ``download=True`` (one process only)."""
        if self.download:
            datasets.CIFAR10(self.root, train=True, download=True)

    def _folder(self, files: Sequence[str]) -> Path:
        """The batches folder, with a clear error when one of ``files`` is missing."""
        folder = self.root / self.FOLDER
        missing = [name for name in (*files, self.META_FILE) if not (folder / name).is_file()]
        if missing:
            hint = (
                "call prepare_data() before setup() (a Trainer does this) to download them"
                if self.download
                else "pass download=True to download them, or point `root` at a folder that has them"
            )
            raise FileNotFoundError(
                f"CIFAR-10 files {missing} not found in {str(folder)!r} (root={str(self.root)!r}): {hint}."
            )
        if self.classes is None:
            with open(folder / self.META_FILE, "rb") as f:
                self.classes = list(pickle.load(f, encoding="latin1")["label_names"])
        return folder

    def setup(self, stage: str | None = None) -> None:
        """Read the splits that ``stage`` needs (train/validation for fit and validate, test otherwise).

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or ``None`` for all.

        Raises:
            FileNotFoundError: If the CIFAR-10 batches are not under ``root``.
            ValueError: If ``val_size`` or ``train_subset`` do not fit the training set.
        """
        if stage in _FIT_STAGES and self.train_dataset is None:
            images, labels = _read_cifar10(self._folder(self.TRAIN_FILES), self.TRAIN_FILES)
            train_idx, val_idx = self._split_indices(len(labels), self.val_size)
            train_idx = self._first(train_idx, self.train_subset)
            self.train_dataset = _ImageArrayDataset(images, labels, train_idx, self.train_transform)
            self.val_dataset = _ImageArrayDataset(images, labels, val_idx, self.eval_transform)
        if stage in _TEST_STAGES and self.test_dataset is None:
            images, labels = _read_cifar10(self._folder(self.TEST_FILES), self.TEST_FILES)
            self.test_dataset = _ImageArrayDataset(images, labels, range(len(labels)), self.eval_transform)


class ImageFolderDataModule(_VisionDataModule):
    """Images in class folders: ``root/train/<class>/<image>``, optional ``root/val`` and ``root/test``.

    Files are read by ``torchvision.datasets.ImageFolder`` (``.png``, ``.jpg``, ``.jpeg`` and the other
    extensions it knows) and converted to RGB. Without ``root/val`` the training folder is split by
    ``seed`` (``val_fraction`` of it, at least one image). The test split is ``root/test`` when present,
    otherwise the validation split. Evaluation images are resized to ``image_size / 0.875`` and
    center-cropped to ``image_size``; with ``augment`` training images get a random resized crop and a
    horizontal flip instead. Normalization uses the ImageNet mean and standard deviation.

    Args:
        root: Folder with ``train/`` (and optionally ``val/``, ``test/``) class folders.
        image_size: Height and width of the served images.
        batch_size: Samples per batch.
        val_fraction: Fraction of ``root/train`` held out for validation when there is no ``root/val``.
        seed: Seed of the split and of the training-set shuffling.
        num_workers: Data-loading worker processes.
        augment: Random resized crop and horizontal flip on the training split.

    Raises:
        ValueError: If an argument is out of range.
    """

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(
        self,
        root: str | Path,
        image_size: int = 224,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        check_int("image_size", image_size, minimum=1, fix="pass e.g. `image_size=224`.")
        check_fraction("val_fraction", val_fraction)
        self.save_hyperparameters()
        self.root = Path(root)
        self.image_size = image_size
        self.val_fraction = float(val_fraction)
        self.augment = bool(augment)
        self.in_channels = 3
        normalize = [transforms.ToTensor(), transforms.Normalize(self.MEAN, self.STD)]
        self.eval_transform = transforms.Compose(
            [transforms.Resize(round(image_size / 0.875)), transforms.CenterCrop(image_size), *normalize]
        )
        if self.augment:
            self.train_transform = transforms.Compose(
                [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), *normalize]
            )
        else:
            self.train_transform = self.eval_transform

    @property
    def classes(self) -> list[str]:
        """Class names: the sorted sub-folder names of ``root/train``.

        Raises:
            FileNotFoundError: If ``root/train`` has no class folders.
        """
        train = self.root / "train"
        names = sorted(e.name for e in os.scandir(train) if e.is_dir()) if train.is_dir() else []
        if not names:
            raise FileNotFoundError(
                f"No class folders found in {str(train)!r} (root={str(self.root)!r}): expected "
                "root/train/<class>/<image>.png|jpg (and optionally root/val/<class>/...)."
            )
        return names

    @property
    def num_classes(self) -> int:
        """Number of classes (sub-folders of ``root/train``); known before ``setup``."""
        return len(self.classes)

    def _open(self, split: str, transform: Callable[[Image.Image], Any]) -> datasets.ImageFolder:
        """Open ``root/<split>`` and check that its classes match the training folder's."""
        dataset = datasets.ImageFolder(self.root / split, transform=transform)
        if dataset.classes != self.classes:
            raise ValueError(
                f"The class folders of {str(self.root / split)!r} {dataset.classes} differ from those of "
                f"{str(self.root / 'train')!r} {self.classes}: give every split the same class folders."
            )
        return dataset

    def setup(self, stage: str | None = None) -> None:
        """Index the image files of the splits that ``stage`` needs.

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or ``None`` for all.

        Raises:
            FileNotFoundError: If ``root/train`` has no class folders or images.
            ValueError: If a split's class folders differ from the training folder's.
        """
        _ = self.classes  # fail early, with the layout in the message, when root/train is missing
        if self.val_dataset is None and (stage in _FIT_STAGES or not (self.root / "test").is_dir()):
            if (self.root / "val").is_dir():
                self.train_dataset = self._open("train", self.train_transform)
                self.val_dataset = self._open("val", self.eval_transform)
            else:
                train = self._open("train", self.train_transform)
                n = len(train)
                if n < 2:
                    raise ValueError(
                        f"{str(self.root / 'train')!r} has {n} image: at least 2 are needed to split off a "
                        "validation set. Add images, or a root/val folder."
                    )
                val_size = min(max(1, round(self.val_fraction * n)), n - 1)
                train_idx, val_idx = self._split_indices(n, val_size)
                self.train_dataset = Subset(train, train_idx)
                self.val_dataset = Subset(self._open("train", self.eval_transform), val_idx)
        if stage in _TEST_STAGES and self.test_dataset is None:
            if (self.root / "test").is_dir():
                self.test_dataset = self._open("test", self.eval_transform)
            else:
                self.test_dataset = self.val_dataset

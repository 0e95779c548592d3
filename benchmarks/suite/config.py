"""What the suite runs on: data sets, models, run settings, and a cache keyed by each run's configuration.

Every training run of the suite (a teacher, a technique at some bits and seed, a peer) is described by a plain
dictionary; its SHA-256 names the cached result, so a killed or repeated suite run re-trains nothing it finished,
and any change of a setting (epochs, learning rate, data subset, the teacher it starts from) trains again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_ROOT = ROOT.parent / "shared" / "data"
DEFAULT_CACHE = ROOT / "benchmarks" / ".cache"

MODELS = ("ResNet-8", "LeNet-5")
# teachers: float epochs (cosine schedule over them) and the test accuracy that counts as converged, per data set
# and model (our choices; MNIST's targets are the issue's, CIFAR-10's are what these small nets reach without
# augmentation)
TEACHERS = {
    "mnist": {"ResNet-8": (12, 0.993), "LeNet-5": (12, 0.990)},
    "digits": {"ResNet-8": (40, 0.97), "LeNet-5": (40, 0.97)},
    "cifar10": {"ResNet-8": (60, 0.80), "LeNet-5": (60, 0.60)},
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """One configuration of the suite (``--quick``, the full run, or the smoke test's toy run).

    Attributes:
        name: ``"full"``, ``"quick"`` or ``"toy"`` (goes into section titles, so runs of each kind coexist).
        dataset: ``"mnist"`` (28x28, local copy), ``"digits"`` (scikit-learn's 8x8 digits at 16x16) or ``"cifar10"``.
        models: the models every technique runs on.
        bits: the W=A widths of the technique comparison.
        seeds: seeds per setting (the seed changes the split, the data order and the fine-tune, not the teacher).
        teacher_epochs: float epochs of every teacher, instead of ``TEACHERS``' (the smoke test only).
        qat_epochs: epochs of every fine-tune (ours and the peers').
        qat_lr: Adam learning rate of every fine-tune (cosine schedule).
        train_subset: training images used (``None``: all).
        generator_steps: ZS-CGAN generator steps (trained once per seed, reused across widths).
        peer_seeds: seeds of the peer rows (the same seeds as ours, the first ``peer_seeds``).
        limit_batches: cap on batches per epoch everywhere (the smoke test only).
        val_size: training images held out for validation (MNIST, CIFAR-10; the digits split their own).
    """

    name: str
    dataset: str
    models: tuple[str, ...]
    bits: tuple[int, ...]
    seeds: int
    qat_epochs: int
    qat_lr: float = 1e-3
    train_subset: int | None = None
    generator_steps: int = 2000
    peer_seeds: int = 3
    limit_batches: int | None = None
    teacher_epochs: int | None = None
    val_size: int = 5000

    def teacher_plan(self, model: str) -> tuple[int, float]:
        """Float epochs of ``model``'s teacher and the test accuracy that counts as converged."""
        epochs, target = TEACHERS[self.dataset][model]
        return (self.teacher_epochs or epochs), target

    def run_key(self, uses_generator: bool = False) -> dict[str, Any]:
        """The settings that change a fine-tune's result (what its cache key holds besides model, bits, seed);
        ``generator_steps`` only for a run on generated data, so changing it re-trains only those."""
        # val_size is not a CLI option: a preset's is fixed, and only the toy preset (limit_batches) changes it
        names = ("dataset", "qat_epochs", "qat_lr", "train_subset", "limit_batches")
        names += ("generator_steps",) if uses_generator else ()
        return {name: getattr(self, name) for name in names}


PRESETS = {
    "full": Settings(
        name="full",
        dataset="mnist",
        models=("ResNet-8", "LeNet-5"),
        bits=(2, 3, 4),
        seeds=3,
        qat_epochs=1,
        train_subset=10_000,
        generator_steps=1000,
    ),
    "quick": Settings(
        name="quick",
        dataset="digits",
        models=("ResNet-8",),
        bits=(2, 4),
        seeds=2,
        qat_epochs=3,
        generator_steps=150,
        peer_seeds=2,
    ),
    "toy": Settings(
        name="toy",
        dataset="digits",
        models=("ResNet-8",),
        bits=(4,),
        seeds=1,
        qat_epochs=1,
        teacher_epochs=3,
        generator_steps=5,
        val_size=5,
        peer_seeds=1,
        limit_batches=4,
    ),
}


def input_size(dataset: str) -> int:
    """Image side of each data set as the suite feeds it."""
    return {"mnist": 28, "digits": 16, "cifar10": 32}[dataset]


def in_channels(dataset: str) -> int:
    return 3 if dataset == "cifar10" else 1


def backbone_factory(model: str, dataset: str) -> Callable[[], nn.Module]:
    """A function returning a fresh float backbone of ``model`` for ``dataset``."""
    from lightning_quant.models import LeNet5, resnet8

    channels, size = in_channels(dataset), input_size(dataset)
    if model == "ResNet-8":
        return lambda: resnet8(in_channels=channels, num_classes=10)
    if model == "LeNet-5":
        return lambda: LeNet5(in_channels=channels, num_classes=10, input_size=size)
    raise ValueError(f"`model` must be one of {MODELS}, got {model!r}.")


def datamodule_factory(settings: Settings, data_root: Path) -> Callable[[int], L.LightningDataModule]:
    """A function ``seed -> datamodule`` (the seed sets the train/validation split and the data order)."""
    from lightning_quant.datamodules import CIFAR10DataModule, DigitsDataModule, MNISTDataModule

    if settings.dataset == "digits":
        return lambda seed: DigitsDataModule(batch_size=64, image_size=16, seed=seed)
    if settings.dataset == "mnist":
        return lambda seed: MNISTDataModule(
            root=str(data_root),
            batch_size=128,
            val_size=settings.val_size,
            seed=seed,
            train_subset=settings.train_subset,
        )
    if settings.dataset == "cifar10":
        return lambda seed: CIFAR10DataModule(
            root=str(data_root),
            batch_size=128,
            val_size=settings.val_size,
            seed=seed,
            train_subset=settings.train_subset,
        )
    raise ValueError(f"`dataset` must be mnist, digits or cifar10, got {settings.dataset!r}.")


def trainer(
    settings: Settings, epochs: int, callbacks: list, workdir: Path, accelerator: str, max_steps: int = -1
) -> L.Trainer:
    """The one Trainer recipe of the suite: no logger, checkpoints or validation; ``accelerator`` as given."""
    from benchmarks.common import quiet_trainer

    limit = settings.limit_batches
    return quiet_trainer(
        epochs, callbacks, workdir, max_steps=max_steps, accelerator=accelerator, devices=1,
        limit_train_batches=limit, limit_test_batches=limit,
    )  # fmt: skip


class RunCache:
    """JSON results (and teacher weights) under ``root``, named by the hash of their configuration."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(config: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def path(self, config: dict[str, Any], suffix: str = ".json") -> Path:
        return self.root / f"{config.get('kind', 'run')}-{self.key(config)}{suffix}"

    def get(self, config: dict[str, Any]) -> dict[str, Any] | None:
        path = self.path(config)
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, config: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        path = self.path(config)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**result, "config": config}, indent=1, default=str))
        os.replace(tmp, path)
        return result

    def save_tensors(self, config: dict[str, Any], state: dict[str, torch.Tensor]) -> Path:
        path = self.path(config, ".pt")
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

"""LightningDataModules: vision data sets read from a local root (and, later, data-free generators)."""

from lightning_quant.datamodules.generator import ConditionalGenerator, GeneratorDataModule, GeneratorTrainer
from lightning_quant.datamodules.vision import (
    CIFAR10DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
)

__all__ = [
    "CIFAR10DataModule",
    "ConditionalGenerator",
    "DigitsDataModule",
    "GeneratorDataModule",
    "GeneratorTrainer",
    "ImageFolderDataModule",
    "MNISTDataModule",
]

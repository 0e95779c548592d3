"""Small reference models for examples, tests and benchmarks."""

from lightning_quant.models.classifier import ImageClassifier
from lightning_quant.models.lenet import LeNet5
from lightning_quant.models.resnet import CifarResNet, resnet8, resnet20

__all__ = ["CifarResNet", "ImageClassifier", "LeNet5", "resnet8", "resnet20"]

"""CIFAR-style residual networks (ResNet-8/20/32/...).

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2: a 3x3
stem and three stages of ``n`` basic blocks with 16, 32 and 64 channels (``6n + 2`` weighted layers).
Shortcuts are identities, or a 1x1 convolution + BatchNorm projection where the shape changes (the
paper's option B), so every layer is a plain ``Conv2d``/``Linear`` that quantizers can wrap.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "resnet8", "resnet20"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Residual block ``conv3x3-BN-ReLU-conv3x3-BN (+ shortcut) - ReLU``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution (and of the projection shortcut).

    Attributes:
        shortcut: ``nn.Identity`` when input and output shapes agree, otherwise
            ``nn.Sequential(Conv2d 1x1, BatchNorm2d)``.
        relu2: The ReLU applied after the residual addition.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Input feature map ``(N, in_channels, H, W)``.

        Returns:
            Output feature map ``(N, out_channels, ceil(H / stride), ceil(W / stride))``.
        """
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images with ``depth = 6n + 2`` layers (He et al. 2016, section 4.2).

    Layout: stem ``conv1``-``bn1``-``relu`` (3x3, ``width`` channels, stride 1), stages ``layer1``,
    ``layer2``, ``layer3`` of ``n`` :class:`BasicBlock` each with ``width``, ``2 * width`` and
    ``4 * width`` channels (stride 1, 2, 2), then ``avgpool`` (global), ``flatten`` and ``fc``.
    Global pooling makes it work for any input of at least 1x1 pixels: 32x32 CIFAR, 28x28 MNIST,
    8x8 digits. Convolutions use Kaiming-normal initialisation (fan-out, ReLU), BatchNorms start as
    identity.

    ResNet-20 with 3 input channels and 10 classes has 272,474 parameters (the paper's "0.27M").

    Args:
        depth: Number of weighted layers, ``6n + 2`` with ``n >= 1`` (8, 14, 20, 32, 44, 56, 110, ...).
        in_channels: Channels of the input images.
        num_classes: Number of output logits.
        width: Channels of the stem and of the first stage.

    Raises:
        ValueError: If ``depth`` is not of the form ``6n + 2`` or another argument is out of range.

    Example:
        >>> model = CifarResNet(depth=20)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"`depth` must be 6n + 2 (8, 14, 20, 32, 44, 56, 110, ...), got {depth!r}.")
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        self.depth = depth
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.width = width
        blocks_per_stage = (depth - 2) // 6

        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(width, width, blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(width, 2 * width, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(2 * width, 4 * width, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * width, num_classes)
        self._init_weights()

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        """Build one stage: the first block changes shape, the others keep it."""
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        """Kaiming-normal convolutions and linear layer, identity BatchNorms, zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute class logits.

        Args:
            x: Images ``(N, in_channels, H, W)``.

        Returns:
            Logits ``(N, num_classes)``.
        """
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def resnet20(**kwargs: Any) -> CifarResNet:
    """ResNet-20 (three blocks per stage, 0.27M parameters for CIFAR-10).

    Args:
        **kwargs: Forwarded to :class:`CifarResNet` (``in_channels``, ``num_classes``, ``width``).

    Returns:
        The model.
    """
    return CifarResNet(depth=20, **kwargs)


def resnet8(**kwargs: Any) -> CifarResNet:
    """ResNet-8 (one block per stage), a fast model for tests and examples.

    Args:
        **kwargs: Forwarded to :class:`CifarResNet` (``in_channels``, ``num_classes``, ``width``).

    Returns:
        The model.
    """
    return CifarResNet(depth=8, **kwargs)

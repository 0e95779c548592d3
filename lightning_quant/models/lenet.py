"""LeNet-5 for small grayscale (or colour) images.

LeCun et al., "Gradient-based learning applied to document recognition", Proc. IEEE 1998, with the
modern choices (ReLU, max pooling) that most reference implementations use.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LeNet5"]

#: Smallest ``input_size`` LeNet5 accepts: below it the second pooling stage would produce no pixels.
MIN_INPUT_SIZE = 4


def _conv2_padding(input_size: int) -> int:
    """Padding of ``conv2`` that keeps at least one pixel after the second pooling stage.

    With the classic ``padding=0`` the feature map after ``pool2`` is ``(input_size // 2 - 4) // 2``
    pixels wide, which needs ``input_size >= 12``. For smaller inputs (e.g. the 8x8 sklearn digits)
    the smallest padding that leaves a 2x2 map before ``pool2`` is used instead.

    Args:
        input_size: Height and width of the (square) input image.

    Returns:
        The padding of ``conv2``: 0 for ``input_size >= 12``, otherwise just enough.
    """
    after_pool1 = input_size // 2
    return max(0, math.ceil((6 - after_pool1) / 2))


class LeNet5(nn.Module):
    """LeNet-5: two conv/pool stages and three fully connected layers.

    ``conv1(in, 6, 5, padding=2) - ReLU - maxpool2 - conv2(6, 16, 5) - ReLU - maxpool2 - flatten -
    fc1(120) - ReLU - fc2(84) - ReLU - fc3(num_classes)``. Every activation is its own ``nn.ReLU``
    module so that hooks and quantizers can attach to each one.

    The width of ``fc1`` follows from ``input_size`` (400 inputs for 28x28 MNIST). For inputs smaller
    than 12 pixels ``conv2`` gets padding so that the feature map stays at least 1x1 (8x8 digits: 16
    features into ``fc1``).

    Args:
        in_channels: Channels of the input images (1 for MNIST/digits, 3 for CIFAR).
        num_classes: Number of output logits.
        input_size: Height and width of the square input images, at least 4.

    Raises:
        ValueError: If an argument is out of range.

    Example:
        >>> model = LeNet5(in_channels=1, num_classes=10, input_size=28)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> model.fc1.in_features
        400
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> None:
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"`in_channels` must be a positive integer, got {in_channels!r}.")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"`num_classes` must be a positive integer, got {num_classes!r}.")
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < MIN_INPUT_SIZE:
            raise ValueError(
                f"`input_size` must be an integer >= {MIN_INPUT_SIZE} (the smallest image LeNet5 can "
                f"pool twice), got {input_size!r}. Resize the images or use a larger `input_size`."
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.input_size = input_size

        pad2 = _conv2_padding(input_size)
        size = input_size // 2  # conv1 keeps the size (padding=2), pool1 halves it
        size = (size - 4 + 2 * pad2) // 2  # conv2 (kernel 5), pool2

        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5, padding=pad2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * size * size, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute class logits.

        Args:
            x: Images of shape ``(N, in_channels, input_size, input_size)``.

        Returns:
            Logits of shape ``(N, num_classes)``.
        """
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.flatten(x)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)

"""Small benchmark models. Each has a ``head`` attribute holding the output ``nn.Linear``.

Parameter names therefore start with ``body.`` (hidden layers) or ``head.`` (output layer), so
optimizers can route the output layer by name (e.g. to AdamW instead of an orthogonalized update).
No normalisation or dropout layers: every hidden weight is a plain 2-D (or conv) matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN"]


class MLP(nn.Module):
    """``Flatten -> [Linear(w_k) -> act] * K -> head Linear(num_classes)``.

    Args:
        in_features: flattened input size (784 for 28x28, 3072 for 32x32x3, 40 for MNIST-1D).
        widths: hidden widths, e.g. ``(256, 256)``; empty gives a linear (logistic) model.
        num_classes: output size.
        activation: activation module class.
        bias: whether the linear layers have biases.
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int] = (256, 256),
        num_classes: int = 10,
        activation: type[nn.Module] = nn.ReLU,
        bias: bool = True,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = int(in_features)
        for w in widths:
            layers += [nn.Linear(prev, int(w), bias=bias), activation()]
            prev = int(w)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class SmallCNN(nn.Module):
    """Two conv blocks, one hidden linear layer, then ``head``.

    ``[Conv3x3(c_k, pad 1) -> act -> MaxPool2] * len(channels) -> Flatten -> Linear(hidden) -> act
    -> head``. With the default two blocks a 28x28 input becomes 7x7 and a 32x32 input 8x8
    (``image_size // 2**len(channels)`` per side).

    Args:
        in_channels: 1 for (Fashion-)MNIST, 3 for CIFAR-10.
        num_classes: output size.
        image_size: input height = width (28, 32, 8 for digits...).
        channels: output channels of the conv blocks.
        hidden: width of the hidden linear layer.
        activation: activation module class.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        activation: type[nn.Module] = nn.ReLU,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        prev, size = int(in_channels), int(image_size)
        for c in channels:
            layers += [nn.Conv2d(prev, int(c), 3, padding=1), activation(), nn.MaxPool2d(2)]
            prev, size = int(c), size // 2
        if size < 1:
            raise ValueError(
                f"image_size {image_size} is too small for {len(channels)} pooling blocks"
            )
        layers += [nn.Flatten(), nn.Linear(prev * size * size, int(hidden)), activation()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(int(hidden), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

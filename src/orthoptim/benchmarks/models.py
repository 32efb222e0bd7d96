"""Small benchmark models. Each has a ``head`` attribute holding the output ``nn.Linear``.

Parameter names therefore start with ``body.`` (hidden layers) or ``head.`` (output layer), so
optimizers can route the output layer by name (e.g. to AdamW instead of an orthogonalized update).
:class:`MLP` and :class:`SmallCNN` have no normalisation or dropout layers: every hidden weight is
a plain 2-D (or conv) matrix. :class:`ResNet` is the CIFAR ResNet of He et al., "Deep Residual
Learning for Image Recognition" (CVPR 2016, arXiv:1512.03385, Sec. 4.2) and does use BatchNorm, as
in the paper (its gains and biases are 1-D, so ``param_groups`` sends them to AdamW).
:class:`ViT` is a small vision transformer (Dosovitskiy et al., ICLR 2021) built from
``nn.MultiheadAttention`` (inside ``nn.TransformerEncoderLayer``), LayerNorm and an MLP.

:func:`build_model` builds any of them by name (``"mlp"``, ``"cnn"``, ``"cnn-bn"``, ``"resnet8"``,
``"resnet20"``, ``"resnet<6n+2>"``, ``"vit"``) from an input shape and a class count.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "SmallCNN", "ResNet", "ViT", "build_model", "MODEL_NAMES"]

MODEL_NAMES = ("mlp", "cnn", "cnn-bn", "resnet8", "resnet20", "vit")


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
        batchnorm: a ``BatchNorm2d`` after each convolution (``"cnn-bn"``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        activation: type[nn.Module] = nn.ReLU,
        batchnorm: bool = False,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        prev, size = int(in_channels), int(image_size)
        for c in channels:
            layers.append(nn.Conv2d(prev, int(c), 3, padding=1))
            layers += [nn.BatchNorm2d(int(c))] if batchnorm else []
            layers += [activation(), nn.MaxPool2d(2)]
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


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut (He et al. 2016, CIFAR "option A").

    When the block halves the resolution and doubles the channels, the shortcut subsamples the
    input with stride 2 and zero-pads the new channels: option A of the paper's CIFAR experiments,
    which adds no parameters (so every weight matrix stays a conv of the residual branch).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.stride, self.pad = stride, out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            short = F.pad(short, (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + short)


class ResNet(nn.Module):
    """CIFAR ResNet with ``6n + 2`` weighted layers (He et al. 2016, Sec. 4.2).

    ``conv3x3(w) -> BN -> ReLU``, then three stages of ``n`` basic blocks with ``w, 2w, 4w``
    channels (the first block of stages 2 and 3 has stride 2), global average pooling and ``head``
    (``Linear(4w, num_classes)``). ``depth=20`` (``n=3``, 0.27M parameters at ``w=16``) is the
    paper's ResNet-20; ``depth=8`` (``n=1``) is the smallest member, used for quick CPU runs.

    Args:
        depth: ``6n + 2`` with ``n >= 1`` (8, 14, 20, 32, 44, 56, 110...).
        in_channels: input channels (3 for CIFAR-10, 1 for (Fashion-)MNIST).
        num_classes: output size.
        width: channels of the first stage (16 in the paper).
    """

    def __init__(
        self, depth: int = 20, in_channels: int = 3, num_classes: int = 10, width: int = 16
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"Invalid depth: {depth!r}; expected 6n + 2 with n >= 1 (8, 20, ...)")
        if width < 1:
            raise ValueError(f"Invalid width: {width!r}; must be >= 1")
        n = (depth - 2) // 6
        layers: list[nn.Module] = [
            nn.Conv2d(int(in_channels), width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        prev = width
        for stage in range(3):
            ch = width * 2**stage
            for i in range(n):
                layers.append(_BasicBlock(prev, ch, 2 if (stage > 0 and i == 0) else 1))
                prev = ch
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_classes)
        for m in self.modules():  # He init for convs, as in the paper
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ViT(nn.Module):
    """A small vision transformer (ViT, Dosovitskiy et al. 2021), pre-norm.

    ``Conv2d(patch, stride patch)`` patch embedding -> class token and learned positional
    embedding -> ``depth`` x ``nn.TransformerEncoderLayer`` (``nn.MultiheadAttention`` with
    ``heads`` heads, GELU MLP of width ``mlp``, ``norm_first``, no dropout) -> LayerNorm -> ``head``
    on the class token. Every weight matrix is a ``Conv2d``, ``nn.MultiheadAttention`` or
    ``nn.Linear`` (K-FAC / FOP precondition all of them); ``pos_embedding`` is a matrix used
    directly, listed in ``kfac_exclude`` (plain on purpose, see the benchmark registry).

    Args:
        in_channels, num_classes, image_size: the data.
        patch: patch side (``image_size`` must be a multiple).
        dim: embedding width. heads: attention heads. depth: encoder layers. mlp: MLP width.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 patch: int = 7, dim: int = 32, heads: int = 4, depth: int = 2,
                 mlp: int = 64):  # fmt: skip
        super().__init__()
        if image_size % patch != 0:
            raise ValueError(f"Invalid patch: {patch!r}; must divide image_size {image_size}")
        n = (image_size // patch) ** 2
        self.kfac_exclude = ("pos_embedding",)
        self.patch = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)  # fmt: skip
        self.body = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embedding
        return self.head(self.norm(self.body(h))[:, 0])


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    hidden: Sequence[int] = (256, 256),
    width: int | None = None,
) -> nn.Module:
    """Build a benchmark model by name.

    Args:
        name: ``"mlp"`` (:class:`MLP` with hidden widths ``hidden``), ``"cnn"`` (:class:`SmallCNN`
            with channels ``(width, 2 * width)``, default width 32, and linear width
            ``hidden[0]``; ``"cnn-bn"`` with BatchNorm), ``"resnet8"`` / ``"resnet20"`` /
            ``"resnet<6n+2>"`` (:class:`ResNet`,
            default width 16).
        input_shape: shape of one input, ``(C, H, W)`` for images (``(D,)`` for vectors: MLP
            only).
        num_classes: output size.
        hidden: MLP hidden widths (an empty sequence gives logistic regression); the CNN uses the
            first entry (128 if empty) as its hidden linear width.
        width: CNN first-block channels, ResNet first-stage channels or the ViT's embedding
            width (default 32; its MLP width is ``hidden[0]``, default twice the width; 2 layers,
            4 heads, 4x4 patches).
    """
    shape = tuple(int(s) for s in input_shape)
    if num_classes < 1:
        raise ValueError(f"Invalid num_classes: {num_classes!r}; must be >= 1")
    if name == "mlp":
        return MLP(math.prod(shape), tuple(hidden), num_classes)
    if name == "vit":
        if len(shape) != 3 or shape[1] != shape[2] or shape[1] % 4 != 0:
            raise ValueError(
                f"Invalid input_shape: {shape!r}; model 'vit' needs square (C, H, W) images with "
                "a side divisible by 4 (4x4 patches)"
            )
        w = 32 if width is None else int(width)
        mlp = int(hidden[0]) if len(hidden) else 2 * w
        return ViT(shape[0], num_classes, shape[1], shape[1] // 4, w, 4, 2, mlp)
    m = re.fullmatch(r"resnet(\d+)", name)
    if name in ("cnn", "cnn-bn") or m:
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ValueError(
                f"Invalid input_shape: {shape!r}; model {name!r} needs square (C, H, W) images"
            )
        if not m:
            w = 32 if width is None else int(width)
            h = int(hidden[0]) if len(hidden) else 128
            return SmallCNN(shape[0], num_classes, shape[1], (w, 2 * w), h,
                            batchnorm=name == "cnn-bn")  # fmt: skip
        return ResNet(int(m.group(1)), shape[0], num_classes, 16 if width is None else int(width))
    raise ValueError(f"Invalid model: {name!r}; expected one of {MODEL_NAMES} (or resnet<6n+2>)")

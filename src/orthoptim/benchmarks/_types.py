"""Dataset containers shared by the loaders."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["ImageDataset", "TextDataset", "images_to_tensor"]


@dataclass
class ImageDataset:
    """A classification dataset as tensors.

    Attributes:
        train_x, test_x: float32 inputs, ``(N, C, H, W)`` in ``[0, 1]`` for images.
        train_y, test_y: int64 labels in ``[0, num_classes)``.
        num_classes: number of classes ``C``.
        name: short identifier, e.g. ``"mnist"`` or ``"mnist-lt100"``.
        class_names: optional human-readable class names.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    name: str
    class_names: tuple[str, ...] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(1, 28, 28)``."""
        return tuple(self.train_x.shape[1:])

    def train_counts(self) -> np.ndarray:
        """Number of training examples per class, shape ``(num_classes,)``."""
        return np.bincount(self.train_y.cpu().numpy(), minlength=self.num_classes)


@dataclass
class TextDataset:
    """A character-level corpus: ``train``/``val`` are int64 token ids into ``vocab``.

    Attributes:
        train, val: 1-D int64 tensors of character ids.
        vocab: the sorted distinct characters; id ``i`` is ``vocab[i]``.
        name: short identifier.
    """

    train: torch.Tensor
    val: torch.Tensor
    vocab: str
    name: str
    _stoi: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        """Map a string to int64 ids (``KeyError`` for characters outside the vocabulary)."""
        if not self._stoi:
            self._stoi = {ch: i for i, ch in enumerate(self.vocab)}
        return torch.tensor([self._stoi[ch] for ch in text], dtype=torch.int64)

    def decode(self, ids) -> str:
        """Map ids (tensor or sequence of ints) back to a string."""
        return "".join(self.vocab[int(i)] for i in ids)


def images_to_tensor(a: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, C)`` -> float32 ``(N, C, H, W)`` in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return t.contiguous().to(torch.float32).div_(255.0)

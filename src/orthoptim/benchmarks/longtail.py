"""Long-tailed training sets: exponential imbalance profile (Cao et al., LDAM-DRW 2019).

The class at rank ``i`` (``i = 0..C-1``, rank 0 = head) keeps

    ``n_i = int(n_max * (1/rho) ** (i / (C - 1)))``

training examples, capped at what the class has; ``rho = n_max / n_min`` is the imbalance factor.
For C = 10, n_max = 5000, rho = 100 this gives 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50.
Which examples are kept is a seeded choice (local NumPy generator). The test set stays balanced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from ._types import ImageDataset

__all__ = ["longtail_counts", "make_longtail"]


def longtail_counts(n_max: int, num_classes: int, rho: float) -> list[int]:
    """``[int(n_max * (1/rho) ** (i / (C-1))) for i in range(C)]`` (all ``n_max`` when C = 1).

    Args:
        n_max: examples of the head class.
        num_classes: number of classes ``C``.
        rho: imbalance factor ``>= 1``.
    """
    if rho < 1:
        raise ValueError(f"Invalid rho: {rho!r}; must be >= 1")
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * (1.0 / rho) ** (i / (num_classes - 1))) for i in range(num_classes)]


def make_longtail(
    dataset: ImageDataset,
    rho: float,
    n_max: int | None = None,
    seed: int = 0,
    class_order: Sequence[int] | None = None,
) -> ImageDataset:
    """Subsample the training set of ``dataset`` to the exponential profile.

    Args:
        dataset: balanced (or nearly balanced) source dataset.
        rho: imbalance factor ``n_max / n_min`` (100, 50, 10 are usual).
        n_max: head-class count; default the largest class count. Each class is capped at its
            available count (MNIST classes hold 5421 to 6742 examples).
        seed: seed of the choice of kept examples.
        class_order: ``class_order[i]`` is the class at rank ``i`` (default ``0, 1, ..., C-1``, so
            class 0 is the head). Use a few random orders to separate "tail" from "hard" classes.

    Returns:
        A copy of ``dataset`` whose training set keeps, for each class, a seeded random subset in
        the original order; the test set is unchanged. Its name gets ``-lt<rho>``.
    """
    y = dataset.train_y.cpu().numpy()
    C = dataset.num_classes
    available = np.bincount(y, minlength=C)
    order = list(range(C)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(C)):
        raise ValueError(f"class_order must be a permutation of 0..{C - 1}, got {order}")
    counts = longtail_counts(int(available.max()) if n_max is None else int(n_max), C, rho)
    rng = np.random.default_rng(seed)
    keep = []
    for rank, c in enumerate(order):
        idx = np.flatnonzero(y == c)
        n = min(counts[rank], len(idx))
        keep.append(rng.choice(idx, size=n, replace=False))
    keep_idx = torch.from_numpy(np.sort(np.concatenate(keep)))
    return replace(
        dataset,
        train_x=dataset.train_x[keep_idx],
        train_y=dataset.train_y[keep_idx],
        name=f"{dataset.name}-lt{rho:g}",
    )

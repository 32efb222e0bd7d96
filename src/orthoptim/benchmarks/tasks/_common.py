"""Shared plumbing of the classification tasks: datasets by name, the evaluation split, models.

Evaluation split (``settings["eval_split"]``):

- ``"test"``: train on the (optionally subsampled) training set, evaluate on the test set.
- ``"val"``: hold out a stratified fraction ``val_frac`` of the TRAINING set (within each class a
  permutation from a fixed seed, :data:`SPLIT_SEED`, so every optimizer and run seed sees the same
  validation set), train on the rest and evaluate on the held-out part. The test set is not read
  at all, so tuning never sees it.

Subsets (``train_limit``, ``eval_limit``) are drawn after the split: the training subset from the
run's seed, the evaluation subset from :data:`SPLIT_SEED`, both stratified (``round(frac * n_c)``
per class, so the size is within a few examples of the limit); evaluation sets are therefore
identical across optimizers and seeds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import models
from .._types import ImageDataset
from ..data import load_image_dataset
from ..train import task_seed

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")
SPLIT_SEED = 20240607


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, data_dir: str | None) -> ImageDataset:
    # The suite runs many (task, optimizer, seed) runs in one process: decode each dataset once.
    # Tasks never modify the tensors (they index them, which copies).
    return load_image_dataset(name, data_dir)


def load_dataset(name: str, data_dir) -> ImageDataset:
    """The full dataset ``name`` (see :data:`DATASETS`); ``"digits"`` needs no ``data_dir``.

    Args:
        name: dataset name.
        data_dir: root data folder (``None`` only for ``"digits"``).
    """
    if name not in DATASETS:
        raise ValueError(f"Invalid dataset: {name!r}; expected one of {DATASETS}")
    if name != "digits" and data_dir is None:
        raise ValueError(
            f"Invalid data_dir: None; dataset {name!r} needs --data-dir (the folder holding "
            f"{name}/...); the tiny and quick presets use the embedded 'digits'"
        )
    return _load_cached(name, None if name == "digits" else str(Path(data_dir)))


def stratified_split(y: torch.Tensor, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..N-1`` into ``(rest, held)``: per class ``round(frac * n_c)`` are held.

    Args:
        y: ``(N,)`` int labels.
        frac: fraction of each class held out, in ``(0, 1)``.
        seed: seed of the per-class permutations (local NumPy generator).

    Returns:
        Two sorted int64 index arrays, disjoint, together ``0..N-1``.
    """
    if not 0.0 < float(frac) < 1.0:
        raise ValueError(f"Invalid val_frac: {frac!r}; must lie in (0, 1)")
    yy = y.cpu().numpy()
    rng = np.random.default_rng(seed)
    held = np.zeros(len(yy), dtype=bool)
    for c in np.unique(yy):
        idx = np.flatnonzero(yy == c)
        held[rng.permutation(idx)[: int(round(frac * len(idx)))]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def _stratified_subset(y: torch.Tensor, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a class-stratified subset of about ``n`` examples (all if None)."""
    if n is None or n >= len(y):
        return np.arange(len(y))
    if n < 1:
        raise ValueError(f"Invalid subset size: {n!r}; must be >= 1 (or null for all)")
    _, held = stratified_split(y, n / len(y), seed)
    return held


@dataclass
class Prepared:
    """The data of one run.

    Attributes:
        data: ``train_*`` = what is trained on, ``test_*`` = what is evaluated on (the test set
            or the validation part of the training set).
        train_index: indices of ``data.train_x`` rows in the source TRAINING set.
        eval_index: indices of the evaluation rows in their source set (``eval_source``).
        eval_source: ``"test"`` or ``"train"`` (validation rows come from the training set).
    """

    data: ImageDataset
    train_index: np.ndarray
    eval_index: np.ndarray
    eval_source: str


def prepare(settings: dict[str, Any], data_dir, seed: int) -> Prepared:
    """Load ``settings["dataset"]`` and cut it per the module docstring.

    Reads ``dataset``, ``eval_split``, ``val_frac``, ``train_limit``, ``eval_limit`` from
    ``settings``.

    Args:
        settings: the task settings.
        data_dir: root data folder.
        seed: the run's seed (draws the training subset).
    """
    ds = load_dataset(settings["dataset"], data_dir)
    split = settings["eval_split"]
    if split == "val":
        tr, ev = stratified_split(ds.train_y, settings["val_frac"], SPLIT_SEED)
        ex, ey, source = ds.train_x, ds.train_y, "train"
    elif split == "test":
        tr, ev = np.arange(len(ds.train_y)), np.arange(len(ds.test_y))
        ex, ey, source = ds.test_x, ds.test_y, "test"
    else:
        raise ValueError(f"Invalid eval_split: {split!r}; expected 'test' or 'val'")
    tr = tr[_stratified_subset(ds.train_y[tr], settings["train_limit"], task_seed(seed, 7919))]
    ev = ev[_stratified_subset(ey[ev], settings["eval_limit"], SPLIT_SEED)]
    ti, ei = torch.from_numpy(tr), torch.from_numpy(ev)
    data = replace(ds, train_x=ds.train_x[ti], train_y=ds.train_y[ti], test_x=ex[ei], test_y=ey[ei])
    return Prepared(data, tr, ev, source)


def model_fn(settings: dict[str, Any], data: ImageDataset):
    """``() -> nn.Module`` for ``settings["model"]`` (and ``hidden``, ``width``) on ``data``."""
    name = settings["model"]
    input_shape, num_classes = data.input_shape, data.num_classes
    # Build once now so an unknown name fails before any training, naming the value.
    models.build_model(name, input_shape, num_classes, hidden=settings["hidden"],
                       width=settings["width"])  # fmt: skip

    def build():
        return models.build_model(
            name, input_shape, num_classes, hidden=settings["hidden"], width=settings["width"]
        )

    return build


def check_positive(settings: dict[str, Any], *keys: str) -> None:
    """ValueError naming the setting unless each ``settings[k]`` is a positive number."""
    for k in keys:
        v = settings[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"Invalid {k}: {v!r}; must be a positive number")


def loss_curve(losses: list[float]) -> dict[str, Any]:
    """The ``train_loss`` curve: per-step loss against the global step (from 1)."""
    return {
        "x": list(range(1, len(losses) + 1)),
        "y": [float(v) for v in losses],
        "xlabel": "step",
        "ylabel": "train loss",
    }


def progress_callback(progress):
    """A :func:`~orthoptim.benchmarks.train.train` callback advancing ``progress`` per step."""

    def cb(step, loss, model, optimizer):
        progress.advance(1)
        return None

    return cb


COMMON_DATA = {"val_frac": 0.1, "hidden": [256, 256], "width": None}

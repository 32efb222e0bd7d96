"""Offline dataset loaders returning plain tensors.

Every loader takes the ``data_dir`` that holds one sub-folder per dataset (the layout of the
project's shared data folder)::

    <data_dir>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    <data_dir>/fashion_mnist/...                      (same names)
    <data_dir>/mnist1d/mnist1d_data.pkl
    <data_dir>/cifar10_jpeg/cifar10_jpeg_q75.zip      ({train,test}/<class>/NNNN.jpg)
    <data_dir>/tinyshakespeare/input.txt

Nothing here hard-codes a location. When a sub-folder holds a ``SOURCES.md`` listing a file's
sha256, the file is verified before use (``verify=False`` skips it). Missing, mismatched or
undecodable files raise a :class:`~orthoptim.benchmarks._verify.DataError` subclass naming the path
and the fix.

Image datasets come back as :class:`ImageDataset`: ``float32`` inputs in ``[0, 1]`` shaped
``(N, C, H, W)`` (MNIST-1D: ``(N, 40)`` unscaled float32 signals) and ``int64`` labels. Text corpora
come back as :class:`TextDataset` (character vocabulary, ``int64`` token ids, 90/10 split).

Fallbacks needing neither downloads nor a data directory: :func:`load_digits` (scikit-learn's 8x8
digits, 1797 samples) and :func:`load_stdlib_text` (source text of a few standard-library modules).
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from ._types import ImageDataset, TextDataset, images_to_tensor
from ._verify import (
    ChecksumError,
    CorruptDataError,
    DataError,
    DataFileNotFoundError,
    parse_sources_md,
    require_file,
    sha256_file,
    verify_file,
)
from .cifar import CIFAR10_CLASSES, load_cifar10

__all__ = [
    "ImageDataset",
    "TextDataset",
    "read_idx",
    "load_idx_dataset",
    "load_mnist",
    "load_fashion_mnist",
    "load_mnist1d",
    "load_cifar10",
    "CIFAR10_CLASSES",
    "load_text",
    "load_tiny_shakespeare",
    "load_digits",
    "load_stdlib_text",
    "load_image_dataset",
    "DataError",
    "DataFileNotFoundError",
    "ChecksumError",
    "CorruptDataError",
    "parse_sources_md",
    "sha256_file",
    "verify_file",
]

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}


def _hint(sub: str, name: str) -> str:
    return (
        f"Put the {name} files in {sub}/ (names and checksums in that folder's SOURCES.md in the "
        "project's shared data), pass the right data_dir, or use load_digits() for a tiny "
        "offline stand-in"
    )


def read_idx(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """Read a (gzip-compressed or raw) IDX file into a NumPy array.

    IDX header: two zero bytes, a type code (``0x08`` = uint8, ...), the number of dimensions
    ``d``, then ``d`` big-endian uint32 sizes, then the data in C order.

    Args:
        path: ``*.gz`` (decompressed on the fly) or a raw IDX file.
        limit: read only the first ``limit`` items along the first axis (faster for tests).

    Raises:
        DataFileNotFoundError: the file is missing.
        CorruptDataError: bad gzip stream, bad magic, or fewer bytes than the header announces.
    """
    p = require_file(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            head = f.read(4)
            if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
                raise CorruptDataError(f"not an IDX file (bad magic {head!r}): {p}")
            ndim = head[3]
            dims = list(struct.unpack(f">{ndim}I", f.read(4 * ndim)))
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            if limit is not None:
                dims[0] = min(dims[0], int(limit))
            count = int(np.prod(dims))
            buf = f.read(count * dtype.itemsize)
    except (OSError, EOFError, struct.error) as e:
        raise CorruptDataError(
            f"cannot decode {p} ({type(e).__name__}: {e}); the file is truncated or corrupt, "
            "copy it again"
        ) from e
    if len(buf) != count * dtype.itemsize:
        raise CorruptDataError(
            f"truncated IDX file {p}: expected {count * dtype.itemsize} data bytes, got "
            f"{len(buf)}; copy it again"
        )
    return np.frombuffer(buf, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def load_idx_dataset(
    folder: str | os.PathLike,
    name: str,
    num_classes: int = 10,
    limit: int | None = None,
    verify: bool = True,
) -> ImageDataset:
    """Load the four standard IDX gzip files from ``folder`` (MNIST layout).

    Args:
        folder: the folder holding ``train-images-idx3-ubyte.gz`` etc.
        name: dataset name stored in the result.
        num_classes: number of classes.
        limit: keep only the first ``limit`` train and test items.
        verify: check sha256 against ``folder/SOURCES.md`` when present.
    """
    folder = Path(folder)
    arrays = {}
    for key, fname in _IDX_NAMES.items():
        path = require_file(folder / fname, _hint(str(folder), name))
        if verify:
            verify_file(path)
        arrays[key] = read_idx(path, limit)
    for split in ("train", "test"):
        nx, ny = len(arrays[f"{split}_x"]), len(arrays[f"{split}_y"])
        if nx != ny:
            raise CorruptDataError(f"{folder}: {split} has {nx} images but {ny} labels")
    return ImageDataset(
        train_x=images_to_tensor(arrays["train_x"]),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=images_to_tensor(arrays["test_x"]),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        num_classes=num_classes,
        name=name,
    )


def load_mnist(data_dir, limit: int | None = None, verify: bool = True) -> ImageDataset:
    """MNIST, ``<data_dir>/mnist/``: 60k/10k ``(N, 1, 28, 28)``; see :func:`load_idx_dataset`."""
    return load_idx_dataset(Path(data_dir) / "mnist", "mnist", 10, limit, verify)


def load_fashion_mnist(data_dir, limit: int | None = None, verify: bool = True) -> ImageDataset:
    """Fashion-MNIST from ``<data_dir>/fashion_mnist/`` (same layout and args as MNIST)."""
    return load_idx_dataset(Path(data_dir) / "fashion_mnist", "fashion_mnist", 10, limit, verify)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only resolves NumPy globals (MNIST-1D references nothing else)."""

    def find_class(self, module, name):
        if module.split(".")[0] == "numpy" or (module, name) == ("builtins", "dict"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def load_mnist1d(data_dir, verify: bool = True) -> ImageDataset:
    """MNIST-1D frozen split from ``<data_dir>/mnist1d/mnist1d_data.pkl``: 4000/1000, 40-dim.

    Inputs are returned unscaled as float32 ``(N, 40)`` (the signals are not images in [0, 1]).
    The pickle is read with an unpickler that only resolves NumPy globals.

    Args:
        data_dir: root data folder.
        verify: check sha256 against ``SOURCES.md`` when present.
    """
    path = require_file(
        Path(data_dir) / "mnist1d" / "mnist1d_data.pkl", _hint("mnist1d", "MNIST-1D")
    )
    if verify:
        verify_file(path)
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(f).load()
        arrays = [np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise CorruptDataError(
            f"cannot read MNIST-1D pickle {path} ({type(e).__name__}: {e}); expected a dict with "
            "x, y, x_test, y_test; copy the file again"
        ) from e
    x, y, xt, yt = arrays
    y, yt = y.astype(np.int64), yt.astype(np.int64)
    return ImageDataset(
        train_x=torch.from_numpy(x.astype(np.float32)),
        train_y=torch.from_numpy(y),
        test_x=torch.from_numpy(xt.astype(np.float32)),
        test_y=torch.from_numpy(yt),
        num_classes=int(max(y.max(), yt.max())) + 1,
        name="mnist1d",
    )


def _split_text(text: str, name: str, train_frac: float) -> TextDataset:
    if not 0.0 < train_frac <= 1.0:
        raise ValueError(f"Invalid train_frac: {train_frac!r}; must lie in (0, 1]")
    vocab = "".join(sorted(set(text)))
    stoi = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([stoi[ch] for ch in text], dtype=torch.int64)
    n = int(len(ids) * train_frac)
    return TextDataset(train=ids[:n], val=ids[n:], vocab=vocab, name=name, _stoi=stoi)


def load_text(
    path: str | os.PathLike, name: str | None = None, train_frac: float = 0.9, verify: bool = True
) -> TextDataset:
    """Character-level corpus from a UTF-8 text file, split as nanoGPT does.

    ``train = ids[: int(n * train_frac)]``, ``val = ids[int(n * train_frac):]``, with the vocabulary
    the sorted set of characters of the whole file.

    Args:
        path: the text file.
        name: dataset name (default: the file stem).
        train_frac: fraction of characters used for training (0.9 = nanoGPT's 90/10 split).
        verify: check sha256 against a ``SOURCES.md`` next to the file when present.
    """
    p = require_file(path)
    if verify:
        verify_file(p)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorruptDataError(f"{p} is not valid UTF-8 text ({e}); copy it again") from e
    return _split_text(text, name or p.stem, train_frac)


def load_tiny_shakespeare(data_dir, train_frac: float = 0.9, verify: bool = True) -> TextDataset:
    """Tiny Shakespeare, ``<data_dir>/tinyshakespeare/input.txt``: 65 chars, 1,003,854/111,540."""
    path = require_file(
        Path(data_dir) / "tinyshakespeare" / "input.txt",
        _hint("tinyshakespeare", "Tiny Shakespeare"),
    )
    return load_text(path, "tinyshakespeare", train_frac, verify)


def load_digits(test_frac: float = 0.2, seed: int = 0) -> ImageDataset:
    """scikit-learn's 8x8 digits (1797 samples, 10 classes) as a tiny offline image dataset.

    Pixels (0..16) are scaled to [0, 1] and shaped ``(N, 1, 8, 8)``. The split is stratified:
    within each class a seeded permutation puts ``round(test_frac * n_c)`` examples in the test
    set; both sets keep the original order otherwise.

    Args:
        test_frac: fraction of each class held out for testing.
        seed: seed of the split (a local NumPy generator; global RNGs untouched).
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    d = _sk_load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[rng.permutation(idx)[: int(round(test_frac * len(idx)))]] = True
    return ImageDataset(
        train_x=torch.from_numpy(x[~test]),
        train_y=torch.from_numpy(y[~test]),
        test_x=torch.from_numpy(x[test]),
        test_y=torch.from_numpy(y[test]),
        num_classes=10,
        name="digits",
    )


DEFAULT_STDLIB_MODULES = ("argparse", "json.decoder", "csv", "textwrap", "string", "fractions")


def load_stdlib_text(
    modules: tuple[str, ...] = DEFAULT_STDLIB_MODULES, train_frac: float = 0.9
) -> TextDataset:
    """A tiny offline text corpus: the concatenated source files of standard-library modules.

    The text depends on the Python version (the sources change between releases), so use it for
    smoke tests, not for numbers to compare across machines.

    Args:
        modules: importable pure-Python module names, concatenated in this order.
        train_frac: train fraction of the character split (see :func:`load_text`).
    """
    return _split_text(stdlib_source_text(modules), "stdlib-text", train_frac)


def stdlib_source_text(modules: tuple[str, ...] = DEFAULT_STDLIB_MODULES) -> str:
    """The source files of the standard-library ``modules``, concatenated with newlines."""
    parts = []
    for m in modules:
        src = inspect.getsourcefile(importlib.import_module(m))
        if src is None:
            raise ValueError(f"module {m!r} has no Python source file")
        parts.append(Path(src).read_text(encoding="utf-8"))
    return "\n".join(parts)


def load_image_dataset(name: str, data_dir=None, **kwargs) -> ImageDataset:
    """Load an image dataset by name.

    Args:
        name: ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, ``"mnist1d"`` (need ``data_dir``)
            or ``"digits"`` (embedded, ignores ``data_dir``).
        data_dir: root data folder.
        **kwargs: forwarded to the loader (``limit``, ``verify``, ``cache_dir``...).
    """
    if name == "digits":
        return load_digits(**kwargs)
    loaders = {
        "mnist": load_mnist,
        "fashion_mnist": load_fashion_mnist,
        "cifar10": load_cifar10,
        "mnist1d": load_mnist1d,
    }
    if name not in loaders:
        raise ValueError(f"Invalid name: {name!r}; expected one of {('digits', *loaders)}")
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs data_dir (the folder holding {name}/...)")
    return loaders[name](data_dir, **kwargs)

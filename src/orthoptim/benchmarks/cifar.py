"""CIFAR-10 from the project's JPEG zip or from the torchvision / original python layout.

:func:`load_cifar10` reads whichever layout ``data_dir`` holds (JPEG zip first):

1. ``<data_dir>/cifar10_jpeg/cifar10_jpeg_q75.zip`` (the project's shared copy; below), or
2. ``<data_dir>/cifar-10-batches-py/`` (also accepted: ``<data_dir>/cifar10/cifar-10-batches-py/``
   or ``data_dir`` being that folder): the original python release (Krizhevsky 2009, "Learning
   Multiple Layers of Features from Tiny Images"; what ``torchvision.datasets.CIFAR10`` downloads).
   Files ``data_batch_1`` .. ``data_batch_5`` (10,000 images each) and ``test_batch``, each a
   pickled dict with ``b"data"``: ``(N, 3072)`` uint8 (1024 red, then 1024 green, then 1024 blue
   values, rows in C order) and ``b"labels"``: N ints. Read by :func:`load_cifar10_batches` with an
   unpickler that resolves no global except NumPy's array reconstruction, so a crafted file cannot
   run code. Lossless, in the release's (interleaved) order.

JPEG zip:

Zip layout: ``train/<class>/NNNN.jpg`` (5000 per class) and ``test/<class>/NNNN.jpg`` (1000 per
class), 32x32 RGB JPEG (quality 75, so slightly lossy), classes in CIFAR-10 label order
(:data:`CIFAR10_CLASSES`). Images are returned class-major: all of class 0 in file-number order,
then class 1, ... (the zip carries no interleaved order; training loops shuffle anyway).

Decoding needs Pillow (``pip install orthoptim[bench]``), imported only when a decode is needed.
The decoded uint8 arrays are cached as
``<cache_dir>/cifar10_jpeg_<sha16>_{train,test}_{x,y}.npy`` where ``sha16`` is the first 16 hex
digits of the zip's sha256, so a changed zip never reuses a stale cache.
``cache_dir`` defaults to ``$ORTHOPTIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/orthoptim``, else
``~/.cache/orthoptim``.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from ._types import ImageDataset, images_to_tensor
from ._verify import (
    CorruptDataError,
    DataFileNotFoundError,
    require_file,
    sha256_file,
    verify_file,
)

__all__ = [
    "CIFAR10_CLASSES",
    "default_cache_dir",
    "decode_cifar10_zip",
    "find_cifar10_batches_dir",
    "load_cifar10_batches",
    "load_cifar10",
]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
ZIP_NAME = "cifar10_jpeg_q75.zip"
_MEMBER = re.compile(r"^(train|test)/([a-z]+)/(\d+)\.jpe?g$")
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
# The batches are pickled by Python 2 cPickle: plain dicts, lists, bytes and (in some re-saved
# copies, or Python 3 re-saves) NumPy arrays. Nothing else may be resolved.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5 arrays
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "dict"),
    ("builtins", "list"),
    # Python 3 pickles bytes as _codecs.encode(str, "latin1") at protocol <= 2; a pure function
    ("_codecs", "encode"),
}


def default_cache_dir() -> Path:
    """``$ORTHOPTIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/orthoptim``, else ``~/.cache/orthoptim``."""
    if os.environ.get("ORTHOPTIM_CACHE_DIR"):
        return Path(os.environ["ORTHOPTIM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "orthoptim"


def _import_pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "decoding the CIFAR-10 JPEG zip needs Pillow: pip install pillow "
            "(or pip install 'orthoptim[bench]')"
        ) from e
    return Image


def decode_cifar10_zip(
    path: str | os.PathLike, limit_per_class: int | None = None
) -> dict[str, np.ndarray]:
    """Decode the JPEG zip into uint8 arrays.

    Args:
        path: the zip file.
        limit_per_class: decode only the first ``limit_per_class`` images of each class and split.

    Returns:
        ``{"train_x": (N, 32, 32, 3) uint8, "train_y": (N,) int64, "test_x": ..., "test_y": ...}``.

    Raises:
        CorruptDataError: not a zip, an unknown class folder, a split with no images, or an image
            that does not decode to 32x32 RGB.
    """
    Image = _import_pil()
    p = require_file(path)
    label_of = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    try:
        with zipfile.ZipFile(p) as zf:
            entries: dict[str, list[tuple[int, int, str]]] = {"train": [], "test": []}
            for name in zf.namelist():
                m = _MEMBER.match(name)
                if m is None:
                    continue
                split, cls, num = m.groups()
                if cls not in label_of:
                    raise CorruptDataError(f"{p}: unknown class folder in member {name!r}")
                entries[split].append((label_of[cls], int(num), name))
            out: dict[str, np.ndarray] = {}
            for split, items in entries.items():
                if not items:
                    raise CorruptDataError(f"{p}: no {split}/<class>/NNNN.jpg members")
                items.sort()
                if limit_per_class is not None:
                    seen: dict[int, int] = {}
                    kept = []
                    for it in items:
                        if seen.get(it[0], 0) < limit_per_class:
                            seen[it[0]] = seen.get(it[0], 0) + 1
                            kept.append(it)
                    items = kept
                xs = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
                for k, (_, _, name) in enumerate(items):
                    with Image.open(io.BytesIO(zf.read(name))) as im:
                        a = np.asarray(im.convert("RGB"))
                    if a.shape != (32, 32, 3):
                        raise CorruptDataError(
                            f"{p}: {name} decodes to shape {a.shape}, not 32x32x3"
                        )
                    xs[k] = a
                out[f"{split}_x"] = xs
                out[f"{split}_y"] = np.array([it[0] for it in items], dtype=np.int64)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CorruptDataError(
            f"cannot decode {p} ({type(e).__name__}: {e}); the zip is truncated or corrupt, "
            "copy it again"
        ) from e
    return out


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler resolving only NumPy array reconstruction and builtin containers."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> ``(N, 32, 32, 3)`` uint8 images and ``(N,)`` int64 labels."""
    fix = "copy the file again (or download a fresh cifar-10-python.tar.gz and extract it)"
    try:
        with open(path, "rb") as f:
            # encoding="bytes" (as on the CIFAR page) reads the Python-2 str keys as bytes
            d = _BatchUnpickler(f, encoding="bytes").load()
        if not isinstance(d, dict):
            raise TypeError(f"expected a dict, got {type(d).__name__}")
        data = np.asarray(d[b"data"] if b"data" in d else d["data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"] if b"labels" in d else d["labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, OSError) as e:
        raise CorruptDataError(
            f"cannot read CIFAR-10 batch {path} ({type(e).__name__}: {e}); expected a pickled dict "
            f"with b'data' (N x 3072 uint8) and b'labels'; {fix}"
        ) from e
    if data.ndim != 2 or data.shape[1] != 3072:
        raise CorruptDataError(f"{path}: b'data' has shape {data.shape}, expected (N, 3072); {fix}")
    if labels.shape != (data.shape[0],):
        raise CorruptDataError(f"{path}: {data.shape[0]} images but {labels.size} labels; {fix}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise CorruptDataError(f"{path}: labels outside 0..9; {fix}")
    # rows are R(1024) G(1024) B(1024), each 32x32 in C order -> (N, 3, 32, 32) -> NHWC
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def find_cifar10_batches_dir(data_dir) -> Path | None:
    """The ``cifar-10-batches-py`` folder under ``data_dir`` (see module docstring), or None.

    Args:
        data_dir: root data folder, its ``cifar10/`` sub-folder's parent, or the batches folder.
    """
    root = Path(data_dir)
    for cand in (root / BATCHES_DIR, root / "cifar10" / BATCHES_DIR, root):
        if (cand / TEST_BATCH).exists() or any((cand / b).exists() for b in TRAIN_BATCHES):
            return cand
    return None


def load_cifar10_batches(folder, limit: int | None = None) -> dict[str, np.ndarray]:
    """Read the python-pickle CIFAR-10 batches of ``folder`` (torchvision layout).

    Args:
        folder: the ``cifar-10-batches-py`` folder.
        limit: keep only the first ``limit`` train and test images (quick tests).

    Returns:
        ``{"train_x": (N, 32, 32, 3) uint8, "train_y": (N,) int64, "test_x": ..., "test_y": ...}``.

    Raises:
        DataFileNotFoundError: a batch file is missing (names the path and how to get it).
        CorruptDataError: a file is not a pickled CIFAR batch, or refers to forbidden globals.
    """
    folder = Path(folder)
    hint = (
        f"Extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html, or "
        f"torchvision.datasets.CIFAR10(root, download=True)) so that {folder} holds "
        f"{', '.join(TRAIN_BATCHES)} and {TEST_BATCH}"
    )
    out: dict[str, np.ndarray] = {}
    for split, names in (("train", TRAIN_BATCHES), ("test", (TEST_BATCH,))):
        xs, ys = [], []
        for name in names:
            x, y = _read_batch(require_file(folder / name, hint))
            xs.append(x)
            ys.append(y)
        out[f"{split}_x"] = np.concatenate(xs)[:limit]
        out[f"{split}_y"] = np.concatenate(ys)[:limit]
    return out


def _save_atomic(path: Path, a: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, a)
    os.replace(tmp, path)


def load_cifar10(
    data_dir,
    cache_dir: str | os.PathLike | None = None,
    limit_per_class: int | None = None,
    verify: bool = True,
) -> ImageDataset:
    """CIFAR-10: 50k/10k images, float32 ``(N, 3, 32, 32)`` in [0, 1], from either layout.

    The JPEG zip is used when present; otherwise the torchvision ``cifar-10-batches-py`` folder
    (see the module docstring for both layouts).

    Args:
        data_dir: root data folder holding ``cifar10_jpeg/cifar10_jpeg_q75.zip`` or
            ``cifar-10-batches-py/``.
        cache_dir: where the decoded ``.npy`` cache of the zip lives (see module docstring).
        limit_per_class: zip: decode only this many images per class and split, without caching;
            batches: keep the first ``10 * limit_per_class`` images of each split (quick tests).
        verify: zip: check sha256 against ``cifar10_jpeg/SOURCES.md`` when present (the batches
            folder carries no checksums; its files are validated structurally).
    """
    if limit_per_class is not None and int(limit_per_class) < 1:
        raise ValueError(f"Invalid limit_per_class: {limit_per_class!r}; must be >= 1")
    zip_path = Path(data_dir) / "cifar10_jpeg" / ZIP_NAME
    if not zip_path.exists():
        batches = find_cifar10_batches_dir(data_dir)
        if batches is not None:
            limit = None if limit_per_class is None else 10 * int(limit_per_class)
            arrays = load_cifar10_batches(batches, limit)
            return _to_dataset(arrays)
        raise DataFileNotFoundError(
            f"no CIFAR-10 under {data_dir}: expected {zip_path} or "
            f"{Path(data_dir) / BATCHES_DIR}/ (data_batch_1..5, test_batch). Put "
            "cifar10_jpeg_q75.zip in cifar10_jpeg/ (see its SOURCES.md in the project's shared "
            "data), extract the torchvision cifar-10-python.tar.gz there, or pass the right "
            "data_dir"
        )
    path = require_file(zip_path)
    if verify:
        verify_file(path)
    if limit_per_class is not None:
        arrays = decode_cifar10_zip(path, limit_per_class)
    else:
        cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        stem = f"cifar10_jpeg_{sha256_file(path)[:16]}"
        files = {k: cdir / f"{stem}_{k}.npy" for k in ("train_x", "train_y", "test_x", "test_y")}
        arrays = None
        if all(f.is_file() for f in files.values()):
            try:
                arrays = {k: np.load(f) for k, f in files.items()}
            except (OSError, ValueError):
                arrays = None  # damaged cache: decode again and overwrite
        if arrays is None:
            arrays = decode_cifar10_zip(path)
            cdir.mkdir(parents=True, exist_ok=True)
            for k, f in files.items():
                _save_atomic(f, arrays[k])
    return _to_dataset(arrays)


def _to_dataset(arrays: dict[str, np.ndarray]) -> ImageDataset:
    return ImageDataset(
        train_x=images_to_tensor(arrays["train_x"]),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=images_to_tensor(arrays["test_x"]),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        num_classes=10,
        name="cifar10",
        class_names=CIFAR10_CLASSES,
    )

"""CIFAR-10 from ``<data_dir>/cifar10_jpeg/cifar10_jpeg_q75.zip``, decoded once, cached as ``.npy``.

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
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from ._types import ImageDataset, images_to_tensor
from ._verify import CorruptDataError, require_file, sha256_file, verify_file

__all__ = ["CIFAR10_CLASSES", "default_cache_dir", "decode_cifar10_zip", "load_cifar10"]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
ZIP_NAME = "cifar10_jpeg_q75.zip"
_MEMBER = re.compile(r"^(train|test)/([a-z]+)/(\d+)\.jpe?g$")


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
    """CIFAR-10 (JPEG q75 copy): 50k/10k images, float32 ``(N, 3, 32, 32)`` in [0, 1].

    Args:
        data_dir: root data folder holding ``cifar10_jpeg/cifar10_jpeg_q75.zip``.
        cache_dir: where the decoded ``.npy`` cache lives (see module docstring for the default).
        limit_per_class: decode only this many images per class and split, without caching
            (quick tests).
        verify: check sha256 against ``cifar10_jpeg/SOURCES.md`` when present.
    """
    path = require_file(
        Path(data_dir) / "cifar10_jpeg" / ZIP_NAME,
        "Put cifar10_jpeg_q75.zip in cifar10_jpeg/ (see its SOURCES.md in the project's shared "
        "data) or pass the right data_dir",
    )
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
    return ImageDataset(
        train_x=images_to_tensor(arrays["train_x"]),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=images_to_tensor(arrays["test_x"]),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        num_classes=10,
        name="cifar10",
        class_names=CIFAR10_CLASSES,
    )

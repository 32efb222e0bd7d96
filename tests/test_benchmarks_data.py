"""Dataset loaders on small fabricated files in the real formats (plus an optional real check)."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from orthoptim.benchmarks import cifar, data
from orthoptim.benchmarks.data import (
    ChecksumError,
    CorruptDataError,
    DataError,
    DataFileNotFoundError,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_idx_gz(path: Path, a: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    path.write_bytes(gzip.compress(header + a.astype(np.uint8).tobytes()))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_sources(folder: Path, files: dict[str, str]) -> None:
    rows = "\n".join(
        f"| `{n}` | {(folder / n).stat().st_size:,} | {h} | original |" for n, h in files.items()
    )
    text = "# Fake\n\n| file | bytes | sha256 | origin |\n|---|---|---|---|\n" + rows + "\n"
    (folder / "SOURCES.md").write_text(text)


@pytest.fixture
def mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "mnist"
    folder.mkdir()
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (5, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.array([5, 0, 4, 1, 9]),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (3, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.array([7, 2, 1]),
    }
    for name, a in arrays.items():
        write_idx_gz(folder / name, a)
    return tmp_path, arrays


def test_idx_loader(mnist_dir):
    root, arrays = mnist_dir
    d = data.load_mnist(root)
    assert d.train_x.shape == (5, 1, 28, 28) and d.train_x.dtype == torch.float32
    assert d.test_x.shape == (3, 1, 28, 28) and d.train_y.dtype == torch.int64
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte.gz"].astype(np.float32) / 255)
    torch.testing.assert_close(d.train_x[:, 0], expected)
    assert d.train_y.tolist() == [5, 0, 4, 1, 9] and d.test_y.tolist() == [7, 2, 1]
    assert 0.0 <= d.train_x.min() and d.train_x.max() <= 1.0
    assert data.load_mnist(root, limit=2).train_x.shape == (2, 1, 28, 28)
    assert data.load_image_dataset("mnist", root).name == "mnist"


def test_sources_md_verification(mnist_dir):
    root, _ = mnist_dir
    folder = root / "mnist"
    names = [p.name for p in folder.glob("*.gz")]
    write_sources(folder, {n: sha(folder / n) for n in names})
    table = data.parse_sources_md(folder / "SOURCES.md")
    assert set(table) == set(names) and all(len(h) == 64 for _, h in table.values())
    assert data.verify_file(folder / names[0]) is True
    data.load_mnist(root)  # verifies all four files

    bad = folder / "t10k-labels-idx1-ubyte.gz"
    write_sources(folder, {n: sha(folder / n) if n != bad.name else "0" * 64 for n in names})
    with pytest.raises(ChecksumError, match="sha256 mismatch") as exc:
        data.load_mnist(root)
    assert str(bad) in str(exc.value) and "copy it again" in str(exc.value)
    assert data.load_mnist(root, verify=False).test_y.tolist() == [7, 2, 1]


def test_size_mismatch_and_unlisted(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    row = f"| a.txt | 6 | {'a' * 32} | {sha(f)} |"  # a 4-column table with an md5 column
    (tmp_path / "SOURCES.md").write_text(
        f"| file | bytes | md5 | sha256 |\n|---|---|---|---|\n{row}\n"
    )
    with pytest.raises(ChecksumError, match="size mismatch") as exc:
        data.verify_file(f)
    assert str(f) in str(exc.value)
    g = tmp_path / "b.txt"
    g.write_text("x")
    assert data.verify_file(g) is False  # not listed: nothing to check against


def test_missing_and_corrupt_files(mnist_dir, tmp_path):
    root, _ = mnist_dir
    with pytest.raises(DataFileNotFoundError) as exc:
        data.load_fashion_mnist(root)
    assert "fashion_mnist" in str(exc.value) and "data_dir" in str(exc.value)
    assert isinstance(exc.value, FileNotFoundError) and isinstance(exc.value, DataError)

    target = root / "mnist" / "train-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:200])  # truncated gzip
    with pytest.raises(CorruptDataError) as exc:
        data.load_mnist(root)
    assert str(target) in str(exc.value)

    notidx = tmp_path / "x.gz"
    notidx.write_bytes(gzip.compress(b"\x12\x34\x56\x78" + b"\0" * 32))
    with pytest.raises(CorruptDataError, match="bad magic"):
        data.read_idx(notidx)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\1" * 4))
    with pytest.raises(CorruptDataError, match="truncated"):
        data.read_idx(short)


def test_mnist1d_pickle(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "mnist1d"
    folder.mkdir()
    d = {
        "x": rng.normal(size=(8, 40)),
        "y": np.arange(8) % 10,
        "x_test": rng.normal(size=(4, 40)),
        "y_test": np.array([9, 1, 2, 3]),
        "t": np.linspace(0, 1, 40),
    }
    (folder / "mnist1d_data.pkl").write_bytes(pickle.dumps(d))
    ds = data.load_mnist1d(tmp_path)
    assert ds.train_x.shape == (8, 40) and ds.train_x.dtype == torch.float32
    assert ds.num_classes == 10 and ds.test_y.tolist() == [9, 1, 2, 3]
    np.testing.assert_allclose(ds.train_x.numpy(), d["x"], rtol=1e-6)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "mnist1d_data.pkl").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(CorruptDataError, match="refusing"):
        data.load_mnist1d(tmp_path)


def test_text_loader(tmp_path):
    folder = tmp_path / "tinyshakespeare"
    folder.mkdir()
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3
    (folder / "input.txt").write_text(text)
    write_sources(folder, {"input.txt": sha(folder / "input.txt")})
    t = data.load_tiny_shakespeare(tmp_path)
    n = int(len(text) * 0.9)
    assert len(t.train) == n and len(t.val) == len(text) - n
    assert t.vocab == "".join(sorted(set(text))) and t.train.dtype == torch.int64
    assert t.decode(t.train) + t.decode(t.val) == text
    assert torch.equal(t.encode("hear"), t.train[t.decode(t.train).index("hear") :][:4])
    write_sources(folder, {"input.txt": "f" * 64})
    with pytest.raises(ChecksumError, match="input.txt"):
        data.load_tiny_shakespeare(tmp_path)


def test_cifar_jpeg_zip(tmp_path, monkeypatch):
    Image = pytest.importorskip("PIL.Image")
    folder = tmp_path / "cifar10_jpeg"
    folder.mkdir()
    colors = {"airplane": (250, 10, 10), "cat": (10, 200, 30)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for split, n in (("train", 2), ("test", 1)):
            for cls, rgb in colors.items():
                for k in range(n):
                    jb = io.BytesIO()
                    Image.new("RGB", (32, 32), rgb).save(jb, "JPEG", quality=75)
                    zf.writestr(f"{split}/{cls}/{k:04d}.jpg", jb.getvalue())
    (folder / cifar.ZIP_NAME).write_bytes(buf.getvalue())
    write_sources(folder, {cifar.ZIP_NAME: sha(folder / cifar.ZIP_NAME)})
    cache = tmp_path / "cache"
    d = data.load_cifar10(tmp_path, cache_dir=cache)
    assert d.train_x.shape == (4, 3, 32, 32) and d.test_x.shape == (2, 3, 32, 32)
    assert d.train_y.tolist() == [0, 0, 3, 3] and d.test_y.tolist() == [0, 3]
    assert abs(d.train_x[0, 0].mean().item() - 250 / 255) < 0.03  # lossy but close
    assert abs(d.train_x[2, 1].mean().item() - 200 / 255) < 0.03
    assert len(list(cache.glob("cifar10_jpeg_*.npy"))) == 4

    def boom(*a, **k):
        raise AssertionError("cache not used")

    monkeypatch.setattr(cifar, "decode_cifar10_zip", boom)
    again = data.load_cifar10(tmp_path, cache_dir=cache)
    assert torch.equal(again.train_x, d.train_x)
    monkeypatch.undo()
    assert data.load_cifar10(tmp_path, limit_per_class=1).train_y.tolist() == [0, 3]

    (folder / cifar.ZIP_NAME).write_bytes(b"not a zip")
    with pytest.raises(CorruptDataError, match="cifar10_jpeg_q75.zip"):
        data.load_cifar10(tmp_path, cache_dir=cache, verify=False)


def test_embedded_fallbacks():
    pytest.importorskip("sklearn")
    d = data.load_digits()
    assert d.train_x.shape[1:] == (1, 8, 8) and len(d.train_y) + len(d.test_y) == 1797
    assert 0.0 <= d.train_x.min() and d.train_x.max() <= 1.0 and d.num_classes == 10
    assert torch.equal(data.load_digits().test_y, d.test_y)
    assert not torch.equal(data.load_digits(seed=1).test_y, d.test_y)
    t = data.load_stdlib_text()
    assert len(t.train) > 10_000 and len(t.val) > 1_000 and t.vocab_size > 50
    assert "def " in t.decode(t.train[:20_000])


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data folder not present")
def test_real_mnist_first_items():
    d = data.load_mnist(SHARED_DATA, limit=16)  # verifies the four sha256s
    assert d.train_x.shape == (16, 1, 28, 28) and d.test_x.shape == (16, 1, 28, 28)
    assert d.train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert d.test_y[:5].tolist() == [7, 2, 1, 0, 4]
    for p in sorted((SHARED_DATA / "mnist").glob("*.gz")):
        assert data.verify_file(p) is True

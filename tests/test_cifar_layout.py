"""CIFAR-10 in the torchvision / original python layout (``cifar-10-batches-py``), from small
fabricated pickle files: pixel layout, label order, the restricted unpickler and error messages."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from orthoptim.benchmarks import cifar
from orthoptim.benchmarks.data import CorruptDataError, DataFileNotFoundError, load_image_dataset


def _batch(n: int, offset: int) -> dict:
    # Python-2 style: bytes keys, NumPy uint8 data, a plain list of labels
    data = ((np.arange(n * 3072) + offset) % 251).astype(np.uint8).reshape(n, 3072)
    return {b"batch_label": b"x", b"data": data, b"labels": [(offset + i) % 10 for i in range(n)]}


def _write_batches(folder, n=3, test_n=4, protocol=2):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate([*cifar.TRAIN_BATCHES, cifar.TEST_BATCH]):
        b = _batch(test_n if name == cifar.TEST_BATCH else n, 7 * i)
        batches[name] = b
        with open(folder / name, "wb") as f:
            pickle.dump(b, f, protocol=protocol)
    return batches


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_batches_layout_and_pixels(tmp_path, protocol):
    batches = _write_batches(tmp_path / "cifar-10-batches-py", protocol=protocol)
    ds = cifar.load_cifar10(tmp_path)
    assert ds.train_x.shape == (15, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.class_names == cifar.CIFAR10_CLASSES
    # train = data_batch_1..5 concatenated in order; labels as stored
    want_y = sum((batches[b][b"labels"] for b in cifar.TRAIN_BATCHES), [])
    assert ds.train_y.tolist() == want_y and ds.test_y.tolist() == batches["test_batch"][b"labels"]
    # a row is 1024 red, 1024 green, 1024 blue values, each 32x32 row-major
    row = batches["data_batch_2"][b"data"][1]
    img = ds.train_x[4]
    for c in range(3):
        expect = row[c * 1024 : (c + 1) * 1024].reshape(32, 32).astype(np.float32) / 255.0
        np.testing.assert_allclose(img[c].numpy(), expect, rtol=0, atol=1e-7)
    # also found as <data_dir>/cifar10/cifar-10-batches-py, or given the folder itself
    other = tmp_path / "nested" / "cifar10" / "cifar-10-batches-py"
    os.makedirs(other.parent)
    os.rename(tmp_path / "cifar-10-batches-py", other)
    assert cifar.load_cifar10(tmp_path / "nested").train_y.tolist() == want_y
    assert cifar.load_cifar10(other).test_y.tolist() == batches["test_batch"][b"labels"]
    # through the name-based loader too, with a limit (10 * limit_per_class per split)
    ds2 = load_image_dataset("cifar10", tmp_path / "nested", limit_per_class=1)
    assert len(ds2.train_y) == 10 and len(ds2.test_y) == 4


def test_str_keys_accepted(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_batches(folder)
    with open(folder / "test_batch", "wb") as f:  # a Python-3 re-save with str keys
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [3, 4]}, f)
    assert cifar.load_cifar10(tmp_path).test_y.tolist() == [3, 4]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_restricted_unpickler_refuses_code(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    _write_batches(folder)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CorruptDataError, match=r"data_batch_3.*refusing to load global"):
        cifar.load_cifar10(tmp_path)
    assert not (tmp_path / "pwned.txt").exists()


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"not a pickle at all", "cannot read CIFAR-10 batch"),
        ({b"labels": [1]}, "cannot read CIFAR-10 batch"),  # no data key
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"shape \(2, 100\)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [12]}, "labels outside 0..9"),
    ],
)
def test_corrupt_batches(tmp_path, payload, match):
    folder = tmp_path / "cifar-10-batches-py"
    _write_batches(folder)
    with open(folder / "test_batch", "wb") as f:
        f.write(payload) if isinstance(payload, bytes) else pickle.dump(payload, f)
    with pytest.raises(CorruptDataError, match=match) as e:
        cifar.load_cifar10(tmp_path)
    assert "test_batch" in str(e.value) and "copy the file again" in str(e.value)


def test_missing_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_batches(folder)
    os.remove(folder / "data_batch_4")
    with pytest.raises(DataFileNotFoundError, match=r"data_batch_4.*cifar-10-python.tar.gz"):
        cifar.load_cifar10(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFileNotFoundError) as e:
        cifar.load_cifar10(empty)
    msg = str(e.value)
    assert "cifar10_jpeg_q75.zip" in msg and "cifar-10-batches-py" in msg and str(empty) in msg
    with pytest.raises(ValueError, match="limit_per_class"):
        cifar.load_cifar10(tmp_path, limit_per_class=0)

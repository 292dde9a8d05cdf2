"""Writers of tiny dataset files in the real on-disk formats, for tests (no downloads)."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx(path: str | os.PathLike, array: np.ndarray, *, gz: bool = True) -> Path:
    """Write a uint8 array as an IDX file (magic 0x0000 08 ndim, big-endian dims), gzip'd when `gz`.

    Example:
        >>> write_idx(tmp_path / "x.gz", np.zeros((2, 28, 28), np.uint8))
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_fashion_mnist(dir: str | os.PathLike, n_train: int, n_test: int, *, gz: bool = True, seed: int = 0) -> Path:
    """Four Fashion-MNIST IDX files with random 28x28 images; labels are `arange(n) % 10`.

    Example:
        >>> root = write_fashion_mnist(tmp_path / "fm", 20, 10)
        >>> load_dataset("fashion_mnist", root=root)
    """
    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz=gz)
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, gz=gz)
    return root


def write_cifar10(dir: str | os.PathLike, n_train_per_batch: int, n_test: int, *, seed: int = 0) -> Path:
    """A `cifar-10-batches-py` folder under `dir` (5 train batches, test_batch, batches.meta); returns it.

    Labels of batch b are `(b * n_train_per_batch + arange(n)) % 10`; test labels are `arange(n_test) % 10`.

    Example:
        >>> folder = write_cifar10(tmp_path, 4, 6)  # tmp_path / "cifar-10-batches-py"
    """
    folder = Path(dir) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def dump(name: str, first: int, n: int) -> None:
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in (first + np.arange(n)) % 10],
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)

    for b in range(5):
        dump(f"data_batch_{b + 1}", b * n_train_per_batch, n_train_per_batch)
    dump("test_batch", 0, n_test)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": n_train_per_batch}, f)
    return folder


def write_imagenette(dir: str | os.PathLike, classes: list[str] | tuple[str, ...], per_class: int) -> Path:
    """An image folder `dir/{train,val}/<class>/` with `per_class` small images per class and split.

    Images alternate JPEG/PNG and landscape/portrait sizes; class i is filled with a solid colour
    whose channel (i % 3) is bright, so labels can be checked from pixels.

    Example:
        >>> root = write_imagenette(tmp_path / "inette", ["cat", "dog"], 3)
    """
    root = Path(dir)
    for split in ("train", "val"):
        for i, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            colour = [40, 40, 40]
            colour[i % 3] = 220
            for j in range(per_class):
                size = (48, 36) if j % 2 == 0 else (30, 40)
                img = Image.new("RGB", size, tuple(colour))
                ext = ".JPEG" if j % 2 == 0 else ".png"
                img.save(folder / f"{split}_{name}_{j}{ext}")
    return root

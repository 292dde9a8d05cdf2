"""`cifar10`: the python-pickle release (`cifar-10-batches-py`) of CIFAR-10, 3x32x32, 10 classes."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ._arrays import array_splits
from ._core import DATASETS, DataSplits

DIRNAME = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


@DATASETS.register("cifar10")
def cifar10(
    root: Path | None, *, val_fraction: float, seed: int, image_size: int | None, limit: int | None
) -> DataSplits:
    """CIFAR-10 as 3x32x32 images scaled to [0, 1] and normalised with train-split statistics.

    `root` is the `cifar-10-batches-py` directory or its parent (no default). Train/val is a
    stratified split of `data_batch_1..5` (50000 images); `test` is `test_batch` (10000). Class
    names come from `batches.meta` when present. The batches are pickles, read with an unpickler that
    admits numpy arrays and plain containers only, so no code runs from them.

    Example:
        >>> splits = load_dataset("cifar10", root="~/data", image_size=64)
    """
    if root is None:
        raise ValueError(
            f"cifar10 has no default location: pass root= (or --data-root) pointing at {DIRNAME}/ "
            f"or its parent (download and extract {_URL})"
        )
    folder = _locate(root)
    train = [_read_batch(folder / name) for name in TRAIN_BATCHES]
    images = np.concatenate([x for x, _ in train])
    labels = np.concatenate([y for _, y in train])
    return array_splits(
        "cifar10", (images, labels), _read_batch(folder / "test_batch"),
        scale=1 / 255, classes=_classes(folder),
        val_fraction=val_fraction, seed=seed, image_size=image_size, limit=limit,
    )


def _locate(root: Path) -> Path:
    for folder in (root, root / DIRNAME):
        if (folder / TRAIN_BATCHES[0]).is_file():
            return folder
    raise FileNotFoundError(
        f"no CIFAR-10 batches in {root} or {root / DIRNAME} (looked for {TRAIN_BATCHES[0]}); pass root= / "
        f"--data-root pointing at the extracted {DIRNAME} directory or its parent (from {_URL})"
    )


# what the CIFAR-10 pickles need (numpy arrays of any numpy version, Python 2 byte strings), nothing else
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Admits numpy arrays and plain containers: a crafted file cannot run code through ``__reduce__``."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def _load_pickle(path: Path) -> object:
    with open(path, "rb") as f:
        try:
            return _ArrayUnpickler(f, encoding="bytes").load()
        except pickle.UnpicklingError as err:
            if "refused global" in str(err):
                raise ValueError(f"{path}: refused to load: it holds pickled Python objects ({str(err)[15:]}) that "
                                 f"could run code, not a CIFAR-10 batch; replace it with the original file") from None
            raise ValueError(f"{path} is not a CIFAR-10 pickle ({err}); replace it") from None
        except Exception as err:  # pickle raises many types on garbage input
            raise ValueError(f"{path} is not a CIFAR-10 pickle ({type(err).__name__}: {err}); replace it") from None


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 file {path} not found; re-extract {_URL} into {path.parent.parent}")
    batch = _load_pickle(path)
    data, labels = _field(batch, "data", path), _field(batch, "labels", path)
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(
            f"{path} has data of shape {data.shape} and {len(labels)} labels; expected (N, 3072) uint8 and N labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(f"{path} has labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels


def _field(batch: object, key: str, path: Path) -> object:
    if isinstance(batch, dict):
        for k in (key.encode(), key):
            if k in batch:
                return batch[k]
    raise ValueError(f"{path} is not a CIFAR-10 batch: no {key!r} entry in its pickled dict; replace it")


def _classes(folder: Path) -> tuple[str, ...]:
    meta = folder / "batches.meta"
    if not meta.is_file():
        return CLASSES
    names = _load_pickle(meta)
    names = names.get(b"label_names", names.get("label_names")) if isinstance(names, dict) else None
    if not names or len(names) != len(CLASSES):
        return CLASSES
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)

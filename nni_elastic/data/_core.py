"""The dataset registry, the `DataSplits` container, `load_dataset` and `make_loader`."""
from __future__ import annotations

import logging
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from .._registry import Registry

logger = logging.getLogger(__name__)

# A dataset factory: factory(root, *, val_fraction, seed, image_size, limit) -> DataSplits.
# `root` is an expanded Path or None; the arguments are already validated by `load_dataset`.
DatasetFactory = Callable[..., "DataSplits"]
DATASETS: Registry[DatasetFactory] = Registry("dataset")


@dataclass
class DataSplits:
    """Train/val/test datasets of one image-classification task plus the shape facts models need.

    Each dataset yields `(image, label)`: a float32 tensor `(in_channels, *image_size)`, normalised
    with `mean`/`std`, and a 0-dim int64 label tensor. `test` is None when the source has no
    held-out split (digits).

    Example:
        >>> splits = load_dataset("digits")
        >>> model(splits.example_inputs(2)).shape  # (2, splits.num_classes)
    """

    train: Dataset
    val: Dataset
    test: Dataset | None
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    name: str
    classes: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def example_inputs(self, batch: int = 1) -> torch.Tensor:
        """Zeros shaped like a batch of inputs, for tracing, export and dependency graphs.

        Args:
            batch: number of samples (>= 1).

        Example:
            >>> load_dataset("digits").example_inputs(4).shape
            torch.Size([4, 1, 8, 8])
        """
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch={batch!r} must be a positive int, e.g. batch=1")
        return torch.zeros(batch, self.in_channels, *self.image_size)


def list_datasets() -> list[str]:
    """Names accepted by `load_dataset`, sorted.

    Example:
        >>> list_datasets()
        ['cifar10', 'digits', 'fashion_mnist', 'imagenette']
    """
    return DATASETS.names()


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    image_size: int | None = None,
    limit: int | None = None,
) -> DataSplits:
    """Load a registered dataset as normalised train/val(/test) splits.

    Args:
        name: one of `list_datasets()`.
        root: directory holding the dataset files (ignored by `digits`; see each dataset's
            docstring for its default and layout).
        val_fraction: share of the training data held out as `val`, in (0, 1); the split is
            stratified by label and fixed by `seed`.
        seed: seeds the train/val split and the `limit` subset.
        image_size: resize images to `image_size` x `image_size` (bilinear); None keeps the
            native size (imagenette defaults to 64).
        limit: keep at most this many training samples (a stratified subset fixed by `seed`) for
            quick smoke runs; val and test are not capped.

    Example:
        >>> splits = load_dataset("digits", seed=1, limit=200)
        >>> len(splits.train), splits.num_classes
        (200, 10)
    """
    factory = DATASETS.get(name)
    if not isinstance(val_fraction, numbers.Real) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} must be strictly between 0 and 1, e.g. 0.2")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int, e.g. seed=0")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive int (number of training samples) or None")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1
    ):
        raise ValueError(f"image_size={image_size!r} must be a positive int (side in pixels) or None")
    path = Path(root).expanduser() if root is not None else None
    splits = factory(
        path,
        val_fraction=float(val_fraction),
        seed=int(seed),
        image_size=None if image_size is None else int(image_size),
        limit=None if limit is None else int(limit),
    )
    logger.info(
        "dataset %s: %d train, %d val, %s test, %d classes, %dx%dx%d",
        name, len(splits.train), len(splits.val), "no" if splits.test is None else len(splits.test),
        splits.num_classes, splits.in_channels, *splits.image_size,
    )
    return splits


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffling order depends only on `seed` (its own torch.Generator).

    Args:
        dataset: any map-style dataset, e.g. `splits.train`.
        batch_size: samples per batch (>= 1).
        shuffle: reshuffle every epoch; the sequence of epoch orders is fixed by `seed`.
        seed: seeds the loader's generator (shuffling and worker seeds); global RNG is untouched.
        num_workers: background worker processes (0 loads in the main process).
        drop_last: drop the last incomplete batch.

    Example:
        >>> loader = make_loader(splits.train, 64, shuffle=True, seed=0)
        >>> images, labels = next(iter(loader))
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int, e.g. 64")
    if isinstance(num_workers, bool) or not isinstance(num_workers, numbers.Integral) or num_workers < 0:
        raise ValueError(f"num_workers={num_workers!r} must be an int >= 0 (0 loads in the main process)")
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=shuffle,
        generator=generator,
        num_workers=int(num_workers),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )

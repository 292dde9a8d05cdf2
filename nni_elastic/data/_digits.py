"""`digits`: scikit-learn's embedded 8x8 handwritten digits (1797 images, 10 classes, no files)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ._arrays import array_splits
from ._core import DATASETS, DataSplits


@DATASETS.register("digits")
def digits(
    root: Path | None, *, val_fraction: float, seed: int, image_size: int | None, limit: int | None
) -> DataSplits:
    """sklearn `load_digits` as 1x8x8 images: pixel values 0..16 scaled to [0, 1], then normalised.

    Train/val is a stratified split of all 1797 images by `seed`; `test` is None (evaluate on
    `val`). `root` is ignored. In memory, loads in milliseconds: the default for quickstarts and tests.

    Example:
        >>> splits = load_dataset("digits", val_fraction=0.25, seed=3)
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)
    return array_splits(
        "digits", (images, labels), None,
        scale=1 / 16, classes=tuple(str(c) for c in range(10)),
        val_fraction=val_fraction, seed=seed, image_size=image_size, limit=limit,
    )

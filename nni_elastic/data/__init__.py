"""Datasets for elastic training: a registry of loaders returning seeded train/val/test splits.

Built in: `digits` (sklearn, in memory: quickstarts and tests), `fashion_mnist` (IDX files,
Debian `dataset-fashion-mnist`), `cifar10` (python pickles), `imagenette` (image folders).
Register your own with `@DATASETS.register("name")` on a function
`(root, *, val_fraction, seed, image_size, limit) -> DataSplits`.

Example:
    >>> from nni_elastic.data import load_dataset, make_loader
    >>> splits = load_dataset("digits", seed=0)
    >>> loader = make_loader(splits.train, 64, shuffle=True, seed=0)
"""
from __future__ import annotations

from . import _cifar10, _digits, _fashion_mnist, _imagenette  # noqa: F401  (register the datasets)
from ._core import DATASETS, DataSplits, list_datasets, load_dataset, make_loader

__all__ = ["DATASETS", "DataSplits", "list_datasets", "load_dataset", "make_loader"]

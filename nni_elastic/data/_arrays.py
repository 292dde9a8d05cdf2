"""In-memory uint8 image arrays -> seeded, stratified, normalised `DataSplits`.

Shared by the array datasets (digits, fashion_mnist, cifar10) so they split, subset, normalise
and resize identically. Normalisation uses per-channel mean/std of the training split (after
`val` is held out, before `limit`), computed exactly from pixel histograms.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, TensorDataset

from ._core import DataSplits

# Splits whose float32 tensor fits in this budget are materialised as a TensorDataset (fastest);
# larger ones (e.g. CIFAR-10 train, or any upscaled set) stay uint8 and convert per item.
_EAGER_BYTES = 256 * 2**20
_CHUNK = 4096


def take_stratified(labels: np.ndarray, n_take: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pick `n_take` of `len(labels)` positions, stratified by label when possible; (taken, rest), sorted.

    Args:
        labels: int labels, one per sample.
        n_take: how many positions to take, 1 <= n_take < len(labels).
        seed: sklearn `random_state`.

    Example:
        >>> val, train = take_stratified(np.array([0, 0, 1, 1]), 2, seed=0)
    """
    idx = np.arange(len(labels))
    try:
        rest, taken = train_test_split(idx, test_size=n_take, stratify=labels, random_state=seed)
    except ValueError:  # a class too rare for both sides (tiny sets): plain seeded split instead
        rest, taken = train_test_split(idx, test_size=n_take, random_state=seed)
    return np.sort(taken), np.sort(rest)


def split_train_val(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) holding out `val_fraction` of the samples (at least 1 on each side).

    Args:
        labels: training labels, one per sample (the split is stratified by them).
        val_fraction: share held out as val, in (0, 1).
        seed: fixes the split.

    Example:
        >>> train, val = split_train_val(labels, 0.2, seed=0)
    """
    n = len(labels)
    if n < 2:
        raise ValueError(f"the training data has {n} sample(s); need at least 2 to split off a val set")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    val, train = take_stratified(labels, n_val, seed)
    return train, val


def apply_limit(train_idx: np.ndarray, labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Keep at most `limit` of `train_idx` (a stratified subset fixed by `seed`); None keeps all.

    Args:
        train_idx: indices into `labels`.
        labels: labels of the whole training array.
        limit: cap, or None.
        seed: fixes the subset.

    Example:
        >>> train_idx = apply_limit(train_idx, labels, 100, seed=0)
    """
    if limit is None or limit >= len(train_idx):
        return train_idx
    kept, _ = take_stratified(labels[train_idx], limit, seed)
    return train_idx[kept]


def channel_stats(images: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of `images * scale` for uint8 `images` (N, C, H, W).

    Args:
        images: uint8 array (N, C, H, W).
        scale: maps stored values to [0, 1] (1/255, or 1/16 for digits).

    Example:
        >>> mean, std = channel_stats(train_images, 1 / 255)
    """
    values = np.arange(256, dtype=np.float64) * scale
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        mean = float(counts @ values / counts.sum())
        std = math.sqrt(float(counts @ (values - mean) ** 2 / counts.sum()))
        means.append(mean)
        stds.append(std if std > 1e-8 else 1.0)  # constant images: only centre them
    return tuple(means), tuple(stds)


class Normalize:
    """uint8 batch (N, C, H, W) -> float32 scaled to [0, 1], resized to `size`, normalised per channel."""

    def __init__(self, scale: float, mean: tuple[float, ...], std: tuple[float, ...], size: tuple[int, int]):
        self.scale = scale
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.size = size

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(torch.float32) * self.scale
        if tuple(x.shape[-2:]) != self.size:
            shrink = x.shape[-2] > self.size[0] or x.shape[-1] > self.size[1]
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=shrink)
        return (x - self.mean) / self.std


class ImageArrayDataset(Dataset):
    """uint8 images kept as-is (1 byte/pixel) and converted by `Normalize` on access.

    Example:
        >>> ds = ImageArrayDataset(images_u8, labels, Normalize(1 / 255, (0.5,), (0.25,), (28, 28)))
        >>> x, y = ds[0]
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Normalize):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i : i + 1])[0], self.labels[i]


def to_dataset(images: np.ndarray, labels: np.ndarray, transform: Normalize) -> Dataset:
    """A TensorDataset of normalised floats when small enough, else a lazy `ImageArrayDataset`.

    Args:
        images: uint8 array (N, C, H, W).
        labels: int labels (N,).
        transform: the split's `Normalize`.

    Example:
        >>> ds = to_dataset(images, labels, transform)
    """
    x = torch.from_numpy(np.ascontiguousarray(images))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())
    n, c = x.shape[:2]
    if n * c * transform.size[0] * transform.size[1] * 4 > _EAGER_BYTES:
        return ImageArrayDataset(x, y, transform)
    floats = torch.cat([transform(x[i : i + _CHUNK]) for i in range(0, n, _CHUNK)]) if n else transform(x)
    return TensorDataset(floats, y)


def array_splits(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None,
    *,
    scale: float,
    classes: tuple[str, ...],
    val_fraction: float,
    seed: int,
    image_size: int | None,
    limit: int | None,
) -> DataSplits:
    """Split, normalise and wrap uint8 (N, C, H, W) train (and optional test) arrays as `DataSplits`.

    Args:
        name: dataset name stored in the result.
        train: (images, labels) to split into train and val.
        test: (images, labels) of the official test split, or None.
        scale: maps stored values to [0, 1].
        classes: class names; their count is `num_classes`.
        val_fraction, seed, image_size, limit: as in `load_dataset`.

    Example:
        >>> splits = array_splits("toy", (x, y), None, scale=1 / 255, classes=("a", "b"),
        ...                       val_fraction=0.2, seed=0, image_size=None, limit=None)
    """
    images, labels = train
    train_idx, val_idx = split_train_val(labels, val_fraction, seed)
    mean, std = channel_stats(images[train_idx], scale)
    train_idx = apply_limit(train_idx, labels, limit, seed)
    size = (image_size, image_size) if image_size else (int(images.shape[2]), int(images.shape[3]))
    transform = Normalize(scale, mean, std, size)
    return DataSplits(
        train=to_dataset(images[train_idx], labels[train_idx], transform),
        val=to_dataset(images[val_idx], labels[val_idx], transform),
        test=None if test is None else to_dataset(test[0], test[1], transform),
        num_classes=len(classes),
        in_channels=int(images.shape[1]),
        image_size=size,
        name=name,
        classes=classes,
        mean=mean,
        std=std,
    )

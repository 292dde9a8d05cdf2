"""`fashion_mnist`: Zalando's 28x28 grey clothing images from IDX files (60000 train, 10000 test)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ._arrays import array_splits
from ._core import DATASETS, DataSplits
from ._idx import read_idx

# Where Debian's `dataset-fashion-mnist` package installs the four standard .gz files.
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_HOW_TO_GET = (
    "install with `apt-get install dataset-fashion-mnist` (files go to "
    f"{DEFAULT_ROOT}) or pass root= / --data-root pointing at a directory containing "
    + ", ".join(f"{stem}.gz" for stem in FILES.values())
    + " (uncompressed files work too)"
)


@DATASETS.register("fashion_mnist")
def fashion_mnist(
    root: Path | None, *, val_fraction: float, seed: int, image_size: int | None, limit: int | None
) -> DataSplits:
    """Fashion-MNIST as 1x28x28 images scaled to [0, 1] and normalised with train-split statistics.

    `root` (default `/usr/share/datasets/fashion-mnist`) holds the four IDX files, `.gz` or not.
    Train/val is a stratified split of the 60000 training images; `test` is the 10000 t10k images.

    Example:
        >>> splits = load_dataset("fashion_mnist", root="~/data/fashion", limit=5000)
    """
    root = DEFAULT_ROOT if root is None else root
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST directory {root} does not exist; {_HOW_TO_GET}")
    arrays = {}
    for key, stem in FILES.items():
        path = _find(root, stem)
        arrays[key] = read_idx(path, ndim=3 if key.endswith("images") else 1)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels) or (labels.size and labels.max() >= len(CLASSES)):
            raise ValueError(
                f"Fashion-MNIST {split} files in {root} disagree: {len(images)} images, {len(labels)} "
                f"labels, largest label {labels.max() if labels.size else None} (expected < {len(CLASSES)})"
            )
    return array_splits(
        "fashion_mnist",
        (arrays["train_images"][:, None], arrays["train_labels"].astype(np.int64)),
        (arrays["test_images"][:, None], arrays["test_labels"].astype(np.int64)),
        scale=1 / 255, classes=CLASSES,
        val_fraction=val_fraction, seed=seed, image_size=image_size, limit=limit,
    )


def _find(root: Path, stem: str) -> Path:
    dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for name in (f"{stem}.gz", stem, f"{dotted}.gz", dotted):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"Fashion-MNIST file {root / stem}.gz not found (nor {stem} uncompressed); {_HOW_TO_GET}")

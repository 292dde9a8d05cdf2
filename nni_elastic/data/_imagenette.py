"""`imagenette`: an image-folder release (`train/<class>/*`, `val/<class>/*`) decoded lazily with Pillow."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ._arrays import apply_limit, split_train_val
from ._core import DATASETS, DataSplits

SUFFIXES = (".jpeg", ".jpg", ".png")
DEFAULT_SIZE = 64
# Fixed ImageNet statistics: Imagenette is a 10-class ImageNet subset, and computing statistics
# would mean decoding every image once.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class ImageFolderDataset(Dataset):
    """(path, label) pairs decoded on access: RGB, shorter side resized to `size`, center crop, normalised.

    Example:
        >>> ds = ImageFolderDataset([(Path("a.jpg"), 0)], size=64)
        >>> x, y = ds[0]  # x: float32 (3, 64, 64), y: int64 tensor
    """

    def __init__(self, samples: list[tuple[Path, int]], size: int, mean=MEAN, std=STD):
        self.samples = samples
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[i]
        with Image.open(path) as img:
            img = resize_center_crop(img.convert("RGB"), self.size)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        return (x - self.mean) / self.std, torch.tensor(label, dtype=torch.int64)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bilinear, antialiased), then crop the central size x size.

    Args:
        img: any Pillow image.
        size: output side in pixels.

    Example:
        >>> resize_center_crop(Image.new("RGB", (320, 240)), 64).size
        (64, 64)
    """
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


@DATASETS.register("imagenette")
def imagenette(
    root: Path | None, *, val_fraction: float, seed: int, image_size: int | None, limit: int | None
) -> DataSplits:
    """Imagenette (or any `train/<class>/` image folder) as 3 x image_size x image_size RGB tensors.

    Classes are the sorted subdirectory names of `root/train`. `val_fraction` splits `train`
    (stratified, by `seed`) into train and val; the release's own `val` folder, when present,
    becomes `test` (otherwise `test` is None) so that model selection never sees it. Images are
    decoded lazily per item (nothing is held in memory), resized to `image_size` (default 64) by
    shorter side + center crop, and normalised with the fixed ImageNet mean/std.

    Example:
        >>> splits = load_dataset("imagenette", root="~/data/imagenette2-160", image_size=96)
    """
    if root is None:
        raise ValueError(
            "imagenette has no default location: pass root= (or --data-root) pointing at an extracted "
            "Imagenette release such as imagenette2-160/ (containing train/<class>/ and val/<class>/)"
        )
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(
            f"image folder {train_dir} not found; pass root= / --data-root pointing at an extracted "
            "Imagenette release such as imagenette2-160/ (containing train/<class>/ and val/<class>/)"
        )
    classes = tuple(sorted(d.name for d in train_dir.iterdir() if d.is_dir()))
    if not classes:
        raise ValueError(f"{train_dir} has no class subdirectories; expected {train_dir}/<class>/<image>.JPEG")
    samples = _scan(train_dir, classes)
    val_dir = root / "val"
    test = _scan(val_dir, classes) if val_dir.is_dir() else None
    labels = np.array([label for _, label in samples], dtype=np.int64)
    train_idx, val_idx = split_train_val(labels, val_fraction, seed)
    train_idx = apply_limit(train_idx, labels, limit, seed)
    size = image_size or DEFAULT_SIZE
    return DataSplits(
        train=ImageFolderDataset([samples[i] for i in train_idx], size),
        val=ImageFolderDataset([samples[i] for i in val_idx], size),
        test=None if test is None else ImageFolderDataset(test, size),
        num_classes=len(classes),
        in_channels=3,
        image_size=(size, size),
        name="imagenette",
        classes=classes,
        mean=MEAN,
        std=STD,
    )


def _scan(folder: Path, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
        if class_dir.name not in index:
            raise ValueError(
                f"{class_dir} is a class missing from {folder.parent / 'train'} (known: {', '.join(classes)}); "
                "every val class needs a train folder of the same name"
            )
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
        samples += [(p, index[class_dir.name]) for p in files]
    if not samples:
        raise ValueError(f"no {'/'.join(SUFFIXES)} images under {folder}/<class>/")
    return samples

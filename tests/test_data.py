"""Properties of nni_elastic.data: deterministic splits, file formats, errors that say how to fix."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import nni_elastic.data._arrays as arrays
from datafiles import write_cifar10, write_fashion_mnist, write_imagenette
from nni_elastic.data import DataSplits, list_datasets, load_dataset, make_loader

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


def stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.stack([torch.as_tensor(y) for y in ys])


def check_item(splits: DataSplits, dataset) -> None:
    x, y = dataset[0]
    assert x.dtype == torch.float32 and x.shape == (splits.in_channels, *splits.image_size)
    assert torch.as_tensor(y).dtype == torch.int64 and 0 <= int(y) < splits.num_classes


# --- digits -----------------------------------------------------------------------------------


def test_digits_shapes_and_classes():
    splits = load_dataset("digits")
    assert (splits.name, splits.num_classes, splits.in_channels, splits.image_size) == ("digits", 10, 1, (8, 8))
    assert splits.test is None
    assert len(splits.train) + len(splits.val) == 1797
    assert len(splits.val) == round(1797 * 0.2)
    check_item(splits, splits.train)
    check_item(splits, splits.val)
    assert splits.example_inputs(4).shape == (4, 1, 8, 8)
    x, _ = stack(splits.train)
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3  # normalised by train stats


def test_digits_split_is_a_partition_of_the_data():
    splits = load_dataset("digits", seed=3)
    std, mean = splits.std[0], splits.mean[0]
    pixels = torch.cat([stack(splits.train)[0], stack(splits.val)[0]]) * std + mean
    restored = np.rint(pixels.numpy() * 16).astype(int).reshape(1797, -1)
    original = load_digits().images.astype(int).reshape(1797, -1)
    # Same multiset of rows: train and val are disjoint and together cover every image once.
    assert sorted(map(tuple, restored)) == sorted(map(tuple, original))


def test_digits_split_deterministic_per_seed_and_stratified():
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.val.tensors[1], b.val.tensors[1])
    assert not torch.equal(a.val.tensors[0], c.val.tensors[0])
    counts = torch.bincount(a.val.tensors[1], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # ~20% of ~180 per class


def test_val_fraction_and_limit_and_image_size():
    splits = load_dataset("digits", val_fraction=0.5, limit=50, image_size=16, seed=2)
    assert len(splits.train) == 50 and len(splits.val) == round(1797 * 0.5)
    assert splits.image_size == (16, 16) and splits.example_inputs().shape == (1, 1, 16, 16)
    check_item(splits, splits.train)
    again = load_dataset("digits", val_fraction=0.5, limit=50, image_size=16, seed=2)
    assert torch.equal(splits.train.tensors[0], again.train.tensors[0])
    assert torch.bincount(splits.train.tensors[1], minlength=10).min() >= 4  # stratified subset


@pytest.mark.parametrize("kwargs, word", [
    ({"val_fraction": 0.0}, "val_fraction"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"val_fraction": -0.3}, "val_fraction"),
    ({"limit": 0}, "limit"),
    ({"image_size": 0}, "image_size"),
    ({"seed": -1}, "seed"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, word):
    with pytest.raises(ValueError, match=word):
        load_dataset("digits", **kwargs)


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="mnist_typo") as err:
        load_dataset("mnist_typo")
    assert "digits" in str(err.value) and "fashion_mnist" in str(err.value)
    assert {"digits", "fashion_mnist", "cifar10", "imagenette"} <= set(list_datasets())


# --- fashion_mnist ----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path, gz):
    root = write_fashion_mnist(tmp_path / "fm", n_train=20, n_test=10, gz=gz)
    splits = load_dataset("fashion_mnist", root=root, val_fraction=0.25)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, (28, 28))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 10)
    assert splits.classes[0] == "T-shirt/top"
    check_item(splits, splits.test)
    assert stack(splits.test)[1].tolist() == list(range(10))  # test keeps file order
    assert sorted(stack(splits.train)[1].tolist() + stack(splits.val)[1].tolist()) == sorted(
        (np.arange(20) % 10).tolist()
    )


def test_fashion_mnist_missing_directory_says_how_to_install(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion_mnist", root=missing)
    assert str(missing) in str(err.value)
    assert "apt-get install dataset-fashion-mnist" in str(err.value) and "--data-root" in str(err.value)


def test_fashion_mnist_missing_file_is_named(tmp_path):
    root = write_fashion_mnist(tmp_path / "fm", 20, 10)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as err:
        load_dataset("fashion_mnist", root=root)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)


def test_fashion_mnist_bad_magic_names_the_file(tmp_path):
    root = write_fashion_mnist(tmp_path / "fm", 20, 10)
    bad = root / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(bad.read_bytes()))
    raw[2:4] = b"\x09\x07"
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ValueError, match="magic number") as err:
        load_dataset("fashion_mnist", root=root)
    assert str(bad) in str(err.value)


def test_fashion_mnist_truncated_file_names_the_file(tmp_path):
    root = write_fashion_mnist(tmp_path / "fm", 20, 10, gz=False)
    bad = root / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated") as err:
        load_dataset("fashion_mnist", root=root)
    assert str(bad) in str(err.value)


def test_lazy_and_eager_datasets_agree(tmp_path, monkeypatch):
    root = write_fashion_mnist(tmp_path / "fm", 20, 10)
    eager = load_dataset("fashion_mnist", root=root, image_size=14)
    monkeypatch.setattr(arrays, "_EAGER_BYTES", 0)
    lazy = load_dataset("fashion_mnist", root=root, image_size=14)
    assert isinstance(lazy.train, arrays.ImageArrayDataset)
    for a, b in ((eager.train, lazy.train), (eager.test, lazy.test)):
        xa, ya = stack(a)
        xb, yb = stack(b)
        assert torch.equal(ya, yb) and torch.allclose(xa, xb, atol=1e-6)


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_default_root():
    splits = load_dataset("fashion_mnist")
    assert (len(splits.train) + len(splits.val), len(splits.test)) == (60000, 10000)
    assert splits.image_size == (28, 28) and splits.num_classes == 10
    assert abs(splits.mean[0] - 0.2860) < 1e-3 and abs(splits.std[0] - 0.3530) < 1e-3


# --- cifar10 ----------------------------------------------------------------------------------


def test_cifar10_from_pickles_via_folder_or_parent(tmp_path):
    folder = write_cifar10(tmp_path, n_train_per_batch=4, n_test=6)
    a = load_dataset("cifar10", root=tmp_path, val_fraction=0.25)
    b = load_dataset("cifar10", root=folder, val_fraction=0.25)
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 3, (32, 32))
    assert (len(a.train), len(a.val), len(a.test)) == (15, 5, 6)
    assert a.classes[1] == "automobile"
    check_item(a, a.train)
    assert stack(a.test)[1].tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(stack(a.train)[0], stack(b.train)[0])


def test_cifar10_image_size_and_limit(tmp_path):
    write_cifar10(tmp_path, 4, 6)
    splits = load_dataset("cifar10", root=tmp_path, image_size=16, limit=3)
    assert len(splits.train) == 3 and splits.image_size == (16, 16)
    check_item(splits, splits.test)


def test_cifar10_needs_root_and_names_missing_paths(tmp_path):
    with pytest.raises(ValueError, match="root"):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as err:
        load_dataset("cifar10", root=tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)
    folder = write_cifar10(tmp_path / "c", 2, 2)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", root=folder)


# --- imagenette -------------------------------------------------------------------------------


def test_imagenette_folder_loads_lazily(tmp_path):
    root = write_imagenette(tmp_path / "inette", ["n01440764", "n02102040"], per_class=4)
    splits = load_dataset("imagenette", root=root, image_size=24, val_fraction=0.25)
    assert splits.classes == ("n01440764", "n02102040")
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (2, 3, (24, 24))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 8)  # val folder -> test
    check_item(splits, splits.train)
    x, y = stack(splits.test)
    assert x.shape == (8, 3, 24, 24)
    # Class 0 is red-dominant, class 1 green-dominant (see write_imagenette).
    dominant = (x * torch.tensor(splits.std).view(3, 1, 1) + torch.tensor(splits.mean).view(3, 1, 1))
    assert dominant.mean(dim=(2, 3)).argmax(dim=1).tolist() == y.tolist()


def test_imagenette_default_size_and_no_val_folder(tmp_path):
    root = write_imagenette(tmp_path / "inette", ["a", "b"], per_class=2)
    for p in sorted((root / "val").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (root / "val").rmdir()
    splits = load_dataset("imagenette", root=root, val_fraction=0.5)
    assert splits.test is None and splits.image_size == (64, 64)
    assert splits.train[0][0].shape == (3, 64, 64)


def test_imagenette_errors(tmp_path):
    with pytest.raises(ValueError, match="root"):
        load_dataset("imagenette")
    with pytest.raises(FileNotFoundError, match="train"):
        load_dataset("imagenette", root=tmp_path)


# --- loaders ----------------------------------------------------------------------------------


def test_make_loader_shuffles_deterministically():
    splits = load_dataset("digits", limit=64)

    def order(seed: int, shuffle: bool = True) -> list[int]:
        loader = make_loader(splits.train, 16, shuffle=shuffle, seed=seed)
        return torch.cat([x.flatten(1).sum(1) for x, _ in loader]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(0, shuffle=False) == splits.train.tensors[0].flatten(1).sum(1).tolist()
    x, y = next(iter(make_loader(splits.train, 16, shuffle=True)))
    assert x.shape == (16, 1, 8, 8) and y.dtype == torch.int64
    assert len(make_loader(splits.train, 10, shuffle=False, drop_last=True)) == 6
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(splits.train, 0, shuffle=True)

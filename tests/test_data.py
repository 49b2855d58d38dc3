"""Tests of study/data.py: splits, transforms, loaders and the missing-dataset errors.

No test downloads anything. The torchvision paths run on tiny fake datasets written here in
each dataset's on-disk format (CIFAR pickles, SVHN .mat, MNIST idx, ImageFolder PNGs).
"""

from __future__ import annotations

import math
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from study.config import ConfigError, DataConfig
from study.data import (
    DataBundle,
    DataError,
    DatasetInfo,
    _digits_arrays,
    _digits_split,
    _scan_imagefolder,
    _torchvision_base,
    dataset_shape,
    eval_loader,
    eval_tensors,
    load_data,
    train_loader,
)


@pytest.fixture(autouse=True)
def _fresh_disk_caches():
    # The loaders cache opened datasets per path; tests rewrite files, so start clean.
    _torchvision_base.cache_clear()
    _scan_imagefolder.cache_clear()
    yield
    _torchvision_base.cache_clear()
    _scan_imagefolder.cache_clear()


def _no_md5(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """Keep torchvision's file-existence check but skip its md5 comparison.

    torchvision checks the md5 of every file against the official archives, which fake files
    cannot match. Patched only in the one dataset module under test (``check_integrity`` is
    imported by name there), and the replacement still requires each file to exist.
    """
    import importlib

    mod = importlib.import_module(f"torchvision.datasets.{module}")
    monkeypatch.setattr(mod, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def _rows(dataset: TensorDataset) -> set[bytes]:
    return {row.numpy().tobytes() for row in dataset.tensors[0]}


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------


def test_digits_split_sizes_follow_the_fractions():
    cfg = DataConfig()
    bundle = load_data(cfg, seed=0)
    n = 1797
    # scikit-learn rounds the held-out part up.
    n_test = math.ceil(cfg.test_fraction * n)
    n_val = math.ceil(cfg.val_fraction * (n - n_test))
    assert len(bundle.test) == n_test == 450
    assert len(bundle.val) == n_val == 203
    assert len(bundle.train) == n - n_test - n_val == 1144
    assert all(isinstance(d, TensorDataset) for d in (bundle.train, bundle.val, bundle.test))


def test_digits_splits_are_disjoint_and_cover_everything():
    bundle = load_data(DataConfig(), seed=3)
    x_all, _ = _digits_arrays()
    # Every digits image is unique, so pixel rows identify samples.
    assert len({row.tobytes() for row in x_all}) == len(x_all)
    train, val, test = _rows(bundle.train), _rows(bundle.val), _rows(bundle.test)
    assert not train & val and not train & test and not val & test
    assert len(train | val | test) == len(x_all)

    train_idx, val_idx, test_idx = _digits_split(_digits_arrays()[1], DataConfig(), 3)
    joined = np.concatenate([train_idx, val_idx, test_idx])
    assert np.array_equal(np.sort(joined), np.arange(len(x_all)))


def test_digits_splits_are_stratified():
    cfg = DataConfig()
    _, y = _digits_arrays()
    _, val_idx, test_idx = _digits_split(y, cfg, seed=5)
    per_class = np.bincount(y, minlength=10)
    test_counts = np.bincount(y[test_idx], minlength=10)
    # Stratified: each class contributes its share, up to rounding.
    assert np.all(np.abs(test_counts - cfg.test_fraction * per_class) <= 1)
    rest = per_class - test_counts
    val_counts = np.bincount(y[val_idx], minlength=10)
    assert np.all(np.abs(val_counts - cfg.val_fraction * rest) <= 1)
    bundle = load_data(cfg, seed=5)
    assert np.array_equal(np.bincount(bundle.test.tensors[1].numpy(), minlength=10), test_counts)


def test_digits_values_shape_and_dtype():
    bundle = load_data(DataConfig(), seed=0)
    for split in (bundle.train, bundle.val, bundle.test):
        x, y = split.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
        assert y.dtype == torch.int64 and set(y.unique().tolist()) == set(range(10))
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # 0..16 scaled by 1/16
    assert bundle.info == DatasetInfo("digits", 1, 10, 8, (0.3053,), (0.3760,))


def test_digits_info_mean_std_match_the_data():
    x, _ = _digits_arrays()
    assert abs(x.mean() - load_data(DataConfig(), 0).info.mean[0]) < 1e-3
    assert abs(x.std() - load_data(DataConfig(), 0).info.std[0]) < 1e-3


def test_digits_split_is_fixed_by_the_seed():
    a, b, c = (load_data(DataConfig(), seed=s) for s in (7, 7, 8))
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).tensors[0], getattr(b, name).tensors[0])
        assert torch.equal(getattr(a, name).tensors[1], getattr(b, name).tensors[1])
    assert _rows(a.test) != _rows(c.test)


def test_digits_cache_is_not_writable_through_the_bundle():
    bundle = load_data(DataConfig(), seed=0)
    bundle.train.tensors[0].zero_()  # a trial may do anything to its own tensors
    x, _ = _digits_arrays()
    assert x.max() == 1.0
    assert not x.flags.writeable


def test_digits_train_subset_is_stratified_and_leaves_val_test_alone():
    full = load_data(DataConfig(), seed=1)
    sub = load_data(DataConfig(train_subset=100), seed=1)
    assert len(sub.train) == 100
    counts = np.bincount(sub.train.tensors[1].numpy(), minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11
    assert _rows(sub.train) <= _rows(full.train)
    assert _rows(sub.test) == _rows(full.test) and _rows(sub.val) == _rows(full.val)


def test_train_subset_larger_than_the_data_uses_everything():
    assert len(load_data(DataConfig(train_subset=100_000), seed=0).train) == 1144


def test_val_fraction_zero_gives_no_val_split():
    bundle = load_data(DataConfig(val_fraction=0.0), seed=0)
    assert bundle.val is None
    assert len(bundle.train) + len(bundle.test) == 1797


def test_digits_augment_shifts_train_images_only():
    bundle = load_data(DataConfig(augment=True), seed=0)
    plain = load_data(DataConfig(), seed=0)
    torch.manual_seed(0)
    draws = [bundle.train[0][0] for _ in range(20)]
    original = plain.train[0][0]
    assert any(not torch.equal(d, original) for d in draws)
    assert all(d.shape == (1, 8, 8) and d.min() >= 0 and d.max() <= 1 for d in draws)
    assert bundle.train[0][1] == int(plain.train[0][1])
    assert torch.equal(bundle.test.tensors[0], plain.test.tensors[0])


# ---------------------------------------------------------------------------------------------
# dataset_shape and configuration errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape"),
    [("digits", (1, 10)), ("mnist", (1, 10)), ("fashion_mnist", (1, 10)), ("cifar10", (3, 10)),
     ("cifar100", (3, 100)), ("svhn", (3, 10))],
)  # fmt: skip
def test_dataset_shape_needs_no_files(name, shape, tmp_path):
    data_dir = None if name == "digits" else str(tmp_path / "absent")
    assert dataset_shape(DataConfig(name=name, data_dir=data_dir)) == shape


def test_dataset_shape_counts_imagefolder_classes_without_reading_images(tmp_path):
    for cls in ("ant", "bee", "cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        (tmp_path / "train" / cls / "x.png").write_bytes(b"not an image")
    (tmp_path / "train" / "README.txt").write_text("files are not classes")
    assert dataset_shape(DataConfig(name="imagefolder", data_dir=str(tmp_path))) == (3, 4)


def test_dataset_shape_imagefolder_missing_tree_names_the_path(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"imagefolder: no dataset at {tmp_path / 'absent'} (")):
        dataset_shape(DataConfig(name="imagefolder", data_dir=str(tmp_path / "absent")))
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        dataset_shape(DataConfig(name="imagefolder", data_dir=str(tmp_path)))


def test_data_dir_is_required_off_digits():
    for call in (dataset_shape, lambda c: load_data(c, 0)):
        with pytest.raises(DataError, match=r"^data\.data_dir: required for cifar10"):
            call(DataConfig(name="cifar10"))


def test_image_size_only_for_imagefolder():
    with pytest.raises(DataError, match=r"data\.image_size: applies to imagefolder only"):
        dataset_shape(DataConfig(image_size=16))


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn"])
def test_missing_torchvision_dataset_is_one_clear_line(name, tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_data(DataConfig(name=name, data_dir=str(root)), seed=0)
    message = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert "\n" not in message
    assert message.startswith(f"{name}: no dataset at {root} ")
    assert "data.download: true" in message


def test_corrupt_cifar_says_corrupt_and_names_the_path(tmp_path):
    # Real torchvision md5 checks: these files exist but are not the official ones.
    _write_fake_cifar10(tmp_path)
    with pytest.raises(DataError, match=rf"^cifar10: dataset at {re.escape(str(tmp_path))} is corrupt or incomplete"):
        load_data(DataConfig(name="cifar10", data_dir=str(tmp_path)), seed=0)


# ---------------------------------------------------------------------------------------------
# torchvision datasets on fake files
# ---------------------------------------------------------------------------------------------


def _write_fake_cifar10(root: Path, per_batch: int = 8, n_test: int = 10) -> dict[str, np.ndarray]:
    """cifar-10-batches-py in the official pickle format; returns the raw CHW arrays."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for b in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        y = [(b * per_batch + i) % 4 for i in range(per_batch)]
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps({"data": x, "labels": y}))
        train_x.append(x)
        train_y += y
    test_x = rng.integers(0, 256, (n_test, 3 * 32 * 32), dtype=np.uint8)
    test_y = [i % 4 for i in range(n_test)]
    (folder / "test_batch").write_bytes(pickle.dumps({"data": test_x, "labels": test_y}))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return {
        "train_x": np.concatenate(train_x).reshape(-1, 3, 32, 32),
        "train_y": np.array(train_y),
        "test_x": test_x.reshape(-1, 3, 32, 32),
        "test_y": np.array(test_y),
    }


def _as_float(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(raw.astype(np.float32) / 255.0)


def _transform_names(dataset) -> list[str]:
    return [type(t).__name__ for t in getattr(dataset.transform, "transforms", [dataset.transform])]


def test_fake_cifar10_splits_values_and_info(monkeypatch, tmp_path):
    _no_md5(monkeypatch, "cifar")
    raw = _write_fake_cifar10(tmp_path)
    bundle = load_data(DataConfig(name="cifar10", data_dir=str(tmp_path)), seed=0)
    assert bundle.info == DatasetInfo("cifar10", 3, 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    # Val carved from the 40 training images, test = the official test split.
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (34, 6, 10)
    train_idx, val_idx = set(bundle.train.indices), set(bundle.val.indices)
    assert not train_idx & val_idx and train_idx | val_idx == set(range(40))
    val_counts = np.bincount(raw["train_y"][bundle.val.indices], minlength=4)
    assert val_counts.sum() == 6 and val_counts.min() == 1 and val_counts.max() == 2  # stratified
    # Eval splits are the raw pixels / 255, unnormalised.
    for i in range(len(bundle.test)):
        x, y = bundle.test[i]
        assert x.dtype == torch.float32 and torch.equal(x, _as_float(raw["test_x"][i]))
        assert y == raw["test_y"][i]
    k = bundle.val.indices[0]
    assert torch.equal(bundle.val[0][0], _as_float(raw["train_x"][k]))
    assert bundle.val[0][1] == raw["train_y"][k]


def test_fake_cifar10_augments_train_only(monkeypatch, tmp_path):
    _no_md5(monkeypatch, "cifar")
    raw = _write_fake_cifar10(tmp_path)
    bundle = load_data(DataConfig(name="cifar10", data_dir=str(tmp_path)), seed=0)
    assert _transform_names(bundle.train) == ["RandomCrop", "RandomHorizontalFlip", "ToTensor"]
    assert _transform_names(bundle.val) == _transform_names(bundle.test) == ["ToTensor"]
    assert bundle.train.transform.transforms[0].padding == 4
    torch.manual_seed(0)
    k = bundle.train.indices[0]
    draws = [bundle.train[0][0] for _ in range(10)]
    assert any(not torch.equal(d, _as_float(raw["train_x"][k])) for d in draws)
    assert all(torch.equal(bundle.val[0][0], bundle.val[0][0]) for _ in range(3))

    _torchvision_base.cache_clear()
    off = load_data(DataConfig(name="cifar10", data_dir=str(tmp_path), augment=False), seed=0)
    assert _transform_names(off.train) == ["ToTensor"]
    assert torch.equal(off.train[0][0], _as_float(raw["train_x"][off.train.indices[0]]))


def test_fake_cifar10_split_is_fixed_by_the_seed(monkeypatch, tmp_path):
    _no_md5(monkeypatch, "cifar")
    _write_fake_cifar10(tmp_path)
    cfg = DataConfig(name="cifar10", data_dir=str(tmp_path), train_subset=12)
    a, b, c = (load_data(cfg, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a.val.indices, b.val.indices) and np.array_equal(a.train.indices, b.train.indices)
    assert not np.array_equal(a.val.indices, c.val.indices)
    assert len(a.train) == 12 and not set(a.train.indices) & set(a.val.indices)


def test_fake_svhn_crops_without_flipping(monkeypatch, tmp_path):
    from scipy.io import savemat

    _no_md5(monkeypatch, "svhn")
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 6)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(-1, 1)  # SVHN stores the digit 0 as label 10
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
    bundle = load_data(DataConfig(name="svhn", data_dir=str(tmp_path), val_fraction=0.0), seed=0)
    assert _transform_names(bundle.train) == ["RandomCrop", "ToTensor"]
    assert _transform_names(bundle.test) == ["ToTensor"]
    assert [bundle.test[i][1] for i in range(6)] == [1, 2, 3, 4, 5, 6]
    assert 0 in {bundle.train[i][1] for i in range(len(bundle.train))}
    assert bundle.info.num_classes == 10 and bundle.info.channels == 3


def _write_idx(path: Path, array: np.ndarray) -> None:
    # The MNIST idx format: zero, zero, type 0x08 (ubyte), ndim; then big-endian dims; then data.
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_fake_mnist_family(name, folder, tmp_path):
    # MNIST's raw files carry no md5 check in torchvision: no patch needed.
    rng = np.random.default_rng(0)
    raw = {}
    for split, n in (("train", 30), ("t10k", 8)):
        raw[split] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        _write_idx(tmp_path / folder / "raw" / f"{split}-images-idx3-ubyte", raw[split])
        _write_idx(tmp_path / folder / "raw" / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    bundle = load_data(DataConfig(name=name, data_dir=str(tmp_path)), seed=0)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (25, 5, 8)
    assert _transform_names(bundle.train) == ["ToTensor"]  # no augmentation by default
    x, y = bundle.test[3]
    assert x.shape == (1, 28, 28) and torch.equal(x[0], _as_float(raw["t10k"][3])) and y == 3
    assert bundle.info.channels == 1 and bundle.info.image_size == 28


# ---------------------------------------------------------------------------------------------
# ImageFolder trees
# ---------------------------------------------------------------------------------------------

_COLORS = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255)}


def _png(path: Path, color: tuple[int, int, int], size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)


def _write_tree(root: Path, test_split: str = "test", per_class: int = 4) -> None:
    for cls, color in _COLORS.items():
        for i in range(per_class):
            _png(root / "train" / cls / f"{i}.png", color)
        _png(root / test_split / cls / "t.png", color)


def _check_labels_match_colors(dataset) -> None:
    # Each class has a pure colour: the label must name the channel that is lit.
    for i in range(len(dataset)):
        x, y = dataset[i]
        assert int(x.mean(dim=(1, 2)).argmax()) == y


def test_imagefolder_tree(tmp_path):
    _write_tree(tmp_path)
    cfg = DataConfig(name="imagefolder", data_dir=str(tmp_path), image_size=16, val_fraction=0.25)
    bundle = load_data(cfg, seed=0)
    assert bundle.info == DatasetInfo("imagefolder", 3, 3, 16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (9, 3, 3)
    x, _ = bundle.test[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    _check_labels_match_colors(bundle.test)
    _check_labels_match_colors(bundle.val)
    assert "RandomCrop" in _transform_names(bundle.train) and "RandomCrop" not in _transform_names(bundle.test)


def test_imagefolder_default_size_and_valid_split(tmp_path):
    _write_tree(tmp_path, test_split="valid")
    bundle = load_data(DataConfig(name="imagefolder", data_dir=str(tmp_path)), seed=0)
    assert bundle.info.image_size == 64 and bundle.test[0][0].shape == (3, 64, 64)


def test_imagefolder_tinyimagenet_layout(tmp_path):
    # TinyImageNet: val/images/ + val_annotations.txt; test/images/ is unlabelled.
    for cls, color in _COLORS.items():
        for i in range(3):
            _png(tmp_path / "train" / cls / "images" / f"{cls}_{i}.JPEG", color)
    _png(tmp_path / "test" / "images" / "test_0.png", (9, 9, 9))
    lines = []
    for j, (cls, color) in enumerate(reversed(_COLORS.items())):
        _png(tmp_path / "val" / "images" / f"val_{j}.png", color)
        lines.append(f"val_{j}.png\t{cls}\t0\t0\t8\t8")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    bundle = load_data(DataConfig(name="imagefolder", data_dir=str(tmp_path), val_fraction=0.0), seed=0)
    assert len(bundle.train) == 9 and len(bundle.test) == 3
    assert [bundle.test[i][1] for i in range(3)] == [2, 1, 0]
    _check_labels_match_colors(bundle.test)


def test_imagefolder_problems_are_data_errors(tmp_path):
    for cls, color in _COLORS.items():
        _png(tmp_path / "train" / cls / "0.png", color)
    with pytest.raises(DataError, match=f"imagefolder: no labelled test split at {re.escape(str(tmp_path))}"):
        load_data(DataConfig(name="imagefolder", data_dir=str(tmp_path)), seed=0)
    _png(tmp_path / "test" / "ant" / "0.png", _COLORS["ant"])
    (tmp_path / "train" / "ant" / "0.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"imagefolder: cannot read .*train/ant/0\.png"):
        load_data(DataConfig(name="imagefolder", data_dir=str(tmp_path), val_fraction=0.0), seed=0)


# ---------------------------------------------------------------------------------------------
# loaders and evaluation tensors
# ---------------------------------------------------------------------------------------------


def _toy_bundle(n: int) -> DataBundle:
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1) / n
    ds = TensorDataset(x, torch.arange(n))
    return DataBundle(ds, None, ds, DatasetInfo("toy", 1, n, 1, (0.0,), (1.0,)))


def _epoch_labels(loader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def test_train_loader_is_seeded_and_covers_each_sample_once():
    bundle = _toy_bundle(50)
    first = _epoch_labels(train_loader(bundle, 8, seed=4))
    assert first == _epoch_labels(train_loader(bundle, 8, seed=4))
    assert first != _epoch_labels(train_loader(bundle, 8, seed=5))
    assert sorted(first) == list(range(50))
    loader = train_loader(bundle, 8, seed=4)
    assert _epoch_labels(loader) != _epoch_labels(loader)  # a new order every epoch


def test_train_loader_drops_only_a_singleton_last_batch():
    assert len(list(train_loader(_toy_bundle(17), 8, seed=0))) == 2  # 8 + 8, the lone 17th dropped
    assert len(list(train_loader(_toy_bundle(18), 8, seed=0))) == 3  # 8 + 8 + 2
    assert len(list(train_loader(_toy_bundle(1), 8, seed=0))) == 1
    with pytest.raises(ValueError, match="batch_size=0"):
        train_loader(_toy_bundle(4), 0, seed=0)


def test_eval_loader_keeps_the_order():
    assert _epoch_labels(eval_loader(_toy_bundle(10).test, 3)) == list(range(10))


def test_eval_tensors_is_a_seeded_prefix():
    ds = load_data(DataConfig(), seed=0).test
    x10, y10 = eval_tensors(ds, 10, seed=1)
    x50, y50 = eval_tensors(ds, 50, seed=1)
    assert x10.shape == (10, 1, 8, 8) and x10.dtype == torch.float32 and y10.dtype == torch.int64
    assert torch.equal(x50[:10], x10) and torch.equal(y50[:10], y10)
    assert not torch.equal(eval_tensors(ds, 10, seed=2)[0], x10)
    x_all, _ = eval_tensors(ds, 10_000, seed=1)
    assert len(x_all) == len(ds)
    with pytest.raises(ValueError, match="n=0 must be >= 1"):
        eval_tensors(ds, 0, seed=0)


def test_eval_tensors_on_a_torchvision_split(monkeypatch, tmp_path):
    _no_md5(monkeypatch, "cifar")
    raw = _write_fake_cifar10(tmp_path)
    test = load_data(DataConfig(name="cifar10", data_dir=str(tmp_path)), seed=0).test
    x, y = eval_tensors(test, 4, seed=0)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:4]
    assert x.shape == (4, 3, 32, 32) and torch.equal(x, _as_float(raw["test_x"][order.numpy()]))
    assert y.tolist() == raw["test_y"][order.numpy()].tolist()

"""Datasets on disk: torchvision's files and ImageFolder trees, opened once per process."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

if TYPE_CHECKING:  # annotations only: data sits below the config in the import graph
    from study.config import DataConfig
from study.data.catalog import (
    _LARGE_IMAGE,
    _SPECS,
    _TEST_SPLIT_NAMES,
    IMAGEFOLDER_DEFAULT_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataBundle,
    DataError,
    DatasetInfo,
)
from study.data.splits import _augment_on, _one_line, _root, _SplitView, _train_val

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# torchvision datasets and ImageFolder trees (on disk)
# ---------------------------------------------------------------------------------------------


def _labels(dataset: Any) -> np.ndarray:
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = dataset.labels  # SVHN
    return np.asarray(labels, dtype=np.int64)


def _load_from_disk(cfg: DataConfig, seed: int) -> DataBundle:
    from torchvision import transforms as T

    root = _root(cfg)
    if cfg.name == "imagefolder":
        train_base, test_base, info = _open_imagefolder(cfg, root)
        eval_tf, train_tf = _imagefolder_transforms(info.image_size, _augment_on(cfg))
    else:
        spec = _SPECS[cfg.name]
        train_base = _open_torchvision(cfg.name, root, train=True, download=cfg.download)
        test_base = _open_torchvision(cfg.name, root, train=False, download=cfg.download)
        info = DatasetInfo(cfg.name, spec.channels, spec.num_classes, spec.image_size, spec.mean, spec.std)
        eval_tf = T.ToTensor()
        ops: list[Any] = []
        if _augment_on(cfg):
            if spec.crop_padding:
                ops.append(T.RandomCrop(spec.image_size, padding=spec.crop_padding))
            if spec.flip:
                ops.append(T.RandomHorizontalFlip())
        train_tf = T.Compose([*ops, T.ToTensor()]) if ops else eval_tf

    labels = _labels(train_base)
    train_idx, val_idx = _train_val(cfg.name, np.arange(len(labels)), labels, cfg, seed)
    return DataBundle(
        train=_SplitView(train_base, train_idx, train_tf),
        val=None if val_idx is None else _SplitView(train_base, val_idx, eval_tf),
        test=_SplitView(test_base, np.arange(len(test_base)), eval_tf),
        info=info,
    )


@functools.lru_cache(maxsize=4)
def _torchvision_base(name: str, root: str, train: bool, download: bool) -> Dataset:
    """The torchvision dataset with no transform (the splits apply their own); cached."""
    from torchvision import datasets

    if name == "svhn":
        return datasets.SVHN(root, split="train" if train else "test", download=download)
    cls = {
        "mnist": datasets.MNIST,
        "fashion_mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }[name]
    return cls(root, train=train, download=download)


def _open_torchvision(name: str, root: Path, *, train: bool, download: bool) -> Dataset:
    try:
        return _torchvision_base(name, str(root), train, download)
    except ImportError as err:
        raise DataError(f"{name}: reading the dataset needs the package {err.name!r} (pip install {err.name})") from err
    except Exception as err:  # any failure to read the files is a data problem
        raise _disk_error(name, root, download, err) from err


def _disk_error(name: str, root: Path, download: bool, err: BaseException) -> DataError:
    """Translate a torchvision failure into one actionable line naming ``root``."""
    spec = _SPECS[name]
    reason = f"{type(err).__name__}: {_one_line(err)}"
    if download:
        return DataError(
            f"{name}: could not download into {root} ({reason}); on a machine without internet "
            f"copy the extracted dataset there (expected {spec.layout}) and set data.download: false"
        )
    missing = [f for f in spec.files if not (root / f).is_file()]
    if missing:
        return DataError(
            f"{name}: no dataset at {root} (expected {spec.layout}; missing {missing[0]}); set "
            f"data.download: true on a machine with internet, or copy the extracted dataset there"
        )
    return DataError(
        f"{name}: dataset at {root} is corrupt or incomplete ({reason}); replace {spec.layout} there "
        f"with a good copy, or delete it and set data.download: true"
    )


def _train_dir(root: Path) -> Path:
    train = root / "train"
    if not train.is_dir():
        raise DataError(
            f"imagefolder: no dataset at {root} (expected {_SPECS['imagefolder'].layout}; missing "
            f"{train}/); point data.data_dir at an extracted TinyImageNet, CINIC-10 or ImageNet tree"
        )
    return train


def _class_folders(directory: Path) -> list[str]:
    classes = sorted(entry.name for entry in directory.iterdir() if entry.is_dir())
    if not classes:
        raise DataError(
            f"imagefolder: {directory} has no class folders (expected {directory}/<class>/<image>); "
            f"point data.data_dir at an extracted TinyImageNet, CINIC-10 or ImageNet tree"
        )
    return classes


class _ImageList(Dataset):
    """Images listed as ``(path, label)``, opened as RGB PIL images with no transform."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str]) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[i]
        return default_loader(path), label


@functools.lru_cache(maxsize=2)
def _scan_imagefolder(root: str) -> tuple[_ImageList, _ImageList, str]:
    """Index a tree's train and labelled test images (a directory walk, cached: ImageNet's
    1.28M files take a while to list)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    root_path = Path(root)
    train_dir = _train_dir(root_path)
    classes = _class_folders(train_dir)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    try:
        train = make_dataset(str(train_dir), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:  # a class folder without images
        raise DataError(f"imagefolder: {train_dir} is incomplete ({_one_line(err)})") from err

    for split in _TEST_SPLIT_NAMES:
        split_dir = root_path / split
        if not split_dir.is_dir():
            continue
        if (split_dir / "val_annotations.txt").is_file():
            test = _annotated_samples(split_dir, class_to_idx)
        else:
            folders = {e.name for e in split_dir.iterdir() if e.is_dir()}
            # An unlabelled split (TinyImageNet's test/images/) has no train class folders.
            if not folders or not folders <= set(class_to_idx):
                log.debug("imagefolder: %s has no class folders of train/; skipped", split_dir)
                continue
            # train's class indices throughout; a class absent from the test split is allowed.
            test = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not test:
            raise DataError(f"imagefolder: {split_dir} holds no images ({', '.join(IMG_EXTENSIONS)})")
        return _ImageList(train, classes), _ImageList(test, classes), split
    raise DataError(
        f"imagefolder: no labelled test split at {root_path} (expected one of "
        f"{', '.join(s + '/' for s in _TEST_SPLIT_NAMES)} with the class folders of train/, or "
        f"TinyImageNet's val/val_annotations.txt)"
    )


def _annotated_samples(split_dir: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """TinyImageNet's validation layout: images/<file> plus val_annotations.txt (file, wnid, box)."""
    samples = []
    annotations = split_dir / "val_annotations.txt"
    for line_no, line in enumerate(annotations.read_text().splitlines(), start=1):
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        filename, wnid = parts[0], parts[1]
        if wnid not in class_to_idx:
            raise DataError(f"imagefolder: {annotations} line {line_no}: class {wnid!r} has no folder in train/")
        samples.append((str(split_dir / "images" / filename), class_to_idx[wnid]))
    return samples


def _open_imagefolder(cfg: DataConfig, root: Path) -> tuple[_ImageList, _ImageList, DatasetInfo]:
    train, test, split = _scan_imagefolder(str(root))
    # Decode one image of each split now, so an unreadable tree fails before training.
    for dataset in (train, test):
        path = dataset.samples[0][0]
        try:
            dataset[0]
        except Exception as err:  # PIL raises many types for bad files
            raise DataError(f"imagefolder: cannot read {path} ({type(err).__name__}: {_one_line(err)})") from err
    log.debug("imagefolder %s: %d train, %d %s images", root, len(train), len(test), split)
    size = cfg.image_size or IMAGEFOLDER_DEFAULT_SIZE
    info = DatasetInfo("imagefolder", 3, len(train.classes), size, IMAGENET_MEAN, IMAGENET_STD)
    return train, test, info


def _imagefolder_transforms(size: int, augment: bool) -> tuple[Callable[[Any], Tensor], Callable[[Any], Tensor]]:
    """(eval, train) transforms to ``size`` x ``size``.

    Small images (TinyImageNet, CINIC-10): resize + center crop, training adds a padded
    random crop (padding size/8) and a flip, the CIFAR recipe at this scale. Large images
    (ImageNet): the standard resize to size/0.875 + center crop for evaluation and
    random-resized crop + flip for training (He et al.; Wong et al., "Fast is better than free").
    """
    from torchvision import transforms as T

    if size >= _LARGE_IMAGE:
        eval_tf = T.Compose([T.Resize(math.ceil(size / 0.875)), T.CenterCrop(size), T.ToTensor()])
        train_ops: list[Any] = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        eval_tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()])
        train_ops = [T.Resize(size), T.CenterCrop(size), T.RandomCrop(size, padding=max(1, size // 8)),
                     T.RandomHorizontalFlip()]  # fmt: skip
    if not augment:
        return eval_tf, eval_tf
    return eval_tf, T.Compose([*train_ops, T.ToTensor()])

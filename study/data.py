"""Datasets for a trial: bundled digits, torchvision datasets and ImageFolder trees.

Every dataset yields ``(x, y)`` with ``x`` a float32 tensor of shape (C, H, W) in [0, 1] and ``y``
an integer class. Normalisation is *not* applied here: it lives inside the model as its first
layer (the RobustBench convention, Croce et al., "RobustBench: a standardized adversarial
robustness benchmark"), so that ε is measured in the [0, 1] pixel space the papers use.
:class:`DatasetInfo` carries the per-channel mean/std that ``defenses.build_model`` needs.

Splits, all fixed by the seed given to :func:`load_data`:

* ``digits`` (scikit-learn's bundled 8x8 handwritten digits, no download): a stratified test
  split of ``test_fraction`` of all images, then a stratified validation split of
  ``val_fraction`` of the rest; held in memory as ``TensorDataset``\\s.
* torchvision datasets and ImageFolder trees: the official test split is the test set; the
  validation split is carved (stratified) from the official training split and always uses the
  non-augmented transform.
* ``train_subset`` then takes a stratified subsample of what is left for training.

Augmentation (training split only) follows the papers' practice: random crop with 4-pixel
padding plus horizontal flip for CIFAR-10/100 (He et al., "Deep Residual Learning for Image
Recognition"; Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks"),
crop without flip for SVHN (digits are not mirror-symmetric), nothing by default for the
MNIST family and digits.

A missing or corrupt dataset raises :class:`DataError` (a ``ConfigError``: one line, CLI exit 2)
naming the path and how to obtain the data, from :func:`load_data` before any training starts.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from study.errors import ConfigError

if TYPE_CHECKING:  # annotations only: data sits below the config in the import graph
    from study.config import DataConfig

log = logging.getLogger(__name__)

__all__ = [
    "DataBundle",
    "DataError",
    "DatasetInfo",
    "dataset_shape",
    "eval_loader",
    "eval_tensors",
    "load_data",
    "train_loader",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGEFOLDER_DEFAULT_SIZE = 64
"""ImageFolder side length when ``data.image_size`` is unset: TinyImageNet's native size."""
_LARGE_IMAGE = 128
"""From this side length on, ImageFolder uses the ImageNet recipe (random-resized crop)."""
_TEST_SPLIT_NAMES = ("test", "val", "valid")
"""Candidate labelled test folders of an ImageFolder tree, in order of preference."""


class DataError(ConfigError):
    """A dataset is missing, corrupt or misplaced; the message is one line naming the path."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about the data.

    Args:
        name: Dataset name as in the config.
        channels: Input channels C.
        num_classes: Number of classes.
        image_size: Side length H = W of the inputs.
        mean: Per-channel mean of the [0, 1] pixels (for the model's normalisation layer).
        std: Per-channel standard deviation of the [0, 1] pixels.
    """

    name: str
    channels: int
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class DataBundle:
    """The three splits of one trial and their :class:`DatasetInfo`.

    Every split yields ``(x, y)``: x float32 (C, H, W) in [0, 1], y an int class index.
    ``val`` is None when ``val_fraction`` is 0.
    """

    train: Dataset
    val: Dataset | None
    test: Dataset
    info: DatasetInfo


@dataclass(frozen=True)
class _Spec:
    """Static facts about one dataset (nothing here touches the disk)."""

    channels: int
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    """Padding of the training random crop when augmenting (0 = no crop)."""
    flip: bool
    """Horizontal flip preserves the label (false for digits and house numbers)."""
    augment_default: bool
    """What ``augment: null`` means: the papers' practice for this dataset."""
    layout: str = ""
    """What torchvision expects under data_dir, for error messages."""
    files: tuple[str, ...] = ()
    """Files torchvision reads, relative to data_dir (to tell 'missing' from 'corrupt')."""


def _mnist_files(folder: str) -> tuple[str, ...]:
    return tuple(
        f"{folder}/raw/{split}-{kind}-idx{dim}-ubyte"
        for split in ("train", "t10k")
        for kind, dim in (("images", 3), ("labels", 1))
    )


# Means/stds are the per-channel statistics of the training pixels in [0, 1], as commonly
# quoted (CIFAR: the true per-pixel std, not the often-copied 0.2023/0.1994/0.2010).
_SPECS: dict[str, _Spec] = {
    # Computed over all 1,797 images (pixel/16); a test checks them against the data.
    "digits": _Spec(1, 10, 8, (0.3053,), (0.3760,), crop_padding=1, flip=False, augment_default=False),
    "mnist": _Spec(
        1, 10, 28, (0.1307,), (0.3081,), crop_padding=2, flip=False, augment_default=False,
        layout="MNIST/raw/ with the four unpacked idx files", files=_mnist_files("MNIST"),
    ),
    "fashion_mnist": _Spec(
        1, 10, 28, (0.2860,), (0.3530,), crop_padding=2, flip=True, augment_default=False,
        layout="FashionMNIST/raw/ with the four unpacked idx files", files=_mnist_files("FashionMNIST"),
    ),
    "cifar10": _Spec(
        3, 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        crop_padding=4, flip=True, augment_default=True, layout="cifar-10-batches-py/",
        files=tuple(f"cifar-10-batches-py/{f}" for f in
                    ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                     "data_batch_5", "test_batch", "batches.meta")),
    ),
    "cifar100": _Spec(
        3, 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        crop_padding=4, flip=True, augment_default=True, layout="cifar-100-python/",
        files=("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
    ),
    "svhn": _Spec(
        3, 10, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
        crop_padding=4, flip=False, augment_default=True,
        layout="train_32x32.mat and test_32x32.mat", files=("train_32x32.mat", "test_32x32.mat"),
    ),
    # num_classes and image_size depend on the tree and the config (see _open_imagefolder);
    # the transforms are built by _imagefolder_transforms for the configured size.
    "imagefolder": _Spec(
        3, 0, IMAGEFOLDER_DEFAULT_SIZE, IMAGENET_MEAN, IMAGENET_STD,
        crop_padding=IMAGEFOLDER_DEFAULT_SIZE // 8, flip=True, augment_default=True,
        layout="train/<class>/<image> plus test/, val/ or valid/ with the same class folders",
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def dataset_shape(cfg: DataConfig) -> tuple[int, int]:
    """``(channels, num_classes)`` of the configured dataset, without loading any data.

    For ``imagefolder`` the class folders under ``data_dir/train`` are counted (a directory
    listing, no image is opened).

    Raises:
        DataError: data_dir unset for a dataset that needs one, image_size set for a dataset
            that does not use it, or (imagefolder) no train/ folder with class folders.
    """
    _check_config(cfg)
    if cfg.name == "imagefolder":
        return 3, len(_class_folders(_train_dir(_root(cfg))))
    spec = _SPECS[cfg.name]
    return spec.channels, spec.num_classes


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """The :class:`DatasetInfo` of the configured dataset without loading it (to rebuild a model)."""
    channels, num_classes = dataset_shape(cfg)
    spec = _SPECS[cfg.name]
    size = cfg.image_size or spec.image_size if cfg.name == "imagefolder" else spec.image_size
    return DatasetInfo(cfg.name, channels, num_classes, size, spec.mean, spec.std)


def load_data(cfg: DataConfig, seed: int) -> DataBundle:
    """Open the configured dataset and split it, reproducibly for ``seed``.

    Every file the trial needs is opened here, so a missing or corrupt dataset fails before
    any training starts. Opened datasets are cached in-process, so repeated trials in one
    worker do not re-read (or re-checksum) the files.

    Args:
        cfg: The data section of the trial config.
        seed: Fixes the validation (and, for digits, test) split and the train subsample.

    Returns:
        A :class:`DataBundle`; inputs in [0, 1], no normalisation.

    Raises:
        DataError: One line naming the path and how to obtain the dataset.
    """
    _check_config(cfg)
    bundle = _load_digits(cfg, seed) if cfg.name == "digits" else _load_from_disk(cfg, seed)
    val_size = 0 if bundle.val is None else len(bundle.val)  # type: ignore[arg-type]
    log.info(
        "data %s: train %d, val %d, test %d; %d classes, %d px, augment=%s",
        cfg.name, len(bundle.train), val_size, len(bundle.test),  # type: ignore[arg-type]
        bundle.info.num_classes, bundle.info.image_size, _augment_on(cfg),
    )  # fmt: skip
    return bundle


def train_loader(bundle: DataBundle, batch_size: int, seed: int, num_workers: int = 0) -> DataLoader:
    """A shuffling loader over ``bundle.train`` whose order is fixed by ``seed``.

    Each pass (epoch) draws a new permutation from the loader's own ``torch.Generator`` (its
    state is ``loader.generator.get_state()`` for checkpoints); worker processes, if any,
    derive their seeds from it too, so augmentation is reproducible as well. The last batch is
    dropped only when it would hold a single sample, which BatchNorm cannot train on.

    Args:
        bundle: The data of the trial.
        batch_size: Samples per batch (>= 1).
        seed: Seed of the shuffling generator.
        num_workers: Loader worker processes (0 = load in this process).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0")
    n = len(bundle.train)  # type: ignore[arg-type]
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        bundle.train,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        num_workers=num_workers,
        drop_last=n > batch_size and n % batch_size == 1,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def eval_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    """A loader over ``dataset`` in its stored order (no shuffling, nothing dropped)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, pin_memory=torch.cuda.is_available())


def eval_tensors(dataset: Dataset, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` samples of a fixed, seeded permutation of ``dataset``, stacked.

    The permutation depends only on ``len(dataset)`` and ``seed``, so a smaller ``n`` gives a
    prefix of a larger one: attacking 100 or 1000 samples evaluates nested sets. Pass an
    eval split (val/test); the training split's augmentation would make the result random.

    Shape:
        x: (min(n, len(dataset)), C, H, W), float32 in [0, 1]; y: (same,), int64.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    size = len(dataset)  # type: ignore[arg-type]
    if size == 0:
        raise ValueError("cannot draw evaluation samples from an empty dataset")
    if n > size:
        log.debug("eval_tensors: n=%d > %d samples; using all of them", n, size)
    generator = torch.Generator()
    generator.manual_seed(seed)
    order = torch.randperm(size, generator=generator)[: min(n, size)]
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[0][order], dataset.tensors[1][order]
    else:
        pairs = [dataset[int(i)] for i in order]
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.tensor([int(p[1]) for p in pairs])
    return x.to(torch.float32).contiguous(), y.to(torch.int64).contiguous()


# ---------------------------------------------------------------------------------------------
# Config checks, splits and the transform-applying view
# ---------------------------------------------------------------------------------------------


def _check_config(cfg: DataConfig) -> None:
    # Cross-field rules that need the dataset table; pure config, no disk access.
    if cfg.image_size is not None and cfg.name != "imagefolder":
        raise DataError(
            f"data.image_size: applies to imagefolder only; {cfg.name} images are "
            f"{_SPECS[cfg.name].image_size}x{_SPECS[cfg.name].image_size} (got {cfg.image_size})"
        )
    if cfg.data_dir is None and cfg.name != "digits":
        where = _SPECS[cfg.name].layout
        raise DataError(
            f"data.data_dir: required for {cfg.name} (the directory holding {where}"
            + ("" if cfg.name == "imagefolder" else "; with data.download: true it is fetched there")
            + ")"
        )


def _root(cfg: DataConfig) -> Path:
    # Absolute before any trial starts: Ray may change a worker's working directory.
    return Path(str(cfg.data_dir)).expanduser().resolve()


def _augment_on(cfg: DataConfig) -> bool:
    return _SPECS[cfg.name].augment_default if cfg.augment is None else cfg.augment


def _split(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (kept, held_out), held_out ≈ ``fraction``, stratified by label.

    scikit-learn rounds the held-out count up (ceil). Falls back to an unstratified split
    (with a warning) when a class is too rare to stratify, e.g. in tiny subsets.
    """
    from sklearn.model_selection import train_test_split

    state = seed % 2**32
    try:
        kept, held = train_test_split(indices, test_size=fraction, stratify=labels[indices], random_state=state)
    except ValueError as err:
        log.warning("stratified split impossible (%s); splitting without stratification", err)
        kept, held = train_test_split(indices, test_size=fraction, random_state=state)
    return np.sort(kept), np.sort(held)


def _subsample(indices: np.ndarray, labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """A stratified subsample of ``size`` of ``indices`` (all of them if size is None or larger)."""
    if size is None:
        return indices
    if size >= len(indices):
        if size > len(indices):
            log.warning("train_subset=%d exceeds the %d training samples; using all", size, len(indices))
        return indices
    from sklearn.model_selection import train_test_split

    state = seed % 2**32
    try:
        kept, _ = train_test_split(indices, train_size=size, stratify=labels[indices], random_state=state)
    except ValueError as err:
        log.warning("stratified subsample impossible (%s); subsampling without stratification", err)
        kept, _ = train_test_split(indices, train_size=size, random_state=state)
    return np.sort(kept)


def _train_val(
    name: str, indices: np.ndarray, labels: np.ndarray, cfg: DataConfig, seed: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Carve the validation split from ``indices``, then subsample what is left for training."""
    val: np.ndarray | None = None
    if cfg.val_fraction > 0:
        try:
            indices, val = _split(indices, labels, cfg.val_fraction, seed)
        except ValueError as err:
            raise DataError(
                f"{name}: {len(indices)} training samples are too few for data.val_fraction="
                f"{cfg.val_fraction} ({_one_line(err)})"
            ) from err
    return _subsample(indices, labels, cfg.train_subset, seed), val


class _SplitView(Dataset):
    """The samples ``indices`` of ``base``, with this split's own transform.

    One opened dataset serves train (augmented) and val (not augmented): the files are read
    once and the two splits cannot drift apart.

    Args:
        base: Yields ``(image, label)`` (PIL image or tensor) with no transform of its own.
        indices: Positions in ``base``.
        transform: Turns an image into a float (C, H, W) tensor in [0, 1].
    """

    def __init__(self, base: Dataset, indices: np.ndarray, transform: Callable[[Any], Tensor]) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, label = self.base[int(self.indices[i])]
        return self.transform(image), int(label)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------------------------------------
# digits (scikit-learn, bundled)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as read-only arrays: x (N, 1, 8, 8) float32 in [0, 1], y (N,) int64."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixels are counts 0..16 of a 4x4 block of the original 32x32 bitmap (Alpaydin & Kaynak).
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]
    y = bunch.target.astype(np.int64)
    # The cache is shared by every trial in this process: make accidental writes fail loudly.
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _digits_split(labels: np.ndarray, cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Indices (train, val or None, test) of the digits split for ``seed``."""
    rest, test = _split(np.arange(len(labels)), labels, cfg.test_fraction, seed)
    train, val = _train_val("digits", rest, labels, cfg, seed)
    return train, val, test


def _load_digits(cfg: DataConfig, seed: int) -> DataBundle:
    x, y = _digits_arrays()
    train_idx, val_idx, test_idx = _digits_split(y, cfg, seed)

    def tensors(idx: np.ndarray) -> TensorDataset:
        # Fancy indexing copies, so the tensors are writable and independent of the cache.
        return TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))

    spec = _SPECS["digits"]
    train: Dataset = tensors(train_idx)
    if _augment_on(cfg):
        from torchvision import transforms as T

        train = _SplitView(train, np.arange(len(train_idx)), T.RandomCrop(8, padding=spec.crop_padding))
    info = DatasetInfo("digits", spec.channels, spec.num_classes, spec.image_size, spec.mean, spec.std)
    return DataBundle(train, None if val_idx is None else tensors(val_idx), tensors(test_idx), info)


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

"""The datasets the study knows: their shapes, statistics and file layouts, and the bundle a trial gets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from study.errors import ConfigError

if TYPE_CHECKING:  # annotations only: data sits below the config in the import graph
    pass


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

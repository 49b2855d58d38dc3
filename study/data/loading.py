"""The public entry points: a dataset's shape without loading it, the bundle, and the loaders."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

if TYPE_CHECKING:  # annotations only: data sits below the config in the import graph
    from study.config import DataConfig
from study.data.catalog import _SPECS, DataBundle, DatasetInfo
from study.data.digits import _load_digits
from study.data.disk import _class_folders, _load_from_disk, _train_dir
from study.data.splits import _augment_on, _check_config, _root

log = logging.getLogger(__name__)


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

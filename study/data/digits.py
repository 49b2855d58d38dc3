"""scikit-learn's bundled 8x8 digits: the default dataset, no download."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

if TYPE_CHECKING:  # annotations only: data sits below the config in the import graph
    from study.config import DataConfig
from study.data.catalog import _SPECS, DataBundle, DatasetInfo
from study.data.splits import _augment_on, _split, _SplitView, _train_val

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

"""Train/validation/test splits: stratified, seeded, and views that load nothing twice."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

if TYPE_CHECKING:  # annotations only: data sits below the config in the import graph
    from study.config import DataConfig
from study.data.catalog import _SPECS, DataError

log = logging.getLogger(__name__)


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

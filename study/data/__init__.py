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

from study.data.catalog import (  # noqa: F401
    IMAGEFOLDER_DEFAULT_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataBundle,
    DataError,
    DatasetInfo,
)
from study.data.digits import (  # noqa: F401
    _digits_arrays,
    _digits_split,
)
from study.data.disk import (  # noqa: F401
    _scan_imagefolder,
    _torchvision_base,
)
from study.data.loading import (  # noqa: F401
    dataset_info,
    dataset_shape,
    eval_loader,
    eval_tensors,
    load_data,
    train_loader,
)

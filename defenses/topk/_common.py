"""What TopKConv and Dynamic-k share: argument checks, chunk planning and the paper."""

from __future__ import annotations

import numbers
from typing import cast

import torch
from torch import Tensor

TOPK_CRITERIA: tuple[str, ...] = ("max", "sum", "neuron")

# Default working-set budget of one chunk of temporaries. On CPU, small forward chunks stay in
# cache (the responses are read three times), while backward chunks feed larger matrix products;
# measured on a 512->512 4x4 layer at batch 128, these were the fastest. Accelerators prefer
# fewer, larger kernels.
_CPU_FORWARD_CHUNK_BYTES = 4 * 2**20
_CPU_BACKWARD_CHUNK_BYTES = 16 * 2**20
_ACCEL_CHUNK_BYTES = 64 * 2**20


# --------------------------------------------------------------------------- validation helpers


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_positive(name: str, value: object) -> int:
    if not _is_int(value) or value < 1:  # type: ignore[operator]
        raise ValueError(f"{name}={value!r} must be an int >= 1")
    return int(cast(int, value))


def _pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2 or not all(_is_int(v) and v >= minimum for v in items):
        raise ValueError(f"{name}={value!r} must be an int >= {minimum} or a pair of them")
    return int(items[0]), int(items[1])


def _check_criterion(criterion: object) -> str:
    if criterion not in TOPK_CRITERIA:
        raise ValueError(f"criterion={criterion!r} must be one of {list(TOPK_CRITERIA)}")
    return criterion  # type: ignore[return-value]


def _check_k(k: object, limit: int, what: str) -> int:
    if not _is_int(k) or not 1 <= k <= limit:  # type: ignore[operator]
        raise ValueError(f"k={k!r} must be in [1, {what}={limit}]")
    return int(cast(int, k))


def _chunk_budget(chunk_bytes: int | None, device: torch.device, backward: bool = False) -> int:
    if chunk_bytes is not None:
        return _check_positive("chunk_bytes", chunk_bytes)
    if device.type != "cpu":
        return _ACCEL_CHUNK_BYTES
    return _CPU_BACKWARD_CHUNK_BYTES if backward else _CPU_FORWARD_CHUNK_BYTES


def _plan(budget: int, n_samples: int, n_channels: int, bytes_per_channel: int) -> tuple[int, int]:
    """(samples, channels) per chunk so that samples * channels * bytes_per_channel <= budget.

    Whole samples first (fewer, larger batched products), then split channels when even one
    sample's temporaries exceed the budget; never below one sample and one channel.
    """
    bytes_per_channel = max(1, bytes_per_channel)  # an empty batch still plans one chunk
    per_sample = n_channels * bytes_per_channel
    if per_sample <= budget:
        return max(1, min(n_samples, budget // per_sample)), n_channels
    return 1, max(1, min(n_channels, budget // bytes_per_channel))


def _ranges(total: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(total, start + step)) for start in range(0, total, step)]


def _conv_geometry(
    x: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int]
) -> tuple[int, int]:
    if weight.dim() != 4:
        raise ValueError(f"weight shape {tuple(weight.shape)} must be (C_out, C_in, kh, kw)")
    if x.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"input shape {tuple(x.shape)} must be (N, C_in={weight.shape[1]}, H, W)"
        )
    h_out = (x.shape[2] + 2 * padding[0] - weight.shape[2]) // stride[0] + 1
    w_out = (x.shape[3] + 2 * padding[1] - weight.shape[3]) // stride[1] + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"input spatial size {tuple(x.shape[2:])} is smaller than kernel "
            f"{tuple(weight.shape[2:])} with padding {padding}"
        )
    return h_out, w_out

_PAPER = ("Eigen, Sadovnik: TopKConv: Increased Adversarial Robustness Through Deeper "
          "Interpretability (ICMLA 2021)")

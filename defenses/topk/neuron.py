"""TKC-neuron with its BatchNorm: pruned channels are exactly 0 at the activation.

In the reference code the activation follows the top-k layer directly, so a pruned channel reaches
the ReLU as 0. Our backbones put BatchNorm between conv and activation; a plain BN would turn the
zeros into BN(0) = beta - gamma * mu / sigma (not 0), and the zeros would drag every channel's
batch mean and variance towards 0. Here BN normalises only what survived: per channel, mean and
variance over the (sample, position) entries of the samples that kept it, and pruned entries are
set to 0 after the affine map. Running statistics follow ``nn.BatchNorm2d`` (unbiased variance,
momentum), updated only for channels some sample kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses.topk._common import _check_k, _check_positive, _pair


def _neuron_keep(y: Tensor, k: int) -> Tensor:
    """Bool (N, C): the k channels with the largest spatial max, per sample (ranking only)."""
    scores = y.detach().amax(dim=(2, 3))
    top = scores.topk(k, dim=1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)


def masked_batch_norm(y: Tensor, keep: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """``bn`` applied to the kept (sample, channel) maps only; the others come out exactly 0.

    Args:
        y: (N, C, H, W).
        keep: bool (N, C), True = the channel survived for that sample.
        bn: supplies eps, momentum, the affine parameters and the running statistics (updated in
            training mode for the channels that at least one sample kept).
    """
    mask = keep[:, :, None, None]
    if bn.training:
        weight = mask.to(y.dtype)
        count = weight.sum(dim=(0, 2, 3)) * (y.shape[2] * y.shape[3])  # entries per channel
        seen = count > 0
        safe = count.clamp(min=1)
        mean = (y * weight).sum(dim=(0, 2, 3)) / safe
        centred = y - mean.view(1, -1, 1, 1)
        var = (centred.square() * weight).sum(dim=(0, 2, 3)) / safe
        if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
            with torch.no_grad():
                assert bn.num_batches_tracked is not None
                bn.num_batches_tracked.add_(1)
                momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
                unbiased = var * count / (count - 1).clamp(min=1)
                bn.running_mean[seen] = torch.lerp(bn.running_mean[seen], mean[seen], momentum)
                bn.running_var[seen] = torch.lerp(bn.running_var[seen], unbiased[seen], momentum)
    else:
        assert bn.running_mean is not None and bn.running_var is not None
        mean, var = bn.running_mean, bn.running_var
        centred = y - mean.view(1, -1, 1, 1)
    out = centred * torch.rsqrt(var + bn.eps).view(1, -1, 1, 1)
    if bn.affine:
        out = out * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    # where(): pruned entries are exact zeros and pass no gradient.
    return torch.where(mask, out, 0.0)


class TopKNeuronConvBN(nn.Module):
    """TKC-neuron followed by BatchNorm over the kept channels (Eigen & Sadovnik, "TopKConv").

    An ordinary conv; per sample, the k output channels with the largest spatial max of the conv
    output are kept. BatchNorm (``bn``, an ``nn.BatchNorm2d`` holding the usual parameters and
    buffers) is computed over the kept channels only, and pruned channels are exactly 0 after it,
    i.e. at the activation's input, as in the paper's network where the activation follows the
    layer directly.

    Args:
        in_channels: C_in >= 1.
        out_channels: C_out >= 1.
        kernel_size: int or (kh, kw).
        k: output channels kept per sample, in [1, out_channels].
        stride: int or pair, >= 1.
        padding: int or pair, >= 0 (zeros).

    Shape:
        Input (N, C_in, H, W); output (N, C_out, H', W') as ``nn.Conv2d``.

    Examples::

        >>> unit = TopKNeuronConvBN(16, 32, 3, k=3, padding=1)
        >>> y = unit(torch.randn(4, 16, 8, 8))
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        k: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        out_channels = _check_positive("out_channels", out_channels)
        self.k = _check_k(k, out_channels, "out_channels")
        self.conv = nn.Conv2d(
            _check_positive("in_channels", in_channels),
            out_channels,
            _pair("kernel_size", kernel_size, 1),
            _pair("stride", stride, 1),
            _pair("padding", padding, 0),
            bias=False,  # BN's shift replaces it
        )
        self.bn = nn.BatchNorm2d(out_channels)

    def selection_mask(self, x: Tensor) -> Tensor:
        """Bool (N, C_out): True = the channel is kept for that sample."""
        with torch.no_grad():
            return _neuron_keep(self.conv(x), self.k)

    def forward(self, x: Tensor) -> Tensor:
        y = F.conv2d(x, self.conv.weight, None, self.conv.stride, self.conv.padding)
        return masked_batch_norm(y, _neuron_keep(y, self.k), self.bn)

    def extra_repr(self) -> str:
        return f"k={self.k}"

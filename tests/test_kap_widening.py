"""KAP's widening rule (Bashivan et al., appendix A.3), both readings, counted by hand.

A strided KAP divides the channels by S in 1D and by S^2 in 2D. "area" (default) widens each
conv by that factor, so after KAP every layer has its nominal width; "stride" widens by S as the
appendix words it, so after a 2D KAP a layer has nominal / S channels.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from defenses import build_model
from defenses.kap import kap_width_factor


def _conv_out(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def _fc_in(model: nn.Module) -> list[int]:
    return [m.in_features for m in model.modules() if isinstance(m, nn.Linear)]


def _kap(backbone: str, in_channels: int, **params) -> nn.Module:
    return build_model(
        backbone,
        num_classes=10,
        in_channels=in_channels,
        defense="kap",
        defense_params={"kernel_size": 2, "stride": 2, "dims": 2, **params},
    )


def test_width_factor_of_both_readings():
    assert kap_width_factor(3, 2) == 9 and kap_width_factor(3, 2, "area") == 9  # S^2
    assert kap_width_factor(3, 2, "stride") == 3  # S
    assert kap_width_factor(3, 1, "area") == kap_width_factor(3, 1, "stride") == 3  # 1D: S either way
    # "kernel": the appendix's sentence word for word, K whatever S and dims are
    assert kap_width_factor(1, 2, "kernel", kernel_size=3) == 3 and kap_width_factor(2, 1, "kernel", kernel_size=4) == 4
    with pytest.raises(ValueError, match="widen='kernel' needs the kernel_size"):
        kap_width_factor(2, 2, "kernel")
    with pytest.raises(ValueError, match=r"widen='k' must be one of \['area', 'stride', 'kernel'\]"):
        kap_width_factor(2, 2, "k")


def test_small_cnn_channel_counts_area_reading():
    # small_cnn: nominal 32-64-128. S = 2, 2D: each conv x S^2 = 4 -> 128, 256, 512; KAP / 4 -> 32,
    # 64, 128, so the classifier sees 128 features as without KAP.
    model = _kap("small_cnn", 1)
    assert _conv_out(model) == [128, 256, 512]
    assert _fc_in(model) == [128]
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_small_cnn_channel_counts_kernel_reading():
    # K = 3, S = 1 (the space's defaults), 2D: KAP removes nothing, each conv is widened by K = 3:
    # 32*3 = 96, 64*3 = 192, 128*3 = 384, kept by KAP, so the classifier sees 384 features.
    model = _kap("small_cnn", 1, kernel_size=3, stride=1, widen="kernel")
    assert _conv_out(model) == [96, 192, 384]
    assert _fc_in(model) == [384]
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    # K = S = 2: the same network as the "stride" reading (64, 128, 256; KAP / 4 -> classifier 64).
    model = _kap("small_cnn", 1, widen="kernel")
    assert _conv_out(model) == [64, 128, 256] and _fc_in(model) == [64]


def test_small_cnn_channel_counts_literal_reading():
    # Widen by S = 2 only: convs 64, 128, 256; KAP / S^2 = 4 -> 16, 32, 64; classifier in 64.
    model = _kap("small_cnn", 1, widen="stride")
    assert _conv_out(model) == [64, 128, 256]
    assert _fc_in(model) == [64]
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(("widen", "conv_factor", "after_kap"), [("area", 4, 1.0), ("stride", 2, 0.5)])
def test_resnet18_channel_counts(widen, conv_factor, after_kap):
    # ResNet-18 stem 64, stages 64-128-256-512 (3 projection shortcuts). Convs: stem, 4 per stage
    # + a 1x1 shortcut in stages 2-4 = 1 + 4*4 + 3 = 20. Area: 64*4 = 256 ... 512*4 = 2048;
    # literal: 64*2 = 128 ... 512*2 = 1024. The head sees 512 (area) or 512/2 = 256 (literal).
    model = _kap("resnet18", 3, widen=widen)
    convs = _conv_out(model)
    assert len(convs) == 20
    assert convs[0] == 64 * conv_factor and convs[-1] == 512 * conv_factor
    assert sorted(set(convs)) == [c * conv_factor for c in (64, 128, 256, 512)]
    assert _fc_in(model) == [int(512 * after_kap)]
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_stride_one_is_the_same_network_under_both_readings():
    a = build_model("small_cnn", num_classes=10, in_channels=1, defense="kap", defense_params={"widen": "area"})
    b = build_model("small_cnn", num_classes=10, in_channels=1, defense="kap", defense_params={"widen": "stride"})
    assert _conv_out(a) == _conv_out(b) == [32, 64, 128]


def test_bad_widen_is_one_clear_error():
    with pytest.raises(ValueError, match=r"widen='s' must be one of \['area', 'stride', 'kernel'\]"):
        _kap("small_cnn", 1, widen="s")

"""TopKConv as in Eigen & Sadovnik (ICMLA 2021): TopKConv + Dynamic-k heads, VGG-16's flatten head,
TKC-neuron's BatchNorm over the kept channels, and the reproduction specs.

Expected values are worked out by hand from the paper's numbers and the layer formulas (written out
next to each assertion), never taken from the code's output.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from defenses import DynamicKLinear, TopKConv2d, build_model
from defenses.topk import TopKNeuronConvBN, masked_batch_norm, topk_conv2d
from study.config import ConfigError, parse_trial_config
from study.data import dataset_info
from study.spec import load_spec, trial_config_for
from study.trial import make_model


def _names(model: nn.Module, cls: type) -> dict[str, int]:
    return {n: m.k for n, m in model.named_modules() if isinstance(m, cls)}


# --------------------------------------------------------------------------- placement per backbone


def test_default_is_topkconv_in_the_last_two_convs_plus_dynamic_k_heads_vgg16() -> None:
    model = build_model("vgg16", num_classes=10, in_channels=3, defense="topkconv")
    # Config D: 64,64,M,128,128,M,256x3,M,512x3,M,512x3,M -> the last two convs are features 15, 16.
    # k = round(0.1 * 512) = 51 input channels.
    assert _names(model, TopKConv2d) == {"net.features.15.unit.conv": 51, "net.features.16.unit.conv": 51}
    # GAP head: fc1 sees 512 features, k = round(250 / 25088 * 512) = round(5.10) = 5; fc2: 10 of 512.
    assert _names(model, DynamicKLinear) == {"net.head.fc.fc1": 5, "net.head.fc.fc2": 10}
    assert not [m for m in model.modules() if type(m) is nn.Linear]


def test_placement_on_resnets() -> None:
    r20 = build_model("resnet20", num_classes=10, in_channels=3, defense="topkconv")
    # Last block of stage 3, both main-path convs, 64 inputs: k = round(6.4) = 6.
    assert _names(r20, TopKConv2d) == {"net.layer3.2.unit1.conv": 6, "net.layer3.2.unit2.conv": 6}
    # The single classifier is the last dense layer: k = round(10 / 512 * 64) = round(1.25) = 1.
    assert _names(r20, DynamicKLinear) == {"net.head.fc": 1}
    r18 = build_model("resnet18", num_classes=10, in_channels=3, defense="topkconv")
    assert _names(r18, TopKConv2d) == {"net.layer4.1.unit1.conv": 51, "net.layer4.1.unit2.conv": 51}
    assert _names(r18, DynamicKLinear) == {"net.head.fc": 10}  # 10 of 512, the paper's last layer


def test_topkconv_alone_keeps_plain_dense_layers() -> None:
    model = build_model(
        "vgg16", num_classes=10, in_channels=3, defense="topkconv", defense_params={"dynamic_k_heads": False}
    )
    assert list(_names(model, TopKConv2d)) == ["net.features.15.unit.conv", "net.features.16.unit.conv"]
    assert not _names(model, DynamicKLinear)
    assert [n for n, m in model.named_modules() if type(m) is nn.Linear] == ["net.head.fc.fc1", "net.head.fc.fc2"]
    with pytest.raises(ValueError, match="k_dense_last sets a Dynamic-k head's k: it needs dynamic_k_heads=True"):
        build_model(
            "vgg16",
            num_classes=10,
            in_channels=3,
            defense="topkconv",
            defense_params={"dynamic_k_heads": False, "k_dense_last": 0.1},
        )


def test_each_dense_layer_takes_its_own_k() -> None:
    torch.manual_seed(0)
    model = build_model(
        "vgg16",
        num_classes=10,
        in_channels=3,
        defense="topkconv",
        defense_params={"k_dense_hidden": 7, "k_dense_last": 0.25},
    )
    fc1, fc2 = model.net.head.fc.fc1, model.net.head.fc.fc2
    assert (fc1.k, fc2.k) == (7, 128)  # an int is a count; 0.25 * 512 = 128
    # Applied: output j = sum of the 7 largest products W_ji x_i, plus b_j (one row by hand).
    x = torch.randn(1, 512)
    products = sorted((fc1.weight[3] * x[0]).tolist(), reverse=True)
    assert fc1(x)[0, 3].item() == pytest.approx(sum(products[:7]) + fc1.bias[3].item(), abs=1e-5)
    with pytest.raises(ValueError, match=r"k=600 must be in \[1, in_features=512\]"):
        build_model("vgg16", num_classes=10, in_channels=3, defense="topkconv", defense_params={"k_dense_hidden": 600})


# --------------------------------------------------------------------------- VGG-16's paper head


def test_paper_vgg16_at_224_has_the_papers_dense_layers_and_parameter_count() -> None:
    model = build_model("vgg16", num_classes=10, in_channels=3, defense="topkconv", head="flatten", input_size=224)
    fc1, fc2 = model.net.head.fc.fc1, model.net.head.fc.fc2
    # 224 / 2**5 = 7: the flattened map is 512 * 7 * 7 = 25,088 features; k = 250 and 10 of 512.
    assert (fc1.in_features, fc1.k, fc2.in_features, fc2.k) == (25088, 250, 512, 10)
    # By hand: conv weights (no bias, BN follows) 9 * sum(c_in * c_out) =
    #   9 * (3*64 + 64*64 + 64*128 + 128*128 + 128*256 + 2*256*256 + 256*512 + 5*512*512) = 14,710,464;
    # BN gamma+beta 2 * (2*64 + 2*128 + 3*256 + 6*512) = 8,448; fc1 25,088*512 + 512 = 12,845,568;
    # fc2 512*10 + 10 = 5,130. TopKConv and Dynamic-k add no parameters.
    expected = 14_710_464 + 8_448 + 12_845_568 + 5_130
    assert sum(p.numel() for p in model.parameters()) == expected == 27_569_610
    plain = build_model("vgg16", num_classes=10, in_channels=3, head="flatten", input_size=224)
    assert sum(p.numel() for p in plain.parameters()) == expected


def test_flatten_head_runs_where_the_input_allows() -> None:
    model = build_model("vgg16", num_classes=4, in_channels=3, head="flatten", input_size=64, width=0.125)
    assert model.net.head.fc.fc1.in_features == 64 * 2 * 2  # 64 / 32 = 2: a 2x2 map of 64 channels
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 4)


@pytest.mark.parametrize(
    ("backbone", "kwargs", "needle"),
    [
        ("vgg16", {"input_size": 8}, "head='flatten' needs inputs of at least 32x32 for vgg16"),
        ("vgg16", {}, "head='flatten' needs the input size"),
        ("resnet18", {"input_size": 224}, "head='flatten' is not offered for resnet18; allowed: gap"),
        ("small_cnn", {"input_size": 8}, "head='flatten' is not offered for small_cnn"),
    ],
)
def test_flatten_head_refused_with_one_line(backbone: str, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        build_model(backbone, num_classes=10, in_channels=3, head="flatten", **kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_trial_config_checks_the_head_against_the_dataset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_trial_config({"model": {"backbone": "vgg16", "head": "flatten"}})  # digits: 8x8
    assert str(info.value).startswith("model.head: head='flatten' needs inputs of at least 32x32")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="model.head: head='flatten' is not offered for resnet18"):
        parse_trial_config({"model": {"backbone": "resnet18", "head": "flatten"}})
    config = parse_trial_config(
        {"data": {"name": "cifar10", "data_dir": str(tmp_path)}, "model": {"backbone": "vgg16", "head": "flatten"}}
    )
    assert make_model(config, dataset_info(config.data)).net.head.fc.fc1.in_features == 512  # 32/32 = 1


# --------------------------------------------------------------------------- TKC-neuron + BatchNorm


def _neuron_unit() -> tuple[TopKNeuronConvBN, Tensor]:
    """1x1 conv with weights (1, 2, -1), k = 2, gamma (1, 2, 3), beta (0.5, -1, 0.25)."""
    unit = TopKNeuronConvBN(1, 3, 1, k=2)
    with torch.no_grad():
        unit.conv.weight.copy_(torch.tensor([1.0, 2.0, -1.0]).view(3, 1, 1, 1))
        unit.bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        unit.bn.bias.copy_(torch.tensor([0.5, -1.0, 0.25]))
    x = torch.tensor([[1.0, 3.0], [-1.0, -2.0]]).view(2, 1, 1, 2)
    return unit, x


def test_pruned_channels_are_zero_after_batchnorm_and_out_of_its_statistics() -> None:
    unit, x = _neuron_unit()
    # Conv outputs: sample 0: ch0 (1, 3), ch1 (2, 6), ch2 (-1, -3) -> maxima 3, 6, -1: keep ch0, ch1.
    #               sample 1: ch0 (-1, -2), ch1 (-2, -4), ch2 (1, 2) -> maxima -1, -2, 2: keep ch2, ch0.
    # Statistics over kept entries only (biased variance, as BN normalises with):
    #   ch0: (1, 3, -1, -2): mean 0.25, var ((.75)^2 + (2.75)^2 + (1.25)^2 + (2.25)^2) / 4 = 3.6875
    #   ch1: (2, 6): mean 4, var 4;   ch2: (1, 2): mean 1.5, var 0.25
    eps = 1e-5
    gamma, beta = (1.0, 2.0, 3.0), (0.5, -1.0, 0.25)
    stats = ((0.25, 3.6875), (4.0, 4.0), (1.5, 0.25))

    def bn(value: float, c: int) -> float:
        mean, var = stats[c]
        return (value - mean) / math.sqrt(var + eps) * gamma[c] + beta[c]

    expected = torch.tensor(
        [
            [[bn(1, 0), bn(3, 0)], [bn(2, 1), bn(6, 1)], [0.0, 0.0]],
            [[bn(-1, 0), bn(-2, 0)], [0.0, 0.0], [bn(1, 2), bn(2, 2)]],
        ]
    ).view(2, 3, 1, 2)
    out = unit.train()(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert out[0, 2].eq(0).all() and out[1, 1].eq(0).all()  # exactly 0, not beta - gamma*mu/sigma
    # Running statistics (momentum 0.1, unbiased variance var * n / (n - 1), from mean 0 / var 1):
    #   mean: 0.1 * (0.25, 4, 1.5);  var: 0.9 + 0.1 * (3.6875 * 4/3, 4 * 2/1, 0.25 * 2/1)
    torch.testing.assert_close(unit.bn.running_mean, torch.tensor([0.025, 0.4, 0.15]))
    torch.testing.assert_close(unit.bn.running_var, torch.tensor([0.9 + 3.6875 * 4 / 30, 1.7, 0.95]))
    # Eval uses those running statistics; pruned channels are still exactly 0.
    ev = unit.eval()(x)
    rm, rv = unit.bn.running_mean, unit.bn.running_var
    assert ev[0, 2].eq(0).all() and ev[1, 1].eq(0).all()
    assert ev[0, 0, 0, 1].item() == pytest.approx((3 - rm[0].item()) / math.sqrt(rv[0].item() + eps) + 0.5)


def test_the_old_composition_leaked_bn_of_zero_into_the_relu() -> None:
    # TKC-neuron zeroing before a plain BatchNorm: the pruned ch2 of sample 0 became
    # beta - gamma * mu / sigma with mu, sigma over all four entries of ch2 (0, 0, 1, 2).
    unit, x = _neuron_unit()
    y = topk_conv2d(x, unit.conv.weight, None, 2, "neuron")
    plain = nn.BatchNorm2d(3).train()
    with torch.no_grad():
        plain.weight.copy_(unit.bn.weight)
        plain.bias.copy_(unit.bn.bias)
    leaked = plain(y)[0, 2, 0, 0].item()
    mu, var = 0.75, (0.75**2 * 2 + 0.25**2 + 1.25**2) / 4  # entries 0, 0, 1, 2
    assert leaked == pytest.approx(0.25 - 3 * mu / math.sqrt(var + 1e-5), rel=1e-5)
    assert leaked != 0.0


def test_a_channel_no_sample_keeps_leaves_its_running_statistics_alone() -> None:
    unit, x = _neuron_unit()
    unit.k = 1  # sample 0 keeps ch1 (max 6), sample 1 keeps ch2 (max 2): ch0 is pruned everywhere
    out = unit.train()(x)
    assert out[:, 0].eq(0).all()
    assert unit.bn.running_mean[0].item() == 0.0 and unit.bn.running_var[0].item() == 1.0
    # ch1 from (2, 6) alone: mean 4 -> running mean 0.4.
    assert unit.bn.running_mean[1].item() == pytest.approx(0.4)


def test_masked_batch_norm_gradients() -> None:
    bn = nn.BatchNorm2d(4, track_running_stats=False).double()
    keep = torch.tensor([[True, False, True, True], [True, True, False, True], [False, True, True, True]])
    y = torch.randn(3, 4, 2, 2, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: masked_batch_norm(t, keep, bn), (y,))


def test_neuron_in_a_backbone_gives_exact_zeros_at_the_relu() -> None:
    torch.manual_seed(0)
    model = build_model(
        "small_cnn",
        num_classes=10,
        in_channels=1,
        defense="topkconv",
        defense_params={"criterion": "neuron", "k": 0.25},
    )
    blocks = [model.net.features[1], model.net.features[3]]
    assert [type(b.unit.conv) for b in blocks] == [TopKNeuronConvBN] * 2
    assert [type(b.unit.bn) for b in blocks] == [nn.Identity] * 2  # the unit normalises itself
    assert [b.unit.conv.k for b in blocks] == [16, 32]  # 25% of 64 and of 128 output channels
    seen: list[tuple[Tensor, Tensor]] = []
    for block in blocks:
        block.unit.conv.register_forward_hook(
            lambda mod, inp, out: seen.append((mod.selection_mask(inp[0]), out.detach()))
        )
    model.train()(torch.rand(6, 1, 8, 8))
    for keep, out in seen:  # the unit's output is the ReLU's input (post_conv is Identity)
        assert out[~keep].eq(0).all()
        assert out[keep].ne(0).any(dim=(1, 2)).all()


# --------------------------------------------------------------------------- reproduction specs


def test_reproduction_specs_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    digits = load_spec("reproduce_topkconv_digits")
    assert (digits.data.name, digits.model.backbone) == ("digits", "small_cnn")
    assert digits.defenses["topkconv"] == {"k": 0.1, "layers": 2, "dynamic_k_heads": True}
    # CINIC-10 as distributed: train/, valid/, test/ with 10 class folders (no image is opened).
    for split in ("train", "valid", "test"):
        for c in range(10):
            (tmp_path / "cinic10" / split / f"class{c}").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    spec = load_spec("reproduce_topkconv")
    assert (spec.data.name, spec.data.image_size, spec.model.backbone, spec.model.head) == (
        "imagefolder",
        224,
        "vgg16",
        "flatten",
    )
    assert spec.training.recipe == "standard"
    # FGSM and 16-step PGD at 8/255 with step 0.75/255 (the paper's attacks).
    pgd = next(a for a in spec.search_eval.attacks if a.name == "pgd")
    assert (pgd.steps, pgd.step_size) == (16, pytest.approx(0.75 / 255, rel=1e-3))
    assert spec.search_eval.eps == pytest.approx(8 / 255, rel=1e-3)
    assert {a.name for a in spec.search_eval.attacks} == {"fgsm", "pgd"}
    point = next(p for p in spec.conditional_space().paper_default_configs() if p["defense"] == "topkconv")
    config = trial_config_for(spec, point)
    model = make_model(config, dataset_info(config.data))
    assert _names(model, TopKConv2d) == {"net.features.15.unit.conv": 51, "net.features.16.unit.conv": 51}
    assert _names(model, DynamicKLinear) == {"net.head.fc.fc1": 250, "net.head.fc.fc2": 10}


def test_layerset_checks_the_new_sites() -> None:
    from defenses import LayerSet

    with pytest.raises(ValueError, match="last_linear=3 must be callable or None"):
        LayerSet(last_linear=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="last_conv_norm=1 must be True or False"):
        LayerSet(last_conv_norm=1)  # type: ignore[arg-type]


def test_neuron_unit_keeping_every_channel_is_conv_then_batchnorm() -> None:
    torch.manual_seed(0)
    unit = TopKNeuronConvBN(3, 5, 3, k=5, padding=1).train()
    conv, bn = nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5).train()
    conv.load_state_dict(unit.conv.state_dict())
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(unit(x), bn(conv(x)))
    torch.testing.assert_close(unit.bn.running_mean, bn.running_mean)
    torch.testing.assert_close(unit.bn.running_var, bn.running_var)

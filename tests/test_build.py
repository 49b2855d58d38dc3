"""build_model: every backbone x defense builds and trains; placement, widening, errors."""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
from torch import Tensor, nn

from defenses import (
    DEFENSE_PARAMS,
    ActivationNoise,
    ChannelActivationSuppression,
    DynamicKLinear,
    KernelActivation,
    KernelAveragePool,
    KWinnersTakeAll,
    LayerSet,
    Normalize,
    TopKConv2d,
    build_model,
    cas_aux_loss,
    cas_labels,
    list_backbones,
    list_defenses,
    resolve_k,
)

# (in_channels, image size, width): tiny but structurally the real networks.
SHAPES = {
    "small_cnn": (1, 8, 1),
    "resnet20": (3, 16, 1),
    "resnet18": (3, 32, 0.125),
    "vgg16": (3, 32, 0.125),
}
# A build-level parameter per defense so the placement code paths are exercised, not only defaults.
PARAMS = {
    None: {},
    "kap": {"kernel_size": 3, "stride": 1, "sigma": 0.1},
    "noise": {"sigma": 0.1},
    "kwta": {"gamma": 0.2, "gamma_start": 0.2, "gamma_step": 0.005, "gamma_every": 2},
    "kaf": {"dictionary_size": 8},
    "topkconv": {"k": 0.25, "criterion": "max", "layers": 2},
    "dynamic_k": {"k": 0.5},
    "cas": {"placement": "last2", "beta": 2.0, "recipe": "pgd"},
}
# Any other registered defense (a plug-in) builds with its own defaults: no list to keep here.
PARAMS.update({name: {} for name in list_defenses() if name not in PARAMS})
NUM_CLASSES = 5


def _build(backbone: str, defense: str | None, **params: object) -> tuple[nn.Module, Tensor]:
    in_ch, size, width = SHAPES[backbone]
    torch.manual_seed(0)
    model = build_model(
        backbone, num_classes=NUM_CLASSES, in_channels=in_ch, defense=defense,
        defense_params=params or PARAMS[defense], width=width,
    )
    return model, torch.rand(2, in_ch, size, size)


def _modules(model: nn.Module, cls: type) -> list[nn.Module]:
    # remove_duplicate=False: a module shared by two sites must show up twice here
    return [m for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, cls)]


def test_params_cover_every_defense() -> None:
    assert set(PARAMS) - {None} == set(DEFENSE_PARAMS) - {"none"} == set(list_defenses())
    assert set(SHAPES) == set(list_backbones())
    for defense, params in PARAMS.items():
        assert set(params) <= set(DEFENSE_PARAMS.get(defense or "none", ()))


@pytest.mark.parametrize("defense", list(PARAMS))
@pytest.mark.parametrize("backbone", sorted(SHAPES))
def test_builds_and_trains_one_step(backbone: str, defense: str | None) -> None:
    model, x = _build(backbone, defense)
    y = torch.tensor([0, NUM_CLASSES - 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    with cas_labels(model, y) if defense == "cas" else contextlib.nullcontext():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        if defense == "cas":
            loss = loss + 2.0 * cas_aux_loss(model, y)
    assert logits.shape == (2, NUM_CLASSES)
    assert bool(torch.isfinite(loss))
    opt.zero_grad()
    loss.backward()
    opt.step()
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert sum(moved) >= 0.9 * len(moved), f"only {sum(moved)}/{len(moved)} parameters moved"
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, NUM_CLASSES) and bool(torch.isfinite(out).all())


def test_none_string_is_the_baseline() -> None:
    a = build_model("small_cnn", num_classes=3, in_channels=1, defense=None)
    b = build_model("small_cnn", num_classes=3, in_channels=1, defense="none")
    assert a.state_dict().keys() == b.state_dict().keys()
    assert not _modules(a, KernelAveragePool)


def test_normalisation_is_the_first_layer() -> None:
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=3, in_channels=3, mean=mean, std=std).eval()
    assert isinstance(model[0], Normalize)
    x = torch.rand(2, 3, 8, 8)
    expected = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(expected))
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())


def test_normalize_identity_and_errors() -> None:
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(Normalize(channels=3)(x), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="in_channels=1"):
        build_model("small_cnn", num_classes=3, in_channels=1, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std"):
        Normalize(mean=(0.0,), std=(0.0,))


@pytest.mark.parametrize(("dims", "factor"), [(1, 2), (2, 4)])
def test_kap_stride_widens_convs_and_keeps_nominal_channels(dims: int, factor: int) -> None:
    model = build_model(
        "small_cnn", num_classes=3, in_channels=1, defense="kap",
        defense_params={"kernel_size": 3, "stride": 2, "dims": dims},
    )
    seen: dict[str, tuple[int, ...]] = {}
    block = model.net.features[0]
    block.unit.conv.register_forward_hook(lambda m, i, o: seen.__setitem__("conv", o.shape))
    block.unit.register_forward_hook(lambda m, i, o: seen.__setitem__("post", o.shape))
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    assert seen["conv"][1] == 32 * factor and seen["post"][1] == 32
    assert block.unit.bn.num_features == 32 * factor
    assert len(_modules(model, KernelAveragePool)) == 3


def test_kap_resnet_sites_include_shortcuts_and_noise() -> None:
    model = build_model(
        "resnet18", num_classes=10, in_channels=3, defense="kap", width=0.125,
        defense_params={"sigma": 0.1, "noise_at_eval": True},
    )
    # stem + 16 block convs + 3 projection shortcuts, each followed by its own KAP and noise
    assert len(_modules(model, KernelAveragePool)) == 20
    noise = _modules(model, ActivationNoise)
    assert len(noise) == 20 and all(n.at_eval for n in noise)
    plain = build_model("resnet18", num_classes=10, in_channels=3, defense="kap", width=0.125)
    assert not _modules(plain, ActivationNoise)


@pytest.mark.parametrize(("width", "stride"), [(3 / 32, 2), (1.0, 3)])
def test_kap_widening_always_maps_back_to_the_nominal_channels(width: float, stride: int) -> None:
    # S^2 * C widened channels always lie on an (S a) x (S b) grid with a * b = C, so strided
    # 2D KAP gives back exactly C (3 from 12 at stride 2; 32 from 288 at stride 3, which the
    # squarest grid 16 x 18 could not).
    from defenses import KernelAveragePool

    model = build_model(
        "small_cnn", num_classes=3, in_channels=1, width=width, defense="kap",
        defense_params={"kernel_size": 3, "stride": stride, "dims": 2},
    )
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    kaps = [m for m in model.modules() if isinstance(m, KernelAveragePool)]
    assert kaps and all(k.stride == stride for k in kaps)


@pytest.mark.parametrize(
    ("backbone", "defense", "cls", "count"),
    [
        ("resnet20", "kaf", KernelActivation, 19 + 0),  # stem + 2 per block x 9 blocks
        ("vgg16", "kwta", KWinnersTakeAll, 13 + 1),  # every conv + the FC head's activation
        ("vgg16", "kaf", KernelActivation, 13 + 1),
        ("resnet18", "kwta", KWinnersTakeAll, 1 + 2 * 8),
        ("small_cnn", "noise", ActivationNoise, 3),
    ],
)
def test_one_module_instance_per_site(
    backbone: str, defense: str, cls: type, count: int
) -> None:
    model, _ = _build(backbone, defense)
    found = _modules(model, cls)
    assert len(found) == count
    assert len({id(m) for m in found}) == count
    if defense in ("kwta", "kaf"):  # these replace every activation
        assert not _modules(model, nn.ReLU)


def test_kaf_head_activation_has_one_alpha_per_neuron() -> None:
    model, _ = _build("vgg16", "kaf")
    assert model.net.head.fc.act.alpha.shape == (64, 8)


def test_topkconv_replaces_the_last_convs() -> None:
    model, _ = _build("resnet18", "topkconv")
    names = [n for n, m in model.named_modules() if isinstance(m, TopKConv2d)]
    assert names == ["net.layer4.1.unit1.conv", "net.layer4.1.unit2.conv"]
    one, _ = _build("vgg16", "topkconv", k=0.25, layers=1)
    assert [n for n, m in one.named_modules() if isinstance(m, TopKConv2d)] == [
        "net.features.16.unit.conv"
    ]


def test_dynamic_k_in_every_fc_layer() -> None:
    vgg, _ = _build("vgg16", "dynamic_k")
    assert [n for n, m in vgg.named_modules() if isinstance(m, DynamicKLinear)] == [
        "net.head.fc.fc1", "net.head.fc.fc2",
    ]
    cnn, _ = _build("small_cnn", "dynamic_k")
    assert len(_modules(cnn, DynamicKLinear)) == 1 and not _modules(cnn, nn.Linear)


@pytest.mark.parametrize(
    ("placement", "sites"),
    [("last", ["net.layer4.1.post_block"]),
     ("last2", ["net.layer4.0.post_block", "net.layer4.1.post_block"])],
)
def test_cas_placement(placement: str, sites: list[str]) -> None:
    model, _ = _build("resnet18", "cas", placement=placement)
    found = [n for n, m in model.named_modules() if isinstance(m, ChannelActivationSuppression)]
    assert found == sites
    assert all(m.classifier.out_features == NUM_CLASSES for m in _modules(model, ChannelActivationSuppression))


def test_resolve_k() -> None:
    assert resolve_k(0.1, 512) == 51
    assert resolve_k(0.001, 64) == 1
    assert resolve_k(1.0, 64) == 64
    assert resolve_k(10, 64) == 10
    with pytest.raises(ValueError, match=r"k=70 must be in \[1, in_channels=64\]"):
        resolve_k(70, 64)
    for bad in (0, -1, 0.0, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="k="):
            resolve_k(bad, 64)  # type: ignore[arg-type]


def test_k_too_large_names_layer_and_channels() -> None:
    with pytest.raises(ValueError, match=r"k=600 must be in \[1, in_channels=512\] for TopKConv2d\(512->512\)"):
        build_model("resnet18", num_classes=10, in_channels=3, defense="topkconv",
                    defense_params={"k": 600})
    with pytest.raises(ValueError, match=r"k=200 must be in \[1, in_features=128\] for DynamicKLinear\(128->3\)"):
        build_model("small_cnn", num_classes=3, in_channels=1, defense="dynamic_k",
                    defense_params={"k": 200})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": "resnet50"}, "unknown backbone 'resnet50'; allowed: resnet18, resnet20, small_cnn, vgg16"),
        ({"defense": "kwat"}, "unknown defense 'kwat'; allowed: None, cas, dynamic_k, kaf"),
        ({"defense": "kwta", "defense_params": {"gama": 0.1}}, "'gama' for defense 'kwta'; allowed: gamma, mode"),
        ({"defense": None, "defense_params": {"k": 1}}, "unknown defense_params 'k'"),
        ({"defense": "cas", "defense_params": {"placement": "first"}}, "placement='first' must be one of"),
        ({"defense": "topkconv", "defense_params": {"layers": 0}}, "layers=0"),
        ({"defense": "topkconv", "defense_params": {"layers": 99}}, r"n_last_convs=99 must be in \[0, 3\]"),
        ({"defense": "kap", "defense_params": {"sigma": -0.1}}, "sigma=-0.1"),
        ({"defense": "kap", "defense_params": {"noise_at_eval": "yes"}}, "noise_at_eval='yes'"),
        ({"num_classes": 0}, "num_classes=0"),
        ({"width": 0}, "width=0"),
        ({"defense": "kwta", "defense_params": {"gamma": 1.5}}, "gamma"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    args = {"backbone": "small_cnn", "num_classes": 3, "in_channels": 1, **kwargs}
    backbone = args.pop("backbone")
    with pytest.raises(ValueError, match=match):
        build_model(backbone, **args)


def test_layer_keyword_names_match_constructors() -> None:
    """defense_params keys that reach a layer are that layer's constructor keywords."""
    passed_through = {
        "kap": (KernelAveragePool, {"sigma", "noise_at_eval", "widen"}),
        "noise": (ActivationNoise, set()),
        "kwta": (KWinnersTakeAll, {"gamma_start", "gamma_step", "gamma_every", "gamma_schedule", "gamma_hold",
                                   "gamma_hold_fraction", "gamma_final_fraction", "gamma_finetune_lr"}),
        "kaf": (KernelActivation, set()),
        "topkconv": (TopKConv2d, {"layers", "dynamic_k_heads", "k_dense_hidden", "k_dense_last"}),
        "dynamic_k": (DynamicKLinear, set()),
    }
    for defense, (cls, build_only) in passed_through.items():
        keywords = set(inspect.signature(cls).parameters)
        assert set(DEFENSE_PARAMS[defense]) - build_only <= keywords, defense


def test_layerset_validation() -> None:
    with pytest.raises(ValueError, match="conv_width=0"):
        LayerSet(conv_width=0)
    with pytest.raises(ValueError, match="n_block_out=-1"):
        LayerSet(n_block_out=-1)


def test_backbone_max_pool_without_autograd_skips_indices_and_keeps_values(monkeypatch) -> None:
    from defenses.backbones import MaxPool2x2

    # By hand: 3x3 -> 2x2 with ceil_mode, the last row/column windows hold only the real cells.
    x = torch.tensor([[1.0, 5.0, 2.0], [3.0, 4.0, -7.0], [-1.0, -2.0, -3.0]]).view(1, 1, 3, 3)
    expected = torch.tensor([[5.0, 2.0], [-1.0, -3.0]]).view(1, 1, 2, 2)
    torch.manual_seed(8)
    shapes = [(4, 3, 8, 8), (2, 5, 7, 7), (2, 2, 1, 6), (3, 4, 5, 2), (0, 3, 4, 4)]
    inputs = [torch.randn(*shape, dtype=torch.float64) for shape in shapes]
    reference = [nn.MaxPool2d(2, ceil_mode=True)(x) for x in inputs]
    grad_x = inputs[1].clone().requires_grad_()
    MaxPool2x2()(grad_x).sum().backward()  # with autograd: nn.MaxPool2d's own gradient
    ref_x = inputs[1].clone().requires_grad_()
    nn.MaxPool2d(2, ceil_mode=True)(ref_x).sum().backward()
    assert torch.equal(grad_x.grad, ref_x.grad)
    with pytest.raises(RuntimeError):  # an empty feature map is refused as nn.MaxPool2d refuses it
        MaxPool2x2()(torch.randn(1, 1, 0, 4))

    def no_pool(*args, **kwargs):
        raise AssertionError("a forward pass without autograd must not pay for max indices")

    monkeypatch.setattr(nn.functional, "max_pool2d", no_pool)
    pool = MaxPool2x2()
    assert torch.equal(pool(x), expected)
    for inp, ref in zip(inputs, reference, strict=True):
        assert torch.equal(pool(inp), ref)
    with pytest.raises(AssertionError, match="max indices"):
        pool(torch.randn(1, 1, 4, 4, requires_grad=True))
    for backbone in ("small_cnn", "vgg16"):
        pools = [m for m in build_model(backbone, num_classes=10, in_channels=1).modules() if isinstance(m, nn.MaxPool2d)]
        assert pools and all(type(m) is MaxPool2x2 for m in pools)

"""Gaussian KAF (Scardapane et al., Kafnets): formula, inits, bandwidths, lean vs naive gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import defenses.kaf as kaf_module
from defenses.kaf import KernelActivation, kaf_bandwidth, kaf_lean, kaf_naive, softplus_inverse


def _loop_kaf(x: torch.Tensor, alpha: torch.Tensor, d: torch.Tensor, gamma: float) -> torch.Tensor:
    """g_c(s) = sum_i alpha[c, i] exp(-gamma (s - d_i)^2), one scalar at a time."""
    out = torch.empty_like(x)
    flat_in, flat_out = x.reshape(x.shape[0], x.shape[1], -1), out.view(x.shape[0], x.shape[1], -1)
    for n in range(flat_in.shape[0]):
        for c in range(flat_in.shape[1]):
            for m in range(flat_in.shape[2]):
                s = flat_in[n, c, m].item()
                flat_out[n, c, m] = sum(
                    alpha[c, i].item() * math.exp(-gamma * (s - d[i].item()) ** 2) for i in range(d.numel())
                )
    return out


@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (4, 3)])
def test_forward_matches_formula(shape):
    torch.manual_seed(0)
    kaf = KernelActivation(3, dictionary_size=6, boundary=2.0).double()
    x = torch.randn(*shape, dtype=torch.float64) * 2
    expected = _loop_kaf(x, kaf.alpha.detach(), kaf.dictionary, float(kaf.gamma))
    torch.testing.assert_close(kaf(x), expected)
    assert kaf(x).shape == x.shape


def test_dictionary_and_bandwidth_rules():
    kaf = KernelActivation(2, dictionary_size=5, boundary=3.0)
    torch.testing.assert_close(kaf.dictionary, torch.tensor([-3.0, -1.5, 0.0, 1.5, 3.0]))
    spacing = 1.5
    assert math.isclose(float(kaf.gamma), 1 / (6 * spacing**2), rel_tol=1e-6)
    ref = KernelActivation(2, dictionary_size=5, boundary=3.0, bandwidth="reference")
    assert math.isclose(float(ref.gamma), 1 / (8 * spacing**2), rel_tol=1e-6)
    assert math.isclose(kaf_bandwidth(20, 3.0), 1 / (6 * (6 / 19) ** 2))
    assert kaf.alpha.shape == (2, 5)


@pytest.mark.parametrize(
    ("init", "fn"),
    [("relu", torch.relu), ("elu", F.elu), ("swish", lambda s: s * torch.sigmoid(s))],
)
def test_ridge_init_reproduces_activation_on_dictionary(init, fn):
    kaf = KernelActivation(4, dictionary_size=20, boundary=3.0, init=init).double()
    d = kaf.dictionary.view(1, 1, -1).expand(2, 4, -1).contiguous()  # evaluate at the dictionary
    # lambda = 1e-4 regularises, so the fit is close but not exact (worst at ReLU's kink).
    torch.testing.assert_close(kaf(d), fn(d), atol=5e-3, rtol=0)
    # Same alpha row for every channel.
    assert torch.equal(kaf.alpha[0], kaf.alpha[3])
    # Between the points the smooth inits stay close too (ReLU's kink is only approximated).
    if init != "relu":
        s = torch.linspace(-2.5, 2.5, 41, dtype=torch.float64).view(1, 1, -1).expand(1, 4, -1).contiguous()
        torch.testing.assert_close(kaf(s), fn(s), atol=3e-2, rtol=0)


def test_ridge_adds_lambda_on_diagonal_only():
    d = torch.linspace(-3, 3, 10, dtype=torch.float64)
    gamma = kaf_bandwidth(10, 3.0)
    kernel = torch.exp(-gamma * (d[:, None] - d[None, :]) ** 2)
    expected = torch.linalg.solve(kernel + 1e-4 * torch.eye(10, dtype=torch.float64), F.elu(d))
    kaf = KernelActivation(1, dictionary_size=10, boundary=3.0, init="elu")
    torch.testing.assert_close(kaf.alpha[0], expected.float())
    # The buggy variant (lambda added to every entry of K) gives a different alpha.
    buggy = torch.linalg.solve(kernel + 1e-4, F.elu(d))
    assert not torch.allclose(kaf.alpha[0], buggy.float(), rtol=1e-3, atol=1e-3)


def test_random_init_std():
    torch.manual_seed(0)
    kaf = KernelActivation(200, dictionary_size=20)
    assert abs(kaf.alpha.std().item() - kaf_module.RANDOM_INIT_STD) < 0.02


@pytest.mark.parametrize("trainable", [False, True, "per_channel"])
@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (3, 3)])
def test_gradcheck_lean(shape, trainable):
    torch.manual_seed(1)
    kaf = KernelActivation(
        3, dictionary_size=5, trainable_dictionary=bool(trainable), per_channel=trainable == "per_channel"
    ).double()
    if trainable == "per_channel":  # distinct rows, so a mix-up of channels shows
        with torch.no_grad():
            kaf.dictionary.add_(0.2 * torch.randn_like(kaf.dictionary))
            kaf.raw_gamma.add_(0.3 * torch.randn_like(kaf.raw_gamma))
    x = (torch.randn(*shape, dtype=torch.float64) * 2).requires_grad_()
    # Make dictionary/gamma leaf tensors that require grad in both cases, so gradcheck covers
    # every backward formula of the custom Function.
    params = (
        kaf.alpha.detach().clone().requires_grad_(),
        kaf.dictionary.detach().clone().requires_grad_(),
        kaf.gamma.detach().clone().requires_grad_(),
    )
    assert torch.autograd.gradcheck(kaf_lean, (x, *params))
    assert torch.autograd.gradgradcheck(kaf_lean, (x, *params))


def _grads(fn, x, kaf, weights):
    x = x.detach().clone().requires_grad_()
    gamma = kaf.gamma  # computed once: a trainable bandwidth is softplus(raw_gamma)
    params = [p for p in (kaf.alpha, kaf.dictionary, gamma) if p.requires_grad]
    y = fn(x, kaf.alpha, kaf.dictionary, gamma)
    return (y, *torch.autograd.grad((y * weights).sum(), [x, *params]))


@pytest.mark.parametrize("trainable", [False, True, "per_channel"])
@pytest.mark.parametrize("shape", [(4, 8, 5, 5), (6, 8)])
def test_lean_equals_naive_values_and_all_gradients(shape, trainable, monkeypatch):
    torch.manual_seed(2)
    kaf = KernelActivation(
        8,
        dictionary_size=12,
        trainable_dictionary=bool(trainable),
        init="swish",
        per_channel=trainable == "per_channel",
    )
    with torch.no_grad():
        kaf.alpha.add_(0.1 * torch.randn_like(kaf.alpha))  # per-channel differences
        if trainable == "per_channel":
            kaf.dictionary.add_(0.2 * torch.randn_like(kaf.dictionary))
            kaf.raw_gamma.add_(0.3 * torch.randn_like(kaf.raw_gamma))
    x = torch.randn(*shape) * 2
    weights = torch.randn(*shape)
    naive = _grads(kaf_naive, x, kaf, weights)
    assert len(naive) == (5 if trainable else 3)
    for chunk_elements in (1, 3 * x.numel(), 1 << 22):  # 1 point per chunk, uneven chunks, one chunk
        monkeypatch.setattr(kaf_module, "_CHUNK_ELEMENTS", chunk_elements)
        lean = _grads(kaf_lean, x, kaf, weights)
        for a, b in zip(lean, naive, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_lean_saves_only_inputs_for_backward():
    kaf = KernelActivation(4, dictionary_size=20)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kaf(x)
    assert sum(sizes) <= x.numel() + kaf.alpha.numel() + kaf.dictionary.numel() + 1
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kaf_naive(x, kaf.alpha, kaf.dictionary, kaf.gamma)
    assert sum(sizes) >= 20 * x.numel()  # what the lean Function avoids


def test_trainable_dictionary_gets_gradients():
    torch.manual_seed(3)
    kaf = KernelActivation(3, dictionary_size=8, trainable_dictionary=True)
    names = {name for name, _ in kaf.named_parameters()}
    assert names == {"alpha", "dictionary", "raw_gamma"}  # gamma = softplus(raw_gamma)
    kaf(torch.randn(4, 3, 2, 2)).square().sum().backward()
    for p in (kaf.alpha, kaf.dictionary, kaf.raw_gamma):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_fixed_dictionary_is_buffer():
    kaf = KernelActivation(3, dictionary_size=8)
    assert {name for name, _ in kaf.named_parameters()} == {"alpha"}
    assert {name for name, _ in kaf.named_buffers()} == {"dictionary", "gamma"}
    kaf(torch.randn(4, 3, 2, 2)).sum().backward()
    assert kaf.alpha.grad is not None and kaf.alpha.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"channels": 0}, "channels=0"),
        ({"channels": 4, "dictionary_size": 1}, "dictionary_size=1"),
        ({"channels": 4, "boundary": 0.0}, "boundary=0.0"),
        ({"channels": 4, "boundary": -1.0}, "boundary=-1.0"),
        ({"channels": 4, "bandwidth": "silverman"}, "bandwidth='silverman'"),
        ({"channels": 4, "init": "tanh"}, "init='tanh'"),
    ],
)
def test_bad_arguments_raise(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        KernelActivation(**kwargs)


def test_wrong_channel_count_raises():
    with pytest.raises(ValueError, match="channels=4"):
        KernelActivation(4)(torch.randn(2, 5, 3, 3))
    assert "dictionary_size=20" in repr(KernelActivation(4))


def test_torch_func_transforms_match_naive():
    torch.manual_seed(4)
    kaf = KernelActivation(3, dictionary_size=6, trainable_dictionary=True)
    x = torch.randn(4, 3, 2, 2)

    def lean_loss(inp: torch.Tensor) -> torch.Tensor:
        return kaf(inp).square().sum()

    def naive_loss(inp: torch.Tensor) -> torch.Tensor:
        return kaf_naive(inp, kaf.alpha, kaf.dictionary, kaf.gamma).square().sum()

    torch.testing.assert_close(torch.func.grad(lean_loss)(x), torch.func.grad(naive_loss)(x))
    per_sample = torch.func.vmap(torch.func.grad(lean_loss))(x.unsqueeze(1))
    torch.testing.assert_close(per_sample, torch.func.vmap(torch.func.grad(naive_loss))(x.unsqueeze(1)))


def test_empty_batch():
    assert KernelActivation(4)(torch.randn(0, 4, 3, 3)).shape == (0, 4, 3, 3)


# --- KAF_Free per channel (seed thesis: "doubling the number of parameters") -----------------


def test_per_channel_free_parameter_count_by_hand():
    # C = 16 channels, D = 20 points. Fixed dictionary: alpha only, C*D = 16*20 = 320.
    # Shared KAF_Free: + D dictionary points + 1 bandwidth = 320 + 20 + 1 = 341.
    # Per-channel KAF_Free: alpha C*D + dictionary C*D + bandwidth C = 320 + 320 + 16 = 656,
    # i.e. "doubling the number of parameters" of the activation, plus one bandwidth per channel.
    def count(**kwargs):
        return sum(p.numel() for p in KernelActivation(16, dictionary_size=20, **kwargs).parameters())

    assert count() == 320
    assert count(trainable_dictionary=True) == 341
    assert count(trainable_dictionary=True, per_channel=True) == 656
    kaf = KernelActivation(16, dictionary_size=20, trainable_dictionary=True, per_channel=True)
    assert tuple(kaf.dictionary.shape) == (16, 20) and tuple(kaf.raw_gamma.shape) == (16,)


def test_per_channel_free_starts_as_the_thesis_kaf():
    # Every channel starts with the same dictionary linspace(-3, 3, 20) and gamma = 1/(6 Delta^2),
    # Delta = 6/19, so before training the per-channel KAF computes the fixed one's function.
    fixed = KernelActivation(4, dictionary_size=20, init="elu").double()
    free = KernelActivation(4, dictionary_size=20, init="elu", trainable_dictionary=True, per_channel=True).double()
    delta = 6.0 / 19.0
    torch.testing.assert_close(free.gamma, torch.full((4,), 1 / (6 * delta**2), dtype=torch.float64))
    torch.testing.assert_close(free.dictionary[2], torch.linspace(-3, 3, 20, dtype=torch.float64))
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    # float32 construction: raw_gamma holds gamma's softplus preimage to float32 precision.
    torch.testing.assert_close(free(x), fixed(x), rtol=1e-5, atol=1e-6)


def test_per_channel_free_uses_each_channels_own_dictionary_and_bandwidth():
    kaf = KernelActivation(2, dictionary_size=3, trainable_dictionary=True, per_channel=True).double()
    with torch.no_grad():
        kaf.alpha.copy_(torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]]))
        kaf.dictionary.copy_(torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.5, 2.0]]))
        kaf.raw_gamma.copy_(softplus_inverse(torch.tensor([0.5, 2.0], dtype=torch.float64)))
    x = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    # By hand: g_0(0.3) = 1 e^{-0.5*1.69} + 2 e^{-0.5*0.09} - e^{-0.5*0.49};
    #          g_1(-0.7) = 0.5 e^{-2*1.69} + 0 + 3 e^{-2*7.29}.
    g0 = math.exp(-0.845) + 2 * math.exp(-0.045) - math.exp(-0.245)
    g1 = 0.5 * math.exp(-3.38) + 3 * math.exp(-14.58)
    torch.testing.assert_close(kaf(x), torch.tensor([[g0, g1]], dtype=torch.float64))


def test_bandwidth_stays_positive_after_a_step_that_would_make_it_negative():
    kaf = KernelActivation(3, dictionary_size=20, trainable_dictionary=True, per_channel=True)
    gamma0 = 1 / (6 * (6.0 / 19.0) ** 2)  # 1.6713...
    opt = torch.optim.SGD(kaf.parameters(), lr=1.0)
    # loss = 10 * sum(gamma): d loss / d gamma = 10, so a plain gamma would step to 1.67 - 10 < 0.
    (10 * kaf.gamma.sum()).backward()
    opt.step()
    # softplus: raw0 = log(e^{gamma0} - 1); d gamma / d raw = sigmoid(raw0);
    # raw1 = raw0 - 10 sigmoid(raw0); gamma1 = log(1 + e^{raw1}).
    raw0 = math.log(math.exp(gamma0) - 1)
    raw1 = raw0 - 10 / (1 + math.exp(-raw0))
    gamma1 = math.log1p(math.exp(raw1))
    assert gamma0 - 10 < 0 < gamma1
    torch.testing.assert_close(kaf.gamma.detach(), torch.full((3,), gamma1), rtol=1e-5, atol=0)
    assert bool(torch.isfinite(kaf(torch.randn(2, 3, 4))).all())


def test_per_channel_needs_a_trainable_dictionary():
    with pytest.raises(ValueError, match="per_channel=True needs trainable_dictionary=True"):
        KernelActivation(4, per_channel=True)

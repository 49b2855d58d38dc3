"""Kernel-based Activation Function (KAF), Gaussian kernel, one function per channel.

References:
    S. Scardapane, S. Van Vaerenbergh, S. Totaro, A. Uncini, "Kafnets: kernel-based non-parametric
    activation functions for neural networks", Neural Networks 2019.
    Seed thesis: "Robustness of deep neural networks using trainable activation functions".

g_c(s) = sum_i alpha[c, i] * exp(-gamma * (s - d_i)^2) over a dictionary d of D points equally
spaced on [-boundary, boundary]. The naive broadcast keeps an (N, C, *spatial, D) tensor alive for
backward (20x the activation at D=20); :class:`KernelActivation` instead runs a custom autograd
Function that saves only the input and the (small) parameters and recomputes the Gaussian terms
in backward, in blocks of (sample, channel) rows so the transient memory stays bounded and each
block of Gaussian terms is formed and reduced while it is in cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from defenses._placement import pick
from defenses._registry import Example, register_defense
from defenses.backbones import LayerSet

__all__ = [
    "BANDWIDTH_RULES",
    "INITS",
    "RANDOM_INIT_STD",
    "RIDGE_LAMBDA",
    "KernelActivation",
    "kaf_bandwidth",
    "kaf_lean",
    "kaf_naive",
    "kaf_parameters",
    "softplus_inverse",
]

#: Bandwidth rules: gamma = 1 / (factor * spacing^2). "thesis" follows Kafnets / the seed thesis,
#: "reference" the public code (Gaussian sigma = 2 * spacing -> 1 / (2 sigma^2) = 1 / (8 spacing^2)).
BANDWIDTH_RULES: dict[str, float] = {"thesis": 6.0, "reference": 8.0}

#: Initialisations of alpha: random normal, or kernel ridge regression onto a known activation.
INITS: tuple[str, ...] = ("random", "relu", "elu", "swish")

#: Std of the random alpha init. docs/defenses.md reports 0.3-0.8 across reference versions; the low
#: end keeps the initial activation close to the identity-scale of ReLU/ELU, so deep stacks start
#: with tamer gradients (the thesis' deep KAF ResNet diverged).
RANDOM_INIT_STD: float = 0.3

#: Ridge regulariser of the kernel regression init, added on the diagonal only (an old reference
#: version added it to every entry of K, which is a different and badly conditioned system).
RIDGE_LAMBDA: float = 1e-4

# Upper bound on elements of the transient (n, c, M, D) blocks in the lean Function (2 MiB in
# float32): small enough to stay in cache while the block is formed and reduced (CPU: 1<<17 to
# 1<<21 were equally fast, 1<<22 slower), large enough that per-block overhead is negligible. At
# least one (sample, channel) row per block.
_CHUNK_ELEMENTS: int = 1 << 19


def kaf_bandwidth(dictionary_size: int, boundary: float, rule: str = "thesis") -> float:
    """Kernel bandwidth gamma for an equally spaced dictionary.

    Args:
        dictionary_size: number D >= 2 of dictionary points.
        boundary: the dictionary spans [-boundary, boundary]; must be > 0.
        rule: "thesis" (gamma = 1/(6 spacing^2), Scardapane et al.) or "reference"
            (gamma = 1/(8 spacing^2), public reference code).

    Returns:
        gamma as a Python float.
    """
    if rule not in BANDWIDTH_RULES:
        raise ValueError(f"bandwidth={rule!r} must be one of {sorted(BANDWIDTH_RULES)}")
    spacing = 2.0 * boundary / (dictionary_size - 1)
    return 1.0 / (BANDWIDTH_RULES[rule] * spacing**2)


def _target_activation(name: str, s: Tensor) -> Tensor:
    if name == "relu":
        return torch.relu(s)
    if name == "elu":
        return nn.functional.elu(s)
    if name == "swish":
        return s * torch.sigmoid(s)
    raise ValueError(f"init={name!r} must be one of {list(INITS)}")


def _ridge_alpha(name: str, dictionary: Tensor, gamma: Tensor | float, lam: float = RIDGE_LAMBDA) -> Tensor:
    """alpha = (K + lam*I)^-1 f(d): the KAF that interpolates activation f on the dictionary.

    dictionary (D,) with a scalar gamma gives one (D,) row; a per-channel (C, D) dictionary with
    (C,) gammas gives (C, D), one batched solve.
    """
    d = dictionary.detach().to(torch.float64)
    g = torch.as_tensor(gamma, dtype=torch.float64, device=d.device).detach()
    if d.dim() == 2:
        g = g.view(-1, 1, 1)
    kernel = torch.exp(-g * (d.unsqueeze(-1) - d.unsqueeze(-2)).square())
    eye = torch.eye(d.shape[-1], dtype=torch.float64, device=d.device)
    return torch.linalg.solve(kernel + lam * eye, _target_activation(name, d))


def softplus_inverse(value: Tensor) -> Tensor:
    """raw with softplus(raw) = value > 0: raw = value + log(1 - exp(-value)), stable for any size."""
    return value + torch.log(-torch.expm1(-value))


def kaf_naive(x: Tensor, alpha: Tensor, dictionary: Tensor, gamma: Tensor | float) -> Tensor:
    """Reference KAF by plain broadcasting (autograd saves the full Gaussian tensor).

    Kept as the ground truth for tests and benchmarks of :func:`kaf_lean`.

    Shape:
        x: (N, C, *) with the channel axis 1; alpha: (C, D); dictionary: (D,) shared or (C, D)
        per channel; gamma: scalar (0-dim) shared or (C,) per channel. Output: same shape as x.
    """
    view = (1, alpha.shape[0]) + (1,) * (x.dim() - 2) + (alpha.shape[1],)
    if dictionary.dim() == 2:
        dictionary = dictionary.view(view)
    if isinstance(gamma, Tensor) and gamma.dim() == 1:
        gamma = gamma.view(view[:-1] + (1,))
    gauss = torch.exp(-gamma * (x.unsqueeze(-1) - dictionary).square())
    return (gauss * alpha.view(view)).sum(-1)


def _row_chunks(n: int, c: int, row_elements: int) -> list[tuple[int, int, int, int]]:
    """(n0, n1, c0, c1) blocks of (sample, channel) rows with <= _CHUNK_ELEMENTS Gaussian terms.

    Whole channel ranges of whole samples first (one batched product per block); at least one row
    per block. Chunking the rows rather than the dictionary keeps all D terms of an element
    together, so each block is formed, reduced and dropped while it is still in cache.
    """
    per_sample = c * row_elements
    if per_sample <= _CHUNK_ELEMENTS:
        step = max(1, _CHUNK_ELEMENTS // max(per_sample, 1))
        return [(n0, min(n, n0 + step), 0, c) for n0 in range(0, n, step)]
    step = max(1, _CHUNK_ELEMENTS // max(row_elements, 1))
    return [(n0, n0 + 1, c0, min(c, c0 + step)) for n0 in range(n) for c0 in range(0, c, step)]


def _gauss(xc: Tensor, dictionary: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor | None]:
    """exp(-gamma (x - d_i)^2) as (..., D, M), and x - d_i when autograd must see it.

    The dictionary axis comes before the positions: every reduction over it is then a small
    matrix times a (D, M) matrix with contiguous rows, which BLAS does several times faster than
    the mat-vec over a (M, D) layout (measured on CPU: 36 vs 287 us per 512K terms), and forming
    the block is a contiguous broadcast too. Without grad mode (forward, and backward unless
    create_graph) the terms are built in place in one buffer: 4 passes instead of 5 allocations.
    """
    diff = xc.unsqueeze(-2) - dictionary.unsqueeze(-1)
    if torch.is_grad_enabled():
        return torch.exp(-gamma * diff.square()), diff
    return diff.mul_(diff).mul_(-gamma).exp_(), None


def _block(dictionary: Tensor, gamma: Tensor, c0: int, c1: int) -> tuple[Tensor, Tensor]:
    """Dictionary and bandwidth of channels c0..c1, shaped to broadcast over (n, c, D, M) blocks.

    Shared: (D,) and a 0-dim gamma, used as they are. Per channel (KAF_Free of the thesis):
    rows c0..c1 of the (C, D) dictionary and gamma viewed (c, 1, 1).
    """
    if dictionary.dim() == 2:
        dictionary = dictionary[c0:c1]
    if gamma.dim() == 1:
        gamma = gamma[c0:c1].view(-1, 1, 1)
    return dictionary, gamma


class _KafFunction(torch.autograd.Function):
    """Gaussian KAF that saves only (x, alpha, dictionary, gamma) for backward.

    Inside both passes x is viewed as (N, C, M) and processed in blocks of rows (n, c) holding at
    most _CHUNK_ELEMENTS Gaussian terms, laid out (n, c, D, M); the per-channel sums over the
    dictionary are batched (1 or 2, D) @ (D, M) products, which avoid transposing x.

    The backward is written with differentiable torch ops and is not marked once_differentiable,
    so double backward (e.g. gradient penalties) works by autograd through the recomputation.
    forward/setup_context are separate so torch.func transforms (grad, vmap) work too.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, alpha: Tensor, dictionary: Tensor, gamma: Tensor) -> Tensor:  # type: ignore[override]
        n, c = x.shape[0], x.shape[1]
        m = math.prod(x.shape[2:])
        xv = x.reshape(n, c, m)
        out = torch.empty_like(xv)
        a = alpha.unsqueeze(-2)  # (C, 1, D): the per-channel sum over i is a (1, D) @ (D, M) product
        for n0, n1, c0, c1 in _row_chunks(n, c, m * alpha.shape[-1]):
            d_b, g_b = _block(dictionary, gamma, c0, c1)
            gauss, _ = _gauss(xv[n0:n1, c0:c1], d_b, g_b)
            out[n0:n1, c0:c1] = (a[c0:c1] @ gauss).squeeze(-2)
        return out.view(x.shape)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, ...], output: Tensor) -> None:  # type: ignore[override]
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, alpha, dictionary, gamma = ctx.saved_tensors
        need_x, need_alpha, need_dict, need_gamma = ctx.needs_input_grad[:4]
        n, c = x.shape[0], x.shape[1]
        m = math.prod(x.shape[2:])
        xv = x.reshape(n, c, m)
        g = grad_out.reshape(n, c, m)
        # Unneeded gradients get an empty placeholder (one type for the checker, no memory) and
        # are returned as None.
        none = xv.new_empty(0)
        grad_x = torch.empty_like(xv) if need_x else none
        grad_alpha = torch.zeros_like(alpha) if need_alpha else none
        # Per channel, then summed over channels at the end when dictionary/gamma are shared.
        grad_dict = torch.zeros_like(alpha) if need_dict else none
        grad_gamma = torch.zeros_like(alpha) if need_gamma else none
        # sum_i alpha_i g_i (x - d_i) = x * [alpha @ g] - [(alpha * d) @ g]: one product with two
        # rows instead of an extra pass forming g_i * (x - d_i) over the whole block.
        a2 = torch.stack((alpha, alpha * dictionary), dim=-2)  # (C, 2, D)
        a1 = alpha.unsqueeze(-2)  # (C, 1, D)
        exact = need_dict or need_gamma or torch.is_grad_enabled()
        for n0, n1, c0, c1 in _row_chunks(n, c, m * alpha.shape[-1]):
            # gc: (n, c, 1, M). Sums over positions are gc @ block^T: a row times a transposed
            # view, which BLAS runs as one gemm (block @ gc^T as a mat-vec was 8x slower).
            xc, gc = xv[n0:n1, c0:c1], g[n0:n1, c0:c1].unsqueeze(-2)
            d_b, g_b = _block(dictionary, gamma, c0, c1)
            if exact:
                diff = xc.unsqueeze(-2) - d_b.unsqueeze(-1)
                gauss = torch.exp(-g_b * diff.square())
            else:
                gauss, diff = _gauss(xc, d_b, g_b)
            if need_alpha:
                # dL/dalpha[c,i] = sum_{n,m} g * gauss_i
                grad_alpha[c0:c1] += (gc @ gauss.transpose(-1, -2)).squeeze(-2).sum(0)
            if need_x and diff is None:
                sums = a2[c0:c1] @ gauss  # (n, c, 2, M)
                grad_x[n0:n1, c0:c1] = xc * sums[..., 0, :] - sums[..., 1, :]
            elif need_x:
                grad_x[n0:n1, c0:c1] = (a1[c0:c1] @ (gauss * diff)).squeeze(-2)
            if need_dict:
                # d/d d_i = +2 gamma * alpha[c,i] * gauss_i * diff_i
                grad_dict[c0:c1] += (gc @ (gauss * diff).transpose(-1, -2)).squeeze(-2).sum(0)
            if need_gamma:
                # d/d gamma = -alpha[c,i] * gauss_i * diff_i^2
                grad_gamma[c0:c1] += (gc @ (gauss * diff.square()).transpose(-1, -2)).squeeze(-2).sum(0)
        per_channel = gamma.dim() == 1
        # gamma per channel broadcasts over (N, C, M) as (C, 1) and over (C, D) as (C, 1).
        g_x = gamma.view(-1, 1) if per_channel else gamma
        if need_x:
            grad_x = ((-2.0 * g_x) * grad_x).view(x.shape) * grad_out
        if need_dict:
            grad_dict = (2.0 * g_x) * alpha * grad_dict
            if dictionary.dim() == 1:
                grad_dict = grad_dict.sum(0)
        if need_gamma:
            grad_gamma = -(alpha * grad_gamma).sum(-1)
            if not per_channel:
                grad_gamma = grad_gamma.sum()
        return (grad_x if need_x else None, grad_alpha if need_alpha else None,
                grad_dict if need_dict else None, grad_gamma if need_gamma else None)


def kaf_lean(x: Tensor, alpha: Tensor, dictionary: Tensor, gamma: Tensor) -> Tensor:
    """Memory-lean Gaussian KAF: same values and gradients as :func:`kaf_naive`.

    Saves only its inputs for backward and recomputes the Gaussian terms there.

    Shape:
        x: (N, C, *) with the channel axis 1; alpha: (C, D); dictionary: (D,) shared or (C, D)
        per channel; gamma: 0-dim tensor shared or (C,) per channel. Output: same shape as x.
    """
    return _KafFunction.apply(x, alpha, dictionary, gamma)


class KernelActivation(nn.Module):
    """Gaussian kernel activation function, one learnable function per channel (KAF).

    Scardapane et al., "Kafnets: kernel-based non-parametric activation functions for neural
    networks"; used for robustness in the seed thesis "Robustness of deep neural networks using
    trainable activation functions" (KAF, KAF_ELU/KAF_Swish = ridge init, KAF_Free = trainable
    dictionary and bandwidth).

    g_c(s) = sum_i alpha[c, i] * exp(-gamma * (s - d_i)^2).

    Args:
        channels: number of channels C (axis 1 of the input); each has its own alpha row.
        dictionary_size: number D >= 2 of dictionary points, equally spaced on [-boundary, boundary].
        boundary: half-width of the dictionary range, > 0 (reference code uses 3 or 4).
        bandwidth: "thesis" (gamma = 1/(6 spacing^2)) or "reference" (gamma = 1/(8 spacing^2)).
        init: "random" (alpha ~ N(0, RANDOM_INIT_STD^2) = N(0, 0.3^2)) or "relu" / "elu" /
            "swish": kernel ridge regression alpha = (K + 1e-4 I)^-1 f(d), same row for every
            channel, so the KAF starts as (approximately) that activation.
        trainable_dictionary: also train the dictionary points and the bandwidth ("KAF_Free"),
            shared by all channels unless ``per_channel``. The bandwidth is trained as
            gamma = softplus(raw_gamma), so it stays > 0 whatever step the optimiser takes.
        per_channel: KAF_Free as in the seed thesis ("doubling the number of parameters"): every
            channel has its own trainable dictionary (C, D) and bandwidth (C,), so a layer holds
            2*C*D + C parameters instead of C*D. Requires ``trainable_dictionary``.

    Attributes:
        alpha: Parameter (C, D).
        dictionary: (D,) buffer; Parameter (D,) when trainable_dictionary, (C, D) when per_channel.
        gamma: the bandwidth: 0-dim buffer when fixed; when trainable, the Tensor
            softplus(raw_gamma), 0-dim or (C,) when per_channel.
        raw_gamma: Parameter behind the trainable bandwidth (absent when fixed).

    Shape:
        Input: (N, C) or (N, C, H, W) (any (N, C, *)). Output: same shape.

    Examples::

        >>> act = KernelActivation(64, dictionary_size=20, init="swish")
        >>> y = act(torch.randn(8, 64, 16, 16))
    """

    def __init__(
        self,
        channels: int,
        dictionary_size: int = 20,
        boundary: float = 3.0,
        bandwidth: str = "thesis",
        init: str = "random",
        trainable_dictionary: bool = False,
        per_channel: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels={channels!r} must be an integer >= 1")
        if isinstance(dictionary_size, bool) or not isinstance(dictionary_size, int) or dictionary_size < 2:
            raise ValueError(f"dictionary_size={dictionary_size!r} must be an integer >= 2")
        if not (isinstance(boundary, (int, float)) and math.isfinite(boundary) and boundary > 0):
            raise ValueError(f"boundary={boundary!r} must be a finite number > 0")
        if bandwidth not in BANDWIDTH_RULES:
            raise ValueError(f"bandwidth={bandwidth!r} must be one of {sorted(BANDWIDTH_RULES)}")
        if init not in INITS:
            raise ValueError(f"init={init!r} must be one of {list(INITS)}")
        for flag_name, value in (("trainable_dictionary", trainable_dictionary), ("per_channel", per_channel)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag_name}={value!r} must be True or False")
        if per_channel and not trainable_dictionary:
            raise ValueError(
                "per_channel=True needs trainable_dictionary=True (a fixed per-channel dictionary "
                "is the shared one)"
            )
        self.channels = channels
        self.dictionary_size = dictionary_size
        self.boundary = float(boundary)
        self.bandwidth = bandwidth
        self.init = init
        self.trainable_dictionary = trainable_dictionary
        self.per_channel = per_channel

        dictionary = torch.linspace(-self.boundary, self.boundary, dictionary_size)
        gamma = torch.tensor(kaf_bandwidth(dictionary_size, self.boundary, bandwidth))
        if per_channel:
            dictionary = dictionary.repeat(channels, 1)
            gamma = gamma.repeat(channels)
        if self.trainable_dictionary:
            self.dictionary = nn.Parameter(dictionary)
            # gamma = softplus(raw): a plain trainable gamma can be stepped through 0, after which
            # exp(-gamma (s - d)^2) grows without bound and the network turns NaN (that is how
            # free KAF runs diverged). softplus rather than exp: above ~2 it is almost the
            # identity, so a step moves gamma by about as much as it moved the plain parameter
            # (exp would make every step multiplicative), and its slope at the initial gamma
            # (sigmoid(raw), 0.85 for D=20 on [-3, 3]) keeps the early dynamics close to it.
            self.raw_gamma = nn.Parameter(softplus_inverse(gamma.double()).to(gamma.dtype))
        else:
            self.register_buffer("dictionary", dictionary)
            self.register_buffer("gamma", gamma)
        self.alpha = nn.Parameter(torch.empty(channels, dictionary_size))
        self.reset_parameters()

    def __getattr__(self, name: str) -> Any:
        # A trainable bandwidth is stored as raw_gamma; ``gamma`` reads the same positive value
        # in every mode (a property would clash with the fixed mode's buffer of that name).
        raw = self._parameters.get("raw_gamma") if name == "gamma" else None
        if raw is not None:
            return nn.functional.softplus(raw)
        return super().__getattr__(name)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise alpha according to ``init`` for the current dictionary and gamma."""
        if self.init == "random":
            nn.init.normal_(self.alpha, mean=0.0, std=RANDOM_INIT_STD)
        else:
            row = _ridge_alpha(self.init, self.dictionary, self.gamma)
            self.alpha.copy_(row.to(self.alpha).expand_as(self.alpha))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(
                f"input shape {tuple(x.shape)} must be (N, {self.channels}, *): "
                f"KernelActivation was built for channels={self.channels}"
            )
        return kaf_lean(x, self.alpha, self.dictionary, self.gamma)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, dictionary_size={self.dictionary_size}, "
            f"boundary={self.boundary}, bandwidth={self.bandwidth!r}, init={self.init!r}, "
            f"trainable_dictionary={self.trainable_dictionary}"
            + (", per_channel=True" if self.per_channel else "")
        )


# --------------------------------------------------------------------------- registration

_KAF_PARAMS = ("dictionary_size", "boundary", "bandwidth", "init", "trainable_dictionary", "per_channel")


def kaf_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every KAF's own parameters in ``model`` (alpha, and dictionary/raw_gamma when trainable).

    The thesis' recipe leaves them out of weight decay (only the network's layers are decayed);
    the registration declares this so the training loop needs no knowledge of KAF.
    """
    for module in model.modules():
        if isinstance(module, KernelActivation):
            yield from module.parameters(recurse=False)


def _place_kaf(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    """A KAF (own alpha per channel/neuron) in place of every activation."""
    kwargs = pick(params, _KAF_PARAMS)
    KernelActivation(1, **kwargs)
    return LayerSet(act=lambda channels: KernelActivation(channels, **kwargs))


register_defense(
    "kaf", KernelActivation, place=_place_kaf, params=_KAF_PARAMS,
    no_weight_decay=kaf_parameters,
    color="#2ca02c",
    cost_budget=(2.5, 2.0),  # issue 2's layer-cost targets (time, memory)
    paper=("Scardapane, Van Vaerenbergh, Totaro, Uncini: Kafnets: kernel-based non-parametric "
           "activation functions for neural networks (2019)"),
    example=Example(lambda: KernelActivation(channels=8, dictionary_size=6), (2, 8, 3, 3), (2, 8, 3, 3)),
)

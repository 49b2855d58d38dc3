"""Attacks torchattacks lacks: PGD on an arbitrary loss (CW margin, CAS's joint loss) and a
DeepFool that stays in the [0, 1] box."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn
from torchattacks.attack import Attack

from defenses.cas import CAS_BETA, cas_aux_logits, cas_joint_ce
from study.attacks.context import CW_KAPPA, DEEPFOOL_OVERSHOOT, DEEPFOOL_STEPS

# --------------------------------------------------------------------------- custom attacks


class LossPGD(Attack):
    r"""L-inf PGD with a pluggable per-sample loss (Madry et al., "Towards deep learning models
    resistant to adversarial attacks"), the base of CW-L-inf and the CAS adaptive attack.

    Arguments:
        model (nn.Module): model to attack (inputs in [0, 1], returns logits).
        loss_fn: ``loss_fn(logits, labels) -> Tensor (N,)``, maximised by the attack.
        eps (float): L-inf budget.
        alpha (float): step size.
        steps (int): iterations.
        random_start (bool): start uniformly in the eps-ball.
        eot_samples (int): Expectation over Transformation (Athalye et al., "Obfuscated gradients
            give a false sense of security"): each step's gradient is summed over this many
            stochastic forward passes (torchattacks' EOTPGD estimate).
        max_batch (int): inputs per forward/backward when EOT copies of the batch are run
            together; 0 (default) runs one copy per pass. Measured on CPU, stacking copies into
            ~1000-input passes made a widened KAP model's EOT-PGD 1.4x slower (memory-bound), so
            batching is opt-in (it may pay on a GPU; not measured here).

    Shape:
        - images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W) in [0, 1].
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        eps: float,
        alpha: float,
        steps: int,
        random_start: bool = True,
        name: str = "LossPGD",
        eot_samples: int = 1,
        max_batch: int = 0,
    ) -> None:
        super().__init__(name, model)
        self.loss_fn = loss_fn
        self.eps = eps
        self.alpha = alpha
        self.steps = steps
        self.random_start = random_start
        self.eot_samples = eot_samples
        self.max_batch = max_batch
        self.supported_mode = ["default"]

    def _gradient(self, adv: Tensor, labels: Tensor) -> Tensor:
        """Gradient of the summed loss, summed over the EOT passes (one pass without EOT)."""
        copies_per_pass = max(1, self.max_batch // max(1, adv.shape[0]))
        grad = torch.zeros_like(adv)
        left = self.eot_samples
        while left > 0:
            k = min(copies_per_pass, left)
            # Each copy draws its own randomness in the model (noise layers sample per element).
            batch = adv if k == 1 else adv.repeat(k, *([1] * (adv.dim() - 1)))
            loss = self.loss_fn(self.get_logits(batch), labels if k == 1 else labels.repeat(k)).sum()
            grad += torch.autograd.grad(loss, adv)[0]
            left -= k
        return grad

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:  # noqa: D102 - torchattacks API
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        adv = images.clone()
        if self.random_start:
            adv = (adv + torch.empty_like(adv).uniform_(-self.eps, self.eps)).clamp(0, 1)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            grad = self._gradient(adv, labels)
            adv = adv.detach() + self.alpha * grad.sign()
            adv = (images + (adv - images).clamp(-self.eps, self.eps)).clamp(0, 1).detach()
        return adv


def cw_margin_loss(logits: Tensor, labels: Tensor, kappa: float = CW_KAPPA) -> Tensor:
    """Carlini & Wagner's margin loss as a quantity to maximise: ``min(max_{j!=y} z_j - z_y, kappa)``.

    Carlini & Wagner, "Towards evaluating the robustness of neural networks": the attacker
    minimises ``f(x') = max(z_y - max_{j!=y} z_j, -kappa)``; we maximise ``-f``.

    Shape:
        logits (N, K), labels (N,) -> (N,)
    """
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return (others.amax(dim=1) - true).clamp(max=kappa)


class CWLinfPGD(LossPGD):
    """PGD under an L-inf budget on the CW margin loss ("CW-inf" of the TRADES/MART/CAS papers)."""

    def __init__(self, model: nn.Module, eps: float, alpha: float, steps: int, kappa: float = CW_KAPPA) -> None:
        super().__init__(model, lambda z, y: cw_margin_loss(z, y, kappa), eps, alpha, steps, True, "CWLinfPGD")
        self.kappa = kappa


class CASAdaptivePGD(LossPGD):
    """The adaptive white-box attack on CAS models: PGD on ``CE(main) + beta/S * sum_s CE(aux_s)``.

    Bai et al., "Improving adversarial robustness via channel-wise activation suppressing"
    (ICLR 2021), attack the joint training objective so the auxiliary classifiers that decide
    which channels are suppressed are fooled together with the main head. ``aux_s`` are the
    logits of each CAS site from the same forward pass (``defenses.cas.cas_aux_logits``).
    """

    def __init__(self, model: nn.Module, eps: float, alpha: float, steps: int, beta: float = CAS_BETA) -> None:
        super().__init__(model, self._joint_loss, eps, alpha, steps, True, "CASAdaptivePGD")
        self.beta = beta

    def _joint_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        # The same function the CAS training attack ascends (study.training.recipes).
        return cas_joint_ce(logits, cas_aux_logits(self.model), labels, self.beta)


class BoxDeepFool(torchattacks.DeepFool):
    r"""DeepFool (Moosavi-Dezfooli et al., "DeepFool: a simple and accurate method to fool deep
    neural networks"), batched and aware of the [0, 1] box.

    torchattacks' ``DeepFool`` loops over samples with a full Jacobian per step (minutes for a
    few hundred CIFAR images) and clamps after every step, which stalls on pixels already at 0
    or 1 (a third of the 8x8 digits never flip). This version keeps the algorithm and its
    arguments and changes only how it runs: all samples of a batch at once; the paper's
    candidate set (the true class and the top ``candidates - 1`` others by clean logit, 10 in the
    reference code); the accumulated perturbation ``r_tot`` with the overshoot applied to the
    total (Algorithm 2 of the paper); and gradient components that would push a pixel at a bound
    out of [0, 1] removed before the linearised step (an active-set projection), so the step
    uses only feasible directions.

    Arguments:
        model (nn.Module): model to attack.
        steps (int): maximum iterations. (Default: 50)
        overshoot (float): overshoot of the total perturbation. (Default: 0.02)
        candidates (int): classes considered (true class included). (Default: 10)

    Shape:
        - images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W) in [0, 1].
    """

    def __init__(self, model: nn.Module, steps: int = DEEPFOOL_STEPS, overshoot: float = DEEPFOOL_OVERSHOOT,
                 candidates: int = 10) -> None:
        super().__init__(model, steps=steps, overshoot=overshoot)
        self.candidates = candidates

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:  # noqa: D102 - torchattacks API
        x0 = images.clone().detach().to(self.device)
        y = labels.clone().detach().to(self.device)
        n = x0.shape[0]
        x = x0.clone()
        r_tot = torch.zeros_like(x0)
        active = torch.ones(n, dtype=torch.bool, device=x0.device)
        cand: Tensor | None = None
        for _ in range(self.steps):
            idx = active.nonzero().flatten()
            if idx.numel() == 0:
                break
            xi = x[idx].clone().requires_grad_(True)
            logits = self.get_logits(xi)
            if cand is None:
                # True class first, then the most likely others (the reference's candidate set).
                k = min(self.candidates, logits.shape[1])
                others = logits.detach().scatter(1, y[:, None], float("-inf")).topk(k - 1, dim=1).indices
                cand = torch.cat([y[:, None], others], dim=1)
            fooled = logits.argmax(dim=1) != y[idx]
            active[idx[fooled]] = False
            if bool(fooled.all()):
                break
            c = cand[idx]
            z = logits.gather(1, c)  # (m, k), column 0 = true class
            grads = torch.stack(
                [torch.autograd.grad(z[:, j].sum(), xi, retain_graph=j < z.shape[1] - 1)[0]
                 for j in range(z.shape[1])], dim=1,
            )  # (m, k, C, H, W); rows are independent because the model is in eval mode
            keep = ~fooled
            z, grads, xk, rows = z.detach()[keep], grads[keep], xi.detach()[keep], idx[keep]
            f_prime = z[:, 1:] - z[:, :1]  # <= 0 while still correct
            w_prime = grads[:, 1:] - grads[:, :1]
            xe = xk[:, None]
            blocked = ((xe <= 0) & (w_prime < 0)) | ((xe >= 1) & (w_prime > 0))
            w_prime = w_prime.masked_fill(blocked, 0.0)
            norms = w_prime.flatten(2).norm(dim=2)
            ratio = (f_prime.abs() / norms.clamp_min(1e-12)).masked_fill(norms <= 1e-12, float("inf"))
            best = ratio.argmin(dim=1)
            arange = torch.arange(rows.numel(), device=x0.device)
            dist = ratio[arange, best]
            stuck = ~torch.isfinite(dist)  # no feasible direction left: give up on the sample
            active[rows[stuck]] = False
            w_best = w_prime[arange, best]
            step = (dist + 1e-4).masked_fill(stuck, 0.0) / norms[arange, best].clamp_min(1e-12)
            r_tot[rows] += step.view(-1, *[1] * (x0.dim() - 1)) * w_best
            x[rows] = (x0[rows] + (1 + self.overshoot) * r_tot[rows]).clamp(0, 1)
        return x.detach()


class EveryAPGD(torchattacks.APGD):
    """APGD (Croce & Hein) that attacks every sample it is given and returns its highest-loss point.

    torchattacks' ``APGD.forward`` (like the reference's cheap mode) first drops the samples one
    forward pass misclassifies and keeps a point only where one pass misclassified it. On a
    stochastic model one pass is a coin flip: samples the classifier usually gets right would go
    unattacked. This runs the reference's ``best_loss`` mode instead: every sample, each restart,
    the iterate with the highest (EOT-averaged gradient) loss kept. The caller scores the point.
    """

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:  # noqa: D102 - torchattacks API
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        _, adv = self.perturb(images, labels, best_loss=True)
        return adv

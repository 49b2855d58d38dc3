"""Search space of the training recipe shared by every defense.

Recipes: standard training; Gaussian input-noise augmentation ("noise"); FGSM with random start
("fast_at": Wong, Rice, Kolter, "Fast is better than free", ICLR 2020); PGD adversarial training
("pgd_at": Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR
2018); TRADES (Zhang et al., ICML 2019); MART (Wang et al., ICLR 2020).

Recipe-specific parameters are only active for their recipes (``when``): ``noise_sigma`` for
"noise", ``adv_eps`` for the adversarial recipes, ``adv_steps`` for the multi-step ones,
``trades_beta`` for TRADES. ``adv_eps`` is on the [0, 1] input scale of the embedded digits data
(where 0.1 separates defenses well); set it per dataset (8/255 for CIFAR-10) with a fixed override.

Defaults: the embedded digits study (SGD lr 0.1, weight decay 5e-4, 15 epochs), PGD-7, TRADES
beta = 6 (Zhang et al.).
"""

from __future__ import annotations

from search_spaces._params import Categorical, DefenseSpace, Float, Int

__all__ = ["ADVERSARIAL_RECIPES", "SPACE", "TRAINING_SPACE"]

ADVERSARIAL_RECIPES: tuple[str, ...] = ("fast_at", "pgd_at", "trades", "mart")

TRAINING_SPACE = DefenseSpace(
    name="training",
    params=(
        Categorical("recipe", ("standard", "noise", "fast_at", "pgd_at", "trades", "mart")),
        Float("lr", 1e-3, 0.5, log=True),
        Float("weight_decay", 1e-5, 1e-3, log=True),
        Int("epochs", 5, 60),
        Float("noise_sigma", 0.0, 0.3, when=("recipe", ("noise",))),
        Float("adv_eps", 0.01, 0.3, when=("recipe", ADVERSARIAL_RECIPES)),
        # FBF takes one FGSM step, so only the multi-step recipes have a step count.
        Int("adv_steps", 1, 10, when=("recipe", ("pgd_at", "trades", "mart"))),
        Float("trades_beta", 1.0, 10.0, when=("recipe", ("trades",))),
    ),
    defaults={
        "recipe": "standard",
        "lr": 0.1,
        "weight_decay": 5e-4,
        "epochs": 15,
        "noise_sigma": 0.1,
        "adv_eps": 0.1,
        "adv_steps": 7,
        "trades_beta": 6.0,
    },
    description="Training recipe: optimiser settings and (adversarial) training method",
    paper=(
        "Madry et al. 2018 (PGD-AT); Wong, Rice, Kolter 2020 (fast AT); Zhang et al. 2019 "
        "(TRADES); Wang et al. 2020 (MART)"
    ),
)

# Uniform name across the space modules.
SPACE = TRAINING_SPACE

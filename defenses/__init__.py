"""Defense layers, the backbones they plug into, and their registry (imports torch only).

Layers: KAP (Bashivan et al.), activation noise, k-WTA (Xiao et al.), KAF (Scardapane et al.),
TopKConv / Dynamic-k (Eigen & Sadovnik), CAS (Bai et al.). ``build_model`` places one of them
at its paper's sites in a backbone; ``create_defense`` makes a single layer by name.
"""

from __future__ import annotations

from defenses._registry import (
    BASELINE,
    DefenseEntry,
    EpochHook,
    Example,
    create_defense,
    get_defense,
    iter_defenses,
    list_defenses,
    make_epoch_hook,
    register_defense,
    unregister_defense,
)
from defenses.backbones import BACKBONES, LayerSet, list_backbones
from defenses.build import DEFENSE_PARAMS, Normalize, build_model, resolve_k
from defenses.cas import (
    ChannelActivationSuppression,
    cas_aux_logits,
    cas_aux_loss,
    cas_labels,
    cas_modules,
)
from defenses.kaf import KernelActivation, kaf_naive
from defenses.kap import KernelAveragePool, kap_width_factor
from defenses.kwta import KWinnersTakeAll, KWTAAnnealing, annealed_gamma, set_gamma
from defenses.noise import ActivationNoise, noise_disabled, set_noise_at_eval
from defenses.topk import DynamicKLinear, TopKConv2d, dynamic_k_linear_naive, topk_conv2d_naive

__all__ = [
    "BACKBONES",
    "BASELINE",
    "DefenseEntry",
    "EpochHook",
    "Example",
    "KWTAAnnealing",
    "get_defense",
    "iter_defenses",
    "unregister_defense",
    "DEFENSE_PARAMS",
    "ActivationNoise",
    "ChannelActivationSuppression",
    "DynamicKLinear",
    "KWinnersTakeAll",
    "KernelActivation",
    "KernelAveragePool",
    "LayerSet",
    "Normalize",
    "TopKConv2d",
    "annealed_gamma",
    "build_model",
    "cas_aux_logits",
    "cas_aux_loss",
    "cas_labels",
    "cas_modules",
    "create_defense",
    "dynamic_k_linear_naive",
    "kaf_naive",
    "kap_width_factor",
    "list_backbones",
    "list_defenses",
    "make_epoch_hook",
    "noise_disabled",
    "register_defense",
    "resolve_k",
    "set_gamma",
    "set_noise_at_eval",
    "topk_conv2d_naive",
]

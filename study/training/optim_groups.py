"""Optimiser parameter groups: which parameters weight decay applies to.

By default every parameter is decayed. A defense may declare its own parameters exempt
(``register_defense(no_weight_decay=...)``, e.g. KAF's alpha, dictionary and bandwidth); a
training config with ``defense_weight_decay: false`` then puts them in a group with weight decay
0, as the KAF thesis trains (weight decay only on the network's layers). The decision is read
from the registration, so this module names no defense.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from defenses import BASELINE, get_defense
from study.config import TrainingConfig

__all__ = ["parameter_groups"]


def parameter_groups(model: nn.Module, cfg: TrainingConfig, defense: str | None) -> Any:
    """What to hand the optimiser: ``model.parameters()`` or two groups (decayed, not decayed).

    Returns:
        The model's parameters unchanged when every parameter is decayed; otherwise
        ``[{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]`` with the exempt ones
        picked by identity (a parameter shared between sites is listed once).
    """
    if cfg.defense_weight_decay or not defense or defense == BASELINE:
        return model.parameters()
    select = get_defense(defense).no_weight_decay
    if select is None:
        return model.parameters()
    exempt_ids = {id(p) for p in select(model)}
    params = list(model.parameters())
    decayed = [p for p in params if id(p) not in exempt_ids]
    exempt = [p for p in params if id(p) in exempt_ids]
    if not exempt:
        return params
    return [{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]

"""A test fixture that diverges on purpose: every training forward turns its input NaN.

It stands in for a network whose training blows up (the KAF thesis' deep KAF networks did), so the
fault tests can check that a diverging trial is recorded as failed and kept off the front. Loaded
only through a spec's ``plugins`` (never by conftest: it would fail the contract tests by design).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from defenses import Example, LayerSet, register_defense
from search_spaces import DefenseSpace, Float, register_space


class ToyNaN(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        return x * float("nan") if self.training else x * self.scale


def _place(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    scale = params.get("scale", 1.0)
    return LayerSet(post_conv=lambda channels: ToyNaN(scale))


register_defense(
    "toy_nan",
    ToyNaN,
    place=_place,
    params=("scale",),
    example=Example(lambda: ToyNaN(), (2, 4, 3, 3), (2, 4, 3, 3)),
    in_default_study=False,
    paper="none (a test fixture)",
)
register_space(
    DefenseSpace(
        name="toy_nan",
        params=(Float("scale", 0.5, 2.0),),
        defaults={"scale": 1.0},
        description="turns training activations NaN (a test fixture, not a defense)",
        paper="none (a test fixture)",
    )
)

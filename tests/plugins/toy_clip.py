"""A toy sixth defense, written as a third party would: one module (plus its space file).

Clips every post-conv activation to [-c, c]. It is not a real defense; it exists so the tests can
prove that a defense outside the package tree is built, trained, attacked, plotted and covered by
the contract tests through the public registration API alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import toy_clip_space  # noqa: F401  registers the search space (found beside this file)
from torch import Tensor, nn

from defenses import Example, LayerSet, register_defense


class ToyClip(nn.Module):
    def __init__(self, c: float = 1.0) -> None:
        super().__init__()
        if not c > 0:
            raise ValueError(f"c={c!r} must be > 0")
        self.c = float(c)

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(-self.c, self.c)


def _place(params: Mapping[str, Any], num_classes: int) -> LayerSet:
    c = params.get("c", 1.0)
    ToyClip(c)  # validate before a network is built
    return LayerSet(post_conv=lambda channels: ToyClip(c))


register_defense(
    "toy_clip", ToyClip, place=_place, params=("c",),
    example=Example(lambda: ToyClip(0.5), (2, 4, 3, 3), (2, 4, 3, 3)),
    in_default_study=False,  # the built-in default studies stay as they are
    paper="none (a test fixture)",
)

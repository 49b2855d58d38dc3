"""The toy defense's search space (see toy_clip.py)."""

from __future__ import annotations

from search_spaces import DefenseSpace, Float, register_space

SPACE = register_space(DefenseSpace(
    name="toy_clip",
    params=(Float("c", 0.5, 3.0),),
    defaults={"c": 1.0},
    description="clip post-conv activations to [-c, c] (a test fixture, not a defense)",
    paper="none (a test fixture)",
))

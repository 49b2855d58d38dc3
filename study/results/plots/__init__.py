"""Pareto-front and hypervolume plots for a study's MLflow parent run.

Three artifacts, one visual encoding: every completed trial is a point coloured by its defense
(the same colour for a defense in every plot and format), trials that failed an integrity gate are
drawn as an ``x`` and can never sit on the front, and the front itself is a staircase through the
highlighted non-dominated trials. The front is always computed by :mod:`study.results.pareto` (the one
place that defines it), through :func:`front_indices`, so a plot can never disagree with the
front the study reports.

Records are :class:`study.results.records.TrialRecord` dicts (what the runner collects from each trial;
accuracies are fractions in [0, 1], ``final`` holds the strong re-evaluation when there is one).

"Search cheap, verify strong": the final numbers come from the strong re-evaluation of the front
(Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", AutoAttack); ``stage="final"`` plots them with arrows from the cheap
search numbers, which makes the gap between the two attacks visible.

Matplotlib is used through :class:`~matplotlib.figure.Figure` directly (no pyplot): no display,
no global backend switch, safe inside Ray workers and MLflow callbacks. The HTML embeds plotly.js
so it opens offline (air-gapped clusters, this machine).
"""

from __future__ import annotations

from study.results.plots.common import (  # noqa: F401
    BASELINE_COLOR,
    DEFAULT_DIRECTIONS,
    DEFAULT_OBJECTIVES,
    DIRECTIONS,
    FRONT_LABEL,
    NO_TRIALS_NOTE,
    STAGES,
    STATUSES,
    UNTRUSTED_LABEL,
    _points,
    _skipped_note,
    _staircase,
    defense_color,
    front_indices,
)
from study.results.plots.front import (  # noqa: F401
    plot_front_html,
    plot_front_png,
)
from study.results.plots.history import (  # noqa: F401
    _mean_std,
    plot_hypervolume_png,
    plot_timeline_png,
    timeline_lanes,
)

"""How a trial ended, named once for every place that records it (trials.json, Optuna, MLflow).

Torch-free on purpose: the Tune driver reads outcomes from reported metrics while trials run, and
importing torch there would cost the driver seconds for one list comprehension.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any


def failed_gates(flags: Iterable[Mapping[str, Any]]) -> list[str]:
    """Ids of the integrity flags (``Flag.as_dict()`` form) that are gates and failed."""
    return [f["id"] for f in flags if f.get("gate") and not f.get("passed")]


def trial_outcome(metrics: Mapping[str, Any] | None, raised: bool) -> dict[str, Any]:
    """``status``, ``trusted`` and ``failed_gates`` of a trial from its last reported metrics.

    Only the final report (``final`` set) carries a verdict. Without one the trial either raised
    (``failed``) or was cut short by the scheduler (``stopped``); neither is trusted.
    """
    if not metrics or not metrics.get("final"):
        return {"status": "failed" if raised else "stopped", "trusted": False, "failed_gates": []}
    flags = json.loads(metrics.get("flags_json") or "[]")
    return {"status": metrics.get("status"), "trusted": bool(metrics.get("trusted")),
            "failed_gates": failed_gates(flags)}

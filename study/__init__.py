"""robust-study: distributed hyperparameter studies of adversarial-robustness defenses.

The public entry points are imported lazily so ``import study`` stays cheap (a Ray worker
imports it for every trial).
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_trial", "load_model", "TrialResult", "TrialConfig", "load_trial_config"]


def __getattr__(name: str) -> Any:
    if name in ("run_trial", "load_model", "TrialResult", "save_trial"):
        from study import trial

        return getattr(trial, name)
    if name in ("TrialConfig", "load_trial_config", "parse_trial_config", "ConfigError"):
        from study import config

        return getattr(config, name)
    raise AttributeError(f"module 'study' has no attribute {name!r}")

"""One trial: build the model for a config, train it, attack it, check the attacks, return numbers.

``run_trial`` is a pure function of a typed :class:`~study.config.TrialConfig` — no Ray, no
MLflow, no files, no globals — so the same call runs in a plain loop, under Ray Tune, or from the
CLI. Writing results to disk is :func:`save_trial`'s job; a study reports through ``on_epoch``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from defenses import build_model
from study.config import ConfigError, TrialConfig, dump_trial_config, load_trial_config
from study.data import DataBundle, eval_tensors, load_data
from study.evaluation.suite import evaluate
from study.reproducibility import pinned, reproducible
from study.results.records import FINAL_SPLIT, SEARCH_SPLIT, failed_gates
from study.training.loop import EpochReport, fit

log = logging.getLogger(__name__)

OBJECTIVES = ("clean_accuracy", "robust_accuracy")


@dataclass
class TrialResult:
    """What one trial measured. Accuracies are fractions in [0, 1]."""

    status: str
    """completed | diverged."""
    clean_accuracy: float
    """On the split named by ``split``."""
    robust_accuracy: float
    trusted: bool
    """All gating integrity checks passed (docs/evaluation.md)."""
    attacks: list[dict[str, Any]] = field(default_factory=list)
    """Per attack: name, accuracy and every setting used."""
    eps_curve: list[tuple[float, float]] = field(default_factory=list)
    flags: list[dict[str, Any]] = field(default_factory=list)
    protocol: dict[str, Any] = field(default_factory=dict)
    stochastic: bool = False
    epochs_run: int = 0
    reason: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    split: str = "val"
    """The split the accuracies were measured on: ``val`` (the search's), or ``test`` when the
    config has no validation split (data.val_fraction: 0)."""
    split_sizes: dict[str, int] = field(default_factory=dict)
    """Samples in train, val and test, and how many of ``split`` were attacked (``evaluated``)."""
    num_parameters: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    wall_time: float = 0.0
    reached: dict[str, float] = field(default_factory=dict)
    """What the defense's training schedule left in the model, e.g. ``kwta_gamma_reached`` (the
    gamma it ended with, which a short budget or early stopping can leave above the target)."""
    reproducibility: dict[str, Any] = field(default_factory=dict)
    """The threads, determinism and environment the trial ran with (study.reproducibility)."""
    model_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    """Trained weights (CPU tensors); not part of ``to_dict``."""

    def objectives(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in OBJECTIVES}

    def failed_gates(self) -> list[str]:
        return failed_gates(self.flags)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("model_state")
        out["failed_gates"] = self.failed_gates()
        return out


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit ``cuda`` on a machine without one fails."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {spec!r} requested but no CUDA device is available; use auto or cpu")
    return device


def make_model(config: TrialConfig, bundle_info: Any) -> torch.nn.Module:
    """The model a config describes, normalisation inside (inputs in [0,1])."""
    defense = config.model.defense
    return build_model(
        config.model.backbone,
        num_classes=bundle_info.num_classes,
        in_channels=bundle_info.channels,
        defense=None if defense == "none" else defense,
        defense_params=dict(config.model.defense_params),
        mean=bundle_info.mean,
        std=bundle_info.std,
        width=config.model.width,
        head=config.model.head,
        input_size=bundle_info.image_size,
    )


def runtime_defense_params(config: TrialConfig) -> dict[str, Any]:
    """The defense parameters the trial runs with, resolved once for training and evaluation.

    ``training.cas_beta``, when set, overrides the defense's ``beta``: the same value then
    weights the auxiliary loss in training and the adaptive attack's joint loss in evaluation.
    """
    params = dict(config.model.defense_params)
    if config.training.cas_beta is not None:
        params["beta"] = config.training.cas_beta
    return params


def split_sizes(bundle: DataBundle) -> dict[str, int]:
    """Samples in each split of ``bundle`` (0 for a missing validation split)."""
    return {
        name: 0 if part is None else len(part)  # type: ignore[arg-type]
        for name, part in (("train", bundle.train), ("val", bundle.val), ("test", bundle.test))
    }


def search_split(bundle: DataBundle) -> tuple[str, Any]:
    """The split a trial is scored on: validation, so that the test split stays untouched until the
    front is verified. Without one (data.val_fraction: 0) the test split, named as such."""
    if bundle.val is not None and len(bundle.val) > 0:  # type: ignore[arg-type]
        return SEARCH_SPLIT, bundle.val
    log.warning("no validation split (data.val_fraction: 0): the trial is scored on the test split")
    return FINAL_SPLIT, bundle.test


@reproducible  # the config's threads, determinism and seeds hold while it runs
def run_trial(
    config: TrialConfig,
    *,
    on_epoch: Callable[[EpochReport], None] | None = None,
    resume: dict[str, Any] | None = None,
    data: DataBundle | None = None,
) -> TrialResult:
    """Train the configured model, attack it with the configured suite and check the attacks.

    The attacks run on the validation split (:func:`search_split`): a trial's numbers are what a
    search decides on, and the test split is kept for the verification of the front.

    Args:
        config: the validated trial configuration.
        on_epoch: called after every epoch with metrics and a resumable checkpoint.
        resume: a checkpoint from ``on_epoch`` to continue an interrupted trial.
        data: an already loaded dataset (a study shares one per worker); loaded if None.

    Returns:
        The trial's numbers. A loss that turns NaN/inf gives ``status="diverged"`` (and zero
        objectives, untrusted) instead of raising.
    """
    start = time.perf_counter()
    device = resolve_device(config.device)
    bundle = data if data is not None else load_data(config.data, seed=config.seed)
    torch.manual_seed(config.seed)
    model = make_model(config, bundle.info).to(device)
    num_parameters = sum(p.numel() for p in model.parameters())
    defense_params = runtime_defense_params(config)

    fit_result = fit(
        model,
        bundle,
        config.training,
        defense=config.model.defense,
        defense_params=defense_params,
        device=device,
        seed=config.seed,
        on_epoch=on_epoch,
        resume=resume,
        num_workers=config.data.num_workers,
    )
    split, eval_set = search_split(bundle)
    x, y = eval_tensors(eval_set, config.eval.n_samples, seed=config.seed)
    common = dict(
        epochs_run=fit_result.epochs_run,
        history=fit_result.history,
        num_parameters=num_parameters,
        train_seconds=fit_result.seconds,
        split=split,
        split_sizes={**split_sizes(bundle), "evaluated": len(y)},
        reached=dict(fit_result.reached),
    )
    if fit_result.status != "completed":
        log.warning("trial %s %s: %s", config.name, fit_result.status, fit_result.reason)
        return TrialResult(
            status=fit_result.status,
            clean_accuracy=0.0,
            robust_accuracy=0.0,
            trusted=False,
            reason=fit_result.reason,
            wall_time=time.perf_counter() - start,
            **common,
        )

    evaluation = evaluate(
        model,
        x.to(device),
        y.to(device),
        config.eval,
        num_classes=bundle.info.num_classes,
        defense=config.model.defense,
        defense_params=defense_params,
        recipe=config.training.recipe,
        seed=config.seed,
    )
    return TrialResult(
        status="completed",
        clean_accuracy=evaluation.clean_accuracy,
        robust_accuracy=evaluation.robust_accuracy,
        trusted=evaluation.trusted,
        attacks=evaluation.attacks,
        eps_curve=evaluation.eps_curve,
        flags=evaluation.flags,
        protocol=evaluation.protocol,
        stochastic=evaluation.stochastic,
        eval_seconds=evaluation.seconds,
        wall_time=time.perf_counter() - start,
        model_state={k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in model.state_dict().items()},
        **common,
    )


def save_trial(config: TrialConfig, result: TrialResult, out_dir: str | Path) -> Path:
    """Write ``result.json``, a complete re-runnable ``config.yaml`` and ``model.pt``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # With the thread count and environment the run used: re-running this file reproduces it.
    (out / "config.yaml").write_text(dump_trial_config(pinned(config, result.reproducibility)))
    (out / "result.json").write_text(json.dumps(result.to_dict(), indent=2, default=float))
    if result.model_state is not None:
        # Plain tensors only: loadable with weights_only=True, never a pickle of code.
        torch.save(result.model_state, out / "model.pt")
    return out


def load_model(directory: str | Path, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a saved trial's model from its ``config.yaml`` and weights, in eval mode.

    Raises:
        ConfigError: the directory lacks its files, or the weights do not fit the config.
    """
    directory = Path(directory)
    weights = directory / "model.pt"
    if not weights.is_file():
        raise ConfigError(f"{directory}: no model.pt (is this a trial output directory?)")
    config = load_trial_config(directory / "config.yaml")
    from study.data import dataset_info

    model = make_model(config, dataset_info(config.data))
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"{weights}: weights do not match {directory / 'config.yaml'} ({first})") from None
    except Exception as err:  # noqa: BLE001 - corrupt pickles raise many types
        raise ConfigError(f"{weights}: unreadable weights ({type(err).__name__}: {err})") from None
    return model.to(device).eval()

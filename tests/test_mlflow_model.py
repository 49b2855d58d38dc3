"""The trial worker's MLflow model folder (study.mlflow_model): what it holds, and what saving it costs."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from mlflow.utils import requirements_utils

from defenses.build import build_model
from study import mlflow_model


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=10, in_channels=1, defense="none", defense_params={},
                       mean=(0.5,), std=(0.25,), width=0.25).eval()


def _requirements(folder: Path) -> list[str]:
    return sorted(folder.joinpath("requirements.txt").read_text().split())


def test_saving_skips_the_package_scan_and_writes_what_a_scanned_save_writes(tmp_path: Path, monkeypatch) -> None:
    model, example = _model(), torch.rand(4, 1, 8, 8)
    assert requirements_utils._MODULES_TO_PACKAGES is None  # nothing in this process built the map yet

    def no_scan() -> None:
        raise AssertionError("MLflow scanned every installed distribution")

    with monkeypatch.context() as patched:
        patched.setattr(requirements_utils.importlib_metadata, "packages_distributions", no_scan)
        mlflow_model._save(model, tmp_path / "fast", example, stochastic=False)
    # Unbuilt again afterwards: whatever infers requirements later in the process builds it whole.
    assert requirements_utils._MODULES_TO_PACKAGES is None and requirements_utils._PACKAGES_TO_MODULES is None
    assert mlflow_model.model_format(tmp_path / "fast") == "pt2"

    # The same save with MLflow's own path, scan included, writes the same requirements.
    monkeypatch.setattr(mlflow_model, "_no_package_scan", nullcontext)
    mlflow_model._save(model, tmp_path / "scanned", example, stochastic=False)
    assert requirements_utils._MODULES_TO_PACKAGES is not None  # the scan ran this time
    fast = _requirements(tmp_path / "fast")
    assert fast == _requirements(tmp_path / "scanned")
    assert f"torch=={torch.__version__.split('+')[0]}" in fast and any(r.startswith("mlflow==") for r in fast)


def test_a_map_already_built_is_left_alone(monkeypatch) -> None:
    built = {"torch": ["torch"]}
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", built)
    monkeypatch.setattr(requirements_utils, "_PACKAGES_TO_MODULES", {"torch": "torch"})
    with mlflow_model._no_package_scan():
        assert requirements_utils._MODULES_TO_PACKAGES is built
    assert requirements_utils._MODULES_TO_PACKAGES is built


@pytest.fixture(autouse=True)
def _unbuilt_map(monkeypatch) -> None:
    # Each test starts from a process in which nothing has built MLflow's map (as a trial worker).
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    monkeypatch.setattr(requirements_utils, "_PACKAGES_TO_MODULES", None)

"""Three splits, one rule: the search sees validation numbers only, the verification of the front the
untouched test split; every number says which split it comes from; a failed verification is marked,
never replaced by search numbers, and the study's exit status says its front is incomplete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from study import cli
from study.results import report
from study.results.records import labelled, stage_values


def _record(
    number: int,
    val: tuple[float, float],
    *,
    test: tuple[float, float] | None = None,
    verified: bool | None = None,
    error: str = "",
    trusted: bool = True,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "trial_id": f"t{number}",
        "number": number,
        "defense": "kwta",
        "params": {"defense": "kwta", "kwta.gamma": 0.1},
        "status": "completed",
        "trusted": trusted,
        "flags_failed": [],
        "checkpoint": f"/ckpt/{number}",
        "val_clean_accuracy": val[0],
        "val_robust_accuracy": val[1],
        "train_seconds": 1.0,
        "verified": verified,
        "finished_at": 1000.0 + number,
    }
    if test is not None:
        record["final"] = {
            "split": "test",
            "test_clean_accuracy": test[0],
            "test_robust_accuracy": test[1],
            "trusted": True,
            "flags": [{"id": "R8", "gate": True, "passed": True}],
            "flags_failed": [],
            "attacks": [{"name": "autoattack", "accuracy": test[1]}],
            "split_sizes": {"train": 1144, "val": 203, "test": 450, "evaluated": 200},
            "seconds": 2.0,
        }
    elif verified is False:
        record.update(final=None, final_error=error or "worker died")
    return record


# --------------------------------------------------------------------------- labels


def test_labels_name_the_split_and_leave_costs_alone() -> None:
    assert labelled("clean_accuracy", "val") == "val_clean_accuracy"
    assert labelled("robust_accuracy", "test") == "test_robust_accuracy"
    assert labelled("train_seconds", "test") == "train_seconds"
    record = _record(0, (0.9, 0.4), test=(0.8, 0.3), verified=True)
    objectives = ["clean_accuracy", "robust_accuracy", "train_seconds"]
    assert stage_values(record, objectives, "search") == [0.9, 0.4, 1.0]
    assert stage_values(record, objectives, "final") == [0.8, 0.3, 1.0]
    # An unverified record has no final numbers, and the search ones do not stand in for them.
    assert stage_values(_record(1, (0.9, 0.4), verified=False), objectives, "final") == [None, None, 1.0]
    with pytest.raises(ValueError, match="stage 'verify'"):
        stage_values(record, objectives, "verify")


def test_final_front_is_empty_without_verified_trials_never_the_search_front() -> None:
    from study.results.pareto import front_of_records

    records = [_record(0, (0.9, 0.4), verified=False), _record(1, (0.8, 0.5), verified=False)]
    objectives, directions = ["clean_accuracy", "robust_accuracy"], ["max", "max"]
    assert front_of_records(records, objectives, directions) == [0, 1]
    assert front_of_records(records, objectives, directions, "final") == []
    # Verified numbers decide the final front, not the search's: #1 is better on validation, #0
    # on test.
    records = [
        _record(0, (0.9, 0.4), test=(0.9, 0.35), verified=True),
        _record(1, (0.95, 0.5), test=(0.85, 0.30), verified=True),
    ]
    assert front_of_records(records, objectives, directions) == [1]
    assert front_of_records(records, objectives, directions, "final") == [0]


def test_failed_verification_is_marked_in_table_csv_and_export_and_sets_the_exit_status(tmp_path: Path) -> None:
    from study.results.artifacts import front_rows
    from study.results.export import export_document, front_to_quote
    from study.spec import load_spec

    good = {**_record(0, (0.9, 0.4), test=(0.88, 0.35), verified=True), "on_front": True, "on_final_front": True}
    bad = {**_record(1, (0.8, 0.6), verified=False, error="ray worker died"), "on_front": True, "on_final_front": False}
    off = {**_record(2, (0.5, 0.1)), "on_front": False, "on_final_front": False}
    records = [good, bad, off]

    front = front_to_quote(records)
    assert [r["number"] for r in front] == [0, 1]
    table = report.format_front(front, "Verified front")
    assert "val clean" in table and "test clean" in table
    row_good, row_bad = (line for line in table.splitlines() if line.strip().startswith(("0 ", "1 ")))
    assert "88.0%" in row_good and "90.0%" in row_good  # test and val numbers, side by side
    assert "UNVERIFIED" in row_bad and "%" not in row_bad.split("UNVERIFIED")[1].split("gamma")[0]
    assert "verification failed: ray worker died" in table

    rows = {row["number"]: row for row in front_rows(front)}
    assert rows[0]["test_clean_accuracy"] == 0.88 and rows[0]["val_clean_accuracy"] == 0.9
    assert rows[0]["verified"] == "yes"
    assert rows[1]["test_clean_accuracy"] is None and rows[1]["verified"] == "FAILED: ray worker died"

    document = export_document(load_spec("demo"), front)
    by_number = {t["number"]: t for t in document["trials"]}
    assert document["verified"] is False
    assert by_number[0]["verified"] is True
    assert by_number[0]["metrics"] == {
        "val_clean_accuracy": 0.9,
        "val_robust_accuracy": 0.4,
        "test_clean_accuracy": 0.88,
        "test_robust_accuracy": 0.35,
    }
    assert by_number[1]["verified"] is False and by_number[1]["not_verified"] == "ray worker died"
    assert set(by_number[1]["metrics"]) == {"val_clean_accuracy", "val_robust_accuracy"}

    status, message = cli.study_exit_status(records)
    assert status == cli.EXIT_INCOMPLETE != cli.EXIT_OK
    assert message is not None and "#1 (ray worker died)" in message and "incomplete" in message
    assert cli.study_exit_status([good, off]) == (cli.EXIT_OK, None)
    # No completed trial at all stays the stronger failure.
    assert cli.study_exit_status([{**off, "status": "diverged"}])[0] == cli.EXIT_FAILED


def test_every_verification_failed_gives_an_unverified_front_not_the_search_numbers() -> None:
    from study.results.export import export_document, front_to_quote
    from study.spec import load_spec

    records = [
        {**_record(0, (0.9, 0.4), verified=False), "on_front": True, "on_final_front": False},
        {**_record(1, (0.5, 0.1)), "on_front": False, "on_final_front": False},
    ]
    front = front_to_quote(records)
    assert [r["number"] for r in front] == [0]
    document = export_document(load_spec("demo"), front)
    assert document["verified"] is False
    assert not any(k.startswith("test_") for k in document["trials"][0]["metrics"])
    assert cli.study_exit_status(records)[0] == cli.EXIT_INCOMPLETE


def test_verify_off_exports_the_search_front_labelled_unverified() -> None:
    from study.results.export import export_document, front_to_quote
    from study.spec import load_spec

    records = [{**_record(0, (0.9, 0.4)), "on_front": True, "on_final_front": False}]
    document = export_document(load_spec("demo"), front_to_quote(records))
    assert document["trials"][0]["verified"] is False
    assert document["trials"][0]["not_verified"] == "verification did not run"
    assert cli.study_exit_status(records) == (cli.EXIT_OK, None)  # verify: false is the user's choice


def test_front_trial_without_a_saved_model_is_marked_unverified() -> None:
    from study.orchestration.verify import verify_front
    from study.spec import load_spec

    record = {**_record(0, (0.9, 0.4)), "checkpoint": None}
    verify_front(load_spec("demo"), [record])  # nothing to attack: Ray is never asked
    assert record["verified"] is False and record["final"] is None and record["final_error"]


def test_verification_goes_on_the_trial_run_labelled_test() -> None:
    from study.tracking.verification import verification_entries

    metrics, tags = verification_entries(_record(0, (0.9, 0.4), test=(0.88, 0.35), verified=True))
    values = {m.key: m.value for m in metrics}
    assert values["test_clean_accuracy"] == 0.88 and values["test_robust_accuracy"] == 0.35
    assert values["test_robust_acc_autoattack"] == 0.35
    assert not any(k.startswith("val_") or k in ("clean_accuracy", "robust_accuracy") for k in values)
    tag = {t.key: t.value for t in tags}
    assert tag["verified"] == "true" and tag["test_flag.R8"] == "pass" and tag["test_trusted"] == "True"
    assert (tag["split.train"], tag["split.val"], tag["split.test"], tag["test_samples_attacked"]) == (
        "1144",
        "203",
        "450",
        "200",
    )

    metrics, tags = verification_entries(_record(1, (0.9, 0.4), verified=False, error="timeout"))
    assert metrics == [] and {t.key: t.value for t in tags} == {"verified": "false", "verification_error": "timeout"}
    assert verification_entries(_record(2, (0.9, 0.4))) == ([], [])  # never tried: nothing claimed


def test_a_study_spec_needs_a_validation_split() -> None:
    from study.config import ConfigError
    from study.spec import parse_spec

    with pytest.raises(ConfigError, match=r"data: val_fraction: a study scores trials on the validation split"):
        parse_spec({"name": "x", "data": {"val_fraction": 0}})


# --------------------------------------------------------------------------- one trial never reads test


class _Untouchable(Dataset):
    """A test split that fails the trial the moment a sample (or its tensors) is read."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        raise AssertionError("the test split was read before verification")


@pytest.mark.slow
def test_a_trial_is_scored_on_the_validation_split_and_never_reads_the_test_split() -> None:
    from study.config import TrialConfig
    from study.data import load_data
    from study.trial import run_trial

    config = TrialConfig.model_validate(
        {
            "data": {"train_subset": 200},
            "training": {"epochs": 1},
            "eval": {"n_samples": 30, "attacks": [{"name": "pgd", "steps": 2}], "eps_curve": [], "check_samples": 10},
        }
    )
    bundle = load_data(config.data, seed=config.seed)
    assert isinstance(bundle.val, TensorDataset)
    bundle.test = _Untouchable(len(bundle.test))  # type: ignore[arg-type]
    result = run_trial(config, data=bundle)
    assert result.status == "completed", result.reason
    assert result.split == "val"
    assert result.split_sizes == {"train": 200, "val": len(bundle.val), "test": bundle.test.n, "evaluated": 30}
    # The numbers are the validation samples': recompute clean accuracy on the first 30 of them.
    from study.data import eval_tensors
    from study.trial import make_model

    model = make_model(config, bundle.info)
    model.load_state_dict(result.model_state)
    x, y = eval_tensors(bundle.val, 30, seed=config.seed)
    with torch.no_grad():
        clean = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert result.clean_accuracy == pytest.approx(clean)


# --------------------------------------------------------------------------- a study with a poisoned test split


def _digits_tree(root: Path, poison: bool) -> Path:
    """Scikit-learn's digits as an ImageFolder tree: train/ (the search's train and validation
    splits come from here) and test/. ``poison`` moves every test image to the next class's folder:
    the same images, every label wrong."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    test = set(order[:300].tolist())
    for i, (image, label) in enumerate(zip(images, digits.target, strict=True)):
        split = "test" if i in test else "train"
        folder_label = (label + 1) % 10 if (poison and split == "test") else label
        folder = root / split / str(folder_label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i:04d}.png")
    return root


def _study_spec(tmp_path: Path, data_dir: Path) -> Path:
    import yaml

    spec = {
        "name": "split",
        "data": {"name": "imagefolder", "data_dir": str(data_dir), "image_size": 8, "augment": False},
        "model": {"backbone": "small_cnn"},
        "defenses": ["kwta"],
        "include_baseline": True,
        "training": {"epochs": 1, "batch_size": 64},
        "search_eval": {
            "n_samples": 60,
            # PGD-10, not 3: after one epoch Square finds points PGD-3 misses (R8) and no trial
            # would be trusted, so nothing would reach the front and its verification.
            "attacks": [{"name": "pgd", "steps": 10}],
            "eps_curve": [],
            "check_samples": 30,
        },
        "final_eval": {
            "n_samples": 60,
            "attacks": [{"name": "pgd", "steps": 10}],
            "eps_curve": [],
            "check_samples": 20,
        },
        # After the two enqueued paper defaults TPE proposes from the told (validation) numbers, so
        # the parameter sequence is itself a search decision that test numbers must not move.
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
        "num_trials": 3,
        "concurrency": 1,
        "mlflow": {"log_models": False},
        "storage": str(tmp_path / "results"),
    }
    path = tmp_path / "split.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run_study(tmp_path: Path, poison: bool) -> dict[str, Any]:
    import optuna

    tmp_path.mkdir()
    data = _digits_tree(tmp_path / "data", poison)
    spec = _study_spec(tmp_path, data)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "study", "run", str(spec), "--quiet"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    study_dir = tmp_path / "results" / "split"
    ot = optuna.load_study(study_name="split", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    records = json.loads((study_dir / "trials.json").read_text())
    return {
        "stdout": proc.stdout,
        "records": records,
        "optuna": ot,
        "optuna_trials": [(t.number, t.params, t.state.name, t.values) for t in ot.trials],
    }


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1800)
def test_poisoned_test_split_changes_no_search_decision_only_the_test_numbers(tmp_path: Path) -> None:
    clean = _run_study(tmp_path / "clean", poison=False)
    poisoned = _run_study(tmp_path / "poisoned", poison=True)

    # Every search decision is the same: what Optuna proposed, in order, and what it was told.
    assert clean["optuna"].metric_names == ["val_clean_accuracy", "val_robust_accuracy"]
    assert clean["optuna_trials"] == poisoned["optuna_trials"]
    assert len(clean["optuna_trials"]) == 3

    def search_view(records: list[dict[str, Any]]) -> list[tuple]:
        return sorted(
            (
                json.dumps(r["params"], sort_keys=True),
                r["status"],
                r["trusted"],
                r["val_clean_accuracy"],
                r["val_robust_accuracy"],
                r["on_front"],
            )
            for r in records
        )

    assert search_view(clean["records"]) == search_view(poisoned["records"])
    for r in clean["records"]:
        if r["status"] == "completed":
            assert r["split_sizes"]["test"] == 300 and r["split_sizes"]["val"] > 0

    # Only the verification reads the test split, and it sees the poison: same models, other numbers.
    def test_numbers(records: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
        return {
            json.dumps(r["params"], sort_keys=True): (
                r["final"]["test_clean_accuracy"],
                r["final"]["test_robust_accuracy"],
            )
            for r in records
            if r.get("verified")
        }

    clean_test, poisoned_test = test_numbers(clean["records"]), test_numbers(poisoned["records"])
    assert clean_test and clean_test.keys() == poisoned_test.keys(), (clean["stdout"], poisoned["stdout"])
    for key, (clean_acc, _) in clean_test.items():
        # Every test label shifted by one: a model that learned digits is mostly wrong on them.
        assert poisoned_test[key][0] < clean_acc, (key, clean_acc, poisoned_test[key])

    # The demo-style report shows both splits for the verified front.
    assert "Verified front (test split" in clean["stdout"] and "val clean" in clean["stdout"]


def test_study_run_puts_the_verification_on_each_trial_run(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from study.tracking import StudyRun
    from study.tracking.replay import _Runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = StudyRun(uri, "verify", tmp_path / "mlartifacts")
    parent = study.start("verify", None, params={}, tags={"description": ""})
    runs = _Runs(MlflowClient(tracking_uri=uri), str(study.experiment_id), parent, "verify")
    ids = {n: runs.run_id(f"t{n}") for n in range(3)}  # the runs the trials logged while running
    study.log_verification(
        [
            _record(0, (0.9, 0.4), test=(0.88, 0.35), verified=True),
            _record(1, (0.8, 0.6), verified=False, error="worker died"),
            _record(2, (0.5, 0.1)),
        ]
    )
    study.finish()
    client = MlflowClient(tracking_uri=uri)
    verified, failed, untried = (client.get_run(ids[n]).data for n in range(3))
    assert verified.metrics["test_clean_accuracy"] == 0.88 and verified.tags["verified"] == "true"
    assert verified.tags["split.test"] == "450" and verified.tags["test_flag.R8"] == "pass"
    assert "test_clean_accuracy" not in failed.metrics
    assert failed.tags["verified"] == "false" and failed.tags["verification_error"] == "worker died"
    assert "verified" not in untried.tags


def test_a_study_recorded_before_the_splits_is_refused_not_relabelled(tmp_path: Path) -> None:
    from study.config import ConfigError
    from study.orchestration.runner import load_records

    study_dir = tmp_path / "old"
    study_dir.mkdir()
    (study_dir / "study.json").write_text(json.dumps({"spec": {}}))
    (study_dir / "trials.json").write_text(json.dumps([{"clean_accuracy": 0.9, "robust_accuracy": 0.4}]))
    with pytest.raises(ConfigError, match="before search and verification used separate splits"):
        load_records(str(tmp_path), "old")
    (study_dir / "trials.json").write_text(json.dumps([_record(0, (0.9, 0.4))]))
    assert load_records(str(tmp_path), "old")[1][0]["val_clean_accuracy"] == 0.9

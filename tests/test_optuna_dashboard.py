"""Optuna's own record of a study, as optuna-dashboard shows it (issue 16): the objectives carry
their names, and every Optuna trial says which defense it ran and how it ended, as trials.json does."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cdp import Browser
from conftest import BIN, Driver, free_port, stop_group, wait_http, write_spec
from test_browser import chromium, listening_addresses  # noqa: F401 - chromium is a fixture

ATTRS = ("defense", "status", "trusted", "failed_gates")


def _final(status: str, trusted: bool, flags: list[dict[str, Any]]) -> dict[str, Any]:
    """A trial's final report as the trainable sends it (only what the searcher reads)."""
    return {"val_clean_accuracy": 0.9, "val_robust_accuracy": 0.6, "train_seconds": 3.0, "final": 1, "status": status,
            "trusted": int(trusted), "flags_json": json.dumps(flags)}


def _flag(rule: str, gate: bool, passed: bool) -> dict[str, Any]:
    return {"id": rule, "name": rule.lower(), "passed": passed, "gate": gate, "values": {}, "message": ""}


PASSING = [_flag("R1", True, True), _flag("R8", True, True), _flag("R7", False, True)]
# A failed gate (R8), a passed gate (R1) and a failed warn-only rule (R7): only R8 makes it untrusted.
FAILING = [_flag("R1", True, True), _flag("R8", True, False), _flag("R7", False, False)]

# name: (Tune's last result, trial raised, Optuna state, status, trusted, failed gates)
OUTCOMES: dict[str, tuple[dict[str, Any] | None, bool, str, str, bool, list[str]]] = {
    "trusted": (_final("completed", True, PASSING), False, "COMPLETE", "completed", True, []),
    "untrusted": (_final("completed", False, FAILING), False, "FAIL", "completed", False, ["R8"]),
    "diverged": (_final("diverged", False, []), False, "FAIL", "diverged", False, []),
    "stopped": ({"val_clean_accuracy": 0.5, "val_robust_accuracy": 0.1, "train_seconds": 1.0, "final": 0,
                 "status": "running", "trusted": 0}, False, "PRUNED", "stopped", False, []),
    "raised": (None, True, "FAIL", "failed", False, []),
}


def test_completion_hook_labels_optuna_trials_and_names_objectives(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import optuna

    from study.orchestration.searcher import make_searcher, optuna_storage_url
    from study.spec import parse_spec

    # A cost objective too, so the names must come from the spec, not a fixed pair.
    spec_file = write_spec(tmp_path, "hook", trials=8, objectives=["clean_accuracy", "robust_accuracy", "train_seconds"])
    spec = parse_spec(yaml.safe_load(spec_file.read_text()))
    study_dir = tmp_path / "hook"
    study_dir.mkdir()
    searcher = make_searcher(spec, study_dir)
    configs = {name: searcher.suggest(name) for name in OUTCOMES}
    assert len({c["defense"] for c in configs.values()}) > 1, configs  # defense is worth checking
    for name, (result, raised, *_) in OUTCOMES.items():
        searcher.on_trial_complete(name, result=result, error=raised)

    study = optuna.load_study(study_name="hook", storage=optuna_storage_url(study_dir))
    # Named after the split they are measured on: the search never sees test numbers.
    assert study.metric_names == ["val_clean_accuracy", "val_robust_accuracy", "train_seconds"]
    for name, (result, _, state, status, trusted, gates) in OUTCOMES.items():
        trial = study.trials[searcher._ot_trials[name].number]
        assert trial.state.name == state, name
        assert trial.user_attrs == {"defense": configs[name]["defense"], "status": status, "trusted": trusted,
                                    "failed_gates": gates}, name
        if state == "COMPLETE":
            assert trial.values == [result[o] for o in study.metric_names]

    # A trial told before the driver was killed and Tune's snapshot lost that: resumed, the hook
    # finds it finished. It warns and leaves the trial alone instead of failing the study.
    searcher.suggest("told-before")
    number = searcher._ot_trials["told-before"].number
    study.tell(number, state=optuna.trial.TrialState.FAIL)
    with caplog.at_level(logging.WARNING, logger="study.orchestration.searcher"):
        searcher.on_trial_complete("told-before", result=OUTCOMES["trusted"][0])
    assert any("already finished" in r.getMessage() for r in caplog.records if r.name == "study.orchestration.searcher")
    again = optuna.load_study(study_name="hook", storage=optuna_storage_url(study_dir)).trials[number]
    assert again.state.name == "FAIL" and again.user_attrs == {}


# --------------------------------------------------------------------------- a real study


@pytest.fixture(scope="module")
def dashboard_study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny 3-trial study (baseline and k-WTA defaults, then one sampled trial)."""
    tmp = tmp_path_factory.mktemp("dashboard-study")
    spec = write_spec(tmp, "dash", trials=3)
    driver = Driver("run", str(spec), cwd=tmp)
    try:
        code = driver.wait(timeout=780)
    finally:
        driver.stop()
    assert code == 0, driver.output[-3000:]
    study_dir = tmp / "results" / "dash"
    state = json.loads((study_dir / "study.json").read_text())
    # Optuna's objectives are the spec's, as measured on the validation split (val_...).
    objectives = [f"val_{o}" if o.endswith("accuracy") else o for o in state["spec"]["objectives"]]
    return {"study_dir": study_dir, "name": "dash", "objectives": objectives,
            "records": json.loads((study_dir / "trials.json").read_text())}


def _record_for(params: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The one record whose Tune config holds exactly the Optuna trial's parameters."""
    matches = [r for r in records if all(k in r["params"] and r["params"][k] == v for k, v in params.items())]
    assert len(matches) == 1, (params, [r["params"] for r in records])
    return matches[0]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_study_optuna_trials_match_trials_json(dashboard_study: dict[str, Any]) -> None:
    import optuna

    from study.orchestration.searcher import optuna_storage_url

    study = optuna.load_study(study_name="dash", storage=optuna_storage_url(dashboard_study["study_dir"]))
    assert study.metric_names == dashboard_study["objectives"]
    records = dashboard_study["records"]
    assert len(study.trials) == len(records) == 3
    for trial in study.trials:
        record = _record_for(trial.params, records)
        assert trial.user_attrs == {"defense": record["defense"], "status": record["status"],
                                    "trusted": record["trusted"], "failed_gates": record["flags_failed"]}
        assert (trial.state.name == "COMPLETE") == (record["status"] == "completed" and record["trusted"])


# --------------------------------------------------------------------------- optuna-dashboard


def check_dashboard_api(base: str, name: str, objectives: list[str]) -> tuple[int, dict[str, Any]]:
    """optuna-dashboard's JSON API at ``base`` names study ``name``'s objectives; its id and detail."""
    import urllib.request

    def get(path: str) -> Any:
        with urllib.request.urlopen(base + path, timeout=30) as response:  # loopback only
            return json.load(response)

    study_id = next(s["study_id"] for s in get("/api/studies")["study_summaries"] if s["study_name"] == name)
    detail = get(f"/api/studies/{study_id}")
    assert detail.get("objective_names") == objectives, detail.get("objective_names")
    assert detail["best_trials"], "no trial on Optuna's Pareto front"
    return study_id, detail


# The text beside the "User Attributes" label on a trial's page, one "key value" a line.
USER_ATTRS_JS = """(() => {
  const label = [...document.querySelectorAll('p')].find(e => e.textContent.trim() === 'User Attributes');
  const value = label && label.nextElementSibling;
  return value ? value.innerText.split('\\n').map(s => s.trim()).filter(s => s).sort() : [];
})()"""


def check_dashboard_pages(browser: Browser, base: str, study_id: int, detail: dict[str, Any],
                          objectives: list[str], shots: Path) -> None:
    """The study's page plots every complete trial on the Pareto front under the objectives'
    names, and each trial's page lists its user attributes.

    Apart from the API check so that it can be pointed by hand at a study stored without names.
    """
    complete = [t for t in detail["trials"] if t["state"] == "Complete"]
    browser.goto(f"{base}/dashboard/studies/{study_id}")
    points = "#graph-pareto-front.js-plotly-plot .scatterlayer .point"
    browser.wait_for(f"document.querySelectorAll('{points}').length === {len(complete)}", 120,
                     f"{len(complete)} point(s) in the Pareto-front plot")
    # The plot card's Objective X / Y selects show the chosen objectives by name.
    selects = browser.evaluate(
        "[...document.querySelector('#graph-pareto-front').closest('.MuiCard-root, .MuiPaper-root')"
        ".querySelectorAll('[role=combobox]')].map(e => e.innerText.trim())")
    assert selects == objectives[:2], selects
    assert "Objective 0" not in browser.text()
    browser.screenshot(shots / "pareto.png")

    for trial in detail["trials"]:
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        assert set(attrs) == set(ATTRS), attrs
        expected = sorted(f"{k} {v}" for k, v in attrs.items())
        browser.goto(f"{base}/dashboard/studies/{study_id}/trials?numbers={trial['number']}")
        browser.wait_for(f"document.body.innerText.includes('Trial {trial['number']} (trial_id=') && "
                         f"JSON.stringify({USER_ATTRS_JS}) === {json.dumps(json.dumps(expected, separators=(',', ':')))}",
                         60, f"trial {trial['number']}'s user attributes {expected}")
    browser.screenshot(shots / "trial.png")


@pytest.mark.server
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_optuna_dashboard_shows_objective_names_and_trial_attributes(
    chromium: str, dashboard_study: dict[str, Any], tmp_path: Path  # noqa: F811 - the imported fixture
) -> None:
    from study.orchestration.searcher import optuna_storage_url

    executable = BIN / "optuna-dashboard"
    assert executable.exists(), "optuna-dashboard is missing: install the dev extra (pip install -e '.[dev]')"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "dashboard.log"
    with log.open("w") as out:
        # wsgiref: 'auto' would pick gunicorn where it is installed (MLflow brings it).
        dashboard = subprocess.Popen(
            [str(executable), optuna_storage_url(dashboard_study["study_dir"]), "--host", "127.0.0.1",
             "--port", str(port), "--server", "wsgiref"],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    browser = None
    try:
        wait_http(base + "/api/studies", 120, dashboard, log)
        assert listening_addresses(port) == {"127.0.0.1"}
        browser = Browser(chromium, tmp_path / "profile")
        study_id, detail = check_dashboard_api(base, dashboard_study["name"], dashboard_study["objectives"])
        check_dashboard_pages(browser, base, study_id, detail, dashboard_study["objectives"], tmp_path)
    finally:
        if browser is not None:
            browser.close()
        stop_group(dashboard)


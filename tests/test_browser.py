"""A real browser on the product's UI: headless Chromium opens ``robust-study ui`` and finds the
study's experiment, its nested trial runs and the Pareto-front plot (issue 5)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cdp import Browser, find_chromium
from conftest import MlflowServer, free_port, stop_group, wait_http

SCREENSHOT_COPY = Path("/tmp/mlflow_ui.png")


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on ``port`` (from /proc, IPv4 and IPv6)."""
    addresses = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            host, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A = LISTEN
                if width == 8:
                    raw = bytes.fromhex(host)[::-1]
                    addresses.add(".".join(str(b) for b in raw))
                else:
                    addresses.add(host)
    return addresses


@pytest.fixture
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("Chromium is not installed (make install adds Debian's 'chromium' when run as root with apt-get)")
    return path


@pytest.mark.server
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_browser_finds_experiment_trials_and_front_plot(
    chromium: str, logged_study: dict, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    assert logged_study["returncode"] == 0, logged_study["output"][-3000:]
    # The product's command on the server's store; run in the server's folder so the UI serves
    # the same proxied artifact store (./mlartifacts) the server wrote.
    mlflow_server.start()
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name(logged_study["name"])
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trial_names = sorted(r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert len(trial_names) == 4

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        ui = subprocess.Popen(
            [sys.executable, "-m", "study", "ui", "--tracking-uri", f"sqlite:///{mlflow_server.db}", "--port", str(port)],
            cwd=mlflow_server.root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    browser = None
    try:
        wait_http(base + "/health", 180, ui, log)
        assert listening_addresses(port) == {"127.0.0.1"}, "robust-study ui must bind 127.0.0.1 only"
        browser = Browser(chromium, tmp_path / "profile")
        close_assistant = "document.querySelector('button[aria-label=Close]')?.click()"  # a side panel

        # The experiment page lists the study's parent run; expanding it shows the trial runs.
        browser.goto(f"{base}/#/experiments/{experiment.experiment_id}/runs")
        row = f'[row-id="{parent.info.run_id}"]'
        browser.wait_for(f"!!document.querySelector('{row} button[data-component-id*=runnamecellrenderer]')",
                         120, "the study's parent run in the runs table")
        assert logged_study["name"] in browser.text()
        browser.evaluate(close_assistant)
        browser.evaluate(f"document.querySelector('{row} button[data-component-id*=runnamecellrenderer]').click()")
        names = json.dumps(trial_names)
        browser.wait_for(f"{names}.every(n => document.body.innerText.includes(n))", 60, f"trial runs {trial_names}")
        browser.screenshot(tmp_path / "experiment.png")

        # The parent run's artifacts: the Pareto-front plot is listed and rendered.
        browser.goto(f"{base}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}/artifacts/front.png")
        browser.wait_for("['front.png', 'front.html', 'front.csv', 'best.yaml']"
                         ".every(n => document.body.innerText.includes(n))", 120, "the front artifacts")
        browser.wait_for("[...document.images].some(i => i.complete && i.naturalWidth > 300)", 60,
                         "the rendered front.png")
        browser.evaluate(close_assistant)
        shot = browser.screenshot(tmp_path / "front.png")
        assert shot.stat().st_size > 10_000
        shutil.copyfile(shot, SCREENSHOT_COPY)
    finally:
        if browser is not None:
            browser.close()
        stop_group(ui)

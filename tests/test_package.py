"""The project installs as a package: wheel built, installed into a fresh venv, run from elsewhere.

The venv gets only the wheel (``--no-deps``); the heavy dependencies (torch, Ray, MLflow) come
from the running interpreter's site-packages through a ``.pth`` line, so nothing is downloaded.
That line adds the directory alone: the editable install there (its own ``.pth`` finder) is not
processed, so ``study`` can only come from the wheel. Everything runs with the working directory
outside the source tree and without PYTHONPATH, so the repository's folders cannot shadow it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from study.spec import BUILTIN_SPECS

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("defenses", "search_spaces", "study")
# What a build must not see (and would otherwise write into the source tree: build/, *.egg-info).
_ANYWHERE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache")
# Study output folders, only at the top: study/results is a package.
_AT_ROOT = {"build", "dist", "results", "mlruns", "runs", "mlflow.db"}


def _NOT_SOURCE(directory: str, names: list[str]) -> set[str]:
    ignored = set(_ANYWHERE(directory, names))
    if Path(directory).resolve() == REPO:
        ignored |= _AT_ROOT & set(names)
    return ignored


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_installs_into_a_fresh_venv_and_runs_outside_the_tree(tmp_path: Path) -> None:
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    source = tmp_path / "source"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    wheels = tmp_path / "wheels"
    # --no-build-isolation: setuptools from this environment, not downloaded into a build env.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
          str(source)], cwd=tmp_path, env=env)
    (wheel,) = wheels.glob("robust_study-*.whl")
    built = time.perf_counter()

    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {*PACKAGES, *(t for t in tops if t.endswith(".dist-info"))}, tops
    assert {*PACKAGES} <= tops
    assert not [n for n in names if "/tests/" in n or n.split("/")[-1].startswith(("test_", "conftest"))]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    for name in BUILTIN_SPECS:
        assert f"study/specs/{name}.yaml" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=env)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)], cwd=tmp_path, env=env)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path, env=env).stdout.strip())
    (site / "zz_shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = time.perf_counter()

    work = tmp_path / "elsewhere"
    work.mkdir()
    check = (
        "import study, defenses, search_spaces, sys\n"
        f"site = {str(site)!r}\n"
        "for m in (study, defenses, search_spaces):\n"
        "    assert m.__file__.startswith(site), m.__file__\n"
        "from study.errors import ConfigError\n"
        "from study.spec import BUILTIN_SPECS, load_spec\n"
        "for name in BUILTIN_SPECS:\n"
        "    try:\n"
        "        assert load_spec(name).name, name\n"
        "    except ConfigError as err:  # a paper's dataset the user brings (CINIC-10): only that may be missing\n"
        "        assert 'no dataset at' in str(err), err\n"
        "print('loaded', len(BUILTIN_SPECS))\n"
    )
    assert "loaded" in _run([str(python), "-c", check], cwd=work, env=env).stdout

    cli = venv / "bin" / "robust-study"
    assert "trial" in _run([str(cli), "--help"], cwd=work, env=env).stdout
    # The smallest honest trial: the commented default config, cut down (bundled digits, no download).
    config = yaml.safe_load(_run([str(cli), "trial", "--print-default"], cwd=work, env=env).stdout)
    config["data"]["train_subset"] = 300
    config["training"]["epochs"] = 1
    config["eval"].update(n_samples=20, eps_curve=[], checks=False)
    (work / "tiny.yaml").write_text(yaml.safe_dump(config))
    _run([str(cli), "trial", "tiny.yaml", "--out", "out"], cwd=work, env=env)
    assert (work / "out" / "result.json").is_file()
    bad = subprocess.run([str(cli), "run", "no_such_spec"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr[-2000:]
    log.warning("package test: wheel built in %.1f s, venv + install %.1f s, checks %.1f s",
                built - start, installed - built, time.perf_counter() - installed)

"""A sixth defense from outside the package tree, through the public registration API (issue 13).

conftest loads ``tests/plugins/toy_clip.py`` before collection; the registry-driven tests
(contract, build, bench) therefore cover it with no list edited. Here: what the registration
gives the study, that a spec names it, that the study's workers load it, and one clear line when a
plug-in cannot be loaded.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TOY_PLUGIN, write_spec

import defenses
from search_spaces import SPACES
from study.config import ConfigError, parse_trial_config
from study.spec import default_defenses, load_spec, searchable_defenses, trial_config_for

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = ("kap", "kwta", "kaf", "topkconv", "dynamic_k", "cas", "noise")


def test_the_toy_defense_is_registered_everywhere_the_system_looks() -> None:
    assert "toy_clip" in defenses.list_defenses()
    assert "toy_clip" in SPACES and "toy_clip" in searchable_defenses()
    # in_default_study=False: a spec without a defenses list searches the built-ins only.
    assert "toy_clip" not in default_defenses()
    assert [d for d in default_defenses()] == [d for d in BUILTINS if d != "noise"]
    model = defenses.build_model("small_cnn", num_classes=10, in_channels=1, defense="toy_clip",
                                 defense_params={"c": 0.25})
    clips = [m for m in model.modules() if type(m).__name__ == "ToyClip"]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(clips) == len(convs) > 0 and all(m.c == 0.25 for m in clips)
    out = model(torch.rand(3, 1, 8, 8))
    assert out.shape == (3, 10)


def test_a_trial_config_accepts_the_plugin_and_rejects_its_bad_values() -> None:
    config = parse_trial_config({"model": {"defense": "toy_clip", "defense_params": {"c": 2.0}}})
    assert config.model.defense == "toy_clip"
    with pytest.raises(ConfigError, match=r"c=-1.0 must be > 0"):
        parse_trial_config({"model": {"defense": "toy_clip", "defense_params": {"c": -1.0}}})
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) k for defense 'toy_clip'"):
        parse_trial_config({"model": {"defense": "toy_clip", "defense_params": {"k": 2}}})


def test_a_spec_names_the_plugin_relative_to_itself_and_its_trials_carry_it(tmp_path: Path) -> None:
    # The same file conftest loaded (registering it twice would be refused), named relative to
    # the spec's folder: it resolves there, not against the working directory.
    relative = os.path.relpath(TOY_PLUGIN, tmp_path)
    path = write_spec(tmp_path, "toy", 2, defenses=["toy_clip"], plugins=[relative])
    spec = load_spec(str(path))
    assert spec.plugins == [str(TOY_PLUGIN)]
    config = trial_config_for(spec, {"defense": "toy_clip", "toy_clip.c": 0.7})
    assert config.model.defense_params == {"c": 0.7}
    # The trial config names the plug-in, so a Ray worker (or `robust-study trial`) loads it too.
    assert config.plugins == spec.plugins


def test_a_plugin_that_cannot_be_loaded_is_one_line_and_exit_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import this_module_does_not_exist\n")
    for plugins, needle in (([str(tmp_path / "missing.py")], "does not exist"),
                            ([str(broken)], "this_module_does_not_exist"),
                            (["no_such_module_xyz"], "no_such_module_xyz")):
        path = write_spec(tmp_path, "bad", 2, plugins=plugins)
        proc = subprocess.run([sys.executable, "-m", "study", "run", str(path)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "plugin" in lines[0], proc.stderr
        assert not (tmp_path / "results").exists()


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """String literals in code, docstrings excluded."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
        # attribute docstrings (a string expression statement after an assignment)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            docstrings.add(id(node.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_defense_name_is_a_literal_in_the_study_package() -> None:
    # "noise" is also the name of a training recipe (Gaussian input noise), which study/ may name.
    allowed = {("study/training/recipes.py", "noise"), ("study/config.py", "noise")}
    hits = []
    for path in sorted((ROOT / "study").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for line, value in _string_constants(path):
            if value in BUILTINS and (rel, value) not in allowed:
                hits.append(f"{rel}:{line}: {value!r}")
    assert not hits, "defense names spelled out in study/ (ask the registry instead):\n" + "\n".join(hits)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_study_with_the_plugin_runs_end_to_end_in_a_fresh_process(tmp_path: Path) -> None:
    for name in ("toy_clip.py", "toy_clip_space.py"):
        shutil.copy(TOY_PLUGIN.parent / name, tmp_path / name)
    path = write_spec(tmp_path, "toy", 3, defenses=["toy_clip"], plugins=["toy_clip.py"],
                      final_eval={"n_samples": 20, "attacks": [{"name": "pgd", "steps": 5}], "eps_curve": [],
                                  "check_samples": 10})
    data = yaml.safe_load(path.read_text())
    data["training"]["epochs"] = 1
    path.write_text(yaml.safe_dump(data))
    # A new interpreter that never ran conftest: only the spec's `plugins` can teach it the defense,
    # in the driver and in every Ray worker.
    proc = subprocess.run([sys.executable, "-m", "study", "run", str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=840, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((tmp_path / "results" / "toy" / "trials.json").read_text())
    toy = [r for r in records if r["defense"] == "toy_clip"]
    assert toy and all(r["status"] == "completed" for r in toy), records
    assert {r["defense"] for r in records} == {"none", "toy_clip"}
    assert all(0.0 <= r["val_robust_accuracy"] <= r["val_clean_accuracy"] <= 1.0 for r in toy)
    assert (tmp_path / "results" / "toy" / "front.png").stat().st_size > 0

"""Malformed study specs, generated: the loader answers with a valid spec or one ConfigError line.

Hypothesis feeds YAML-shaped data (wrong types at every key, unknown keys, containers where
scalars go, None, NaN, huge numbers, NUL and lone surrogates, top-level non-mappings, raw bytes)
and mutations of the built-in demo spec. Anything but a StudySpec or a one-line ConfigError is a
crash. A subset goes through the real ``robust-study run`` in-process, where a refused spec must
exit 2 with one line, start no Ray and write nothing.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search_spaces import SPACES
from study.cli import main
from study.config import ConfigError
from study.spec import StudySpec, _builtin_text, load_spec, parse_spec, searchable_defenses

BASE: dict[str, Any] = yaml.safe_load(_builtin_text("demo"))
_FIELDS = sorted({*StudySpec.model_fields, "epochs", "eps", "attacks", "name", "steps", "recipe", "seed"})
_NAMES = sorted({*searchable_defenses(), "none", "pgd", "autoattack", "tpe", "digits", "cifar10", "small_cnn", "standard"})
_PARAMS = sorted({p for space in SPACES.values() for p in space.param_names})

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values a YAML file can hold, weighted towards the ones that broke loaders before.
odd_numbers = st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, -(2**63) - 1, 10**400, math.nan, math.inf, -math.inf,
                               1e308, 5e-324, -0.0, 0.5, 99])
odd_text = st.sampled_from(["", " ", "\x00", "a\x00b", "\udcff", "\n", "x\ny", "nan", "1e400", "auto", "kap",
                            "127.0.0.1:9", "ray://127.0.0.1:99999", "http://[::1", "http://127.0.0.1:9",
                            "sqlite:///", "../../etc", "é" * 200])
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), odd_numbers, st.text(max_size=12), odd_text,
    st.sampled_from(_NAMES), st.sampled_from(_PARAMS),
)
keys = st.one_of(st.sampled_from(_FIELDS), st.sampled_from(_PARAMS), st.text(max_size=8), st.integers(), st.none(),
                 st.booleans(), st.sampled_from(["a\nb", "\udcff", ""]))
yamlish = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
defense_entry = st.one_of(
    st.sampled_from(_NAMES),
    st.builds(lambda name, params: {"name": name, **params}, st.sampled_from(_NAMES),
              st.dictionaries(st.sampled_from(_PARAMS), scalars, max_size=3)),
    st.dictionaries(st.sampled_from(_PARAMS + ["name"]), scalars, max_size=3),
    yamlish,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


_BASE_PATHS = _paths(BASE)


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    """The demo spec with one to three changes: a value replaced, a key dropped or one added."""
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_BASE_PATHS))
        parent = doc
        for part in path[:-1]:
            try:
                parent = parent[part]
            except (KeyError, IndexError, TypeError):
                break  # an earlier change replaced this branch
        else:
            last = path[-1]
            if not isinstance(parent, (dict, list)) or (
                isinstance(parent, list) and not (isinstance(last, int) and last < len(parent))
            ):
                continue
            action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
            if action == "replace":
                value = draw(defense_entry if path[0] == "defenses" else yamlish)
                parent[last] = value
            elif action == "delete" and isinstance(parent, dict):
                parent.pop(last, None)
            elif action == "delete":
                del parent[last]
            elif isinstance(parent, dict):
                parent[draw(keys)] = draw(yamlish)
            else:
                parent.append(draw(yamlish))
    if draw(st.booleans()):
        doc["defenses"] = draw(st.lists(defense_entry, max_size=3) | st.dictionaries(keys, yamlish, max_size=3))
    return doc


documents = st.one_of(mutated(), yamlish, st.dictionaries(keys, yamlish, max_size=6))


def _check(load: Any) -> StudySpec | str:
    """Run a loader; return the spec or the error line; any other exception is a crash."""
    try:
        spec = load()
    except ConfigError as err:
        message = str(err)
        assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
        assert len(message) < 1000, message[:300]
        return message
    assert isinstance(spec, StudySpec)
    return spec


@FAST
@given(documents)
def test_loader_answers_spec_or_one_line(doc: Any) -> None:
    _check(lambda: parse_spec(doc, source="fuzz.yaml"))


@settings(max_examples=80, deadline=None)
@given(st.one_of(documents.map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode("utf-8", "surrogatepass")),
                 st.binary(max_size=60),
                 st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
                 st.sampled_from([b"\xff\xfe\x00", b"name: [", b"- a\n- b", b"a: &x [*x]", b"!!python/object:os.system {}",
                                  b"[" * 5000, b"name: x\ndefenses: [{name: kap, kernel_size: 99}]"])))
def test_yaml_files_load_or_one_line(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_bytes(raw)
        _check(lambda: load_spec(str(path)))


def test_alias_bomb_is_refused_quickly() -> None:
    # Nine levels of nine aliases: 9**9 leaves if anything walked the expanded tree.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    for where in ("description: *a9", "defenses: {kap: {kernel_size: *a9}}", "search_training: *a9"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bomb.yaml"
            path.write_text("\n".join(["name: x", "x_anchors:", *("  " + line for line in lines), where]) + "\n")
            assert isinstance(_check(lambda path=path: load_spec(str(path))), str)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(SPACES)), st.data())
def test_defense_entry_mapping_fixes_or_names_the_range(defense: str, data: st.DataObject) -> None:
    space = SPACES[defense]
    names = data.draw(st.lists(st.sampled_from(space.param_names), unique=True, min_size=1, max_size=3))
    fixed = {n: data.draw(st.one_of(st.integers(-5, 200), st.floats(-1, 100), st.sampled_from(["avg", "max", "x"]),
                                    st.just(space.defaults[n]))) for n in names}
    result = _check(lambda: parse_spec({"name": "x", "defenses": [{"name": defense, **fixed}]}))
    if isinstance(result, StudySpec):
        assert result.defenses == {defense: fixed}
        default = next(c for c in result.conditional_space().paper_default_configs() if c["defense"] == defense)
        for n, value in fixed.items():  # fixed, so the first trial (and every other) uses it
            assert default.get(f"{defense}.{n}", value) == value
        assert all(space.param(n).contains(v) for n, v in fixed.items())
    else:
        assert f"defenses.{defense}" in result, result
        bad = [n for n, v in fixed.items() if not space.param(n).contains(v)]
        if bad:  # an out-of-range value is reported with what is allowed
            assert any(f"{n}=" in result for n in bad) and ("[" in result or "one of" in result), result


def test_the_reported_example() -> None:
    message = _check(lambda: parse_spec({"name": "x", "defenses": [{"name": "kap", "kernel_size": 99}]}))
    assert message == "spec: defenses.kap: kernel_size=99 must be an integer in [1, 4]"
    spec = _check(lambda: parse_spec({"name": "x", "defenses": ["kwta", {"name": "kap", "kernel_size": 2}]}))
    assert isinstance(spec, StudySpec) and spec.defenses == {"kwta": {}, "kap": {"kernel_size": 2}}
    for bad in ([{"kernel_size": 2}], [["kap"]], ["kap", {"name": "kap"}]):
        assert "defenses" in _check(lambda bad=bad: parse_spec({"name": "x", "defenses": bad}))


class _ReachedRay(Exception):
    """The spec passed every check: run_study got as far as starting Ray (stopped here)."""


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _no_downloads(doc: Any) -> Any:
    # A valid spec goes through the real preflight: never let it fetch a dataset.
    if isinstance(doc, dict) and isinstance(doc.get("data"), dict) and doc["data"].get("download"):
        doc["data"]["download"] = False
    return doc


@settings(max_examples=40, deadline=None)
@given(st.one_of(mutated(), yamlish).map(_no_downloads))
def test_cli_run_refuses_in_one_line_without_ray_or_files(doc: Any) -> None:
    old_cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec_file = root / "spec.yaml"
        spec_file.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8", errors="surrogatepass")
        err, out = io.StringIO(), io.StringIO()
        os.chdir(root)  # a relative storage resolves here
        try:
            with mock.patch("study.orchestration.runner.start_ray_and_tracking", side_effect=_ReachedRay), \
                    contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:
                    code: int | str = main(["run", str(spec_file)])
                except _ReachedRay:
                    code = "reached ray"
        finally:
            os.chdir(old_cwd)
        ray = sys.modules.get("ray")
        assert ray is None or not ray.is_initialized()
        assert _tree(root) == {"spec.yaml"}, _tree(root)
        if code == "reached ray":  # accepted: the loader must agree
            assert isinstance(_check(lambda: load_spec(str(spec_file))), StudySpec)
        else:
            lines = err.getvalue().strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("robust-study run: "), (code, err.getvalue())


@pytest.mark.parametrize("name", ["demo", "cifar10_kap", "cifar10_kwta", "cifar10_kaf", "cifar10_topkconv", "cifar10_cas"])
def test_builtin_specs_still_load(name: str) -> None:
    # cifar10 specs need their data directory only at preflight, not to load.
    assert isinstance(load_spec(name), StudySpec)

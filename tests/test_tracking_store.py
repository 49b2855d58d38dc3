"""A new SQLite tracking store copied from the cached empty schema is the store MLflow builds."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from study.tracking import open_store
from study.tracking.sqlite_template import seed_new_store, template_path


def _contents(db: Path) -> tuple[set, dict]:
    with contextlib.closing(sqlite3.connect(db)) as con:
        # Two builds by MLflow itself list a table's constraints in different orders (they follow
        # Python's string hashing, which differs per process): compare each statement's lines as a set.
        schema = {(kind, name, table, frozenset(line.strip().rstrip(",") for line in (sql or "").splitlines()))
                  for kind, name, table, sql in con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")}
        rows = {}
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            cursor = con.execute(f'SELECT * FROM "{table}"')
            columns = [c[0] for c in cursor.description]
            rows[table] = sorted(
                # The Default experiment's times are when each store was opened.
                tuple(v for c, v in zip(columns, row, strict=True) if c not in ("creation_time", "last_update_time"))
                for row in cursor
            )
    return schema, rows


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ROBUST_STUDY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_copied_store_equals_the_store_mlflow_builds(tmp_path: Path, cache: Path) -> None:
    from study.tracking.store import _client

    built = tmp_path / "built" / "mlflow.db"
    built.parent.mkdir()
    _client(f"sqlite:///{built}")  # MLflow's own way: every migration on an empty file
    copied = tmp_path / "copied" / "deeper" / "mlflow.db"
    created = open_store(f"sqlite:///{copied}")

    assert template_path().parent == cache and template_path().is_file()
    assert created == [copied, copied.parent, copied.parent.parent]
    built_schema, built_rows = _contents(built)
    copied_schema, copied_rows = _contents(copied)
    assert len(built_schema) > 100  # the tables, indexes and triggers of MLflow's schema
    assert copied_schema == built_schema
    assert copied_rows == built_rows
    assert [row[:2] for row in copied_rows["experiments"]] == [(0, "Default")]
    # The cached schema holds no experiment: MLflow writes Default (this process's folder, now).
    assert _contents(template_path())[1]["experiments"] == []
    assert [p.name for p in copied.parent.iterdir()] == ["mlflow.db"]  # no temporary file left


def test_a_copied_store_takes_runs(tmp_path: Path, cache: Path) -> None:
    from study.tracking.store import _client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    open_store(uri)
    client = _client(uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "robust_accuracy", 0.25)
    assert client.get_run(run.info.run_id).data.metrics == {"robust_accuracy": 0.25}


def test_an_existing_store_is_never_replaced(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "mlflow.db"
    path.write_bytes(b"not a database")
    assert seed_new_store(path) is False
    assert path.read_bytes() == b"not a database"


def test_an_unwritable_cache_leaves_the_store_to_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ROBUST_STUDY_CACHE", str(blocker / "cache"))  # cannot be made: a file is in the way
    path = tmp_path / "store" / "mlflow.db"
    assert seed_new_store(path) is False
    assert not path.exists()
    open_store(f"sqlite:///{path}")  # MLflow builds it as before
    assert ("Default",) in [row[1:2] for row in _contents(path)[1]["experiments"]]

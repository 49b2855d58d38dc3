"""A new SQLite tracking store copied from a cached empty one.

MLflow builds a new SQLite store's schema by replaying every migration it has ever shipped
(67 Alembic scripts in MLflow 3.17, 2.2 s here), and every study with the default store starts with a
new one. That work sat on the critical path of a study's start (the thread beside Ray's start,
study.orchestration.runner.start_ray_and_tracking, was the longer of the two). The schema is the
same for every store of one MLflow version, so it is built once per version, in the cache folder,
and copied.

The cached file is what MLflow's migrations leave, minus the one row that depends on where and
when a store is created: the ``Default`` experiment (its artifact location is under the working
folder of the process that creates it, and it carries the creation time). MLflow writes that row
itself whenever it opens a store without it, so a copied store ends up as a newly built one
would (``tests/test_tracking_store.py`` compares the two, schema and rows).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["seed_new_store", "template_path"]


def template_path() -> Path:
    import mlflow

    from study.storage import cache_root

    # One per MLflow version: a version's migrations, and so its schema, never change.
    return cache_root() / f"mlflow-{mlflow.__version__}-empty-sqlite.db"


def _build_template(path: Path) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".template-") as tmp:
        db = Path(tmp) / "empty.db"
        store = SqlAlchemyStore(f"sqlite:///{db}", default_artifact_root=tmp)  # runs the migrations
        store.engine.dispose()
        with contextlib.closing(sqlite3.connect(db)) as con:
            con.execute("DELETE FROM experiments")  # only the Default experiment (module docstring)
            con.commit()
        os.replace(db, path)  # whole or not at all, also with another process building it at once


def seed_new_store(path: Path) -> bool:
    """Put an empty, fully migrated MLflow schema at ``path`` if nothing is there yet.

    Returns False (and leaves MLflow to build the store itself, as before) when ``path`` exists,
    or the cache folder cannot be written.
    """
    if path.exists():
        return False
    try:
        template = template_path()
        if not template.is_file():
            _build_template(template)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as out, \
                open(template, "rb") as src:
            out.write(src.read())
        try:
            # A hard link appears whole and refuses to replace a store another process made meanwhile.
            os.link(out.name, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(out.name)
    except OSError as err:  # a read-only home or cache: MLflow's own (slower) way still works
        log.debug("tracking store %s built by MLflow, not copied (%s)", path, err)
        return False
    return True

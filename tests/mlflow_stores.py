"""A migrated MLflow sqlite store, built once per session and copied to where a test needs a
store that already exists.

Opening a new sqlite store runs MLflow's ~60 alembic migrations (2-3 s on the idle 2-core CI
box, 6-13 s under load), and about 30 tests opened one only to record a run or register a model
in it. The template holds the schema and nothing else: its Default experiment (id 0) is
removed, because MLflow writes that row with an absolute artifact location taken from the
working folder of whoever opened the store first. MLflow re-creates a missing Default
experiment on every open (``SqlAlchemyStore._initialize_store_state``), so the copy gets the
row a store built in place would have had. Tests of how a new store is created (the first-open
lock, concurrent first opens, files left in a folder) still open real new ones.
"""

from __future__ import annotations

import shutil
import sqlite3
from contextlib import closing
from pathlib import Path


def build_template(folder: Path) -> Path:
    """Run MLflow's migrations once into ``folder/template.db``, minus the Default experiment."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db = folder / "template.db"
    store = SqlAlchemyStore(f"sqlite:///{db}", str(folder / "unused-artifacts"))
    store.engine.dispose()  # no connection left open on the file this copies
    with closing(sqlite3.connect(db)) as con:
        con.execute("DELETE FROM experiments WHERE experiment_id = 0")
        con.commit()
        con.execute("VACUUM")  # the deleted row's bytes (the template folder's path) go too
    return db


def place_store(template: Path, db: Path) -> str:
    """Copy the template to ``db`` (its folder made) and return its ``sqlite:///`` URI."""
    db.parent.mkdir(parents=True, exist_ok=True)
    if db.exists():
        raise FileExistsError(f"{db} exists: a test store goes where there is none")
    shutil.copyfile(template, db)
    return f"sqlite:///{db}"

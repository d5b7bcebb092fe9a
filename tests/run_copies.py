"""Copies of a finished training run, so that tests which damage, delete or extend a run's
checkpoints share one first run per module (a Ray Train run costs ~25 s of fixed start-up and
teardown on a 2-core CI box) and each pays only for its own re-run.

A copy is what training into the copy's folder would have left: the folder (run folders,
checkpoints, Ray Train's record, the sqlite MLflow store and its artifacts) with every absolute
path to the original rewritten, in the store's tables, folder names and text files; every MLflow
run id replaced by a new one, as a run of its own would have (MLflow caches each run's artifact
store by run id alone, process-wide: a copy with the original's id logged its artifacts into the
original's folder); and every file written now (as freshly as a run that just finished; copies
keep no old modification times, which the stray-checkpoint pruning reads)."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import uuid
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".txt", ""}


def copy_run(src: Path, dst: Path) -> dict[str, str]:
    """Copy the output folder ``src`` into the (existing, empty) folder ``dst`` as if the run
    had been trained there, and return what was replaced by what (paths, run ids); fails where
    a file still names ``src`` or an old run id after the rewrite, so a copy never reads or
    writes the original (which the next test copies again)."""
    for item in src.iterdir():
        if item.is_dir():
            shutil.copytree(item, dst / item.name, copy_function=shutil.copy)
        else:
            shutil.copy(item, dst / item.name)
    changes = {str(src): str(dst)}
    for db in dst.rglob("*.db"):
        con = sqlite3.connect(db)
        runs = [r[0] for r in con.execute("SELECT run_uuid FROM runs")]
        con.close()
        changes |= {run: uuid.uuid4().hex for run in runs}
    for db in dst.rglob("*.db"):
        _rewrite_sqlite(db, changes)
    for path in sorted(dst.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.name in changes:  # an artifact folder named by its run id, deepest first
            path = path.rename(path.with_name(changes[path.name]))
        if not path.is_file() or path.suffix == ".db":
            continue
        data = path.read_bytes()
        if not any(old.encode() in data for old in changes):
            continue
        if path.suffix not in TEXT_SUFFIXES:
            raise AssertionError(f"{path} names {list(changes)} and is not text")
        for old, new in changes.items():
            data = data.replace(old.encode(), new.encode())
        path.write_bytes(data)
    for db in dst.rglob("*.db"):
        _refingerprint_versions(db)
    return changes


def _refingerprint_versions(db: Path) -> None:
    """A registered version's encoder tag as training into the copy would have recorded it:
    the copy's meta.json names the copy's paths, so its fingerprint is not the original's, and
    a re-run found "other weights" for the same checkpoint."""
    from urllib.parse import unquote, urlparse

    from radjepa.eval.heads import ENCODER_TAG, checkpoint_fingerprint

    con = sqlite3.connect(db)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"model_versions", "model_version_tags"} <= tables:
            return
        for name, version, source in con.execute(
            "SELECT name, version, source FROM model_versions"
        ).fetchall():
            folder = Path(unquote(urlparse(source).path)) if source.startswith("file:") else None
            if folder is None or not (folder / "weights.safetensors").is_file():
                continue
            con.execute(
                "UPDATE model_version_tags SET value = ? WHERE name = ? AND version = ? "
                "AND key = ?",
                (checkpoint_fingerprint(folder), name, version, ENCODER_TAG),
            )
        con.commit()
    finally:
        con.close()


def _rewrite_sqlite(db: Path, changes: dict[str, str]) -> None:
    """Replace each key of ``changes`` by its value in every text column of every table (MLflow
    keeps artifact locations, model version sources and the logged config's paths as absolute
    paths, and the run id in every table that belongs to a run)."""
    con = sqlite3.connect(db)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        columns = [
            (table, column)
            for table in tables
            for _, column, *_ in con.execute(f'PRAGMA table_info("{table}")')
        ]
        for (table, column), (old, new) in ((c, o) for c in columns for o in changes.items()):
            con.execute(
                f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?) > 0',
                (old, new, old),
            )
        con.commit()
        left = [
            (table, column, old)
            for table, column in columns
            for old in changes
            if con.execute(
                f'SELECT 1 FROM "{table}" WHERE instr(CAST("{column}" AS TEXT), ?) > 0 LIMIT 1',
                (old,),
            ).fetchone()
        ]
    finally:
        con.close()
    assert not left, f"{db} still holds what the copy replaces: {left}"


def moved(result: T, changes: dict[str, str]) -> T:
    """``result`` (a dataclass such as PretrainResult) with ``changes`` (``copy_run``'s) made in
    its string fields: paths into the copy, the copy's run id."""
    fields = {
        f.name: getattr(result, f.name)
        for f in dataclasses.fields(result)
        if isinstance(getattr(result, f.name), str)
    }
    for old, new in changes.items():
        fields = {name: value.replace(old, new) for name, value in fields.items()}
    return dataclasses.replace(result, **fields)

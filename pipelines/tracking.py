"""MLflow wiring shared by pretrain, sweep and probe.

Default store: sqlite at ``<absolute output dir>/mlflow.db`` with artifacts beside it, so a run
folder is self-contained and a relative path never resolves inside a Ray job's temporary working
directory. MLFLOW_TRACKING_URI (e.g. an HTTP tracking server on a cluster) overrides it.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Any

from pipelines.provenance import code_tags
from radjepa.config import Config, TrackingConfig
from radjepa.error_text import first_line
from radjepa.locations import absolute, join_location, local_path, redact

log = logging.getLogger(__name__)


def client(uri: str, attempts: int = 5) -> Any:
    """An MlflowClient, retried briefly: several Ray processes opening one sqlite store at the
    same moment can collide on its schema check ("duplicate column", "database is locked")."""
    import random
    import time

    import mlflow

    for attempt in range(attempts):
        try:
            with _first_open_lock(uri):
                # the registry is the store's own, as serve and probe look models up in it:
                # MLflow's default follows MLFLOW_REGISTRY_URI, which registered versions in
                # another store than the one they were then looked for in
                c = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
                c.search_experiments(max_results=1)  # touch the store so a collision surfaces
            return c
        except Exception as err:  # sqlalchemy OperationalError, wrapped by MLflow differently
            text = str(err).lower()
            if attempt == attempts - 1 or not ("duplicate column" in text or "locked" in text):
                raise
            time.sleep(0.5 + random.random() * (attempt + 1))
    raise AssertionError("unreachable")


@contextmanager
def _first_open_lock(uri: str) -> Iterator[None]:
    """Serialise the creation of a new sqlite store across processes. MLflow builds the schema
    on first open, and jobs started at the same moment on a fresh output folder each built it
    (6 processes: 6 failed, "table ... already exists", and the store stayed unusable). A store
    half built by another process looks like any other file, so every open takes ``<db>.lock``:
    held for one schema check, a few milliseconds once the store exists."""
    import fcntl

    db = sqlite_file(uri)
    if db is None:  # a server, another database, an in-memory store: nothing to build here
        yield
        return
    path = Path(db)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock = open(lock_path, "a")  # noqa: SIM115 - closed below, on every path
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not path.is_file():
            raise
        # a store built, and read-only to this user (`models list`, `runs reap --dry-run`
        # from a reader's account or a read-only mount): the lock is taken read-only (flock
        # needs no write access); without one there is nothing this user could build anyway
        try:
            lock = open(lock_path)  # noqa: SIM115
        except OSError:
            yield
            return
    # shared when read-only: NFS emulates flock with byte-range locks, and an exclusive one
    # needs a file open for writing (EBADF); a reader builds nothing, and a builder's
    # exclusive lock still keeps it out until the schema is there
    mode = fcntl.LOCK_EX if lock.mode != "r" else fcntl.LOCK_SH
    with lock:
        fcntl.flock(lock, mode)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def sqlite_file(uri: str) -> str | None:
    """The database file a ``sqlite:///`` store URI names, as written (relative or absolute,
    without its ``?query``); None for any other store, an in-memory one or a ``file:`` URI."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix) :].partition("?")[0]
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return path


# what a proxy or ingress answers for a server behind it that is down; MLflow's /health never does
_PROXY_DOWN = frozenset({502, 503, 504})


def check_reachable(uri: str, timeout_s: float = 5.0, *, can_disable: bool = True) -> None:
    """Raise ``ConnectionError`` (one line) when ``uri`` is a tracking server that does not
    answer. MLflow retries each request 7 times with back-off: against a server that was down,
    ``radjepa pretrain`` started Ray, then said so after about 4 minutes. This one GET, without
    retries and with MLflow's own retries left as they are for the run, says it in seconds.
    An HTTP answer (even 401 or 404: auth and paths are for MLflow's own calls to report) or a
    TLS handshake means a server is there. Refused: no answer at all, and 502, 503 or 504 (a
    proxy or ingress in front of a server that is down: MLflow's /health never answers those,
    and its client retries them for about 4 minutes). ``can_disable``: whether the command can
    run without tracking (a registry command cannot)."""
    import requests

    if not uri.lower().startswith(("http://", "https://")):
        return  # a database or a local store: opening it fails fast by itself
    try:
        with requests.get(
            uri.rstrip("/") + "/health", timeout=timeout_s, allow_redirects=False, stream=True
        ) as answer:
            status = answer.status_code
    except requests.exceptions.SSLError:
        return  # something answered the handshake: certificates are MLflow's to check
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as err:
        reason = _reason(err)
    else:
        if status not in _PROXY_DOWN:
            return
        phrase = HTTPStatus(status).phrase
        reason = (
            f"its /health answered {status} {phrase}, a proxy's answer for a server that is down"
        )
    raise ConnectionError(
        f"the MLflow tracking server {redact(uri)} does not answer ({reason}); start it, "
        "or point tracking.uri / MLFLOW_TRACKING_URI at one that runs"
        + (", or --set tracking.enabled=false" if can_disable else "")
    ) from None


def _reason(err: Exception) -> str:
    """The root of a requests/urllib3 failure in a few words, not its nested repr."""
    text = str(err).lower()
    for needle, words in (
        ("refused", "connection refused"),
        ("timed out", "no answer in time"),
        ("name or service not known", "unknown host"),
        ("nodename nor servname", "unknown host"),
        ("temporary failure in name resolution", "unknown host"),
        ("no route to host", "no route to host"),
        ("network is unreachable", "network unreachable"),
    ):
        if needle in text:
            return words
    return type(err).__name__


def relative_sqlite_path(uri: str) -> bool:
    """Whether ``uri`` is a sqlite store given by a relative path (``sqlite:///mlflow.db``,
    MLflow's own default spelling): a path each process reads against its own working folder."""
    path = sqlite_file(uri)
    return path is not None and not os.path.isabs(path)


def absolute_store(uri: str) -> str:
    """``uri`` with a relative sqlite path made absolute against this process's working
    folder, the one the user ran the command from. Ray Train workers and Tune trials run in
    folders of their own (``/tmp/ray/session_*/...``): handed the relative URI, the workers
    logged a run's metrics into a new, empty store there ("Run ... not found", the metrics
    lost) and every sweep trial created its child run in a store of its own, out of its
    parent's reach."""
    if not relative_sqlite_path(uri):
        return uri
    path, sep, query = uri[len("sqlite:///") :].partition("?")
    return f"sqlite:///{os.path.abspath(path)}{sep}{query}"


def tracking_uri(tracking: TrackingConfig, output_dir: str | os.PathLike[str]) -> str:
    """Where runs go: env MLFLOW_TRACKING_URI > config > sqlite in the output folder. A
    relative sqlite path is made absolute here, on the driver (see ``absolute_store``)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return absolute_store(env)
    if tracking.uri:
        return absolute_store(tracking.uri)
    root = Path(output_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def store_uri(cfg: Config, *, create: bool = False) -> str | None:
    """The one tracking store of a config, for every command: MLFLOW_TRACKING_URI, else
    ``tracking.uri``, else the sqlite store under ``train.output_dir`` where ``pretrain`` and
    ``sweep`` record runs and register models (a registry reference resolved anywhere else, e.g.
    a stray ./mlflow.db, finds nothing). None for outputs on object storage with neither set:
    there is no such store then. ``create`` makes the output folder for a store to write."""
    if os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri:
        return tracking_uri(cfg.tracking, ".")
    local = local_path(cfg.train.output_dir)
    if local is None:
        return None
    if create:
        return tracking_uri(cfg.tracking, local)
    return f"sqlite:///{Path(local).resolve() / 'mlflow.db'}"


class StoreMissing(LookupError):
    """A command that reads the tracking store found none where the config points."""


def existing_store(cfg: Config) -> str:
    """:func:`store_uri` for a command that only reads the store (``radjepa models``, ``runs
    reap``), refused when there is none (:func:`store_problem`): MLflow opens a missing sqlite
    store, or a file without its tables, by creating one, so a mistyped ``train.output_dir``
    would answer "nothing there" and leave a new ``mlflow.db`` behind; and its own retries kept
    ``radjepa models list`` and ``runs reap`` printing retry warnings for minutes on a tracking
    server that does not answer."""
    uri = store_uri(cfg)
    if uri is None:
        raise StoreMissing(
            f"no MLflow store: train.output_dir is {cfg.train.output_dir} (object storage) and "
            "neither tracking.uri nor MLFLOW_TRACKING_URI is set"
        )
    problem = store_problem(uri)
    if problem is not None:
        raise StoreMissing(problem)
    return uri


def store_problem(uri: str) -> str | None:
    """Why ``uri`` is no store a reading command can use, or None when it is one: a sqlite file
    that is missing or holds no MLflow tables (MLflow would create the store, and answer
    "nothing there" from it), or a tracking server that does not answer (asked once, 5 s:
    MLflow retries each request for minutes). Shared by the commands that read the store and
    by every ``models:/`` look-up, so all of them say the same."""
    path = sqlite_file(uri)
    if path is not None and not Path(path).is_file():
        return (
            f"there is no MLflow store at {path} (`radjepa pretrain` and `sweep` record runs and "
            "register models in <train.output_dir>/mlflow.db, or in tracking.uri / "
            "MLFLOW_TRACKING_URI: give the config they ran with)"
        )
    empty = None if path is None else without_mlflow_tables(path)
    if empty is not None:
        return (
            f"there is no MLflow store at {path}: the file {empty} (`radjepa pretrain` and "
            "`sweep` create the store; give the config they ran with, or remove the file)"
        )
    try:
        check_reachable(uri, can_disable=False)
    except ConnectionError as err:
        return str(err)
    return None


_MLFLOW_TABLES = frozenset({"alembic_version", "experiments", "runs"})


def without_mlflow_tables(path: str) -> str | None:
    """Why the existing sqlite file ``path`` holds no MLflow store ("is empty (0 bytes)", "holds
    no MLflow tables"), or None when it holds one, or when it is no sqlite database at all
    (MLflow then fails to open it without writing, and says why). Read-only on purpose: MLflow
    opens a file without its tables by creating them, so ``radjepa models list`` on a 0-byte
    ``mlflow.db`` (a copy cut short, a ``touch``) turned it into a new, empty ~1 MB store and
    answered "no registered model" as if the store were real."""
    import sqlite3
    from contextlib import closing

    file = Path(path).resolve()
    try:
        with closing(sqlite3.connect(f"{file.as_uri()}?mode=ro", uri=True)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error:  # not a database, locked by a writer: MLflow's open says it
        return None
    if _MLFLOW_TABLES <= tables:
        return None
    return "is empty (0 bytes)" if file.stat().st_size == 0 else "holds no MLflow tables"


def provenance_tags(data: str, images: int, fingerprint: str) -> dict[str, str]:
    """What a run needs, beyond its params (the resolved config, seed included), to be
    reproduced: which images it read (``data`` made absolute), which code and which libraries.
    A run trained with ``--data`` recorded ``data.shards: None`` and nothing else about its
    data, and no code or library version at all (``MlflowClient.create_run`` sets no source
    tags)."""
    import importlib.metadata
    import platform

    where = absolute(data)
    tags = {
        "radjepa.data": redact(where),
        "radjepa.data_images": str(images),
        "radjepa.data_fingerprint": fingerprint,
        "radjepa.python_version": platform.python_version(),
    }
    for dist in ("radjepa", "torch", "ray", "mlflow"):
        try:
            tags[f"radjepa.{dist}_version"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    tags.update(code_tags())
    return tags


def redacted_yaml(cfg: Config) -> str:
    """The config as YAML for an MLflow artifact, credentials removed (see ``redact``)."""
    from radjepa.config import config_to_yaml

    return redact(config_to_yaml(cfg))


def ui_command(uri: str) -> str:
    """The command a user runs to look at the runs, printed: the store's credentials are
    ``***`` (the user has them; the console, job and CI logs must not). The store is quoted
    for the shell: pasted as printed, a path with a space split into two arguments and one
    with ``#`` lost the rest of the line to a comment."""
    import shlex

    uri = redact(uri)
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def ensure_experiment(uri: str, name: str, artifact_root: str | None = None) -> str:
    """Create (or find) the experiment. A sqlite store keeps artifacts in ``mlartifacts/``
    beside its database file, so the store is one self-contained folder; another database
    store (postgresql://, mysql://) without a server keeps them under ``artifact_root`` (the
    job's output root, local or a bucket), because MLflow's default, ``./mlruns``, would land in
    a Ray job's temporary working folder and vanish with it. A tracking server decides itself."""

    # never mlflow.set_tracking_uri(): it also exports MLFLOW_TRACKING_URI into this process's
    # environment, which would silently redirect every later run in the process to this store
    mc = client(uri)
    exp = mc.get_experiment_by_name(name)
    db = sqlite_file(uri)
    if exp is not None:
        if db is not None:
            _check_not_moved(uri, db, name, exp.artifact_location)
        return exp.experiment_id
    artifact_location = None
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if db is not None:
        # sqlite:////abs/mlflow.db is absolute; sqlite:///mlflow.db is relative to the cwd
        artifact_location = (Path(db).resolve().parent / "mlartifacts").as_uri()
    elif scheme in ("postgresql", "mysql", "mssql", "oracle"):
        if artifact_root is None:
            log.warning("MLflow store %s without an artifact root: MLflow uses ./mlruns", scheme)
        else:
            root = (
                artifact_root if "://" in artifact_root else Path(artifact_root).resolve().as_uri()
            )
            artifact_location = join_location(root, "mlartifacts")
    try:
        return mc.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another process created it first
        exp = mc.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class StoreMoved(ValueError):
    """A sqlite store whose experiment keeps its artifacts in another folder's ``mlartifacts``:
    the store was moved or copied there, and MLflow would write new runs' artifacts and
    registered versions into the old folder (re-created if gone)."""


def check_store_in_place(uri: str, name: str) -> None:
    """:class:`StoreMoved` for an existing sqlite store moved or copied since ``name`` was
    created in it; creates nothing (a command that records only at its end, the probe, asks
    before its work)."""
    db = sqlite_file(uri)
    if db is None or not Path(db).is_file():
        return
    exp = client(uri).get_experiment_by_name(name)
    if exp is not None:
        _check_not_moved(uri, db, name, exp.artifact_location)


def _check_not_moved(uri: str, db: str, name: str, location: str | None) -> None:
    """Refuse a store folder moved or copied whole (``mv runs /data/runs``): its experiment was
    created with the artifacts beside the database, by absolute path. Only our own layout is
    held to it (``<folder>/mlartifacts``); an artifact root another tool chose is left alone."""
    from urllib.parse import unquote, urlsplit

    if not location or not location.startswith("file:"):
        return
    old = Path(unquote(urlsplit(location).path))
    here = Path(db).resolve().parent / "mlartifacts"
    if old.name != "mlartifacts" or old.resolve() == here.resolve():
        return
    raise StoreMoved(
        f"the MLflow store {redact(uri)} was moved or copied from {old.parent}: its experiment "
        f"{name!r} keeps artifacts in {old}, where new runs and registered versions would go "
        f"too. Move the folder back, or use a new experiment here (--set "
        "tracking.experiment=NAME; earlier runs' artifacts stay where they were)"
    )


def log_params(run_id: str, uri: str, cfg: Config) -> None:
    """Log the config as flat dotted params (values truncated to MLflow's 6000-char limit,
    credentials in URIs redacted)."""
    from mlflow.entities import Param

    from radjepa.config import flatten

    params = [Param(k, redact(str(v))[:6000]) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), 100):
        client(uri).log_batch(run_id, params=params[i : i + 100])


def log_metrics(run_id: str, uri: str, metrics: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    client(uri).log_batch(run_id, metrics=batch)


def register_artifact_dir(
    uri: str,
    run_id: str,
    artifact_path: str,
    name: str,
    alias: str | None = None,
    tags: dict[str, Any] | None = None,
) -> str:
    """Register a logged artifact folder (our safetensors checkpoint) as a model version.

    ``mlflow.register_model`` in MLflow 3 insists on a "logged model"; our checkpoint format is
    deliberately not an MLflow flavour (no pickle), so we create the version from its source URI.
    """
    from mlflow.exceptions import MlflowException

    mc = client(uri)
    try:
        mc.create_registered_model(name)
    except MlflowException as err:
        if "already exists" not in str(err).lower() and err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{mc.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    mv = mc.create_model_version(
        name, source=source, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()}
    )
    if alias:
        mc.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)


def mark_run(uri: str, run_id: str, status: str) -> None:
    """End a run that stopped on an error (or was interrupted) so it does not stay RUNNING in
    the UI (``tracking_runs.end_run``: a ``radjepa.reaped`` tag goes too); never raises,
    because the store itself may be what failed and the original error is the one to report."""
    from pipelines.tracking_runs import end_run

    try:
        end_run(client(uri), run_id, status)
    except Exception as err:  # noqa: BLE001
        # one line: this is said beside the error that ended the command, not instead of it
        first = first_line(str(err))[:300]
        log.warning(
            "could not mark MLflow run %s as %s (%s: %s)",
            run_id,
            status,
            type(err).__name__,
            redact(first),
        )
        log.debug("marking MLflow run %s failed", run_id, exc_info=True)

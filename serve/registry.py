"""Where served weights come from: a checkpoint folder (local or any pyarrow URI, as
``radjepa pretrain`` prints for object-storage outputs), or ``models:/<name>@<alias>``.

Registry look-ups live here (not in ``radjepa/``, which never imports MLflow). Registered
versions point at our safetensors checkpoint folder (see ``pipelines.tracking``), so resolving
an alias is a download of that folder, after which loading is the same strict path.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ResolvedModel",
    "ServedHead",
    "ModelNotFound",
    "latest_checkpoint",
    "pinned_reference",
    "refuse_run_artifact",
    "registered_version",
    "resolve_head",
    "resolve_model",
]

log = logging.getLogger(__name__)

_REGISTRY = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+|latest))?$")


class ModelNotFound(FileNotFoundError):
    """The model reference points nowhere: names the reference and what was tried."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    name: str | None  # registry name, None for a plain folder
    version: str | None  # registry version, None for a plain folder
    source: str  # what the user asked for
    # names exactly these weights for another process, say a worker on another node, which
    # resolves it into its own cache: a version number, not an alias or "latest" that may move
    # meanwhile; a run folder's chosen checkpoint; an absolute folder
    pinned: str


def resolve_model(ref: str, *, tracking_uri: str | None = None) -> ResolvedModel:
    """A local checkpoint folder for ``ref`` (downloads registry artifacts when needed)."""
    refuse_run_artifact(ref)
    m = _REGISTRY.match(ref)
    if m is None and ref.startswith("models:/"):
        raise ModelNotFound(
            f"not a registry reference: {ref} (models:/<name>, models:/<name>/<version>, "
            "models:/<name>/latest or models:/<name>@<alias>)"
        )
    if m is None and "://" in ref:
        checkpoint = latest_checkpoint(ref)
        return ResolvedModel(
            path=_fetch(checkpoint), name=None, version=None, source=ref, pinned=checkpoint
        )
    if m is None:
        path = Path(ref).expanduser()
        if not path.exists():
            raise ModelNotFound(f"model checkpoint not found: {path}")
        path = Path(latest_checkpoint(str(path.resolve())))
        return ResolvedModel(path=path, name=None, version=None, source=ref, pinned=str(path))

    mv = registered_version(ref, tracking_uri=tracking_uri)
    local = _download_version(ref, mv.source, tracking_uri, _encoder_tag(mv))
    log.info("resolved %s -> version %s at %s", ref, mv.version, local)
    return ResolvedModel(
        path=local,
        name=mv.name,
        version=str(mv.version),
        source=ref,
        pinned=f"models:/{mv.name}/{mv.version}",
    )


@dataclass(frozen=True)
class ServedHead:
    head: Any  # radjepa.eval.heads.ProbeHead
    # what callers are told of it: the pinned models:/<name>/<version> of a registered head
    # (not an alias that moves), else the reference as given (never shown: see serve.app)
    source: str


def resolve_head(ref: str, *, tracking_uri: str | None = None) -> ServedHead:
    """The probe head ``ref`` names (a head folder, a URI of one such as ``s3://...``, or a
    ``models:/`` version or alias that ``radjepa probe --register-head`` registered), read and
    checked as the API serves it.

    One resolver for ``radjepa serve``'s check before Ray starts and for each API replica's
    start-up: the CLI used to look a registered head up by its metadata only, so a version
    that exists but is not a head (an encoder given as ``--head``) or whose files are gone was
    found by every replica, as Ray's retried deployment failure (~220 lines, exit 1, ~2 min).
    A head is a few kilobytes, so it is read in full here. Raises ModelNotFound or HeadError
    (a ValueError) in one line naming ``ref``; the replicas raise the same."""
    from radjepa.checkpoint import META
    from radjepa.eval.heads import HeadError, load_head

    refuse_run_artifact(ref)
    if "://" in ref and not ref.startswith("models:/"):
        return ServedHead(_remote_head(ref), ref)
    resolved = resolve_model(ref, tracking_uri=tracking_uri)
    try:
        head = load_head(resolved.path)
    except HeadError as err:
        if (resolved.path / META).is_file():
            raise HeadError(
                f"serve.head {ref} is an encoder checkpoint, not a probe head: give it as "
                "--model, and as --head a head `radjepa probe` wrote (DIR/head) or registered "
                "(--register-head)"
            ) from None
        raise HeadError(f"serve.head {ref} is not a readable probe head: {err}") from None
    return ServedHead(head, resolved.pinned if resolved.name is not None else ref)


def _remote_head(uri: str) -> Any:
    """The probe head at ``uri`` (``s3://``, ``gs://``, ``file://``, ...), read afresh at each
    start. A head URI went through the checkpoint path, which looks for an encoder's files:
    ``s3://bucket/probe/head`` was refused as "model checkpoint not found: ... has no
    meta.json", as if the head were a missing model.

    Not cached as checkpoints are: a refitted head is uploaded over the old one at the same
    URI (a checkpoint's URI names a run's own ``checkpoint_*`` folder), and a cached copy kept
    serving the old head, or refused the new encoder's. A head is a few kilobytes."""
    import tempfile

    from radjepa.checkpoint import META
    from radjepa.eval.heads import HEAD_FILES, HeadError, load_head

    with tempfile.TemporaryDirectory(prefix="radjepa-head-") as folder:
        try:
            _download(uri, HEAD_FILES, Path(folder), what="probe head", where="a temporary folder")
        except ModelNotFound:
            if _remote_file(uri, META):
                raise HeadError(
                    f"serve.head {uri} is an encoder checkpoint, not a probe head: give it as "
                    "--model, and as --head a head `radjepa probe` wrote (DIR/head) or "
                    "registered (--register-head)"
                ) from None
            raise
        try:
            return load_head(folder)  # read whole into memory
        except HeadError as err:
            raise HeadError(f"serve.head {uri} is not a readable probe head: {err}") from None


def _remote_file(uri: str, name: str) -> bool:
    """Whether the folder at ``uri`` holds a file ``name`` (False when it cannot be read)."""
    import pyarrow.fs as pafs

    from radjepa.locations import filesystem

    try:
        fs, root = filesystem(uri)
        return fs.get_file_info(f"{root.rstrip('/')}/{name}").type == pafs.FileType.File
    except (OSError, ValueError):
        return False


def refuse_run_artifact(ref: str) -> None:
    """A ``runs:/<id>/<path>`` reference read as a local path said "model checkpoint not
    found: runs:/...", as if a folder were missing. Run artifacts are not served directly:
    the registered version of a run's checkpoint is (``radjepa pretrain`` registers it)."""
    if ref.startswith("runs:/"):
        raise ModelNotFound(
            f"{ref}: runs:/ references are not supported; give the registered version "
            "(models:/<name>/<version>, which `radjepa pretrain` registers for each run) or "
            "the checkpoint folder or its URI"
        )


def local_source(source: str) -> bool:
    """Whether a model version's files are on this disk (read in place, never copied)."""
    from urllib.parse import urlparse

    return urlparse(source).scheme in ("", "file")


def _encoder_tag(mv: Any) -> str:
    """The encoder fingerprint a version records (``radjepa pretrain`` tags it), or ""."""
    from radjepa.eval.heads import ENCODER_TAG

    return str((mv.tags or {}).get(ENCODER_TAG) or "")


def _download_version(
    ref: str, source: str, tracking_uri: str | None, fingerprint: str = ""
) -> Path:
    """A local folder holding the artifacts of a model version's ``source``.

    A source on local disk (the default sqlite store keeps artifacts beside its database) is
    used in place. Any other (a tracking server's ``mlflow-artifacts:``, a bucket) is
    downloaded once into ``RADJEPA_CACHE`` keyed by store, source and the version's recorded
    encoder ``fingerprint``: MLflow's own default is a fresh temporary folder per call, never
    removed, so every serve replica start, probe and embed copied the whole weights again and
    left them. The fingerprint is in the key because a source is reused: a version deleted
    and its run retrained to the same step registers other weights at the same folder, and a
    cache keyed by source alone served the deleted version's weights as the new one.
    """
    import hashlib
    import os
    import shutil
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    def download(dst: str | None) -> Path:
        try:
            return Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=source, tracking_uri=tracking_uri, dst_path=dst
                )
            )
        except (MlflowException, OSError) as err:
            raise ModelNotFound(f"cannot fetch {ref} from the MLflow registry: {err}") from None

    if local_source(source):
        return download(None)  # MLflow returns the local folder itself, no copy
    cache = Path(os.environ.get("RADJEPA_CACHE", "~/.cache/radjepa")).expanduser()
    identity = f"{tracking_uri}\n{source}" + (f"\n{fingerprint}" if fingerprint else "")
    key = hashlib.sha256(identity.encode()).hexdigest()[:24]
    local = cache / "registry" / key
    if _complete(local):
        return local  # complete: copies are only ever renamed into place whole
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=local.parent))
    try:
        fetched = download(str(tmp))
        try:
            fetched.rename(local)
        except OSError:  # another process put its complete copy there first, or debris
            if not _complete(local):
                shutil.rmtree(local, ignore_errors=True)
                fetched.rename(local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def _complete(folder: Path) -> bool:
    """Whether a cached copy of a version holds all of what the registry keeps: an encoder
    checkpoint or a probe head. Only an encoder's files counted, so a registered head on a
    tracking server was downloaded again by every resolve, and each replica's rename found the
    folder there and deleted it, under another replica reading it ("head.json is missing")."""
    from radjepa.checkpoint import META, WEIGHTS
    from radjepa.eval.heads import HEAD_FILES

    return any(
        all((folder / n).is_file() for n in names) for names in ((META, WEIGHTS), HEAD_FILES)
    )


def registered_version(ref: str, *, tracking_uri: str | None = None) -> Any:
    """The MLflow model version a ``models:/`` reference names, without downloading it.

    ``radjepa serve`` checks its references with this before binding deployments: a missing
    alias found inside a replica would surface as Ray's retried deployment failure instead of
    one line naming the reference.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipelines.model_registry import _name_filter

    m = _REGISTRY.match(ref)
    if m is None:
        raise ValueError(f"not a registry reference (models:/<name>@<alias>): {ref}")
    tracking_uri = _existing_store(ref, tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, alias, version = m["name"], m["alias"], m["version"]
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if version and version != "latest":
            return client.get_model_version(name, version)
        # quoted as the registry commands quote it: a name holding a ' broke name='{name}'
        versions = client.search_model_versions(_name_filter(name))
    except MlflowException as err:
        # MLflow says "alias nope not found" with INVALID_PARAMETER_VALUE
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ModelNotFound(f"cannot resolve {ref} in the MLflow registry: {err}") from None
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise _missing(ref, name, what, tracking_uri, err) from None
    if not versions:
        raise _missing(ref, name, "versions", tracking_uri, None)
    return max(versions, key=lambda v: int(v.version))


def _missing(ref: str, name: str, what: str, uri: str, err: Exception | None) -> ModelNotFound:
    """One line naming what ``ref`` asks for that the store lacks, and what it has instead (the
    versions and aliases of ``name``, or the registered models when ``name`` is not one)."""
    from pipelines.model_registry import RegistryError, describe
    from pipelines.tracking import redact

    store = f"the MLflow store {redact(uri)}"
    try:
        held = describe(uri, name)
    except RegistryError as no_model:
        return ModelNotFound(f"cannot resolve {ref} in {store}: {no_model}")
    except Exception:  # noqa: BLE001 - the store failed the second look: its first answer stands
        return ModelNotFound(f"cannot resolve {ref} in the MLflow registry: {err or 'no versions'}")
    if what == "versions":
        return ModelNotFound(f"cannot resolve {ref}: {name} has no versions in {store}")
    return ModelNotFound(
        f"cannot resolve {ref}: {name} has no {what} in {store}; it has {held} "
        f"(`radjepa models list --name {name}`)"
    )


def _existing_store(ref: str, tracking_uri: str | None) -> str:
    """The store to look ``ref`` up in, refused when there is none. MLflow opens a sqlite store
    that does not exist by creating an empty one: a mistyped ``train.output_dir`` answered
    "Model Version ... not found" and left a new ``mlflow.db`` (and its folders) behind, and no
    store at all (outputs on object storage, no ``tracking.uri``) meant a new ``./mlflow.db``
    in whatever folder the command ran from. An existing file without MLflow's tables (a 0-byte
    ``mlflow.db``) is refused the same way: MLflow would create its tables in it. A tracking
    server that does not answer is refused in seconds (:func:`check_reachable`): MLflow retries
    each request for minutes, and every command resolving a reference waited that long first
    (``radjepa probe models:/...``, ``radjepa embed --model models:/...`` before Ray starts)."""
    import os

    from pipelines.tracking import store_problem

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ModelNotFound(
            f"cannot resolve {ref}: no MLflow store is configured (set tracking.uri or "
            "MLFLOW_TRACKING_URI to the store `radjepa pretrain` registered it in)"
        )
    problem = store_problem(uri)
    if problem is not None:
        raise ModelNotFound(f"cannot resolve {ref}: {problem}")
    return uri


def pinned_reference(ref: str, *, tracking_uri: str | None = None) -> str:
    """``ref`` with what may move fixed: a registry alias or ``latest`` as the version it names
    now, a run folder as its newest checkpoint.

    Every replica resolves the reference it is bound to when it starts, those Serve adds (an
    autoscaled encoder) or restarts later too. Bound to ``@champion``, or to a run folder a
    training job still writes into, a replica started after ``radjepa models promote`` or a new
    checkpoint loaded other weights than the index and head were checked against, and
    ``/v1/similar`` compared new embeddings with old ones in silence. A local path keeps its
    spelling (relative stays relative: a Ray Job's replicas read it in their own copy of the
    working folder)."""
    if ref.startswith("models:/"):
        if _REGISTRY.match(ref) is None:
            return ref  # resolve_model says what is wrong with it
        mv = registered_version(ref, tracking_uri=tracking_uri)
        return f"models:/{mv.name}/{mv.version}"
    if "://" in ref:
        try:
            return latest_checkpoint(ref)
        except ModelNotFound as err:
            # a cluster's nodes may hold the bucket's credentials where this process does not:
            # not read here before, and not refused now
            log.warning(
                "%s; the replicas resolve %s themselves when they start (a run folder still "
                "written to may give later replicas a newer checkpoint: name a checkpoint "
                "folder to serve one)",
                err,
                ref,
            )
            return ref
    given = os.path.expanduser(ref)
    folder = os.path.abspath(given)
    chosen = latest_checkpoint(folder)
    return given if chosen == folder else os.path.join(given, os.path.relpath(chosen, folder))


def latest_checkpoint(location: str) -> str:
    """``location`` itself when it is a checkpoint folder; for a run folder (what
    ``radjepa pretrain`` prints as "run folder"), its checkpoint with the highest step."""
    import json

    import pyarrow.fs as pafs

    from radjepa.checkpoint import META
    from radjepa.locations import filesystem, spell_like

    try:
        fs, root = filesystem(location)
        root = root.rstrip("/")
        if fs.get_file_info(f"{root}/{META}").type == pafs.FileType.File:
            return location
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            return location  # _fetch / the loader say what is wrong with it
        found = []
        for entry in fs.get_file_info(pafs.FileSelector(root)):
            name = entry.path.rstrip("/").rsplit("/", 1)[-1]
            meta = f"{entry.path}/{META}"
            if entry.type != pafs.FileType.Directory or not name.startswith("checkpoint_"):
                continue
            if fs.get_file_info(meta).type == pafs.FileType.File:
                with fs.open_input_stream(meta) as f:
                    found.append((int(json.loads(f.read()).get("step", 0)), name, entry.path))
    except (OSError, ValueError) as err:
        raise ModelNotFound(f"cannot read checkpoint {location}: {err}") from None
    if not found:
        return location
    step, _, path = max(found)
    log.info("%s is a run folder: using its step-%d checkpoint %s", location, step, path)
    return spell_like(location, path)


def _fetch(uri: str) -> Path:
    """A local copy of the checkpoint folder at ``uri`` (weights and metadata only: the
    optimizer state is for resuming training), cached by URI under ``RADJEPA_CACHE``
    (default ``~/.cache/radjepa``) so replicas and repeated probes download it once.

    A copy is downloaded beside its place and renamed into it whole, so a folder in place is
    complete unless someone deleted files from it; only such a folder is replaced. (Removing an
    incomplete folder before downloading also removed the complete copy another replica renamed
    into place in between, as that replica was about to read it.)"""
    import hashlib
    import os
    import shutil
    import tempfile

    from radjepa.checkpoint import META, WEIGHTS

    files = (META, WEIGHTS)
    cache = Path(os.environ.get("RADJEPA_CACHE", "~/.cache/radjepa")).expanduser()
    local = cache / "checkpoints" / hashlib.sha256(uri.encode()).hexdigest()[:24]
    if _complete_copy(local, files):
        return local
    tmp = None
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=local.parent))
    except OSError as err:
        raise ModelNotFound(
            f"cannot copy checkpoint {uri} into {_cache_place(local.parent)}: {err}"
        ) from None
    try:
        _download(uri, files, tmp, what="model checkpoint", where=_cache_place(local.parent))
        try:
            tmp.rename(local)
        except OSError:  # a folder is there: another process's complete copy, or a damaged one
            if not _complete_copy(local, files):
                shutil.rmtree(local, ignore_errors=True)
                tmp.rename(local)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("fetched %s -> %s", uri, local)
    return local


def _complete_copy(folder: Path, files: tuple[str, ...]) -> bool:
    return all((folder / name).is_file() for name in files)


def _cache_place(folder: Path) -> str:
    return f"the cache {folder} (RADJEPA_CACHE)"


def _download(uri: str, files: tuple[str, ...], into: Path, *, what: str, where: str) -> None:
    """Copy ``files`` of the folder at ``uri`` into the local folder ``into``; ModelNotFound,
    in one line, for a missing file, an unreadable location or a copy that fails (a full or
    read-only disk, a transfer cut short). ``what`` names the folder and ``where`` the place
    copied into, in those lines."""
    import shutil

    import pyarrow.fs as pafs

    from radjepa.locations import filesystem

    noun = "checkpoint" if what == "model checkpoint" else what
    try:
        fs, root = filesystem(uri)
        for name in files:
            if fs.get_file_info(f"{root.rstrip('/')}/{name}").type != pafs.FileType.File:
                raise ModelNotFound(f"{what} not found: {uri} has no {name}")
    except ModelNotFound:
        raise
    except (OSError, ValueError) as err:  # unknown scheme, no permission, no bucket
        raise ModelNotFound(f"cannot read {noun} {uri}: {err}") from None
    try:
        for name in files:
            with (
                fs.open_input_stream(f"{root.rstrip('/')}/{name}") as src,
                open(into / name, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst, length=8 << 20)
    except (OSError, ValueError) as err:
        raise ModelNotFound(f"cannot copy {noun} {uri} into {where}: {err}") from None

"""Where served weights come from: a checkpoint folder (local or any pyarrow URI, as
``radjepa pretrain`` prints for object-storage outputs), or ``models:/<name>@<alias>``.

Registry look-ups live here (not in ``radjepa/``, which never imports MLflow). Registered
versions point at our safetensors checkpoint folder (see ``pipelines.tracking``), so resolving
an alias is a download of that folder, after which loading is the same strict path.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ResolvedModel", "ModelNotFound", "resolve_model"]

log = logging.getLogger(__name__)

_REGISTRY = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))?$")


class ModelNotFound(FileNotFoundError):
    """The model reference points nowhere: names the reference and what was tried."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    name: str | None  # registry name, None for a plain folder
    version: str | None  # registry version, None for a plain folder
    source: str  # what the user asked for


def resolve_model(ref: str, *, tracking_uri: str | None = None) -> ResolvedModel:
    """A local checkpoint folder for ``ref`` (downloads registry artifacts when needed)."""
    m = _REGISTRY.match(ref)
    if m is None and "://" in ref:
        return ResolvedModel(path=_fetch(ref), name=None, version=None, source=ref)
    if m is None:
        path = Path(ref).expanduser()
        if not path.exists():
            raise ModelNotFound(f"model checkpoint not found: {path}")
        return ResolvedModel(path=path.resolve(), name=None, version=None, source=ref)

    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, alias, version = m["name"], m["alias"], m["version"]
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version:
            mv = client.get_model_version(name, version)
        else:
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise ModelNotFound(f"registered model {name!r} has no versions")
            mv = max(versions, key=lambda v: int(v.version))
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=mv.source, tracking_uri=tracking_uri
        )
    except MlflowException as err:
        raise ModelNotFound(f"cannot resolve {ref} in the MLflow registry: {err}") from None
    log.info("resolved %s -> version %s at %s", ref, mv.version, local)
    return ResolvedModel(path=Path(local), name=name, version=str(mv.version), source=ref)


def _fetch(uri: str) -> Path:
    """A local copy of the checkpoint folder at ``uri`` (weights and metadata only: the
    optimizer state is for resuming training), cached by URI under ``RADJEPA_CACHE``
    (default ``~/.cache/radjepa``) so replicas and repeated probes download it once."""
    import hashlib
    import os
    import shutil
    import tempfile

    import pyarrow.fs as pafs

    from radjepa.checkpoint import META, WEIGHTS
    from radjepa.shards import filesystem

    cache = Path(os.environ.get("RADJEPA_CACHE", "~/.cache/radjepa")).expanduser()
    local = cache / "checkpoints" / hashlib.sha256(uri.encode()).hexdigest()[:24]
    if (local / META).is_file() and (local / WEIGHTS).is_file():
        return local  # complete: copies are only ever renamed into place whole
    shutil.rmtree(local, ignore_errors=True)
    try:
        fs, root = filesystem(uri)
        for name in (META, WEIGHTS):
            if fs.get_file_info(f"{root.rstrip('/')}/{name}").type != pafs.FileType.File:
                raise ModelNotFound(f"model checkpoint not found: {uri} has no {name}")
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=local.parent))
        for name in (META, WEIGHTS):
            with (
                fs.open_input_stream(f"{root.rstrip('/')}/{name}") as src,
                open(tmp / name, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst, length=8 << 20)
    except ModelNotFound:
        raise
    except (OSError, ValueError) as err:  # unknown scheme, no permission, no bucket
        raise ModelNotFound(f"cannot read checkpoint {uri}: {err}") from None
    try:
        tmp.rename(local)
    except OSError:  # another process put its complete copy there first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("fetched %s -> %s", uri, local)
    return local

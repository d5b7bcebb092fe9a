"""Where served weights come from: a checkpoint folder, or ``models:/<name>@<alias>``.

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

"""MLflow wiring shared by pretrain, sweep and probe.

Default store: sqlite at ``<absolute output dir>/mlflow.db`` with artifacts beside it, so a run
folder is self-contained and a relative path never resolves inside a Ray job's temporary working
directory. MLFLOW_TRACKING_URI (e.g. an HTTP tracking server on a cluster) overrides it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from radjepa.config import Config, TrackingConfig

log = logging.getLogger(__name__)


def tracking_uri(tracking: TrackingConfig, output_dir: str | os.PathLike[str]) -> str:
    """Where runs go: env MLFLOW_TRACKING_URI > config > sqlite in the output folder."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if tracking.uri:
        return tracking.uri
    root = Path(output_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    """The command a user runs to look at the runs."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def ensure_experiment(uri: str, name: str, output_dir: str | os.PathLike[str]) -> str:
    """Create (or find) the experiment; local stores keep artifacts under the output folder."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:"):
        artifact_location = (Path(output_dir).expanduser().resolve() / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def log_params(run_id: str, uri: str, cfg: Config) -> None:
    """Log the config as flat dotted params (values truncated to MLflow's 6000-char limit)."""
    import mlflow
    from mlflow.entities import Param

    from radjepa.config import flatten

    client = mlflow.MlflowClient(uri)
    params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])


def log_metrics(run_id: str, uri: str, metrics: dict[str, float], step: int) -> None:
    import time

    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    mlflow.MlflowClient(uri).log_batch(run_id, metrics=batch)


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
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(uri)
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if "already exists" not in str(err).lower() and err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    mv = client.create_model_version(
        name, source=source, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()}
    )
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)

"""MLflow for ``radjepa probe``: one run per probe with its metrics, report, plots and head.

The library (``radjepa.eval``) writes plain files; this layer ships them to MLflow and, on
request, registers the head folder as a model version the classification endpoint can name.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.tracking import client as tracking_client
from pipelines.tracking import (
    ensure_experiment,
    log_metrics,
    mark_run,
    redact,
    register_artifact_dir,
    store_uri,
)
from pipelines.tracking_runs import end_run
from radjepa.config import Config, check_registry_name, flatten

log = logging.getLogger(__name__)

__all__ = ["ProbeTracking", "log_probe_run", "probe_params", "probe_store"]


@dataclass(frozen=True)
class ProbeTracking:
    run_id: str
    uri: str
    head_model: str | None = None
    head_version: str | None = None


def probe_store(cfg: Config, *, create: bool = False) -> str:
    """The store a probe records in, the one pretrain registers encoders in (serve finds a
    registered head there too); ValueError when there is none: outputs on object storage and
    no store configured. The CLI asks before the probe's work, :func:`log_probe_run` again."""
    uri = store_uri(cfg, create=create)
    if uri is None:
        raise ValueError(
            f"train.output_dir is {cfg.train.output_dir}, so there is no local MLflow store: "
            "set tracking.uri or MLFLOW_TRACKING_URI, or pass --no-mlflow"
        )
    return uri


def probe_params(report: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """The run's params: the ``probe.*`` config, ``ingest.*`` as the settings that made the
    pixels scored, and what was probed.

    ``ingest.*`` is not the probe command's own config: CSV images are decoded with the
    checkpoint's settings, and shards were decoded at ingest with theirs (``unknown`` where the
    shards do not record one). Logged as the checkpoint's, a probe over shards made otherwise
    named pixels it never scored; ``decode_mismatch`` then says in words how the shards differ
    from what the served head decodes uploads with.
    """
    enc = report.get("encoder", {})
    data = report["data"]
    params: dict[str, Any] = {
        k: v for k, v in flatten(cfg).items() if k.startswith(("probe.", "ingest."))
    }
    decode = data.get("shards_decode") or data.get("decode")
    if decode:
        window = decode["window_percentiles"]
        params.update(
            {
                "ingest.image_size": decode["size"] or "unknown",
                "ingest.dtype": decode["dtype"] or "unknown",
                "ingest.window_percentiles": "unknown" if window is None else tuple(window),
            }
        )
    if data.get("decode_mismatch"):
        params["decode_mismatch"] = data["decode_mismatch"]
    params.update(
        {
            "checkpoint": report["checkpoint"],
            "checkpoint_step": enc.get("step"),
            "labels_csv": data["csv"],
            "labels": ",".join(lab["name"] for lab in data["labels"]),
            "n_images": data["n_images"],
            "n_patients": data["n_patients"],
        }
    )
    return params


def log_probe_run(
    report: dict[str, Any],
    out_dir: str | os.PathLike[str],
    cfg: Config,
    *,
    register_head: bool = False,
    head_model_name: str = "radjepa-probe-head",
    model: tuple[str, str, str] | None = None,
) -> ProbeTracking:
    """Log a finished probe (the dict ``run_probe`` returned) as one MLflow run.

    Artifacts: ``report.json``, ``report.md``, ``plots/`` and ``head/``. Metrics: every AUROC,
    AUPRC (+ CI bounds), precision@k and kNN AUROC, named ``<method>/<label>/<metric>``.
    ``model``: the registered encoder probed, as (name, version, what the user asked for, say
    ``models:/enc@champion``), tagged and in the run's name; the checkpoint path alone was the
    registry cache's, and which version an alias pointed at then was recorded nowhere.
    """
    from mlflow.entities import Param

    from pipelines.pretrain import storage_root
    from radjepa.eval.report import flat_metrics

    out = Path(out_dir).resolve()
    if register_head:  # before a run is made: MLflow would refuse it only at the end
        check_registry_name(head_model_name)
    uri = probe_store(cfg, create=True)
    enc = report.get("encoder", {})
    try:
        # the output root as pretrain and sweep give it: the first command to create the
        # experiment fixes its artifact root (a database store without a server), and the
        # probe's --out made every later checkpoint and registered encoder land in that folder
        exp_id = ensure_experiment(uri, cfg.tracking.experiment, storage_root(cfg))
        client = tracking_client(uri)  # the store's registry, whatever MLFLOW_REGISTRY_URI says
        tags = {
            "radjepa.job": "probe",
            "radjepa.checkpoint": redact(str(enc.get("checkpoint", report["checkpoint"]))),
            "radjepa.checkpoint_sha256": str(enc.get("sha256", "")),
            "radjepa.encoder": str(enc.get("which", "")),
        }
        name = f"probe-{Path(str(report['checkpoint'])).name}"
        if model is not None:
            registered, version, asked = model
            tags["radjepa.model_ref"] = f"models:/{registered}/{version}"
            tags["radjepa.model_asked"] = asked
            name = f"probe-{registered}-v{version}"
        run = client.create_run(exp_id, run_name=name, tags=tags)
    except Exception as err:  # a store MLflow refuses (file:), an unreachable server, ...
        # one line, as pretrain and sweep say it (the CLI turns ValueError into a message);
        # the report and head are already written, so say where they are
        raise ValueError(
            f"cannot record the probe in MLflow: {type(err).__name__}: {err}; the report and "
            f"head are in {out} (--no-mlflow skips MLflow)"
        ) from None
    run_id = run.info.run_id
    try:
        params = probe_params(report, cfg)
        client.log_batch(
            run_id, params=[Param(k, redact(str(v))[:6000]) for k, v in params.items()]
        )
        metrics = flat_metrics(report)
        if metrics:
            log_metrics(run_id, uri, metrics, step=int(enc.get("step") or 0))
        for name in ("report.json", "report.md"):
            if (out / name).is_file():
                client.log_artifact(run_id, str(out / name))
        if (out / "plots").is_dir():
            client.log_artifacts(run_id, str(out / "plots"), "plots")
        version = None
        if report.get("head"):
            client.log_artifacts(run_id, str(report["head"]), "head")
            if register_head:
                from radjepa.eval.heads import load_head

                # the head's own outputs: a label the probe skipped is in the request but
                # not in the head, and a client reading this tag would ask for it in vain
                head_labels = load_head(report["head"]).label_names
                version = register_artifact_dir(
                    uri,
                    run_id,
                    "head",
                    head_model_name,
                    tags={
                        "radjepa.kind": "probe-head",
                        "radjepa.checkpoint_sha256": enc.get("sha256", ""),
                        "radjepa.labels": ",".join(head_labels),
                    },
                )
                log.info("registered probe head as %s version %s", head_model_name, version)
        elif register_head:
            raise ValueError(
                "no probe head was fitted (every label was skipped); nothing to register"
            )
        end_run(client, run_id, "FINISHED")  # as every driver ends its run (reap's tag)
    except BaseException as err:
        # never raises: the error to report is the first one. Ctrl-C or SIGTERM while the
        # report uploads is an interruption, as pretrain and sweep mark theirs, not a failure
        interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))
        mark_run(uri, run_id, "KILLED" if interrupted else "FAILED")
        raise
    return ProbeTracking(run_id, uri, head_model_name if version else None, version)

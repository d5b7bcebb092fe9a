"""The MLflow side of a pretraining run: its MLflow run, from creation to registered model.

One MLflow run per run name: created on the first attempt, reopened by every resume (pretrain
and each sweep trial open theirs here), a config change allowed on resume left on it as a
trace, and, once pretraining ends, the config, the checkpoint's weights and a registered model
version recorded, or the run ended KILLED or FAILED when it could not be handed on. The
training itself never waits on the store: rank 0 writes metrics through
``pipelines.tracking_metrics``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from pipelines.pretrain import PretrainError
from radjepa import locations
from radjepa.config import Config
from radjepa.resume import ResumePoint

log = logging.getLogger(__name__)


def start_tracking(
    cfg: Config,
    storage: str,
    run_dir: str,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    uri: str | None = None,
    provenance: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Create the MLflow run once per run name; a resumed run continues the same MLflow run
    (its id is kept in ``run_dir``, a local folder or a URI). ``provenance``
    (``tracking.provenance_tags``) is set when the run is created; a resume, which may run
    other code or read other shards, records its own as ``radjepa.resumed_with.*`` and leaves
    the originals."""
    from pipelines.tracking import client as tracking_client
    from pipelines.tracking import ensure_experiment, log_params, store_uri
    from pipelines.tracking_runs import RunGone, reopen

    # with remote outputs check_tracking_store made sure a store URI is configured
    uri = uri or store_uri(cfg, create=True)
    if uri is None:
        raise PretrainError(f"no MLflow store for outputs at {storage}: set tracking.uri")
    exp_id = ensure_experiment(uri, cfg.tracking.experiment, storage)
    client = tracking_client(uri)
    id_file = locations.join_location(run_dir, "mlflow_run_id")
    previous = locations.read_text(id_file)
    if previous:
        run_id = previous.strip()
        try:
            reopen(client, run_id)  # RUNNING again, and no longer tagged as reaped
            log.info("resuming MLflow run %s", run_id)
            if provenance:
                from mlflow.entities import RunTag

                resumed = [
                    RunTag(f"radjepa.resumed_with.{k.removeprefix('radjepa.')}", v)
                    for k, v in provenance.items()
                ]
                client.log_batch(run_id, tags=resumed)
        except RunGone as err:  # nothing to end: one line and the ways on, not 2 tracebacks
            raise PretrainError(run_gone_message(err, id_file, uri)) from None
        except BaseException as err:  # the caller never learns the id: it ends it here
            _end_unfinished(uri, run_id, err)
            raise
        return run_id, uri
    all_tags = {"radjepa.job": "pretrain", **(provenance or {}), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(exp_id, run_name=cfg.train.run_name, tags=all_tags).info.run_id
    try:
        log_params(run_id, uri, cfg)
        locations.write_text(id_file, run_id)
    except BaseException as err:
        # without its id file no re-run continues this run: it would stay RUNNING for good
        _end_unfinished(uri, run_id, err)
        raise
    return run_id, uri


def run_gone_message(err: Any, id_file: str, uri: str) -> str:
    """What a re-run says when the MLflow run its folder names is not in the store
    (:class:`pipelines.tracking_runs.RunGone`): which store, and the two ways on."""
    id_file, uri = locations.redact(id_file), locations.redact(uri)
    return (
        f"{id_file} names MLflow run {err.run_id}, which is {err.why} the store {uri}: point "
        "tracking.uri (or MLFLOW_TRACKING_URI) at the store that holds it, or delete "
        f"{id_file} to record the rest of the run as a new MLflow run"
    )


def _end_unfinished(uri: str, run_id: str, err: BaseException) -> None:
    """End the MLflow run ``run_id``, which :func:`start_tracking` made (or set RUNNING again)
    and could not hand to its caller because ``err`` stopped it: KILLED after Ctrl-C or a
    SIGTERM (routed as Ctrl-C), as an interruption during training ends it, else FAILED. An
    interruption there ended the run FAILED under the command's "interrupted" line, and one
    (or an error) while a resumed run's provenance was recorded left it RUNNING for good."""
    from pipelines.tracking import mark_run

    interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))
    mark_run(uri, run_id, "KILLED" if interrupted else "FAILED")


def finish_tracking(
    cfg: Config, uri: str, run_id: str, ckpt: str, metrics: dict[str, Any]
) -> str | None:
    from pipelines.tracking import client as tracking_client
    from pipelines.tracking import redacted_yaml, register_artifact_dir

    client = tracking_client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.yaml"
        cfg_path.write_text(redacted_yaml(cfg))
        client.log_artifact(run_id, str(cfg_path))
    # the model is the weights and their metadata; the optimizer state (as large again) only
    # matters for resuming, and that reads the checkpoint in the run folder
    from radjepa.checkpoint import META, WEIGHTS, read_meta

    # from the checkpoint itself: a re-run of a finished run reports no new metrics
    step = str(read_meta(ckpt)["step"])
    artifact = f"checkpoint-step-{step}"
    for name in (WEIGHTS, META):
        client.log_artifact(run_id, str(Path(ckpt) / name), artifact)
    version = None
    if cfg.tracking.register_model:
        from radjepa.eval.heads import ENCODER_TAG, checkpoint_fingerprint

        name = cfg.tracking.registered_model
        # the registered files are the ones fingerprinted: a server whose cluster fetches the
        # weights checks a head and an index against this tag without them
        fingerprint = checkpoint_fingerprint(ckpt)
        found = _registered_version(client, name, run_id, step)
        if found is None:
            tags = {"run_name": cfg.train.run_name, "step": step, ENCODER_TAG: fingerprint}
            version = register_artifact_dir(uri, run_id, artifact, name, tags=tags)
        else:
            version, recorded = found
            log.info("%s version %s already holds step %s of this run", name, version, step)
            # its files were just uploaded again (this checkpoint's); a version registered
            # before the tag, or from a checkpoint retrained since, is tagged with these
            if recorded != fingerprint:
                if recorded:
                    log.warning(
                        "%s version %s now holds other weights for step %s (encoder %s, was %s)",
                        name,
                        version,
                        step,
                        fingerprint[:12],
                        recorded[:12],
                    )
                client.set_model_version_tag(name, version, ENCODER_TAG, fingerprint)
    from pipelines.tracking_runs import end_run

    end_run(client, run_id, "FINISHED")  # a reap's tag goes: the driver was alive after all
    return version


def _registered_version(
    client: Any, name: str, run_id: str, step: str
) -> tuple[str, str | None] | None:
    """A version of ``name`` this run already registered at ``step`` (a re-run of a finished
    run has no new weights, so it must not add a duplicate version), with its encoder tag."""
    try:  # filter on the run only (every registry accepts it; a name may hold quotes)
        versions = client.search_model_versions(f"run_id = '{run_id}'")
    except Exception as err:  # noqa: BLE001 - the check is a courtesy; registering is the job
        log.warning("could not list the model versions of run %s: %s", run_id, err)
        return None
    from radjepa.eval.heads import ENCODER_TAG

    for mv in versions:
        tags = mv.tags or {}
        if mv.name == name and tags.get("step") == step:
            return str(mv.version), tags.get(ENCODER_TAG)
    return None


def record_config_change(cfg: Config, uri: str, run_id: str, resume: ResumePoint) -> None:
    """Leave a trace of an allowed config change on the MLflow run: its params were logged when
    the run was created and keep the old values."""
    from pipelines.tracking import client as tracking_client
    from pipelines.tracking import redacted_yaml

    client = tracking_client(uri)
    keys = ", ".join(resume.changed)
    client.set_tag(run_id, f"radjepa.config_changed_at_step_{resume.step}", keys[:5000])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"config-resumed-at-step-{resume.step}.yaml"
        path.write_text(redacted_yaml(cfg))
        client.log_artifact(run_id, str(path))

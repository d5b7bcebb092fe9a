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

# run tag per artifact folder (``radjepa.folder_encoder.checkpoint-step-N``): the encoder
# fingerprint of the checkpoint uploaded whole into it, so that a re-run of a finished run
# finds its weights there without fetching them
FOLDER_TAG = "radjepa.folder_encoder."


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
    """Record the end of a pretraining run: its config, the checkpoint's weights and, with
    ``tracking.register_model``, a model version of them; the run ends FINISHED.

    The files under a registered version never change: a replica that fetches the version
    afresh and one serving its cached copy must load the same weights. So a re-run whose
    checkpoint a version of this run holds already uploads and registers nothing, and other
    weights at the same step (the run retrained from an earlier checkpoint) go to a folder of
    their own, ``checkpoint-step-N-<fingerprint>``, as a new version.
    """
    from pipelines.tracking import client as tracking_client
    from pipelines.tracking import redacted_yaml, register_artifact_dir
    from pipelines.tracking_runs import end_run
    from radjepa.checkpoint import META, WEIGHTS, read_meta
    from radjepa.eval.heads import ENCODER_TAG, checkpoint_fingerprint

    client = tracking_client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.yaml"
        cfg_path.write_text(redacted_yaml(cfg))
        client.log_artifact(run_id, str(cfg_path))
    # from the checkpoint itself: a re-run of a finished run reports no new metrics
    step = str(read_meta(ckpt)["step"])
    name = cfg.tracking.registered_model if cfg.tracking.register_model else None
    # the registered files are the ones fingerprinted: a server whose cluster fetches the
    # weights checks a head and an index against this tag without them
    fingerprint = checkpoint_fingerprint(ckpt)
    if name is not None:
        versions = _run_versions(client, run_id)
        held = _holding(client, uri, versions, name, step, fingerprint)
        if held is not None:
            log.info("%s version %s already holds this checkpoint (step %s)", name, held, step)
            end_run(client, run_id, "FINISHED")  # a reap's tag goes: the driver was alive
            return held
        for mv in versions:
            tags = mv.tags or {}
            if mv.name == name and tags.get("step") == step:
                log.warning(
                    "%s version %s holds other weights for step %s of this run (encoder %s): "
                    "this checkpoint (encoder %s) becomes a new version beside it",
                    name,
                    mv.version,
                    step,
                    (tags.get(ENCODER_TAG) or "not recorded")[:12],
                    fingerprint[:12],
                )
    folders = _run_folders(client, run_id)
    plain = _plain_folder(step)
    if folders is not None and plain in folders and folders[plain] is None:
        # uploaded by a version before the tag (or its tag lost): its own files say, once
        if _registered_fingerprint(uri, f"runs:/{run_id}/{plain}") == fingerprint:
            client.set_tag(run_id, FOLDER_TAG + plain, fingerprint)
            folders[plain] = fingerprint
    artifact, upload = _artifact_path(folders, step, fingerprint)
    # the model is the weights and their metadata; the optimizer state (as large again) only
    # matters for resuming, and that reads the checkpoint in the run folder
    if upload:
        for file in (WEIGHTS, META):
            client.log_artifact(run_id, str(Path(ckpt) / file), artifact)
        # said once every file is there: a folder cut short has no tag, and is not taken as
        # holding these weights
        client.set_tag(run_id, FOLDER_TAG + artifact, fingerprint)
    version = None
    if name is not None:
        tags = {"run_name": cfg.train.run_name, "step": step, ENCODER_TAG: fingerprint}
        version = register_artifact_dir(uri, run_id, artifact, name, tags=tags)
    end_run(client, run_id, "FINISHED")  # a reap's tag goes: the driver was alive after all
    return version


def _run_versions(client: Any, run_id: str) -> list[Any]:
    """The model versions registered from this run under any name; none when the registry
    cannot be listed (then a version holding this checkpoint is not found, and one is added)."""
    try:  # filter on the run only (every registry accepts it; a name may hold quotes)
        return list(client.search_model_versions(f"run_id = '{run_id}'"))
    except Exception as err:  # noqa: BLE001 - a duplicate version is no harm; lost weights are
        log.warning("could not list the model versions of run %s: %s", run_id, err)
        return []


def _holding(
    client: Any, uri: str, versions: list[Any], name: str, step: str, fingerprint: str
) -> str | None:
    """The version of ``name`` among ``versions`` that holds this checkpoint (``step``, the
    encoder ``fingerprint``): a re-run of a finished run has no new weights, and registering
    them again would add a duplicate version. A version registered before the encoder tag is
    fingerprinted from its own files, and tagged when they are these."""
    from radjepa.eval.heads import ENCODER_TAG

    for mv in versions:
        tags = mv.tags or {}
        if mv.name != name or tags.get("step") != step:
            continue
        recorded = tags.get(ENCODER_TAG) or _registered_fingerprint(uri, str(mv.source))
        if recorded == fingerprint:
            if not tags.get(ENCODER_TAG):  # a cluster's serve checks heads against this tag
                client.set_model_version_tag(name, str(mv.version), ENCODER_TAG, fingerprint)
            return str(mv.version)
    return None


def _registered_fingerprint(uri: str, source: str) -> str | None:
    """The encoder fingerprint of a version's files (MLflow hands a local source over in
    place, a remote one is fetched to a temporary folder); None when they cannot be read."""
    import mlflow

    from radjepa.eval.heads import checkpoint_fingerprint
    from serve.registry import local_source

    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=source,
                tracking_uri=uri,
                dst_path=None if local_source(source) else tmp,
            )
            return checkpoint_fingerprint(local)
    except Exception as err:  # noqa: BLE001 - unknown files are not these: a new version
        log.warning("could not read the files of %s: %s", source, err)
        return None


def _run_folders(client: Any, run_id: str) -> dict[str, str | None] | None:
    """The run's top-level artifact folders, each with the encoder fingerprint of the
    checkpoint uploaded whole into it (:data:`FOLDER_TAG`; None: not known); None when they
    cannot be listed (then no folder is known to be free)."""
    try:
        tags = client.get_run(run_id).data.tags
        return {
            info.path: tags.get(FOLDER_TAG + info.path)
            for info in client.list_artifacts(run_id)
            if info.is_dir
        }
    except Exception as err:  # noqa: BLE001 - the folder chosen then is one only these fill
        log.warning("could not list the artifacts of run %s: %s", run_id, err)
        return None


def _plain_folder(step: str) -> str:
    """The artifact folder of a step's checkpoint while no other weights hold it."""
    return f"checkpoint-step-{step}"


def _artifact_path(
    folders: dict[str, str | None] | None, step: str, fingerprint: str
) -> tuple[str, bool]:
    """The run's artifact folder for this checkpoint and whether its files must be uploaded.

    A folder is never written with other weights than it holds, registered or not: a version
    may be its source now, or be registered from it later (a ``runs:/`` URI), and a replica
    with a cached copy would serve other weights than one fetching it afresh. The run's own
    folders say it without the registry, which a run that registers nothing need not reach.
    So ``checkpoint-step-N`` while the run has none or it holds these weights whole (a re-run
    of a finished run: nothing uploaded), else (or when the run's folders could not be
    listed) ``checkpoint-step-N-<fingerprint[:12]>``, which only ever holds these weights,
    uploaded unless they are there whole."""
    plain = _plain_folder(step)
    own = f"{plain}-{fingerprint[:12]}"
    if folders is None:
        return own, True
    if plain not in folders or folders[plain] == fingerprint:
        return plain, folders.get(plain) != fingerprint
    return own, folders.get(own) != fingerprint


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

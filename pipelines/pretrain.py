"""The pretraining job: Parquet shards stream through Ray Data into a Ray Train JEPA run.

Orchestration only: the step, schedules, masks, checkpoint format, hold-out split, resume checks
and quality metrics live in ``radjepa`` (``engine``, ``training_data``, ``resume``,
``monitoring``). This module decides where things run (workers, GPUs, CPUs left for Ray Data), where
they are stored (run folder, checkpoints, MLflow) and how a run survives failures (FailureConfig
restarts from the latest reported checkpoint; re-running the same command with the same run name
resumes).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from pipelines.divergence import (
    DIVERGED,
    DIVERGED_MARKER,
    clear_divergence,
    divergence_message,
    read_divergence,
    record_divergence,
)
from pipelines.restore import newest_intact, restore_decision, resume_loop_config
from pipelines.storage_errors import damaged_shard, storage_error, storage_message
from pipelines.stray_checkpoints import Pruned, prune_stray_checkpoints
from radjepa import locations
from radjepa.config import Config
from radjepa.error_text import first_line
from radjepa.log_filters import redact_console, redact_log_records
from radjepa.resume import ResumeError, ResumePoint
from radjepa.training_data import TrainingDataError

log = logging.getLogger(__name__)
# what Ray's job supervisor sets in its driver's environment: the job's config (runtime env and
# metadata) as JSON
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

FAILURE_MARKER = ".radjepa-injected-failure"
# how long rank 0 waits at the end of training for metric values the store has not taken yet.
# A write that meets a stopped tracking server sits in MLflow's own request retries (7, with
# back-off, 247 s in all): with 60 s, a server restarted 67 s after it went down, while the
# write was between retries, still lost every value queued meanwhile (174 in a 40-step run)
METRICS_FLUSH_S = 300.0


class PretrainError(RuntimeError):
    """A problem with the inputs or the environment, phrased for the user."""


class PretrainInterrupted(PretrainError):
    """Ctrl-C or SIGTERM stopped the run; it is resumable (the CLI exits 130, as ingest does)."""


INTERRUPTED = (
    "training was interrupted; the run is resumable: re-run the same command to continue from "
    "its latest checkpoint"
)

# the library's own user-facing errors, reported as a PretrainError by this job
_LIBRARY_ERRORS = (TrainingDataError, ResumeError)


@dataclass(frozen=True)
class PretrainResult:
    run_dir: str
    checkpoint: str | None
    mlflow_run_id: str | None
    tracking_uri: str | None
    model_version: str | None
    metrics: dict[str, Any]
    # checkpoint folders Ray Train would never remove (cut short, or never recorded by it)
    pruned: Pruned = Pruned()


# ---------------------------------------------------------------------------------------------
# Data


def build_train_dataset(data: str, cfg: Config, *, start_step: int = 0, files: Sequence[str] = ()):
    """Ray Data pipeline: read shards in a shuffled order, decode pixels, drop the hold-out.

    The order of the shard files is drawn again for every pass (Ray numbers each execution of
    the dataset, one per epoch; a plain integer seed would give every epoch the same order),
    before Ray groups files into read tasks, so each epoch also groups them differently. It
    streams: ``randomize_block_order`` waits for the whole dataset in the object store before
    the first batch, every epoch. ``start_step`` (a resumed run's step) enters the seed so that
    a resume does not replay the first run's order of passes. ``files``: the shards the run
    was inspected with (``ShardSummary.files``; none: the folder is listed).
    """
    from ray.data import FileShuffleConfig

    from pipelines.shard_source import read_shards
    from radjepa.training_data import TRAINING_COLUMNS, decode_training_batch, training_files

    fs, files = training_files(data, files)  # the files, not the folder: ingest's listing
    seed = (cfg.train.seed + start_step * 1_000_003) % 2**32
    ds = read_shards(
        files,
        filesystem=fs,
        shown=data,
        columns=TRAINING_COLUMNS,
        shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=True),
    )
    # the training stream is re-read every epoch: per-epoch progress bars would bury the step
    # log, which already reports throughput. Off in this dataset's own context (a copy of the
    # current one, shared by the datasets derived from it): off in the process's, they were
    # off for whatever ran next in it, and the demo's embed stage printed Ray Data's "Progress
    # bars disabled. To enable, set `ray.data.DataContext...`"
    ds.context.enable_progress_bars = False
    return ds.map_batches(
        decode_training_batch,
        batch_format="pyarrow",
        batch_size=256,
        fn_kwargs={"holdout_fraction": cfg.data.holdout_fraction},
    )


# ---------------------------------------------------------------------------------------------
# The per-worker training loop (runs inside Ray Train workers)


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry: resume if a checkpoint exists, then step until ``train.steps``."""
    import ray.train

    # first: rank 0's call starts the run's data coordinator (an actor, i.e. a process of its
    # own), which then starts while this worker imports the model code and builds the model
    # (~2 s). Asked for after them, the first batch waited for both, one after the other
    shard = ray.train.get_dataset_shard("train")
    from pipelines.shard_source import hide_shard_errors

    hide_shard_errors(training_worker=True)  # a damaged shard: the driver says it in one line
    import ray.train.torch
    import torch
    from ray.train.collective import broadcast_from_rank_zero

    from pipelines.tracking_metrics import MetricSink
    from radjepa.checkpoint import load_checkpoint, save_checkpoint
    from radjepa.engine import IntervalLoss, Pretrainer, mean_over_ranks
    from radjepa.monitoring import quality_metrics
    from radjepa.transforms import random_resized_crop, to_model_input

    cfg = Config.model_validate(loop_config["config"])
    redact_log_records()  # its lines reach the driver's console through Ray
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + rank)

    trainer = Pretrainer(cfg, device, rank=rank, world_size=world)
    monitor = loop_config.get("monitor_images")
    run_dir = loop_config["run_dir"]
    damaged = loop_config.get("damaged_checkpoints") or ()
    # rank 0 looks and decides, every rank loads what it decided: ranks that listed the folder
    # apart (an object store's listing is not atomic), or read a checkpoint's step apart (one
    # failed request), would resume at different steps, rank 0 alone would report, and DDP hung
    offered = ray.train.get_checkpoint()
    decision = None
    if rank == 0:
        newest = newest_intact(run_dir, damaged)
        decision = restore_decision(offered, newest, loop_config.get("resume_from"), damaged)
    use_offered, location, unrecorded = broadcast_from_rank_zero(decision)
    restored = offered if use_offered else (ray.train.Checkpoint(location) if location else None)
    if restored is not None:
        with restored.as_directory() as ckpt_dir:
            load_checkpoint(ckpt_dir, trainer)
        if rank == 0:
            log.info("resumed from %s at step %d", restored.path, trainer.step)
    at_end = restored is not None and trainer.step >= cfg.train.steps
    if unrecorded or at_end:
        metrics: dict[str, Any] = {"step": trainer.step}
        if rank == 0 and monitor is not None and len(monitor) >= 2:
            metrics.update(
                quality_metrics(trainer, monitor, cfg, device, loop_config.get("probe_set"))
            )
        if unrecorded:
            # a folder newer than all Ray recorded (see pipelines.restore): reported again, in
            # place, so Ray records it (a restart at the last step reports nothing else, and
            # the run's result was an older checkpoint) and prunes it with the others
            ray.train.report(
                metrics,
                checkpoint=restored if rank == 0 else None,
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
            )
        else:
            # the last checkpoint, not one to report again (Ray recorded it, or rank 0 could
            # not tell it apart from Ray's offer): a sweep trial resumed there (its driver
            # stopped after the checkpoint, before Tune saved the report) trained nothing and
            # reported nothing, so Tune kept its result from before, ranked it "stopped early"
            # on an older metric and knew no checkpoint of it. Said again without the
            # checkpoint, which Ray would record twice; its path as Tune's callback gives it
            if rank == 0:
                metrics["checkpoint_path"] = restored.path
            ray.train.report(metrics)

    # rank 0 writes metrics from a background thread: a slow or unreachable store never holds
    # up a step (pipelines.tracking_metrics)
    tracking = loop_config.get("tracking") if rank == 0 else None
    sink = None
    if tracking:  # steps after the restored one that the run already holds go to replay/<key>
        sink = MetricSink(tracking["uri"], tracking["run_id"], start_step=trainer.step)
    gen = torch.Generator(device=device)
    steps, bs = cfg.train.steps, cfg.train.batch_size
    t_last, n_since, warmed_up = time.perf_counter(), 0, False
    last: dict[str, float] = {}
    diverged: str | None = None  # why training cannot go on (non-finite loss or weights)
    interval_loss = IntervalLoss(device)  # the logged loss: the mean since the last log

    try:
        while trainer.step < steps:
            seen = 0
            # a fresh, step-derived crop stream per pass: a resume starts it (and the data order)
            # again at the resume step, so it does not replay the interrupted run's batches
            gen.manual_seed(cfg.train.seed * 1_000_003 + rank * 7919 + trainer.step)
            for batch in shard.iter_torch_batches(
                **stream_options(cfg, trainer.step, device.type == "cuda")
            ):
                seen += 1
                x = to_model_input(batch["image"].to(device, non_blocking=True))
                x = random_resized_crop(
                    x, cfg.data.crop_size, cfg.data.crop_scale, cfg.data.crop_ratio, generator=gen
                )
                out = trainer.train_step(x)
                interval_loss.add(out["loss"])
                step = trainer.step
                n_since += bs * world
                checkpoint_step = step % cfg.train.checkpoint_every == 0 or step == steps
                # said on the console every log_every steps and at the end; recorded (sink,
                # report) at those and at every checkpoint
                said_step = step % cfg.train.log_every == 0 or step == steps
                log_step = checkpoint_step or said_step
                if not warmed_up:
                    # the attempt's first step waited for the data pipeline to start and, on a
                    # GPU, for the compile: throughput is measured from the step after it (unless
                    # it is logged itself)
                    warmed_up = True
                    if not log_step:
                        t_last, n_since = time.perf_counter(), 0

                if checkpoint_step and not _weights_finite_on_every_rank(trainer, mean_over_ranks):
                    diverged = "the weights became non-finite"
                    break
                # a checkpoint step is a log step: its report (what Tune ranks a trial by, what
                # a checkpoint's record says) carried the loss of the last log step before it
                if log_step:
                    out = {**out, "loss": interval_loss.take()}  # every rank logs this step
                    last = {k: float(v) for k, v in out.items()}  # one host sync per log interval
                    # timed after the sync: before it, the host had only queued the interval's
                    # last steps on a GPU, and their time fell in no interval
                    elapsed = time.perf_counter() - t_last
                    last["img_per_s"] = n_since / max(elapsed, 1e-9)
                    n_since = 0
                    if not np.isfinite(last["loss"]):
                        diverged = f"the loss became {last['loss']}"
                        break
                    if sink is not None:
                        sink.log(last, step)
                    if rank == 0 and said_step:
                        log.info(
                            "step %d/%d loss %.4f lr %.2e momentum %.5f %.1f img/s",
                            step,
                            steps,
                            last["loss"],
                            last["lr"],
                            last["momentum"],
                            last["img_per_s"],
                        )

                if checkpoint_step:
                    metrics = {"step": step, **last}
                    if rank == 0 and monitor is not None and len(monitor) >= 2:
                        quality = quality_metrics(
                            trainer, monitor, cfg, device, loop_config.get("probe_set")
                        )
                        metrics.update(quality)
                        if sink is not None:
                            sink.log(quality, step)
                    with tempfile.TemporaryDirectory() as tmp:
                        checkpoint = None
                        if rank == 0:
                            ckpt_dir = Path(tmp) / "ckpt"
                            save_checkpoint(
                                ckpt_dir, trainer, extra={"run_name": cfg.train.run_name}
                            )
                            checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir))
                        ray.train.report(metrics, checkpoint=checkpoint)
                if log_step:  # a checkpoint's metrics and upload are not training time
                    t_last = time.perf_counter()
                _maybe_inject_failure(cfg, rank, step, run_dir)
                if step >= steps:
                    break
            if diverged is not None:
                # every rank saw it (the loss is the ranks' mean, the weights check is reduced
                # too), so every rank reports it: no checkpoint, and the worker returns normally.
                # Raised, it was retried train.max_failures times from the last checkpoint, which
                # replays the same steps, masks and crops into the same divergence
                # (Ray's Result holds the last checkpoint's metrics only: the driver reads the
                # marker; a sweep's Tune sees the report)
                report = {"step": trainer.step, DIVERGED: diverged, cfg.tune.metric: float("nan")}
                if rank == 0:
                    log.error("training diverged at step %d: %s", trainer.step, diverged)
                    marker = locations.join_location(run_dir, DIVERGED_MARKER)
                    locations.write_text(
                        marker, json.dumps({"step": trainer.step, DIVERGED: diverged})
                    )
                ray.train.report(report)
                break
            if seen == 0:
                raise PretrainError(
                    f"worker {rank} received no full batch of {bs}: too few images per worker"
                )
    finally:
        if sink is not None:  # metrics logged before a failure are kept too
            sink.close(timeout_s=METRICS_FLUSH_S)


def stream_options(cfg: Config, step: int, on_gpu: bool) -> dict[str, Any]:
    """How a worker iterates its shard of the training stream from ``step``
    (``iter_torch_batches``): whole batches, a local shuffle seeded by the step, batches made
    ahead (``train.data_loader_threads``) and, on a GPU, pinned so they copy asynchronously."""
    bs = cfg.train.batch_size
    return {
        "batch_size": bs,
        "drop_last": True,
        "local_shuffle_buffer_size": min(4 * bs, 1024),
        "local_shuffle_seed": cfg.train.seed + step,
        "pin_memory": on_gpu,
        "prefetch_batches": cfg.train.data_loader_threads,
    }


def _weights_finite_on_every_rank(trainer: Any, mean_over_ranks: Any) -> bool:
    """``Pretrainer.weights_finite`` agreed on by every rank (their weights are the same under
    DDP; reduced anyway, since ranks that disagreed would wait forever in ``report``)."""
    import torch

    ok = torch.tensor(float(trainer.weights_finite()), device=trainer.device)
    return bool(mean_over_ranks(ok) == 1.0)


def _maybe_inject_failure(cfg: Config, rank: int, step: int, run_dir: str) -> None:
    """Test switch (off by default): rank 0 fails once at ``train.fail_at_step``, by an error
    or (``train.fail_by=kill``) by losing its process, as the OOM killer or a lost node does:
    what it had reported but the controller had not collected yet goes with it."""
    if cfg.train.fail_at_step is None or rank != 0 or step != cfg.train.fail_at_step:
        return
    marker = locations.join_location(run_dir, FAILURE_MARKER)
    if locations.read_text(marker) is not None:
        return
    locations.write_text(marker, str(step))
    if cfg.train.fail_by == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected failure at step {step} (train.fail_at_step)")


# ---------------------------------------------------------------------------------------------
# The driver


def storage_root(cfg: Config) -> str:
    out = cfg.train.output_dir
    return locations.absolute(out)


def build_trainer(
    cfg: Config,
    data: str,
    *,
    storage: str,
    tracking: dict[str, str] | None,
    callbacks: list[Any] | None = None,
    extra_loop_config: dict[str, Any] | None = None,
    start_step: int = 0,
    files: Sequence[str] = (),
):
    """The TorchTrainer for one run; ``run_pretrain`` and every sweep trial use this.
    ``start_step``: the step a re-run resumes from, ``files`` the shards the run was inspected
    with (see :func:`build_train_dataset`)."""
    import ray.train

    from pipelines.failure_policy import Trainer  # a TorchTrainer that never retries a full disk
    from pipelines.runtime import resolve_use_gpu
    from radjepa.monitoring import monitor_images

    return Trainer(
        train_loop,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "tracking": tracking,
            "monitor_images": monitor_images(data, cfg, files=files),
            "run_dir": locations.join_location(storage, cfg.train.run_name),
            **(extra_loop_config or {}),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=resolve_use_gpu(cfg.train.use_gpu),
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=callbacks,
        ),
        datasets={"train": build_train_dataset(data, cfg, start_step=start_step, files=files)},
        dataset_config=ray.train.DataConfig(execution_options=_ingest_options()),
    )


def _ingest_options() -> Any:
    """Ray Train's default options for feeding the workers, as its ``DataConfig`` builds them
    from the current ``DataContext``, less the field Ray Data deprecates: built by Ray, they
    pass ``exclude_resources`` and every run's output said a RayDeprecationWarning nobody
    running it could act on."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(
        resource_limits=current.resource_limits,
        preserve_order=current.preserve_order,
        verbose_progress=current.verbose_progress,
    )


def run_pretrain(cfg: Config, data: str) -> PretrainResult:
    """Run (or resume) ``cfg.train.run_name`` on the shards in ``data``.

    Ctrl-C or SIGTERM (``radjepa jobs stop``, a pod stopping) raises
    :class:`PretrainInterrupted`, the MLflow run marked KILLED. SIGTERM goes the Ctrl-C way from
    before ray.init (which installs its own handler) to the end: during training, through Ray
    Train's SIGINT handler, which aborts the workers gracefully. Left to ray.init's handler, its
    ``sys.exit`` landed wherever the driver waited and, on a loaded machine, the driver aborted
    in teardown (SIGABRT, no last line). Once one is routed, later SIGTERMs are ignored until it
    returns: a supervisor repeating itself cannot cut short the run's KILLED mark. The caller's
    SIGINT and SIGTERM handlers are put back however it ends (an in-process caller keeps its
    Ctrl-C); the CLI, whose process then ends, ignores SIGTERM from there on itself."""
    from pipelines.runtime import sigterm_as_ctrl_c

    try:
        with sigterm_as_ctrl_c(once=True):
            return _run_pretrain(cfg, data)
    except KeyboardInterrupt:  # before the MLflow run exists, or after it was marked KILLED
        raise PretrainInterrupted(INTERRUPTED) from None


def _run_pretrain(cfg: Config, data: str) -> PretrainResult:
    from pipelines.runtime import ensure_ray
    from radjepa.masks import MasksUnsatisfiable, check_masks
    from radjepa.resume import check_resume_workers, find_resume_point
    from radjepa.training_data import inspect_shards, with_stored_decode

    try:
        info = inspect_shards(data, cfg)
        cfg = with_stored_decode(cfg, info)
        log.info(
            "%d images (%d for training, %d held out), %d px %s",
            info.rows,
            info.train_rows,
            info.holdout_rows,
            info.size,
            info.dtype,
        )
        storage = prepare_outputs(cfg)
        run_dir = locations.join_location(storage, cfg.train.run_name)
        resume = find_resume_point(cfg, run_dir)
        resume_loop = resume_loop_config(run_dir, resume)
        restored = resume.path if resume is not None else None
        # before the run: a full disk that stopped the last one is freed of its copy cut short
        pruned = prune_stray_checkpoints(run_dir, restored=restored, finished=False)
        check_masks(cfg.masks, cfg.model.grid, cfg.train.batch_size, cfg.train.seed)
        finished = resume is not None and resume.step >= cfg.train.steps
        if not finished or cfg.train.num_workers == 0:
            # a finished run trains nothing (already_trained): it needs no Ray, which takes
            # 10-20 s to start on a 2-core machine
            ensure_ray()
            cfg = _resolve_workers(cfg, info.train_rows)
        if resume is not None:
            check_resume_workers(resume, cfg)
    except (*_LIBRARY_ERRORS, MasksUnsatisfiable) as err:
        raise PretrainError(str(err)) from None

    from pipelines.pretrain_tracking import finish_tracking, record_config_change, start_tracking
    from pipelines.runtime import ClusterResourceError
    from pipelines.tracking import mark_run

    tracking, run_id, uri = None, None, None
    if cfg.tracking.enabled:
        try:
            from pipelines.tracking import provenance_tags

            provenance = provenance_tags(data, info.rows, info.fingerprint)
            # a run it made or set RUNNING again, and then could not return, it ended itself
            run_id, uri = start_tracking(cfg, storage, run_dir, provenance=provenance)
            if resume is not None and resume.changed:
                record_config_change(cfg, uri, run_id, resume)
        except KeyboardInterrupt:
            if run_id is not None:  # resumable as it was
                mark_run(uri, run_id, "KILLED")
            raise
        except Exception as err:  # an unreachable server, a store without permission, ...
            if run_id is not None:
                mark_run(uri, run_id, "FAILED")
            raise PretrainError(
                f"cannot record the run in MLflow: {type(err).__name__}: {err}"
            ) from None
        tracking = {"run_id": run_id, "uri": uri}

    try:
        clear_divergence(run_dir)  # the last run's: this one starts from a good checkpoint
        if resume is not None and finished:
            result = already_trained(cfg, run_dir, resume)
        else:
            trainer = build_trainer(
                cfg,
                data,
                storage=storage,
                tracking=tracking,
                extra_loop_config=resume_loop,
                start_step=resume.step if resume is not None else 0,
                files=info.files,
            )
            result = trainer.fit()
        if result.error is not None:
            raise result.error
        diverged = read_divergence(run_dir)
        if diverged is not None:
            if tracking:
                record_divergence(uri, run_id, diverged)
            raise PretrainError(divergence_message(diverged, result.checkpoint, storage))
        pruned += prune_stray_checkpoints(run_dir, restored=restored, finished=True)
    except (KeyboardInterrupt, SystemExit):
        # Ray Train answers Ctrl-C (and a SIGTERM, routed to it) by aborting the workers and
        # exiting from its SIGINT handler (sys.exit(0)), not a KeyboardInterrupt: the MLflow
        # run stayed RUNNING forever. A signal before it registered that handler raises
        # KeyboardInterrupt. Re-running the same command resumes the run either way.
        if tracking:
            mark_run(uri, run_id, "KILLED")
        raise PretrainInterrupted(INTERRUPTED) from None
    except Exception as err:
        if tracking:
            mark_run(uri, run_id, "FAILED")
        if isinstance(err, (ClusterResourceError, PretrainError, *_LIBRARY_ERRORS)):
            raise PretrainError(str(err)) from None
        raise PretrainError(
            _explain_failure(err, run_dir, cfg.train.max_failures, cfg.train.keep_checkpoints)
        ) from err

    metrics = dict(result.metrics or {})
    ckpt, version = None, None
    if result.checkpoint is not None:
        ckpt = locations.spell_like(storage, result.checkpoint.path)
        if tracking:
            try:
                # as_directory() downloads a checkpoint that lives on object storage
                with result.checkpoint.as_directory() as local_ckpt:
                    version = finish_tracking(cfg, uri, run_id, local_ckpt, metrics)
            except KeyboardInterrupt:  # the weights are safe; a re-run records them
                mark_run(uri, run_id, "KILLED")
                raise
            except Exception as err:  # the weights are safe: say where, and end the run
                mark_run(uri, run_id, "FAILED")
                first = first_line(str(err))
                raise PretrainError(
                    f"training finished (checkpoint {ckpt}) but recording it in MLflow failed: "
                    f"{type(err).__name__}: {first}"
                ) from None
    return PretrainResult(run_dir, ckpt, run_id, uri, version, metrics, pruned)


# ---------------------------------------------------------------------------------------------
# Resuming


@dataclass(frozen=True)
class AlreadyTrained:
    """What ``trainer.fit()`` returns for a run whose checkpoint holds ``train.steps`` steps."""

    checkpoint: Any  # a ray.train.Checkpoint: the run's result
    metrics: dict[str, Any]
    error: None = None


def already_trained(cfg: Config, run_dir: str, resume: ResumePoint) -> AlreadyTrained:
    """The result of re-running a finished run, found on the driver: the checkpoint it resumes
    from (``find_resume_point``'s pick) and the metrics Ray recorded with it.

    A worker group started for it only loaded that checkpoint and returned (25-35 s of Ray
    start-up, worker processes and imports on a 2-core machine, for nothing); the re-run still
    records and registers the checkpoint (``finish_tracking``), as one whose recording failed
    needs. (Ray's own result named the latest checkpoint it recorded: an older one than this
    pick when a driver died between copying the newest and recording it.)
    """
    import ray.train

    from pipelines.stray_checkpoints import recorded_metrics

    metrics = recorded_metrics(run_dir, locations.base_name(resume.path)) or {"step": resume.step}
    log.info(
        "run %s already holds step %d (train.steps=%d): nothing to train, no Ray workers "
        "started; its checkpoint %s is the result (raise train.steps to train on)",
        cfg.train.run_name,
        resume.step,
        cfg.train.steps,
        resume.path,
    )
    return AlreadyTrained(ray.train.Checkpoint(resume.path), metrics)


def _resolve_workers(cfg: Config, train_rows: int) -> Config:
    """``train.num_workers=0``: as many ranks as the connected cluster offers."""
    if cfg.train.num_workers != 0:
        return cfg
    from pipelines.runtime import ClusterResourceError, resolve_num_workers, resolve_use_gpu

    try:
        workers = resolve_num_workers(resolve_use_gpu(cfg.train.use_gpu), cfg.train.cpus_per_worker)
    except ClusterResourceError as err:
        raise PretrainError(str(err)) from None
    log.info("train.num_workers=0: %d workers on this cluster", workers)
    cfg = cfg.with_overrides({"train.num_workers": workers})
    from radjepa.training_data import check_global_batch

    check_global_batch(train_rows, cfg)
    return cfg


def prepare_outputs(cfg: Config) -> str:
    """The output root (absolute path or URI), checked before any cluster work: it can be
    written, and its runs can be tracked (pretrain and every sweep trial write there)."""
    storage = storage_root(cfg)
    check_job_outputs(cfg)
    check_tracking_store(cfg, storage)
    try:
        locations.check_writable(storage)
    except locations.LocationError as err:
        raise PretrainError(str(err)) from None
    return storage


def inside_ray_job() -> bool:
    """Whether this process is a Ray Job's driver (``radjepa submit``, ``ray job submit``, a
    KubeRay RayJob): Ray's job supervisor hands its driver the job's config, whose metadata
    holds the submission id. (Ray 2.60 sets no RAY_JOB_SUBMISSION_ID, which this looked for,
    so the check below never ran in a real job.)"""
    raw = os.environ.get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return False
    try:
        metadata = json.loads(raw).get("metadata") or {}
        return bool(metadata.get("job_submission_id"))
    except (ValueError, AttributeError):
        return False


def check_job_outputs(cfg: Config) -> None:
    """Inside a Ray Job (``radjepa submit``) a relative ``train.output_dir``, or a relative
    sqlite tracking store (``sqlite:///mlflow.db``), resolves in the job's uploaded working
    dir: a temporary copy on the head, named by the code's hash, which workers on other nodes
    cannot reach and a re-run after any code change does not find."""
    from pipelines.tracking import relative_sqlite_path

    if not inside_ray_job():
        return
    output_dir = cfg.train.output_dir
    if "://" not in output_dir and not Path(output_dir).expanduser().is_absolute():
        raise PretrainError(
            f"train.output_dir is the relative path {output_dir!r} inside a Ray Job, i.e. "
            "in the job's temporary working dir: set it to a bucket URI (s3://...) or an "
            "absolute path on storage every node shares"
        )
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or ""
    if cfg.tracking.enabled and relative_sqlite_path(uri):
        raise PretrainError(
            f"the MLflow store {uri} is a relative sqlite path inside a Ray Job, i.e. in the "
            "job's temporary working dir: set tracking.uri / MLFLOW_TRACKING_URI to an MLflow "
            "server or an absolute sqlite path on storage every node shares"
        )


def shards_location(data: str | None, cfg: Config) -> str:
    """``--data`` wins; else the config's ``data.shards`` (so a sweep's best.yaml is a whole
    job)."""
    location = data or cfg.data.shards
    if not location:
        raise PretrainError("no shards given: pass --data <ingest output> or set data.shards")
    return location


def check_tracking_store(cfg: Config, storage: str) -> None:
    """With outputs on object storage, the default sqlite store would land in the job's
    temporary working folder and vanish with it: ask for a real store instead. A tracking
    server that does not answer is said in seconds, before Ray starts (``check_reachable``)."""
    import os

    from pipelines.tracking import check_reachable, store_uri

    uri = store_uri(cfg)  # the store every command uses (a local sqlite file is not checked)
    if cfg.tracking.enabled and uri:
        try:
            check_reachable(uri)
        except ConnectionError as err:
            raise PretrainError(str(err)) from None
    if (
        cfg.tracking.enabled
        and locations.local_path(storage) is None
        and not cfg.tracking.uri
        and not os.environ.get("MLFLOW_TRACKING_URI")
    ):
        raise PretrainError(
            f"train.output_dir is {storage}, so there is no local folder for the MLflow store: "
            "set tracking.uri (e.g. an MLflow server) or MLFLOW_TRACKING_URI, or "
            "--set tracking.enabled=false"
        )


def _explain_failure(
    err: BaseException, run_dir: str, max_failures: int = 0, keep_checkpoints: int | None = None
) -> str:
    full = storage_error(err)
    if full is not None:  # a full storage was not retried (pipelines.failure_policy)
        return storage_message(full, run_dir, keep_checkpoints)
    damaged = damaged_shard(err)
    if damaged is not None:  # not retried either: Ray's rendering of it is a traceback
        from pipelines.runtime import remote_error_message

        reason = remote_error_message(damaged) or str(damaged)
        return f"training stopped: {reason}; then re-run the same command to resume"
    text = str(err)
    lower = text.lower()
    # CUDA ("CUDA out of memory"), torch CPU allocator, and Ray's memory monitor killing a worker
    if any(k in lower for k in ("out of memory", "outofmemoryerror", "running low on memory")):
        return (
            "a worker ran out of memory. Lower train.batch_size, use a smaller model, or "
            "add GPU memory (bf16 is on by default on GPU). Original error: " + text[-2000:]
        )
    failures = getattr(err, "worker_failures", None) or {}
    if failures:
        # Ray Train's WorkerGroupError: its text is every failed rank's traceback (40 lines in
        # the CLI's one-line error); each rank's own exception says it in a line
        from pipelines.runtime import rank_failure

        rank = min(failures)
        reason = rank_failure(failures[rank])
        restarts = "no restart" if max_failures == 0 else "restarts exhausted"
        return (
            f"training failed on rank {rank}: {reason} (train.max_failures={max_failures}: "
            f"{restarts}; the workers' logs above have the traceback); re-run the same command "
            "to resume from the latest checkpoint"
        )
    return f"training failed: {text[-4000:]}"


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.pretrain --config C --data DST [--set k=v ...]`` inside a Ray job."""
    import argparse

    from pipelines.runtime import (
        ClusterError,
        RayStartTimeout,
        ignore_sigterm_after_the_job,
        process_ends_with_job,
    )
    from radjepa.config import ConfigError, load_config

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=None)
    p.add_argument("--data", default=None, help="ingest output (default: data.shards)")
    p.add_argument("--set", dest="sets", action="append", default=[])
    a = p.parse_args(argv)
    redact_log_records()
    redact_console()
    logging.basicConfig(level=os.environ.get("RADJEPA_LOG_LEVEL", "INFO"))
    try:
        cfg = load_config(a.config, a.sets)
        data = shards_location(a.data, cfg)
        ignore_sigterm_after_the_job()  # as a module: see _interrupted_module_exit
        res = run_pretrain(cfg, data)
    except PretrainInterrupted as err:  # `ray job stop`, a pod stopping, Ctrl-C: as `radjepa`
        if process_ends_with_job():
            _interrupted_module_exit(f"error: {err}")
        sys.stderr.write(f"error: {err}\n")
        sys.exit(130)
    except (ConfigError, PretrainError, ClusterError) as err:  # the user's: one line, as `radjepa`
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)
    except RayStartTimeout as err:  # a loaded machine, not the user's mistake: as `radjepa`
        sys.stderr.write(f"error: {err}\n")
        sys.exit(1)
    log.info("checkpoint: %s", res.checkpoint)


def _interrupted_module_exit(message: str) -> NoReturn:
    """``python -m pipelines.pretrain`` interrupted: exit 130 with ``message`` last, as the CLI
    does (``cli._exit_now``). It exited 2, the code of a usage error, since the interruption is
    a PretrainError. SIGTERM was ignored before the run began (the run puts back the handler it
    found): a second one, in the moment after the run, ended the process before its last
    line."""
    from pipelines.runtime import exit_after_interruption

    exit_after_interruption(130, lambda: sys.stderr.write(f"{message}\n"))


if __name__ == "__main__":
    from pipelines.runtime import declare_process_ends_with_job

    declare_process_ends_with_job()  # an in-process caller of main() keeps its SIGTERM handler
    main()

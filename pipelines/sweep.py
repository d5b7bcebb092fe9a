"""Ray Tune sweeps over dotted config keys, ranked by a metric that is comparable across trials.

Imported lazily by the CLI (it pulls in Ray Tune). The JEPA loss cannot rank trials: its scale
depends on the mask settings being swept. Trials are ranked instead by RankMe of target-encoder
embeddings on a fixed image set (label-free), or by kNN AUROC on a labelled set when one is given.
Each trial is a driver function that runs one TorchTrainer (the Ray Train V2 pattern); its reports
reach Tune via TuneReportCallback.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.divergence import DIVERGED
from pipelines.placement_groups import release_orphaned_placement_groups
from pipelines.sweep_checkpoints import Tidied, delete_other_trials_checkpoints, human_size
from pipelines.sweep_search import (
    CollapseStopper,
    DivergedIsWorst,
    DrawnSettings,
    FreeStoppedTrials,
    is_collapsed,
    search_space,
    tune_scheduler,
    tune_searcher,
)
from pipelines.sweep_settings import check_sweep_dir, keep_sweep_config, saved_trials
from pipelines.sweep_shards import keep_shards, sweep_shards
from pipelines.sweep_tracking import end_sweep_runs, parent_run, record_sweep
from radjepa import locations
from radjepa.config import Config, ConfigError, config_to_yaml
from radjepa.log_filters import lines_dropped, redact_log_records
from radjepa.search_space import distinct_draws, swept_configs, trial_config
from radjepa.training_data import ShardSummary

log = logging.getLogger(__name__)

# a sweep started before the searchers moved to pipelines.sweep_search saved its Tune state
# (tune/tuner.pkl) naming them pipelines.sweep.<class>: its --resume unpickles them from here
PICKLED_BY_EARLIER_SWEEPS = (DivergedIsWorst, DrawnSettings)

# Tune's own advice after an interrupted fit, a Python call (Tuner.restore(...)) a few lines
# above the CLI's last line, which says to re-run with --resume: two instructions for one thing
_TUNE_LOGGER = "ray.tune.tune"
_TUNE_RESUME_ADVICE = "Experiment has been interrupted, but the most recent state was saved."

COLLAPSED = "collapsed"
STOPPED = "stopped early"
INCOMPLETE = "incomplete"
# its loss or weights became non-finite: it ended (no retry repeats it), unranked
DIVERGED_STATUS = "diverged"


class SweepError(RuntimeError):
    """A problem with the sweep's inputs, phrased for the user."""


class SweepInterrupted(SweepError):
    """Ctrl-C or SIGTERM stopped the sweep; it is resumable (the CLI exits 130, as an
    interrupted pretrain or ingest does)."""


def _resumable(name: str) -> str:
    return f"the sweep is resumable: re-run the same command with --resume to continue '{name}'"


@dataclass(frozen=True)
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    metric: float | None
    status: str
    steps: int | None
    checkpoint: str | None
    error: str | None = None  # why the trial failed, in one line (status "error")


@dataclass(frozen=True)
class SweepResult:
    sweep_dir: str
    metric: str
    trials: list[TrialRow]
    best: TrialRow | None
    best_config_path: str | None
    parent_run_id: str | None
    tracking_uri: str | None
    tidied: Tidied | None = None  # the other trials' checkpoints deleted after the sweep


def planned_trials(cfg: Config) -> int:
    """The trials a new sweep runs: Tune's count, each grid point times the samples asked for
    (a grid search asks for one sample, so its points each run once)."""
    points = math.prod(
        len(dim.values or [])
        for dim in cfg.tune.search_space.values()
        if dim.type == "grid" or (cfg.tune.search_alg == "grid" and dim.type == "choice")
    )
    return points * cfg.tune.sample_count


def _probe_set(cfg: Config) -> dict[str, Any] | None:
    """The labelled images for the supervised objectives, decoded exactly as ingest does."""
    if cfg.tune.metric == "rankme":
        return None
    if not cfg.tune.labels_csv or not cfg.tune.label_column:
        raise SweepError(
            f"tune.metric={cfg.tune.metric} needs tune.labels_csv and tune.label_column"
        )
    from radjepa.eval.features import DatasetError, load_csv_dataset
    from radjepa.eval.retrieval import retrieval_ok

    ing = cfg.ingest
    try:
        ds = load_csv_dataset(
            cfg.tune.labels_csv,
            label_cols=[cfg.tune.label_column],
            size=ing.image_size,
            dtype=ing.dtype,
            window_percentiles=tuple(ing.window_percentiles),
            reject_burned_in=ing.burned_in_annotation == "quarantine",
            reject_for_processing=ing.for_processing == "quarantine",
        )
    except DatasetError as err:
        # a missing file or column escaped as a traceback; its advice names eval's --label,
        # which here is tune.label_column
        why = str(err).replace("--label ", "tune.label_column=")
        why = why.replace(" (the label is reported and served under that name)", "")
        raise SweepError(
            f"tune.metric={cfg.tune.metric} cannot use tune.labels_csv={cfg.tune.labels_csv} "
            f"with tune.label_column={cfg.tune.label_column}: {why}"
        ) from None
    labels = np.asarray(ds.labels[:, 0] if np.ndim(ds.labels) == 2 else ds.labels)
    groups = np.asarray(ds.groups)
    if not retrieval_ok(labels, groups):
        # every trial would fail at its first report (or rank on a number fixed by the data):
        # said once, before any trial starts
        patients = [len(np.unique(groups[labels == c])) for c in (1, 0)]
        raise SweepError(
            f"tune.metric={cfg.tune.metric} cannot rank trials on tune.label_column="
            f"{cfg.tune.label_column} of {cfg.tune.labels_csv}: its positives come from "
            f"{patients[0]} patient(s) and its negatives from {patients[1]}, and each class "
            "needs at least 2 (scores are taken across patients)"
        )
    if cfg.tune.metric == "probe_auroc":
        from radjepa.eval.linear_probe import grouped_folds, one_class_fold

        # the probe's folds depend on the labels, the patients and probe.seed alone: one that
        # trains on one class skips the label at every report of every trial (the metric NaN,
        # the sweep ended without a best after spending all its compute)
        folds = grouped_folds(labels, groups, folds=cfg.probe.folds, seed=cfg.probe.seed)
        why = one_class_fold(labels, groups, folds)
        if why is not None:
            raise SweepError(
                f"tune.metric=probe_auroc cannot rank trials on tune.label_column="
                f"{cfg.tune.label_column} of {cfg.tune.labels_csv}: {why}; another probe.seed "
                "splits the patients otherwise, or use tune.metric=knn_auroc"
            )
    return {"images": ds.images, "labels": labels, "groups": groups}


def _check_space(cfg: Config) -> list[tuple[str, Config]]:
    """Every swept key must exist and the settings the trials can get must validate, before
    any trial (``radjepa.search_space``, which ``radjepa config validate`` checks too);
    returns each setting checked (said, and its trial's config) for :func:`_check_masks`,
    which draws their masks once the shards were found. A random search over choices is
    checked on its draws, in ``_run_sweep``, where they are made."""
    space = cfg.tune.search_space
    if not space:
        raise SweepError("tune.search_space is empty: nothing to sweep")
    if distinct_draws(cfg) is not None:
        return []
    try:
        return swept_configs(cfg)
    except ConfigError as err:
        raise SweepError(str(err)) from None


def _trial_config(cfg: Config, setting: dict[str, Any]) -> tuple[str, Config]:
    """:func:`radjepa.search_space.trial_config`, refused as a SweepError."""
    try:
        return trial_config(cfg, setting)
    except ConfigError as err:
        raise SweepError(str(err)) from None


def _check_masks(trials: list[tuple[str, Config]], masks_checked: set[str]) -> None:
    """Refuse a trial whose masks cannot be drawn on its model's grid, as pretrain would at
    its start (``radjepa.masks.check_trial_masks``)."""
    from radjepa.masks import MasksUnsatisfiable, check_trial_masks

    try:
        check_trial_masks(trials, masks_checked)
    except MasksUnsatisfiable as err:
        raise SweepError(str(err)) from None


def _trial(params: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: apply the sampled overrides, then run one TorchTrainer."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.divergence import clear_divergence, read_divergence
    from pipelines.pretrain import build_trainer
    from pipelines.pretrain_tracking import start_tracking
    from pipelines.restore import resume_loop_config
    from radjepa.resume import find_resume_point

    redact_log_records()  # a trial's lines (a damaged checkpoint skipped) name its storage
    ctx = ray.tune.get_context()
    trial_id = ctx.get_trial_id()
    base = Config.model_validate(setup["config"])
    cfg = base.with_overrides({**params, "train.run_name": f"trial-{trial_id}"})
    storage = setup["trials_dir"]
    tracking = None
    if setup.get("parent_run_id"):
        run_id, uri = start_tracking(
            cfg,
            setup["tracking_root"],
            locations.join_location(storage, cfg.train.run_name),
            parent_run_id=setup["parent_run_id"],
            uri=setup["tracking_uri"],
            tags={"radjepa.job": "sweep-trial", "radjepa.trial_id": trial_id},
            provenance=setup.get("provenance"),
        )
        tracking = {"run_id": run_id, "uri": uri}
    run_dir = locations.join_location(storage, cfg.train.run_name)
    # a trial run again (--resume) reads the shards in another order from its resume step, as
    # a re-run pretrain does: it replayed its first attempt's order
    resume = find_resume_point(cfg, run_dir)
    trainer = build_trainer(
        cfg,
        setup["data"],
        storage=storage,
        tracking=tracking,
        callbacks=[TuneReportCallback()],
        # the driver's pick, as pretrain's: Ray's offer of a damaged checkpoint failed every
        # attempt of the trial, and every later --resume
        extra_loop_config={
            "probe_set": setup.get("probe_set"),
            **resume_loop_config(run_dir, resume),
        },
        start_step=resume.step if resume is not None else 0,
        files=setup.get("files") or (),
    )
    clear_divergence(run_dir)  # a resumed trial's earlier attempt
    trainer.fit()
    if tracking:  # its radjepa.status tag is set by the driver, which sees every trial
        from pipelines.tracking import client as tracking_client
        from pipelines.tracking_runs import end_run

        client = tracking_client(tracking["uri"])
        diverged = read_divergence(run_dir)
        if diverged is not None:
            client.set_tag(tracking["run_id"], "radjepa.diverged_at_step", str(diverged["step"]))
            client.set_tag(tracking["run_id"], "radjepa.diverged", str(diverged[DIVERGED]))
        end_run(client, tracking["run_id"], "FINISHED" if diverged is None else "FAILED")


def _rows(
    grid: Any, metric: str, floors: tuple[float, float], root: str, steps: int
) -> list[TrialRow]:
    rows = []
    for res in grid:
        m = res.metrics or {}
        params = {k: v for k, v in (res.config or {}).items()}
        value = m.get(metric)
        diverged = m.get(DIVERGED)
        if res.error is not None:
            status = "error"
        elif diverged:
            status = DIVERGED_STATUS  # ended, as a collapsed trial does: nothing to resume
        elif m.get("step") is None:
            status = INCOMPLETE  # never reported (the sweep was interrupted before it did)
        elif is_collapsed(m, *floors):
            status = COLLAPSED
        elif m.get("step") is not None and m["step"] < params.get("train.steps", steps):
            status = STOPPED  # ASHA cut it short: its metric is from fewer steps than the rest
        else:
            status = "ok"
        # TuneReportCallback reports the Train checkpoint as a filesystem path in the metrics
        ckpt_path = res.checkpoint.path if res.checkpoint is not None else m.get("checkpoint_path")
        ckpt = locations.spell_like(root, ckpt_path) if ckpt_path else None
        rows.append(
            TrialRow(
                trial_id=str(m.get("trial_id") or Path(res.path).name),
                params=params,
                metric=float(value) if value is not None and math.isfinite(value) else None,
                status=status,
                steps=m.get("step"),
                checkpoint=ckpt,
                error=_failure_reason(res.error)
                if res.error is not None
                else (f"diverged at step {m.get('step')}: {diverged}" if diverged else None),
            )
        )
    return rows


def _failure_reason(err: BaseException) -> str:
    """One line for a failed trial: the exception that ended its training worker (Tune hands
    over the trial actor's error, whose text is the whole remote traceback; the table only
    said "error", and the reason was in a file under /tmp/ray on the head node)."""
    from pipelines.runtime import rank_failure, remote_error_message

    failures = getattr(getattr(err, "cause", err), "worker_failures", None) or {}
    if failures:  # Ray Train's WorkerGroupError: each failed rank's own exception
        return rank_failure(failures[min(failures)])
    return remote_error_message(err) or type(err).__name__


def _best(rows: list[TrialRow]) -> TrialRow | None:
    """The best trial that ran to the end; trials ASHA stopped early only when none did
    (their metric comes from fewer steps, so it is not comparable with the finished ones)."""
    for wanted in ("ok", STOPPED):
        done = [r for r in rows if r.status == wanted and r.metric is not None]
        if done:
            return max(done, key=lambda r: r.metric)
    return None


def run_sweep(
    cfg: Config, data: str, *, num_samples: int | None = None, resume: bool = False
) -> SweepResult:
    """Run (or, with ``resume``, continue) the sweep named ``cfg.tune.name``.

    Ctrl-C or SIGTERM (``radjepa jobs stop``, a pod stopping) raises :class:`SweepInterrupted`.
    SIGTERM goes the Ctrl-C way from before ray.init to the end (during ``fit``, to Tune's
    SIGINT handler, which saves the sweep's state and stops the trials), and the caller's
    SIGINT and SIGTERM handlers are put back however it ends. Routed only around ``fit``,
    ray.init's own SIGTERM handler (``sys.exit``) stayed installed after the sweep for an
    in-process caller, and a SIGTERM while Ray started exited 15 from wherever it landed."""
    from pipelines.runtime import sigterm_as_ctrl_c

    # once: a supervisor repeating its SIGTERM must not cut short Tune's saving of the sweep's
    # state or the KILLED marks of its runs (a second Ctrl-C still can, as a user who insists
    # expects)
    with sigterm_as_ctrl_c(once=True):
        try:
            return _run_sweep(cfg, data, num_samples=num_samples, resume=resume)
        except KeyboardInterrupt:  # before the first trial: reading shards, starting Ray, ...
            # (those during and after the trials are said in _run_sweep); it escaped as a bare
            # KeyboardInterrupt, which the CLI ended with exit 130 and no last line
            raise SweepInterrupted(_interrupted_before_trials(cfg.tune.name)) from None


def _run_sweep(cfg: Config, data: str, *, num_samples: int | None, resume: bool) -> SweepResult:
    from pipelines.pretrain import PretrainError, prepare_outputs
    from radjepa.training_data import TrainingDataError, with_stored_decode

    if num_samples not in (None, 1) and not resume and cfg.tune.search_alg == "grid":
        # said as the config says tune.num_samples (Tune would repeat each point; the sweep
        # ran each once and dropped the flag in silence)
        raise SweepError(
            f"--num-samples {num_samples} does not apply to search_alg=grid, which runs each "
            "point once: leave it out, or add train.seed to tune.search_space as a grid to "
            "repeat each point with other seeds"
        )
    checked = _check_space(cfg)
    try:  # a resume trains on the images the sweep started on, not on what the folder holds
        info = sweep_shards(cfg, data, resume)
        cfg = with_stored_decode(cfg, info)
    except TrainingDataError as err:
        raise SweepError(str(err)) from None
    masks_checked: set[str] = set()
    _check_masks(checked, masks_checked)  # seconds per mask section: after a --data typo's line
    given = cfg  # what best.yaml starts from (a trial's adjustments below are not the user's)
    if cfg.train.num_workers == 0:
        # trials run side by side, so the cluster is shared out by trials, not by ranks
        log.info("train.num_workers=0 in a sweep: one worker per trial")
        cfg = cfg.with_overrides({"train.num_workers": 1})
    if num_samples is not None and resume:
        log.warning("--num-samples is ignored with --resume: the sweep keeps its trials")
    elif num_samples is not None:
        cfg = cfg.with_overrides({"tune.num_samples": num_samples})
    draws = None if resume else distinct_draws(cfg)
    if draws is not None:  # each setting a trial will get, where the check above sampled
        _check_masks([_trial_config(cfg, setting) for setting in draws], masks_checked)
    if draws is not None and len(draws) < cfg.tune.sample_count:
        log.warning(
            "tune.num_samples=%d but the search space holds %d settings: each runs once "
            "(a repeat would train the same model again)",
            cfg.tune.sample_count,
            len(draws),
        )
        cfg = cfg.with_overrides({"tune.num_samples": len(draws)})
    if not resume:
        log.info(
            "sweep %s: %d trials (%s search)",
            cfg.tune.name,
            planned_trials(cfg),
            cfg.tune.search_alg,
        )
    probe_set = _probe_set(cfg)
    try:
        root = prepare_outputs(cfg)
    except PretrainError as err:
        raise SweepError(str(err)) from None
    cfg, sweep_dir, provenance, (parent_run_id, uri) = _prepare_sweep(cfg, data, info, root, resume)
    floors = (cfg.tune.collapse_rankme, cfg.tune.collapse_feature_std)
    try:  # from the parent run's existence on: an interruption ends it KILLED, not RUNNING
        setup = {
            "config": cfg.model_dump(mode="json"),
            "data": locations.absolute(data),
            "files": list(info.files),  # every trial trains on the shards inspected here
            "trials_dir": locations.join_location(sweep_dir, "trials"),
            "tracking_root": root,
            "parent_run_id": parent_run_id,
            "tracking_uri": uri,
            "probe_set": probe_set,
            "provenance": provenance,
        }
        planned = _planned(cfg, sweep_dir, resume)
        sigint = signal.getsignal(signal.SIGINT)
        with lines_dropped(_TUNE_LOGGER, _TUNE_RESUME_ADVICE) as advice:
            grid = _tuner(cfg, sweep_dir, setup, floors, resume).fit()
        _put_back(sigint)
        _free_last_trials()
        rows = _rows(grid, cfg.tune.metric, floors, root, cfg.train.steps)
        # Ctrl-C makes fit() return, not raise, and a "best" would be a partial sweep's; Tune
        # says it was interrupted only in the advice dropped above, which is what counts the
        # trials it never made
        interrupted = advice.dropped > 0
        never_made = _never_made(planned, len(grid)) if interrupted else 0
        tune_dir = locations.join_location(sweep_dir, "tune")
        unfinished = _unfinished(grid, tune_dir, interrupted) + never_made
        best = _best(rows) if not unfinished else None
        best_path, best_yaml = (
            _write_best(given, cfg, best, sweep_dir, setup["data"]) if best else (None, None)
        )
        not_recorded = None
        if parent_run_id and not unfinished:
            not_recorded = record_sweep(uri, parent_run_id, rows, best, best_yaml, cfg.tune.metric)
        if unfinished:  # in the try: a second signal while the runs are ended is said the same
            end_sweep_runs(uri, parent_run_id, "KILLED")
            if not len(grid) and not resume:  # the same command starts it again
                _forget_if_empty(tune_dir)
                raise SweepInterrupted(_interrupted_before_trials(cfg.tune.name))
            raise SweepInterrupted(
                f"sweep '{cfg.tune.name}' was interrupted with {unfinished} of "
                f"{len(grid) + never_made} trials unfinished (no best.yaml was written); "
                f"{_resumable(cfg.tune.name)}"
            )
    except SweepInterrupted:
        raise
    except (KeyboardInterrupt, SystemExit):
        # a second Ctrl-C or SIGTERM, while Tune stops the trials after the first, raises;
        # so does one outside Tune's loop (a SystemExit from a handler of Ray's): resumable
        # all the same, and said as a first one is, without the exit code Ray's handler chose
        # (meaningless to the user, as in pretrain's)
        try:
            end_sweep_runs(uri, parent_run_id, "KILLED")
            before = not resume and _forget_if_empty(locations.join_location(sweep_dir, "tune"))
        except KeyboardInterrupt:  # pressed again as the runs were ended: resumable still
            before = False
        if before:
            raise SweepInterrupted(_interrupted_before_trials(cfg.tune.name)) from None
        raise SweepInterrupted(
            f"sweep '{cfg.tune.name}' was interrupted; {_resumable(cfg.tune.name)}"
        ) from None
    except BaseException:
        end_sweep_runs(uri, parent_run_id, "FAILED")  # its runs must not look alive
        raise
    try:
        rows, tidied = _tidy_checkpoints(cfg, rows, best, setup["trials_dir"])
    except KeyboardInterrupt:
        written = f" (best config: {best_path})" if best_path else ""
        raise SweepInterrupted(
            f"sweep '{cfg.tune.name}' finished{written} but was interrupted while deleting "
            f"the other trials' checkpoints: some are left under {setup['trials_dir']}"
        ) from None
    if not_recorded:
        done = f"finished (best config: {best_path})" if best_path else "ended without a best trial"
        raise SweepError(
            f"sweep '{cfg.tune.name}' {done} but recording it in MLflow failed: {not_recorded}; "
            "re-run the same command with --resume to record it"
            + (
                f" (it also retries the {errored} failed trial(s))"
                if (errored := sum(r.status == "error" for r in rows))
                else ""
            )
        )
    return SweepResult(
        sweep_dir, cfg.tune.metric, rows, best, best_path, parent_run_id, uri, tidied
    )


def _prepare_sweep(
    cfg: Config, data: str, info: ShardSummary, root: str, resume: bool
) -> tuple[Config, str, dict[str, str], tuple[str | None, str | None]]:
    """The sweep's folder checked, Ray started and checked, its provenance and its MLflow
    parent run: (``cfg`` for this cluster, the sweep's folder, provenance, (parent run id,
    tracking URI)), the run ``(None, None)`` without tracking. An interruption here leaves
    nothing to resume (the Tuner has not started)."""
    from pipelines.tracking import provenance_tags

    sweep_dir = locations.join_location(root, cfg.tune.name)
    check_sweep_dir(cfg, sweep_dir, resume)  # files only: said before Ray's seconds of start
    keep_sweep_config(cfg, data, sweep_dir, resume)
    keep_shards(sweep_dir, data, info)  # what --resume trains on again
    cfg = _start_ray(cfg)
    provenance = provenance_tags(data, info.rows, info.fingerprint)
    try:
        parent = (
            parent_run(cfg, root, sweep_dir, resume, provenance)
            if cfg.tracking.enabled
            else (None, None)
        )
    except SweepError:
        raise
    except Exception as err:  # an unreachable server, a store that cannot be opened, ...
        # one line, as pretrain says it: the CLI only turns SweepError into a message
        raise SweepError(
            f"cannot record the sweep in MLflow: {type(err).__name__}: {err}"
        ) from None
    return cfg, sweep_dir, provenance, parent


def _start_ray(cfg: Config) -> Config:
    """Start (or join) Ray and check that a trial fits it: ``cfg`` with ``tune.max_concurrent``
    resolved for this cluster. Refused before any trial, which would wait forever for GPUs
    the cluster does not have, or for CPUs a local instance never gets."""
    from pipelines.runtime import (
        ClusterResourceError,
        check_trial_fits_locally,
        ensure_ray,
        max_parallel_trials,
        resolve_use_gpu,
    )

    ensure_ray()
    try:
        use_gpu = resolve_use_gpu(cfg.train.use_gpu)
        check_trial_fits_locally(cfg.train.num_workers, cfg.train.cpus_per_worker, use_gpu)
    except ClusterResourceError as err:
        raise SweepError(str(err)) from None
    if not cfg.tune.max_concurrent:
        parallel = max_parallel_trials(cfg.train.num_workers, cfg.train.cpus_per_worker, use_gpu)
        log.info("tune.max_concurrent=0: %d trials at a time on this cluster", parallel)
        cfg = cfg.with_overrides({"tune.max_concurrent": parallel})
    return cfg


def _tidy_checkpoints(
    cfg: Config, rows: list[TrialRow], best: TrialRow | None, trials_dir: str
) -> tuple[list[TrialRow], Tidied | None]:
    """After a sweep that left no trial unfinished: with ``tune.trial_checkpoints=best``,
    delete every checkpoint but the best trial's (see :mod:`pipelines.sweep_checkpoints`), and
    drop the deleted paths from the rows. Kept while a trial failed, since ``--resume``
    restarts it from its checkpoint; kept without a best trial, with nothing to choose. Never
    raises: the sweep's result stands whatever the cleanup meets."""
    if cfg.tune.trial_checkpoints == "all" or best is None:
        return rows, None
    failed = sum(r.status == "error" for r in rows)
    if failed:
        log.info(
            "kept every trial's checkpoints: %d trial(s) failed, and `--resume` restarts them "
            "from theirs (a resumed sweep that ends without failures deletes the others')",
            failed,
        )
        return rows, None
    try:
        tidied = delete_other_trials_checkpoints(
            trials_dir, [r.trial_id for r in rows], best.trial_id
        )
    except Exception as err:  # noqa: BLE001 - a cleanup; the sweep itself succeeded
        log.warning("could not delete the other trials' checkpoints in %s: %s", trials_dir, err)
        return rows, None
    if tidied is None:
        return rows, None
    if tidied.folders:
        log.info(
            "deleted %d checkpoint(s) of %d trial(s) other than the best (%s), freeing %s; "
            "tune.trial_checkpoints=all keeps them",
            tidied.folders,
            tidied.trials,
            best.trial_id,
            human_size(tidied.freed_bytes),
        )
    rows = [r if r.trial_id == best.trial_id else replace(r, checkpoint=None) for r in rows]
    return rows, tidied


def _free_last_trials(wait_s: float = 10.0) -> None:
    """Trials stopped last free their resources only after ``fit`` returns (their controllers
    die after their trial's actor): wait for that, a few seconds at most, so that what runs
    next in this process (the demo's probe and server) gets the whole cluster."""
    deadline = time.monotonic() + wait_s
    while release_orphaned_placement_groups()[1] and time.monotonic() < deadline:
        time.sleep(0.5)


def _interrupted_before_trials(name: str) -> str:
    return f"sweep '{name}' was interrupted before its trials started; re-run the same command"


def _forget_if_empty(tune_dir: str) -> bool:
    """Remove what this run's Tune saved of the sweep when it holds no trial (interrupted
    before Tune's loop made one), and say whether it did: Tune cannot restore such a sweep, a
    new one of the name was refused while it was there, and, this run's own, no other run is
    using it. A storage error leaves it (said resumable, which ``--resume`` then checks)."""
    try:
        if saved_trials(tune_dir)[1] != 0:
            return False
        fs, path = locations.filesystem(tune_dir)
        fs.delete_dir(path)
    except OSError as err:
        log.warning("could not read or remove the state of %s: %s", tune_dir, err)
        return False
    return True


# in the sweep's folder: the trials a new sweep plans, which a resumed one counts its own by
_PLANNED_FILE = "planned_trials.json"


def _planned(cfg: Config, sweep_dir: str, resume: bool) -> int | None:
    """The trials the sweep plans (:func:`planned_trials` when it was started; None where a
    resumed sweep's start did not save it). Tune makes its trials as its loop steps, one at a
    time where a searcher is limited to ``tune.max_concurrent``: a sweep interrupted between
    two trials held only finished ones, and ended as finished with its best of those."""
    path = locations.join_location(sweep_dir, _PLANNED_FILE)
    if not resume:
        n = planned_trials(cfg)
        locations.write_text(path, json.dumps({"trials": n}))
        return n
    try:
        saved = json.loads(locations.read_text(path) or "null")
        return int(saved["trials"])
    except (ValueError, KeyError, TypeError):
        return None


def _never_made(planned: int | None, made: int) -> int:
    """The trials an interrupted sweep never made; where the count was not saved (a sweep
    started by an earlier version), one when Tune made none."""
    if planned is None:
        return 0 if made else 1
    return max(planned - made, 0)


def _put_back(handler: Any) -> None:
    """Put back the SIGINT handler found before Tune's fit: Tune leaves its own after a sweep
    nobody interrupted, and a Ctrl-C or SIGTERM while the driver wrote the results, recorded
    them in MLflow or deleted checkpoints (minutes on an object store) only made it say it was
    ending a Tune run long over."""
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)


def _unfinished(grid: Any, tune_dir: str, interrupted: bool) -> int:
    """Trials that did not finish. After Ctrl-C, Tune saves its state (the running trials as
    RUNNING, which ``--resume`` continues) and then stops those trials, which the returned grid
    lists as TERMINATED like finished ones: so read the saved state, not the grid, which after
    an interruption (Tune said so) counts at least one."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    try:
        trials = ExperimentAnalysis(tune_dir).trials
    except Exception as err:  # noqa: BLE001 - fall back to what the grid says
        log.warning("cannot read the sweep state at %s: %s", tune_dir, err)
        left = len(grid) - grid.num_terminated - grid.num_errors
        return max(left, 1) if interrupted else left
    left = sum(t.status not in (Trial.TERMINATED, Trial.ERROR) for t in trials)
    # a state older than the grid (Tune's last save after the interruption failed, which it
    # only logs) lacks the trials made since: unfinished too
    return left + (max(len(grid) - len(trials), 0) if interrupted else 0)


def _tuner(
    cfg: Config, sweep_dir: str, setup: dict[str, Any], floors: tuple[float, float], resume: bool
) -> Any:
    """A new Tuner, or with ``resume`` the one restored from ``sweep_dir/tune``."""
    import ray.tune

    metric, mode = cfg.tune.metric, "max"
    trainable = ray.tune.with_parameters(_trial, setup=setup)
    # the trial driver only waits on its TorchTrainer: a fraction of a CPU is enough
    trainable = ray.tune.with_resources(trainable, {"CPU": 0.25})
    tune_dir = locations.join_location(sweep_dir, "tune")
    if resume:  # check_sweep_dir made sure there is a sweep to restore
        return ray.tune.Tuner.restore(
            tune_dir, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    scheduler = tune_scheduler(cfg, metric, mode)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    search, cap = tune_searcher(cfg, metric, mode), cfg.tune.max_concurrent or None
    return ray.tune.Tuner(
        trainable,
        param_space=search_space(cfg.tune.search_space, cfg.tune.search_alg),
        tune_config=ray.tune.TuneConfig(
            num_samples=cfg.tune.sample_count,
            search_alg=search,
            scheduler=scheduler,
            max_concurrent_trials=None if isinstance(search, BasicVariantGenerator) else cap,
            metric=None if scheduler else metric,
            mode=None if scheduler else mode,
        ),
        run_config=ray.tune.RunConfig(
            name="tune",
            storage_path=sweep_dir,
            stop=CollapseStopper(*floors),
            callbacks=[FreeStoppedTrials()],
        ),
    )


def _write_best(
    given: Config, cfg: Config, best: TrialRow, sweep_dir: str, data: str
) -> tuple[str, str]:
    """``best.yaml``: the user's config with the best trial's values, a whole pretrain job."""
    best_cfg = given.with_overrides(
        {
            **best.params,
            "train.run_name": f"{cfg.tune.name}-best",
            "tune.search_space": {},
            "data.shards": data,  # `radjepa pretrain -c best.yaml` needs no --data
        }
    )
    best_path = locations.join_location(sweep_dir, "best.yaml")
    text = (
        f"# best trial {best.trial_id} of sweep {cfg.tune.name}: "
        f"{cfg.tune.metric}={best.metric:.4f}\n"
        f"# checkpoint: {best.checkpoint}\n" + config_to_yaml(best_cfg)
    )
    locations.write_text(best_path, text)
    return best_path, text

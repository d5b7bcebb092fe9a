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
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune import Callback
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from pipelines.placement_groups import release_orphaned_placement_groups
from pipelines.pretrain import DIVERGED
from pipelines.sweep_checkpoints import Tidied, delete_other_trials_checkpoints, human_size
from radjepa import locations
from radjepa.config import Config, ConfigError, SearchDim, config_to_yaml
from radjepa.log_filters import lines_dropped, redact_log_records
from radjepa.resume import NOT_THE_MODEL, RESUME_GUARDED
from radjepa.search_space import distinct_draws, swept_configs, trial_config
from radjepa.training_data import ShardSummary

log = logging.getLogger(__name__)

# Tune's own advice after an interrupted fit, a Python call (Tuner.restore(...)) a few lines
# above the CLI's last line, which says to re-run with --resume: two instructions for one thing
_TUNE_LOGGER = "ray.tune.tune"
_TUNE_RESUME_ADVICE = "Experiment has been interrupted, but the most recent state was saved."

# the parent run's artifact listing every trial: settings, metric, status, why it failed
TRIALS_FILE = "trials.json"
# in the sweep's folder: the settings its trials train with, which --resume must keep
SWEEP_CONFIG_FILE = "sweep_config.json"
# What decides what a sweep's trials learn and how they are ranked: a --resume with another value
# of one of these would rank trials trained or scored two ways. A list of what matters, so that
# the rest may change, as a pretrain resume lets it: how fast trials run and are fed
# (ingest.decode_actors, train.data_loader_threads, train.compile, model.attention), what they
# keep and log, the cluster's share, where outputs go. tune.num_samples is left out too: a
# resume ignores it (Tune keeps its trials), and a new sweep sets it from --num-samples and from
# its distinct draws, which a resume does not, so comparing it refused such a sweep's resume.
_SWEEP_COMPARED = (
    *RESUME_GUARDED,  # the optimisation, as a pretrain resume guards it
    "model.",  # the network (but NOT_THE_MODEL: drop-path is guarded above, attention a kernel)
    "data.",  # data.shards is compared as the location the trials read ("data")
    "train.steps",
    "train.num_workers",  # ranks per trial: with train.batch_size, the global batch
    "train.checkpoint_every",  # the steps trials report at, where ASHA compares them
    # the probe set the supervised metrics score on, decoded as the shards were stored
    "ingest.image_size",
    "ingest.dtype",
    "ingest.window_percentiles",
    # which trials run, what ranks them, and which count as collapsed or stopped early
    "tune.search_space",
    "tune.search_alg",
    "tune.metric",
    "tune.asha",
    "tune.grace_period",
    "tune.collapse_rankme",
    "tune.collapse_feature_std",
)
# what each supervised metric scores a trial on, and how (radjepa.monitoring.quality_metrics):
# RankMe uses none of it, kNN AUROC no probe fit, the probe's AUROC no kNN
_LABELS = ("tune.labels_csv", "tune.label_column")
_LABELLED_SCORING = {
    "knn_auroc": (*_LABELS, "probe.knn_k", "probe.seed"),
    "probe_auroc": (*_LABELS, "probe.logreg_c", "probe.folds", "probe.seed"),
}
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


def search_space(dims: dict[str, SearchDim], alg: str) -> dict[str, Any]:
    """Tune's param space keyed by dotted config keys (grid dims become grid_search)."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, dim in dims.items():
        if dim.type == "grid" or (alg == "grid" and dim.type == "choice"):
            space[key] = tune.grid_search(list(dim.values or []))
        elif dim.type == "choice":
            space[key] = tune.choice(list(dim.values or []))
        elif dim.type == "uniform":
            space[key] = tune.uniform(dim.low, dim.high)
        elif dim.type == "loguniform":
            space[key] = tune.loguniform(dim.low, dim.high)
        else:
            space[key] = tune.randint(int(dim.low), int(dim.high))
    return space


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

    from pipelines.pretrain import (
        build_trainer,
        clear_divergence,
        read_divergence,
        resume_loop_config,
        start_tracking,
    )
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


def is_collapsed(metrics: dict[str, Any], rankme_floor: float, std_floor: float) -> bool:
    """Collapse as the monitors show it: effective rank near 1 (every image maps to a few
    directions) or per-dimension spread near 0 (every image maps to one point)."""
    rk, std = metrics.get("rankme"), metrics.get("feature_std")
    return (rk is not None and rk < rankme_floor) or (std is not None and std < std_floor)


class CollapseStopper(Stopper):
    """Stop a trial whose embeddings collapsed: more steps cannot rescue it, and its slot is
    better spent on another configuration."""

    def __init__(self, rankme_floor: float, std_floor: float) -> None:
        self.floors = (rankme_floor, std_floor)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return is_collapsed(result, *self.floors)

    def stop_all(self) -> bool:
        return False


class FreeStoppedTrials(Callback):
    """Frees, every few seconds of the sweep, the resources of trials Tune stopped (see
    :mod:`pipelines.placement_groups`): without it a local sweep with ASHA or the collapse
    stopper waited forever once stopped trials held the CPUs a new trial needed."""

    def __init__(self, every_s: float = 2.0) -> None:
        self.every_s = every_s
        self.last = 0.0

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            release_orphaned_placement_groups()


class DrawnSettings(Searcher):
    """Hands out settings drawn beforehand, one per trial (see :func:`distinct_draws`).

    Tune's variant generator cannot take them as its first points: it reads a list value, such
    as a ``masks.target_scale`` pair, as a path into the search space and fails.
    """

    def __init__(self, draws: list[dict[str, Any]]) -> None:
        super().__init__()
        self.draws = draws
        self.handed = 0

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec):
        return True  # the space was sampled up front; every key of it is in each draw

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.handed >= len(self.draws):
            return Searcher.FINISHED
        self.handed += 1
        return dict(self.draws[self.handed - 1])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        pass  # nothing adapts: the draws are fixed

    def get_state(self) -> dict[str, Any]:
        return {"draws": self.draws, "handed": self.handed}

    def set_state(self, state: dict[str, Any]) -> None:
        self.draws, self.handed = state["draws"], state["handed"]

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self.get_state()))

    def restore(self, checkpoint_path: str) -> None:
        self.set_state(json.loads(Path(checkpoint_path).read_text()))


class DivergedIsWorst(OptunaSearch):
    """Optuna, told that a diverged trial scored the worst value there is.

    A diverged trial's last report carries a NaN metric (the worker reports it as it stops;
    Tune and ASHA let it end there). Optuna refuses NaN in ``tell`` ("The value nan is not
    acceptable", a warning), so the trial stayed RUNNING in the study, and TPE, which learns
    from finished trials only, never learned that the region diverges. Told PRUNED instead
    (what Tune's OptunaSearch does for a result without the metric), TPE would rank it by its
    step among the pruned trials: one diverging late ranked ahead of trials ASHA cut early and
    could land in TPE's "good" group. So Optuna alone is told the trial completed at -inf
    (+inf when minimising), which it accepts and TPE sorts after every finite value; Tune and
    ASHA still see NaN, so the trial ends itself and tags its MLflow run diverged (an -inf
    there made ASHA stop the trial before it could)."""

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if result and result.get(DIVERGED) and not error:
            worst = -math.inf if self.mode == "max" else math.inf
            result = {**result, self.metric: worst}
        super().on_trial_complete(trial_id, result, error)


def _searcher(cfg: Config, metric: str, mode: str):
    """Optuna (:class:`DivergedIsWorst`); for an all-choice random search, the distinct draws;
    else Tune's variant generator seeded with ``train.seed`` (its default draws from numpy's
    global state, so reruns of one sweep tried different settings)."""
    if cfg.tune.search_alg == "optuna":
        return DivergedIsWorst(metric=metric, mode=mode, seed=cfg.train.seed)
    draws = distinct_draws(cfg)
    if draws is not None:
        return DrawnSettings(draws)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # a generator takes its concurrency cap itself: Tune ignores max_concurrent_trials for one
    return BasicVariantGenerator(
        max_concurrent=cfg.tune.max_concurrent, random_state=cfg.train.seed
    )


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
    from pipelines.runtime import first_line, remote_error_message

    failures = getattr(getattr(err, "cause", err), "worker_failures", None) or {}
    if failures:  # Ray Train's WorkerGroupError: each failed rank's own exception
        first = failures[min(failures)]
        text = first_line(str(first))
        return f"{type(first).__name__}: {text}" if text else type(first).__name__
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
            raise SweepInterrupted(
                f"sweep '{cfg.tune.name}' was interrupted before its trials started; re-run "
                "the same command"
            ) from None


def _run_sweep(cfg: Config, data: str, *, num_samples: int | None, resume: bool) -> SweepResult:
    from pipelines.pretrain import PretrainError, prepare_outputs
    from radjepa.training_data import TrainingDataError, inspect_shards, with_stored_decode

    if num_samples not in (None, 1) and not resume and cfg.tune.search_alg == "grid":
        # said as the config says tune.num_samples (Tune would repeat each point; the sweep
        # ran each once and dropped the flag in silence)
        raise SweepError(
            f"--num-samples {num_samples} does not apply to search_alg=grid, which runs each "
            "point once: leave it out, or add train.seed to tune.search_space as a grid to "
            "repeat each point with other seeds"
        )
    checked = _check_space(cfg)
    try:
        info = inspect_shards(data, cfg)
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
            "data": data if "://" in data else str(Path(data).expanduser().resolve()),
            "trials_dir": locations.join_location(sweep_dir, "trials"),
            "tracking_root": root,
            "parent_run_id": parent_run_id,
            "tracking_uri": uri,
            "probe_set": probe_set,
            "provenance": provenance,
        }
        with lines_dropped(_TUNE_LOGGER, _TUNE_RESUME_ADVICE):
            grid = _tuner(cfg, sweep_dir, setup, floors, resume).fit()
        _free_last_trials()
        rows = _rows(grid, cfg.tune.metric, floors, root, cfg.train.steps)
        # Ctrl-C makes fit() return, not raise, and a "best" would be a partial sweep's
        unfinished = _unfinished(grid, locations.join_location(sweep_dir, "tune"))
        best = _best(rows) if not unfinished else None
        best_path, best_yaml = (
            _write_best(given, cfg, best, sweep_dir, setup["data"]) if best else (None, None)
        )
        not_recorded = None
        if parent_run_id and not unfinished:
            not_recorded = _record_sweep(uri, parent_run_id, rows, best, best_yaml, cfg.tune.metric)
        if unfinished:  # in the try: a second signal while the runs are ended is said the same
            _end_sweep_runs(uri, parent_run_id, "KILLED")
            raise SweepInterrupted(
                f"sweep '{cfg.tune.name}' was interrupted with {unfinished} of {len(grid)} "
                f"trials unfinished (no best.yaml was written); {_resumable(cfg.tune.name)}"
            )
    except SweepInterrupted:
        raise
    except (KeyboardInterrupt, SystemExit):
        # a second Ctrl-C or SIGTERM, while Tune stops the trials after the first, raises;
        # so does one outside Tune's loop (a SystemExit from a handler of Ray's): resumable
        # all the same, and said as a first one is, without the exit code Ray's handler chose
        # (meaningless to the user, as in pretrain's)
        _end_sweep_runs(uri, parent_run_id, "KILLED")
        raise SweepInterrupted(
            f"sweep '{cfg.tune.name}' was interrupted; {_resumable(cfg.tune.name)}"
        ) from None
    except BaseException:
        _end_sweep_runs(uri, parent_run_id, "FAILED")  # its runs must not look alive
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
    _check_sweep_dir(cfg, sweep_dir, resume)  # files only: said before Ray's seconds of start
    _keep_sweep_config(cfg, data, sweep_dir, resume)
    cfg = _start_ray(cfg)
    provenance = provenance_tags(data, info.rows, info.fingerprint)
    try:
        parent = (
            _parent_run(cfg, root, sweep_dir, resume, provenance)
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


def _unfinished(grid: Any, tune_dir: str) -> int:
    """Trials that did not finish. After Ctrl-C, Tune saves its state (the running trials as
    RUNNING, which ``--resume`` continues) and then stops those trials, which the returned grid
    lists as TERMINATED like finished ones: so read the saved state, not the grid."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    try:
        trials = ExperimentAnalysis(tune_dir).trials
    except Exception as err:  # noqa: BLE001 - fall back to what the grid says
        log.warning("cannot read the sweep state at %s: %s", tune_dir, err)
        return len(grid) - grid.num_terminated - grid.num_errors
    return sum(t.status not in (Trial.TERMINATED, Trial.ERROR) for t in trials)


def _check_sweep_dir(cfg: Config, sweep_dir: str, resume: bool) -> None:
    """A new sweep needs a free name, ``--resume`` a sweep to restore: checked before the
    parent MLflow run is made or continued. Checked after it, each refused attempt left a
    FAILED parent run, and a new sweep started on a taken name replaced the sweep's parent run
    id with its own, so the ``--resume`` that followed continued that empty run while the
    trials it resumed stayed children of the original one (never closed by the driver)."""
    import ray.tune

    tune_dir = locations.join_location(sweep_dir, "tune")
    if resume and not ray.tune.Tuner.can_restore(tune_dir):
        raise SweepError(f"nothing to resume at {tune_dir}: run the sweep without --resume")
    if not resume and locations.has_entries(tune_dir):
        raise SweepError(
            f"sweep '{cfg.tune.name}' already exists at {sweep_dir}: pass --resume to "
            "continue it, or choose another tune.name"
        )


def _compared(key: str, cfg: Config) -> bool:
    """Whether a sweep's ``--resume`` compares the dotted ``key`` (see ``_SWEEP_COMPARED``)."""
    if key == "data.shards" or (key in NOT_THE_MODEL and not key.startswith(RESUME_GUARDED)):
        return False
    wanted = _SWEEP_COMPARED + _LABELLED_SCORING.get(cfg.tune.metric, ())
    return any(key.startswith(w) if w.endswith(".") else key == w for w in wanted)


def _sweep_settings(cfg: Config, data: str) -> dict[str, Any]:
    """The settings that decide what a sweep's trials learn and how they are ranked, dotted,
    credentials ``***`` (the file is plain text beside the checkpoints), and the location of
    the shards they read."""
    from radjepa.config import flatten

    kept = {k: v for k, v in flatten(cfg).items() if _compared(k, cfg)}
    if kept.get("tune.labels_csv"):  # read where the driver runs: the file, not the text typed
        kept["tune.labels_csv"] = _absolute(kept["tune.labels_csv"])
    return locations.redact_strings(json.loads(json.dumps({"data": _absolute(data), **kept})))


def _absolute(location: str) -> str:
    """A local path made absolute (a --resume from another folder reads other files by the same
    relative text); a URI as given."""
    return location if "://" in location else str(Path(location).expanduser().resolve())


def _keep_sweep_config(cfg: Config, data: str, sweep_dir: str, resume: bool) -> None:
    """Save a new sweep's settings; refuse a ``--resume`` with others, in one line naming the
    keys. Tune restores its own search space and trials, but the trials it had not started
    yet, and the ones it restarts, were built from the new config: a sweep resumed with
    another ``ema.end`` or ``train.steps`` compared trials trained two ways, in silence.
    ``train.allow_config_change`` lets it go on (warned), as it lets a pretrain run; a sweep
    started before the file existed is not checked."""
    path = locations.join_location(sweep_dir, SWEEP_CONFIG_FILE)
    now = _sweep_settings(cfg, data)
    saved_text = locations.read_text(path) if resume else None
    if not saved_text:
        locations.write_text(path, json.dumps(now, indent=1, sort_keys=True))
        return
    try:
        saved = json.loads(saved_text)
        if not isinstance(saved, dict):
            raise ValueError("not a mapping")
    except ValueError:  # cut short by a full disk or a kill as it was written
        log.warning("%s cannot be read: the settings are not compared, and are saved again", path)
        locations.write_text(path, json.dumps(now, indent=1, sort_keys=True))
        return
    # a sweep started by an earlier version saved every setting of its sections, as typed, and
    # none of probe.*: only what is compared now, and none of what it never held
    saved = {k: v for k, v in saved.items() if k == "data" or _compared(k, cfg)}
    if isinstance(saved.get("tune.labels_csv"), str):  # as typed, then
        saved["tune.labels_csv"] = _absolute(saved["tune.labels_csv"])
    held = any(k.startswith("probe.") for k in saved)
    changed = sorted(
        k
        for k in saved.keys() | now.keys()
        if saved.get(k) != now.get(k) and (held or not k.startswith("probe."))
    )
    if not changed:
        return
    said = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
    said += f" and {len(changed) - 8} more" if len(changed) > 8 else ""
    if not cfg.train.allow_config_change:
        raise SweepError(
            f"sweep '{cfg.tune.name}' was started with other settings ({said}): resume it "
            "with the config it started with, set train.allow_config_change=true to train its "
            f"remaining trials with the new ones, or choose another tune.name{_named(saved, now)}"
        )
    log.warning(
        "sweep %s resumes with changed settings (train.allow_config_change): %s",
        cfg.tune.name,
        said,
    )
    locations.write_text(path, json.dumps(now, indent=1, sort_keys=True))


def _named(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """What to say of a text label column an earlier version took as given (its positive: the
    second of its two values in sorted order) and this one needs named (``sex`` -> ``sex=M``)."""
    was, new = saved.get("tune.label_column"), now.get("tune.label_column")
    if not (isinstance(was, str) and isinstance(new, str)) or "=" in was:
        return ""
    if not new.startswith(f"{was}="):
        return ""
    return (
        f". The sweep started when a text column given alone took the second of its two "
        f"values in sorted order as positive: if {new.split('=', 1)[1]!r} is that value, the "
        "trials are ranked as before, and train.allow_config_change=true lets them go on"
    )


def _parent_run(
    cfg: Config, root: str, sweep_dir: str, resume: bool, provenance: dict[str, str]
) -> tuple[str, str]:
    """The sweep's MLflow parent run: created once, continued by ``--resume``."""
    from pipelines.tracking import client as tracking_client
    from pipelines.tracking import ensure_experiment, log_params, store_uri

    # the store pretrain uses (prepare_outputs made sure remote outputs have one configured)
    uri = store_uri(cfg, create=True)
    if uri is None:
        raise SweepError(f"no MLflow store for outputs at {root}: set tracking.uri")
    exp = ensure_experiment(uri, cfg.tracking.experiment, root)
    client = tracking_client(uri)
    id_file = locations.join_location(sweep_dir, "mlflow_parent_run_id")
    previous = locations.read_text(id_file) if resume else None
    if previous:
        from pipelines.pretrain import run_gone_message
        from pipelines.tracking_runs import RunGone, reopen

        try:
            reopen(client, previous.strip())  # RUNNING again, and no longer tagged as reaped
        except RunGone as err:
            raise SweepError(run_gone_message(err, id_file, uri)) from None
        return previous.strip(), uri
    run_id = client.create_run(
        exp, run_name=cfg.tune.name, tags={"radjepa.job": "sweep", **provenance}
    ).info.run_id
    try:
        log_params(run_id, uri, cfg)
        locations.write_text(id_file, run_id)
    except BaseException as err:
        # the sweep ends before its trials: the run it made must not stay RUNNING for good (a
        # Ctrl-C or SIGTERM here left it so, and without its id file no --resume finds it)
        from pipelines.tracking import mark_run

        interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))
        mark_run(uri, run_id, "KILLED" if interrupted else "FAILED")
        raise
    return run_id, uri


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
    if resume:  # _check_sweep_dir made sure there is a sweep to restore
        return ray.tune.Tuner.restore(
            tune_dir, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    scheduler = _scheduler(cfg, metric, mode)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    search, cap = _searcher(cfg, metric, mode), cfg.tune.max_concurrent or None
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


def _scheduler(cfg: Config, metric: str, mode: str) -> Any:
    """ASHA (None without ``tune.asha``), with rungs in training steps, which a trial resumed
    after a failure continues (Tune's own iteration count would restart at 1 and compare
    metrics of different steps)."""
    if not cfg.tune.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    every = cfg.train.checkpoint_every
    max_t = max(every, _most_steps(cfg))
    return ASHAScheduler(
        time_attr="step",
        metric=metric,
        mode=mode,
        max_t=max_t,
        grace_period=min(cfg.tune.grace_period * every, max_t),
    )


def _most_steps(cfg: Config) -> int:
    """The most training steps a trial can get: the base ``train.steps``, or the largest the
    search space gives it. ASHA stops every trial at its ``max_t``: set from the base count,
    a trial swept to more steps was cut there, marked stopped early and ranked after every
    trial that finished, and ``best.yaml`` could prescribe a step count no trial trained."""
    dim = cfg.tune.search_space.get("train.steps")
    if dim is None:
        return cfg.train.steps
    if dim.values:
        return max(int(v) for v in dim.values)
    # randint draws from [low, high); a continuous range over it is refused (_check_space)
    return int(dim.high or 0) - 1 if dim.type == "randint" else math.floor(dim.high or 0)


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


def _finish_parent_run(
    uri: str,
    parent_run_id: str,
    rows: list[TrialRow],
    best: TrialRow | None,
    best_yaml: str | None,
    metric: str,
) -> None:
    from pipelines.tracking import client as tracking_client
    from pipelines.tracking import redact
    from pipelines.tracking_runs import end_run

    client = tracking_client(uri)
    _close_trial_runs(client, parent_run_id, rows)
    # every trial's outcome, the reasons of failed ones included: a trial that failed before
    # its own run was made (a setting its workers refused) left no trace in MLflow
    table = [
        {"trial": r.trial_id, "params": r.params, metric: r.metric, "status": r.status}
        | ({"error": r.error} if r.error else {})
        for r in rows
    ]
    client.log_text(parent_run_id, redact(json.dumps(table, indent=1, default=str)), TRIALS_FILE)
    if best is not None and best_yaml is not None:
        _log_best(client, parent_run_id, f"best_{metric}", best.metric)
        client.set_tag(parent_run_id, "radjepa.best_trial", best.trial_id)
        client.log_text(parent_run_id, redact(best_yaml), "best.yaml")
        end_run(client, parent_run_id, "FINISHED")  # a reap's tag goes: the driver was alive
        return
    # the command fails (no best trial): its run was FINISHED, with nothing saying why
    failed = sum(r.status == "error" for r in rows)
    why = (
        f"every trial failed ({failed}); the reasons are in {TRIALS_FILE}"
        if failed == len(rows)
        else f"no trial finished without collapsing or failing ({TRIALS_FILE})"
    )
    client.set_tag(parent_run_id, "radjepa.failure", why)
    end_run(client, parent_run_id, "FAILED")


def _record_sweep(
    uri: str,
    parent_run_id: str,
    rows: list[TrialRow],
    best: TrialRow | None,
    best_yaml: str | None,
    metric: str,
) -> str | None:
    """:func:`_finish_parent_run`, or why the store refused it, in one line. The sweep's work
    is done and ``best.yaml`` written by then: a store failing here (a server restarting, a
    locked database) escaped as MLflow's traceback, the runs were marked FAILED and the
    checkpoints were never tidied. The parent run is left as it was (RUNNING): ``--resume``
    restores the finished sweep without training again and records it then."""
    from pipelines.runtime import first_line
    from pipelines.tracking import redact

    try:
        _finish_parent_run(uri, parent_run_id, rows, best, best_yaml, metric)
    except Exception as err:  # noqa: BLE001 - any store failure: the sweep itself succeeded
        log.debug("recording sweep run %s failed", parent_run_id, exc_info=True)
        return redact(f"{type(err).__name__}: {first_line(str(err))}")
    return None


def _log_best(client: Any, run_id: str, key: str, value: float) -> None:
    """Log the best trial's metric once per value: a ``--resume`` of a sweep whose parent run
    already holds it (it ended after the log, or it had finished) logged it again at step 0,
    and the run's chart showed two points where one trial was best. A new best (the resumed
    trials beat it) is the next step."""
    history = client.get_metric_history(run_id, key)
    last = max(history, key=lambda m: (m.step, m.timestamp), default=None)
    if last is not None and last.value == value:
        return
    client.log_metric(run_id, key, value, step=0 if last is None else last.step + 1)


def _end_sweep_runs(uri: str | None, parent_run_id: str | None, status: str) -> None:
    """End an interrupted or failed sweep's MLflow runs with ``status``: the trials still
    RUNNING, then the sweep's own run (none without tracking). Never raises, as neither step
    does: the interruption or the failure is what to report."""
    if not parent_run_id:
        return
    from pipelines.tracking import mark_run

    _end_open_trial_runs(uri, parent_run_id, status)
    mark_run(uri, parent_run_id, status)


def _end_open_trial_runs(uri: str, parent_run_id: str, status: str) -> None:
    """End the child runs of an interrupted sweep that are still RUNNING: the trials Tune
    stopped never reach the end of ``_trial``. ``--resume`` sets them RUNNING again. Never
    raises: the interruption is what to report."""
    from pipelines.tracking import client as tracking_client
    from pipelines.tracking import mark_run

    try:
        client = tracking_client(uri)
        exp_id = client.get_run(parent_run_id).info.experiment_id
        children = client.search_runs(
            [exp_id],
            f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'",
            max_results=50000,
        )
    except Exception:  # noqa: BLE001
        log.warning("could not list the trial runs of sweep run %s", parent_run_id, exc_info=True)
        return
    for run in children:
        mark_run(uri, run.info.run_id, status)


def _close_trial_runs(client: Any, parent_run_id: str, rows: list[TrialRow]) -> None:
    """Tag every child run with the status the table shows. A trial stopped by the scheduler
    or the collapse stopper, or one that crashed, never reaches the end of ``_trial``: close
    its run too, so the MLflow UI does not list it as RUNNING forever. A run ``runs reap``
    marked KILLED while the sweep was alive (trials waiting for nodes log nothing) is ended
    as the table shows it too, and loses the reap's tag (``tracking_runs.end_run``)."""
    from pipelines.tracking_runs import REAPED_TAG, end_run

    by_trial = {r.trial_id: r for r in rows}
    exp_id = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs(
        [exp_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=50000
    )
    for run in children:
        row = by_trial.get(run.data.tags.get("radjepa.trial_id", ""))
        if row is None:
            continue
        client.set_tag(run.info.run_id, "radjepa.status", row.status)
        # KILLED: an interruption ended it (_end_open_trial_runs), and the resumed sweep did
        # not run it again (Tune had stopped it already): it ends as the table says
        if run.info.status in ("RUNNING", "KILLED") or REAPED_TAG in run.data.tags:
            state = "FAILED" if row.status in ("error", DIVERGED_STATUS) else "FINISHED"
            end_run(client, run.info.run_id, state)

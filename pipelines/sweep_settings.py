"""What a sweep's ``--resume`` checks before Ray starts, from the sweep's folder alone.

Two questions decide whether this run of the command may continue (or start) the sweep named
``tune.name``: is there a sweep to restore (or, for a new one, is the name free), and were its
trials started with the settings that decide what they learn and how they are ranked (saved in
``sweep_config.json`` beside them). Both are answered from files, before the parent MLflow run
is made or continued, so that a refused attempt leaves no run behind.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from radjepa import locations
from radjepa.config import Config
from radjepa.resume import NOT_THE_MODEL, RESUME_GUARDED

log = logging.getLogger(__name__)


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


def check_sweep_dir(cfg: Config, sweep_dir: str, resume: bool) -> None:
    """A new sweep needs a free name, ``--resume`` a sweep to restore: checked before the
    parent MLflow run is made or continued. Checked after it, each refused attempt left a
    FAILED parent run, and a new sweep started on a taken name replaced the sweep's parent run
    id with its own, so the ``--resume`` that followed continued that empty run while the
    trials it resumed stayed children of the original one (never closed by the driver).

    A sweep stopped before Tune made a trial holds no trial to restore: Tune's restore of it
    failed, and Tune went on with a sweep of one trial of the base config, reported finished
    with its best. ``--resume`` of one is refused; a new sweep of the name takes the place of
    one whose state Tune saved without trials (it ended so), and is refused where Tune saved
    none yet (a run of it may be starting: a second start deleted its folder under it)."""
    import ray.tune

    from pipelines.sweep import SweepError  # pipelines.sweep imports this module

    tune_dir = locations.join_location(sweep_dir, "tune")
    if resume and not ray.tune.Tuner.can_restore(tune_dir):
        raise SweepError(f"nothing to resume at {tune_dir}: run the sweep without --resume")
    state, trials = saved_trials(tune_dir)
    if resume and trials is None:
        raise SweepError(
            f"sweep '{cfg.tune.name}' cannot be resumed: Tune's newest state {state} cannot be "
            "read (cut short as its driver was killed?); remove it to resume from the state "
            f"saved before it, if {tune_dir} holds one, or choose another tune.name"
        )
    # no state at all: a run of the sweep starting now (Tune saves its first state once its
    # loop has made trials), or one killed before that; a state without trials: an ended one
    unsaved = (
        f"sweep '{cfg.tune.name}' has no state saved at {tune_dir}: another run of it may be "
        "starting, or one was killed before Tune saved any; if none is running, remove "
        f"{tune_dir} and run the sweep without --resume"
    )
    if resume and not trials:
        if state is None:
            raise SweepError(unsaved)
        raise SweepError(
            f"sweep '{cfg.tune.name}' was stopped before Tune made its first trial: nothing to "
            "resume; run the sweep without --resume"
        )
    if not resume and locations.has_entries(tune_dir):
        if state is not None and trials == 0:  # an earlier start ended before its first trial
            log.info("%s holds no trial of an earlier start of this sweep: replaced", tune_dir)
            fs, path = locations.filesystem(tune_dir)
            fs.delete_dir(path)
            return
        if state is None and ray.tune.Tuner.can_restore(tune_dir):
            raise SweepError(unsaved)
        raise SweepError(
            f"sweep '{cfg.tune.name}' already exists at {sweep_dir}: pass --resume to "
            "continue it, or choose another tune.name"
        )


# the experiment state Tune saves (TuneController.CKPT_FILE_TMPL), one file per driver session
_TUNE_STATE = "experiment_state-*.json"


def saved_trials(tune_dir: str) -> tuple[str | None, int | None]:
    """Tune's newest saved state of a sweep and the trials it holds, which is what its restore
    reads: (None, 0) when it saved none (stopped before its loop's first step), (the file,
    None) when that file cannot be read (a driver killed as it was written)."""
    import fnmatch

    import pyarrow.fs as pafs

    fs, path = locations.filesystem(tune_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(i.base_name for i in infos if fnmatch.fnmatch(i.base_name, _TUNE_STATE))
    if not names:
        return None, 0
    state = locations.join_location(tune_dir, names[-1])
    try:
        trials = json.loads(locations.read_text(state) or "")["trial_data"]
    except (ValueError, KeyError, TypeError):
        return state, None
    return state, len(trials) if isinstance(trials, list) else None


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
        kept["tune.labels_csv"] = locations.absolute(kept["tune.labels_csv"])
    settings = {"data": locations.absolute(data), **kept}
    return locations.redact_strings(json.loads(json.dumps(settings)))


def keep_sweep_config(cfg: Config, data: str, sweep_dir: str, resume: bool) -> None:
    """Save a new sweep's settings; refuse a ``--resume`` with others, in one line naming the
    keys. Tune restores its own search space and trials, but the trials it had not started
    yet, and the ones it restarts, were built from the new config: a sweep resumed with
    another ``ema.end`` or ``train.steps`` compared trials trained two ways, in silence.
    ``train.allow_config_change`` lets it go on (warned), as it lets a pretrain run; a sweep
    started before the file existed is not checked."""
    from pipelines.sweep import SweepError  # pipelines.sweep imports this module

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
        saved["tune.labels_csv"] = locations.absolute(saved["tune.labels_csv"])
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

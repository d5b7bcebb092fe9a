"""What a sweep's ``--resume`` compares with the settings the sweep started with: what its trials
learn and how they are ranked, not how fast they run (``pipelines.sweep_settings.keep_sweep_config``).
No Ray is started: the comparison is made before it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.sweep import SweepError
from pipelines.sweep_settings import SWEEP_CONFIG_FILE, keep_sweep_config
from radjepa.config import Config, flatten, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SPACE = {"optim.lr": {"type": "choice", "values": [1e-3, 5e-4]}}
LABELLED = {"tune.metric": "knn_auroc", "tune.label_column": "male"}


def _started(tmp_path: Path, **extra) -> tuple[Config, str, str]:
    """A sweep's config, its shards and its folder, its settings saved as a new sweep does."""
    cfg = load_config(
        CONFIGS / "tiny_cpu.yaml",
        {"tune.name": "s", "tune.search_space": SPACE, "train.output_dir": str(tmp_path), **extra},
    )
    data, sweep_dir = str(tmp_path / "shards"), str(tmp_path / "s")
    keep_sweep_config(cfg, data, sweep_dir, resume=False)
    return cfg, data, sweep_dir


def test_a_sweep_resume_may_change_how_fast_its_trials_run(tmp_path):
    # the pretrain resume guard lets these change; the sweep's refused every one of them, so a
    # sweep interrupted on one machine could not go on with another's decode or loader settings
    started, data, sweep_dir = _started(tmp_path)
    saved = (tmp_path / "s" / SWEEP_CONFIG_FILE).read_text()
    for key, value in {
        "ingest.decode_actors": 8,
        "ingest.decode_timeout_s": 10.0,
        "ingest.shard_rows": 16,
        "train.data_loader_threads": 0,
        "train.keep_checkpoints": 1,
        "train.log_every": 1,
        "train.compile": True,
        "train.precision": "bf16",
        "model.attention": "manual",
        "tune.trial_checkpoints": "all",
        "tune.num_samples": 9,  # ignored by a resume: Tune keeps its trials
        # RankMe ranks these trials: the labels and probe settings score nothing
        "tune.label_column": "male",
        "probe.knn_k": 3,
    }.items():
        keep_sweep_config(started.with_overrides({key: value}), data, sweep_dir, resume=True)
    assert (tmp_path / "s" / SWEEP_CONFIG_FILE).read_text() == saved


def test_a_sweep_resume_refuses_what_its_trials_learn_and_how_they_are_ranked(tmp_path):
    labels = {**LABELLED, "tune.labels_csv": str(tmp_path / "labels.csv")}
    started, data, sweep_dir = _started(tmp_path, **labels)
    for key, value in {
        "masks.num_targets": 2,
        "model.depth": 2,
        "model.drop_path": 0.1,
        "data.holdout_fraction": 0.2,
        "train.steps": 16,
        "train.num_workers": 2,  # the global batch
        "train.checkpoint_every": 5,  # where ASHA compares trials
        "ingest.image_size": 128,  # the probe set's images
        "tune.search_space": {"ema.start": {"type": "choice", "values": [0.9, 0.99]}},
        "tune.search_alg": "grid",
        "tune.collapse_rankme": 3.0,
        "tune.label_column": "female",
        # how the kNN AUROC the trials are ranked by is computed
        "probe.knn_k": 3,
        "probe.seed": 1,
    }.items():
        with pytest.raises(SweepError, match=rf"\({key} .* -> .*\): resume it with the config"):
            keep_sweep_config(started.with_overrides({key: value}), data, sweep_dir, resume=True)
    with pytest.raises(SweepError, match=r"tune\.metric 'knn_auroc' -> 'probe_auroc'"):
        ranked = started.with_overrides({"tune.metric": "probe_auroc"})
        keep_sweep_config(ranked, data, sweep_dir, resume=True)


# the sections an earlier version saved every setting of (never probe.*), as typed
_EARLIER_SECTIONS = ("ingest.", "data.", "model.", "masks.", "ema.", "optim.", "train.", "tune.")


@pytest.mark.parametrize("labelled", [False, True])
def test_a_sweep_started_by_an_earlier_version_compares_only_what_matters(tmp_path, labelled):
    # an earlier version saved every setting of the sections its trials were built from, and
    # none of probe.*: a resume of such a sweep is compared on the settings a new one saves, but
    # those it never held (a labelled sweep's probe settings were all "changed" from None)
    labels = {**LABELLED, "tune.labels_csv": "labels.csv"} if labelled else {}
    started, data, sweep_dir = _started(tmp_path, **labels)
    every = {"data": str(Path(data).resolve())}
    every.update({k: v for k, v in flatten(started).items() if k.startswith(_EARLIER_SECTIONS)})
    (tmp_path / "s" / SWEEP_CONFIG_FILE).write_text(json.dumps(every))
    faster = started.with_overrides({"ingest.decode_actors": 8, "train.data_loader_threads": 0})
    keep_sweep_config(faster, data, sweep_dir, resume=True)
    with pytest.raises(SweepError, match=r"\(ema\.end 1\.0 -> 0\.999\)"):
        keep_sweep_config(faster.with_overrides({"ema.end": 0.999}), data, sweep_dir, True)


def test_each_supervised_metric_compares_only_the_probe_settings_it_scores_with(tmp_path):
    # kNN AUROC fits no probe, and the probe's AUROC uses no kNN: refusing those settings' changes
    # refused resumes that rank trials exactly as before
    labels = {**LABELLED, "tune.labels_csv": str(tmp_path / "labels.csv")}
    knn, data, sweep_dir = _started(tmp_path, **labels)
    for key, value in {"probe.folds": 3, "probe.logreg_c": 1.0}.items():
        keep_sweep_config(knn.with_overrides({key: value}), data, sweep_dir, resume=True)
    probe, data, sweep_dir = _started(tmp_path / "p", **{**labels, "tune.metric": "probe_auroc"})
    keep_sweep_config(probe.with_overrides({"probe.knn_k": 3}), data, sweep_dir, resume=True)
    with pytest.raises(SweepError, match=r"\(probe\.folds 5 -> 3\)"):
        keep_sweep_config(probe.with_overrides({"probe.folds": 3}), data, sweep_dir, True)


def test_the_labels_are_compared_as_the_file_they_name(tmp_path, monkeypatch):
    # compared as typed, a resume from another folder with the same relative text ranked the
    # remaining trials on another file, and the same file named absolutely was refused
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    started, data, sweep_dir = _started(tmp_path, **LABELLED, **{"tune.labels_csv": "labels.csv"})
    same = started.with_overrides({"tune.labels_csv": str(tmp_path / "a" / "labels.csv")})
    keep_sweep_config(same, data, sweep_dir, resume=True)
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(SweepError, match=r"tune\.labels_csv '.*/a/labels\.csv' -> '.*/b/labels"):
        keep_sweep_config(started, data, sweep_dir, resume=True)


def test_a_label_column_given_alone_before_names_its_positive_value_on_resume(tmp_path):
    # a sweep started when `sex` alone meant "sex=M" (the second value sorted) must now name it:
    # the refusal says why the key changed and that the ranking is the same
    started, data, sweep_dir = _started(tmp_path, **LABELLED, **{"tune.labels_csv": "l.csv"})
    saved = json.loads((tmp_path / "s" / SWEEP_CONFIG_FILE).read_text())
    saved["tune.label_column"] = "sex"
    (tmp_path / "s" / SWEEP_CONFIG_FILE).write_text(json.dumps(saved))
    named = started.with_overrides({"tune.label_column": "sex=M"})
    with pytest.raises(SweepError, match=r"second of its two values .* if 'M' is that value"):
        keep_sweep_config(named, data, sweep_dir, resume=True)
    other = started.with_overrides({"tune.label_column": "view=AP"})
    with pytest.raises(SweepError) as err:
        keep_sweep_config(other, data, sweep_dir, resume=True)
    assert "sorted order" not in str(err.value)


@pytest.mark.parametrize("name", ["DivergedIsWorst", "DrawnSettings"])
def test_a_sweep_started_before_the_searchers_moved_still_unpickles_them(name):
    # Tune saved the searcher by its module path (tune/tuner.pkl); once the classes moved to
    # pipelines.sweep_search, every --resume of such a sweep failed in Tuner.restore
    import pickle

    from pipelines import sweep_search

    saved = f"cpipelines.sweep\n{name}\n.".encode()  # a class reference, as pickle writes it
    assert pickle.loads(saved) is getattr(sweep_search, name)  # noqa: S301 - our own bytes

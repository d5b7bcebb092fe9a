"""Ray Tune sweeps: trials ranked by a comparable metric, MLflow parent/child runs, best config
written for `radjepa pretrain`, and --resume that does not re-run finished trials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radjepa.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cfg(out: Path | str, name: str, space: dict, **extra):
    return load_config(
        CONFIGS / "tiny_cpu.yaml",
        {
            "train.output_dir": str(out),
            "train.batch_size": 8,
            "train.steps": 8,
            "train.log_every": 1,
            "train.checkpoint_every": 4,
            "train.max_failures": 0,
            "data.holdout_fraction": 0.0,
            "tune.name": name,
            "tune.search_alg": "grid",
            "tune.asha": False,
            "tune.collapse_rankme": 0.0,
            "tune.search_space": space,
            **extra,
        },
    )


def _checkpoints(sweep_dir: Path) -> dict[str, list[str]]:
    """The checkpoint folders left in each trial's folder, by trial id."""
    return {
        trial.name.removeprefix("trial-"): sorted(
            c.name for c in trial.glob("checkpoint_*") if c.is_dir()
        )
        for trial in sorted((sweep_dir / "trials").glob("trial-*"))
    }


def _child_runs(uri: str, parent: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("radjepa")
    return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")


def test_two_trial_sweep_ranks_by_rankme_and_writes_best_config(nih_shards, tmp_path):
    from pipelines.sweep import run_sweep

    # outputs on a URI (as s3:// on a cluster) with an explicit tracking store
    scales = [[0.1, 0.15], [0.2, 0.3]]
    cfg = _cfg(
        tmp_path.as_uri(),
        "s2",
        {"masks.target_scale": {"type": "grid", "values": scales}},
        **{"tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )
    res = run_sweep(cfg, str(nih_shards))
    assert res.sweep_dir == tmp_path.as_uri() + "/s2"
    assert res.best_config_path == res.sweep_dir + "/best.yaml"

    assert len(res.trials) == 2
    assert all(t.status == "ok" and t.metric is not None and t.metric > 1 for t in res.trials)
    assert res.best.metric == max(t.metric for t in res.trials)
    assert {tuple(t.params["masks.target_scale"]) for t in res.trials} == {tuple(s) for s in scales}

    children = _child_runs(res.tracking_uri, res.parent_run_id)
    assert len(children) == 2
    assert all("rankme" in c.data.metrics for c in children)

    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["radjepa.status"] for c in children} == {"ok"}
    import mlflow

    parent = mlflow.MlflowClient(res.tracking_uri)
    # the parent and every trial say which images and which code they ran on
    fingerprints = {c.data.tags["radjepa.data_fingerprint"] for c in children}
    parent_tags = parent.get_run(res.parent_run_id).data.tags
    assert fingerprints == {parent_tags["radjepa.data_fingerprint"]}
    assert all(c.data.tags["radjepa.data"] == str(nih_shards) for c in children)
    assert all(len(c.data.tags["mlflow.source.git.commit"]) == 40 for c in children)
    logged = parent.download_artifacts(res.parent_run_id, "best.yaml", str(tmp_path / "dl"))
    assert Path(logged).read_text() == (tmp_path / "s2" / "best.yaml").read_text()
    assert (tmp_path / "mlartifacts").is_dir()  # the store's artifacts sit beside its database

    # only the best trial keeps its checkpoints (2 of 8 steps each were left for every trial,
    # and nothing deleted them); MLflow keeps no copy or path of the deleted ones
    left = _checkpoints(tmp_path / "s2")
    other = next(t for t in res.trials if t is not res.best).trial_id
    assert len(left[res.best.trial_id]) == 2 and left[other] == []
    assert res.tidied.folders == 2 and res.tidied.trials == 1 and res.tidied.freed_bytes > 10**6
    assert res.best.checkpoint.startswith(res.sweep_dir + f"/trials/trial-{res.best.trial_id}/")
    assert (tmp_path / "s2" / res.best.checkpoint.removeprefix(res.sweep_dir + "/")).is_dir()
    assert [t.checkpoint for t in res.trials if t is not res.best] == [None]
    for child in children:
        assert parent.list_artifacts(child.info.run_id) == []

    best = load_config(tmp_path / "s2" / "best.yaml")
    assert list(best.masks.target_scale) == list(res.best.params["masks.target_scale"])
    assert best.train.steps == 8  # the rest of the config is carried over
    assert best.data.shards == str(Path(nih_shards).resolve())
    again = load_config(tmp_path / "s2" / "best.yaml", ["train.steps=99"])
    assert again.train.steps == 99 and again.masks.target_scale == best.masks.target_scale


def test_resume_finishes_an_interrupted_sweep_without_rerunning_finished_trials(
    nih_shards, tmp_path
):
    from pipelines.sweep import run_sweep

    # one trial dies once at step 6 (no retries allowed), the other finishes; checkpoints
    # every 2 steps, the last 2 kept
    space = {"train.fail_at_step": {"type": "grid", "values": [None, 6]}}
    every2 = {"train.checkpoint_every": 2}
    first = run_sweep(_cfg(tmp_path, "sr", space, **every2), str(nih_shards))
    assert sorted(t.status for t in first.trials) == ["error", "ok"]
    # the files its trials read, which --resume reads again (tests/test_sweep_shards.py)
    listed = json.loads((tmp_path / "sr" / "sweep_shards.json").read_text())["files"]
    assert listed == sorted(p.name for p in (nih_shards / "images").glob("*.parquet"))
    # a failed trial makes the sweep resumable: every checkpoint stays (the failed trial's
    # newest is where --resume restarts it)
    kept = _checkpoints(tmp_path / "sr")
    assert sorted(len(c) for c in kept.values()) == [2, 2] and first.tidied is None
    # the crashed trial's child run is closed as FAILED, not left RUNNING
    states = sorted(c.info.status for c in _child_runs(first.tracking_uri, first.parent_run_id))
    assert states == ["FAILED", "FINISHED"]
    done_before = next(t for t in first.trials if t.status == "ok")
    # the failed trial's newest checkpoint, the newest Ray recorded of it, is damaged (a disk
    # that filled up): the trial resumes from the one before. Ray's offer of the damaged one
    # was loaded by every attempt of the trial (pretrain's driver pick was not passed on)
    failed = next(k for k in kept if k != done_before.trial_id)
    folder = tmp_path / "sr" / "trials" / f"trial-{failed}"
    newest, before = (folder / name for name in kept[failed][::-1])

    def step(ckpt: Path) -> int:
        return json.loads((ckpt / "meta.json").read_text())["step"]

    resumed_at = step(before)
    assert resumed_at < step(newest) <= 6
    with open(newest / "weights.safetensors", "r+b") as f:
        f.truncate(1000)

    second = run_sweep(_cfg(tmp_path, "sr", space, **every2), str(nih_shards), resume=True)
    assert [t.status for t in second.trials] == ["ok", "ok"]
    assert second.parent_run_id == first.parent_run_id
    states = {c.info.status for c in _child_runs(second.tracking_uri, second.parent_run_id)}
    assert states == {"FINISHED"}
    # the finished trial kept its result and logged no step twice; the errored one continued
    for child in _child_runs(second.tracking_uri, second.parent_run_id):
        import mlflow

        client = mlflow.MlflowClient(second.tracking_uri)
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        assert sorted(steps) == list(range(1, 9))  # one value per step
        replays = {m.step for m in client.get_metric_history(child.info.run_id, "replay/loss")}
        # only steps after the checkpoint the failed trial resumed from
        assert replays <= set(range(resumed_at + 1, 7))
        if child.data.tags.get("radjepa.trial_id") == failed:
            assert min(replays) == resumed_at + 1
    assert done_before.trial_id in {t.trial_id for t in second.trials}
    # the resumed sweep ended without failures: only its best trial's checkpoints remain
    left = _checkpoints(tmp_path / "sr")
    assert {k for k, c in left.items() if c} == {second.best.trial_id}
    assert Path(second.best.checkpoint).is_dir()
    assert second.tidied.trials == 1


def test_bad_search_space_fails_before_any_trial(nih_shards, tmp_path):
    from pipelines.sweep import SweepError, run_sweep
    from radjepa.config import ConfigError

    with pytest.raises(ConfigError, match="tune.search_space.masks.num_targetz"):
        _cfg(tmp_path, "bad", {"masks.num_targetz": {"type": "choice", "values": [2, 4]}})
    bad = _cfg(tmp_path, "bad2", {"ema.start": {"type": "choice", "values": [0.9, 1.5]}})
    with pytest.raises(SweepError, match="ema.start"):
        run_sweep(bad, str(nih_shards))
    # the shards are checked before any trial too, and said in one line
    good = _cfg(tmp_path, "good", {"ema.start": {"type": "choice", "values": [0.99, 0.996]}})
    with pytest.raises(SweepError, match="no shards at") as err:
        run_sweep(good, str(tmp_path / "missing"))
    assert err.value.__cause__ is None


def test_a_randint_range_is_checked_on_the_values_tune_draws(tmp_path):
    # Tune's randint leaves out `high`; the check tried `high` itself, so the range that
    # covers masks.num_targets up to its limit of 16 (high: 17) was refused
    from pipelines.sweep import SweepError, run_sweep

    def space(high):
        return {"masks.num_targets": {"type": "randint", "low": 1, "high": high}}

    cfg = _cfg(tmp_path, "ri", space(17), **{"tune.search_alg": "random"})
    with pytest.raises(SweepError, match="no shards at"):  # past the search-space check
        run_sweep(cfg, str(tmp_path / "missing"))
    cfg = _cfg(tmp_path, "ri", space(18), **{"tune.search_alg": "random"})
    with pytest.raises(SweepError, match="tune.search_space: masks.num_targets = 17: "):
        run_sweep(cfg, str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("space", "said"),
    [
        # Tune drew 13.0957 for a batch size: every trial failed inside its worker
        (
            {"train.batch_size": {"type": "uniform", "low": 8, "high": 16}},
            "tune.search_space.train.batch_size: 'uniform' draws fractions, and "
            "train.batch_size takes whole numbers: use 'randint' (low 8, high 17) or 'choice'",
        ),
        # each value passed alone against the base ema.end; the pair a trial drew did not
        (
            {
                "ema.start": {"type": "choice", "values": [0.99, 0.999]},
                "ema.end": {"type": "choice", "values": [0.998, 1.0]},
            },
            "tune.search_space: ema.start = 0.999, ema.end = 0.998: invalid configuration: "
            "ema: ema.start must be <= ema.end",
        ),
        # a valid config whose masks cannot be drawn on the model's grid: found in the workers
        (
            {"masks.min_keep": {"type": "choice", "values": [4, 30]}},
            "tune.search_space: masks.min_keep = 30: could not keep masks.min_keep=30",
        ),
    ],
    ids=["fractions-for-an-integer", "keys-bound-each-other", "masks-on-the-grid"],
)
def test_a_space_whose_trials_would_fail_is_refused_before_any(nih_shards, tmp_path, space, said):
    from pipelines.sweep import SweepError, run_sweep

    # a grid runs every combination; a range needs a random search
    alg = "random" if any(d["type"] == "uniform" for d in space.values()) else "grid"
    cfg = _cfg(tmp_path, "bad", space, **{"tune.search_alg": alg})
    with pytest.raises(SweepError) as err:
        run_sweep(cfg, str(nih_shards))
    assert str(err.value).replace("\n  ", " ").startswith(said), str(err.value)
    assert not (tmp_path / "bad").exists()  # refused before any trial or run folder


def test_a_large_space_checks_every_value_and_a_random_one_only_its_draws(nih_shards, tmp_path):
    # past 256 combinations only a sample was checked: a bad value among 400 slipped through
    # for most seeds; a product past 2**63 raised numpy's ValueError; and a random search over
    # choices was refused over combinations its draws never run
    from pipelines.sweep import SweepError, run_sweep

    lrs = [0.0] + [1e-5 * (i + 1) for i in range(399)]
    space = {
        "optim.lr": {"type": "choice", "values": lrs},
        "ema.start": {"type": "choice", "values": [0.99, 0.992, 0.994]},
        "masks.num_targets": {"type": "choice", "values": [2, 4]},
    }
    for seed in range(3):
        optuna = _cfg(tmp_path, "lr", space, **{"tune.search_alg": "optuna", "train.seed": seed})
        with pytest.raises(SweepError, match=r"optim.lr = 0.0"):
            run_sweep(optuna, str(tmp_path / "missing"))
    huge = {f"ema.{k}": {"type": "choice", "values": [0.99 + i * 1e-6 for i in range(1000)]}
            for k in ("start", "end")}  # fmt: skip
    huge |= {f"optim.{k}": {"type": "choice", "values": [1e-4 + i * 1e-7 for i in range(1000)]}
             for k in ("lr", "start_lr", "final_lr")}  # fmt: skip
    huge |= {"masks.num_targets": {"type": "choice", "values": list(range(1, 17))}}
    for alg in ("optuna", "random"):
        cfg = _cfg(tmp_path, "huge", huge, **{"tune.search_alg": alg, "tune.num_samples": 2})
        with pytest.raises(SweepError) as err:  # past the space check, whatever it holds
            run_sweep(cfg, str(tmp_path / "missing"))
        assert "no shards at" in str(err.value) or "tune.search_space" in str(err.value)
    pairs = {
        "ema.start": {"type": "choice", "values": [0.99, 0.999]},
        "ema.end": {"type": "choice", "values": [0.998, 1.0]},
    }
    random = _cfg(tmp_path, "pairs", pairs, **{"tune.search_alg": "random"})
    with pytest.raises(SweepError, match="no shards at"):  # its draws are checked with data
        run_sweep(random, str(tmp_path / "missing"))


def test_a_space_valid_only_with_its_other_swept_values_is_taken(tmp_path):
    # ema.end = 0.995 was refused against the base ema.start (0.996), though the sweep moves
    # ema.start to 0.99; and a randint with fractional bounds ran values nobody wrote
    from pipelines.sweep import SweepError, run_sweep
    from radjepa.config import ConfigError

    space = {
        "ema.start": {"type": "choice", "values": [0.99]},
        "ema.end": {"type": "choice", "values": [0.995, 1.0]},
    }
    with pytest.raises(SweepError, match="no shards at"):  # past the search-space check
        run_sweep(_cfg(tmp_path, "ok", space, **{"tune.search_alg": "random"}), str(tmp_path))
    fractional = {"masks.num_targets": {"type": "randint", "low": 0.5, "high": 3.5}}
    with pytest.raises(ConfigError, match="'randint' needs whole-number low and high"):
        _cfg(tmp_path, "ri", fractional)


def test_num_samples_a_grid_cannot_use_is_refused_and_the_trial_count_is_tune_s(tmp_path):
    # tune.num_samples and --num-samples were dropped in silence with search_alg=grid (Tune
    # repeats each grid point num_samples times; the sweep asked it for 1)
    from pipelines.sweep import SweepError, planned_trials, run_sweep
    from radjepa.config import ConfigError

    space = {
        "ema.start": {"type": "grid", "values": [0.99, 0.996]},
        "masks.num_targets": {"type": "choice", "values": [2, 4]},
    }
    with pytest.raises(ConfigError, match="num_samples=3 does not apply to search_alg=grid"):
        _cfg(tmp_path, "g", space, **{"tune.num_samples": 3})
    grid = _cfg(tmp_path, "g", space)
    assert grid.tune.num_samples is None and planned_trials(grid) == 4  # each point once
    assert planned_trials(_cfg(tmp_path, "g", space, **{"tune.num_samples": 1})) == 4
    with pytest.raises(SweepError, match="--num-samples 3 does not apply") as err:
        run_sweep(grid, str(tmp_path / "missing"), num_samples=3)
    assert "\n" not in str(err.value) and not (tmp_path / "g").exists()
    # random: Tune's count, grid points times samples (unset: 4)
    random = grid.with_overrides({"tune.search_alg": "random"})
    assert random.tune.sample_count == 4 and planned_trials(random) == 8
    assert planned_trials(random.with_overrides({"tune.num_samples": 3})) == 6
    assert planned_trials(load_config(CONFIGS / "sweep-tiny.yaml")) == 4
    # the CLI says both in one line, before any Ray work
    from typer.testing import CliRunner

    from pipelines.cli import UserError, app

    args = ["sweep", "-c", str(CONFIGS / "tiny_cpu.yaml"), "--data", str(tmp_path)]
    args += ["--set", "tune.search_alg=grid", "--set", f"train.output_dir={tmp_path}"]
    args += ["--set", 'tune.search_space={"ema.start": {"type": "grid", "values": [0.99, 0.996]}}']
    for extra, said in (
        (["--num-samples", "2"], "--num-samples 2 does not apply to search_alg=grid"),
        (["--set", "tune.num_samples=2"], "num_samples=2 does not apply to search_alg=grid"),
    ):
        out = CliRunner().invoke(app, [*args, *extra])
        assert isinstance(out.exception, UserError) and said in str(out.exception)


@pytest.mark.timeout(300)
def test_a_trial_the_local_instance_cannot_hold_is_refused_before_any_trial(nih_shards, tmp_path):
    # the session's local Ray has 8 CPUs: a trial of one 8-CPU rank never started, and Ray
    # Train retried starting it every 60 s, forever
    from pipelines.sweep import SweepError, run_sweep

    space = {"ema.start": {"type": "grid", "values": [0.99, 0.996]}}
    cfg = _cfg(tmp_path, "huge", space, **{"train.cpus_per_worker": 8.0})
    with pytest.raises(SweepError, match="train.cpus_per_worker=8 and 1.25 more") as err:
        run_sweep(cfg, str(nih_shards))
    assert "cannot grow" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "huge" / "tune").exists()  # no trial started
    fits = _cfg(tmp_path, "fits", space, **{"train.cpus_per_worker": 6.75})
    from pipelines.runtime import check_trial_fits_locally

    check_trial_fits_locally(1, fits.train.cpus_per_worker, use_gpu=False)


def test_stopped_trials_give_their_cpus_back(nih_shards, tmp_path):
    # a trial Tune stops (collapse stopper, ASHA) ends its Train controller, whose placement
    # group lived on until the driver exited: on a local instance every stopped trial kept its
    # CPUs, and a later trial waited forever for a CPU to read its shards
    import time

    import ray

    from pipelines.sweep import COLLAPSED, run_sweep

    space = {"ema.start": {"type": "grid", "values": [0.99, 0.996]}}
    cfg = _cfg(
        tmp_path,
        "freed",
        space,
        **{
            "tune.collapse_rankme": 100.0,  # every trial "collapses" at its first report
            "tune.max_concurrent": 1,
            "tracking.enabled": False,
            "train.steps": 40,
        },
    )
    res = run_sweep(cfg, str(nih_shards))
    assert [t.status for t in res.trials] == [COLLAPSED, COLLAPSED]
    assert all(t.steps == 4 for t in res.trials)
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == total


def test_failed_trials_say_why_and_the_sweep_says_every_trial_failed(nih_shards, tmp_path):
    # the table said only "error" (the reason sat in a file under /tmp/ray), and a sweep whose
    # every trial failed ended with "no trial finished without collapsing"
    from typer.testing import CliRunner

    from pipelines.cli import UserError, app

    args = ["sweep", "-c", str(CONFIGS / "tiny_cpu.yaml"), "--data", str(nih_shards)]
    sets = {
        "train.output_dir": str(tmp_path),
        "train.batch_size": "8",
        "train.steps": "8",
        "train.checkpoint_every": "4",
        "train.max_failures": "0",
        "train.fail_at_step": "2",
        "data.holdout_fraction": "0.0",
        "tracking.enabled": "false",
        "tune.name": "allfail",
        "tune.search_alg": "grid",
        "tune.asha": "false",
        "tune.search_space": '{"ema.start": {"type": "grid", "values": [0.99, 0.996]}}',
    }
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    out = CliRunner().invoke(app, args)  # main() prints the UserError as "error: ..."
    assert isinstance(out.exception, UserError)
    assert str(out.exception) == "every trial failed; the reasons are listed above"
    said = out.output.splitlines()
    failed = [line for line in said if line.startswith("trial ") and " failed: " in line]
    assert len(failed) == 2
    assert all(
        line.endswith("RuntimeError: injected failure at step 2 (train.fail_at_step)")
        for line in failed
    )


def test_collapse_is_a_tiny_rank_or_a_vanishing_spread():
    from pipelines.sweep_search import CollapseStopper, is_collapsed

    healthy = {"rankme": 4.45, "feature_std": 0.0156}  # a tiny ViT after 8 steps
    assert not is_collapsed(healthy, 1.5, 1e-4)
    assert is_collapsed({**healthy, "rankme": 1.1}, 1.5, 1e-4)
    assert is_collapsed({**healthy, "feature_std": 3e-6}, 1.5, 1e-4)
    assert not is_collapsed({"loss": 0.3}, 1.5, 1e-4)  # a report without monitors
    stop = CollapseStopper(1.5, 1e-4)
    assert stop("t", {"rankme": 1.0}) and not stop("t", healthy) and not stop.stop_all()


def test_trials_run_side_by_side_only_as_far_as_the_cluster_holds_them(ray_session, caplog):
    # the test session's Ray has 8 CPUs and no GPU: half the CPUs hold ranks, half feed data
    from pipelines.runtime import max_parallel_trials

    assert max_parallel_trials(1, 1.0, use_gpu=False) == 4
    assert max_parallel_trials(3, 1.0, use_gpu=False) == 1
    with caplog.at_level("WARNING", logger="pipelines.runtime"):
        assert max_parallel_trials(5, 1.0, use_gpu=False) == 1  # one at a time, with a warning
        assert max_parallel_trials(1, 1.0, use_gpu=True) == 1  # GPUs may come with autoscaling
    assert caplog.text.count("one trial at a time") == 2


def test_a_trial_that_never_reported_is_incomplete_not_ok(tmp_path):
    # an interrupted sweep: trials that never reported had been counted "ok" with no metric
    from ray.tune import Result

    from pipelines.sweep import INCOMPLETE, _best, _rows

    done = Result({"rankme": 3.0, "step": 8, "trial_id": "a"}, None, None, str(tmp_path / "a"))
    silent = Result({}, None, None, str(tmp_path / "b"))
    rows = _rows([done, silent], "rankme", (1.0, 1e-4), str(tmp_path), 8)
    assert [r.status for r in rows] == ["ok", INCOMPLETE]
    assert _best(rows).trial_id == "a"


@pytest.mark.parametrize(
    "steps, max_t",
    [
        (None, 8),  # not swept: the base train.steps
        ({"type": "choice", "values": [4, 16]}, 16),
        ({"type": "grid", "values": [16, 4]}, 16),
        ({"type": "randint", "low": 4, "high": 21}, 20),  # Tune never draws high itself
    ],
)
def test_asha_lets_the_trial_with_the_most_steps_finish(tmp_path, steps, max_t):
    # ASHA's max_t was the base train.steps: a trial swept to more was cut there, marked
    # stopped early, and ranked after a shorter, worse trial that finished
    from ray.tune import Result

    from pipelines.sweep import STOPPED, _best, _rows
    from pipelines.sweep_search import tune_scheduler

    space = {"ema.start": {"type": "choice", "values": [0.99, 0.996]}}
    if steps is not None:
        space["train.steps"] = steps
    cfg = _cfg(tmp_path, "s", space, **{"tune.asha": True, "tune.search_alg": "random"})
    scheduler = tune_scheduler(cfg, "rankme", "max")
    assert scheduler._max_t == max_t and scheduler._time_attr == "step"
    if steps is None:
        return

    def result(trial: str, rankme: float, step: int, trial_steps: int) -> Result:
        # Tune hands a trial's setting over in its last result's "config"
        metrics = {"rankme": rankme, "step": step, "trial_id": trial}
        metrics["config"] = {"train.steps": trial_steps}
        return Result(metrics, None, None, str(tmp_path / trial))

    longest = result("long", 4.0, max_t, max_t)
    short = result("short", 3.0, 4, 4)
    cut = result("cut", 5.0, 4, max_t)  # ASHA stopped it at the first rung
    rows = _rows([longest, short, cut], "rankme", (1.0, 1e-4), str(tmp_path), cfg.train.steps)
    assert [r.status for r in rows] == ["ok", "ok", STOPPED]
    assert _best(rows).trial_id == "long"
    assert tune_scheduler(cfg.with_overrides({"tune.asha": False}), "rankme", "max") is None


def test_a_choice_sweep_tries_distinct_settings_drawn_with_the_seed(ray_session, tmp_path):
    # sweep-tiny: 6 settings, 4 trials; Tune's own draws repeated a setting in 72% of sweeps
    import ray.tune

    from pipelines.sweep_search import search_space, tune_searcher
    from radjepa.search_space import distinct_draws

    cfg = load_config(CONFIGS / "sweep-tiny.yaml", {"tune.max_concurrent": 2})
    draws = distinct_draws(cfg)
    assert len(draws) == 4 and len({repr(d) for d in draws}) == 4
    assert distinct_draws(cfg) == draws  # train.seed decides them
    everything = distinct_draws(cfg.with_overrides({"tune.num_samples": 50}))
    assert len({repr(d) for d in everything}) == 6  # each setting once, never a repeat
    grid = cfg.with_overrides({"tune.search_alg": "grid", "tune.num_samples": None})
    assert distinct_draws(grid) is None

    def trial(config):
        ray.tune.report({"score": 1.0})

    tuner = ray.tune.Tuner(
        trial,
        param_space=search_space(cfg.tune.search_space, "random"),
        tune_config=ray.tune.TuneConfig(
            num_samples=4, search_alg=tune_searcher(cfg, "score", "max"), metric="score", mode="max"
        ),
        run_config=ray.tune.RunConfig(name="draws", storage_path=str(tmp_path)),
    )
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)}
    try:
        tried = sorted(repr(r.config) for r in tuner.fit())
    finally:  # Tune leaves its SIGINT and SIGUSR1 handlers behind (run_sweep puts them back)
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert tried == sorted(repr(d) for d in draws)


def test_an_ended_sweep_ends_its_open_trial_runs_then_its_own(tmp_path):
    # the three ways a sweep ends early (interrupted twice over, failed) share one helper; a
    # trial run that already ended keeps its status, and without tracking nothing is done
    import mlflow

    from pipelines.sweep_tracking import end_sweep_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("radjepa")
    parent = client.create_run(exp).info.run_id
    tag = {"mlflow.parentRunId": parent}
    running, done = (client.create_run(exp, tags=tag).info.run_id for _ in range(2))
    client.set_terminated(done, "FINISHED")

    end_sweep_runs(uri, None, "FAILED")  # tracking off
    assert client.get_run(parent).info.status == "RUNNING"
    end_sweep_runs(uri, parent, "FAILED")
    status = {r: client.get_run(r).info.status for r in (parent, running, done)}
    assert status == {parent: "FAILED", running: "FAILED", done: "FINISHED"}


def test_a_resumed_sweep_logs_its_best_metric_once_and_a_new_best_as_the_next_step(tmp_path):
    # a --resume of a sweep whose parent run already held best_<metric> logged it again at
    # step 0: two points for one best trial
    import mlflow

    from pipelines.sweep import TrialRow
    from pipelines.sweep_tracking import _finish_parent_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    parent = client.create_run(client.create_experiment("radjepa")).info.run_id

    def row(trial: str, value: float) -> TrialRow:
        return TrialRow(trial, {"lr": 1e-3}, value, "ok", 6, f"/ckpt/{trial}")

    rows = [row("a", 3.0), row("b", 5.0)]
    for _ in range(2):  # the sweep and a --resume of it
        _finish_parent_run(uri, parent, rows, rows[1], "x: 1\n", "rankme")
    assert [(m.step, m.value) for m in client.get_metric_history(parent, "best_rankme")] == [
        (0, 5.0)
    ]
    rows.append(row("c", 7.0))  # a trial the resumed sweep ran beat it
    _finish_parent_run(uri, parent, rows, rows[2], "x: 2\n", "rankme")
    history = sorted((m.step, m.value) for m in client.get_metric_history(parent, "best_rankme"))
    assert history == [(0, 5.0), (1, 7.0)]
    assert client.get_run(parent).data.tags["radjepa.best_trial"] == "c"


def test_a_store_that_cannot_be_used_fails_in_one_line_before_any_trial(
    nih_shards, tmp_path, monkeypatch
):
    # pretrain says "cannot record the run in MLflow: ..."; the sweep let MLflow's exception
    # through, which the CLI printed as a traceback
    from serve_helpers import free_port

    from pipelines.sweep import SweepError, run_sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail now, not in minutes
    (tmp_path / "a-file").write_text("not a folder")
    space = {"ema.start": {"type": "choice", "values": [0.99, 0.996]}}
    for store in (f"http://127.0.0.1:{free_port()}", f"sqlite:///{tmp_path}/a-file/mlflow.db"):
        cfg = _cfg(tmp_path / "out", "nostore", space, **{"tracking.uri": store})
        # a server that does not answer is said before Ray starts (check_reachable)
        said = "cannot record the sweep in MLflow|the MLflow tracking server .* does not answer"
        with pytest.raises(SweepError, match=said) as err:
            run_sweep(cfg, str(nih_shards))
        assert err.value.__cause__ is None
        assert not (tmp_path / "out" / "nostore" / "tune").exists()  # no trial started


def test_a_refused_sweep_makes_no_mlflow_run_and_keeps_the_sweep_s_own(nih_shards, tmp_path):
    # the name and resume checks came after the parent run was made: each refused attempt
    # left a FAILED parent run, and a sweep started again without --resume replaced the
    # sweep's parent run id with its own, so the --resume after it continued that empty run
    import mlflow

    from pipelines.sweep import SweepError, run_sweep

    space = {"ema.start": {"type": "choice", "values": [0.99, 0.996]}}
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    taken = _cfg(tmp_path / "out", "taken", space, **{"tracking.uri": store})
    sweep_dir = tmp_path / "out" / "taken"
    (sweep_dir / "tune").mkdir(parents=True)
    (sweep_dir / "tune" / "experiment_state.json").write_text("{}")  # an earlier sweep's
    (sweep_dir / "mlflow_parent_run_id").write_text("the-sweep-s-own-run")
    with pytest.raises(SweepError, match="already exists"):
        run_sweep(taken, str(nih_shards))
    fresh = _cfg(tmp_path / "out", "fresh", space, **{"tracking.uri": store})
    with pytest.raises(SweepError, match="nothing to resume"):
        run_sweep(fresh, str(nih_shards), resume=True)
    assert (sweep_dir / "mlflow_parent_run_id").read_text() == "the-sweep-s-own-run"
    client = mlflow.MlflowClient(store)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def _sweep_args(out: Path, name: str, sets: dict[str, str], *extra: str) -> list[str]:
    """The arguments of `radjepa sweep` for a short grid sweep of the tiny config, ``sets``
    added to (or replacing) its settings."""
    sets = {
        "train.output_dir": str(out),
        "train.batch_size": "8",
        "train.log_every": "1",
        "train.checkpoint_every": "2",
        "train.max_failures": "0",
        "data.holdout_fraction": "0.0",
        "tune.name": name,
        "tune.search_alg": "grid",
        "tune.asha": "false",
        "tune.collapse_rankme": "0.0",
        **sets,
    }
    args = ["sweep", "-c", str(CONFIGS / "tiny_cpu.yaml")]
    return args + [f"--set={k}={v}" for k, v in sets.items()] + list(extra)


def _sweep_cli(out: Path, name: str, sets: dict[str, str], *extra: str):
    """`radjepa sweep` in a process of its own (its own local Ray), as a user or a pod runs it;
    Ray's log deduplication is off so that a worker's step line can be waited for."""
    import os
    import sys

    from interrupts import foreground_process

    repo = CONFIGS.parent
    args = [sys.executable, "-m", "pipelines.cli", *_sweep_args(out, name, sets, *extra)]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(repo), "RAY_DEDUP_LOGS": "0"}
    return foreground_process(args, env=env, cwd=repo)


def test_a_taken_sweep_name_is_refused_before_ray_starts(nih_shards, tmp_path):
    # the name and --resume checks read only the sweep's folder, but came after ray.init: a
    # second run of the same command waited seconds for a local Ray to say the name is taken
    space = '{"ema.start": {"type": "grid", "values": [0.99, 0.996]}}'
    (tmp_path / "taken" / "tune").mkdir(parents=True)
    (tmp_path / "taken" / "tune" / "experiment_state.json").write_text("{}")  # an earlier sweep
    for name, extra in (("taken", ()), ("fresh", ("--resume",))):
        proc = _sweep_cli(
            tmp_path, name, {"tune.search_space": space}, "--data", str(nih_shards), *extra
        )
        out = "".join(x or "" for x in proc.communicate(timeout=120))
        assert proc.returncode == 2, out[-3000:]
        said = "already exists" if name == "taken" else "nothing to resume"
        assert out.strip().splitlines()[-1].startswith("error: ") and said in out, out[-3000:]
        assert "starting local Ray" not in out, out[-3000:]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_sweep_exits_130_in_one_last_line_and_resumes(nih_shards, tmp_path, sig):
    # Ctrl-C of the driver ended in "error: sweep ... interrupted" with exit 2, the usage-error
    # code, and workers' step lines after it (Ray was still up); a SIGTERM (a pod shut down,
    # `ray job stop`) landed in ray.wait inside Tune's loop as ray.init's sys.exit: the driver
    # aborted in interpreter teardown (SIGABRT, a core dump), without a word, its runs RUNNING.
    # A second SIGTERM (a supervisor repeating itself) after Tune's loop met ray.init's handler:
    # the line said Ray's meaningless "(exit 15)". The SIGTERM case also resumes the sweep: the
    # stop itself takes seconds after either signal.
    # And Ctrl-C stopped Tune's trials before `_trial` closed their MLflow runs: only the
    # parent run was ended, and every child stayed RUNNING in the UI until a --resume that may
    # never come (the children's KILLED below; an in-process sweep interrupted the same way,
    # in a test of its own, checked only that, with 2 more trial starts)
    import signal

    import mlflow
    from interrupts import signal_after_line

    space = '{"ema.start": {"type": "grid", "values": [0.99, 0.996]}}'
    sets = {"train.steps": "12", "tune.search_space": space}
    proc = _sweep_cli(tmp_path, "int", sets, "--data", str(nih_shards))
    again = 1.0 if sig == "SIGTERM" else None
    took: list[float] = []
    _, text = signal_after_line(
        proc, "step 3/12", getattr(signal, sig), 240, again_after_s=again, took=took
    )
    assert proc.returncode == 130, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: sweep 'int' was interrupted"), text[-3000:]
    assert last.endswith(
        "; the sweep is resumable: re-run the same command with --resume to continue 'int'"
    ), last
    assert "(exit" not in last, last
    # and only that line says how to resume (Tune advised a Tuner.restore(...) call above it)
    assert "Tuner.restore" not in text, text[-3000:]
    # a pod gets 30 s from SIGTERM to SIGKILL, `radjepa jobs stop` as long; here it takes 4 s
    assert took[0] < 20, f"{took[0]:.1f} s from the signal to the exit"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = (tmp_path / "int" / "mlflow_parent_run_id").read_text()
    assert mlflow.MlflowClient(uri).get_run(parent).info.status == "KILLED"
    children = _child_runs(uri, parent)
    assert len(children) == 2 and {c.info.status for c in children} == {"KILLED"}
    if sig == "SIGINT":
        return  # resuming is the same after either signal: once is enough
    # resumed in this process (its Ray is up), as test_failed_trials_... runs the command: the
    # CLI's --resume after the interruption is what is checked, not a second start of Ray
    from typer.testing import CliRunner

    from pipelines.cli import app

    args = _sweep_args(tmp_path, "int", sets, "--data", str(nih_shards), "--resume")
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, (out.exception, out.output[-3000:])
    assert "best trial:" in out.output
    children = _child_runs(uri, parent)
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    assert mlflow.MlflowClient(uri).get_run(parent).info.status == "FINISHED"


def test_optuna_with_asha_samples_its_ranges_learns_a_diverged_trial_as_the_worst_and_prunes(
    nih_shards, tmp_path
):
    # One Optuna + ASHA sweep checks what two did (each with 3 trial starts):
    # - Optuna samples the declared ranges, trials ASHA stops are marked `stopped early` and
    #   their MLflow runs are closed too, and tune.trial_checkpoints=all keeps every trial's
    #   checkpoints, those ASHA stopped too;
    # - a diverged trial reports a NaN metric; Optuna's tell refused it ("The value nan is not
    #   acceptable", a warning) and the trial stayed RUNNING in the study, which TPE ignores: the
    #   searcher never learned that the region diverges. And a NaN trial was an `error`: the
    #   sweep then kept every trial's checkpoints for `--resume`, which restarted it into the
    #   same NaN, so a sweep with such a trial never pruned; the sweep goes on past it, ends
    #   FINISHED, and the pruning it runs at its end (with the default trial_checkpoints=best)
    #   keeps only the best trial's checkpoints: run here on this sweep's own trials
    import math
    import signal

    import mlflow
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    from pipelines.sweep import STOPPED, _tidy_checkpoints, run_sweep

    # in this order, train.seed's draws are one trial at the high rate and two at the low one
    space = {
        "optim.lr": {"type": "choice", "values": [5e-4, 1e5]},
        "ema.start": {"type": "uniform", "low": 0.99, "high": 0.999},
        "masks.num_targets": {"type": "choice", "values": [2, 4]},
    }
    extra = {
        "tune.search_alg": "optuna",
        "tune.num_samples": 3,
        "tune.max_concurrent": 1,
        "tune.asha": True,
        "tune.grace_period": 1,
        "train.checkpoint_every": 2,  # ASHA rungs at reports 1, 2 and 4 of 4
        "tune.trial_checkpoints": "all",
    }
    cfg = _cfg(tmp_path, "onan", space, **extra)
    ctrl_c = signal.getsignal(signal.SIGINT)
    res = run_sweep(cfg, str(nih_shards))
    # Tune left its own SIGINT handler behind, which swallowed the next Ctrl-C
    assert signal.getsignal(signal.SIGINT) is ctrl_c
    assert len(res.trials) == 3
    for t in res.trials:
        assert 0.99 <= t.params["ema.start"] <= 0.999
        assert t.params["masks.num_targets"] in (2, 4)
    by_lr = {lr: [t for t in res.trials if t.params["optim.lr"] == lr] for lr in (5e-4, 1e5)}
    # two trials that trained, so that the pruning below has another's checkpoints to delete
    assert len(by_lr[5e-4]) >= 2 and by_lr[1e5], [(t.params, t.status) for t in res.trials]
    # tune.trial_checkpoints=all keeps every trial's, those ASHA stopped too (a diverged trial
    # saves none)
    assert res.tidied is None and all(Path(t.checkpoint).is_dir() for t in by_lr[5e-4])
    left = _checkpoints(tmp_path / "onan")
    assert all(len(left[t.trial_id]) >= 1 for t in by_lr[5e-4])

    by_status = {t.status: t for t in res.trials}
    assert {"ok", "diverged"} <= set(by_status) <= {"ok", "diverged", STOPPED}, [
        (t.params, t.status) for t in res.trials
    ]
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(tmp_path / "onan" / "tune"))
    told = {
        t.params["optim.lr"]: (t.state, t.value)
        for t in searcher._ot_study.get_trials(deepcopy=False)  # the study Tune saved
    }
    assert set(told) == {5e-4, 1e5}
    # finished, and worse than any finite score (PRUNED ranked it by step among pruned trials)
    assert told[1e5] == (TrialState.COMPLETE, float("-inf"))
    assert told[5e-4][0] == TrialState.COMPLETE and math.isfinite(told[5e-4][1])
    # the table, MLflow and the checkpoints treat it as before: every trial at the high rate
    # diverged, every one at the low rate finished or was stopped early by ASHA, and the best
    # is one of those that finished
    assert all(t.status == "diverged" for t in by_lr[1e5])
    assert all(t.status in ("ok", STOPPED) for t in by_lr[5e-4])
    assert all((t.steps < 8) == (t.status == STOPPED) for t in by_lr[5e-4])
    finished = [t for t in res.trials if t.status == "ok"]
    assert res.best is not None and res.best in finished
    assert res.best.metric == max(t.metric for t in finished)
    bad = by_status["diverged"]
    assert bad.metric is None and bad.error.startswith("diverged at step")
    assert all(t.metric is None and t.error.startswith("diverged at step") for t in by_lr[1e5])
    runs = {
        r.data.tags["radjepa.trial_id"]: r for r in _child_runs(res.tracking_uri, res.parent_run_id)
    }
    diverged = [runs[t.trial_id] for t in res.trials if t.status == "diverged"]
    assert {r.info.status for r in diverged} == {"FAILED"}
    assert all("radjepa.diverged_at_step" in r.data.tags for r in diverged)
    assert all(r.data.tags["radjepa.status"] == "diverged" for r in diverged)
    # trials ASHA stopped are closed too
    assert {runs[t.trial_id].info.status for t in by_lr[5e-4]} == {"FINISHED"}
    parent = mlflow.MlflowClient(res.tracking_uri).get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED"
    # pruned as after a sweep without failures: only the best trial's checkpoints stay
    pruning = cfg.with_overrides({"tune.trial_checkpoints": "best"})
    rows, tidied = _tidy_checkpoints(
        pruning, res.trials, res.best, str(tmp_path / "onan" / "trials")
    )
    assert tidied is not None and tidied.folders >= 1
    left = _checkpoints(tmp_path / "onan")
    assert {k for k, c in left.items() if c} == {res.best.trial_id}
    assert all(left[t.trial_id] == [] for t in by_lr[1e5])
    assert [r.checkpoint is not None for r in rows] == [r is res.best for r in res.trials]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interruption_while_the_parent_run_is_set_up_ends_it_killed(tmp_path, sig):
    # a Ctrl-C or SIGTERM after the sweep's MLflow parent run was created and before the trials'
    # try began (its params logged, its id file written) left the run RUNNING for good, under
    # the "interrupted before its trials started" line. The id file is a named pipe here: the
    # sweep blocks writing it, right after creating the run, until the signal has been sent.
    import os
    import signal

    import mlflow
    from interrupts import signal_once_run_is_made
    from shard_tables import write_blank_shards

    shards = write_blank_shards(tmp_path)
    sweep_dir = tmp_path / "setup"
    sweep_dir.mkdir()
    os.mkfifo(sweep_dir / "mlflow_parent_run_id")
    db = tmp_path / "mlflow.db"
    space = '{"ema.start": {"type": "grid", "values": [0.99, 0.996]}}'
    sets = {"tune.search_space": space, "tracking.uri": f"sqlite:///{db}"}
    proc = _sweep_cli(tmp_path, "setup", sets, "--data", str(shards))
    run_id, err = signal_once_run_is_made(
        proc, db, "setup", sweep_dir / "mlflow_parent_run_id", getattr(signal, sig)
    )
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: sweep 'setup' was interrupted"), err
    status = mlflow.MlflowClient(f"sqlite:///{db}").get_run(run_id).info.status
    assert status == "KILLED"


def test_a_labels_csv_or_column_that_is_not_there_is_said_naming_the_tune_keys(tmp_path):
    # a missing labels CSV or column escaped as a traceback, naming neither tune key
    from pipelines.sweep import SweepError, _probe_set

    space = {"ema.start": {"type": "choice", "values": [0.99]}}
    missing = tmp_path / "labels.csv"
    cfg = _cfg(
        tmp_path,
        "s",
        space,
        **{"tune.metric": "knn_auroc", "tune.labels_csv": str(missing), "tune.label_column": "x"},
    )
    with pytest.raises(SweepError, match=r"tune\.labels_csv=.*labels\.csv.* not found"):
        _probe_set(cfg)
    missing.write_text("image,patient_id,Effusion\na.png,p1,1\n")
    with pytest.raises(SweepError, match=r"tune\.label_column=x: .*missing column\(s\) \['x'\]"):
        _probe_set(cfg)


def test_a_store_failing_as_the_sweep_is_recorded_is_said_and_resume_records_it(
    nih_shards, tmp_path, monkeypatch
):
    # the tracking store failing after best.yaml was written escaped as MLflow's traceback,
    # marked the finished sweep FAILED and skipped the tidy step
    import mlflow

    from pipelines import sweep_tracking
    from pipelines.sweep import SweepError, run_sweep
    from pipelines.tracking import store_uri

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    finish = sweep_tracking._finish_parent_run

    def to_a_server_that_is_down(uri, *args):
        finish("http://127.0.0.1:9", *args)  # a port nothing listens on

    monkeypatch.setattr(sweep_tracking, "_finish_parent_run", to_a_server_that_is_down)
    space = {"masks.target_scale": {"type": "grid", "values": [[0.1, 0.15], [0.2, 0.3]]}}
    cfg = _cfg(tmp_path, "sf", space)
    best_yaml = tmp_path / "sf" / "best.yaml"
    with pytest.raises(SweepError) as said:
        run_sweep(cfg, str(nih_shards))
    message = str(said.value)
    assert message.startswith(f"sweep 'sf' finished (best config: {best_yaml}) but recording")
    assert "MLflow failed: " in message and "\n" not in message
    assert message.endswith("re-run the same command with --resume to record it")
    assert best_yaml.is_file()
    assert sum(bool(c) for c in _checkpoints(tmp_path / "sf").values()) == 1  # tidied
    parent_id = (tmp_path / "sf" / "mlflow_parent_run_id").read_text().strip()
    uri = store_uri(cfg)
    client = mlflow.MlflowClient(uri)
    assert client.get_run(parent_id).info.status == "RUNNING"  # not FAILED

    monkeypatch.setattr(sweep_tracking, "_finish_parent_run", finish)  # the store is back
    res = run_sweep(cfg, str(nih_shards), resume=True)
    assert res.parent_run_id == parent_id and res.best is not None
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["radjepa.best_trial"] == res.best.trial_id
    assert parent.data.metrics["best_rankme"] == res.best.metric
    for child in _child_runs(uri, parent_id):  # finished once: no step trained again
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        assert sorted(steps) == list(range(1, 9)) and child.info.status == "FINISHED"


def test_a_resume_with_other_settings_is_refused_naming_them(tmp_path, caplog):
    # --resume with another base config trained the trials Tune had not started with it, in
    # silence: the sweep compared trials trained two ways
    from pipelines.sweep import SweepError
    from pipelines.sweep_settings import SWEEP_CONFIG_FILE, keep_sweep_config

    space = {"ema.start": {"type": "choice", "values": [0.99, 0.996]}}
    sweep_dir = str(tmp_path / "s")
    data = str(tmp_path / "shards")
    secret = {"tracking.uri": "postgresql://u:S3cret@db/mlflow", "tune.search_alg": "random"}
    started = _cfg(tmp_path, "s", space, **secret)
    keep_sweep_config(started, data, sweep_dir, resume=False)
    saved = (tmp_path / "s" / SWEEP_CONFIG_FILE).read_text()
    assert "S3cret" not in saved and '"ema.end"' in saved

    # what a resume may change: the trial count (ignored), the cluster's share, retries
    same = started.with_overrides(
        {"tune.num_samples": 9, "tune.max_concurrent": 3, "train.max_failures": 2}
    )
    keep_sweep_config(same, data, sweep_dir, resume=True)
    other = started.with_overrides({"ema.end": 0.999, "train.steps": 16})
    with pytest.raises(SweepError) as said:
        keep_sweep_config(other, data, sweep_dir, resume=True)
    message = str(said.value)
    assert message.startswith("sweep 's' was started with other settings (ema.end 1.0 -> 0.999")
    assert "train.steps 8 -> 16" in message and "\n" not in message
    assert "tune.num_samples" not in message and "S3cret" not in message
    with pytest.raises(SweepError, match=r"\(data '.*shards' -> '.*elsewhere'\)"):
        keep_sweep_config(started, str(tmp_path / "elsewhere"), sweep_dir, resume=True)
    assert (tmp_path / "s" / SWEEP_CONFIG_FILE).read_text() == saved  # refused: kept

    allowed = other.with_overrides({"train.allow_config_change": True})
    with caplog.at_level("WARNING", logger="pipelines.sweep_settings"):
        keep_sweep_config(allowed, data, sweep_dir, resume=True)
    assert "resumes with changed settings" in caplog.text and "ema.end" in caplog.text
    keep_sweep_config(other, data, sweep_dir, resume=True)  # now the sweep's settings

    # a file cut short as it was written (a full disk, a kill): said, and saved again, not a
    # JSONDecodeError traceback
    (tmp_path / "s" / SWEEP_CONFIG_FILE).write_text('{"ema.start": "0.9')
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipelines.sweep_settings"):
        keep_sweep_config(started, data, sweep_dir, resume=True)
    assert "cannot be read" in caplog.text
    keep_sweep_config(other, data, sweep_dir, resume=False)  # a new sweep writes it afresh
    with pytest.raises(SweepError):
        keep_sweep_config(started, data, sweep_dir, resume=True)


@pytest.mark.timeout(300)
def test_a_ctrl_c_before_tune_made_a_trial_is_an_interruption_not_an_empty_sweep(
    nih_shards, tmp_path, monkeypatch
):
    # Tune makes its trials as its loop steps: a Ctrl-C (or a SIGTERM, routed as one) after it
    # set its handler and before its first step left no trial at all, and the sweep returned
    # as finished with none (no error, exit 0). The signal is raised right after Tune's
    # handler is set.
    import importlib
    import signal

    from pipelines.sweep import SweepInterrupted, run_sweep

    tune_run = importlib.import_module("ray.tune.tune")
    setup = tune_run._setup_signal_catching

    def then_ctrl_c():
        event = setup()
        signal.raise_signal(signal.SIGINT)  # to Tune's handler, just set
        return event

    monkeypatch.setattr(tune_run, "_setup_signal_catching", then_ctrl_c)
    space = {"ema.start": {"type": "grid", "values": [0.99, 0.996]}}
    with pytest.raises(SweepInterrupted, match="before its trials started; re-run the same"):
        run_sweep(_cfg(tmp_path, "early", space), str(nih_shards))
    monkeypatch.setattr(tune_run, "_setup_signal_catching", setup)
    # Tune cannot restore a sweep without trials (it restarted with one of the two): its
    # state is gone, and the same command runs the sweep
    again = run_sweep(_cfg(tmp_path, "early", space), str(nih_shards))
    assert [t.status for t in again.trials] == ["ok", "ok"] and again.best is not None


def test_an_interrupted_sweep_counts_the_trials_tune_never_made(tmp_path):
    # Tune makes trials as its loop steps, one at a time where the searcher is limited to
    # tune.max_concurrent: a sweep interrupted between two trials held only finished ones, and
    # ended as finished with a best of those. The count planned at the start is what a
    # resumed sweep counts its own by (its config may no longer say it: Tune keeps its trials)
    from pipelines.sweep import _never_made, _planned

    space = {"ema.start": {"type": "grid", "values": [0.99, 0.996, 0.998]}}
    assert _planned(_cfg(tmp_path, "n", space), str(tmp_path), resume=False) == 3
    other = {"ema.start": {"type": "grid", "values": [0.99]}}
    planned = _planned(_cfg(tmp_path, "n", other), str(tmp_path), resume=True)
    assert [_never_made(planned, made) for made in (0, 1, 3)] == [3, 2, 0]
    # a sweep started before the count was saved: one missing only when it holds no trial
    unknown = _planned(_cfg(tmp_path, "n", other), str(tmp_path / "older"), resume=True)
    assert unknown is None and [_never_made(None, made) for made in (0, 2)] == [1, 0]


@pytest.mark.parametrize("state", ["none", "no trials", "cut short"])
def test_a_sweep_tune_cannot_restore_is_refused_by_resume_and_replaced_when_empty(tmp_path, state):
    # Tune writes tuner.pkl when the Tuner is made and its state only as its loop steps: a
    # sweep stopped between the two (or whose newest state a killed driver cut short) passed
    # the --resume check, Tune's restore failed and it went on with one trial of the base
    # config, reported finished with its best; and a new sweep of the name was refused
    from pipelines.sweep import SweepError
    from pipelines.sweep_settings import check_sweep_dir

    tune = tmp_path / "s" / "tune"
    tune.mkdir(parents=True)
    (tune / "tuner.pkl").write_bytes(b"\x80\x04N.")
    if state == "no trials":
        (tune / "experiment_state-2026-12-07_10-00-00.json").write_text('{"trial_data": []}')
    if state == "cut short":
        (tune / "experiment_state-2026-12-07_09-00-00.json").write_text('{"trial_data": [1]}')
        (tune / "experiment_state-2026-12-07_10-00-00.json").write_text('{"trial_da')
    cfg = _cfg(tmp_path, "s", {"ema.start": {"type": "grid", "values": [0.99]}})
    said = {
        "none": "no state saved at .*remove .* without --resume",
        "no trials": "before Tune made its first trial",
        "cut short": "cannot be read",
    }[state]
    with pytest.raises(SweepError, match=said):
        check_sweep_dir(cfg, str(tmp_path / "s"), resume=True)
    if state == "no trials":  # it ended so, nothing of it to keep: a new sweep takes its place
        check_sweep_dir(cfg, str(tmp_path / "s"), resume=False)
        assert not tune.exists()
        return
    # none: a run of it may be starting (a second start deleted its folder under it); cut
    # short: Tune may restore trials from the state before it
    refused = "no state saved" if state == "none" else "already exists"
    with pytest.raises(SweepError, match=refused):
        check_sweep_dir(cfg, str(tmp_path / "s"), resume=False)
    assert (tune / "tuner.pkl").exists()


@pytest.mark.timeout(300)
def test_a_ctrl_c_after_tune_s_fit_stops_the_sweep_not_a_tune_run_long_over(tmp_path, monkeypatch):
    # Tune leaves its SIGINT handler after a fit nobody interrupted: a Ctrl-C (or a SIGTERM of
    # `radjepa jobs stop`, routed as one) while the driver wrote the results, recorded them or
    # deleted checkpoints only made Tune say it was ending its run, and the sweep went on
    import signal

    from shard_tables import write_blank_shards

    import pipelines.sweep as sweep

    free = sweep._free_last_trials

    def then_ctrl_c():
        free()
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(sweep, "_free_last_trials", then_ctrl_c)
    # pressed again as the sweep's runs are ended: resumable still (it was said to have been
    # interrupted before its trials started, and the re-run it advised was refused)
    end_runs, pressed = sweep.end_sweep_runs, []

    def again(*args):
        if not pressed:
            pressed.append(True)
            raise KeyboardInterrupt
        return end_runs(*args)

    monkeypatch.setattr(sweep, "end_sweep_runs", again)
    shards = write_blank_shards(tmp_path / "shards")
    cfg = _cfg(tmp_path, "after", {"ema.start": {"type": "grid", "values": [0.99]}})
    cfg = cfg.with_overrides({"train.steps": 2, "train.checkpoint_every": 2})
    # Ctrl-C raises, as in a terminal (a job started in the background, as CI may run this
    # suite, starts with SIGINT ignored, which the sweep rightly puts back)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(sweep.SweepInterrupted, match="interrupted; the sweep is resumable"):
            sweep.run_sweep(cfg, str(shards))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert pressed and not (tmp_path / "after" / "best.yaml").exists()


def test_a_probe_set_whose_folds_train_on_one_class_is_refused_before_any_trial(tmp_path, nih_dir):
    # the probe skips a label whose fold trains on one class (its constant scores decided the
    # AUROC): with probe_auroc that fixed by the data, every report of every trial was NaN and
    # the sweep ended without a best after spending its compute. Three patients, one of them
    # all positive: at probe.seed=0 a fold trains on it alone
    from pipelines.sweep import SweepError, _probe_set

    images = sorted((nih_dir / "images").glob("*.png"))
    y = [1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0]
    patients = ["a"] * 4 + ["b"] * 3 + ["c"] * 4
    rows = "".join(
        f"{images[i]},{p},{v}\n" for i, (p, v) in enumerate(zip(patients, y, strict=True))
    )
    csv = tmp_path / "labels.csv"
    csv.write_text("image,patient_id,Effusion\n" + rows)
    space = {"ema.start": {"type": "choice", "values": [0.99]}}
    sets = {"tune.labels_csv": str(csv), "tune.label_column": "Effusion", "probe.seed": 0}
    cfg = _cfg(tmp_path, "s", space, **{"tune.metric": "probe_auroc", **sets})
    with pytest.raises(SweepError, match="a fold's training side holds one class.*probe.seed"):
        _probe_set(cfg)
    # kNN AUROC fits no probe: the same set ranks trials
    assert _probe_set(cfg.with_overrides({"tune.metric": "knn_auroc"})) is not None


def test_trials_train_on_the_shards_the_sweep_inspected_not_a_later_listing(
    nih_shards, tmp_path, monkeypatch
):
    # each trial listed the folder again as it started (hours after the driver's inspection
    # on a busy cluster): a shard written meanwhile was trained on, though the sweep's row
    # counts and data fingerprint did not cover it; a damaged one failed every trial
    import shutil

    import pipelines.sweep as sweep

    plain = tmp_path / "plain"  # a folder of shards (no DST manifest: any Parquet is a shard)
    plain.mkdir()
    for shard in sorted((nih_shards / "images").glob("*.parquet")):
        shutil.copy(shard, plain / shard.name)
    after_inspection = sweep._probe_set

    def then_a_shard_lands(cfg):  # the driver's step after inspect_shards
        (plain / "zz-late.parquet").write_bytes(b"")  # a copy still on its way
        return after_inspection(cfg)

    monkeypatch.setattr(sweep, "_probe_set", then_a_shard_lands)
    space = {"masks.target_scale": {"type": "grid", "values": [[0.1, 0.15]]}}
    cfg = _cfg(tmp_path, "late", space, **{"train.steps": 2, "train.checkpoint_every": 2})
    res = sweep.run_sweep(cfg, str(plain))
    assert [(t.status, t.error) for t in res.trials] == [("ok", None)]

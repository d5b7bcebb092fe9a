"""The Ray Train pretraining job on real ingested radiographs: learning, checkpoints, MLflow,
failure recovery and resume (one real Ray instance, two DDP workers on CPU)."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import pytest

from radjepa.config import flatten, load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def shards(nih_shards) -> Path:
    return nih_shards


SETS = {
    "train.run_name": "t",
    "train.num_workers": 2,
    "train.batch_size": 8,
    "train.steps": 30,
    "train.log_every": 1,
    "train.checkpoint_every": 6,
    "train.keep_checkpoints": 2,
    "train.max_failures": 1,
    "data.holdout_fraction": 0.0,
}


def _cfg(out: Path, **extra):
    return load_config(CONFIGS / "tiny_cpu.yaml", {"train.output_dir": str(out), **SETS, **extra})


@pytest.fixture(scope="module")
def first_runs(shards, tmp_path_factory):
    """``first_runs(**sets)``: the folder and result of ``run_pretrain(_cfg(folder, **sets))``,
    trained once per module and settings (tests re-run it in their own copy, ``_trained``)."""
    from pipelines.pretrain import run_pretrain

    done: dict[tuple, tuple[Path, object]] = {}

    def first_run(**sets) -> tuple[Path, object]:
        key = tuple(sorted((k, repr(v)) for k, v in {**SETS, **sets}.items()))
        if key not in done:
            out = tmp_path_factory.mktemp("first-run")
            done[key] = out, run_pretrain(_cfg(out, **sets), str(shards))
        return done[key]

    return first_run


def _trained(first_runs, tmp_path: Path, **sets):
    """What ``run_pretrain(_cfg(tmp_path, **sets), shards)`` returns, and leaves in
    ``tmp_path``: a copy of the module's one run with these settings (tests/run_copies.py)."""
    from run_copies import copy_run, moved

    out, result = first_runs(**sets)
    return moved(result, copy_run(out, tmp_path))


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow

    hist = mlflow.MlflowClient(uri).get_metric_history(run_id, key)
    return [(m.step, m.value) for m in hist]


def _steps(uri: str, run_id: str) -> tuple[list[int], list[int]]:
    """The steps of the loss curve, and those of its replays (steps redone after a resume,
    logged as ``replay/loss`` so the curve keeps one value per step)."""
    main, replay = (sorted(s for s, _ in _history(uri, run_id, k)) for k in ("loss", "replay/loss"))
    return main, replay


def test_two_workers_learn_survive_a_failure_and_register(shards, tmp_path):
    import mlflow

    from pipelines.pretrain import FAILURE_MARKER, run_pretrain

    # rank 0 dies right after it reported the step-12 checkpoint, within the controller's
    # poll: Ray records a checkpoint only once a poll has collected every rank's report, so it
    # dropped this one (whole in the run folder) and the group restarted from step 6
    cfg = _cfg(tmp_path, **{"train.fail_at_step": 12, "train.fail_by": "kill"})
    res = run_pretrain(cfg, str(shards))

    # completed with the right final step count, after exactly one injected failure
    assert res.metrics["step"] == 30
    assert (tmp_path / "t" / FAILURE_MARKER).read_text() == "12"
    meta = json.loads((Path(res.checkpoint) / "meta.json").read_text())
    assert meta["step"] == 30

    # the restart resumed from the step-12 checkpoint: no step ran twice and none was skipped;
    # the loss curve has one value per step, and the run says it was resumed
    assert _steps(res.tracking_uri, res.mlflow_run_id) == (list(range(1, 31)), [])
    tags = mlflow.MlflowClient(res.tracking_uri).get_run(res.mlflow_run_id).data.tags
    assert tags["radjepa.resumes"] == "1" and tags["radjepa.resumed_from_step"] == "12"

    # loss falls
    by_step = dict(sorted(_history(res.tracking_uri, res.mlflow_run_id, "loss")))
    losses = [by_step[s] for s in sorted(by_step)]
    assert all(v == v for v in losses)  # no NaN
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5

    # checkpoints kept on disk: the last K (the step-12 folder the restart resumed from was
    # reported again, so Ray recorded it and pruned it with the others)
    ckpts = sorted(p for p in (tmp_path / "t").glob("checkpoint_*") if p.is_dir())
    assert {json.loads((p / "meta.json").read_text())["step"] for p in ckpts} == {24, 30}

    # MLflow: params, metrics, artifacts, registered version
    client = mlflow.MlflowClient(res.tracking_uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.data.params["masks.num_targets"] == "4"
    for key in ("loss", "lr", "momentum", "img_per_s", "rankme", "feature_std"):
        assert key in run.data.metrics, key
    arts = {a.path for a in client.list_artifacts(res.mlflow_run_id)}
    assert {"config.yaml", "checkpoint-step-30"} <= arts
    model_files = {a.path for a in client.list_artifacts(res.mlflow_run_id, "checkpoint-step-30")}
    assert model_files == {"checkpoint-step-30/weights.safetensors", "checkpoint-step-30/meta.json"}
    versions = client.search_model_versions("name='radjepa-encoder'")
    assert [str(v.version) for v in versions] == [res.model_version]
    assert versions[0].source.endswith("/checkpoint-step-30")
    assert run.info.status == "FINISHED"

    # nothing in any worker's log repeats per second (the cleaner's state-API warning), warns
    # about the monitor images (read-only after their trip through the object store), or is
    # the preemption watcher's error line (a cloud-node watcher, off on a local instance), or
    # is Ray Data's deprecation warning about the options Ray Train's default feeds it, or its
    # advice to turn the training stream's progress bars (off on purpose) back on in Python
    markers = (
        CLEANER_QUERY_FAILED,
        "not writable",
        "PreemptionWatcher",
        "exclude_resources",
        "Progress bars disabled",
        "Progress will be logged",  # and the bars are off in the run's data coordinator
        "Total Progress",
    )
    noisy = {
        p.name: marker
        for p in _worker_logs()
        for marker in markers
        if marker in p.read_text(errors="replace")
    }
    assert not noisy


CLEANER_QUERY_FAILED = "Failed to query Ray Train Controller actor state"


def _worker_logs() -> list[Path]:
    """The log files of every Ray worker process this session has started."""
    from processes import ray_logs_dir

    logs = ray_logs_dir()
    files = sorted(logs.glob("worker-*"))
    assert files, logs
    return files


def test_the_data_coordinator_is_asked_for_before_the_model_code_is_imported():
    # rank 0's get_dataset_shard starts the run's data coordinator, an actor of its own: asked
    # for after the worker imported the model code (timm, ~1.5 s) and built the model, every
    # run's first batch waited for both, one after the other. The order in the loop's code
    import ast
    import inspect
    import textwrap

    from pipelines.pretrain import train_loop

    body = ast.parse(textwrap.dedent(inspect.getsource(train_loop))).body[0].body
    lines = [ast.unparse(node) for node in body]
    shard = next(i for i, line in enumerate(lines) if "get_dataset_shard" in line)
    engine = next(i for i, line in enumerate(lines) if "radjepa.engine" in line)
    model = next(i for i, line in enumerate(lines) if "Pretrainer(" in line)
    assert shard < engine < model, lines[: model + 1]


def test_local_worker_hook_drops_only_the_cleaners_warning_and_ray_datas_advice(
    caplog, ray_session, monkeypatch
):
    # no state API query leaves a local instance's worker: Ray sent it to the dashboard address
    # the GCS records even without a dashboard (127.0.0.1:8265: a port-forward to a cluster's
    # dashboard answered "no such actor", and Ray Train's placement-group cleaner removed the
    # run's placement group), to the shell's RAY_API_SERVER_ADDRESS, or raised with two
    # instances on the machine; here, where Ray resolves it in a worker
    from ray.dashboard.utils import get_address_for_submission_client

    from pipelines.runtime import (
        _PG_CLEANER_LOGGER,
        _RAY_DATA_PROGRESS_LOGGER,
        LOCAL_RUNTIME_ENV,
        NO_STATE_API_URL,
        quiet_local_worker_logs,
    )

    @ray_session.remote(num_cpus=0)
    def state_api_url() -> str:
        return get_address_for_submission_client(None)

    assert ray_session.get(state_api_url.remote()) == NO_STATE_API_URL
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://elsewhere:8265")
    assert LOCAL_RUNTIME_ENV["worker_process_setup_hook"].endswith(".quiet_local_worker_logs")
    quiet_local_worker_logs()
    assert get_address_for_submission_client(None) == NO_STATE_API_URL
    quiet_local_worker_logs()  # each worker runs it once; twice adds nothing
    logger = logging.getLogger(_PG_CLEANER_LOGGER)
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=_PG_CLEANER_LOGGER):
        logger.warning(CLEANER_QUERY_FAILED + ". State API may be temporarily unavailable.")
        logger.warning("Detected that the Ray Train controller actor (x) is dead.")
    assert [r.getMessage() for r in caplog.records] == [
        "Detected that the Ray Train controller actor (x) is dead."
    ]
    caplog.clear()
    data = logging.getLogger(_RAY_DATA_PROGRESS_LOGGER)
    assert len(data.filters) == 1
    with caplog.at_level(logging.INFO, logger=_RAY_DATA_PROGRESS_LOGGER):
        data.warning(
            "Progress bars disabled. To enable, set "
            "`ray.data.DataContext.get_current().enable_progress_bars = True`."
        )
        data.info("Progress will be logged because stdout is a non-interactive terminal.")
    assert [r.getMessage() for r in caplog.records] == [
        "Progress will be logged because stdout is a non-interactive terminal."
    ]


def test_rerunning_a_finished_run_continues_from_its_checkpoint(shards, tmp_path):
    # outputs on a URI (s3:// on a cluster; file:// here, same pyarrow code path) with an
    # explicit tracking store: the MLflow run id and checkpoints are found there on resume
    from pipelines.pretrain import run_pretrain

    out = (tmp_path / "out").as_uri()
    sets = {"train.num_workers": 1, "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    first = run_pretrain(_cfg(out, **sets, **{"train.steps": 4}), str(shards))
    assert first.metrics["step"] == 4
    assert first.checkpoint.startswith(out + "/t/checkpoint_")
    assert first.run_dir == out + "/t"
    assert (tmp_path / "out" / "t" / "mlflow_run_id").read_text() == first.mlflow_run_id
    again = run_pretrain(_cfg(out, **sets, **{"train.steps": 6}), str(shards))
    assert again.metrics["step"] == 6
    assert again.mlflow_run_id == first.mlflow_run_id
    assert again.model_version == "2"  # the registered model got the new weights
    # ... and version 1 still points at the step-4 weights, not at the files of step 6
    import mlflow

    client = mlflow.MlflowClient(again.tracking_uri)
    v1 = client.get_model_version("radjepa-encoder", "1")
    assert v1.source.endswith("/checkpoint-step-4") and v1.tags["step"] == "4"
    # running a finished run again has no new weights: no duplicate version
    same = run_pretrain(_cfg(out, **sets, **{"train.steps": 6}), str(shards))
    assert same.model_version == "2"
    assert len(client.search_model_versions("name='radjepa-encoder'")) == 2
    assert (tmp_path / "mlartifacts").is_dir()  # beside the sqlite store, not in the cwd
    steps = [s for s, _ in _history(again.tracking_uri, again.mlflow_run_id, "loss")]
    assert sorted(steps) == list(range(1, 7))  # continued at 5, nothing repeated
    # what it needs to be reproduced, though --data left data.shards unset: which images,
    # which code, which libraries; the resume records its own beside the originals
    from radjepa.training_data import inspect_shards

    tags = client.get_run(first.mlflow_run_id).data.tags
    assert client.get_run(first.mlflow_run_id).data.params["data.shards"] == "None"
    assert tags["radjepa.data"] == str(shards)
    assert tags["radjepa.data_fingerprint"] == inspect_shards(str(shards), _cfg(out)).fingerprint
    assert len(tags["mlflow.source.git.commit"]) == 40
    for key in ("radjepa.data_fingerprint", "radjepa.torch_version", "radjepa.ray_version"):
        assert tags[key] == tags["radjepa.resumed_with." + key.removeprefix("radjepa.")], key


def test_a_worker_lost_right_after_the_last_checkpoint_ends_the_run_with_it(shards, tmp_path):
    # the last step's checkpoint written whole but not recorded by Ray (its worker gone within
    # a poll of the report): the restarted group continued from it, had nothing left to train
    # and reported nothing, so the run's result and registered version were the step-2 one
    from pipelines.pretrain import run_pretrain

    sets = {"train.num_workers": 1, "train.steps": 4, "train.checkpoint_every": 2}
    sets |= {"train.fail_at_step": 4, "train.fail_by": "kill"}
    res = run_pretrain(_cfg(tmp_path, **sets), str(shards))
    assert res.metrics["step"] == 4
    assert json.loads((Path(res.checkpoint) / "meta.json").read_text())["step"] == 4
    import mlflow

    (version,) = mlflow.MlflowClient(res.tracking_uri).search_model_versions(
        "name='radjepa-encoder'"
    )
    assert version.source.endswith("/checkpoint-step-4")


def test_clear_errors_before_any_cluster_work(tmp_path, shards):
    from pipelines.pretrain import PretrainError, run_pretrain
    from radjepa.training_data import TrainingDataError, inspect_shards

    with pytest.raises(TrainingDataError, match="no shards"):
        inspect_shards(str(tmp_path / "missing"), _cfg(tmp_path))
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(TrainingDataError, match="no Parquet shards .*run `radjepa ingest"):
        inspect_shards(str(tmp_path / "empty"), _cfg(tmp_path))
    with pytest.raises(TrainingDataError, match="cannot read shards at nosuch://"):
        inspect_shards("nosuch://bucket/shards", _cfg(tmp_path))
    big = _cfg(tmp_path, **{"model.img_size": 512, "data.crop_size": 512, "ingest.image_size": 512})
    with pytest.raises(TrainingDataError, match="larger than the stored images"):
        inspect_shards(str(shards), big)
    with pytest.raises(TrainingDataError, match="global batch"):
        inspect_shards(str(shards), _cfg(tmp_path, **{"train.batch_size": 64}))
    # the job reports the library's checks as its own one-line errors, before Ray starts
    too_big = _cfg(tmp_path, **{"train.batch_size": 64})
    with pytest.raises(PretrainError, match="global batch") as err:
        run_pretrain(too_big, str(shards))
    assert err.value.__cause__ is None and not (tmp_path / too_big.train.run_name).exists()


def test_a_storage_failure_reading_the_shards_is_one_line_saying_to_re_run(tmp_path, monkeypatch):
    # an object store's SLOW_DOWN or a network error while the shards were inspected escaped
    # run_pretrain (and run_sweep) as a traceback: only damaged files were said in one line
    from pipelines.pretrain import PretrainError, run_pretrain
    from tests.read_only_fs import ReadOnlyLocalFs, read_shards_through
    from tests.shard_tables import write_blank_shards

    class FailingStorage(ReadOnlyLocalFs):
        """The local disk, whose reads of file contents fail as an object store's do when it
        throttles (listing still answers)."""

        name = "failing"

        def open_input_file(self, path: str):
            raise OSError(
                "When reading information for key 'images/part-0.parquet' in bucket "
                "'pacs-dst': AWS Error SLOW_DOWN during GetObject operation: Please reduce "
                "your request rate.\nmore"
            )

    data = str(write_blank_shards(tmp_path, n=64, size=64))
    read_shards_through(monkeypatch, FailingStorage())
    cfg = _cfg(tmp_path, **{"data.crop_size": 64, "model.img_size": 64})
    with pytest.raises(PretrainError) as stopped:
        run_pretrain(cfg, data)
    assert str(stopped.value) == (
        f"cannot read the shards at {data}: When reading information for key "
        "'images/part-0.parquet' in bucket 'pacs-dst': AWS Error SLOW_DOWN during GetObject "
        "operation: Please reduce your request rate; re-run when the storage answers"
    )
    assert stopped.value.__cause__ is None


def test_a_damaged_shard_is_named_without_reading_every_footer_after_it(tmp_path):
    # once a read failed, every shard's footer was read to list every damaged one: one
    # request per shard on an object store, tens of thousands of them, before the message
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "images"
    folder.mkdir()
    for s in range(6):
        n = 16
        table = pa.table(
            {
                "image_id": [f"{s}-{i}" for i in range(n)],
                "height": [64] * n,
                "width": [64] * n,
                "dtype": ["uint8"] * n,
            }
        )
        pq.write_table(table, folder / f"part-{s}.parquet")
    for s in (2, 4):  # zero bytes, as a write a crash cut short leaves them
        (folder / f"part-{s}.parquet").write_bytes(b"")
    cfg = _cfg(tmp_path, **{"data.crop_size": 64, "model.img_size": 64})
    message = _inspection_refused(tmp_path, cfg)
    assert message.startswith(f"{folder}/part-2.parquet is damaged, no whole Parquet file")
    assert "part-4" not in message


def test_shard_pages_changed_after_ingest_are_named_as_damage_not_as_storage(tmp_path):
    # ingest writes page checksums and the reads check them: an id page a disk or a copy
    # changed read as other ids (other hold-out, other fingerprint), or failed naming no file
    import numpy as np

    from radjepa.training_data import inspect_shards, shard_dataset
    from tests.test_shards import corrupt_pages, ingest_written_shard

    rng = np.random.default_rng(0)
    images = (rng.integers(0, 16, (40, 64, 64)) * 8).astype(np.uint8)
    path = ingest_written_shard(tmp_path, images, [f"{i:064x}" for i in range(40)])
    cfg = _cfg(tmp_path, **{"data.crop_size": 64, "model.img_size": 64, "train.batch_size": 4})
    assert inspect_shards(str(tmp_path), cfg).rows == 40
    corrupt_pages(path, "image_id")
    message = _inspection_refused(tmp_path, cfg)
    assert message.startswith(f"{path} is damaged: its bytes changed after ingest wrote them (")
    assert "CRC checksum verification failed" in message and "storage" not in message
    # the dataset every library reader takes checks the pixel pages too
    corrupt_pages(path, "pixels")
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        shard_dataset(str(tmp_path)).to_table(columns=["pixels"])


def test_a_damaged_page_header_names_its_shard_and_is_not_called_an_outage(tmp_path):
    # a page header (which no checksum covers) or a compressed block of a shard written
    # before checksums no longer decoding: the footer is whole, so no shard was named, and the
    # message advised re-running "when the storage answers", which never helps
    import numpy as np

    from tests.test_shards import corrupt_page_header, ingest_written_shard

    images = np.random.default_rng(0).integers(0, 256, (500, 64, 64)).astype(np.uint8)
    path = ingest_written_shard(tmp_path, images, [f"{i:064x}" for i in range(500)])
    corrupt_page_header(path, "image_id")
    cfg = _cfg(tmp_path, **{"data.crop_size": 64, "model.img_size": 64, "train.batch_size": 4})
    message = _inspection_refused(tmp_path, cfg)
    assert message.startswith(f"{path} is damaged: its bytes changed after ingest wrote them (")
    assert "storage" not in message


def _inspection_refused(data, cfg) -> str:
    """The message ``inspect_shards`` refuses the shards at ``data`` with."""
    from radjepa.training_data import TrainingDataError, inspect_shards

    with pytest.raises(TrainingDataError) as stopped:
        inspect_shards(str(data), cfg)
    assert stopped.value.__cause__ is None
    return str(stopped.value)


def test_a_shard_without_a_column_the_first_has_is_refused_in_one_line(tmp_path):
    # the dataset's schema is the first shard's: a later shard without `dtype` read as nulls,
    # and the check of the dtypes failed sorting them (a TypeError traceback)
    import numpy as np
    import pyarrow.parquet as pq

    from radjepa.training_data import TrainingDataError, inspect_shards
    from tests.test_shards import ingest_written_shard

    images = np.random.default_rng(0).integers(0, 256, (8, 64, 64)).astype(np.uint8)
    path = ingest_written_shard(tmp_path, images, [f"{i:064x}" for i in range(8)])
    pq.write_table(pq.read_table(path).drop(["dtype"]), str(path).replace("00000", "00001"))
    cfg = _cfg(tmp_path, **{"data.crop_size": 64, "model.img_size": 64, "train.batch_size": 4})
    with pytest.raises(TrainingDataError, match="hold images without dtype: a shard of another"):
        inspect_shards(str(tmp_path), cfg)


def test_a_run_records_the_decode_settings_its_shards_were_made_with(tmp_path, shards, caplog):
    """The checkpoint recorded the config's ingest section, whatever the shards were made
    with, and the served model decodes uploads by it: shards ingested at other settings were
    served otherwise than every image the encoder learnt from."""
    from radjepa.training_data import inspect_shards, with_stored_decode

    made = json.loads((shards / "manifest.json").read_text())["image"]
    other = _cfg(
        tmp_path,
        **{"ingest.dtype": "uint16", "ingest.window_percentiles": [2.0, 98.0]},
    )
    info = inspect_shards(str(shards), other)
    assert info.window == tuple(made["window_percentiles"])
    with caplog.at_level("WARNING", logger="radjepa"):
        adopted = with_stored_decode(other, info)
    ing = adopted.ingest
    assert (ing.image_size, ing.dtype) == (made["size"], made["dtype"])
    assert list(ing.window_percentiles) == made["window_percentiles"]
    assert "ingest.dtype=uint8" in caplog.text and "ingest.dtype=uint16" in caplog.text
    # the shard folder given itself finds the DST's window too; the same settings say nothing
    caplog.clear()
    assert inspect_shards(str(shards / "images"), adopted).window == info.window
    assert with_stored_decode(adopted, info) is adopted and not caplog.text


@pytest.mark.parametrize("window", [[None, 99.5], [99.5, 0.5], [0.5, 150], "0.5,99.5", [0.5]])
def test_a_manifest_window_damaged_by_hand_is_not_taken(tmp_path, shards, window, caplog):
    """Pretrain, sweep and embed read the DST's window: [null, 99.5] ended them with a
    TypeError traceback, a reversed one with a config traceback. The DST's decode.json, written
    before its first shard, says it first; a DST of an older version has only the manifest."""
    import shutil

    from radjepa.ingest.destination import DECODE_RECORD
    from radjepa.training_data import inspect_shards, with_stored_decode

    dst = tmp_path / "dst"
    shutil.copytree(shards, dst, symlinks=True)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["image"]["window_percentiles"] = window
    (dst / "manifest.json").write_text(json.dumps(manifest))
    assert inspect_shards(str(dst), _cfg(tmp_path)).window == (0.5, 99.5)  # the record's
    (dst / DECODE_RECORD).unlink()
    with caplog.at_level("WARNING", logger="radjepa"):
        info = inspect_shards(str(dst), _cfg(tmp_path))
    assert info.window is None and "is not a window" in caplog.text
    assert with_stored_decode(_cfg(tmp_path), info).ingest.window_percentiles == (0.5, 99.5)


def test_relative_outputs_inside_a_ray_job_are_refused(tmp_path, monkeypatch):
    # a job's relative path lands in its temporary, hash-named working dir on the head
    from pipelines.pretrain import PretrainError, prepare_outputs

    monkeypatch.chdir(tmp_path)
    relative = load_config(CONFIGS / "tiny_cpu.yaml", ["train.output_dir=runs"])
    assert prepare_outputs(relative) == str(tmp_path / "runs")  # on a laptop: fine
    monkeypatch.setenv("RAY_JOB_SUBMISSION_ID", "raysubmit_test")  # Ray 2.60 never sets it
    assert prepare_outputs(relative) == str(tmp_path / "runs")
    # what Ray's job supervisor gives its driver (tests/test_jobs.py submits a real job)
    job = {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_x", "job_name": "x"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    with pytest.raises(PretrainError, match="relative path 'runs' inside a Ray Job"):
        prepare_outputs(relative)
    absolute = load_config(CONFIGS / "tiny_cpu.yaml", [f"train.output_dir={tmp_path / 'shared'}"])
    assert prepare_outputs(absolute) == str(tmp_path / "shared")
    # so does a relative sqlite store, from the config or the environment
    store = absolute.with_overrides({"tracking.uri": "sqlite:///mlflow.db"})
    with pytest.raises(PretrainError, match="relative sqlite path inside a Ray Job"):
        prepare_outputs(store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db")
    with pytest.raises(PretrainError, match="relative sqlite path inside a Ray Job"):
        prepare_outputs(absolute)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert prepare_outputs(absolute) == str(tmp_path / "shared")


def test_impossible_requests_fail_in_one_line_and_mark_the_run_failed(shards, tmp_path):
    import mlflow

    from pipelines.pretrain import PretrainError, check_tracking_store, run_pretrain

    with pytest.raises(PretrainError, match="no local folder for the MLflow store"):
        check_tracking_store(_cfg(tmp_path), "s3://bucket/runs")
    check_tracking_store(_cfg(tmp_path, **{"tracking.enabled": False}), "s3://bucket/runs")

    cfg = _cfg(tmp_path, **{"train.use_gpu": "true", "train.run_name": "gpu"})
    with pytest.raises(PretrainError, match="no GPUs") as err:
        run_pretrain(cfg, str(shards))
    assert "Traceback" not in str(err.value)
    run_id = (tmp_path / "gpu" / "mlflow_run_id").read_text()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert mlflow.MlflowClient(uri).get_run(run_id).info.status == "FAILED"


def test_worker_count_from_the_cluster(ray_session):
    # the session's Ray has 8 logical CPUs and no GPU: half of them for DDP ranks
    from pipelines.runtime import ClusterResourceError, resolve_num_workers

    assert resolve_num_workers(False, 1.0) == 4
    assert resolve_num_workers(False, 3.0) == 1
    with pytest.raises(ClusterResourceError, match="cannot hold one training worker"):
        resolve_num_workers(False, 8.0)  # 4 CPUs left for ranks, each asking for 8
    with pytest.raises(ClusterResourceError, match="0 GPUs"):
        resolve_num_workers(True, 1.0)


def test_training_stream_is_every_image_but_the_holdout(shards, tmp_path, monkeypatch):
    import hashlib

    from pipelines.pretrain import build_train_dataset
    from radjepa.shards import read_images
    from radjepa.training_data import inspect_shards, is_holdout

    cfg = _cfg(tmp_path, **{"data.holdout_fraction": 0.3})
    info = inspect_shards(str(shards), cfg)
    assert 0 < info.holdout_rows < info.rows
    images, meta = read_images(shards)
    ids = meta.column("image_id").to_pylist()

    def digest(a):
        return hashlib.sha256(a.tobytes()).hexdigest()

    want = Counter(digest(a) for a, i in zip(images, ids, strict=True) if not is_holdout(i, 0.3))
    from ray.data import DataContext

    process = DataContext.get_current()
    monkeypatch.setattr(process, "enable_progress_bars", True)  # whatever the environment says
    ds = build_train_dataset(str(shards), cfg)
    got = Counter(digest(a) for b in ds.iter_batches(batch_size=16) for a in b["image"])
    assert got == want and sum(got.values()) == info.train_rows
    # its progress bars are off, the process's are not (they were: the demo's embed stage,
    # next in the same process, printed Ray Data's advice to turn them back on in Python)
    assert ds.context.enable_progress_bars is False
    assert process.enable_progress_bars is True


def test_every_epoch_reads_the_shards_in_a_new_order(shards, tmp_path):
    # an integer seed gave randomize_block_order the same shard order in every pass, so the
    # local shuffle buffer mixed the same neighbours epoch after epoch; Ray Train runs one
    # execution of the dataset per epoch through streaming_split
    import shutil

    import pyarrow.parquet as pq

    from pipelines.pretrain import build_train_dataset

    many = tmp_path / "many"
    (many / "images").mkdir(parents=True)
    shutil.copy(shards / "manifest.json", many / "manifest.json")
    table = pq.read_table(shards / "images")
    for i in range(0, table.num_rows, 8):  # ten shards of eight images
        pq.write_table(table.slice(i, 8), many / "images" / f"part-{i:05d}.parquet")

    def epochs(start_step: int, passes: int) -> list[tuple[int, ...]]:
        import ray.data

        cfg = _cfg(tmp_path)
        ctx = ray.data.DataContext.get_current()
        saved = ctx.target_max_block_size, ctx.execution_options.preserve_order
        # Ray reads files into blocks of up to 128 MiB (these ten shards are one block) and the
        # order in which parallel tasks finish shuffles a little by itself: neither here
        ctx.target_max_block_size, ctx.execution_options.preserve_order = 16 * 1024, True
        try:
            ds = build_train_dataset(str(many), cfg, start_step=start_step)
            (split,) = ds.streaming_split(1)
            return [
                tuple(int(a.sum()) for b in split.iter_batches(batch_size=8) for a in b["image"])
                for _ in range(passes)
            ]
        finally:
            ctx.target_max_block_size, ctx.execution_options.preserve_order = saved

    first = epochs(0, 3)
    assert len(set(first)) == 3, first  # three passes, three orders of the ten shards
    assert all(sorted(e) == sorted(first[0]) for e in first)  # the same images in each
    assert set(epochs(12, 1)).isdisjoint(first)  # a resume at step 12 does not replay them


def test_the_training_stream_checks_shard_pages_and_names_a_damaged_shard(tmp_path, ray_session):
    # Ray Data's Parquet reader drops the scan options it is given: no page checksum was
    # verified on the stream, so pixel bytes a disk or a copy changed were trained on
    import numpy as np

    from pipelines.pretrain import build_train_dataset
    from tests.test_shards import corrupt_pages, ingest_written_shard

    rng = np.random.default_rng(0)
    images = (rng.integers(0, 16, (40, 64, 64)) * 8).astype(np.uint8)
    path = ingest_written_shard(tmp_path, images, [f"{i:064x}" for i in range(40)])
    cfg = _cfg(tmp_path, **{"data.crop_size": 64, "model.img_size": 64, "data.holdout_fraction": 0})
    got = build_train_dataset(str(tmp_path), cfg).take_batch(40)["image"]
    assert sorted(a.tobytes() for a in got) == sorted(a.tobytes() for a in images)
    corrupt_pages(path, "pixels")
    with pytest.raises(Exception) as stopped:  # Ray's task error, carrying the shard's
        build_train_dataset(str(tmp_path), cfg).take_batch(4)
    from pipelines.runtime import remote_error_message
    from radjepa.shards import DamagedShardError

    assert isinstance(stopped.value, DamagedShardError)
    line = remote_error_message(stopped.value)
    assert line.startswith(f"{path} is damaged: its bytes changed after ingest wrote them (")
    assert "CRC checksum verification failed" in line


def test_a_shard_of_another_schema_in_the_stream_is_named(tmp_path, ray_session):
    # a file without the pixel column among the shards (inspect_shards reads the metadata
    # columns only) failed the stream as pyarrow's "No match for FieldRef"
    import pyarrow.parquet as pq

    from pipelines.pretrain import build_train_dataset
    from pipelines.runtime import remote_error_message
    from tests.shard_tables import write_blank_shards

    data = write_blank_shards(tmp_path, n=8, size=64)
    table = pq.read_table(data / "images" / "part-0.parquet").drop_columns(["pixels"])
    pq.write_table(table, data / "images" / "part-1.parquet")
    cfg = _cfg(tmp_path, **{"data.crop_size": 64, "model.img_size": 64})
    with pytest.raises(Exception) as stopped:
        build_train_dataset(str(data), cfg).take_all()
    assert remote_error_message(stopped.value) == (
        f"{data}/images/part-1.parquet has no pixels column: a file of another schema among "
        "the shards (ingest writes every column); move it out"
    )


def test_shards_are_read_from_a_uri(shards, tmp_path):
    # cluster jobs pass object-store URIs (s3://, gs://): the same code path reads file:// here
    from pipelines.pretrain import build_train_dataset
    from radjepa.monitoring import monitor_images
    from radjepa.training_data import inspect_shards

    cfg = _cfg(tmp_path)
    uri = Path(shards).resolve().as_uri()
    info = inspect_shards(uri, cfg)
    assert info.images_dir == uri + "/images"
    assert info.rows == inspect_shards(str(shards), cfg).rows > 0
    assert monitor_images(uri, cfg).shape[1:] == (info.size, info.size)
    batch = build_train_dataset(uri, cfg).take_batch(4)
    assert batch["image"].shape == (4, info.size, info.size)


def test_a_damaged_latest_checkpoint_resumes_from_the_one_before(
    shards, first_runs, tmp_path, caplog
):
    import mlflow

    from pipelines.pretrain import run_pretrain

    # checkpoints at steps 4 and 6 (the first run the next test damages too)
    sets = {"train.num_workers": 1, "train.steps": 6, "train.checkpoint_every": 2}
    first = _trained(first_runs, tmp_path, **sets)
    latest = Path(first.checkpoint)
    assert json.loads((latest / "meta.json").read_text())["step"] == 6
    with open(latest / "weights.safetensors", "r+b") as f:  # a disk that filled up
        f.truncate(1000)

    # the re-run also changes optim.betas and train.seed, which it may only because it says so
    more = {
        **sets,
        "train.steps": 8,
        "optim.betas": [0.8, 0.99],
        "train.seed": 7,
        "train.allow_config_change": True,
    }
    with caplog.at_level(logging.WARNING, logger="radjepa.resume"):
        again = run_pretrain(_cfg(tmp_path, **more), str(shards))
    assert again.metrics["step"] == 8
    assert any(latest.name in r.getMessage() for r in caplog.records)
    # steps 5-6 ran twice (from the step-4 checkpoint), nothing was skipped
    steps = _steps(again.tracking_uri, again.mlflow_run_id)
    assert steps == (list(range(1, 9)), [5, 6])

    client = mlflow.MlflowClient(again.tracking_uri)
    run = client.get_run(again.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["radjepa.config_changed_at_step_4"] == "optim.betas, train.seed"
    # its masks came from the new seed like its crops and data order (they kept the old one)
    saved = json.loads((Path(again.checkpoint) / "optimizer.json").read_text())
    assert saved["mask_sampler"] == {"seed": 7}
    arts = {a.path for a in client.list_artifacts(again.mlflow_run_id)}
    assert "config-resumed-at-step-4.yaml" in arts
    resumed = load_config(
        mlflow.artifacts.download_artifacts(
            run_id=again.mlflow_run_id,
            artifact_path="config-resumed-at-step-4.yaml",
            tracking_uri=again.tracking_uri,
            dst_path=str(tmp_path / "dl"),
        )
    )
    assert resumed.optim.betas == (0.8, 0.99)


def test_a_damaged_checkpoint_ray_recorded_never_costs_a_good_one(shards, first_runs, tmp_path):
    # Ray Train counted the damaged newest checkpoint toward train.keep_checkpoints: the resumed
    # run's first checkpoint made Ray delete the good step-4 one it had resumed from and keep
    # the damaged one (keep_checkpoints=2, one good checkpoint left on disk)
    from pipelines.pretrain import run_pretrain
    from pipelines.stray_checkpoints import RAY_CHECKPOINT_SNAPSHOT
    from radjepa.checkpoint import check_resumable

    sets = {"train.num_workers": 1, "train.steps": 6, "train.checkpoint_every": 2}
    first = _trained(first_runs, tmp_path, **sets)
    run = tmp_path / "t"
    damaged = Path(first.checkpoint)  # step 6; the step-4 one is kept beside it
    good = next(p for p in run.glob("checkpoint_*") if p.is_dir() and p != damaged)
    with open(damaged / "weights.safetensors", "r+b") as f:  # a disk that filled up
        f.truncate(1000)

    again = run_pretrain(_cfg(tmp_path, **sets), str(shards))  # resumes at 4, saves step 6
    assert again.metrics["step"] == 6
    assert _steps(again.tracking_uri, again.mlflow_run_id) == (list(range(1, 7)), [5, 6])
    record = json.loads((run / RAY_CHECKPOINT_SNAPSHOT).read_text())
    recorded = [r["checkpoint_dir_name"] for r in record["checkpoint_results"]]
    assert recorded == [good.name, Path(again.checkpoint).name]  # two good ones kept
    assert [check_resumable(run / n)[0] for n in recorded] == [4, 6]
    assert record["latest_checkpoint_result"]["checkpoint_dir_name"] == recorded[-1]
    # the damaged folder is a stray one now: left while fresh (another driver may be copying
    # it), removed by a later run (test_stray_checkpoint_folders_are_pruned_...)
    assert damaged.is_dir() and damaged.name not in recorded


def test_damaged_checkpoints_leave_ray_s_record_in_ray_s_format(tmp_path):
    # the record is Ray's (pinned 2.60): what is left must load in Ray's own model of it, with
    # the latest checkpoint moved to the newest one left; over a URI as over a folder
    import ray
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
    )

    from pipelines.stray_checkpoints import RAY_CHECKPOINT_SNAPSHOT, unrecord_checkpoints

    def result(name: str, step: int) -> dict:
        return {"version": 0, "checkpoint_dir_name": name, "metrics": {"step": step}}

    names = [f"checkpoint_2026-01-01_10-0{i}-00.000001" for i in range(3)]
    record = {
        "ray_version": ray.__version__,
        "checkpoint_results": [result(n, 2 * i) for i, n in enumerate(names)],
        "checkpoint_report_indices": [1, 2, 3],
        "latest_checkpoint_result": result(names[2], 4),
        "pending_training_results": [result(names[2], 4)],
        "pending_validation_specs": [False],
        "current_report_index": 3,
        "validated_checkpoint_dir_names": [names[0]],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [names[2]],
    }
    _CheckpointManagerState.parse_obj(record)  # the fixture is Ray's format
    run = tmp_path / "t"
    run.mkdir()
    snapshot = run / RAY_CHECKPOINT_SNAPSHOT
    snapshot.write_text(json.dumps(record))

    assert unrecord_checkpoints(run.as_uri(), [names[2], "checkpoint_never_recorded"]) == (
        names[2],
    )
    left = _CheckpointManagerState.parse_obj(json.loads(snapshot.read_text()))
    assert [r.checkpoint_dir_name for r in left.checkpoint_results] == names[:2]
    assert left.checkpoint_report_indices == [1, 2]
    assert left.latest_checkpoint_result.checkpoint_dir_name == names[1]
    assert left.pending_training_results == [] and left.pending_validation_specs == []
    assert left.validated_checkpoint_dir_names == [names[0]]
    assert left.failed_validation_checkpoint_dir_names == []
    assert sorted(p.name for p in run.iterdir()) == [RAY_CHECKPOINT_SNAPSHOT]
    assert unrecord_checkpoints(str(run), [names[2]]) == ()  # nothing left to take out
    # all taken out: no latest checkpoint (Ray offers none; the driver's pick is loaded)
    assert unrecord_checkpoints(str(run), names) == tuple(names[:2])
    assert json.loads(snapshot.read_text())["latest_checkpoint_result"] is None
    # a format this code does not know is left as it is
    snapshot.write_text('{"checkpoints": []}')
    assert unrecord_checkpoints(str(run), names) == ()
    assert snapshot.read_text() == '{"checkpoints": []}'


def test_a_failure_recording_the_finished_run_keeps_the_checkpoint_path(
    shards, first_runs, tmp_path
):
    import shutil

    import mlflow

    from pipelines.pretrain import PretrainError, run_pretrain

    sets = {"train.num_workers": 1, "train.steps": 2, "train.checkpoint_every": 2}
    first = _trained(first_runs, tmp_path, **sets)
    client = mlflow.MlflowClient(first.tracking_uri)
    artifacts = Path(client.get_run(first.mlflow_run_id).info.artifact_uri.removeprefix("file://"))
    shutil.rmtree(artifacts)
    artifacts.write_text("not a folder")  # the artifact store can no longer be written

    with pytest.raises(PretrainError, match="recording it in MLflow failed") as err:
        run_pretrain(_cfg(tmp_path, **sets), str(shards))
    assert first.checkpoint in str(err.value) and "\n" not in str(err.value)
    assert client.get_run(first.mlflow_run_id).info.status == "FAILED"


def test_monitor_set_is_the_holdout_from_the_whole_archive(tmp_path):
    # the hold-out is spread over the archive: the set used to be picked from its first 16 x
    # limit images only (decoded whole in the driver) and fell back to training images
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from radjepa.monitoring import monitor_images
    from radjepa.training_data import is_holdout

    n, per = 2000, 500
    ids = [f"{i:064x}" for i in range(n)]
    (tmp_path / "images").mkdir()
    for s in range(0, n, per):
        rows = range(s, s + per)
        pixels = [
            np.resize(np.array([i % 256, i // 256], np.uint8), (8, 8)).tobytes() for i in rows
        ]
        table = pa.table(
            {
                "image_id": ids[s : s + per],
                "pixels": pa.array(pixels, pa.binary()),
                "height": pa.array([8] * per, pa.int32()),
                "width": pa.array([8] * per, pa.int32()),
                "dtype": ["uint8"] * per,
            }
        )
        pq.write_table(table, tmp_path / "images" / f"part-{s:05d}.parquet")
    cfg = load_config(None, ["data.holdout_fraction=0.05"])
    held = [i for i in ids if is_holdout(i, 0.05)]
    assert len(held) >= 32 and ids.index(held[31]) > 16 * 8  # what made the old pick fall back
    got = monitor_images(str(tmp_path), cfg, limit=8)  # [8, 8, 8]
    rows = [int(a[0, 0]) + 256 * int(a[0, 1]) for a in got]
    assert got.shape == (8, 8, 8) and got.flags.writeable
    assert [ids[r] for r in rows] == held[:8]


def test_ctrl_c_ends_the_mlflow_run_killed_in_one_line(shards, tmp_path):
    # Ray Train answers Ctrl-C by aborting the workers and calling sys.exit(0) from its SIGINT
    # handler (ray.init's SIGTERM handler calls sys.exit(15)): a SystemExit, not the
    # KeyboardInterrupt run_pretrain used to wait for, so the MLflow run stayed RUNNING forever
    import mlflow
    from interrupts import ctrl_c_once

    from pipelines.pretrain import PretrainInterrupted, run_pretrain

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(tmp_path, **{"train.num_workers": 1, "train.steps": 400, "train.log_every": 2})
    run_id_file = tmp_path / "t" / "mlflow_run_id"

    def training_runs() -> bool:
        run_id = run_id_file.read_text() if run_id_file.is_file() else None
        return bool(run_id and mlflow.MlflowClient(uri).get_metric_history(run_id, "loss"))

    with ctrl_c_once(training_runs), pytest.raises(PretrainInterrupted) as err:
        run_pretrain(cfg, str(shards))
    assert "interrupted" in str(err.value) and "resumable" in str(err.value)
    run_id = (tmp_path / "t" / "mlflow_run_id").read_text()
    client = mlflow.MlflowClient(uri)
    assert client.get_run(run_id).info.status == "KILLED"


def test_a_run_whose_checkpoints_were_deleted_starts_over(shards, first_runs, tmp_path, caplog):
    # "no checkpoint of RUN can be read (...): delete them to start the run over": Ray Train's
    # record of the deleted checkpoints (checkpoint_manager_snapshot.json) then made the re-run
    # fail with "training failed: The actor died ... a reference to a checkpoint that does not
    # exist anymore", a Ray traceback asking to delete the whole run folder (MLflow id included)
    import shutil

    from pipelines.pretrain import run_pretrain
    from pipelines.stray_checkpoints import RAY_CHECKPOINT_SNAPSHOT

    sets = {"train.num_workers": 1, "train.steps": 2, "train.checkpoint_every": 2}
    first = _trained(first_runs, tmp_path, **sets)
    for ckpt in (tmp_path / "t").glob("checkpoint_*"):
        if ckpt.is_dir():
            shutil.rmtree(ckpt)

    with caplog.at_level(logging.WARNING, logger="pipelines.stray_checkpoints"):
        again = run_pretrain(_cfg(tmp_path, **sets), str(shards))
    assert again.metrics["step"] == 2
    assert again.checkpoint != first.checkpoint and Path(again.checkpoint).is_dir()
    assert again.mlflow_run_id == first.mlflow_run_id
    assert any("starts over" in r.getMessage() for r in caplog.records)
    # every folder out of Ray's record left it empty, which Ray loaded: it records the new one
    record = json.loads((tmp_path / "t" / RAY_CHECKPOINT_SNAPSHOT).read_text())
    names = [r["checkpoint_dir_name"] for r in record["checkpoint_results"]]
    assert names == [Path(again.checkpoint).name]
    assert not (tmp_path / "t" / f"{RAY_CHECKPOINT_SNAPSHOT}.stale").exists()


def test_a_run_whose_newest_checkpoint_was_deleted_resumes_from_the_one_before(
    shards, first_runs, tmp_path
):
    # what a user does with a damaged checkpoint: Ray Train's snapshot still named the deleted
    # folder and the re-run failed in Ray's controller ("a reference to a checkpoint that does
    # not exist anymore") instead of resuming from the checkpoint left beside it
    import shutil

    from pipelines.pretrain import run_pretrain

    sets = {"train.num_workers": 1, "train.steps": 4, "train.checkpoint_every": 2}
    first = _trained(first_runs, tmp_path, **sets)
    shutil.rmtree(first.checkpoint)  # the step-4 checkpoint; the step-2 one stays

    again = run_pretrain(_cfg(tmp_path, **{**sets, "train.steps": 6}), str(shards))
    assert again.metrics["step"] == 6
    # resumed at step 2: steps 3-4 redone
    assert _steps(again.tracking_uri, again.mlflow_run_id) == (list(range(1, 7)), [3, 4])


def test_a_deleted_checkpoint_leaves_the_others_counted_toward_keep_checkpoints(
    shards, first_runs, tmp_path
):
    # a checkpoint folder deleted by hand set Ray Train's whole record aside (.stale): the
    # checkpoints left were no longer Ray's, so keep_checkpoints=2 never removed them and the
    # run kept three folders (steps 6, 8, 10) where it asked for two
    import shutil

    from pipelines.pretrain import run_pretrain
    from pipelines.stray_checkpoints import RAY_CHECKPOINT_SNAPSHOT

    sets = {"train.num_workers": 1, "train.steps": 6, "train.checkpoint_every": 2}
    run = tmp_path / "t"
    _trained(first_runs, tmp_path, **sets)  # keeps steps 4 and 6
    older = min(p for p in run.glob("checkpoint_*") if p.is_dir())
    shutil.rmtree(older)

    again = run_pretrain(_cfg(tmp_path, **{**sets, "train.steps": 10}), str(shards))
    assert again.metrics["step"] == 10
    # resumed at step 6: nothing redone
    assert _steps(again.tracking_uri, again.mlflow_run_id) == (list(range(1, 11)), [])
    assert not (run / f"{RAY_CHECKPOINT_SNAPSHOT}.stale").exists()
    folders = sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())
    record = json.loads((run / RAY_CHECKPOINT_SNAPSHOT).read_text())
    assert [r["checkpoint_dir_name"] for r in record["checkpoint_results"]] == folders
    assert [json.loads((run / f / "meta.json").read_text())["step"] for f in folders] == [8, 10]


def _three_checkpoint_record() -> tuple[list[str], dict]:
    """Three checkpoint folder names and Ray Train's record of them (Ray 2.60's format)."""
    names = [f"checkpoint_2026-01-01_10-0{i}-00.000001" for i in range(3)]
    results = [{"checkpoint_dir_name": n, "metrics": {"step": 2 * i}} for i, n in enumerate(names)]
    record = {
        "checkpoint_results": results,
        "checkpoint_report_indices": [1, 2, 3],
        "latest_checkpoint_result": results[2],
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": 3,
        "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }
    return names, record


def test_a_record_naming_a_deleted_folder_on_a_full_disk_is_set_aside(small_disk, caplog):
    # the rewrite needs space the rename that set the record aside never did: on a disk still
    # full, taking the deleted folder out raised ENOSPC and the run stopped with a traceback
    from pipelines.stray_checkpoints import RAY_CHECKPOINT_SNAPSHOT, unrecord_deleted_checkpoints

    names, record = _three_checkpoint_record()
    run = small_disk / "t"
    run.mkdir()
    (run / RAY_CHECKPOINT_SNAPSHOT).write_text(json.dumps(record))
    for name in names[:2]:
        (run / name).mkdir()
    with pytest.raises(OSError), open(small_disk / "filler", "wb") as filler:
        while True:
            filler.write(b"\0" * 65536)
            filler.flush()

    assert unrecord_deleted_checkpoints(str(run))
    assert (run / f"{RAY_CHECKPOINT_SNAPSHOT}.stale").exists()
    assert sorted(p.name for p in run.iterdir()) == [*names[:2], f"{RAY_CHECKPOINT_SNAPSHOT}.stale"]
    assert "cannot be rewritten" in caplog.text


def test_a_record_naming_deleted_folders_is_rewritten_in_ray_s_format(tmp_path, caplog):
    # the record keeps the folders still on disk, loads in Ray's own model of it, and an empty
    # one (every folder deleted) loads as no checkpoint; one that cannot be rewritten is set
    # aside as before
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
    )

    from pipelines.stray_checkpoints import RAY_CHECKPOINT_SNAPSHOT, unrecord_deleted_checkpoints

    names, record = _three_checkpoint_record()
    run = tmp_path / "t"
    snapshot = run / RAY_CHECKPOINT_SNAPSHOT
    run.mkdir()
    snapshot.write_text(json.dumps(record))
    for name in names[:2]:
        (run / name).mkdir()

    assert unrecord_deleted_checkpoints(run.as_uri())  # the newest one was deleted
    left = _CheckpointManagerState.parse_obj(json.loads(snapshot.read_text()))
    assert [r.checkpoint_dir_name for r in left.checkpoint_results] == names[:2]
    assert left.latest_checkpoint_result.checkpoint_dir_name == names[1]
    assert f"{names[2]} deleted, so the run resumes" in caplog.text
    assert not unrecord_deleted_checkpoints(str(run))  # nothing missing now

    for name in names[:2]:
        (run / name).rmdir()
    assert unrecord_deleted_checkpoints(str(run))
    left = _CheckpointManagerState.parse_obj(json.loads(snapshot.read_text()))
    assert left.checkpoint_results == [] and left.latest_checkpoint_result is None
    assert left.current_report_index == 3 and "starts over" in caplog.text

    snapshot.write_text(json.dumps({**record, "checkpoint_report_indices": [1]}))
    assert unrecord_deleted_checkpoints(str(run))
    assert not snapshot.exists() and (run / f"{RAY_CHECKPOINT_SNAPSHOT}.stale").exists()
    assert "cannot be rewritten" in caplog.text


def test_a_checkpoint_ray_never_recorded_is_resumed_from(shards, first_runs, tmp_path):
    # a driver killed (SIGKILL, a preempted head) after a worker copied a checkpoint into the
    # run folder but before Ray Train recorded it in its snapshot: the re-run checked its config
    # against that newest whole checkpoint, then Ray restored the one before and the run redid
    # a whole checkpoint interval (seen on a real SIGKILL of driver and worker mid-save)
    from pipelines.pretrain import run_pretrain
    from pipelines.stray_checkpoints import RAY_CHECKPOINT_SNAPSHOT

    sets = {"train.num_workers": 1, "train.steps": 2, "train.checkpoint_every": 2}
    _trained(first_runs, tmp_path, **sets)
    snapshot = tmp_path / "t" / RAY_CHECKPOINT_SNAPSHOT
    recorded = snapshot.read_text()
    second = run_pretrain(_cfg(tmp_path, **{**sets, "train.steps": 4}), str(shards))
    snapshot.write_text(recorded)  # Ray's record as the killed driver left it: steps 2 only
    assert json.loads((Path(second.checkpoint) / "meta.json").read_text())["step"] == 4

    again = run_pretrain(_cfg(tmp_path, **{**sets, "train.steps": 6}), str(shards))
    assert again.metrics["step"] == 6
    # resumed at step 4: nothing redone
    assert _steps(again.tracking_uri, again.mlflow_run_id) == (list(range(1, 7)), [])


def test_stray_checkpoint_folders_are_pruned_and_the_run_still_resumes(
    shards, first_runs, tmp_path
):
    # Ray Train's keep_checkpoints only deletes folders it recorded: a copy cut short by a crash
    # and a whole checkpoint whose record was lost stayed in the run's storage for good
    import os
    import shutil
    import time

    from pipelines.pretrain import run_pretrain
    from pipelines.stray_checkpoints import QUIET_S, RAY_CHECKPOINT_SNAPSHOT

    sets = {
        "train.num_workers": 1,
        "train.steps": 4,
        "train.checkpoint_every": 2,
        "train.keep_checkpoints": 3,
    }
    run = tmp_path / "t"
    # the first run keeps both its checkpoints under either keep_checkpoints: the one other
    # tests start from (the re-runs keep 3)
    _trained(first_runs, tmp_path, **{**sets, "train.keep_checkpoints": 2})
    snapshot = run / RAY_CHECKPOINT_SNAPSHOT
    recorded = snapshot.read_text()  # steps 2 and 4
    second = run_pretrain(_cfg(tmp_path, **{**sets, "train.steps": 6}), str(shards))
    snapshot.write_text(recorded)  # a driver killed before recording step 6: resumed from
    restored = Path(second.checkpoint)
    ckpts = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert [p.name for p in ckpts[2:]] == [restored.name]  # steps 2, 4 and 6
    # a whole copy older than Ray's record names (its record set aside) and a copy cut short
    # as a full disk leaves it, named as Ray names them (a run's second and later saves)
    lost = run / (ckpts[0].name[:-6] + "000000")
    shutil.copytree(ckpts[0], lost)
    cut = run / (restored.name + "9")
    shutil.copytree(restored, cut)
    with open(cut / "optimizer.safetensors", "r+b") as f:
        f.truncate(1_000_000)
    (cut / "optimizer.json").unlink()
    fresh = run / (restored.name + "8")  # the same, but written a minute ago: left alone
    shutil.copytree(cut, fresh)
    then = time.time() - QUIET_S - 60  # all written over an hour ago, as after a night's crash
    for p in [*run.rglob("*")]:
        if not p.is_relative_to(fresh):
            os.utime(p, (then, then))

    again = run_pretrain(_cfg(tmp_path, **{**sets, "train.steps": 8}), str(shards))
    assert again.metrics["step"] == 8
    counts = Counter(s for s, _ in _history(again.tracking_uri, again.mlflow_run_id, "loss"))
    assert set(counts) == set(range(1, 9)) and max(counts.values()) == 1  # resumed at 6
    assert not lost.exists() and not cut.exists() and fresh.is_dir()
    assert set(again.pruned.folders) == {lost.name, cut.name} and again.pruned.freed_bytes > 0
    left = {p.name for p in run.glob("checkpoint_*") if p.is_dir()}
    ray_record = json.loads(snapshot.read_text())["checkpoint_results"]
    assert {r["checkpoint_dir_name"] for r in ray_record} <= left  # Ray's own stay
    # ... and the resume point, which Ray never recorded until the run reported it again in
    # place: Ray keeps its 3 (steps 4, 6, 8) and deleted step 2 itself
    assert restored.name in {r["checkpoint_dir_name"] for r in ray_record}
    assert left == {ckpts[1].name, restored.name, fresh.name, Path(again.checkpoint).name}


def _enospc() -> OSError:
    """A full disk's error: from the kernel's always-full device where there is one (a
    container's /dev may lack it: opening it for writing there made a plain file of it)."""
    import errno
    import stat

    if os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode):
        try:
            with open("/dev/full", "wb") as f:
                f.write(b"x")
                f.flush()
        except OSError as err:
            return err
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_line_naming_the_storage(tmp_path):
    # Ray Train's WorkerGroupError text is each rank's traceback: the user got 40 lines ending
    # in pyarrow's copy_files instead of what happened and what to do
    from ray.train import ControllerError, WorkerGroupError

    from pipelines.pretrain import _explain_failure

    full = _enospc()
    workers = WorkerGroupError("Traceback (most recent call last):\n  ...\n" + str(full), {0: full})
    # or the controller meets it first, writing its record of the checkpoints (seen in CI)
    for failure in (workers, ControllerError(full)):
        message = _explain_failure(failure, str(tmp_path / "t"))
        assert message.startswith("the output storage is full ([Errno 28] No space left on device)")
        assert str(tmp_path / "t") in message and "re-run the same command" in message
        assert "\n" not in message


def test_a_full_disk_is_never_retried_and_says_which_folder(small_disk, tmp_path):
    # Ray Train retried a full disk train.max_failures times: each retry replayed the steps
    # since the last checkpoint and met the same full disk at the next save (86 s, two more
    # checkpoint folders cut short). The error is a real one: rank 0 saving a checkpoint into
    # a worker's temporary folder on a full disk
    import errno

    from ray.train import FailureConfig, WorkerGroupError
    from ray.train.v2._internal.execution.failure_handling import FailureDecision

    from pipelines.failure_policy import StopOnFullStorage
    from pipelines.pretrain import _explain_failure
    from radjepa.checkpoint import save_checkpoint
    from radjepa.engine import Pretrainer

    cfg = load_config(CONFIGS / "tiny_cpu.yaml")
    try:
        save_checkpoint(small_disk / "ckpt", Pretrainer(cfg, "cpu"))
    except OSError as err:
        full = err
    assert full.errno == errno.ENOSPC

    def failed(err: BaseException) -> WorkerGroupError:
        try:  # raised in a worker's loop: Ray keeps what it was raised from
            raise RuntimeError("checkpoint step failed") from err
        except RuntimeError as wrapped:
            return WorkerGroupError(f"Traceback ...\n{wrapped}", {0: wrapped})

    policy = StopOnFullStorage(FailureConfig(max_failures=2))
    assert policy.make_decision(failed(full)) == FailureDecision.RAISE
    # anything else keeps Ray's retries, a refused permission too (a credential refreshed)
    assert policy.make_decision(failed(ValueError("a bug"))) == FailureDecision.RETRY
    denied = OSError(errno.EACCES, os.strerror(errno.EACCES))
    assert policy.make_decision(failed(denied)) == FailureDecision.RETRY
    assert policy.make_decision(failed(ValueError("a bug"))) == FailureDecision.RAISE  # 3rd

    run = tmp_path / "t"
    message = _explain_failure(failed(full), str(run), 2, 2)
    assert "\n" not in message
    assert message.startswith("a worker's local disk is full ([Errno 28] No space left on device)")
    assert f"saving a checkpoint into {small_disk}/" in message and "TMPDIR" in message
    assert f"the checkpoints in {run} are intact" in message and "at once" in message


def test_a_disk_filling_up_mid_run_stops_in_one_line_and_the_rerun_resumes(shards, tmp_path):
    # the run folder on a real 40 MiB tmpfs: the step-2 checkpoint (31 MB) fits, the step-4
    # one fills the disk half way through Ray's copy
    import subprocess
    import time

    import mlflow
    from small_disks import tmpfs

    from pipelines.pretrain import PretrainError, run_pretrain
    from pipelines.stray_checkpoints import QUIET_S
    from radjepa.checkpoint import is_cut_short

    with tmpfs(tmp_path / "small", "40m") as small:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        sets = {
            "train.num_workers": 1,
            "train.steps": 4,
            "train.checkpoint_every": 2,
            "train.max_failures": 2,  # not used: a full disk is not retried
            "tracking.uri": uri,
        }
        with pytest.raises(PretrainError, match="the output storage is full") as err:
            run_pretrain(_cfg(small, **sets), str(shards))
        message = str(err.value)
        assert "\n" not in message and str(small / "t") in message
        assert "stopped at once" in message and "the newest: checkpoint_" in message
        assert (
            "A checkpoint takes " in message and "room for 3 (train.keep_checkpoints=2" in message
        )
        run_id = (small / "t" / "mlflow_run_id").read_text()
        run = mlflow.MlflowClient(uri).get_run(run_id)
        assert run.info.status == "FAILED"
        assert "radjepa.resumes" not in run.data.tags  # no worker restart
        assert _steps(uri, run_id) == ([1, 2, 3, 4], [])
        steps = sorted(
            json.loads((p / "meta.json").read_text())["step"]
            for p in (small / "t").glob("checkpoint_*")
            if (p / "meta.json").is_file() and (p / "meta.json").stat().st_size
        )
        assert steps[0] == 2  # the earlier checkpoint is intact
        # space freed: the same command resumes, past the checkpoint cut short
        subprocess.run(["mount", "-o", "remount,size=200m", str(small)], check=True)
        # the copy the full disk cut short, an hour later: the re-run removes it
        cut = [p for p in (small / "t").glob("checkpoint_*") if p.is_dir() and is_cut_short(p)]
        assert len(cut) == 1  # one per retry, when it was retried
        assert f"writing checkpoint {cut[0]}," in message
        then = time.time() - QUIET_S - 60
        for p in (small / "t").rglob("*"):
            os.utime(p, (then, then))
        again = run_pretrain(_cfg(small, **sets), str(shards))
        assert again.metrics["step"] == 4 and again.mlflow_run_id == run_id
        assert not cut[0].exists() and again.pruned.folders == (cut[0].name,)
        assert _steps(uri, run_id) == ([1, 2, 3, 4], [3, 4])  # resumed at step 2


def test_a_checkpoint_record_cut_short_is_set_aside(tmp_path, caplog):
    # a full disk left Ray's checkpoint_manager_snapshot.json empty: the re-run then died in
    # Ray's CheckpointManagerInitializationError (JSONDecodeError) instead of resuming (seen in CI)
    from pipelines.stray_checkpoints import RAY_CHECKPOINT_SNAPSHOT, unrecord_deleted_checkpoints

    run = tmp_path / "t"
    run.mkdir()
    (run / RAY_CHECKPOINT_SNAPSHOT).write_text("")
    assert unrecord_deleted_checkpoints(str(run))
    assert not (run / RAY_CHECKPOINT_SNAPSHOT).exists()
    assert (run / f"{RAY_CHECKPOINT_SNAPSHOT}.stale").exists()
    assert "unreadable" in caplog.text


@pytest.mark.parametrize("log_every", [1, 100], ids=["loss-check", "weights-check"])
def test_divergence_stops_at_once_and_keeps_the_last_good_checkpoint(
    shards, first_runs, tmp_path, log_every
):
    # a NaN loss was raised in the worker, so Ray Train retried it train.max_failures times
    # from the last checkpoint (the same steps, masks and crops: the same NaN), then the CLI
    # printed the worker's traceback; and a checkpoint step that was not a log step saved the
    # NaN weights, rotating the last good checkpoint out (or rankme failed on them, cryptically)
    import mlflow
    import numpy as np
    from safetensors.numpy import load_file

    from pipelines.pretrain import PretrainError, run_pretrain

    sets = {"train.steps": 4, "train.checkpoint_every": 2}
    _trained(first_runs, tmp_path, **sets)
    blown = {
        **sets,
        "train.steps": 30,
        "train.log_every": log_every,
        "optim.lr": 1e5,
        "optim.start_lr": 1e5,
        "train.allow_config_change": True,
    }
    with pytest.raises(PretrainError) as err:
        run_pretrain(_cfg(tmp_path, **blown), str(shards))
    message = str(err.value)
    assert "\n" not in message and "diverged at step" in message
    assert "without retries" in message and "last good checkpoint" in message

    ckpts = sorted(p for p in (tmp_path / "t").glob("checkpoint_*") if p.is_dir())
    assert ckpts, "the good checkpoints are kept"
    for ckpt in ckpts:  # none holds diverged weights
        weights = load_file(str(ckpt / "weights.safetensors"))
        assert all(np.isfinite(v).all() for v in weights.values()), ckpt
    newest = json.loads((ckpts[-1] / "meta.json").read_text())["step"]
    assert newest >= 4 and f"(step {newest})" in message

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = mlflow.MlflowClient(uri).get_run((tmp_path / "t" / "mlflow_run_id").read_text())
    assert run.info.status == "FAILED"
    assert int(run.data.tags["radjepa.diverged_at_step"]) > 4
    # one resume (the re-run's), no worker restart after it
    assert run.data.tags["radjepa.resumes"] == "1"


def test_a_checkpoint_reports_its_own_step_s_loss(shards, tmp_path):
    # a checkpoint step that was not a log step reported the loss of the last log step before
    # it (or none: the step-2 report here had only "step"), which is what Tune ranks a trial
    # by and what Ray's record says of the checkpoint
    from pipelines.pretrain import run_pretrain
    from pipelines.stray_checkpoints import RAY_CHECKPOINT_SNAPSHOT

    sets = {"train.num_workers": 1, "train.steps": 4, "train.checkpoint_every": 2}
    # and a stream that makes each batch when the step asks (test_stream_options_...)
    more = {"train.log_every": 3, "train.data_loader_threads": 0}
    res = run_pretrain(_cfg(tmp_path, **sets, **more), str(shards))
    losses = dict(_history(res.tracking_uri, res.mlflow_run_id, "loss"))
    assert sorted(losses) == [2, 3, 4]  # the log steps and the checkpoint steps
    record = json.loads((tmp_path / "t" / RAY_CHECKPOINT_SNAPSHOT).read_text())
    reported = {r["metrics"]["step"]: r["metrics"] for r in record["checkpoint_results"]}
    assert {step: m["loss"] for step, m in reported.items()} == {2: losses[2], 4: losses[4]}
    # throughput from the step after the first (start-up), over the images since the last log
    speeds = dict(_history(res.tracking_uri, res.mlflow_run_id, "img_per_s"))
    assert sorted(speeds) == [2, 3, 4] and all(v > 0 for v in speeds.values())
    assert reported[2]["img_per_s"] == speeds[2]


def test_stream_options_take_the_prefetch_from_the_config(tmp_path):
    # train.data_loader_threads was read nowhere: the stream always made 2 batches ahead
    from pipelines.pretrain import stream_options

    for ahead in (0, 5):
        options = stream_options(_cfg(tmp_path, **{"train.data_loader_threads": ahead}), 7, False)
        assert options["prefetch_batches"] == ahead
    assert options["local_shuffle_seed"] == SETS.get("train.seed", 0) + 7
    assert options["batch_size"] == 8 and options["drop_last"] and not options["pin_memory"]


def test_a_worker_error_is_said_in_one_line(shards, tmp_path):
    # the message was Ray's WorkerGroupError text: each failed rank's whole traceback
    from pipelines.pretrain import PretrainError, run_pretrain

    sets = {"train.num_workers": 1, "train.steps": 4, "train.max_failures": 0}
    with pytest.raises(PretrainError) as err:
        run_pretrain(_cfg(tmp_path, **sets, **{"train.fail_at_step": 2}), str(shards))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "training failed on rank 0: RuntimeError: injected failure at step 2 (train.fail_at_step)"
    )
    assert "(train.max_failures=0: no restart;" in message


def _pretrain_cli(entry: list[str], shards: Path, sets: dict[str, str], ray_address: str = ""):
    """``python -m *entry tiny_cpu.yaml --data shards --set ...`` in a process of its own (its
    own local Ray, or the cluster at ``ray_address``), as a user or a pod runs it, with SIGINT
    as a user's foreground process has it (a background pytest, CI's, ignores it and its
    children inherit that). Its log lines are not wrapped (a wide console)."""
    import sys

    from interrupts import foreground_process

    repo = CONFIGS.parent
    args = [sys.executable, "-m", *entry, str(CONFIGS / "tiny_cpu.yaml")]
    args += ["--data", str(shards)] + [f"--set={k}={v}" for k, v in sets.items()]
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(repo), "COLUMNS": "400"}
    return foreground_process(args, env=env, cwd=repo)


def test_rerunning_a_finished_run_records_it_without_ray(shards, first_runs, tmp_path):
    # a re-run of a finished run started Ray (or joined RAY_ADDRESS's cluster) and a worker
    # group that only loaded the checkpoint and returned: 25-35 s of start-up on a 2-core box
    # before the driver recorded the result. RAY_ADDRESS names a port where nothing listens
    # here, so any Ray work fails the command ("cannot reach the Ray cluster")
    import mlflow

    sets = {"train.num_workers": 1, "train.steps": 2, "train.checkpoint_every": 2}
    first = _trained(first_runs, tmp_path, **sets)
    cli_sets = {k: str(v) for k, v in {**SETS, **sets, "train.output_dir": tmp_path}.items()}
    proc = _pretrain_cli(["pipelines.cli", "pretrain", "-c"], shards, cli_sets, "127.0.0.1:1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    said = " ".join(out.split())  # the log, on stdout as the command's other lines
    assert "run t already holds step 2 (train.steps=2): nothing to train" in said, out[-3000:]
    assert f"checkpoint:  {first.checkpoint}\n" in out
    assert f"mlflow run:  {first.mlflow_run_id} (model version {first.model_version})" in out
    loss = first.metrics["loss"]
    assert f"final loss:  {loss:.4f} at step 2\n" in out  # what Ray recorded with it
    client = mlflow.MlflowClient(first.tracking_uri)
    assert client.get_run(first.mlflow_run_id).info.status == "FINISHED"
    assert len(client.search_model_versions("name='radjepa-encoder'")) == 1


@pytest.mark.parametrize(
    "entry",
    [["pipelines.cli", "pretrain", "-c"], ["pipelines.pretrain", "--config"]],
    ids=["radjepa", "module"],
)
def test_sigterm_of_the_cli_exits_130_in_one_line_and_ends_the_run_killed(shards, tmp_path, entry):
    # a SIGTERM landing in ray.get (a pod shut down, `kill`) printed the one-line error, then
    # the process aborted in interpreter teardown: exit 134 (SIGABRT) and a core dump.
    # `python -m pipelines.pretrain` (a Ray Job's entry point under `ray job submit`, stopped
    # with `ray job stop`) exited 2, a usage error's code
    import signal

    import mlflow
    from interrupts import signal_after_line

    sets = {
        "train.output_dir": str(tmp_path),
        "train.run_name": "t",
        "train.steps": "400",
        "train.log_every": "1",
        "train.batch_size": "8",
        "data.holdout_fraction": "0.0",
    }
    proc = _pretrain_cli(entry, shards, sets)
    # once workers train; a supervisor repeating itself sends it again
    _, text = signal_after_line(proc, "step 3/400", signal.SIGTERM, 180, again_after_s=0.5)
    assert proc.returncode == 130, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: training was interrupted; the run is resumable"), last
    # ray.init's handler took it (a C++ stack dump, "(exit 15)"), and on a loaded machine the
    # driver then aborted in teardown (-6); routed, Ray Train aborts the workers as on Ctrl-C
    assert "SIGTERM received" not in text, text[-3000:]
    # this test's Ray runs beside the CLI's: Ray Train's placement-group cleaner looked for "the"
    # instance on the machine, found two and died in a traceback (now it asks none)
    assert "PlacementGroupCleaner" not in text, text[-3000:]
    run_id = (tmp_path / "t" / "mlflow_run_id").read_text()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "KILLED"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interruption_while_tracking_is_set_up_ends_the_run_killed(tmp_path, sig):
    # a Ctrl-C or SIGTERM after the MLflow run was created and before training started (its
    # params logged, its id file written) ended the run FAILED, under the "training was
    # interrupted" line, where an interruption during training ends it KILLED. The id file is a
    # named pipe here: pretrain blocks writing it, right after creating the run, until the
    # signal has been sent.
    import signal

    import mlflow
    from interrupts import signal_once_run_is_made
    from shard_tables import write_blank_shards

    shards = write_blank_shards(tmp_path / "shards")
    out = tmp_path / "out"
    (out / "t").mkdir(parents=True)
    os.mkfifo(out / "t" / "mlflow_run_id")
    db = out / "mlflow.db"
    sets = {
        "train.output_dir": str(out),
        "train.run_name": "t",
        "train.batch_size": "8",
        "data.holdout_fraction": "0.0",
    }
    proc = _pretrain_cli(["pipelines.cli", "pretrain", "-c"], shards, sets)
    # a param per config key (every config has them all): the signal after the last of them
    params = len(flatten(load_config(None)))
    run_id, err = signal_once_run_is_made(
        proc, db, "t", out / "t" / "mlflow_run_id", getattr(signal, sig), params=params
    )
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: training was interrupted"), err[-3000:]
    status = mlflow.MlflowClient(f"sqlite:///{db}").get_run(run_id).info.status
    assert status == "KILLED"


def test_a_resumed_run_whose_provenance_cannot_be_recorded_does_not_stay_running(tmp_path):
    # start_tracking sets a resumed run RUNNING again, then records the provenance of this
    # resume; when that failed (or was interrupted) its caller never got the run's id, so the
    # run stayed RUNNING for good under the one-line error
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipelines.pretrain_tracking import start_tracking
    from pipelines.tracking_runs import end_run

    cfg = _cfg(tmp_path)
    run_dir = str(tmp_path / "t")
    run_id, uri = start_tracking(cfg, str(tmp_path), run_dir, provenance={"radjepa.code": "a"})
    client = mlflow.MlflowClient(uri)
    end_run(client, run_id, "KILLED")  # as an interrupted run is left
    # a tag name MLflow refuses: the store's refusal stands for any failure of the call
    with pytest.raises(MlflowException):
        start_tracking(cfg, str(tmp_path), run_dir, provenance={"radjepa.no way!": "b"})
    assert client.get_run(run_id).info.status == "FAILED"


def test_a_run_reads_the_shards_it_was_inspected_with(tmp_path, ray_session):
    # the stream and the monitor set listed the folder again: a shard written after the
    # inspection was trained on, outside the run's row counts and data fingerprint
    import shutil

    from pipelines.pretrain import build_train_dataset
    from radjepa.monitoring import monitor_images
    from radjepa.training_data import inspect_shards
    from tests.shard_tables import write_blank_shards

    data = write_blank_shards(tmp_path, n=24, size=64)
    cfg = _cfg(tmp_path, **{"data.crop_size": 64, "model.img_size": 64, "train.batch_size": 4})
    info = inspect_shards(str(data), cfg)
    assert info.files == (str(data / "images" / "part-0.parquet"),)
    shutil.copy(data / "images" / "part-0.parquet", data / "images" / "part-1.parquet")
    assert build_train_dataset(str(data), cfg, files=info.files).count() == info.train_rows
    assert len(monitor_images(str(data), cfg, limit=100, files=info.files)) == info.rows
    assert build_train_dataset(str(data), cfg).count() == 2 * info.train_rows  # a new listing


def test_a_shard_damaged_past_the_inspection_stops_training_in_one_line_without_retries(
    tmp_path, ray_session
):
    # the stream's reader names a shard whose pixel pages fail their checksums (the monitor
    # set, read before, holds none of its images): Ray Train retried it train.max_failures
    # times, then the run said "RayTaskError(ShardError): ray::SplitCoordinator.get()"
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.pretrain import PretrainError, run_pretrain
    from pipelines.storage_errors import is_not_retryable
    from radjepa.shards import DamagedShardError, ShardError, pixels_to_bytes
    from tests.test_shards import corrupt_pages

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name, n, first in (("part-0.parquet", 300, 0), ("part-1.parquet", 40, 1000)):
        images = rng.integers(0, 256, (n, 64, 64)).astype(np.uint8)
        table = pa.table(
            {
                "image_id": [f"{first + i:064x}" for i in range(n)],
                "pixels": pa.array([pixels_to_bytes(a) for a in images], pa.binary()),
                "height": [64] * n,
                "width": [64] * n,
                "dtype": ["uint8"] * n,
            }
        )
        pq.write_table(table, data / name, write_page_checksum=True)
    corrupt_pages(data / "part-1.parquet", "pixels")
    sets = {"data.crop_size": 64, "model.img_size": 64, "data.holdout_fraction": 0}
    cfg = _cfg(tmp_path, **sets, **{"train.steps": 200, "train.max_failures": 1})
    with pytest.raises(PretrainError) as stopped:
        run_pretrain(cfg, str(data))
    assert str(stopped.value).startswith(
        f"training stopped: {data}/part-1.parquet is damaged: its bytes changed after ingest "
        "wrote them (could not verify page integrity, CRC checksum verification failed"
    )
    assert str(stopped.value).endswith("; then re-run the same command to resume")

    # not retried: Ray Train's policy gets the group's error, each rank's a task error
    from ray.exceptions import RayTaskError
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from pipelines.failure_policy import StopOnFullStorage
    from pipelines.runtime import rank_failure

    damage = DamagedShardError("part-1 is damaged")
    read = RayTaskError("ReadShardSource", "Traceback ...", damage)
    read = read.as_instanceof_cause()
    group = WorkerGroupError("rank 1 failed", {1: read})
    assert is_not_retryable(group) and not is_not_retryable(RuntimeError("other"))
    import ray.train

    policy = StopOnFullStorage(ray.train.FailureConfig(max_failures=3))
    assert policy.make_decision(group) == FailureDecision.RAISE
    other = WorkerGroupError("rank 1 failed", {1: RuntimeError("a lost node")})
    assert policy.make_decision(other) != FailureDecision.RAISE
    assert rank_failure(read) == "DamagedShardError: part-1 is damaged"
    gone = WorkerGroupError("rank 1 failed", {1: ShardError("part-1 was removed")})
    assert not is_not_retryable(gone)  # a shard that may come back: Ray's retries apply


def test_a_trainer_restored_at_its_last_checkpoint_says_its_result_once(
    shards, first_runs, tmp_path
):
    # a sweep trial resumed at its last checkpoint (its driver stopped after Ray recorded it,
    # before Tune saved the report) trained nothing and reported nothing: Tune kept the result
    # from before, ranked the trial "stopped early" on an older metric, with no checkpoint
    import json
    import signal

    import ray.train

    from pipelines.pretrain import build_trainer, prepare_outputs
    from pipelines.restore import resume_loop_config
    from radjepa.locations import join_location
    from radjepa.resume import find_resume_point

    sets = {"train.num_workers": 1, "train.steps": 6, "train.checkpoint_every": 2}
    first = _trained(first_runs, tmp_path, **sets)
    cfg = _cfg(tmp_path, **sets)
    storage = prepare_outputs(cfg)
    run_dir = join_location(storage, cfg.train.run_name)
    resume = find_resume_point(cfg, run_dir)
    assert resume.step == 6
    said = tmp_path / "reports.jsonl"

    class Reports(ray.train.UserCallback):
        """What Tune's callback is given (it runs in Ray Train's controller)."""

        def after_report(self, run_context, metrics, checkpoint):
            with open(said, "a") as f:
                f.write(json.dumps({"metrics": metrics[0], "checkpoint": bool(checkpoint)}))
                f.write("\n")

    trainer = build_trainer(
        cfg,
        str(shards),
        storage=storage,
        tracking=None,
        callbacks=[Reports()],
        extra_loop_config=resume_loop_config(run_dir, resume),
        start_step=resume.step,
    )
    handler = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    finally:  # fit() installs Ray Train's Ctrl-C handler (run_pretrain puts it back too)
        signal.signal(signal.SIGINT, handler)
    (report,) = [json.loads(line) for line in said.read_text().splitlines()]
    assert report["checkpoint"] is False  # Ray recorded it once, at step 6
    assert report["metrics"]["step"] == 6 and report["metrics"]["rankme"] > 1
    assert Path(report["metrics"]["checkpoint_path"]) == Path(first.checkpoint)
    assert Path(result.checkpoint.path) == Path(first.checkpoint)

"""Every command finds the MLflow store `radjepa pretrain` registers encoders in: tracking.uri
when set, else the sqlite store under train.output_dir, never a stray ./mlflow.db in whatever
folder the command happens to run from."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import API_KEY, TINY_CONFIG, make_checkpoint

from pipelines.tracking import store_uri
from radjepa.config import load_config


@pytest.fixture
def registered(tmp_path, monkeypatch, migrated_store):
    """A tiny encoder registered as ``tiny-enc`` version 1 the way pretrain does it, in the
    default store of ``train.output_dir`` (an absolute path; no tracking.uri)."""
    import mlflow

    from pipelines.tracking import ensure_experiment, register_artifact_dir, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    cfg = load_config(TINY_CONFIG, [f"train.output_dir={runs}"])
    uri = tracking_uri(cfg.tracking, runs)  # what pretrain uses for this output_dir
    assert migrated_store(runs / "mlflow.db") == uri
    exp = ensure_experiment(uri, cfg.tracking.experiment, str(runs))
    client = mlflow.MlflowClient(uri)
    run = client.create_run(exp)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    client.log_artifacts(run.info.run_id, str(ckpt), "checkpoint-step-7")
    register_artifact_dir(uri, run.info.run_id, "checkpoint-step-7", "tiny-enc")
    client.set_terminated(run.info.run_id, "FINISHED")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a fresh working folder with no store of its own
    return cfg, uri


def test_the_store_is_the_one_pretrain_writes(registered, tmp_path, monkeypatch):
    cfg, uri = registered
    assert store_uri(cfg) == uri
    explicit = cfg.with_overrides({"tracking.uri": "sqlite:////elsewhere/x.db"})
    assert store_uri(explicit) == "sqlite:////elsewhere/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert store_uri(cfg) == "http://mlflow:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert store_uri(cfg.with_overrides({"train.output_dir": "s3://bucket/runs"})) is None


def test_registry_references_resolve_from_any_folder(registered, monkeypatch):
    from serve.registry import resolve_model

    cfg, _ = registered
    resolved = resolve_model("models:/tiny-enc/1", tracking_uri=store_uri(cfg))
    assert (Path(resolved.path) / "meta.json").is_file()
    assert not Path("mlflow.db").exists()  # nothing created in the working folder


def test_serve_checks_registry_references_in_that_store(registered, monkeypatch):
    from ray.serve import Application

    from serve.deployment import app_from_config

    monkeypatch.setenv("RADJEPA_API_KEYS", API_KEY)
    cfg, _ = registered
    app = app_from_config(cfg.with_overrides({"serve.model": "models:/tiny-enc/1"}))
    assert isinstance(app, Application)


def test_embed_and_probe_resolve_in_that_store(registered, tmp_path):
    from pipelines.cli import UserError, embed_cmd
    from pipelines.cli_probe import probe_cmd

    cfg, _ = registered
    sets = [f"train.output_dir={cfg.train.output_dir}"]
    # the reference resolves; what fails is the missing input that comes after it
    with pytest.raises(UserError, match="shards") as err:
        embed_cmd(
            tmp_path / "no-shards",
            tmp_path / "emb",
            model="models:/tiny-enc/1",
            config=str(TINY_CONFIG),
            set_=sets,
        )
    assert "tiny-enc" not in str(err.value)
    with pytest.raises(UserError) as err:
        probe_cmd(
            "models:/tiny-enc/1",
            ["sex"],
            tmp_path / "probe",
            csv=tmp_path / "no-labels.csv",
            config=str(TINY_CONFIG),
            set_=sets,
            mlflow=False,
        )
    assert "tiny-enc" not in str(err.value) and "no-labels.csv" in str(err.value)


def test_credentials_in_uris_are_not_logged(tmp_path, monkeypatch, migrated_store):
    # a database store or pyarrow's s3://KEY:SECRET@bucket in the config: every param and the
    # logged config.yaml are readable by anyone with access to the runs
    import mlflow

    from pipelines.pretrain_tracking import finish_tracking
    from pipelines.tracking import ensure_experiment, log_params
    from radjepa.checkpoint import load_encoder, read_meta, save
    from radjepa.models.encoder import build_encoder

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = migrated_store(tmp_path / "mlflow.db")
    cfg = load_config(
        TINY_CONFIG,
        [
            "tracking.uri=postgresql://mlflow:S3cretPw@db:5432/mlflow",
            "data.shards=s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/shards",
            "tracking.register_model=false",
        ],
    )
    client = mlflow.MlflowClient(store)
    run_id = client.create_run(ensure_experiment(store, "radjepa")).info.run_id
    log_params(run_id, store, cfg)
    ckpt = tmp_path / "ckpt"
    save(ckpt, build_encoder(cfg), cfg, step=7)
    finish_tracking(cfg, store, run_id, str(ckpt), {})
    params = client.get_run(run_id).data.params
    assert params["tracking.uri"] == "postgresql://mlflow:***@db:5432/mlflow"
    assert params["data.shards"] == "s3://AKIAEXAMPLE:***@bucket/shards"
    logged = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl")))
    text = logged.read_text()
    assert "S3cretPw" not in text and "wJalrXUtnFEMI" not in text
    assert "postgresql://mlflow:***@db:5432/mlflow" in text
    # the checkpoint's meta.json goes up with the weights (and with any registered model)
    meta = client.download_artifacts(run_id, "checkpoint-step-7/meta.json", str(tmp_path / "m"))
    text = Path(meta).read_text()
    assert "S3cretPw" not in text and "wJalrXUtnFEMI" not in text and "AKIAEXAMPLE:***@" in text
    assert read_meta(ckpt)["config"]["data"]["shards"] == "s3://AKIAEXAMPLE:***@bucket/shards"
    load_encoder(ckpt)  # the redacted config still validates

    from pipelines.tracking import redact

    assert redact("s3://AK:SEcr+et@bucket/runs") == "s3://AK:***@bucket/runs"
    assert redact("s3://b/p?region=x&secret_key=abc&x=1") == "s3://b/p?region=x&secret_key=***&x=1"
    assert redact("/plain/path:with@signs") == "/plain/path:with@signs"
    assert redact("https://mlflow.example:5000") == "https://mlflow.example:5000"


def test_registry_downloads_from_a_server_are_cached_not_leaked(
    mlflow_server, tmp_path, monkeypatch
):
    # MLflow downloads into a fresh temp folder per call and never removes it: every replica
    # start, embed and probe copied the whole weights again and left the copy behind
    import tempfile

    import mlflow

    from pipelines.pretrain_tracking import finish_tracking, start_tracking
    from pipelines.tracking import check_reachable
    from serve.registry import resolve_model

    check_reachable(mlflow_server)  # a real server passes pretrain's start-up check
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("RADJEPA_CACHE", str(tmp_path / "cache"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where MLflow's temp copies land
    runs = tmp_path / "runs"
    cfg = load_config(TINY_CONFIG, [f"train.output_dir={runs}", "tracking.registered_model=srv"])
    run_id, uri = start_tracking(cfg, str(runs), str(runs / "tiny"))
    version = finish_tracking(cfg, uri, run_id, str(make_checkpoint(tmp_path / "ckpt")), {})
    assert (
        mlflow.MlflowClient(uri)
        .get_model_version("srv", version)
        .source.startswith("mlflow-artifacts:")
    )
    mlflow.MlflowClient(uri).set_registered_model_alias("srv", "champion", version)

    first = resolve_model(f"models:/srv/{version}", tracking_uri=uri)
    again = resolve_model("models:/srv@champion", tracking_uri=uri)
    assert first.path == again.path and (first.path / "weights.safetensors").is_file()
    assert first.path.is_relative_to(tmp_path / "cache")
    assert not any(scratch.rglob("weights.safetensors"))  # no stray copies


def test_a_version_deleted_and_retrained_at_its_step_is_not_served_from_the_old_copy(
    mlflow_server, tmp_path, monkeypatch
):
    # the new version's source is the deleted one's folder (written again by hand: training
    # never writes a folder of its run twice), and the cache was keyed by store and source
    # alone: a machine that had fetched the deleted version served its weights as the new one
    import mlflow
    import torch

    from pipelines.pretrain_tracking import finish_tracking, start_tracking
    from pipelines.tracking import register_artifact_dir
    from radjepa.eval.heads import ENCODER_TAG, checkpoint_fingerprint
    from serve.registry import resolve_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("RADJEPA_CACHE", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    cfg = load_config(TINY_CONFIG, [f"train.output_dir={runs}", "tracking.registered_model=re"])
    run_id, uri = start_tracking(cfg, str(runs), str(runs / "tiny"))
    client = mlflow.MlflowClient(uri)
    torch.manual_seed(1)
    first = finish_tracking(cfg, uri, run_id, str(make_checkpoint(tmp_path / "a")), {})
    source = client.get_model_version("re", first).source
    resolve_model(f"models:/re/{first}", tracking_uri=uri)  # cached on this machine
    client.delete_model_version("re", first)
    torch.manual_seed(2)
    retrained = make_checkpoint(tmp_path / "b")  # the same step, other weights
    folder = source.rstrip("/").rsplit("/", 1)[-1]
    for name in ("weights.safetensors", "meta.json"):
        client.log_artifact(run_id, str(retrained / name), folder)
    tags = {ENCODER_TAG: checkpoint_fingerprint(retrained)}
    second = register_artifact_dir(uri, run_id, folder, "re", tags=tags)
    assert client.get_model_version("re", second).source == source
    served = resolve_model(f"models:/re/{second}", tracking_uri=uri)
    assert checkpoint_fingerprint(served.path) == checkpoint_fingerprint(retrained)


def test_jobs_opening_a_new_store_at_once_all_get_it(tmp_path):
    # two jobs started together on a fresh output folder: MLflow builds the sqlite schema on
    # first open, and concurrent builds failed (6 of 6 processes) and left the store broken
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    # each process imports MLflow's store, says so, and waits for one start time for all: a
    # fixed 15 s for the imports was mostly waited out (2-3 s each on the idle box)
    script = (
        "import sys, time\n"
        "import mlflow.store.tracking.sqlalchemy_store\n"
        "from pipelines.tracking import client\n"
        "print('ready', flush=True)\n"
        "start = float(sys.stdin.readline())\n"
        "while time.time() < start:\n"
        "    time.sleep(0.001)\n"
        "client(sys.argv[1]).search_experiments()\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, uri],
            cwd=Path(__file__).resolve().parents[1],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    early = ["" for _ in procs]
    for i, p in enumerate(procs):  # a line at a time until "ready" (or the process ended)
        while (line := p.stdout.readline()) not in ("ready\n", ""):
            early[i] += line
    start = time.time() + 0.5
    for p in procs:
        try:
            p.stdin.write(f"{start}\n")
            p.stdin.flush()
        except BrokenPipeError:
            pass  # it ended before its start: its output and exit status, below, say why
    outputs = [e + p.communicate(timeout=300)[0] for e, p in zip(early, procs, strict=True)]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(o[-600:] for o in outputs)

    import mlflow

    client = mlflow.MlflowClient(uri)
    assert client.get_experiment_by_name("Default") is not None  # the store works afterwards


def test_a_copied_template_store_is_the_store_mlflow_builds_in_place(
    tmp_path, monkeypatch, migrated_store
):
    # the tests given a store by conftest's migrated_store get a copy of one migrated once per
    # session: it must read as the store MLflow builds in their folder, schema, migration and
    # Default experiment alike (MLflow writes that one's absolute artifact location from the
    # working folder of its first opener: a copy carrying the template's would be wrong)
    import sqlite3
    from contextlib import closing

    import mlflow

    from pipelines.tracking import sqlite_file

    monkeypatch.chdir(tmp_path)
    fresh = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    (tmp_path / "fresh").mkdir()
    copied = migrated_store(tmp_path / "copied" / "mlflow.db")
    assert b"mlflow-template" not in (tmp_path / "copied" / "mlflow.db").read_bytes()

    def described(uri: str) -> tuple:
        default = mlflow.MlflowClient(uri).get_experiment("0")
        with closing(sqlite3.connect(sqlite_file(uri))) as con:
            # each statement as a set of lines: two stores MLflow builds in two processes list
            # the constraints of a table its migrations rebuilt (runs) in hash-seeded orders
            schema = {
                (
                    kind,
                    name,
                    table,
                    frozenset(line.strip(" ,") for line in (sql or "").splitlines()),
                )
                for kind, name, table, sql in con.execute(
                    "SELECT type, name, tbl_name, sql FROM sqlite_master"
                )
            }
            version = con.execute("SELECT version_num FROM alembic_version").fetchall()
        return default.name, default.artifact_location, default.lifecycle_stage, schema, version

    assert described(copied) == described(fresh)


def test_a_store_uri_with_a_query_locks_and_keeps_artifacts_beside_its_database(tmp_path):
    # sqlite:///db?timeout=30 (SQLAlchemy's busy timeout): the first-open lock was created as
    # "db?timeout=30.lock", a name other spellings of the same store do not share
    import mlflow

    from pipelines.tracking import ensure_experiment

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}?timeout=30"
    exp_id = ensure_experiment(uri, "q")
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["mlflow.db", "mlflow.db.lock"]
    location = mlflow.MlflowClient(uri).get_experiment(exp_id).artifact_location
    assert location == (tmp_path / "store" / "mlartifacts").as_uri()


def test_a_relative_sqlite_store_is_the_one_in_the_folder_the_command_ran_from(
    tmp_path, monkeypatch
):
    # Ray Train workers and Tune trials run in folders of their own (/tmp/ray/session_*/...):
    # handed sqlite:///mlflow.db as given, the workers logged a run's metrics into a new, empty
    # store there (a warning, the metrics lost) and each sweep trial made its child run there
    import os
    import subprocess
    import sys

    import mlflow

    from pipelines.pretrain_tracking import start_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY_CONFIG, ["tracking.uri=sqlite:///stores/mlflow.db?timeout=30"])
    assert store_uri(cfg) == f"sqlite:///{tmp_path / 'stores' / 'mlflow.db'}?timeout=30"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    assert store_uri(cfg) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    runs = tmp_path / "runs"
    run_id, uri = start_tracking(cfg, str(runs), str(runs / "tiny"))
    worker = tmp_path / "worker"  # what a Ray worker's working folder is to the driver
    worker.mkdir()
    script = (
        "import sys\n"
        "from pipelines.tracking import log_metrics\n"
        "log_metrics(sys.argv[1], sys.argv[2], {'loss': 0.5}, 3)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script, run_id, uri],
        cwd=worker,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-600:]
    history = mlflow.MlflowClient(uri).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.5)]
    assert not (worker / "stores").exists()


def test_a_registry_reference_into_a_store_that_does_not_exist_says_so(tmp_path, monkeypatch):
    # MLflow opens a missing sqlite store by creating an empty one: a mistyped output_dir
    # answered "Model Version ... not found" and left a new mlflow.db and its folders behind
    from pipelines.cli import UserError
    from pipelines.cli_probe import probe_cmd
    from serve.registry import ModelNotFound, resolve_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    typo = tmp_path / "rusn"
    cfg = load_config(TINY_CONFIG, [f"train.output_dir={typo}"])
    with pytest.raises(ModelNotFound, match="no MLflow store at") as err:
        resolve_model("models:/tiny-enc@champion", tracking_uri=store_uri(cfg))
    assert str(typo / "mlflow.db") in str(err.value)
    assert not typo.exists()
    with pytest.raises(UserError, match="no MLflow store at"):
        probe_cmd(
            "models:/tiny-enc/1",
            ["sex"],
            tmp_path / "probe",
            csv=tmp_path / "labels.csv",
            config=str(TINY_CONFIG),
            set_=[f"train.output_dir={typo}"],
            mlflow=False,
        )
    # outputs on object storage and no store configured: nowhere to look, not ./mlflow.db
    remote = cfg.with_overrides({"train.output_dir": "s3://bucket/runs"})
    with pytest.raises(ModelNotFound, match="tracking.uri"):
        resolve_model("models:/tiny-enc/1", tracking_uri=store_uri(remote))
    assert not typo.exists() and not (tmp_path / "mlflow.db").exists()


def test_a_run_whose_id_cannot_be_kept_is_not_left_running(tmp_path, monkeypatch, migrated_store):
    # the MLflow run was made, then writing its id beside the checkpoints failed: no re-run
    # could continue it, and it stayed RUNNING in the UI for good
    import mlflow

    from pipelines.pretrain_tracking import start_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    cfg = load_config(TINY_CONFIG, [f"train.output_dir={runs}"])
    migrated_store(runs / "mlflow.db")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run folder should be")
    with pytest.raises(OSError):
        start_tracking(cfg, str(runs), str(blocker / "tiny"))
    uri = store_uri(cfg)
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("radjepa").experiment_id])
    assert run.info.status == "FAILED"


def test_a_resume_whose_mlflow_run_is_not_in_the_store_says_so_in_one_line(
    tmp_path, monkeypatch, migrated_store, caplog
):
    """A re-run whose folder names an MLflow run the store does not hold (the team moved to a
    tracking server, the run deleted in the UI) printed two tracebacks from ending a run that
    is not there, then MLflow's "Run with id=... not found", and no way on."""
    import logging

    import mlflow

    from pipelines.pretrain import PretrainError
    from pipelines.pretrain_tracking import start_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    cfg = load_config(TINY_CONFIG, [f"train.output_dir={runs}"])
    uri = migrated_store(runs / "mlflow.db")
    (runs / "tiny").mkdir()
    id_file = runs / "tiny" / "mlflow_run_id"
    id_file.write_text("0" * 32)
    with caplog.at_level(logging.WARNING), pytest.raises(PretrainError) as err:
        start_tracking(cfg, str(runs), str(runs / "tiny"))
    said = str(err.value)
    assert "\n" not in said and not [r for r in caplog.records if r.exc_info]
    assert said.startswith(f"{id_file} names MLflow run {'0' * 32}, which is not in the store ")
    assert f"or delete {id_file}" in said
    # deleted in the UI: the same, said as such
    run_id, _ = start_tracking(cfg, str(runs), str(runs / "other"))
    mlflow.MlflowClient(uri).delete_run(run_id)
    with pytest.raises(PretrainError, match=f"run {run_id}, which is deleted in the store "):
        start_tracking(cfg, str(runs), str(runs / "other"))


def test_the_data_fingerprint_names_the_images_not_the_shard_layout(tmp_path):
    # a run trained with --data recorded `data.shards: None` and nothing else about its data
    import numpy as np
    import pyarrow.parquet as pq
    from shard_tables import write_shard

    from pipelines.tracking import provenance_tags
    from radjepa.training_data import inspect_shards

    cfg = load_config(TINY_CONFIG, ["train.batch_size=2", "data.holdout_fraction=0"])
    images = np.random.default_rng(0).integers(0, 255, (6, 96, 96), dtype=np.uint8)
    ids = [f"{i:064x}" for i in range(6)]
    write_shard(tmp_path / "a", images, image_id=ids)
    one = inspect_shards(str(tmp_path / "a"), cfg)
    # the same images in two shards, in another order
    table = pq.read_table(tmp_path / "a" / "images" / "part-0.parquet")
    (tmp_path / "b" / "images").mkdir(parents=True)
    pq.write_table(table.slice(3), tmp_path / "b" / "images" / "part-0.parquet")
    pq.write_table(table.slice(0, 3), tmp_path / "b" / "images" / "part-1.parquet")
    assert inspect_shards(str(tmp_path / "b"), cfg).fingerprint == one.fingerprint
    write_shard(tmp_path / "c", images[:5], image_id=ids[:5])  # one image fewer
    assert inspect_shards(str(tmp_path / "c"), cfg).fingerprint != one.fingerprint

    tags = provenance_tags("s3://AK:SEcret@bucket/shards", one.rows, one.fingerprint)
    assert tags["radjepa.data"] == "s3://AK:***@bucket/shards"
    assert tags["radjepa.data_images"] == "6" and len(tags["radjepa.data_fingerprint"]) == 64
    for dist in ("radjepa", "torch", "ray", "mlflow", "python"):
        assert tags[f"radjepa.{dist}_version"], dist
    assert len(tags["mlflow.source.git.commit"]) == 40  # the tests run from a checkout
    assert tags["radjepa.git_dirty"] in ("true", "false")


def test_a_tracking_server_that_is_down_is_said_in_seconds_before_ray(tmp_path):
    # MLflow retries each request 7 times with back-off: `radjepa pretrain` against a server
    # that was down started Ray, then failed after about 4 minutes. RAY_ADDRESS names a port
    # where nothing listens, so reaching Ray at all fails the test with another message.
    import os
    import subprocess
    import sys
    import time

    from serve_helpers import free_port
    from shard_tables import write_metadata_shard

    from pipelines.tracking import check_reachable

    write_metadata_shard(tmp_path / "shards")
    ports = [free_port(), free_port()]
    server = f"http://127.0.0.1:{ports[0]}"

    started = time.monotonic()
    with pytest.raises(ConnectionError) as err:
        check_reachable(server)
    assert time.monotonic() - started < 3
    assert str(err.value).startswith(
        f"the MLflow tracking server {server} does not answer (connection refused)"
    )
    # anything that answers HTTP passes, even a 404 (a proxy path, a server without /health):
    # what it says to MLflow's own calls is theirs to report
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_error(404)

        def log_message(self, *args):
            pass

    with HTTPServer(("127.0.0.1", 0), NotFound) as up:
        threading.Thread(target=up.serve_forever, daemon=True).start()
        check_reachable(f"http://127.0.0.1:{up.server_address[1]}/mlflow/")
        up.shutdown()

    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "pretrain", "-c", "configs/tiny_cpu.yaml"]
        + ["--data", str(tmp_path / "shards"), "--set", f"train.output_dir={tmp_path / 'runs'}"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "RAY_ADDRESS": f"127.0.0.1:{ports[1]}", "MLFLOW_TRACKING_URI": server},
        timeout=200,
    )
    assert out.returncode == 2, out.stderr
    assert time.monotonic() - started < 60  # the interpreter and imports; it was 4 minutes
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the MLflow tracking server {server} does not answer"), last
    assert "tracking.enabled=false" in last and "Traceback" not in out.stderr


@pytest.mark.parametrize("command", ["probe models:/", "probe folder", "embed models:/"])
def test_probe_and_embed_say_in_seconds_that_the_tracking_server_does_not_answer(
    command, tmp_path, nih_dir
):
    # MLflow retries each request with back-off: `probe models:/...` and `embed --model
    # models:/...` waited minutes on the registry look-up (embed before its Ray start), and a
    # probe of a folder ran the whole probe, then waited as long to log it. RAY_ADDRESS names a
    # port where nothing listens, so a refusal that came only once Ray starts says so instead.
    import os
    import subprocess
    import sys
    import time

    import numpy as np
    from serve_helpers import free_port
    from shard_tables import write_shard

    server = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    ckpt = make_checkpoint(tmp_path / "ckpt")
    model = str(ckpt) if command.endswith("folder") else "models:/tiny-enc@champion"
    if command.startswith("probe"):
        out = tmp_path / "probe"
        args = ["probe", model, "-l", "sex=M", "--out", str(out), "--limit", "40"]
        args += ["--csv", str(nih_dir / "labels.csv")]
    else:
        out = tmp_path / "index"
        shards = tmp_path / "shards"
        write_shard(shards, np.zeros((4, 64, 64), np.uint8), image_id=["a", "b", "c", "d"])
        args = ["embed", str(shards), str(out), "--model", model]
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}", "RAY_TMPDIR": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.monotonic()
    try:
        res = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", *args, "-c", str(TINY_CONFIG)]
            + ["--set", f"tracking.uri={server}", "--set", "probe.bootstrap=0"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            timeout=90,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`radjepa {command}` still waited on {server} after 90 s")
    assert res.returncode == 2, res.stdout + res.stderr
    assert time.monotonic() - started < 60  # the interpreter and imports
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr  # the CLI logs to stdout: stderr is the error alone
    said = f"the MLflow tracking server {server} does not answer (connection refused)"
    if model.startswith("models:/"):  # no way around the store: it holds the model
        assert lines[0].startswith(f"error: cannot resolve {model}: {said}"), lines[0]
        assert "tracking.enabled" not in lines[0]
    else:  # only the logging needs it
        assert lines[0].startswith(f"error: {said}"), lines[0]
        assert "tracking.enabled=false" in lines[0]
    assert not out.exists()  # nothing written: the probe did not run
    assert not list(tmp_path.rglob("session_*")), "a local Ray instance was started"


def test_a_registered_head_on_a_server_is_fetched_once_and_never_replaced(
    mlflow_server, tmp_path, monkeypatch
):
    # the cache took a copy for complete only when it held an encoder's files: a head (its own
    # two files) was downloaded again by every resolve, and each rename found the folder there
    # and deleted it, under another replica reading it ("head.json is missing")
    import tempfile

    from serve_helpers import make_head

    from pipelines.tracking import client, ensure_experiment, register_artifact_dir
    from radjepa.eval.heads import HEAD_FILES
    from serve.registry import resolve_head

    monkeypatch.setenv("RADJEPA_CACHE", str(tmp_path / "cache"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where MLflow's temp copies land
    head = make_head(tmp_path / "head", 32)
    mc = client(mlflow_server)
    run_id = mc.create_run(ensure_experiment(mlflow_server, "probe")).info.run_id
    mc.log_artifacts(run_id, str(head), "head")
    version = register_artifact_dir(mlflow_server, run_id, "head", "srv-head")

    ref = f"models:/srv-head/{version}"
    first = resolve_head(ref, tracking_uri=mlflow_server)
    cached = next((tmp_path / "cache").rglob(HEAD_FILES[1]))
    seen = {name: (cached.parent / name).stat().st_ino for name in HEAD_FILES}
    again = resolve_head(ref, tracking_uri=mlflow_server)
    assert {name: (cached.parent / name).stat().st_ino for name in HEAD_FILES} == seen
    assert (
        list(first.head.label_names) == list(again.head.label_names) == ["Effusion", "Cardiomegaly"]
    )
    assert first.source == again.source == ref
    assert len(list((tmp_path / "cache").rglob(HEAD_FILES[1]))) == 1
    assert not any(scratch.rglob(HEAD_FILES[1]))  # no stray copies


def test_a_finished_run_recorded_again_keeps_its_version_s_encoder_tag_true(
    tmp_path, migrated_store, caplog
):
    # the tag a cluster's serve checks head and index against: a version registered before
    # the tag got none when its run was recorded again; a retrained step-N checkpoint is a
    # new version with its own tag, the first keeping its files and tag
    import mlflow
    import torch

    from pipelines.pretrain_tracking import finish_tracking
    from pipelines.tracking import ensure_experiment
    from radjepa.eval.heads import ENCODER_TAG, checkpoint_fingerprint

    uri = migrated_store(tmp_path / "mlflow.db")
    mc = mlflow.MlflowClient(uri)
    run_id = mc.create_run(ensure_experiment(uri, "radjepa")).info.run_id
    cfg = load_config(TINY_CONFIG, ["tracking.registered_model=srv"])
    ckpt = make_checkpoint(tmp_path / "ckpt")
    version = finish_tracking(cfg, uri, run_id, str(ckpt), {})

    def tag() -> str | None:
        return mc.get_model_version("srv", version).tags.get(ENCODER_TAG)

    assert tag() == checkpoint_fingerprint(ckpt)
    mc.delete_model_version_tag("srv", version, ENCODER_TAG)  # as registered before the tag
    assert finish_tracking(cfg, uri, run_id, str(ckpt), {}) == version
    assert tag() == checkpoint_fingerprint(ckpt)
    assert "now holds other weights" not in caplog.text

    torch.manual_seed(1)
    retrained = make_checkpoint(tmp_path / "retrained")  # the same step, other weights
    newer = finish_tracking(cfg, uri, run_id, str(retrained), {})
    assert newer != version and tag() == checkpoint_fingerprint(ckpt)
    assert mc.get_model_version("srv", newer).tags[ENCODER_TAG] == checkpoint_fingerprint(retrained)
    assert f"srv version {version} holds other weights for step 7" in caplog.text


def test_a_store_moved_or_copied_elsewhere_is_refused_before_it_writes_to_the_old_place(
    tmp_path, migrated_store
):
    """The docs call a run folder's store self-contained, but its experiment keeps artifacts by
    absolute path: after `mv runs /data/runs` new runs and registered versions went to the old
    folder (re-created), and a copy's went into the original."""
    import shutil

    from pipelines.tracking import StoreMoved, ensure_experiment

    old = tmp_path / "old"
    uri = migrated_store(old / "mlflow.db")
    exp = ensure_experiment(uri, "radjepa")
    assert ensure_experiment(uri, "radjepa") == exp  # in place: found, as always
    copy = Path(shutil.copytree(old, tmp_path / "copy"))
    moved = tmp_path / "moved"
    old.rename(moved)
    for folder in (copy, moved):
        with pytest.raises(StoreMoved, match=f"was moved or copied from {old}: ") as err:
            ensure_experiment(f"sqlite:///{folder / 'mlflow.db'}", "radjepa")
        assert "\n" not in str(err.value) and "tracking.experiment=" in str(err.value)
        assert not old.exists()  # nothing written to the old place
        # a new experiment in the new place keeps its artifacts there
        ensure_experiment(f"sqlite:///{folder / 'mlflow.db'}", "radjepa-here")
    # the probe records its run only at its end: it says so before its work
    from pipelines.cli import UserError

    with pytest.raises(UserError, match=f"was moved or copied from {old}: "):
        _probe_of_nothing(tmp_path, moved)
    assert not old.exists() and not (tmp_path / "probe").exists()


def _probe_of_nothing(tmp_path: Path, output_dir: Path | str) -> None:
    """`radjepa probe` of a checkpoint and labels that do not exist, recording under
    ``output_dir``: only a refusal before its work (MLflow's store) can say other than that."""
    from pipelines.cli_probe import probe_cmd

    probe_cmd(
        str(tmp_path / "no-checkpoint"),
        ["sex"],
        tmp_path / "probe",
        csv=tmp_path / "no-labels.csv",
        config=str(TINY_CONFIG),
        set_=[f"train.output_dir={output_dir}"],
    )


def test_a_probe_with_no_store_to_record_in_says_so_before_its_work(tmp_path, monkeypatch):
    # outputs on object storage and no store configured: refused only after the whole probe
    from pipelines.cli import UserError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UserError, match="no local MLflow store: set tracking.uri"):
        _probe_of_nothing(tmp_path, "s3://bucket/runs")


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:////data/chest x-ray runs/mlflow.db",
        "sqlite:////data/run#3/mlflow.db",
        "postgresql://mlflow:S3cret@db.internal/mlflow",
    ],
)
def test_the_printed_mlflow_ui_command_runs_as_pasted_into_a_shell(uri):
    """A space split the store into two arguments, and a '#' cut the rest off as a comment
    (split here as a shell splits: comments on); quoting keeps the password out."""
    import shlex

    from pipelines.tracking import redact, ui_command

    said = ui_command(uri)
    assert "S3cret" not in said
    assert shlex.split(said, comments=True) == ["mlflow", "ui", "--backend-store-uri", redact(uri)]

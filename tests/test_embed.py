"""``radjepa embed``: ingest shards -> Ray Data actor pool -> embeddings Parquet -> index."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from serve_helpers import TINY_CONFIG, make_checkpoint, nih_pngs

from pipelines.embed import OUTPUT_COLUMNS

pytestmark = pytest.mark.ray

N_IMAGES = 10
SHARD_KEY = b"s" * 32  # the key the shards' pseudonyms are recorded as made with


def _write_shards(dst, nih_dir):
    """Two shards in the ingest schema (radjepa.shards.SHARD_SCHEMA), via the ingest decoder."""
    from radjepa.imaging.decode import decode_image
    from radjepa.shards import IMAGES_DIR, SHARD_SCHEMA, pixels_to_bytes

    rows = []
    for i, png in enumerate(nih_pngs(nih_dir, N_IMAGES)):
        decoded = decode_image(png.read_bytes(), size=256, dtype="uint8", secret=SHARD_KEY)
        pid = hashlib.sha256(f"patient{i // 2}".encode()).hexdigest()[:32]
        row = dict.fromkeys(SHARD_SCHEMA.names)
        row.update(decoded.meta)
        row.update(
            pixels=pixels_to_bytes(decoded.pixels),
            height=256,
            width=256,
            dtype="uint8",
            patient_pid=pid,
            study_pid=pid,
            series_pid=None,
            instance_pid=pid[::-1],
        )
        rows.append(row)
    # the key record ingest writes before its first shard
    from radjepa.imaging.deid import key_fingerprint
    from radjepa.ingest.destination import Destination, check_key

    key = {
        "key": "secret",
        "key_fingerprint": key_fingerprint(SHARD_KEY),
        "patient_identity": "issuer_and_patient_id",
    }
    check_key(Destination(str(dst)), None, key, "RADJEPA_DEID_SECRET")
    half = N_IMAGES // 2
    for k, part in enumerate((rows[:half], rows[half:])):
        table = pa.Table.from_pylist(part, SHARD_SCHEMA)
        pq.write_table(table, dst / IMAGES_DIR / f"part-{k:05d}.parquet")
    return rows


@pytest.fixture(scope="module")
def embedded(ray_session, tmp_path_factory, nih_dir):
    """One run of the real command line: `radjepa embed SHARDS OUT --model CKPT`, with the
    shards and the output given as URIs."""
    from typer.testing import CliRunner

    from pipelines.cli import app
    from radjepa.config import load_config

    root = tmp_path_factory.mktemp("embed")
    rows = _write_shards(root / "ingest", nih_dir)
    ckpt = make_checkpoint(root / "ckpt")
    out = root / "index"
    args = [  # URIs, as a cluster job gets them (s3://...): file:// takes the same path
        "embed",
        (root / "ingest").as_uri(),
        out.as_uri(),
        "--model",
        str(ckpt),
        "--config",
        str(TINY_CONFIG),
        "--batch-size",
        "4",
        "--actors",
        "1",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return {
        "root": root,
        "rows": rows,
        "ckpt": ckpt,
        "out": out,
        "output": result.output,
        "cfg": load_config(TINY_CONFIG),
    }


def test_every_image_is_embedded_with_its_ids(embedded):
    assert f"embedded {N_IMAGES} images (dim 192, model tiny:step-7)" in embedded["output"]
    table = pq.read_table(embedded["out"])
    assert table.column_names == list(OUTPUT_COLUMNS)
    assert sorted(table.column("image_id").to_pylist()) == sorted(
        r["image_id"] for r in embedded["rows"]
    )
    by_id = {r["image_id"]: r for r in embedded["rows"]}
    for row in table.select(["image_id", "patient_pid", "series_pid"]).to_pylist():
        assert row["patient_pid"] == by_id[row["image_id"]]["patient_pid"]
        assert row["series_pid"] is None
    assert "pixels" not in table.column_names  # the index carries no image data


def test_batch_embeddings_equal_the_served_model_on_the_same_pixels(embedded):
    from radjepa.shards import pixels_from_bytes
    from serve.embedder import EncoderRunner

    runner = EncoderRunner.from_checkpoint(embedded["ckpt"])
    table = pq.read_table(embedded["out"])
    got = {
        i: np.asarray(e, np.float32)
        for i, e in zip(
            table.column("image_id").to_pylist(), table.column("embedding").to_pylist(), strict=True
        )
    }
    rows = embedded["rows"][:3]
    pixels = [pixels_from_bytes(r["pixels"], 256, 256, "uint8") for r in rows]
    for r, out in zip(rows, runner.run(pixels, [False] * 3), strict=True):
        np.testing.assert_allclose(got[r["image_id"]], out.embedding, rtol=1e-4, atol=1e-4)


def test_output_loads_as_the_similar_case_index(embedded):
    from serve.index import EmbeddingIndex

    index = EmbeddingIndex.from_parquet(embedded["out"])
    assert len(index) == N_IMAGES and index.dim == 192
    first = embedded["rows"][4]["image_id"]
    query = index.matrix[index.image_ids.index(first)]
    hits = index.search(query, 3)
    assert hits[0].image_id == first and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].pids["patient_pid"] == embedded["rows"][4]["patient_pid"]


def test_served_index_leaves_out_the_uploaded_archive_image_and_its_patient(
    embedded, nih_dir, monkeypatch
):
    """The ids the embed job writes are keyed hashes of the files ingest read, and the index
    says so: a server holding the ingest key hashes an upload the same way, so the same file
    sent to /v1/similar is recognised as itself (and, on request, its patient as well); one
    with another key says in every answer that it cannot recognise it."""
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.embedder import EncoderRunner, LocalEmbedder
    from serve.index import EmbeddingIndex
    from serve.security import ApiSettings

    index = EmbeddingIndex.from_parquet(embedded["out"])
    assert index.image_id_scheme == "hmac-sha256"
    runner = EncoderRunner.from_checkpoint(embedded["ckpt"])
    env = "RADJEPA_TEST_EMBED_DEID_KEY"
    monkeypatch.setenv(env, SHARD_KEY.decode())  # the server holds the ingest key
    settings = ApiSettings(insecure_local=True, secret_env=env)
    client = TestClient(create_app(LocalEmbedder(runner), settings=settings, index=index))
    upload = nih_pngs(nih_dir, N_IMAGES)[4].read_bytes()  # the original file, as a client has it
    own, sibling = embedded["rows"][4], embedded["rows"][5]  # rows 4 and 5: one patient
    assert own["image_id"] != hashlib.sha256(upload).hexdigest()  # not linkable without the key

    def similar(**params):
        r = client.post(
            "/v1/similar", content=upload, headers={"content-type": "image/png"}, params=params
        )
        assert r.status_code == 200, r.text
        return r.json()["results"][0]

    res = similar(k=3)
    assert len(res["neighbours"]) == 3
    assert own["image_id"] not in {h["image_id"] for h in res["neighbours"]}
    assert res["image_id"] == own["image_id"] and res["excluded_self"] == 1
    assert res["image_id_match"] == "used"
    assert similar(k=1, include_self=True)["neighbours"][0]["image_id"] == own["image_id"]

    res = similar(k=N_IMAGES, exclude_patient_pid=own["patient_pid"])
    assert (res["excluded_self"], res["excluded_patient"]) == (1, 1)
    assert len(res["neighbours"]) == N_IMAGES - 2
    assert sibling["image_id"] not in {h["image_id"] for h in res["neighbours"]}
    assert own["patient_pid"] not in {h["patient_pid"] for h in res["neighbours"]}

    # another key: the upload cannot be recognised, and every answer says so
    monkeypatch.setenv(env, "another-serving-key-0123456789abcdef")
    client = TestClient(create_app(LocalEmbedder(runner), settings=settings, index=index))
    res = similar(k=1)
    assert (res["excluded_self"], res["image_id_match"]) == (0, "key_mismatch")
    assert res["image_id"] != own["image_id"]


def test_index_records_its_checkpoint_and_is_served_only_with_it(embedded, tmp_path):
    import torch

    from radjepa.eval.heads import checkpoint_fingerprint
    from serve.app import create_app
    from serve.embedder import EncoderRunner, LocalEmbedder
    from serve.index import EmbeddingIndex
    from serve.security import ApiSettings

    sha = checkpoint_fingerprint(embedded["ckpt"])
    assert set(pq.read_table(embedded["out"]).column("encoder_sha256").to_pylist()) == {sha}
    index = EmbeddingIndex.from_parquet(embedded["out"])
    assert index.encoder_fingerprint == sha and index.model == "tiny:step-7"
    settings = ApiSettings(insecure_local=True, allow_development_key=True)
    own = LocalEmbedder(EncoderRunner.from_checkpoint(embedded["ckpt"]))
    assert create_app(own, settings=settings, index=index).state.index is index
    torch.manual_seed(1)  # another checkpoint of the same architecture
    other = LocalEmbedder(EncoderRunner.from_checkpoint(make_checkpoint(tmp_path / "other")))
    with pytest.raises(ValueError, match="rebuild it with `radjepa embed`"):
        create_app(other, settings=settings, index=index)


def test_index_records_the_key_and_scheme_of_its_shards(embedded, monkeypatch, caplog):
    """The server pseudonymises an upload's own PatientID to find its patient in the archive:
    the index carries what made the archive's pseudonyms, so the server can use the same
    scheme and tell whether its key is the same."""
    from radjepa.imaging.deid import key_fingerprint
    from serve.app import create_app
    from serve.embedder import EncoderRunner, LocalEmbedder
    from serve.index import EmbeddingIndex
    from serve.security import ApiSettings, SecurityConfigError

    table = pq.read_table(embedded["out"])
    fingerprint = key_fingerprint(SHARD_KEY)
    assert set(table.column("pseudonym_key_fingerprint").to_pylist()) == {fingerprint}
    assert set(table.column("patient_identity").to_pylist()) == {"issuer_and_patient_id"}
    index = EmbeddingIndex.from_parquet(embedded["out"])
    assert (index.pseudonym_key, index.patient_identity) == (fingerprint, "issuer_and_patient_id")

    assert set(table.column("image_id_scheme").to_pylist()) == {"hmac-sha256"}
    env = "RADJEPA_TEST_EMBED_DEID_KEY"
    settings = ApiSettings(insecure_local=True, secret_env=env)
    embedder = LocalEmbedder(EncoderRunner.from_checkpoint(embedded["ckpt"]))
    monkeypatch.setenv(env, SHARD_KEY.decode())
    state = create_app(embedder, settings=settings, index=index).state
    assert (state.upload_pseudonyms.status, state.upload_pseudonyms.scheme) == (
        "verified",
        "issuer_and_patient_id",
    )
    assert (state.image_id_scheme, state.image_id_status) == ("hmac-sha256", "verified")
    monkeypatch.delenv(env)
    with pytest.raises(SecurityConfigError, match="allow_development_key=true"):
        create_app(embedder, settings=settings, index=index)  # no key, no opt-in: refused
    opted_in = settings.model_copy(update={"allow_development_key": True})
    with caplog.at_level("WARNING", logger="serve.index"):  # the public key: not the shards'
        state = create_app(embedder, settings=opted_in, index=index).state
    assert state.upload_pseudonyms.status == "key_mismatch"
    assert state.image_id_status == "key_mismatch"
    assert "is not the key" in caplog.text


def test_user_errors_are_named(embedded, tmp_path):
    from pipelines.embed import EmbedError, run_embed

    with pytest.raises(EmbedError, match="no Parquet shards"):
        run_embed(embedded["cfg"], tmp_path, tmp_path / "o", model=embedded["ckpt"])
    with pytest.raises(EmbedError, match="already holds Parquet"):
        run_embed(
            embedded["cfg"],
            embedded["root"] / "ingest",
            embedded["out"],
            model=embedded["ckpt"],
        )
    with pytest.raises(EmbedError, match="checkpoint not found"):
        run_embed(
            embedded["cfg"], embedded["root"] / "ingest", tmp_path / "o", model=tmp_path / "nope"
        )
    # shards without a row (made by hand, or cut down with a filter): nothing to index
    import pyarrow.parquet as pq

    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    for shard in sorted((embedded["root"] / "ingest" / "images").glob("*.parquet"))[:2]:
        pq.write_table(pq.read_table(shard).slice(0, 0), empty / "images" / shard.name)
    with pytest.raises(EmbedError, match="2 shard.s. in .* hold no images"):
        run_embed(embedded["cfg"], empty, tmp_path / "o2", model=embedded["ckpt"])
    assert not (tmp_path / "o2").exists()

    # as many actors as free CPUs: nothing was left to read the shards, and the run waited
    # for ever without an error
    import ray

    free = int(ray.available_resources()["CPU"])
    ingest = embedded["root"] / "ingest"
    with pytest.raises(EmbedError, match=f"needs one more; the cluster has {free} free: lower"):
        run_embed(embedded["cfg"], ingest, tmp_path / "o3", model=embedded["ckpt"], actors=free)
    assert not (tmp_path / "o3").exists()
    # a shard other than the first damaged (a copy cut short): pyarrow's traceback; named
    # by the read now, the parts written before it left marked unfinished
    damaged = tmp_path / "damaged"
    (damaged / "images").mkdir(parents=True)
    shards = sorted((ingest / "images").glob("*.parquet"))
    assert len(shards) >= 2
    for shard in shards:
        (damaged / "images" / shard.name).write_bytes(shard.read_bytes())
    last = damaged / "images" / shards[-1].name
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(EmbedError) as stopped:
        run_embed(embedded["cfg"], damaged, tmp_path / "o4", model=embedded["ckpt"], actors=1)
    assert str(stopped.value).startswith(f"{last} is damaged, no whole Parquet file (")
    assert "marked unfinished" in str(stopped.value)


def test_a_model_folder_that_is_no_checkpoint_is_refused_before_ray(tmp_path, nih_dir):
    """`--model` given the ingest output (it holds JSON files, so it hashes like a checkpoint):
    each actor failed to read meta.json after Ray started, ~300 lines of retried actor
    tracebacks came before the one line saying why, and OUT was left with its
    incomplete-run marker. Now the driver reads meta.json before Ray and before OUT."""
    from pipelines.embed import EmbedError, run_embed
    from radjepa.config import load_config

    shards = tmp_path / "ingest"
    _write_shards(shards, nih_dir)
    out = tmp_path / "index"
    with pytest.raises(EmbedError, match="is not a checkpoint folder .no meta.json.$") as err:
        run_embed(load_config(TINY_CONFIG), shards, out, model=shards, actors=1)
    assert "could not start" not in str(err.value)  # said by the driver, not by the actors
    assert not out.exists()


def test_an_interrupted_run_leaves_an_index_the_server_refuses(embedded, tmp_path, monkeypatch):
    """Ray Data writes each part of the index straight into OUT as its task ends, so a run
    stopped midway (reproduced for real: SIGTERM to `radjepa embed` over 4096 images after its
    first part appeared left 1984 rows) left valid Parquet that the server loaded as the whole
    archive, and /v1/similar missed the rest without a word. Here the write stops after a real
    first part; the server refuses the folder and a re-run says what it holds."""
    import ray.data

    from pipelines.embed import EmbedError, run_embed
    from serve.index import EmbeddingIndex, IndexLoadError

    write_parquet = ray.data.Dataset.write_parquet

    def stopped_midway(self, path, **kwargs):
        write_parquet(self.limit(3), path, **kwargs)  # the parts written before the stop
        raise RuntimeError("node preempted")

    monkeypatch.setattr(ray.data.Dataset, "write_parquet", stopped_midway)
    out = tmp_path / "index"
    with pytest.raises(RuntimeError, match="preempted"):
        run_embed(
            embedded["cfg"], embedded["root"] / "ingest", out, model=embedded["ckpt"], actors=1
        )
    assert pq.read_table(out).num_rows == 3  # what the old server served as the archive
    for load in (
        EmbeddingIndex.from_parquet,
        EmbeddingIndex.recorded_encoder,
        EmbeddingIndex.recorded_pseudonyms,
    ):
        with pytest.raises(IndexLoadError, match="is incomplete: the `radjepa embed` run"):
            load(out)
    monkeypatch.undo()
    with pytest.raises(EmbedError, match="holds the parts of an embed run that is writing"):
        run_embed(embedded["cfg"], embedded["root"] / "ingest", out, model=embedded["ckpt"])
    from serve.index import INCOMPLETE_MARKER

    assert not (embedded["out"] / INCOMPLETE_MARKER).exists()  # a finished run leaves none
    # a marker alone (a run whose actors still wait for nodes) is a run writing there too
    starting = tmp_path / "starting"
    starting.mkdir()
    (starting / INCOMPLETE_MARKER).write_text("run 0123456789ab\n")
    with pytest.raises(EmbedError, match="holds the parts of an embed run that is writing"):
        run_embed(embedded["cfg"], embedded["root"] / "ingest", starting, model=embedded["ckpt"])


def test_a_run_stopped_by_the_user_leaves_its_folder_refused(embedded, tmp_path, monkeypatch):
    """Ray Data does not wait for its write tasks after a Ctrl-C: a part may appear after the
    folder was found empty (on a bucket, once its upload ends). Its marker stays, so that such
    a part is never served as the whole archive; another run is refused until it is removed."""
    import ray.data

    from pipelines.embed import EmbedError, run_embed
    from serve.index import INCOMPLETE_MARKER

    def stopped_at_once(self, path, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ray.data.Dataset, "write_parquet", stopped_at_once)
    out = tmp_path / "index"
    with pytest.raises(KeyboardInterrupt):
        run_embed(embedded["cfg"], embedded["root"] / "ingest", out, model=embedded["ckpt"])
    assert [p.name for p in out.iterdir()] == [INCOMPLETE_MARKER]
    monkeypatch.undo()
    with pytest.raises(EmbedError, match="remove it once no run writes there"):
        run_embed(embedded["cfg"], embedded["root"] / "ingest", out, model=embedded["ckpt"])


def test_two_runs_writing_into_one_folder_leave_it_refused(embedded, tmp_path, monkeypatch):
    """A second run started while the first waited for its actors passed the check of OUT:
    both wrote their parts there, the first to finish recorded both runs' files and removed
    the marker (served while the other still wrote), and the second recorded every image
    twice. Here another run's part lands in OUT during this run's write."""
    import shutil

    import ray.data

    from pipelines.embed import EmbedError, run_embed
    from serve.index import INCOMPLETE_MARKER, EmbeddingIndex, IndexLoadError

    write_parquet = ray.data.Dataset.write_parquet
    other = sorted(embedded["out"].glob("*.parquet"))[0]

    def beside_another_run(self, path, **kwargs):
        write_parquet(self, path, **kwargs)
        shutil.copy(other, Path(path) / "0123456789ab_0_000000.parquet")

    monkeypatch.setattr(ray.data.Dataset, "write_parquet", beside_another_run)
    out = tmp_path / "index"
    with pytest.raises(EmbedError, match="another embed run wrote into .* while this one ran"):
        run_embed(embedded["cfg"], embedded["root"] / "ingest", out, model=embedded["ckpt"])
    assert (out / INCOMPLETE_MARKER).exists()
    with pytest.raises(IndexLoadError, match="is incomplete"):
        EmbeddingIndex.from_parquet(out)


def test_a_copy_of_the_index_that_lost_or_gained_a_part_is_refused(embedded, tmp_path):
    """A copy of the index folder cut short by a sync, a part deleted by hand, or a Parquet
    file of another index dropped in, loaded as another archive: /v1/similar missed (or
    invented) rows without a word. The embed run records each part's name and rows; the
    footer check before Ray and the replicas' load both hold a copy to that record."""
    import json
    import shutil

    from serve.index import INCOMPLETE_MARKER, PARTS_RECORD, EmbeddingIndex, IndexLoadError

    record = json.loads((embedded["out"] / PARTS_RECORD).read_text())
    parts = sorted(embedded["out"].rglob("*.parquet"))
    assert record["rows"] == N_IMAGES == sum(record["parts"].values())
    assert sorted(record["parts"]) == [f.relative_to(embedded["out"]).as_posix() for f in parts]
    loads = (EmbeddingIndex.check_parts, EmbeddingIndex.from_parquet)

    def copy(name: str) -> Path:
        return Path(shutil.copytree(embedded["out"], tmp_path / name))

    lost = copy("lost")
    (lost / sorted(record["parts"])[-1]).unlink()
    gained = copy("gained")
    shutil.copy(parts[0], gained / "from-another-index.parquet")
    replaced = copy("replaced")
    first = replaced / sorted(record["parts"])[0]
    table = pq.read_table(first)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), first)  # one more row
    said = {
        lost: f"lacks 1 of the {len(parts)} parts its `radjepa embed` run wrote",
        gained: "holds 1 Parquet file(s) no `radjepa embed` run recorded there "
        "(from-another-index.parquet): remove them, or embed again into a new folder; to serve "
        "several embed runs as one index, put each run's whole folder",
        replaced: f"holds {table.num_rows + 1} rows, but its `radjepa embed` run wrote "
        f"{table.num_rows}",
    }
    for folder, message in said.items():
        for load in loads:
            with pytest.raises(IndexLoadError, match=re.escape(message)):
                load(folder)
    # an index embedded before the record existed is read as before
    unrecorded = copy("unrecorded")
    (unrecorded / PARTS_RECORD).unlink()
    assert len(EmbeddingIndex.from_parquet(unrecorded)) == N_IMAGES
    # several runs' folders under one parent are one index, each held to its own record
    shutil.copytree(embedded["out"], tmp_path / "runs" / "a")
    shutil.copytree(embedded["out"], tmp_path / "runs" / "b")
    assert len(EmbeddingIndex.from_parquet(tmp_path / "runs")) == 2 * N_IMAGES
    (tmp_path / "runs" / "b" / parts[0].name).unlink()
    with pytest.raises(IndexLoadError, match=re.escape(f"index {tmp_path / 'runs' / 'b'} lacks")):
        EmbeddingIndex.check_parts(tmp_path / "runs")
    # a run still writing (or cut short) beside them is said as such, not as stray files
    shutil.copytree(embedded["out"], tmp_path / "runs" / "b", dirs_exist_ok=True)
    running = Path(shutil.copytree(embedded["out"], tmp_path / "runs" / "c"))
    (running / PARTS_RECORD).unlink()
    (running / INCOMPLETE_MARKER).write_text("")
    for load in loads:
        with pytest.raises(IndexLoadError, match=re.escape(f"index {running} is incomplete")):
            load(tmp_path / "runs")
    # an index given as one of its Parquet files is held to its folder's record and marker:
    # one part alone, or a part of an unfinished run, loaded as the whole archive
    two = copy("two")
    (two / PARTS_RECORD).write_text(
        json.dumps({**record, "parts": {**record["parts"], "other.parquet": 1}})
    )
    part = two / sorted(record["parts"])[0]
    for load in loads:
        with pytest.raises(IndexLoadError, match=re.escape(f"{part} is one of the ")):
            load(part)
        with pytest.raises(IndexLoadError, match="is incomplete"):
            load(running / sorted(record["parts"])[0])
    if len(parts) == 1:  # an index of one part given as that part loads as before
        assert len(EmbeddingIndex.from_parquet(parts[0])) == N_IMAGES


def test_actors_that_cannot_load_the_model_are_named_in_one_line(embedded, tmp_path, monkeypatch):
    """On a cluster each actor loads the model on its own node, where a local folder may hold
    other weights than the driver hashed. Here the driver is made to hash other weights (the
    actors, Ray and the checkpoint are real): the job used to end in Ray's ActorDiedError with
    the worker's whole traceback; the user gets the actor's own reason in one line."""
    import radjepa.eval.heads as heads
    from pipelines.embed import EmbedError, run_embed

    monkeypatch.setattr(heads, "checkpoint_fingerprint", lambda path: "0" * 64)
    with pytest.raises(EmbedError, match="the encoder actors could not start: ") as err:
        run_embed(
            embedded["cfg"],
            embedded["root"] / "ingest",
            tmp_path / "o",
            model=embedded["ckpt"],
            actors=1,
        )
    message = str(err.value)
    assert "is not the checkpoint the driver resolved (encoder " in message
    assert "\n" not in message and "Traceback" not in message and err.value.__cause__ is None
    assert not list((tmp_path / "o").iterdir())  # no part, and no marker: the folder is usable


def test_the_last_line_of_a_worker_traceback_is_its_reason():
    from pipelines.runtime import remote_error_message

    class Died(Exception):
        error_msg = (
            "The actor died because of an error raised in its creation task, \x1b[36mray::X\x1b[39m"
            '\nTraceback (most recent call last):\n  File "a.py", line 1, in f\n'
            "radjepa.checkpoint.CheckpointError: /m is not a checkpoint folder (no meta.json)\n"
        )

    assert remote_error_message(Died()) == "/m is not a checkpoint folder (no meta.json)"
    assert remote_error_message(ValueError("no traceback here")) is None


def test_a_workers_reason_is_read_from_the_error_ray_passes_on(ray_session):
    """Real tasks and actors. A task's error carries the worker's exception: its message is the
    reason, whatever its class is called and whatever its later lines look like. An actor that
    fails in __init__ reaches the driver as text only: the line closing its traceback is the
    reason, for classes whose names end in neither Error nor Exception too. An exception Ray
    could not pickle, and one Ray Data wrapped ("UDF failed to process a data block."), are read
    from the traceback Ray keeps instead."""
    import threading
    import zipfile

    from pipelines.runtime import remote_error_message

    ray = ray_session

    class Halted(BaseException):  # local classes travel to the workers by value
        pass

    class Unpicklable(Exception):
        def __init__(self, message: str) -> None:
            super().__init__(message)
            self.lock = threading.Lock()

    @ray.remote
    def fails(exc: BaseException) -> None:
        raise exc

    @ray.remote
    def fails_unpicklably(message: str) -> None:
        raise Unpicklable(message)

    @ray.remote
    class Starts:
        def __init__(self, exc: BaseException) -> None:
            raise exc

        def ping(self) -> bool:
            return True

    def raised(ref) -> BaseException:
        with pytest.raises(BaseException) as info:
            ray.get(ref, timeout=120)
        return info.value

    not_zip = zipfile.BadZipFile("archive.zip is not a zip file")
    task = raised(fails.remote(not_zip))
    assert isinstance(task, ray.exceptions.RayTaskError)
    assert remote_error_message(task) == "archive.zip is not a zip file"
    two_lines = ValueError("the model is missing\nOSError: not this line")
    assert remote_error_message(raised(fails.remote(two_lines))) == "the model is missing"
    assert remote_error_message(raised(fails_unpicklably.remote("held a lock"))) == "held a lock"

    for exc in (not_zip, Halted("stopped by the operator")):
        died = raised(Starts.remote(exc).ping.remote())
        assert isinstance(died, ray.exceptions.ActorDiedError) and died.actor_init_failed
        assert remote_error_message(died) == str(exc)

    def unreadable(batch: dict) -> dict:
        raise zipfile.BadZipFile("shard 3 is not a zip")

    with pytest.raises(ray.exceptions.RayTaskError) as udf:
        ray.data.range(2).map_batches(unreadable).materialize()
    assert remote_error_message(udf.value) == "shard 3 is not a zip"


def test_an_embeddings_index_given_as_shards_is_refused_before_ray(tmp_path):
    """SHARDS and OUT are two folders of Parquet: swapped, the index was refused only after
    Ray had started (its own check ran there), and OUT was left with the run's marker."""
    from shard_tables import write_embeddings_index

    from pipelines.embed import EmbedError, run_embed
    from radjepa.config import load_config

    index = write_embeddings_index(tmp_path / "index")
    out = tmp_path / "index2"
    with pytest.raises(EmbedError, match="holds Parquet that is not `radjepa ingest` shards"):
        run_embed(load_config(TINY_CONFIG), index, out, model=make_checkpoint(tmp_path / "c"))
    assert not out.exists()


def test_an_embed_run_starts_no_more_encoder_actors_than_it_has_batches_or_blocks(tmp_path):
    # each actor loads torch, timm and the encoder before its first batch, and Ray Data hands
    # an actor a whole batch at least: the demo's 64 images (two batches of 32) started four
    # actors on a 2-core machine (8 logical CPUs), two of which never embedded an image
    from pipelines.embed import default_actors

    def shards(*rows: int) -> list[str]:
        paths = []
        for i, n in enumerate(rows):
            path = tmp_path / f"{len(list(tmp_path.iterdir()))}-{i}.parquet"
            pq.write_table(pa.table({"image_id": [f"{i}-{r}" for r in range(n)]}), path)
            paths.append(str(path))
        return paths

    assert default_actors(8, False, shards(40, 40), 32) == 2  # 3 batches, 2 shards
    assert default_actors(8, False, shards(33, 33, 33), 32) == 3
    assert default_actors(8, False, shards(5, 5), 32) == 1
    assert default_actors(8, False, shards(0), 32) == 1
    # Ray Data reads a small shard as one block and gives it to one actor: the demo's one
    # shard of 64 images started two actors, and Ray warned that the second could get no input
    assert default_actors(8, False, shards(64), 32) == 1
    assert default_actors(8, False, shards(1000), 32) == 1
    # a shard of more data than Ray Data's block size (128 MiB) is read in several blocks:
    # 3000 rows of 64 KiB went to two actors (measured on local Ray)
    big = tmp_path / "big.parquet"
    pixels = pa.array([bytes(65536)] * 3000, pa.binary())
    pq.write_table(pa.table({"pixels": pixels}), big, compression="zstd", use_dictionary=False)
    assert default_actors(8, False, [str(big)], 32) == 2
    many = shards(*[100] * 6)
    assert default_actors(8, False, many, 32) == 4  # half the free CPUs, 4 at most
    assert default_actors(64, False, many, 32) == 4
    assert default_actors(2, False, many, 32) == 1
    assert default_actors(8, True, shards(64, 64), 32) == 1  # one GPU actor, as before
    # footers are read only until enough rows for every actor are counted
    broken = tmp_path / "not-parquet.parquet"
    broken.write_bytes(b"not a parquet file")
    assert default_actors(8, False, [*shards(200, 200, 200, 200), str(broken)], 32) == 4


def test_shards_made_otherwise_than_the_model_decodes_are_said(embedded, caplog):
    """The server decodes a query with the checkpoint's ingest settings; an index of shards
    made otherwise (another dtype, size or window) ranked its rows worse without a word."""
    from pipelines.embed import _say_decode_mismatch
    from radjepa.checkpoint import saved_config

    shards = str(embedded["root"] / "ingest")
    model_cfg = saved_config(embedded["ckpt"])
    with caplog.at_level("WARNING", logger="pipelines"):
        _say_decode_mismatch(shards, model_cfg)
        assert not caplog.text  # made as the model decodes: nothing to say
        _say_decode_mismatch(shards, model_cfg.with_overrides({"ingest.dtype": "uint16"}))
    assert "made with ingest.dtype=uint8" in caplog.text
    assert "decodes uploads with ingest.dtype=uint16" in caplog.text


def test_actors_a_cluster_lacks_now_are_a_warning_there_and_refused_locally(caplog):
    """A cluster whose CPU group scaled to zero has no CPU free until its autoscaler adds a
    node: refusing there stopped every embed on it. A local instance never grows."""
    from pipelines.embed import EmbedError, check_actors

    check_actors(1, 2, 0, False, chosen=False, cluster=False)  # one actor and its I/O: fits
    with pytest.raises(EmbedError, match="the cluster has 0 free: free some"):
        check_actors(1, 0, 0, False, chosen=False, cluster=False)
    with pytest.raises(EmbedError, match="need 2 GPU.s.; the cluster has 1 free: lower --actors"):
        check_actors(2, 8, 1, True, chosen=True, cluster=False)
    with caplog.at_level(logging.WARNING, logger="pipelines.embed"):
        check_actors(1, 0, 0, False, chosen=False, cluster=True)
    assert "the run waits until the cluster has them" in caplog.text


def test_a_damaged_shard_stops_the_run_naming_it_and_leaves_no_servable_index(embedded, tmp_path):
    # Ray Data's Parquet reader checked no page: a page that no longer decodes failed the run
    # in Ray's traceback, and a checksum failure was not seen at all (its pixels embedded)
    import shutil

    from pipelines.embed import EmbedError, run_embed
    from tests.test_shards import corrupt_page_header

    shards = tmp_path / "ingest"
    shutil.copytree(embedded["root"] / "ingest", shards)
    damaged = shards / "images" / "part-00001.parquet"
    corrupt_page_header(damaged, "pixels")
    seen = _RecordsKept()  # what Ray Data logs, as its console handler would be handed it
    logging.getLogger("ray.data").addHandler(seen)
    try:
        with pytest.raises(EmbedError) as stopped:
            run_embed(embedded["cfg"], shards, tmp_path / "o", model=embedded["ckpt"], actors=1)
    finally:
        logging.getLogger("ray.data").removeHandler(seen)
    message = str(stopped.value)
    assert message.startswith(f"{damaged} is damaged: its bytes changed after ingest wrote them")
    assert "\n" not in message and stopped.value.__cause__ is None
    assert "marked unfinished" in message
    # Ray Data took the read's error for its own: "open an issue" and its whole traceback on
    # the terminal, above the one line; now only in its log file (``hide``: off the console)
    shown = [r for r in seen.records if r.levelno >= logging.INFO and not getattr(r, "hide", 0)]
    hidden = [r for r in seen.records if getattr(r, "hide", False)]
    assert any("Ray Core internal code" in r.getMessage() for r in hidden)
    assert not [r for r in shown if r.exc_info or "internal code" in r.getMessage()]
    with pytest.raises(EmbedError, match="did not finish"):  # the folder is not taken as done
        run_embed(embedded["cfg"], shards, tmp_path / "o", model=embedded["ckpt"], actors=1)


class _RecordsKept(logging.Handler):
    """Keeps every record handed to it, after the logger's own filters."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

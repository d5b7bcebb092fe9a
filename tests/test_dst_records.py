"""What a DST records before its first shard, and what becomes of a shard a crash cut short.

A first ingest run killed after some shards and before its manifest must still fix the window
the next run uses; a zero-byte or truncated ``part-*.parquet`` (a node lost after the rename)
must stop ingest and training with the file's name and the way on, not a pyarrow traceback.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from radjepa.ingest.decoding import FileDecoder
from radjepa.ingest.destination import (
    DECODE_RECORD,
    KEY_RECORD,
    MANIFEST,
    Destination,
    check_compatible,
    check_key,
    is_output,
    read_dst_table,
    recorded_window,
)
from radjepa.ingest.errors import IngestError
from radjepa.ingest.sources import READ_SCHEMA
from radjepa.shards import SHARD_SCHEMA
from tests.ingest_inputs import REPO, SAMPLE, SECRET, SETTINGS

KEY = {"key": "secret", "key_fingerprint": "abc", "patient_identity": "patient_id"}
ENV = "RADJEPA_DEID_SECRET"


def _shard(index: int = 0) -> pa.Table:
    """One sample PNG decoded into a shard row, as a run's decoders make it."""
    png = sorted(SAMPLE.glob("*.png"))[index].read_bytes()
    row = FileDecoder(SETTINGS, SECRET, frozenset(), keep_paths=False)(
        pa.Table.from_pylist(
            [{"name": "a.png", "data": png, "size_bytes": len(png), "read_error": None}],
            schema=READ_SCHEMA,
        )
    )
    return row.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)


def _run_killed_before_its_manifest(dst: Path, window: tuple[float, float]) -> None:
    """What ``pipelines.ingest.run_ingest`` does up to its first shard (the checks, in its
    order, then the shard), and then nothing: the files a run killed before its manifest
    leaves."""
    dest = Destination(str(dst))
    previous = dest.read_manifest()
    settings = {**SETTINGS, "window_percentiles": window}
    check_compatible(dest, previous, settings)
    check_key(dest, previous, KEY, ENV)
    dest.write("images", "part-20261205T132317-e6250c-00000.parquet", _shard())


def test_a_first_run_killed_before_its_manifest_fixes_the_window(tmp_path):
    dst = tmp_path / "dst"
    _run_killed_before_its_manifest(dst, (0.5, 99.5))
    assert not (dst / MANIFEST).exists() and (dst / KEY_RECORD).exists()

    # the next run with another window is refused, as a finished run's manifest refuses it
    dest = Destination(str(dst))
    with pytest.raises(IngestError) as refused:
        check_compatible(dest, dest.read_manifest(), {**SETTINGS, "window_percentiles": (5, 95)})
    message = str(refused.value)
    assert "ingest.window_percentiles=[0.5, 99.5]; this run asks for [5.0, 95.0]" in message
    assert "Set ingest.window_percentiles=[0.5, 99.5]" in message
    assert json.loads((dst / DECODE_RECORD).read_text()) == {
        "size": 64,
        "dtype": "uint8",
        "window_percentiles": [0.5, 99.5],
    }
    check_compatible(dest, None, SETTINGS)  # the window that made the images: fine
    # training (and so the checkpoint a server decodes uploads with) learns the true window
    assert recorded_window(str(dst)) == (0.5, 99.5)
    assert recorded_window(str(dst / "images")) == (0.5, 99.5)


class NodeLost(Exception):
    """The process gone between a run's shards and its manifest."""


def test_a_killed_ingest_run_leaves_its_window_for_the_next_run_to_keep(
    ray_session, tmp_path, monkeypatch
):
    """The whole job: a run that dies at its manifest (after its shards), then a run asking
    for another window, then the run with the window that made the images."""
    from dicom_factory import gradient, make_dicom

    from pipelines.ingest import run_ingest
    from radjepa.config import load_config

    def cfg(window: list[float]):
        sets = {"ingest.image_size": 96, "ingest.window_percentiles": window}
        return load_config(REPO / "configs" / "tiny_cpu.yaml", sets)

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for seed in range(3):
        (src / f"{seed}.dcm").write_bytes(make_dicom(gradient(40, 40, seed=seed), markers=False))

    def lost(self: Destination, manifest: dict) -> None:
        raise NodeLost

    monkeypatch.setattr(Destination, "write_manifest", lost)
    with pytest.raises(NodeLost):
        run_ingest([str(src)], str(dst), cfg([1.0, 99.0]), progress=False)
    monkeypatch.undo()
    assert list((dst / "images").glob("part-*.parquet")) and not (dst / MANIFEST).exists()

    with pytest.raises(IngestError, match=r"window_percentiles=\[1.0, 99.0\]; this run asks"):
        run_ingest([str(src)], str(dst), cfg([5.0, 95.0]), progress=False)
    assert not (dst / MANIFEST).exists()
    summary = run_ingest([str(src)], str(dst), cfg([1.0, 99.0]), progress=False)
    assert summary.total_images == 3
    assert json.loads((dst / MANIFEST).read_text())["image"]["window_percentiles"] == [1.0, 99.0]


def test_a_dst_without_images_takes_any_window_and_records_it_first(tmp_path):
    """A run killed before any image (only its records written, or only quarantine rows)
    fixes nothing: the next run's window is recorded instead, before its first shard."""
    dst = tmp_path / "dst"
    dest = Destination(str(dst))
    check_compatible(dest, None, SETTINGS)
    check_key(dest, None, KEY, ENV)
    check_compatible(dest, None, {**SETTINGS, "window_percentiles": (5, 95)})
    assert json.loads((dst / DECODE_RECORD).read_text())["window_percentiles"] == [5.0, 95.0]
    dest.write("images", "part-20261205T132317-e6250c-00000.parquet", _shard())
    with pytest.raises(IngestError, match=r"window_percentiles=\[5.0, 95.0\]; this run asks"):
        check_compatible(dest, None, SETTINGS)
    # a finished first run that stored nothing left a manifest naming its window for no image:
    # training reads the window the images were made with, not that one
    image = {"size": 64, "dtype": "uint8", "window_percentiles": [0.5, 99.5]}
    (dst / MANIFEST).write_text(json.dumps({"images": 0, "image": image}))
    assert recorded_window(str(dst)) == (5.0, 95.0)
    # a decode record damaged by hand: the manifest's window still stands
    (dst / DECODE_RECORD).write_text(json.dumps({"window_percentiles": [99, 1]}))
    assert recorded_window(str(dst)) == (0.5, 99.5)


def test_images_without_a_window_record_are_let_through_with_a_warning(tmp_path, caplog):
    """Shards and no record of their window: a run of a version that kept none was killed
    before its manifest. Which window made them cannot be known; the run goes on as before,
    says so, and records no window that did not make them."""
    dst = tmp_path / "dst"
    Destination(str(dst)).write("images", "part-20261205T132317-e6250c-00000.parquet", _shard())
    dest = Destination(str(dst))
    with caplog.at_level(logging.WARNING, logger="radjepa.ingest.destination"):
        check_compatible(dest, None, {**SETTINGS, "window_percentiles": (5, 95)})
    assert "no record of the ingest.window_percentiles" in caplog.text
    assert not (dst / DECODE_RECORD).exists()


def test_a_damaged_window_record_is_refused_by_name(tmp_path):
    dst = tmp_path / "dst"
    _run_killed_before_its_manifest(dst, (0.5, 99.5))
    (dst / DECODE_RECORD).write_text(json.dumps({"window_percentiles": [99, 1]}))
    with pytest.raises(IngestError, match=r"decode.json: window_percentiles \[99, 1\] is not a"):
        check_compatible(Destination(str(dst)), None, SETTINGS)


def test_the_window_record_is_an_output_and_its_leftover_is_removed(tmp_path):
    dst = tmp_path / "dst"
    dest = Destination(str(dst))
    assert is_output(str(dst), f"{dst}/{DECODE_RECORD}")
    assert is_output(str(dst), f"{dst}/.{DECODE_RECORD}.tmp")
    (dst / f".{DECODE_RECORD}.tmp").write_text("{")  # a write killed half way
    assert dest.remove_leftovers() == 1
    assert not (dst / f".{DECODE_RECORD}.tmp").exists()


def _damaged_dst(tmp_path: Path, cut: int | None) -> tuple[Path, str]:
    """A DST of two whole shards whose second is then cut to ``cut`` bytes (None: a third of
    it; -1: its whole length, every byte zero but the footer's length and magic, as a crash's
    partial writeback leaves it), as a node lost after the rename and before the data reached
    the disk leaves it."""
    dst = tmp_path / "dst"
    _run_killed_before_its_manifest(dst, (0.5, 99.5))
    dest = Destination(str(dst))
    name = dest.write("images", "part-20261205T132317-e6250c-00001.parquet", _shard(1))
    path = dst / name
    data = path.read_bytes()
    if cut == -1:
        path.write_bytes(bytes(len(data) - 8) + data[-8:])
    else:
        path.write_bytes(data[: len(data) // 3 if cut is None else cut])
    return dst, name


@pytest.mark.parametrize("cut", [0, None, -1], ids=["zero-bytes", "truncated", "zeroed"])
def test_a_damaged_shard_stops_ingest_with_its_name_and_the_way_on(tmp_path, cut):
    dst, name = _damaged_dst(tmp_path, cut)
    dest = Destination(str(dst))
    for read in (dest.known_ids, dest.totals, dest.recorded_inputs, dest.stored_path_hashes):
        with pytest.raises(IngestError) as stopped:
            read()
        message = str(stopped.value)
        assert message.startswith(f"{dst}/{name} is damaged, no whole Parquet file (")
        assert message.endswith(
            "Move it out of the DST; a re-run of `radjepa ingest` over the same sources stores "
            "its images again"
        )
    with pytest.raises(IngestError, match="is damaged"):
        dest.num_rows(name)

    # moved out, the DST reads whole again
    shutil.move(dst / name, tmp_path / "aside.parquet")
    assert Destination(str(dst)).totals().images == 1
    # only a file whose footer cannot be read is damaged: asking a whole one for a column it
    # lacks is pyarrow's own error, as before
    (shard,) = Destination(str(dst)).shards()
    with pytest.raises(pa.ArrowInvalid):
        read_dst_table(pafs.LocalFileSystem(), shard, ["no_such_column"], shard)


def test_a_damaged_shard_moved_out_is_stored_again_though_a_copy_of_it_was_listed(tmp_path):
    # a copy of the image under another path is a same_bytes duplicate row holding the image's
    # own id: counted as known, it kept the id known after the shard was moved out as the
    # message advises, and the re-run skipped the image for good
    from radjepa.shards import DUPLICATE_SCHEMA

    dst, name = _damaged_dst(tmp_path, 0)
    lost = _shard(1)["image_id"][0].as_py()
    kept = _shard(0)["image_id"][0].as_py()
    row = {"kept_image_id": lost, "source_hash": "h", "size_bytes": 1, "run_id": "r"}
    rows = [
        {**row, "image_id": lost, "kind": "same_bytes"},
        {**row, "image_id": "other-bytes", "kept_image_id": kept, "kind": "same_instance"},
    ]
    dest = Destination(str(dst))
    dest.write("duplicates", "duplicates-r.parquet", pa.Table.from_pylist(rows, DUPLICATE_SCHEMA))
    shutil.move(dst / name, tmp_path / "aside.parquet")
    known = Destination(str(dst)).known_ids()
    assert lost not in known  # decoded and stored again by the re-run
    assert kept in known and "other-bytes" in known  # the instance's other bytes stay skipped


def test_a_damaged_shard_stops_training_with_its_name(tmp_path):
    from radjepa.config import load_config
    from radjepa.training_data import TrainingDataError, inspect_shards, stored_decode

    dst, name = _damaged_dst(tmp_path, -1)
    cfg = load_config(None, ["data.crop_size=32", "model.img_size=32", "model.patch_size=8"])
    for read in (lambda: inspect_shards(str(dst), cfg), lambda: stored_decode(str(dst))):
        with pytest.raises(TrainingDataError) as stopped:
            read()
        assert str(stopped.value).startswith(f"{dst}/{name} is damaged, no whole Parquet file")
        assert "Move it out of the DST" in str(stopped.value)

"""The ingest driver's own bookkeeping, run without Ray: how large a decoder pool it asks for,
and what it holds per input while a run streams."""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path

import pyarrow as pa

from pipelines.ingest import (
    IngestSummary,
    _decoder_pool,
    _may_hold_more,
    _Outputs,
    _take_batch,
)
from radjepa.ingest.decoding import FileDecoder
from radjepa.ingest.destination import Destination
from radjepa.ingest.instances import InstanceIndex
from radjepa.ingest.sources import count_inputs, list_inputs, read_blocks
from tests.ingest_inputs import SAMPLE, SECRET, SETTINGS


def _outputs(dst: Path, shard_rows: int, run_id: str = "r1") -> tuple[FileDecoder, _Outputs]:
    """A run's decoder and outputs into ``dst``, as the driver makes them (without Ray)."""
    dest = Destination(str(dst))
    decoder = FileDecoder(SETTINGS, SECRET, dest.known_ids(), False)
    summary = IngestSummary(dst=dest.uri, run_id=run_id)
    instances = InstanceIndex(dest.shards(), dest.read_columns)
    return decoder, _Outputs(dest, summary, shard_rows, run_id, instances)


def _take(inputs: pa.Table, decoder: FileDecoder, out: _Outputs) -> None:
    """Decode ``inputs`` (rows of ``list_inputs``) and hand each batch to ``out``."""
    seen: set[str] = set()
    for block in read_blocks(inputs, SETTINGS["max_bytes"]):
        _take_batch(decoder(block), out, seen, set())


def test_an_automatic_pool_is_not_capped_by_a_count_that_may_fall_short(tmp_path):
    """An automatic pool (``ingest.decode_actors=0``) had at most one decoder per 16 inputs
    counted, and a key on object storage without an image suffix counts one input without
    being opened: 4 such zips got 1 decoder, whatever they held. Where a ref may hold more than
    it was counted as, the most is one per CPU and per ref (a ref is read and decoded by one
    decoder)."""
    keys = [
        {"source": "s3://bucket/export", "path": f"bucket/export/study{k}", "kind": "file"}
        for k in range(4)
    ]
    counted = sum(count_inputs(r) for r in keys)
    assert counted == 4
    assert all(_may_hold_more(r, sniff=True) for r in keys)
    undercounted = any(_may_hold_more(r, sniff=True) for r in keys)
    assert _decoder_pool(0, 16, counted, len(keys), undercounted=undercounted) == (1, 4)
    assert _decoder_pool(0, 2, counted, len(keys), undercounted=undercounted) == (1, 2)
    assert _decoder_pool(0, 16, counted, len(keys)) == (1, 1)  # a count that holds: as before
    assert _decoder_pool(8, 16, counted, len(keys), undercounted=undercounted) == (1, 8)

    # what the count does hold: a key named as an image, an archive counted by its members, a
    # local file opened to count it; a local file of a run too large to open each one does not
    named = {"source": "s3://bucket/export", "path": "bucket/export/IM1.DCM", "kind": "file"}
    zipped = {"source": "s3://bucket/export", "path": "bucket/export/a.zip", "kind": "zip"}
    (tmp_path / "study1").write_bytes(b"x")
    (local,) = list_inputs([str(tmp_path / "study1")])
    assert not any(_may_hold_more(r, sniff=True) for r in (named, zipped, local))
    assert _may_hold_more(local, sniff=False)


def test_a_run_holds_each_quarantine_reason_once_not_once_per_file(tmp_path):
    """Bytes quarantined in a run are remembered to quarantine a later copy of them alike, with
    their (reason, message): a tuple and two strings per quarantined file (about 540 bytes),
    held to the run's end, for a folder of a million broken files. Files quarantined alike
    now share one."""
    src = tmp_path / "src"
    src.mkdir()
    n = 300
    for i in range(n):
        (src / f"f{i:04d}.dcm").write_bytes(b"not an image %d" % i)  # other bytes each
    decoder, out = _outputs(tmp_path / "dst", 100)
    _take(pa.Table.from_pylist(list_inputs([str(src)])), decoder, out)
    held = out.quarantined_here
    assert len(held) == n and {v[0] for v in held.values()} == {"not_an_image"}
    # the values' own objects (the ids are the same strings the run's `seen` holds)
    objects = {id(o): o for v in held.values() for o in (v, *v)}
    per_file = sum(sys.getsizeof(o) for o in objects.values()) / n
    assert per_file < 16, per_file


def test_quarantine_rows_are_written_with_each_shard_not_only_at_the_end(tmp_path):
    """The run's quarantine rows were written once, at its end: a driver killed at 99% of an
    archive (kill -9, an OOM, a lost head) kept its shards and lost every row, and its re-run
    decoded each broken file again (a stuck codec costing its timeout again). Now they go with
    each shard, and every ``shard_rows`` of them in a run of mostly broken files."""
    import shutil

    import pyarrow.parquet as pq

    sample = sorted(SAMPLE.glob("*.dcm"))[:4]
    src = tmp_path / "src"
    src.mkdir()
    for i, f in enumerate(sample):  # good and broken files in turn
        shutil.copy(f, src / f"f{i}0.dcm")
        (src / f"f{i}1.dcm").write_bytes(b"not an image %d" % i)
    decoder, out = _outputs(tmp_path / "dst", 2)
    out.rejects_every_s = 0  # with each shard (a minute apart at most, by default)
    inputs = pa.Table.from_pylist(list_inputs([str(src)]))
    quarantine = tmp_path / "dst" / "quarantine"

    def rows() -> list[int]:
        return [pq.read_metadata(f).num_rows for f in sorted(quarantine.glob("*.parquet"))]

    _take(inputs.slice(0, 3), decoder, out)  # good, broken, good
    assert len(out.summary.shards) == 1 and rows() == [1]  # written with the shard
    _take(inputs.slice(3, 5), decoder, out)
    # killed here: every quarantine row is kept
    assert sum(rows()) == 4 and len(out.summary.shards) == 2
    assert all(f.name.startswith("quarantine-r1-") for f in quarantine.glob("*.parquet"))
    files = rows()
    out.finish(interrupted=True)
    assert out.summary.quarantined == 4 and out.summary.reasons == {"not_an_image": 4}
    assert rows() == files  # nothing left to write, and none written again


def test_dst_failing_while_a_stopped_run_writes_what_it_kept_leaves_the_stop_as_it_was(
    tmp_path, monkeypatch, caplog
):
    """Ctrl-C (or decoders that kept dying), then the disk full as the run wrote what it kept:
    the OSError went past the run's handlers as a traceback, in place of the stop. Now the
    stop goes on as it was (exit 130, the decoders' message), the storage failure is said in
    one warning and added to the stop's message, and the run is not recorded."""
    from pipelines.ingest import _finish_stopped

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(sorted(SAMPLE.glob("*.dcm"))[0], src)
    decoder, out = _outputs(tmp_path / "dst", 100)
    _take(pa.Table.from_pylist(list_inputs([str(src)])), decoder, out)
    assert out.pending_rows == 1  # the shard a stopped run writes at its end

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Destination, "write", full)
    with caplog.at_level("WARNING", logger="pipelines.ingest"):
        lost = _finish_stopped(out)
    assert (
        lost
        == "; DST failed as it wrote what it kept (No space left on device), and it is not recorded"
    )
    assert f"ingest stopped: {out.dest.uri} failed: No space left on device" in caplog.text
    monkeypatch.undo()
    assert _finish_stopped(out) == ""  # written whole: nothing to add


def test_a_copy_listed_before_is_not_listed_again_when_its_image_is_stored_again(tmp_path):
    """A shard moved out of DST (a damaged one, as the error advises): the re-run stores its
    images again, and listed each copy of them (same bytes, another path) a second time."""
    from radjepa.shards import read_duplicates

    src = tmp_path / "src"
    src.mkdir()
    dicom = sorted(SAMPLE.glob("*.dcm"))[0]
    shutil.copy(dicom, src / "a.dcm")
    shutil.copy(dicom, src / "b.dcm")  # the same bytes under another name

    def run(run_id: str) -> IngestSummary:
        decoder, out = _outputs(tmp_path / "dst", 8, run_id)
        _take(pa.Table.from_pylist(list_inputs([str(src)])), decoder, out)
        out.finish(interrupted=False)
        return out.summary

    first = run("r1")
    assert (first.ok, first.duplicates_in_run) == (1, 1)
    for shard in (tmp_path / "dst" / "images").glob("*.parquet"):
        shutil.move(shard, tmp_path / shard.name)
    again = run("r2")
    assert again.ok == 1  # stored again
    assert [r["run_id"] for r in read_duplicates(str(tmp_path / "dst")).to_pylist()] == ["r1"]


def test_a_copy_met_in_the_same_run_reads_only_dsts_duplicate_rows(tmp_path):
    """Bytes first met in this run are in no stored or quarantine row of DST: listing their
    copy read every stored image's columns (an incremental run into a DST of millions of
    images, for one file copied twice in the new batch). The copy is still listed, and listed
    once when met twice."""
    from radjepa.shards import IMAGES_DIR, QUARANTINE_DIR, read_duplicates

    dicoms = sorted(SAMPLE.glob("*.dcm"))
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    shutil.copy(dicoms[0], old / "a.dcm")
    decoder, out = _outputs(tmp_path / "dst", 8, "r1")
    _take(pa.Table.from_pylist(list_inputs([str(old)])), decoder, out)
    out.finish(interrupted=False)

    shutil.copy(dicoms[1], new / "b.dcm")
    shutil.copy(dicoms[1], new / "c.dcm")  # the same bytes under another name
    decoder, out = _outputs(tmp_path / "dst", 8, "r2")
    read: list[str] = []
    reads = out.dest.read_columns

    def spy(path: str, columns: list[str] | None) -> pa.Table:
        read.append(path)
        return reads(path, columns)

    out.dest.read_columns = spy  # type: ignore[method-assign]
    inputs = pa.Table.from_pylist(list_inputs([str(new)]))
    _take(pa.concat_tables([inputs, inputs.slice(1)]), decoder, out)  # the copy twice
    out.finish(interrupted=False)
    assert not [p for p in read if f"/{IMAGES_DIR}/" in p or f"/{QUARANTINE_DIR}/" in p]
    copies = [r for r in read_duplicates(str(tmp_path / "dst")).to_pylist() if r["run_id"] == "r2"]
    stored = pa.concat_tables(
        out.dest.read_columns(f"{out.dest.root}/{p}", ["image_id"]) for p in out.summary.shards
    )
    assert [r["kept_image_id"] for r in copies] == stored["image_id"].to_pylist()

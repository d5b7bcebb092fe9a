"""An ingest run whose destination fails mid-run (a full disk, expired object-store credentials,
an NFS error) stops in one line and keeps what the destination still takes, recorded."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from radjepa.config import load_config
from radjepa.ingest.destination import Destination
from radjepa.ingest.dst_lock import LOCK
from radjepa.ingest.errors import IngestError
from radjepa.shards import IMAGES_DIR, QUARANTINE_DIR

REPO = Path(__file__).resolve().parents[1]
GOOD, BAD = 5, 3


def _cfg():
    return load_config(
        REPO / "configs" / "tiny_cpu.yaml",
        ["ingest.image_size=96", "ingest.decode_actors=1", "ingest.shard_rows=2"],
    )


def _sources(root: Path) -> Path:
    """Broken files first (inputs go in path order), so that they are decoded before the
    second shard fills: their quarantine rows are the run's before the disk is full."""
    from PIL import Image

    src = root / "src"
    src.mkdir(parents=True)
    for i in range(BAD):
        (src / f"a_broken{i}.png").write_bytes(b"not an image %d" % i)
    rng = np.random.default_rng(0)
    for i in range(GOOD):
        pixels = (rng.random((64, 64)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(src / f"b_image{i}.png")
    return src


def _disk_full_after_the_first_shard(monkeypatch, stays_full: bool) -> None:
    """The destination's second shard write fails as a full disk fails it (and, ``stays_full``,
    every shard write after it): a storage fault, simulated at the one place DST is written."""
    write = Destination.write
    shards: list[str] = []

    def full(self, sub, name, table):
        if sub == IMAGES_DIR:
            shards.append(name)
            if len(shards) == 2 or (stays_full and len(shards) > 2):
                # as pyarrow raises it: the errno in its text only, with a path the message
                # must not repeat
                raise OSError(
                    f"Error writing bytes to file {self.root}/{sub}/.{name}.tmp. Detail: "
                    f"[errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}"
                )
        return write(self, sub, name, table)

    monkeypatch.setattr(Destination, "write", full)


@pytest.mark.parametrize("stays_full", [False, True], ids=["freed", "stays-full"])
def test_a_destination_failing_mid_run_stops_it_in_one_line_keeping_what_it_wrote(
    ray_session, tmp_path, monkeypatch, stays_full
):
    """ENOSPC on a shard write (an OSError, as expired credentials or an NFS error are) went
    past the driver: a traceback, no quarantine file (its rows are written at the run's end)
    and no record of the run. Now the run stops with one line naming the cause and the
    remedy, and writes what the destination still takes: the quarantine rows, also when it
    refuses the last shard again, and its record as an interrupted run."""
    from pipelines.ingest import run_ingest

    src = _sources(tmp_path)
    dst = tmp_path / "dst"
    _disk_full_after_the_first_shard(monkeypatch, stays_full)
    with pytest.raises(IngestError) as raised:
        run_ingest([str(src)], str(dst), _cfg(), progress=False)
    said = str(raised.value)
    assert "\n" not in said and str(src) not in said
    assert said.startswith(f"ingest stopped: {dst} failed: No space left on device; ")
    assert "Free space there and re-run" in said and ".tmp" not in said
    assert "re-run the same command: stored images are skipped" in said
    assert ("decoded last were not" in said) is stays_full
    assert not (dst / LOCK).exists()

    shards = sorted((dst / IMAGES_DIR).glob("part-*.parquet"))
    assert shards[0].name.endswith("-00000.parquet")
    assert pq.read_metadata(shards[0]).num_rows == 2
    if stays_full:
        assert len(shards) == 1
    quarantine = pq.read_table(dst / QUARANTINE_DIR).to_pylist()
    assert len(quarantine) == BAD and {r["reason"] for r in quarantine} == {"not_an_image"}

    manifest = json.loads((dst / "manifest.json").read_text())
    (run,) = manifest["runs"]
    assert run["status"] == "interrupted"
    assert run["ok"] == manifest["images"] == sum(pq.read_metadata(s).num_rows for s in shards)
    assert run["quarantined"] == manifest["quarantined"] == BAD
    assert run["input"] == run["ok"] + run["quarantined"] + run["duplicates"]

    monkeypatch.undo()  # space freed: the same command stores the rest and skips the others
    again = run_ingest([str(src)], str(dst), _cfg(), progress=False)
    assert (again.status, again.ok, again.quarantined) == ("finished", GOOD - run["ok"], 0)
    assert again.already_ingested == run["ok"] + BAD
    assert again.total_images == GOOD and again.total_quarantined == BAD

"""Finding the files behind DST's quarantine and duplicate rows, which name a file only by its
keyed path hash."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from dicom_factory import make_dicom

from radjepa.config import load_config
from radjepa.imaging.deid import key_fingerprint, resolve_secret
from radjepa.ingest.errors import IngestError
from radjepa.ingest.locate import locate_rows
from radjepa.shards import KEY_RECORD
from tests.test_ingest import _ingest_in_process
from tests.test_ingest_library import _CountedReads

REPO = Path(__file__).resolve().parents[1]
KEY = b"k" * 32  # the key _ingest_in_process hashes with


def _secret() -> bytes:
    return resolve_secret("RADJEPA_DEID_SECRET", allow_development_key=True)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, ray_session) -> tuple[Path, Path, dict[str, str]]:
    """An export with a truncated DICOM in a patient-named folder, a zip holding a file that is
    no image, a copy of a stored file and a good image, ingested without raw paths."""
    import numpy as np

    from pipelines.ingest import run_ingest

    src = tmp_path_factory.mktemp("export")
    good = make_dicom(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), bits=12)
    (src / "DOE^JANE").mkdir()
    (src / "DOE^JANE" / "IM0001.dcm").write_bytes(good[:-3000])
    (src / "ok.dcm").write_bytes(good)
    (src / "ok-copy.dcm").write_bytes(good)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("study/notes.txt", b"not an image at all")
    (src / "study.zip").write_bytes(buf.getvalue())
    dst = tmp_path_factory.mktemp("dst")
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", ["ingest.image_size=96"])
    s = run_ingest([str(src)], str(dst), cfg, progress=False)
    assert (s.ok, s.quarantined, s.duplicates) == (1, 2, 1)
    expected = {
        str(src / "DOE^JANE" / "IM0001.dcm"): "truncated",
        f"{src / 'study.zip'}!study/notes.txt": "not_an_image",
    }
    return src, dst, expected


@pytest.mark.ray
def test_each_quarantined_row_is_found_under_the_sources_with_the_key(ingested):
    src, dst, expected = ingested
    located = locate_rows(str(dst), [str(src)], _secret())
    quarantined = {r.path: r.reason for r in located.rows}
    assert quarantined == expected
    assert located.found == 2 and located.names_hashed >= 5
    assert all(r.table == "quarantine" and r.message and r.run_id for r in located.rows)


@pytest.mark.ray
def test_duplicate_rows_are_found_on_request(ingested):
    src, dst, _ = ingested
    located = locate_rows(str(dst), [str(src)], _secret(), duplicates=True)
    dup = [r for r in located.rows if r.table == "duplicates"]
    assert len(dup) == 1 and dup[0].reason == "same_bytes"
    # which of the two equal files was kept follows the sorted paths: ok-copy sorts first
    assert dup[0].path == str(src / "ok.dcm")


@pytest.mark.ray
def test_a_row_whose_file_is_not_under_the_sources_has_no_path(ingested, tmp_path):
    src, dst, _ = ingested
    located = locate_rows(str(dst), [str(src / "DOE^JANE")], _secret())
    assert {r.reason: r.path for r in located.rows} == {
        "truncated": str(src / "DOE^JANE" / "IM0001.dcm"),
        "not_an_image": None,
    }


@pytest.mark.ray
def test_another_key_is_refused_rather_than_finding_nothing(ingested):
    src, dst, _ = ingested
    with pytest.raises(IngestError, match="key differs from the one"):
        locate_rows(str(dst), [str(src)], b"another key, long enough to be a real one........")


@pytest.mark.ray
def test_the_cli_prints_each_file_with_its_reason_and_refuses_a_missing_dst(ingested, tmp_path):
    import subprocess
    import sys

    src, dst, expected = ingested

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pipelines.cli",
                "quarantine",
                *args,
                "-c",
                str(REPO / "configs" / "tiny_cpu.yaml"),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "COLUMNS": "400"},
        )

    found = cli(str(dst), str(src))
    assert found.returncode == 0, found.stderr
    for path, reason in expected.items():
        line = next(ln for ln in found.stdout.splitlines() if path in ln)
        assert f"quarantine: {reason}" in line
    assert "found 2 of 2" in found.stdout
    listed = cli(str(dst))  # no sources: the rows and why, no paths, no key needed
    assert listed.returncode == 0 and "truncated" in listed.stdout
    assert str(src) not in listed.stdout and "give the sources" in listed.stdout
    missing = cli(str(tmp_path / "nowhere"), str(src))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert "is no ingest output" in missing.stderr


def _record_key(dst: Path, **more: object) -> None:
    """The key record a run writes before its first shard (``check_key``)."""
    dst.mkdir(parents=True, exist_ok=True)
    record = {"key": "secret", "key_fingerprint": key_fingerprint(KEY), **more}
    (dst / KEY_RECORD).write_text(json.dumps(record))


def test_a_row_a_later_run_resolved_is_left_out_and_counted(tmp_path):
    """A file quarantined unread (over ``ingest.max_file_mb``) and stored by a later run is
    resolved: DST's totals count it so, but the listing printed the stored file as
    quarantined and its count disagreed with the manifest. A file still broken is listed."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    good = make_dicom(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), bits=12)
    (src / "a.dcm").write_bytes(good)
    (src / "b.dcm").write_bytes(b"not an image")
    _record_key(dst)
    _ingest_in_process([src], dst, run=1, max_bytes=100)  # a.dcm too large, unread
    _, totals = _ingest_in_process([src], dst, run=2)  # a.dcm stored
    assert (totals.images, totals.quarantined, totals.resolved) == (1, 1, 1)
    for sources in ([str(src)], []):
        located = locate_rows(str(dst), sources, KEY)
        assert [r.reason for r in located.rows] == ["not_an_image"]
        assert located.resolved == 1
    assert located.rows[0].path is None
    assert locate_rows(str(dst), [str(src)], KEY).rows[0].path == str(src / "b.dcm")
    # and the command says how many it left out, beside the count the manifest gives
    from typer.testing import CliRunner

    from pipelines.cli import app

    res = CliRunner().invoke(app, ["quarantine", str(dst)])
    assert res.exit_code == 0, res.output
    assert "1 row(s)" in res.output
    assert "1 resolved by a later run, not listed" in res.output.splitlines()[-1]


def test_a_key_recorded_after_older_shards_still_locates_with_a_warning(tmp_path, caplog):
    """A DST made before the key was recorded has its key marked ``unchecked_shards`` when a
    current run adopts it: locating was refused as "records no pseudonymisation key", though
    the record names the key every later run hashed its paths with."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "bad.dcm").write_bytes(b"junk")
    _record_key(dst, id_scheme="sha256", unchecked_shards=True)
    _ingest_in_process([src], dst, run=1)
    with caplog.at_level(logging.WARNING, logger="radjepa.ingest.locate"):
        located = locate_rows(str(dst), [str(src)], KEY)
    assert [r.path for r in located.rows] == [str(src / "bad.dcm")]
    assert "before its pseudonymisation key was recorded" in caplog.text
    with pytest.raises(IngestError, match="key differs from the one"):
        locate_rows(str(dst), [str(src)], b"another key, long enough to be a real one........")


def test_an_uncompressed_tar_is_listed_from_its_headers(tmp_path, monkeypatch):
    """Listing a tar's member names streamed it whole, as reading does (every byte read, a
    second download of a large tar on object storage): an uncompressed tar is listed from its
    headers, its members' data seeked over. Reads are counted at the file pyarrow opens, as
    an object store's requests would be."""
    from fsspec.implementations.local import LocalFileSystem

    import radjepa.ingest.locate as locate
    import radjepa.ingest.sources as sources

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    rng = random.Random(0)
    members = {f"s/IM{i}.dcm": rng.randbytes(100_000) for i in range(60)}  # 6 MB, no images
    tar, packed = src / "t.tar", src / "t.tar.gz"  # a compressed one is still streamed
    for path, mode, names in ((tar, "w", members), (packed, "w:gz", ["p/1.dcm", "p/2.dcm"])):
        with tarfile.open(path, mode) as t:
            for name in names:
                data = members.get(name, b"not an image")
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    _record_key(dst)
    _ingest_in_process([src], dst, run=1)

    reads: dict[str, list[int]] = {}

    class Counting(pafs.FSSpecHandler):
        def open_input_file(self, path: str) -> pa.NativeFile:
            return pa.PythonFile(_CountedReads(path, reads.setdefault(path, [])), mode="r")

    counted = pafs.PyFileSystem(Counting(LocalFileSystem()))
    real = locate.filesystem

    def counted_for_sources(location: str | Path) -> tuple[pafs.FileSystem, str]:
        return (counted, str(location)) if str(location).startswith(str(src)) else real(location)

    monkeypatch.setattr(locate, "filesystem", counted_for_sources)
    monkeypatch.setattr(sources, "filesystem", counted_for_sources)
    located = locate_rows(str(dst), [str(src)], KEY)
    assert sorted(r.path for r in located.rows) == sorted(
        [f"{tar}!{n}" for n in members] + [f"{packed}!p/1.dcm", f"{packed}!p/2.dcm"]
    )
    plain = reads[str(tar)]
    assert plain and sum(plain) < 64 * len(members) * 512, (len(plain), sum(plain))

"""Ingest's library parts without Ray: reading sources, deciding one file's outcome, and
keeping the destination whole. The Ray job (tests/test_ingest.py) runs exactly these."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest

from radjepa.ingest.decoding import RESULT_SCHEMA, FileDecoder
from radjepa.ingest.destination import KEY_RECORD, Destination, check_compatible, check_key
from radjepa.ingest.errors import IngestError
from radjepa.ingest.sources import READ_SCHEMA, iter_source, list_inputs, read_blocks
from radjepa.shards import SHARD_SCHEMA
from tests.dicom_factory import make_dicom

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "archive" / "export"  # real NIH radiographs
SETTINGS = {"size": 64, "dtype": "uint8", "window_percentiles": (0.5, 99.5), "max_bytes": 10**7}
SECRET = b"k" * 32


def _rows(path: Path, max_bytes: int = 10**7) -> list[dict]:
    (ref,) = list_inputs([str(path)])
    return list(iter_source(ref, max_bytes))


def test_archives_are_told_by_content_and_members_read_with_a_bound(tmp_path):
    dcm = make_dicom()
    limit = len(dcm) + 100
    big = b"\0" * (limit + 1)
    # a zip without its suffix (an object-store key) is still read as a zip
    with zipfile.ZipFile(tmp_path / "study", "w") as z:
        z.writestr("a/1.dcm", dcm)
        z.writestr("a/big.dcm", big)
    rows = _rows(tmp_path / "study", max_bytes=limit)
    assert [(r["name"].split("!")[1], r["read_error"]) for r in rows] == [
        ("a/1.dcm", None),
        ("a/big.dcm", "too_large"),
    ]
    assert rows[0]["data"] == dcm and rows[1]["data"] is None and rows[1]["size_bytes"] == limit + 1

    # a DICOM named like an archive is one image; a tar link is one quarantined input
    (tmp_path / "scan.zip").write_bytes(dcm)
    assert [r["data"] for r in _rows(tmp_path / "scan.zip")] == [dcm]
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as t:
        info = tarfile.TarInfo("x/1.dcm")
        info.size = len(dcm)
        t.addfile(info, io.BytesIO(dcm))
        link = tarfile.TarInfo("x/again.dcm")
        link.type, link.linkname = tarfile.SYMTYPE, "1.dcm"
        t.addfile(link)
    got = [(r["name"].rsplit("/", 1)[1], r["read_error"]) for r in _rows(tmp_path / "t.tar.gz")]
    assert got == [("1.dcm", None), ("again.dcm", "read_error:archive link")]

    # a corrupt archive is one unreadable input, not an exception
    (tmp_path / "cut.zip").write_bytes((tmp_path / "study").read_bytes()[:60])
    (row,) = _rows(tmp_path / "cut.zip")
    assert row["data"] is None and row["read_error"].startswith("read_error:")


def test_read_blocks_keep_the_read_schema_and_block_size(tmp_path):
    for i in range(40):
        (tmp_path / f"{i:02d}.png").write_bytes(bytes([i]) * 10)
    refs = pa.Table.from_pylist(list_inputs([str(tmp_path)]))
    blocks = list(read_blocks(refs, max_bytes=100))
    assert [b.num_rows for b in blocks] == [32, 8]
    assert all(b.schema == READ_SCHEMA for b in blocks)
    with pytest.raises(IngestError, match="source not found"):
        list_inputs([str(tmp_path / "nope")])


def test_each_file_gets_exactly_one_outcome():
    png = sorted(SAMPLE.glob("*.png"))[0].read_bytes()
    sha = hashlib.sha256(png).hexdigest()
    rows = [
        {"name": "ok.png", "data": png, "size_bytes": len(png), "read_error": None},
        {"name": "junk.dcm", "data": b"not an image", "size_bytes": 12, "read_error": None},
        {"name": "huge.dcm", "data": None, "size_bytes": 10**9, "read_error": "too_large"},
        {"name": "gone", "data": None, "size_bytes": None, "read_error": "read_error:OSError"},
    ]
    out = FileDecoder(SETTINGS, SECRET, frozenset(), keep_paths=False)(
        pa.Table.from_pylist(rows, schema=READ_SCHEMA)
    )
    assert out.schema == RESULT_SCHEMA
    got = out.to_pylist()
    assert [r["status"] for r in got] == ["ok", "quarantined", "quarantined", "quarantined"]
    assert [r["reason"] for r in got[1:]] == ["not_an_image", "too_large", "read_error"]
    assert got[0]["image_id"] == sha and (got[0]["height"], got[0]["width"]) == (64, 64)
    assert len(got[0]["pixels"]) == 64 * 64 and got[0]["source_path"] is None
    assert "OSError" in got[3]["message"]
    # the row casts to the shard schema the writer uses
    pa.Table.from_pylist([got[0]], schema=RESULT_SCHEMA).select(SHARD_SCHEMA.names).cast(
        SHARD_SCHEMA
    )

    # ids already in DST are not decoded again: by content, or by path for unread files
    known = FileDecoder(SETTINGS, SECRET, frozenset(), keep_paths=True)
    path_hash = known(pa.Table.from_pylist(rows[3:], schema=READ_SCHEMA))["source_hash"][0]
    again = FileDecoder(SETTINGS, SECRET, {sha, f"path:{path_hash}"}, keep_paths=True)(
        pa.Table.from_pylist(rows, schema=READ_SCHEMA)
    ).to_pylist()
    assert [r["status"] for r in again] == ["existing", "quarantined", "quarantined", "existing"]
    assert again[0]["source_path"] == "ok.png"


def test_destination_writes_whole_files_and_guards_its_key_and_size(tmp_path):
    dest = Destination(str(tmp_path / "dst"))
    png = sorted(SAMPLE.glob("*.png"))[0].read_bytes()
    row = FileDecoder(SETTINGS, SECRET, frozenset(), keep_paths=False)(
        pa.Table.from_pylist(
            [{"name": "a.png", "data": png, "size_bytes": len(png), "read_error": None}],
            schema=READ_SCHEMA,
        )
    )
    dest.write("images", "part-0.parquet", row.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA))
    assert dest.known_ids() == {hashlib.sha256(png).hexdigest()}
    assert not [p for p in os.listdir(tmp_path / "dst" / "images") if p.startswith(".")]
    assert dest.stored_image() == {"size": 64, "dtype": "uint8"}
    assert dest.totals() == (1, 0, {})

    # the stored images pin the size even without a manifest (a run that died before it)
    with pytest.raises(IngestError, match="already holds images ingested with"):
        check_compatible(dest, None, {**SETTINGS, "size": 128})
    check_compatible(dest, None, SETTINGS)

    key = {"key": "secret", "key_fingerprint": "abc"}
    check_key(dest, None, key, "RADJEPA_DEID_KEY")
    assert json.loads((tmp_path / "dst" / KEY_RECORD).read_text()) == key
    with pytest.raises(IngestError, match="another pseudonymisation key"):
        check_key(dest, None, {**key, "key_fingerprint": "other"}, "RADJEPA_DEID_KEY")

    (tmp_path / "dst" / "manifest.json").write_text("{not json")
    with pytest.raises(IngestError, match="is not valid JSON"):
        dest.read_manifest()
    (tmp_path / "dst-file").write_text("x")
    with pytest.raises(IngestError, match="cannot use destination"):
        Destination(str(tmp_path / "dst-file"))

"""Ingest's library parts without Ray: reading sources, deciding one file's outcome, and
keeping the destination whole. The Ray job (tests/test_ingest.py) runs exactly these."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from radjepa.imaging.deid import content_id
from radjepa.ingest.decoding import _READ_ERRORS, RESULT_SCHEMA, FileDecoder
from radjepa.ingest.destination import KEY_RECORD, Destination, check_compatible, check_key
from radjepa.ingest.errors import IngestError
from radjepa.ingest.sources import (
    LINK,
    READ_SCHEMA,
    count_inputs,
    count_members,
    iter_source,
    list_inputs,
    read_blocks,
)
from radjepa.shards import SHARD_SCHEMA
from tests.dicom_factory import gradient, issuer_tags, make_dicom
from tests.ingest_inputs import SAMPLE, SECRET, SETTINGS


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


def test_containers_ingest_does_not_open_are_named_not_junk_or_unreadable(tmp_path):
    """A PACS export bundles per-study zips into one transfer zip, or gzips single files: ingest
    opens neither, and quarantined the inner zip as ``not_an_image`` "not DICOM, PNG or JPEG"
    (an archive full of radiographs, called junk) and ``IM1.dcm.gz`` as ``read_error``
    "ReadError" (a broken disk?). Each is now ``not_unpacked``, saying what it holds."""
    dcm = make_dicom(gradient(64, 64, seed=3), markers=False)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("study/IM1", dcm)
    inner_tgz = io.BytesIO()
    with tarfile.open(fileobj=inner_tgz, mode="w:gz") as t:
        info = tarfile.TarInfo("IM1")
        info.size = len(dcm)
        t.addfile(info, io.BytesIO(dcm))
    with zipfile.ZipFile(tmp_path / "transfer.zip", "w") as z:
        z.writestr("IM0", make_dicom(gradient(64, 64, seed=4), markers=False))
        z.writestr("study-1.zip", inner.getvalue())
        z.writestr("study-2.tar.gz", inner_tgz.getvalue())
        z.writestr("IM2.dcm.gz", gzip.compress(dcm))
    (tmp_path / "IM1.dcm.gz").write_bytes(gzip.compress(dcm))  # a single file, not a tar
    (tmp_path / "cut.tar.gz").write_bytes(inner_tgz.getvalue()[:200])  # a tar, cut off

    rows = [r for ref in list_inputs([str(tmp_path)]) for r in iter_source(ref, 10**7)]
    table = pa.Table.from_pylist(rows, schema=READ_SCHEMA)
    got = {
        r["source_path"].rsplit("/", 1)[1]: (r["status"], r["reason"], r["message"])
        for r in FileDecoder(SETTINGS, SECRET, frozenset(), keep_paths=True)(table).to_pylist()
    }
    assert got["transfer.zip!IM0"][0] == "ok"
    inside = "inside an archive: archives inside archives are not opened"
    assert got["transfer.zip!study-1.zip"] == (
        "quarantined",
        "not_unpacked",
        f"a zip archive {inside}; unpack it into a folder and ingest that",
    )
    assert got["transfer.zip!study-2.tar.gz"][1:] == (
        "not_unpacked",
        f"a gzip-compressed tar archive {inside}; unpack it into a folder and ingest that",
    )
    assert got["transfer.zip!IM2.dcm.gz"][2].startswith(f"a gzip-compressed DICOM {inside}")
    assert got["IM1.dcm.gz"] == (
        "quarantined",
        "not_unpacked",
        "a gzip-compressed DICOM, not a tar archive: ingest decompresses only tar archives; "
        "decompress it and ingest the file",
    )
    assert got["cut.tar.gz"][:2] == ("quarantined", "read_error")  # a tar: still unreadable
    # bytes that only start like a compressed stream are junk, as before
    junk = {"name": "x", "data": b"BZh not bzip2", "size_bytes": 13, "read_error": None}
    (row,) = FileDecoder(SETTINGS, SECRET, frozenset(), keep_paths=False)(
        pa.Table.from_pylist([junk], schema=READ_SCHEMA)
    ).to_pylist()
    assert row["reason"] == "not_an_image"


def test_an_empty_zip_is_an_archive_with_no_files_not_an_unreadable_input(tmp_path):
    """zipfile probes for a Zip64 record by seeking 20 bytes before the 22-byte end record and
    expects OSError from a file that short; pyarrow's file raised ArrowInvalid, so an empty zip
    (an empty study folder zipped) was quarantined as "could not read the file (ArrowInvalid)"
    and counted as one input for the progress total."""
    with zipfile.ZipFile(tmp_path / "empty-study.zip", "w"):
        pass
    with zipfile.ZipFile(tmp_path / "study.zip", "w") as z:
        z.writestr("IM1", make_dicom(markers=False))
    refs = {Path(r["path"]).name: r for r in list_inputs([str(tmp_path)])}
    assert [count_members(refs[n]) for n in ("empty-study.zip", "study.zip")] == [0, 1]
    assert list(iter_source(refs["empty-study.zip"], 10**7)) == []
    assert [r["read_error"] for r in iter_source(refs["study.zip"], 10**7)] == [None]


class _CountedReads(io.RawIOBase):
    """A local file that records the size of every read pyarrow makes of it: on s3:// or
    gs:// each one is a ranged GET."""

    def __init__(self, path: str, reads: list[int]) -> None:
        self._f, self._reads = open(path, "rb"), reads  # noqa: SIM115 - closed by close()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._reads.append(len(data))
        return data

    def readinto(self, b) -> int:  # pyarrow reads through read(); a buffer here would hide it
        raise AssertionError("read through read()")

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self._f.close()
        super().close()


def test_a_tar_is_read_in_large_requests_not_ten_kib_at_a_time(tmp_path, monkeypatch):
    """tarfile reads its stream 10 KiB at a time and a 512-byte header a member when counting,
    each a ranged GET on object storage: about a million requests for a 10 GiB tar. Reads are
    counted at the file a pyarrow filesystem (pyarrow's own Python-backed one, over the local
    disk) opens, as an object store's would be."""
    from fsspec.implementations.local import LocalFileSystem

    import radjepa.ingest.sources as sources

    reads: list[int] = []

    class Counting(pafs.FSSpecHandler):
        def open_input_file(self, path: str) -> pa.NativeFile:
            return pa.PythonFile(_CountedReads(path, reads), mode="r")

    counted = pafs.PyFileSystem(Counting(LocalFileSystem()))
    monkeypatch.setattr(sources, "filesystem", lambda source: (counted, source))
    rng = random.Random(0)
    members = {f"s/IM{i}.dcm": rng.randbytes(100_000) for i in range(60)}  # 6 MB, incompressible
    plain, packed = tmp_path / "t.tar", tmp_path / "t.tar.gz"
    for path, mode in ((plain, "w"), (packed, "w:gz")):
        with tarfile.open(path, mode, **({"compresslevel": 1} if mode == "w:gz" else {})) as t:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    for path in (plain, packed):
        ref = {"source": str(path), "path": str(path), "kind": "tar"}
        reads.clear()
        assert [r["data"] for r in iter_source(ref, 10**7)] == list(members.values())
        assert len(reads) <= 4, reads  # 600 reads of 10 KiB before
        assert max(reads) >= 1 << 20
        reads.clear()
        assert count_members(ref) == len(members)
        if path is packed:  # ~750 reads of 8 KiB before: here 1 MiB each
            assert len(reads) <= path.stat().st_size // sources.COUNT_BUFFER + 4, reads
        else:  # a header a member, the data seeked over, never read into a buffer
            assert len(reads) <= 2 * len(members) + 4 and sum(reads) < 64 * len(members) * 512


def test_a_local_archive_without_a_suffix_is_counted_by_its_members(tmp_path):
    """A zip without a suffix (a PACS export's ``study1``) was counted as one input, and an
    automatic decoder pool was sized for that one input. A local file is told by its first
    bytes, as reading tells it; one named as an image, or on object storage, stays one."""
    dcm = make_dicom(markers=False)
    for name in ("study1", "study2.dcm"):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            for i in range(20):
                z.writestr(f"IM{i}", dcm)
    (tmp_path / "IM7").write_bytes(dcm)
    refs = {Path(r["path"]).name: r for r in list_inputs([str(tmp_path)])}
    assert {n: r["kind"] for n, r in refs.items()} == dict.fromkeys(refs, "file")
    assert {n: count_inputs(r) for n, r in refs.items()} == {
        "IM7": 1,
        "study1": 20,
        "study2.dcm": 1,  # named as an image: not opened on the driver (reading still opens it)
    }
    assert count_inputs(refs["study1"], sniff=False) == 1  # a run of many files: not opened
    key = {"source": "s3://bucket/export", "path": "bucket/export/study1", "kind": "file"}
    assert count_inputs(key) == 1  # no request made: a key's content is not asked for here


def test_a_zip_symbolic_link_is_one_link_input_and_tar_links_are_counted(tmp_path):
    """A zip's symbolic link member holds its target's name: it was decoded and quarantined as
    ``not_an_image``, where a tar's link says it is a link. And a tar's links are rows of their
    own when read but were not counted, so ``expected_inputs`` fell short of ``input``."""
    dcm = make_dicom(markers=False)
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("IM1.dcm", dcm)
        link = zipfile.ZipInfo("again.dcm")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(link, "IM1.dcm")
    with tarfile.open(tmp_path / "b.tar", "w") as t:
        info = tarfile.TarInfo("IM1.dcm")
        info.size = len(dcm)
        t.addfile(info, io.BytesIO(dcm))
        for kind, name in ((tarfile.SYMTYPE, "sym.dcm"), (tarfile.LNKTYPE, "hard.dcm")):
            member = tarfile.TarInfo(name)
            member.type, member.linkname = kind, "IM1.dcm"
            t.addfile(member)
        folder = tarfile.TarInfo("empty")
        folder.type = tarfile.DIRTYPE
        t.addfile(folder)
    for name in ("a.zip", "b.tar"):
        (ref,) = list_inputs([str(tmp_path / name)])
        rows = list(iter_source(ref, 10**7))
        assert count_members(ref) == len(rows)
        assert [r["read_error"] for r in rows[1:]] == ["read_error:archive link"] * (len(rows) - 1)
        assert rows[0]["data"] == dcm
    (row,) = FileDecoder(SETTINGS, SECRET, frozenset(), keep_paths=False)(
        pa.Table.from_pylist(rows[1:2], schema=READ_SCHEMA)
    ).to_pylist()
    assert (row["reason"], row["message"]) == ("read_error", _READ_ERRORS[LINK])
    assert "link inside an archive" in row["message"]


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
    sha = content_id(png, SECRET)
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


def test_image_ids_are_keyed_by_the_pseudonymisation_key():
    """The id was sha256(file bytes): anyone holding the original file could find its row.
    Now it is an HMAC under the key: stable for one key (re-runs still recognise files), another
    for another key, and never the plain hash; the decoder's own id agrees with the job's."""
    png = sorted(SAMPLE.glob("*.png"))[0].read_bytes()
    row = {"name": "a.png", "data": png, "size_bytes": len(png), "read_error": None}

    def image_id(secret: bytes, settings: dict = SETTINGS) -> str:
        table = pa.Table.from_pylist([row], schema=READ_SCHEMA)
        (out,) = FileDecoder(settings, secret, frozenset(), keep_paths=False)(table).to_pylist()
        return out["image_id"]

    first, again, other = image_id(SECRET), image_id(SECRET), image_id(b"another-key" * 3)
    assert first == again != other
    assert hashlib.sha256(png).hexdigest() not in {first, other}
    assert len(first) == 64 and first == content_id(png, SECRET, "hmac-sha256")
    # a DST made before keyed ids keeps its scheme, so its re-runs recognise its files
    unkeyed = image_id(SECRET, {**SETTINGS, "id_scheme": "sha256"})
    assert unkeyed == hashlib.sha256(png).hexdigest()
    with pytest.raises(ValueError, match="unknown image id scheme"):
        content_id(png, SECRET, "md5")


def _store_one_png(dest: Destination, shard: str = "part-0.parquet") -> bytes:
    """Decode one sample PNG and write it as the DST's only shard, as a run that dies right
    after its first shard leaves it; returns the PNG's bytes."""
    png = sorted(SAMPLE.glob("*.png"))[0].read_bytes()
    row = FileDecoder(SETTINGS, SECRET, frozenset(), keep_paths=False)(
        pa.Table.from_pylist(
            [{"name": "a.png", "data": png, "size_bytes": len(png), "read_error": None}],
            schema=READ_SCHEMA,
        )
    )
    dest.write("images", shard, row.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA))
    return png


def test_totals_count_a_row_quarantined_unread_whose_path_was_stored_since_as_resolved(
    tmp_path,
):
    """Only rows with no image id (never read) are resolved, and only by an image a LATER run
    stored from their path: a row quarantined for its content, from another path, or after
    the path's image was stored (the file since replaced by one over the size limit) still
    counts as quarantined."""
    from radjepa.imaging.deid import keyed_hash
    from radjepa.ingest.destination import Totals
    from radjepa.shards import QUARANTINE_SCHEMA

    earlier, run, later = "20261204T090000-aaaaaa", "20261204T100000-bbbbbb", "20261204T110000-c"
    stored = keyed_hash(SECRET, "source", "a.png")
    other = keyed_hash(SECRET, "source", "b.png")
    rows = [  # (image id, path hash, reason): too large once, since stored from its path
        (None, stored, "too_large"),
        (None, other, "read_error"),  # still unread
        ("an-image-id", stored, "not_an_image"),  # its bytes were unusable: they stay so
    ]
    quarantine = pa.Table.from_pylist(
        [
            {"sha256": i, "source_hash": h, "reason": r, "message": "m", "run_id": run}
            for i, h, r in rows
        ],
        schema=QUARANTINE_SCHEMA,
    )
    for stored_by, resolved in ((later, 1), (earlier, 0)):
        dest = Destination(str(tmp_path / stored_by))
        _store_one_png(dest, f"part-{stored_by}-00000.parquet")  # stored from "a.png"
        dest.write("quarantine", f"quarantine-{run}.parquet", quarantine)
        reasons = {"not_an_image": 1, "read_error": 1, **({} if resolved else {"too_large": 1})}
        assert dest.totals() == Totals(1, 3 - resolved, reasons, resolved)
        assert dest.unread_quarantined() == ({other} if resolved else {other, stored})


def _apple_double() -> bytes:
    """What macOS writes as ``._NAME`` beside each file it copies onto a volume without its
    metadata (SMB/NFS shares, exFAT disks): an AppleDouble header, no Parquet."""
    return struct.pack(">II16sH", 0x00051607, 0x00020000, b"Mac OS X        ", 0).ljust(4096, b"\0")


def test_dst_files_other_than_ingests_own_are_read_by_no_reader(tmp_path):
    """Ingest read every ``*.parquet`` of DST's folders while ``read_duplicates`` read only
    ``duplicates-*.parquet``: a Mac's AppleDouble ``._part-....parquet`` (left beside each
    file of a DST copied onto a share) stopped the next run with an ArrowInvalid traceback,
    and the two readers disagreed on which files DST/duplicates holds. Both now list only the
    regular files named as ingest names them: no hidden or temporary file, no folder."""
    from radjepa.shards import (
        DUPLICATE_SAME_INSTANCE,
        DUPLICATE_SCHEMA,
        QUARANTINE_SCHEMA,
        read_duplicates,
    )

    root = tmp_path / "dst"
    dest = Destination(str(root))
    png = _store_one_png(dest, "part-r1-00000.parquet")
    stored = content_id(png, SECRET)
    copy = {"image_id": "c" * 64, "kept_image_id": stored, "kind": DUPLICATE_SAME_INSTANCE}
    copy |= {"source_hash": "d" * 32, "size_bytes": 1, "run_id": "r1"}
    dest.write(
        "duplicates", "duplicates-r1.parquet", pa.Table.from_pylist([copy], DUPLICATE_SCHEMA)
    )
    bad = {"sha256": "e" * 64, "source_hash": "f" * 32, "reason": "not_an_image"}
    bad |= {"message": "m", "run_id": "r1"}
    dest.write(
        "quarantine", "quarantine-r1.parquet", pa.Table.from_pylist([bad], QUARANTINE_SCHEMA)
    )
    ours = {sub: sorted(os.listdir(root / sub)) for sub in ("images", "quarantine", "duplicates")}
    for sub, names in ours.items():
        (root / sub / f"._{names[0]}").write_bytes(_apple_double())
    whole = (root / "duplicates" / "duplicates-r1.parquet").read_bytes()
    (root / "duplicates" / ".duplicates-r2.parquet.tmp").write_bytes(whole[: len(whole) // 2])
    (root / "duplicates" / "duplicates-r3.parquet").mkdir()  # a folder, not a file
    (root / "duplicates" / "notes.parquet").write_bytes(whole)  # another tool's file

    dest = Destination(str(root))  # a later run's view
    assert dest.known_ids() == {stored, "c" * 64, "e" * 64}  # a file read: known by its id
    assert dest.totals() == (1, 1, {"not_an_image": 1}, 0)
    assert dest.stored_image() == {"size": 64, "dtype": "uint8"}
    keys, kept = dest.recorded_inputs()
    assert len(keys) == 3 and kept == {"c" * 64: stored}
    assert read_duplicates(root).to_pylist() == [
        {**{n: None for n in DUPLICATE_SCHEMA.names}, **copy}
    ]
    assert {sub: [Path(p).name for p in dest._parquet(sub)] for sub in ours} == ours


def test_destination_writes_whole_files_and_guards_its_key_and_size(tmp_path):
    dest = Destination(str(tmp_path / "dst"))
    png = _store_one_png(dest)
    assert dest.known_ids() == {content_id(png, SECRET)}
    assert not [p for p in os.listdir(tmp_path / "dst" / "images") if p.startswith(".")]
    assert dest.stored_image() == {"size": 64, "dtype": "uint8"}
    assert dest.totals() == (1, 0, {}, 0)

    # the stored images pin the size even without a manifest (a run that died before it)
    with pytest.raises(IngestError, match="already holds images ingested with"):
        check_compatible(dest, None, {**SETTINGS, "size": 128})
    check_compatible(dest, None, SETTINGS)
    # another window: the manifest (one window for all images) was rewritten to describe images
    # it did not make, and new DICOMs were windowed unlike the stored ones
    manifest = {"image": {"size": 64, "dtype": "uint8", "window_percentiles": [0.5, 99.5]}}
    with pytest.raises(IngestError, match=r"window_percentiles=\[0.5, 99.5\]; this run asks"):
        check_compatible(
            dest, {**manifest, "images": 1}, {**SETTINGS, "window_percentiles": (5, 95)}
        )
    check_compatible(
        dest, {**manifest, "images": 1}, {**SETTINGS, "window_percentiles": [0.5, 99.5]}
    )
    check_compatible(dest, {**manifest, "images": 0}, {**SETTINGS, "window_percentiles": (5, 95)})

    key = {"key": "secret", "key_fingerprint": "abc"}
    check_key(dest, None, key, "RADJEPA_DEID_KEY")  # recorded after a shard: marked so
    assert json.loads((tmp_path / "dst" / KEY_RECORD).read_text()) == {
        **key,
        "id_scheme": "sha256",  # ids already there, none recorded: made before keyed ids
        "unchecked_shards": True,
    }
    with pytest.raises(IngestError, match="another pseudonymisation key"):
        check_key(dest, None, {**key, "key_fingerprint": "other"}, "RADJEPA_DEID_KEY")

    (tmp_path / "dst" / "manifest.json").write_text("{not json")
    with pytest.raises(IngestError, match="is not valid JSON"):
        dest.read_manifest()
    (tmp_path / "dst-file").write_text("x")
    with pytest.raises(IngestError, match="cannot use destination"):
        Destination(str(tmp_path / "dst-file"))


def _patient_pids(files: dict[str, bytes], scheme: str | None) -> dict[str, str]:
    """Each file's patient pseudonym as ingest's decoder stores it under ``scheme``."""
    settings = SETTINGS if scheme is None else {**SETTINGS, "patient_identity": scheme}
    rows = [
        {"name": name, "data": data, "size_bytes": len(data), "read_error": None}
        for name, data in files.items()
    ]
    out = FileDecoder(settings, SECRET, frozenset(), keep_paths=False)(
        pa.Table.from_pylist(rows, schema=READ_SCHEMA)
    ).to_pylist()
    assert [r["status"] for r in out] == ["ok"] * len(files)
    return {name: r["patient_pid"] for name, r in zip(files, out, strict=True)}


def test_issuer_scheme_tells_two_sites_same_patient_id_apart(caplog):
    """Two sites of a pooled archive both issue "12345": one patient under PatientID alone
    (the default, unchanged), two under issuer_and_patient_id; the issuer is read from
    IssuerOfPatientID and its qualifiers, and neither value reaches a log line."""
    from radjepa.imaging.deid import pseudonym

    def dcm(seed: int, **issuer: str) -> bytes:
        return make_dicom(gradient(48, 48, seed=seed), extra=issuer_tags("12345", **issuer))

    files = {
        "a1.dcm": dcm(1, namespace="SITE-A"),
        "a2.dcm": dcm(2, namespace="SITE-A"),  # another image of the same site's patient
        "b.dcm": dcm(3, namespace="SITE-B"),
        "blank.dcm": dcm(4, namespace="  "),  # present but blank: no issuer
        "none.dcm": dcm(5),
        "oid.dcm": dcm(6, namespace="SITE-A", universal_id="1.2.3.4", universal_id_type="ISO"),
        "oid_only.dcm": dcm(7, universal_id="1.2.3.4", universal_id_type="ISO"),
        # naive concatenation would make both "SITE-12345"
        "split1.dcm": make_dicom(gradient(seed=8), extra=issuer_tags("2345", "SITE-1")),
        "split2.dcm": make_dicom(gradient(seed=9), extra=issuer_tags("345", "SITE-12")),
    }
    with caplog.at_level("DEBUG"):
        plain = _patient_pids(files, None)
        assert _patient_pids(files, "patient_id") == plain
        pooled = _patient_pids(files, "issuer_and_patient_id")

    # the default keeps every existing archive's pseudonyms: PatientID alone
    assert {plain[f] for f in files if not f.startswith("split")} == {
        pseudonym(SECRET, "patient", "12345")
    }
    # the issuer scheme: one site's patient stays one patient, the other site's is another
    assert pooled["a1.dcm"] == pooled["a2.dcm"]
    assert pooled["a1.dcm"] != pooled["b.dcm"]
    # a blank or absent issuer says no more than PatientID does: the plain pseudonym
    assert pooled["blank.dcm"] == pooled["none.dcm"] == plain["none.dcm"]
    assert pooled["a1.dcm"] != plain["a1.dcm"]
    # the qualifiers (universal id and its type) are part of the issuer
    assert len({pooled["a1.dcm"], pooled["oid.dcm"], pooled["oid_only.dcm"]}) == 3
    assert pooled["split1.dcm"] != pooled["split2.dcm"]
    logged = caplog.text
    for value in ("12345", "SITE-A", "SITE-B", "1.2.3.4", "2345"):
        assert value not in logged

    # an unknown scheme is the caller's error, raised before any file is decoded (inside the
    # decoder it would quarantine every file as undecodable)
    from radjepa.imaging.decode import decode_image

    with pytest.raises(ValueError, match="unknown patient identity scheme"):
        decode_image(files["a1.dcm"], secret=SECRET, patient_identity="issuer")


def test_a_qualifiers_element_of_the_wrong_vr_does_not_quarantine_the_image():
    # a broken exporter wrote IssuerOfPatientIDQualifiersSequence as LO text: under the issuer
    # scheme the image was quarantined as "malformed dicom (AttributeError)"
    import pydicom
    from pydicom.dataelem import DataElement

    from radjepa.imaging.decode import decode_image

    good = make_dicom(gradient(48, 48, seed=1), extra=issuer_tags("12345", "SITE-A"))
    ds = pydicom.dcmread(io.BytesIO(good))
    ds.add(DataElement(0x00100024, "LO", "not a sequence"))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    scheme = "issuer_and_patient_id"
    bad = decode_image(buf.getvalue(), secret=SECRET, patient_identity=scheme)
    # read as no qualifiers: the issuer it names still counts
    assert (
        bad.meta["patient_pid"]
        == decode_image(good, secret=SECRET, patient_identity=scheme).meta["patient_pid"]
    )


def test_patient_identity_values_are_the_config_choices():
    from typing import get_args

    from radjepa.config import PatientIdentity, load_config
    from radjepa.imaging.deid import PATIENT_IDENTITIES

    assert get_args(PatientIdentity) == PATIENT_IDENTITIES
    assert load_config(None).ingest.patient_identity == "patient_id"


def test_destination_pins_the_patient_identity_scheme(tmp_path, caplog):
    """The scheme is recorded with the key before the first shard; another scheme into the same
    DST is refused in one line, as another key is, and a record from before the scheme was a
    setting means PatientID alone."""
    from radjepa.ingest.destination import recorded_pseudonyms

    dst = tmp_path / "dst"
    dest = Destination(str(dst))
    assert recorded_pseudonyms(str(dst)) is None  # nothing ingested yet
    key = {"key": "secret", "key_fingerprint": "abc", "patient_identity": "issuer_and_patient_id"}
    check_key(dest, None, key, "RADJEPA_DEID_SECRET")
    assert json.loads((dst / KEY_RECORD).read_text()) == {**key, "id_scheme": "hmac-sha256"}
    expected = {
        "key_fingerprint": "abc",
        "patient_identity": "issuer_and_patient_id",
        "id_scheme": "hmac-sha256",
    }
    assert recorded_pseudonyms(str(dst)) == expected
    assert recorded_pseudonyms(str(dst / "images")) == expected  # the shard folder given
    assert recorded_pseudonyms(dst.as_uri()) == expected

    with pytest.raises(IngestError) as refused:
        check_key(dest, None, {**key, "patient_identity": "patient_id"}, "RADJEPA_DEID_SECRET")
    message = str(refused.value)
    assert "\n" not in message
    assert "ingest.patient_identity=issuer_and_patient_id" in message
    assert "asks for patient_id" in message and "new DST" in message
    # the same scheme again is fine
    check_key(dest, None, key, "RADJEPA_DEID_SECRET")

    # a DST from before the setting: its key record names no scheme, which was PatientID alone
    old = tmp_path / "old"
    legacy = Destination(str(old))
    (old / KEY_RECORD).write_text(json.dumps({"key": "secret", "key_fingerprint": "abc"}))
    with pytest.raises(IngestError, match="ingest.patient_identity=patient_id but this run"):
        check_key(legacy, None, key, "RADJEPA_DEID_SECRET")
    check_key(legacy, None, {**key, "patient_identity": "patient_id"}, "RADJEPA_DEID_SECRET")
    assert json.loads((old / KEY_RECORD).read_text())["patient_identity"] == "patient_id"

    # older still: shards and no record at all, also PatientID alone
    older = Destination(str(tmp_path / "older"))
    _store_one_png(older)
    with pytest.raises(IngestError, match="without ingest.patient_identity, i.e. patient_id"):
        check_key(older, None, key, "RADJEPA_DEID_SECRET")
    assert not (tmp_path / "older" / KEY_RECORD).exists()
    # recorded now, but those shards' key never was: nothing vouches for it, on this run or
    # the next (a server then says used_unverified, not used)
    plain = {**key, "patient_identity": "patient_id"}
    kept = check_key(older, None, plain, "RADJEPA_DEID_SECRET")
    assert kept == {**plain, "id_scheme": "sha256", "unchecked_shards": True}
    assert check_key(older, older.read_manifest(), plain, "RADJEPA_DEID_SECRET") == kept
    assert recorded_pseudonyms(str(tmp_path / "older")) == {
        "key_fingerprint": None,
        "patient_identity": "patient_id",
        "id_scheme": "sha256",
    }

    # the manifest's copy counts too (a DST whose key record was lost)
    (old / KEY_RECORD).unlink()
    (old / "manifest.json").write_text(json.dumps({"pseudonyms": {"key_fingerprint": "abc"}}))
    assert recorded_pseudonyms(str(old)) == {
        "key_fingerprint": "abc",
        "patient_identity": "patient_id",
        "id_scheme": "sha256",  # a record from before keyed ids
    }
    with pytest.raises(IngestError, match="asks for issuer_and_patient_id"):
        check_key(legacy, legacy.read_manifest(), key, "RADJEPA_DEID_SECRET")


def test_folder_links_list_each_file_once_and_a_dangling_link_is_an_input(tmp_path):
    """pyarrow's listing followed a link to a parent folder 40 levels deep (each file 41 times;
    two such links never finished) and listed a folder's files again under each link to it; a
    link to a missing file was dropped unseen."""
    dcm = make_dicom(gradient(40, 40), markers=False)
    loop = tmp_path / "loop"
    (loop / "2024").mkdir(parents=True)
    (loop / "2024" / "a.dcm").write_bytes(dcm)
    (loop / "2024" / "up").symlink_to("..")
    assert [r["path"] for r in list_inputs([str(loop)])] == [str(loop / "2024" / "a.dcm")]

    src = tmp_path / "src"
    (src / "2024").mkdir(parents=True)
    (src / "2024" / "a.dcm").write_bytes(dcm)
    (src / "latest").symlink_to("2024")  # a second name for a folder
    (src / "gone.dcm").symlink_to("missing.dcm")  # its target was deleted
    os.mkfifo(src / "pipe")  # no image, and reading it would block
    refs = list_inputs([str(src)])
    assert [r["path"] for r in refs] == [str(src / "2024" / "a.dcm"), str(src / "gone.dcm")]
    (row,) = iter_source(refs[1], 10**7)
    assert row["data"] is None and row["read_error"] == "read_error:file gone"


def _quarantined(rows: list[dict]) -> list[tuple[str, str]]:
    """(reason, message) the decoder gives each row (all expected quarantined)."""
    out = FileDecoder(SETTINGS, SECRET, frozenset(), keep_paths=False)(
        pa.Table.from_pylist(rows, schema=READ_SCHEMA)
    ).to_pylist()
    assert [r["status"] for r in out] == ["quarantined"] * len(rows)
    return [(r["reason"], r["message"]) for r in out]


def _encrypted_zip(path: Path, member: str, data: bytes, how: str) -> None:
    """A zip whose ``member`` is password-protected: by the real `zip -e`, or a stored member
    with the general-purpose flag bit 0 (encrypted) set in both headers, which zipfile cannot
    write itself."""
    import shutil
    import subprocess

    if how == "zip -e":
        if shutil.which("zip") is None:
            pytest.skip("the zip command is not installed (apt-get install zip)")
        (path.parent / member).write_bytes(data)
        subprocess.run(
            ["zip", "-q", "-e", "-P", "pw", path.name, member], cwd=path.parent, check=True
        )
        (path.parent / member).unlink()
        return
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)  # stored: the bytes stay as they are
    raw = bytearray(path.read_bytes())
    for magic, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local, central header
        at = raw.index(magic) + flag_at
        raw[at] |= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["zip -e", "flag bit"])
def test_an_encrypted_zip_member_is_quarantined_saying_it_is_encrypted(tmp_path, how):
    # it said "could not read the file (RuntimeError)": zipfile's bare error, with no hint
    # that a password was the problem or what to do
    dcm = make_dicom(gradient(40, 40), markers=False)
    archive = tmp_path / "study.zip"
    _encrypted_zip(archive, "1.dcm", dcm, how)
    with zipfile.ZipFile(archive) as z, pytest.raises(RuntimeError, match="is encrypted"):
        z.read("1.dcm")  # what a real password-protected member raises
    (row,) = _rows(archive)
    assert row["data"] is None and row["read_error"] == "read_error:encrypted zip member"
    assert row["name"].endswith("study.zip!1.dcm") and row["size_bytes"] == len(dcm)
    ((reason, message),) = _quarantined([row])
    assert reason == "read_error"
    assert message == (
        "an encrypted zip member: ingest cannot decrypt it; unpack it with the password and "
        "ingest the files"
    )


def test_a_zip_member_in_an_unreadable_method_says_which_and_how_to_repack(tmp_path):
    # it said "could not read the file (NotImplementedError)": zipfile's bare error. Deflate64
    # is what Windows' "Send to compressed folder" writes for large files; 98 is PPMd (7-Zip)
    dcm = make_dicom(gradient(40, 40), markers=False)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for member in ("deflate64.dcm", "ppmd.dcm", "unknown.dcm", "fine.dcm"):
            z.writestr(member, dcm)  # stored: only the method number is changed below
    raw = bytearray(archive.read_bytes())
    for method, at in zip((9, 98, 250), range(3), strict=True):
        for magic, field in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # local, central
            where = [i for i in range(len(raw)) if raw.startswith(magic, i)][at] + field
            raw[where : where + 2] = method.to_bytes(2, "little")
    archive.write_bytes(bytes(raw))
    with zipfile.ZipFile(archive) as z, pytest.raises(NotImplementedError):
        z.read("deflate64.dcm")  # what a real Deflate64 member raises
    rows = _rows(archive)
    # zipfile raises the same error for a feature of a readable method (compressed patched
    # data, flag bit 5): that member must not be said to be in a method ingest cannot read
    patched = tmp_path / "patched.zip"
    with zipfile.ZipFile(patched, "w") as z:
        z.writestr("patched.dcm", dcm)
    raw = bytearray(patched.read_bytes())
    for magic, field in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # general purpose flags
        where = raw.index(magic) + field
        raw[where] |= 0x20
    patched.write_bytes(bytes(raw))
    (row,) = _rows(patched)
    assert row["read_error"] and "zip method" not in row["read_error"], row["read_error"]
    assert [(r["name"].rsplit("!", 1)[1], r["read_error"]) for r in rows] == [
        ("deflate64.dcm", "read_error:zip method 9"),
        ("ppmd.dcm", "read_error:zip method 98"),
        ("unknown.dcm", "read_error:zip method 250"),
        ("fine.dcm", None),
    ]
    assert rows[3]["data"] == dcm and rows[0]["size_bytes"] == len(dcm)
    quarantined = _quarantined(rows[:3])
    assert {reason for reason, _ in quarantined} == {"read_error"}
    deflate64, ppmd, unknown = (message for _, message in quarantined)
    assert deflate64 == (
        "a zip member compressed with Deflate64 (method 9), which ingest cannot decompress (it "
        "reads stored, Deflate, BZIP2 and LZMA members): unpack the archive with 7-Zip (7z x) "
        "and ingest the files, or repack it with Deflate (zip -r)"
    )
    assert "with PPMd (method 98)," in ppmd and "with compression method 250," in unknown
    assert not any("NotImplementedError" in m or str(tmp_path) in m for _, m in quarantined)


def test_a_symbolic_link_loop_is_quarantined_saying_so(tmp_path):
    # each link of a loop said "could not read the file (OSError)"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.dcm").symlink_to("b.dcm")
    (src / "b.dcm").symlink_to("a.dcm")
    (src / "self.dcm").symlink_to("self.dcm")
    (src / "gone.dcm").symlink_to("missing.dcm")
    refs = list_inputs([str(src)])
    rows = [r for ref in refs for r in iter_source(ref, 10**7)]
    assert [(Path(r["name"]).name, r["read_error"]) for r in rows] == [
        ("a.dcm", "read_error:symbolic link loop"),
        ("b.dcm", "read_error:symbolic link loop"),
        ("gone.dcm", "read_error:file gone"),
        ("self.dcm", "read_error:symbolic link loop"),
    ]
    loop = ("read_error", "a symbolic link loop: the link leads back to itself, never to a file")
    gone = (
        "read_error",
        "the file is gone: deleted since it was listed, or a link whose target does not exist",
    )
    assert _quarantined(rows) == [loop, loop, gone, loop]


def test_a_file_named_by_two_sources_is_one_input(tmp_path):
    """A source given twice, or a folder and its subfolder: each file was listed (so counted as
    input, and quarantined when too large) once per source."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name in ("a.dcm", "sub/b.dcm"):
        (src / name).write_bytes(make_dicom(gradient(40, 40), markers=False))
    refs = list_inputs([str(src), str(src / "sub"), str(src), str(src / "a.dcm")])
    assert [r["path"] for r in refs] == [str(src / "a.dcm"), str(src / "sub" / "b.dcm")]
    assert {r["source"] for r in refs} == {str(src)}  # the first source that named it


# ---------------------------------------------------------------------------------------------
# One run per DST: the lock, its takeover from dead runs, and what killed runs leave behind


def _lock_record(**fields) -> dict:
    import socket
    from datetime import UTC, datetime

    from radjepa.ingest.dst_lock import _boot_id, _pid_namespace

    now = datetime.now(UTC).isoformat(timespec="seconds")
    return {
        "run_id": "20260101T000000-dead00",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_namespace": _pid_namespace(),
        "boot_id": _boot_id(),
        "started_at": now,
        "heartbeat": now,
        **fields,
    }


def test_a_live_lock_refuses_a_second_run_until_it_is_released(tmp_path):
    """Two runs into one DST each stored the same new files and the later manifest dropped the
    other's run: the second is now refused in one line naming the first."""
    from radjepa.ingest.dst_lock import LOCK, DstLock

    dst = tmp_path / "dst"
    first = DstLock(str(dst), "run-a")
    first.acquire()
    held = (dst / LOCK).read_bytes()
    assert json.loads(held)["run_id"] == "run-a" and json.loads(held)["pid"] == os.getpid()
    with pytest.raises(IngestError) as err:
        DstLock(str(dst), "run-b").acquire()
    message = str(err.value)
    assert "\n" not in message
    for part in ("run run-a", f"pid {os.getpid()}", "since ", "Wait for it", str(dst / LOCK)):
        assert part in message, message
    assert (dst / LOCK).read_bytes() == held  # the refused run changed nothing
    assert sorted(os.listdir(dst)) == [LOCK]
    first.release()
    assert not (dst / LOCK).exists()
    with DstLock(str(dst), "run-b"):
        assert json.loads((dst / LOCK).read_text())["run_id"] == "run-b"
    assert not (dst / LOCK).exists()


def test_a_stale_or_dead_runs_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    """A run killed by kill -9 or an evicted pod never removes its lock: the next run takes it
    over once its heartbeat is stale, or at once when its process is gone from this host."""
    import subprocess
    import sys
    from datetime import UTC, datetime, timedelta

    from radjepa.ingest.dst_lock import LOCK, DstLock

    dst = tmp_path / "dst"
    dst.mkdir()
    lock = dst / LOCK
    old = (datetime.now(UTC) - timedelta(seconds=5)).isoformat(timespec="seconds")
    # on another host, alive as far as anyone here can tell: only its heartbeat counts
    lock.write_text(json.dumps(_lock_record(host="elsewhere", heartbeat=old, run_id="old-run")))
    with pytest.raises(IngestError, match="old-run"):
        DstLock(str(dst), "new").acquire()  # 5 s is fresh under the default limit
    with caplog.at_level("WARNING", logger="radjepa.ingest.dst_lock"):
        with DstLock(str(dst), "new", stale_s=2):
            assert json.loads(lock.read_text())["run_id"] == "new"
    assert (
        "taking over" in caplog.text and "old-run" in caplog.text and "no heartbeat" in caplog.text
    )
    assert not lock.exists()

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock.write_text(json.dumps(_lock_record(pid=int(gone.stdout), run_id="killed-run")))
    caplog.clear()
    with caplog.at_level("WARNING", logger="radjepa.ingest.dst_lock"):
        with DstLock(str(dst), "new"):
            pass
    assert (
        "killed-run" in caplog.text
        and f"process {gone.stdout.strip()} no longer runs" in caplog.text
    )

    # the same hostname and pid namespace on another machine (cloned VMs, or any two hosts
    # outside containers, whose init pid namespace is one number): its pid means nothing here,
    # and the live run there was taken over at once
    other = _lock_record(pid=int(gone.stdout), run_id="live-elsewhere", boot_id="another-boot")
    lock.write_text(json.dumps(other))
    with pytest.raises(IngestError, match="live-elsewhere"):
        DstLock(str(dst), "new").acquire()
    # a lock written before the boot was recorded is judged by host and namespace as before
    older = {k: v for k, v in other.items() if k != "boot_id"} | {"run_id": "older-version"}
    lock.write_text(json.dumps(older))
    with DstLock(str(dst), "new"):
        pass

    # a lock cut short while being written: its age is the file's; fresh is refused, old is not
    lock.write_bytes(b"")
    with pytest.raises(IngestError, match="being written or is damaged"):
        DstLock(str(dst), "new").acquire()
    os.utime(lock, (0, 0))
    with DstLock(str(dst), "new"):
        pass
    assert not lock.exists()


def test_the_lock_keeps_its_heartbeat_and_never_removes_another_runs_lock(tmp_path):
    import time

    from radjepa.ingest.dst_lock import LOCK, DstLock

    dst = tmp_path / "dst"
    lock = DstLock(str(dst), "mine", heartbeat_s=0.2)
    lock.acquire()
    first = json.loads((dst / LOCK).read_text())["heartbeat"]
    deadline = time.monotonic() + 10
    while json.loads((dst / LOCK).read_text() or "{}").get("heartbeat", first) == first:
        assert time.monotonic() < deadline, "the heartbeat was never refreshed"
        time.sleep(0.2)
    # taken over meanwhile (this run was judged dead): its release leaves the new owner's lock.
    # The beat is stopped first: one that read our record just before this write would write
    # over it, a race only this test makes (a takeover comes after minutes without a beat)
    lock._stop.set()
    lock._thread.join()
    (dst / LOCK).write_text(json.dumps(_lock_record(run_id="other")))
    lock.release()
    assert json.loads((dst / LOCK).read_text())["run_id"] == "other"


def test_every_read_of_the_lock_is_one_whole_record_while_it_beats(tmp_path):
    """The heartbeat rewrote the lock in place (truncate, then write): a run reading it between
    the two saw an empty file, and a paused run waking at a takeover could tear the new owner's
    record. Each beat now writes a temporary file and renames it over the lock."""
    import time

    from radjepa.ingest.dst_lock import LOCK, DstLock

    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / f"{LOCK}.killed-mid-beat.tmp").write_bytes(b'{"run_id": "kil')  # a dead run's
    lock = DstLock(str(dst), "mine", heartbeat_s=0.0005)
    lock.acquire()
    assert sorted(os.listdir(dst)) in ([LOCK], sorted([LOCK, f"{LOCK}.mine.tmp"]))
    try:
        deadline, reads, torn = time.monotonic() + 3, 0, []
        while time.monotonic() < deadline and not torn:
            raw = (dst / LOCK).read_bytes()
            reads += 1
            try:
                assert json.loads(raw)["run_id"] == "mine"
            except (ValueError, KeyError, AssertionError):
                torn.append(raw)
        assert not torn, f"read {torn[0]!r} after {reads} whole reads"
    finally:
        lock.release()
    assert os.listdir(dst) == []  # no temporary file left behind


def test_a_beat_never_replaces_a_lock_taken_over_while_it_wrote(tmp_path, caplog):
    """A run paused past STALE_S wakes while another run takes its lock over: its beat had
    read its own record, and then wrote over the new owner's. Ownership is read again right
    before the rename: the new owner's record stays and the beat stops, loudly."""
    from radjepa.ingest.dst_lock import LOCK, DstLock

    dst = tmp_path / "dst"

    class TakenOverMidBeat(DstLock):
        def _write_temporary(self) -> str:
            tmp = super()._write_temporary()
            # the takeover lands between this beat's first check and its rename
            (dst / LOCK).write_text(json.dumps(_lock_record(run_id="other")))
            return tmp

    lock = TakenOverMidBeat(str(dst), "mine", heartbeat_s=3600)
    lock.acquire()
    with caplog.at_level("ERROR", logger="radjepa.ingest.dst_lock"):
        assert lock._refresh() is False
    assert json.loads((dst / LOCK).read_text())["run_id"] == "other"
    assert sorted(os.listdir(dst)) == [LOCK]  # our temporary record went, unused
    assert "lost" in caplog.text and "other" in caplog.text
    lock.release()
    assert json.loads((dst / LOCK).read_text())["run_id"] == "other"


def test_a_run_that_lost_its_lock_writes_nothing_more(tmp_path):
    """A run paused past STALE_S whose lock another run took over only logged it and went on
    writing shards and its manifest beside the new owner's: the same new files stored twice.
    Its next write now stops it, in one line; what it stored before stays."""
    import pyarrow as pa

    from radjepa.ingest.dst_lock import LOCK, DstLock
    from radjepa.ingest.errors import IngestError

    dst = tmp_path / "dst"
    lock = DstLock(str(dst), "mine", heartbeat_s=3600)
    lock.acquire()
    dest = Destination(str(dst))
    dest.before_write = lock.check_held
    dest.write("images", "part-mine-00000.parquet", pa.table({"image_id": ["a"]}))
    (dst / LOCK).write_text(json.dumps(_lock_record(run_id="other")))
    assert lock._refresh() is False  # the next beat finds the new owner
    with pytest.raises(IngestError, match="this run lost .* to run other") as err:
        dest.write("images", "part-mine-00001.parquet", pa.table({"image_id": ["b"]}))
    assert "\n" not in str(err.value) and "run it again once the other run has ended" in str(
        err.value
    )
    with pytest.raises(IngestError):
        dest.write_manifest({"runs": []})
    assert sorted(os.listdir(dst / "images")) == ["part-mine-00000.parquet"]
    assert not (dst / "manifest.json").exists()
    lock.release()
    assert json.loads((dst / LOCK).read_text())["run_id"] == "other"
    # a lock deleted by hand is no other run's: the next beat writes it again, the run goes on
    (dst / LOCK).unlink()
    again = DstLock(str(dst), "again", heartbeat_s=3600)
    again.acquire()
    (dst / LOCK).unlink()
    assert again._refresh() is True and not again.lost.is_set()
    assert json.loads((dst / LOCK).read_text())["run_id"] == "again"
    again.check_held()
    again.release()
    assert not (dst / LOCK).exists()


def test_leftovers_of_killed_writes_are_removed_and_the_lock_is_no_input(tmp_path, caplog):
    """A run killed mid-write left ``.NAME.tmp`` files in DST for ever; only ingest's own
    temporary names go, and the lock file is an output a source holding DST must not read."""
    from radjepa.ingest.destination import is_output

    dest = Destination(str(tmp_path / "dst"))
    root = tmp_path / "dst"
    with dest.fs.open_output_stream(str(root / "images" / ".part-x-00000.parquet.tmp")) as f:
        f.write(b"PAR1 cut short by kill -9")  # what Destination.write leaves when killed
    leftovers = [
        root / "images" / ".part-x-00000.parquet.tmp",
        root / "quarantine" / ".quarantine-x.parquet.tmp",
        root / "duplicates" / ".duplicates-x.parquet.tmp",
        root / ".manifest.json.tmp",
        root / ".pseudonyms.json.tmp",
    ]
    for p in leftovers[1:]:
        p.write_bytes(b"half")
    others = [root / ".notes.tmp", root / "raw" / ".part-1.parquet.tmp", root / "images" / "x.tmp"]
    for p in others:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"not ours")
    with caplog.at_level("INFO", logger="radjepa.ingest.destination"):
        assert dest.remove_leftovers() == 5
    assert "removed 5 temporary files" in caplog.text
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in others)
    assert dest.remove_leftovers() == 0

    assert is_output(str(root), str(root / ".ingest.lock"))
    assert is_output(str(root), str(root / ".ingest.lock.20260101T000000-abcdef.tmp"))
    assert not is_output(str(root), str(root / "raw" / ".ingest.lock"))
    assert is_output(str(root), str(root / "duplicates" / "duplicates-x.parquet"))


def test_the_lock_on_a_filesystem_without_exclusive_create():
    """Object stores have no O_EXCL: the lock is written, read back and kept when still ours.
    pyarrow's in-memory filesystem (not a LocalFileSystem) takes that path; both runs share it
    as two drivers share a bucket."""
    from radjepa.ingest.dst_lock import LOCK, DstLock

    first, second = DstLock("mock:///dst", "run-a"), DstLock("mock:///dst", "run-b")
    assert not first.local
    second.fs = first.fs  # one bucket seen by two runs
    with first:
        with pytest.raises(IngestError, match="is being ingested by run run-a"):
            second.acquire()
    with second:
        with first.fs.open_input_stream(f"dst/{LOCK}") as f:
            assert json.loads(f.read())["run_id"] == "run-b"
    assert first.fs.get_file_info(f"dst/{LOCK}").type.name == "NotFound"


def _stored_row(pixels, image_id: str, pid: str | None) -> dict:
    from radjepa.shards import pixels_to_bytes

    return {
        "image_id": image_id,
        "instance_pid": pid,
        "pixels": pixels_to_bytes(pixels),
        "height": pixels.shape[0],
        "width": pixels.shape[1],
        "dtype": "uint8",
    }


def _index_of_one_stored_instance(tmp_path, img):
    """An InstanceIndex over one real shard holding ``img`` as instance pid-1 (image id-1),
    with the columns of every read it makes, in order."""
    import pyarrow.parquet as pq

    from radjepa.ingest.instances import InstanceIndex

    shard = tmp_path / "part-a-00000.parquet"
    pq.write_table(pa.Table.from_pylist([_stored_row(img, "id-1", "pid-1")]), shard)
    reads: list[list[str]] = []

    def read(path: str, columns: list[str]) -> pa.Table:
        reads.append(columns)
        return pq.read_table(path, columns=columns)

    return InstanceIndex([str(shard)], read), shard, reads


def test_the_instance_index_tells_new_duplicate_and_conflicting_copies(tmp_path):
    """One DICOM instance (one SOP Instance UID pseudonym) is stored once: another copy whose
    stored pixels match is a duplicate of the kept one, one whose pixels differ is a conflict.
    Stored shards are read once for the index (two columns) and their pixels only when a copy
    has to be compared, once per shard, however many copies come."""
    import numpy as np
    import pyarrow.parquet as pq

    from radjepa.ingest.instances import CONFLICT_DIFFERENCE, difference, thumbnail

    img = gradient(64, 64, bits=8, seed=1)
    index, shard, reads = _index_of_one_stored_instance(tmp_path, img)
    assert len(index) == 1 and reads == [["instance_pid"]]  # one short column per shard

    def row(pixels):
        r = _stored_row(pixels, "x", None)
        return lambda: (r["pixels"], r["height"], r["width"], r["dtype"])

    nothing = lambda image_id: None  # noqa: E731 - nothing pending in this run
    assert index.check("pid-2", "id-2", row(img), nothing).kind == "new"  # no pixels read
    assert index.check(None, "id-3", row(img), nothing).kind == "new"  # a PNG: bytes only
    assert len(reads) == 1
    noisy = np.clip(img.astype(int) + np.random.default_rng(0).integers(-3, 4, img.shape), 0, 255)
    same = index.check("pid-1", "id-4", row(noisy.astype(np.uint8)), nothing)
    assert (same.kind, same.kept_image_id, same.in_run) == ("duplicate", "id-1", False)
    other = index.check("pid-1", "id-5", row(255 - img), nothing)
    assert (other.kind, other.kept_image_id) == ("conflict", "id-1")
    assert other.difference > CONFLICT_DIFFERENCE > same.difference
    assert len(reads) == 2  # the shard's pixels, once for both comparisons

    # a copy of an instance this run stored and has not written yet: found among its rows
    pending = {"id-2": row(img)()}
    again = index.check("pid-2", "id-6", row(img), pending.get)
    assert (again.kind, again.kept_image_id, again.in_run) == ("duplicate", "id-2", True)
    # once this run has written it, a later copy is compared with the shard it is in
    written = pa.Table.from_pylist([_stored_row(img, "id-2", "pid-2")])
    pq.write_table(written, tmp_path / "part-b-00000.parquet")
    index.written(str(tmp_path / "part-b-00000.parquet"), written)
    later = index.check("pid-2", "id-7", row(255 - img), nothing)
    assert (later.kind, later.kept_image_id, later.in_run) == ("conflict", "id-2", True)
    assert len(reads) == 3 and len(index) == 2
    assert difference(thumbnail(*row(img)()), thumbnail(*row(img)())) == 0.0


def test_a_stored_shard_gone_since_the_index_was_read_stores_the_copy_and_goes_on(tmp_path, caplog):
    """The stored copy's shard is read back mid-run to compare a copy with it: deleted (or
    unreadable) since the run read the index, its read error escaped the ingest as a traceback
    and the run lost its record. The copy is stored instead, with a warning, and the shard is
    not tried again."""

    img = gradient(64, 64, bits=8, seed=2)
    index, shard, reads = _index_of_one_stored_instance(tmp_path, img)
    shard.unlink()
    copy = _stored_row(img, "x", None)
    pixels = lambda: (copy["pixels"], copy["height"], copy["width"], copy["dtype"])  # noqa: E731
    with caplog.at_level("WARNING", logger="radjepa.ingest.instances"):
        verdict = index.check("pid-1", "id-2", pixels, lambda image_id: None)
        again = index.check("pid-1", "id-3", pixels, lambda image_id: None)
    assert (verdict.kind, again.kind) == ("new", "new")
    assert "cannot read back the stored shard" in caplog.text and str(shard) in caplog.text
    assert len(reads) == 2  # the index, then one try at the shard's pixels

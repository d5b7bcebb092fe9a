"""The Ray Data ingest job on a messy corpus: counts reconcile, re-runs are idempotent, no PHI."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from dicom_factory import MARKER_STRINGS, deflated, gradient, issuer_tags, make_dicom
from interrupts import foreground_process, signal_after_line
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from pipelines.ingest import INTERRUPTED
from radjepa.config import load_config
from radjepa.imaging.decode import decode_image
from radjepa.imaging.deid import content_id, resolve_secret
from radjepa.shards import (
    DUPLICATE_SCHEMA,
    QUARANTINE_SCHEMA,
    SHARD_SCHEMA,
    list_shards,
    read_images,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 96
PHI_FOLDER = "DOE^JOHN_MARKER"
FORBIDDEN = [*MARKER_STRINGS, "DOE^JOHN", "JOHN_MARKER", "19450317", "20190402"]


def _image_id(data: bytes) -> str:
    """The id ingest gives ``data`` in a new DST under the key the tests run with (tiny_cpu.yaml
    allows the public development key when RADJEPA_DEID_SECRET is unset)."""
    return content_id(data, resolve_secret("RADJEPA_DEID_SECRET", allow_development_key=True))


def _cfg(*extra: str):
    return load_config(
        REPO / "configs" / "tiny_cpu.yaml",
        [f"ingest.image_size={SIZE}", "ingest.decode_actors=2", "ingest.shard_rows=5", *extra],
    )


class Corpus:
    """A source folder plus what ingest must make of it (computed while building it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inputs = 0
        self.good: set[str] = set()  # image ids of decodable unique bytes
        self.bad: dict[str, str] = {}  # image id -> expected reason
        self.duplicates = 0
        self.unread: list[str] = []  # reasons of inputs never read (links in a tar)

    def _account(self, data: bytes, reason: str | None) -> None:
        sha = _image_id(data)
        self.inputs += 1
        if sha in self.good or sha in self.bad:
            self.duplicates += 1
        elif reason is None:
            self.good.add(sha)
        else:
            self.bad[sha] = reason

    def add(self, rel: str, data: bytes, reason: str | None = None) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self._account(data, reason)

    def add_archive(
        self, rel: str, members: dict[str, tuple[bytes, str | None]], kind: str | None = None
    ) -> None:
        """A zip or tar.gz (``kind``, else from the suffix) whose members are the inputs."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if (kind or ("zip" if rel.endswith(".zip") else "tar")) == "zip":
            with zipfile.ZipFile(path, "w") as z:
                for name, (data, _) in members.items():
                    z.writestr(name, data)
        else:
            with tarfile.open(path, "w:gz") as t:
                for name, (data, _) in members.items():
                    member = self.root / ".staging"
                    member.write_bytes(data)
                    t.add(member, arcname=name)
                    member.unlink()
        for data, reason in members.values():
            self._account(data, reason)

    def add_tar_with_links(self, rel: str, data: bytes) -> None:
        """An uncompressed tar (no suffix needed: found by content) holding a file plus a hard
        and a symbolic link to it: each link is one input, quarantined, never skipped unseen."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as t:
            info = tarfile.TarInfo("scan/one.dcm")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
            for name, kind in (
                ("scan/hard.dcm", tarfile.LNKTYPE),
                ("scan/soft.dcm", tarfile.SYMTYPE),
            ):
                link = tarfile.TarInfo(name)
                link.type, link.linkname = kind, "scan/one.dcm"
                t.addfile(link)
        self._account(data, None)
        self.inputs += 2
        self.unread += ["read_error", "read_error"]

    @property
    def reasons(self) -> dict[str, int]:
        return dict(Counter([*self.bad.values(), *self.unread]))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, nih_dir) -> Corpus:
    c = Corpus(tmp_path_factory.mktemp("archive"))
    pngs = sorted((nih_dir / "images").glob("*.png"))[:5]
    for p in pngs:
        c.add(f"nih/{p.name}", p.read_bytes())
    c.add("nih/copy_of_first.png", pngs[0].read_bytes())  # duplicate bytes
    px12 = gradient(120, 100, bits=12, seed=1)
    plain = make_dicom(px12)
    c.add(f"{PHI_FOLDER}/plain.dcm", plain)
    c.add(f"{PHI_FOLDER}/MARKER_NAME_7f3a.dcm", make_dicom(4095 - px12, photometric="MONOCHROME1"))
    c.add("dicom/rle.dcm", make_dicom(px12, transfer_syntax=RLELossless))
    c.add("dicom/j2k.dcm", make_dicom(px12, transfer_syntax=JPEG2000Lossless))
    c.add("dicom/big_endian.dcm", make_dicom(px12, transfer_syntax=ExplicitVRBigEndian))
    c.add("dicom/deflate.dcm", deflated(px12))
    c.add("dicom/no_preamble", make_dicom(px12, raw=True))
    c.add("dicom/voi.dcm", make_dicom(px12, voi_lut=np.arange(4096) * 16))
    c.add("dicom/rescale.dcm", make_dicom(px12, rescale=(2.0, -1024.0), window=(1500, 3000)))
    rgb = np.stack([gradient(80, 80, bits=8, seed=s) for s in range(3)], axis=-1)
    # a secondary capture is stored only when flagged clean of burned-in text
    rgb_sc = make_dicom(rgb, bits=8, photometric="RGB", extra={"BurnedInAnnotation": "NO"})
    c.add("dicom/rgb_sc.dcm", rgb_sc)
    c.add("dicom/copy_of_plain.dcm", plain)  # duplicate bytes
    c.add("dicom/truncated.dcm", plain[: len(plain) - 5000], "truncated")
    c.add("dicom/multi.dcm", make_dicom(px12, frames=2), "multi_frame")
    c.add("dicom/nopixels.dcm", make_dicom(with_pixels=False), "no_pixel_data")
    c.add("junk/notes_MARKER_NAME_7f3a.txt", b"MARKER_NAME_7f3a saw DOE^JOHN\n" * 9, "not_an_image")
    c.add("junk/empty.dcm", b"", "empty")
    c.add_archive(
        "batch.zip",
        {
            f"{PHI_FOLDER}/a.dcm": (make_dicom(gradient(90, 90, bits=16, seed=5), bits=16), None),
            "b.dcm": (
                make_dicom(
                    gradient(64, 64, bits=8, seed=6), bits=8, transfer_syntax=JPEGBaseline8Bit
                ),
                None,
            ),
            "again.dcm": (plain, None),  # duplicate of a file outside the archive
            "readme.txt": (b"exported by MARKER_INST_a8f0", "not_an_image"),
        },
    )
    c.add_archive(
        "batch.tar.gz",
        {
            "x/c.dcm": (make_dicom(gradient(70, 110, bits=10, seed=8), bits=10), None),
            "x/d.png": (pngs[1].read_bytes(), None),  # duplicate of a loose PNG
            "x/frames.dcm": (make_dicom(gradient(64, 64, seed=9), frames=3), "multi_frame"),
        },
    )
    # found by content, not by name: a DICOM called .zip, a zip with no suffix, a suffix-less tar
    c.add("dicom/study.zip", make_dicom(gradient(60, 60, seed=21)))
    c.add_archive(
        "exports/s3-object-without-suffix",
        {"inner.dcm": (make_dicom(gradient(60, 60, seed=22)), None)},
        kind="zip",
    )
    c.add_tar_with_links("exports/tar-without-suffix", make_dicom(gradient(60, 60, seed=23)))
    c.add(
        "dicom/burned_in.dcm",
        make_dicom(px12[:80], extra={"BurnedInAnnotation": "YES"}),
        "burned_in_annotation",
    )
    return c


def _all_output_text(dst: Path) -> list[tuple[str, bytes]]:
    """Every output file's raw bytes, plus the decoded text of every Parquet cell (zstd would
    hide a leaked string from a raw byte search)."""
    out = []
    for path in sorted(p for p in dst.rglob("*") if p.is_file()):
        out.append((str(path), path.read_bytes()))
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            cols = [c for c in table.column_names if c != "pixels"]
            out.append((f"{path}[cells]", repr(table.select(cols).to_pylist()).encode()))
    return out


@pytest.fixture(scope="module")
def ingested(corpus, ray_session, tmp_path_factory):
    from pipelines.ingest import run_ingest

    dst = tmp_path_factory.mktemp("shards")
    first = run_ingest([str(corpus.root)], str(dst), _cfg(), progress=False)
    return dst, first


def test_counts_reconcile_with_reason_histogram(corpus, ingested) -> None:
    dst, s = ingested
    assert s.input == corpus.inputs == 35
    assert s.ok == len(corpus.good)
    assert s.quarantined == len(corpus.bad) + len(corpus.unread)
    assert s.duplicates == s.duplicates_in_run == corpus.duplicates == 4
    assert s.input == s.ok + s.quarantined + s.duplicates
    assert s.reasons == corpus.reasons
    manifest = json.loads((dst / "manifest.json").read_text())
    last = manifest["last_run"]
    assert (last["input"], last["ok"], last["quarantined"], last["duplicates"]) == (
        s.input,
        s.ok,
        s.quarantined,
        s.duplicates,
    )
    assert last["reasons"] == corpus.reasons == manifest["quarantine_reasons"]
    assert manifest["images"] == s.ok and manifest["quarantined"] == s.quarantined
    assert manifest["image"] == {"size": SIZE, "dtype": "uint8", "window_percentiles": [0.5, 99.5]}


def test_shards_hold_each_unique_image_once(corpus, ingested) -> None:
    dst, s = ingested
    shards = list_shards(dst)
    assert len(shards) == -(-s.ok // 5)  # shard_rows=5
    assert all(pq.read_schema(p).equals(SHARD_SCHEMA) for p in shards)
    images, meta = read_images(dst)
    assert images.shape == (s.ok, SIZE, SIZE) and images.dtype == np.uint8
    ids = meta.column("image_id").to_pylist()
    assert sorted(ids) == sorted(corpus.good)
    plain = (corpus.root / PHI_FOLDER / "plain.dcm").read_bytes()
    row = ids.index(_image_id(plain))
    key = resolve_secret("RADJEPA_DEID_SECRET", allow_development_key=True)
    expected = decode_image(plain, size=SIZE, secret=key)
    assert np.array_equal(images[row], expected.pixels)  # the exact library decode
    # the MONOCHROME1 twin in the same folder decodes to the same picture
    twin = (corpus.root / PHI_FOLDER / "MARKER_NAME_7f3a.dcm").read_bytes()
    twin_row = ids.index(_image_id(twin))
    assert np.abs(images[twin_row].astype(int) - images[row].astype(int)).max() <= 1
    assert set(meta.column("format").to_pylist()) == {"png", "dicom"}
    assert meta.column("source_path").null_count == meta.num_rows


def test_image_ids_are_keyed_not_the_hash_of_the_file(corpus, ingested) -> None:
    """The id was the plain SHA-256 of the file: whoever held the original DICOM (or guessed a
    small quarantined text file) could find its row. A new DST keys it with the
    pseudonymisation key, and says so in its records."""
    dst, _ = ingested
    plain = (corpus.root / PHI_FOLDER / "plain.dcm").read_bytes()
    notes = (corpus.root / "junk" / "notes_MARKER_NAME_7f3a.txt").read_bytes()  # guessable
    stored = set(read_images(dst)[1].column("image_id").to_pylist())
    quarantined = set(pq.read_table(dst / "quarantine").column("sha256").to_pylist())
    assert _image_id(plain) in stored and _image_id(notes) in quarantined
    assert hashlib.sha256(plain).hexdigest() not in stored
    assert hashlib.sha256(notes).hexdigest() not in quarantined
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["pseudonyms"]["id_scheme"] == "hmac-sha256"
    assert json.loads((dst / "pseudonyms.json").read_text())["id_scheme"] == "hmac-sha256"


def test_a_destination_with_unkeyed_ids_keeps_them_and_warns(ray_session, tmp_path, caplog):
    """A DST made before ids were keyed (its records name no id scheme) must still recognise
    the files it holds on a re-run: the run keeps the unkeyed SHA-256, records it, and
    recommends a new DST once."""
    import pyarrow as pa

    from pipelines.ingest import run_ingest
    from radjepa.imaging.deid import key_fingerprint
    from radjepa.ingest.decoding import FileDecoder
    from radjepa.ingest.destination import Destination
    from radjepa.ingest.sources import READ_SCHEMA

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(parents=True)
    old = [make_dicom(gradient(40, 40, seed=s), markers=False) for s in (1, 2)]
    for i, data in enumerate(old):
        (src / f"old{i}.dcm").write_bytes(data)
    # what the previous version left: shards with SHA-256 ids, a key record without a scheme
    key = resolve_secret("RADJEPA_DEID_SECRET", allow_development_key=True)
    settings = {"size": SIZE, "dtype": "uint8", "window_percentiles": (0.5, 99.5)}
    rows = [{"name": f"old{i}.dcm", "data": d, "size_bytes": len(d), "read_error": None}
            for i, d in enumerate(old)]  # fmt: skip
    table = FileDecoder({**settings, "id_scheme": "sha256"}, key, frozenset(), False)(
        pa.Table.from_pylist(rows, schema=READ_SCHEMA)
    )
    Destination(str(dst)).write(
        "images", "part-old-00000.parquet", table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
    )
    record = {"key": "development", "key_fingerprint": key_fingerprint(key)}
    (dst / "pseudonyms.json").write_text(json.dumps({**record, "patient_identity": "patient_id"}))
    (dst / "manifest.json").write_text(json.dumps({"pseudonyms": record, "runs": []}))

    new = make_dicom(gradient(40, 40, seed=3), markers=False)
    (src / "new.dcm").write_bytes(new)
    with caplog.at_level("WARNING", logger="radjepa.ingest.destination"):
        s = run_ingest([str(src)], str(dst), _cfg(), progress=False)
    assert (s.already_ingested, s.ok) == (2, 1)  # its files recognised, the new one stored
    ids = set(read_images(dst)[1].column("image_id").to_pylist())
    assert ids == {hashlib.sha256(d).hexdigest() for d in [*old, new]}
    warned = [r.getMessage() for r in caplog.records if "unkeyed SHA-256" in r.getMessage()]
    assert len(warned) == 1 and "new DST" in warned[0]
    assert json.loads((dst / "pseudonyms.json").read_text())["id_scheme"] == "sha256"
    assert json.loads((dst / "manifest.json").read_text())["pseudonyms"]["id_scheme"] == "sha256"


@pytest.mark.parametrize("record", ["none", "without_id_scheme"])
def test_a_run_reads_an_older_dsts_ids_once(ray_session, tmp_path, monkeypatch, record):
    """On a DST without a key record (or one naming no id scheme: older versions), check_key
    asked whether DST held any id by building the whole set of known ids, and the run then
    built it again for its decoders: every file's id column read and sorted twice, seconds to
    minutes and hundreds of MiB each at archive scale. Now each is read once per run."""
    import pyarrow.parquet as pq

    from pipelines.ingest import run_ingest
    from radjepa.imaging.deid import key_fingerprint
    from radjepa.ingest import destination

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(parents=True)
    dst.mkdir()
    for s in range(3):
        (src / f"old{s}.dcm").write_bytes(make_dicom(gradient(40, 40, seed=s), markers=False))
    (src / "old_bad.dcm").write_bytes(b"not an image")  # a quarantine file too
    key = resolve_secret("RADJEPA_DEID_SECRET", allow_development_key=True)
    fields = {"key": "development", "key_fingerprint": key_fingerprint(key)}
    (dst / "pseudonyms.json").write_text(json.dumps({**fields, "id_scheme": "sha256"}))
    first = run_ingest([str(src)], str(dst), _cfg("ingest.shard_rows=2"), progress=False)
    assert (first.ok, first.quarantined) == (3, 1)
    # what an older version left: no key record, or one that names no id scheme
    manifest = json.loads((dst / "manifest.json").read_text())
    if record == "none":
        (dst / "pseudonyms.json").unlink()
        del manifest["pseudonyms"]
    else:
        (dst / "pseudonyms.json").write_text(json.dumps(fields))
        manifest["pseudonyms"] = fields
    (dst / "manifest.json").write_text(json.dumps(manifest))
    (src / "new.dcm").write_bytes(make_dicom(gradient(40, 40, seed=9), markers=False))

    reads: Counter[tuple[str, tuple[str, ...]]] = Counter()
    read_table = pq.read_table

    def counted(path, *args, columns=None, **kwargs):
        reads[(Path(path).name, tuple(columns or ()))] += 1
        return read_table(path, *args, columns=columns, **kwargs)

    monkeypatch.setattr(destination.pq, "read_table", counted)
    s = run_ingest([str(src)], str(dst), _cfg("ingest.shard_rows=2"), progress=False)
    assert (s.ok, s.already_ingested) == (1, 4)  # its files recognised by their sha256 ids
    assert json.loads((dst / "pseudonyms.json").read_text())["id_scheme"] == "sha256"
    shards = sorted(p.name for p in (dst / "images").glob("*.parquet"))
    quarantine = sorted(p.name for p in (dst / "quarantine").glob("*.parquet"))
    assert len(shards) == 3 and len(quarantine) == 1  # this run's shard included
    id_reads = {
        name: n for (name, columns), n in reads.items() if columns in {("image_id",), ("sha256",)}
    }
    assert id_reads == {name: 1 for name in [*shards[:2], *quarantine]}


def test_no_key_is_refused_before_anything_unless_the_config_opts_in(
    ray_session, tmp_path, monkeypatch
) -> None:
    """Without RADJEPA_DEID_SECRET ingest pseudonymised with the public development key after a
    warning. Now that is refused in one line, exit 2, before Ray starts or DST is touched,
    unless the config says ingest.allow_development_key=true."""
    from pipelines.ingest import run_ingest

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(parents=True)
    (src / "one.dcm").write_bytes(make_dicom(gradient(40, 40), markers=False))
    env = {k: v for k, v in os.environ.items() if k != "RADJEPA_DEID_SECRET"}
    ray_tmp = tmp_path / "ray-tmp"
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "ingest", str(src), str(dst)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env, "RAY_ADDRESS": "", "RAY_TMPDIR": str(ray_tmp)},
        timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: RADJEPA_DEID_SECRET is not set")
    assert "ingest.allow_development_key=true" in line
    assert not dst.exists() and not list(ray_tmp.rglob("session_*"))

    monkeypatch.delenv("RADJEPA_DEID_SECRET", raising=False)
    opted_in = load_config(None, ["ingest.allow_development_key=true"])
    assert run_ingest([str(src)], str(dst), opted_in, progress=False).ok == 1
    assert json.loads((dst / "manifest.json").read_text())["pseudonyms"]["key"] == "development"


def test_quarantine_rows(corpus, ingested) -> None:
    dst, s = ingested
    q = pq.read_table(dst / "quarantine")
    assert q.schema.equals(QUARANTINE_SCHEMA)
    assert q.num_rows == s.quarantined
    rows = q.to_pylist()
    assert {r["sha256"]: r["reason"] for r in rows if r["sha256"]} == corpus.bad
    unread = [r for r in rows if r["sha256"] is None]
    assert [r["reason"] for r in unread] == corpus.unread
    assert all("link inside an archive" in r["message"] for r in unread)
    assert all(len(h) == 32 for h in q.column("source_hash").to_pylist())
    assert q.column("source_path").null_count == q.num_rows


def test_no_identifier_reaches_any_output_byte(corpus, ingested) -> None:
    dst, _ = ingested
    forbidden = [*FORBIDDEN, str(corpus.root)]
    outputs = _all_output_text(dst)
    assert len(outputs) >= 4
    for name, data in outputs:
        for marker in forbidden:
            assert marker.encode() not in data, f"{marker!r} leaked into {name}"


def test_no_identifier_reaches_what_a_debug_run_says(tmp_path) -> None:
    """The outputs are checked above; this is what a run prints and logs, which lands in Ray
    Job logs, CI output and log shipping: the CLI at DEBUG (driver log, progress, summary),
    every worker's output (forwarded to the driver) and Ray's own session log files, for a
    source whose folder, file, member and link names carry a patient's name, with good files
    and one of each way a file is refused (read, size, link, content)."""
    import tempfile

    src = tmp_path / "src"
    phi = src / PHI_FOLDER
    phi.mkdir(parents=True)
    (phi / "MARKER_NAME_7f3a_19450317.dcm").write_bytes(make_dicom(gradient(60, 60, seed=31)))
    no_id = make_dicom(gradient(60, 60, seed=32), extra={"PatientID": ""})
    (phi / "DOE^JOHN_empty_id.dcm").write_bytes(no_id)
    (phi / "DOE^JOHN_cut.dcm").write_bytes(make_dicom(gradient(60, 60, seed=33))[:-2000])
    (phi / "DOE^JOHN_burned.dcm").write_bytes(
        make_dicom(gradient(60, 60, seed=34), extra={"BurnedInAnnotation": "YES"})
    )
    (phi / "DOE^JOHN_notes.txt").write_bytes(b"MARKER_NAME_7f3a DOE^JOHN 19450317\n")
    (phi / "DOE^JOHN_big.dcm").write_bytes(b"\0" * (2 << 20))
    (phi / "DOE^JOHN_link.dcm").symlink_to(phi / "DOE^JOHN_gone.dcm")
    (phi / "DOE^JOHN_bad.zip").write_bytes(b"PK\x03\x04" + b"MARKER_NAME_7f3a" * 8)
    with zipfile.ZipFile(src / "MARKER_ACC_44b1.zip", "w") as z:
        z.writestr(f"{PHI_FOLDER}/a.dcm", make_dicom(gradient(60, 60, seed=35)))
        z.writestr(f"{PHI_FOLDER}/b.dcm", b"MARKER_NAME_7f3a")
    ray_tmp = tempfile.mkdtemp(prefix="rdj", dir="/tmp")  # short: Ray's socket paths
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "--log-level", "DEBUG", "ingest"]
            + [str(src), str(tmp_path / "dst"), "-c", str(REPO / "configs" / "tiny_cpu.yaml")]
            + ["--set", "ingest.decode_actors=1", "--set", "ingest.max_file_mb=1"],
            cwd=REPO,
            capture_output=True,
            timeout=300,
            env={**os.environ, "RADJEPA_DEID_SECRET": "k" * 32, "RAY_ADDRESS": ""}
            | {"RAY_TMPDIR": ray_tmp},
        )
        said = [("stdout", proc.stdout), ("stderr", proc.stderr)]
        said += [(str(p), p.read_bytes()) for p in Path(ray_tmp).rglob("*") if p.is_file()]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    summary = [x for x in proc.stdout.decode().splitlines() if x.startswith("ingested ")]
    assert [x.split(" -> ")[0] for x in summary] == [
        "ingested 10 inputs: 3 stored, 7 quarantined, 0 duplicates"
    ]
    assert len(said) > 10  # Ray's session logs were found
    for name, data in said:
        for marker in [*FORBIDDEN, str(src)]:
            assert marker.encode() not in data, f"{marker!r} leaked into {name}"


def test_rerun_is_idempotent_then_picks_up_new_files(corpus, ingested) -> None:
    from pipelines.ingest import run_ingest

    dst, first = ingested
    shards_before = sorted(Path(p).name for p in list_shards(dst))
    again = run_ingest([str(corpus.root)], str(dst), _cfg(), progress=False)
    assert (again.ok, again.quarantined, again.shards) == (0, 0, [])
    assert again.duplicates == again.input == first.input
    assert again.already_ingested == again.input  # copies included: their bytes are known
    assert sorted(Path(p).name for p in list_shards(dst)) == shards_before
    assert pq.read_table(dst / "quarantine").num_rows == first.quarantined

    extra = corpus.root.parent / (corpus.root.name + "_extra")
    extra.mkdir()
    (extra / "new.dcm").write_bytes(make_dicom(gradient(50, 60, seed=42)))
    shutil.copy(corpus.root / "dicom" / "rle.dcm", extra / "rle_again.dcm")
    third = run_ingest([str(corpus.root), str(extra)], str(dst), _cfg(), progress=False)
    assert (third.ok, third.quarantined) == (1, 0)
    assert third.duplicates == third.input - 1
    manifest = json.loads((dst / "manifest.json").read_text())
    assert len(manifest["runs"]) == 3 and manifest["last_run"]["run_id"] == third.run_id
    assert manifest["images"] == first.ok + 1 == len(read_images(dst)[1])
    assert manifest["inputs_seen"] == first.input + again.input + third.input


def test_decoders_map_the_known_ids_from_the_object_store(corpus, ingested, ray_session) -> None:
    """Every decoder actor ``ray.get``s the DST's known ids: a frozenset of str was unpickled
    into each (about 160 MiB an actor per million stored images). The compact ids arrive as
    read-only views of the node's object store copy, and answer as the DST's files say."""
    from pipelines.ingest import _Decoder
    from radjepa.ingest.destination import Destination

    dst, first = ingested
    known = Destination(str(dst)).known_ids()
    stored = pq.read_table(dst / "images", columns=["image_id"])["image_id"].to_pylist()
    assert stored and set(stored) <= set(known)  # (a test before may have added some)
    actor = ray_session.remote(num_cpus=0)(_Decoder).remote(
        {}, b"k" * 32, ray_session.put(known), False
    )

    def report(decoder: _Decoder) -> tuple[list[str], list[bool], int]:
        """The memory map each array's bytes lie in, the answers and the size."""
        maps = Path("/proc/self/maps").read_text().splitlines()
        lies_in = []
        for array in (decoder.known._ids, decoder.known._paths):
            if not len(array):  # no bytes to lie anywhere
                continue
            at = array.ctypes.data
            for line in maps:
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                if lo <= at < hi:
                    lies_in.append(line)
        answers = [v in decoder.known for v in (stored[0], stored[-1], "0" * 64)]
        return lies_in, answers, len(decoder.known)

    lies_in, answers, size = ray_session.get(actor.__ray_call__.remote(report))
    ray_session.kill(actor)
    # shared maps of the object store's file (/dev/shm/plasma...), not the actor's own heap
    assert len(lies_in) == (len(stored) > 0) + bool(first.quarantined), lies_in
    assert all("plasma" in m and m.split()[1].endswith("s") for m in lies_in), lies_in
    assert answers == [True, True, False] and size == len(known)


def test_a_decoder_started_as_its_run_ends_stops_without_a_word(ray_session, tmp_path) -> None:
    """An autoscaling pool still starting a decoder when a short run ends (every `make demo`
    did, 3 actors for 65 files on the 2-core box) drops it, and the run's reference to the
    known ids, while its constructor runs: the ``ray.get`` there failed, and the actor died
    printing a traceback ("This should not happen") and Ray's object store report into the
    next stage's output. Here a decoder whose constructor is held until the driver dropped it
    and the ids, as Ray Data does; and one of a live run, which has the ids at its first
    batch."""
    import pyarrow as pa
    from processes import ray_logs_dir

    from pipelines.ingest import _Decoder

    class Held(_Decoder):
        """Starts as the pool's actors do (the ids inside an argument, as Ray Data passes its
        constructor kwargs), once ``gate`` exists; says its pid first."""

        def __init__(self, gate: str, boxed: list, note: str) -> None:
            Path(note).write_text(str(os.getpid()))
            while not Path(gate).exists():
                time.sleep(0.05)
            super().__init__({}, b"k" * 32, boxed[0], False)

    logs = ray_logs_dir()
    gate, note = tmp_path / "gate", tmp_path / "pid"
    known = ray_session.put(frozenset({"a" * 64}))
    actor = ray_session.remote(num_cpus=0)(Held).remote(str(gate), [known], str(note))
    deadline = time.monotonic() + 60
    while not note.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(note.read_text())
    del actor, known  # the run ended: its pool and its ids are gone
    time.sleep(1)
    gate.touch()
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the decoder's process {pid} is still there")
    said = "".join(f.read_text() for f in logs.rglob(f"worker-*-{pid}.err"))
    assert "Traceback" not in said and "Plasma Store Usage" not in said, said[-2000:]

    # a live run's decoder: the ids are fetched with its first batch, and answer
    known = ray_session.put(frozenset({"a" * 64}))
    gate2 = tmp_path / "open"
    gate2.touch()
    actor = ray_session.remote(num_cpus=0)(Held).remote(str(gate2), [known], str(note))

    def first_batch(decoder: _Decoder) -> tuple[int, bool, bool]:
        out = decoder(pa.table({"name": pa.array([], pa.string())}))
        return out.num_rows, "a" * 64 in decoder.known, "b" * 64 in decoder.known

    assert ray_session.get(actor.__ray_call__.remote(first_batch)) == (0, True, False)
    ray_session.kill(actor)


def test_an_input_quarantined_unread_then_stored_is_resolved_not_quarantined(
    ray_session, tmp_path
) -> None:
    """A link whose target was missing (read_error) stored by a later run once its target
    exists: the manifest still said quarantined 1 (read_error 1) for a DST that holds every
    file. Its row stays as history and counts as resolved; the totals reconcile."""
    from pipelines.ingest import run_ingest

    src = tmp_path / "src"
    src.mkdir()
    for seed in (1, 2):
        (src / f"{seed}.dcm").write_bytes(make_dicom(gradient(40, 50, seed=seed), markers=False))
    (src / "late.dcm").symlink_to(tmp_path / "exported-later.dcm")
    (src / "gone.dcm").symlink_to(tmp_path / "never.dcm")  # stays quarantined
    dst = tmp_path / "dst"
    first = run_ingest([str(src)], str(dst), _cfg(), progress=False)
    assert (first.ok, first.quarantined, first.reasons) == (2, 2, {"read_error": 2})

    (tmp_path / "exported-later.dcm").write_bytes(make_dicom(gradient(60, 50), markers=False))
    second = run_ingest([str(src)], str(dst), _cfg(), progress=False)
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["quarantined"] == 1 and manifest["quarantine_reasons"] == {"read_error": 1}
    assert (second.ok, second.resolved, second.quarantined, second.duplicates) == (1, 1, 0, 3)
    assert (second.total_images, second.total_quarantined, second.total_resolved) == (3, 1, 1)
    assert manifest["quarantine_resolved"] == 1 and manifest["duplicates"] == 3
    reconciled = manifest["images"] + manifest["quarantined"] + manifest["quarantine_resolved"]
    assert reconciled + manifest["duplicates"] == manifest["inputs_seen"] == 8
    assert manifest["last_run"]["resolved"] == 1
    q = pq.read_table(dst / "quarantine")  # the history stays: both rows of the first run
    assert q.column("run_id").to_pylist() == [first.run_id] * 2

    third = run_ingest([str(src)], str(dst), _cfg(), progress=False)  # nothing new
    assert (third.ok, third.resolved, third.duplicates) == (0, 0, 4)
    assert (third.total_images, third.total_quarantined, third.total_resolved) == (3, 1, 1)


def test_size_change_into_same_dst_is_refused(corpus, ingested) -> None:
    from pipelines.ingest import IngestError, run_ingest

    dst, _ = ingested
    with pytest.raises(IngestError, match="size"):
        run_ingest([str(corpus.root)], str(dst), _cfg("ingest.image_size=128"), progress=False)
    # a run that died before writing its manifest left shards: they still fix the size
    (dst / "manifest.json").rename(dst / "manifest.json.bak")
    try:
        with pytest.raises(IngestError, match="size"):
            run_ingest([str(corpus.root)], str(dst), _cfg("ingest.dtype=uint16"), progress=False)
        assert not (dst / "manifest.json").exists()
    finally:
        (dst / "manifest.json.bak").rename(dst / "manifest.json")


def test_burned_in_annotation_can_be_kept_by_choice(ray_session, tmp_path) -> None:
    from pipelines.ingest import run_ingest

    src = tmp_path / "src"
    src.mkdir()
    flagged = make_dicom(gradient(40, 40), extra={"BurnedInAnnotation": "YES"}, markers=False)
    (src / "scrubbed.dcm").write_bytes(flagged)
    cfg = _cfg("ingest.burned_in_annotation=keep")
    s = run_ingest([str(src)], str(tmp_path / "dst"), cfg, progress=False)
    assert (s.input, s.ok, s.quarantined) == (1, 1, 0)
    manifest = json.loads((tmp_path / "dst" / "manifest.json").read_text())
    assert manifest["last_run"]["burned_in_annotation"] == "keep"


def test_unusable_destination_or_state_is_one_line_exit_2(tmp_path) -> None:
    # refused before Ray starts or anything is written; no traceback
    src = tmp_path / "src"
    src.mkdir()
    (src / "one.dcm").write_bytes(make_dicom(gradient(40, 40), markers=False))
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{ half a manifest")
    locked = tmp_path / "locked"  # another run (this live process) is ingesting into it
    locked.mkdir()
    (locked / ".ingest.lock").write_text(
        json.dumps(
            {
                "run_id": "20260101T000000-busy00",
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started_at": "2026-01-01T00:00:00+00:00",
                "heartbeat": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
    )
    cases = {
        (str(src), str(a_file)): "cannot use destination",
        (str(src), str(broken)): "manifest.json is not valid JSON",
        ("nosuchscheme://bucket/x", str(tmp_path / "dst")): "cannot list source",
        (str(src), str(locked)): "is being ingested by run 20260101T000000-busy00",
    }
    for (source, dst), message in cases.items():
        out = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "ingest", source, dst],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "RADJEPA_DEID_SECRET": "k" * 32},
        )
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        assert message in out.stderr, out.stderr
    assert not (tmp_path / "dst").exists()
    assert os.listdir(locked) == [".ingest.lock"]  # the refused run wrote nothing


def test_another_pseudonymisation_key_into_same_dst_is_refused(
    corpus, ingested, monkeypatch
) -> None:
    from pipelines.ingest import IngestError, run_ingest
    from radjepa.imaging.deid import key_fingerprint, resolve_secret

    dst, _ = ingested
    manifest = json.loads((dst / "manifest.json").read_text())
    used = resolve_secret("RADJEPA_DEID_SECRET", allow_development_key=True)
    assert manifest["pseudonyms"]["key_fingerprint"] == key_fingerprint(used)
    before = (dst / "manifest.json").read_bytes()
    other = "a-different-key-" + used.decode()[:8] + "-0123456789abcdef"
    monkeypatch.setenv("RADJEPA_DEID_SECRET", other)
    with pytest.raises(IngestError, match="another pseudonymisation key"):
        run_ingest([str(corpus.root)], str(dst), _cfg(), progress=False)
    assert (dst / "manifest.json").read_bytes() == before  # nothing written
    assert other not in before.decode()
    # the record is written before the first shard: a run that died before its manifest
    # still pins the key
    (dst / "manifest.json").rename(dst / "manifest.json.bak")
    try:
        with pytest.raises(IngestError, match="another pseudonymisation key"):
            run_ingest([str(corpus.root)], str(dst), _cfg(), progress=False)
    finally:
        (dst / "manifest.json.bak").rename(dst / "manifest.json")
    record = json.loads((dst / "pseudonyms.json").read_text())
    assert record["key_fingerprint"] == key_fingerprint(used)


def test_pooled_sites_patients_are_told_apart_by_issuer(ray_session, tmp_path) -> None:
    """Two sites both issue PatientID 12345: with ingest.patient_identity=issuer_and_patient_id
    the shards hold two patients; the scheme is recorded with the key, and a later run with
    another scheme into the same DST is refused in one line before anything is written."""
    from pipelines.ingest import IngestError, run_ingest

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(parents=True)
    sites = {"a1": "SITE-A", "a2": "SITE-A", "b": "SITE-B"}
    ids = {}
    for seed, (name, site) in enumerate(sites.items()):
        data = make_dicom(gradient(40, 40, seed=seed), extra=issuer_tags("12345", site))
        (src / f"{name}.dcm").write_bytes(data)
        ids[_image_id(data)] = name
    pooled = _cfg("ingest.patient_identity=issuer_and_patient_id")
    s = run_ingest([str(src)], str(dst), pooled, progress=False)
    assert (s.ok, s.quarantined) == (3, 0)
    table = pq.read_table(list_shards(dst)[0], columns=["image_id", "patient_pid"])
    rows = table.to_pylist()
    pid = {ids[r["image_id"]]: r["patient_pid"] for r in rows}
    assert pid["a1"] == pid["a2"] != pid["b"]
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["pseudonyms"]["patient_identity"] == "issuer_and_patient_id"
    assert json.loads((dst / "pseudonyms.json").read_text()) == manifest["pseudonyms"]

    (src / "later.dcm").write_bytes(
        make_dicom(gradient(40, 40, seed=9), extra=issuer_tags("12345", "SITE-B"))
    )
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    with pytest.raises(IngestError) as refused:
        run_ingest([str(src)], str(dst), _cfg(), progress=False)  # the default scheme
    message = str(refused.value)
    assert "ingest.patient_identity=issuer_and_patient_id" in message and "\n" not in message
    assert not any(phi in message for phi in ("12345", "SITE-A", "SITE-B"))
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before
    assert run_ingest([str(src)], str(dst), pooled, progress=False).ok == 1  # same scheme: fine


def test_keep_source_paths_too_large_and_dst_inside_source(ray_session, tmp_path) -> None:
    from pipelines.ingest import run_ingest

    src = tmp_path / "src"
    src.mkdir()
    (src / "small.dcm").write_bytes(make_dicom(gradient(40, 40, bits=8), bits=8, markers=False))
    (src / "big.dcm").write_bytes(make_dicom(gradient(400, 400), markers=False))
    dst = src / "out"  # inside the source: its shards must never be ingested back
    cfg = _cfg("ingest.keep_source_paths=true", "ingest.max_file_mb=0.05")
    s = run_ingest([str(src)], str(dst), cfg, progress=False)
    assert (s.input, s.ok, s.quarantined, s.reasons) == (2, 1, 1, {"too_large": 1})
    _, meta = read_images(dst)
    assert meta.column("source_path").to_pylist() == [str(src / "small.dcm")]
    q = pq.read_table(dst / "quarantine")
    assert q.column("source_path").to_pylist() == [str(src / "big.dcm")]
    assert q.column("sha256").to_pylist() == [None]  # never read, so never hashed
    again = run_ingest([str(src)], str(dst), cfg, progress=False)
    assert (again.input, again.ok, again.quarantined, again.already_ingested) == (2, 0, 0, 2)


def test_source_inside_destination_is_ingested_but_not_the_outputs(ray_session, tmp_path) -> None:
    """`radjepa ingest /data/raw /data`: every file under DST was skipped as if it were DST's
    own output, so the run stored nothing and said only "no files found"."""
    from pipelines.ingest import run_ingest

    dst = tmp_path / "data"
    (dst / "raw").mkdir(parents=True)
    for seed in range(2):
        (dst / "raw" / f"{seed}.dcm").write_bytes(make_dicom(gradient(40, 40, seed=seed)))
    s = run_ingest([str(dst / "raw")], str(dst), _cfg(), progress=False)
    assert (s.input, s.ok, s.quarantined) == (2, 2, 0)
    # DST itself as the source: its shards, records and quarantine are never read back
    (dst / "raw" / "bad.dcm").write_bytes(b"not an image")
    again = run_ingest([str(dst)], str(dst), _cfg(), progress=False)
    assert (again.input, again.ok, again.quarantined, again.already_ingested) == (3, 0, 1, 2)
    third = run_ingest([str(dst)], str(dst), _cfg(), progress=False)
    assert (third.input, third.already_ingested) == (3, 3)
    # the source named through a link: DST's shards, manifest and quarantine were listed under
    # the link's name and read back as inputs (a duplicate, a not_an_image each run). The
    # three files are inputs under other names (a path is its spelling, docs/INGEST.md): the
    # good ones are held, and the broken one is quarantined again, as any copy of broken bytes
    (tmp_path / "link").symlink_to(dst)
    linked = run_ingest([str(tmp_path / "link")], str(dst), _cfg(), progress=False)
    assert (linked.input, linked.quarantined, linked.already_ingested) == (3, 1, 2)
    assert linked.reasons == {"not_an_image": 1}


def _failing_decoder_run(monkeypatch, tmp_path: Path, decoder: type, name: str, *sets: str):
    """The error and DST of an ingest of one DICOM called ``name`` whose pipeline decodes with
    ``decoder`` (ingest._Decoder itself stays: replaced, Ray would ship the original by value
    and its super() would fail in the actor's constructor instead)."""
    from pipelines import ingest

    monkeypatch.setattr(
        ingest, "_build_dataset", functools.partial(ingest._build_dataset, decoder=decoder)
    )
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(parents=True)
    (src / name).write_bytes(make_dicom(gradient(40, 40, seed=1)))
    with pytest.raises(ingest.DecoderDied) as err:
        ingest.run_ingest([str(src)], str(dst), _cfg(*sets), progress=False)
    return str(err.value), dst


def test_a_decoder_that_keeps_dying_stops_the_run_in_one_line(ray_session, tmp_path, monkeypatch):
    """A decoder process that died on a batch (a codec crash, a decode killed for memory) was
    restarted and the batch retried without end: the run never finished, DST stayed locked.
    A batch that kills its process three times now stops the run, recorded, lock released."""
    import signal

    from pipelines import ingest
    from radjepa.ingest.dst_lock import LOCK

    class Crashing(ingest._Decoder):  # local: Ray ships it by value to the decoder actors
        def __call__(self, batch):
            if any("crash" in name for name in batch["name"].to_pylist()):
                os.kill(os.getpid(), signal.SIGKILL)  # what a segfault or the OOM killer does
            return super().__call__(batch)

    said, dst = _failing_decoder_run(monkeypatch, tmp_path, Crashing, "crash.dcm")
    assert "a decoder process died on one batch" in said and "\n" not in said
    assert not (dst / LOCK).exists()
    runs = json.loads((dst / "manifest.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["interrupted"]

    class Broken(ingest._Decoder):  # decoders that cannot start are no file's doing
        def __init__(self, *args, **kwargs):
            raise RuntimeError("no codec plugins on this node")

    said, _ = _failing_decoder_run(monkeypatch, tmp_path / "2", Broken, "fine.dcm")
    assert said == "the decoders could not start: no codec plugins on this node"


def test_a_file_that_crashes_or_hangs_its_codec_is_quarantined_and_the_run_goes_on(
    ray_session, tmp_path, monkeypatch
):
    """A codec that segfaults on a file, or spins on it (libjpeg on a frame of 0 lines), cannot
    be caught or interrupted from Python: it ended the decoder, its batch was retried, and the
    run stopped over one file (DecoderDied), DST's lock held until then. Each file is now
    decoded in a child process: that file is quarantined, named, and the others are stored."""
    import signal
    import time as clock

    from pipelines import ingest
    from pipelines.ingest import run_ingest

    class Codec(ingest._Decoder):  # local: Ray ships it by value to the decoder actors
        def _decode(self, data, name):
            if Path(name).name == "crash.dcm":
                os.kill(os.getpid(), signal.SIGSEGV)
            if Path(name).name == "stuck.dcm":
                clock.sleep(3600)  # as a codec spinning in C would
            return super()._decode(data, name)

    monkeypatch.setattr(
        ingest, "_build_dataset", functools.partial(ingest._build_dataset, decoder=Codec)
    )
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for seed, name in enumerate(("a.dcm", "crash.dcm", "stuck.dcm", "z.dcm")):
        (src / name).write_bytes(make_dicom(gradient(40, 40, seed=seed)))
    started = clock.monotonic()
    s = run_ingest(
        [str(src)],
        str(dst),
        _cfg("ingest.decode_timeout_s=2", "ingest.keep_source_paths=true"),
        progress=False,
    )
    assert clock.monotonic() - started < 120
    assert (s.input, s.ok, s.quarantined) == (4, 2, 2)
    assert s.reasons == {"decoder_crashed": 1, "decode_timeout": 1}
    q = pq.read_table(dst / "quarantine").to_pylist()
    said = {Path(r["source_path"]).name: (r["reason"], r["message"]) for r in q}
    assert said["crash.dcm"][0] == "decoder_crashed" and "SIGSEGV" in said["crash.dcm"][1]
    assert said["stuck.dcm"][0] == "decode_timeout" and "2 s" in said["stuck.dcm"][1]
    _, meta = read_images(dst)
    assert sorted(Path(p).name for p in meta.column("source_path").to_pylist()) == [
        "a.dcm",
        "z.dcm",
    ]
    # known by their ids, as every quarantined file is: a re-run does not wait on them again
    started = clock.monotonic()
    sets = ("ingest.decode_timeout_s=2", "ingest.keep_source_paths=true")
    again = run_ingest([str(src)], str(dst), _cfg(*sets), progress=False)
    assert (again.input, again.already_ingested, again.quarantined) == (4, 4, 0)
    assert clock.monotonic() - started < 60


def test_a_killed_runs_lock_and_temporary_files_are_cleared(ray_session, tmp_path, caplog):
    """A run killed mid-write (kill -9, an evicted pod) left its lock and ``.NAME.tmp`` files in
    DST: the next run takes the lock over with a warning, removes those files, does not ingest
    the lock from a source that holds DST, and leaves no lock behind, failing or not."""
    from pipelines.ingest import IngestError, run_ingest

    src = tmp_path / "src"
    src.mkdir()
    for seed in range(2):
        (src / f"{seed}.dcm").write_bytes(make_dicom(gradient(40, 40, seed=seed), markers=False))
    dst = src / "out"  # inside the source
    (dst / "images").mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "print(__import__('os').getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    lock = dst / ".ingest.lock"
    lock.write_text(
        json.dumps(
            {
                "run_id": "20260101T000000-killed",
                "host": socket.gethostname(),
                "pid": int(dead.stdout),
                "pid_namespace": os.readlink("/proc/self/ns/pid"),
                "started_at": "2026-01-01T00:00:00+00:00",
                "heartbeat": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
    )
    leftovers = [
        dst / "images" / ".part-20260101T000000-killed-00000.parquet.tmp",
        dst / ".manifest.json.tmp",
    ]
    for p in leftovers:
        p.write_bytes(b"PAR1 cut short")
    with caplog.at_level("INFO"):
        s = run_ingest([str(src)], str(dst), _cfg(), progress=False)
    assert (s.input, s.ok, s.quarantined) == (2, 2, 0)  # the lock was not an input
    assert "taking over" in caplog.text and "20260101T000000-killed" in caplog.text
    assert "removed 2 temporary files" in caplog.text
    assert not lock.exists() and not any(p.exists() for p in leftovers)
    assert not list(dst.rglob("*.tmp"))
    with pytest.raises(IngestError, match="already holds images"):  # fails inside the lock
        run_ingest([str(src)], str(dst), _cfg("ingest.image_size=128"), progress=False)
    assert not lock.exists()


def test_a_large_compressed_tar_is_not_decompressed_twice(ray_session, tmp_path, monkeypatch):
    """Counting a .tar.gz's members for the progress bar decompressed it whole on the driver
    before any work (a second full read, a second download from object storage); above the
    size limit it is counted as it streams. The limit is lowered here instead of building a
    256 MiB archive."""
    import radjepa.ingest.sources as sources
    from pipelines.ingest import run_ingest

    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "export.tar.gz", "w:gz") as t:
        for seed in range(3):
            data = make_dicom(gradient(40, 40, seed=seed), markers=False)
            info = tarfile.TarInfo(f"study/{seed}.dcm")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    ref = {"source": str(src), "path": str(src / "export.tar.gz"), "kind": "tar"}
    assert sources.count_members(ref) == 3
    monkeypatch.setattr(sources, "COUNT_LIMIT_BYTES", 1024)
    assert sources.count_members(ref) is None
    s = run_ingest([str(src)], str(tmp_path / "dst"), _cfg(), progress=False)
    assert (s.input, s.ok, s.quarantined) == (3, 3, 0)
    manifest = json.loads((tmp_path / "dst" / "manifest.json").read_text())
    assert manifest["runs"][-1]["expected_inputs"] is None


def test_the_decoder_pool_is_sized_by_the_members_and_never_below_what_was_asked(tmp_path):
    """Four zips without a suffix (a PACS export's ``study1``..) of 40 members each were
    counted as 4 inputs, and the pool was capped at one decoder per 16 counted inputs: 1
    decoder, also where ``ingest.decode_actors=16`` asked for 16. Local archives are counted by
    their members now, and an asked size is the pool's most whatever the count (object-store
    keys without a suffix still count one input each): the count only says how many decoders
    to start with."""
    from pipelines.ingest import _decoder_pool
    from radjepa.ingest.sources import count_inputs, list_inputs

    dcm = make_dicom(gradient(40, 40, seed=1), markers=False)
    for k in range(4):
        with zipfile.ZipFile(tmp_path / f"study{k}", "w") as z:
            for i in range(40):
                z.writestr(f"IM{i}", dcm)
    refs = list_inputs([str(tmp_path)])
    expected = sum(count_inputs(r) for r in refs)
    assert expected == 160
    # automatic (0): one to start, at most one per 16 inputs and one per CPU
    assert _decoder_pool(0, 16, expected, len(refs)) == (1, 10)
    assert _decoder_pool(0, 16, 3, 3) == (1, 1)
    assert _decoder_pool(0, 4, None, 1) == (1, 4)  # uncounted (a large compressed tar)
    # asked: at most as asked, whatever the count says; started as the count and refs need
    assert _decoder_pool(16, 2, 4, 4) == (1, 16)
    assert _decoder_pool(16, 2, expected, len(refs)) == (4, 16)
    assert _decoder_pool(16, 2, expected, 100) == (10, 16)
    assert _decoder_pool(3, 16, None, 5) == (3, 3)
    assert _decoder_pool(3, 16, None, 1) == (1, 3)


def test_missing_source_is_a_clear_error(ray_session, tmp_path) -> None:
    from pipelines.ingest import IngestError, run_ingest

    with pytest.raises(IngestError, match="source not found"):
        run_ingest([str(tmp_path / "nope")], str(tmp_path / "dst"), _cfg(), progress=False)
    assert not (tmp_path / "dst").exists()  # nothing written for a bad request
    (tmp_path / "empty").mkdir()
    s = run_ingest([str(tmp_path / "empty")], str(tmp_path / "dst"), _cfg(), progress=False)
    assert (s.input, s.ok) == (0, 0)
    assert json.loads((tmp_path / "dst" / "manifest.json").read_text())["images"] == 0
    # what reads it next says ingest ran and stored nothing (it said "run ingest first")
    from radjepa.shards import ShardError, list_shards

    with pytest.raises(ShardError, match="`radjepa ingest` ran into .* but stored no image"):
        list_shards(tmp_path / "dst")


def test_non_utf8_names_tar_member_ingested_folder_refused(ray_session, tmp_path) -> None:
    """Latin-1 names (patient names from older systems): a tar member named so failed its
    read task and the whole run with a traceback; a folder file named so crashed the listing."""
    from pipelines.ingest import IngestError, run_ingest

    src = tmp_path / "src"
    src.mkdir()
    data = make_dicom(gradient(40, 40, bits=8), bits=8, markers=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as t:
        member = tarfile.TarInfo("M\u00fcller_Hans/1.dcm")
        member.size = len(data)
        t.addfile(member, io.BytesIO(data))
    (src / "old.tar").write_bytes(buf.getvalue())
    s = run_ingest([str(src)], str(tmp_path / "dst"), _cfg(), progress=False)
    assert (s.input, s.ok, s.quarantined) == (1, 1, 0)

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "ok.dcm").write_bytes(data)
    (folder / "M\udcfcller_Hans.dcm").write_bytes(data)  # the Latin-1 byte 0xfc on disk
    with pytest.raises(IngestError, match="not UTF-8"):
        run_ingest([str(folder)], str(tmp_path / "dst2"), _cfg(), progress=False)
    assert not (tmp_path / "dst2").exists()


def test_cli_ingest_two_hundred_files(ray_session, nih_dir, tmp_path) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    src = tmp_path / "export"
    src.mkdir()
    for p in sorted((nih_dir / "images").glob("*.png"))[:180]:
        shutil.copy(p, src / p.name)
    for i in range(15):
        (src / f"im{i}.dcm").write_bytes(make_dicom(gradient(80, 80, seed=100 + i)))
    for i in range(5):
        (src / f"bad{i}.dcm").write_bytes(b"not a dicom " * (i + 1))
    uid = generate_uid()  # one instance exported twice: the one-line summary says so
    for name, syntax in (("again_a.dcm", ExplicitVRLittleEndian), ("again_b.dcm", RLELossless)):
        px = gradient(80, 80, seed=99)
        (src / name).write_bytes(make_dicom(px, transfer_syntax=syntax, extra=_same_instance(uid)))
    dst = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "ingest",
            str(src),
            str(dst),
            "-c",
            str(REPO / "configs" / "tiny_cpu.yaml"),
            "--set",
            "ingest.decode_actors=2",
            "--set",
            f"ingest.image_size={SIZE}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "196 stored, 5 quarantined, 1 duplicates (1 the DICOM instance of a stored file, in "
        "other bytes)" in result.output
    )
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["images"] == 196 and manifest["quarantine_reasons"] == {"not_an_image": 5}
    assert manifest["last_run"]["input"] == 202


def test_cli_ingest_needs_a_destination() -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    result = CliRunner().invoke(app, ["ingest", "only-one-path"])
    assert result.exit_code != 0


def test_module_entry_point(ray_session, tmp_path, capsys) -> None:
    from pipelines.ingest import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "one.dcm").write_bytes(make_dicom(gradient(40, 50), markers=False))
    rc = main(
        [
            str(src),
            str(tmp_path / "dst"),
            "-c",
            str(REPO / "configs" / "tiny_cpu.yaml"),
            "--set",
            "ingest.decode_actors=1",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["input"], out["ok"]) == (1, 1)


def test_module_entry_point_reports_user_errors_in_one_line(tmp_path, capsys, monkeypatch):
    # the Ray Job entry point: a bad source or config is exit 2 and one line, like the CLI
    from pipelines.ingest import main

    monkeypatch.setenv("RADJEPA_DEID_SECRET", "k" * 32)

    assert main([str(tmp_path / "nope"), str(tmp_path / "dst")]) == 2
    assert capsys.readouterr().err.strip() == f"error: source not found: {tmp_path / 'nope'}"
    assert main([str(tmp_path), str(tmp_path / "dst"), "--set", "ingest.image_size=abc"]) == 2
    assert "ingest.image_size" in capsys.readouterr().err


def test_an_interrupted_run_says_what_it_kept_in_one_line(tmp_path) -> None:
    """Ctrl-C (or a foreground job stopped) ended in a KeyboardInterrupt traceback, exit 1."""
    import signal

    src = tmp_path / "src"
    src.mkdir()
    for seed in range(60):
        (src / f"{seed}.dcm").write_bytes(make_dicom(gradient(256, 256, seed=seed), markers=False))
    proc = foreground_process(
        [sys.executable, "-m", "pipelines.ingest", str(src), str(tmp_path / "dst")]
        + ["-c", str(REPO / "configs" / "tiny_cpu.yaml")],
        env={**os.environ, "RADJEPA_DEID_SECRET": "k" * 32, "RAY_ADDRESS": ""},
        cwd=REPO,
    )
    # interrupted inside run_ingest, once it has said what it reads
    out, text = signal_after_line(proc, "ingest 60 inputs", signal.SIGINT, 120)
    assert proc.returncode == 130, text
    assert "Traceback" not in text and out.strip().count("{") == 0
    assert text.strip().splitlines()[-1].startswith("interrupted: the shards written so far")
    assert not (tmp_path / "dst" / ".ingest.lock").exists()  # released on Ctrl-C too


def _ingest_command(entry: str, src: Path, dst: Path) -> list[str]:
    """``radjepa ingest`` (the console script's module) or the Ray Job entry point."""
    module = ["pipelines.cli", "ingest"] if entry == "cli" else ["pipelines.ingest"]
    return [sys.executable, "-m", *module, str(src), str(dst)] + [
        "-c",
        str(REPO / "configs" / "tiny_cpu.yaml"),
        "--set",
        "ingest.shard_rows=10",
    ]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("entry", ["module", "cli"])
def test_a_stopped_run_ends_as_an_interrupted_one_and_a_rerun_stores_each_image_once(
    tmp_path, monkeypatch, entry
) -> None:
    """SIGTERM (`radjepa jobs stop`, a pod or systemd unit stopping) met ray.init's handler:
    Ray printed a C++ stack dump ("*** SIGTERM received") and the run exited 15 without a word.
    Now it ends as Ctrl-C does, and a second SIGTERM during that shutdown changes nothing."""
    import signal

    monkeypatch.setenv("RADJEPA_DEID_SECRET", "k" * 32)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(parents=True)
    expected = set()
    for seed in range(60):
        data = make_dicom(gradient(256, 256, seed=seed), markers=False)
        (src / f"{seed}.dcm").write_bytes(data)
        expected.add(_image_id(data))
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        _ingest_command(entry, src, dst),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    # once Ray Data runs the decoders (said on stderr by both entry points)
    marker = "Starting execution of Dataset"
    out, text = signal_after_line(proc, marker, signal.SIGTERM, 120, again_after_s=0.5)
    assert proc.returncode == 130, text[-3000:]
    assert "Traceback" not in text and "SIGTERM received" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == INTERRUPTED
    assert "ingested" not in out and out.strip().count("{") == 0
    assert not (dst / ".ingest.lock").exists()
    # the run is on record, with what it kept (it was missing: no manifest at all)
    stopped = json.loads((dst / "manifest.json").read_text())["runs"]
    assert [r["status"] for r in stopped] == ["interrupted"]
    assert stopped[0]["ok"] == sum(pq.read_metadata(dst / s).num_rows for s in stopped[0]["shards"])
    again = subprocess.run(
        _ingest_command(entry, src, dst),
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    ids = read_images(dst)[1].column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == expected  # each image once, none lost
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["images"] == 60
    assert [r["status"] for r in manifest["runs"]] == ["interrupted", "finished"]
    assert manifest["images"] + manifest["duplicates"] == manifest["inputs_seen"]


def _cxr(nih_dir: Path, k: int) -> np.ndarray:
    """The pixels of the k-th NIH PNG, 256 px: a real radiograph for a DICOM's Pixel Data."""
    from PIL import Image

    path = sorted((nih_dir / "images").glob("*.png"))[k]
    return np.asarray(Image.open(path).convert("L").resize((256, 256)))


def test_a_shard_keeps_its_rows_in_image_id_order_not_in_the_order_of_their_paths(
    nih_shards, nih_dir
) -> None:
    """Inputs are read in sorted-path order (which copy of an instance is kept depends on it),
    and a shard stored its rows in that order: exported folders are often named by patient
    name or ID, so the row order told a reader with the patient list who each row was. Rows
    are now in image-id order, a keyed hash the reader cannot compute."""
    paths = sorted((nih_dir / "images").glob("*.png"))[:80]  # what the fixture ingested
    by_path = [_image_id(p.read_bytes()) for p in paths]
    shards = sorted((nih_shards / "images").glob("*.parquet"))
    assert len(shards) == 1
    stored = pq.read_table(shards[0], columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(stored) == sorted(by_path)  # the same images, under the key the tests use
    assert stored == sorted(by_path) != by_path


def _same_instance(uid: str) -> dict[str, str]:
    """``extra`` for make_dicom: one instance (and its study and series), as a re-export has."""
    study, series = (generate_uid(entropy_srcs=[uid, part]) for part in ("study", "series"))
    return {"SOPInstanceUID": uid, "StudyInstanceUID": study, "SeriesInstanceUID": series}


def test_one_dicom_instance_in_two_transfer_syntaxes_is_stored_once(
    ray_session, nih_dir, tmp_path
) -> None:
    """A PACS re-export gives an instance other bytes (JPEG Lossless instead of Explicit VR
    Little Endian), not another SOP Instance UID: told apart by bytes alone, both were stored,
    one image twice in training and possibly on both sides of the hold-out split."""
    from pydicom.uid import ExplicitVRLittleEndian, JPEGLossless, generate_uid

    from pipelines.ingest import run_ingest

    uid = generate_uid()
    px = _cxr(nih_dir, 0)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(parents=True)
    first = make_dicom(px, bits=8, extra=_same_instance(uid))  # sorted first: kept
    again = make_dicom(px, bits=8, transfer_syntax=JPEGLossless, extra=_same_instance(uid))
    (src / "a_explicit.dcm").write_bytes(first)
    (src / "b_jpeg_lossless.dcm").write_bytes(again)
    (src / "c_other.dcm").write_bytes(make_dicom(_cxr(nih_dir, 1), bits=8))
    s = run_ingest([str(src)], str(dst), _cfg(), progress=False)
    assert (s.input, s.ok, s.quarantined, s.duplicates) == (3, 2, 0, 1)
    assert (s.duplicate_instances, s.duplicates_in_run) == (1, 1)
    images = read_images(dst)[1]
    pids = images.column("instance_pid").to_pylist()
    assert len(pids) == len(set(pids)) == 2
    kept = images.select(["image_id", "transfer_syntax"]).to_pylist()
    assert {"image_id": _image_id(first), "transfer_syntax": ExplicitVRLittleEndian} in kept
    dup = pq.read_table(dst / "duplicates").to_pylist()  # recorded, with its path's hash
    assert [(d["image_id"], d["kept_image_id"]) for d in dup] == [
        (_image_id(again), _image_id(first))
    ]
    assert dup[0]["transfer_syntax"] == JPEGLossless and dup[0]["source_hash"]
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["duplicate_instances"] == 1 and manifest["duplicates"] == 1
    assert manifest["images"] + manifest["duplicates"] == manifest["inputs_seen"] == 3
    for name, data in _all_output_text(dst):  # the UID only as its keyed pseudonym
        assert uid.encode() not in data, f"the raw SOP Instance UID leaked into {name}"

    rerun = run_ingest([str(src)], str(dst), _cfg(), progress=False)  # idempotent
    assert (rerun.ok, rerun.already_ingested, rerun.duplicate_instances) == (0, 3, 0)
    assert pq.read_table(dst / "duplicates").num_rows == 1


def test_an_instance_already_stored_by_an_earlier_run_is_not_stored_again(
    ray_session, nih_dir, tmp_path
) -> None:
    """Across runs of an incremental ingest the stored copy is kept, whichever syntax a later
    export of the instance comes in; a file under a stored UID with other pixels is a
    conflict, quarantined with its reason, not dropped and not stored."""
    from pydicom.uid import JPEGLossless, RLELossless, generate_uid

    from pipelines.ingest import run_ingest

    uid, other_uid = generate_uid(), generate_uid()
    px = _cxr(nih_dir, 2)
    first, dst = tmp_path / "export-1", tmp_path / "dst"
    first.mkdir()
    (first / "im.dcm").write_bytes(make_dicom(px, bits=8, extra=_same_instance(uid)))
    one = run_ingest([str(first)], str(dst), _cfg(), progress=False)
    assert one.ok == 1

    second = tmp_path / "export-2"
    second.mkdir()
    resent = make_dicom(px, bits=8, transfer_syntax=JPEGLossless, extra=_same_instance(uid))
    (second / "a_lossless.dcm").write_bytes(resent)
    (second / "b_rle.dcm").write_bytes(
        make_dicom(px, bits=8, transfer_syntax=RLELossless, extra=_same_instance(uid))
    )
    wrong = make_dicom(_cxr(nih_dir, 3), bits=8, extra=_same_instance(uid))  # another image
    (second / "c_other_pixels.dcm").write_bytes(wrong)
    (second / "d_new.dcm").write_bytes(make_dicom(px, bits=8, extra=_same_instance(other_uid)))
    two = run_ingest([str(second)], str(dst), _cfg(), progress=False)
    assert (two.input, two.ok, two.duplicates, two.quarantined) == (4, 1, 2, 1)
    assert (two.duplicate_instances, two.already_ingested) == (2, 2)
    assert two.reasons == {"instance_conflict": 1}
    q = pq.read_table(dst / "quarantine").to_pylist()
    assert [(r["sha256"], r["reason"]) for r in q] == [(_image_id(wrong), "instance_conflict")]
    assert "same SOP Instance UID" in q[0]["message"] and uid not in q[0]["message"]
    assert len(read_images(dst)[1]) == 2
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["quarantine_reasons"] == {"instance_conflict": 1}
    assert manifest["duplicate_instances"] == 2
    assert manifest["images"] + manifest["quarantined"] + manifest["duplicates"] == 5

    three = run_ingest([str(first), str(second)], str(dst), _cfg(), progress=False)
    assert (three.ok, three.quarantined, three.duplicates) == (0, 0, 5)
    assert pq.read_table(dst / "duplicates").num_rows == 2


def test_inputs_dropped_as_the_same_bytes_are_listed_once_with_their_kind(
    ray_session, nih_dir, tmp_path
) -> None:
    """DST/duplicates listed only the inputs dropped as the same DICOM instance in other bytes;
    inputs dropped because their bytes were already held (earlier in the run, or in DST from
    another path) were only counted, so an audit of which files were not stored, and why,
    could not find them. Each is listed once (kind same_bytes, kept_image_id the stored
    image), a re-run of the same inputs adds no row, and a table written before the kind
    column still reads (as same_instance rows, also when it sorts first) beside new ones."""
    import pyarrow as pa
    from pydicom.uid import JPEGLossless, generate_uid

    from pipelines.ingest import run_ingest
    from radjepa.shards import read_duplicates

    png = sorted((nih_dir / "images").glob("*.png"))[0].read_bytes()
    uid = generate_uid()
    px = _cxr(nih_dir, 1)
    dicom = make_dicom(px, bits=8, extra=_same_instance(uid))
    resent = make_dicom(px, bits=8, transfer_syntax=JPEGLossless, extra=_same_instance(uid))
    one, two, dst = tmp_path / "one", tmp_path / "two", tmp_path / "dst"
    one.mkdir()
    two.mkdir()
    for name, data in {
        "a.png": png,
        "b_copy_of_a.png": png,
        "c.dcm": dicom,
        "d_resent_c.dcm": resent,
        "e_copy_of_d.dcm": resent,  # the bytes of a dropped instance: the stored one is c
    }.items():
        (one / name).write_bytes(data)
    (two / "a_again.png").write_bytes(png)
    (two / "d_again.dcm").write_bytes(resent)
    # a table from before the kind column: no kind, instance_pid not null; sorted first
    old_schema = pa.schema(
        [
            pa.field(f.name, f.type, nullable=f.name != "kind" and f.nullable)
            if f.name != "instance_pid"
            else pa.field("instance_pid", pa.string(), nullable=False)
            for f in DUPLICATE_SCHEMA
            if f.name != "kind"
        ]
    )
    old_row = {n: "0" * 64 for n in old_schema.names} | {"size_bytes": 1, "run_id": "old"}
    ids = {name: _image_id(data) for name, data in (("a", png), ("c", dicom), ("d", resent))}

    def listed() -> list[tuple[str, str, str]]:
        rows = read_duplicates(dst).to_pylist()
        return [(r["kind"], r["image_id"], r["kept_image_id"]) for r in rows]

    first = run_ingest([str(one)], str(dst), _cfg(), progress=False)
    assert (first.input, first.ok, first.duplicates, first.duplicate_instances) == (5, 2, 3, 1)
    pq.write_table(  # sorted before the run's own file
        pa.Table.from_pylist([old_row], schema=old_schema),
        dst / "duplicates" / "duplicates-20000101T000000-000000.parquet",
    )
    # the old table, read with its kind, then the run's rows (in path-hash order)
    assert listed()[0] == ("same_instance", "0" * 64, "0" * 64)
    assert sorted(listed()[1:]) == sorted(
        [
            ("same_bytes", ids["a"], ids["a"]),
            ("same_bytes", ids["d"], ids["c"]),
            ("same_instance", ids["d"], ids["c"]),
        ]
    )
    rows = read_duplicates(dst).to_pylist()[1:]
    assert all((r["instance_pid"] is None) == (r["kind"] == "same_bytes") for r in rows)
    assert len({r["source_hash"] for r in rows}) == 3  # each its own input's path

    second = run_ingest([str(one), str(two)], str(dst), _cfg(), progress=False)
    assert (second.input, second.ok, second.duplicates) == (7, 0, 7)
    assert sorted(listed()[4:]) == sorted(
        [("same_bytes", ids["a"], ids["a"]), ("same_bytes", ids["d"], ids["c"])]
    )

    third = run_ingest([str(one), str(two)], str(dst), _cfg(), progress=False)  # idempotent
    assert (third.input, third.duplicates, third.already_ingested) == (7, 7, 7)
    assert len(listed()) == 6
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["images"] + manifest["duplicates"] == manifest["inputs_seen"] == 19
    assert manifest["duplicate_instances"] == 1


@pytest.mark.timeout(180)
def test_a_run_stopped_after_writing_shards_records_them_in_the_manifest(tmp_path) -> None:
    """The manifest's runs list is the record of what happened to DST: a run stopped by
    SIGTERM after it wrote shards was missing from it (the shards stayed, unaccounted for).
    It is recorded with status interrupted and exactly what it kept, as finished runs are;
    what it had decoded but not yet written is written first. One decoder and 240 inputs:
    with 60 and two decoders, a loaded CI box decoded them all before the SIGTERM landed."""
    import signal

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(parents=True)
    for seed in range(240):
        (src / f"{seed:02d}.dcm").write_bytes(
            make_dicom(gradient(256, 256, seed=seed), markers=False)
        )
    (src / "junk.txt").write_bytes(b"not an image\n" * 9)  # sorted last
    proc = subprocess.Popen(
        [*_ingest_command("module", src, dst), "--set", "ingest.decode_actors=1"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RADJEPA_DEID_SECRET": "k" * 32, "RAY_ADDRESS": ""},
    )
    out, text = signal_after_line(proc, "wrote images/part-", signal.SIGTERM, 120)
    assert proc.returncode == 130, text[-3000:]
    assert text.strip().splitlines()[-1] == INTERRUPTED
    manifest = json.loads((dst / "manifest.json").read_text())
    (run,) = manifest["runs"]
    assert manifest["last_run"] == run and run["status"] == "interrupted"
    stored = read_images(dst)[1]
    assert run["shards"] and sorted(run["shards"]) == sorted(
        f"images/{p.name}" for p in (dst / "images").glob("*.parquet")
    )
    assert run["ok"] == stored.num_rows == manifest["images"] >= 10
    assert run["input"] == run["ok"] + run["quarantined"] + run["duplicates"]
    assert manifest["inputs_seen"] == run["input"] < 241
    assert set(run) >= {"started_at", "seconds", "expected_inputs", "sources", "reasons"}


def test_a_version_1_manifest_is_read_and_its_runs_say_finished(ray_session, tmp_path) -> None:
    """Manifest version 1 recorded only finished runs, without a status: the next run keeps
    them, now saying finished, as every run record does."""
    from pipelines.ingest import run_ingest

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(parents=True)
    (src / "one.dcm").write_bytes(make_dicom(gradient(40, 50, seed=3), markers=False))
    run_ingest([str(src)], str(dst), _cfg(), progress=False)
    path = dst / "manifest.json"
    old = json.loads(path.read_text())
    old["manifest_version"] = 1
    for run in (*old["runs"], old["last_run"]):
        run.pop("status", None)
        run.pop("duplicate_instances", None)
    old.pop("duplicate_instances", None)
    path.write_text(json.dumps(old))
    run_ingest([str(src)], str(dst), _cfg(), progress=False)
    manifest = json.loads(path.read_text())
    assert manifest["manifest_version"] == 2
    assert [r["status"] for r in manifest["runs"]] == ["finished", "finished"]
    assert (manifest["duplicates"], manifest["duplicate_instances"]) == (1, 0)


def test_a_ctrl_c_inside_a_batch_leaves_no_image_known_but_unstored(tmp_path) -> None:
    """Re-runs skip unread every image id a duplicates row names. A Ctrl-C landing in a batch
    (here while a stored instance's shard is read back, where the driver spends its time)
    after a same-bytes copy of an image kept in that batch, but before the batch was stored,
    left a row for that image: never stored, every re-run skipped it for good."""
    import signal

    import pyarrow as pa
    from shard_tables import write_shard

    from pipelines.ingest import IngestSummary, _Outputs, _take_batch
    from radjepa.ingest.decoding import RESULT_SCHEMA
    from radjepa.ingest.destination import Destination
    from radjepa.ingest.instances import InstanceIndex
    from radjepa.shards import pixels_to_bytes

    px = gradient(32, 32, bits=8, seed=1).astype(np.uint8)
    pid = "ab" * 16
    dst = tmp_path / "dst"
    write_shard(dst, px[None], image_id=["c" * 64], instance_pid=[pid])  # an earlier run's
    dest = Destination(str(dst))

    def read_back_interrupted(path: str, columns: list[str]) -> pa.Table:
        table = dest.read_columns(path, columns)
        if "pixels" in columns:  # reading the stored copy back: the user presses Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        return table

    x = "d" * 64

    def row(image_id: str, path: str, instance_pid: str | None = None) -> dict:
        return {
            **{f.name: None for f in RESULT_SCHEMA},
            "image_id": image_id,
            "status": "ok",
            "instance_pid": instance_pid,
            "source_hash": hashlib.md5(path.encode()).hexdigest(),
            "size_bytes": 10,
            "pixels": pixels_to_bytes(px),
            "height": 32,
            "width": 32,
            "dtype": "uint8",
        }

    # x kept, x again from another path (same bytes), then a copy of the stored instance
    batch = pa.Table.from_pylist(
        [row(x, "a.png"), row(x, "b.png"), row("e" * 64, "c.dcm", pid)], schema=RESULT_SCHEMA
    )
    index = InstanceIndex(dest.shards(), read_back_interrupted)
    out = _Outputs(dest, IngestSummary(dst=str(dst), run_id="r1"), 100, "r1", index)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # pytest's may ignore
    try:
        with pytest.raises(KeyboardInterrupt):
            _take_batch(batch, out, set(), set())
    finally:
        signal.signal(signal.SIGINT, previous)
    out.finish(interrupted=True)
    stored = set(read_images(dst)[1].column("image_id").to_pylist())
    assert x not in dest.known_ids() or x in stored  # a re-run reads x again and stores it
    s = out.summary
    assert s.input == s.ok + s.quarantined + s.duplicates


def test_an_ingest_says_no_deprecation_its_user_cannot_act_on(ray_session, tmp_path):
    """The decoders' retry bounds have no named parameter in Ray 2.60, and every ingest
    printed Ray Data's "`ray_remote_args` is deprecated" for them."""
    import warnings

    from pipelines.ingest import run_ingest

    src = tmp_path / "src"
    src.mkdir()
    (src / "one.dcm").write_bytes(make_dicom(gradient(40, 40, seed=2)))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        summary = run_ingest([str(src)], str(tmp_path / "dst"), _cfg(), progress=False)
    assert summary.ok == 1
    assert not [w for w in said if "ray_remote_args" in str(w.message)]


def test_dst_outputs_are_told_through_links_as_they_point_at_each_run(tmp_path):
    """Paths are resolved once per run, not once per process: a driver that ran an ingest
    through a link to DST took a later source named by the same link, now pointing
    elsewhere, for DST's outputs and skipped its files."""
    from pipelines.ingest import _outputs_filter

    dst, other = tmp_path / "dst", tmp_path / "other"
    (dst / "images").mkdir(parents=True)
    (other / "images").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(dst)
    listed = str(link / "images" / "part-0.parquet")
    assert _outputs_filter(str(dst), str(dst))(listed)
    link.unlink()
    link.symlink_to(other)
    assert not _outputs_filter(str(dst), str(dst))(listed)
    assert not _outputs_filter(str(dst), str(dst))(str(dst / "raw" / "a.dcm"))


def _ingest_in_process(sources: list[Path], dst: Path, run: int, max_bytes: int = 10**7):
    """One run's driver steps on decoder output made in this process: list, read, decode
    (:class:`FileDecoder`), sort each batch (``_take_batch``) and write, as ``run_ingest`` does
    with its decoders in Ray (seconds, where a Ray run takes a minute here). Returns the run's
    summary and DST's totals after it."""
    import pyarrow as pa

    from pipelines.ingest import IngestSummary, _Outputs, _take_batch
    from radjepa.ingest.decoding import FileDecoder
    from radjepa.ingest.destination import Destination
    from radjepa.ingest.instances import InstanceIndex
    from radjepa.ingest.sources import list_inputs, read_blocks

    dest = Destination(str(dst))
    run_id = f"20270101T0000{run:02d}-000000"  # run ids sort by start, as real ones do
    settings = {"size": 64, "dtype": "uint8", "window_percentiles": (0.5, 99.5)}
    decoder = FileDecoder({**settings, "max_bytes": max_bytes}, b"k" * 32, dest.known_ids(), False)
    summary = IngestSummary(dst=str(dst), run_id=run_id)
    out = _Outputs(dest, summary, 100, run_id, InstanceIndex(dest.shards(), dest.read_columns))
    refs = pa.Table.from_pylist(list_inputs([str(s) for s in sources]))
    seen: set[str] = set()
    unread = dest.unread_quarantined()
    for block in read_blocks(refs, max_bytes):
        _take_batch(decoder(block), out, seen, unread)
    out.finish(interrupted=False)
    assert summary.input == summary.ok + summary.quarantined + summary.duplicates
    return summary, dest.totals()


def test_identical_broken_files_under_other_paths_are_each_quarantined(tmp_path) -> None:
    """Zero-byte files (transfers that failed) under several paths were one quarantined input
    and duplicates of it: a run that met two more said "0 quarantined, 2 duplicates", and DST
    counted one broken file of five. Each is quarantined with the first one's reason, in a row
    of its own, within a run and across runs; a copy of a stored file is still a duplicate,
    and a re-run of the same files adds nothing."""
    import pyarrow.parquet as pq

    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "a").mkdir(parents=True)
    good = make_dicom(gradient(40, 40, seed=1), markers=False)
    for i in range(3):
        (src / "a" / f"IM{i}.dcm").write_bytes(b"")
    (src / "a" / "good.dcm").write_bytes(good)
    (src / "a" / "good_again.dcm").write_bytes(good)
    one, _ = _ingest_in_process([src], dst, run=1)
    assert (one.input, one.ok, one.quarantined, one.duplicates) == (5, 1, 3, 1)
    (src / "b").mkdir()
    for i in range(2):
        (src / "b" / f"IM{i}.dcm").write_bytes(b"")
    two, totals = _ingest_in_process([src], dst, run=2)
    assert (two.input, two.ok, two.quarantined, two.duplicates) == (7, 0, 2, 5)
    assert two.already_ingested == 5 and two.reasons == {"empty": 2}
    assert (totals.quarantined, totals.reasons) == (5, {"empty": 5})
    rows = pq.read_table(dst / "quarantine").to_pylist()
    assert len({r["source_hash"] for r in rows}) == 5
    assert {(r["reason"], r["message"]) for r in rows} == {("empty", rows[0]["message"])}
    three, totals = _ingest_in_process([src], dst, run=3)
    assert (three.input, three.quarantined, three.duplicates) == (7, 0, 7)
    assert totals.quarantined == 5


def test_lowering_the_size_limit_leaves_files_already_stored_stored(tmp_path) -> None:
    """A re-run with a lower ``ingest.max_file_mb`` quarantined the files DST had stored as
    ``too_large``, and DST counted as missing files it held. A path DST stored from is taken
    as already ingested; a new file over the limit is still quarantined."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    stored = make_dicom(gradient(256, 256, seed=1), markers=False)
    (src / "a.dcm").write_bytes(stored)
    one, _ = _ingest_in_process([src], dst, run=1)
    assert one.ok == 1
    (src / "b.dcm").write_bytes(make_dicom(gradient(256, 256, seed=2), markers=False))
    two, totals = _ingest_in_process([src], dst, run=2, max_bytes=len(stored) // 2)
    assert (two.input, two.ok, two.quarantined, two.duplicates) == (2, 0, 1, 1)
    assert two.already_ingested == 1
    assert (totals.images, totals.reasons) == (1, {"too_large": 1})  # b.dcm only

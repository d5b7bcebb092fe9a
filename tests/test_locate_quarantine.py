"""Finding the files behind DST's quarantine and duplicate rows, which name a file only by its
keyed path hash."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest
from dicom_factory import make_dicom

from radjepa.config import load_config
from radjepa.imaging.deid import resolve_secret
from radjepa.ingest.errors import IngestError
from radjepa.ingest.locate import locate_rows

pytestmark = [pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]


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


def test_each_quarantined_row_is_found_under_the_sources_with_the_key(ingested):
    src, dst, expected = ingested
    located = locate_rows(str(dst), [str(src)], _secret())
    quarantined = {r.path: r.reason for r in located.rows}
    assert quarantined == expected
    assert located.found == 2 and located.names_hashed >= 5
    assert all(r.table == "quarantine" and r.message and r.run_id for r in located.rows)


def test_duplicate_rows_are_found_on_request(ingested):
    src, dst, _ = ingested
    located = locate_rows(str(dst), [str(src)], _secret(), duplicates=True)
    dup = [r for r in located.rows if r.table == "duplicates"]
    assert len(dup) == 1 and dup[0].reason == "same_bytes"
    # which of the two equal files was kept follows the sorted paths: ok-copy sorts first
    assert dup[0].path == str(src / "ok.dcm")


def test_a_row_whose_file_is_not_under_the_sources_has_no_path(ingested, tmp_path):
    src, dst, _ = ingested
    located = locate_rows(str(dst), [str(src / "DOE^JANE")], _secret())
    assert {r.reason: r.path for r in located.rows} == {
        "truncated": str(src / "DOE^JANE" / "IM0001.dcm"),
        "not_an_image": None,
    }


def test_another_key_is_refused_rather_than_finding_nothing(ingested):
    src, dst, _ = ingested
    with pytest.raises(IngestError, match="key differs from the one"):
        locate_rows(str(dst), [str(src)], b"another key, long enough to be a real one........")


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

"""`radjepa submit` never uploads patient files, nor runs a command that prints their paths into
a job's log: a job's working dir is unpacked on every node that runs it, readable by everyone
there, and its log is kept on the head for every dashboard user."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_factory import make_dicom

from pipelines import jobs


def _submit(wd: Path, *args: str) -> jobs.Submission:
    return jobs.build_submission(list(args or ("version",)), working_dir=wd, environ={})


def test_patient_files_the_default_excludes_miss_are_refused(tmp_path):
    # DICOM media name their files IM000001 (no suffix) or .DCM, archives come as .tgz: the
    # excludes match *.dcm and *.tar.gz case by case, and these were zipped into the job
    dicom = make_dicom(np.zeros((8, 8), np.uint16))
    (tmp_path / "exports" / "DOE_JOHN_12345").mkdir(parents=True)
    (tmp_path / "exports" / "DOE_JOHN_12345" / "IM000001").write_bytes(dicom)
    (tmp_path / "exports" / "DOE_JOHN_12345" / "IM000002.DCM").write_bytes(dicom)
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "SMITH.tgz").write_bytes(b"\x1f\x8b" + bytes(64))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "data" / "sample").mkdir(parents=True)  # the repo's bundled sample: uploaded
    (tmp_path / "data" / "sample" / "x.dcm").write_bytes(dicom)
    (tmp_path / "copy.dcm").write_bytes(dicom)  # a default exclude already leaves it out
    with pytest.raises(jobs.JobsError, match=r"not submitted: 3 file\(s\) in .* look like medical"):
        _submit(tmp_path)
    (tmp_path / ".rayignore").write_text("exports\nscratch\n")  # the way the message names
    assert _submit(tmp_path).entrypoint.endswith("pipelines.cli version")


@pytest.mark.parametrize(
    ("args", "refused"),
    [
        (["quarantine", "s3://b/shards", "s3://b/raw"], True),
        (["quarantine", "-c", "c.yaml", "s3://b/shards", "--set", "x.y=1", "s3://b/raw"], True),
        (["quarantine", "s3://b/shards"], False),
        (["quarantine", "-c", "c.yaml", "--duplicates", "s3://b/shards", "-s", "x.y=1"], False),
    ],
)
def test_quarantine_with_sources_is_not_run_as_a_job(args, refused):
    # given the sources it prints each row's path: patient-named folders in the job's log
    if refused:
        with pytest.raises(jobs.JobsError, match="prints the paths it finds"):
            jobs.build_entrypoint(args)
    else:
        assert jobs.build_entrypoint(args).startswith("python -m pipelines.cli quarantine")


def test_the_walk_stops_once_enough_files_are_found(tmp_path, monkeypatch, caplog):
    # a link into a mounted archive would have every header of it read before the refusal; and
    # the walk's end was logged by Ray as "ERROR Issue with path: <a patient file>"
    import logging
    import logging.config

    from pipelines import upload_check

    (tmp_path / "export").mkdir()
    for i in range(30):
        (tmp_path / "export" / f"IM{i:06d}.DCM").write_bytes(b"")
    judged: list[Path] = []
    looks = upload_check.looks_like_patient_data
    monkeypatch.setattr(
        upload_check, "looks_like_patient_data", lambda p: judged.append(p) or looks(p)
    )
    # as Ray and MLflow configure logging in a process: every existing logger enabled again
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
    with caplog.at_level(logging.DEBUG):
        assert len(upload_check.patient_files(tmp_path, [], most=5)) == 5
    assert len(judged) == 5
    assert "Issue with path" not in caplog.text and "IM0000" not in caplog.text
    with pytest.raises(jobs.JobsError, match=r"not submitted: 20 or more file\(s\)"):
        _submit(tmp_path)

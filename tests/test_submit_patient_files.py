"""`radjepa submit` never uploads patient files, nor runs a command that prints their paths into
a job's log: a job's working dir is unpacked on every node that runs it, readable by everyone
there, and its log is kept on the head for every dashboard user."""

from __future__ import annotations

import os
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
        assert len(upload_check.scan_upload(tmp_path, [], most=5).patient) == 5
    assert len(judged) == 5
    assert "Issue with path" not in caplog.text and "IM0000" not in caplog.text
    with pytest.raises(jobs.JobsError, match=r"not submitted: 20 or more file\(s\)"):
        _submit(tmp_path)


REPO = Path(__file__).resolve().parents[1]
# what a home folder holds: keys, cloud and cluster logins, tokens, histories
HOME_SECRETS = [
    ".ssh/id_ed25519", ".ssh/config", ".aws/credentials", ".kube/config", ".ray/auth_token",
    ".docker/config.json", ".gnupg/private-keys-v1.d/k.key", ".config/gcloud/credentials.db",
    ".config/gh/hosts.yml", ".cache/huggingface/token", ".git-credentials", ".netrc", ".pgpass",
    ".pypirc", ".bash_history", ".zsh_history", ".python_history", "keys/id_rsa",
    "keys/id_ecdsa.pub", "backup/client_secret_123.json", "old/aws-credentials.csv",
    # a later pattern wins: the sample's re-inclusion took these along
    "data/sample/.ssh/id_ed25519", "data/sample/.env",
]  # fmt: skip


def _zipped(wd: Path, sub: jobs.Submission, out: Path) -> set[str]:
    """The files Ray's own runtime-env zip step packs for ``sub``."""
    import zipfile

    from ray._private.runtime_env.packaging import _zip_files

    _zip_files(str(wd), sub.runtime_env["excludes"], str(out), include_gitignore=True)
    return {n for n in zipfile.ZipFile(out).namelist() if not n.endswith("/")}


def _checkout(root: Path) -> Path:
    (root / "pipelines").mkdir(parents=True)
    (root / "pipelines" / "cli.py").write_text("")
    return root


def test_a_folder_that_is_no_checkout_is_uploaded_only_when_named(tmp_path, monkeypatch):
    # `radjepa submit` from $HOME with radjepa pip-installed warned, then uploaded all of it
    # (--working-dir defaulted to "."), unpacked readable by everyone on every node
    import subprocess

    from ray._private.runtime_env.packaging import _get_excludes
    from typer.testing import CliRunner

    from pipelines.cli import UserError, app

    home = tmp_path / "home"
    (home / "project").mkdir(parents=True)
    (home / "project" / "notes.txt").write_text("mine\n")
    for name in HOME_SECRETS:
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text("s3cr3t\n")
    # named, a folder is the user's choice: uploaded without the credentials a home holds
    sub = jobs.build_submission(["version"], working_dir=home, environ={})
    names = _zipped(home, sub, tmp_path / "pkg.zip")
    assert names == {"project/notes.txt"}, names
    # the current folder, by default: refused
    monkeypatch.chdir(home)
    with pytest.raises(jobs.JobsError, match=r"is not a radjepa checkout, and all of it would"):
        jobs.build_submission(["version"], environ={})
    # the command's default is "not given", not "."
    res = CliRunner().invoke(app, ["submit", "--address", "http://127.0.0.1:1", "--", "version"])
    assert isinstance(res.exception, UserError), res.output
    assert "is not a radjepa checkout" in str(res.exception)
    assert "code installed in the cluster image" in str(res.exception)

    # gitignore-style patterns match at any depth: none may take a file of the repo
    tracked = subprocess.run(
        ["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "pipelines/cli.py" in tracked
    excluded = _get_excludes(REPO, list(jobs.DEFAULT_EXCLUDES))
    assert [f for f in tracked if excluded(REPO / f)] == []


@pytest.mark.parametrize(
    ("name", "content"),
    [
        # a data set without preamble (ACR-NEMA, a bare implicit-VR export): ingest reads it
        ("IM000002", make_dicom(np.zeros((8, 8), np.uint16), raw=True)),
        ("study.tar.zst", b"not read"),
        ("SMITH_2024.TZST", b"not read"),
        ("study.rar", b"not read"),
        ("export-1", b"\x28\xb5\x2f\xfd" + bytes(60)),  # zstd
        ("export-2", b"Rar!\x1a\x07\x01\x00" + bytes(60)),  # RAR 5
        ("export-3", b"Rar!\x1a\x07\x00" + bytes(60)),  # RAR 4
    ],
    ids=["raw-dicom", "tar.zst", "TZST", "rar", "zstd-magic", "rar5-magic", "rar4-magic"],
)
def test_raw_dicoms_and_zstd_and_rar_archives_are_refused(tmp_path, name, content):
    from pipelines import upload_check

    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / name).write_bytes(content)
    assert upload_check.looks_like_patient_data(tmp_path / "exports" / name)
    with pytest.raises(jobs.JobsError, match=rf"1 file\(s\) .* e\.g\. exports/{name}"):
        _submit(tmp_path)


def test_the_checkout_itself_holds_nothing_that_looks_like_patient_data():
    # the content test on every file the repo would upload: only the bundled sample matches
    from pipelines import upload_check

    scan = upload_check.scan_upload(REPO, jobs.DEFAULT_EXCLUDES, most=10_000)
    assert scan.complete and scan.patient
    assert [p for p in scan.patient if not p.is_relative_to("data/sample")] == []
    jobs._refuse_patient_files(REPO, jobs.DEFAULT_EXCLUDES)  # the sample's files pass


def test_py_modules_with_patient_files_are_refused(tmp_path):
    # a local py_modules folder (or wheel) is zipped and unpacked on the nodes like the
    # working dir, and was not checked
    import zipfile

    wd = _checkout(tmp_path / "checkout")
    module = tmp_path / "site_utils"
    module.mkdir()
    (module / "__init__.py").write_text("")
    (module / "IM000009").write_bytes(make_dicom(np.zeros((8, 8), np.uint16)))
    env_file = wd / "cluster" / "runtime_env.yaml"
    env_file.parent.mkdir()
    env_file.write_text(f"py_modules: ['{module}', 's3://bucket/mod.zip']\n")
    with pytest.raises(jobs.JobsError, match=r"py_modules entry .*site_utils .* e\.g\. IM000009"):
        _submit(wd)
    (module / ".rayignore").write_text("IM*\n")  # the way the message names
    assert _submit(wd).runtime_env["py_modules"][0] == str(module)

    wheel = tmp_path / "site_utils-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("site_utils/__init__.py", "")
        zf.writestr("site_utils/fixtures/IM000001", make_dicom(np.zeros((8, 8), np.uint16)))
    env_file.write_text(f"py_modules: ['{wheel}']\n")
    with pytest.raises(jobs.JobsError, match=r"e\.g\. site_utils/fixtures/IM000001: .*wheel"):
        _submit(wd)


def test_a_local_config_the_upload_leaves_out_is_refused(tmp_path):
    # it passed the check here, then failed on the cluster ("config file not found") after the
    # upload and the driver's start: the README's own `pretrain -c runs/my-sweep/best.yaml`
    wd = _checkout(tmp_path / "checkout")
    config = "train:\n  steps: 3\n"
    for name in ("runs/my-sweep/best.yaml", "configs/ok.yaml", "scratch/mine.yaml"):
        (wd / name).parent.mkdir(parents=True, exist_ok=True)
        (wd / name).write_text(config)
    (wd / ".gitignore").write_text("scratch/\n")
    (wd / "configs" / "child.yaml").write_text("extends: ../runs/my-sweep/best.yaml\n")
    (wd / "configs" / "abs.yaml").write_text(f"extends: {wd / 'configs' / 'ok.yaml'}\n")
    (tmp_path / "laptop.yaml").write_text(config)

    def refusal(path: str) -> str:
        with pytest.raises(jobs.JobsError) as err:
            _submit(wd, "pretrain", "-c", path, "--data", "s3://b/shards")
        assert str(err.value).startswith("not submitted: the job's config ")
        assert "\n" not in str(err.value)
        return str(err.value)

    message = refusal("runs/my-sweep/best.yaml")
    assert "config runs/my-sweep/best.yaml is left out of the upload (runs/ is never" in message
    assert "left out of the upload" in refusal("scratch/mine.yaml")
    assert "an absolute path to a file here" in refusal(str(tmp_path / "laptop.yaml"))
    assert "outside the working dir" in refusal("../laptop.yaml")
    assert "Put it in the bucket and give its URI" in refusal("runs/my-sweep/best.yaml")
    assert refusal(str(wd / "configs" / "ok.yaml")).endswith("give it as configs/ok.yaml")
    message = refusal("configs/child.yaml")
    assert "../runs/my-sweep/best.yaml (extends: in configs/child.yaml) is left out" in message
    assert refusal("configs/abs.yaml").endswith("give it as ok.yaml")
    # in the upload, or not here (a path on the cluster's nodes, a bucket): submitted
    for path in ("configs/ok.yaml", "/cluster-only/x.yaml", "s3://b/best.yaml"):
        _submit(wd, "pretrain", "-c", path, "--data", "s3://b/shards")
    _submit(wd, "pretrain", "--config=configs/ok.yaml", "--data", "s3://b/shards")


def test_only_the_sample_files_the_manifest_lists_pass(tmp_path):
    # anything under data/sample/ was exempt: a user's export dropped in data/sample/mine/ was
    # uploaded with the sample. Then only what git tracked passed, which refused every submit
    # where git does not answer (the cluster image's checkout, a repo archive, another user's
    # clone) and where a mode change (a Windows copy) counted as a change
    import hashlib

    dicom = make_dicom(np.zeros((8, 8), np.uint16))
    wd = _checkout(tmp_path / "checkout")
    sample = wd / "data" / "sample"
    sample.mkdir(parents=True)
    (sample / "x.dcm").write_bytes(dicom)
    with pytest.raises(jobs.JobsError, match=r"e\.g\. data/sample/x\.dcm: .*SHA256SUMS lists"):
        _submit(wd)  # no manifest: the sample is checked like any other file
    (sample / "SHA256SUMS").write_text(f"{hashlib.sha256(dicom).hexdigest()}  x.dcm\n")
    (sample / "x.dcm").chmod(0o755)  # a mode is no content
    assert _submit(wd).entrypoint.endswith("pipelines.cli version")

    (sample / "mine").mkdir()
    (sample / "mine" / "IM000003").write_bytes(dicom)
    with pytest.raises(jobs.JobsError, match=r"1 file\(s\) .* e\.g\. data/sample/mine/IM000003"):
        _submit(wd)
    (sample / "mine" / "IM000003").unlink()
    (sample / "x.dcm").write_bytes(dicom + b"changed")  # no longer the sample
    with pytest.raises(jobs.JobsError, match=r"e\.g\. data/sample/x\.dcm: .* Of data/sample, only"):
        _submit(wd)


def test_the_sample_manifest_lists_every_sample_file_git_tracks_as_it_is():
    # the exemption above reads it: a sample file added or changed without it is refused
    import hashlib
    import subprocess

    from pipelines.upload_check import BUNDLED_DATA, SAMPLE_MANIFEST

    repo = Path(__file__).resolve().parents[1]
    folder = repo / BUNDLED_DATA
    try:
        tracked = subprocess.run(
            ["git", "-C", str(folder), "ls-files", "-z", "."],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    names = sorted(os.fsdecode(n) for n in tracked.split(b"\0") if n)
    expected = [
        f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}"
        for n in names
        if n != SAMPLE_MANIFEST
    ]
    listed = (folder / SAMPLE_MANIFEST).read_text(encoding="utf-8").splitlines()
    assert listed == expected, (
        f"regenerate it: cd {BUNDLED_DATA} && git ls-files . | grep -v '^{SAMPLE_MANIFEST}$' | "
        f"sort | xargs -d '\\n' sha256sum > {SAMPLE_MANIFEST}"
    )


def test_a_config_linked_into_the_checkout_is_carried(tmp_path):
    # Ray zips a link as the file it points at; the check took it for a file outside the
    # working dir ("config file not found" on the cluster) and refused it
    wd = _checkout(tmp_path / "checkout")
    shared = tmp_path / "shared" / "plain.yaml"
    shared.parent.mkdir()
    shared.write_text("train:\n  steps: 3\n")
    (wd / "configs").mkdir()
    (wd / "configs" / "site.yaml").symlink_to(shared)
    _submit(wd, "pretrain", "-c", "configs/site.yaml", "--data", "s3://b/shards")


def test_a_value_that_only_starts_like_a_glued_option_is_no_override(tmp_path):
    # `--reason "-see INC-42"` was read as a glued --set: "override 'ee INC-42' must look like
    # section.key=value", and the submission refused
    wd = _checkout(tmp_path / "checkout")
    _submit(wd, "models", "promote", "enc", "3", "--reason", "-see INC-42")
    assert jobs._option_values(["x", "-strain.lr=1", "-cconfigs/a.yaml"], ("-s", "--set")) == [
        "train.lr=1"
    ]

"""API keys over real HTTP: scopes (patient linkage), the keys file's permissions, and key
rotation by changing the file (real files, chmod, atomic swaps, a Kubernetes-style ``..data``
symlink), against ``create_app`` under a real uvicorn on a loopback port."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_helpers import (
    API_KEY,
    OTHER_KEY,
    REPO,
    TINY_CONFIG,
    make_checkpoint,
    nih_pngs,
    on_loopback,
    pseudonym,
    write_index,
)

from serve.app import create_app
from serve.embedder import EncoderRunner, LocalEmbedder
from serve.index import EmbeddingIndex
from serve.security import ApiSettings, SecurityConfigError, key_digest, settings_from_config

LINKAGE_KEY = "linkage-key-0123456789abcdef"
NEW_KEY = "rotated-key-0123456789abcdef"


@contextlib.contextmanager
def _on_loopback(app):
    """``app`` under a real uvicorn on a free loopback port; yields its URL."""
    with on_loopback(app) as (host, port):
        yield f"http://{host}:{port}"


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def _swap(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace ``path`` atomically (a new inode), as an editor or a config tool does."""
    tmp = _write(path.with_name(path.name + ".new"), text, mode)
    os.replace(tmp, path)


def _settings(keys_file: Path, monkeypatch, **kw) -> ApiSettings:
    from radjepa.config import ServeConfig

    monkeypatch.delenv("RADJEPA_API_KEYS", raising=False)
    settings = settings_from_config(
        ServeConfig(api_keys_file=str(keys_file)), secret_env="X", allow_development_key=True
    )
    return settings.model_copy(update={"keys_recheck_s": 0.0, **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory, nih_dir):
    root = tmp_path_factory.mktemp("serve_keys")
    runner = EncoderRunner.from_checkpoint(make_checkpoint(root / "ckpt"))
    return {"root": root, "runner": runner, "embedder": LocalEmbedder(runner)}


def _linkage_index(world, tmp_path, nih_dir, archived_dicom: bytes) -> tuple[EmbeddingIndex, dict]:
    """Six rows: an archived PNG (patient A), two images of the DICOM factory's PatientID, an
    archived DICOM (patient C) and two more patients."""
    from radjepa.imaging.decode import resolve_secret
    from radjepa.imaging.deid import pseudonym as keyed_pseudonym
    from tests.dicom_factory import MARKERS

    png = nih_pngs(nih_dir, 1)[0].read_bytes()
    secret = resolve_secret("X", allow_development_key=True)  # the server's key, as the app
    guessed = keyed_pseudonym(secret, "patient", MARKERS["PatientID"])
    ids = [hashlib.sha256(png).hexdigest(), "b" * 64, "c" * 64]
    ids += [hashlib.sha256(archived_dicom).hexdigest(), "e" * 64, "f" * 64]
    archived_patient = keyed_pseudonym(secret, "patient", "PATIENT-C")  # as ingest made it
    patients = [pseudonym("A"), guessed, guessed, archived_patient, pseudonym("D"), pseudonym("E")]
    emb = np.random.default_rng(0).standard_normal((6, world["runner"].info.embed_dim))
    path = write_index(tmp_path / "index.parquet", emb.astype(np.float32), ids, None, patients)
    return EmbeddingIndex.from_parquet(path), {"png": png}


def _similar(client: httpx.Client, key: str | None, data: bytes, media: str, **params):
    headers = {"content-type": media} | ({"Authorization": f"Bearer {key}"} if key else {})
    return client.post("/v1/similar", content=data, headers=headers, params={"k": 6, **params})


def test_patientid_exclusion_needs_the_patient_linkage_scope(world, tmp_path, nih_dir, monkeypatch):
    """A key holder uploaded a DICOM carrying a guessed PatientID with exclude_same_patient=true
    and read `excluded_patient: 2`: that patient is in the archive (reproduced over HTTP on the
    old code, 200). Now only a key granted `patient_linkage` gets that lookup; others get a
    403 before the forward; an archived upload (its own row names its patient) stays open."""
    from tests.dicom_factory import gradient, make_dicom

    guessed = make_dicom()  # PatientID MARKER_PID_51c2: two archive images
    archived = make_dicom(gradient(64, 64), extra={"PatientID": "PATIENT-C"})
    index, data = _linkage_index(world, tmp_path, nih_dir, archived)
    keys = _write(tmp_path / "keys", f"{API_KEY}\n{LINKAGE_KEY} patient_linkage\n")
    app = create_app(world["embedder"], settings=_settings(keys, monkeypatch), index=index)
    with _on_loopback(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = _similar(c, API_KEY, guessed, "application/dicom", exclude_same_patient="true")
        assert r.status_code == 403, r.text
        body = r.json()
        assert body["reason"] == "patient_linkage_not_permitted"
        assert "\n" not in body["detail"] and "patient_linkage" in body["detail"]
        assert "excluded_patient" not in r.text and "neighbours" not in r.text

        # the same key: plain search, and exclusion by an archived upload's own row
        assert _similar(c, API_KEY, guessed, "application/dicom").status_code == 200
        for upload, media in ((archived, "application/dicom"), (data["png"], "image/png")):
            r = _similar(c, API_KEY, upload, media, exclude_same_patient="true")
            assert r.status_code == 200, r.text
            (res,) = r.json()["results"]
            assert res["same_patient"]["archive_row"] is True and res["excluded_self"] == 1

        # the scoped key: the PatientID lookup, as before
        r = _similar(c, LINKAGE_KEY, guessed, "application/dicom", exclude_same_patient="true")
        assert r.status_code == 200, r.text
        (res,) = r.json()["results"]
        assert res["excluded_patient"] == 2 and res["same_patient"]["patient_id"].startswith("used")

    # keyless on loopback (--insecure-local): the one user has every permission
    local = create_app(
        world["embedder"],
        settings=ApiSettings(insecure_local=True, allow_development_key=True),
        index=index,
    )
    with _on_loopback(local) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = _similar(c, None, guessed, "application/dicom", exclude_same_patient="true")
        assert r.status_code == 200 and r.json()["results"][0]["excluded_patient"] == 2


def test_key_lines_and_env_entries_take_scopes_and_refuse_unknown_ones(tmp_path, monkeypatch):
    from radjepa.config import ServeConfig

    keys = _write(tmp_path / "keys", f"# ops\n{API_KEY}\n{LINKAGE_KEY}  patient_linkage\n")
    monkeypatch.setenv("RADJEPA_API_KEYS", f"{OTHER_KEY} patient_linkage, {NEW_KEY}")
    s = settings_from_config(
        ServeConfig(api_keys_file=str(keys)), secret_env="X", allow_development_key=False
    )
    scoped = {d for d, sc in (s.env_keys | s.file_keys).items() if sc}
    assert scoped == {key_digest(LINKAGE_KEY), key_digest(OTHER_KEY)}
    assert len(s.key_digests) == 4 and LINKAGE_KEY not in s.model_dump_json()
    for bad, match in (
        (f"{API_KEY} patient-linkage\n", "line 1: an unknown API key scope of 15 characters"),
        # a rotation written on one line: the new key was quoted as the unknown scope
        (f"{API_KEY} {NEW_KEY}\n", "line 1: an unknown API key scope .* is it a second key"),
        ("clé-secrète-de-vingt-caractères\n", "line 1: an API key must be ASCII characters only"),
        (f"{API_KEY},{OTHER_KEY}\n", "line 1: one key per line"),
        ("short patient_linkage\n", "shorter than 16"),
    ):
        _write(keys, bad)
        with pytest.raises(SecurityConfigError, match=match) as err:
            settings_from_config(
                ServeConfig(api_keys_file=str(keys)), secret_env="X", allow_development_key=False
            )
        assert NEW_KEY not in str(err.value) and "clé" not in str(err.value)
    monkeypatch.setenv("RADJEPA_API_KEYS", f"{OTHER_KEY} {NEW_KEY}")  # a space, not a comma
    with pytest.raises(SecurityConfigError, match="entry 1: an unknown API key scope") as err:
        settings_from_config(ServeConfig(), secret_env="X", allow_development_key=False)
    assert NEW_KEY not in str(err.value)


def test_a_keys_file_an_editor_saved_with_a_byte_order_mark_is_read(tmp_path):
    # Notepad and PowerShell 5 (`Out-File -Encoding utf8`) start the file with U+FEFF: its
    # first key was refused as not ASCII, and a rotation written so kept the revoked keys
    from radjepa.config import ServeConfig

    keys = _write(tmp_path / "keys", "")
    keys.write_bytes(f"\ufeff{API_KEY}\r\n{LINKAGE_KEY} patient_linkage\r\n".encode())
    s = settings_from_config(
        ServeConfig(api_keys_file=str(keys)), secret_env="X", allow_development_key=False
    )
    assert set(s.file_keys) == {key_digest(API_KEY), key_digest(LINKAGE_KEY)}
    keys.write_bytes(f"{API_KEY}\nnot-\u00e4scii-key-of-twenty\n".encode())
    with pytest.raises(SecurityConfigError, match=r"line 2: .* ASCII .* U\+00E4"):
        settings_from_config(
            ServeConfig(api_keys_file=str(keys)), secret_env="X", allow_development_key=False
        )


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666, 0o660], ids=oct)
def test_a_keys_file_others_may_write_is_refused(tmp_path, monkeypatch, mode):
    """Whoever can write the file can add a key: it was accepted (reproduced on the old code
    with chmod 666); now one line names the file, its mode and the chmod to run."""
    keys = _write(tmp_path / "keys", API_KEY + "\n", mode)
    with pytest.raises(SecurityConfigError, match=f"writable by others \\(mode 0{mode:o}\\)"):
        _settings(keys, monkeypatch)


OTHER_UID = 54321  # a user the test machine does not run the service as

as_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="only root can give a file to another user (chown)"
)


@as_root
def test_a_keys_file_another_user_owns_is_refused(tmp_path, monkeypatch):
    """Its owner can make it writable, or write it, whatever its mode: it was accepted
    (reproduced on the old code: chown 54321, mode 0600, started). Root's own files stay
    accepted (a Kubernetes Secret volume's are root's)."""
    keys = _write(tmp_path / "keys", API_KEY + "\n", 0o400)
    os.chown(keys, OTHER_UID, -1)
    with pytest.raises(SecurityConfigError, match=f"owned by uid {OTHER_UID}, neither") as err:
        _settings(keys, monkeypatch)
    assert "\n" not in str(err.value) and str(keys) in str(err.value)
    os.chown(keys, 0, -1)
    assert _settings(keys, monkeypatch).key_digests == (key_digest(API_KEY),)


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757], ids=oct)
def test_a_keys_file_in_a_folder_others_may_write_is_refused(tmp_path, monkeypatch, mode):
    """Whoever may write the folder can rename a file of their own keys over the keys file,
    whatever the file's own mode: it was accepted (reproduced on the old code with the folder
    at 0777). A sticky folder lets each user replace only their own files: accepted when the
    service's user or root owns it (/tmp, a Kubernetes Secret volume's folder)."""
    folder = tmp_path / "secrets"
    folder.mkdir()
    keys = _write(folder / "keys", API_KEY + "\n")
    folder.chmod(mode)
    with pytest.raises(SecurityConfigError, match=f"which others may write \\(mode 0{mode:o}\\)"):
        _settings(keys, monkeypatch)
    folder.chmod(mode | stat.S_ISVTX)  # sticky, and ours
    assert _settings(keys, monkeypatch).key_digests == (key_digest(API_KEY),)
    folder.chmod(0o755)
    assert _settings(keys, monkeypatch).key_digests == (key_digest(API_KEY),)


@as_root
def test_a_keys_file_in_a_folder_another_user_owns_is_refused(tmp_path, monkeypatch):
    """The folder's owner can replace the file, sticky folder or not."""
    folder = tmp_path / "secrets"
    folder.mkdir()
    keys = _write(folder / "keys", API_KEY + "\n")
    for mode in (0o755, 0o1777):
        folder.chmod(mode)
        os.chown(folder, OTHER_UID, -1)
        with pytest.raises(SecurityConfigError, match=f"owned by uid {OTHER_UID} .neither"):
            _settings(keys, monkeypatch)


def test_readable_keys_files_start_and_world_readable_ones_warn(tmp_path, monkeypatch, caplog):
    for mode in (0o400, 0o600, 0o440):  # 0440: a Secret volume with fsGroup
        with caplog.at_level(logging.WARNING, logger="serve.app"):
            caplog.clear()
            _settings(_write(tmp_path / "keys", API_KEY + "\n", mode), monkeypatch)
        assert "readable by every user" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="serve.app"):
        _settings(_write(tmp_path / "keys", API_KEY + "\n", 0o644), monkeypatch)
    assert "readable by every user (mode 0644)" in caplog.text and API_KEY not in caplog.text


def test_kubernetes_secret_volume_layout_is_accepted(tmp_path, monkeypatch):
    """A Secret volume: ``keys -> ..data/keys``, ``..data -> ..2026_x`` (the real file, mode
    from defaultMode). The check follows the links to the file itself."""
    vol = _secret_volume(tmp_path / "vol", "..2026_01", API_KEY + "\n", 0o400)
    assert _settings(vol / "keys", monkeypatch).key_digests == (key_digest(API_KEY),)
    vol.chmod(0o1777)  # the volume's own folder, as kubelet mounts it: sticky, root's
    assert _settings(vol / "keys", monkeypatch).key_digests == (key_digest(API_KEY),)
    os.chmod(vol / "..2026_01", 0o777)  # the folder the links resolve to is checked too
    with pytest.raises(SecurityConfigError, match=r"lies in .*\.\.2026_01, which others may write"):
        _settings(vol / "keys", monkeypatch)
    os.chmod(vol / "..2026_01", 0o755)
    os.chmod(vol / "..2026_01" / "keys", 0o666)
    with pytest.raises(SecurityConfigError, match="writable by others"):
        _settings(vol / "keys", monkeypatch)


def _secret_volume(vol: Path, version: str, text: str, mode: int) -> Path:
    """The layout kubelet's atomic writer makes, and its update: a new timestamped folder,
    then ``..data`` swapped to it by a rename (the file path never goes missing)."""
    vol.mkdir(exist_ok=True)
    (vol / version).mkdir()
    _write(vol / version / "keys", text, mode)
    os.symlink(version, vol / "..data_tmp")
    os.replace(vol / "..data_tmp", vol / "..data")
    if not (vol / "keys").is_symlink():
        os.symlink("..data/keys", vol / "keys")
    return vol


def _status(c: httpx.Client, key: str) -> int:
    return c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code


def test_a_changed_keys_file_takes_effect_without_a_restart(world, tmp_path, monkeypatch, caplog):
    """A revoked key kept working until the replicas restarted (reproduced on the old code: the
    file swapped, the old key still 200). Now each replica re-reads the file when the file the
    path resolves to changes: an atomic swap, a Kubernetes ``..data`` swap, an edit in place."""
    keys = _write(tmp_path / "keys", API_KEY + "\n")
    app = create_app(world["embedder"], settings=_settings(keys, monkeypatch))
    with _on_loopback(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert (_status(c, API_KEY), _status(c, NEW_KEY)) == (200, 401)
        _swap(keys, NEW_KEY + "\n")  # rotated: the old key revoked
        assert (_status(c, API_KEY), _status(c, NEW_KEY)) == (401, 200)
        keys.write_text(f"{NEW_KEY}\n{API_KEY}\n")  # edited in place
        assert (_status(c, API_KEY), _status(c, NEW_KEY)) == (200, 200)

    vol = _secret_volume(tmp_path / "vol", "..2026_01", API_KEY + "\n", 0o400)
    app = create_app(world["embedder"], settings=_settings(vol / "keys", monkeypatch))
    with _on_loopback(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert _status(c, API_KEY) == 200
        _secret_volume(vol, "..2026_02", NEW_KEY + "\n", 0o400)
        assert (_status(c, API_KEY), _status(c, NEW_KEY)) == (401, 200)


def test_a_key_of_the_env_var_outlives_its_removal_from_the_keys_file(world, tmp_path, monkeypatch):
    """Keys from the env var are fixed for the process: one that was also in the keys file was
    taken for a file key and revoked when the file dropped it, with the file's scopes."""
    from radjepa.config import ServeConfig

    keys = _write(tmp_path / "keys", f"{API_KEY} patient_linkage\n{NEW_KEY}\n")
    monkeypatch.setenv("RADJEPA_API_KEYS", API_KEY)
    settings = settings_from_config(
        ServeConfig(api_keys_file=str(keys)), secret_env="X", allow_development_key=True
    ).model_copy(update={"keys_recheck_s": 0.0})
    ring = settings.keyring()
    assert ring.current()[key_digest(API_KEY)] == {"patient_linkage"}  # both places' scopes
    _swap(keys, NEW_KEY + "\n")
    now = ring.current()
    assert now[key_digest(API_KEY)] == frozenset()  # the env var's, without the file's scope
    assert set(now) == {key_digest(API_KEY), key_digest(NEW_KEY)}


@pytest.mark.parametrize(
    ("case", "logged"),
    [
        ("short", "shorter than 16 characters"),
        ("empty", "holds no keys"),
        ("writable", "writable by others"),
        ("unknown_scope", "unknown API key scope"),
        ("missing", "cannot read API keys file"),
        ("open_folder", "which others may write (mode 0777)"),
        pytest.param("other_owner", f"owned by uid {OTHER_UID}", marks=as_root),
    ],
)
def test_an_unusable_new_keys_file_keeps_the_old_keys_and_says_why(
    world, tmp_path, monkeypatch, caplog, case, logged
):
    """Never open to everyone, never everyone locked out in silence: the keys in force stay,
    and one error record (not one per request) names the problem."""
    folder = tmp_path / "secrets"
    folder.mkdir()
    keys = _write(folder / "keys", API_KEY + "\n")
    app = create_app(world["embedder"], settings=_settings(keys, monkeypatch))
    with _on_loopback(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert _status(c, API_KEY) == 200
        with caplog.at_level(logging.ERROR, logger="serve.app"):
            if case == "missing":
                keys.unlink()
            elif case == "open_folder":  # then a new file: a rename anyone could have made
                folder.chmod(0o777)
                _swap(keys, NEW_KEY + "\n")
            elif case == "other_owner":
                new = _write(folder / "keys.new", NEW_KEY + "\n")
                os.chown(new, OTHER_UID, -1)
                os.replace(new, keys)
            else:
                text = {
                    "short": "tooshort\n",
                    "empty": "# all keys revoked\n",
                    "writable": NEW_KEY + "\n",
                    "unknown_scope": f"{NEW_KEY} admin\n",
                }[case]
                _swap(keys, text, 0o666 if case == "writable" else 0o600)
            statuses = [_status(c, API_KEY) for _ in range(3)]
            assert statuses == [200] * 3 and _status(c, NEW_KEY) == 401
            assert c.get("/v1/models").status_code == 401  # still closed without a key
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and logged in errors[0].getMessage(), caplog.text
    assert "keeping the 1 key(s) loaded before" in errors[0].getMessage()
    assert API_KEY not in caplog.text and NEW_KEY not in caplog.text


def test_build_app_refuses_keyless_mode(tmp_path, monkeypatch):
    """`build_app` (serve deploy, RayService) with insecure_local and no key bound a keyless
    app (reproduced on the old code: an Application came back), which a cluster's proxy on
    0.0.0.0 then served to every machine reaching it. Refused at deploy time, in one line."""
    from serve.deployment import build_app

    monkeypatch.delenv("RADJEPA_API_KEYS", raising=False)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    args = {"config": str(TINY_CONFIG), "model": str(ckpt)}
    for extra in ({"insecure_local": True}, {"set": ["serve.insecure_local=true"]}):
        with pytest.raises(SecurityConfigError, match="build_app .* refuses insecure local mode"):
            build_app(args | extra)


def test_cli_serve_with_a_world_writable_keys_file_exits_2_in_one_line(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    keys = _write(tmp_path / "keys", API_KEY + "\n", 0o666)
    env = {k: v for k, v in os.environ.items() if k not in ("RADJEPA_API_KEYS", "RAY_ADDRESS")}
    exe = Path(sys.executable).with_name("radjepa")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipelines.cli"]
    proc = subprocess.Popen(
        [*cmd, "serve", "--model", str(ckpt), "--set", f"serve.api_keys_file={keys}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:  # it started serving: Ctrl-C stops it and its Ray
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        pytest.fail(f"`radjepa serve` started with a world-writable keys file:\n{out}")
    assert proc.returncode == 2, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and "writable by others (mode 0666)" in lines[0], lines
    assert stat.S_IMODE(keys.stat().st_mode) == 0o666  # nothing was changed for the user

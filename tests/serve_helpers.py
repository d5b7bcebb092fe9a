"""Builders shared by the serve/embed tests: a tiny checkpoint, real DICOM bytes, a probe head,
an index in the ``radjepa embed`` output format, and a free loopback port."""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny_cpu.yaml"
API_KEY = "test-key-0123456789abcdef"
OTHER_KEY = "wrong-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_checkpoint(folder: Path, step: int = 7) -> Path:
    """A randomly initialised tiny ViT saved with the core's own build/save functions."""
    from radjepa.checkpoint import save
    from radjepa.config import load_config
    from radjepa.models.encoder import build_encoder

    cfg = load_config(TINY_CONFIG)
    save(folder, build_encoder(cfg), cfg, step=step)
    return folder


def nih_pngs(nih_dir: Path, n: int) -> list[Path]:
    return sorted((nih_dir / "images").glob("*.png"))[:n]


def dicom_from_png(png: Path) -> bytes:
    """Real DICOM bytes (DX, MONOCHROME2, 8-bit, explicit VR LE) holding the PNG's pixels."""
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    arr = np.asarray(Image.open(png).convert("L"), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "TEST-PATIENT"
    ds.PatientName = "Test^Patient"
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_head(
    folder: Path,
    dim: int,
    labels: tuple[str, ...] = ("Effusion", "Cardiomegaly"),
    encoder: Path | None = None,
    which: str | None = None,
):
    """A fitted probe head (eval module's own fit/save path) on random features; with
    ``encoder``, it records that checkpoint's fingerprint as `radjepa probe` does, and with
    ``which`` the encoder (target/context) it was probed with."""
    from radjepa.eval.heads import ProbeHead, checkpoint_fingerprint, save_head

    rng = np.random.default_rng(0)
    record = (
        {"checkpoint": str(encoder), "sha256": checkpoint_fingerprint(encoder)} if encoder else {}
    )
    if which is not None:
        record["which"] = which
    head = ProbeHead(
        rng.normal(size=(dim, len(labels))) * 0.1, np.zeros(len(labels)), labels, encoder=record
    )
    save_head(folder, head)
    return folder


def pseudonym(name: str) -> str:
    """A stand-in patient pseudonym in the ingest format (32 hex characters)."""
    return hashlib.sha256(name.encode()).hexdigest()[:32]


def write_index(
    path: Path,
    embeddings: np.ndarray,
    image_ids: list[str],
    encoder: Path | None = None,
    patient_pids: list[str | None] | None = None,
    pseudonyms: dict[str, str | None] | None = None,
    instance_pids: list[str | None] | None = None,
) -> Path:
    """Parquet in the exact layout ``pipelines.embed`` writes for checkpoint ``encoder``;
    without one, the older layout that does not record the encoder (no ``encoder_sha256``).
    Each row is its own patient unless ``patient_pids`` groups them. ``pseudonyms`` is the
    shards' key record (``radjepa.ingest.destination.recorded_pseudonyms``), which embed
    copies into every row with its image id scheme; without it, the older layout that records
    neither (so its ids read as unkeyed SHA-256). ``instance_pids``: the rows' DICOM instance
    pseudonyms (default: stand-ins no upload has)."""
    n, dim = embeddings.shape
    pid = [pseudonym(f"p{i}") for i in range(n)]
    table = pa.table(
        {
            "image_id": pa.array(image_ids, pa.string()),
            "patient_pid": pa.array(patient_pids or pid, pa.string()),
            "study_pid": pa.array(pid, pa.string()),
            "series_pid": pa.array([None] * n, pa.string()),
            "instance_pid": pa.array(instance_pids or pid, pa.string()),
            "model": pa.array(["tiny:step-7"] * n, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(embeddings.astype(np.float32).reshape(-1)), dim
            ),
        }
    )
    if encoder is not None:
        from radjepa.eval.heads import checkpoint_fingerprint

        sha = pa.array([checkpoint_fingerprint(encoder)] * n, pa.string())
        table = table.add_column(table.num_columns - 1, "encoder_sha256", sha)
    if pseudonyms is not None:
        from radjepa.ingest.destination import id_scheme_of

        pseudonyms = {**pseudonyms, "id_scheme": id_scheme_of(pseudonyms)}  # as embed writes it
        for column, key in (
            ("pseudonym_key_fingerprint", "key_fingerprint"),
            ("patient_identity", "patient_identity"),
            ("image_id_scheme", "id_scheme"),
        ):
            values = pa.array([pseudonyms.get(key)] * n, pa.string())
            table = table.add_column(table.num_columns - 1, column, values)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def fuzz_openapi(api, auth: dict[str, str], max_examples: int, **call_kwargs) -> None:
    """schemathesis over every operation of ``api``, each case sent without and with a key:
    bounded, derandomised, and failing on any 5xx."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/embed", "/v1/classify", "/v1/similar"}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=max_examples,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def fuzz(case):
            for headers in ({}, auth):  # unauthenticated and authenticated traffic
                case.call_and_validate(headers=headers, checks=[not_a_server_error], **call_kwargs)

        fuzz()


def answer_then_keep_sending(
    host: str, port: int, request: bytes, more: bytes, seconds: float
) -> tuple[bytes, bool]:
    """Send ``request`` (head and the start of a body), then ``more`` every 0.2 s for ``seconds``
    as a stuck or slow client does: (what the server answered, whether it closed the connection)."""
    answer, closed = b"", False
    with socket.create_connection((host, port)) as s:
        s.settimeout(10)
        s.sendall(request)
        s.settimeout(0.2)
        deadline = time.monotonic() + seconds
        while not closed and time.monotonic() < deadline:
            try:  # read first: the answer is there before any reset of a closed connection
                chunk = s.recv(65536)
                closed = not chunk  # EOF: the server closed
                answer += chunk
            except TimeoutError:
                pass
            except OSError:
                closed = True  # reset
            if not closed:
                try:
                    s.sendall(more)
                except TimeoutError:
                    pass  # the server stopped reading for now
                except OSError:
                    closed = True  # broken pipe or reset: the server closed
    return answer, closed


@contextlib.contextmanager
def on_loopback(app) -> Iterator[tuple[str, int]]:
    """``app`` served by a real uvicorn on a free loopback port (a thread): (host, port)."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield server.config.host, server.config.port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def register_probe_head(uri: str, experiment_id: str, name: str, folder: Path) -> None:
    """Register a placeholder head folder as ``radjepa probe --register-head`` tags one (what
    refuses or routes it is the ``radjepa.kind`` tag, not its contents)."""
    import mlflow

    from pipelines.tracking import register_artifact_dir

    client = mlflow.MlflowClient(uri)
    run = client.create_run(experiment_id)
    folder.mkdir()
    (folder / "head.json").write_text("{}")
    client.log_artifacts(run.info.run_id, str(folder), "head")
    register_artifact_dir(uri, run.info.run_id, "head", name, tags={"radjepa.kind": "probe-head"})

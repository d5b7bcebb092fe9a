"""The FastAPI app from ``create_app`` with an in-process encoder: routes, limits and errors.

No Ray here: the factory receives its model, so every route is exercised directly. The same
app runs behind Ray Serve in tests/test_serve_ray.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_helpers import (
    API_KEY,
    OTHER_KEY,
    REPO,
    answer_then_keep_sending,
    cosine,
    dicom_from_png,
    fuzz_openapi,
    make_checkpoint,
    make_head,
    nih_pngs,
    on_loopback,
    pseudonym,
    write_index,
)

from serve.app import create_app
from serve.embedder import EncoderRunner, LocalEmbedder
from serve.index import SAME_INSTANCE_MIN_MARGIN, EmbeddingIndex
from serve.security import (
    ApiSettings,
    SecurityConfigError,
    key_digest,
    load_api_keys,
    settings_from_config,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BODY = 2 * 1024**2


@pytest.fixture(scope="module")
def world(tmp_path_factory, nih_dir):
    """Checkpoint, runner, head, an index of 6 NIH images, and their PNG bytes."""
    from radjepa.eval.heads import load_head

    root = tmp_path_factory.mktemp("serve_app")
    runner = EncoderRunner.from_checkpoint(make_checkpoint(root / "ckpt"))
    pngs = [p.read_bytes() for p in nih_pngs(nih_dir, 6)]
    embedder = LocalEmbedder(runner)
    head_dir = make_head(root / "head", runner.info.embed_dim)

    from radjepa.imaging.decode import decode_image

    pre = runner.preprocess
    pixels = [
        decode_image(
            b,
            size=pre.image_size,
            dtype=pre.dtype,
            window_percentiles=pre.window_percentiles,
            secret=b"k" * 32,
        ).pixels
        for b in pngs
    ]
    emb = np.stack([r.embedding for r in runner.run(pixels, [False] * len(pixels))])
    ids = [hashlib.sha256(b).hexdigest() for b in pngs]
    index = EmbeddingIndex.from_parquet(write_index(root / "index" / "part-0.parquet", emb, ids))
    return {
        "root": root,
        "runner": runner,
        "embedder": embedder,
        "head": load_head(head_dir),
        "head_dir": head_dir,
        "index": index,
        "pngs": pngs,
        "png_paths": nih_pngs(nih_dir, 6),
        "emb": emb,
        "pixels": pixels,
    }


def _settings(**kw) -> ApiSettings:
    # the key may look up an upload's PatientID (tests/test_serve_keys.py: keys that may not);
    # the indexes here are made by hand: the public development key, opted into explicitly
    base = {
        "env_keys": {key_digest(API_KEY): ("patient_linkage",)},
        "max_body_bytes": MAX_BODY,
        "allow_development_key": True,
    }
    return ApiSettings(**(base | kw))


@pytest.fixture(scope="module")
def client(world) -> TestClient:
    app = create_app(
        world["embedder"],
        settings=_settings(),
        head=world["head"],
        index=world["index"],
        head_source=str(world["head_dir"]),
    )
    return TestClient(app, raise_server_exceptions=False)


def _post(client, path, data, media="image/png", headers=AUTH, **kw):
    return client.post(path, content=data, headers={**headers, "content-type": media}, **kw)


def test_embed_png_returns_pooled_embedding_model_and_sha256_id(client, world):
    r = _post(client, "/v1/embed", world["pngs"][0])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["name"] == "tiny" and body["model"]["version"] == "step-7"
    (res,) = body["results"]
    assert res["image_id"] == hashlib.sha256(world["pngs"][0]).hexdigest()
    assert res["dim"] == world["runner"].info.embed_dim == len(res["embedding"])
    assert res["patch_tokens"] is None
    np.testing.assert_allclose(res["embedding"], world["emb"][0], rtol=1e-4, atol=1e-5)


def test_dicom_and_png_of_the_same_image_embed_alike(client, world):
    dcm = dicom_from_png(world["png_paths"][1])
    a = _post(client, "/v1/embed", dcm, "application/dicom").json()["results"][0]
    b = _post(client, "/v1/embed", world["pngs"][1]).json()["results"][0]
    assert a["image_id"] != b["image_id"]  # different bytes ...
    assert cosine(a["embedding"], b["embedding"]) > 0.99  # ... same picture


def test_multipart_embeds_each_file_and_returns_patch_tokens(client, world):
    files = [("files", (f"x{i}.png", world["pngs"][i], "image/png")) for i in range(3)]
    files.append(
        ("more", ("y.dcm", dicom_from_png(world["png_paths"][0]), "application/octet-stream"))
    )
    r = client.post("/v1/embed", files=files, params={"patch_tokens": "true"}, headers=AUTH)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["filename"] for x in res] == ["x0.png", "x1.png", "x2.png", "y.dcm"]
    info = world["runner"].info
    n_patches = (info.img_size // info.patch_size) ** 2
    for x in res:
        assert np.asarray(x["patch_tokens"]).shape == (n_patches, info.embed_dim)
        assert x["batch_size"] == 4  # the in-process embedder runs one forward per request
    assert cosine(res[0]["embedding"], res[3]["embedding"]) > 0.99


def test_embed_json_written_row_by_row_is_the_response_model_s_json(client, world):
    """/v1/embed writes its JSON a token row per call (a 40 MB answer held the event loop in
    one call): the bytes must still be what the response model says, values exact."""
    import json

    from serve.schemas import EmbeddingOut, EmbedResponse, embed_response_json

    r = client.post(
        "/v1/embed",
        files=[("files", (f"x{i}.png", world["pngs"][i], "image/png")) for i in range(2)],
        params={"patch_tokens": "true"},
        headers=AUTH,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    parsed = EmbedResponse.model_validate_json(r.content)  # the declared contract
    assert json.loads(r.content) == parsed.model_dump(mode="json")
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(5, 3)).astype(np.float32)
    tokens[0, 0] = np.float32(1e-38)  # values JSON must carry exactly
    outs = [
        (
            EmbeddingOut(
                image_id="a" * 64, filename='a "b"\n', dim=3, embedding=[0.5] * 3, batch_size=2
            ),
            tokens,
        ),
        (EmbeddingOut(image_id="b" * 64, dim=3, embedding=[1.0] * 3, batch_size=2), None),
    ]
    body = embed_response_json(parsed.model, outs)
    whole = EmbedResponse(
        model=parsed.model,
        results=[
            o.model_copy(update={"patch_tokens": t.tolist() if t is not None else None})
            for o, t in outs
        ],
    )
    assert json.loads(body) == json.loads(whole.model_dump_json())
    got = np.asarray(json.loads(body)["results"][0]["patch_tokens"], np.float32)
    np.testing.assert_array_equal(got, tokens)
    # a non-finite value is null, as the model writes it: NaN and Infinity are not JSON, and
    # strict parsers (JavaScript's, Go's) refuse the whole answer
    tokens[1, :] = [np.nan, np.inf, -np.inf]

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    parsed_tokens = json.loads(embed_response_json(parsed.model, outs), parse_constant=strict)
    assert parsed_tokens["results"][0]["patch_tokens"][1] == [None, None, None]


def test_classify_returns_head_probabilities_per_label(client, world):
    r = _post(client, "/v1/classify", world["pngs"][2])
    assert r.status_code == 200, r.text
    probs = r.json()["results"][0]["probabilities"]
    head = world["head"]
    assert list(probs) == list(head.label_names)
    expected = head.predict_proba(world["emb"][2][None])[0]
    np.testing.assert_allclose(list(probs.values()), expected, rtol=1e-4, atol=1e-5)
    assert all(0.0 <= p <= 1.0 for p in probs.values())


def _similar(client, data, media="image/png", **params):
    r = _post(client, "/v1/similar", data, media, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_similar_with_include_self_ranks_the_query_image_first_with_pseudonymised_ids(
    client, world
):
    body = _similar(client, world["pngs"][3], k=3, include_self="true")
    assert body["index_size"] == 6
    (res,) = body["results"]
    hits = res["neighbours"]
    assert len(hits) == 3
    assert hits[0]["image_id"] == hashlib.sha256(world["pngs"][3]).hexdigest()
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert len(hits[0]["patient_pid"]) == 32 and hits[0]["series_pid"] is None
    assert (res["excluded_self"], res["excluded_patient"]) == (0, 0)


def test_similar_leaves_out_the_archived_upload_itself_and_still_returns_k(client, world):
    own = hashlib.sha256(world["pngs"][3]).hexdigest()
    (res,) = _similar(client, world["pngs"][3], k=3)["results"]
    hits = res["neighbours"]
    assert len(hits) == 3 and own not in {h["image_id"] for h in hits}
    assert res["image_id"] == own and res["excluded_self"] == 1 and res["excluded_patient"] == 0
    # the next best archive images move up: exactly the ranking after the self-hit
    (ref,) = _similar(client, world["pngs"][3], k=4, include_self="true")["results"]
    assert [h["image_id"] for h in hits] == [h["image_id"] for h in ref["neighbours"][1:]]
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in ref["neighbours"][1:]])
    # asking for the whole index returns every OTHER image, not a padded or short list
    (every,) = _similar(client, world["pngs"][3], k=100)["results"]
    ids = [hashlib.sha256(b).hexdigest() for b in world["pngs"]]
    assert sorted(h["image_id"] for h in every["neighbours"]) == sorted(set(ids) - {own})


def test_each_upload_of_a_request_leaves_out_only_its_own_bytes(client, world):
    """Identity is the SHA-256 of the bytes: the other upload of the request stays findable,
    and a DICOM holding the same pixels as an archived PNG is another file, not excluded."""
    ids = [hashlib.sha256(b).hexdigest() for b in world["pngs"]]
    files = [
        ("files", ("a.png", world["pngs"][0], "image/png")),
        ("files", ("b.png", world["pngs"][1], "image/png")),
        ("files", ("a.dcm", dicom_from_png(world["png_paths"][0]), "application/octet-stream")),
    ]
    r = client.post("/v1/similar", files=files, params={"k": 5}, headers=AUTH)
    assert r.status_code == 200, r.text
    a, b, dcm = r.json()["results"]
    assert {h["image_id"] for h in a["neighbours"]} == set(ids) - {ids[0]}
    assert {h["image_id"] for h in b["neighbours"]} == set(ids) - {ids[1]}
    assert [x["excluded_self"] for x in (a, b, dcm)] == [1, 1, 0]
    assert len(dcm["neighbours"]) == 5  # not in the archive: nothing to leave out
    assert dcm["neighbours"][0]["image_id"] == ids[0] and dcm["neighbours"][0]["score"] > 0.99


def test_an_archived_dicom_instance_re_sent_in_other_bytes_is_recognised(world, tmp_path):
    """A PACS re-export of an archived instance (RLE Lossless instead of explicit VR little
    endian, a re-written header) has other bytes, so another image id: it was not recognised,
    came back as its own first hit at ~1.0 and excluded_self said 0. Ingest identifies it by its
    SOP Instance UID's keyed pseudonym, which the index holds; the server now does too, when
    the embeddings agree. A file that only carries the UID, around another picture, is not
    taken for it, and the patient_linkage gate still judges by bytes. Real DICOM bytes over
    HTTP on loopback."""
    import io

    import httpx
    import pydicom
    from pydicom.uid import RLELossless

    from radjepa.imaging.decode import decode_image, resolve_secret

    def dicom_bytes(ds) -> bytes:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    archived = dicom_from_png(world["png_paths"][0])  # as ingest stored it
    ds = pydicom.dcmread(io.BytesIO(archived))
    # pydicom gives a compressed copy a new UID by default; a PACS re-export keeps it
    ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    ds.InstitutionName = "Re-export"
    resent = dicom_bytes(ds)
    other = pydicom.dcmread(io.BytesIO(dicom_from_png(world["png_paths"][1])))
    other.SOPInstanceUID = ds.SOPInstanceUID  # another picture under the archived UID
    other.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    other.PatientID = ds.PatientID
    reused = dicom_bytes(other)

    settings = _settings(
        env_keys={key_digest(API_KEY): ("patient_linkage",), key_digest(OTHER_KEY): ()}
    )
    # the index as `radjepa embed` leaves it: the archived file's row under ingest's key
    pre = world["runner"].preprocess
    secret = resolve_secret(settings.secret_env, allow_development_key=True, warn=False)
    row = decode_image(
        archived,
        size=pre.image_size,
        dtype=pre.dtype,
        window_percentiles=pre.window_percentiles,
        secret=secret,
        id_scheme="sha256",  # write_index's layout below records no scheme: unkeyed ids
    )
    (own_emb,) = [r.embedding for r in world["runner"].run([row.pixels], [False])]
    ids = [row.meta["image_id"], *[hashlib.sha256(b).hexdigest() for b in world["pngs"][1:]]]
    index = EmbeddingIndex.from_parquet(
        write_index(
            tmp_path / "index.parquet",
            np.concatenate([own_emb[None], world["emb"][1:]]),
            ids,
            patient_pids=[row.meta["patient_pid"], *[pseudonym(f"p{i}") for i in range(1, 6)]],
            instance_pids=[row.meta["instance_pid"], *[None] * 5],
        )
    )
    assert row.meta["instance_pid"] and len({archived, resent, reused}) == 3

    app = create_app(world["embedder"], settings=settings, index=index)
    with on_loopback(app) as (host, port), httpx.Client(timeout=60) as http:

        def similar(blob: bytes, key: str = API_KEY, **params) -> httpx.Response:
            return http.post(
                f"http://{host}:{port}/v1/similar",
                content=blob,
                params={"k": 3, **params},
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/dicom"},
            )

        for blob in (archived, resent):  # the file itself, and its instance in other bytes
            res = similar(blob).json()["results"][0]
            assert res["excluded_self"] == 1 and len(res["neighbours"]) == 3, res
            assert ids[0] not in {h["image_id"] for h in res["neighbours"]}
        res = similar(resent, include_self="true").json()["results"][0]
        assert res["image_id"] != ids[0] and res["neighbours"][0]["image_id"] == ids[0]
        assert res["neighbours"][0]["score"] > 0.999 and res["excluded_self"] == 0
        # its own row names its patient, whose images are left out with it
        res = similar(resent, exclude_same_patient="true").json()["results"][0]
        assert res["same_patient"]["archive_row"] is True and res["excluded_self"] == 1
        # the UID alone is not the instance: nothing left out, the archived row is a neighbour
        res = similar(reused, k=6).json()["results"][0]
        assert res["excluded_self"] == 0 and ids[0] in {h["image_id"] for h in res["neighbours"]}
        # a key without patient_linkage may not have a re-sent file's PatientID looked up
        r = similar(resent, key=OTHER_KEY, exclude_same_patient="true")
        assert r.status_code == 403 and r.json()["reason"] == "patient_linkage_not_permitted"
        assert row.meta["instance_pid"] not in r.text + similar(resent).text

    # an encoder that embeds another image almost like the archived one (a barely trained or
    # collapsed one embeds them all alike): a file carrying the archived UID around any picture
    # would match its row above 0.99, and excluded_self would tell the caller which row is that
    # UID's. Closer than every other image by a clear margin, or not the upload itself
    twin = own_emb + np.float32(1e-3) * np.random.default_rng(0).standard_normal(own_emb.shape)
    close = EmbeddingIndex.from_parquet(
        write_index(
            tmp_path / "close.parquet",
            np.concatenate([own_emb[None], twin[None].astype(np.float32), world["emb"][2:]]),
            ids,
            patient_pids=[row.meta["patient_pid"], *[pseudonym(f"p{i}") for i in range(1, 6)]],
            instance_pids=[row.meta["instance_pid"], *[None] * 5],
        )
    )
    cosine = float(close.matrix[0] @ close.matrix[1])
    assert 1 - SAME_INSTANCE_MIN_MARGIN < cosine < 1, cosine
    app = create_app(world["embedder"], settings=settings, index=close)
    with on_loopback(app) as (host, port), httpx.Client(timeout=60) as http:
        res = http.post(
            f"http://{host}:{port}/v1/similar",
            content=resent,
            params={"k": 3},
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/dicom"},
        ).json()["results"][0]
        assert res["excluded_self"] == 0 and res["neighbours"][0]["image_id"] == ids[0], res


def test_archived_dicoms_are_recognised_by_the_bytes_a_client_uploads(world, tmp_path):
    """An index over the bundled hospital export (every transfer syntax, and PNGs), with the
    image ids ingest stores (the decoder's, from the original file bytes): each file sent back
    as is, the way `curl -F f=@x.dcm` sends it, finds itself excluded."""
    from radjepa.imaging.decode import decode_image

    pre = world["runner"].preprocess
    files, decoded, per_encoding = [], [], {}
    for f in sorted((REPO / "data" / "sample" / "archive").rglob("*.*")):
        if f.name == "broken_transfer.dcm":  # the one the sample holds for quarantine
            continue
        d = decode_image(
            f.read_bytes(),
            size=pre.image_size,
            dtype=pre.dtype,
            window_percentiles=pre.window_percentiles,
            secret=b"k" * 32,
            id_scheme="sha256",  # the index below has the older layout: unkeyed ids
        )
        encoding = (d.meta["format"], d.meta["transfer_syntax"])
        if per_encoding.setdefault(encoding, 0) < 2:  # two of each encoding the export holds
            per_encoding[encoding] += 1
            files.append(f)
            decoded.append(d)
    assert len(per_encoding) == 5  # PNG, explicit VR LE, RLE, JPEG 2000, JPEG baseline
    blobs = [f.read_bytes() for f in files]
    ids = [d.meta["image_id"] for d in decoded]
    assert ids == [hashlib.sha256(b).hexdigest() for b in blobs]
    emb = np.stack(
        [
            r.embedding
            for r in world["runner"].run([d.pixels for d in decoded], [False] * len(decoded))
        ]
    )
    pids = [d.meta["patient_pid"] for d in decoded]
    index = EmbeddingIndex.from_parquet(
        write_index(tmp_path / "index.parquet", emb, ids, patient_pids=pids)
    )
    client = TestClient(create_app(world["embedder"], settings=_settings(), index=index))
    parts = [
        ("f", (f.name, b, "application/octet-stream")) for f, b in zip(files, blobs, strict=True)
    ]
    r = client.post("/v1/similar", files=parts, params={"k": 3}, headers=AUTH)
    assert r.status_code == 200, r.text
    for own, res in zip(ids, r.json()["results"], strict=True):
        assert len(res["neighbours"]) == 3 and own not in {h["image_id"] for h in res["neighbours"]}
        assert res["image_id"] == own and res["excluded_self"] == 1
    r = client.post(
        "/v1/similar", files=parts, params={"k": 1, "include_self": "true"}, headers=AUTH
    )
    assert [res["neighbours"][0]["image_id"] for res in r.json()["results"]] == ids


def test_similar_can_leave_out_whole_patients(world, tmp_path):
    """Rows 0-1 are patient A, 2-3 patient B, 4-5 patient C; neighbours carry patient_pid, so a
    caller can ask again for other patients' cases only."""
    a, b, c = (pseudonym(x) for x in "ABC")
    patients = [a, a, b, b, c, c]
    ids = [hashlib.sha256(x).hexdigest() for x in world["pngs"]]
    index = EmbeddingIndex.from_parquet(
        write_index(tmp_path / "index.parquet", world["emb"], ids, patient_pids=patients)
    )
    client = TestClient(create_app(world["embedder"], settings=_settings(), index=index))

    (res,) = _similar(client, world["pngs"][0], k=3, exclude_patient_pid=a)["results"]
    assert {h["patient_pid"] for h in res["neighbours"]} <= {b, c}
    assert len(res["neighbours"]) == 3
    assert (res["excluded_self"], res["excluded_patient"]) == (1, 1)  # row 0 counted once

    two = [("exclude_patient_pid", a.upper()), ("exclude_patient_pid", b), ("k", "5")]
    r = _post(client, "/v1/similar", world["pngs"][0], params=two)
    (res,) = r.json()["results"]
    assert {h["image_id"] for h in res["neighbours"]} == {ids[4], ids[5]}
    assert (res["excluded_self"], res["excluded_patient"]) == (1, 3)

    (res,) = _similar(client, world["pngs"][0], k=6, include_self="true", exclude_patient_pid=a)[
        "results"
    ]
    assert {h["image_id"] for h in res["neighbours"]} == set(ids[2:])
    # row 1 only: the upload's own row is never one of "the other rows" of its patient
    assert (res["excluded_self"], res["excluded_patient"]) == (0, 1)

    (res,) = _similar(client, world["pngs"][0], k=3, exclude_patient_pid=pseudonym("nobody"))[
        "results"
    ]
    assert len(res["neighbours"]) == 3 and res["excluded_patient"] == 0


def test_similar_can_leave_out_the_uploads_own_patient(world, tmp_path):
    """Other patients' cases only, in one request: the patient of the upload's archive row, or
    of a DICOM upload's PatientID under the server's key (the key ingest pseudonymised with)."""
    from radjepa.imaging.deid import pseudonym as keyed_pseudonym
    from tests.dicom_factory import MARKERS, make_dicom

    a, c = pseudonym("A"), pseudonym("C")
    ids = [hashlib.sha256(x).hexdigest() for x in world["pngs"]]
    app = create_app(world["embedder"], settings=_settings(), index=world["index"])
    dicom_patient = keyed_pseudonym(app.state.decode_secret, "patient", MARKERS["PatientID"])
    patients = [a, a, dicom_patient, dicom_patient, c, c]
    index = EmbeddingIndex.from_parquet(
        write_index(tmp_path / "index.parquet", world["emb"], ids, patient_pids=patients)
    )
    client = TestClient(create_app(world["embedder"], settings=_settings(), index=index))

    # archived PNG (no PatientID of its own): its archive row names the patient
    (res,) = _similar(client, world["pngs"][0], k=6, exclude_same_patient="true")["results"]
    assert {h["image_id"] for h in res["neighbours"]} == set(ids[2:])
    assert (res["excluded_self"], res["excluded_patient"]) == (1, 1)
    # the option wins over include_self: the upload is its own patient's image; its own row
    # was counted as one of the patient's other images (2, not the 1 other row, row 1)
    (res,) = _similar(
        client, world["pngs"][0], k=6, exclude_same_patient="true", include_self="true"
    )["results"]
    assert {h["image_id"] for h in res["neighbours"]} == set(ids[2:])
    assert (res["excluded_self"], res["excluded_patient"]) == (0, 1)

    # a DICOM the archive does not hold: its own PatientID pseudonym names the patient
    dcm = make_dicom()
    (res,) = _similar(client, dcm, "application/dicom", k=6, exclude_same_patient="true")["results"]
    assert {h["image_id"] for h in res["neighbours"]} == {ids[0], ids[1], ids[4], ids[5]}
    assert (res["excluded_self"], res["excluded_patient"]) == (0, 2)
    (res,) = _similar(client, dcm, "application/dicom", k=6)["results"]
    assert len(res["neighbours"]) == 6 and res["excluded_patient"] == 0


SERVE_KEY_ENV = "RADJEPA_TEST_SERVE_DEID_KEY"
INGEST_KEY = "pooled-archive-key-0123456789abcdef"


def _pooled_archive(root: Path, runner) -> dict:
    """Two sites that both issue PatientID 12345 (rows 0-1 site A, 2-3 site B; 4-5 site A's
    patient 777), ingested with issuer_and_patient_id by ingest's own decoder and destination
    (no Ray), then embedded in the layout `radjepa embed` writes, key record included."""
    import pyarrow as pa

    from radjepa.imaging.deid import key_fingerprint
    from radjepa.ingest.decoding import FileDecoder
    from radjepa.ingest.destination import Destination, check_key, recorded_pseudonyms
    from radjepa.ingest.sources import READ_SCHEMA
    from radjepa.shards import SHARD_SCHEMA, pixels_from_bytes
    from tests.dicom_factory import gradient, issuer_tags, make_dicom

    who = [("12345", "SITE-A")] * 2 + [("12345", "SITE-B")] * 2 + [("777", "SITE-A")] * 2
    blobs = [
        make_dicom(gradient(64, 64, seed=i), extra=issuer_tags(pid, namespace=site))
        for i, (pid, site) in enumerate(who)
    ]
    pre = runner.preprocess
    scheme = "issuer_and_patient_id"
    settings = {
        "size": pre.image_size,
        "dtype": pre.dtype,
        "window_percentiles": tuple(pre.window_percentiles),
        "max_bytes": MAX_BODY,
        "patient_identity": scheme,
    }
    secret = INGEST_KEY.encode()
    dest = Destination(str(root / "dst"))
    check_key(
        dest,
        None,
        {"key": "secret", "key_fingerprint": key_fingerprint(secret), "patient_identity": scheme},
        "RADJEPA_DEID_SECRET",
    )
    reads = [
        {"name": f"{i}.dcm", "data": b, "size_bytes": len(b), "read_error": None}
        for i, b in enumerate(blobs)
    ]
    out = FileDecoder(settings, secret, frozenset(), keep_paths=False)(
        pa.Table.from_pylist(reads, schema=READ_SCHEMA)
    )
    dest.write("images", "part-0.parquet", out.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA))
    rows = out.to_pylist()
    pixels = [pixels_from_bytes(r["pixels"], r["height"], r["width"], r["dtype"]) for r in rows]
    emb = np.stack([r.embedding for r in runner.run(pixels, [False] * len(pixels))])
    ids = [r["image_id"] for r in rows]
    pids = [r["patient_pid"] for r in rows]
    assert len(set(pids)) == 3  # site A's 12345, site B's 12345, 777
    record = recorded_pseudonyms(str(root / "dst"))
    ckpt = Path(runner.info.source)
    index = write_index(
        root / "index" / "part-0.parquet", emb, ids, ckpt, patient_pids=pids, pseudonyms=record
    )
    legacy = write_index(root / "legacy" / "part-0.parquet", emb, ids, ckpt, patient_pids=pids)
    upload = make_dicom(gradient(64, 64, seed=99), extra=issuer_tags("12345", namespace="SITE-A"))
    return {"blobs": blobs, "ids": ids, "index": index, "legacy": legacy, "upload": upload}


def test_same_patient_of_a_new_upload_uses_the_index_key_and_scheme(
    world, tmp_path, monkeypatch, caplog
):
    """A pooled archive, an upload it does not hold (site A's 12345): the server pseudonymises
    the upload's PatientID with the index's scheme, so site A's patient is left out and site
    B's 12345 (a stranger) is not; with another key, or an index that records none, it says so
    at start-up (once) and in each answer instead of silently excluding nothing."""
    archive = _pooled_archive(tmp_path, world["runner"])
    ids, upload = archive["ids"], archive["upload"]
    settings = _settings(secret_env=SERVE_KEY_ENV)

    def serve(index_path: Path, key: str) -> tuple[TestClient, list[str]]:
        monkeypatch.setenv(SERVE_KEY_ENV, key)
        caplog.clear()
        with caplog.at_level("WARNING", logger="serve.index"):
            app = create_app(
                world["embedder"],
                settings=settings,
                index=EmbeddingIndex.from_parquet(index_path),
            )
        return TestClient(app), [r.getMessage() for r in caplog.records]

    def same(client, data, media="application/dicom", **params):
        (res,) = _similar(client, data, media, k=6, exclude_same_patient="true", **params)[
            "results"
        ]
        return res

    client, warnings = serve(archive["index"], INGEST_KEY)
    assert warnings == []
    res = same(client, upload)
    assert res["same_patient"] == {"archive_row": False, "patient_id": "used"}
    assert {h["image_id"] for h in res["neighbours"]} == set(ids[2:])  # site B's 12345 stays
    assert (res["excluded_self"], res["excluded_patient"]) == (0, 2)
    res = same(client, archive["blobs"][2])  # site B's archived image: only site B's patient
    assert res["same_patient"] == {"archive_row": True, "patient_id": "used"}
    # recognised by its keyed id, which the plain hash of the file no longer finds
    assert res["image_id"] == ids[2] != hashlib.sha256(archive["blobs"][2]).hexdigest()
    assert res["image_id_match"] == "used"
    assert {h["image_id"] for h in res["neighbours"]} == {ids[0], ids[1], ids[4], ids[5]}
    assert (res["excluded_self"], res["excluded_patient"]) == (1, 1)
    res = same(client, world["pngs"][0], "image/png")  # a PNG names no patient
    assert res["same_patient"] == {"archive_row": False, "patient_id": "absent"}
    assert res["excluded_patient"] == 0
    (res,) = _similar(client, upload, "application/dicom", k=6)["results"]
    assert res["same_patient"] is None  # only with exclude_same_patient

    # the server's key is not ingest's: a warning at start-up for the pseudonyms and one for
    # the keyed image ids, and each answer says that neither could be matched
    client, warnings = serve(archive["index"], "another-serving-key-0123456789abcdef")
    assert len(warnings) == 2 and "is not the key" in warnings[0], warnings
    assert "include_self" in warnings[1] and "key_mismatch" in warnings[1]
    assert all(SERVE_KEY_ENV in w for w in warnings)
    assert not any(s in w for w in warnings for s in (INGEST_KEY, "another-serving-key", "SITE-A"))
    res = same(client, upload)
    assert res["same_patient"] == {"archive_row": False, "patient_id": "key_mismatch"}
    assert len(res["neighbours"]) == 6 and res["excluded_patient"] == 0
    # an archived file cannot be recognised under another key: said, not silently missed
    res = same(client, archive["blobs"][0])
    assert res["same_patient"] == {"archive_row": False, "patient_id": "key_mismatch"}
    assert res["image_id_match"] == "key_mismatch" and res["excluded_self"] == 0
    assert res["neighbours"][0]["image_id"] == ids[0]  # itself, as the answer warned

    # an index built before the record: cannot be checked, said at start-up and per answer
    client, warnings = serve(archive["legacy"], INGEST_KEY)
    assert len(warnings) == 1 and "does not record one pseudonymisation key" in warnings[0]
    res = same(client, upload)
    assert res["same_patient"] == {"archive_row": False, "patient_id": "used_unverified"}


def test_same_patient_is_unverified_for_an_index_assembled_across_schemes(
    world, tmp_path, monkeypatch, caplog
):
    """An index assembled from the pooled archive (issuer_and_patient_id) and a single-site
    DST ingested with the same key under patient_id: no one scheme makes an upload's pseudonym
    comparable with every part's, so answers must not say 'used' (they did: the key matched and
    the scheme, unknown, was taken for patient_id)."""
    from radjepa.imaging.deid import key_fingerprint

    archive = _pooled_archive(tmp_path, world["runner"])
    assembled = tmp_path / "assembled"
    assembled.mkdir()
    shutil.copy(archive["index"], assembled / "part-0.parquet")
    emb = np.random.default_rng(7).standard_normal((3, world["runner"].info.embed_dim))
    # the single site's DST: the same key, the default scheme
    record = {
        "key_fingerprint": key_fingerprint(INGEST_KEY.encode()),
        "patient_identity": "patient_id",
        "id_scheme": "hmac-sha256",
    }
    write_index(
        assembled / "part-1.parquet",
        emb.astype(np.float32),
        [f"{i:064x}" for i in range(3)],
        Path(world["runner"].info.source),
        pseudonyms=record,
    )
    monkeypatch.setenv(SERVE_KEY_ENV, INGEST_KEY)
    with caplog.at_level("WARNING", logger="serve.index"):
        index = EmbeddingIndex.from_parquet(assembled)
        app = create_app(
            world["embedder"], settings=_settings(secret_env=SERVE_KEY_ENV), index=index
        )
    assert app.state.upload_pseudonyms.status == "unverified"
    assert "different patient identity schemes" in caplog.text
    assert not any(s in caplog.text for s in (INGEST_KEY, "SITE-A", "12345"))
    (res,) = _similar(
        TestClient(app), archive["upload"], "application/dicom", k=6, exclude_same_patient="true"
    )["results"]
    assert res["same_patient"] == {"archive_row": False, "patient_id": "used_unverified"}


def test_an_index_mixing_image_id_schemes_is_refused(world, tmp_path):
    """Parts embedded from a DST with unkeyed ids and from one with keyed ids: an upload can
    be hashed only one way, so the other part's rows could never be recognised as the upload
    itself. Refused in one line, on the driver's column-only check too."""
    from radjepa.imaging.deid import key_fingerprint
    from serve.index import IndexLoadError

    ckpt = Path(world["runner"].info.source)
    record = {"key_fingerprint": key_fingerprint(b"k" * 32), "patient_identity": "patient_id"}
    mixed = tmp_path / "mixed"
    write_index(mixed / "part-0.parquet", world["emb"][:3], ["a" * 64, "b" * 64, "c" * 64], ckpt,
                pseudonyms={**record, "id_scheme": "hmac-sha256"})  # fmt: skip
    write_index(mixed / "part-1.parquet", world["emb"][3:], ["d" * 64, "e" * 64, "f" * 64], ckpt,
                pseudonyms=record)  # fmt: skip  # a record from before keyed ids
    for load in (EmbeddingIndex.from_parquet, EmbeddingIndex.recorded_id_scheme):
        with pytest.raises(IndexLoadError, match=r"2 image id schemes \(hmac-sha256, sha256\)"):
            load(mixed)
    # an index from before the record: unkeyed, as every index was
    assert EmbeddingIndex.recorded_id_scheme(mixed / "part-1.parquet") == "sha256"
    assert world["index"].image_id_scheme == "sha256"


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"include_self": "maybe"}, "include_self"),
        ({"exclude_patient_pid": "TEST-PATIENT"}, "exclude_patient_pid"),  # a raw id, not a pid
        ({"exclude_patient_pid": "ab" * 17}, "exclude_patient_pid"),  # 34 hex characters
        ([("exclude_patient_pid", pseudonym(str(i))) for i in range(101)], "exclude_patient_pid"),
        # a typo was ignored: the upload's own patient's other images came back, a 200
        ({"exclude_same_patients": "true"}, "unknown query parameter 'exclude_same_patients'"),
        # of a repeated scalar the last was kept: k=0&k=5 passed, k=5&k=0 was refused
        ([("k", "0"), ("k", "5")], "'k' given 2 times"),
        ([("include_self", "true"), ("include_self", "false")], "'include_self' given 2 times"),
    ],
)
def test_invalid_similar_options_are_a_422_naming_the_parameter(client, world, params, named):
    r = _post(client, "/v1/similar", world["pngs"][0], params=params)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["reason"] == "invalid_parameter" and named in body["detail"]
    assert "Traceback" not in r.text


def test_every_route_refuses_a_query_parameter_it_does_not_take(client, world):
    for path, media in (("/v1/embed", "image/png"), ("/v1/classify", "image/png")):
        r = _post(client, path, world["pngs"][0], media, params={"patch_token": "true"})
        assert r.status_code == 422 and r.json()["reason"] == "invalid_parameter", r.text
        assert "unknown query parameter 'patch_token'" in r.json()["detail"]
    assert client.get("/v1/models", headers=AUTH, params={"x": "1"}).status_code == 422
    # the key is checked first, and a list parameter may repeat
    assert client.get("/v1/models", params={"x": "1"}).status_code == 401
    two = [("exclude_patient_pid", pseudonym("a")), ("exclude_patient_pid", pseudonym("b"))]
    assert _post(client, "/v1/similar", world["pngs"][0], params=two).status_code == 200
    assert _post(client, "/v1/embed", world["pngs"][0], params={"patch_tokens": "true"}).is_success
    assert client.get("/healthz", params={"_": "1"}).status_code == 200  # ops routes: as before


def test_known_query_lets_any_collection_parameter_repeat_and_quotes_names_safely():
    from fastapi import Depends, FastAPI, Query

    from serve.guard import ApiError, error_response
    from serve.query_params import known_query

    app = FastAPI(dependencies=[Depends(known_query)])
    app.add_exception_handler(
        ApiError, lambda req, e: error_response(req, e.status, e.detail, e.reason)
    )

    @app.get("/t")
    def route(tags: Sequence[str] | None = Query(None), k: int = 1) -> dict:
        return {"tags": list(tags or ()), "k": k}

    with TestClient(app) as c:
        # a Sequence was taken for one value: a route declaring one refused its own repeats
        r = c.get("/t", params=[("tags", "a"), ("tags", "b")])
        assert r.status_code == 200 and r.json()["tags"] == ["a", "b"], r.text
        assert c.get("/t", params=[("k", "1"), ("k", "2")]).status_code == 422
        r = c.get("/t", params={"x\u202e" + "y" * 100: "1"})
        assert r.status_code == 422 and "(102 characters)" in r.json()["detail"], r.text
        assert "\u202e" not in r.json()["detail"]


def test_models_lists_model_head_and_index(client, world):
    body = client.get("/v1/models", headers=AUTH).json()
    assert body["model"]["embed_dim"] == world["runner"].info.embed_dim
    assert body["labels"] == list(world["head"].label_names)
    assert body["index_size"] == 6


def test_probes_and_docs_need_no_key(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    # open without a key: it names no model (a registry name and version, for anyone)
    assert client.get("/readyz").json() == {"ready": True}
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/v1/similar" in spec["paths"]
    # the key is declared, so a generated client sends it: every /v1 route, no probe
    assert spec["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from the service's keys file: `Authorization: Bearer <key>`.",
    }
    for path, operations in spec["paths"].items():
        for op in operations.values():
            assert (op.get("security") == [{"apiKey": []}]) is path.startswith("/v1/"), path
    # the declaration decides nothing: a missing or non-Bearer key is still this service's 401
    for headers in ({}, {"Authorization": "Basic dTpw"}):
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["detail"].startswith("missing API key"), r.text


def test_get_routes_answer_head_as_get_does(client):
    """HEAD of /healthz, /readyz and /v1/models was 405 (FastAPI routes answer only the methods
    they list) while /docs answered 200: a HEAD health check saw a healthy service as down."""
    import httpx

    with (
        on_loopback(client.app) as (host, port),
        httpx.Client(base_url=f"http://{host}:{port}") as c,
    ):
        for path, headers in (("/healthz", {}), ("/readyz", {}), ("/v1/models", AUTH)):
            got = c.get(path, headers=headers)
            head = c.head(path, headers=headers)
            assert (head.status_code, head.content) == (200, b""), path
            assert head.headers["content-type"] == got.headers["content-type"], path
        refused = c.head("/v1/models")
        assert refused.status_code == 401 and refused.headers["www-authenticate"]
        assert c.head("/v1/embed", headers=AUTH).status_code == 405  # a POST route stays POST
    assert "head" not in client.get("/openapi.json").json()["paths"]["/healthz"]


def test_a_path_with_a_trailing_slash_is_a_404_not_a_redirect(client, world):
    """POST /v1/embed/ was a 307 whose Location came from the Host header and the scheme the
    server saw (http behind a TLS-terminating ingress): a client following it sent the image
    again, to wherever that pointed. Paths are exact: a JSON 404 like any unknown path."""
    import httpx

    with (
        on_loopback(client.app) as (host, port),
        httpx.Client(
            base_url=f"http://{host}:{port}", headers={"host": "radjepa.example.org"}
        ) as c,
    ):
        for method, path in (("POST", "/v1/embed/"), ("GET", "/healthz/"), ("GET", "/v1/models/")):
            r = c.request(
                method,
                path,
                content=world["pngs"][0] if method == "POST" else None,
                headers={**AUTH, "content-type": "image/png"},
            )
            assert r.status_code == 404, (path, r.status_code, r.headers.get("location"))
            assert "location" not in r.headers
            body = r.json()
            assert body == {
                "detail": "Not Found",
                "reason": None,
                "filename": None,
                "request_id": r.headers["x-request-id"],
            }


def test_classify_and_similar_answer_503_when_not_configured(world):
    bare = TestClient(create_app(world["embedder"], settings=_settings()))
    for path in ("/v1/classify", "/v1/similar"):
        r = _post(bare, path, world["pngs"][0])
        assert r.status_code == 503
        assert "configured" in r.json()["detail"]


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "missing"),
        ({"Authorization": f"Bearer {OTHER_KEY}"}, "invalid"),
        ({"Authorization": f"Basic {API_KEY}"}, "missing"),
    ],
)
def test_missing_or_wrong_key_is_401_with_challenge(client, world, headers, why):
    r = _post(client, "/v1/embed", world["pngs"][0], headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert why in r.json()["detail"]
    assert client.get("/v1/models", headers=headers).status_code == 401


def _truncated_dicom(world) -> bytes:
    full = dicom_from_png(world["png_paths"][0])
    return full[: len(full) // 2]


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("text_plain", 415),
        ("no_content_type", 415),
        ("multipart_text_part", 415),
        ("declared_too_large", 413),
        ("streamed_too_large", 413),
        ("truncated_dicom", 422),
        ("junk_bytes", 422),
        ("empty_body", 422),
        ("multipart_without_files", 422),
        ("bad_k", 422),
    ],
)
def test_bad_input_gets_its_4xx_never_a_500(client, world, case, status):
    png = world["pngs"][0]
    if case == "text_plain":
        r = _post(client, "/v1/embed", b"hello", "text/plain")
    elif case == "no_content_type":
        r = client.post("/v1/embed", content=png, headers=AUTH)
    elif case == "multipart_text_part":
        r = client.post("/v1/embed", files={"f": ("a.txt", b"hi", "text/plain")}, headers=AUTH)
    elif case == "declared_too_large":
        r = _post(
            client, "/v1/embed", b"x" * 16, headers={**AUTH, "content-length": str(MAX_BODY + 1)}
        )
    elif case == "streamed_too_large":
        chunks = (b"\0" * 65536 for _ in range(MAX_BODY // 65536 + 2))  # chunked: no length
        r = _post(client, "/v1/embed", chunks, "application/dicom")
    elif case == "truncated_dicom":
        r = _post(client, "/v1/embed", _truncated_dicom(world), "application/dicom")
    elif case == "junk_bytes":
        r = _post(client, "/v1/embed", np.random.default_rng(1).bytes(4096), "image/jpeg")
    elif case == "empty_body":
        r = _post(client, "/v1/embed", b"")
    elif case == "multipart_without_files":
        body = b'--B\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--B--\r\n'
        r = _post(client, "/v1/embed", body, "multipart/form-data; boundary=B")
    else:
        r = _post(client, "/v1/similar", png, params={"k": 0})
    assert r.status_code == status, r.text
    body = r.json()
    assert body["detail"] and "Traceback" not in r.text
    if status == 422 and case not in ("bad_k",):
        assert body["reason"]


def _multipart_head(filename: str = "a.png") -> bytes:
    return (
        b'--B\r\nContent-Disposition: form-data; name="files"; filename="'
        + filename.encode()
        + b'"\r\nContent-Type: image/png\r\n\r\n'
    )


@pytest.mark.parametrize(
    ("media", "start"),
    [("image/png", None), ("multipart/form-data; boundary=B", _multipart_head())],
)
def test_a_client_leaving_mid_upload_is_not_logged_as_a_server_error(
    client, world, caplog, media, start
):
    """A client that closes its connection before its body arrived ended in ClientDisconnect,
    logged at ERROR as an "unhandled error" with a 40-line traceback: any client could fill
    the server log with fake server faults. It is one INFO line now."""
    caplog.set_level(logging.INFO, logger="serve.app")
    png = world["pngs"][0]
    sent = (start or b"") + png[: len(png) // 2]
    with on_loopback(client.app) as (host, port), socket.create_connection((host, port)) as s:
        s.sendall(
            f"POST /v1/embed HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: {media}\r\nContent-Length: {len(sent) + len(png)}\r\n\r\n".encode()
            + sent
        )
        s.shutdown(socket.SHUT_RDWR)
        s.close()
        deadline = time.monotonic() + 30  # until the app has said something about it
        while time.monotonic() < deadline and not [
            r for r in caplog.records if r.name == "serve.app" and "/v1/embed" in r.getMessage()
        ]:
            time.sleep(0.02)
    said = [r for r in caplog.records if r.name == "serve.app"]
    assert said, "the app never noticed the disconnect"
    assert all(r.levelno < logging.WARNING for r in said), [r.getMessage() for r in said]
    assert all(r.exc_info is None for r in said)
    assert "disconnected" in said[0].getMessage()


@pytest.mark.parametrize(
    "disposition",
    [
        'form-data; name="files"',  # what requests/httpx send for a file tuple with filename None
        "form-data; name=\"files\"; filename*=UTF-8''%C3%A9.dcm",  # RFC 5987 name only
    ],
)
def test_a_multipart_part_without_a_filename_is_refused_not_skipped(client, world, disposition):
    """A part without a filename is a text field to the multipart parser: it was skipped, so a
    request with two images answered 200 for one (results no longer matched the files sent),
    and a request with only such a part got "holds no files"."""
    import httpx

    dcm = dicom_from_png(world["png_paths"][0])
    body = (
        b'--B\r\nContent-Disposition: form-data; name="files"; filename="a.dcm"\r\n'
        b"Content-Type: application/dicom\r\n\r\n" + dcm + b"\r\n"
        b"--B\r\nContent-Disposition: " + disposition.encode() + b"\r\n"
        b"Content-Type: image/png\r\n\r\n" + world["pngs"][1] + b"\r\n--B--\r\n"
    )
    headers = {**AUTH, "content-type": "multipart/form-data; boundary=B"}
    with on_loopback(client.app) as (host, port):
        r = httpx.post(f"http://{host}:{port}/v1/classify", content=body, headers=headers)
    assert r.status_code == 422, r.text
    assert r.json()["reason"] == "not_a_file"
    assert "'files'" in r.json()["detail"] and "filename" in r.json()["detail"]


def _part(headers: bytes, data: bytes = b"xx") -> bytes:
    return b"--B\r\n" + headers + b"\r\n\r\n" + data + b"\r\n"


FILE_PART = b'Content-Disposition: form-data; name="files"; filename="a.png"'
MALFORMED_MULTIPART = {
    # a header line over python-multipart's 4 KB limit: a bare "Invalid multipart data."
    "long_part_header": (
        _part(FILE_PART + b"\r\nX-Pad: " + b"a" * 5000) + b"--B--\r\n",
        "multipart/form-data; boundary=B",
        ("multipart_header_too_large", "4224 bytes", "shorter filename"),
    ),
    "too_many_part_headers": (
        _part(FILE_PART + b"".join(b"\r\nX-%d: 1" % i for i in range(9))) + b"--B--\r\n",
        "multipart/form-data; boundary=B",
        ("invalid_multipart", "more than 8 headers"),
    ),
    "no_boundary": (
        _part(FILE_PART) + b"--B--\r\n",
        "multipart/form-data",
        ("invalid_multipart", "without a boundary", "boundary=..."),
    ),
    "boundary_not_in_body": (
        _part(FILE_PART) + b"--B--\r\n",
        "multipart/form-data; boundary=OTHER",
        ("invalid_multipart", "malformed multipart body", "boundary parameter"),
    ),
    "content_disposition_without_name": (
        _part(b"Content-Disposition: attachment") + b"--B--\r\n",
        "multipart/form-data; boundary=B",
        ("invalid_multipart", "Content-Disposition", "curl -F files=@a.dcm"),
    ),
    "no_content_disposition": (
        _part(b"Content-Type: image/png") + b"--B--\r\n",
        "multipart/form-data; boundary=B",
        ("invalid_multipart", "Content-Disposition", "curl -F files=@a.dcm"),
    ),
}


def test_a_malformed_multipart_body_is_a_json_error_saying_what_to_fix(world):
    """Starlette's own 400s: "Invalid multipart data." with no reason for a part header over
    its 4 KB line limit or a body that does not follow its boundary; its wording and no reason
    for a missing boundary or Content-Disposition name. Each now has a reason and a message
    naming what to change."""
    import httpx

    app = create_app(world["embedder"], settings=_settings())
    with on_loopback(app) as (host, port):
        for case, (body, media, says) in MALFORMED_MULTIPART.items():
            r = httpx.post(
                f"http://{host}:{port}/v1/embed",
                content=body,
                headers={**AUTH, "content-type": media},
            )
            assert r.status_code == 400, (case, r.text)
            out = r.json()
            assert out["reason"] == says[0], (case, out)
            assert all(x in out["detail"] for x in says[1:]), (case, out)
            assert out["request_id"] == r.headers["x-request-id"]
        # one more part than a request may hold is the limit's own refusal, not a 400
        parts = b"".join(_part(FILE_PART) for _ in range(65)) + b"--B--\r\n"
        r = httpx.post(
            f"http://{host}:{port}/v1/embed",
            content=parts,
            headers={**AUTH, "content-type": "multipart/form-data; boundary=B"},
        )
        assert r.status_code == 422, r.text
        assert r.json()["reason"] == "too_many_images" and "at most 64" in r.json()["detail"]


def test_the_swagger_page_is_the_operators_choice_and_redoc_is_never_served(client, world):
    # /redoc and /docs/oauth2-redirect were open and undocumented, ReDoc pulling scripts and
    # Google's fonts from public CDNs; /docs (Swagger UI from a CDN, where users type their key)
    # could not be turned off for a production service
    from radjepa.config import ServeConfig, load_config
    from serve.security import settings_from_config

    for path in ("/redoc", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404, path
    with TestClient(create_app(world["embedder"], settings=_settings(docs_page=False))) as c:
        assert c.get("/docs").status_code == 404
        assert "/v1/embed" in c.get("/openapi.json").json()["paths"]
    # the setting reaches the app; the cluster's config turns the page off
    local = ServeConfig(docs_page=False, insecure_local=True)
    assert not settings_from_config(local, secret_env="X", allow_development_key=True).docs_page
    assert ServeConfig().docs_page
    cluster = Path(__file__).resolve().parents[1] / "configs" / "serve.yaml"
    assert not load_config(cluster).serve.docs_page


def test_two_authorization_or_content_type_headers_are_refused_whichever_comes_first(client, world):
    # the first of each was used: a proxy, WAF or audit layer in front reading the last one
    # authenticated, or inspected, something other than what the service acted on
    png, bad = world["pngs"][0], "Bearer not-a-key-of-this-service"
    for order in ((AUTH["Authorization"], bad), (bad, AUTH["Authorization"])):
        headers = [("authorization", v) for v in order] + [("content-type", "image/png")]
        r = client.post("/v1/embed", content=png, headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["detail"].startswith("several Authorization headers"), r.text
    for order in (("image/png", "text/plain"), ("text/plain", "image/png")):
        headers = [("authorization", AUTH["Authorization"])]
        r = client.post(
            "/v1/embed", content=png, headers=headers + [("content-type", t) for t in order]
        )
        assert r.status_code == 415 and r.json()["reason"] == "unsupported_media_type", r.text
        assert "several Content-Type headers" in r.json()["detail"]
    assert (
        client.post(
            "/v1/embed", content=png, headers={**AUTH, "content-type": "image/png"}
        ).status_code
        == 200
    )


def test_a_415_quotes_the_content_type_short_and_printable(world):
    """The 415 repeated the client's Content-Type whole: a 12 KB header came back in the body,
    bytes outside printable ASCII included (and would land in any log of error bodies). It is
    cut to 64 printable characters, with the length it had."""
    import httpx

    app = create_app(world["embedder"], settings=_settings())
    sent = b"text/" + b"a" * 12000 + b"\xff\x80"
    part = _part(FILE_PART + b"\r\nContent-Type: image/\x7f\x1b[31m" + b"b" * 4000, b"x")
    with on_loopback(app) as (host, port):
        url = f"http://{host}:{port}/v1/embed"
        whole = httpx.post(url, content=b"x", headers={**AUTH, "content-type": sent})
        in_part = httpx.post(
            url,
            content=part + b"--B--\r\n",
            headers={**AUTH, "content-type": "multipart/form-data; boundary=B"},
        )
    for r, length in ((whole, 12007), (in_part, 4012)):
        assert r.status_code == 415, r.text
        detail = r.json()["detail"]
        assert r.json()["reason"] == "unsupported_media_type"
        assert len(detail) < 300, detail
        assert f"({length} characters)" in detail, detail
        assert detail.isascii() and detail.isprintable(), detail
    assert "'text/" + "a" * 59 + "...'" in whole.json()["detail"]
    assert "'image/??[31m" in in_part.json()["detail"]


@pytest.mark.parametrize("coding", ["gzip", "identity, gzip", "br"])
@pytest.mark.parametrize("multipart", [False, True], ids=["raw", "multipart"])
def test_a_compressed_body_is_a_415_naming_its_content_encoding(world, coding, multipart):
    """A gzip body was answered as an image that is not one (422 not_an_image) or as a
    malformed multipart body (400): neither said that the server does not take compressed
    bodies. It is a 415 naming the coding, answered before the body is read (the connection
    closes, as for every answer given before the body)."""
    import gzip

    import httpx

    app = create_app(world["embedder"], settings=_settings())
    png = world["pngs"][0]
    if multipart:
        body = _part(FILE_PART + b"\r\nContent-Type: image/png", png) + b"--B--\r\n"
        media = "multipart/form-data; boundary=B"
    else:
        body, media = png, "image/png"
    headers = {**AUTH, "content-type": media}
    with on_loopback(app) as (host, port), httpx.Client(base_url=f"http://{host}:{port}") as c:
        r = c.post(
            "/v1/embed",
            content=gzip.compress(body),
            headers={**headers, "content-encoding": coding},
        )
        assert r.status_code == 415, r.text
        assert r.json()["reason"] == "unsupported_content_encoding"
        named = coding.split(", ")[-1]
        assert f"'{named}'" in r.json()["detail"], r.json()["detail"]
        assert r.headers.get("connection") == "close"
        # identity is no coding at all: answered as a body sent without the header
        plain = {**headers, "content-encoding": "identity"}
        assert c.post("/v1/embed", content=body, headers=plain).status_code == 200


def test_error_reason_examples_in_the_openapi_schema_are_real_reasons(client):
    """ErrorOut.reason's description gave 'not_dicom' as its example, a code no response
    carries (a DICOM that fails to parse is 'not_an_image' or 'truncated')."""
    import re

    from radjepa.imaging.errors import REASONS

    described = client.get("/openapi.json").json()["components"]["schemas"]["ErrorOut"]
    text = described["properties"]["reason"]["description"]
    examples = re.findall(r"'([a-z_]+)'", text)
    assert examples and set(examples) <= REASONS, text


def test_malformed_multipart_bodies_leave_no_parser_warning_in_the_log(world, caplog):
    """python-multipart logged a WARNING ("Did not find CR at end of boundary (4)", ...) for
    every body that breaks its grammar, before the 400 that names the fault: a client or a
    scanner sending junk wrote one line to the replica's log per request. The client still
    gets its 400; the parser's own ERRORs (server faults) still reach the log."""
    import httpx

    caplog.set_level(logging.DEBUG)
    junk = {
        **{case: (body, media) for case, (body, media, _) in MALFORMED_MULTIPART.items()},
        "bad_crlf_after_boundary": (b"--B\rX\r\n", "multipart/form-data; boundary=B"),
        "nul_in_part_header": (b"--B\r\n\x00bad\r\n\r\n", "multipart/form-data; boundary=B"),
    }
    app = create_app(world["embedder"], settings=_settings())
    with on_loopback(app) as (host, port):
        caplog.clear()  # the start-up lines
        for case, (body, media) in junk.items():
            r = httpx.post(
                f"http://{host}:{port}/v1/embed",
                content=body,
                headers={**AUTH, "content-type": media},
            )
            assert r.status_code == 400 and r.json()["reason"], (case, r.text)
    said = [r for r in caplog.records if r.levelno >= logging.INFO and r.name != "httpx"]
    assert not said, [(r.name, r.getMessage()) for r in said]
    logging.getLogger("python_multipart.multipart").error("cannot open a temporary file")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("python_multipart")] == [
        "cannot open a temporary file"
    ]


def test_a_multipart_body_cut_short_is_refused_not_answered_in_part(world):
    """Neither Starlette nor python-multipart checks that a body reaches its closing
    --BOUNDARY-- line: a body cut after its first file was a 200 for that file, the rest
    dropped without a word (and one cut inside its only file "holds no files")."""
    import httpx

    png = world["pngs"][0]
    whole = _multipart_head("a.png") + png + b"\r\n"
    cut = {
        "inside_the_second_file": whole + _multipart_head("b.png") + png[:5000],
        "after_the_second_file": whole + _multipart_head("b.png") + png + b"\r\n",
        "inside_the_only_file": _multipart_head("a.png") + png[:5000],
    }
    app = create_app(world["embedder"], settings=_settings())
    headers = {**AUTH, "content-type": "multipart/form-data; boundary=B"}
    with on_loopback(app) as (host, port):
        url = f"http://{host}:{port}/v1/embed"
        for case, body in cut.items():
            r = httpx.post(url, content=body, headers=headers)
            assert r.status_code == 400, (case, r.text)
            assert r.json()["reason"] == "invalid_multipart", (case, r.text)
            assert "cut short" in r.json()["detail"], (case, r.text)
        r = httpx.post(url, content=whole + b"--B--\r\n", headers=headers)
        assert r.status_code == 200 and len(r.json()["results"]) == 1, r.text
        for empty in (b"", b"--B--\r\n"):  # no part at all: no files, not "cut short"
            r = httpx.post(url, content=empty, headers=headers)
            assert r.status_code == 422 and r.json()["reason"] == "no_files", (empty, r.text)


def test_error_bodies_name_an_uploaded_file_bounded_and_printable(world):
    """Error bodies repeated a multipart file name whole: up to the ~4 KB a part header holds,
    control characters (an ANSI escape, a right-to-left override) included. They name it by
    its printable characters, at most 120, so a multi-file request still tells which file."""
    import httpx

    png = world["pngs"][0]
    hostile = "\x1b[31mred\u202eevil\x7f\u2028" + "A" * 3000 + ".dcm"
    cases = {
        "undecodable": [("files", (hostile, b"not an image", "application/octet-stream"))],
        "part_type": [("files", (hostile, png, "text/plain"))],
        "empty_part": [
            ("files", ("ok.png", png, "image/png")),
            ("files", (hostile, b"", "image/png")),
        ],
        "plain_name": [("files", ("scan é 01.dcm", b"not an image", "application/dicom"))],
    }
    app = create_app(world["embedder"], settings=_settings())
    with on_loopback(app) as (host, port):
        out = {
            case: httpx.post(f"http://{host}:{port}/v1/embed", files=files, headers=AUTH)
            for case, files in cases.items()
        }
    for case, r in out.items():
        assert 400 <= r.status_code < 500 and r.json()["reason"], (case, r.text)
    for case in ("undecodable", "part_type", "empty_part"):
        name = out[case].json()["filename"]
        assert name == ("[31mredevil" + "A" * 3000)[:117] + "...", (case, name)
        assert "AAA" * 1000 not in out[case].text
    assert out["plain_name"].json()["filename"] == "scan é 01.dcm"


def test_results_name_an_uploaded_file_as_error_bodies_do(world, client):
    """Results echoed the part's file name as sent: a client's full path (a patient's name and
    a study UID in its folders), control characters, kilobytes; error bodies were bounded. A
    result names the file by its last path part, printable and bounded, for every route."""
    png = world["pngs"][0]
    sent = "/archive/DOE^JANE/1.2.840.99/\x1b[31mIMG\u202e0001.png"
    for route in ("/v1/embed", "/v1/classify", "/v1/similar"):
        files = [("files", (sent, png, "image/png")), ("files", ("b.png", png, "image/png"))]
        r = client.post(route, files=files, headers=AUTH)
        assert r.status_code == 200, (route, r.text)
        names = [res["filename"] for res in r.json()["results"]]
        assert names == ["[31mIMG0001.png", "b.png"], (route, names)
        assert "DOE" not in r.text, route
    windows = "C:\\Users\\DOE^JANE\\scan.png"
    from serve.guard import shown_filename

    assert shown_filename(windows) == "scan.png" and shown_filename("/archive/a/b/") == "b"


@pytest.mark.parametrize("framing", ["declared", "chunked"])
def test_a_body_over_the_limit_gets_413_and_the_connection_closed(client, framing):
    """After the 413 the connection stayed open, the server reading and discarding the rest of
    the body for as long as the client kept sending (a declared 10 GB, or endless chunks), past
    every deadline. The 413 now says Connection: close and the server closes at once."""
    head = f"POST /v1/embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
    head += "Content-Type: application/dicom\r\n"
    if framing == "declared":
        head += f"Content-Length: {10 * 1024**3}\r\n\r\n"
        body = b"\0" * 65536
    else:
        head += "Transfer-Encoding: chunked\r\n\r\n"
        body = (b"10000\r\n" + b"\0" * 65536 + b"\r\n") * (MAX_BODY // 65536 + 1)
    more = b"\0" * 65536 if framing == "declared" else b"10000\r\n" + b"\0" * 65536 + b"\r\n"
    with on_loopback(client.app) as (host, port):
        # then it keeps sending, for longer than uvicorn's 5 s keep-alive timeout
        answer, closed = answer_then_keep_sending(host, port, head.encode() + body, more, 8)
    assert closed, "the server still read the body after its 413"
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 413 Request Entity Too Large", answer[:200]
    assert b"\r\nconnection: close\r\n" in rest.lower()
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["reason"] == "too_large"


@pytest.mark.parametrize(
    ("case", "status"), [("deadline_mid_body", 504), ("no_key", 401), ("wrong_route", 405)]
)
@pytest.mark.parametrize("framing", ["declared", "chunked"])
def test_an_answer_given_before_the_body_arrived_closes_the_connection(
    world, case, status, framing
):
    """A client that trickled its body (a byte at a time, or stuck) got its 504 after
    serve.request_timeout_s, or its 401 at once, and the connection then stayed open: the server
    went on reading and discarding the body for as long as the client kept sending, past every
    deadline (under Ray Serve, in the proxy, as under uvicorn). Such an answer now says
    Connection: close and the server closes, as it does after a 413."""
    app = create_app(world["embedder"], settings=_settings(request_timeout_s=1.0))
    auth = "" if case == "no_key" else f"Authorization: Bearer {API_KEY}\r\n"
    path = "/v1/models" if case == "wrong_route" else "/v1/embed"
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: image/png\r\n"
    if framing == "declared":
        head += "Content-Length: 1000000\r\n\r\n"
        start, more = world["pngs"][0][:100], b"x"
    else:
        head += "Transfer-Encoding: chunked\r\n\r\n"
        start, more = b"64\r\n" + world["pngs"][0][:100] + b"\r\n", b"1\r\nx\r\n"
    with on_loopback(app) as (host, port):
        # longer than the deadline plus uvicorn's 5 s keep-alive timeout
        answer, closed = answer_then_keep_sending(host, port, head.encode() + start, more, 8.0)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split(b" ")[1] == str(status).encode(), answer[:300]
    assert closed, "the server still read the body after answering"
    assert b"\r\nconnection: close\r\n" in rest.lower()
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["request_id"]


def test_answers_to_whole_requests_keep_the_connection_open(client, world):
    """The close is for a body that had not arrived: a request whose body the app read keeps
    its connection, whatever it was answered (200, 422), as does a GET."""
    import httpx

    with (
        on_loopback(client.app) as (host, port),
        httpx.Client(base_url=f"http://{host}:{port}") as c,
    ):
        for method, path, body in [
            ("POST", "/v1/embed", world["pngs"][0]),
            ("POST", "/v1/embed", b"not an image"),
            ("GET", "/v1/models", None),
        ]:
            r = c.request(method, path, content=body, headers={**AUTH, "content-type": "image/png"})
            assert r.status_code in (200, 422)
            assert r.headers.get("connection") != "close", (path, r.status_code)


def test_unexpected_failure_is_a_generic_500_whose_request_id_is_in_the_log(world, caplog):
    """A 500 said only "internal server error": nothing in it matched the traceback in the
    server log, so an operator could not find which of many tracebacks a caller's failure was.
    Body, X-Request-ID header and the logged traceback now carry the same id (the caller's own
    when it sent a valid one)."""
    import httpx

    runner = EncoderRunner.from_checkpoint(Path(world["runner"].info.source))
    app = create_app(LocalEmbedder(runner), settings=_settings())
    runner.encoder = None  # the model vanished under the service: a server fault
    caplog.set_level(logging.ERROR, logger="serve.app")
    headers = {**AUTH, "content-type": "image/png"}
    with (
        on_loopback(app) as (host, port),
        httpx.Client(base_url=f"http://{host}:{port}") as c,
    ):
        mine = c.post(
            "/v1/embed", content=world["pngs"][0], headers={**headers, "x-request-id": "ris-42:7"}
        )
        made = c.post("/v1/embed", content=world["pngs"][0], headers=headers)
    for r, rid in ((mine, "ris-42:7"), (made, made.headers.get("x-request-id"))):
        assert r.status_code == 500
        assert r.json()["detail"] == "internal server error" and "NoneType" not in r.text
        assert "Traceback" not in r.text
        assert rid and r.json()["request_id"] == r.headers["x-request-id"] == rid
        (record,) = [x for x in caplog.records if rid in x.getMessage()]
        assert record.exc_info is not None and record.exc_info[0] is AttributeError
    assert len(made.headers["x-request-id"]) == 32  # a fresh uuid4, hex


@pytest.mark.parametrize(
    ("supplied", "kept"),
    [
        ("0b5a7c1e-4f2d-4c1a-9e3b-6d8f0a2b4c6e", True),
        ("trace.1:span_2-x", True),
        ("x" * 128, True),
        ("x" * 129, False),  # a 16 KB header would be copied into every log line and body
        ("a b", False),
        ('a"b', False),
        ("", False),
        ("é", False),
    ],
)
def test_every_response_carries_a_request_id_the_callers_when_valid(client, world, supplied, kept):
    """No response said which request it answered. Now each carries X-Request-ID: the caller's
    (at most 128 of [A-Za-z0-9._:-]) or a fresh one in its place; error bodies repeat it."""
    import httpx

    with (
        on_loopback(client.app) as (host, port),
        httpx.Client(base_url=f"http://{host}:{port}") as c,
    ):
        sent = {"x-request-id": supplied.encode()}
        answers = [
            c.get("/healthz", headers=sent),
            c.get("/v1/models", headers={**AUTH, **sent}),
            c.get("/v1/models", headers=sent),  # 401
            c.get("/nowhere", headers=sent),  # 404
            c.post(
                "/v1/embed", content=b"x", headers={**AUTH, **sent, "content-type": "text/plain"}
            ),
            c.post(
                "/v1/embed",
                content=(b"\0" * 65536 for _ in range(MAX_BODY // 65536 + 2)),  # chunked
                headers={**AUTH, **sent, "content-type": "image/png"},
            ),
            c.post(
                "/v1/embed",
                content=world["pngs"][0],
                headers={**AUTH, **sent, "content-type": "image/png"},
            ),
        ]
    assert [r.status_code for r in answers] == [200, 200, 401, 404, 415, 413, 200]
    ids = set()
    for r in answers:
        (rid,) = r.headers.get_list("x-request-id")
        ids.add(rid)
        if r.status_code >= 400:
            assert r.json()["request_id"] == rid
        if kept:
            assert rid == supplied
        else:
            assert rid != supplied and len(rid) == 32
    assert len(ids) == (1 if kept else len(answers))  # a fresh id per request


def test_no_response_names_a_server_path(world, tmp_path):
    """GET /v1/models told any key holder where the checkpoint, the probe head and the index
    lie on the server (and every answer's model.source the checkpoint's): user names, mount
    points, bucket names. Answers now name the weights by registry reference and content hash,
    the head and index by content hash; the paths are in the server log only."""
    import httpx

    from radjepa.eval.heads import checkpoint_fingerprint

    ckpt = Path(world["runner"].info.source)
    private = str(world["root"])
    app = create_app(
        world["embedder"],
        settings=_settings(),
        head=world["head"],
        index=world["index"],
        head_source=str(world["head_dir"]),
    )
    png = {**AUTH, "content-type": "image/png"}
    with (
        on_loopback(app) as (host, port),
        httpx.Client(base_url=f"http://{host}:{port}") as c,
    ):
        answers = [
            c.get("/v1/models", headers=AUTH),
            c.get("/healthz"),
            c.get("/readyz"),
            c.get("/openapi.json"),
            c.post("/v1/embed", content=world["pngs"][0], headers=png),
            c.post("/v1/classify", content=world["pngs"][0], headers=png),
            c.post("/v1/similar", content=world["pngs"][0], headers=png),
            c.post(
                "/v1/embed",
                content=_truncated_dicom(world),
                headers={**AUTH, "content-type": "application/dicom"},
            ),
            c.post("/v1/similar", content=world["pngs"][0], headers=png, params={"k": 0}),
        ]
    for r in answers:
        assert private not in r.text and "/tmp" not in r.text, (r.request.url, r.text[:300])
    models = answers[0].json()
    assert models["model"]["sha256"] == checkpoint_fingerprint(ckpt)
    assert models["model"]["reference"] is None  # a checkpoint folder: no registry reference
    assert "source" not in models["model"]
    assert models["head"].startswith("sha256:") and len(models["head"]) == 7 + 16
    assert models["index"].startswith("sha256:") and len(models["index"]) == 7 + 16
    assert answers[5].json()["head"] == models["head"]
    for r in answers[4:7]:
        assert r.json()["model"] == models["model"]
    # stable: the same head and index loaded again (another replica, a restart) say the same
    from radjepa.eval.heads import load_head

    again = create_app(
        world["embedder"],
        settings=_settings(),
        head=load_head(world["head_dir"]),
        index=EmbeddingIndex.from_parquet(world["index"].source),
        head_source=str(tmp_path),
    )
    assert TestClient(again).get("/v1/models", headers=AUTH).json() == models


def test_request_deadline_gives_504(world):
    app = create_app(world["embedder"], settings=_settings(request_timeout_s=1e-4))
    r = _post(TestClient(app), "/v1/embed", world["pngs"][0])
    assert r.status_code == 504 and r.json()["reason"] == "timeout"


@pytest.mark.parametrize("said", [False, True])
def test_start_warnings_are_left_to_the_command_that_said_them(world, caplog, said):
    """`radjepa serve` says on its terminal that the API runs without keys and with the public
    development key, then each API replica said both again (create_app), its lines forwarded
    by Ray to the same terminal. Settings marked start_warnings_said keep the replica quiet."""
    caplog.set_level(logging.WARNING)
    settings = ApiSettings(
        insecure_local=True, allow_development_key=True, start_warnings_said=said
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RADJEPA_DEID_SECRET", raising=False)
        create_app(world["embedder"], settings=settings)
    said_now = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    keyless = [m for m in said_now if "insecure local mode" in m]
    public = [m for m in said_now if "PUBLIC development key" in m]
    assert (len(keyless), len(public)) == ((0, 0) if said else (1, 1)), said_now


def test_refuses_to_start_without_keys_unless_insecure_local(world, monkeypatch, tmp_path):
    from radjepa.config import ServeConfig

    monkeypatch.delenv("RADJEPA_API_KEYS", raising=False)
    with pytest.raises(SecurityConfigError, match="no API keys"):
        create_app(world["embedder"], settings=ApiSettings())
    with pytest.raises(SecurityConfigError, match="insecure-local"):
        settings_from_config(ServeConfig(), secret_env="X", allow_development_key=False)
    local = TestClient(
        create_app(
            world["embedder"],
            settings=ApiSettings(insecure_local=True, allow_development_key=True),
        )
    )
    assert _post(local, "/v1/embed", world["pngs"][0], headers={}).status_code == 200
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert settings_from_config(
            ServeConfig(host=host, insecure_local=True), secret_env="X", allow_development_key=False
        )

    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# service keys\n{API_KEY}\n\n")
    monkeypatch.setenv("RADJEPA_API_KEYS", f" {OTHER_KEY} ,")
    from_env, from_file = load_api_keys("RADJEPA_API_KEYS", keyfile)
    assert (set(from_env), set(from_file)) == ({key_digest(OTHER_KEY)}, {key_digest(API_KEY)})
    s = settings_from_config(
        ServeConfig(api_keys_file=str(keyfile)), secret_env="X", allow_development_key=False
    )
    assert set(s.key_digests) == {key_digest(API_KEY), key_digest(OTHER_KEY)}
    assert API_KEY not in s.model_dump_json()  # only digests travel
    monkeypatch.setenv("RADJEPA_API_KEYS", "short")
    with pytest.raises(SecurityConfigError, match="shorter than 16"):
        load_api_keys("RADJEPA_API_KEYS", None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.2", "radjepa.example.org"])
def test_keyless_mode_is_refused_on_a_host_other_machines_reach(monkeypatch, host):
    """`radjepa serve --insecure-local --set serve.host=0.0.0.0` started, and the keyless API
    answered on the machine's network address (reproduced with curl to its non-loopback IP):
    "local only" was a promise nothing kept. Refused at settings time, before Ray starts;
    with keys configured the host is free."""
    from radjepa.config import ServeConfig

    monkeypatch.delenv("RADJEPA_API_KEYS", raising=False)
    with pytest.raises(SecurityConfigError, match=f"refuses serve.host={host}"):
        settings_from_config(
            ServeConfig(host=host, insecure_local=True), secret_env="X", allow_development_key=False
        )
    monkeypatch.setenv("RADJEPA_API_KEYS", API_KEY)
    keyed = settings_from_config(
        ServeConfig(host=host, insecure_local=True), secret_env="X", allow_development_key=False
    )
    assert keyed.key_digests == (key_digest(API_KEY),)


def test_head_or_index_of_the_wrong_size_is_refused(world):
    small = EmbeddingIndex(np.ones((2, 3), np.float32), ["a", "b"])
    with pytest.raises(ValueError, match="rebuild it"):
        create_app(world["embedder"], settings=_settings(), index=small)


def test_openapi_fuzz_finds_no_server_error(client):
    """schemathesis generates requests from /openapi.json for every operation (bounded)."""
    import schemathesis

    fuzz_openapi(schemathesis.openapi.from_asgi("/openapi.json", client.app), AUTH, 6)


def test_head_for_another_encoder_is_refused(world, tmp_path):
    from radjepa.eval.heads import checkpoint_fingerprint, load_head

    dim = world["runner"].info.embed_dim
    other = load_head(make_head(tmp_path / "h", dim + 1))
    with pytest.raises(ValueError, match="train a head on this encoder"):
        create_app(world["embedder"], settings=_settings(), head=other)
    # same size, another checkpoint: the head's recorded fingerprint gives it away
    ckpt = Path(world["runner"].info.source)
    own = load_head(make_head(tmp_path / "own", dim, encoder=ckpt))
    mine = checkpoint_fingerprint(ckpt)
    assert own.encoder["sha256"] == mine
    create_app(world["embedder"], settings=_settings(), head=own, encoder_fingerprint=mine)
    with pytest.raises(ValueError, match="fitted on encoder .* train a head on this encoder"):
        create_app(world["embedder"], settings=_settings(), head=own, encoder_fingerprint="f" * 64)
    # a registered copy of the same checkpoint (no optimizer state) is the same encoder
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("weights.safetensors", "meta.json"):
        shutil.copy(ckpt / name, copy / name)
    assert checkpoint_fingerprint(copy) == mine


def test_head_probed_on_the_context_encoder_is_refused(world, tmp_path):
    # one checkpoint holds both encoders, so the fingerprint matches: only `which` differs
    from radjepa.eval.heads import load_head

    ckpt, dim = Path(world["runner"].info.source), world["runner"].info.embed_dim
    context = load_head(make_head(tmp_path / "ctx", dim, encoder=ckpt, which="context"))
    with pytest.raises(ValueError, match="context encoder.*probe.encoder=target"):
        create_app(world["embedder"], settings=_settings(), head=context)
    target = load_head(make_head(tmp_path / "tgt", dim, encoder=ckpt, which="target"))
    app = create_app(world["embedder"], settings=_settings(), head=target)
    assert app.state.head is target


def test_index_embedded_by_another_checkpoint_is_refused(world, tmp_path, caplog):
    """Same architecture, other weights: same embedding size, unrelated neighbours."""
    import torch

    from radjepa.eval.heads import checkpoint_fingerprint

    ckpt_a = Path(world["runner"].info.source)
    torch.manual_seed(1)
    runner_b = EncoderRunner.from_checkpoint(make_checkpoint(tmp_path / "B", step=9))
    assert runner_b.info.embed_dim == world["runner"].info.embed_dim
    ids = [hashlib.sha256(b).hexdigest() for b in world["pngs"]]
    index_a = EmbeddingIndex.from_parquet(
        write_index(tmp_path / "a" / "part-0.parquet", world["emb"], ids, encoder=ckpt_a)
    )
    assert index_a.encoder_fingerprint == checkpoint_fingerprint(ckpt_a)
    assert index_a.model == "tiny:step-7"

    # the in-process embedder knows its checkpoint: no fingerprint needs passing
    with pytest.raises(ValueError, match=r"embedded by encoder .* rebuild it with `radjepa embed`"):
        create_app(LocalEmbedder(runner_b), settings=_settings(), index=index_a)
    with pytest.raises(ValueError, match="rebuild it with `radjepa embed`"):
        create_app(
            world["embedder"],
            settings=_settings(),
            index=index_a,
            encoder_fingerprint=runner_b.fingerprint,
        )
    app = create_app(world["embedder"], settings=_settings(), index=index_a)
    r = _post(
        TestClient(app), "/v1/similar", world["pngs"][2], params={"k": 1, "include_self": True}
    )
    assert r.json()["results"][0]["neighbours"][0]["image_id"] == ids[2]

    # an index from before the fingerprint was recorded: served, with a warning
    legacy = world["index"]
    assert legacy.encoder_fingerprint is None
    with caplog.at_level("WARNING", logger="serve.index"):
        create_app(LocalEmbedder(runner_b), settings=_settings(), index=legacy)
    assert "does not record the encoder" in caplog.text

    # parts from two checkpoints in one folder are refused as they load
    write_index(tmp_path / "a" / "part-1.parquet", world["emb"], ids, encoder=tmp_path / "B")
    with pytest.raises(ValueError, match="2 different encoders"):
        EmbeddingIndex.from_parquet(tmp_path / "a")


def test_deploy_yaml_is_a_valid_serve_config_whose_builder_binds(world, monkeypatch):
    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from serve.deployment import build_app

    spec = ServeDeploySchema.model_validate(
        yaml.safe_load((REPO / "serve" / "deploy.yaml").read_text())
    )
    (application,) = spec.applications
    assert application.import_path == "serve.deployment:build_app"
    args = dict(
        application.args,
        config=str(REPO / application.args["config"]),
        model=world["runner"].info.source,
    )
    monkeypatch.delenv("RADJEPA_API_KEYS", raising=False)
    with pytest.raises(SecurityConfigError):  # production config: no keys, no start
        build_app(args)
    # the keys file the config names is mounted in the pods only, and their GPU is not here:
    # the key comes from the variable, as the config's comment says to do on one machine
    args["set"] = [*(args.get("set") or []), "serve.api_keys_file=null", "serve.use_gpu=auto"]
    monkeypatch.setenv("RADJEPA_API_KEYS", API_KEY)
    # production config: no pseudonymisation key, no start either (it never opts in to the
    # public one), said in one line on the driver before anything deploys
    monkeypatch.delenv("RADJEPA_DEID_SECRET", raising=False)
    with pytest.raises(SecurityConfigError, match="RADJEPA_DEID_SECRET is not set") as refused:
        build_app(args)
    assert "\n" not in str(refused.value)
    # the pods get the key from a Secret; a variable set here would not reach the workers of a
    # Ray instance already running (where build_app asks), so the public key stands in
    opted_in = {**args, "set": [*(args.get("set") or []), "ingest.allow_development_key=true"]}
    assert isinstance(build_app(opted_in), Application)


def test_registry_alias_resolves_to_the_checkpoint_folder(world, tmp_path, migrated_store):
    import mlflow

    from pipelines.tracking import register_artifact_dir
    from serve.registry import ModelNotFound, resolve_model

    uri = migrated_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("serve-test", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    ckpt = Path(world["runner"].info.source)
    client.log_artifacts(run.info.run_id, str(ckpt), "checkpoint")
    version = register_artifact_dir(
        uri, run.info.run_id, "checkpoint", "tiny-enc", alias="champion"
    )

    resolved = resolve_model("models:/tiny-enc@champion", tracking_uri=uri)
    assert (resolved.name, resolved.version) == ("tiny-enc", version)
    runner = EncoderRunner.from_checkpoint(
        resolved.path, name=resolved.name, version=resolved.version, source=resolved.source
    )
    assert runner.info.version == version and runner.info.source == "models:/tiny-enc@champion"
    # what callers are told: the pinned version, never the alias or the folder it came from
    served = TestClient(create_app(LocalEmbedder(runner), settings=_settings()))
    model = served.get("/v1/models", headers=AUTH).json()["model"]
    assert model["reference"] == f"models:/tiny-enc/{version}" and str(tmp_path) not in str(model)
    assert sorted(p.name for p in resolved.path.iterdir()) == sorted(p.name for p in ckpt.iterdir())
    # what a worker on another node is handed: the version, not an alias that may move
    assert resolved.pinned == f"models:/tiny-enc/{version}"
    assert resolve_model("models:/tiny-enc/latest", tracking_uri=uri).version == version
    with pytest.raises(ModelNotFound, match="not a registry reference: models:/tiny-enc/v1"):
        resolve_model("models:/tiny-enc/v1", tracking_uri=uri)  # was "checkpoint not found"
    with pytest.raises(ModelNotFound, match="models:/tiny-enc@nope"):
        resolve_model("models:/tiny-enc@nope", tracking_uri=uri)
    with pytest.raises(ModelNotFound, match="not found"):
        resolve_model(str(tmp_path / "missing"))


def test_a_head_uri_is_read_afresh_so_a_refitted_head_uploaded_over_it_is_served(
    tmp_path, monkeypatch
):
    # a head URI took the checkpoint's path: "model checkpoint not found: ... has no meta.json";
    # then a cached copy kept serving the old head after a refitted one was uploaded over it
    from serve_helpers import make_head

    from serve.registry import resolve_head

    monkeypatch.setenv("RADJEPA_CACHE", str(tmp_path / "cache"))
    remote = make_head(tmp_path / "bucket" / "probe" / "head", 16)
    first = resolve_head(remote.as_uri())
    assert first.source == remote.as_uri() and first.head.feature_dim == 16
    make_head(tmp_path / "refit", 24)
    for path in (tmp_path / "refit").iterdir():
        path.replace(remote / path.name)  # the refit, uploaded over the old one
    assert resolve_head(remote.as_uri()).head.feature_dim == 24
    assert not (tmp_path / "cache").exists()  # nothing left behind either


def test_a_cached_checkpoint_missing_a_file_is_fetched_again_whole(world, tmp_path, monkeypatch):
    # a copy is renamed into the cache whole; one whose files someone deleted is replaced
    from radjepa.eval.heads import checkpoint_fingerprint
    from serve.registry import _fetch

    monkeypatch.setenv("RADJEPA_CACHE", str(tmp_path / "cache"))
    ckpt = Path(world["runner"].info.source)
    uri = ckpt.as_uri()
    first = _fetch(uri)
    (first / "weights.safetensors").unlink()
    again = _fetch(uri)
    assert again == first and checkpoint_fingerprint(again) == checkpoint_fingerprint(ckpt)
    assert [p.name for p in again.parent.iterdir()] == [first.name]  # no copy left beside it


def test_checkpoint_uri_is_fetched_once_without_optimizer_state(world, tmp_path, monkeypatch):
    # what `radjepa pretrain` prints for object-storage outputs; file:// takes the same path
    from radjepa.eval.heads import checkpoint_fingerprint
    from serve.registry import ModelNotFound, resolve_model

    monkeypatch.setenv("RADJEPA_CACHE", str(tmp_path / "cache"))
    ckpt = Path(world["runner"].info.source)
    remote = tmp_path / "bucket" / "run" / "checkpoint_1"
    shutil.copytree(ckpt, remote)
    (remote / "optimizer.safetensors").write_bytes(b"large and not needed to serve")
    first = resolve_model(remote.as_uri())
    assert sorted(p.name for p in first.path.iterdir()) == ["meta.json", "weights.safetensors"]
    assert checkpoint_fingerprint(first.path) == checkpoint_fingerprint(ckpt)
    runner = EncoderRunner.from_checkpoint(first.path)
    assert runner.info.embed_dim == world["runner"].info.embed_dim
    (remote / "weights.safetensors").unlink()  # cached: not read again
    assert resolve_model(remote.as_uri()).path == first.path
    # a run folder (what pretrain prints as "run folder") resolves to its latest checkpoint,
    # local or remote, past Ray's own files beside the checkpoints
    run = tmp_path / "bucket" / "run2"
    shutil.copytree(ckpt, run / "checkpoint_2026-12-01_10-00-00.000001")
    make_checkpoint(run / "checkpoint_2026-12-01_10-05-00.000001", step=9)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    for ref in (str(run), run.as_uri()):
        resolved = resolve_model(ref)
        assert json.loads((resolved.path / "meta.json").read_text())["step"] == 9
        # another process resolves the chosen checkpoint, not whatever is latest by then
        assert resolved.pinned.endswith("/checkpoint_2026-12-01_10-05-00.000001")
        assert resolved.pinned.startswith("file://" if "://" in ref else "/")
    (tmp_path / "bucket" / "empty").mkdir()
    with pytest.raises(ModelNotFound, match=r"^model checkpoint not found: .*has no meta.json"):
        resolve_model((tmp_path / "bucket" / "empty").as_uri())
    with pytest.raises(ModelNotFound, match="cannot read checkpoint nosuch://"):
        resolve_model("nosuch://bucket/ckpt")


def test_jpeg_of_the_same_image_embeds_alike(client, world):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(world["png_paths"][2]).convert("L").save(buf, format="JPEG", quality=95)
    a = _post(client, "/v1/embed", buf.getvalue(), "image/jpeg").json()["results"][0]
    assert cosine(a["embedding"], world["emb"][2]) > 0.98


def test_patch_tokens_cost_one_forward_and_leave_the_embedding_unchanged(world, monkeypatch):
    runner = world["runner"]
    pixels = world["pixels"][:3]
    plain = runner.run(pixels, [False] * 3)
    forwards = []
    encoder_cls = type(runner.encoder)
    forward = encoder_cls.forward
    monkeypatch.setattr(
        encoder_cls, "forward", lambda self, x: forwards.append(1) or forward(self, x)
    )
    with_tokens = runner.run(pixels, [True, False, True])
    assert len(forwards) == 1  # the pooled embedding is the tokens' mean: no second pass
    for a, b in zip(plain, with_tokens, strict=True):
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=1e-6, atol=1e-6)
    assert [r.patch_tokens is not None for r in with_tokens] == [True, False, True]
    np.testing.assert_allclose(
        with_tokens[0].patch_tokens.mean(axis=0), with_tokens[0].embedding, rtol=1e-5, atol=1e-6
    )


def test_a_fetch_that_fails_part_way_leaves_no_partial_copy_in_the_cache(world, tmp_path):
    # a cache disk that fills during the copy: the write limit (RLIMIT_FSIZE) makes the real
    # copy fail after its first MiB, as ENOSPC does; retries must not pile up part copies
    import subprocess
    import sys

    cache = tmp_path / "cache"
    code = (
        "import resource, signal, sys\n"
        "from serve.registry import ModelNotFound, resolve_model\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))\n"
        "for _ in range(2):\n"
        "    try:\n"
        "        resolve_model(sys.argv[1])\n"
        "    except ModelNotFound as err:\n"
        "        print(err)\n"
    )
    uri = Path(world["runner"].info.source).resolve().as_uri()
    res = subprocess.run(
        [sys.executable, "-c", code, uri],
        env={**os.environ, "RADJEPA_CACHE": str(cache), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and all(f"into the cache {cache}" in ln for ln in lines), lines
    assert [p for p in cache.rglob("*") if p.is_file()] == []

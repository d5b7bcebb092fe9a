"""The deployed service: Ray Serve + FastAPI on a free loopback port, real HTTP (httpx).

One application for the module, built through ``serve.deployment.build_app`` (the same import
path ``serve deploy`` and a RayService use), with keys, a probe head and an index.
"""

from __future__ import annotations

import asyncio
import hashlib
import re

import httpx
import numpy as np
import pytest
from serve_helpers import (
    API_KEY,
    OTHER_KEY,
    TINY_CONFIG,
    answer_then_keep_sending,
    cosine,
    dicom_from_png,
    free_port,
    fuzz_openapi,
    make_checkpoint,
    make_head,
    nih_pngs,
    write_index,
)

pytestmark = pytest.mark.ray

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory, nih_dir, mlflow_template):
    from mlflow_stores import place_store
    from ray import serve

    from serve.deployment import build_app
    from serve.embedder import EncoderRunner

    root = tmp_path_factory.mktemp("serve_ray")
    ckpt = make_checkpoint(root / "ckpt")
    runner = EncoderRunner.from_checkpoint(ckpt)
    # the head reaches the service through the MLflow registry, as `probe --register-head`
    # leaves it, and records the served checkpoint's fingerprint (checked at start-up)
    head = make_head(root / "head", runner.info.embed_dim, encoder=ckpt)
    tracking = place_store(mlflow_template, root / "mlflow.db")
    head_ref = _register_head(tracking, head, root)
    pngs = [p.read_bytes() for p in nih_pngs(nih_dir, 4)]
    # index rows: random vectors, the first under the id of pngs[0] (an archived upload); they
    # claim the served checkpoint, which the ingress checks at start-up
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, runner.info.embed_dim)).astype(np.float32)
    ids = [hashlib.sha256(pngs[0]).hexdigest(), *(f"id{i}" for i in range(1, 4))]
    index = write_index(root / "index" / "part-0.parquet", emb, ids, encoder=ckpt)
    keys = root / "keys.txt"
    keys.write_text(API_KEY + "\n")

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        {
            "config": str(TINY_CONFIG),
            "model": str(ckpt),
            "head": head_ref,
            "index": str(index),
            "api_keys_file": str(keys),
            # a generous batch window so that concurrent requests visibly share a forward
            "set": [
                f"tracking.uri={tracking}",
                "serve.max_batch_size=8",
                "serve.batch_wait_timeout_s=0.2",
                "serve.max_body_mb=2",
            ],
        }
    )
    serve.run(app, name="radjepa-test", route_prefix="/")
    try:
        yield {
            "url": f"http://127.0.0.1:{port}",
            "pngs": pngs,
            "png_paths": nih_pngs(nih_dir, 4),
            "root": root,
            "emb": emb,
            "ids": ids,
            "keys": keys,
        }
    finally:
        serve.shutdown()


def _register_head(uri: str, head, root) -> str:
    from pipelines.tracking import client, ensure_experiment, register_artifact_dir

    mc = client(uri)
    run_id = mc.create_run(ensure_experiment(uri, "probe")).info.run_id
    mc.log_artifacts(run_id, str(head), "head")
    version = register_artifact_dir(uri, run_id, "head", "radjepa-probe-head")
    return f"models:/radjepa-probe-head/{version}"


def _client(service) -> httpx.Client:
    return httpx.Client(base_url=service["url"], timeout=60)


def test_dicom_and_png_of_the_same_image_embed_alike_over_http(service):
    with _client(service) as c:
        dcm = dicom_from_png(service["png_paths"][0])
        a = c.post("/v1/embed", content=dcm, headers={**AUTH, "content-type": "application/dicom"})
        b = c.post(
            "/v1/embed", content=service["pngs"][0], headers={**AUTH, "content-type": "image/png"}
        )
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    ra, rb = a.json()["results"][0], b.json()["results"][0]
    assert rb["image_id"] == hashlib.sha256(service["pngs"][0]).hexdigest()
    assert cosine(ra["embedding"], rb["embedding"]) > 0.99
    assert a.json()["model"]["version"] == "step-7"


def test_concurrent_requests_are_batched_into_one_forward(service):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=service["url"], timeout=60) as c:
            return await asyncio.gather(
                *[
                    c.post(
                        "/v1/embed",
                        content=service["pngs"][i % 4],
                        headers={**AUTH, "content-type": "image/png"},
                    )
                    for i in range(12)
                ]
            )

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    sizes = [r.json()["results"][0]["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 8  # serve.max_batch_size from the config


def test_missing_and_wrong_key_get_401_but_probes_stay_open(service):
    with _client(service) as c:
        for headers in ({}, {"Authorization": f"Bearer {OTHER_KEY}"}):
            r = c.post(
                "/v1/embed",
                content=service["pngs"][0],
                headers={**headers, "content-type": "image/png"},
            )
            assert r.status_code == 401, r.text
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").json()["ready"] is True
        assert c.get("/openapi.json").status_code == 200


def test_bad_input_over_http_gets_4xx(service):
    with _client(service) as c:
        r415 = c.post("/v1/embed", content=b"x", headers={**AUTH, "content-type": "text/csv"})
        r413 = c.post(
            "/v1/embed",
            content=b"\0" * (2 * 1024**2 + 1),
            headers={**AUTH, "content-type": "application/dicom"},
        )
        dcm = dicom_from_png(service["png_paths"][1])
        r422 = c.post(
            "/v1/embed",
            content=dcm[: len(dcm) // 3],
            headers={**AUTH, "content-type": "application/dicom"},
        )
    assert (r415.status_code, r413.status_code, r422.status_code) == (415, 413, 422)
    assert r422.json()["reason"]


def test_an_answer_before_the_body_arrived_closes_the_connection_through_the_proxy(service):
    # the app's Connection: close (tests/test_serve_app.py) must pass Ray's proxy, which holds
    # the client's connection: without it, a client that trickles a body it declared kept its
    # connection after a 401 (or a 504) for as long as it went on sending
    host, port = service["url"].removeprefix("http://").split(":")
    head = "POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    head += "Content-Length: 1000000\r\n\r\n"  # no key
    answer, closed = answer_then_keep_sending(host, int(port), head.encode() + b"\x89PNG", b"x", 8)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b"\r\nconnection: close\r\n" in answer.lower()
    assert closed, "the proxy still read the body after the 401"
    with _client(service) as c:  # a request whose body was read keeps its connection
        r = c.post(
            "/v1/embed", content=service["pngs"][0], headers={**AUTH, "content-type": "image/png"}
        )
    assert r.status_code == 200 and r.headers.get("connection") != "close"


def test_classify_and_similar_answer_over_http(service):
    with _client(service) as c:
        files = [("files", (f"{i}.png", service["pngs"][i], "image/png")) for i in range(2)]
        cl = c.post("/v1/classify", files=files, headers=AUTH)
        similar = [
            c.post(
                "/v1/similar",
                params=params,
                content=service["pngs"][0],
                headers={**AUTH, "content-type": "image/png"},
            )
            for params in ({"k": 4}, {"k": 4, "include_self": "true"})
        ]
        models = c.get("/v1/models", headers=AUTH).json()
    assert cl.status_code == 200, cl.text
    assert [len(r["probabilities"]) for r in cl.json()["results"]] == [2, 2]
    others = service["ids"][1:]
    for si in similar:
        assert si.status_code == 200, si.text
    (without,), (with_self,) = (si.json()["results"] for si in similar)
    # the upload is archived (row 0): left out unless asked for, through the Serve ingress too
    assert sorted(h["image_id"] for h in without["neighbours"]) == sorted(others)
    assert sorted(h["image_id"] for h in with_self["neighbours"]) == sorted(service["ids"])
    assert (without["excluded_self"], with_self["excluded_self"]) == (1, 0)
    assert models["index_size"] == 4 and models["labels"] == ["Effusion", "Cardiomegaly"]
    assert models["head"] == "models:/radjepa-probe-head/1"  # served from the registry


def test_answers_name_no_server_path_and_carry_one_request_id(service):
    """Through the Serve proxy as under plain uvicorn: /v1/models named the checkpoint and index
    folders; and the request id is the proxy's, sent once (the app adding its own as well gave
    every answer two X-Request-ID headers), and repeated in error bodies."""
    from radjepa.eval.heads import checkpoint_fingerprint

    with _client(service) as c:
        models = c.get("/v1/models", headers={**AUTH, "x-request-id": "ris-42:7"})
        refused = c.get("/v1/models", headers={"x-request-id": "ris-43"})
        missing = c.get("/nowhere")
    assert models.status_code == 200, models.text
    assert str(service["root"]) not in models.text and "/tmp" not in models.text
    assert models.json()["model"]["sha256"] == checkpoint_fingerprint(service["root"] / "ckpt")
    assert models.headers.get_list("x-request-id") == ["ris-42:7"]
    assert refused.status_code == 401 and refused.json()["request_id"] == "ris-43"
    assert refused.headers.get_list("x-request-id") == ["ris-43"]
    (made,) = missing.headers.get_list("x-request-id")  # the proxy's own, when none was sent
    assert missing.status_code == 404 and missing.json()["request_id"] == made
    import uuid

    assert str(uuid.UUID(made)) == made  # a UUID with dashes, as docs/API.md says


def test_an_invalid_caller_request_id_is_echoed_by_the_proxy_not_by_the_app(service):
    """The known limit docs/API.md states: Ray's proxy fixes the id (the caller's, as sent) and
    appends it to the response before the ingress replica sees the request, so the app cannot
    make the header agree with the fresh id its body and log records use. Pinned here so that
    a Ray upgrade that changes it is noticed (the header must stay single)."""
    sent = "bad id;" + "x" * 200
    with _client(service) as c:
        r = c.get("/v1/models", headers={"x-request-id": sent})
    assert r.status_code == 401
    assert r.headers.get_list("x-request-id") == [sent]
    fresh = r.json()["request_id"]
    assert len(fresh) == 32 and int(fresh, 16) >= 0 and sent not in r.text


def test_a_rotated_keys_file_takes_effect_in_the_deployed_replicas(service):
    """The ingress replicas re-read serve.api_keys_file when it changes: a revoked key is
    refused, a new one accepted, with no redeploy (on the old code the old key stayed 200)."""
    import os
    import time

    new_key = "rotated-key-0123456789abcdef"
    keys = service["keys"]

    def statuses() -> tuple[int, int]:
        with _client(service) as c:
            return tuple(  # type: ignore[return-value]
                c.get("/v1/models", headers={"Authorization": f"Bearer {k}"}).status_code
                for k in (API_KEY, new_key)
            )

    def swap(text: str, want: tuple[int, int]) -> None:
        tmp = keys.with_name("keys.new")
        tmp.write_text(text)
        tmp.chmod(0o600)
        os.replace(tmp, keys)
        deadline = time.monotonic() + 30  # replicas stat the file at most once a second
        while (got := statuses()) != want and time.monotonic() < deadline:
            time.sleep(0.5)
        assert got == want

    assert statuses() == (200, 401)
    try:
        swap(new_key + "\n", (401, 200))
    finally:
        swap(API_KEY + "\n", (200, 401))


def test_generated_requests_never_get_a_server_error_from_the_live_service(service):
    """schemathesis against the deployed app's own /openapi.json over real HTTP (the in-process
    variant in test_serve_app covers more examples; this one proves the proxy path agrees)."""
    import schemathesis

    api = schemathesis.openapi.from_url(f"{service['url']}/openapi.json")
    fuzz_openapi(api, AUTH, 3, base_url=service["url"])


def test_index_from_another_checkpoint_fails_the_deployment(service):
    """Refused twice over: by `radjepa serve`/`build_app` on the driver when it can read the
    checkpoint and the index, and by the API replica itself (which fetches the encoder
    replica's fingerprint for an index even without a head) when only the replicas can, as
    for a registry model they download."""
    import torch
    from ray import serve

    from serve.deployment import ApiIngress, EncoderDeployment, build_app
    from serve.index import IndexLoadError
    from serve.security import ApiSettings, key_digest

    root = service["root"]
    torch.manual_seed(1)
    other = make_checkpoint(root / "other-ckpt", step=3)
    index = write_index(
        root / "other-index" / "part-0.parquet", service["emb"], ["a", "b", "c", "d"], other
    )
    args = {
        "config": str(TINY_CONFIG),
        "model": str(root / "ckpt"),
        "index": str(index),
        "api_keys_file": str(service["keys"]),
    }
    with pytest.raises(IndexLoadError, match="rebuild it with `radjepa embed`"):
        build_app(args)
    # the replicas' own check: the same two deployments, bound without the driver's check
    settings = ApiSettings(env_keys={key_digest(API_KEY): ()}, allow_development_key=True)
    settings = settings.model_dump()
    app = ApiIngress.bind(EncoderDeployment.bind(str(root / "ckpt")), settings, None, str(index))
    try:
        with pytest.raises(RuntimeError, match="radjepa-bad-index failed"):
            serve.run(app, name="radjepa-bad-index", route_prefix="/bad-index")
        # the replica's start-up error, as `serve status` shows it to the operator
        failed = serve.status().applications["radjepa-bad-index"].deployments["RadjepaAPI"]
        assert "rebuild it with `radjepa embed`" in failed.message
    finally:
        serve.delete("radjepa-bad-index")


def test_a_replica_refuses_a_head_that_is_no_head_in_the_driver_s_words(service):
    """The API replica resolves the head again at its start-up (on a cluster it may see another
    store than the driver, or a version deleted since), with the driver's resolver: the
    operator reads the same line in `serve status` as `radjepa serve` prints."""
    from ray import serve

    from pipelines.tracking import client, ensure_experiment, register_artifact_dir
    from serve.deployment import ApiIngress, EncoderDeployment, check_references
    from serve.security import ApiSettings, key_digest

    root, tracking = service["root"], f"sqlite:///{service['root'] / 'mlflow.db'}"
    mc = client(tracking)
    run_id = mc.create_run(ensure_experiment(tracking, "probe")).info.run_id
    mc.log_artifacts(run_id, str(root / "ckpt"), "ckpt")
    ref = f"models:/tiny-enc-as-head/{register_artifact_dir(tracking, run_id, 'ckpt', 'tiny-enc-as-head')}"
    says = f"serve.head {ref} is an encoder checkpoint, not a probe head"
    with pytest.raises(ValueError, match=re.escape(says)):
        check_references(str(root / "ckpt"), ref, None, tracking)
    settings = ApiSettings(env_keys={key_digest(API_KEY): ()}, allow_development_key=True)
    encoder = EncoderDeployment.bind(str(root / "ckpt"))
    app = ApiIngress.bind(encoder, settings.model_dump(), ref, None, tracking)
    try:
        with pytest.raises(RuntimeError, match="radjepa-bad-head failed"):
            serve.run(app, name="radjepa-bad-head", route_prefix="/bad-head")
        failed = serve.status().applications["radjepa-bad-head"].deployments["RadjepaAPI"]
        assert says in failed.message
    finally:
        serve.delete("radjepa-bad-head")

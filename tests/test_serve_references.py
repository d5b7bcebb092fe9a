"""`radjepa serve` checks what it is asked to serve before any Ray deployment exists: a missing
registry alias or head folder is one line naming the reference (inside a replica it became Ray's
retried deployment failure and a page of traceback)."""

from __future__ import annotations

import pytest
from serve_helpers import API_KEY, TINY_CONFIG, make_checkpoint

from radjepa.config import load_config
from serve.deployment import app_from_config
from serve.registry import ModelNotFound


@pytest.fixture()
def cfg_for(tmp_path, monkeypatch):
    monkeypatch.setenv("RADJEPA_API_KEYS", API_KEY)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def build(model: str | None = None, head: str | None = None):
        return load_config(TINY_CONFIG).with_overrides(
            {"serve.model": model or str(ckpt), "serve.head": head, "tracking.uri": store}
        )

    return build


def test_unknown_registry_model_is_refused_before_binding(cfg_for) -> None:
    with pytest.raises(ModelNotFound, match="models:/no-such-encoder@champion"):
        app_from_config(cfg_for(model="models:/no-such-encoder@champion"))


def test_missing_head_folder_or_registry_head_is_refused(cfg_for, tmp_path) -> None:
    with pytest.raises(ModelNotFound, match="serve.head not found"):
        app_from_config(cfg_for(head=str(tmp_path / "no-head")))
    with pytest.raises(ModelNotFound, match="models:/no-such-head/3"):
        app_from_config(cfg_for(head="models:/no-such-head/3"))


def test_a_run_artifact_reference_says_it_is_not_supported(cfg_for) -> None:
    # read as a local path, it said "serve.model not found: runs:/...", as if a folder were
    # missing
    from serve.registry import resolve_model

    ref = "runs:/0123456789abcdef0123456789abcdef/checkpoint-step-7"
    with pytest.raises(ModelNotFound, match="runs:/ references are not supported"):
        app_from_config(cfg_for(model=ref))
    with pytest.raises(ModelNotFound, match="runs:/ references are not supported"):
        resolve_model(ref)


def test_existing_checkpoint_binds(cfg_for) -> None:
    from ray.serve import Application

    assert isinstance(app_from_config(cfg_for()), Application)


def test_head_or_index_of_another_checkpoint_is_refused_on_the_driver(cfg_for, tmp_path) -> None:
    # what a replica would refuse at start-up, refused before any deployment is bound
    import numpy as np
    import torch
    from serve_helpers import make_head, write_index

    from radjepa.eval.heads import HeadError
    from serve.index import IndexLoadError

    torch.manual_seed(1)
    other = make_checkpoint(tmp_path / "other", step=3)
    dim = 192  # tiny ViT
    head = make_head(tmp_path / "head", dim, encoder=other)
    with pytest.raises(HeadError, match="train a head on this encoder"):
        app_from_config(cfg_for(head=str(head)))
    emb = np.random.default_rng(0).standard_normal((3, dim)).astype(np.float32)
    index = write_index(tmp_path / "index" / "part-0.parquet", emb, ["a", "b", "c"], other)
    with pytest.raises(IndexLoadError, match="rebuild it with `radjepa embed`"):
        app_from_config(cfg_for().with_overrides({"serve.index": str(index)}))
    own = write_index(tmp_path / "own" / "part-0.parquet", emb, ["a", "b", "c"], tmp_path / "ckpt")
    app_from_config(cfg_for().with_overrides({"serve.index": str(own)}))  # its own: accepted


def _recorded_index(tmp_path, name: str, key: str, scheme: str = "issuer_and_patient_id") -> str:
    """An index in embed's layout whose shards' key record names ``key`` and ``scheme``."""
    import numpy as np
    from serve_helpers import write_index

    from radjepa.imaging.deid import key_fingerprint

    emb = np.random.default_rng(0).standard_normal((3, 192)).astype(np.float32)
    record = {"key_fingerprint": key_fingerprint(key.encode()), "patient_identity": scheme}
    path = tmp_path / name / "part-0.parquet"
    write_index(path, emb, ["a", "b", "c"], tmp_path / "ckpt", pseudonyms=record)
    return str(path.parent)


def _key_warnings(caplog, bind) -> list[str]:
    caplog.clear()
    with caplog.at_level("WARNING"):
        bind()
    return [r.getMessage() for r in caplog.records if "is not the key" in r.getMessage()]


INGEST_KEY, SERVE_KEY = "ingest-key-0123456789abcdef", "serving-key-0123456789abcdef"


def test_serve_warns_before_deploying_when_its_key_is_not_the_index_s(
    cfg_for, tmp_path, monkeypatch, caplog
) -> None:
    """An ingress replica serving an index whose shards were pseudonymised with another key
    says so only in its own log; the operator of `radjepa serve` reads the CLI, so the driver
    says it once before binding, with fingerprints only. The same key says nothing; an unknown
    patient identity scheme is refused there. (No Ray here: this process's key.)"""
    import ray

    from radjepa.imaging.deid import key_fingerprint
    from serve.index import IndexLoadError

    # without Ray the driver reads its own key; in CI's order the suite's Ray session already
    # runs, and its workers never see this test's variable (the next test covers that path)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    env = "RADJEPA_DEID_SECRET"  # tiny_cpu.yaml's ingest.secret_env
    recorded = _recorded_index(tmp_path, "recorded", INGEST_KEY)
    bind = lambda: app_from_config(cfg_for().with_overrides({"serve.index": recorded}))  # noqa: E731
    monkeypatch.setenv(env, SERVE_KEY)
    (warning,) = _key_warnings(caplog, bind)
    assert key_fingerprint(INGEST_KEY.encode()) in warning and env in warning
    assert INGEST_KEY not in warning and SERVE_KEY not in warning
    monkeypatch.setenv(env, INGEST_KEY)
    assert _key_warnings(caplog, bind) == []
    odd = _recorded_index(tmp_path, "odd", INGEST_KEY, "by_name")
    with pytest.raises(IndexLoadError, match="patient identity scheme 'by_name'"):
        app_from_config(cfg_for().with_overrides({"serve.index": odd}))


@pytest.mark.ray
def test_the_driver_compares_the_key_its_replicas_will_read(
    cfg_for, tmp_path, monkeypatch, caplog, ray_session
) -> None:
    """On a Ray that was started before this process set the key (or a cluster whose nodes
    hold their own), this process's variable is not the replicas': the driver must ask the
    cluster, or it says nothing while every replica answers key_mismatch (it did: the demo's
    replicas on the test session's Ray). replica_env, which the ingress gets, is honoured."""
    env = "RADJEPA_DEID_SECRET"
    recorded = _recorded_index(tmp_path, "recorded", INGEST_KEY)
    cfg = cfg_for().with_overrides({"serve.index": recorded})
    monkeypatch.setenv(env, INGEST_KEY)  # here only: the session's workers never saw it
    (warning,) = _key_warnings(caplog, lambda: app_from_config(cfg))
    assert env in warning and INGEST_KEY not in warning
    replica_env = {env: INGEST_KEY}
    assert _key_warnings(caplog, lambda: app_from_config(cfg, replica_env=replica_env)) == []


def test_a_registered_probe_head_given_as_the_model_is_refused(
    cfg_for, tmp_path, migrated_store
) -> None:
    # every encoder replica failed on it ("... is not a checkpoint folder (no meta.json)"):
    # Ray's retried deployment failure, ~220 lines and exit 1 after ~40 s
    from serve_helpers import register_probe_head

    from pipelines.tracking import ensure_experiment

    uri = migrated_store(tmp_path / "mlflow.db")
    register_probe_head(
        uri, ensure_experiment(uri, "radjepa"), "radjepa-probe-head", tmp_path / "head"
    )
    with pytest.raises(ModelNotFound, match="is a probe head .*: give it as --head"):
        app_from_config(cfg_for(model="models:/radjepa-probe-head/1"))


def test_ingest_shards_given_as_the_index_are_refused_on_the_driver(cfg_for, tmp_path) -> None:
    # the driver's checks read only the index's record columns, which shards lack too, so
    # they passed; every API replica then failed on the missing embeddings (~220 lines, exit 1)
    import numpy as np
    from shard_tables import write_shard

    from serve.index import IndexLoadError

    write_shard(tmp_path / "dst", np.zeros((2, 32, 32), np.uint8), image_id=["a", "b"])
    cfg = cfg_for().with_overrides({"serve.index": str(tmp_path / "dst")})
    with pytest.raises(IndexLoadError, match=r"missing column\(s\) \['embedding'\]: not an index"):
        app_from_config(cfg)


def test_a_head_of_another_encoder_is_refused_for_a_registered_model_too(
    cfg_for, tmp_path, migrated_store
):
    # a local --model was checked against the head on the driver, a models:/ one only by each
    # API replica: Ray's retried deployment failure, ~220 lines and exit 1. A version of the
    # default sqlite store is read in place, so it is checked on the driver as well.
    import mlflow
    import torch
    from serve_helpers import make_head

    from pipelines.tracking import ensure_experiment, register_artifact_dir
    from radjepa.eval.heads import HeadError

    uri = migrated_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    run = client.create_run(ensure_experiment(uri, "radjepa"))
    client.log_artifacts(run.info.run_id, str(tmp_path / "ckpt"), "checkpoint-step-7")
    register_artifact_dir(uri, run.info.run_id, "checkpoint-step-7", "tiny-enc")
    torch.manual_seed(1)
    other = make_checkpoint(tmp_path / "other", step=3)
    head = make_head(tmp_path / "head", 192, encoder=other)
    with pytest.raises(HeadError, match="train a head on this encoder"):
        app_from_config(cfg_for(model="models:/tiny-enc/1", head=str(head)))
    own = make_head(tmp_path / "own-head", 192, encoder=tmp_path / "ckpt")
    app_from_config(cfg_for(model="models:/tiny-enc/1", head=str(own)))  # its own: accepted


@pytest.mark.parametrize(("api_queue", "encoder_queue"), [(10, 640), (-1, -1)])
def test_the_encoder_queue_holds_as_many_images_as_the_api_queue_holds_requests(
    cfg_for, api_queue, encoder_queue
) -> None:
    """serve.max_queued_requests counts HTTP requests at the API deployment, each up to 64
    images; the encoder gets one call per image, and was given the same number: two
    concurrent requests of 64 images overflowed its queue of 64 (503) although the API had
    admitted both. -1 (unbounded) stays unbounded."""
    from serve.security import MAX_IMAGES_PER_REQUEST

    cfg = cfg_for().with_overrides({"serve.max_queued_requests": api_queue})
    api = app_from_config(cfg)._bound_deployment  # what Serve is given to deploy
    encoder = api.init_args[0]._bound_deployment
    assert api.max_queued_requests == api_queue
    assert encoder.max_queued_requests == encoder_queue
    assert encoder_queue in (-1, api_queue * MAX_IMAGES_PER_REQUEST)


def test_every_replica_is_bound_to_the_weights_checked_not_an_alias_or_run_folder(
    cfg_for, tmp_path, migrated_store, monkeypatch
):
    # each replica resolved the reference it was bound to when it started, those Serve adds or
    # restarts later too: after a `models promote`, or a new checkpoint in a run folder, they
    # served other weights than the index and head were checked against, in silence
    import mlflow

    from pipelines.tracking import ensure_experiment, register_artifact_dir

    def bound(cfg):
        api = app_from_config(cfg)._bound_deployment
        encoder = api.init_args[0]._bound_deployment
        return encoder.init_args[0], encoder.init_kwargs["source"], api.init_args[2]

    uri = migrated_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    run = client.create_run(ensure_experiment(uri, "radjepa"))
    client.log_artifacts(run.info.run_id, str(tmp_path / "ckpt"), "checkpoint-step-7")
    register_artifact_dir(uri, run.info.run_id, "checkpoint-step-7", "tiny-enc")
    client.set_registered_model_alias("tiny-enc", "champion", "1")
    for ref in ("models:/tiny-enc@champion", "models:/tiny-enc/latest", "models:/tiny-enc"):
        assert bound(cfg_for(model=ref)) == ("models:/tiny-enc/1", ref, None)
    # a registered head's alias too: each API replica resolved it at its own start
    from serve_helpers import make_head

    head = make_head(tmp_path / "head", 192, encoder=tmp_path / "ckpt")
    run = client.create_run(ensure_experiment(uri, "radjepa"))
    client.log_artifacts(run.info.run_id, str(head), "head")
    kind = {"radjepa.kind": "probe-head"}
    register_artifact_dir(uri, run.info.run_id, "head", "tiny-head", tags=kind)
    client.set_registered_model_alias("tiny-head", "champion", "1")
    asked = cfg_for(model="models:/tiny-enc@champion", head="models:/tiny-head@champion")
    assert bound(asked)[2] == "models:/tiny-head/1"

    runs = tmp_path / "runs" / "r"
    make_checkpoint(runs / "checkpoint_2026-10-25_01-55-00.000001", step=3)
    make_checkpoint(runs / "checkpoint_2026-10-25_01-05-00.000001", step=7)  # the newest step
    newest = "checkpoint_2026-10-25_01-05-00.000001"
    assert bound(cfg_for(model=str(runs)))[0] == str(runs / newest)
    monkeypatch.chdir(tmp_path)  # a relative folder stays relative (a Ray Job's working copy)
    assert bound(cfg_for(model="runs/r"))[:2] == (f"runs/r/{newest}", "runs/r")
    assert bound(cfg_for(model=f"runs/r/{newest}"))[0] == f"runs/r/{newest}"


def test_a_bucket_this_machine_cannot_read_is_left_to_the_replicas(caplog):
    # a cluster's nodes may hold the bucket's credentials where the driver does not: never
    # read here before pinning, and not refused now; said, since a run folder is then not pinned
    import logging

    from serve.registry import pinned_reference

    # nothing listens there; a short retry limit (a bucket's default is minutes)
    ref = "gs://models/run1?endpoint_override=127.0.0.1:9&scheme=http&retry_limit_seconds=1"
    with caplog.at_level(logging.WARNING, logger="serve.registry"):
        assert pinned_reference(ref) == ref
    assert "the replicas resolve gs://models/run1" in caplog.text


def test_references_are_checked_and_pinned_once_and_a_caller_s_pin_is_bound_as_given(
    cfg_for, tmp_path, monkeypatch
):
    # the pin-and-check ran twice per build (a local checkpoint hashed twice, each line said
    # twice); and radjepa serve, which checks and pins before Ray starts, must have its pin
    # bound, not one made once Ray is up, which may name a newer version than it checked
    from serve import deployment

    calls = {"check": 0, "pin": 0}
    check, pin = deployment.check_references, deployment.pin_references

    def counted(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(deployment, "check_references", counted("check", check))
    monkeypatch.setattr(deployment, "pin_references", counted("pin", pin))
    app_from_config(cfg_for())
    assert calls == {"check": 1, "pin": 1}
    other = make_checkpoint(tmp_path / "other", step=3)
    api = app_from_config(
        cfg_for(), references_checked=True, pinned=(str(other), None)
    )._bound_deployment
    encoder = api.init_args[0]._bound_deployment
    assert encoder.init_args[0] == str(other) and encoder.init_kwargs["source"] == str(
        tmp_path / "ckpt"
    )
    assert calls == {"check": 1, "pin": 1}


def test_what_is_checked_is_what_the_replicas_are_bound_to_when_a_checkpoint_lands_meanwhile(
    cfg_for, tmp_path
):
    # `radjepa serve` checked the run folder (fetching its weights: minutes for a large encoder
    # on a bucket) and pinned it after: a checkpoint written meanwhile bound the replicas to
    # weights the head was never checked against. Pinned first, the check reads the pin.
    import torch
    from serve_helpers import make_head

    from radjepa.eval.heads import HeadError
    from serve.deployment import pin_and_check

    runs = tmp_path / "runs" / "r"
    first = make_checkpoint(runs / "checkpoint_2026-12-07_01-00-00.000001", step=3)
    head = make_head(tmp_path / "head", 192, encoder=first)

    def training_goes_on() -> None:
        torch.manual_seed(5)
        make_checkpoint(runs / "checkpoint_2026-12-07_02-00-00.000001", step=9)

    cfg = cfg_for(model=str(runs), head=str(head))
    assert pin_and_check(cfg, before_fetch=training_goes_on) == (str(first), str(head))
    # the newer checkpoint is another encoder: pinned now, the same head is refused
    with pytest.raises(HeadError, match="train a head on this encoder"):
        pin_and_check(cfg)

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


def test_serve_warns_before_deploying_when_its_key_is_not_the_index_s(
    cfg_for, tmp_path, monkeypatch, caplog
) -> None:
    """An ingress replica serving an index whose shards were pseudonymised with another key
    says so only in its own log; the operator of `radjepa serve` reads the CLI, so the driver
    says it once before binding, with fingerprints only. The same key says nothing; an unknown
    patient identity scheme is refused there; a key unset here while joining a cluster is the
    cluster's (its nodes' Secret) and is not compared."""
    import numpy as np
    from serve_helpers import write_index

    from radjepa.imaging.deid import key_fingerprint
    from serve.index import IndexLoadError

    ingest_key, serve_key = "ingest-key-0123456789abcdef", "serving-key-0123456789abcdef"
    emb = np.random.default_rng(0).standard_normal((3, 192)).astype(np.float32)

    def index(name: str, scheme: str = "issuer_and_patient_id") -> str:
        record = {
            "key_fingerprint": key_fingerprint(ingest_key.encode()),
            "patient_identity": scheme,
        }
        path = tmp_path / name / "part-0.parquet"
        write_index(path, emb, ["a", "b", "c"], tmp_path / "ckpt", pseudonyms=record)
        return str(path.parent)

    def bind(idx: str) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING"):
            app_from_config(cfg_for().with_overrides({"serve.index": idx}))
        return [r.getMessage() for r in caplog.records if "pseudonymisation key" in r.getMessage()]

    env = "RADJEPA_DEID_SECRET"  # tiny_cpu.yaml's ingest.secret_env
    recorded = index("recorded")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(env, serve_key)
    (warning,) = bind(recorded)
    assert "is not the key" in warning and key_fingerprint(ingest_key.encode()) in warning
    assert env in warning and ingest_key not in warning and serve_key not in warning
    monkeypatch.setenv(env, ingest_key)
    assert bind(recorded) == []
    with pytest.raises(IndexLoadError, match="patient identity scheme 'by_name'"):
        app_from_config(cfg_for().with_overrides({"serve.index": index("odd", "by_name")}))
    monkeypatch.delenv(env)
    monkeypatch.setenv("RAY_ADDRESS", "ray-head.example.invalid:6379")
    assert bind(recorded) == []  # the cluster's nodes hold the key, not this shell

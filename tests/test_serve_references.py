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

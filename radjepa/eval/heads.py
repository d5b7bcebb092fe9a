"""Trained probe heads as portable folders: ``head.safetensors`` + ``head.json``, no pickle.

A head is standardisation (mean/scale) followed by one logistic regression per label. It
records the encoder checkpoint it was trained on (path, which encoder, step, content hash)
because a head is meaningless on any other encoder's features; the server checks the feature
size, the encoder (target vs context) and, when both sides know it, the encoder fingerprint at
start-up (:func:`check_encoder`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "ProbeHead",
    "HeadError",
    "save_head",
    "load_head",
    "checkpoint_fingerprint",
    "check_encoder",
    "ENCODER_TAG",
]

FORMAT = "radjepa-probe-head"
# the model-version tag holding a registered encoder's checkpoint_fingerprint: a server that
# leaves the weights to its cluster's replicas checks a head and an index against it
ENCODER_TAG = "radjepa.encoder_sha256"
VERSION = 1
_TENSORS = ("weight", "bias", "mean", "scale")


class HeadError(ValueError):
    """A head folder that is missing, malformed, or inconsistent."""


@dataclass
class ProbeHead:
    """Linear probe over frozen embeddings: ``sigmoid(((f - mean) / scale) @ weight + bias)``.

    ``weight`` is [D, L], ``bias`` [L]; mean/scale default to the identity standardisation.
    Kept in float64 so a reloaded head gives bit-identical probabilities.
    """

    weight: np.ndarray
    bias: np.ndarray
    label_names: Sequence[str]
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    positive: Sequence[str | None] | None = None
    encoder: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, dtype=np.float64)
        if self.weight.ndim == 1:
            self.weight = self.weight[:, None]
        d, n_labels = self.weight.shape
        self.bias = np.asarray(self.bias, dtype=np.float64).reshape(-1)
        self.label_names = [str(x) for x in self.label_names]
        self.mean = np.zeros(d) if self.mean is None else np.asarray(self.mean, np.float64)
        self.scale = np.ones(d) if self.scale is None else np.asarray(self.scale, np.float64)
        if self.positive is None:
            self.positive = [None] * n_labels
        self.positive = [None if p is None else str(p) for p in self.positive]
        problems = []
        if self.bias.shape != (n_labels,):
            problems.append(f"bias has shape {self.bias.shape}, expected ({n_labels},)")
        if len(self.label_names) != n_labels:
            problems.append(f"{len(self.label_names)} label names for {n_labels} outputs")
        if len(self.positive) != n_labels:
            problems.append(f"{len(self.positive)} positive classes for {n_labels} outputs")
        for name in ("mean", "scale"):
            if getattr(self, name).shape != (d,):
                problems.append(f"{name} has shape {getattr(self, name).shape}, expected ({d},)")
        if np.any(self.scale == 0):
            problems.append("scale has zeros")
        if problems:
            raise HeadError("invalid probe head: " + "; ".join(problems))

    @property
    def feature_dim(self) -> int:
        return int(self.weight.shape[0])

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Per-label probabilities [N, L] for embeddings [N, D]."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.feature_dim:
            raise HeadError(
                f"features of shape {f.shape} do not fit this head: expected "
                f"[N, {self.feature_dim}]"
            )
        logits = ((f - self.mean) / self.scale) @ self.weight + self.bias  # [N, L]
        return 1.0 / (1.0 + np.exp(-logits))


# what save_head writes into a head folder: its metadata, then its weights
HEAD_FILES = ("head.json", "head.safetensors")


def checkpoint_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 over what identifies a checkpoint's encoder: file names + bytes, sorted.

    For a training checkpoint folder that is ``weights.safetensors`` and ``meta.json`` (a copy
    registered in MLflow or stripped of optimizer state has the same encoder, hence the same
    fingerprint); other folders (e.g. a timm export) count every ``*.safetensors``/``*.json``.
    """
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        core = [p / "weights.safetensors", p / "meta.json"]
        files = (
            core
            if core[0].is_file()
            else sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".json")
            )
        )
        files = [f for f in files if f.is_file()]
    else:
        files = [p]
    if not files:
        raise HeadError(f"no checkpoint files to fingerprint under {p}")
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def check_encoder(head: ProbeHead, fingerprint: str | None, *, which: str = "target") -> None:
    """Refuse a head fitted on another encoder's features.

    A head only knows the embedding size for certain; a head trained on a different checkpoint
    of the same architecture would run and return confident nonsense. Heads record the
    fingerprint of their encoder (``radjepa probe``); when both sides know it, they must agree.
    The fingerprint covers the whole checkpoint, so it cannot tell its context encoder from its
    target encoder: the recorded ``which`` must also name the encoder that produces the served
    features (``which``; serving always runs the target encoder).
    """
    fitted_on = head.encoder.get("which")
    if fitted_on is not None and str(fitted_on) != which:
        raise HeadError(
            f"probe head was fitted on the {fitted_on} encoder's features but the server "
            f"embeds with the {which} encoder: re-run `radjepa probe` with "
            f"probe.encoder={which} to get a deployable head"
        )
    want = str(head.encoder.get("sha256") or "")
    if not want or not fingerprint or want == fingerprint:
        return
    trained_on = head.encoder.get("checkpoint") or "another checkpoint"
    raise HeadError(
        f"probe head was fitted on encoder {want[:12]} ({trained_on}) but the served encoder is "
        f"{fingerprint[:12]}: train a head on this encoder (`radjepa probe`)"
    )


def save_head(folder: str | os.PathLike[str], head: ProbeHead) -> Path:
    """Write ``folder/head.safetensors`` and ``folder/head.json``; returns the folder."""
    from safetensors.numpy import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.ascontiguousarray(getattr(head, name)) for name in _TENSORS}
    save_file(tensors, str(out / HEAD_FILES[1]))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "label_names": list(head.label_names),
        "positive": list(head.positive or []),
        "feature_dim": head.feature_dim,
        "encoder": dict(head.encoder),
    }
    (out / HEAD_FILES[0]).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    log.debug(  # debug: a caller writing into a staging folder says where the head ends up
        "saved probe head (%d labels, dim %d) to %s",
        len(meta["label_names"]),
        head.feature_dim,
        out,
    )
    return out


def load_head(path: str | os.PathLike[str]) -> ProbeHead:
    """Read a head folder written by :func:`save_head`; strict about keys and shapes."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(path)
    meta_path, weights_path = (folder / name for name in HEAD_FILES)
    for f in (meta_path, weights_path):
        if not f.is_file():
            raise HeadError(f"not a probe head folder: {f} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise HeadError(f"{meta_path}: not valid JSON ({err})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise HeadError(
            f"{meta_path}: format {meta.get('format')!r} v{meta.get('version')!r} is not "
            f"{FORMAT!r} v{VERSION}"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise HeadError(f"{weights_path}: cannot read ({err})") from None
    if set(tensors) != set(_TENSORS):
        raise HeadError(f"{weights_path}: tensors {sorted(tensors)}, expected {list(_TENSORS)}")
    head = ProbeHead(
        label_names=meta["label_names"],
        positive=meta.get("positive") or None,
        encoder=meta.get("encoder") or {},
        **{name: tensors[name] for name in _TENSORS},
    )
    if head.feature_dim != meta.get("feature_dim"):
        raise HeadError(
            f"{folder}: weights are for dim {head.feature_dim}, head.json says "
            f"{meta.get('feature_dim')}"
        )
    return head

"""Inference with a trained encoder: checkpoint -> target-encoder forward on stored pixels.

Plain torch, no Ray and no HTTP, so every consumer runs the same code on the same weights: the
Ray Serve encoder deployment (batched across requests), the in-process embedder of tests and
``bench/serve.py``, and the ``radjepa embed`` batch job that builds the similar-case index.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["EncoderRunner", "ImageEmbedding", "ModelInfo", "Preprocess", "pick_device"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the served weights, echoed in every response."""

    name: str
    version: str
    step: int | None
    arch: str
    patch_size: int
    img_size: int
    embed_dim: int
    source: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Preprocess:
    """Decode settings the checkpoint was trained with (they travel with the weights)."""

    image_size: int
    dtype: str
    window_percentiles: tuple[float, float]


@dataclass
class ImageEmbedding:
    """One image's result; ``batch_size`` is how many images shared its forward pass."""

    embedding: np.ndarray  # [D] float32
    patch_tokens: np.ndarray | None  # [N, D] float32, only when asked for
    batch_size: int


def pick_device(use_gpu: str | bool = "auto") -> str:
    """'cuda' when asked for (or 'auto' and present), else 'cpu'."""
    import torch

    if use_gpu in (True, "true"):
        if not torch.cuda.is_available():
            raise RuntimeError("use_gpu=true but no CUDA device is visible to this process")
        return "cuda"
    if use_gpu in ("auto",) and torch.cuda.is_available():
        return "cuda"
    return "cpu"


class EncoderRunner:
    """A loaded target encoder plus the preprocessing contract it was trained with."""

    def __init__(
        self,
        encoder,
        cfg,
        *,
        info: ModelInfo,
        device: str = "cpu",
        checkpoint: str | Path | None = None,
    ) -> None:
        self.encoder = encoder.to(device).eval()
        self.device = device
        self.info = info
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self._fingerprint: str | None = None
        self.preprocess = Preprocess(
            image_size=cfg.ingest.image_size,
            dtype=cfg.ingest.dtype,
            window_percentiles=tuple(cfg.ingest.window_percentiles),
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        device: str = "cpu",
        name: str | None = None,
        version: str | None = None,
        source: str | None = None,
    ) -> EncoderRunner:
        """Load the TARGET encoder (the one the method evaluates) strictly from a checkpoint."""
        from radjepa.checkpoint import load_encoder, read_meta

        encoder, cfg = load_encoder(str(path), which="target", map_location="cpu")
        meta = read_meta(str(path))
        step = meta.get("step")
        step = int(step) if step is not None else None
        info = ModelInfo(
            name=name or str(meta.get("run_name") or cfg.train.run_name),
            version=version or (f"step-{step}" if step is not None else "unversioned"),
            step=step,
            arch=cfg.model.arch,
            patch_size=cfg.model.patch_size,
            img_size=cfg.model.img_size,
            embed_dim=int(encoder.embed_dim),
            source=source or str(path),
        )
        log.info(
            "loaded encoder %s %s (%s, dim %d) on %s",
            info.name,
            info.version,
            info.arch,
            info.embed_dim,
            device,
        )
        return cls(encoder, cfg, info=info, device=device, checkpoint=path)

    @property
    def fingerprint(self) -> str | None:
        """The checkpoint's fingerprint, what probe heads and indexes record of their encoder.

        None for an encoder not loaded from a checkpoint. Hashed on first use (it reads the
        whole weights file), so a server with neither head nor index never pays for it.
        """
        if self._fingerprint is None and self.checkpoint is not None:
            from radjepa.eval.heads import checkpoint_fingerprint

            self._fingerprint = checkpoint_fingerprint(self.checkpoint)
        return self._fingerprint

    def run(self, images: list[np.ndarray], want_tokens: list[bool]) -> list[ImageEmbedding]:
        """One forward over ``images`` (each [S, S] stored pixels) -> one result per image."""
        import torch

        from radjepa.transforms import prepare_images

        if not images:
            return []
        x = prepare_images(images, self.info.img_size).to(self.device)  # [B, 1, S, S]
        with torch.inference_mode():
            tokens = None
            if any(want_tokens):  # one forward serves both: the embedding is the token mean
                out = self.encoder(x)  # [B, N, D]
                pooled = out.mean(dim=1).float().cpu().numpy()  # [B, D], as encoder.embed
                tokens = out.float().cpu().numpy()
            else:
                pooled = self.encoder.embed(x).float().cpu().numpy()  # [B, D]
        n = len(images)
        return [
            ImageEmbedding(
                embedding=pooled[i],
                patch_tokens=tokens[i] if tokens is not None and want_tokens[i] else None,
                batch_size=n,
            )
            for i in range(n)
        ]

"""The model side of the service, as the HTTP app sees it.

The forward itself is :class:`radjepa.inference.EncoderRunner` (plain torch, shared with the
``radjepa embed`` batch job); its names are re-exported here for the service's modules. The app
only sees the :class:`Embedder` protocol, so it never knows whether the forward runs in-process
(:class:`LocalEmbedder`: tests, the naive baseline in ``bench/serve.py``) or behind a Ray Serve
handle.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import numpy as np

from radjepa.inference import EncoderRunner, ImageEmbedding, ModelInfo, Preprocess, pick_device

__all__ = [
    "ModelInfo",
    "Preprocess",
    "ImageEmbedding",
    "EncoderRunner",
    "Embedder",
    "LocalEmbedder",
    "pick_device",
]


class Embedder(Protocol):
    """What the HTTP app needs from the model side."""

    info: ModelInfo
    preprocess: Preprocess

    async def embed(
        self, images: list[np.ndarray], *, patch_tokens: bool = False
    ) -> list[ImageEmbedding]: ...

    async def ready(self) -> bool: ...


class LocalEmbedder:
    """In-process embedder: one forward per request, in a worker thread (no batching).

    Used where Ray is not wanted: route tests, and the naive baseline in the benchmark.
    """

    def __init__(self, runner: EncoderRunner) -> None:
        self.runner = runner
        self.info = runner.info
        self.preprocess = runner.preprocess

    @property
    def fingerprint(self) -> str | None:
        """Lets ``create_app`` check a head or index without being handed the fingerprint."""
        return self.runner.fingerprint

    async def embed(
        self, images: list[np.ndarray], *, patch_tokens: bool = False
    ) -> list[ImageEmbedding]:
        return await asyncio.to_thread(self.runner.run, images, [patch_tokens] * len(images))

    async def ready(self) -> bool:
        return True

"""Event-loop stall of a large /v1/embed answer: our writer vs FastAPI's response_model path.

    python bench/embed_json.py [--values 2000000] [--dim 768] [--reps 5]

A replica answers every request on one event loop: while an answer with patch tokens is
turned into JSON there, every other request waits (/healthz too). Ours builds the body in a
worker thread, a token row per call (``serve.schemas.embed_response_json``), so the loop runs
between rows; the baseline returns the ``EmbedResponse`` from the async route and lets FastAPI
validate and encode it on the loop, as /v1/embed did. Both routes answer the same bytes' worth
over in-process ASGI (httpx), while a ticker on the loop records its longest gap.

Prints one JSON line: the median longest stall and the median request time of each, and the
ratios (baseline / ours).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.responses import Response  # noqa: E402

from serve.schemas import (  # noqa: E402
    EmbeddingOut,
    EmbedResponse,
    ModelInfoOut,
    embed_response_json,
)

TICK_S = 0.002


def build_app(tokens: np.ndarray) -> FastAPI:
    info = ModelInfoOut(
        name="bench", version="1", step=1, arch="vit_base", patch_size=16, img_size=224,
        embed_dim=tokens.shape[1],
    )  # fmt: skip
    pooled = tokens.mean(axis=0).tolist()

    def result(with_tokens: bool) -> EmbeddingOut:
        return EmbeddingOut(
            image_id="0" * 64,
            dim=tokens.shape[1],
            embedding=pooled,
            patch_tokens=tokens.tolist() if with_tokens else None,
            batch_size=1,
        )

    app = FastAPI()

    @app.post("/baseline", response_model=EmbedResponse)
    async def baseline() -> EmbedResponse:
        return EmbedResponse(model=info, results=[result(True)])

    @app.post("/ours", response_model=EmbedResponse)
    async def ours() -> Response:
        def body() -> Response:
            data = embed_response_json(info, [(result(False), tokens)])
            return Response(data, media_type="application/json")

        return await asyncio.to_thread(body)

    return app


async def one_request(app: FastAPI, path: str) -> tuple[float, float, int]:
    """(longest loop stall, request seconds, body bytes) of one POST."""
    stall, done = 0.0, False

    async def ticker() -> None:
        nonlocal stall
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(TICK_S)
            now = time.perf_counter()
            stall, last = max(stall, now - last), now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)  # the ticker is running before the request starts
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        start = time.perf_counter()
        answer = await client.post(path)
        took = time.perf_counter() - start
    done = True
    await ticking
    answer.raise_for_status()
    return stall, took, len(answer.content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=2_000_000, help="patch-token floats")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    rows = max(1, args.values // args.dim)
    tokens = np.random.default_rng(0).normal(size=(rows, args.dim)).astype(np.float32)
    app = build_app(tokens)
    runs: dict[str, list[tuple[float, float, int]]] = {"ours": [], "baseline": []}
    for _ in range(args.reps):  # interleaved: both see the same machine load
        for path in runs:
            runs[path].append(asyncio.run(one_request(app, f"/{path}")))
    sizes = {run[2] for results in runs.values() for run in results}
    stall = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    took = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
    print(
        json.dumps(
            {
                "bench": "embed_json",
                "values": rows * args.dim,
                "body_mb": round(max(sizes) / 1e6, 1),
                "reps": args.reps,
                "machine": platform.machine(),
                "ours_max_loop_stall_ms": round(1000 * stall["ours"], 1),
                "baseline_max_loop_stall_ms": round(1000 * stall["baseline"], 1),
                "stall_ratio": round(stall["baseline"] / stall["ours"], 1),
                "ours_request_ms": round(1000 * took["ours"], 1),
                "baseline_request_ms": round(1000 * took["baseline"], 1),
                "request_time_ratio": round(took["baseline"] / took["ours"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()

"""Benchmark: our Ray Serve app (dynamic batching) vs a naive FastAPI app, side by side.

Both serve the SAME checkpoint through the SAME ``create_app`` routes and decoder; the naive
one runs under plain uvicorn with one forward per request (``LocalEmbedder``), ours behind
Ray Serve with ``@serve.batch``. For each concurrency (1, 8, 32) a bounded number of
``POST /v1/embed`` requests with a real radiograph PNG (the first of ``--images``, else of the
NIH sample beside the checkout, else of the bundled demo archive: ``bench/sample_images.py``)
is sent on loopback; we report throughput and p50/p99 latency for both, and their ratios, as
ONE JSON line. Ray is joined as every entry point
joins it (``pipelines.runtime.ensure_ray``): a RAY_ADDRESS that names no cluster it can join is
one line on stderr and exit status 2. It measures this machine only: a RAY_ADDRESS naming a
running cluster is refused the same way, since serving the bench there would replace and then
shut down that cluster's own Serve applications.

    python bench/serve.py [--config configs/tiny_cpu.yaml] [--model CKPT] [--requests 96]
                          [--images DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def random_checkpoint(cfg, folder: Path) -> Path:
    """A random-init encoder of the configured shape: speed does not depend on the weights."""
    from radjepa.checkpoint import save
    from radjepa.models.encoder import build_encoder

    save(folder, build_encoder(cfg), cfg, step=0)
    return folder


async def load(url: str, body: bytes, concurrency: int, n: int) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    queue = list(range(n))
    headers = {"content-type": "image/png"}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        for _ in range(2):  # warm-up (first forward, connection setup)
            (await client.post("/v1/embed", content=body, headers=headers)).raise_for_status()

        async def worker() -> None:
            while queue:
                queue.pop()
                t = time.perf_counter()
                r = await client.post("/v1/embed", content=body, headers=headers)
                r.raise_for_status()
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    return {
        "requests": n,
        "rps": round(n / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
    }


def wait_ready(url: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become ready")


def naive_server(model: str, port: int) -> None:
    """Child-process entry: the plain FastAPI app under uvicorn, no Ray, no batching."""
    import uvicorn

    from serve.app import create_app
    from serve.embedder import EncoderRunner, LocalEmbedder
    from serve.security import ApiSettings

    app = create_app(
        LocalEmbedder(EncoderRunner.from_checkpoint(model)),
        # synthetic images only: the public development key, opted into explicitly
        settings=ApiSettings(insecure_local=True, allow_development_key=True),
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "tiny_cpu.yaml")
    p.add_argument("--set", action="append", default=[], help="dotted config override")
    p.add_argument("--model", help="checkpoint folder (default: a random-init one from --config)")
    p.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-s", type=float, default=0.01)
    p.add_argument("--images", type=Path, help="folder of PNGs; the request sends the first")
    p.add_argument("--naive-server", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.naive_server:
        naive_server(args.model, args.naive_server)
        return 0

    import logging

    logging.basicConfig(level=logging.WARNING)
    levels = [int(c) for c in args.concurrency.split(",")]
    from bench.sample_images import find_pngs  # REPO is on sys.path by now (see __main__)

    body = find_pngs(args.images)[0].read_bytes()
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:  # the random checkpoint is a few MB to GBs (by --config): never left behind
        return _run(args, levels, body, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args: argparse.Namespace, levels: list[int], body: bytes, tmp: Path) -> int:
    """Both servers under load; the JSON line on stdout, or exit status 2 for a cluster that
    cannot be joined."""
    import ray
    from ray import serve

    from pipelines.cluster_address import require_local_ray
    from pipelines.runtime import ClusterError, ensure_ray
    from radjepa.config import load_config
    from serve.deployment import app_from_config

    base = load_config(args.config, args.set)
    model = args.model or str(random_checkpoint(base, tmp / "ckpt"))
    cfg = base.with_overrides(
        {
            "serve.model": model,
            "serve.insecure_local": True,
            "ingest.allow_development_key": True,  # synthetic images only
            "serve.max_batch_size": args.max_batch_size,
            "serve.batch_wait_timeout_s": args.batch_wait_s,
            "serve.max_ongoing_requests": max(levels) * 2,
        }
    )
    result: dict[str, object] = {
        "bench": "serve",
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        "model": f"{cfg.model.arch} p{cfg.model.patch_size} {cfg.model.img_size}px",
        "max_batch_size": args.max_batch_size,
        "batch_wait_s": args.batch_wait_s,
    }

    # ours: Ray Serve with dynamic batching
    try:
        require_local_ray(
            "bench/serve.py measures Ray Serve on this machine against a local baseline; on a "
            "cluster, serve.run and serve.shutdown would replace and then stop that cluster's "
            "Serve applications"
        )
        ensure_ray(local_cpus=os.cpu_count() or 1, log_to_driver=False)
    except ClusterError as err:  # the user's to fix: one line and exit 2, like `radjepa`
        print(f"error: {err}", file=sys.stderr)
        return 2
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_from_config(cfg), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    ours = {c: asyncio.run(load(url, body, c, args.requests)) for c in levels}
    serve.shutdown()
    ray.shutdown()

    # baseline: plain FastAPI + uvicorn, per-request forward
    nport = free_port()
    child = subprocess.Popen(
        [sys.executable, __file__, "--model", model, "--naive-server", str(nport)],
        cwd=REPO,
    )
    try:
        nurl = f"http://127.0.0.1:{nport}"
        wait_ready(nurl)
        naive = {c: asyncio.run(load(nurl, body, c, args.requests)) for c in levels}
    finally:
        child.terminate()
        child.wait(timeout=30)

    result["ray_serve"] = {str(c): v for c, v in ours.items()}
    result["naive_fastapi"] = {str(c): v for c, v in naive.items()}
    result["throughput_ratio"] = {
        str(c): round(ours[c]["rps"] / naive[c]["rps"], 2) for c in levels
    }
    result["p99_ratio"] = {str(c): round(ours[c]["p99_ms"] / naive[c]["p99_ms"], 2) for c in levels}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    # this file is bench/serve.py: keep its folder off sys.path so `serve` is the package
    here = Path(__file__).resolve().parent
    sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != here]
    sys.path.append(str(REPO))
    raise SystemExit(main())

"""Data-path benchmark: Parquet shard bytes -> augmented training batch on the device, no Ray.

    python bench/data_path.py [--rows 4096] [--batch 256] [--workers N] [--device cpu|cuda]

A temporary shard set is built at run time from a folder of same-size PNGs (``--images``, else
the 621-image NIH sample beside the checkout, else the 8 bundled demo PNGs; 256x256, uint8): the
images are replicated to ``--rows`` rows (each copy stamped so every row is unique, as after
ingest's dedup) and written with the shard schema of ``radjepa.shards`` and zstd, 2048 rows a
file, as ingest writes them. Nothing is downloaded. Both paths produce the same thing, a
``float32 [B, 1, 224, 224]`` batch of model input on ``--device``, and are timed over the same
number of images in the same run:

- ours: ``--workers`` threads stream whole record batches of the ``pixels`` column out of the
  files (pyarrow decompresses and decodes with the GIL released); each batch becomes ONE numpy
  view over the column's contiguous value buffer (``radjepa.shards.pixel_batch``, the decoder
  the training pipeline's Ray Data UDF uses; no per-row Python), is copied into a
  fixed-size staging tensor (pinned on CUDA, a ring of them so the copy of batch i+1 overlaps
  the transfer of batch i), sent to the device as uint8 (4x fewer bytes than float), then
  ``to_model_input`` and the batched ``random_resized_crop`` run there. Every batch has exactly
  ``--batch`` rows (static shapes for a compiled step);
- baseline: what the reference I-JEPA loader does per image: read the PNG file, decode with
  Pillow, torchvision ``RandomResizedCrop`` on the PIL image, to float tensor, normalise, stack
  (collate), pin on CUDA, copy to the device. It gets the same ``--workers`` threads.

It also times the decode step alone on one thread over the same record batches:
``pixel_batch`` (plus one copy of the batch, as Ray makes when it stores the UDF's output) vs
the row-by-row decode the training UDF used before (each row to ``bytes``,
``pixels_from_bytes``, ``np.stack``).

Prints ONE JSON line: both rates, their ratio, ours without the device stage, the decode-only
rates and ratio, workers, batch, device, cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(REPO))

from bench.sample_images import find_pngs  # noqa: E402
from radjepa.shards import SHARD_SCHEMA, pixel_batch, pixels_from_bytes  # noqa: E402
from radjepa.transforms import MEAN, STD, random_resized_crop, to_model_input  # noqa: E402

READ_COLUMNS = ["pixels", "height", "width", "dtype"]
CROP_SCALE = (0.3, 1.0)  # the method's (= DataConfig defaults)
CROP_RATIO = (0.75, 4.0 / 3.0)


# ---------------------------------------------------------------------------------------------
# The temporary shard set


def build_shards(out: Path, pngs: Sequence[Path], rows: int, shard_rows: int = 2048) -> list[Path]:
    """``rows`` uint8 rows cycled from ``pngs`` into zstd shards of ``shard_rows`` rows.

    Copy ``k`` of an image has ``k`` written into its first two pixels: every row is then
    unique, as ingest's dedup guarantees, so Parquet cannot dictionary-encode repeats away.
    """
    base = [np.asarray(Image.open(p).convert("L"), dtype=np.uint8) for p in pngs]
    h, w = base[0].shape
    if any(a.shape != (h, w) for a in base):
        raise SystemExit("the PNGs differ in size; expected one stored size")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, rows, shard_rows):
        n = min(shard_rows, rows - start)
        pixels, ids = [], []
        for i in range(start, start + n):
            a = base[i % len(base)].copy()
            a.flat[:2] = divmod(i // len(base), 256)
            b = a.tobytes()
            pixels.append(b)
            ids.append(hashlib.sha256(b).hexdigest())
        columns = {
            "image_id": pa.array(ids, pa.string()),
            "pixels": pa.array(pixels, pa.binary()),
            "height": pa.array(np.full(n, h, np.int32)),
            "width": pa.array(np.full(n, w, np.int32)),
            "dtype": pa.array(["uint8"] * n, pa.string()),
            "format": pa.array(["png"] * n, pa.string()),
        }
        arrays = [columns.get(f.name, pa.nulls(n, f.type)) for f in SHARD_SCHEMA]
        path = out / f"part-{start // shard_rows:05d}.parquet"
        table = pa.Table.from_arrays(arrays, schema=SHARD_SCHEMA)
        # as ingest writes them (radjepa.ingest.destination.Destination.write)
        pq.write_table(table, path, compression="zstd", write_page_checksum=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Ours: shard bytes -> fixed-size uint8 batches -> device


class ShardLoader:
    """Exactly-``batch``-row ``uint8 [B, H, W]`` tensors from shard files, read by threads.

    Each worker streams whole files (``iter_batches``); the consumer copies the views into a
    ring of staging tensors, pinned when ``pin`` so the host-to-device copy can be async. A
    slot handed to :meth:`hold` with an event is refilled only after that event (the caller's
    async copy out of it) has completed. The tail that does not fill a batch is dropped, as in
    training.
    """

    def __init__(
        self, paths: Sequence[Path], batch: int, workers: int, pin: bool, ring: int = 3
    ) -> None:
        if batch < 1 or workers < 1 or ring < 1:
            raise ValueError("batch, workers and ring must be >= 1")
        self.paths, self.batch, self.workers = list(paths), batch, workers
        self.pin, self.ring = pin, ring
        self._held: dict[int, torch.cuda.Event] = {}

    def hold(self, slot_id: int, event: torch.cuda.Event) -> None:
        """Do not refill ``slot_id`` before ``event`` (e.g. the async copy out of it) is done."""
        self._held[slot_id] = event

    def _produce(self, files: queue.Queue, out: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    path = files.get_nowait()
                except queue.Empty:
                    return
                pf = pq.ParquetFile(path)
                for rb in pf.iter_batches(
                    batch_size=self.batch, columns=READ_COLUMNS, use_threads=False
                ):
                    out.put(pixel_batch(rb))
                    if stop.is_set():
                        return
        except BaseException as err:  # surfaced in the consumer, never swallowed
            out.put(err)
        finally:
            out.put(None)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        files: queue.Queue = queue.Queue()
        for p in self.paths:
            files.put(p)
        out: queue.Queue = queue.Queue(maxsize=2 * self.workers)
        stop = threading.Event()
        threads = [
            threading.Thread(target=self._produce, args=(files, out, stop), daemon=True)
            for _ in range(min(self.workers, len(self.paths)))
        ]
        for t in threads:
            t.start()
        slots: list[torch.Tensor] = []
        views: list[np.ndarray] = []  # the slots as numpy: the batches are read-only Arrow views
        done, filled, k = 0, 0, 0
        try:
            while done < len(threads):
                item = out.get()
                if item is None:
                    done += 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                src = item  # [n, H, W] read-only view over the Arrow buffer
                pos = 0
                while pos < src.shape[0]:
                    if filled == 0:
                        if len(slots) < self.ring:
                            shape = (self.batch, *src.shape[1:])
                            dtype = torch.from_numpy(np.empty(0, src.dtype)).dtype
                            slots.append(torch.empty(shape, dtype=dtype, pin_memory=self.pin))
                            views.append(slots[-1].numpy())
                        if (ev := self._held.pop(k % self.ring, None)) is not None:
                            ev.synchronize()
                    view = views[k % self.ring]
                    if view.shape[1:] != src.shape[1:] or view.dtype != src.dtype:
                        raise ValueError("shards under one folder must share size and dtype")
                    take = min(self.batch - filled, src.shape[0] - pos)
                    view[filled : filled + take] = src[pos : pos + take]
                    filled, pos = filled + take, pos + take
                    if filled == self.batch:
                        yield k % self.ring, slots[k % self.ring]
                        filled, k = 0, k + 1
        finally:
            stop.set()
            while any(t.is_alive() for t in threads):  # unblock producers waiting on put()
                try:
                    out.get(timeout=0.05)
                except queue.Empty:
                    pass


def run_ours(
    paths: Sequence[Path],
    batch: int,
    workers: int,
    device: torch.device,
    crop: int,
    seed: int,
    device_stage: bool = True,
) -> tuple[int, float]:
    """(images, seconds) for one pass of our path; the device stage can be left out."""
    cuda = device.type == "cuda"
    loader = ShardLoader(paths, batch, workers, pin=cuda)
    gen = torch.Generator(device=device).manual_seed(seed)
    n, sink = 0, None
    t0 = time.perf_counter()
    for slot_id, pixels in loader:
        n += pixels.shape[0]
        if not device_stage:
            continue
        x = pixels.to(device, non_blocking=True)  # uint8 [B, H, W]
        if cuda:  # the slot may be refilled once this copy has left it
            ev = torch.cuda.Event()
            ev.record()
            loader.hold(slot_id, ev)
        x = random_resized_crop(to_model_input(x), crop, CROP_SCALE, CROP_RATIO, generator=gen)
        sink = x  # [B, 1, crop, crop] float32 on the device
    if cuda:
        torch.cuda.synchronize(device)
    if sink is not None and sink.shape != (batch, 1, crop, crop):
        raise AssertionError(f"our path produced {tuple(sink.shape)}")
    return n, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Baseline: per-image PNG decode + torchvision RandomResizedCrop (the reference loader)


def run_baseline(
    pngs: Sequence[Path], rows: int, batch: int, workers: int, device: torch.device, crop: int
) -> tuple[int, float]:
    """(images, seconds) for the reference-style per-image loader over ``rows`` images."""
    from torchvision import transforms as T

    rrc = T.RandomResizedCrop(crop, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True)

    def load(i: int) -> torch.Tensor:
        with Image.open(pngs[i % len(pngs)]) as im:
            im = rrc(im.convert("L"))
        t = torch.from_numpy(np.array(im, dtype=np.uint8))  # [S, S]
        return (t.to(torch.float32)[None] / 255.0 - MEAN) / STD  # [1, S, S]

    cuda = device.type == "cuda"
    n, x = 0, None
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, rows - batch + 1, batch):
            x = torch.stack(list(pool.map(load, range(start, start + batch))))  # [B, 1, S, S]
            if cuda:
                x = x.pin_memory()
            x = x.to(device, non_blocking=True)
            n += batch
    if cuda:
        torch.cuda.synchronize(device)
    if x is not None and x.shape != (batch, 1, crop, crop):
        raise AssertionError(f"baseline produced {tuple(x.shape)}")
    return n, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------


def decode_rates(paths: Sequence[Path], batch: int, passes: int = 3) -> tuple[float, float]:
    """(ours, per-row) images/s of the decode step alone, one thread, same record batches:
    the best of ``passes`` passes of each, taken in turn after an untimed one of each (one
    cold pass each, ours first, made the ratio swing from 0.5x to 3x on a busy machine)."""
    batches = [
        rb
        for p in paths
        for rb in pq.ParquetFile(p).iter_batches(batch_size=batch, columns=READ_COLUMNS)
    ]
    n = sum(rb.num_rows for rb in batches)

    def per_row(rb: pa.RecordBatch) -> np.ndarray:
        cols = [rb.column(c).to_pylist() for c in READ_COLUMNS]
        return np.stack([pixels_from_bytes(b, h, w, d) for b, h, w, d in zip(*cols, strict=True)])

    decoders = (lambda rb: pixel_batch(rb).copy(), per_row)
    best = [0.0, 0.0]
    for timed in [False] + [True] * passes:
        for i, decode in enumerate(decoders):
            t0 = time.perf_counter()
            for rb in batches:
                decode(rb)
            if timed:
                best[i] = max(best[i], n / (time.perf_counter() - t0))
    return best[0], best[1]


def _timed(fn: Callable[[], tuple[int, float]]) -> float:
    n, seconds = fn()
    if n == 0:
        raise SystemExit("no full batch was produced: raise --rows or lower --batch")
    return n / seconds


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    """The bench's flags (the GPU suite's test parses its planned commands with it)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096, help="images in the temporary shards")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=_cores(), help="reader/decoder threads")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--shard-rows", type=int, default=2048, help="rows per shard file (ingest)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--images", type=Path, help="folder of same-size PNGs (default: the NIH or bundled ones)"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    if args.rows < args.batch:
        raise SystemExit(f"--rows {args.rows} must hold at least one --batch {args.batch}")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)  # torchvision's crop draws from the global generator

    pngs = find_pngs(args.images)
    work = Path(tempfile.mkdtemp(prefix="radjepa-bench-data-"))
    try:
        t0 = time.perf_counter()
        paths = build_shards(work, pngs, args.rows, args.shard_rows)
        build_s = time.perf_counter() - t0
        warm = paths[:1]  # warm both paths (imports, allocator, CUDA context, page cache)
        run_ours(warm, args.batch, args.workers, device, args.crop, args.seed)
        run_baseline(pngs, args.batch, args.batch, args.workers, device, args.crop)

        ours = _timed(
            lambda: run_ours(paths, args.batch, args.workers, device, args.crop, args.seed)
        )
        host = _timed(
            lambda: run_ours(
                paths, args.batch, args.workers, device, args.crop, args.seed, device_stage=False
            )
        )
        base = _timed(
            lambda: run_baseline(pngs, args.rows, args.batch, args.workers, device, args.crop)
        )
        decode_ours, decode_rows = decode_rates(paths, args.batch)
        shard_mb = sum(p.stat().st_size for p in paths) / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        json.dumps(
            {
                "bench": "data_path",
                "rows": args.rows,
                "batch": args.batch,
                "workers": args.workers,
                "crop": args.crop,
                "device": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else f"cpu {platform.machine()}",
                "cores": _cores(),
                "torch_threads": torch.get_num_threads(),
                "ours_img_per_s": round(ours, 1),
                "ours_host_only_img_per_s": round(host, 1),
                "baseline_img_per_s": round(base, 1),
                "speedup": round(ours / base, 2),
                "decode_img_per_s": round(decode_ours, 1),
                "decode_per_row_img_per_s": round(decode_rows, 1),
                "decode_speedup": round(decode_ours / decode_rows, 2),
                "source_pngs": len(pngs),  # 621 for the recorded figures
                "shard_mb": round(shard_mb, 1),
                "build_s": round(build_s, 2),
                "torch": torch.__version__,
                "pyarrow": pa.__version__,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

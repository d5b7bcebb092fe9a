"""Benchmark: ingest images/s per core (our Ray pipeline) vs a naive single-process loop.

The corpus is built at run time from PNG radiographs (``--png-dir``, else the NIH sample beside
the checkout, else the bundled demo PNGs: ``bench/sample_images.py``): each PNG is upsampled to
a CR-like size, widened to 12 bits and written as DICOM (half uncompressed, a quarter RLE
Lossless, a quarter JPEG 2000 Lossless). Nothing is downloaded. Both paths process the SAME files:

- naive: one process, ``pydicom.dcmread`` -> ``pixel_array`` -> percentile window -> Pillow
  resize to ``--size`` (the loop most prototypes start with; no LUTs, no metadata, no output);
- ours: ``run_ingest`` (Ray Data read tasks + decoder actor pool + Parquet shards + manifest),
  timed end to end after Ray is up, divided by the cores of this machine.

Prints ONE JSON line: both rates, their ratio, and bytes per stored image. Ray is joined as
every entry point joins it (``pipelines.runtime.ensure_ray``): a RAY_ADDRESS that names no
cluster it can join is one line on stderr and exit status 2, and so is one naming a running
cluster: the figures are per core of this machine, from a corpus in its temporary folder.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: ``bench`` is a folder of the checkout


def build_corpus(out: Path, n: int, side: int, images: Path | None = None) -> list[Path]:
    """``n`` DICOM files from the PNGs of ``images`` (or the NIH/bundled ones; cycled), ``side``
    x ``side`` 12-bit MONOCHROME2."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

    from bench.sample_images import find_pngs

    pngs = find_pngs(images, flag="--png-dir")
    paths = []
    for i in range(n):
        grey = Image.open(pngs[i % len(pngs)]).convert("L").resize((side, side), Image.BICUBIC)
        px = (np.asarray(grey).astype(np.uint16) * 16 + (i % 16)).astype(np.uint16)  # 12-bit
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientSex, ds.PatientAge = "DX", f"P{i}", "M", "050Y"
        ds.Rows = ds.Columns = side
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = px.tobytes()
        kind = ("raw", "raw", "rle", "j2k")[i % 4]
        if kind == "rle":
            ds.compress(RLELossless, px)
        elif kind == "j2k":
            ds.compress(JPEG2000Lossless, px)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        path = out / f"{i:05d}_{kind}.dcm"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def naive(paths: list[Path], size: int) -> float:
    """Seconds for the naive single-process loop over ``paths``."""
    import pydicom

    t0 = time.perf_counter()
    for p in paths:
        arr = pydicom.dcmread(p).pixel_array.astype(np.float32)
        lo, hi = np.percentile(arr, (0.5, 99.5))
        img = np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1)
        h, w = img.shape
        s = min(h, w)
        crop = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        out = Image.fromarray(crop).resize((size, size), Image.BILINEAR)
        np.asarray(out)
    return time.perf_counter() - t0


def library_only(paths: list[Path], size: int) -> float:
    """Seconds for ``decode_image`` alone in this process (our decoder without Ray)."""
    from radjepa.imaging.decode import decode_image
    from radjepa.imaging.deid import DEV_SECRET

    t0 = time.perf_counter()
    for p in paths:
        decode_image(p.read_bytes(), size=size, secret=DEV_SECRET)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--source-size", type=int, default=1024, help="side of the DICOMs")
    ap.add_argument("--size", type=int, default=256, help="stored size")
    ap.add_argument("--actors", type=int, default=0, help="decoder actors (0: one per core)")
    ap.add_argument("--png-dir", type=Path, help="folder of PNGs the corpus is made from")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

    import ray

    from pipelines.cluster_address import require_local_ray
    from pipelines.ingest import run_ingest
    from pipelines.runtime import ClusterError, ensure_ray
    from radjepa.config import load_config

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="radjepa-bench-ingest-"))
    try:
        # said before the corpus is built: a wrong RAY_ADDRESS, or a cluster
        require_local_ray(
            "bench/ingest.py measures ingest per core of this machine against a one-process "
            "baseline on it, from a corpus in this machine's temporary folder that a cluster's "
            "other nodes cannot read"
        )
        src = work / "src"
        src.mkdir()
        paths = build_corpus(src, args.images, args.source_size, args.png_dir)
        naive(paths[:4], args.size)  # warm imports and caches for both paths
        library_only(paths[:4], args.size)
        t_naive = naive(paths, args.size)
        t_lib = library_only(paths, args.size)

        ensure_ray(local_cpus=cores, log_to_driver=False)
        cfg = load_config(
            None,
            [
                f"ingest.image_size={args.size}",
                f"ingest.decode_actors={args.actors or cores}",
                "ingest.allow_development_key=true",  # synthetic images only
            ],
        )
        t0 = time.perf_counter()
        summary = run_ingest([str(src)], str(work / "dst"), cfg, progress=False)
        t_ours = time.perf_counter() - t0
        ray.shutdown()
        shard_bytes = sum(p.stat().st_size for p in (work / "dst" / "images").glob("*.parquet"))
        n = len(paths)
        ours_per_core = n / t_ours / cores
        naive_per_core = n / t_naive
        print(
            json.dumps(
                {  # noqa: T201 - the benchmark's one output line
                    "bench": "ingest",
                    "images": n,
                    "source_size": args.source_size,
                    "stored_size": args.size,
                    "mix": "50% explicit VR LE, 25% RLE Lossless, 25% JPEG 2000 Lossless; 12-bit",
                    "cores": cores,
                    "ours_images_per_s": round(n / t_ours, 2),
                    "ours_images_per_s_per_core": round(ours_per_core, 2),
                    "naive_images_per_s_per_core": round(naive_per_core, 2),
                    "ratio_per_core_ours_over_naive": round(ours_per_core / naive_per_core, 3),
                    "decode_image_only_images_per_s_per_core": round(n / t_lib, 2),
                    "ours_stored_ok": summary.ok,
                    "bytes_per_stored_image": round(shard_bytes / max(summary.ok, 1), 1),
                    "raw_bytes_per_stored_image": args.size * args.size,
                }
            )
        )
    except ClusterError as err:  # the user's to fix: one line and exit 2, like `radjepa`
        print(f"error: {err}", file=sys.stderr)  # noqa: T201 - entry point output
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

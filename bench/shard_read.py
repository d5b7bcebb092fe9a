"""Training-stream read benchmark: our shard source vs Ray Data's Parquet reader, in one Ray.

    python bench/shard_read.py [--rows 8192] [--shard-rows 2048] [--passes 3] [--images DIR]

The training stream reads the shards through :mod:`pipelines.shard_source` (pyarrow with page
checksums verified, blocks of 256 rows), not ``ray.data.read_parquet`` (2.60, datasource v2),
which drops the checksum option it is given. This measures what that costs: the same
temporary shards (built as ``bench/data_path.py`` builds them: PNGs replicated to ``--rows``
unique rows, the shard schema, zstd, page checksums) are read with the training columns and
decoded by the training UDF (``decode_training_batch``) through each reader (Ray's with its
footer-reading actors sized to the files, as the stream sized them), in turn, pass after
pass (each reader's first pass is a warm-up, not timed). Rates are images per second of the
best timed pass; ``ratio`` is ours over Ray's. Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data_path import build_shards  # noqa: E402
from bench.sample_images import find_pngs  # noqa: E402


def _pass(make_dataset) -> tuple[int, float]:
    """Rows and seconds of one full pass over a fresh dataset (a new execution)."""
    ds = make_dataset()
    t0 = time.perf_counter()
    rows = sum(len(b["image"]) for b in ds.iter_batches(batch_size=256, batch_format="numpy"))
    return rows, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--shard-rows", type=int, default=2048)
    ap.add_argument("--passes", type=int, default=3, help="timed passes per reader")
    ap.add_argument("--cpus", type=int, default=None, help="Ray's CPUs (default: all)")
    ap.add_argument("--images", type=Path, help="folder of same-size PNGs")
    args = ap.parse_args(argv)
    if args.passes < 1:
        raise SystemExit("--passes must be at least 1")

    import pyarrow.fs as pafs
    import ray
    import ray.data

    from pipelines.shard_source import read_shards
    from radjepa.training_data import TRAINING_COLUMNS, decode_training_batch

    pngs = find_pngs(args.images)
    work = Path(tempfile.mkdtemp(prefix="radjepa-bench-read-"))
    try:
        files = [str(p) for p in build_shards(work, pngs, args.rows, args.shard_rows)]
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        fs = pafs.LocalFileSystem()

        def decoded(ds):
            return ds.map_batches(
                decode_training_batch,
                batch_format="pyarrow",
                batch_size=256,
                fn_kwargs={"holdout_fraction": 0.0},
            )

        # the pool of footer-reading actors Ray's reader starts for every pass, sized to the
        # files (one per 10, at most Ray's 32) as the training stream sized it when it used it
        os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = str(min(32, -(-len(files) // 10)))
        readers = {
            "ours": lambda: decoded(
                read_shards(files, filesystem=fs, shown=str(work), columns=TRAINING_COLUMNS)
            ),
            "ray_read_parquet": lambda: decoded(
                ray.data.read_parquet(files, filesystem=fs).select_columns(TRAINING_COLUMNS)
            ),
        }
        best: dict[str, float] = {}
        for name, make in readers.items():  # warm-up: worker start-up, imports, page cache
            rows, _ = _pass(make)
            if rows != args.rows:
                raise SystemExit(f"{name} read {rows} rows of {args.rows}")
        for _ in range(args.passes):
            for name, make in readers.items():
                rows, seconds = _pass(make)
                best[name] = max(best.get(name, 0.0), rows / seconds)
        cpus = int(ray.cluster_resources().get("CPU", 0))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "bench": "shard_read",
                "rows": args.rows,
                "shard_rows": args.shard_rows,
                "passes": args.passes,
                "ray_cpus": cpus,
                "machine": f"cpu {platform.machine()} x{os.cpu_count()}",
                "ours_img_per_s": round(best["ours"], 1),
                "ray_read_parquet_img_per_s": round(best["ray_read_parquet"], 1),
                "ratio": round(best["ours"] / best["ray_read_parquet"], 3),
                "ray": ray.__version__,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Similar-case index: our loader and search vs the straightforward ones, on one index.

    python bench/index.py [--rows 200000] [--dim 768] [--rows-per-file 50000] [--queries 16]

Writes an index folder shaped like `radjepa embed`'s (several Parquet parts, the embedding as a
fixed-size float32 list, image id and pseudonym columns of 64 hex characters, the record
columns), then loads it in two fresh processes: ``ours`` is ``serve.index.EmbeddingIndex
.from_parquet``; ``baseline`` is the straightforward load it replaced (every part read into one
concatenated table, the column converted to a float32 matrix, rows normalised into a new array,
ids as Python lists). Each process reports its peak RSS (``ru_maxrss``), its RSS once loaded
and the load time; both must hold the same unit-row matrix. Ours also reports the bytes its
compact id and pseudonym columns hold (``ours_ids_mib``) and the RSS the same values take as
the index held them before (lists of ``str`` and dicts of row lists, ``ids_as_lists_mib``,
measured in the same process after the rest). The loaded index then answers
``--queries`` searches (top 10) as one request's images do: ours in one pass over the matrix
(``search_many``), the baseline one pass per query (``search`` in a loop, as the API did);
and as archived DICOM uploads (each an index row whose instance pseudonym the index holds):
ours reads the same-instance check from the search's scores, the baseline made a pass of its
own per upload for it (``archived_*``). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PIDS = ("patient_pid", "study_pid", "series_pid", "instance_pid")


def write_index(folder: Path, rows: int, dim: int, rows_per_file: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, rows, rows_per_file)):
        n = min(rows_per_file, rows - start)
        ids = [f"{i:064x}" for i in range(start, start + n)]
        emb = rng.standard_normal((n, dim), dtype=np.float32)
        cols = {"image_id": pa.array(ids, pa.string())}
        for c in PIDS:  # three images per patient, study and series; one per instance
            cols[c] = pa.array(
                ids if c == "instance_pid" else [f"{i // 3:064x}" for i in range(start, start + n)]
            )
        for c, v in (
            ("model", "bench"),
            ("encoder_sha256", "e" * 64),
            ("image_id_scheme", "hmac-sha256"),
        ):
            cols[c] = pa.array([v] * n, pa.string())
        cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)
        # row groups of a few thousand rows, as Ray Data's write_parquet leaves them
        pq.write_table(pa.table(cols), folder / f"part-{part:05d}.parquet", row_group_size=4096)


def load_baseline(folder: Path) -> tuple[np.ndarray, list[str]]:
    """The whole-table load: every part at once, then a float32 copy and a normalised copy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("*.parquet"))])
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    matrix = flat.astype(np.float32).reshape(len(table), -1)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    unit = (matrix / np.maximum(norms, 1e-12)).astype(np.float32)
    ids = table.column("image_id").to_pylist()
    _pids = {c: table.column(c).to_pylist() for c in PIDS}
    return unit, ids


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def lists_mib(index) -> float:
    """RSS the index's ids and pseudonyms take as it held them before its compact columns:
    five lists of ``str`` and dicts of row lists for the two columns exclusions look up."""
    before = _rss()
    ids = list(index.image_ids)
    pids = {c: list(column) for c, column in index.pids.items()}
    lookups = [{}, {}]
    for rows, values in zip(lookups, (ids, pids["patient_pid"]), strict=True):
        for i, v in enumerate(values):
            if v is not None:
                rows.setdefault(v, []).append(i)
    return (_rss() - before) / 2**20


def search_times(index, queries: int, reps: int = 3) -> tuple[float, float]:
    """Best-of-``reps`` seconds for ``queries`` searches: in one pass, and one at a time."""
    q = np.random.default_rng(1).standard_normal((queries, index.dim)).astype(np.float32)
    none = [None] * queries
    together, alone = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        many = index.search_many(q, 10, none)
        together.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        one = [index.search(row, 10) for row in q]
        alone.append(time.perf_counter() - t0)
    if [[h.image_id for h in hs] for hs in many] != [[h.image_id for h in hs] for hs in one]:
        raise SystemExit("the two searches disagree")
    return min(together), min(alone)


def archived_times(index, queries: int, reps: int = 3) -> tuple[float, float]:
    """Best-of-``reps`` seconds for ``queries`` archived DICOM uploads (each an index row, its
    instance pseudonym known) searched as `/v1/similar` does: the same-instance check from the
    search's own scores (``scores`` + ``rows_of_instance(scores=...)`` + ``top``), and as it
    did before 2026-12-07, a pass over the matrix of its own per upload beside the search's."""
    rows = np.random.default_rng(2).choice(len(index), queries, replace=False)
    q = index.matrix[rows]
    pids = [index.pids["instance_pid"][int(r)] for r in rows]
    ours, before = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        scores = index.scores(q)
        own = [index.rows_of_instance(p, scores=s) for p, s in zip(pids, scores, strict=True)]
        found = [index.top(s, 10, o) for s, o in zip(scores, own, strict=True)]
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        old = [index.rows_of_instance(p, row) for p, row in zip(pids, q, strict=True)]
        then = index.search_many(q, 10, old)
        before.append(time.perf_counter() - t0)
    if [[h.image_id for h in hs] for hs in found] != [[h.image_id for h in hs] for hs in then]:
        raise SystemExit("the two archived searches disagree")
    return min(ours), min(before)


def measure(which: str, folder: Path, queries: int) -> dict[str, float]:
    """Run in a fresh process: load, then report memory and time (and a checksum); ours
    also times the searches."""
    t0 = time.perf_counter()
    index = None
    if which == "ours":
        from serve.index import EmbeddingIndex

        index = EmbeddingIndex.from_parquet(folder)
        matrix, ids = index.matrix, index.image_ids
        seconds = time.perf_counter() - t0
        together, alone = search_times(index, queries)
        archived, archived_before = archived_times(index, queries)
    else:
        matrix, ids = load_baseline(folder)
        seconds = time.perf_counter() - t0
        together = alone = archived = archived_before = float("nan")
    rss = _rss()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "load_s": seconds,
        "peak_rss_mib": peak,
        "loaded_rss_mib": rss / 2**20,
        "ids_mib": index.ids_nbytes / 2**20 if index is not None else float("nan"),
        "ids_as_lists_mib": lists_mib(index) if index is not None else float("nan"),
        "matrix_mib": matrix.nbytes / 2**20,
        "checksum": float(np.abs(matrix[:: max(1, len(ids) // 1000)]).sum()),
        "rows": len(ids),
        "search_many_s": together,
        "search_loop_s": alone,
        "archived_s": archived,
        "archived_before_s": archived_before,
    }


def in_fresh_process(which: str, folder: Path, queries: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--measure", which, "--folder", str(folder)]
        + ["--queries", str(queries)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--rows-per-file", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=16, help="images of one /v1/similar request")
    ap.add_argument("--measure", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.folder, args.queries)))
        return
    with tempfile.TemporaryDirectory(prefix="radjepa-index-bench-") as tmp:
        folder = Path(tmp) / "index"
        write_index(folder, args.rows, args.dim, args.rows_per_file)
        ours = in_fresh_process("ours", folder, args.queries)
        base = in_fresh_process("baseline", folder, args.queries)
    if ours["rows"] != base["rows"] or not np.isclose(
        ours["checksum"], base["checksum"], rtol=1e-5
    ):
        raise SystemExit(f"the two loads disagree: {ours} vs {base}")
    print(
        json.dumps(
            {
                "bench": "index",
                "rows": args.rows,
                "dim": args.dim,
                "rows_per_file": args.rows_per_file,
                "matrix_mib": round(ours["matrix_mib"], 1),
                "ours_peak_rss_mib": round(ours["peak_rss_mib"], 1),
                "baseline_peak_rss_mib": round(base["peak_rss_mib"], 1),
                "peak_ratio": round(base["peak_rss_mib"] / ours["peak_rss_mib"], 2),
                "ours_loaded_rss_mib": round(ours["loaded_rss_mib"], 1),
                "baseline_loaded_rss_mib": round(base["loaded_rss_mib"], 1),
                "ours_above_matrix_mib": round(ours["loaded_rss_mib"] - ours["matrix_mib"], 1),
                "ours_ids_mib": round(ours["ids_mib"], 1),
                "ids_as_lists_mib": round(ours["ids_as_lists_mib"], 1),
                "ids_ratio": round(ours["ids_as_lists_mib"] / ours["ids_mib"], 2),
                "ours_load_s": round(ours["load_s"], 2),
                "baseline_load_s": round(base["load_s"], 2),
                "load_speedup": round(base["load_s"] / ours["load_s"], 2),
                "queries": args.queries,
                "ours_search_ms": round(1e3 * ours["search_many_s"], 2),
                "baseline_search_ms": round(1e3 * ours["search_loop_s"], 2),
                "search_speedup": round(ours["search_loop_s"] / ours["search_many_s"], 2),
                "ours_archived_ms": round(1e3 * ours["archived_s"], 2),
                "baseline_archived_ms": round(1e3 * ours["archived_before_s"], 2),
                "archived_speedup": round(ours["archived_before_s"] / ours["archived_s"], 2),
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()

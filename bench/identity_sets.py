"""Ingest's identity sets at archive scale: compact arrays vs Python strings, on one DST.

    python bench/identity_sets.py [--images 1000000] [--ray-actors 2] [--no-ray]

An incremental ingest reads, once per run, what its DST already holds: the ids of the bytes it
has seen (``Destination.known_ids``: every image id, and ``path:<source hash>`` of the files
quarantined unread), which every decoder actor receives through Ray's object store, and the
stored DICOM instances (``InstanceIndex``: instance pseudonym -> shard number) on the driver.
The bench writes a DST of ``--images`` stored images (Parquet shards of ``--shard-rows`` rows
with ingest's column formats: 64-hex image ids, 32-hex instance pseudonyms; plus quarantine rows
with a 64-hex sha256 or none and a 32-hex path hash, ``--quarantine-fraction`` of the images;
with ``--duplicate-fraction``, duplicate rows naming stored images) and measures, each in a
fresh process on the same files:

- ``ours``: ``Destination.known_ids`` (:class:`radjepa.ingest.id_sets.KnownIds`, sorted
  fixed-width numpy byte arrays, ``in`` by binary search) and ``InstanceIndex`` (sorted
  pseudonym bytes + int32 shard numbers);
- ``baseline``: what they were before 2026-12-05, rebuilt here line for line: a ``set`` of
  ``str`` from each column's ``to_pylist`` (then ``frozenset`` of it, as ``ray.put`` was given),
  and a ``dict`` of ``str`` -> ``int`` filled shard by shard.

For each: build seconds, the driver's RSS growth (after ``gc``; the baseline also with the
frozenset copy ``ray.put`` took) and its peak while building the known ids, the pickled size
(ours: the in-band pickle plus its out-of-band numpy buffers, as Ray's serializer stores
them), the RSS growth of unpickling one copy in the process (what each decoder actor paid for
a plain pickle), and ``in`` throughput on stored ids (hits), fresh ids (misses), and ids one
byte away from a stored one (near misses; an exact set
must say no). Then, unless ``--no-ray``, a local Ray (2 CPUs, 512 MB object store) puts each
representation once and ``--ray-actors`` actors ``ray.get`` it: each reports its private memory
growth (USS: ``Private_*`` of ``/proc/self/smaps_rollup``) and whether the arrays it got are
read-only views of the object store (zero-copy). Prints one JSON line.

With duplicate rows, ``recorded_inputs_kept_dict_s`` is the part of ``recorded_inputs`` that
builds its ``kept`` dict (image id -> ``kept_image_id``, Python ``str``) from the duplicates'
columns, and ``recorded_inputs_kept_dict_share`` its share of the whole.

``--measure recorded --dst DST`` times ``Destination.recorded_inputs`` alone on an existing DST
(a fresh process: s, and its peak over the RSS before it), to compare two versions of the code
on one DST.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
LOOKUPS = 200_000


def hex_column(raw: np.ndarray) -> Any:
    """An Arrow string array of the lowercase hex of each row of ``raw`` ([n, bytes] uint8),
    built from buffers (a Python str per row would take minutes at 10 million)."""
    import pyarrow as pa

    n, width = raw.shape
    digits = np.empty((n, 2 * width), np.uint8)
    digits[:, 0::2], digits[:, 1::2] = _HEX[raw >> 4], _HEX[raw & 15]
    offsets = np.arange(0, n * 2 * width + 1, 2 * width, dtype=np.int64)
    return pa.Array.from_buffers(
        pa.large_string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(digits.reshape(-1))]
    ).cast(pa.string())


def write_dst(
    root: Path, images: int, shard_rows: int, quarantined: int, duplicates: int = 0
) -> None:
    """A DST's three Parquet folders with ingest's id columns, and the image size a run's checks
    read (the other columns are not read). ``duplicates`` rows (one run's file) each name a
    stored image as their ``kept_image_id``, cycling through the first shard's ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    for sub in ("images", "quarantine", "duplicates"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, images, shard_rows)):
        n = min(shard_rows, images - start)
        table = pa.table(
            {
                "image_id": hex_column(rng.integers(0, 256, (n, 32), np.uint8)),
                "instance_pid": hex_column(rng.integers(0, 256, (n, 16), np.uint8)),
                "source_hash": hex_column(rng.integers(0, 256, (n, 16), np.uint8)),
                "height": pa.array(np.full(n, 256, np.int32)),  # what check_key reads
                "dtype": pa.array(["uint8"] * n, pa.string()),
            }
        )
        pq.write_table(table, root / "images" / f"part-bench-{part:05d}.parquet")
    # half read (a sha256 and a path hash), half quarantined unread (a path hash only)
    sha = hex_column(rng.integers(0, 256, (quarantined, 32), np.uint8))
    sha = pa.array([v if i % 2 else None for i, v in enumerate(sha.to_pylist())], pa.string())
    source = hex_column(rng.integers(0, 256, (quarantined, 16), np.uint8))
    pq.write_table(
        pa.table({"sha256": sha, "source_hash": source}),
        root / "quarantine" / "quarantine-bench.parquet",
    )
    first = pq.read_table(root / "images" / "part-bench-00000.parquet", columns=["image_id"])
    kept = first["image_id"].combine_chunks()
    pq.write_table(
        pa.table(
            {
                "image_id": hex_column(rng.integers(0, 256, (duplicates, 32), np.uint8)),
                "kept_image_id": kept.take(np.arange(duplicates) % len(kept)),
                "source_hash": hex_column(rng.integers(0, 256, (duplicates, 16), np.uint8)),
            }
        ),
        root / "duplicates" / "duplicates-bench.parquet",
    )


def measure_start(dst: str, baseline: bool = False) -> dict[str, Any]:
    """In a fresh process: what a run reads of an older DST (no key record) before it decodes,
    in ``pipelines.ingest``'s order: ``check_key`` (which asks whether DST holds any id), then
    ``known_ids``; then, apart, ``recorded_inputs`` (read at the first input DST holds). Counts
    the Parquet reads of each (a DST of ``k`` files read once is ``k`` reads a column).

    ``baseline``: as before ``Destination`` kept its known ids, the run builds them again after
    ``check_key`` built them, and ``recorded_inputs`` keys every row in Python as it did
    (:func:`_baseline_recorded_keys`)."""
    import pyarrow.parquet as pq

    import radjepa.ingest.destination as destination
    from radjepa.imaging.deid import DEV_SECRET, key_fingerprint

    reads: list[str] = []
    read_table = pq.read_table

    def counted(path: Any, *args: Any, columns: Any = None, **kwargs: Any) -> Any:
        reads.extend(columns or ["*"])
        return read_table(path, *args, columns=columns, **kwargs)

    destination.pq.read_table = counted  # type: ignore[attr-defined]
    dest = destination.Destination(dst)
    key = {"key": "development", "key_fingerprint": key_fingerprint(DEV_SECRET)}
    out: dict[str, Any] = {}
    _settled()
    rss0 = _rss()
    t0 = time.perf_counter()
    destination.check_key(dest, None, {**key, "patient_identity": "patient_id"}, "BENCH")
    if baseline:
        dest._known = None  # built by check_key; the run built them again
    known = dest.known_ids()
    out["start_s"] = time.perf_counter() - t0
    out["start_peak_bytes"] = _maxrss() - rss0
    out["start_id_reads"] = reads.count("image_id") + reads.count("sha256")
    out["known_entries"] = len(known)
    del known
    _settled()
    reads.clear()
    peak0 = _maxrss()
    t0 = time.perf_counter()
    keys = _baseline_recorded_keys(dest) if baseline else dest.recorded_inputs()[0]
    out["recorded_s"] = time.perf_counter() - t0
    out["recorded_peak_above_start_bytes"] = _maxrss() - peak0
    out["recorded_nbytes"] = len(keys) * 8
    out["recorded_id_reads"] = reads.count("image_id") + reads.count("sha256")
    if not baseline:  # its ``kept`` dict alone: the duplicates' two columns as Python str
        tables = [
            read_table(p, columns=["image_id", "kept_image_id"], filesystem=dest.fs)
            for p in dest._parquet("duplicates")
        ]
        t0 = time.perf_counter()
        kept: dict[str, str] = {}
        for t in tables:
            kept.update(zip(t["image_id"].to_pylist(), t["kept_image_id"].to_pylist(), strict=True))
        out["recorded_kept_dict_s"] = time.perf_counter() - t0
        out["recorded_kept_entries"] = len(kept)
    return out


def _baseline_recorded_keys(dest: Any) -> np.ndarray:
    """What ``Destination.recorded_inputs`` computed before keying whole columns: the same
    columns read, each row keyed in Python (an f-string, ``encode``, an 8-byte BLAKE2b,
    ``int.from_bytes``), then ``np.unique``. The baseline of the recorded-inputs figures."""
    import hashlib

    import pyarrow.parquet as pq

    keys = []
    for sub, id_column in (
        ("images", "image_id"),
        ("quarantine", "sha256"),
        ("duplicates", "image_id"),
    ):
        for path in dest._parquet(sub):
            table = pq.read_table(path, columns=[id_column, "source_hash"], filesystem=dest.fs)
            pairs = zip(table[id_column].to_pylist(), table["source_hash"].to_pylist(), strict=True)
            keys.append(
                np.fromiter(
                    (
                        int.from_bytes(
                            hashlib.blake2b(f"{i}\0{h}".encode(), digest_size=8).digest(), "little"
                        )
                        for i, h in pairs
                        if i is not None
                    ),
                    dtype=np.uint64,
                )
            )
    return np.unique(np.concatenate(keys)) if keys else np.empty(0, np.uint64)


def measure_recorded(dst: str) -> dict[str, Any]:
    """In a fresh process: ``recorded_inputs`` alone (a run resumed on a DST with a key record
    reads its ids only for the decoders' set, freed or not, before this): s and its peak over
    the RSS before it."""
    from radjepa.ingest.destination import Destination

    dest = Destination(dst)
    _settled()
    rss0 = _rss()
    t0 = time.perf_counter()
    keys, _ = dest.recorded_inputs()
    return {
        "recorded_s": time.perf_counter() - t0,
        "recorded_peak_bytes": _maxrss() - rss0,
        "recorded_keys": len(keys),
    }


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _uss() -> int:
    """Private bytes of this process (shared pages, e.g. a mapped object store, excluded)."""
    total = 0
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


def _settled() -> None:
    """Garbage collected and Arrow's pool trimmed: the RSS left is what is held."""
    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()


def _mib(b: float) -> float:
    return round(b / 2**20, 1)


def baseline_known(dst: str) -> set[str]:
    """``Destination.known_ids`` as it was: every column as Python objects into one set."""
    import pyarrow.parquet as pq

    def column(sub: str, name: str) -> list[Any]:
        values: list[Any] = []
        for p in sorted(Path(dst, sub).glob("*.parquet")):
            values.extend(pq.read_table(p, columns=[name]).column(name).to_pylist())
        return values

    ids = set(column("images", "image_id"))
    ids.update(x for x in column("quarantine", "sha256") if x)
    ids.update(column("duplicates", "image_id"))
    # a file quarantined unread (no sha256) is known by its path
    unread = zip(column("quarantine", "sha256"), column("quarantine", "source_hash"), strict=True)
    ids.update(f"path:{h}" for sha, h in unread if h and not sha)
    return ids


def baseline_instances(dst: str) -> dict[str, int]:
    """``InstanceIndex``'s ``_shard_of`` as it was."""
    import pyarrow.parquet as pq

    shard_of: dict[str, int] = {}
    for n, p in enumerate(sorted(Path(dst, "images").glob("*.parquet"))):
        for pid in pq.read_table(p, columns=["instance_pid"])["instance_pid"].to_pylist():
            if pid:
                shard_of.setdefault(pid, n)
    return shard_of


def queries(dst: str, seed: int) -> dict[str, list[str]]:
    """Stored ids and path entries (hits), fresh ones (misses), stored ones with one byte
    changed (near misses), and stored and fresh instance pseudonyms."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    shards = sorted(Path(dst, "images").glob("*.parquet"))
    table = pq.read_table(shards[0], columns=["image_id", "instance_pid"])
    quarantine = pq.read_table(next(Path(dst, "quarantine").glob("*.parquet")))
    stored = table["image_id"].to_pylist()
    unread = zip(
        quarantine["sha256"].to_pylist(), quarantine["source_hash"].to_pylist(), strict=True
    )
    paths = [f"path:{h}" for sha, h in unread if not sha]  # what known_ids keeps by path
    pids = table["instance_pid"].to_pylist()

    def pick(values: list[str]) -> list[str]:
        return [values[i] for i in rng.integers(0, len(values), LOOKUPS)]

    def near(value: str) -> str:
        head, last = value[:-2], int(value[-2:], 16)
        return f"{head}{(last + 1) % 256:02x}"

    return {
        "hit": pick(stored),
        "path_hit": pick(paths),
        "miss": hex_column(rng.integers(0, 256, (LOOKUPS, 32), np.uint8)).to_pylist(),
        "near_miss": [near(v) for v in pick(stored)],
        "pid_hit": pick(pids),
        "pid_miss": hex_column(rng.integers(0, 256, (LOOKUPS, 16), np.uint8)).to_pylist(),
    }


def lookups_per_s(member: Any, values: list[str], expect: bool) -> float:
    t0 = time.perf_counter()
    found = sum(1 for v in values if member(v))
    seconds = time.perf_counter() - t0
    if found != (len(values) if expect else 0):
        raise SystemExit(f"wrong answers: {found} of {len(values)} found, expected {expect}")
    return len(values) / seconds


def pickled(obj: Any) -> tuple[int, int]:
    """In-band pickle bytes and out-of-band buffer bytes (protocol 5, as Ray serialises)."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return len(data), sum(b.raw().nbytes for b in buffers)


def measure(which: str, dst: str) -> dict[str, Any]:
    """In a fresh process: build both structures of ``which`` and report their costs."""
    import pyarrow  # noqa: F401  (loaded before the first RSS reading, as in a real driver)

    from radjepa.ingest.destination import Destination
    from radjepa.ingest.instances import InstanceIndex

    dest = Destination(dst)
    q = queries(dst, seed=1)
    _settled()
    out: dict[str, Any] = {}
    rss0 = _rss()
    t0 = time.perf_counter()
    known = baseline_known(dst) if which == "baseline" else dest.known_ids()
    out["known_build_s"] = time.perf_counter() - t0
    # the process's highest RSS so far came while building (nothing before held as much)
    out["known_build_peak_bytes"] = _maxrss() - rss0
    _settled()
    out["known_driver_bytes"] = _rss() - rss0
    out["known_entries"] = len(known)
    if which == "baseline":
        frozen = frozenset(known)  # what ray.put was given: a second table of the same str
        _settled()
        out["known_driver_with_put_copy_bytes"] = _rss() - rss0
        del frozen
    else:
        out["known_driver_with_put_copy_bytes"] = out["known_driver_bytes"]
        out["known_nbytes"] = known.nbytes
    out["known_pickle_bytes"], out["known_pickle_buffers_bytes"] = pickled(
        frozenset(known) if which == "baseline" else known
    )
    data = pickle.dumps(frozenset(known) if which == "baseline" else known, protocol=5)
    _settled()
    before = _rss()
    copy = pickle.loads(data)  # one actor's copy (a plain pickle: ours' buffers copied once)
    _settled()
    out["known_unpickled_bytes"] = _rss() - before
    del copy, data
    for name, expect in (("hit", True), ("path_hit", True), ("miss", False), ("near_miss", False)):
        out[f"known_{name}_per_s"] = lookups_per_s(known.__contains__, q[name], expect)
    del known
    _settled()

    rss0 = _rss()
    t0 = time.perf_counter()
    if which == "baseline":
        shard_of = baseline_instances(dst)
        out["instances_build_s"] = time.perf_counter() - t0
        member = shard_of.__contains__
        entries = len(shard_of)
    else:
        index = InstanceIndex(dest.shards(), dest.read_columns)
        out["instances_build_s"] = time.perf_counter() - t0
        member = index._stored.__contains__
        entries = len(index)
        out["instances_nbytes"] = index._stored.nbytes
    _settled()
    out["instances_driver_bytes"] = _rss() - rss0
    out["instances_entries"] = entries
    out["pid_hit_per_s"] = lookups_per_s(member, q["pid_hit"], True)
    out["pid_miss_per_s"] = lookups_per_s(member, q["pid_miss"], False)
    return out


def measure_ray(dst: str, actors: int) -> dict[str, Any]:
    """Both representations through a real local Ray: put once, got by ``actors`` actors."""
    import ray

    from radjepa.ingest.destination import Destination

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=512 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
    )

    @ray.remote(num_cpus=0)
    class Holder:
        def take(self, ref_list: list[Any]) -> dict[str, Any]:
            gc.collect()
            uss, rss = _uss(), _rss()
            self.held = ray.get(ref_list[0])
            gc.collect()
            arrays = (
                [v for v in vars(self.held).values() if isinstance(v, np.ndarray)]
                if (hasattr(self.held, "__dict__"))
                else []
            )
            return {
                "uss_bytes": _uss() - uss,
                "rss_bytes": _rss() - rss,
                "zero_copy": bool(arrays) and all(not a.flags.writeable for a in arrays),
                "hit": next(iter(self.held)) in self.held,
            }

    out: dict[str, Any] = {}
    try:
        for which, value in (
            ("baseline", lambda: frozenset(baseline_known(dst))),
            ("ours", lambda: Destination(dst).known_ids()),
        ):
            ref = ray.put(value())
            holders = [Holder.remote() for _ in range(actors)]
            reports = ray.get([h.take.remote([ref]) for h in holders])
            if not all(r["hit"] for r in reports):
                raise SystemExit(f"{which}: an actor's copy lost an id")
            out[f"{which}_actor_uss_bytes"] = max(r["uss_bytes"] for r in reports)
            out[f"{which}_actor_rss_bytes"] = max(r["rss_bytes"] for r in reports)
            out[f"{which}_zero_copy"] = all(r["zero_copy"] for r in reports)
            for h in holders:
                ray.kill(h)
            del ref
    finally:
        ray.shutdown()
    return out


def in_fresh_process(args: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"{args[:2]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000, help="images the DST holds")
    ap.add_argument("--shard-rows", type=int, default=2048, help="ingest.shard_rows")
    ap.add_argument("--quarantine-fraction", type=float, default=0.01)
    ap.add_argument(
        "--duplicate-fraction",
        type=float,
        default=0.0,
        help="duplicate rows (DST/duplicates), as a fraction of the images",
    )
    ap.add_argument("--ray-actors", type=int, default=2, help="actors that get the known ids")
    ap.add_argument("--no-ray", action="store_true", help="skip the local Ray measurement")
    ap.add_argument(
        "--measure",
        choices=("ours", "baseline", "ray", "start", "start-baseline", "recorded"),
        help=argparse.SUPPRESS,
    )
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure == "ray":
        print(json.dumps(measure_ray(args.dst, args.ray_actors)))
        return
    if args.measure in ("start", "start-baseline"):
        print(json.dumps(measure_start(args.dst, baseline=args.measure == "start-baseline")))
        return
    if args.measure == "recorded":
        print(json.dumps(measure_recorded(args.dst)))
        return
    if args.measure:
        print(json.dumps(measure(args.measure, args.dst)))
        return
    quarantined = max(2, int(args.images * args.quarantine_fraction))
    with tempfile.TemporaryDirectory(prefix="radjepa-idsets-bench-") as tmp:
        t0 = time.perf_counter()
        duplicates = int(args.images * args.duplicate_fraction)
        write_dst(Path(tmp), args.images, args.shard_rows, quarantined, duplicates)
        written_s = time.perf_counter() - t0
        ours = in_fresh_process(["--measure", "ours", "--dst", tmp])
        base = in_fresh_process(["--measure", "baseline", "--dst", tmp])
        ray_figures = (
            {}
            if args.no_ray
            else in_fresh_process(
                ["--measure", "ray", "--dst", tmp, "--ray-actors", str(args.ray_actors)]
            )
        )
        files = sum(
            1 for sub in ("images", "quarantine", "duplicates") for _ in (Path(tmp) / sub).iterdir()
        )
        # last (each writes a key record: removed between them, so both meet an older DST)
        start_base = in_fresh_process(["--measure", "start-baseline", "--dst", tmp])
        from radjepa.ingest.destination import KEY_RECORD

        (Path(tmp) / KEY_RECORD).unlink(missing_ok=True)
        start = in_fresh_process(["--measure", "start", "--dst", tmp])
    for key in ("known_entries", "instances_entries"):
        if ours[key] != base[key]:
            raise SystemExit(f"{key}: ours {ours[key]} vs baseline {base[key]}")
    n = ours["known_entries"]
    result: dict[str, Any] = {
        "bench": "identity_sets",
        "images": args.images,
        "known_entries": n,
        "instances": ours["instances_entries"],
        "dst_written_s": round(written_s, 1),
    }
    for key, label in (
        ("known_driver_bytes", "known_driver"),
        ("known_driver_with_put_copy_bytes", "known_driver_at_put"),
        ("known_unpickled_bytes", "known_unpickled_copy"),
    ):
        result[f"ours_{label}_mib"] = _mib(ours[key])
        result[f"baseline_{label}_mib"] = _mib(base[key])
        # a growth under 1 MiB is noise of the allocators: no ratio
        result[f"{label}_ratio"] = round(base[key] / ours[key], 1) if ours[key] >= 2**20 else None
    result["ours_known_build_peak_mib"] = _mib(ours["known_build_peak_bytes"])
    result["baseline_known_build_peak_mib"] = _mib(base["known_build_peak_bytes"])
    result["ours_known_bytes_per_entry"] = round(ours["known_driver_bytes"] / n, 1)
    result["baseline_known_bytes_per_entry"] = round(base["known_driver_bytes"] / n, 1)
    result["ours_known_nbytes_mib"] = _mib(ours["known_nbytes"])
    result["ours_pickle_mib"] = _mib(
        ours["known_pickle_bytes"] + ours["known_pickle_buffers_bytes"]
    )
    result["ours_pickle_in_band_bytes"] = ours["known_pickle_bytes"]
    result["baseline_pickle_mib"] = _mib(base["known_pickle_bytes"])
    for side, figures in (("ours", ours), ("baseline", base)):
        result[f"{side}_known_build_s"] = round(figures["known_build_s"], 2)
        for name in ("hit", "path_hit", "miss", "near_miss"):
            result[f"{side}_known_{name}_per_s"] = round(figures[f"known_{name}_per_s"])
    result["ours_instances_driver_mib"] = _mib(ours["instances_driver_bytes"])
    result["baseline_instances_driver_mib"] = _mib(base["instances_driver_bytes"])
    grew = ours["instances_driver_bytes"]
    result["instances_driver_ratio"] = (
        round(base["instances_driver_bytes"] / grew, 1) if grew >= 2**20 else None
    )
    result["ours_instances_nbytes_mib"] = _mib(ours["instances_nbytes"])
    for side, figures in (("ours", ours), ("baseline", base)):
        result[f"{side}_instances_build_s"] = round(figures["instances_build_s"], 2)
        result[f"{side}_pid_hit_per_s"] = round(figures["pid_hit_per_s"])
        result[f"{side}_pid_miss_per_s"] = round(figures["pid_miss_per_s"])
    result["dst_parquet_files"] = files
    result["run_start_s"] = round(start["start_s"], 2)
    result["run_start_peak_mib"] = _mib(start["start_peak_bytes"])
    result["run_start_id_column_reads"] = start["start_id_reads"]
    result["recorded_inputs_s"] = round(start["recorded_s"], 2)
    result["recorded_inputs_peak_above_start_mib"] = _mib(start["recorded_peak_above_start_bytes"])
    result["recorded_inputs_mib"] = _mib(start["recorded_nbytes"])
    result["recorded_inputs_id_column_reads"] = start["recorded_id_reads"]
    result["baseline_run_start_s"] = round(start_base["start_s"], 2)
    result["baseline_run_start_id_column_reads"] = start_base["start_id_reads"]
    result["run_start_ratio"] = round(start_base["start_s"] / start["start_s"], 2)
    result["baseline_recorded_inputs_s"] = round(start_base["recorded_s"], 2)
    result["baseline_recorded_inputs_peak_above_start_mib"] = _mib(
        start_base["recorded_peak_above_start_bytes"]
    )
    result["recorded_inputs_ratio"] = round(start_base["recorded_s"] / start["recorded_s"], 2)
    result["duplicate_rows"] = start["recorded_kept_entries"]
    result["recorded_inputs_kept_dict_s"] = round(start["recorded_kept_dict_s"], 3)
    result["recorded_inputs_kept_dict_share"] = round(
        start["recorded_kept_dict_s"] / start["recorded_s"], 3
    )
    if ray_figures:
        result["ray_actors"] = args.ray_actors
        for side in ("ours", "baseline"):
            result[f"{side}_actor_uss_mib"] = _mib(ray_figures[f"{side}_actor_uss_bytes"])
            result[f"{side}_actor_rss_mib"] = _mib(ray_figures[f"{side}_actor_rss_bytes"])
        result["ours_zero_copy"] = ray_figures["ours_zero_copy"]
    result["machine"] = f"{platform.machine()} {os.cpu_count()} cores"
    result["python"] = platform.python_version()
    result["load_average"] = round(os.getloadavg()[0], 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

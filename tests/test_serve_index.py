"""The similar-case index: loading parts written at different times or wrong, and searching.

The loader decodes a batch of rows at a time into one matrix (bench/index.py measures
its memory against loading every part as one table); these tests hold it to the same results
and the same refusals, on real Parquet files.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve.index import EmbeddingIndex, IndexLoadError


def _part(path, emb, ids, *, row_group_size=None, **columns):
    cols = {"image_id": pa.array(ids, pa.string())}
    cols.update({k: pa.array(v, pa.string()) for k, v in columns.items()})
    dim = emb.shape[1]
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


def test_parts_load_in_order_as_unit_rows_with_their_ids_and_pseudonyms(tmp_path, caplog):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40_000, 8)).astype(np.float32)  # more rows than one loader batch
    a[7] = 0.0  # an all-zero embedding stays zero rather than becoming NaN
    b = rng.standard_normal((5, 8)).astype(np.float32)
    ids = [f"a{i}" for i in range(len(a))] + [f"b{i}" for i in range(len(b))]
    patients = [f"p{i // 2}" for i in range(len(ids))]
    n = len(a)
    _part(
        tmp_path / "index" / "part-0.parquet",
        a,
        ids[:n],
        row_group_size=3000,
        patient_pid=patients[:n],
        pseudonym_key_fingerprint=["k1"] * n,
        image_id_scheme=["hmac-sha256"] * n,
    )
    # a later part that records no key (an older embed run): the key cannot be vouched for
    _part(
        tmp_path / "index" / "part-1.parquet",
        b,
        ids[n:],
        patient_pid=patients[n:],
        image_id_scheme=["hmac-sha256"] * len(b),
    )
    with caplog.at_level(logging.WARNING):
        index = EmbeddingIndex.from_parquet(tmp_path / "index")

    expected = np.concatenate([a, b])
    norms = np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(index.matrix, expected / np.maximum(norms, 1e-12), atol=1e-6)
    assert index.matrix.dtype == np.float32 and not np.isnan(index.matrix).any()
    assert index.image_ids == ids and index.pids["patient_pid"] == patients
    assert index.pids["study_pid"] == [None] * len(ids)  # a column no part has
    assert index.pseudonym_key is None and "different pseudonym_key_fingerprint" in caplog.text
    assert index.image_id_scheme == "hmac-sha256"
    assert list(index.rows_of_patients(["p20002"])) == [40004]
    hit = index.search(expected[40003], 1)[0]
    assert hit.image_id == "b3" and hit.pids["patient_pid"] == "p20001"


@pytest.mark.parametrize(
    "problem, match",
    [
        ("no image_id", "part-1.parquet: missing column"),
        ("null embedding", "1 row.s. have no embedding"),
        ("other dimension", "empty or ragged"),
        ("ragged lists", "empty or ragged"),
        ("empty", "empty or ragged"),
        ("damaged", "part-1.parquet: unreadable"),
    ],
)
def test_a_wrong_part_is_refused_in_one_line(tmp_path, problem, match):
    good = np.ones((3, 4), np.float32)
    folder = tmp_path / "index"
    if problem != "empty":
        _part(folder / "part-0.parquet", good, ["a", "b", "c"])
    second = folder / "part-1.parquet"
    if problem == "no image_id":
        pq.write_table(
            pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(good[0]), 4)}),
            second,
        )
    elif problem == "null embedding":
        lists = pa.array([[1.0, 2.0, 3.0, 4.0], None], pa.list_(pa.float32()))
        pq.write_table(pa.table({"image_id": ["d", "e"], "embedding": lists}), second)
    elif problem == "other dimension":
        _part(second, np.ones((2, 5), np.float32), ["d", "e"])
    elif problem == "ragged lists":
        lists = pa.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]], pa.list_(pa.float32()))
        pq.write_table(pa.table({"image_id": ["d", "e"], "embedding": lists}), second)
    elif problem == "damaged":  # cut short, as a copy that ran out of disk leaves it
        data = _part(second, good, ["d", "e", "f"]).read_bytes()
        second.write_bytes(data[: len(data) // 2] + data[-12:])
    else:
        _part(second, np.ones((0, 4), np.float32), [])
    with pytest.raises(IndexLoadError, match=match):
        EmbeddingIndex.from_parquet(folder)


def test_the_index_bench_runs_both_ways_and_prints_one_json_line():
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "index.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--rows", "3000", "--dim", "16", "--rows-per-file", "1000"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.strip().splitlines()
    out = json.loads(line)
    assert (
        out["rows"] == 3000
        and out["peak_ratio"] > 0
        and out["load_speedup"] > 0
        and out["search_speedup"] > 0
    )


def test_searching_several_queries_at_once_answers_as_one_at_a_time():
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((500, 16)).astype(np.float32)
    emb[10] = emb[11]  # its twin: the best hit once row 11 is left out
    index = EmbeddingIndex(emb, [f"i{i}" for i in range(500)])
    queries = np.stack([emb[11], rng.standard_normal(16), emb[42] * 3]).astype(np.float32)
    excludes = [np.array([11]), None, np.array([42, 7, 42])]
    together = index.search_many(queries, 5, excludes)
    alone = [index.search(q, 5, exclude=e) for q, e in zip(queries, excludes, strict=True)]
    # the same rows in the same order; the scores to float32 rounding (one matrix product
    # instead of three matrix-vector products sums in another order)
    assert [[h.image_id for h in hs] for hs in together] == [
        [h.image_id for h in hs] for hs in alone
    ]
    for hs, hs1 in zip(together, alone, strict=True):
        np.testing.assert_allclose([h.score for h in hs], [h.score for h in hs1], atol=1e-6)
    assert together[0][0].image_id == "i10" and "i42" not in {h.image_id for h in together[2]}
    with pytest.raises(IndexLoadError, match="query dim 8 != index dim 16"):
        index.search_many(np.ones((2, 8), np.float32), 5, [None, None])


def test_an_empty_part_before_the_others_is_no_problem(tmp_path):
    folder = tmp_path / "index"
    _part(folder / "part-0.parquet", np.ones((0, 4), np.float32), [])  # a worker with no rows
    _part(folder / "part-1.parquet", np.eye(4, dtype=np.float32)[:3], ["a", "b", "c"])
    index = EmbeddingIndex.from_parquet(folder)
    assert index.image_ids == ["a", "b", "c"] and index.matrix.shape == (3, 4)

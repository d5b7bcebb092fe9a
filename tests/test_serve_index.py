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
        ("lists ragged to a whole", "embeddings of 3 to 5 values where the index's are 4"),
        ("empty", "empty or ragged"),
        ("damaged", "part-1.parquet: unreadable"),
        # scored null for every query (a response outside the API's float schema)
        ("non-finite", "2 of 5 embeddings hold NaN or infinite values"),
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
    elif problem == "lists ragged to a whole":
        # 3 + 5 + 4 values fill 3 rows of 4: each row then held its neighbours' values
        lists = pa.array([[1.0] * 3, [2.0] * 5, [3.0] * 4], pa.list_(pa.float32()))
        pq.write_table(pa.table({"image_id": ["d", "e", "f"], "embedding": lists}), second)
    elif problem == "non-finite":  # an encoder that diverged
        _part(second, np.array([[np.nan, 1, 1, 1], [1, 1, np.inf, 1]], np.float32), ["d", "e"])
    elif problem == "damaged":  # cut short, as a copy that ran out of disk leaves it
        data = _part(second, good, ["d", "e", "f"]).read_bytes()
        second.write_bytes(data[: len(data) // 2] + data[-12:])
    else:
        _part(second, np.ones((0, 4), np.float32), [])
    with pytest.raises(IndexLoadError, match=match):
        EmbeddingIndex.from_parquet(folder)


@pytest.mark.parametrize(
    "problem, match",
    [
        ("no image_id", "part-1.parquet: missing column"),
        ("other dimension", "parts hold embeddings of 2 sizes .4, 5.: rebuild it"),
        ("strings", "part-1.parquet: column embedding holds list<element: string>, not lists"),
        ("no rows", "holds no embeddings"),
        ("damaged", "part-1.parquet: unreadable"),
    ],
)
def test_the_start_up_check_refuses_from_the_footers_what_every_replica_would(
    tmp_path, problem, match
):
    # `radjepa serve` read an index's parts before Ray only when the served model was on its
    # disk: with a model the replicas fetch, each of these failed in every API replica
    good = np.ones((3, 4), np.float32)
    folder = tmp_path / "index"
    first = folder / "part-0.parquet"
    _part(
        first,
        good if problem != "no rows" else good[:0],
        [] if problem == "no rows" else list("abc"),
    )
    second = folder / "part-1.parquet"
    if problem == "no image_id":
        pq.write_table(
            pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(good[0]), 4)}),
            second,
        )
    elif problem == "other dimension":
        _part(second, np.ones((2, 5), np.float32), ["d", "e"])
    elif problem == "strings":
        lists = pa.array([["1", "2"]], pa.list_(pa.string()))
        pq.write_table(pa.table({"image_id": ["d"], "embedding": lists}), second)
    elif problem == "non-finite":  # an encoder that diverged
        _part(second, np.array([[np.nan, 1, 1, 1], [1, 1, np.inf, 1]], np.float32), ["d", "e"])
    elif problem == "damaged":  # cut short, as a copy that ran out of disk leaves it
        second.write_bytes(_part(second, good, ["d", "e", "f"]).read_bytes()[:-100])
    else:
        _part(second, good[:0], [])
    with pytest.raises(IndexLoadError, match=match):
        EmbeddingIndex.check_parts(folder)
    with pytest.raises(IndexLoadError):  # what the replicas say too
        EmbeddingIndex.from_parquet(folder)


def test_a_part_with_two_embedding_columns_is_refused_in_one_line(tmp_path):
    # pyarrow's field lookup raised KeyError ('Field "embedding" exists 2 times in schema'):
    # a traceback from the start-up check instead of its one line
    folder = tmp_path / "index"
    folder.mkdir()
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(8, np.float32)), 4)
    table = pa.Table.from_arrays(
        [pa.array(["a", "b"]), emb, emb], names=["image_id", "embedding", "embedding"]
    )
    pq.write_table(table, folder / "part-0.parquet")
    with pytest.raises(IndexLoadError, match="part-0.parquet: holds 2 columns named embedding"):
        EmbeddingIndex.check_parts(folder)


def test_the_start_up_check_reads_footers_only_so_damaged_pages_are_left_to_the_replicas(
    tmp_path,
):
    # a block lost inside the embedding pages keeps the footer whole: only reading the pages,
    # which the replicas do, finds it
    folder = tmp_path / "index"
    rng = np.random.default_rng(0)
    _part(folder / "part-0.parquet", rng.standard_normal((3, 64)).astype(np.float32), list("abc"))
    part = _part(
        folder / "part-1.parquet",
        rng.standard_normal((20_000, 64)).astype(np.float32),
        [f"x{i}" for i in range(20_000)],
    )
    chunk = pq.read_metadata(part).row_group(0).column(1)  # the embedding's values
    assert chunk.path_in_schema.startswith("embedding")
    data = bytearray(part.read_bytes())
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    middle = start + chunk.total_compressed_size // 2
    data[middle : middle + 65536] = bytes(65536)  # a hole, as a copy that lost a block leaves
    part.write_bytes(bytes(data))
    assert EmbeddingIndex.check_parts(folder) == (20_003, 64)
    with pytest.raises(IndexLoadError, match="part-1.parquet: unreadable"):
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
        and out["archived_speedup"] > 0
        and out["ours_ids_mib"] > 0
        and out["ids_as_lists_mib"] > 0
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


def _hex(text: str, chars: int = 64) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:chars]


def test_ids_and_pseudonyms_are_held_as_bytes_and_looked_up_by_value():
    """Ingest's ids (64 hex) and pseudonyms (32 hex) are held as their raw bytes, with a sort
    order for the two columns exclusions search, instead of ~2 KB of str and dicts a row."""
    from serve.ids import IdColumn

    n = 1000
    ids = [_hex(f"image{i}") for i in range(n)]
    ids[7] = ids[3]  # overlapping embed runs: one image on two rows
    ids[9] = "0" * 64  # a value of all zero bytes is a value, not a null
    patients = [_hex(f"patient{i // 4}", 32) for i in range(n)]
    patients[5] = patients[6] = None  # rows without a PatientID
    study = [None] * 10 + [_hex(f"study{i}", 32) for i in range(10, n)]
    index = EmbeddingIndex(
        np.eye(n, 8, dtype=np.float32) + 1, ids, pids={"patient_pid": patients, "study_pid": study}
    )

    assert isinstance(index.image_ids, IdColumn) and index.image_ids.values.dtype == "S32"
    assert index.pids["patient_pid"].values.dtype == "S16"
    # three columns of raw bytes and their two null masks, two all-null columns (a byte and a
    # mask byte each), three sort orders of 8 bytes (image id, patient, DICOM instance): 94
    # bytes a row (the lists took ~2 KB)
    assert index.ids_nbytes == n * (32 + 16 + 16 + 1 + 1 + 2 * 2 + 3 * 8)
    assert index.image_ids == ids and index.pids["patient_pid"] == patients
    assert index.pids["study_pid"] == study and index.pids["series_pid"] == [None] * n
    assert index.image_ids[9] == "0" * 64 and index.pids["patient_pid"][5] is None

    assert list(index.rows_with_image_id(ids[3])) == [3, 7]
    assert list(index.rows_with_image_id("0" * 64)) == [9]
    for unknown in (_hex("elsewhere"), ids[3].upper(), ids[3][:32], "", "not hex", None):
        assert len(index.rows_with_image_id(unknown)) == 0, unknown
    assert list(index.rows_of_patients([patients[0], patients[8], _hex("nobody", 32)])) == [
        0, 1, 2, 3, 8, 9, 10, 11
    ]  # fmt: skip
    assert list(index.rows_of_patients([patients[4]])) == [4, 7]  # rows 5 and 6 are null
    assert index.rows_of_patients([]).dtype == np.int64 and not len(index.rows_of_patients([]))

    (hit,) = index.search(np.eye(1, 8, 5, dtype=np.float32)[0] + 1, 1, exclude=np.array([0]))
    assert hit.image_id == ids[5] and type(hit.image_id) is str
    assert hit.pids == {
        "patient_pid": None,
        "study_pid": None,
        "series_pid": None,
        "instance_pid": None,
    }


def test_ids_of_other_shapes_are_kept_exactly():
    """Test ids, older ids of other lengths, upper case or text: held as their UTF-8 bytes,
    read back and found as they were (values ending in NUL included)."""
    from serve.ids import IdColumn

    values = ["a", "b\x00", "", None, "a", "ééé", "b", "AB" * 32, "ab" * 32, "x" * 70]
    column = IdColumn.of(values, len(values), searchable=True)
    assert column.hex_chars is None and list(column) == values and column[1:4] == values[1:4]
    found = {v: list(column.rows_of(v)) for v in ["a", "b", "b\x00", "", "ééé", "ab" * 32]}
    assert found == {"a": [0, 4], "b": [6], "b\x00": [1], "": [2], "ééé": [5], "ab" * 32: [8]}
    assert not len(column.rows_of("x" * 71)) and not len(column.rows_of(None))

    emb = np.random.default_rng(0).standard_normal((len(values), 4)).astype(np.float32)
    index = EmbeddingIndex(emb, values, pids={"patient_pid": values})
    assert [h.image_id for h in index.search(emb[5], 1)] == ["ééé"]
    assert list(index.rows_of_patients(["a", "b\x00", None])) == [0, 1, 4]


def test_parts_with_other_string_types_nulls_and_other_id_shapes_load_as_one_column(tmp_path):
    """Parts written at different times: large_string columns, a part without pseudonyms, a
    part of test ids: each column is read whole, hex only when every part's values are."""
    folder = tmp_path / "index"
    emb = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    ids = [_hex(f"i{i}") for i in range(6)]
    patients = [_hex("p0", 32), None, _hex("p1", 32)]
    large = {"image_id": pa.array(ids[:3], pa.large_string())}
    large["patient_pid"] = pa.array(patients, pa.large_string())
    large["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb[:3].reshape(-1)), 4)
    folder.mkdir()
    pq.write_table(pa.table(large), folder / "part-0.parquet")
    _part(folder / "part-1.parquet", emb[3:5], ids[3:5])  # no pseudonym columns
    index = EmbeddingIndex.from_parquet(folder)
    assert index.image_ids.hex_chars == 64 and index.pids["patient_pid"].hex_chars == 32
    assert index.pids["patient_pid"] == [*patients, None, None]
    assert list(index.rows_of_patients([_hex("p1", 32)])) == [2]

    _part(folder / "part-2.parquet", emb[5:], ["test-6"], patient_pid=[_hex("p0", 32)])
    index = EmbeddingIndex.from_parquet(folder)
    assert index.image_ids.hex_chars is None and index.image_ids == [*ids[:5], "test-6"]
    assert list(index.rows_with_image_id("test-6")) == [5]
    assert list(index.rows_with_image_id(ids[4])) == [4]
    assert list(index.rows_of_patients([_hex("p0", 32)])) == [0, 5]


def test_wrong_id_columns_are_refused_in_one_line(tmp_path):
    emb = np.ones((2, 4), np.float32)
    with pytest.raises(IndexLoadError, match="index <memory>: 1 values for 2 rows"):
        EmbeddingIndex(emb, ["a", "b"], pids={"study_pid": ["s"]})
    # an empty column is one the caller does not have, as with the lists before
    assert EmbeddingIndex(emb, ["a", "b"], pids={"study_pid": []}).pids["study_pid"] == [None] * 2
    table = pa.table(
        {
            "image_id": pa.array([[1], [2]], pa.list_(pa.int64())),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 4),
        }
    )
    pq.write_table(table, tmp_path / "index.parquet")
    with pytest.raises(IndexLoadError, match="column image_id does not hold strings") as err:
        EmbeddingIndex.from_parquet(tmp_path / "index.parquet")
    assert "\n" not in str(err.value)


def test_the_public_index_identity_is_the_hash_of_its_ids_joined():
    """Hashed a block of ids at a time, it is still the identity the joined list gave (an
    index's id in /v1/models and answers must not change when the server is upgraded)."""
    from serve.app import _short_hash, public_index

    n = 70_000  # more than one block of decoded ids
    ids = [_hex(f"image{i}") for i in range(n)]
    index = EmbeddingIndex(np.ones((n, 2), np.float32), ids)
    assert public_index(index) == _short_hash(b"2", "\n".join(ids).encode())
    text = EmbeddingIndex(np.ones((3, 2), np.float32), ["a", "é", "c"])
    assert public_index(text) == _short_hash(b"2", "a\né\nc".encode())


@pytest.mark.parametrize("statistics", [True, False], ids=["footer-stats", "no-stats"])
def test_rows_without_an_image_id_are_refused_naming_the_part(tmp_path, statistics):
    """A part whose image_id holds nulls loaded, and the API then died at start-up with a bare
    TypeError (the index's public identity joins its ids). Refused in one line naming the
    part: from the footer's statistics by the start-up check when the writer kept them, and by
    the loader in every case."""
    folder = tmp_path / "index"
    _part(folder / "part-0.parquet", np.ones((2, 4), np.float32), ["a", "b"])
    table = pa.table(
        {
            "image_id": pa.array(["c", None, None], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(12, np.float32)), 4),
        }
    )
    pq.write_table(table, folder / "part-1.parquet", write_statistics=statistics)
    said = "part-1.parquet: 2 row.s. have no image_id"
    if statistics:
        with pytest.raises(IndexLoadError, match=said):
            EmbeddingIndex.check_parts(folder)
    else:  # nothing in the footer tells: left to the replicas, as damaged pages are
        assert EmbeddingIndex.check_parts(folder) == (5, 4)
    with pytest.raises(IndexLoadError, match=said) as err:
        EmbeddingIndex.from_parquet(folder)
    assert "\n" not in str(err.value)


def test_an_index_under_the_home_folder_may_be_given_with_a_tilde(tmp_path, monkeypatch):
    # the driver's check expanded ~ and passed it; the loader did not: "index not found: ~/..."
    monkeypatch.setenv("HOME", str(tmp_path))
    emb = np.eye(3, 4, dtype=np.float32)
    _part(tmp_path / "idx" / "part-0.parquet", emb, ["a", "b", "c"])
    assert EmbeddingIndex.check_parts("~/idx")[0] == 3
    assert EmbeddingIndex.from_parquet("~/idx").image_ids == ["a", "b", "c"]


def test_an_image_held_by_two_runs_under_one_parent_is_one_neighbour(tmp_path, caplog):
    # last month's run and this month's over one DST (each embeds all of it) served under one
    # parent: every older image took two places in a neighbour list, the same case twice
    rng = np.random.default_rng(3)
    old = rng.standard_normal((10, 8)).astype(np.float32)
    new = np.concatenate([old, rng.standard_normal((10, 8)).astype(np.float32)])
    _part(tmp_path / "index" / "jan" / "part-0.parquet", old, [f"i{i}" for i in range(10)])
    _part(tmp_path / "index" / "feb" / "part-0.parquet", new, [f"i{i}" for i in range(20)])
    with caplog.at_level(logging.WARNING, logger="serve.index"):
        index = EmbeddingIndex.from_parquet(tmp_path / "index")
    assert len(index) == 30 and "10 row(s) whose image another row holds" in caplog.text
    assert index.images == 20  # what the API says it holds (index_size)
    hits = index.search(old[4], 20)
    assert sorted(h.image_id for h in hits) == sorted(f"i{i}" for i in range(20))
    assert hits[0].image_id == "i4"
    assert len(index.search(old[4], 100)) == 20  # every image once, however many are asked
    assert len(index.rows_with_image_id("i4")) == 2  # its own upload still excludes both


def test_a_folder_without_its_record_of_parts_loads_with_a_warning(tmp_path, caplog):
    # a copy that left out the underscore files (`cp *.parquet`) and a part was served as a
    # smaller archive without a word
    _part(tmp_path / "index" / "part-0.parquet", np.ones((2, 4), np.float32), ["a", "b"])
    with caplog.at_level(logging.WARNING, logger="serve.index"):
        EmbeddingIndex.from_parquet(tmp_path / "index")
    assert "has no _index.json: that no part is missing cannot be checked" in caplog.text


def test_the_same_instance_check_reads_the_search_scores_and_answers_as_from_the_query():
    # the API found an archived DICOM instance re-sent in other bytes with a second pass over
    # the whole matrix per upload, on top of the search's own: it now reads the search's scores
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((50, 16)).astype(np.float32)
    instances = [f"{i % 40:064x}" for i in range(50)]  # rows 40..49 repeat instances 0..9
    index = EmbeddingIndex(emb, [f"r{i}" for i in range(50)], {"instance_pid": instances})
    queries = np.stack([emb[3] + 0.01, emb[45], rng.standard_normal(16).astype(np.float32)])
    scores = index.scores(queries)
    before = scores.copy()
    asked = [instances[3], instances[45], instances[7]]
    for pid, query, row in zip(asked, queries, scores, strict=True):
        by_query = index.rows_of_instance(pid, query)
        assert list(index.rows_of_instance(pid, scores=row)) == list(by_query)
    assert list(index.rows_of_instance(instances[3], queries[0])) == [3]
    assert list(index.rows_of_instance(instances[45], queries[1])) == [45]  # not its twin 5
    assert not len(index.rows_of_instance(instances[7], queries[2]))  # another image
    np.testing.assert_array_equal(scores, before)  # the search's scores are left as they were
    hits = index.top(scores[0], 3, np.array([3]))
    assert [h.image_id for h in hits] == [
        h.image_id for h in index.search(queries[0], 3, exclude=np.array([3]))
    ]

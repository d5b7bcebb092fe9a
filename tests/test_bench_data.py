"""The benches' images: a fresh clone has no ``../shared`` NIH sample, and a bench must then run
on the bundled PNGs (or say in one line what to pass), not fail on an empty list."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def images():
    return _load("sample_images")


def _pngs(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        Image.new("L", (32, 32), 40 * i).save(folder / f"{i:02d}.png")
        paths.append(folder / f"{i:02d}.png")
    return paths


def test_the_bundled_default_holds_same_size_grayscale_pngs(images):
    """What a fresh clone falls back to must exist in the repository and suit data_path."""
    pngs = sorted(images.BUNDLED_IMAGES.glob("*.png"))
    assert len(pngs) >= 8
    assert {Image.open(p).size for p in pngs} == {(256, 256)}
    assert {Image.open(p).mode for p in pngs} == {"L"}


def test_a_named_folder_is_used_as_given(images, tmp_path):
    mine = _pngs(tmp_path / "mine", 3)
    _pngs(tmp_path / "nih", 2)
    assert images.find_pngs(tmp_path / "mine", nih=tmp_path / "nih") == mine


def test_without_a_named_folder_the_nih_sample_comes_first(images, tmp_path):
    nih = _pngs(tmp_path / "nih", 2)
    got = images.find_pngs(nih=tmp_path / "nih", bundled=images.BUNDLED_IMAGES)
    assert got == nih


def test_without_the_nih_sample_the_bundled_pngs_are_used_and_said(images, tmp_path, capsys):
    got = images.find_pngs(nih=tmp_path / "no-shared" / "images")
    assert got and got == sorted(images.BUNDLED_IMAGES.glob("*.png"))
    note = capsys.readouterr().err
    assert str(images.BUNDLED_IMAGES) in note and "--images" in note


def test_an_empty_named_folder_is_refused_not_replaced(images, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(images.NoImagesError) as err:
        images.find_pngs(tmp_path / "empty")  # the NIH and bundled sets exist: not taken
    assert (
        str(err.value) == f"error: no PNG files in {tmp_path / 'empty'} (the folder --images names)"
    )


def test_no_pngs_anywhere_is_one_line_naming_the_flag(images, tmp_path):
    with pytest.raises(images.NoImagesError) as err:
        images.find_pngs(nih=tmp_path / "a", bundled=tmp_path / "b", flag="--png-dir")
    message = str(err.value)
    assert "\n" not in message and message.startswith("error: ")
    assert "pass --png-dir DIR" in message and str(tmp_path / "a") in message


def test_the_serve_bench_says_what_is_missing_before_it_starts_anything(tmp_path):
    """It used to index an empty list (IndexError traceback) where the NIH sample was missing."""
    (tmp_path / "empty").mkdir()
    res = subprocess.run(
        [sys.executable, "bench/serve.py", "--images", str(tmp_path / "empty")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1, res.stderr
    assert (
        res.stderr.strip()
        == f"error: no PNG files in {tmp_path / 'empty'} (the folder --images names)"
    )
    assert res.stdout == ""


def test_the_ingest_corpus_is_made_from_the_folder_given(tmp_path):
    """bench/ingest.py and bench/decode_isolation.py build their DICOMs from these PNGs."""
    from pydicom import dcmread

    _pngs(tmp_path / "pngs", 2)
    (tmp_path / "out").mkdir()
    paths = _load("ingest").build_corpus(tmp_path / "out", 3, 64, tmp_path / "pngs")
    assert len(paths) == 3
    assert {(ds.Rows, ds.Columns) for ds in map(dcmread, paths)} == {(64, 64)}


def test_the_data_path_bench_runs_on_the_bundled_pngs():
    """A fresh clone's data: the JSON line says how many source PNGs its figures came from."""
    work = REPO / "data" / "sample" / "archive" / "export"
    res = subprocess.run(
        [sys.executable, "bench/data_path.py", "--images", str(work), "--rows", "16",
         "--batch", "8", "--workers", "1", "--crop", "32", "--shard-rows", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout)
    assert record["source_pngs"] == len(list(work.glob("*.png")))
    assert record["ours_img_per_s"] > 0 and record["baseline_img_per_s"] > 0


def test_the_identity_sets_bench_runs_and_agrees_with_its_baseline(tmp_path):
    """The bench kept the path entries of every quarantine row after ``known_ids`` kept only
    those of files quarantined unread: it stopped on "wrong answers" at every size, and the
    figures recorded from it could not be measured again."""
    res = subprocess.run(
        [sys.executable, "bench/identity_sets.py", "--images", "5000", "--no-ray"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    line = json.loads(res.stdout.strip().splitlines()[-1])
    assert line["bench"] == "identity_sets" and line["images"] == 5000
    assert line["known_entries"] > 5000  # the stored images and the unread quarantined paths

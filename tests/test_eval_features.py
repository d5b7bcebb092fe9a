"""Evaluation inputs and frozen-feature probes: CSV labels, feature extraction, seg probe, plots."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from shard_tables import write_shard

from radjepa.eval.features import (
    DatasetError,
    LabelSpec,
    binarise,
    extract_features,
    load_csv_dataset,
    parse_label_spec,
)

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_encoder():
    from radjepa.config import load_config
    from radjepa.eval.baselines import random_init_encoder

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", ["model.depth=2"])
    return random_init_encoder(cfg, seed=0)


def test_label_specs_and_binarisation_follow_the_documented_mapping():
    assert parse_label_spec("view=AP") == LabelSpec("view", "AP")
    assert parse_label_spec(" Effusion ") == LabelSpec("Effusion")
    with pytest.raises(DatasetError, match="COLUMN=POSITIVE"):
        parse_label_spec("view=")
    y, pos = binarise(["F", "M", "M"], LabelSpec("sex", "M"))
    assert pos == "M" and y.tolist() == [0, 1, 1]
    with pytest.raises(DatasetError, match="--label sex=F or --label sex=M"):
        binarise(["F", "M", "M"], LabelSpec("sex"))  # a text column names its positive value
    y, pos = binarise(["PA", "AP", "PA"], LabelSpec("view", "AP"))
    assert pos == "AP" and y.tolist() == [0, 1, 0]
    y, pos = binarise(["0", "1", "1"], LabelSpec("Effusion"))
    assert pos is None and y.tolist() == [0, 1, 1]
    with pytest.raises(DatasetError, match="never occurs"):
        binarise(["PA", "AP"], LabelSpec("view", "LL"))
    with pytest.raises(DatasetError, match="--label grade=a"):
        binarise(["a", "b", "c"], LabelSpec("grade"))
    with pytest.raises(DatasetError, match=r"empty or not known \(''\) in 1 rows"):
        binarise(["F", "", "M"], LabelSpec("sex"))


def test_numeric_labels_must_be_0_or_1_or_name_their_positive_value():
    """Sorted as text, the "second value" of a numeric column was its positive class: NaN in
    a column of 1 and NaN (every true positive scored as a negative), 0 in a CheXpert-style
    column of -1 (uncertain) and 0, all under the finding's own name."""
    with pytest.raises(DatasetError, match=r"not known \('NaN'\) in 2 rows \(first data row 2\)"):
        binarise(["1", "NaN", "NaN", "1"], LabelSpec("Effusion"))
    for cells in (["-1", "0", "-1", "0"], ["0", "1", "-1"], ["0.0", "2"]):
        with pytest.raises(DatasetError, match="numbers other than 0 and 1.*--label Effusion=1"):
            binarise(cells, LabelSpec("Effusion"))
    y, pos = binarise(["-1", "0", "1", "1"], LabelSpec("Effusion", "1"))  # uncertain: negative
    assert pos == "1" and y.tolist() == [0, 0, 1, 1]
    y, pos = binarise(["0.0", "1.0", "1"], LabelSpec("Effusion"))
    assert pos is None and y.tolist() == [0, 1, 1]
    y, pos = binarise(["F", "M"], LabelSpec("sex", "M"))  # categories as before
    assert pos == "M" and y.tolist() == [0, 1]


def test_named_values_match_inside_multi_label_cells(nih_dir):
    import csv

    cells = ["Cardiomegaly", "Atelectasis|Effusion|Infiltration", "Effusion", "No Finding"]
    y, pos = binarise(cells, LabelSpec("findings", "Effusion"))
    assert pos == "Effusion" and y.tolist() == [0, 1, 1, 0]
    # spaces around the separator, as hand-edited sheets have them
    spaced = [c.replace("|", " | ") for c in cells]
    assert binarise(spaced, LabelSpec("findings", "Infiltration"))[0].tolist() == [0, 1, 0, 0]
    with pytest.raises(DatasetError, match="never occurs.*'Atelectasis'"):
        binarise(cells, LabelSpec("findings", "Hernia"))
    # on the NIH labels the pipe-separated findings agree with the one-hot column
    with open(nih_dir / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    y, _ = binarise([r["findings"] for r in rows], LabelSpec("findings", "Effusion"))
    assert y.tolist() == [int(r["Effusion"]) for r in rows] and y.sum() > 10


def test_csv_dataset_decodes_like_ingest_and_groups_by_patient(nih_dir):
    from radjepa.imaging.decode import decode_image

    ds = load_csv_dataset(
        nih_dir / "labels.csv", label_cols=["view=AP", "sex=M", "Effusion"], size=128, limit=30
    )
    assert ds.images.shape == (30, 128, 128) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (30, 3) and set(np.unique(ds.labels)) <= {0, 1}
    assert ds.label_names == ["view=AP", "sex=M", "Effusion"] and ds.positive == ["AP", "M", None]
    rows = (nih_dir / "labels.csv").read_text().splitlines()[1:31]
    assert [r.split(",")[1] for r in rows] == ds.groups.tolist()
    assert [r.split(",")[3] == "M" for r in rows] == ds.labels[:, 1].astype(bool).tolist()
    direct = decode_image((nih_dir / ds.paths[4]).read_bytes(), size=128, secret=b"k" * 32)
    assert np.array_equal(direct.pixels, ds.images[4])


def test_csv_dataset_reports_undecodable_images_and_refuses_missing_ones(tmp_path, nih_dir):
    imgs = sorted((nih_dir / "images").glob("*.png"))[:4]
    for p in imgs:
        shutil.copy(p, tmp_path / p.name)
    broken = "Smith^John_1970.png"  # hospital file names often carry the patient's name
    (tmp_path / broken).write_bytes(b"this is not an image at all")
    lines = ["image,patient_id,view"] + [
        f"{p.name},{i},{'AP' if i % 2 else 'PA'}" for i, p in enumerate(imgs)
    ]
    (tmp_path / "labels.csv").write_text("\n".join([*lines, f"{broken},9,AP"]) + "\n")
    ds = load_csv_dataset(tmp_path / "labels.csv", label_cols=["view=AP"], size=64)
    assert len(ds.images) == 4 and ds.paths == [p.name for p in imgs]
    # listed by CSV row (report.json and MLflow get this list), never by the file's name
    assert [r["row"] for r in ds.rejected] == ["5"]
    assert ds.rejected[0]["reason"] and "Smith" not in str(ds.rejected)
    (tmp_path / "bad.csv").write_text("\n".join([*lines, "missing.png,9,AP"]) + "\n")
    # by its row, not its path: file names may carry patient names
    with pytest.raises(DatasetError, match=r"row \d+: image not found \(the file column") as err:
        load_csv_dataset(tmp_path / "bad.csv", label_cols=["view=AP"], size=64)
    assert "missing.png" not in str(err.value)
    with pytest.raises(DatasetError, match="missing column"):
        load_csv_dataset(tmp_path / "labels.csv", label_cols=["sex"], size=64)


def test_a_label_cell_is_said_by_its_csv_row_before_any_decode(tmp_path, nih_dir):
    """The check ran on the rows left after undecodable images: an empty cell was said at
    the wrong row (row 3 for the CSV's row 5 here), and only after every image decoded."""
    imgs = sorted((nih_dir / "images").glob("*.png"))[:3]
    for p in imgs:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"not an image")
    lines = ["image,patient_id,Effusion", "a.png,1,0", "b.png,2,1"]
    lines += [f"{p.name},{i + 3},{'' if i == 2 else i % 2}" for i, p in enumerate(imgs)]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"in 1 rows \(first data row 5\)"):
        load_csv_dataset(tmp_path / "labels.csv", label_cols=["Effusion"], size=64)


def test_an_image_listed_twice_with_another_patient_or_label_is_refused(tmp_path, nih_dir):
    """Under two patients one image sat on both sides of a split and was its own "other
    patient" neighbour at similarity 1; with two labels it was scored as both classes."""
    imgs = sorted((nih_dir / "images").glob("*.png"))[:3]
    for p in imgs:
        shutil.copy(p, tmp_path / p.name)
    lines = ["image,patient_id,Effusion"] + [f"{p.name},{i},{i % 2}" for i, p in enumerate(imgs)]
    for extra, said in (
        (f"./{imgs[0].name},9,0", "patient_id"),
        (f"{imgs[1].name},1,0", "Effusion"),
    ):
        (tmp_path / "labels.csv").write_text("\n".join([*lines, extra]) + "\n")
        with pytest.raises(
            DatasetError, match=f"rows [12] and 4 list the same image with another {said}"
        ):
            load_csv_dataset(tmp_path / "labels.csv", label_cols=["Effusion"], size=64)
    # listed again as it was: kept, with itself
    (tmp_path / "labels.csv").write_text("\n".join([*lines, lines[1]]) + "\n")
    ds = load_csv_dataset(tmp_path / "labels.csv", label_cols=["Effusion"], size=64)
    assert len(ds.images) == 4 and ds.groups.tolist() == ["0", "1", "2", "0"]
    # without a patient, under another spelling of its path: still one patient, itself
    blank = ["image,patient_id,Effusion", f"{imgs[0].name},,1", f"{imgs[1].name},p,0"]
    (tmp_path / "labels.csv").write_text("\n".join([*blank, f"./{imgs[0].name},,1"]) + "\n")
    for group_col in ("patient_id", None):
        ds = load_csv_dataset(
            tmp_path / "labels.csv", label_cols=["Effusion"], size=64, group_col=group_col
        )
        g = ds.groups.tolist()
        assert g[0] == g[2] and len(set(g)) == 2, g


def test_blank_patient_ids_are_each_their_own_patient_not_one_shared_patient(tmp_path, nih_dir):
    """A blank patient_id used to be one id shared by every unknown patient: one giant group
    (200 NIH rows, half blank, read as 101 patients), in one fold, one bootstrap cluster."""
    imgs = sorted((nih_dir / "images").glob("*.png"))[:5]
    for p in imgs:
        shutil.copy(p, tmp_path / p.name)
    ids = ["7", "", " ", "7", ""]
    lines = ["image,patient_id,view"] + [
        f"{p.name},{pid},{'AP' if i % 2 else 'PA'}"
        for i, (p, pid) in enumerate(zip(imgs, ids, strict=True))
    ]
    lines.append(f"{imgs[1].name},,AP")  # the same image listed again stays with itself
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    ds = load_csv_dataset(tmp_path / "labels.csv", label_cols=["view=AP"], size=64)
    g = ds.groups.tolist()
    assert g[0] == g[3] == "7"
    assert len({g[1], g[2], g[4], "7"}) == 4 and g[5] == g[1]


def test_csvs_saved_by_spreadsheets_with_a_byte_order_mark_are_read(tmp_path, nih_dir):
    """Excel's "CSV UTF-8" starts with a BOM: the header read as "\ufeffimage", and a file
    that visibly has an image column was refused for missing it (labels and masks alike)."""
    from PIL import Image

    from radjepa.eval.segmentation import load_seg_csv

    imgs = sorted((nih_dir / "images").glob("*.png"))[:4]
    for i, p in enumerate(imgs):
        shutil.copy(p, tmp_path / p.name)
        Image.fromarray(np.full((256, 256), 255 * (i % 2), np.uint8)).save(tmp_path / f"m{i}.png")
    rows = [f"{p.name},p{i},{'FM'[i % 2]},m{i}.png" for i, p in enumerate(imgs)]
    text = "\n".join(["image,patient_id,sex,lung", *rows]) + "\n"
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    ds = load_csv_dataset(tmp_path / "bom.csv", label_cols=["sex=M"], size=64)
    assert ds.paths == [p.name for p in imgs] and ds.labels[:, 0].tolist() == [0, 1, 0, 1]
    images, masks, groups = load_seg_csv(tmp_path / "bom.csv", ["lung"], size=64)
    assert images.shape == (4, 64, 64) and masks.shape == (4, 1, 64, 64)
    assert groups is not None and groups.tolist() == ["p0", "p1", "p2", "p3"]
    (tmp_path / "latin1.csv").write_bytes("image,sex\nr\xf6ntgen.png,F\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8 text"):
        load_csv_dataset(tmp_path / "latin1.csv", label_cols=["sex"], size=64)


def test_masks_of_an_image_with_oblong_pixels_stay_on_its_anatomy(tmp_path):
    """A DICOM whose pixels are twice as tall as wide is stored square in the patient; its
    mask, drawn on the image's pixel grid (here at half its resolution), must be resized the
    same way, or the foreground lands beside the structure it marks."""
    from dicom_factory import make_dicom
    from PIL import Image

    from radjepa.eval.segmentation import load_seg_csv

    pixels = np.repeat(200 + 10 * np.arange(100, dtype=np.uint16)[:, None], 200, axis=1)
    pixels[:, :40] = 3800  # a bright structure over the left 20% of the columns
    dicom = make_dicom(pixels, window=(2000, 4000), extra={"PixelSpacing": [0.2, 0.1]})
    (tmp_path / "cxr.dcm").write_bytes(dicom)
    mask = np.zeros((50, 100), np.uint8)
    mask[:, :20] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    (tmp_path / "seg.csv").write_text("image,structure,patient_id\ncxr.dcm,m.png,p0\n")
    images, masks, _ = load_seg_csv(tmp_path / "seg.csv", ["structure"], size=64)
    bright, marked = images[0] > 128, masks[0, 0]
    assert marked.mean() == pytest.approx(0.2, abs=0.02)
    assert (bright == marked).mean() > 0.97


def test_rows_whose_cells_do_not_line_up_with_the_header_are_refused_by_row(tmp_path, nih_dir):
    """NIH rows as exported: an unquoted comma in `findings` (Atelectasis,Effusion) shifted the
    later cells one column right and Effusion silently read Edema's value (2 positives of 3
    in the first 40 rows); a row cut short ended in AttributeError ('NoneType' ... 'strip')."""
    from radjepa.eval.segmentation import load_seg_csv

    rows = (nih_dir / "labels.csv").read_text().splitlines()
    header, body = rows[0], rows[1:41]
    (tmp_path / "images").symlink_to(nih_dir / "images")

    def write(name, lines):
        (tmp_path / name).write_text("\n".join([header, *lines]) + "\n")
        return tmp_path / name

    clean = load_csv_dataset(write("ok.csv", body), label_cols=["Effusion"], size=32)
    assert clean.labels.sum() == 3
    shifted = [r.replace("Atelectasis|Effusion", "Atelectasis,Effusion") for r in body]
    with pytest.raises(DatasetError, match=r"row 2 has 22 cells, the header 21: quote a cell"):
        load_csv_dataset(write("shifted.csv", shifted), label_cols=["Effusion"], size=32)
    short = [*body[:5], ",".join(body[5].split(",")[:3]), *body[6:]]
    with pytest.raises(DatasetError, match=r"row 6 has 3 of the header's 21 cells \(no 'sex'\)"):
        load_csv_dataset(write("short.csv", short), label_cols=["sex"], size=32)
    with pytest.raises(DatasetError, match="row 6 has 3 of the header's 21 cells"):
        load_seg_csv(tmp_path / "short.csv", ["image"], size=32)  # masks are read alike
    # separators past the last column carry nothing: the file reads as without them
    trailing = load_csv_dataset(
        write("trailing.csv", [r + ",," for r in body]), label_cols=["Effusion"], size=32
    )
    assert trailing.labels.tolist() == clean.labels.tolist()


def test_extract_features_is_the_mean_pooled_embedding_in_eval_mode(tiny_encoder, nih_dir):
    import torch

    from radjepa.transforms import prepare_images

    ds = load_csv_dataset(nih_dir / "labels.csv", label_cols=["sex=M"], size=256, limit=7)
    tiny_encoder.train()
    feats = extract_features(tiny_encoder, ds.images, batch_size=3, device="cpu")
    assert tiny_encoder.training  # mode restored
    assert feats.shape == (7, tiny_encoder.embed_dim) and feats.dtype == np.float32
    tiny_encoder.eval()
    with torch.no_grad():
        ref = tiny_encoder.embed(prepare_images(list(ds.images), tiny_encoder.img_size)).numpy()
    np.testing.assert_allclose(feats, ref, atol=1e-5)
    tokens = extract_features(tiny_encoder, iter(ds.images), batch_size=4, patch_tokens=True)
    assert tokens.shape == (7, tiny_encoder.grid**2, tiny_encoder.embed_dim)
    np.testing.assert_allclose(tokens.mean(1), feats, atol=1e-5)


def _disc_pairs(n: int, size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy dark images with one bright disc each (random centre and radius) and its mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs, masks = [], []
    for _ in range(n):
        r = rng.uniform(0.15, 0.3) * size
        cy, cx = rng.uniform(r, size - r, 2)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        img = rng.normal(60, 12, (size, size)) + 130 * m
        imgs.append(np.clip(img, 0, 255).astype(np.uint8))
        masks.append(m)
    return np.stack(imgs), np.stack(masks)


def test_segmentation_probe_learns_bright_discs_from_frozen_tokens(tiny_encoder):
    from radjepa.eval.segmentation import dice, seg_probe, tokens_to_grid

    images, masks = _disc_pairs(24)
    tokens = extract_features(tiny_encoder, images, batch_size=12, patch_tokens=True)
    res = seg_probe(tokens_to_grid(tokens), masks, structures=["disc"], epochs=150, seed=0)
    assert res.n_train == 18 and res.n_test == 6
    assert res.dice["disc"] > 0.7
    assert res.dice["disc"] > res.trivial_dice["disc"] + 0.3
    assert dice(masks[:, None], masks[:, None]).tolist() == [1.0]


def _seg_report(seg: dict) -> dict:
    """The smallest report ``render_markdown`` takes, around a segmentation section."""
    return {
        "checkpoint": "c",
        "encoder": {},
        "data": {
            "csv": "l.csv",
            "shards": None,
            "n_images": 40,
            "n_patients": 40,
            "rejected": [],
            "labels": [],
        },
        "protocol": {
            "pooling": "p",
            "C": 0.1,
            "split": "kfold",
            "folds": 5,
            "split_text": "s",
            "bootstrap": 0,
            "knn_k": 10,
            "pixel_size": 32,
        },
        "methods": {"ours": {"labels": []}},
        "segmentation": seg,
    }


def test_the_split_puts_a_structure_few_patients_show_on_both_sides():
    """A structure 3 of 40 patients show was held out nowhere in 10 of 20 seeds: no Dice for
    it, by the luck of the seed (with one patient fewer it can land in the held-out side only,
    scored by a head that never saw it). The split now tries draws until each structure is on
    both sides, keeping whole patients together."""
    from radjepa.eval.segmentation import held_out_split

    shows = np.zeros((80, 3), bool)
    shows[:, 0] = True  # every image
    shows[[0, 1, 30, 31, 60, 61], 1] = True  # three patients' two images each
    groups = np.array([f"p{i // 2}" for i in range(80)])
    plain = [held_out_split(80, groups, 0.25, s)[1] for s in range(20)]
    assert sum(not shows[t, 1].any() for t in plain) == 10  # what it was
    for seed in range(20):
        train, test = held_out_split(80, groups, 0.25, seed, shows=shows)
        assert shows[test, 1].any() and shows[train, 1].any()
        assert len(test) == 20 and not set(groups[train]) & set(groups[test])
        assert not shows[:, 2].any()  # a structure nobody shows does not hold the search up


def test_a_structure_no_held_out_image_shows_gets_no_dice():
    """A structure in 3 of 40 images, none of them held out, printed Dice 0.000 beside a
    trivial 0.000 (1.0 had the head predicted no pixel), like a real score. Now its Dice is
    NaN, the held-out images showing each structure are counted, and report.md says why."""
    from radjepa.eval.report import _finite, flat_metrics, render_markdown
    from radjepa.eval.segmentation import held_out_split, seg_probe

    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(40, 4, 4, 8)).astype(np.float32)
    masks = np.zeros((40, 2, 16, 16), bool)
    masks[:, 0, 4:12, 4:12] = True  # in every image
    masks[:3, 1, :8, :8] = True  # in images 0-2 only, one patient's
    tokens[:3, :2, :2, 1] += 3
    groups = np.array([f"p{max(i, 2)}" for i in range(40)])
    for seed in range(3):  # a structure one patient shows stays in training
        train, test = held_out_split(40, groups, 0.25, seed, shows=masks.any(axis=(2, 3)))
        assert test.min() > 2 and len(test) == 10
    res = seg_probe(tokens, masks, structures=["lung", "rare"], groups=groups, seed=0, epochs=5)
    assert res.n_test_present == {"lung": 10, "rare": 0}
    assert np.isnan(res.dice["rare"]) and np.isnan(res.trivial_dice["rare"])
    assert 0 < res.dice["lung"] <= 1 and res.trivial_dice["lung"] == pytest.approx(0.4)
    seg = {"csv": "m.csv", "structures": res.structures, "grouped_by": "patient_id"}
    report = _seg_report({**seg, "methods": {"ours": res.to_dict()}})
    md = render_markdown(report)
    assert "| rare | 0 | absent from the held-out images | absent from the held-out images |" in md
    assert f"| lung | 10 | {res.dice['lung']:.3f} | 0.400 |" in md
    assert set(flat_metrics(report)) == {"ours/seg_lung/dice"}
    assert _finite(res.to_dict())["dice"]["rare"] is None  # null in report.json
    assert render_markdown(_seg_report({**seg, "methods": {"ours": _finite(res.to_dict())}})) == md


def test_a_mask_csv_without_the_patient_column_warns_and_the_report_says_so(tmp_path, caplog):
    """The mask CSV's patient column is the labels CSV's --group-col; a mask CSV without it
    (here "Patient ID") was split image by image, so a patient's second radiograph could sit
    in training, with an INFO line only and a report identical to a grouped one."""
    import logging

    from PIL import Image

    from radjepa.eval.report import render_markdown
    from radjepa.eval.segmentation import load_seg_csv

    rng = np.random.default_rng(0)
    lines = ["image,lung,Patient ID"]
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / f"i{i}.png")
        Image.fromarray(np.full((64, 64), 255, np.uint8)).save(tmp_path / f"m{i}.png")
        lines.append(f"i{i}.png,m{i}.png,{i // 2}")
    (tmp_path / "masks.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="radjepa.eval.segmentation"):
        _, _, groups = load_seg_csv(tmp_path / "masks.csv", ["lung"], size=64)
    assert groups is None
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "has no patient_id column" in warned[0].getMessage()
    res = {"dice": {"lung": 0.9}, "trivial_dice": {"lung": 0.5}, "n_train": 3, "n_test": 1}
    seg = {"csv": "masks.csv", "structures": ["lung"], "methods": {"ours": res}}
    ungrouped = render_markdown(_seg_report({**seg, "grouped_by": None, "group_col": "patient_id"}))
    grouped = render_markdown(_seg_report({**seg, "grouped_by": "Patient ID"}))
    assert "each image its own patient: the mask CSV has no `patient_id` column" in ungrouped
    assert "split by patient (the `Patient ID` column)" in grouped
    assert "own patient" not in grouped


def test_plots_write_valid_pngs(tmp_path, tiny_encoder):
    from radjepa.eval.plots import plot_pca_map, plot_roc, roc_curve_points
    from radjepa.eval.segmentation import tokens_to_grid

    y = np.array([0, 0, 1, 1])
    fpr, tpr = roc_curve_points(y, np.array([0.1, 0.4, 0.35, 0.8]))
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    roc = plot_roc(
        "view=AP", {"ours": (y, np.array([0.1, 0.4, 0.35, 0.8]), 0.75)}, tmp_path / "roc.png"
    )
    images, _ = _disc_pairs(3)
    tokens = extract_features(tiny_encoder, images, batch_size=3, patch_tokens=True)
    pca = plot_pca_map(images, tokens_to_grid(tokens), tmp_path / "sub" / "pca.png")
    for p in (roc, pca):
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000


def test_shard_dataset_takes_labels_from_metadata_and_patients_from_pseudonyms(tmp_path, nih_dir):
    from radjepa.eval.features import load_shard_dataset

    ds = load_csv_dataset(nih_dir / "labels.csv", label_cols=["sex=M"], size=64, limit=6)
    rows = (nih_dir / "labels.csv").read_text().splitlines()[1:7]
    write_shard(
        tmp_path,
        ds.images,
        image_id=[f"id{i}" for i in range(6)],
        patient_pid=["a", "a", "b", None, "c", "c"],
        sex=[r.split(",")[3] for r in rows],
        view_position=["AP", "PA", "PA", "AP", "PA", "AP"],
    )
    sd = load_shard_dataset(tmp_path, ["view_position=AP", "sex=M"])
    assert np.array_equal(sd.images, ds.images)
    assert sd.labels[:, 0].tolist() == [1, 0, 0, 1, 0, 1]
    assert np.array_equal(sd.labels[:, 1], ds.labels[:, 0]) and sd.positive == ["AP", "M"]
    assert sd.groups.tolist() == ["a", "a", "b", "id3", "c", "c"]
    with pytest.raises(DatasetError, match="missing column"):
        load_shard_dataset(tmp_path, ["Effusion"])


def test_shard_images_without_a_requested_label_are_left_out_and_listed(tmp_path, nih_dir):
    # PNG/JPEG inputs have no DICOM metadata: their view_position is null in the shard, and
    # a shard cannot be "filled or dropped" as the old error told the user to
    from radjepa.eval.features import load_shard_dataset
    from radjepa.eval.report import _where

    ds = load_csv_dataset(nih_dir / "labels.csv", size=64, limit=6)
    write_shard(
        tmp_path,
        ds.images,
        image_id=[f"{i:064x}" for i in range(6)],
        patient_pid=["a", "b", "c", "d", "e", "f"],
        view_position=["AP", None, "PA", " ", "PA", "AP"],
    )
    sd = load_shard_dataset(tmp_path, ["view_position=AP"])
    assert sd.labels[:, 0].tolist() == [1, 0, 0, 1]
    assert np.array_equal(sd.images, ds.images[[0, 2, 4, 5]])
    assert sd.groups.tolist() == ["a", "c", "e", "f"]
    assert [r["image_id"] for r in sd.rejected] == [f"{1:064x}", f"{3:064x}"]
    assert {r["reason"] for r in sd.rejected} == {"no_label"}
    with pytest.raises(DatasetError, match="none of 6 images has sex"):
        load_shard_dataset(tmp_path, ["sex"])
    # listed by id in the report, never by file name
    assert _where(sd.rejected[0]) == "image `0000000000000000`"
    assert _where({"row": "3", "reason": "truncated"}) == "CSV row 3"


@pytest.mark.parametrize("device", ["mps", "xpu", "hpu", "meta"])
def test_a_device_other_than_cpu_or_cuda_is_refused_in_one_line(device):
    """``--device mps`` (or xpu, hpu, meta) parsed as a torch device and passed the CLI's
    check, then failed with a traceback after every image was decoded: it is now the same
    one-line DatasetError as an unknown name, listing what is accepted."""
    from radjepa.eval.features import resolve_device

    with pytest.raises(DatasetError, match=r"use cpu, cuda, cuda:N or auto") as err:
        resolve_device(device)
    assert "\n" not in str(err.value) and repr(device) in str(err.value)
    assert resolve_device("cpu").type == "cpu" and resolve_device(None).type in ("cpu", "cuda")


def test_an_image_listed_twice_in_a_segmentation_csv_is_refused(tmp_path, nih_dir):
    """The labels CSV refused an image under two patients, the masks CSV did not: one image
    listed twice (under two patients, or twice with no patient column, where each row is its
    own patient) could be trained on and scored as held out. A repeat with one patient and
    the same masks stays with itself, as in the labels CSV."""
    from PIL import Image

    from radjepa.eval.segmentation import load_seg_csv

    imgs = sorted((nih_dir / "images").glob("*.png"))[:3]
    for p in imgs:
        shutil.copy(p, tmp_path / p.name)
    Image.fromarray(np.full((256, 256), 255, np.uint8)).save(tmp_path / "m.png")
    a, b, c = (p.name for p in imgs)
    cases = {
        "two_patients": (
            f"image,lung,patient_id\n{a},m.png,p0\n{b},m.png,p1\n./{a},m.png,p2\n",
            r"rows 1 and 3 list the same image with another patient_id: ",
        ),
        "no_patients": (
            f"image,lung\n{a},m.png\n{b},m.png\n{c},m.png\n{b},m.png\n",
            r"rows 2 and 4 list the same image twice: ",
        ),
    }
    for name, (text, match) in cases.items():
        (tmp_path / f"{name}.csv").write_text(text)
        with pytest.raises(DatasetError, match=match) as err:
            load_seg_csv(tmp_path / f"{name}.csv", ["lung"], size=32)
        assert (a if name == "two_patients" else b) not in str(err.value)  # rows, not names
    (tmp_path / "same.csv").write_text(f"image,lung,patient_id\n{a},m.png,p0\n{a},m.png,p0\n")
    _, _, groups = load_seg_csv(tmp_path / "same.csv", ["lung"], size=32)
    assert groups is not None and groups.tolist() == ["p0", "p0"]


def test_a_csv_image_ingest_would_quarantine_for_burned_in_text_is_left_out(tmp_path, nih_dir):
    # the probe draws its first images into a plot MLflow keeps: a DICOM flagged as carrying
    # burned-in text (a patient's name in the pixels) went there, where ingest quarantines it
    from dicom_factory import gradient, make_dicom

    imgs = sorted((nih_dir / "images").glob("*.png"))[:4]
    for p in imgs:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "named.dcm").write_bytes(
        make_dicom(gradient(64, 64), extra={"BurnedInAnnotation": "YES"})
    )
    lines = ["image,patient_id,view"] + [f"{p.name},{i},AP" for i, p in enumerate(imgs)]
    (tmp_path / "labels.csv").write_text("\n".join([*lines, "named.dcm,9,PA"]) + "\n")
    ds = load_csv_dataset(tmp_path / "labels.csv", label_cols=["view=AP"], size=64)
    assert ds.rejected == [
        {"row": "5", "reason": "burned_in_annotation", "message": ds.rejected[0]["message"]}
    ]
    kept = load_csv_dataset(
        tmp_path / "labels.csv", label_cols=["view=AP"], size=64, reject_burned_in=False
    )
    assert len(kept.images) == 5 and kept.rejected == []


def test_a_csv_refused_whole_by_ingest_s_policy_names_the_setting(tmp_path):
    # "no image could be decoded" pointed at the decoder, not at the setting that refused them
    from dicom_factory import gradient, make_dicom

    flagged = make_dicom(gradient(64, 64), extra={"BurnedInAnnotation": "YES"})
    for i in range(2):
        (tmp_path / f"{i}.dcm").write_bytes(flagged)
    (tmp_path / "l.csv").write_text("image,patient_id,view\n0.dcm,a,AP\n1.dcm,b,PA\n")
    with pytest.raises(DatasetError, match=r"burned_in_annotation: refused by ingest\.burned_in"):
        load_csv_dataset(tmp_path / "l.csv", label_cols=["view=AP"], size=64)


def test_the_probe_keeps_what_its_own_config_or_the_checkpoint_s_keeps():
    from radjepa.config import load_config
    from radjepa.eval.runner import _quarantines

    default, keep = load_config(None), load_config(None, ["ingest.for_processing=keep"])
    assert _quarantines(default, default, "for_processing")
    assert not _quarantines(keep, default, "for_processing")  # the checkpoint's ingest kept them
    assert not _quarantines(default, keep, "for_processing")  # the probe is told to keep them


def test_a_missing_segmentation_file_is_named_by_row_and_column_not_path(tmp_path, nih_dir):
    from radjepa.eval.segmentation import load_seg_csv

    img = sorted((nih_dir / "images").glob("*.png"))[0]
    (tmp_path / "DOE_JOHN").mkdir()
    shutil.copy(img, tmp_path / "DOE_JOHN" / "cxr.png")
    (tmp_path / "seg.csv").write_text("image,lung\nDOE_JOHN/cxr.png,DOE_JOHN/mask.png\n")
    with pytest.raises(DatasetError, match=r"row 1: the file\(s\) of column\(s\) \['lung'\]") as e:
        load_seg_csv(tmp_path / "seg.csv", ["lung"], size=32)
    assert "DOE_JOHN" not in str(e.value).split("row 1")[1]


def test_a_mask_that_is_no_image_is_named_by_row_and_structure(tmp_path, nih_dir):
    # PIL's error named the file (a patient-named folder), as a traceback past the CLI
    from radjepa.eval.segmentation import load_seg_csv

    img = sorted((nih_dir / "images").glob("*.png"))[0]
    (tmp_path / "DOE_JOHN").mkdir()
    shutil.copy(img, tmp_path / "DOE_JOHN" / "cxr.png")
    (tmp_path / "DOE_JOHN" / "mask.png").write_bytes(b"not a png")
    (tmp_path / "seg.csv").write_text("image,lung\nDOE_JOHN/cxr.png,DOE_JOHN/mask.png\n")
    with pytest.raises(DatasetError, match=r"row 1: the lung mask is not a readable image$"):
        load_seg_csv(tmp_path / "seg.csv", ["lung"], size=32)


def _unreadable_file(link: Path) -> None:
    """``link``: a file whose read fails for root too (a mode-000 file does not): the start of
    this process's memory, which is unmapped (EIO)."""
    mem = Path("/proc/self/mem")
    try:
        mem.read_bytes()
    except OSError:
        link.symlink_to(mem)
        return
    pytest.skip("no /proc/self/mem whose read fails here")


def test_an_image_the_file_system_fails_on_is_named_by_row_not_path(tmp_path, nih_dir):
    # the OSError (or pathlib's RuntimeError for a link loop) named the absolute path, a
    # patient-named folder, in a traceback no caller caught: the console, a Ray job's log
    from radjepa.eval.segmentation import load_seg_csv

    img = sorted((nih_dir / "images").glob("*.png"))[0]
    (tmp_path / "DOE_JOHN").mkdir()
    shutil.copy(img, tmp_path / "DOE_JOHN" / "cxr.png")
    _unreadable_file(tmp_path / "DOE_JOHN" / "io.png")
    (tmp_path / "DOE_JOHN" / "loop.png").symlink_to("loop.png")
    for name, why in (("io.png", r"cannot be read \(Input/output error\)"), ("loop.png", "loop")):
        (tmp_path / "labels.csv").write_text(
            f"image,patient_id,view\nDOE_JOHN/cxr.png,1,AP\nDOE_JOHN/{name},2,PA\n"
        )
        with pytest.raises(DatasetError, match=rf"labels\.csv row 2: .*{why}") as err:
            load_csv_dataset(tmp_path / "labels.csv", label_cols=["view=AP"], size=32)
        assert "DOE_JOHN" not in str(err.value) and "/proc" not in str(err.value)
        (tmp_path / "seg.csv").write_text(f"image,lung\nDOE_JOHN/{name},DOE_JOHN/cxr.png\n")
        with pytest.raises(DatasetError, match=rf"seg\.csv row 1: .*{why}") as err:
            load_seg_csv(tmp_path / "seg.csv", ["lung"], size=32)
        assert "DOE_JOHN" not in str(err.value) and "/proc" not in str(err.value)

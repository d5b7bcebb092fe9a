"""Label and patient cells of an evaluation CSV: what is positive, and who is one patient."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from radjepa.eval.features import DatasetError, LabelSpec, binarise, load_csv_dataset, patient_ids


def _copy_images(nih_dir: Path, dst: Path, n: int) -> list[str]:
    imgs = sorted((nih_dir / "images").glob("*.png"))[:n]
    for p in imgs:
        shutil.copy(p, dst / p.name)
    return [p.name for p in imgs]


def test_a_text_column_must_name_its_positive_value(tmp_path, nih_dir):
    """Sorted as text, ``normal``/``abnormal`` made ``normal`` positive and ``TRUE``/``false``
    made ``false`` positive, all reported (and served by /v1/classify) as ``Effusion``."""
    for cells, values in (
        (["abnormal", "normal", "normal"], "'abnormal', 'normal'"),
        (["yes", "no"], "'no', 'yes'"),
    ):
        first, second = sorted(set(cells))
        with pytest.raises(DatasetError, match=values) as err:
            binarise(cells, LabelSpec("Effusion"))
        assert f"--label Effusion={first} or --label Effusion={second}" in str(err.value)
    with pytest.raises(DatasetError, match="--label 'finding=No Finding' or --label finding=X"):
        binarise(["No Finding", "X"], LabelSpec("finding"))  # as a shell takes it
    with pytest.raises(DatasetError, match="3 text values.*--label grade=a "):
        binarise(["a", "b", "c"], LabelSpec("grade"))
    # true/false in any case is 0/1, under the column's name, like a 0/1 column
    for cells in (["TRUE", "false", "false", "TRUE"], ["True", "False", "False", "True"]):
        y, pos = binarise(cells, LabelSpec("Effusion"))
        assert pos is None and y.tolist() == [1, 0, 0, 1]
    y, pos = binarise(["1", "0", "0.0", "1"], LabelSpec("Effusion"))
    assert pos is None and y.tolist() == [1, 0, 0, 1]
    # named, it is positive and names the label
    y, pos = binarise(["abnormal", "normal", "normal"], LabelSpec("Effusion", "abnormal"))
    assert pos == "abnormal" and y.tolist() == [1, 0, 0]

    names = _copy_images(nih_dir, tmp_path, 4)
    grades = ["normal", "abnormal", "abnormal", "normal"]
    rows = [f"{n},p{i},{g}" for i, (n, g) in enumerate(zip(names, grades, strict=True))]
    (tmp_path / "labels.csv").write_text("\n".join(["image,patient_id,Effusion", *rows]) + "\n")
    with pytest.raises(DatasetError, match="--label Effusion=abnormal or"):
        load_csv_dataset(tmp_path / "labels.csv", label_cols=["Effusion"], size=32)
    ds = load_csv_dataset(tmp_path / "labels.csv", label_cols=["Effusion=abnormal"], size=32)
    assert ds.label_names == ["Effusion=abnormal"] and ds.positive == ["abnormal"]
    assert ds.labels[:, 0].tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize(
    ("cells", "row"),
    [
        (["Effusion", "effusion|Mass", "Mass", "No Finding"], 2),  # another case
        (["Atelectasis;Effusion", "Effusion", "No Finding"], 1),
        (["Effusion", "Mass", "Effusion, Mass"], 3),
        (["Mass/Effusion", "Effusion"], 1),
        (["Mass | EFFUSION", "Effusion|Mass"], 1),
    ],
)
def test_a_named_value_written_otherwise_in_a_cell_is_refused_by_row(cells, row):
    """Split on ``|`` only and matched case by case, each of these cells was a silent
    negative while the value stood alone in another cell."""
    with pytest.raises(DatasetError, match=re.escape(f"first data row {row}: '{cells[row - 1]}'")):
        binarise(cells, LabelSpec("findings", "Effusion"))


def test_only_exact_members_count_in_multi_and_single_value_columns():
    cells = ["Atelectasis|Effusion", "Effusion_left", "Effusion", "No Finding", "Mass; Nodule"]
    y, pos = binarise(cells, LabelSpec("findings", "Effusion"))
    assert pos == "Effusion" and y.tolist() == [1, 0, 1, 0, 0]
    with pytest.raises(DatasetError, match=r"first data row 2: 'ap'"):
        binarise(["AP", "ap", "PA"], LabelSpec("view", "AP"))
    assert binarise(["AP", "PA", "PA"], LabelSpec("view", "AP"))[0].tolist() == [1, 0, 0]


def test_a_named_number_matches_every_spelling_of_it():
    """Compared as text, ``Effusion=1`` found no positive in a column pandas wrote as ``1.0``
    and scored every ``1.0`` row negative in a column mixing ``1`` and ``1.0``."""
    y, pos = binarise(["1", "0", "-1", "1.0", "1.0"], LabelSpec("Effusion", "1"))
    assert pos == "1" and y.tolist() == [1, 0, 0, 1, 1]
    y, _ = binarise(["1.0", "0.0", "-1.0", "1.00"], LabelSpec("Effusion", "1"))
    assert y.tolist() == [1, 0, 0, 1]
    y, _ = binarise(["1", "0", "-1"], LabelSpec("Effusion", "1.0"))
    assert y.tolist() == [1, 0, 0]
    y, _ = binarise(["-1.0", "0.0", "1.0"], LabelSpec("Effusion", "-1"))  # uncertain positive
    assert y.tolist() == [1, 0, 0]
    assert binarise(["2|1.0", "2", "0"], LabelSpec("grade", "1"))[0].tolist() == [1, 0, 0]
    with pytest.raises(DatasetError, match=r"value '1' never occurs .*'0.0', '2.0'"):
        binarise(["0.0", "2.0"], LabelSpec("Effusion", "1"))
    # the advice for an unnamed column quotes the positive as the column writes it
    with pytest.raises(DatasetError, match=r"e\.g\. --label Effusion=1\.0$"):
        binarise(["1.0", "0.0", "-1.0"], LabelSpec("Effusion"))
    with pytest.raises(DatasetError, match=r"e\.g\. --label Effusion=1$"):
        binarise(["1", "0", "-1"], LabelSpec("Effusion"))
    # the case and separator checks still hold beside numbers
    with pytest.raises(DatasetError, match=re.escape("first data row 1: '1.0;2'")):
        binarise(["1.0;2", "1", "0"], LabelSpec("grade", "1.0"))
    # also where the number is spelt otherwise than named: a silent negative before
    with pytest.raises(DatasetError, match=re.escape("first data row 1: '1.0;2'")):
        binarise(["1.0;2", "0", "1"], LabelSpec("grade", "1"))


def test_placeholder_patient_ids_make_each_image_its_own_patient(tmp_path, nih_dir, caplog):
    """``nan`` (pandas' missing id), ``NA``, ``null``, ``None`` were one shared "patient": in
    one fold, one bootstrap cluster, and never each other's retrieval neighbours."""
    ids = ["nan", "NaN", "NA", "null", "None", "7", "", "7"]
    rows = [{"image": f"{i}.png", "patient_id": pid} for i, pid in enumerate(ids)]
    with caplog.at_level(logging.WARNING, logger="radjepa.eval.features"):
        groups = patient_ids(rows, "image", "patient_id", tmp_path / "labels.csv").tolist()
    assert groups[5] == groups[7] == "7"
    assert len({*groups[:5], groups[6], "7"}) == 7
    assert "6 of 8 rows have no patient_id" in caplog.text
    assert "each of those images counts as its own patient" in caplog.text

    names = _copy_images(nih_dir, tmp_path, 4)
    lines = [
        f"{n},{pid},{i % 2}"
        for i, (n, pid) in enumerate(zip(names, ["nan"] * 3 + ["7"], strict=True))
    ]
    (tmp_path / "labels.csv").write_text("\n".join(["image,patient_id,Effusion", *lines]) + "\n")
    ds = load_csv_dataset(tmp_path / "labels.csv", label_cols=["Effusion"], size=32)
    assert len(np.unique(ds.groups)) == 4 and "nan" not in ds.groups.tolist()

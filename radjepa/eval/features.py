"""Evaluation inputs: labelled images from a CSV (decoded exactly as ingest does) and features.

Label columns become 0/1 targets. A column already holding 0/1 (or true/false) is used as is;
any other column needs its positive value named, ``view=AP``: which of two text values is
"positive" cannot be read off the values, and the label goes downstream (report, MLflow, the
served head) under the name given. A named value also matches inside multi-label cells such as
NIH ``findings`` (``findings=Effusion`` is positive for ``Atelectasis|Effusion``).
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "LabelSpec",
    "Dataset",
    "DatasetError",
    "parse_label_spec",
    "binarise",
    "load_csv_dataset",
    "load_shard_dataset",
    "check_repeats",
    "patient_ids",
    "read_csv_rows",
    "read_image_bytes",
    "resolve_listed",
    "listed_file_exists",
    "extract_features",
    "require_finite",
    "resolve_device",
]


class DatasetError(ValueError):
    """A labels CSV that cannot be turned into an evaluation set (names the column/row/file)."""


@dataclass(frozen=True)
class LabelSpec:
    """A label column and, optionally, which of its values counts as positive."""

    column: str
    positive: str | None = None

    @property
    def name(self) -> str:
        return self.column if self.positive is None else f"{self.column}={self.positive}"


@dataclass
class Dataset:
    """Images [N, S, S] (stored contract), 0/1 labels [N, L], patient ids [N], and provenance."""

    images: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    positive: list[str | None]
    groups: np.ndarray
    paths: list[str]
    rejected: list[dict[str, str]] = field(default_factory=list)


def parse_label_spec(spec: str | LabelSpec) -> LabelSpec:
    """``"view=AP"`` -> LabelSpec("view", "AP"); ``"Effusion"`` -> LabelSpec("Effusion")."""
    if isinstance(spec, LabelSpec):
        return spec
    col, sep, pos = str(spec).partition("=")
    col, pos = col.strip(), pos.strip()
    if not col or (sep and not pos):
        raise DatasetError(f"label spec {spec!r} must be COLUMN or COLUMN=POSITIVE_VALUE")
    return LabelSpec(col, pos if sep else None)


# cells that say a label is not known (pandas writes NaN for an empty cell)
_MISSING = frozenset({"", "nan", "na", "n/a", "null"})


def binarise(values: Sequence[str], spec: LabelSpec) -> tuple[np.ndarray, str | None]:
    """0/1 targets for one column and the positive class used (None when already 0/1).

    A numeric column must hold 0 and 1 only: as categories its values sorted as text, and the
    "second value" taken as the positive class was NaN in a column of 1 and NaN (every true
    positive scored as a negative) or 0 in a CheXpert-style column of -1 (uncertain) and 0,
    under the finding's own name. A text column must name its positive value for the same
    reason: sorted, ``normal``/``abnormal`` made ``normal`` positive and ``TRUE``/``false``
    made ``false`` positive, while the report, MLflow and ``/v1/classify`` said only the
    column's name. True/false (any case) is the one text pair read as 0/1."""
    vals = [v.strip() for v in values]
    missing = [i for i, v in enumerate(vals) if v.lower() in _MISSING]
    if missing:
        raise DatasetError(
            f"label column {spec.column!r} is empty or not known ({vals[missing[0]]!r}) in "
            f"{len(missing)} rows (first data row {missing[0] + 1}); fill or drop them"
        )
    if spec.positive is not None:
        return _named_positive(vals, spec), spec.positive
    distinct = sorted(set(vals))
    numbers = _numbers(distinct)
    if numbers is not None and numbers <= {0.0, 1.0}:
        return np.array([float(v) for v in vals], dtype=np.int8), None
    if numbers is not None:
        # the advice writes 1 as the column does (``1.0`` from pandas), so it is recognisably
        # the column's own value; any spelling of the number would match it
        example = next((v for v in distinct if float(v) == 1.0), "1")
        raise DatasetError(
            f"label column {spec.column!r} holds numbers other than 0 and 1 ({distinct[:10]}; "
            "-1 marks an uncertain finding in CheXpert-style labels): map them to 0 or 1 in "
            "the CSV, or name the positive value, e.g. "
            f"--label {shlex.quote(f'{spec.column}={example}')}"
        )
    if {v.lower() for v in distinct} <= {"true", "false"}:
        return np.array([v.lower() == "true" for v in vals], dtype=np.int8), None
    choices = distinct if len(distinct) == 2 else distinct[:1]
    example = " or ".join(f"--label {shlex.quote(f'{spec.column}={v}')}" for v in choices)
    raise DatasetError(
        f"label column {spec.column!r} holds {len(distinct)} text values {distinct[:10]}, not "
        f"0/1: name the positive one, e.g. {example} (the label is reported and served "
        "under that name)"
    )


MULTI_SEP = "|"  # separator of multi-label cells
_NEAR_SEP = re.compile(r"[|;,/]")  # separators a hand-made multi-label cell may use instead


def _named_positive(vals: Sequence[str], spec: LabelSpec) -> np.ndarray:
    """1 where a cell is the named value or holds it as a ``|``-separated member.

    A named number matches by value: ``=1`` matches ``1``, ``1.0`` and ``1.00``, as pandas and
    CheXpert CSVs write ``1.0``; compared as text, a column of ``1.0`` had no positive and one
    mixing ``1`` and ``1.0`` scored every ``1.0`` row as a negative. A cell holding the value
    otherwise (``effusion|Mass``, ``Atelectasis;Effusion``) is refused: read as written it was
    a silent negative whenever the value appeared alone in another cell."""
    want = str(spec.positive)
    members = [{m.strip() for m in v.split(MULTI_SEP)} for v in vals]  # 'A | B' too
    want_number = _number(want)

    def holds(m: set[str]) -> bool:
        if want in m:
            return True
        return want_number is not None and any(_number(x) == want_number for x in m)

    hit = [holds(m) for m in members]
    key = want.casefold()
    near = [
        i
        for i, (cell, m) in enumerate(zip(vals, members, strict=True))
        if not hit[i]
        and (
            key in {x.casefold() for x in m}
            or key in {p.strip().casefold() for p in _NEAR_SEP.split(cell)}
            # the number spelt otherwise beside a separator (``1.0;2`` for ``=1``)
            or (
                want_number is not None
                and any(_number(p) == want_number for p in _NEAR_SEP.split(cell))
            )
        )
    ]
    if near:
        raise DatasetError(
            f"label {spec.name!r}: {len(near)} cells of column {spec.column!r} hold {want!r} "
            f"in another case or beside ';', ',' or '/' (first data row {near[0] + 1}: "
            f"{vals[near[0]]!r}), and would count as negatives: separate multi-label values "
            "with '|' and spell the value one way, as named"
        )
    if not any(hit):
        known = sorted(set().union(*members))
        raise DatasetError(
            f"label {spec.name!r}: value {want!r} never occurs in column "
            f"{spec.column!r} (values: {known[:10]})"
        )
    return np.array(hit, dtype=np.int8)


def _number(value: str) -> float | None:
    """The value as a finite number, or None when it is not one."""
    try:
        x = float(value)
    except ValueError:
        return None
    return x if np.isfinite(x) else None


def _numbers(values: Sequence[str]) -> set[float] | None:
    """The values as numbers, or None when one of them is not a finite number."""
    try:
        numbers = {float(v) for v in values}
    except ValueError:
        return None
    return numbers if all(np.isfinite(x) for x in numbers) else None


def read_csv_rows(csv_path: Path, what: str = "labels CSV") -> list[dict[str, str]]:
    """The data rows of a UTF-8 CSV as dicts keyed by its header.

    Read as ``utf-8-sig``: spreadsheet programs save "CSV UTF-8" with a byte-order mark, which
    plain UTF-8 keeps in the first header (``"\ufeffimage"``), so the image column would be
    reported missing from a file that visibly has it.
    """
    if not csv_path.is_file():
        raise DatasetError(f"{what} not found: {csv_path}")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, restkey=_EXTRA_CELLS)
            rows = list(reader)
    except UnicodeDecodeError as err:
        raise DatasetError(f"{csv_path}: not UTF-8 text ({err}); save it as CSV UTF-8") from None
    if not rows:
        raise DatasetError(f"{csv_path}: no data rows")
    for i, row in enumerate(rows):
        _check_cells(row, len(reader.fieldnames or ()), f"{csv_path} row {i + 1}")
    return rows


_EXTRA_CELLS = "\0extra"  # DictReader's key for cells beyond the header (no header is NUL)


def _check_cells(row: dict[str, Any], width: int, where: str) -> None:
    """Refuse a row whose cells do not line up with the header.

    An unquoted comma inside a cell (``Atelectasis,Effusion``) shifts every later cell one
    column right, so a label column silently read its neighbour's values; a short row (cut
    off, or split by an unquoted line break) gave ``None`` cells that ended in a traceback.
    Empty cells past the header (trailing separators) carry nothing and are dropped.
    """
    extra = row.pop(_EXTRA_CELLS, [])
    missing = [k for k, v in row.items() if v is None]
    if missing:
        raise DatasetError(
            f"{where} has {width - len(missing)} of the header's {width} cells (no "
            f"{missing[0]!r}); complete or drop the row"
        )
    if any(v.strip() for v in extra):
        raise DatasetError(
            f"{where} has {width + len(extra)} cells, the header {width}: quote a cell that "
            'holds a comma ("a,b")'
        )


# rejections by ingest's policy rather than by the bytes: the setting that decides each
_POLICY_REASONS = {
    "burned_in_annotation": "ingest.burned_in_annotation",
    "for_processing": "ingest.for_processing",
}


def load_csv_dataset(
    csv_path: str | os.PathLike[str],
    image_col: str = "image",
    label_cols: Sequence[str | LabelSpec] = (),
    group_col: str | None = "patient_id",
    size: int = 256,
    *,
    dtype: str = "uint8",
    window_percentiles: tuple[float, float] = (0.5, 99.5),
    limit: int | None = None,
    secret: bytes | None = None,
    reject_burned_in: bool = True,
    reject_for_processing: bool = True,
) -> Dataset:
    """Images listed in a CSV (paths relative to it), decoded with ingest's ``decode_image``.

    Refused as ingest refuses them by default (``reject_*``; the probe passes the ingest policy
    saved with the checkpoint): a DICOM whose pixels may hold burned-in text, and raw detector
    data. The probe draws its first images into a plot MLflow keeps, which every MLflow user
    can open: a file ingest would have quarantined for its burned-in name went there.

    Undecodable images are left out and listed in ``Dataset.rejected`` by CSV row (1 = the
    first image row) with the decoder's reason, not by path: the list goes into the report and
    MLflow, and hospital file names often carry patient names. A missing file or column is an
    error. Without ``group_col`` each image is its own
    patient. ``secret`` only keys metadata pseudonyms, which evaluation does not use.
    """
    from radjepa.imaging.decode import decode_image
    from radjepa.imaging.errors import ImageRejected

    path = Path(csv_path)
    rows = read_csv_rows(path)
    if limit is not None:
        rows = rows[:limit]
    specs = [parse_label_spec(s) for s in label_cols]
    needed = [image_col, *(s.column for s in specs)] + ([group_col] if group_col else [])
    absent = [c for c in needed if c not in rows[0]]
    if absent:
        raise DatasetError(f"{path}: missing column(s) {absent}; has {list(rows[0])}")
    files = resolve_listed(rows, image_col, path)  # resolved once
    check_repeats(rows, files, path, [group_col or "", *(s.column for s in specs)])
    # the labels of every row, before the decode: an unusable cell is said at once, by its
    # CSV row, and the positive class does not depend on which images decoded
    labels, positive, names = _labels_for(rows, specs)
    key = secret if secret is not None else os.urandom(32)
    images, kept, rejected = [], [], []
    for i, img_path in enumerate(files):
        if not listed_file_exists(img_path, f"{path} row {i + 1}"):
            # by row, not path (hospital file names often carry patient names): the message
            # reaches a console or a Ray job's log
            raise DatasetError(
                f"{path} row {i + 1}: image not found (the file column {image_col!r} names, "
                "relative to the CSV)"
            )
        data = read_image_bytes(img_path, f"{path} row {i + 1}")
        try:
            dec = decode_image(
                data,
                size=size,
                dtype=dtype,
                window_percentiles=tuple(window_percentiles),
                secret=key,
                source_name=img_path.name,
                reject_burned_in=reject_burned_in,
                reject_for_processing=reject_for_processing,
            )
        except ImageRejected as err:
            rejected.append({"row": str(i + 1), "reason": err.reason, "message": str(err)})
            log.warning("skipping %s row %d: %s", path.name, i + 1, err)
            continue
        images.append(dec.pixels)
        kept.append(i)
    if not kept:
        policy = {r["reason"] for r in rejected} & _POLICY_REASONS.keys()
        why = "; ".join(f"{r}: refused by {_POLICY_REASONS[r]}" for r in sorted(policy))
        raise DatasetError(
            f"{path}: no image could be decoded ({len(rejected)} rejected"
            + (f"; {why}, which =keep allows for an archive known to be clean" if why else "")
            + ")"
        )
    groups = patient_ids(
        [rows[i] for i in kept], image_col, group_col, path, files=[files[i] for i in kept]
    )
    return Dataset(
        images=np.stack(images),
        labels=labels[kept],
        label_names=names,
        positive=positive,
        groups=groups,
        paths=[rows[i][image_col] for i in kept],
        rejected=rejected,
    )


# A CSV's files are named by row, never by path, also where the file system fails: an OSError
# (and pathlib's RuntimeError for a symbolic link loop) names the absolute path, hospital file
# names often carry patient names, and the traceback reached the console or a Ray job's log.


def _failure(err: OSError | RuntimeError) -> str:
    """What went wrong, without the path the exception's text holds."""
    if isinstance(err, RuntimeError):  # pathlib's only one here (before Python 3.13)
        return "a symbolic link loop"
    return os.strerror(err.errno) if err.errno else type(err).__name__


def resolve_listed(rows: Sequence[dict[str, str]], column: str, source: Path) -> list[Path]:
    """The file each row's ``column`` names (relative to the CSV ``source``), resolved; a
    failure is a DatasetError naming the row."""
    out = []
    for i, row in enumerate(rows):
        try:
            out.append((source.parent / row[column]).resolve())
        except (OSError, RuntimeError) as err:
            raise DatasetError(
                f"{source} row {i + 1}: the file column {column!r} names cannot be resolved "
                f"({_failure(err)})"
            ) from None
    return out


def listed_file_exists(file: Path, where: str) -> bool:
    """Whether ``file`` is a file; a storage that fails to say is a DatasetError naming
    ``where`` (the CSV row)."""
    try:
        return file.is_file()
    except OSError as err:  # is_file answers False only for a missing file or a link loop
        raise DatasetError(
            f"{where}: a file it lists cannot be looked up ({_failure(err)})"
        ) from None


def read_image_bytes(file: Path, where: str) -> bytes:
    """The bytes of a listed image, or DatasetError naming ``where`` (the CSV row) and the
    kind of failure (unreadable, storage that stops answering)."""
    try:
        return file.read_bytes()
    except OSError as err:
        raise DatasetError(f"{where}: the image cannot be read ({_failure(err)})") from None


def check_repeats(
    rows: Sequence[dict[str, str]],
    files: Sequence[Path],
    source: Path,
    columns: Sequence[str],
    *,
    what: str = "label",
    same_ok: bool = True,
) -> None:
    """Refuse an image listed twice with another patient or label: under two patients it could
    sit on both sides of a split and find itself as another patient's neighbour at similarity
    1, and with two labels it was scored as both classes. A row repeated with the same values
    stays (grouped with itself, as one patient) unless ``same_ok`` is False, for a loader
    whose rows are their own patients without a patient column and so could split a repeat.
    ``files`` are the rows' image paths as they resolve (``a.png`` and ``./a.png`` are one)."""
    first: dict[Path, int] = {}
    for i, (row, file) in enumerate(zip(rows, files, strict=True)):
        j = first.setdefault(file, i)
        if j == i:
            continue
        differ = [c for c in columns if c and rows[j][c].strip() != row[c].strip()]
        if differ or not same_ok:
            said = f" with another {' and '.join(differ)}" if differ else " twice"
            raise DatasetError(
                f"{source} rows {j + 1} and {i + 1} list the same image{said}: "
                f"list each image once, with its one patient and {what}"
            )


def patient_ids(
    rows: Sequence[dict[str, str]],
    image_col: str,
    group_col: str | None,
    source: Path,
    *,
    files: Sequence[Path] | None = None,
) -> np.ndarray:
    """Patient id per row; a blank cell, or a placeholder for none (``nan``, ``NA``, ``null``,
    ``None``, any case), makes the image its own patient.

    Taken literally, every blank cell would be one shared id: all images of unknown patients
    merged into one "patient" that fills a fold on its own, resamples as one cluster and hides
    those images from each other's neighbours; the placeholder pandas writes for a missing id
    (``nan``) merged them just the same. Shards without a pseudonym already count as their own
    patient; a CSV does the same. The image path, as it resolves, keeps a row listed twice
    together (``a.png`` and ``./a.png`` too: as written they were two patients).
    """
    if files is None:  # the rows' image paths, resolved (where the caller has not)
        files = resolve_listed(rows, image_col, source)
    images = [str(f) for f in files]
    if not group_col:
        return np.array([f"<image> {p}" for p in images])
    ids = [r[group_col].strip() for r in rows]
    ids = ["" if v.lower() in _NO_PATIENT else v for v in ids]
    blank = [i for i, v in enumerate(ids) if not v]
    if blank:
        log.warning(
            "%s: %d of %d rows have no %s (blank, or a placeholder such as nan); each of "
            "those images counts as its own patient",
            source,
            len(blank),
            len(ids),
            group_col,
        )
    return np.array([v or f"<no {group_col}> {p}" for v, p in zip(ids, images, strict=True)])


# patient cells that say the patient is not known: the label placeholders, and Python's None
_NO_PATIENT = _MISSING | {"none"}


def _labels_for(
    rows: Sequence[dict[str, str]], specs: Sequence[LabelSpec]
) -> tuple[np.ndarray, list[str | None], list[str]]:
    labels, positive = [], []
    for spec in specs:
        y, pos = binarise([r[spec.column] for r in rows], spec)
        labels.append(y)
        positive.append(pos)
    arr = np.stack(labels, axis=1) if labels else np.zeros((len(rows), 0), np.int8)
    return arr, positive, [s.name if s.positive else s.column for s in specs]


def load_shard_dataset(
    dst: str | os.PathLike[str],
    label_cols: Sequence[str | LabelSpec] = (),
    group_col: str | None = "patient_pid",
    *,
    limit: int | None = None,
) -> Dataset:
    """Ingested shards as an evaluation set; labels come from metadata (``sex``,
    ``view_position=AP``). Images without a patient pseudonym count as their own patient.

    Images whose metadata lacks a requested label are left out and listed in
    ``Dataset.rejected`` by image id: PNG/JPEG inputs carry no DICOM metadata, and unlike a CSV
    a shard cannot be filled in, so refusing them refused every archive that mixed formats.
    """
    import pyarrow as pa

    from radjepa.shards import ShardError, read_images

    try:
        images, meta = read_images(dst, limit=limit)
    except ShardError:
        raise
    except (OSError, pa.ArrowException) as err:  # storage that does not answer: a traceback
        raise DatasetError(f"cannot read shards at {dst}: {err}") from None
    specs = [parse_label_spec(s) for s in label_cols]
    cols = meta.column_names
    absent = [c for c in [*(s.column for s in specs), group_col] if c and c not in cols]
    if absent:
        raise DatasetError(f"shards under {dst}: missing column(s) {absent}; has {cols}")
    table = meta.to_pylist()
    rows = [{k: "" if v is None else str(v).strip() for k, v in r.items()} for r in table]
    keep, rejected = [], []
    for i, r in enumerate(rows):
        lacking = [s.column for s in specs if not r[s.column]]
        if lacking:
            rejected.append(
                {
                    "image_id": r["image_id"],
                    "reason": "no_label",
                    "message": f"no {', '.join(lacking)} in the image's metadata",
                }
            )
        else:
            keep.append(i)
    if not keep:
        raise DatasetError(
            f"shards under {dst}: none of {len(rows)} images has "
            f"{', '.join(s.column for s in specs)} in its metadata"
        )
    if rejected:
        log.warning(
            "%d of %d images left out: their metadata lacks a requested label (listed in the "
            "report)",
            len(rejected),
            len(rows),
        )
        rows = [rows[i] for i in keep]
        images = images[keep]
    labels, positive, names = _labels_for(rows, specs)
    ids = [r["image_id"] for r in rows]
    groups = [(r[group_col] or i) if group_col else i for r, i in zip(rows, ids, strict=True)]
    return Dataset(images, labels, names, positive, np.array(groups), ids, rejected)


def require_finite(features: np.ndarray) -> np.ndarray:
    """``features`` [N, D] as float64, or ValueError saying how many rows hold NaN/inf.

    A diverged checkpoint embeds to NaN. Unchecked, scikit-learn fails with advice about
    imputers, and kNN retrieval silently gives a NaN query no neighbours (a kNN score of 0)
    and drops it from precision@k: numbers from a subset nobody chose.
    """
    x = np.asarray(features, dtype=np.float64)
    bad = int((~np.isfinite(x).reshape(len(x), -1).all(axis=1)).sum())
    if bad:
        raise ValueError(f"{bad} of {len(x)} feature vectors contain NaN or inf")
    return x


def resolve_device(device: str | None = None) -> Any:
    """``None``/"auto" -> CUDA when present, else CPU. A device this machine cannot use is a
    DatasetError naming it, checked before the encoder loads: ``--device gpu`` was torch's
    RuntimeError listing 20 device types, ``--device cuda`` without a GPU a driver traceback
    after the images were decoded. Other types torch parses (mps, xpu, meta) are refused too:
    the encoder is only run and tested on CPU and CUDA, and they failed only after decoding."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accepted = "use cpu, cuda, cuda:N or auto"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DatasetError(f"device {device!r}: {accepted}") from None
    if dev.type not in ("cpu", "cuda"):
        raise DatasetError(f"device {device!r}: {accepted}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise DatasetError(
                f"device {device!r}: torch sees {count} CUDA device(s) on this machine; "
                "use cpu, or leave the device out (auto)"
            )
    return dev


def extract_features(
    encoder: Any,
    images: Iterable[np.ndarray] | np.ndarray,
    *,
    batch_size: int = 32,
    device: Any = None,
    patch_tokens: bool = False,
) -> np.ndarray:
    """Frozen features: mean-pooled [N, D], or patch tokens [N, T, D] with ``patch_tokens``.

    Images follow the stored contract and go through ``prepare_images`` (the one model-input
    path) at the encoder's input size. Runs in eval mode without gradients and restores the
    encoder's previous mode.
    """
    import torch

    from radjepa.transforms import prepare_images

    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    was_training = encoder.training
    encoder.eval()
    encoder.to(dev)
    out: list[np.ndarray] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        x = prepare_images(batch, encoder.img_size).to(dev)  # [B, 1, S, S]
        y = encoder(x) if patch_tokens else encoder.embed(x)  # [B, T, D] | [B, D]
        out.append(y.float().cpu().numpy())
        batch.clear()

    try:
        with torch.no_grad():
            for img in images:
                batch.append(np.asarray(img))
                if len(batch) == batch_size:
                    flush()
            if batch:
                flush()
    finally:
        encoder.train(was_training)
    if not out:
        raise ValueError("no images to extract features from")
    return np.concatenate(out)

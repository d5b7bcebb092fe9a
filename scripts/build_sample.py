"""Build the bundled demo archive in data/sample/ from the NIH ChestX-ray14 sample.

64 real radiographs become a small, deliberately messy "hospital export": DICOM files in
MONOCHROME2 and MONOCHROME1, uncompressed, RLE, JPEG 2000 and JPEG baseline, a few left as PNG,
a patient-named folder, identifying tags filled with obviously fake values, and one truncated
file. The result is committed; this script documents and reproduces it.

    python scripts/build_sample.py --nih ../shared/data/nih-cxr14-621 --out data/sample
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

N_IMAGES = 64
FAKE = {
    "PatientName": "FAKE^PATIENT^DEMO",
    "PatientBirthDate": "19000101",
    "AccessionNumber": "FAKEACC0001",
    "InstitutionName": "FAKE GENERAL HOSPITAL",
    "ReferringPhysicianName": "FAKE^DOCTOR",
    "StudyDate": "20000101",
    "StudyTime": "120000",
}


def _pick(rows: list[dict[str, str]], n: int, seed: int = 0) -> list[dict[str, str]]:
    """Half AP, half PA where possible, so the view probe has both classes."""
    rng = random.Random(seed)
    ap = [r for r in rows if r["view"] == "AP"]
    pa = [r for r in rows if r["view"] == "PA"]
    rng.shuffle(ap)
    rng.shuffle(pa)
    chosen = ap[: n // 2] + pa[: n - min(len(ap), n // 2)]
    return sorted(chosen, key=lambda r: r["image"])


def _dataset(pixels: np.ndarray, row: dict[str, str], photometric: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientID = f"NIH-{row['patient_id']}"
    ds.PatientSex = row["sex"]
    ds.PatientAge = f"{int(row['age']):03d}Y"
    ds.ViewPosition = row["view"]
    ds.Manufacturer = "NIH ChestX-ray14 (converted)"
    for key, value in FAKE.items():
        setattr(ds, key, value)
    ds.ImageComments = "free text FAKE-NOTE patient FAKE^PATIENT^DEMO"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.143, 0.143]
    stored = 255 - pixels if photometric == "MONOCHROME1" else pixels
    ds.PixelData = np.ascontiguousarray(stored, dtype=np.uint8).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _jpeg_baseline(ds: Dataset, pixels: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=92)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"


def build(nih: Path, out: Path) -> None:
    with (nih / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    chosen = _pick(rows, N_IMAGES)
    if out.exists():
        shutil.rmtree(out)
    archive = out / "archive"
    (archive / "DOE^JANE_FAKE" / "study1").mkdir(parents=True)
    (archive / "export").mkdir()
    labels = []
    for i, row in enumerate(chosen):
        pixels = np.asarray(Image.open(nih / row["image"]).convert("L"))
        stem = Path(row["image"]).stem
        kind = i % 8
        if kind == 7:  # a few images arrive as PNG
            rel = Path("export") / f"{stem}.png"
            shutil.copy(nih / row["image"], archive / rel)
        else:
            photometric = "MONOCHROME1" if kind in (1, 4) else "MONOCHROME2"
            ds = _dataset(pixels, row, photometric)
            if kind in (2, 4):
                ds.compress(RLELossless)
            elif kind == 3:
                ds.compress(JPEG2000Lossless)
            elif kind == 5:
                _jpeg_baseline(ds, pixels)
            folder = Path("DOE^JANE_FAKE") / "study1" if i < 8 else Path("export")
            rel = folder / f"{stem}.dcm"
            ds.save_as(archive / rel, enforce_file_format=True)
        labels.append({**row, "image": f"archive/{rel.as_posix()}"})
    # one transfer that broke off half-way: ingest must quarantine it, not crash
    good = (archive / labels[0]["image"].removeprefix("archive/")).read_bytes()
    (archive / "export" / "broken_transfer.dcm").write_bytes(good[: len(good) // 3])
    with (out / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(labels[0]))
        writer.writeheader()
        writer.writerows(labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nih", type=Path, default=Path("../shared/data/nih-cxr14-621"))
    p.add_argument("--out", type=Path, default=Path("data/sample"))
    a = p.parse_args()
    readme = (a.out / "README.md").read_text() if (a.out / "README.md").exists() else None
    build(a.nih, a.out)
    if readme:
        (a.out / "README.md").write_text(readme)


if __name__ == "__main__":
    main()

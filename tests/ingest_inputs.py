"""What the ingest tests decode and with which settings: the bundled real NIH radiographs
(PNG and DICOM) and a decoder's settings of small images, so that the library's, the driver's
and DST's tests store the same rows."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "archive" / "export"
SETTINGS = {"size": 64, "dtype": "uint8", "window_percentiles": (0.5, 99.5), "max_bytes": 10**7}
SECRET = b"k" * 32  # a de-identification key of the right length

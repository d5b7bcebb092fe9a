"""A small JPEG Lossless encoder (ITU T.81 process 14, Huffman, one component) for tests.

No installed package encodes JPEG Lossless (pylibjpeg-libjpeg only decodes it), yet it is a
common archive syntax (1.2.840.10008.1.2.4.57 / .70 "SV1"). Encoding it here gives real
bitstreams, decoded by the same libjpeg the pipeline uses, from a known source array.
"""

from __future__ import annotations

import numpy as np

__all__ = ["encode_lossless"]


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def _predict(x: np.ndarray, precision: int, selection: int) -> np.ndarray:
    """T.81 H.1.2.1: the first line predicts from the left, the first column from above."""
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    a, b, c = x[1:, :-1], x[:-1, 1:], x[:-1, :-1]
    pred[1:, 1:] = {
        1: a,
        2: b,
        3: c,
        4: a + b - c,
        5: a + ((b - c) >> 1),
        6: b + ((a - c) >> 1),
        7: (a + b) >> 1,
    }[selection]
    return pred


def encode_lossless(image: np.ndarray, precision: int, selection: int = 1) -> bytes:
    """One JPEG Lossless stream of a 2-D ``image`` (its low ``precision`` bits; a signed image
    is encoded as its two's complement pattern, as DICOM requires), predictor ``selection``.

    Every difference category gets a 5-bit Huffman code equal to its number, which is a valid
    (if unoptimised) table.
    """
    rows, cols = image.shape
    x = image.astype(np.int64) & ((1 << precision) - 1)
    diff = (x - _predict(x, precision, selection)) % 65536  # T.81 H.1.2.1: modulo 2^16
    diff = np.where(diff > 32768, diff - 65536, diff).ravel()
    out = bytearray()
    acc = nbits = 0

    def put(code: int, n: int) -> None:
        nonlocal acc, nbits
        acc, nbits = (acc << n) | code, nbits + n
        while nbits >= 8:
            nbits -= 8
            byte = (acc >> nbits) & 0xFF
            out.append(byte)
            if byte == 0xFF:
                out.append(0)  # byte stuffing
        acc &= (1 << nbits) - 1

    for d in diff.tolist():
        ssss = abs(d).bit_length()
        put(ssss, 5)
        if 0 < ssss < 16:  # category 16 (difference 32768) has no extra bits
            put(d if d > 0 else d + (1 << ssss) - 1, ssss)
    if nbits:
        put((1 << (8 - nbits)) - 1, 8 - nbits)  # pad with 1-bits
    sof = bytes([precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big")
    sof += bytes([1, 1, 0x11, 0])
    counts = [0] * 16
    counts[4] = 17  # 17 categories, all 5-bit codes
    dht = bytes([0x00, *counts, *range(17)])
    sos = bytes([1, 1, 0x00, selection, 0, 0])
    return (
        b"\xff\xd8"
        + _segment(0xC3, sof)
        + _segment(0xC4, dht)
        + _segment(0xDA, sos)
        + bytes(out)
        + b"\xff\xd9"
    )

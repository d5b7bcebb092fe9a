"""Decode DICOM/PNG/JPEG bytes into the stored image contract plus de-identified metadata.

Public entry point: :func:`radjepa.imaging.decode.decode_image` (value contract in
:mod:`radjepa.imaging.contract`).
"""

"""Model-input values and the image transforms that produce them.

The value contract (kept in step with docs/ARCHITECTURE.md):

- stored image: single channel, ``uint8`` (0..255) or ``uint16`` (0..65535), MONOCHROME2
  polarity (0 = black), see ``radjepa.imaging.contract``;
- model input: ``float32`` tensor ``[B, 1, S, S]`` with ``x = (v / vmax - 0.5) / 0.25`` where
  ``vmax`` is 255 or 65535 from the stored dtype. So black is -2, mid-grey 0, white +2, the same
  for 8- and 16-bit sources. :func:`to_model_input` is the only implementation of this mapping.

Training applies :func:`random_resized_crop` to model-input tensors on the training device (one
crop box per image, one ``grid_sample`` for the whole batch); evaluation and serving use
:func:`resize_for_encoder` on the whole stored image (no crop), via :func:`prepare_images`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MEAN",
    "STD",
    "to_model_input",
    "random_resized_crop",
    "resize_for_encoder",
    "prepare_images",
]

MEAN = 0.5  # in units of vmax
STD = 0.25
_VMAX = {torch.uint8: 255.0, torch.uint16: 65535.0}


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """Stored pixels ``uint8/uint16 [B, H, W]`` or ``[B, 1, H, W]`` -> float32 ``[B, 1, H, W]``."""
    if not isinstance(pixels, torch.Tensor):
        raise TypeError(f"to_model_input takes a torch.Tensor, got {type(pixels).__name__}")
    vmax = _VMAX.get(pixels.dtype)
    if vmax is None:
        raise ValueError(
            f"stored pixels must be uint8 or uint16 (the value contract), got {pixels.dtype}"
        )
    if pixels.ndim == 3:
        pixels = pixels.unsqueeze(1)
    if pixels.ndim != 4 or pixels.shape[1] != 1:
        raise ValueError(f"expected [B, H, W] or [B, 1, H, W] pixels, got {tuple(pixels.shape)}")
    # uint16 has few kernels in torch: go through int32, which holds 0..65535 exactly
    x = pixels.to(torch.int32) if pixels.dtype == torch.uint16 else pixels
    # one float buffer, normalised in place: (x / vmax - MEAN) / STD as a single affine map
    # (on CPU workers three full-size temporaries per batch cost more than the arithmetic)
    return x.to(torch.float32).mul_(1.0 / (vmax * STD)).sub_(MEAN / STD)


def _check_float_images(x: torch.Tensor, name: str) -> None:
    if x.ndim != 4 or not torch.is_floating_point(x):
        raise ValueError(
            f"{name} takes float model input [B, C, H, W], got {x.dtype} {tuple(x.shape)}"
        )


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.3, 1.0),
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Batched RandomResizedCrop: one random box per image, all resampled in one ``grid_sample``.

    Area fraction ~ U(scale), log aspect (w/h) ~ U(log ratio), box position uniform over the
    image. A box that would not fit is shrunk to fit (torchvision instead retries 10 times and
    falls back to a centre crop; shrinking keeps the batch vectorised with the same spirit).
    When even the smallest possible box is much larger than ``size``, the batch is first
    downscaled with antialiasing so that bilinear sampling does not alias.
    ``generator`` must live on ``x``'s device (random numbers are drawn there).
    """
    _check_float_images(x, "random_resized_crop")
    if not (0.0 < scale[0] <= scale[1] <= 1.0) or not (0.0 < ratio[0] <= ratio[1]):
        raise ValueError(f"bad crop scale {scale} or ratio {ratio}")
    b, _, h, w = x.shape
    min_side = math.sqrt(scale[0] * h * w) * min(math.sqrt(ratio[0]), 1 / math.sqrt(ratio[1]))
    factor = min_side / size
    if factor > 1.5:  # pre-shrink: smallest crops then map about 1:1, larger ones alias less
        x = F.interpolate(
            x,
            size=(max(size, round(h / factor)), max(size, round(w / factor))),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
    dev = x.device
    u = torch.rand(b, 4, device=dev, generator=generator, dtype=torch.float32)  # [B, 4]
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]  # fraction of the image area
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(log_r)
    # box size as fractions of width/height; area fraction = fw * fh, aspect (pixels) = r
    fw = torch.sqrt(area * r * h / w)
    fh = torch.sqrt(area / r * w / h)
    fw, fh = fw.clamp(max=1.0), fh.clamp(max=1.0)
    # centre in normalised coords [-1, 1]: box must stay inside the image
    cx = (2 * u[:, 2] - 1) * (1 - fw)
    cy = (2 * u[:, 3] - 1) * (1 - fh)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = fw, cx
    theta[:, 1, 1], theta[:, 1, 2] = fh, cy
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_for_encoder(x: torch.Tensor, size: int) -> torch.Tensor:
    """The whole image resized to ``size x size`` (antialiased bilinear): eval and serving."""
    _check_float_images(x, "resize_for_encoder")
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def prepare_images(arrays: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Stored 2-D ``uint8``/``uint16`` arrays (sizes may differ) -> model input ``[B, 1, S, S]``."""
    if len(arrays) == 0:
        raise ValueError("prepare_images needs at least one image")
    out = []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if a.ndim != 2:
            raise ValueError(f"image {i}: expected a 2-D stored image, got shape {a.shape}")
        if a.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"image {i}: stored images are uint8 or uint16, got {a.dtype}")
        if not a.flags.writeable:  # a view of a shard's Arrow buffer, say: torch warns on
            a = a.copy()  # memory it may not write; one uint8 copy is small next to the float one
        t = torch.from_numpy(np.ascontiguousarray(a))[None]  # [1, H, W]
        out.append(resize_for_encoder(to_model_input(t), size))  # [1, 1, S, S]
    return torch.cat(out, dim=0)

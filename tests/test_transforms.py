"""The model-input value contract and the batched crop/resize transforms."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from radjepa.transforms import (
    prepare_images,
    random_resized_crop,
    resize_for_encoder,
    to_model_input,
)


def test_uint8_contract_values_and_shape():
    px = torch.tensor([[[0, 128, 255]]], dtype=torch.uint8)  # [1, 1, 3]
    x = to_model_input(px)
    assert x.shape == (1, 1, 1, 3) and x.dtype == torch.float32
    expected = torch.tensor([-2.0, (128 / 255 - 0.5) / 0.25, 2.0])
    assert torch.allclose(x.flatten(), expected, atol=1e-6)


def test_uint16_maps_onto_the_same_scale_as_uint8():
    v8 = torch.randint(0, 256, (2, 1, 5, 7), dtype=torch.uint8)
    v16 = (v8.to(torch.int32) * 257).to(torch.uint16)  # 255 * 257 = 65535
    assert torch.allclose(to_model_input(v8), to_model_input(v16), atol=1e-6)
    assert to_model_input(v16).shape == (2, 1, 5, 7)


@pytest.mark.parametrize("bad", [torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.int16)])
def test_non_contract_dtypes_are_rejected(bad):
    with pytest.raises(ValueError, match="uint8 or uint16"):
        to_model_input(bad)


def test_full_scale_square_crop_of_same_size_is_identity():
    x = torch.randn(3, 1, 32, 32)
    y = random_resized_crop(x, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(x, y, atol=1e-5)


def test_crop_is_seeded_per_image_and_stays_inside_the_image():
    # a horizontal ramp: a crop of a quarter of the area spans about half of the ramp
    ramp = torch.linspace(-1, 1, 128).expand(128, 128)
    x = ramp.expand(8, 1, 128, 128).contiguous()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = random_resized_crop(x, 64, (0.25, 0.25), (1.0, 1.0), generator=g1)
    b = random_resized_crop(x, 64, (0.25, 0.25), (1.0, 1.0), generator=g2)
    assert a.shape == (8, 1, 64, 64)
    assert torch.equal(a, b)
    spans = a.amax(dim=(1, 2, 3)) - a.amin(dim=(1, 2, 3))
    assert torch.allclose(spans, torch.full_like(spans, 1.0), atol=0.05)  # half of [-1, 1]
    assert a.min() >= -1.0 - 1e-6 and a.max() <= 1.0 + 1e-6
    starts = a[:, 0, 0, 0]
    assert len(torch.unique(starts.round(decimals=3))) > 4  # a different box per image


def test_resize_for_encoder_antialiases():
    checker = (torch.arange(256)[:, None] + torch.arange(256)[None, :]) % 2
    x = (checker.float() * 4 - 2).expand(1, 1, 256, 256)  # +-2, the full contract range
    y = resize_for_encoder(x, 64)
    assert y.shape == (1, 1, 64, 64)
    assert y.abs().max() < 0.1  # averaged to mid-grey, not aliased to +-2


def test_prepare_images_mixed_sizes_and_dtypes():
    a = np.full((300, 200), 255, dtype=np.uint8)
    b = np.zeros((50, 50), dtype=np.uint16)
    x = prepare_images([a, b], 96)
    assert x.shape == (2, 1, 96, 96) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full((1, 96, 96), 2.0))
    assert torch.allclose(x[1], torch.full((1, 96, 96), -2.0))


def test_prepare_images_takes_read_only_arrays_quietly():
    """Arrays that come out of Ray's object store or an Arrow buffer are read-only; torch warns
    on wrapping them, and the result must not depend on it."""
    a = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    ro = a.copy()
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = prepare_images([ro], 32)
    assert torch.equal(x, prepare_images([a], 32))
    assert not ro.flags.writeable


@pytest.mark.parametrize(
    "arrays, match",
    [
        ([], "at least one"),
        ([np.zeros((4, 4, 3), np.uint8)], "2-D"),
        ([np.zeros((4, 4), np.float32)], "uint8 or uint16"),
    ],
)
def test_prepare_images_rejects_bad_input(arrays, match):
    with pytest.raises(ValueError, match=match):
        prepare_images(arrays, 32)

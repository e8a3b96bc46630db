"""The pixel codec: raster order with R, G, B interleaved per pixel, its inverse, and the planar layout of
the Chrabaszcz et al. files."""

import numpy as np
import pytest
import torch

from hier_lm.data.pixels import IMAGE_VOCAB, decode_images, encode_images, planar_to_hwc


def test_raster_order_of_a_hand_built_image():
    # A 2x2 image: pixel (y, x) has R = 10y + x, G = 100 + 10y + x, B = 200 + 10y + x.
    image = np.array([[[0, 100, 200], [1, 101, 201]],
                      [[10, 110, 210], [11, 111, 211]]], dtype=np.uint8)
    tokens = encode_images(image[None])
    assert tokens.dtype == torch.long and tokens.shape == (1, 12)
    assert tokens[0].tolist() == [0, 100, 200, 1, 101, 201, 10, 110, 210, 11, 111, 211]
    assert IMAGE_VOCAB == 256


def test_round_trip_and_shapes():
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    tokens = encode_images(torch.from_numpy(images))  # a tensor works as well as an array
    assert tokens.shape == (5, 192) and torch.equal(tokens, encode_images(images))
    assert tokens.min() >= 0 and tokens.max() < IMAGE_VOCAB
    decoded = decode_images(tokens, 8)
    assert decoded.dtype == torch.uint8 and np.array_equal(decoded.numpy(), images)
    one = decode_images(tokens[2], 8)  # one image [192] -> [1, 8, 8, 3]
    assert one.shape == (1, 8, 8, 3) and np.array_equal(one[0].numpy(), images[2])
    assert np.array_equal(decode_images(tokens.numpy(), 8).numpy(), images)


def test_bad_shapes_and_values():
    with pytest.raises(ValueError, match=r"a 8x8 RGB image is 3 \* 8 \* 8 = 192 pixel tokens, got shape \[2, 191\]"):
        decode_images(torch.zeros(2, 191, dtype=torch.long), 8)
    with pytest.raises(ValueError, match=r"values 0\.\.255, got the range \[0, 256\]"):
        decode_images(torch.tensor([[0, 256, 1]]), 1)
    with pytest.raises(ValueError, match=r"must be \[N, H, W, 3\]"):
        encode_images(np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"integer values 0\.\.255"):
        encode_images(np.zeros((1, 2, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"planar 2x2 RGB rows must be \[N, 12\]"):
        planar_to_hwc(np.zeros((1, 13), dtype=np.uint8), 2)


def test_planar_to_hwc_of_a_known_array():
    # Chrabaszcz layout of one 2x2 image: R plane (raster order), then G plane, then B plane.
    row = np.array([[0, 1, 10, 11, 100, 101, 110, 111, 200, 201, 210, 211]], dtype=np.uint8)
    hwc = planar_to_hwc(row, 2)
    assert hwc.shape == (1, 2, 2, 3) and hwc.dtype == np.uint8 and hwc.flags.c_contiguous
    assert hwc[0].tolist() == [[[0, 100, 200], [1, 101, 201]], [[10, 110, 210], [11, 111, 211]]]
    assert encode_images(hwc)[0].tolist() == [0, 100, 200, 1, 101, 201, 10, 110, 210, 11, 111, 211]

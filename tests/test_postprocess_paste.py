"""paste_masks_in_image against a slow, straightforward per-pixel reference."""
import math

import numpy as np
import pytest

from mxmask.postprocess import paste_masks_in_image


def paste_reference(mask, box, height, width):
    """Per-pixel aligned bilinear sampling with zeros outside the mask grid (soft values)."""
    mh, mw = mask.shape
    x1, y1, x2, y2 = box
    out = np.zeros((height, width))
    for y in range(height):
        gy = (y + 0.5 - y1) / (y2 - y1) * mh - 0.5
        i0 = math.floor(gy)
        fy = gy - i0
        for x in range(width):
            gx = (x + 0.5 - x1) / (x2 - x1) * mw - 0.5
            j0 = math.floor(gx)
            fx = gx - j0
            v = 0.0
            for i, wy in ((i0, 1 - fy), (i0 + 1, fy)):
                for j, wx in ((j0, 1 - fx), (j0 + 1, fx)):
                    if 0 <= i < mh and 0 <= j < mw:
                        v += wy * wx * mask[i, j]
            out[y, x] = v
    return out


def random_boxes(rng, height, width):
    boxes = [
        [3.3, 4.7, 20.1, 17.9],            # fractional, inside
        [-10.5, -6.2, 15.4, 12.8],         # partly outside top-left
        [30.2, 20.6, 80.0, 55.5],          # partly outside bottom-right
        [-20.0, -20.0, 90.0, 70.0],        # larger than the image: cells wider than a pixel
        [10.2, 11.1, 10.9, 11.5],          # tiny, inside one pixel
        [25.0, 5.0, 27.0, 30.0],           # thin
        [7.0, 9.0, 35.0, 33.0],            # integer
    ]
    for _ in range(8):
        x1, y1 = rng.uniform(-15, width - 5), rng.uniform(-15, height - 5)
        w, h = rng.uniform(0.5, 60), rng.uniform(0.5, 60)
        boxes.append([x1, y1, x1 + w, y1 + h])
    return np.array(boxes)


@pytest.mark.parametrize("m", [28, 7])
def test_paste_matches_reference(m):
    rng = np.random.default_rng(m)
    height, width = 37, 53
    boxes = random_boxes(rng, height, width)
    masks = rng.uniform(0, 1, (len(boxes), m, m)).astype(np.float32)
    masks[0] = 1.0                      # saturated masks hit exactly the box interior
    hard = paste_masks_in_image(masks, boxes, height, width, threshold=0.5)
    soft = paste_masks_in_image(masks, boxes, height, width, threshold=None)
    assert hard.shape == (len(boxes), height, width) and hard.dtype == np.bool_
    assert soft.dtype == np.float32
    for i in range(len(boxes)):
        ref = paste_reference(masks[i].astype(np.float64), boxes[i], height, width)
        np.testing.assert_allclose(soft[i], ref, atol=1e-6)
        decided = np.abs(ref - 0.5) > 1e-6
        np.testing.assert_array_equal(hard[i][decided], (ref >= 0.5)[decided])
    assert hard.any(axis=(1, 2))[:4].all()


def test_saturated_mask_covers_pixel_centres_inside_box():
    masks = np.ones((1, 28, 28), np.float32)
    box = np.array([[2.2, 3.6, 9.4, 7.0]])
    got = paste_masks_in_image(masks, box, 12, 14)[0]
    expected = np.zeros((12, 14), bool)
    expected[4:7, 2:9] = True           # centres y in 4.5..6.5, x in 2.5..8.5
    np.testing.assert_array_equal(got, expected)


def test_degenerate_and_empty_inputs():
    masks = np.ones((3, 28, 28), np.float32)
    boxes = np.array([[5, 5, 5, 9], [8, 8, 4, 12], [np.nan, 0, 4, 4]], np.float64)
    out = paste_masks_in_image(masks, boxes, 16, 16)
    assert out.shape == (3, 16, 16) and not out.any()
    empty = paste_masks_in_image(np.zeros((0, 28, 28), np.float32), np.zeros((0, 4)), 16, 20)
    assert empty.shape == (0, 16, 20)
    far = paste_masks_in_image(np.ones((1, 28, 28)), np.array([[30, 30, 40, 40.0]]), 16, 16)
    assert not far.any()
    with pytest.raises(ValueError):
        paste_masks_in_image(masks, boxes[:2], 16, 16)


def test_layout_is_fortran_for_rle_encoding():
    rng = np.random.default_rng(3)
    masks = rng.uniform(0, 1, (4, 28, 28))
    boxes = random_boxes(rng, 20, 30)[:4]
    out = paste_masks_in_image(masks, boxes, 20, 30)
    assert out.transpose(1, 2, 0).flags.f_contiguous
    assert out.view(np.uint8).transpose(1, 2, 0).flags.f_contiguous

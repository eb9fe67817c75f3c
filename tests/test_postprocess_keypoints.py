"""Keypoint decoders: Gaussian peaks at known sub-pixel positions, and the coordinate convention.

Heatmap convention: cell ``i`` of an ``S x S`` map covers ``[i, i + 1)`` in heatmap units, so a
peak at heatmap position ``c`` (continuous) lands at ``x1 + c / S * w`` in the image.
"""
import cv2
import numpy as np
import pytest

from mxmask.postprocess import (decode_keypoints, heatmaps_to_keypoints_bicubic,
                                heatmaps_to_keypoints_taylor)

S = 56


def gaussian_maps(centres, sigma=2.0, log=False):
    """centres (N, K, 2) continuous heatmap positions -> (N, K, S, S) maps."""
    grid = np.arange(S) + 0.5
    dx = grid[None, None, None, :] - centres[:, :, 0, None, None]
    dy = grid[None, None, :, None] - centres[:, :, 1, None, None]
    q = -(dx ** 2 + dy ** 2) / (2 * sigma ** 2)
    return (q if log else np.exp(q)).astype(np.float32)


def random_case(seed, n=6, k=5):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(6, S - 6, (n, k, 2))
    x1 = rng.uniform(-20, 200, n)
    y1 = rng.uniform(-20, 200, n)
    w = rng.uniform(15, 180, n)
    h = rng.uniform(15, 180, n)
    boxes = np.stack([x1, y1, x1 + w, y1 + h], axis=1)
    truth = np.stack([x1[:, None] + centres[:, :, 0] / S * w[:, None],
                      y1[:, None] + centres[:, :, 1] / S * h[:, None]], axis=2)
    return centres, boxes, truth


def to_heatmap_space(kpts, boxes):
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return np.stack([(kpts[:, :, 0] - boxes[:, None, 0]) / w[:, None] * S,
                     (kpts[:, :, 1] - boxes[:, None, 1]) / h[:, None] * S], axis=2)


@pytest.mark.parametrize("log", [False, True])
def test_gaussian_peaks_recovered(log):
    centres, boxes, truth = random_case(1 + int(log))
    maps = gaussian_maps(centres, log=log)
    taylor = heatmaps_to_keypoints_taylor(maps, boxes)
    bicubic = heatmaps_to_keypoints_bicubic(maps, boxes)
    assert taylor.shape == bicubic.shape == (6, 5, 3)
    assert taylor.dtype == bicubic.dtype == np.float32
    err_hm = np.abs(to_heatmap_space(taylor, boxes) - centres).max()
    assert err_hm < 0.1, err_hm
    assert np.abs(taylor[:, :, :2] - truth).max() < 1.0
    assert np.abs(bicubic[:, :, :2] - truth).max() < 1.0
    # score: the logit at the argmax cell (taylor) / at the resized peak (bicubic)
    flat = maps.reshape(6, 5, -1)
    np.testing.assert_allclose(taylor[:, :, 2], flat.max(axis=2), rtol=1e-6)
    for i in range(len(boxes)):
        size = (int(np.ceil(boxes[i, 2] - boxes[i, 0])), int(np.ceil(boxes[i, 3] - boxes[i, 1])))
        for j in range(maps.shape[1]):
            resized = cv2.resize(maps[i, j], size, interpolation=cv2.INTER_CUBIC)
            assert bicubic[i, j, 2] == resized.max()


def test_taylor_beats_integer_argmax():
    centres, boxes, _ = random_case(7, n=10, k=4)
    centres[..., 0] = np.floor(centres[..., 0]) + 0.9    # far from the cell centre
    maps = gaussian_maps(centres)
    decoded = to_heatmap_space(heatmaps_to_keypoints_taylor(maps, boxes), boxes)
    integer = np.floor(centres[..., 0]) + 0.5
    assert np.abs(decoded[..., 0] - centres[..., 0]).max() < 0.1
    assert np.abs(integer - centres[..., 0]).min() > 0.35


def test_coordinate_convention_hand_made():
    s = 8
    maps = np.zeros((3, 1, s, s), np.float32)
    maps[:, 0, 5, 3] = 4.0                       # symmetric peak at cell (x=3, y=5)
    maps[:, 0, 5, 2] = maps[:, 0, 5, 4] = 2.0
    maps[:, 0, 4, 3] = maps[:, 0, 6, 3] = 2.0
    boxes = np.array([[10, 20, 18, 28],          # w = h = S: identity resize
                      [10, 20, 17.5, 27.5],      # fractional: ceil(7.5) = 8, still identity
                      [-4, 2, 12, 18]], np.float64)  # w = 2 S
    t = heatmaps_to_keypoints_taylor(maps, boxes)
    np.testing.assert_allclose(t[:, 0, 0], [13.5, 10 + 3.5 * 7.5 / 8, -4 + 3.5 * 2], atol=1e-5)
    np.testing.assert_allclose(t[:, 0, 1], [25.5, 20 + 5.5 * 7.5 / 8, 2 + 5.5 * 2], atol=1e-5)
    np.testing.assert_allclose(t[:, 0, 2], 4.0)
    b = heatmaps_to_keypoints_bicubic(maps[:2], boxes[:2])
    np.testing.assert_allclose(b[:, 0, 0], [13.5, 10 + 3.5 * 7.5 / 8], atol=1e-5)
    np.testing.assert_allclose(b[:, 0, 1], [25.5, 20 + 5.5 * 7.5 / 8], atol=1e-5)
    np.testing.assert_allclose(b[:, 0, 2], 4.0, rtol=1e-5)


def test_taylor_offset_direction_border_and_indefinite():
    s = 16
    box = np.array([[0.0, 0.0, 16.0, 16.0]])
    grid = np.arange(s)
    # an exact quadratic logit peaking at index (6.3, 9.8): Taylor is exact there
    q = -((grid[None, :] - 6.3) ** 2 + 0.5 * (grid[:, None] - 9.8) ** 2)
    t = heatmaps_to_keypoints_taylor(q[None, None].astype(np.float32), box)
    np.testing.assert_allclose(t[0, 0, :2], [6.8, 10.3], atol=1e-4)
    # peak on the border: no offset
    border = np.zeros((1, 1, s, s), np.float32)
    border[0, 0, 0, 5] = 1.0
    border[0, 0, 0, 6] = 0.8
    t = heatmaps_to_keypoints_taylor(border, box)
    np.testing.assert_allclose(t[0, 0, :2], [5.5, 0.5])
    # Hessian not negative definite (strong diagonal ridge): no offset
    ridge = np.zeros((1, 1, s, s), np.float32)
    ridge[0, 0, 3, 3] = 1.0
    ridge[0, 0, 3, 2] = ridge[0, 0, 3, 4] = 0.95
    ridge[0, 0, 2, 2] = ridge[0, 0, 4, 4] = 0.99
    ridge[0, 0, 4, 3] = 0.3
    t = heatmaps_to_keypoints_taylor(ridge, box)
    np.testing.assert_allclose(t[0, 0, :2], [3.5, 3.5])
    # huge offsets are clamped to one cell
    steep = np.zeros((1, 1, s, s), np.float32)
    steep[0, 0, 8, 8] = 1.0
    steep[0, 0, 8, 9] = 0.999
    steep[0, 0, 8, 7] = -50.0
    steep[0, 0, 7, 8] = steep[0, 0, 9, 8] = -1.0
    t = heatmaps_to_keypoints_taylor(steep, box)
    assert 8.5 < t[0, 0, 0] <= 9.5 and abs(t[0, 0, 1] - 8.5) < 1e-6


def test_dispatch_and_empty():
    assert decode_keypoints(np.zeros((0, 3, S, S)), np.zeros((0, 4)), "bicubic").shape == (0, 3, 3)
    assert decode_keypoints(np.zeros((0, 3, S, S)), np.zeros((0, 4)), "taylor").shape == (0, 3, 3)
    with pytest.raises(ValueError):
        decode_keypoints(np.zeros((1, 3, S, S)), np.zeros((1, 4)), "argmax")


def test_torchvision_decodes_at_the_network_box_size():
    """torchvision's heatmaps_to_keypoints runs on the boxes in network-input pixels, and the
    keypoints are scaled to the image afterwards: the bicubic decode of the network boxes divided
    by the per-axis factors, not the bicubic decode of the image boxes."""
    rng = np.random.RandomState(5)
    heatmaps = rng.randn(3, 2, 8, 8).astype(np.float32)
    net_boxes = np.array([[10, 20, 41.5, 60.2], [0, 0, 7.3, 9.9], [5, 5, 5.4, 30]], np.float32)
    sx, sy = 1.6, 1.5
    image_boxes = net_boxes / np.array([sx, sy, sx, sy], np.float32)
    got = decode_keypoints(heatmaps, image_boxes, "torchvision", network_boxes=net_boxes,
                           scale=(sx, sy))
    want = heatmaps_to_keypoints_bicubic(heatmaps, net_boxes)
    np.testing.assert_allclose(got[..., 0], want[..., 0] / np.float32(sx), rtol=1e-6)
    np.testing.assert_allclose(got[..., 1], want[..., 1] / np.float32(sy), rtol=1e-6)
    np.testing.assert_array_equal(got[..., 2], want[..., 2])
    other = decode_keypoints(heatmaps, image_boxes, "bicubic")
    assert np.abs(other[..., :2] - got[..., :2]).max() > 0.1
    with pytest.raises(ValueError, match="network-input boxes"):
        decode_keypoints(heatmaps, image_boxes, "torchvision")

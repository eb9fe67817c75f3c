"""Pictures: drawn detections, RGBA cut-outs and training curves, read back with cv2."""
import os

import cv2
import matplotlib
import numpy as np
import pycocotools.mask as mask_util

from mxmask.vis import draw_instances, plot_training_curves, write_cutouts

matplotlib.use("Agg")
H, W = 120, 160


def make_image():
    yy, xx = np.mgrid[0:H, 0:W]
    return np.stack([xx * 255 // W, yy * 255 // H, (xx + yy) % 256], axis=2).astype(np.uint8)


def rle_of(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def make_results():
    m1 = np.zeros((H, W), bool)
    m1[20:60, 15:55] = True
    m2 = np.zeros((H, W), bool)
    yy, xx = np.mgrid[0:H, 0:W]
    m2[(yy - 80) ** 2 + (xx - 110) ** 2 < 20 ** 2] = True
    m2[:, 150:] = False                                   # clipped by the box edge below
    return [
        {"image_id": 1, "category_id": 1, "bbox": [14.6, 19.2, 40.9, 41.3], "score": 0.9,
         "segmentation": rle_of(m1)},
        {"image_id": 1, "category_id": 2, "bbox": [90.0, 60.0, 80.0, 41.0], "score": 0.7,
         "segmentation": rle_of(m2),
         "keypoints": [100, 70, 2, 120, 70, 2, 110, 95, 2, 0, 0, 0]},
        {"image_id": 1, "category_id": 1, "bbox": [5.0, 95.0, 20.0, 20.0], "score": 0.2,
         "segmentation": rle_of(np.zeros((H, W), bool))},   # below the threshold
        {"image_id": 1, "category_id": 2, "bbox": [-10.5, -4.0, 30.0, 14.2], "score": 0.8},
    ], [m1, m2]


def test_draw_instances_png(tmp_path):
    image = make_image()
    results, (m1, m2) = make_results()
    path = str(tmp_path / "vis" / "a.png")
    returned = draw_instances(image, results, {1: "square", 2: "disc"}, [[0, 1], [1, 2], [2, 3]],
                              path, score_thresh=0.5)
    png = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert png.shape == (H, W, 3)
    drawn = cv2.cvtColor(png, cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(drawn, returned)
    assert drawn.astype(float).var() > 0
    # inside the drawn boxes the picture changed (mask tint, outline, label, keypoints)
    for (x, y, w, h) in ([15, 20, 40, 40], [90, 60, 60, 40]):
        region = (slice(y, y + h), slice(x, x + w))
        changed = np.any(drawn[region] != image[region], axis=2).mean()
        assert changed > 0.3, changed
    # mask interior: a blend of the image and the instance colour, not the image
    inner = (slice(30, 50), slice(25, 45))
    assert np.abs(drawn[inner].astype(int) - image[inner]).mean() > 10
    # the skipped low-score instance and the empty top-right corner are untouched, pixel exact
    np.testing.assert_array_equal(drawn[100:112, 8:22], image[100:112, 8:22])
    np.testing.assert_array_equal(drawn[5:40, 100:150], image[5:40, 100:150])
    # keypoints are drawn where they are (not on the mask blend of their neighbourhood)
    assert np.abs(drawn[95, 110].astype(int) - drawn[88, 100].astype(int)).sum() > 30


def test_write_cutouts_rgba(tmp_path):
    image = make_image()
    results, (m1, m2) = make_results()
    paths = write_cutouts(image, results, str(tmp_path / "cut"), "img1", score_thresh=0.5)
    assert [os.path.basename(p) for p in paths] == ["img1_000_c1.png", "img1_001_c2.png",
                                                    "img1_003_c2.png"]
    crops = [(slice(19, 61), slice(14, 56)), (slice(60, 101), slice(90, 160)),
             (slice(0, 11), slice(0, 20))]
    masks = [m1, m2, np.ones((H, W), bool)]
    for path, crop, mask in zip(paths, crops, masks):
        png = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        assert png.ndim == 3 and png.shape[2] == 4
        assert png.shape[:2] == image[crop].shape[:2]
        rgba = cv2.cvtColor(png, cv2.COLOR_BGRA2RGBA)
        np.testing.assert_array_equal(rgba[:, :, 3], mask[crop].astype(np.uint8) * 255)
        np.testing.assert_array_equal(rgba[:, :, :3], image[crop])
        assert rgba.astype(float).var() > 0
    assert write_cutouts(image, results, str(tmp_path / "none"), "x", score_thresh=0.95) == []


def test_training_curves_png(tmp_path):
    iters = list(range(0, 200, 10))
    rng = np.random.default_rng(0)
    history = {
        "iter": iters,
        "losses": {"loss_cls": list(np.exp(-np.arange(20) / 8) + rng.uniform(0, .05, 20)),
                   "loss_mask": [0.7] * 19 + [0.0]},           # a zero cannot go on a log axis
        "lr": [0.02 * min(1, (i + 10) / 50) for i in iters],
        "eval": [{"iter": 100, "bbox": 0.2, "segm": 0.15, "keypoints": 0.1},
                 {"iter": 190, "bbox": 0.35, "segm": 0.3, "keypoints": 0.22}],
    }
    path = str(tmp_path / "curves.png")
    plot_training_curves(history, path)
    png = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert png.shape[:2] == (900, 700) and png.astype(float).var() > 0
    plot_training_curves({"iter": [0], "losses": {}, "lr": [0.01], "eval": []},
                         str(tmp_path / "early.png"))
    early = cv2.imread(str(tmp_path / "early.png"), cv2.IMREAD_UNCHANGED)
    assert early.shape[:2] == (900, 700)
    assert not np.array_equal(early[:, :, :3], png[:, :, :3])

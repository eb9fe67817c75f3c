"""Transforms and batching: hand-computed resize / flip of boxes, masks and keypoints, mask
decoding, normalisation, the record -> sample transforms and the batch padding."""
import numpy as np
import pycocotools.mask as mask_util
import pytest

from mxmask.config import CHOICES, ConfigError, get_config
from mxmask.data.transforms import (NORMALIZE_MODES, RESIZE_INTERPS, RESIZE_RULES, TestTransform,
                                    TrainTransform, batchify_test, batchify_train, decode_masks,
                                    hflip, mask_boxes, normalize, padded_size, paste_instances,
                                    resize_bilinear_float, resize_image, resize_shortest_edge,
                                    resized_size)
from mxmask.utils import UserError


# --------------------------------------------------------------------------------------------
# Mask decoding
# --------------------------------------------------------------------------------------------
def test_decode_masks_from_polygons_compressed_and_uncompressed_rle():
    expected = np.zeros((5, 6), np.uint8)
    expected[1:3, 2:5] = 1
    polygon = [[2, 1, 5, 1, 5, 3, 2, 3]]                       # the box x 2..5, y 1..3
    compressed = mask_util.encode(np.asfortranarray(expected))
    uncompressed = {"size": [5, 6], "counts": [11, 2, 3, 2, 3, 2, 7]}  # column-major runs
    two_parts = [[0, 0, 1, 0, 1, 1, 0, 1], [5, 4, 6, 4, 6, 5, 5, 5]]
    masks = decode_masks([polygon, compressed, uncompressed, two_parts, []], 5, 6)
    assert masks.shape == (5, 5, 6) and masks.dtype == np.uint8
    for i in range(3):
        np.testing.assert_array_equal(masks[i], expected)
    corners = np.zeros((5, 6), np.uint8)
    corners[0, 0] = corners[4, 5] = 1
    np.testing.assert_array_equal(masks[3], corners)
    assert masks[4].sum() == 0
    assert decode_masks([], 5, 6).shape == (0, 5, 6)


# --------------------------------------------------------------------------------------------
# Resize
# --------------------------------------------------------------------------------------------
def test_resized_size_rounds_half_up_and_caps_the_long_side():
    assert resized_size(480, 640, 800, 1333) == (800, 1067, 800 / 480)
    assert resized_size(100, 400, 200, 500) == (125, 500, 1.25)     # capped by max_size
    assert resized_size(4, 10, 5, 100)[:2] == (5, 13)                # 12.5 -> 13, not 12
    assert resized_size(10, 4, 5, 100)[:2] == (13, 5)


def test_resize_scales_boxes_keypoints_and_masks_by_two():
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    masks = np.zeros((1, 4, 6), np.uint8)
    masks[0, 1:3, 2:4] = 1
    boxes = np.array([[2, 1, 4, 3]], np.float32)
    kps = np.array([[[1.5, 0.5, 2], [3, 3, 0], [2, 1, 1]]], np.float32)
    out = resize_shortest_edge(image, 8, 100, boxes=boxes, masks=masks, keypoints=kps,
                               crowd_boxes=np.array([[0, 0, 1, 1]], np.float32))
    assert out["image"].shape == (8, 12, 3) and out["scale"] == 2.0
    np.testing.assert_array_equal(out["boxes"], [[4, 2, 8, 6]])
    np.testing.assert_array_equal(out["crowd_boxes"], [[0, 0, 2, 2]])
    np.testing.assert_array_equal(out["keypoints"], [[[3, 1, 2], [0, 0, 0], [4, 2, 1]]])
    expected = np.zeros((8, 12), np.uint8)
    expected[2:6, 4:8] = 1                                      # exactly the scaled box
    np.testing.assert_array_equal(out["masks"][0], expected)


def test_resize_downscale_masks_follow_pixel_centres():
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[0, 2:6, 2:6] = 1
    masks[1, 2:4, 4:8] = 1
    out = resize_shortest_edge(np.zeros((8, 8, 3), np.uint8), 4, 100, masks=masks)
    first = np.zeros((4, 4), np.uint8)
    first[1:3, 1:3] = 1
    second = np.zeros((4, 4), np.uint8)
    second[1, 2:4] = 1
    np.testing.assert_array_equal(out["masks"][0], first)
    np.testing.assert_array_equal(out["masks"][1], second)


def test_resize_uses_actual_per_axis_factors():
    # 3x5 to short side 5: scale 5/3, width 8.33 -> 8. The whole-image box stays whole.
    image = np.zeros((3, 5, 3), np.uint8)
    out = resize_shortest_edge(image, 5, 100,
                               boxes=np.array([[0, 0, 5, 3], [1, 1.5, 2.5, 3]], np.float32),
                               keypoints=np.array([[[5, 3, 2], [2.5, 1.5, 1]]], np.float32))
    assert out["image"].shape == (5, 8, 3)
    assert out["sx"] == pytest.approx(1.6) and out["sy"] == pytest.approx(5 / 3)
    np.testing.assert_allclose(out["boxes"], [[0, 0, 8, 5], [1.6, 2.5, 4, 5]], rtol=1e-6)
    np.testing.assert_allclose(out["keypoints"], [[[8, 5, 2], [4, 2.5, 1]]], rtol=1e-6)


def test_resize_masks_sample_at_pixel_centres_not_corners():
    # 9 -> 3: resized pixel j looks at source pixel 3j + 1 (its centre), not 3j (its corner).
    masks = np.zeros((1, 9, 9), np.uint8)
    masks[0, 3:6, 4] = 1                                        # a bar through the centre cell
    out = resize_shortest_edge(np.zeros((9, 9, 3), np.uint8), 3, 100, masks=masks)
    expected = np.zeros((3, 3), np.uint8)
    expected[1, 1] = 1
    np.testing.assert_array_equal(out["masks"][0], expected)


# --------------------------------------------------------------------------------------------
# Flip
# --------------------------------------------------------------------------------------------
def test_hflip_boxes_masks_keypoints_with_left_right_swap():
    image = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    boxes = np.array([[1, 0, 3, 2]], np.float32)
    masks = np.array([[[0, 1, 1, 0, 0], [0, 1, 1, 0, 0]]], np.uint8)
    # keypoints: nose, left_eye, right_eye -> flip map [0, 2, 1]
    kps = np.array([[[1, 1, 2], [0.5, 1, 2], [4, 1, 1]],
                    [[0, 0, 0], [2, 1, 2], [7, 7, 0]]], np.float32)
    crowd = np.array([[0, 0, 5, 1]], np.float32)
    out = hflip(image, boxes, masks, kps, crowd, flip_map=[0, 2, 1])
    np.testing.assert_array_equal(out["image"], image[:, ::-1])
    np.testing.assert_array_equal(out["boxes"], [[2, 0, 4, 2]])
    np.testing.assert_array_equal(out["masks"], [[[0, 0, 1, 1, 0], [0, 0, 1, 1, 0]]])
    np.testing.assert_array_equal(out["crowd_boxes"], [[0, 0, 5, 1]])
    np.testing.assert_array_equal(out["keypoints"],
                                  [[[4, 1, 2], [1, 1, 1], [4.5, 1, 2]],
                                   [[0, 0, 0], [0, 0, 0], [3, 1, 2]]])
    back = hflip(out["image"], out["boxes"], out["masks"], out["keypoints"], flip_map=[0, 2, 1])
    np.testing.assert_array_equal(back["image"], image)
    np.testing.assert_array_equal(back["boxes"], boxes)
    np.testing.assert_array_equal(back["masks"], masks)
    np.testing.assert_array_equal(back["keypoints"][0], kps[0])


def test_hflip_rejects_a_flip_map_of_the_wrong_length():
    with pytest.raises(ValueError, match="flip map"):
        hflip(np.zeros((2, 2, 3), np.uint8), keypoints=np.ones((1, 3, 3), np.float32),
              flip_map=[1, 0])


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------
def test_normalize_is_chw_float32_of_x_over_255_minus_mean_over_std():
    image = np.array([[[255, 0, 128], [10, 20, 30]]], np.uint8)      # 1x2x3
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    out = normalize(image, mean, std)
    assert out.shape == (3, 1, 2) and out.dtype == np.float32
    expected = ((image / 255.0 - np.array(mean)) / np.array(std)).transpose(2, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert out[0, 0, 0] == pytest.approx((1 - 0.485) / 0.229, abs=1e-5)


def test_normalize_stepwise_is_gluoncv_and_torchvision_arithmetic():
    """``stepwise``: float32 x / 255, minus float32 mean, over float32 std, as MXNet's
    image.to_tensor + image.normalize (GluonCV) and torchvision compute it, bit for bit; the
    default ``fused`` arithmetic is within 5e-7 of it."""
    import mxnet as mx
    image = np.random.default_rng(1).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    got = normalize(image, mean, std, "stepwise")
    x = image.transpose(2, 0, 1).astype(np.float32)
    m32, s32 = (np.array(v, np.float32)[:, None, None] for v in (mean, std))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, (x / np.float32(255) - m32) / s32)
    gluoncv = mx.nd.image.normalize(mx.nd.image.to_tensor(mx.nd.array(image, dtype="uint8")),
                                    mean=mean, std=std)
    np.testing.assert_array_equal(got, gluoncv.asnumpy())
    fused = normalize(image, mean, std)
    assert (fused != got).any()
    np.testing.assert_allclose(fused, got, rtol=0, atol=5e-7)
    with pytest.raises(UserError, match="input.normalize"):
        normalize(image, mean, std, "exact")


# --------------------------------------------------------------------------------------------
# Test-time resize rules and interpolations
# --------------------------------------------------------------------------------------------
def test_config_choices_are_the_transform_choices():
    assert CHOICES["input.resize_rule"] == RESIZE_RULES
    assert CHOICES["input.resize_interp"] == RESIZE_INTERPS
    assert CHOICES["input.normalize"] == NORMALIZE_MODES
    cfg = get_config("shapes")
    assert (cfg.input.resize_rule, cfg.input.resize_interp, cfg.input.normalize) == \
        ("half_up", "linear", "fused")
    with pytest.raises(ConfigError, match="input.resize_interp.*'area'"):
        get_config("shapes", ["input.resize_interp=area"])


def test_resized_size_rules_of_gluoncv_and_torchvision():
    # GluonCV rounds half to even (np.round), half_up does not
    assert resized_size(4, 10, 5, 100, "gluoncv")[:2] == (5, 12)
    assert resized_size(4, 10, 5, 100, "half_up")[:2] == (5, 13)
    assert resized_size(480, 640, 800, 1333, "gluoncv") == (800, 1067, 800 / 480)
    # torchvision floors; sizes measured with torchvision 0.29's GeneralizedRCNNTransform,
    # eager (Python float scale) and scripted (float32 scale)
    measured = {(480, 640): ((800, 1066), (800, 1066)), (375, 500): ((800, 1066), (799, 1066)),
                (427, 640): ((800, 1199), (799, 1199)), (333, 500): ((800, 1201), (799, 1201)),
                (1000, 3000): ((444, 1333), (444, 1332)), (612, 612): ((800, 800), (800, 800))}
    for (h, w), (eager, scripted) in measured.items():
        assert resized_size(h, w, 800, 1333, "torchvision")[:2] == eager
        assert resized_size(h, w, 800, 1333, "torchvision_float32")[:2] == scripted
    assert resized_size(375, 500, 800, 1333, "torchvision")[2] == 800 / 375
    assert resized_size(375, 500, 800, 1333, "torchvision_float32")[2] == \
        float(np.float32(1) / np.float32(375) * np.float32(800))
    with pytest.raises(UserError, match="input.resize_rule"):
        resized_size(4, 10, 5, 100, "detectron")


def test_gluoncv_rule_equals_resize_short_within():
    """GluonCV's own size computation (its max-size test on the rounded long side), on sizes
    that hit the cap and sizes that do not."""
    pytest.importorskip("gluoncv")
    import mxnet as mx
    from gluoncv.data.transforms.image import resize_short_within
    rng = np.random.default_rng(0)
    for h, w in rng.integers(20, 400, (60, 2)):
        theirs = resize_short_within(mx.nd.zeros((h, w, 1), dtype="uint8"), 100, 170).shape[:2]
        assert resized_size(int(h), int(w), 100, 170, "gluoncv")[:2] == theirs, (h, w)


def test_resize_image_cubic_is_mxnet_imresize():
    """``cubic`` is MXNet's imresize(interp=2), OpenCV's bicubic as the OpenCV inside MXNet
    computes it (GluonCV's load_test): within one level of cv2's INTER_CUBIC, not linear."""
    import cv2
    import mxnet as mx
    image = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    got = resize_image(image, 50, 67, "cubic")
    assert got.dtype == np.uint8 and got.shape == (50, 67, 3)
    theirs = mx.image.imresize(mx.nd.array(image, dtype="uint8"), 67, 50, interp=2)
    np.testing.assert_array_equal(got, theirs.asnumpy())
    cubic = cv2.resize(image, (67, 50), interpolation=cv2.INTER_CUBIC)
    assert np.abs(got.astype(int) - cubic).max() <= 1
    assert np.abs(got.astype(int) - resize_image(image, 50, 67)).max() > 10
    assert resize_image(image, 30, 40, "cubic") is image
    with pytest.raises(UserError, match="input.resize_interp"):
        resize_image(image, 50, 67, "area")


def _bilinear_reference(data, new_h, new_w):
    """align_corners=False bilinear in float64: output index i reads the input at
    max((i + 0.5) * size / new_size - 0.5, 0), linear between its two neighbours, the last
    input index repeated past the end."""
    def weights(size, new_size):
        w = np.zeros((new_size, size))
        for i in range(new_size):
            src = max((i + 0.5) * size / new_size - 0.5, 0.0)
            i0 = min(int(np.floor(src)), size - 1)
            w[i, i0] += 1 - (src - i0)
            w[i, min(i0 + 1, size - 1)] += src - i0
        return w
    return np.einsum("yh,chw,xw->cyx", weights(data.shape[1], new_h), data.astype(np.float64),
                     weights(data.shape[2], new_w))


@pytest.mark.parametrize("size,new_size,atol", [((40, 24), (64, 96), 2e-6),     # x1.6, x4
                                                ((23, 37), (61, 98), 2e-5),     # enlarge
                                                ((50, 64), (31, 20), 2e-5)])    # shrink
def test_resize_bilinear_float_is_align_corners_false_bilinear(size, new_size, atol):
    """The float32 resize against a float64 reference. Only the float32 rounding of the source
    coordinate (which PyTorch's kernel shares) separates them: exact scales give 1e-6."""
    data = np.random.default_rng(3).standard_normal((3,) + size).astype(np.float32)
    got = resize_bilinear_float(data, *new_size)
    assert got.dtype == np.float32 and got.shape == (3,) + new_size
    np.testing.assert_allclose(got, _bilinear_reference(data, *new_size), rtol=0, atol=atol)
    assert resize_bilinear_float(data, *size) is data


def test_test_transform_applies_the_configured_pipeline():
    """Each pipeline: the uint8 resize then the normalisation, or (bilinear_float, as
    torchvision) the normalisation then the float resize, at the rule's size."""
    image = _image()                                        # 20x30
    mean, std = get_config("shapes").input.pixel_mean, get_config("shapes").input.pixel_std
    for rule, interp, mode in [("gluoncv", "cubic", "stepwise"),
                               ("torchvision_float32", "bilinear_float", "stepwise"),
                               ("half_up", "linear", "fused")]:
        cfg = _cfg(**{"input.min_size_test": 47, "input.max_size_test": 1000,
                      "input.resize_rule": rule, "input.resize_interp": interp,
                      "input.normalize": mode})
        data, im_info = TestTransform(cfg).apply_image(image)
        h, w, scale = resized_size(20, 30, 47, 1000, rule)
        if interp == "bilinear_float":
            expected = resize_bilinear_float(normalize(image, mean, std, mode), h, w)
        else:
            expected = normalize(resize_image(image, h, w, interp), mean, std, mode)
        np.testing.assert_array_equal(data, expected)
        np.testing.assert_array_equal(im_info, np.array([h, w, scale], np.float32))
    assert resized_size(20, 30, 47, 1000, "gluoncv")[:2] == (47, 70)          # 70.5, to even
    assert resized_size(20, 30, 47, 1000, "torchvision_float32")[:2] == (47, 70)
    cfg = _cfg()
    cfg.input.resize_interp = "area"                        # set in code: no config check
    with pytest.raises(UserError, match="input.resize_interp: expected one of"):
        TestTransform(cfg)


# --------------------------------------------------------------------------------------------
# Record -> sample
# --------------------------------------------------------------------------------------------
def _record(height=20, width=30):
    polygon = [[4, 2, 14, 2, 14, 12, 4, 12]]                   # the box (4, 2, 14, 12)
    rle = mask_util.encode(np.asfortranarray(np.pad(np.ones((4, 6), np.uint8),
                                                    ((10, height - 14), (20, width - 26)))))
    return {
        "image_id": 7, "file_name": "/data/img7.png", "height": height, "width": width,
        "boxes": np.array([[4, 2, 14, 12], [20, 10, 26, 14]], np.float32),
        "labels": np.array([1, 0], np.int32),
        "segmentations": [polygon, rle],
        "keypoints": np.array([[[5, 3, 2], [13, 3, 2], [9, 11, 1]],
                               [[21, 11, 2], [0, 0, 0], [25, 13, 2]]], np.float32),
        "crowd_boxes": np.array([[0, 0, 3, 3]], np.float32),
        "crowd_segmentations": [[[0, 0, 3, 0, 3, 3, 0, 3]]],
    }


def _image(height=20, width=30):
    return np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)


class _Info:
    keypoint_names = ["left_a", "right_a", "middle"]
    keypoint_flip_map = [1, 0, 2]


def _cfg(**sets):
    cfg = get_config("shapes", ["%s=%s" % kv for kv in sets.items()])
    return cfg


def test_train_transform_flip_and_scale_hand_computed():
    cfg = _cfg(**{"input.min_size_train": "[40]", "input.max_size_train": 1000,
                  "input.flip_prob": 1.0})
    t = TrainTransform(cfg, _Info(), reader=lambda path: _image())
    s = t(_record(), np.random.default_rng(0))
    # 20x30 -> 40x60 (scale 2), then mirrored in a 60-wide image
    assert s["image"].shape == (3, 40, 60) and s["image"].dtype == np.float32
    np.testing.assert_allclose(s["im_info"], [40, 60, 2])
    np.testing.assert_array_equal(s["gt_boxes"], [[32, 4, 52, 24], [8, 20, 20, 28]])
    np.testing.assert_array_equal(s["gt_labels"], [1, 0])
    np.testing.assert_array_equal(s["gt_crowd"], [[54, 0, 60, 6]])
    np.testing.assert_array_equal(s["gt_keypoints"][0], [[34, 6, 2], [50, 6, 2], [42, 22, 1]])
    np.testing.assert_array_equal(s["gt_keypoints"][1], [[0, 0, 0], [18, 22, 2], [10, 26, 2]])
    assert s["gt_masks"].shape == (2, 40, 60) and s["gt_masks"].dtype == np.uint8
    for box, mask in zip(s["gt_boxes"].astype(int), s["gt_masks"]):
        expected = np.zeros((40, 60), np.uint8)
        expected[box[1]:box[3], box[0]:box[2]] = 1
        np.testing.assert_array_equal(mask, expected)
    assert s["image_id"] == 7
    expected_pixel = (_image()[0, -1] / 255.0 - np.array(cfg.input.pixel_mean)) \
        / np.array(cfg.input.pixel_std)
    np.testing.assert_allclose(s["image"][:, 0, 0], expected_pixel, atol=1e-5)


def test_train_transform_draws_from_the_generator_and_honours_switches():
    cfg = _cfg(**{"input.min_size_train": "[20, 40, 60]", "model.keypoint_on": "false"})
    t = TrainTransform(cfg, _Info(), reader=lambda path: _image())
    shapes = {t(_record(), np.random.default_rng(seed))["image"].shape for seed in range(20)}
    assert shapes == {(3, 20, 30), (3, 40, 60), (3, 60, 90)}
    a = t(_record(), np.random.default_rng(3))
    b = t(_record(), np.random.default_rng(3))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert "gt_keypoints" not in a and "gt_masks" in a
    no_masks = TrainTransform(_cfg(**{"model.mask_on": "false"}), _Info(),
                              reader=lambda path: _image())
    assert "gt_masks" not in no_masks(_record(), np.random.default_rng(0))


def test_train_transform_user_errors_name_the_file():
    cfg = _cfg()
    with pytest.raises(UserError, match="img7.png.*30x20"):
        TrainTransform(cfg, _Info(), reader=lambda p: _image(21, 30))(_record(),
                                                                       np.random.default_rng(0))
    record = dict(_record(), segmentations=None)
    with pytest.raises(UserError, match="img7.png.*segmentation"):
        TrainTransform(cfg, _Info(), reader=lambda p: _image())(record, np.random.default_rng(0))


# --------------------------------------------------------------------------------------------
# Copy-paste
# --------------------------------------------------------------------------------------------
def _one_instance(value, rows, cols, box, label, kps, size=(10, 10)):
    image = np.full(size + (3,), value, np.uint8)
    masks = np.zeros((1,) + size, np.uint8)
    masks[0, rows[0]:rows[1], cols[0]:cols[1]] = 1
    return {"image": image, "masks": masks, "boxes": np.array([box], np.float32),
            "labels": np.array([label], np.int32), "keypoints": np.array([kps], np.float32)}


def test_mask_boxes_are_tight_in_continuous_coordinates():
    masks = np.zeros((2, 6, 8), np.uint8)
    masks[0, 1:4, 2:7] = 1
    np.testing.assert_array_equal(mask_boxes(masks), [[2, 1, 7, 4], [0, 0, 0, 0]])


def test_paste_instances_hand_computed():
    # dst: one instance on rows 2..5, columns 2..7 (box 2, 2, 8, 6), two visible keypoints
    dst = _one_instance(10, (2, 6), (2, 8), [2, 2, 8, 6], 1, [[3.5, 3.5, 2], [7.5, 5.5, 2]])
    # src: its instance covers columns 5..9 of every row; pasting it leaves dst's columns 2..4:
    # 12 of 24 pixels, exactly the half that placement allows
    src = _one_instance(200, (0, 10), (5, 10), [5, 0, 10, 10], 3, [[9, 9, 2], [0, 0, 0]])
    out = paste_instances(dst, src, [0])
    np.testing.assert_array_equal(out["boxes"], [[2, 2, 5, 6], [5, 0, 10, 10]])
    np.testing.assert_array_equal(out["labels"], [1, 3])
    assert out["labels"].dtype == np.int32
    expected = np.zeros((2, 10, 10), np.uint8)
    expected[0, 2:6, 2:5] = 1
    expected[1, :, 5:] = 1
    np.testing.assert_array_equal(out["masks"], expected)
    # the keypoint on pixel (7, 5) is now under the pasted instance: v 2 -> 1
    np.testing.assert_array_equal(out["keypoints"], [[[3.5, 3.5, 2], [7.5, 5.5, 1]],
                                                     [[9, 9, 2], [0, 0, 0]]])
    np.testing.assert_array_equal(out["image"][:, 5:], 200)
    np.testing.assert_array_equal(out["image"][:, :5], 10)
    np.testing.assert_array_equal(dst["image"], 10)             # inputs are not modified
    np.testing.assert_array_equal(dst["keypoints"][0, 1], [7.5, 5.5, 2])


def test_paste_instances_skips_what_would_hide_more_than_half():
    dst = _one_instance(10, (2, 6), (2, 8), [2, 2, 8, 6], 1, [[3.5, 3.5, 2], [7.5, 5.5, 2]])
    src = _one_instance(200, (0, 10), (4, 10), [4, 0, 10, 10], 3, [[9, 9, 2], [0, 0, 0]])
    out = paste_instances(dst, src, [0])                        # would leave 8 of 24 pixels
    for key in ("image", "masks", "boxes", "labels", "keypoints"):
        np.testing.assert_array_equal(out[key], dst[key])
    empty = dict(src, masks=np.zeros_like(src["masks"]))
    assert len(paste_instances(dst, empty, [0])["boxes"]) == 1  # an empty mask is not pasted


def _other_record():
    """A 20x30 record with one instance, a rectangle on rows 14..19, columns 0..7."""
    mask = np.zeros((20, 30), np.uint8)
    mask[14:20, 0:8] = 1
    return {
        "image_id": 8, "file_name": "/data/img8.png", "height": 20, "width": 30,
        "boxes": np.array([[0, 14, 8, 20]], np.float32), "labels": np.array([2], np.int32),
        "segmentations": [mask_util.encode(np.asfortranarray(mask))],
        "keypoints": np.array([[[1, 15, 2], [7, 19, 2], [0, 0, 0]]], np.float32),
        "crowd_boxes": np.zeros((0, 4), np.float32), "crowd_segmentations": [],
    }


def test_train_transform_copy_paste_adds_instances_deterministically():
    pool = [_record(), _other_record()]
    cfg = {"input.min_size_train": "[20]", "input.max_size_train": 1000, "input.flip_prob": 0.0,
           "input.copy_paste_prob": 0.0, "input.copy_paste_sources": 1}
    plain = TrainTransform(_cfg(**cfg), _Info(), reader=lambda p: _image())
    with_pool = TrainTransform(_cfg(**cfg), _Info(), reader=lambda p: _image(), paste_pool=pool)
    a = plain(pool[0], np.random.default_rng(5))
    b = with_pool(pool[0], np.random.default_rng(5))                # prob 0: the same sample
    assert all(np.array_equal(a[k], b[k]) for k in a)
    cfg["input.copy_paste_prob"] = 1.0
    white = np.full((20, 30, 3), 255, np.uint8)                  # img8's pixels
    paste = TrainTransform(_cfg(**cfg), _Info(), paste_pool=pool,
                           reader=lambda p: white if p.endswith("img8.png") else _image())
    c = paste(pool[0], np.random.default_rng(5))
    d = paste(pool[0], np.random.default_rng(5))
    assert all(np.array_equal(c[k], d[k]) for k in c)
    # img8's rectangle is pasted after img7's two instances, which it does not touch (the
    # original size: no resize blends the pasted pixels with their neighbours)
    np.testing.assert_array_equal(c["gt_boxes"], np.vstack([a["gt_boxes"], [[0, 14, 8, 20]]]))
    np.testing.assert_array_equal(c["gt_labels"], [1, 0, 2])
    np.testing.assert_array_equal(c["gt_keypoints"][2], [[1, 15, 2], [7, 19, 2], [0, 0, 0]])
    np.testing.assert_array_equal(c["gt_masks"][:2], a["gt_masks"])
    np.testing.assert_array_equal(mask_boxes(c["gt_masks"][2:])[0], [0, 14, 8, 20])
    np.testing.assert_array_equal(c["gt_crowd"], a["gt_crowd"])
    pasted = c["gt_masks"][2].astype(bool)
    np.testing.assert_array_equal(c["image"][:, ~pasted], a["image"][:, ~pasted])
    np.testing.assert_allclose(c["image"][:, pasted].T, np.broadcast_to(
        (1 - np.array(_cfg().input.pixel_mean)) / np.array(_cfg().input.pixel_std),
        (pasted.sum(), 3)), rtol=1e-5)
    # img8 as the destination: img7's instances land on top of it, or are skipped
    e = paste(pool[1], np.random.default_rng(1))
    assert len(e["gt_boxes"]) > 1 and e["gt_labels"][0] == 2
    # two source images in turn: the first paste is the same draw, the second adds to it
    pool3 = pool + [_record()]
    once = TrainTransform(_cfg(**cfg), _Info(), paste_pool=pool3,
                          reader=lambda p: white if p.endswith("img8.png") else _image())
    cfg["input.copy_paste_sources"] = 2
    twice = TrainTransform(_cfg(**cfg), _Info(), paste_pool=pool3,
                           reader=lambda p: white if p.endswith("img8.png") else _image())
    grew = 0
    for seed in range(8):
        one = once(pool[0], np.random.default_rng(seed))
        two = twice(pool[0], np.random.default_rng(seed))
        assert len(two["gt_labels"]) >= len(one["gt_labels"])
        np.testing.assert_array_equal(two["gt_labels"][:len(one["gt_labels"])], one["gt_labels"])
        grew += len(two["gt_labels"]) > len(one["gt_labels"])
    assert grew > 0


def test_copy_paste_needs_masks_and_a_probability():
    pool = [dict(_record(), segmentations=None), _other_record()]
    cfg = _cfg(**{"input.copy_paste_prob": 1.0, "model.mask_on": "false"})
    t = TrainTransform(cfg, _Info(), reader=lambda p: _image(), paste_pool=pool)
    with pytest.raises(UserError, match="img7.png.*copy_paste_prob.*segmentation"):
        t(pool[1], np.random.default_rng(0))              # img7 is the source: no masks
    with pytest.raises(UserError, match="img7.png.*copy_paste_prob.*segmentation"):
        t(pool[0], np.random.default_rng(0))              # img7 is the destination
    # out of range: refused when the config is built, and by the transform for a config
    # changed in code after that
    with pytest.raises(ConfigError, match="input.copy_paste_prob.*1.5"):
        _cfg(**{"input.copy_paste_prob": 1.5})
    bad = _cfg()
    bad.input.copy_paste_prob = 1.5
    with pytest.raises(UserError, match="input.copy_paste_prob.*1.5"):
        TrainTransform(bad, _Info())
    with pytest.raises(UserError, match="input.copy_paste_sources.*0"):
        TrainTransform(_cfg(**{"input.copy_paste_sources": 0}), _Info())


def test_test_transform_returns_image_info_id_and_original_size():
    cfg = _cfg(**{"input.min_size_test": 60, "input.max_size_test": 1000})
    data, im_info, image_id, orig_size = TestTransform(cfg, reader=lambda p: _image())(_record())
    assert data.shape == (3, 60, 90)
    np.testing.assert_allclose(im_info, [60, 90, 3])
    assert image_id == 7
    np.testing.assert_array_equal(orig_size, [20, 30])


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------
def _sample(h, w, n, k=2, image_id=0):
    rng = np.random.default_rng(h * w + n)
    return {
        "image": rng.standard_normal((3, h, w)).astype(np.float32),
        "im_info": np.array([h, w, 1.5], np.float32),
        "gt_boxes": rng.uniform(0, 10, (n, 4)).astype(np.float32),
        "gt_labels": np.arange(n, dtype=np.int32),
        "gt_masks": rng.integers(0, 2, (n, h, w), dtype=np.uint8),
        "gt_keypoints": rng.uniform(0, 2, (n, k, 3)).astype(np.float32),
        "gt_crowd": np.zeros((0, 4), np.float32),
        "image_id": image_id,
    }


def test_padded_size_rounds_up_to_multiples():
    assert padded_size(50, 64, 32) == (64, 64)
    assert padded_size(65, 1, 32) == (96, 32)
    assert padded_size(50, 70, 0) == (50, 70)


def test_batchify_train_pads_to_32_with_minus_one_and_zero_masks():
    a, b = _sample(50, 70, 3, image_id=11), _sample(64, 33, 1, image_id=12)
    batch = batchify_train([a, b], 32)
    assert batch["data"].shape == (2, 3, 64, 96) and batch["data"].dtype == np.float32
    np.testing.assert_array_equal(batch["data"][0, :, :50, :70], a["image"])
    np.testing.assert_array_equal(batch["data"][1, :, :64, :33], b["image"])
    assert not batch["data"][0, :, 50:].any() and not batch["data"][0, :, :, 70:].any()
    assert not batch["data"][1, :, :, 33:].any()
    np.testing.assert_allclose(batch["im_info"], [[50, 70, 1.5], [64, 33, 1.5]])
    assert batch["gt_boxes"].shape == (2, 3, 4)
    np.testing.assert_array_equal(batch["gt_boxes"][1, :1], b["gt_boxes"])
    assert (batch["gt_boxes"][1, 1:] == -1).all()
    np.testing.assert_array_equal(batch["gt_labels"], [[0, 1, 2], [0, -1, -1]])
    assert batch["gt_labels"].dtype == np.float32
    assert batch["gt_masks"].shape == (2, 3, 64, 96) and batch["gt_masks"].dtype == np.uint8
    np.testing.assert_array_equal(batch["gt_masks"][0, :, :50, :70], a["gt_masks"])
    assert batch["gt_masks"][0].sum() == a["gt_masks"].sum()
    assert not batch["gt_masks"][1, 1:].any() and batch["gt_masks"][1].sum() == b["gt_masks"].sum()
    assert batch["gt_keypoints"].shape == (2, 3, 2, 3)
    assert (batch["gt_keypoints"][1, 1:] == -1).all()
    assert batch["gt_crowd"].shape == (2, 1, 4) and (batch["gt_crowd"] == -1).all()
    np.testing.assert_array_equal(batch["image_id"], [11, 12])
    assert batch["image_id"].dtype == np.int64


def test_batchify_train_without_masks_keypoints_or_instances():
    s = _sample(32, 32, 0)
    del s["gt_masks"], s["gt_keypoints"]
    batch = batchify_train([s], 32)
    assert set(batch) == {"data", "im_info", "gt_boxes", "gt_labels", "gt_crowd", "image_id"}
    assert batch["gt_boxes"].shape == (1, 1, 4) and (batch["gt_boxes"] == -1).all()


def test_batchify_test_pads_and_keeps_original_sizes():
    items = [(np.ones((3, 40, 30), np.float32), np.array([40, 30, 2], np.float32), 5,
              np.array([20, 15])),
             (np.ones((3, 20, 70), np.float32), np.array([20, 70, 1], np.float32), 6,
              np.array([20, 70]))]
    batch = batchify_test(items, 32)
    assert batch["data"].shape == (2, 3, 64, 96)
    assert batch["data"][0].sum() == 3 * 40 * 30 and batch["data"][1].sum() == 3 * 20 * 70
    np.testing.assert_array_equal(batch["orig_size"], [[20, 15], [20, 70]])
    np.testing.assert_array_equal(batch["image_id"], [5, 6])
    np.testing.assert_allclose(batch["im_info"], [[40, 30, 2], [20, 70, 1]])

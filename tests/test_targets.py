"""Training targets on small hand-computed cases (mxmask.modeling.targets)."""
import math

import mxnet as mx
import numpy as np
import pytest

from mxmask.modeling.box_coder import pairwise_iou
from mxmask.modeling.targets import KeypointTargets, MaskTargets, RoISampler, RPNTargets

PAD = [-1.0, -1.0, -1.0, -1.0]


def nd(x, dtype="float32"):
    return mx.nd.array(np.asarray(x), dtype=dtype)


def encode_np(box, ref, weights=(1.0, 1.0, 1.0, 1.0)):
    """Detectron2's Box2BoxTransform.get_deltas, written out for one pair."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    rw, rh = ref[2] - ref[0], ref[3] - ref[1]
    bx, by = box[0] + 0.5 * bw, box[1] + 0.5 * bh
    rx, ry = ref[0] + 0.5 * rw, ref[1] + 0.5 * rh
    return np.array([weights[0] * (bx - rx) / rw, weights[1] * (by - ry) / rh,
                     weights[2] * math.log(bw / rw), weights[3] * math.log(bh / rh)])


def rpn(anchors, gt, crowd=None, im_info=None, seed=0, hybridize=False, **kw):
    gt = np.asarray(gt, "float32")
    B = gt.shape[0]
    if crowd is None:
        crowd = np.full((B, 1, 4), -1.0, "float32")
    if im_info is None:
        im_info = np.tile(np.array([[1000.0, 1000.0, 1.0]], "float32"), (B, 1))
    block = RPNTargets(**kw)
    if hybridize:
        block.hybridize()
    mx.random.seed(seed)
    labels, targets, matched = block(nd([anchors]), nd(gt), nd(crowd), nd(im_info))
    return labels.asnumpy(), targets.asnumpy(), matched.asnumpy()


# --------------------------------------------------------------------------------------------
# RPN anchor targets
# --------------------------------------------------------------------------------------------
def test_rpn_iou_thresholds_and_box_targets():
    gt = [[[0, 0, 10, 10]]]
    anchors = [[0, 0, 10, 10],     # IoU 1.0  -> fg
               [0, 0, 10, 8],      # IoU 0.8  -> fg
               [0, 0, 10, 7],      # IoU 0.7  -> fg (>= 0.7)
               [0, 0, 10, 5],      # IoU 0.5  -> ignored
               [0, 0, 10, 3],      # IoU 0.3  -> ignored (bg is < 0.3)
               [0, 0, 10, 2],      # IoU 0.2  -> bg
               [20, 20, 30, 30]]   # IoU 0    -> bg
    labels, targets, matched = rpn(anchors, gt, batch_size_per_image=64)
    np.testing.assert_array_equal(labels, [[1, 1, 1, -1, -1, 0, 0]])
    np.testing.assert_array_equal(matched, [[0, 0, 0, -1, -1, -1, -1]])
    # (0,0,10,8) -> (0,0,10,10): centre y 4 -> 5 over h 8, log(10/8)
    np.testing.assert_allclose(targets[0, 1], [0, 0.125, 0, math.log(1.25)], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(targets[0, 2], encode_np([0, 0, 10, 10], [0, 0, 10, 7]), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(targets[0, 0], 0)
    np.testing.assert_array_equal(targets[0, 3:], 0)   # non-fg anchors have zero targets


def test_rpn_low_quality_matches_include_ties():
    gt = [[[0, 0, 10, 10], [100, 100, 110, 110]]]
    anchors = [[0, 0, 10, 6],           # IoU 0.6, the best of gt 0 (tie) -> fg
               [0, 4, 10, 10],          # IoU 0.6, the best of gt 0 (tie) -> fg
               [0, 0, 10, 5],           # IoU 0.5 -> ignored
               [100, 100, 110, 102.5],  # IoU 0.25, the best of gt 1 -> fg despite < 0.3
               [50, 50, 60, 60]]        # IoU 0 -> bg
    labels, targets, matched = rpn(anchors, gt, batch_size_per_image=64)
    np.testing.assert_array_equal(labels, [[1, 1, -1, 1, 0]])
    np.testing.assert_array_equal(matched, [[0, 0, -1, 1, -1]])
    np.testing.assert_allclose(targets[0, 1], [0, -1.0 / 3, 0, math.log(10 / 6.0)], rtol=1e-5)
    np.testing.assert_allclose(targets[0, 3], [0, 1.5, 0, math.log(4.0)], rtol=1e-5, atol=1e-6)


def test_rpn_low_quality_anchor_keeps_its_argmax_gt():
    # Detectron2: a low-quality match changes the label, not the matched gt
    gt = [[[0, 0, 10, 10], [0, 5, 10, 15]]]
    anchors = [[0, 3, 10, 13],   # IoU 7/13 with gt 0 (its best), 8/12 with gt 1 (argmax)
               [0, 5, 10, 15]]   # IoU 1 with gt 1
    labels, targets, matched = rpn(anchors, gt, batch_size_per_image=64)
    np.testing.assert_array_equal(labels, [[1, 1]])
    np.testing.assert_array_equal(matched, [[1, 1]])
    np.testing.assert_allclose(targets[0, 0], [0, 0.2, 0, 0], atol=1e-6)


def test_rpn_padded_gts_never_match_and_empty_image_is_background():
    rng = np.random.RandomState(0)
    xy = rng.uniform(0, 80, size=(20, 2))
    anchors = np.concatenate([xy, xy + rng.uniform(4, 30, size=(20, 2))], axis=1)
    anchors[0] = [-1, -1, 5, 5]          # touches the padding box's corner
    gt = [[PAD, PAD], [[10, 10, 40, 40], PAD]]
    labels, targets, matched = rpn(anchors, gt, batch_size_per_image=256)
    np.testing.assert_array_equal(labels[0], 0)   # 20 anchors < 256: every one a negative
    np.testing.assert_array_equal(matched[0], -1)
    np.testing.assert_array_equal(targets[0], 0)
    assert labels[1].max() == 1 and np.all(matched[1][labels[1] == 1] == 0)


def test_rpn_crowd_regions_are_not_negatives():
    anchors = [[0, 0, 10, 10],       # matches gt 0
               [60, 60, 70, 70],     # inside the crowd box (IoA 1) -> ignored
               [45, 60, 55, 70],     # half inside (IoA 0.5) -> bg
               [200, 200, 210, 210],  # far -> bg
               [50, 50, 60, 60],     # inside -> ignored
               [80, 80, 90, 90]]     # inside the crowd but matches gt 1 -> stays fg
    gt = [[[0, 0, 10, 10], [80, 80, 90, 90]], [PAD, [80, 80, 90, 90]]]
    crowd = [[[50, 50, 100, 100]], [PAD]]
    labels, _, _ = rpn(anchors, gt, crowd, batch_size_per_image=64)
    np.testing.assert_array_equal(labels, [[1, -1, 0, 0, -1, 1], [0, 0, 0, 0, 0, 1]])


def test_rpn_crowd_ioa_of_1_ignores_crowd_boxes():
    """crowd_ioa >= 1 (model.rpn.crowd_ioa, torchvision's and Detectron2's data drop crowd
    instances): the crowd boxes play no part, the result is the one without them."""
    anchors = [[0, 0, 10, 10], [60, 60, 70, 70], [45, 60, 55, 70], [200, 200, 210, 210],
               [50, 50, 60, 60], [80, 80, 90, 90]]
    gt = [[[0, 0, 10, 10], [80, 80, 90, 90]], [PAD, [80, 80, 90, 90]]]
    crowd = [[[50, 50, 100, 100]], [PAD]]
    for hybridize in (False, True):
        labels, targets, matched = rpn(anchors, gt, crowd, batch_size_per_image=64,
                                       crowd_ioa=1.0, hybridize=hybridize)
        np.testing.assert_array_equal(labels, [[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1]])
        plain = rpn(anchors, gt, batch_size_per_image=64, crowd_ioa=1.0, hybridize=hybridize)
        for ours, ref in zip((labels, targets, matched), plain):
            np.testing.assert_array_equal(ours, ref)
    # just below 1, an anchor wholly inside the crowd box is still not a negative
    labels, _, _ = rpn(anchors, gt, crowd, batch_size_per_image=64, crowd_ioa=0.99)
    np.testing.assert_array_equal(labels, [[1, -1, 0, 0, -1, 1], [0, 0, 0, 0, 0, 1]])


def test_box_iou_agrees_with_box_coder():
    # RPNTargets uses contrib.box_iou, RoISampler box_coder.pairwise_iou: same numbers
    rng = np.random.RandomState(7)
    a = rng.uniform(0, 50, size=(30, 2))
    a = np.concatenate([a, a + rng.uniform(-2, 20, size=(30, 2))], axis=1)   # some inverted
    b = np.concatenate([a[:5] + 1, [PAD, [0, 0, 0, 0]]])
    ours = mx.nd.contrib.box_iou(nd(b), nd(a), format="corner").asnumpy()
    ref = pairwise_iou(mx.nd, nd([b]), nd([a])).asnumpy()[0]
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)


def test_rpn_boundary_threshold():
    anchors = [[0, 0, 10, 10], [15, 15, 25, 25]]
    gt = [[[0, 0, 10, 10]]]
    im_info = [[20, 20, 1]]
    keep_all, _, _ = rpn(anchors, gt, im_info=im_info, batch_size_per_image=64)
    np.testing.assert_array_equal(keep_all, [[1, 0]])   # Detectron2 default: -1 keeps them
    strict, _, _ = rpn(anchors, gt, im_info=im_info, batch_size_per_image=64,
                       boundary_threshold=0)
    np.testing.assert_array_equal(strict, [[1, -1]])


def _sampling_case():
    rng = np.random.RandomState(1)
    fg = np.tile([[0, 0, 10, 10]], (300, 1))                        # IoU 1
    ignored = np.tile([[0, 0, 10, 5]], (100, 1))                    # IoU 0.5
    xy = rng.uniform(100, 500, size=(2000, 2))
    bg = np.concatenate([xy, xy + 20], axis=1)                      # IoU 0
    anchors = np.concatenate([fg, ignored, bg]).astype("float32")
    gt = [[[0, 0, 10, 10]], [[0, 0, 10, 10]]]
    return anchors, gt


def test_rpn_sampling_counts_and_determinism():
    anchors, gt = _sampling_case()
    labels, _, _ = rpn(anchors, gt, seed=3)
    assert (labels[0] == 1).sum() == 128 and (labels[0] == 0).sum() == 128
    assert np.all(labels[0, 300:400] == -1)                 # ignored anchors are never sampled
    assert np.all(labels[0, :300] != 0) and np.all(labels[0, 400:] != 1)
    again, _, _ = rpn(anchors, gt, seed=3)
    np.testing.assert_array_equal(labels, again)
    other, _, _ = rpn(anchors, gt, seed=4)
    assert not np.array_equal(labels[0], other[0])
    assert (other[0] == 1).sum() == 128
    hybrid, _, _ = rpn(anchors, gt, seed=3, hybridize=True)
    np.testing.assert_array_equal(labels, hybrid)
    anchors2 = anchors.copy()
    anchors2[10:300] = anchors2[400]        # only 10 fg anchors left: the others become bg
    few, _, _ = rpn(anchors2, gt, seed=3)
    assert (few[0] == 1).sum() == 10 and (few[0] == 0).sum() == 246


# --------------------------------------------------------------------------------------------
# RoI sampling and box targets
# --------------------------------------------------------------------------------------------
def sample(rois, gt, labels, seed=0, hybridize=False, **kw):
    block = RoISampler(**kw)
    if hybridize:
        block.hybridize()
    mx.random.seed(seed)
    out = block(nd(rois), nd(gt), nd(labels))
    return block, [o.asnumpy() for o in out]


GT = [[[0, 0, 10, 10], [20, 20, 40, 40], PAD, [50, 50, 60, 60]]]
GT_LABELS = [[2, 0, -1, -1]]          # the last gt has a box but label -1: padding
ROIS = [[[0, 0, 10, 8],       # IoU 0.8 with gt 0 -> fg, class 2
         [20, 20, 40, 30],    # IoU 0.5 with gt 1 -> fg, class 0
         [0, 0, 10, 4],       # IoU 0.4 -> bg
         [50, 50, 60, 60],    # equals the padded gt -> bg
         [0, 0, 0, 0],        # padding row of the proposal generator -> never sampled
         [5, 5, 5, 5]]]       # degenerate -> never sampled


def test_roi_sampler_hand_case():
    block, (rois, labels, matched, targets, num_pos) = sample(
        ROIS, GT, GT_LABELS, num_classes=3, batch_size_per_image=8, positive_fraction=0.5)
    assert block.num_pos_slots == 4
    assert rois.shape == (1, 8, 4) and targets.shape == (1, 8, 4)
    np.testing.assert_array_equal(num_pos, [4])
    # positives first (r0, r1 and the appended gts 0 and 1), then the 2 negatives, then padding
    np.testing.assert_array_equal(labels[0, 4:], [0, 0, -1, -1])
    pos = {tuple(r): (l, m, tuple(np.round(t, 4))) for r, l, m, t in
           zip(rois[0, :4], labels[0, :4], matched[0, :4], targets[0, :4])}
    w = (10, 10, 5, 5)
    expect = {(0, 0, 10, 8): (3, 0, encode_np([0, 0, 10, 10], [0, 0, 10, 8], w)),
              (20, 20, 40, 30): (1, 1, encode_np([20, 20, 40, 40], [20, 20, 40, 30], w)),
              (0, 0, 10, 10): (3, 0, np.zeros(4)),
              (20, 20, 40, 40): (1, 1, np.zeros(4))}
    assert set(pos) == set(expect)
    for box, (lab, m, t) in expect.items():
        assert pos[box][:2] == (lab, m)
        np.testing.assert_allclose(pos[box][2], np.round(t, 4), atol=1e-4)
    # hand values of the first: dy = 10 * (5 - 4) / 8, dh = 5 * log(10 / 8)
    np.testing.assert_allclose(expect[(0, 0, 10, 8)][2], [0, 1.25, 0, 5 * math.log(1.25)])
    assert {tuple(r) for r in rois[0, 4:6]} == {(0, 0, 10, 4), (50, 50, 60, 60)}
    np.testing.assert_array_equal(matched[0, 4:], -1)
    np.testing.assert_array_equal(targets[0, 4:], 0)
    # padding rows are safe to pool: positive size
    assert np.all(rois[0, :, 2] > rois[0, :, 0]) and np.all(rois[0, :, 3] > rois[0, :, 1])


def test_roi_sampler_positive_cap():
    _, (rois, labels, matched, _, num_pos) = sample(
        ROIS, GT, GT_LABELS, num_classes=3, batch_size_per_image=8, positive_fraction=0.25)
    np.testing.assert_array_equal(num_pos, [2])
    assert np.all(labels[0, :2] > 0)
    # 2 positives + every negative (only 2 exist) + 4 padding rows
    np.testing.assert_array_equal(labels[0, 2:], [0, 0, -1, -1, -1, -1])


def test_roi_sampler_counts_padding_and_determinism():
    rng = np.random.RandomState(2)
    gt = np.array([[[0, 0, 10, 10], PAD], [[100, 100, 120, 120], PAD]], "float32")
    img0 = np.concatenate([np.tile([[0, 0, 10, 9]], (300, 1)),            # IoU 0.9
                           np.tile([[0, 0, 10, 4]], (700, 1))])           # IoU 0.4
    xy = rng.uniform(0, 300, size=(50, 2))
    valid1 = np.concatenate([np.tile([[100, 100, 120, 118]], (20, 1)),    # IoU 0.9
                             np.concatenate([xy, xy + 5], axis=1)[:30]])  # bg
    img1 = np.concatenate([valid1, np.zeros((950, 4))])                   # zero padding rows
    rois = np.stack([img0, img1]).astype("float32")
    labels_gt = [[1, -1], [0, -1]]
    kw = dict(num_classes=2, batch_size_per_image=512, positive_fraction=0.25)
    block, (out, labels, matched, targets, num_pos) = sample(rois, gt, labels_gt, seed=5, **kw)
    assert block.num_pos_slots == 128
    np.testing.assert_array_equal(num_pos, [128, 21])
    assert np.all(labels[0, :128] == 2) and np.all(labels[0, 128:] == 0)
    assert np.all(labels[1, :21] == 1) and np.all(labels[1, 21:51] == 0)
    assert np.all(labels[1, 51:] == -1)                       # 461 padding rows
    assert not np.any(np.all(out[1, :51] == 0, axis=1))       # zero rows never sampled
    not_gt = np.any(out[0, :128] != [0, 0, 10, 10], axis=1)   # the gt may be drawn or not
    assert not_gt.sum() >= 127
    np.testing.assert_allclose(targets[0, :128][not_gt],
                               np.tile(encode_np([0, 0, 10, 10], [0, 0, 10, 9], (10, 10, 5, 5)),
                                       (not_gt.sum(), 1)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(targets[0, :128][~not_gt], 0)
    np.testing.assert_array_equal(targets[:, 128:], 0)
    _, again = sample(rois, gt, labels_gt, seed=5, **kw)
    _, hybrid = sample(rois, gt, labels_gt, seed=5, hybridize=True, **kw)
    for a, b, c in zip([out, labels, matched, targets], again, hybrid):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_roi_sampler_draws_different_rows_for_other_seeds():
    # distinct proposals, all fg: the chosen subset depends on the seed
    xs = np.arange(200, dtype="float32") * 0.01
    rois = np.stack([xs, xs, xs + 10, xs + 10], axis=1)[None]
    gt = [[[0, 0, 10, 10]]]
    kw = dict(num_classes=1, batch_size_per_image=64, positive_fraction=0.25)
    _, a = sample(rois, gt, [[0]], seed=1, **kw)
    _, b = sample(rois, gt, [[0]], seed=2, **kw)
    sa = {tuple(r) for r in a[0][0, :16]}
    sb = {tuple(r) for r in b[0][0, :16]}
    assert len(sa) == 16 and sa != sb
    np.testing.assert_array_equal(a[4], [16])


# --------------------------------------------------------------------------------------------
# Mask targets
# --------------------------------------------------------------------------------------------
def test_mask_targets_hand_case():
    masks = np.zeros((2, 2, 20, 20), "uint8")
    masks[0, 0, 4:12, 6:14] = 1            # image 0, gt 0: rows 4..11, cols 6..13
    masks[0, 1, 0:3, 0:3] = 1
    masks[1, 1, 10:20, 0:10] = 1           # image 1, gt 1; image 1, gt 0 is empty
    rois = [[[2, 2, 18, 18], [0, 0, 10, 10], [5, 5, 5, 5], [0, 0, 20, 20]],
            [[0, 10, 20, 20], [1, 1, 4, 4], [0, 10, 20, 20], [0, 0, 1, 1]]]
    labels = [[1, 0, 2, 1], [1, -1, 1, 1]]
    matched = [[0, -1, 1, 0], [1, -1, 0, 0]]
    block = MaskTargets(num_pos_slots=3, resolution=8)
    for hybridize in (False, True):
        if hybridize:
            block.hybridize()
        out = block(nd(rois), nd(labels), nd(matched), nd(masks, "uint8")).asnumpy()
        assert out.shape == (2, 3, 8, 8)
        # roi 16x16 -> 2x2 pixel bins; the square covers bins x 2..5, y 1..4
        expect = np.zeros((8, 8))
        expect[1:5, 2:6] = 1
        np.testing.assert_array_equal(out[0, 0], expect)
        np.testing.assert_array_equal(out[0, 1], 0)          # negative slot
        assert set(np.unique(out[0, 2])) <= {0.0, 1.0}        # degenerate roi: no abort
        expect = np.zeros((8, 8))
        expect[:, :4] = 1                                     # left half of the roi
        np.testing.assert_array_equal(out[1, 0], expect)      # image 1's gt 1 (index 1*2+1)
        np.testing.assert_array_equal(out[1, 1], 0)           # padding slot
        np.testing.assert_array_equal(out[1, 2], 0)           # image 1's gt 0 is empty


def test_soft_mask_targets_keep_thin_structures():
    """A 1-pixel line in a 16-pixel roi covers a quarter of its 4-pixel cells: the binary
    targets lose it (0.25 < 0.5), the soft ones keep 0.25; a solid block gives 1 either way."""
    masks = np.zeros((1, 1, 16, 16), "uint8")
    masks[0, 0, :, 5] = 1                  # column 5: cell x = 1 (pixels 4..7), a quarter
    masks[0, 0, 12:16, 12:16] = 1          # cell (3, 3), whole
    rois, labels, matched = [[[0, 0, 16, 16]]], [[1]], [[0]]
    args = (nd(rois), nd(labels), nd(matched), nd(masks, "uint8"))
    expect_soft = np.zeros((4, 4))
    expect_soft[:, 1] = 0.25
    expect_soft[3, 3] = 1
    for hybridize in (False, True):
        binary = MaskTargets(num_pos_slots=1, resolution=4)
        soft = MaskTargets(num_pos_slots=1, resolution=4, soft=True)
        if hybridize:
            binary.hybridize()
            soft.hybridize()
        expect = np.zeros((4, 4))
        expect[3, 3] = 1
        np.testing.assert_array_equal(binary(*args).asnumpy()[0, 0], expect)
        np.testing.assert_allclose(soft(*args).asnumpy()[0, 0], expect_soft, atol=1e-6)


def test_mask_targets_unaligned_soft_are_torchvisions_project_masks_on_boxes():
    """aligned=False (model.mask_head.target_aligned: false) with soft=True: each target is
    RoIAlign(aligned=False, adaptive sampling) of the matched gt mask over the roi, not
    thresholded, i.e. torchvision's project_masks_on_boxes (its roi_align has the sampling and
    border rules of the numpy reference in test_poolers.py). Binary targets threshold the same
    crop at 0.5; the default aligned=True crop differs by the half-pixel shift."""
    from helpers.numpy_reference import np_roi_align
    rng = np.random.RandomState(3)
    H, W, M = 24, 32, 7
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    masks = np.zeros((2, 2, H, W), "uint8")
    masks[0, 0] = ((xx - 12.3) / 8.2) ** 2 + ((yy - 10.1) / 6.4) ** 2 <= 1
    masks[0, 1] = (rng.rand(H, W) > 0.6)
    masks[1, 1, 3:20, 5:9] = 1
    masks[1, 1, 11, 5:30] = 1                         # a 1-pixel line
    rois = [[[3.3, 2.7, 22.1, 18.4], [0.0, 0.0, 9.0, 9.0], [10.2, 5.5, 30.9, 23.1]],
            [[4.25, 1.5, 29.75, 21.0], [2.0, 2.0, 2.5, 2.2], [0.6, 0.4, 31.5, 23.6]]]
    labels = [[3, 1, 2], [1, 2, 0]]
    matched = [[0, 1, 1], [1, 1, -1]]
    args = (nd(rois), nd(labels), nd(matched), nd(masks, "uint8"))
    ref = {}
    for aligned in (False, True):
        ref[aligned] = np.zeros((2, 3, M, M))
        for b in range(2):
            for i in range(3):
                if labels[b][i] > 0:
                    ref[aligned][b, i] = np_roi_align(masks[b, matched[b][i]][None], rois[b][i],
                                                      1.0, M, 0, aligned)[0]
    for hybridize in (False, True):
        soft = MaskTargets(None, resolution=M, aligned=False, soft=True)
        binary = MaskTargets(None, resolution=M, aligned=False)
        default = MaskTargets(None, resolution=M, soft=True)
        if hybridize:
            for block in (soft, binary, default):
                block.hybridize()
        got = soft(*args).asnumpy()
        np.testing.assert_allclose(got, ref[False], rtol=0, atol=1e-6)
        assert ((got > 0.05) & (got < 0.95)).sum() > 20          # fractional cells
        clear = np.abs(ref[False] - 0.5) > 1e-4
        np.testing.assert_array_equal(binary(*args).asnumpy()[clear], (ref[False] >= 0.5)[clear])
        aligned = default(*args).asnumpy()
        np.testing.assert_allclose(aligned, ref[True], rtol=0, atol=1e-6)
        assert np.abs(aligned - got).max() > 0.1


# --------------------------------------------------------------------------------------------
# Keypoint targets
# --------------------------------------------------------------------------------------------
def test_keypoint_targets_hand_case():
    kps = np.zeros((2, 2, 4, 3), "float32")
    kps[0, 0] = [[6, 4, 2],          # the roi's top-left corner -> (0, 0)
                 [14, 12, 1],        # exactly on x2 and y2 -> (55, 55)
                 [10, 8, 0],         # v = 0 -> invalid
                 [14.5, 8, 2]]       # right of the roi -> invalid
    kps[0, 1] = [[2.5, 2.5, 2], [5.1, 1, 2], [0, 4.99, 1], [1, 1, 2]]
    kps[1, 0] = [[3, 7, 2], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
    rois = [[[6, 4, 14, 12], [0, 0, 5, 5], [0, 0, 8, 8]],
            [[2, 6, 4, 10], [0, 0, 1, 1], [0, 0, 1, 1]]]
    labels = [[1, 1, 0], [1, -1, -1]]
    matched = [[0, 1, -1], [0, -1, -1]]
    block = KeypointTargets(num_pos_slots=2, resolution=56)
    for hybridize in (False, True):
        if hybridize:
            block.hybridize()
        targets, valid = [o.asnumpy() for o in block(nd(rois), nd(labels), nd(matched),
                                                      nd(kps))]
        assert targets.shape == (2, 2, 4) and valid.shape == (2, 2, 4)
        np.testing.assert_array_equal(valid, [[[1, 1, 0, 0], [1, 0, 1, 1]],
                                              [[1, 0, 0, 0], [0, 0, 0, 0]]])
        # (2.5, 2.5) in (0,0,5,5): floor(2.5 * 56 / 5) = 28 -> 28 * 56 + 28
        # (0, 4.99): y = floor(4.99 * 11.2) = 55 -> 55 * 56; (1, 1): x = y = floor(11.2) = 11
        # image 1: (3, 7) in (2,6,4,10): x = floor(1 * 28) = 28, y = floor(1 * 14) = 14
        np.testing.assert_array_equal(targets, [[[0, 3135, 0, 0], [1596, 0, 3080, 11 * 57]],
                                                [[14 * 56 + 28, 0, 0, 0], [0, 0, 0, 0]]])


@pytest.mark.parametrize("block_fn", [
    lambda: RPNTargets(batch_size_per_image=8),
    lambda: RoISampler(num_classes=2, batch_size_per_image=8),
])
def test_targets_carry_no_gradient(block_fn):
    block = block_fn()
    boxes = nd([[[0, 0, 10, 10], [5, 5, 20, 20]]])
    boxes.attach_grad()
    gt = nd([[[0, 0, 10, 10]]])
    with mx.autograd.record():
        if isinstance(block, RPNTargets):
            out = block(boxes, gt, nd([[PAD]]), nd([[100, 100, 1]]))
        else:
            out = block(boxes, gt, nd([[0]]))
        loss = sum(o.sum() for o in out)
    loss.backward()
    np.testing.assert_array_equal(boxes.grad.asnumpy(), 0)


def test_batch_gather_takes_each_images_rows():
    from mxmask.modeling._utils import batch_gather
    data = mx.nd.array(np.arange(2 * 4 * 3).reshape(2, 4, 3))
    index = mx.nd.array([[3, 0], [1, 1]])                      # float, as topk returns
    want = [[[9, 10, 11], [0, 1, 2]], [[15, 16, 17], [15, 16, 17]]]
    np.testing.assert_array_equal(batch_gather(mx.nd, data, index).asnumpy(), want)
    out = batch_gather(mx.sym, mx.sym.var("d"), mx.sym.var("i"))
    got = out.eval(ctx=mx.cpu(), d=data, i=index)[0].asnumpy()
    np.testing.assert_array_equal(got, want)

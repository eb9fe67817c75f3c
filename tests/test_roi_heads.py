"""Tests of mxmask.modeling.roi_heads: detect() against numpy and GluonCV, the heads' layouts."""
import math
import warnings

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

from mxmask.config import ConfigError, get_config
from mxmask.modeling.roi_heads import (BoxHead, BoxPredictor, Deconv2D, KeypointHead, MaskHead,
                                       upsample2x_bilinear,
                                       decode_keypoints, detect, detection_settings,
                                       refine_detections, select_class_masks, GLUONCV_SCALE_CLAMP,
                                       mask_quality, rescore_by_masks,
                                       DETECTRON2_SCALE_CLAMP)
from mxmask.utils import UserError
from helpers.numpy_reference import np_group_norm


def shapes_cfg(*extra):
    # 128 FPN channels, as the synthetic features below (independent of the preset's tuning)
    return get_config("shapes", ["model.num_classes=3", "model.num_keypoints=4",
                                 "model.fpn.out_channels=128"] + list(extra))


# --------------------------------------------------------------------------------------------
# numpy reference of the detection post-processing
# --------------------------------------------------------------------------------------------
def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_decode(deltas, rois, weights, clamp):
    w = rois[..., 2] - rois[..., 0]
    h = rois[..., 3] - rois[..., 1]
    cx = rois[..., 0] + 0.5 * w
    cy = rois[..., 1] + 0.5 * h
    dx, dy, dw, dh = [deltas[..., i] / weights[i] for i in range(4)]
    dw = np.minimum(dw, clamp)
    dh = np.minimum(dh, clamp)
    pcx, pcy = dx * w + cx, dy * h + cy
    pw, ph = np.exp(dw) * w, np.exp(dh) * h
    return np.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], axis=-1)


def np_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if inter > 0 else 0.0


def np_detect(logits, deltas, rois, roi_scores, im_info, C, weights=(10, 10, 5, 5),
              score_thresh=0.05, nms_thresh=0.5, max_dets=100, clip=True,
              clamp=DETECTRON2_SCALE_CLAMP):
    """Per image: threshold, greedy per-class NMS, top max_dets; padded like detect()."""
    B, R = rois.shape[:2]
    probs = np_softmax(logits.reshape(B, R, C + 1))[..., 1:]
    boxes = np_decode(deltas.reshape(B, R, C, 4), rois[:, :, None, :], weights, clamp)
    ids = -np.ones((B, max_dets), np.float32)
    scores = -np.ones((B, max_dets), np.float32)
    out_boxes = np.zeros((B, max_dets, 4), np.float32)
    for b in range(B):
        bx = boxes[b].copy()
        if clip:
            h, w = im_info[b, :2]
            bx[..., 0::2] = np.clip(bx[..., 0::2], 0, w)
            bx[..., 1::2] = np.clip(bx[..., 1::2], 0, h)
        kept = []
        for c in range(C):
            cand = [(probs[b, r, c], r) for r in range(R)
                    if probs[b, r, c] > score_thresh and roi_scores[b, r] >= 0]
            cand.sort(key=lambda t: -t[0])
            keep_c = []
            for s, r in cand:
                if all(np_iou(bx[r, c], bx[k, c]) <= nms_thresh for _, k in keep_c):
                    keep_c.append((s, r))
            kept += [(s, c, bx[r, c]) for s, r in keep_c]
        kept.sort(key=lambda t: -t[0])
        for i, (s, c, box) in enumerate(kept[:max_dets]):
            ids[b, i], scores[b, i], out_boxes[b, i] = c, s, box
    return ids, scores, out_boxes


def run_detect(logits, deltas, rois, roi_scores, im_info, **kw):
    outs = detect(mx.nd, mx.nd.array(logits), mx.nd.array(deltas), mx.nd.array(rois),
                  mx.nd.array(roi_scores), mx.nd.array(im_info), **kw)
    return [o.asnumpy() for o in outs]


class DetectBlock(mx.gluon.HybridBlock):
    def __init__(self, **kw):
        super(DetectBlock, self).__init__()
        self.kw = kw

    def hybrid_forward(self, F, logits, deltas, rois, roi_scores, im_info):
        return detect(F, logits, deltas, rois, roi_scores, im_info, **self.kw)


def logits_from_probs(p):
    """Logits whose softmax is exactly-ish p (rows sum to 1)."""
    return np.log(np.asarray(p, np.float64)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# detect()
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hybridize", [False, True])
def test_class_agnostic_detect_equals_class_specific_detect_of_the_shared_box(hybridize):
    """cls_agnostic_bbox_reg: deltas (B*R, 4) decode to one box per roi that every class uses:
    the same detections as class-specific deltas holding that box in every class's columns."""
    rng = np.random.RandomState(4)
    B, R, C = 2, 30, 3
    xy = rng.uniform(0, 80, (B, R, 2))
    rois = np.concatenate([xy, xy + rng.uniform(5, 40, (B, R, 2))], -1).astype(np.float32)
    logits = rng.randn(B * R, C + 1).astype(np.float32) * 2
    deltas = rng.randn(B * R, 4).astype(np.float32) * 0.3
    roi_scores = rng.uniform(0, 1, (B, R)).astype(np.float32)
    im_info = np.array([[100, 110, 1], [90, 120, 1]], np.float32)
    kw = dict(num_classes=C, max_dets=20, score_thresh=0.1)

    def run(d, **extra):
        block = DetectBlock(**dict(kw, **extra))
        if hybridize:
            block.hybridize()
        return [o.asnumpy() for o in block(*[mx.nd.array(a) for a in
                                             (logits, d, rois, roi_scores, im_info)])]
    got = run(deltas, cls_agnostic_bbox_reg=True)
    want = run(np.tile(deltas, (1, C)))
    assert (got[0] >= 0).sum() > 10                     # enough detections to compare
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)


def test_detect_hand_made_case():
    # C = 2 classes, R = 5 rois, zero deltas (boxes = rois)
    rois = np.array([[[0, 0, 10, 10],
                      [1, 1, 11, 11],       # IoU 0.68 with roi 0
                      [50, 50, 60, 70],
                      [20, 20, 30, 30],     # a padded proposal (roi score -1)
                      [80, 0, 90, 10]]], np.float32)
    probs = [[0.1, 0.8, 0.1],    # class 0 kept (0.8); class 1 (0.1) suppressed by roi 1's 0.3
             [0.1, 0.6, 0.3],    # class 0 suppressed by roi 0 (same class); class 1 kept
             [0.9, 0.04, 0.06],  # class 0 under the 0.05 threshold; class 1 kept (0.06)
             [0.05, 0.9, 0.05],  # padded roi: nothing, whatever its scores
             [0.8, 0.12, 0.08]]  # no overlap: both classes kept
    logits = logits_from_probs(probs)
    deltas = np.zeros((5, 8), np.float32)
    roi_scores = np.array([[0.9, 0.8, 0.7, -1, 0.5]], np.float32)
    im_info = np.array([[100, 100, 1]], np.float32)
    ids, scores, boxes = run_detect(logits, deltas, rois, roi_scores, im_info, num_classes=2,
                                    max_dets=6)
    np.testing.assert_array_equal(ids[0], [0, 1, 0, 1, 1, -1])
    np.testing.assert_allclose(scores[0], [0.8, 0.3, 0.12, 0.08, 0.06, -1], rtol=1e-5)
    np.testing.assert_allclose(boxes[0, :5], rois[0, [0, 1, 4, 4, 2]], atol=1e-4)
    np.testing.assert_array_equal(boxes[0, 5], 0)
    # max_dets truncates the lowest scores
    ids, scores, boxes = run_detect(logits, deltas, rois, roi_scores, im_info, num_classes=2,
                                    max_dets=4)
    np.testing.assert_array_equal(ids[0], [0, 1, 0, 1])
    np.testing.assert_allclose(scores[0], [0.8, 0.3, 0.12, 0.08], rtol=1e-5)
    # the same with the numpy reference
    ref = np_detect(logits, deltas, rois, roi_scores, im_info, 2, max_dets=6)
    got = run_detect(logits, deltas, rois, roi_scores, im_info, num_classes=2, max_dets=6)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5)
    np.testing.assert_allclose(got[2], ref[2], atol=1e-4)


def test_detect_min_box_size_drops_small_boxes_before_nms():
    """test.min_box_size (torchvision's remove_small_boxes(1e-2) in postprocess_detections):
    a box under the size is dropped before the NMS, so it suppresses nothing."""
    rois = np.array([[[0, 0, 10, 10], [0, 0, 10.005, 10], [0, 0, 10, 10.02]]], np.float32)
    rois[0, 1, 0] = 10.0                                # width 0.005 after the clip to 10.005
    logits = logits_from_probs([[0.2, 0.8], [0.05, 0.95], [0.3, 0.7]])
    deltas = np.zeros((3, 4), np.float32)
    roi_scores = np.array([[0.9, 0.8, 0.7]], np.float32)
    im_info = np.array([[100, 100, 1]], np.float32)
    args = (logits, deltas, rois, roi_scores, im_info)
    ids, scores, _ = run_detect(*args, num_classes=1, max_dets=3)
    np.testing.assert_allclose(scores[0], [0.95, 0.8, -1], rtol=1e-5)   # 0.7 suppressed by 0.8
    ids, scores, _ = run_detect(*args, num_classes=1, max_dets=3, min_box_size=0.01)
    np.testing.assert_allclose(scores[0], [0.8, -1, -1], rtol=1e-5)     # 0.7: IoU .998 with .8


def random_case(rng, B=2, R=40, C=3, H=100, W=120, delta_scale=0.5):
    xy = rng.uniform(0, [W, H], size=(B, R, 2))
    wh = rng.uniform(4, 50, size=(B, R, 2))
    rois = np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)
    logits = (rng.randn(B * R, C + 1) * 2).astype(np.float32)
    deltas = (rng.randn(B * R, C * 4) * delta_scale).astype(np.float32)
    roi_scores = rng.uniform(0, 1, size=(B, R)).astype(np.float32)
    roi_scores[:, -5:] = -1          # the last rois are padding
    im_info = np.array([[H, W, 1.0]] * B, np.float32)
    im_info[-1, :2] = [H - 30, W - 20]
    return logits, deltas, rois, roi_scores, im_info


@pytest.mark.parametrize("clip", [True, False])
def test_detect_matches_numpy_reference(clip):
    rng = np.random.RandomState(0)
    C = 3
    case = random_case(rng, C=C)
    for max_dets in (15, 200):     # fewer than the valid entries, and more than R*C
        got = run_detect(*case, num_classes=C, max_dets=max_dets, clip=clip)
        ref = np_detect(*case, C, max_dets=max_dets, clip=clip)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got[2], ref[2], rtol=1e-5, atol=1e-3)
        assert got[0].shape == (2, max_dets) and got[2].shape == (2, max_dets, 4)
    if clip:
        h, w = case[4][1, :2]
        assert got[2][1, :, 0::2].max() <= w and got[2][1, :, 1::2].max() <= h
    # some detections are suppressed and padding exists in the 200 case
    assert (got[0] == -1).any() and (got[0] >= 0).sum() > 15


def test_detect_padding_consistent_and_hybrid_equal():
    rng = np.random.RandomState(1)
    case = random_case(rng, C=4)
    kw = dict(num_classes=4, max_dets=60, score_thresh=0.2)
    ids, scores, boxes = run_detect(*case, **kw)
    pad = ids < 0
    assert pad.any() and (~pad).any()
    assert (scores[pad] == -1).all() and (scores[~pad] > 0.2).all()
    assert (boxes[pad] == 0).all()
    for b in range(ids.shape[0]):                       # valid rows first, sorted by score
        n = int((~pad[b]).sum())
        assert (~pad[b, :n]).all()
        assert (np.diff(scores[b, :n]) <= 0).all()
    block = DetectBlock(**kw)
    block.hybridize(static_alloc=True, static_shape=True)
    hyb = block(*[mx.nd.array(a) for a in case])
    for a, h in zip((ids, scores, boxes), hyb):
        np.testing.assert_array_equal(a, h.asnumpy())


def test_detect_matches_gluoncv_decoder():
    """GluonCV's RCNN test path (MultiPerClassDecoder, box_decode clip 4.42, per-class box_nms,
    argsort, top-k) gives the same detections as detect() with the gluoncv preset's settings."""
    gcoder = pytest.importorskip("gluoncv.nn.coder")
    cfg = get_config("gluoncv_mask_rcnn_r50_fpn", ["test.max_dets=100"])
    kw = detection_settings(cfg)
    assert kw["scale_clamp"] == GLUONCV_SCALE_CLAMP and kw["score_thresh"] == 0.01
    assert not kw["clip"] and kw["num_classes"] == 80
    rng = np.random.RandomState(2)
    C, N = 80, 60
    logits, deltas, rois, roi_scores, im_info = random_case(rng, B=1, R=N, C=C, H=300, W=400)
    roi_scores[:] = 0.5
    deltas[:7, 2::4] = 30.0         # far beyond the 4.42 clamp after the 0.2 std
    cls_pred = mx.nd.array(logits).reshape((1, N, C + 1))
    box_pred = mx.nd.array(deltas).reshape((1, N, C, 4))
    cls_ids, scores = gcoder.MultiPerClassDecoder(num_class=C + 1)(mx.nd.softmax(cls_pred, axis=-1))
    cls_ids = cls_ids.transpose((0, 2, 1)).reshape((0, 0, 0, 1))[0]      # (C, N, 1)
    scores = scores.transpose((0, 2, 1)).reshape((0, 0, 0, 1))[0]
    bbox = gcoder.NormalizedBoxCenterDecoder(clip=4.42, convert_anchor=True)(
        box_pred.transpose((0, 2, 1, 3))[0], mx.nd.array(rois))          # (C, N, 4)
    res = mx.nd.concat(cls_ids, scores, bbox, dim=-1)
    res = mx.nd.contrib.box_nms(res, overlap_thresh=0.5, topk=-1, valid_thresh=0.0001,
                                id_index=0, score_index=1, coord_start=2, force_suppress=False)
    res = res.reshape((-3, 0))
    order = mx.nd.argsort(res[:, 1], is_ascend=False)[:100]
    ref = mx.nd.take(res, order).asnumpy()
    ids, sc, boxes = run_detect(logits, deltas, rois, roi_scores, im_info, **kw)
    valid = ref[:, 0] >= 0
    assert valid.sum() > 50
    np.testing.assert_array_equal(ids[0], np.where(valid, ref[:, 0], -1))
    np.testing.assert_array_equal(sc[0][valid], ref[valid, 1])
    np.testing.assert_array_equal(boxes[0][valid], ref[valid, 2:])


# --------------------------------------------------------------------------------------------
# refine_detections() (test.refine_boxes)
# --------------------------------------------------------------------------------------------
class RefineBlock(mx.gluon.HybridBlock):
    def __init__(self, **kw):
        super(RefineBlock, self).__init__()
        self.kw = kw

    def hybrid_forward(self, F, logits, deltas, ids, scores, boxes, im_info):
        return refine_detections(F, logits, deltas, ids, scores, boxes, im_info, **self.kw)


def test_refine_detections_hand_made_case():
    """Two detections and a padding row: each box moves by its own class's deltas (hand-decoded),
    the score is the mean of the two passes', the rows are re-sorted, padding stays padding."""
    ids = np.array([[1, 0, -1]], np.float32)
    scores = np.array([[0.6, 0.5, -1]], np.float32)
    boxes = np.array([[[10, 10, 30, 50], [40, 40, 60, 60], [0, 0, 0, 0]]], np.float32)
    # columns: background, class 0, class 1
    probs = [[0.1, 0.7, 0.2],        # second pass: class 1 at 0.2 -> (0.6 + 0.2) / 2 = 0.4
             [0.1, 0.8, 0.1],        # class 0 at 0.8 -> (0.5 + 0.8) / 2 = 0.65
             [0.2, 0.4, 0.4]]        # padding: ignored
    logits = logits_from_probs(probs)
    deltas = np.zeros((3, 8), np.float32)
    # detection 0 (class 1, box 20 x 40 centred at (20, 30)): dx 0.1 -> +2 px, dh log(2) -> 80 high
    deltas[0, 4:8] = [1.0, 0.0, 0.0, 5 * math.log(2.0)]
    deltas[0, 0:4] = [5.0, 5.0, 1.0, 1.0]                # class 0's deltas: must not be used
    # detection 1 (class 0, 20 x 20 centred at (50, 50)): dy -0.05 -> -1 px
    deltas[1, 0:4] = [0.0, -0.5, 0.0, 0.0]
    deltas[2] = 3.0                                       # padding row: must stay 0
    im_info = np.array([[100, 100, 1]], np.float32)
    for hybridize in (False, True):
        block = RefineBlock(num_classes=2, max_dets=3, score_thresh=0.05)
        if hybridize:
            block.hybridize()
        got = [o.asnumpy() for o in block(*[mx.nd.array(a) for a in
                                            (logits, deltas, ids, scores, boxes, im_info)])]
        np.testing.assert_array_equal(got[0], [[0, 1, -1]])
        np.testing.assert_allclose(got[1], [[0.65, 0.4, -1]], rtol=1e-5)
        np.testing.assert_allclose(got[2][0, 0], [40, 39, 60, 59], atol=1e-4)
        # clipped to the image: y from 30 - 40 = -10 to 30 + 40 = 70
        np.testing.assert_allclose(got[2][0, 1], [12, 0, 32, 70], atol=1e-4)
        np.testing.assert_array_equal(got[2][0, 2], 0)


def test_refine_detections_matches_numpy_and_agnostic_equals_repeated():
    rng = np.random.RandomState(7)
    B, D, C = 2, 12, 4
    xy = rng.uniform(0, 60, (B, D, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (B, D, 2))], -1).astype(np.float32)
    ids = rng.randint(0, C, (B, D)).astype(np.float32)
    ids[:, 9:] = -1
    boxes[:, 9:] = 0
    scores = np.where(ids >= 0, rng.uniform(0.05, 1, (B, D)), -1).astype(np.float32)
    logits = rng.randn(B * D, C + 1).astype(np.float32)
    deltas = (rng.randn(B * D, C * 4) * 0.3).astype(np.float32)
    im_info = np.array([[80, 90, 1], [100, 70, 1]], np.float32)
    got = [o.asnumpy() for o in refine_detections(
        mx.nd, *[mx.nd.array(a) for a in (logits, deltas, ids, scores, boxes, im_info)],
        num_classes=C)]
    # numpy: per valid row, its class's deltas and probability
    probs = np_softmax(logits.reshape(B, D, C + 1))[..., 1:]
    cls = np.maximum(ids, 0).astype(int)
    d = deltas.reshape(B, D, C, 4)[np.arange(B)[:, None], np.arange(D)[None], cls]
    ref_boxes = np_decode(d, boxes, (10, 10, 5, 5), DETECTRON2_SCALE_CLAMP)
    for b in range(B):
        ref_boxes[b, :, 0::2] = np.clip(ref_boxes[b, :, 0::2], 0, im_info[b, 1])
        ref_boxes[b, :, 1::2] = np.clip(ref_boxes[b, :, 1::2], 0, im_info[b, 0])
    p = probs[np.arange(B)[:, None], np.arange(D)[None], cls]
    ref_scores = np.where(ids >= 0, (scores + p) / 2, -1)
    ref_boxes[ids < 0] = 0
    for b in range(B):
        order = np.argsort(-ref_scores[b], kind="stable")
        np.testing.assert_array_equal(got[0][b], ids[b, order])
        np.testing.assert_allclose(got[1][b], ref_scores[b, order], rtol=1e-5)
        np.testing.assert_allclose(got[2][b], ref_boxes[b, order], atol=1e-3)
    # class-agnostic deltas (B*D, 4) = class-specific ones holding the same box for every class
    shared = deltas[:, :4]
    outs = [[o.asnumpy() for o in refine_detections(
        mx.nd, *[mx.nd.array(a) for a in (logits, dd, ids, scores, boxes, im_info)],
        num_classes=C, cls_agnostic_bbox_reg=agn)]
        for dd, agn in ((shared, True), (np.tile(shared, (1, C)), False))]
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)


def test_detection_settings():
    d2 = detection_settings(get_config("mask_rcnn_r50_fpn"))
    assert d2["scale_clamp"] == DETECTRON2_SCALE_CLAMP == math.log(1000 / 16)
    assert d2["clip"] and not d2["decode_plus_one"] and d2["score_thresh"] == 0.05
    assert d2["bbox_reg_weights"] == (10.0, 10.0, 5.0, 5.0) and d2["max_dets"] == 100
    g = detection_settings(get_config("gluoncv_mask_rcnn_r50_fpn"))
    assert g["decode_plus_one"] and not g["clip"] and g["nms_thresh"] == 0.5


# --------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------
def features(B=2, C=128, H=64, W=80, seed=0):
    rng = np.random.RandomState(seed)
    return [mx.nd.array(rng.randn(B, C, H // s, W // s).astype(np.float32))
            for s in (4, 8, 16, 32)]


def test_box_head_and_predictor_shapes():
    cfg = shapes_cfg()
    head = BoxHead(cfg)
    head.initialize()
    pred = BoxPredictor(head.out_units, 3)
    pred.initialize()
    rois = mx.nd.array(np.tile([[[4, 4, 40, 30], [0, 0, 0, 0], [10, 20, 60, 60]]], (2, 1, 1)))
    x = head(rois, *features())
    assert x.shape == (6, cfg.model.box_head.fc_dim)
    cls, box = pred(x)
    assert cls.shape == (6, 4) and box.shape == (6, 12)
    assert np.isfinite(x.asnumpy()).all()


def test_box_head_convs_with_group_norm_match_reference():
    """Detectron2's "4conv1fc" GN box head: num_conv x (3x3 conv without bias, GroupNorm, ReLU)
    then the fc layers, equal to a reference built from Convolution and a numpy GroupNorm, in
    imperative and hybridized mode, with Detectron2's parameter names."""
    cfg = shapes_cfg("model.box_head.num_conv=2", "model.box_head.conv_dim=32",
                     "model.box_head.norm=gn", "model.box_head.num_fc=1",
                     "model.box_head.fc_dim=24", "model.backbone.gn_groups=8")
    head = BoxHead(cfg, prefix="box_head_")
    head.initialize(mx.init.Normal(0.05))
    for p in head.collect_params().values():
        if p.name.endswith(("gamma", "beta")):
            p.set_data(mx.nd.random.uniform(0.5, 1.5, shape=p.shape))
    names = sorted(k[len("box_head_"):] for k in head.collect_params()
                   if not k.endswith(("affine_mean", "affine_var")))
    assert names == ["conv1_norm_beta", "conv1_norm_gamma", "conv1_weight",
                     "conv2_norm_beta", "conv2_norm_gamma", "conv2_weight",
                     "fc1_bias", "fc1_weight"]
    assert head.out_units == 24
    pooled = mx.nd.random.normal(shape=(5, 128, 7, 7))
    x = pooled.asnumpy()
    for i in (1, 2):
        conv = head.convs[3 * (i - 1)]
        norm = head.convs[3 * (i - 1) + 1]
        y = mx.nd.Convolution(mx.nd.array(x), conv.weight.data(), kernel=(3, 3), pad=(1, 1),
                              num_filter=32, no_bias=True).asnumpy()
        x = np.maximum(np_group_norm(y, 8, norm.gamma.data().asnumpy(),
                                     norm.beta.data().asnumpy())[0], 0)
    fc = head.fcs[0]
    want = np.maximum(x.reshape(5, -1) @ fc.weight.data().asnumpy().T + fc.bias.data().asnumpy(), 0)
    got = head.fcs(mx.nd.flatten(head.convs(pooled))).asnumpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    rois = mx.nd.array(np.tile([[[4, 4, 40, 30], [10, 20, 60, 60]]], (2, 1, 1)))
    imperative = head(rois, *features()).asnumpy()
    head.hybridize()
    np.testing.assert_allclose(head(rois, *features()).asnumpy(), imperative, rtol=1e-5,
                               atol=1e-6)


def test_gluoncv_box_head_matches_gluoncv_layers():
    """pool_then_avgpool: RoIAlign at 14, AvgPool 3x3/2 pad 1 (count_include_pad), 2 x fc+ReLU,
    equal to GluonCV's box_features on the same pooled input and weights."""
    cfg = get_config("gluoncv_mask_rcnn_r50_fpn", ["model.box_head.fc_dim=64"])
    head = BoxHead(cfg)
    head.initialize(mx.init.Normal(0.01))
    assert head.pooler.output_size == (14, 14) and head.out_units == 64
    ref = nn.HybridSequential()
    ref.add(nn.AvgPool2D(pool_size=(3, 3), strides=2, padding=1))
    for _ in range(2):
        ref.add(nn.Dense(64), nn.Activation("relu"))
    ref.initialize()
    pooled = mx.nd.random.normal(shape=(5, 256, 14, 14))
    ref(pooled)
    ref[1].weight.set_data(head.fcs[0].weight.data())
    ref[1].bias.set_data(mx.nd.random.normal(shape=(64,)))
    head.fcs[0].bias.set_data(ref[1].bias.data())
    ref[3].weight.set_data(head.fcs[1].weight.data())
    ref[3].bias.set_data(head.fcs[1].bias.data())
    ours = head.fcs(mx.nd.flatten(head.avgpool(pooled)))
    np.testing.assert_allclose(ours.asnumpy(), ref(pooled).asnumpy(), rtol=1e-5, atol=1e-6)


def test_mask_head_matches_gluoncv_mask_block():
    """Same computation as GluonCV's Mask head (4 conv+ReLU, deconv, ReLU, 1x1) with copied
    weights: the converter copies mask.deconv.{0,2,4,6,8} and mask.mask one to one."""
    mrcnn = pytest.importorskip("gluoncv.model_zoo.rcnn.mask_rcnn.mask_rcnn")
    cfg = get_config("gluoncv_mask_rcnn_r50_fpn", ["model.num_classes=5",
                                                   "model.mask_head.conv_dim=32",
                                                   "model.fpn.out_channels=32"])
    head = MaskHead(cfg)
    head.initialize(mx.init.Normal(0.05))
    g = mrcnn.Mask(1, ["c%d" % i for i in range(5)], 32, num_fcn_convs=4)
    g.initialize()
    x = mx.nd.random.normal(shape=(3, 32, 14, 14))
    g(x)
    ours = list(head.convs) + [head.deconv, head.predictor]
    theirs = [g.deconv[i] for i in (0, 2, 4, 6, 8)] + [g.mask]
    for a, b in zip(ours, theirs):
        b.weight.set_data(a.weight.data())
        b.bias.set_data(a.bias.data() + 0.01)
        a.bias.set_data(b.bias.data())
    out = head.predictor(head.deconv(head.convs(x)))
    np.testing.assert_allclose(out.asnumpy(), g(x).asnumpy()[0], rtol=1e-4, atol=1e-5)
    rois = mx.nd.array([[[0, 0, 20, 20], [0, 0, 0, 0]]])
    full = head(rois, *features(B=1, C=32))
    assert full.shape == (2, 5, 28, 28)


@pytest.mark.parametrize("head_cls,key,conv_format", [(MaskHead, "mask_head", "mask_fcn%d_"),
                                                      (KeypointHead, "keypoint_head", "conv_fcn%d_")])
def test_mask_and_keypoint_heads_with_group_norm_match_reference(head_cls, key, conv_format):
    """``model.mask_head.norm=gn`` / ``model.keypoint_head.norm=gn`` (Detectron2's
    ROI_MASK_HEAD.NORM): each 3x3 conv loses its bias and is followed by a GroupNorm, then the
    ReLU; the conv stack equals Convolution + a numpy GroupNorm, and the whole head gives the
    same output hybridized. Without it the convs keep their biases and have no norm."""
    extra = ["model.%s.num_conv=2" % key, "model.%s.conv_dim=32" % key,
             "model.backbone.gn_groups=8"]
    if key == "mask_head":
        extra.append("model.mask_head.image_guide=0")       # P2..P5 only (the preset: 32)
    plain = head_cls(shapes_cfg(*(extra + ["model.%s.norm=" % key])), prefix="head_")
    assert not [k for k in plain.collect_params() if "norm" in k]
    head = head_cls(shapes_cfg(*(extra + ["model.%s.norm=gn" % key])), prefix="head_")
    head.initialize(mx.init.Normal(0.05))
    for p in head.collect_params().values():
        if p.name.endswith(("gamma", "beta")):
            p.set_data(mx.nd.random.uniform(0.5, 1.5, shape=p.shape))
    conv_names = sorted(k[len("head_"):] for k in head.collect_params()
                        if k.startswith("head_" + conv_format[:-3])
                        and not k.endswith(("affine_mean", "affine_var")))
    want_names = []
    for i in (1, 2):
        prefix = conv_format % i
        want_names += [prefix + "norm_beta", prefix + "norm_gamma", prefix + "weight"]
    assert conv_names == sorted(want_names)
    pooled = mx.nd.random.normal(shape=(3, 128, 14, 14))
    x = pooled.asnumpy()
    for i in (1, 2):
        conv, norm = head.convs[3 * (i - 1)], head.convs[3 * (i - 1) + 1]
        y = mx.nd.Convolution(mx.nd.array(x), conv.weight.data(), kernel=(3, 3), pad=(1, 1),
                              num_filter=32, no_bias=True).asnumpy()
        x = np.maximum(np_group_norm(y, 8, norm.gamma.data().asnumpy(),
                                     norm.beta.data().asnumpy())[0], 0)
    np.testing.assert_allclose(head.convs(pooled).asnumpy(), x, rtol=1e-4, atol=1e-5)
    rois = mx.nd.array(np.tile([[[4, 4, 40, 30], [10, 20, 60, 60]]], (2, 1, 1)))
    imperative = head(rois, *features()).asnumpy()
    head.hybridize()
    np.testing.assert_allclose(head(rois, *features()).asnumpy(), imperative, rtol=1e-5,
                               atol=1e-6)


IMAGE_GUIDE_ROIS = np.array([[[4.3, 4.6, 40.2, 30.1], [30, 20, 60, 60]],
                             [[10.5, 8.25, 33, 50.5], [0, 0, 9, 9]]], np.float32)


def image_guide_case(head_cls, key, extra):
    """(head with ``model.<key>.image_guide=8`` and random weights, its parameters on the
    image side, rois, P2..P5, image (2, 3, 64, 80), the numpy RoIAlign of each roi's crop at
    ``S`` x ``S``: crops(S) -> (4, 3, S, S))."""
    from helpers.numpy_reference import np_roi_align
    plain = head_cls(shapes_cfg(*(extra + ["model.%s.image_guide=0" % key])), prefix="head_")
    assert not [k for k in plain.collect_params() if "image" in k]
    head = head_cls(shapes_cfg(*(extra + ["model.%s.image_guide=8" % key])), prefix="head_")
    head.initialize(mx.init.Normal(0.1))
    for p in head.collect_params().values():
        if p.name.endswith(("gamma", "beta", "bias")):
            p.set_data(mx.nd.random.uniform(0.5, 1.5, shape=p.shape))
    names = sorted(k[len("head_"):] for k in head.collect_params()
                   if ("image" in k or "fuse" in k) and not k.endswith(("affine_mean",
                                                                        "affine_var")))
    image = np.random.RandomState(3).randn(2, 3, 64, 80).astype(np.float32)

    def crops(size):
        return np.stack([np_roi_align(image[b], IMAGE_GUIDE_ROIS[b, r], 1.0, size, 0, True)
                         for b in range(2) for r in range(2)]).astype(np.float32)
    return head, names, features(), image, crops


def check_image_guide_locality_and_hybrid(head, levels, image, want):
    """The head's output on IMAGE_GUIDE_ROIS equals ``want``; pixels outside every roi (one px
    of bilinear reach aside) change nothing, pixels inside roi 0 of image 0 only its output;
    hybridized equal."""
    rois = mx.nd.array(IMAGE_GUIDE_ROIS)

    def run(img):
        return head(rois, *(levels + [mx.nd.array(img)])).asnumpy()
    got = run(image)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    outside = image.copy()
    outside[:, :, :, 62:] = 0
    outside[0, :, 32:, :28] = 5
    outside[1, :, 52:, :10] = 5
    changed = image.copy()
    changed[0, :, 10:20, 10:20] += 3
    for img, diff in ((outside, []), (changed, [0])):
        out = run(img)
        assert [i for i in range(4) if np.abs(out[i] - got[i]).max() > 1e-5] == diff
    head.hybridize()
    np.testing.assert_allclose(run(image), got, rtol=1e-5, atol=1e-5)


def np_conv_relu(x, conv):
    y = mx.nd.Convolution(mx.nd.array(x), conv.weight.data(), conv.bias.data(),
                          kernel=(3, 3), pad=(1, 1), num_filter=conv.weight.shape[0]).asnumpy()
    return np.maximum(y, 0)


def test_mask_head_image_guide_matches_reference():
    """``model.mask_head.image_guide`` = g: the head also pools each roi from the input image at
    28x28 (stride 1, aligned, adaptive sampling: the numpy RoIAlign of test_poolers), a 3x3
    conv + ReLU makes g channels of it, and a 3x3 conv + GroupNorm + ReLU maps [the deconv
    output, those g] to g channels before the predictor; recomputed with Convolution and a
    numpy GroupNorm. Without the option there are no such layers."""
    head, names, levels, image, crops = image_guide_case(
        MaskHead, "mask_head", ["model.mask_head.num_conv=1", "model.mask_head.conv_dim=16",
                                "model.backbone.gn_groups=8", "model.mask_head.norm=gn"])
    assert names == ["image_conv_bias", "image_conv_weight", "mask_fuse1_norm_beta",
                     "mask_fuse1_norm_gamma", "mask_fuse1_weight"]
    assert head.predictor.weight.shape == (3, 8, 1, 1)
    rois = mx.nd.array(IMAGE_GUIDE_ROIS)
    x = head.deconv(head.convs(head.pooler(rois, *levels))).asnumpy()
    pixels = np_conv_relu(crops(28), head.image.conv)
    fuse_conv, fuse_norm = head.fuse[0], head.fuse[1]
    y = mx.nd.Convolution(mx.nd.array(np.concatenate([x, pixels], axis=1)),
                          fuse_conv.weight.data(), kernel=(3, 3), pad=(1, 1), num_filter=8,
                          no_bias=True).asnumpy()
    y = np.maximum(np_group_norm(y, 8, fuse_norm.gamma.data().asnumpy(),
                                 fuse_norm.beta.data().asnumpy())[0], 0)
    want = mx.nd.Convolution(mx.nd.array(y.astype(np.float32)), head.predictor.weight.data(),
                             head.predictor.bias.data(), kernel=(1, 1), num_filter=3).asnumpy()
    assert want.shape == (4, 3, 28, 28)
    check_image_guide_locality_and_hybrid(head, levels, image, want)


def test_mask_head_image_guide_error():
    with pytest.raises(UserError, match="model.mask_head.image_guide: expected"):
        MaskHead(shapes_cfg("model.mask_head.image_guide=-1"))


@pytest.mark.parametrize("kernel,padding,activation", [(2, 0, "relu"), (4, 1, None)])
def test_deconv2d_equals_conv2d_transpose(kernel, padding, activation):
    """Deconv2D (bias added after the operator) = nn.Conv2DTranspose: parameter names and
    shapes, outputs and the gradients of the input, weight and bias, hybridized or not."""
    rng = np.random.RandomState(3)
    x = mx.nd.array(rng.randn(3, 6, 5, 7).astype(np.float32))
    outs = []
    for cls in (nn.Conv2DTranspose, Deconv2D):
        block = cls(4, kernel, strides=2, padding=padding, in_channels=6, activation=activation,
                    prefix="deconv_")
        block.initialize(mx.init.Normal(0.5))
        block.bias.set_data(mx.nd.array(rng.randn(4).astype(np.float32)))
        outs.append(block)
    ref, got = outs
    got.weight.set_data(ref.weight.data())
    got.bias.set_data(ref.bias.data())
    assert sorted(got.collect_params()) == sorted(ref.collect_params())
    head = mx.nd.array(rng.randn(3, 4, 10, 14).astype(np.float32))   # d loss / d output
    for hybridize in (False, True):
        results = []
        for block in (ref, got):
            if hybridize:
                block.hybridize()
            results.append(list(_forward_backward(block, x, head)) +
                           [block.weight.grad().asnumpy(), block.bias.grad().asnumpy()])
        for a, b in zip(*results):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_select_class_masks():
    logits = np.zeros((2 * 3, 4, 28, 28), np.float32)
    for i in range(6):
        for c in range(4):
            logits[i, c] = i * 10 + c
    ids = np.array([[2, 0, -1], [3, 1, 1]], np.float32)
    out = select_class_masks(mx.nd, mx.nd.array(logits), mx.nd.array(ids), 4).asnumpy()
    assert out.shape == (2, 3, 28, 28)
    expect = 1 / (1 + np.exp(-np.array([[2, 10, 20], [33, 41, 51]], np.float64)))
    np.testing.assert_allclose(out[:, :, 5, 7], expect, rtol=1e-6)


@pytest.mark.parametrize("hybridize", [False, True])
def test_rescore_by_masks_hand_made_case(hybridize):
    """test.mask_score: score x the mean probability of the mask cells >= threshold (0 for an
    empty mask), padding rows kept at -1 and last, every output re-sorted by the new score."""
    masks = np.zeros((1, 4, 28, 28), np.float32)
    masks[0, 0, :2, :] = 0.6                  # maskness 0.6 -> 0.9 * 0.6 = 0.54
    masks[0, 0, 2:4, :] = 0.2                 # below the threshold: not foreground
    masks[0, 1, :, :] = 1.0                   # maskness 1 -> 0.8
    masks[0, 2, 0, 0] = 0.4                   # nothing >= 0.5: maskness 0 -> 0
    masks[0, 3, :, :] = 0.9                   # padding row: stays -1
    ids = np.array([[2, 0, 1, -1]], np.float32)
    scores = np.array([[0.9, 0.8, 0.7, -1]], np.float32)
    boxes = np.arange(16, dtype=np.float32).reshape(1, 4, 4)

    class Rescore(mx.gluon.HybridBlock):
        def hybrid_forward(self, F, ids, scores, masks, boxes):
            return rescore_by_masks(F, ids, scores, masks, 0.5, boxes)

    block = Rescore()
    if hybridize:
        block.hybridize()
    out = [o.asnumpy() for o in block(*[mx.nd.array(a) for a in (ids, scores, masks, boxes)])]
    np.testing.assert_allclose(mask_quality(mx.nd, mx.nd.array(masks), 0.5).asnumpy(),
                               [[0.6, 1.0, 0.0, 0.9]], rtol=1e-6)
    order = [1, 0, 2, 3]
    np.testing.assert_array_equal(out[0], ids[:, order])
    np.testing.assert_allclose(out[1], [[0.8, 0.54, 0.0, -1]], rtol=1e-6)
    np.testing.assert_array_equal(out[2], masks[:, order])
    np.testing.assert_array_equal(out[3], boxes[:, order])


def np_upsample2_half_pixel(x):
    """Bilinear x2 with half-pixel centres (torch align_corners=False) on the last two axes."""
    def matrix(n):
        src = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, None)
        i0 = np.minimum(np.floor(src).astype(int), n - 1)
        i1 = np.minimum(i0 + 1, n - 1)
        m = np.zeros((2 * n, n))
        m[np.arange(2 * n), i0] += 1 - (src - i0)
        m[np.arange(2 * n), i1] += src - i0
        return m
    mh, mw = matrix(x.shape[-2]), matrix(x.shape[-1])
    return np.einsum("ij,...jk,lk->...il", mh, x, mw)


def test_keypoint_head_shapes_and_upsampling():
    cfg = shapes_cfg()
    head = KeypointHead(cfg)
    head.initialize(mx.init.Normal(0.05))
    rois = mx.nd.array([[[0, 0, 30, 40], [5, 5, 60, 60]], [[0, 0, 0, 0], [10, 0, 20, 8]]])
    feats = features()
    out = head(rois, *feats)
    assert out.shape == (4, 4, 56, 56)
    low = head.deconv(head.convs(head.pooler(rois, *feats)))
    assert low.shape == (4, 4, 28, 28)
    np.testing.assert_allclose(out.asnumpy(), np_upsample2_half_pixel(low.asnumpy()),
                               rtol=1e-4, atol=1e-4)


def test_decode_keypoints_hand_made():
    S = 56
    hm = np.full((1, 2, 3, S, S), -5.0, np.float32)
    hm[0, 0, 0, 20, 10] = 7.0      # py=20, px=10
    hm[0, 0, 1, 0, 55] = 3.0
    hm[0, 0, 2, 55, 0] = 1.0
    hm[0, 1, :, 3, 4] = 2.0
    boxes = np.array([[[100, 50, 156, 162], [0, 0, 0, 0]]], np.float32)
    kp = decode_keypoints(mx.nd, mx.nd.array(hm), mx.nd.array(boxes), S).asnumpy()
    assert kp.shape == (1, 2, 3, 3)
    np.testing.assert_allclose(kp[0, 0, 0], [100 + 10.5, 50 + 20.5 * 2, 7.0], rtol=1e-6)
    np.testing.assert_allclose(kp[0, 0, 1], [100 + 55.5, 50 + 0.5 * 2, 3.0], rtol=1e-6)
    np.testing.assert_allclose(kp[0, 0, 2], [100 + 0.5, 50 + 55.5 * 2, 1.0], rtol=1e-6)
    # a zero-size (padding) box: width clamped to 1 pixel
    np.testing.assert_allclose(kp[0, 1, 0], [4.5 / S, 3.5 / S, 2.0], rtol=1e-5)


def test_head_errors():
    with pytest.raises(ValueError):
        KeypointHead(shapes_cfg("model.keypoint_head.resolution=28"))
    with pytest.raises(ValueError):
        detection_settings(shapes_cfg("test.max_dets=0"))
    for key, head_cls in (("box_head", BoxHead), ("mask_head", MaskHead),
                          ("keypoint_head", KeypointHead)):
        with pytest.raises(ConfigError, match="model.%s.norm" % key):
            shapes_cfg("model.%s.norm=bn" % key)
        # a config built in code passes no --set check: the head refuses it itself
        cfg = shapes_cfg()
        setattr(getattr(cfg.model, key), "norm", "bn")
        with pytest.raises(UserError, match="model.%s.norm: expected '' or 'gn'" % key):
            head_cls(cfg)
    with pytest.raises(UserError, match="gn_groups=16 does not divide .* conv_dim=40"):
        BoxHead(shapes_cfg("model.box_head.num_conv=1", "model.box_head.norm=gn",
                           "model.box_head.conv_dim=40"))


def _forward_backward(fn, x, head):
    x = x.copy()
    x.attach_grad()
    with mx.autograd.record():
        y = fn(x)
        loss = (y * head).sum()
    loss.backward()
    return y.asnumpy(), x.grad.asnumpy()


def test_upsample2x_bilinear_equals_bilinear_resize_with_gradients():
    rng = np.random.RandomState(1)
    x = mx.nd.array(rng.randn(2, 3, 6, 6))
    head = mx.nd.array(rng.randn(2, 3, 12, 12))
    ya, ga = _forward_backward(lambda v: mx.nd.contrib.BilinearResize2D(
        v, height=12, width=12, align_corners=False), x, head)
    yb, gb = _forward_backward(lambda v: upsample2x_bilinear(mx.nd, v, 3), x, head)
    np.testing.assert_allclose(yb, ya, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(yb, np_upsample2_half_pixel(x.asnumpy()), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gb, ga, rtol=1e-5, atol=1e-5)

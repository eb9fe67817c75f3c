"""Tests of mxmask.modeling.proposals.ProposalGenerator against numpy references and GluonCV.

Inputs per level: anchors (1, N_l, 4), logits (B, N_l), deltas (B, N_l, 4); im_info (B, 3).
Outputs: rois (B, post, 4) xyxy and scores (B, post) sigmoid, padded with score -1 / box 0.
The numpy references (own greedy NMS with box_nms's IoU rules) must give the same kept boxes in
the same order.
"""
import math

import numpy as np
import mxnet as mx
import pytest

from mxmask.modeling.proposals import ProposalGenerator

nd = mx.nd
D2_CLAMP = math.log(1000.0 / 16)


# ------------------------------------------------------------------------------------------
# numpy reference
# ------------------------------------------------------------------------------------------
def np_nms(boxes, scores, thresh):
    """Greedy NMS, highest score first; IoU as contrib.box_nms (no +1, suppress iou > thresh)."""
    boxes = boxes.astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    areas = np.where((w < 0) | (h < 0), np.float32(0), w * h)
    suppressed = np.zeros(len(boxes), bool)
    keep = []
    for n, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[n + 1:]
        iw = np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0])
        ih = np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1])
        inter = np.maximum(iw, 0) * np.maximum(ih, 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[iou > thresh]] = True
    return np.array(keep, dtype=np.int64)


def np_decode(d, a, clamp):
    d = d.astype(np.float32)
    a = a.astype(np.float32)
    w = a[:, 2] - a[:, 0]
    h = a[:, 3] - a[:, 1]
    cx = a[:, 0] + w * np.float32(0.5)
    cy = a[:, 1] + h * np.float32(0.5)
    pcx = d[:, 0] * w + cx
    pcy = d[:, 1] * h + cy
    dw = np.minimum(d[:, 2], np.float32(clamp)) if clamp else d[:, 2]
    dh = np.minimum(d[:, 3], np.float32(clamp)) if clamp else d[:, 3]
    pw = np.exp(dw.astype(np.float64)).astype(np.float32) * w * np.float32(0.5)
    ph = np.exp(dh.astype(np.float64)).astype(np.float32) * h * np.float32(0.5)
    return np.stack([pcx - pw, pcy - ph, pcx + pw, pcy + ph], axis=1)


def np_clip(boxes, h, w):
    return np.minimum(np.maximum(boxes, 0), np.array([w, h, w, h], np.float32))


def _size_keep(boxes, min_size, plus_one, style):
    p = 1.0 if plus_one else 0.0
    w = boxes[:, 2] - boxes[:, 0] + p
    h = boxes[:, 3] - boxes[:, 1] + p
    if style == "detectron2":
        return (w > min_size) & (h > min_size)
    return (w >= min_size) & (h >= min_size)


def sigmoid(x):
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def ref_per_level(im_info, anchors, logits, deltas, pre, post, thresh, min_size, plus_one=False,
                  style="detectron2", clamp=D2_CLAMP):
    B = logits[0].shape[0]
    rois = np.zeros((B, post, 4), np.float32)
    scores = -np.ones((B, post), np.float32)
    for b in range(B):
        h, w = im_info[b, :2]
        all_boxes, all_logits = [], []
        for anc, lg, dl in zip(anchors, logits, deltas):
            lg = lg[b]
            idx = np.argsort(-lg, kind="stable")[:min(pre, len(lg))]
            boxes = np_decode(dl[b][idx], anc[0][idx], clamp)
            ok = np.isfinite(boxes).all(axis=1) & np.isfinite(lg[idx])
            boxes = np_clip(boxes, h, w)
            ok &= _size_keep(boxes, min_size, plus_one, style)
            boxes, s = boxes[ok], lg[idx][ok]
            keep = np_nms(boxes, s, thresh)
            all_boxes.append(boxes[keep])
            all_logits.append(s[keep])
        boxes = np.concatenate(all_boxes)
        s = np.concatenate(all_logits)
        order = np.argsort(-s, kind="stable")[:post]
        rois[b, :len(order)] = boxes[order]
        scores[b, :len(order)] = sigmoid(s[order])
    return rois, scores


def ref_all_levels(im_info, anchors, logits, deltas, pre, post, thresh, min_size, plus_one=True,
                   style="gluoncv", clamp=4.42):
    B = logits[0].shape[0]
    anc = np.concatenate([a[0] for a in anchors])
    rois = np.zeros((B, post, 4), np.float32)
    scores = -np.ones((B, post), np.float32)
    for b in range(B):
        h, w = im_info[b, :2]
        lg = np.concatenate([l[b] for l in logits])
        dl = np.concatenate([d[b] for d in deltas])
        boxes = np_clip(np_decode(dl, anc, clamp), h, w)
        s = sigmoid(lg)
        s[~_size_keep(boxes, min_size, plus_one, style)] = -1
        valid = np.nonzero(s > 0)[0]
        cand = valid[np.argsort(-s[valid], kind="stable")[:pre]]
        keep = cand[np_nms(boxes[cand], s[cand], thresh)][:post]
        rois[b, :len(keep)] = boxes[keep]
        scores[b, :len(keep)] = s[keep]
    return rois, scores


# ------------------------------------------------------------------------------------------
def _random_inputs(seed, sizes, B=2, img=(240, 320)):
    rng = np.random.RandomState(seed)
    anchors, logits, deltas = [], [], []
    for k, n in enumerate(sizes):
        xy = rng.uniform(-40, max(img) + 20, (1, n, 2))
        wh = rng.uniform(4, 40 * (k + 1), (1, n, 2))
        anchors.append(np.concatenate([xy, xy + wh], -1).astype(np.float32))
        logits.append((rng.randn(B, n) * 2).astype(np.float32))
        deltas.append((rng.randn(B, n, 4) * 0.4).astype(np.float32))
    im_info = np.array([[img[0], img[1], 1.0], [img[0] - 50, img[1] - 20, 1.5]][:B], np.float32)
    return im_info, anchors, logits, deltas


def _run(gen, im_info, anchors, logits, deltas, train=False):
    arrays = [nd.array(im_info)] + [nd.array(x) for x in anchors + logits + deltas]
    with mx.autograd.train_mode() if train else mx.autograd.predict_mode():
        rois, scores = gen(*arrays)
    return rois.asnumpy(), scores.asnumpy()


def _check(out, ref, min_valid=1):
    rois, scores = out
    ref_rois, ref_scores = ref
    assert rois.shape == ref_rois.shape and scores.shape == ref_scores.shape
    np.testing.assert_array_equal(scores < 0, ref_scores < 0)   # same number of proposals
    assert ((scores >= 0).sum(axis=1) >= min_valid).all()
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rois, ref_rois, rtol=1e-5, atol=1e-3)
    # padded rows: score -1 and box 0
    assert (rois[scores < 0] == 0).all()
    assert (scores[scores < 0] == -1).all()


@pytest.mark.parametrize("hybridize", [False, True])
@pytest.mark.parametrize("plus_one,min_size", [(False, 0.0), (True, 6.0)])
def test_per_level_nms_matches_numpy(hybridize, plus_one, min_size):
    # the last level has fewer anchors than pre_nms_topk (all of them are used)
    im_info, anchors, logits, deltas = _random_inputs(0, [1500, 400, 120, 40])
    gen = ProposalGenerator(300, 100, 500, 150, 0.7, min_size, per_level_nms=True,
                            plus_one=plus_one, style="detectron2", num_levels=4)
    gen.initialize()
    if hybridize:
        gen.hybridize()
    for train, pre, post in [(False, 100, 150), (True, 300, 500)]:
        out = _run(gen, im_info, anchors, logits, deltas, train=train)
        ref = ref_per_level(im_info, anchors, logits, deltas, pre, post, 0.7, min_size, plus_one)
        _check(out, ref, min_valid=100)
    # with train counts the 4 levels give < 500 proposals: padding must appear
    assert (out[1] < 0).any()


@pytest.mark.parametrize("hybridize", [False, True])
def test_all_levels_nms_matches_numpy(hybridize):
    im_info, anchors, logits, deltas = _random_inputs(1, [1500, 400, 120, 40])
    gen = ProposalGenerator(1200, 600, 400, 200, 0.7, 1.0, per_level_nms=False, plus_one=True,
                            style="gluoncv")
    gen.initialize()
    if hybridize:
        gen.hybridize()
    for train, pre, post in [(False, 600, 200), (True, 1200, 400)]:
        out = _run(gen, im_info, anchors, logits, deltas, train=train)
        ref = ref_all_levels(im_info, anchors, logits, deltas, pre, post, 0.7, 1.0)
        _check(out, ref, min_valid=150)


def test_min_size_rules_and_padding():
    """Anchors outside the image clip to empty boxes and are dropped; few boxes -> padding."""
    anchors = np.array([[[10, 10, 50, 50], [400, 10, 450, 50], [10, 10, 14, 60], [60, 60, 90, 95]]],
                       np.float32)
    logits = np.array([[3.0, 2.0, 1.0, 0.5]], np.float32)
    deltas = np.zeros((1, 4, 4), np.float32)
    im_info = np.array([[100, 100, 1]], np.float32)
    # detectron2: keep w > 4 -> box 1 (outside, width 0) and box 2 (width 4) are dropped
    gen = ProposalGenerator(10, 10, 10, 6, 0.7, 4.0, per_level_nms=True)
    gen.initialize()
    rois, scores = _run(gen, im_info, [anchors], [logits], [deltas])
    np.testing.assert_allclose(rois[0, :2], [[10, 10, 50, 50], [60, 60, 90, 95]])
    np.testing.assert_allclose(scores[0, :2], sigmoid(np.array([3.0, 0.5])), rtol=1e-6)
    assert (scores[0, 2:] == -1).all() and (rois[0, 2:] == 0).all()
    # gluoncv with +1: width 4 + 1 = 5 >= 4 is kept, the empty clipped box (0 + 1 < 4) is not
    gen = ProposalGenerator(10, 10, 10, 6, 0.7, 4.0, per_level_nms=False, plus_one=True,
                            style="gluoncv")
    gen.initialize()
    rois, scores = _run(gen, im_info, [anchors], [logits], [deltas])
    np.testing.assert_allclose(rois[0, :3], [[10, 10, 50, 50], [10, 10, 14, 60], [60, 60, 90, 95]])
    assert (scores[0, 3:] == -1).all() and (rois[0, 3:] == 0).all()


def test_torchvision_min_size_keeps_boxes_at_the_limit():
    """remove_small_boxes keeps w >= min_size and h >= min_size: a box exactly min_size wide
    stays, where the detectron2 rule (w > min_size) drops it."""
    anchors = np.array([[[10, 10, 50, 50], [10, 10, 14, 60], [60, 60, 63, 95]]], np.float32)
    logits = np.array([[3.0, 2.0, 1.0]], np.float32)
    deltas = np.zeros((1, 3, 4), np.float32)
    im_info = np.array([[100, 100, 1]], np.float32)
    kept = {}
    for style in ("detectron2", "torchvision"):
        gen = ProposalGenerator(10, 10, 10, 3, 0.7, 4.0, per_level_nms=True, style=style)
        gen.initialize()
        rois, scores = _run(gen, im_info, [anchors], [logits], [deltas])
        kept[style] = int((scores[0] >= 0).sum())
    assert kept == {"detectron2": 1, "torchvision": 2}


def test_per_level_nms_is_independent_per_level():
    """Two identical boxes on different levels both survive per-level NMS, not a joint NMS."""
    box = np.array([[[20, 20, 60, 60], [21, 21, 61, 61]]], np.float32)
    args = dict(im_info=np.array([[100, 100, 1]], np.float32),
                anchors=[box, box], logits=[np.array([[2.0, 1.0]], np.float32),
                                            np.array([[1.5, 0.5]], np.float32)],
                deltas=[np.zeros((1, 2, 4), np.float32)] * 2)
    per = ProposalGenerator(10, 10, 10, 10, 0.7, 0.0, per_level_nms=True)
    joint = ProposalGenerator(10, 10, 10, 10, 0.7, 0.0, per_level_nms=False)
    per.initialize()
    joint.initialize()
    _, s_per = _run(per, **args)
    _, s_joint = _run(joint, **args)
    np.testing.assert_allclose(s_per[0, :2], sigmoid(np.array([2.0, 1.5])), rtol=1e-6)
    assert (s_per[0, 2:] == -1).all()
    assert (s_joint[0] >= 0).sum() == 1


def test_non_finite_deltas_are_dropped():
    anchors = np.array([[[10, 10, 50, 50], [60, 60, 90, 90]]], np.float32)
    deltas = np.array([[[np.nan, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
    gen = ProposalGenerator(10, 10, 10, 4, 0.7, 0.0)
    gen.initialize()
    rois, scores = _run(gen, np.array([[100, 100, 1]], np.float32), [anchors],
                        [np.array([[5.0, 1.0]], np.float32)], [deltas])
    np.testing.assert_allclose(rois[0, 0], [60, 60, 90, 90])
    assert (scores[0, 1:] == -1).all() and np.isfinite(rois).all()


def test_outputs_carry_no_gradient():
    im_info, anchors, logits, deltas = _random_inputs(2, [200, 50], B=1)
    gen = ProposalGenerator(50, 50, 30, 30, 0.7, 0.0)
    gen.initialize()
    lg = [nd.array(x) for x in logits]
    dl = [nd.array(x) for x in deltas]
    for x in lg + dl:
        x.attach_grad()
    with mx.autograd.record():
        rois, scores = gen(nd.array(im_info), *[nd.array(a) for a in anchors], *lg, *dl)
        loss = (rois * rois).sum() + scores.sum() + sum((x * 1).sum() for x in lg + dl)
    loss.backward()
    for x in lg + dl:   # only the explicit x * 1 term reaches the inputs
        np.testing.assert_array_equal(x.grad.asnumpy(), np.ones(x.shape, np.float32))


def test_equals_gluoncv_rpn_exactly():
    """The GluonCV preset reproduces GluonCV's FPN RPN (mask_rcnn_fpn_resnet50_v1b_coco
    arguments, small channels) bit for bit, given the same anchors and head outputs."""
    import warnings
    from gluoncv.model_zoo.rcnn.rpn.rpn import RPN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rpn = RPN(channels=16, strides=(4, 8, 16, 32, 64), base_size=16, scales=(2, 4, 8, 16, 32),
                  ratios=(0.5, 1, 2), alloc_size=(128, 128), clip=4.42, nms_thresh=0.7,
                  train_pre_nms=12000, train_post_nms=2000, test_pre_nms=1500,
                  test_post_nms=300, min_size=1, multi_level=True, per_level_nms=False)
    rpn.initialize(mx.init.Normal(0.5))
    rng = np.random.RandomState(3)
    H, W = 160, 224
    feats = [nd.array(rng.randn(1, 8, H // s, W // s).astype(np.float32))
             for s in (4, 8, 16, 32, 64)]
    ref_scores, ref_rois = rpn(nd.zeros((1, 3, H, W)), *feats)
    anchors, logits, deltas = [], [], []
    for k, f in enumerate(feats):
        anchors.append(rpn.anchor_generator[k](f))
        _, _, raw_score, raw_box = rpn.rpn_head(f)
        logits.append(raw_score.reshape((0, -1)))
        deltas.append(raw_box)
    gen = ProposalGenerator(12000, 1500, 2000, 300, 0.7, 1.0, per_level_nms=False, plus_one=True,
                            style="gluoncv")
    gen.initialize()
    gen.hybridize()
    rois, scores = gen(nd.array([[H, W, 1.0]]), *anchors, *logits, *deltas)
    ref_scores = ref_scores.asnumpy()[..., 0]
    ref_rois = ref_rois.asnumpy()
    valid = ref_scores >= 0
    assert valid.sum() > 100
    np.testing.assert_array_equal(scores.asnumpy(), ref_scores)
    np.testing.assert_array_equal(rois.asnumpy()[valid], ref_rois[valid])
    assert (rois.asnumpy()[~valid] == 0).all()


def test_bad_arguments():
    with pytest.raises(ValueError):
        ProposalGenerator(10, 10, 0, 10, 0.7, 0.0)
    with pytest.raises(ValueError):
        ProposalGenerator(10, 10, 10, 10, 0.7, 0.0, style="yolo")
    gen = ProposalGenerator(10, 10, 10, 10, 0.7, 0.0, num_levels=2)
    gen.initialize()
    im_info, anchors, logits, deltas = _random_inputs(4, [20])
    with pytest.raises(ValueError):
        _run(gen, im_info, anchors, logits, deltas)

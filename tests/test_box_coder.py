"""Tests of mxmask.modeling.box_coder: encode/decode/clip/area/IoU against numpy and MXNet/GluonCV.

Boxes are xyxy pixels (..., 4); deltas (dx, dy, dw, dh). Every function is checked imperatively
(mx.nd) and inside a hybridized HybridBlock (mx.sym).
"""
import math

import numpy as np
import mxnet as mx
import pytest

from mxmask.modeling.box_coder import (encode_boxes, decode_boxes, clip_boxes, box_area,
                                       pairwise_iou, generalized_iou, delta_giou, hflip_boxes,
                                       hflip_deltas, DEFAULT_SCALE_CLAMP)

nd = mx.nd


def _random_boxes(rng, shape, lo=0.0, hi=800.0, min_wh=1.0, max_wh=300.0):
    xy = rng.uniform(lo, hi, shape + (2,))
    wh = rng.uniform(min_wh, max_wh, shape + (2,))
    return np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)


class _Fn(mx.gluon.HybridBlock):
    """Wrap ``fn(F, *inputs)`` in a HybridBlock to run it through mx.sym after hybridize()."""

    def __init__(self, fn):
        super(_Fn, self).__init__()
        self.fn = fn

    def hybrid_forward(self, F, *args):
        return self.fn(F, *args)


def _both(fn, *arrays):
    """Run fn imperatively and hybridized; check they agree bit for bit; return numpy."""
    imp = fn(nd, *arrays)
    blk = _Fn(fn)
    blk.hybridize()
    hyb = blk(*arrays)
    np.testing.assert_array_equal(imp.asnumpy(), hyb.asnumpy())
    return imp.asnumpy()


def _np_decode(d, a, weights, clamp):
    d = d.astype(np.float64)
    a = a.astype(np.float64)
    w = a[..., 2] - a[..., 0]
    h = a[..., 3] - a[..., 1]
    cx = a[..., 0] + 0.5 * w
    cy = a[..., 1] + 0.5 * h
    dx, dy = d[..., 0] / weights[0], d[..., 1] / weights[1]
    dw, dh = d[..., 2] / weights[2], d[..., 3] / weights[3]
    if clamp is not None:
        dw, dh = np.minimum(dw, clamp), np.minimum(dh, clamp)
    pcx, pcy = dx * w + cx, dy * h + cy
    pw, ph = np.exp(dw) * w, np.exp(dh) * h
    return np.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], axis=-1)


@pytest.mark.parametrize("plus_one", [False, True])
def test_decode_matches_numpy_and_broadcasts(plus_one):
    rng = np.random.RandomState(0)
    rois = _random_boxes(rng, (2, 30, 1))                       # (B, R, 1, 4)
    deltas = (rng.randn(2, 30, 5, 4) * 2).astype(np.float32)    # (B, R, C, 4)
    weights = (10.0, 10.0, 5.0, 5.0)
    out = _both(lambda F, d, a: decode_boxes(F, d, a, weights=weights, plus_one=plus_one),
                nd.array(deltas), nd.array(rois))
    assert out.shape == (2, 30, 5, 4)
    ref = _np_decode(deltas, rois, weights, DEFAULT_SCALE_CLAMP)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-3)


def test_decode_hand_values_and_clamp():
    anchor = nd.array([[[0.0, 0.0, 10.0, 20.0]]])
    # zero deltas give the anchor back
    np.testing.assert_array_equal(decode_boxes(nd, nd.zeros((1, 1, 4)), anchor).asnumpy(),
                                  anchor.asnumpy())
    # dx = 1 moves the centre by one width; dw = log 2 doubles the width about the centre
    out = decode_boxes(nd, nd.array([[[1.0, 0.0, math.log(2.0), 0.0]]]), anchor).asnumpy()
    np.testing.assert_allclose(out, [[[5.0, 0.0, 25.0, 20.0]]], rtol=1e-6)
    # a huge dw is clamped at log(1000/16): width 10 * 62.5 = 625 about centre 5
    out = decode_boxes(nd, nd.array([[[0.0, 0.0, 50.0, 0.0]]]), anchor).asnumpy()
    np.testing.assert_allclose(out[0, 0, [0, 2]], [5 - 312.5, 5 + 312.5], rtol=1e-5)
    # a custom clamp, and no clamp
    out = decode_boxes(nd, nd.array([[[0.0, 0.0, 5.0, 0.0]]]), anchor, scale_clamp=4.42).asnumpy()
    np.testing.assert_allclose(out[0, 0, 2] - out[0, 0, 0], 10 * math.exp(4.42), rtol=1e-5)
    out = decode_boxes(nd, nd.array([[[0.0, 0.0, 5.0, 0.0]]]), anchor, scale_clamp=None).asnumpy()
    np.testing.assert_allclose(out[0, 0, 2] - out[0, 0, 0], 10 * math.exp(5.0), rtol=1e-5)


@pytest.mark.parametrize("weights,clamp", [((1.0, 1.0, 1.0, 1.0), 4.42),
                                           ((10.0, 10.0, 5.0, 5.0), 4.42),
                                           ((1.0, 1.0, 1.0, 1.0), None)])
def test_decode_plus_one_is_bit_exact_with_box_decode(weights, clamp):
    """GluonCV decodes with contrib.box_decode (stds = 1/weights): plus_one=True reproduces it."""
    rng = np.random.RandomState(1)
    anchors = _random_boxes(rng, (1, 20000))
    deltas = (rng.randn(2, 20000, 4) * 3).astype(np.float32)
    stds = [1.0 / w for w in weights]
    ref = nd.contrib.box_decode(nd.array(deltas), nd.array(anchors), *stds,
                                clip=-1.0 if clamp is None else clamp, format="corner").asnumpy()
    out = _both(lambda F, d, a: decode_boxes(F, d, a, weights=weights, plus_one=True,
                                             scale_clamp=clamp),
                nd.array(deltas), nd.array(anchors))
    np.testing.assert_array_equal(out, ref)


def test_decode_plus_one_matches_gluoncv_decoder():
    from gluoncv.nn.coder import NormalizedBoxCenterDecoder
    rng = np.random.RandomState(2)
    anchors = nd.array(_random_boxes(rng, (1, 500)))
    deltas = nd.array((rng.randn(3, 500, 4)).astype(np.float32))
    dec = NormalizedBoxCenterDecoder(stds=(0.1, 0.1, 0.2, 0.2), clip=4.42, convert_anchor=True)
    ref = dec(deltas, anchors).asnumpy()
    out = decode_boxes(nd, deltas, anchors, weights=(10, 10, 5, 5), plus_one=True,
                       scale_clamp=4.42).asnumpy()
    np.testing.assert_array_equal(out, ref)
    # GluonCV's minimal-opset decoder (pretrained models) computes exp in float32: within 1 ulp
    dec2 = NormalizedBoxCenterDecoder(stds=(0.1, 0.1, 0.2, 0.2), clip=4.42, convert_anchor=True,
                                      minimal_opset=True)
    np.testing.assert_allclose(out, dec2(deltas, anchors).asnumpy(), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("plus_one", [False, True])
def test_encode_decode_roundtrip(plus_one):
    rng = np.random.RandomState(3)
    anchors = _random_boxes(rng, (2, 50, 1))
    boxes = _random_boxes(rng, (2, 50, 3))
    weights = (10.0, 10.0, 5.0, 5.0)
    deltas = _both(lambda F, b, a: encode_boxes(F, b, a, weights=weights, plus_one=plus_one),
                   nd.array(boxes), nd.array(anchors))
    assert deltas.shape == (2, 50, 3, 4)
    back = decode_boxes(nd, nd.array(deltas), nd.array(anchors), weights=weights,
                        plus_one=plus_one, scale_clamp=None).asnumpy()
    np.testing.assert_allclose(back, boxes, rtol=1e-5, atol=2e-3)


def test_encode_matches_contrib_box_encode_and_hand_values():
    rng = np.random.RandomState(4)
    anchors = _random_boxes(rng, (1, 40))
    refs = _random_boxes(rng, (1, 40))
    samples = nd.ones((1, 40))
    matches = nd.array(np.arange(40)[None])
    means = nd.array([0.0, 0.0, 0.0, 0.0])
    stds = nd.array([0.1, 0.1, 0.2, 0.2])
    ref, _ = nd.contrib.box_encode(samples, matches, nd.array(anchors), nd.array(refs), means, stds)
    out = encode_boxes(nd, nd.array(refs), nd.array(anchors), weights=(10, 10, 5, 5)).asnumpy()
    np.testing.assert_allclose(out, ref.asnumpy(), rtol=1e-5, atol=1e-5)
    # hand values: anchor (0,0,10,10) -> box (5,0,15,20): dx = 0.5, dy = 0.5, dw = 0, dh = log 2
    out = encode_boxes(nd, nd.array([[5.0, 0.0, 15.0, 20.0]]), nd.array([[0.0, 0.0, 10.0, 10.0]]))
    np.testing.assert_allclose(out.asnumpy(), [[0.5, 0.5, 0.0, math.log(2.0)]], rtol=1e-6)


@pytest.mark.parametrize("plus_one", [False, True])
def test_clip_boxes(plus_one):
    boxes = nd.array([[[-5.0, -5.0, 50.0, 60.0], [10.0, 20.0, 30.0, 40.0]],
                      [[-5.0, -5.0, 50.0, 60.0], [float("-inf"), 2.0, float("inf"), 300.0]]])
    im_info = nd.array([[40.0, 45.0, 1.0], [100.0, 200.0, 2.0]])      # (h, w, scale)
    out = _both(lambda F, b, i: clip_boxes(F, b, i, plus_one=plus_one), boxes, im_info)
    expected = [[[0, 0, 45, 40], [10, 20, 30, 40]], [[0, 0, 50, 60], [0, 2, 200, 100]]]
    np.testing.assert_array_equal(out, np.array(expected, np.float32))
    # 4-d boxes (B, R, C, 4) clip per image too
    out4 = clip_boxes(nd, boxes.reshape((2, 1, 2, 4)), im_info).asnumpy()
    np.testing.assert_array_equal(out4.reshape(2, 2, 4), expected)


def test_clip_matches_gluoncv():
    from gluoncv.nn.bbox import BBoxClipToImage
    rng = np.random.RandomState(5)
    boxes = nd.array(_random_boxes(rng, (1, 200), lo=-100, hi=700))
    img = nd.zeros((1, 3, 480, 640))
    ref = BBoxClipToImage()(boxes, img).asnumpy()
    out = clip_boxes(nd, boxes, nd.array([[480.0, 640.0, 1.0]]), plus_one=True).asnumpy()
    np.testing.assert_array_equal(out, ref)


def test_box_area():
    boxes = nd.array([[[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 5.0, 7.0]]])
    np.testing.assert_array_equal(_both(lambda F, b: box_area(F, b), boxes), [[200.0, 0.0]])
    np.testing.assert_array_equal(_both(lambda F, b: box_area(F, b, plus_one=True), boxes),
                                  [[231.0, 3.0]])


def test_pairwise_iou_matches_box_iou():
    rng = np.random.RandomState(6)
    a = _random_boxes(rng, (2, 30), hi=200, max_wh=120)
    b = _random_boxes(rng, (2, 20), hi=200, max_wh=120)
    a[0, 0] = [50, 50, 40, 60]          # inverted: area 0 for box_iou
    b[1, 3] = [1000, 1000, 1010, 1010]  # disjoint from everything
    b[1, 4] = a[1, 2]                   # identical pair: IoU 1
    out = _both(lambda F, x, y: pairwise_iou(F, x, y), nd.array(a), nd.array(b))
    assert out.shape == (2, 30, 20)
    for i in range(2):
        ref = nd.contrib.box_iou(nd.array(a[i]), nd.array(b[i]), format="corner").asnumpy()
        np.testing.assert_allclose(out[i], ref, rtol=1e-6, atol=1e-7)
    assert out[1, 2, 4] == pytest.approx(1.0)
    assert (out[1, :, 3] == 0).all()
    assert np.isfinite(out).all()
    assert (out > 0.01).sum() > 20   # the test boxes overlap enough to mean something


def test_generalized_iou_hand_values():
    """GIoU = IoU - (|hull| - |union|) / |hull|, pair by pair."""
    a = nd.array([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0],
                  [1.0, 2.0, 5.0, 4.0]])
    b = nd.array([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [2.0, 0.0, 3.0, 1.0],
                  [1.0, 2.0, 5.0, 4.0]])
    # 1: inter 1, union 7, hull 9: 1/7 - 2/9; 2: equal boxes: 1; 3: disjoint, hull 3 x 1,
    # union 2: 0 - 1/3; 4: equal: 1
    want = [1 / 7 - 2 / 9, 1.0, -1 / 3, 1.0]
    np.testing.assert_allclose(_both(lambda F, x, y: generalized_iou(F, x, y), a, b), want,
                               rtol=1e-5)


def test_delta_giou_is_the_giou_of_the_decoded_boxes():
    """The GIoU of two delta sets on the unit box equals that of the boxes they make of any
    reference box (shift and axis-wise scale invariance), and 1 when they are equal."""
    rng = np.random.RandomState(9)
    rois = _random_boxes(rng, (12,), hi=300, min_wh=8, max_wh=120)
    weights = (10.0, 10.0, 5.0, 5.0)
    span = np.array([15.0, 15.0, 3.0, 3.0])     # centres up to 1.5 box sizes apart
    d = nd.array((rng.uniform(-1, 1, (12, 4)) * span).astype(np.float32))
    t = nd.array((rng.uniform(-1, 1, (12, 4)) * span).astype(np.float32))
    got = _both(lambda F, x, y: delta_giou(F, x, y, weights), d, t)
    pb = decode_boxes(nd, d, nd.array(rois), weights)
    tb = decode_boxes(nd, t, nd.array(rois), weights)
    np.testing.assert_allclose(got, generalized_iou(nd, pb, tb).asnumpy(), rtol=1e-4, atol=1e-5)
    assert got.min() < 0 < got.max() < 1       # the random pairs span overlap and no overlap
    np.testing.assert_allclose(delta_giou(nd, d, d, weights).asnumpy(), 1.0, rtol=1e-6)


def test_hflip_boxes_hand_values_and_involution():
    boxes = nd.array([[[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 100.0, 5.0]]])
    want = [[[70.0, 20.0, 90.0, 60.0], [0.0, 0.0, 100.0, 5.0]]]     # W = 100: x -> 100 - x
    width = nd.array([100.0])
    np.testing.assert_array_equal(_both(lambda F, b, w: hflip_boxes(F, b, w), boxes, width), want)
    np.testing.assert_array_equal(hflip_boxes(nd, boxes, 100.0).asnumpy(), want)
    twice = hflip_boxes(nd, hflip_boxes(nd, boxes, width), width).asnumpy()
    np.testing.assert_array_equal(twice, boxes.asnumpy())
    # the same map as the data loader's flip (numpy)
    from mxmask.data.transforms import flip_boxes
    np.testing.assert_array_equal(flip_boxes(boxes.asnumpy()[0], 100), want[0])


def test_hflip_deltas_mirror_the_decoded_box():
    """decode(hflip_deltas(d), hflip(b)) == hflip(decode(d, b)), class-specific layout (N, 4C)."""
    rng = np.random.RandomState(7)
    anchors = _random_boxes(rng, (40,), hi=300, max_wh=200)
    deltas = rng.normal(0, 1.0, (40, 3 * 4)).astype(np.float32)           # 3 classes
    weights = (10.0, 10.0, 5.0, 5.0)
    width = nd.array([512.0])
    flipped = _both(lambda F, d: hflip_deltas(F, d), nd.array(deltas))
    assert flipped.shape == (40, 12)
    d4 = deltas.reshape(40, 3, 4)
    np.testing.assert_array_equal(flipped.reshape(40, 3, 4)[..., 0], -d4[..., 0])
    np.testing.assert_array_equal(flipped.reshape(40, 3, 4)[..., 1:], d4[..., 1:])
    a = nd.array(anchors)[:, None, :]                                      # (40, 1, 4)
    direct = decode_boxes(nd, nd.array(d4), a, weights=weights)
    mirrored = decode_boxes(nd, nd.array(flipped.reshape(40, 3, 4)), hflip_boxes(nd, a, width),
                            weights=weights)
    np.testing.assert_allclose(hflip_boxes(nd, mirrored, width).asnumpy(), direct.asnumpy(),
                               rtol=1e-5, atol=2e-3)
    # without the sign change the centres would not mirror
    wrong = decode_boxes(nd, nd.array(d4), hflip_boxes(nd, a, width), weights=weights)
    assert np.abs(hflip_boxes(nd, wrong, width).asnumpy() - direct.asnumpy()).max() > 1.0

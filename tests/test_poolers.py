"""Tests of mxmask.modeling.poolers: FPN level assignment and MultiLevelRoIAlign.

rois (B, R, 4) xyxy input pixels + features P2..P5 (B, C, H/s, W/s) -> (B*R, C, P, P),
image-major. Checked against an own numpy RoIAlign with MXNet's sampling and boundary rules
(roi_align.cc: sample at start + (p + (i + .5) / grid) * bin; aligned shifts by -0.5 px;
legacy mode forces rois to >= 1x1; grid = ceil(roi / P) when sampling_ratio is 0; samples with
y < -1 or y > H contribute 0, y <= 0 reads row 0, y >= H - 1 reads row H - 1; the sum is divided
by the grid count). Degenerate rois run in a subprocess, so an abort fails the test instead of
killing pytest.
"""
import contextlib
import math
import subprocess
import sys
import textwrap

import numpy as np
import mxnet as mx
import pytest

from mxmask.modeling.poolers import (MultiLevelRoIAlign, assign_fpn_levels, level_canvas,
                                     sanitize_rois, shared_level_canvas)
from helpers.numpy_reference import np_roi_align, np_roi_align_weights

nd = mx.nd
STRIDES = (4, 8, 16, 32)
IMAGE_H, IMAGE_W = 480, 640    # large enough for rois on P5 (sqrt(area) >= 448)


# ------------------------------------------------------------------------------------------
# numpy reference
# ------------------------------------------------------------------------------------------
def np_levels(rois, style="detectron2"):
    p = 1.0 if style == "gluoncv" else 0.0
    eps = 1e-6 if style == "gluoncv" else 2.220446049250313e-16
    area = (rois[..., 2] - rois[..., 0] + p) * (rois[..., 3] - rois[..., 1] + p)
    raw = 4 + np.log2(np.sqrt(area) / 224.0 + eps)
    return np.clip(np.floor(raw), 2, 5), raw


def np_multilevel(features, rois, pooled, sampling_ratio, aligned, style):
    B, R = rois.shape[:2]
    levels, _ = np_levels(rois.astype(np.float64), style)
    out = np.zeros((B * R, features[0].shape[1], pooled, pooled))
    for b in range(B):
        for r in range(R):
            k = int(levels[b, r]) - 2
            out[b * R + r] = np_roi_align(features[k][b], rois[b, r], 1.0 / STRIDES[k], pooled,
                                          sampling_ratio, aligned)
    return out


def _random_rois(rng, B, R, style="detectron2", image=None):
    """Rois inside the IMAGE_H x IMAGE_W image (as proposals, training rois and detections are:
    clipped to the image), some touching its borders, cycling through levels 2..5, none within
    1e-3 (in log2 units) of a level boundary, so float32 and float64 agree on the level."""
    H, W = image or (IMAGE_H, IMAGE_W)
    rois = np.zeros((B, R, 4), np.float32)
    for b in range(B):
        n = 0
        while n < R:
            level = 2 + (b * R + n) % 4
            side = 224.0 * 2 ** rng.uniform(level - 4, level - 3)     # sqrt(area) on that level
            side = max(side, 6.0)
            aspect = np.exp(rng.uniform(-0.7, 0.7))
            w, h = side * np.sqrt(aspect), side / np.sqrt(aspect)
            xy = rng.uniform(-0.2, 1.0, 2) * [W - w, H - h]
            roi = np.concatenate([xy, xy + [w, h]])
            roi = np.clip(roi, 0, [W, H, W, H]).astype(np.float32)
            if min(roi[2] - roi[0], roi[3] - roi[1]) < 2:
                continue
            _, raw = np_levels(roi.astype(np.float64)[None], style)
            if abs(raw[0] - round(raw[0])) < 1e-3:
                continue
            rois[b, n] = roi
            n += 1
    return rois


def _features(rng, B=2, C=3, H=None, W=None):
    H, W = H or IMAGE_H, W or IMAGE_W
    return [rng.randn(B, C, H // s, W // s).astype(np.float32) for s in STRIDES]


def _pool(pooler, rois, feats, hybridize=False):
    pooler.initialize()
    if hybridize:
        pooler.hybridize()
    return pooler(nd.array(rois), *[nd.array(f) for f in feats]).asnumpy()


# ------------------------------------------------------------------------------------------
def test_levels_hand_values():
    rois = nd.array([[[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 111, 111], [0, 0, 448, 448],
                      [0, 0, 2000, 2000], [0, 0, 5, 5], [10, 10, 10, 10], [0, 0, 223, 223]]])
    lv = assign_fpn_levels(nd, rois).asnumpy()
    np.testing.assert_array_equal(lv, [[4, 3, 2, 5, 5, 2, 2, 3]])
    # GluonCV adds 1 to widths: 223 + 1 = 224 is level 4, and a zero-size roi is 1x1
    lv = assign_fpn_levels(nd, rois, style="gluoncv").asnumpy()
    np.testing.assert_array_equal(lv, [[4, 3, 3, 5, 5, 2, 2, 4]])
    lv = assign_fpn_levels(nd, rois, min_level=3, max_level=6).asnumpy()
    np.testing.assert_array_equal(lv, [[4, 3, 3, 5, 6, 3, 3, 3]])
    # torchvision adds its eps after the log: floor(4 + log2(223 / 224) + 1e-6) is still 3
    lv = assign_fpn_levels(nd, rois, style="torchvision").asnumpy()
    np.testing.assert_array_equal(lv, [[4, 3, 2, 5, 5, 2, 2, 3]])


def test_torchvision_level_mapper_equals_its_formula():
    """LevelMapper: floor(4 + log2(sqrt(area) / 224) + 1e-6) in float32, eps after the log,
    which differs from the detectron2 numerics just under the level boundaries."""
    side = np.float32(224) * np.float32(2) ** np.arange(-2, 3, dtype=np.float32)
    widths = np.concatenate([side * np.float32(1 - 3e-7), side, side * np.float32(1 + 3e-7)])
    rois = np.zeros((1, len(widths), 4), np.float32)
    rois[0, :, 2] = widths
    rois[0, :, 3] = widths
    got = assign_fpn_levels(nd, nd.array(rois), style="torchvision").asnumpy()[0]
    area = widths * widths
    want = np.floor(np.float32(4) + np.log2(np.sqrt(area) / np.float32(224)) + np.float32(1e-6))
    np.testing.assert_array_equal(got, np.clip(want, 2, 5))
    assert (got != assign_fpn_levels(nd, nd.array(rois)).asnumpy()[0]).any()


@pytest.mark.parametrize("style", ["detectron2", "gluoncv"])
def test_levels_match_formula(style):
    rng = np.random.RandomState(0)
    rois = _random_rois(rng, 2, 200, style)
    lv = assign_fpn_levels(nd, nd.array(rois), style=style).asnumpy()
    np.testing.assert_array_equal(lv, np_levels(rois.astype(np.float64), style)[0])
    assert set(np.unique(lv)) == {2.0, 3.0, 4.0, 5.0}


def test_reference_matches_contrib_roialign_on_one_level():
    """The numpy reference itself against the raw op (valid rois, real batch indices)."""
    rng = np.random.RandomState(1)
    feat = rng.randn(2, 3, 20, 24).astype(np.float32)
    rois = _random_rois(rng, 2, 12).reshape(-1, 4) / 8.0
    batch = np.repeat([0.0, 1.0], 12)[:, None]
    for aligned in (False, True):
        for sr in (0, 2):
            out = nd.contrib.ROIAlign(nd.array(feat), nd.array(np.hstack([batch, rois])), (5, 5),
                                      0.5, sample_ratio=sr, aligned=aligned).asnumpy()
            ref = np.stack([np_roi_align(feat[int(b)], r, 0.5, 5, sr, aligned)
                            for b, r in zip(batch[:, 0], rois)])
            np.testing.assert_allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize("aligned,sampling_ratio,pooled,style", [
    (True, 0, 7, "detectron2"),
    (True, 2, 5, "detectron2"),
    (False, 2, 14, "gluoncv"),
    (False, 0, 7, "gluoncv"),
])
def test_multilevel_matches_numpy(aligned, sampling_ratio, pooled, style):
    rng = np.random.RandomState(2)
    feats = _features(rng)
    rois = _random_rois(rng, 2, 24, style)
    pooler = MultiLevelRoIAlign(pooled, STRIDES, sampling_ratio, aligned, style)
    out = _pool(pooler, rois, feats)
    assert out.shape == (48, 3, pooled, pooled)
    ref = np_multilevel(feats, rois, pooled, sampling_ratio, aligned, style)
    np.testing.assert_allclose(out, ref, atol=1e-4)
    assert set(np_levels(rois.astype(np.float64), style)[0].ravel()) == {2.0, 3.0, 4.0, 5.0}


def _edge_slivers(rng, H, W, n):
    """Rois under one level-2 pixel tall (wide) starting in the last feature rows (columns) of
    an H x W image: the legacy mode widens them to one pixel, past the level's extent."""
    rois = []
    for i in range(n):
        y1 = H - rng.choice([0.0, 0.5, 1.0, 2.5, 3.9, 4.0, 3.999, 5.0])
        x1 = W - rng.choice([0.0, 0.5, 1.0, 2.5, 3.9, 4.0, 3.999, 5.0])
        wide, tall = rng.uniform(2, 60), rng.uniform(2, 60)
        kind = i % 3
        if kind == 0:      # bottom edge
            x0 = rng.uniform(0, W - wide)
            rois.append([x0, y1, x0 + wide, min(H, y1 + rng.uniform(0, 3.5))])
        elif kind == 1:    # right edge
            y0 = rng.uniform(0, H - tall)
            rois.append([x1, y0, min(W, x1 + rng.uniform(0, 3.5)), y0 + tall])
        else:              # bottom-right corner
            rois.append([x1, y1, min(W, x1 + rng.uniform(0, 3.5)), min(H, y1 + rng.uniform(0, 3.5))])
    return np.array(rois, np.float32)


@pytest.mark.parametrize("sampling_ratio,pooled,canonical_size", [
    (2, 14, 224), (0, 7, 224), (2, 7, 8), (0, 5, 8)])
def test_legacy_canvas_equals_per_level_pooling(sampling_ratio, pooled, canonical_size):
    """Legacy mode (aligned=False) with rois inside the image, as the box head's proposals and
    training rois are: one ROIAlign over the level canvas equals pooling every roi on its own
    level with contrib.ROIAlign, edge slivers included (the widened sliver samples past the
    level; see MultiLevelRoIAlign._pool_on_canvas). A canonical size of 8 puts slivers on three
    or more levels."""
    rng = np.random.RandomState(11)
    H, W = 256, 320
    feats = _features(rng, B=2, H=H, W=W)
    slivers = _edge_slivers(rng, H, W, 24)
    rois = np.concatenate([_random_rois(rng, 2, 20, "gluoncv", image=(H, W)),
                           np.stack([slivers[:12], slivers[12:]])], axis=1)
    kw = dict(output_size=pooled, strides=STRIDES, sampling_ratio=sampling_ratio, aligned=False,
              style="gluoncv", canonical_size=canonical_size)
    canvas = MultiLevelRoIAlign(rois_in_image=True, **kw)
    per_level = MultiLevelRoIAlign(**kw)
    want = _pool(per_level, rois, feats)
    got = _pool(canvas, rois, feats)
    np.testing.assert_allclose(got, want, atol=1e-4)   # offsets: 1 float32 ulp of y
    np.testing.assert_allclose(_pool(MultiLevelRoIAlign(rois_in_image=True, **kw), rois, feats,
                                     hybridize=True), want, atol=1e-4)
    # the slivers matter: ROIAlign zeroes whole output rows (columns) of some of them, which the
    # canvas reproduces only through the weights
    levels = assign_fpn_levels(nd, nd.array(rois), canonical_size=canonical_size,
                               style="gluoncv").asnumpy()
    assert len(set(levels[:, 20:].ravel())) >= (3 if canonical_size == 8 else 1)
    partly_zero = (want.reshape(2, -1, 3, pooled, pooled)[:, 20:] == 0).all(axis=(2, 4)).any(-1)
    assert partly_zero.sum() >= 4


@pytest.mark.parametrize("aligned", [True, False])
def test_one_hybridized_pooler_serves_any_input_size(aligned):
    """The level canvas takes its tile offsets from the feature shapes at run time: one
    hybridized pooler, inputs of three sizes (one not a multiple of 32, whose coarse levels are
    ceil-sized as the backbone's strided convs make them), each equal to the numpy reference."""
    pooler = MultiLevelRoIAlign(7, STRIDES, 0, aligned)
    pooler.initialize()
    pooler.hybridize(static_alloc=True)
    rng = np.random.RandomState(5)
    for H, W in [(480, 640), (200, 300), (452, 600)]:
        feats = [rng.randn(1, 2, -(-H // s), -(-W // s)).astype(np.float32) for s in STRIDES]
        rois = _random_rois(rng, 1, 12, image=(H, W))
        out = pooler(nd.array(rois), *[nd.array(f) for f in feats]).asnumpy()
        np.testing.assert_allclose(out, np_multilevel(feats, rois, 7, 0, aligned, "detectron2"),
                                   atol=1e-4)


@pytest.mark.parametrize("aligned", [True, False])
def test_hybridized_equals_imperative_and_deterministic(aligned):
    rng = np.random.RandomState(3)
    feats = _features(rng)
    rois = _random_rois(rng, 2, 20)
    rois[:, 15:] = 0                                   # padded proposals: all-zero rois
    a = _pool(MultiLevelRoIAlign(7, STRIDES, 0, aligned), rois, feats)
    pooler = MultiLevelRoIAlign(7, STRIDES, 0, aligned)
    b = _pool(pooler, rois, feats, hybridize=True)
    c = pooler(nd.array(rois), *[nd.array(f) for f in feats]).asnumpy()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(b, c)
    assert np.isfinite(a).all()
    # the padded rows do not disturb the real ones (the -1 batch-index bug zeroed parts of roi 0)
    real = _pool(MultiLevelRoIAlign(7, STRIDES, 0, aligned), rois[:, :15], feats)
    np.testing.assert_array_equal(a.reshape(2, 20, 3, 7, 7)[:, :15], real.reshape(2, 15, 3, 7, 7))


def test_extra_features_are_ignored_and_too_few_raise():
    rng = np.random.RandomState(4)
    feats = _features(rng)
    rois = _random_rois(rng, 2, 5)
    pooler = MultiLevelRoIAlign(4, STRIDES, 2, True)
    pooler.initialize()
    p6 = nd.array(rng.randn(2, 3, 4, 5).astype(np.float32))
    with_p6 = pooler(nd.array(rois), *[nd.array(f) for f in feats], p6).asnumpy()
    np.testing.assert_array_equal(with_p6, pooler(nd.array(rois), *[nd.array(f) for f in feats])
                                  .asnumpy())
    with pytest.raises(ValueError):
        pooler(nd.array(rois), *[nd.array(f) for f in feats[:3]])
    with pytest.raises(ValueError):
        MultiLevelRoIAlign(7, (4, 8, 32))


def test_shared_level_canvas_builds_each_canvas_once():
    """Inside shared_level_canvas, level_canvas of the same level objects returns the canvas
    built first (nested blocks share it); outside, and for other levels, a new one."""
    rng = np.random.RandomState(6)
    feats = [nd.array(f) for f in _features(rng, B=1, C=2, H=64, W=96)]
    assert level_canvas(nd, feats) is not level_canvas(nd, feats)
    with shared_level_canvas():
        first = level_canvas(nd, feats)
        with shared_level_canvas():
            assert level_canvas(nd, tuple(feats)) is first
        assert level_canvas(nd, feats) is first
        assert level_canvas(nd, [f.copy() for f in feats]) is not first
    assert level_canvas(nd, feats) is not first
    np.testing.assert_array_equal(level_canvas(nd, feats).asnumpy(), first.asnumpy())


def test_poolers_sharing_a_canvas_give_the_same_values_and_gradients():
    """A box-head-like and a mask-head-like pooler on the same levels: the same outputs and the
    same (summed) level gradients with one shared canvas as with one canvas each."""
    rng = np.random.RandomState(7)
    feats = _features(rng, C=2)
    rois = _random_rois(rng, 2, 8)
    small = MultiLevelRoIAlign(7, STRIDES, 0, True)
    large = MultiLevelRoIAlign(14, STRIDES, 2, True)

    def run(shared):
        arrays = [nd.array(f) for f in feats]
        for a in arrays:
            a.attach_grad()
        sharing = shared_level_canvas() if shared else contextlib.nullcontext()
        with mx.autograd.record(), sharing:
            outs = [small(nd.array(rois), *arrays), large(nd.array(rois), *arrays)]
            total = (outs[0] * 2.0).sum() + (outs[1] * 3.0).sum()
        total.backward()
        return [o.asnumpy() for o in outs], [a.grad.asnumpy() for a in arrays]

    outs, grads = run(True)
    ref_outs, ref_grads = run(False)
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert all(np.abs(g).sum() > 0 for g in grads)


def test_gradient_reaches_only_the_selected_level():
    """d(sum of outputs)/d(features) equals the reference weights of the real rois only."""
    rng = np.random.RandomState(5)
    feats = _features(rng, C=2)
    rois = _random_rois(rng, 2, 10)
    arrays = [nd.array(f) for f in feats]
    for a in arrays:
        a.attach_grad()
    pooler = MultiLevelRoIAlign(5, STRIDES, 2, True)
    pooler.initialize()
    with mx.autograd.record():
        out = pooler(nd.array(rois), *arrays)
    out.backward(nd.ones_like(out))
    levels, _ = np_levels(rois.astype(np.float64))
    expected = [np.zeros(f.shape) for f in feats]
    for b in range(2):
        for r in range(10):
            k = int(levels[b, r]) - 2
            wy, wx = np_roi_align_weights(rois[b, r], 1.0 / STRIDES[k], 5, 2, True,
                                          *feats[k].shape[2:])
            expected[k][b] += np.outer(wy.sum(0), wx.sum(0))[None]
    for a, e in zip(arrays, expected):
        np.testing.assert_allclose(a.grad.asnumpy(), e, atol=1e-4)


def test_sanitize_rois():
    rois = nd.array([[0, 0, 0, 0], [5, 5, 3, 9], [float("nan"), 1, 2, 3],
                     [float("-inf"), 0, float("inf"), 1e30], [1, 2, 3, 4]])
    out = sanitize_rois(nd, rois).asnumpy()
    assert np.isfinite(out).all()
    assert ((out[:, 2] - out[:, 0]) >= 0.0099).all() and ((out[:, 3] - out[:, 1]) >= 0.0099).all()
    np.testing.assert_array_equal(out[4], [1, 2, 3, 4])                # a valid roi is unchanged
    np.testing.assert_allclose(out[1], [5, 5, 5.01, 9], rtol=1e-6)
    np.testing.assert_array_equal(out[3], [-1e4, 0, 1e4, 1e4])


_DEGENERATE_SCRIPT = textwrap.dedent("""
    import numpy as np, mxnet as mx
    from mxmask.modeling.poolers import MultiLevelRoIAlign
    nd = mx.nd
    nan, inf = float("nan"), float("inf")
    rois = np.array([[[0, 0, 0, 0], [10, 10, 10, 10], [50, 40, 20, 30], [30, 30, 30.000001, 80],
                      [nan, nan, nan, nan], [-inf, -inf, inf, inf], [1e30, 1e30, -1e30, 5],
                      [9999.99, 0, 9999.99, 1e-30], [319.9, 255.9, 320, 256], [5, 5, 60, 70]],
                     [[0, 0, 0, 0]] * 9 + [[-100, -100, -99.999, -99.999]]], np.float32)
    rng = np.random.RandomState(0)
    feats = [nd.array(rng.randn(2, 3, 256 // s, 320 // s).astype(np.float32)) for s in (4, 8, 16, 32)]
    results = []
    for sr in (0, 2):
        for hyb in (False, True):
            pooler = MultiLevelRoIAlign(7, (4, 8, 16, 32), sr, True)
            pooler.initialize()
            if hyb:
                pooler.hybridize()
            for _ in range(2):
                out = pooler(nd.array(rois), *feats).asnumpy()
                assert out.shape == (20, 3, 7, 7), out.shape
                assert np.isfinite(out).all()
                results.append(out)
    for a, b in zip(results[0::2], results[1::2]):
        assert (a == b).all()
    print("DEGENERATE-OK")
""")


def test_degenerate_rois_do_not_abort():
    """aligned=True with zero, inverted, NaN, inf and huge rois: no abort, finite, deterministic."""
    proc = subprocess.run([sys.executable, "-c", _DEGENERATE_SCRIPT], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DEGENERATE-OK" in proc.stdout


def test_raw_op_aborts_without_sanitising():
    """Documents why sanitize_rois exists: the raw op really aborts on an empty aligned roi."""
    script = ("import mxnet as mx\n"
              "out = mx.nd.contrib.ROIAlign(mx.nd.ones((1, 1, 8, 8)),"
              " mx.nd.array([[0, 2, 2, 2, 6]]), (2, 2), 1.0, aligned=True)\n"
              "out.wait_to_read()\nprint('NO-ABORT')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "NO-ABORT" not in proc.stdout

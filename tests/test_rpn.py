"""Tests of mxmask.modeling.rpn: head layout, shared weights, RPN outputs in both modes."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

from mxmask.config import get_config
from mxmask.modeling.anchors import AnchorGenerator
from mxmask.modeling.rpn import RPN, RPNHead, anchor_max_size


def shapes_cfg(*extra):
    # 128 FPN channels, as the synthetic features below (independent of the preset's tuning)
    return get_config("shapes", ["model.num_classes=3", "model.num_keypoints=4",
                                 "model.fpn.out_channels=128"] + list(extra))


def pyramid(B=2, C=128, H=64, W=96, seed=0):
    rng = np.random.RandomState(seed)
    return [mx.nd.array(rng.randn(B, C, -(-H // s), -(-W // s)).astype(np.float32))
            for s in (4, 8, 16, 32, 64)]


def test_rpn_head_layout_and_shared_weights():
    A = 3
    head = RPNHead(16, A, in_channels=8)
    head.initialize(mx.init.Normal(0.1))
    x1 = mx.nd.random.normal(shape=(2, 8, 5, 7))
    x2 = mx.nd.random.normal(shape=(2, 8, 3, 4))
    out = head(x1, x2)
    assert len(out) == 4
    l1, l2, d1, d2 = out
    assert l1.shape == (2, 5 * 7 * A) and d1.shape == (2, 5 * 7 * A, 4)
    assert l2.shape == (2, 3 * 4 * A) and d2.shape == (2, 3 * 4 * A, 4)
    # the raw conv maps, computed by hand from the same weights
    h = mx.nd.relu(mx.nd.Convolution(x2, head.conv.weight.data(), head.conv.bias.data(),
                                     kernel=(3, 3), pad=(1, 1), num_filter=16)).asnumpy()
    wl = head.logits.weight.data().asnumpy()[:, :, 0, 0]
    bl = head.logits.bias.data().asnumpy()
    wd = head.deltas.weight.data().asnumpy()[:, :, 0, 0]
    bd = head.deltas.bias.data().asnumpy()
    logit_map = np.einsum("oc,bchw->bohw", wl, h) + bl[None, :, None, None]   # (B, A, H, W)
    delta_map = np.einsum("oc,bchw->bohw", wd, h) + bd[None, :, None, None]   # (B, 4A, H, W)
    l2, d2 = l2.asnumpy(), d2.asnumpy()
    W = 4
    for (b, i, j, a) in [(0, 0, 0, 0), (1, 2, 3, 2), (0, 1, 2, 1), (1, 0, 3, 0)]:
        row = (i * W + j) * A + a
        np.testing.assert_allclose(l2[b, row], logit_map[b, a, i, j], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(d2[b, row], delta_map[b, 4 * a:4 * a + 4, i, j],
                                   rtol=1e-4, atol=1e-5)
    # the same weights on every level
    l1b, d1b = head.forward_level(mx.nd, x1)
    np.testing.assert_array_equal(l1b.asnumpy(), out[0].asnumpy())
    np.testing.assert_array_equal(d1b.asnumpy(), out[2].asnumpy())


def test_rpn_head_matches_gluoncv():
    rpn_mod = pytest.importorskip("gluoncv.model_zoo.rcnn.rpn.rpn")
    ours = RPNHead(32, 3, in_channels=16)
    ours.initialize(mx.init.Normal(0.1))
    theirs = rpn_mod.RPNHead(32, 3)
    theirs.initialize()
    x = mx.nd.random.normal(shape=(1, 16, 6, 5))
    theirs(x)
    for a, b in [(ours.conv, theirs.conv1[0]), (ours.logits, theirs.score),
                 (ours.deltas, theirs.loc)]:
        b.weight.set_data(a.weight.data())
        b.bias.set_data(a.bias.data())
    _, _, raw_scores, raw_boxes = theirs(x)
    logits, deltas = ours(x)
    np.testing.assert_allclose(logits.asnumpy(), raw_scores.asnumpy()[..., 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(deltas.asnumpy(), raw_boxes.asnumpy(), rtol=1e-5, atol=1e-6)


def test_anchor_max_size():
    assert anchor_max_size(get_config("mask_rcnn_r50_fpn")) == 1344
    assert anchor_max_size(get_config("shapes")) == 320
    # the gluoncv preset does not pad (size_divisibility 1): its anchors still cover 1344
    assert anchor_max_size(get_config("gluoncv_mask_rcnn_r50_fpn")) == 1344
    assert anchor_max_size(shapes_cfg("input.max_size_test=1000")) == 1024


def test_rpn_inference_and_training_outputs():
    cfg = shapes_cfg()
    rpn = RPN(cfg)
    rpn.initialize(mx.init.Normal(0.01))
    feats = pyramid()
    im_info = mx.nd.array([[64, 96, 1.0], [50, 70, 1.0]])
    rois, scores = rpn(im_info, *feats)
    post = cfg.model.rpn.post_nms_topk_test
    assert rois.shape == (2, post, 4) and scores.shape == (2, post)
    s = scores.asnumpy()
    r = rois.asnumpy()
    assert ((s >= 0) | (s == -1)).all() and (s[:, 0] > 0).all()
    assert (r[:, :, 2] >= r[:, :, 0]).all() and (r[1, :, 2] <= 70 + 1e-4).all()
    assert (r[s < 0] == 0).all()
    with autograd.record(train_mode=True):
        out = rpn(im_info, *feats)
    L = rpn.num_levels
    assert L == 5 and len(out) == 2 + 3 * L
    assert out[0].shape == (2, cfg.model.rpn.post_nms_topk_train, 4)
    anchors, logits, deltas = out[2:2 + L], out[2 + L:2 + 2 * L], out[2 + 2 * L:]
    for f, a, lg, dl, stride, size in zip(feats, anchors, logits, deltas,
                                          cfg.model.anchor.strides, cfg.model.anchor.sizes):
        n = f.shape[2] * f.shape[3] * rpn.num_anchors
        assert a.shape == (1, n, 4) and lg.shape == (2, n) and dl.shape == (2, n, 4)
        ref = AnchorGenerator(stride, size, cfg.model.anchor.aspect_ratios)
        ref.initialize()
        np.testing.assert_array_equal(a.asnumpy(), ref(f).asnumpy())
    # the logits and deltas are the head's, and they carry gradient
    head_out = rpn.head(*feats)
    np.testing.assert_allclose(logits[1].asnumpy(), head_out[1].asnumpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(deltas[4].asnumpy(), head_out[9].asnumpy(), rtol=1e-5, atol=1e-6)
    out[2 + L].backward(mx.nd.ones_like(out[2 + L]))
    assert np.abs(rpn.head.logits.weight.grad().asnumpy()).sum() > 0


def test_rpn_hybridized_equals_imperative_in_both_modes():
    cfg = shapes_cfg()
    rpn = RPN(cfg)
    rpn.initialize(mx.init.Normal(0.01))
    feats = pyramid(B=1, H=64, W=64, seed=3)
    im_info = mx.nd.array([[64, 64, 1.0]])
    ref_test = [o.asnumpy() for o in rpn(im_info, *feats)]
    with autograd.record(train_mode=True):
        ref_train = [o.asnumpy() for o in rpn(im_info, *feats)]
    rpn.hybridize(static_alloc=True, static_shape=True)
    for _ in range(2):  # switching modes retraces the graph
        got = rpn(im_info, *feats)
        assert len(got) == 2
        for a, b in zip(ref_test, got):
            np.testing.assert_allclose(a, b.asnumpy(), rtol=1e-5, atol=1e-5)
        with autograd.record(train_mode=True):
            got = rpn(im_info, *feats)
        assert len(got) == len(ref_train)
        for a, b in zip(ref_train, got):
            np.testing.assert_allclose(a, b.asnumpy(), rtol=1e-5, atol=1e-5)


def test_rpn_gluoncv_preset_parameters():
    cfg = get_config("gluoncv_mask_rcnn_r50_fpn")
    rpn = RPN(cfg)
    shapes = {k: v.shape for k, v in rpn._collect_params_with_prefix().items()}
    assert shapes["head.conv.weight"] == (1024, 256, 3, 3)
    assert shapes["head.logits.weight"] == (3, 1024, 1, 1)
    assert shapes["head.deltas.weight"] == (12, 1024, 1, 1)
    assert rpn.proposals.per_level_nms is False and rpn.proposals.plus_one is True
    assert rpn.proposals.pre_nms_topk[False] == 6000 and rpn.proposals.post_nms_topk[False] == 1000

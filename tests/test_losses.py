"""Losses against numpy on tiny arrays, gradients, and hybridized use (mxmask.modeling.losses)."""
import math

import mxnet as mx
import numpy as np
import pytest

from mxmask.modeling.losses import (fast_rcnn_losses, keypoint_rcnn_loss, mask_rcnn_loss,
                                    rpn_losses, sigmoid_bce_with_logits, smooth_l1)


def nd(x):
    return mx.nd.array(np.asarray(x, "float64"), dtype="float32")


def bce_np(x, z):
    p = 1.0 / (1.0 + np.exp(-x))
    return -(z * np.log(p) + (1 - z) * np.log(1 - p))


def smooth_l1_np(x, beta):
    ax = np.abs(x)
    if beta == 0:
        return ax
    return np.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def log_softmax_np(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_elementwise_helpers():
    x = np.array([-60.0, -2.0, -0.3, 0.0, 0.7, 3.0, 60.0])
    z = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    got = sigmoid_bce_with_logits(mx.nd, nd(x), nd(z)).asnumpy()
    # stable for large |x|: bce(-60, 1) = 60, bce(60, 0) = 60
    np.testing.assert_allclose(got, [60, bce_np(-2.0, 0), bce_np(-0.3, 1), math.log(2),
                                     bce_np(0.7, 0), bce_np(3.0, 1), 60], rtol=1e-5)
    d = np.array([-2.0, -0.2, 0.0, 0.05, 0.5, 1.5])
    np.testing.assert_allclose(smooth_l1(mx.nd, nd(d), 0.0).asnumpy(), np.abs(d), rtol=1e-6)
    # beta 0.5: 0.5 * 0.2^2 / 0.5 = 0.04 inside, |x| - 0.25 outside
    np.testing.assert_allclose(smooth_l1(mx.nd, nd(d), 0.5).asnumpy(),
                               [1.75, 0.04, 0, 0.0025, 0.25, 1.25], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_rpn_losses_match_numpy(beta):
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 6)
    deltas = rng.randn(2, 6, 4)
    targets = rng.randn(2, 6, 4)
    labels = np.array([[1, 0, -1, 0, 1, -1], [0, 0, -1, -1, 1, 0]], "float64")
    obj, box = rpn_losses(nd(logits), nd(deltas), nd(labels), nd(targets), beta=beta,
                          batch_size_per_image=4)
    normalizer = 4 * 2          # batch_size_per_image * images, as Detectron2
    sampled = labels >= 0
    want_obj = bce_np(logits, (labels == 1).astype(float))[sampled].sum() / normalizer
    want_box = smooth_l1_np(deltas - targets, beta)[labels == 1].sum() / normalizer
    assert obj.shape == (1,) and box.shape == (1,)
    np.testing.assert_allclose(obj.asnumpy(), [want_obj], rtol=1e-5)
    np.testing.assert_allclose(box.asnumpy(), [want_box], rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 1.0 / 9])
def test_rpn_losses_normalised_by_the_sampled_anchors(beta):
    """normalizer="sampled" (model.rpn.loss_normalizer, torchvision's compute_loss): the mean
    cross-entropy over the anchors sampled in the batch, and the box sum over their number;
    "batch_size" is the default and what Detectron2 divides by."""
    rng = np.random.RandomState(2)
    logits = rng.randn(2, 6)
    deltas = rng.randn(2, 6, 4)
    targets = rng.randn(2, 6, 4)
    labels = np.array([[1, 0, -1, 0, 1, -1], [0, 0, -1, -1, 1, 0]], "float64")
    args = (nd(logits), nd(deltas), nd(labels), nd(targets))
    obj, box = rpn_losses(*args, beta=beta, batch_size_per_image=256, normalizer="sampled")
    sampled = labels >= 0                                  # 8 anchors over the two images
    want_obj = bce_np(logits, (labels == 1).astype(float))[sampled].mean()
    want_box = smooth_l1_np(deltas - targets, beta)[labels == 1].sum() / sampled.sum()
    np.testing.assert_allclose(obj.asnumpy(), [want_obj], rtol=1e-5)
    np.testing.assert_allclose(box.asnumpy(), [want_box], rtol=1e-5)
    # the default divides by batch_size_per_image * images instead
    default = rpn_losses(*args, beta=beta, batch_size_per_image=256)
    np.testing.assert_allclose(default[0].asnumpy(), [want_obj * 8 / 512.0], rtol=1e-5)
    np.testing.assert_allclose(default[1].asnumpy(), [want_box * 8 / 512.0], rtol=1e-5)
    # symbolic, and no sampled anchor at all: 0, not NaN
    sym = rpn_losses(*[mx.sym.var(n) for n in "ldyt"], beta=beta, normalizer="sampled")
    out = mx.sym.Group(list(sym)).eval(l=args[0], d=args[1], y=args[2], t=args[3])
    np.testing.assert_allclose([o.asscalar() for o in out], [want_obj, want_box], rtol=1e-5)
    none = rpn_losses(args[0], args[1], nd(-np.ones((2, 6))), args[3], normalizer="sampled")
    np.testing.assert_array_equal([v.asscalar() for v in none], [0, 0])
    with pytest.raises(ValueError, match="normalizer"):
        rpn_losses(*args, normalizer="images")


def _fast_rcnn_case():
    rng = np.random.RandomState(1)
    C = 2
    cls_logits = rng.randn(5, C + 1)
    deltas = rng.randn(5, C * 4)
    labels = np.array([[0, 1, 2, -1, 1]], "float64")     # (B=1, S=5)
    targets = rng.randn(1, 5, 4)
    return cls_logits, deltas, labels, targets


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_fast_rcnn_losses_match_numpy(beta):
    cls_logits, deltas, labels, targets = _fast_rcnn_case()
    loss_cls, loss_box = fast_rcnn_losses(nd(cls_logits), nd(deltas), nd(labels), nd(targets),
                                          beta=beta)
    lab = labels.reshape(-1).astype(int)
    valid = lab >= 0
    logp = log_softmax_np(cls_logits)
    want_cls = -np.mean([logp[i, lab[i]] for i in range(5) if valid[i]])
    box_sum = 0.0
    for i in range(5):
        if lab[i] > 0:    # deltas of the gt class: columns 4*(label-1) .. +3
            c = lab[i] - 1
            box_sum += smooth_l1_np(deltas[i, 4 * c:4 * c + 4] - targets[0, i], beta).sum()
    want_box = box_sum / valid.sum()    # normalised by the number of sampled rois (4)
    np.testing.assert_allclose(loss_cls.asnumpy(), [want_cls], rtol=1e-5)
    np.testing.assert_allclose(loss_box.asnumpy(), [want_box], rtol=1e-5)


def giou_np(p, q):
    iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
    hull = (max(p[2], q[2]) - min(p[0], q[0])) * (max(p[3], q[3]) - min(p[1], q[1]))
    return inter / union - (hull - union) / hull


def test_fast_rcnn_giou_loss_matches_numpy():
    """reg_loss="giou": per fg roi 1 - GIoU of the boxes its gt class's deltas and its targets
    make of a roi (any roi: numpy decodes against a real one), summed over the fg rois and
    divided by the sampled ones; background rois with non-finite targets add nothing (no
    NaN); the classification loss is the smooth-L1 case's."""
    cls_logits, deltas, labels, targets = _fast_rcnn_case()
    targets = targets * 0.3
    weights = (10.0, 10.0, 5.0, 5.0)
    targets[0, 0] = np.inf                         # a background roi's unused target
    loss_cls, loss_box = fast_rcnn_losses(nd(cls_logits), nd(deltas), nd(labels), nd(targets),
                                          reg_loss="giou", reg_weights=weights)
    l1_cls, _ = fast_rcnn_losses(nd(cls_logits), nd(deltas), nd(labels), nd(targets))
    np.testing.assert_allclose(loss_cls.asnumpy(), l1_cls.asnumpy(), rtol=1e-6)
    roi = np.array([20.0, 30.0, 80.0, 70.0])

    def decode(d):
        w, h = roi[2] - roi[0], roi[3] - roi[1]
        cx = roi[0] + 0.5 * w + d[0] / weights[0] * w
        cy = roi[1] + 0.5 * h + d[1] / weights[1] * h
        bw, bh = np.exp(d[2] / weights[2]) * w, np.exp(d[3] / weights[3]) * h
        return [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
    lab = labels.reshape(-1).astype(int)
    total = sum(1.0 - giou_np(decode(deltas[i, 4 * (lab[i] - 1):4 * lab[i]]),
                              decode(targets[0, i])) for i in range(5) if lab[i] > 0)
    want = total / (lab >= 0).sum()
    assert 0 < want < 2
    np.testing.assert_allclose(loss_box.asnumpy(), [want], rtol=1e-4)
    # gradients: finite, and only the fg rois' gt-class columns get any
    d = nd(deltas)
    d.attach_grad()
    with mx.autograd.record():
        loss = fast_rcnn_losses(nd(cls_logits), d, nd(labels), nd(targets), reg_loss="giou",
                                reg_weights=weights)[1]
    loss.backward()
    g = d.grad.asnumpy()
    assert np.isfinite(g).all()
    touched = np.abs(g) > 0
    for i in range(5):
        cols = np.zeros(8, bool)
        if lab[i] > 0:
            cols[4 * (lab[i] - 1):4 * lab[i]] = True
        assert not touched[i, ~cols].any() and (touched[i, cols].any() or lab[i] <= 0)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_class_agnostic_box_loss_is_the_class_specific_loss_of_one_shared_box(beta):
    """cls_agnostic: deltas (B*S, 4) are every class's box, so the loss equals the class-specific
    loss of those 4 columns repeated for each class, and one hand-computed value."""
    cls_logits, deltas, labels, targets = _fast_rcnn_case()
    shared = deltas[:, :4]
    got = fast_rcnn_losses(nd(cls_logits), nd(shared), nd(labels), nd(targets), beta=beta,
                           cls_agnostic=True)
    tiled = fast_rcnn_losses(nd(cls_logits), nd(np.tile(shared, (1, deltas.shape[1] // 4))),
                             nd(labels), nd(targets), beta=beta)
    for a, b in zip(got, tiled):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-6)
    lab = labels.reshape(-1).astype(int)
    want_box = sum(smooth_l1_np(shared[i] - targets[0, i], beta).sum()
                   for i in range(5) if lab[i] > 0) / (lab >= 0).sum()
    np.testing.assert_allclose(got[1].asnumpy(), [want_box], rtol=1e-5)
    # a roi of class 2 reads columns 0..3, not 4..7: with the class-specific reading it differs
    specific = fast_rcnn_losses(nd(cls_logits), nd(deltas), nd(labels), nd(targets), beta=beta)
    assert abs(float(specific[1].asnumpy()[0]) - want_box) > 1e-3


def test_class_agnostic_mask_loss_reads_channel_0_for_every_class():
    rng = np.random.RandomState(3)
    logits = rng.randn(3, 1, 4, 4)                      # (B*P, 1, M, M)
    targets = (rng.rand(3, 4, 4) > 0.5).astype(float)[None]
    labels = np.array([[2, 0, 1]], "float64")
    got = mask_rcnn_loss(nd(logits), nd(labels), nd(targets), cls_agnostic=True).asnumpy()
    want = np.concatenate([bce_np(logits[0, 0], targets[0, 0]).ravel(),
                           bce_np(logits[2, 0], targets[0, 2]).ravel()]).mean()
    np.testing.assert_allclose(got, [want], rtol=1e-5)


def test_mask_loss_matches_numpy():
    rng = np.random.RandomState(2)
    logits = rng.randn(3, 2, 4, 4)                      # (B*P, C, M, M)
    targets = (rng.rand(3, 4, 4) > 0.5).astype(float)[None]   # (B=1, P=3, M, M)
    labels = np.array([[1, 0, 2]], "float64")           # roi 1 is not a positive
    got = mask_rcnn_loss(nd(logits), nd(labels), nd(targets)).asnumpy()
    want = np.concatenate([bce_np(logits[0, 0], targets[0, 0]).ravel(),
                           bce_np(logits[2, 1], targets[0, 2]).ravel()]).mean()
    np.testing.assert_allclose(got, [want], rtol=1e-5)


def test_mask_loss_with_dice_matches_numpy():
    """dice_weight adds the weighted mean over the positive slots of 1 - (2 p.t + 1) /
    (sum p + sum t + 1); soft targets are taken as they are."""
    rng = np.random.RandomState(4)
    logits = rng.randn(3, 2, 4, 4)
    targets = rng.rand(1, 3, 4, 4)                      # fractional (soft) targets
    labels = np.array([[2, 0, 1]], "float64")
    got = mask_rcnn_loss(nd(logits), nd(labels), nd(targets), dice_weight=0.5).asnumpy()
    bce = np.concatenate([bce_np(logits[0, 1], targets[0, 0]).ravel(),
                          bce_np(logits[2, 0], targets[0, 2]).ravel()]).mean()

    def dice(x, t):
        p = 1.0 / (1.0 + np.exp(-x))
        return 1.0 - (2.0 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0)
    want = bce + 0.5 * (dice(logits[0, 1], targets[0, 0]) + dice(logits[2, 0], targets[0, 2])) / 2
    np.testing.assert_allclose(got, [want], rtol=1e-5)
    # by hand: a perfect, confident prediction of 2 cells: Dice 1 - (2*2 + 1) / (2 + 2 + 1) = 0
    t = np.zeros((1, 1, 2, 2))
    t[0, 0, 0, :] = 1
    x = np.where(t[0] > 0, 30.0, -30.0)[:, None]        # (1, 1, 2, 2): p = t
    got = mask_rcnn_loss(nd(x), nd([[1]]), nd(t), dice_weight=1.0).asnumpy()
    np.testing.assert_allclose(got, [1.0 - 5.0 / 5.0], atol=1e-6)
    no_pos = mask_rcnn_loss(nd(logits), nd(np.zeros((1, 3))), nd(targets), dice_weight=1.0)
    np.testing.assert_array_equal(no_pos.asnumpy(), [0])


def test_keypoint_loss_matches_numpy():
    rng = np.random.RandomState(3)
    logits = rng.randn(2, 3, 2, 2)                      # (B*P, K, S, S)
    targets = np.array([[[0, 3, 1], [2, 0, 0]]], "float64")    # (B=1, P=2, K=3)
    valid = np.array([[[1, 1, 0], [1, 0, 0]]], "float64")
    got = keypoint_rcnn_loss(nd(logits), nd(targets), nd(valid)).asnumpy()
    logp = log_softmax_np(logits.reshape(2, 3, 4))
    want = -(logp[0, 0, 0] + logp[0, 1, 3] + logp[1, 0, 2]) / 3.0   # 3 valid keypoints
    np.testing.assert_allclose(got, [want], rtol=1e-5)


def test_no_positives_gives_zero_not_nan():
    zeros_l = nd(np.zeros((1, 3)))
    neg = -np.ones((1, 3))
    obj, box = rpn_losses(nd(np.ones((1, 3))), nd(np.ones((1, 3, 4))), nd(neg),
                          nd(np.zeros((1, 3, 4))))
    np.testing.assert_array_equal(obj.asnumpy(), [0])
    np.testing.assert_array_equal(box.asnumpy(), [0])
    cls, fbox = fast_rcnn_losses(nd(np.ones((3, 3))), nd(np.ones((3, 8))), nd(neg),
                                 nd(np.ones((1, 3, 4))))
    np.testing.assert_array_equal(cls.asnumpy(), [0])
    np.testing.assert_array_equal(fbox.asnumpy(), [0])
    m = mask_rcnn_loss(nd(np.ones((3, 2, 4, 4))), zeros_l, nd(np.ones((1, 3, 4, 4))))
    np.testing.assert_array_equal(m.asnumpy(), [0])
    k = keypoint_rcnn_loss(nd(np.ones((3, 2, 4, 4))), nd(np.zeros((1, 3, 2))),
                           nd(np.zeros((1, 3, 2))))
    np.testing.assert_array_equal(k.asnumpy(), [0])


def _all_losses(F_args):
    (rpn_l, rpn_d, rpn_lab, rpn_t, cls, dl, lab, bt, ml, mlab, mt, kl, kt, kv) = F_args
    out = list(rpn_losses(rpn_l, rpn_d, rpn_lab, rpn_t, beta=0.1, batch_size_per_image=4))
    out += list(fast_rcnn_losses(cls, dl, lab, bt, beta=0.0))
    out.append(mask_rcnn_loss(ml, mlab, mt))
    out.append(keypoint_rcnn_loss(kl, kt, kv))
    return out


def _inputs():
    rng = np.random.RandomState(4)
    cls_logits, deltas, labels, targets = _fast_rcnn_case()
    return [nd(rng.randn(2, 6)), nd(rng.randn(2, 6, 4)),
            nd([[1, 0, -1, 0, 1, -1], [0, 0, -1, -1, 1, 0]]), nd(rng.randn(2, 6, 4)),
            nd(cls_logits), nd(deltas), nd(labels), nd(targets),
            nd(rng.randn(3, 2, 4, 4)), nd([[1, 0, 2]]), nd(rng.rand(1, 3, 4, 4) > 0.5),
            nd(rng.randn(2, 3, 2, 2)), nd([[[0, 3, 1], [2, 0, 0]]]), nd([[[1, 1, 0], [1, 0, 0]]])]


GRAD_INPUTS = (0, 1, 4, 5, 8, 11)   # the network outputs among the inputs


def test_gradients_flow():
    args = _inputs()
    for i in GRAD_INPUTS:
        args[i].attach_grad()
    with mx.autograd.record():
        total = mx.nd.add_n(*_all_losses(args))
    total.backward()
    for i in GRAD_INPUTS:
        g = args[i].grad.asnumpy()
        assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, i
    # ignored anchors / rois / non-positive slots get no gradient
    np.testing.assert_array_equal(args[0].grad.asnumpy()[args[2].asnumpy() < 0], 0)
    np.testing.assert_array_equal(args[4].grad.asnumpy()[3], 0)          # label -1 roi
    np.testing.assert_array_equal(args[8].grad.asnumpy()[1], 0)          # negative mask slot
    np.testing.assert_array_equal(args[8].grad.asnumpy()[0, 1], 0)       # other class channel
    np.testing.assert_array_equal(args[11].grad.asnumpy()[1, 1:], 0)     # invalid keypoints
    # the box loss only sees the gt class's deltas: roi 1 (label 1) -> columns 0..3 only
    np.testing.assert_array_equal(args[5].grad.asnumpy()[1, 4:], 0)
    assert np.abs(args[5].grad.asnumpy()[1, :4]).sum() > 0


class _LossBlock(mx.gluon.HybridBlock):
    def hybrid_forward(self, F, *args):
        return tuple(_all_losses(args))


def test_hybridized_losses_equal_imperative():
    args = _inputs()
    want = [o.asnumpy() for o in _all_losses(args)]
    block = _LossBlock()
    block.hybridize()
    for i in GRAD_INPUTS:
        args[i].attach_grad()
    with mx.autograd.record():
        got = block(*args)
        mx.nd.add_n(*got).backward()
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.asnumpy(), w, rtol=1e-6)
    for i in GRAD_INPUTS:
        assert np.all(np.isfinite(args[i].grad.asnumpy()))


class _TrainGraph(mx.gluon.HybridBlock):
    """Targets and losses in one hybridized graph, with trainable stand-ins for the heads."""

    def __init__(self, num_anchors, num_classes=2, S=8, M=4, K=2, H=6, **kwargs):
        super(_TrainGraph, self).__init__(**kwargs)
        from mxmask.modeling.targets import KeypointTargets, MaskTargets, RoISampler, RPNTargets
        self.rpn_targets = RPNTargets(batch_size_per_image=8)
        self.sampler = RoISampler(num_classes, batch_size_per_image=S, positive_fraction=0.5)
        P = self.sampler.num_pos_slots
        self.mask_targets = MaskTargets(P, resolution=M)
        self.kp_targets = KeypointTargets(P, resolution=H)
        self.C, self.S, self.P, self.M, self.K, self.H = num_classes, S, P, M, K, H
        with self.name_scope():
            self.obj = self.params.get("obj", shape=(1, num_anchors), init=mx.init.Normal(1))
            self.dlt = self.params.get("dlt", shape=(1, num_anchors, 4), init=mx.init.Normal(1))
            self.cls = self.params.get("cls", shape=(S, num_classes + 1), init=mx.init.Normal(1))
            self.box = self.params.get("box", shape=(S, num_classes * 4), init=mx.init.Normal(1))
            self.msk = self.params.get("msk", shape=(P, num_classes, M, M), init=mx.init.Normal(1))
            self.kpt = self.params.get("kpt", shape=(P, K, H, H), init=mx.init.Normal(1))

    def hybrid_forward(self, F, anchors, gt_boxes, gt_labels, gt_crowd, gt_masks, gt_kps,
                       im_info, proposals, obj, dlt, cls, box, msk, kpt):
        labels, targets, _ = self.rpn_targets(anchors, gt_boxes, gt_crowd, im_info)
        logits = F.broadcast_like(obj, labels)
        deltas = F.broadcast_like(dlt, targets)
        out = list(rpn_losses(logits, deltas, labels, targets, batch_size_per_image=8))
        rois, rlabels, matched, btargets, _ = self.sampler(proposals, gt_boxes, gt_labels)
        # (B*S, ...) and (B*P, ...) head outputs: the same parameters for both images (B = 2)
        out += list(fast_rcnn_losses(F.tile(cls, reps=(2, 1)), F.tile(box, reps=(2, 1)),
                                     rlabels, btargets))
        mtargets = self.mask_targets(rois, rlabels, matched, gt_masks)
        plabels = F.slice_axis(rlabels, axis=1, begin=0, end=self.P)
        out.append(mask_rcnn_loss(F.tile(msk, reps=(2, 1, 1, 1)), plabels, mtargets))
        ktargets, kvalid = self.kp_targets(rois, rlabels, matched, gt_kps)
        kpt_b = F.tile(kpt, reps=(2, 1, 1, 1))
        out.append(keypoint_rcnn_loss(kpt_b, ktargets, kvalid))
        return tuple(out)


def test_targets_and_losses_hybridize_and_train():
    rng = np.random.RandomState(5)
    xy = rng.uniform(0, 30, size=(40, 2))
    anchors = np.concatenate([xy, xy + rng.uniform(4, 12, size=(40, 2))], axis=1)[None]
    gt_boxes = np.array([[[2, 2, 12, 12], [-1, -1, -1, -1]], [[20, 5, 30, 25], [0, 0, 8, 8]]])
    gt_labels = np.array([[1, -1], [0, 1]])
    gt_crowd = -np.ones((2, 1, 4))
    masks = np.zeros((2, 2, 32, 32), "uint8")
    masks[0, 0, 2:12, 2:12] = 1
    masks[1, 0, 5:25, 20:30] = 1
    masks[1, 1, 0:8, 0:8] = 1
    kps = np.zeros((2, 2, 2, 3))
    kps[0, 0] = [[5, 5, 2], [10, 3, 2]]
    kps[1, 0] = [[25, 10, 2], [0, 0, 0]]
    kps[1, 1] = [[4, 4, 1], [7, 7, 2]]
    im_info = np.array([[32, 32, 1], [32, 32, 1]])
    props = np.concatenate([xy[:6], xy[:6] + 8], axis=1)
    proposals = np.stack([props, props + 3])
    inputs = [nd(anchors), nd(gt_boxes), nd(gt_labels), nd(gt_crowd),
              mx.nd.array(masks, dtype="uint8"), nd(kps), nd(im_info), nd(proposals)]
    net = _TrainGraph(num_anchors=40)
    net.initialize()
    results = []
    for hybridize in (False, True):
        if hybridize:
            net.hybridize()
        mx.random.seed(11)
        with mx.autograd.record():
            losses = net(*inputs)
            mx.nd.add_n(*losses).backward()
        results.append([l.asnumpy() for l in losses])
        for name, p in net.collect_params().items():
            g = p.grad().asnumpy()
            assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, name
    assert all(np.all(np.isfinite(l)) and l[0] > 0 for l in results[0])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5)

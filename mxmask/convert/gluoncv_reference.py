"""GluonCV's ``mask_rcnn_fpn_resnet50_v1b_coco`` as a reference: built, patched and run the way
``mxmask bench --against gluoncv`` and the GluonCV comparison tests need it.

    net = build_gluoncv_mask_rcnn(max_dets=100)      # random weights, RoIAlign bug worked around
    step = GluonCVTrainStep(net, batch=1)            # one iteration of GluonCV's training script

What goes in: the wanted number of detections per image (and the batch size for training). What
comes out: an initialised GluonCV network (random weights, nothing downloaded) with its CPU
RoIAlign bug worked around (:func:`patch_pyramid_roi_feats`, three ways), the pieces of GluonCV's
own training script that make one training iteration (:class:`GluonCVTrainStep`), GluonCV's
evaluation post-processing (:func:`gluoncv_postprocess`), and the network's stages for MAC
counting (:func:`mac_groups`). The bug is in DEVELOPING.md ("Measured facts about MXNet 1.9.1
on CPU") and docs/gluoncv.md ("GluonCV's CPU RoIAlign bug").
"""
import types

import mxnet as mx
import numpy as np

__all__ = ["MODEL_NAME", "ROI_FEATS", "pyramid_roi_feats_masked", "pyramid_roi_feats_every_level",
           "pyramid_roi_feats_gathered", "patch_pyramid_roi_feats", "set_max_dets",
           "build_gluoncv_mask_rcnn", "mac_groups", "GluonCVRPNTargets", "GluonCVTrainStep",
           "gluoncv_postprocess"]

# the GluonCV model zoo name of the reference network
MODEL_NAME = "mask_rcnn_fpn_resnet50_v1b_coco"


def _fpn_levels(F, rpn_rois, roi_canonical_scale, eps):
    """GluonCV's level of each roi (N, 5) = (batch index, x1, y1, x2, y2): 2..5, shape (N, 1)."""
    _, x1, y1, x2, y2 = F.split(rpn_rois, axis=-1, num_outputs=5)
    level = F.floor(4 + F.log2(F.sqrt((x2 - x1 + 1) * (y2 - y1 + 1)) / roi_canonical_scale + eps))
    return F.clip(level, 2, 5)


def pyramid_roi_feats_masked(self, F, features, rpn_rois, roi_size, strides, roi_mode="align",
                             roi_canonical_scale=224.0, sampling_ratio=2, eps=1e-6):
    """GluonCV's ``RCNN._pyramid_roi_feats`` (same level rule, same -1 masking, one ROIAlign pass
    over the rois per level) made correct on CPU; ``mxmask bench --against gluoncv`` uses it.

    It keeps GluonCV's own masking, so each roi is pooled (and back-propagated) once, as in
    GluonCV, and guards against both effects of the bug (:func:`patch_pyramid_roi_feats`): a
    sacrificial roi is put in front of the rois to receive the stray zeros (they land at flat
    indices 1..N, inside its row, because N rois < channels * 14 * 14), each roi's row is taken
    from its own level's output with nested ``where`` (three selects in place of GluonCV's
    four-way sum, so the uninitialised rows are never read), and the sacrificial row is sliced
    off. Hybridizable, and the same ROIAlign work as GluonCV's code; the extra cost is the one
    slice copy of the pooled features.

    Args:
        self: the GluonCV network (bound by :func:`patch_pyramid_roi_feats`).
        F: ``mx.nd`` or ``mx.sym``.
        features: P2..P5.
        rpn_rois: (N, 5) rois (batch index, x1, y1, x2, y2).
        roi_size, strides, roi_mode, roi_canonical_scale, sampling_ratio, eps: GluonCV's
            arguments (``roi_mode`` is always align here).

    Returns:
        (N, C) + ``roi_size`` pooled features, in the order of ``rpn_rois``.
    """
    level = _fpn_levels(F, rpn_rois, roi_canonical_scale, eps)                   # (N, 1)
    rois = F.concat(_sacrificial_roi(F, rpn_rois), rpn_rois, dim=0)              # (N + 1, 5)
    # the sacrificial roi gets level 0 (no level); its row is dropped below
    level = F.squeeze(F.concat(F.zeros_like(F.slice_axis(level, axis=0, begin=0, end=1)), level,
                               dim=0), axis=1)                                   # (N + 1,)
    pooled = []
    for i, lvl in enumerate(range(2, 6)):
        masked = F.where(level == lvl, rois, F.ones_like(rois) * -1.)            # GluonCV's masking
        pooled.append(F.contrib.ROIAlign(features[i], masked, roi_size, 1. / strides[i],
                                         sample_ratio=sampling_ratio))
    out = pooled[-1]
    for lvl, p in zip((4, 3, 2), pooled[-2::-1]):
        out = F.where(level == lvl, p, out)
    return F.slice_axis(out, axis=0, begin=1, end=None)


def _sacrificial_roi(F, rpn_rois):
    """The roi ``(0, 0, 0, 1, 1)`` (image 0, a 1x1 box) shaped (1, 5), made from ``rpn_rois`` so
    that it works on NDArrays and Symbols alike; no gradient flows through it."""
    first = F.stop_gradient(F.slice_axis(F.zeros_like(rpn_rois), axis=0, begin=0, end=1))
    return F.concat(F.slice_axis(first, axis=1, begin=0, end=3),
                    F.ones_like(F.slice_axis(first, axis=1, begin=3, end=5)), dim=1)


def pyramid_roi_feats_every_level(self, F, features, rpn_rois, roi_size, strides,
                                  roi_mode="align", roi_canonical_scale=224.0, sampling_ratio=2,
                                  eps=1e-6):
    """GluonCV's ``RCNN._pyramid_roi_feats`` (same level rule) with every roi pooled on every
    level with its real batch index, and each roi's own level kept with ``where``.

    Hybridizable, but four ROIAlign passes over all rois: in a training step the serial CPU
    ROIAlign backward would then charge GluonCV for pooling work its own code does not do, so
    the benchmark does not use it. tests/test_rcnn.py does (its bit-for-bit comparison with
    mxmask's gluoncv preset). Arguments and result as :func:`pyramid_roi_feats_masked`.
    """
    level = F.squeeze(_fpn_levels(F, rpn_rois, roi_canonical_scale, eps))
    pooled = []
    for i, lvl in enumerate(range(2, 6)):
        p = F.contrib.ROIAlign(features[i], rpn_rois, roi_size, 1. / strides[i],
                               sample_ratio=sampling_ratio)
        pooled.append(F.where(level == lvl, p, F.zeros_like(p)))
    return F.ElementWiseSum(*pooled)


def pyramid_roi_feats_gathered(self, F, features, rpn_rois, roi_size, strides, roi_mode="align",
                               roi_canonical_scale=224.0, sampling_ratio=2, eps=1e-6):
    """GluonCV's ``RCNN._pyramid_roi_feats`` (same level rule, same op sequence per level)
    without the -1 batch index: each level's rois are gathered and pooled once with their real
    batch index, then put back in order.

    Imperative only (``F is mx.nd``: the level assignment is read back to numpy); a quarter of
    the ROIAlign work of :func:`pyramid_roi_feats_every_level`. tests/test_convert_gluoncv.py
    uses it, whose GluonCV network is not hybridized. Arguments and result as
    :func:`pyramid_roi_feats_masked`.
    """
    assert F is mx.nd, "pyramid_roi_feats_gathered runs imperatively only (not hybridized)"
    level = _fpn_levels(F, rpn_rois, roi_canonical_scale, eps).asnumpy().reshape(-1)
    pooled, order = [], []
    for i, lvl in enumerate(range(2, 6)):
        idx = np.flatnonzero(level == lvl)
        if len(idx):
            rois = F.take(rpn_rois, mx.nd.array(idx, dtype="int64"))
            pooled.append(F.contrib.ROIAlign(features[i], rois, roi_size, 1. / strides[i],
                                             sample_ratio=sampling_ratio))
            order.append(idx)
    inverse = np.argsort(np.concatenate(order))
    return F.take(F.concat(*pooled, dim=0), mx.nd.array(inverse, dtype="int64"))


# the workarounds of patch_pyramid_roi_feats, by name
ROI_FEATS = {"masked": pyramid_roi_feats_masked, "every_level": pyramid_roi_feats_every_level,
             "gathered": pyramid_roi_feats_gathered}


def patch_pyramid_roi_feats(net, workaround="masked"):
    """Replace GluonCV's FPN RoI pooling by one that is correct on CPU.

    GluonCV's ``RCNN._pyramid_roi_feats`` pools each FPN level with the rois of the other levels
    given batch index -1. MXNet 1.9.1's CPU ``contrib.ROIAlign`` skips such a roi (forward and
    backward) but leaves its output row uninitialised and writes a zero at flat element ``n`` of
    the output (inside roi 0's row), so the pooled features are corrupted and nondeterministic.
    The three replacements of :data:`ROI_FEATS` keep GluonCV's level rule (``floor(4 +
    log2(sqrt(w * h) / 224))`` with GluonCV's +1 extent, clipped to P2..P5) and give the same,
    correct pooled features bit for bit (each roi's row is computed alone, and the other levels
    add exact zeros or are not selected; tests/test_bench.py checks it, and that GluonCV's own
    version differs). They differ in cost and in where they run: ``masked``
    (:func:`pyramid_roi_feats_masked`, the benchmark's), ``every_level``
    (:func:`pyramid_roi_feats_every_level`) and ``gathered``
    (:func:`pyramid_roi_feats_gathered`, imperative only).

    Args:
        net: a GluonCV FPN R-CNN.
        workaround: a :data:`ROI_FEATS` key.

    Returns:
        ``net``, patched, its cached graph cleared.
    """
    net._pyramid_roi_feats = types.MethodType(ROI_FEATS[workaround], net)
    net._clear_cached_op()
    return net


def set_max_dets(net, max_dets):
    """Set the detections per image of a GluonCV Mask R-CNN: the top ``_rcnn_max_dets`` rows
    after NMS go through the mask head. ``get_model(..., rcnn_max_dets=...)`` raises a
    duplicate-keyword error (DEVELOPING.md, "Outside references"), hence the attribute.

    Args:
        net: a GluonCV Mask R-CNN.
        max_dets: the wanted count, bounded by the RPN test proposal counts as GluonCV's
            constructor bounds it.

    Returns:
        the value set.
    """
    value = int(min(max_dets, net._rpn_test_post_nms, net.rpn._test_pre_nms))
    net._rcnn_max_dets = value
    net._clear_cached_op()
    return value


def build_gluoncv_mask_rcnn(max_dets=None, batch=1, workaround="masked", ctx=None):
    """GluonCV's ``mask_rcnn_fpn_resnet50_v1b_coco`` with random weights.

    Args:
        max_dets: detections per image (:func:`set_max_dets`); None keeps GluonCV's.
        batch: ``per_device_batch_size``, for training.
        workaround: the RoIAlign workaround (:func:`patch_pyramid_roi_feats`).
        ctx: the context (default CPU).

    Returns:
        the network, ``pretrained=False, pretrained_base=False`` and ``initialize()``d (shapes
        still deferred until the first forward).

    Raises:
        UserError: GluonCV cannot be imported (:func:`mxmask.convert.common.import_gluoncv`).
    """
    from .common import import_gluoncv
    gluoncv = import_gluoncv("GluonCV's %s" % MODEL_NAME)
    ctx = ctx or mx.cpu()
    net = gluoncv.model_zoo.get_model(MODEL_NAME, pretrained=False, pretrained_base=False,
                                      per_device_batch_size=batch)
    net.initialize(ctx=ctx)
    patch_pyramid_roi_feats(net, workaround)
    if max_dets is not None:
        set_max_dets(net, max_dets)
    return net


def mac_groups(net):
    """The groups :func:`mxmask.flops.count_macs` counts a GluonCV FPN Mask R-CNN's stages by.

    Args:
        net: the GluonCV network.

    Returns:
        ``{stage: parameter names (and block prefixes)}`` for backbone+fpn, rpn, box_head and
        mask_head (the box head's Dense layers are named outside the network's name scope, so
        the stages are given by their parameters).
    """
    def names(*blocks):
        return [p.name for b in blocks for p in b.collect_params().values()]
    return {"backbone+fpn": names(net.features), "rpn": [net.rpn.prefix] + names(net.rpn),
            "box_head": names(net.box_features, net.class_predictor, net.box_predictor),
            "mask_head": [net.mask.prefix] + names(net.mask)}


class GluonCVRPNTargets(object):
    """RPN anchor targets of a batch as GluonCV's data loader makes them (step 1 of
    :class:`GluonCVTrainStep`).

    The target part of ``MaskRCNNDefaultTrainTransform.__call__`` for each image (GluonCV's own
    per-level anchors cropped to each level's feature size from ``features`` shape inference,
    ``RPNTargetGenerator``: ``box_iou`` of every anchor with the gt boxes, anchors crossing the
    image border ignored, 256 anchors sampled at up to 50 % positives in numpy, numpy box
    encoding), then ``MaskRCNNTrainBatchify``'s per-level padding and concatenation. The rest
    of that transform (resize, flip, normalisation, polygon rasterisation) is data loading and
    is not included, as mxmask's training step does not include its loader.

    Called as ``targets(gt_boxes, height, width)`` with ``gt_boxes`` (B, M, 4) numpy (rows
    with a negative coordinate are padding); returns ``(cls_targets (B, N), box_targets
    (B, N, 4), box_masks (B, N, 4))`` NDArrays, N = all anchors of P2..P6.
    """

    def __init__(self, net):
        from gluoncv.data.transforms.presets.rcnn import MaskRCNNDefaultTrainTransform
        # the loader's transform, built as train_mask_rcnn.py builds it
        self._transform = MaskRCNNDefaultTrainTransform(net.short, net.max_size, net,
                                                        ashape=net.ashape, multi_stage=True)
        self._feat_sym = net.features(mx.sym.var(name="data"))    # what the batchify infers

    def _image(self, gt_boxes, height, width):
        """MaskRCNNDefaultTrainTransform.__call__'s target part for one image."""
        t = self._transform
        anchors, shapes = [], []
        for anchor, feat_sym in zip(t._anchors, t._feat_sym):
            oshape = feat_sym.infer_shape(data=(1, 3, height, width))[1][0]
            anchor = anchor[:, :, :oshape[2], :oshape[3], :]
            shapes.append(anchor.shape)
            anchors.append(anchor.reshape((-1, 4)))
        cls_target, box_target, box_mask = t._target_generator(
            mx.nd.array(gt_boxes), mx.nd.concat(*anchors, dim=0), width, height)
        out, start = [], 0
        for shape in shapes:
            size = shape[2] * shape[3] * (shape[4] // 4)
            out.append([x[start:start + size].reshape(shape[2], shape[3], -1)
                        for x in (cls_target, box_target, box_mask)])
            start += size
        return out

    def __call__(self, gt_boxes, height, width):
        per_image = []
        for boxes in gt_boxes:
            boxes = boxes[(boxes >= 0).all(axis=1)]
            levels = self._image(boxes, height, width)
            # MaskRCNNTrainBatchify: pad each level to its feature size, flatten, concat
            cls_l, box_l, mask_l = [], [], []
            for feat_sym, (cls_t, box_t, mask_t) in zip(self._feat_sym, levels):
                _, _, fh, fw = feat_sym.infer_shape(data=(1, 3, height, width))[1][0]
                pc = mx.nd.ones(shape=(fh, fw, cls_t.shape[-1])) * -1.0
                pb = mx.nd.zeros(shape=(fh, fw, box_t.shape[-1]))
                pm = mx.nd.zeros(shape=(fh, fw, mask_t.shape[-1]))
                pc[:cls_t.shape[0], :cls_t.shape[1]] = cls_t
                pb[:box_t.shape[0], :box_t.shape[1]] = box_t
                pm[:mask_t.shape[0], :mask_t.shape[1]] = mask_t
                cls_l.append(pc.reshape(1, -1))
                box_l.append(pb.reshape(1, -1, 4))
                mask_l.append(pm.reshape(1, -1, 4))
            per_image.append([mx.nd.concat(*x, dim=1) for x in (cls_l, box_l, mask_l)])
        return tuple(mx.nd.concat(*x, dim=0) for x in zip(*per_image))


class GluonCVTrainStep(object):
    """One GluonCV training iteration, as GluonCV's
    ``scripts/instance/mask_rcnn/train_mask_rcnn.py`` does it per batch on one device.

    1. RPN anchor targets, which GluonCV computes in its data loader (:class:`GluonCVRPNTargets`).
    2. Forward in ``autograd.record()`` (train mode) with gt boxes and labels: backbone + FPN,
       RPN with training proposals (12000 pre-NMS, 2000 post-NMS), GluonCV's RoI sampler (512
       rois, 25 % positives) and box targets, FPN RoIAlign (with the patched
       ``_pyramid_roi_feats``), box head on the sampled rois, mask head on the 128 positive
       slots.
    3. Losses as the script computes them: RPN sigmoid BCE over the sampled anchors and Huber
       (rho 1/9) box loss, each scaled by ``size / number of sampled anchors``; R-CNN softmax
       CE and Huber (rho 1) box loss scaled by ``size / valid rois``; mask targets from
       ``net.mask_target`` (ROIAlign of the gt masks at 28x28 on the positive rois) and the
       mask sigmoid BCE scaled by ``size / mask weights``; ``total = sum of all``.
    4. ``total.backward()`` and ``trainer.step(batch)``: SGD with momentum 0.9 and weight decay
       1e-4 (none on biases), the script's settings, on ``net.collect_train_params()``
       (GluonCV's train patterns: the stem, the first ResNet stage and every BatchNorm stay
       frozen). The learning rate is a constructor argument (``mxmask bench`` uses its own
       step's 1e-4; the script's is 0.00125 per image); it does not change the time.

    The script's metric updates (accuracy / L1 metrics) and learning-rate warm-up are not part
    of the step. :meth:`step` takes a dict of numpy arrays as
    :func:`mxmask.bench.synthetic_train_batch` makes them (``data``, ``gt_boxes``,
    ``gt_labels``, ``gt_masks``) and returns the total loss NDArray; :meth:`rpn_targets` (step
    1) and :meth:`forward_backward_update` (steps 2-4) can be called separately.

    Args:
        net: a GluonCV Mask R-CNN built with ``per_device_batch_size=batch``.
        batch: images per step.
        lr, momentum, wd: the SGD settings.
        ctx: the context (default CPU).
    """

    def __init__(self, net, batch=1, lr=1e-4, momentum=0.9, wd=1e-4, ctx=None):
        from mxnet import gluon
        self.net = net
        self.batch = batch
        self.ctx = ctx or mx.cpu()
        net.collect_params().setattr("grad_req", "null")
        net.collect_train_params().setattr("grad_req", "write")
        for v in net.collect_params(".*bias").values():
            v.wd_mult = 0.0
        self.trainer = gluon.Trainer(net.collect_train_params(), "sgd",
                                     {"learning_rate": lr, "wd": wd, "momentum": momentum})
        self.rpn_cls_loss = gluon.loss.SigmoidBinaryCrossEntropyLoss(from_sigmoid=False)
        self.rpn_box_loss = gluon.loss.HuberLoss(rho=1. / 9.)
        self.rcnn_cls_loss = gluon.loss.SoftmaxCrossEntropyLoss()
        self.rcnn_box_loss = gluon.loss.HuberLoss(rho=1.)
        self.rcnn_mask_loss = gluon.loss.SigmoidBinaryCrossEntropyLoss(from_sigmoid=False)
        self._targets = GluonCVRPNTargets(net)

    def inputs(self, batch):
        """(data, label (B, M, 5) = box + class, gt_masks) NDArrays of a synthetic batch."""
        label = np.concatenate([batch["gt_boxes"], batch["gt_labels"][..., None]], axis=-1)
        return (mx.nd.array(batch["data"], ctx=self.ctx), mx.nd.array(label, ctx=self.ctx),
                mx.nd.array(batch["gt_masks"], ctx=self.ctx))

    def rpn_targets(self, batch):
        """Step 1: the anchor targets of a synthetic batch (:class:`GluonCVRPNTargets`), on
        ``ctx``."""
        h, w = batch["data"].shape[2:]
        return [x.as_in_context(self.ctx) for x in self._targets(batch["gt_boxes"], h, w)]

    def forward_backward_update(self, data, label, gt_mask, rpn_cls_targets, rpn_box_targets,
                                rpn_box_masks):
        """Steps 2-4 on NDArrays (:meth:`inputs` and :meth:`rpn_targets`); returns the total
        loss."""
        from mxnet import autograd
        net = self.net
        with autograd.record():
            gt_label = label[:, :, 4:5]
            gt_box = label[:, :, :4]
            cls_pred, box_pred, mask_pred, roi, _, matches, rpn_score, rpn_box, _, \
                cls_targets, box_targets, box_masks, indices = net(data, gt_box, gt_label)
            rpn_score = rpn_score.squeeze(axis=-1)
            num_rpn_pos = (rpn_cls_targets >= 0).sum()
            rpn_loss1 = self.rpn_cls_loss(rpn_score, rpn_cls_targets, rpn_cls_targets >= 0) * \
                rpn_cls_targets.size / num_rpn_pos
            rpn_loss2 = self.rpn_box_loss(rpn_box, rpn_box_targets, rpn_box_masks) * \
                rpn_box.size / num_rpn_pos
            num_rcnn_pos = (cls_targets >= 0).sum()
            rcnn_loss1 = self.rcnn_cls_loss(cls_pred, cls_targets,
                                            cls_targets.expand_dims(-1) >= 0) * \
                cls_targets.size / num_rcnn_pos
            rcnn_loss2 = self.rcnn_box_loss(box_pred, box_targets, box_masks) * \
                box_pred.size / num_rcnn_pos
            # mask targets on the sampled positive slots, as the script takes them
            n = indices.shape[0]
            roi = mx.nd.concat(*[mx.nd.take(roi[i], indices[i]) for i in range(n)],
                               dim=0).reshape((n, -1, 4))
            m_cls_targets = mx.nd.concat(*[mx.nd.take(cls_targets[i], indices[i])
                                           for i in range(n)], dim=0).reshape((n, -1))
            matches = mx.nd.concat(*[mx.nd.take(matches[i], indices[i]) for i in range(n)],
                                   dim=0).reshape((n, -1))
            mask_targets, mask_masks = net.mask_target(roi, gt_mask, matches, m_cls_targets)
            mask_loss = self.rcnn_mask_loss(mask_pred, mask_targets, mask_masks) * \
                mask_targets.size / mask_masks.sum()
            total = (rpn_loss1 + rpn_loss2).sum() + (rcnn_loss1 + rcnn_loss2).sum() + \
                mask_loss.sum()
        total.backward()
        self.trainer.step(self.batch)
        return total

    def step(self, batch, arrays=None):
        """Targets (step 1) + forward, backward, update (steps 2-4). ``arrays`` = a cached
        :meth:`inputs` of ``batch`` (moving the batch into NDArrays is not GluonCV's work)."""
        data, label, gt_mask = arrays or self.inputs(batch)
        targets = self.rpn_targets(batch)
        return self.forward_backward_update(data, label, gt_mask, *targets)


def gluoncv_postprocess(ids, scores, boxes, masks, height, width, scale=1.0, thresh=0.001):
    """The image-side part of GluonCV's COCO evaluation (``validate`` +
    ``COCOInstanceMetric.update``) for one image: the counterpart of mxmask's paste/decode.

    Rows with ``id >= 0`` and ``score >= thresh`` are kept, boxes divided by ``scale``, the
    28x28 probabilities filled into the original image with
    ``gluoncv.data.transforms.mask.fill`` (GluonCV's default fast fill), and each mask encoded
    as a compressed RLE.

    Args:
        ids, scores, boxes, masks: GluonCV's outputs for the image: (D, 1), (D, 1), (D, 4),
            (D, 28, 28) numpy.
        height, width: the network input's size.
        scale: network input / original image.
        thresh: the score threshold.

    Returns:
        list of RLE dicts (``counts`` as str).
    """
    import pycocotools.mask as mask_util
    from gluoncv.data.transforms.mask import fill
    ids, scores = ids.reshape(-1), scores.reshape(-1)
    valid = np.where((ids >= 0) & (scores >= thresh))[0]
    if not len(valid):
        return []
    full = fill(masks[valid], boxes[valid] / scale,
                (int(round(width / scale)), int(round(height / scale))))
    rles = []
    for m in full:
        rle = mask_util.encode(np.array(m[:, :, np.newaxis], order="F"))[0]
        rle["counts"] = rle["counts"].decode("ascii")
        rles.append(rle)
    return rles

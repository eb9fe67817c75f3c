"""RoI heads: box head + predictor, detection post-processing, mask head, keypoint head.

    BoxHead(cfg)        forward(rois (B, R, 4), P2..P5) -> features (B*R, fc_dim)
    BoxPredictor(...)   forward(features) -> cls_logits (B*R, C+1), box_deltas (B*R, C*4)
    detect(F, ...)      -> ids (B, D), scores (B, D), boxes (B, D, 4)
    refine_detections(F, ...) -> the same, after a second box-head pass (test.refine_boxes)
    MaskHead(cfg)       forward(rois (B, R, 4), P2..P5[, image]) -> logits (B*R, C, 2P, 2P)
    select_class_masks(F, logits, ids, C) -> probabilities (B, D, 2P, 2P)
    rescore_by_masks(F, ids, scores, masks, threshold, *others)   (test.mask_score)
    KeypointHead(cfg)   forward(rois (B, R, 4), P2..P5) -> heatmap logits (B*R, K, S, S)
    decode_keypoints(F, heatmaps (B, D, K, S, S), boxes (B, D, 4), S) -> (B, D, K, 3)

B images, R rois per image, C foreground classes, D = test.max_dets, K keypoints, P a head's
pooler resolution (14: masks 2P = 28), S = 4P the heatmap side (56). Boxes are
``(x1, y1, x2, y2)`` in network-input pixels. Everything is a HybridBlock or a function of
``F`` that builds fixed-size outputs with native ops (no Python loop over rois or classes), so
the whole inference path hybridizes into one graph. At inference the mask and keypoint heads
run on the B*D final detections only; padded detections (id -1, box 0) are safe to pool: the
pooler never gives ROIAlign a degenerate roi.
"""
import math

import mxnet as mx
from mxnet.gluon import nn

from ..utils import UserError
from ._utils import batch_gather, box_nms
from .box_coder import clip_boxes, decode_boxes
from .norm import make_norm
from .poolers import MultiLevelRoIAlign
from .precision import Conv2D

__all__ = ["BoxHead", "BoxPredictor", "MaskHead", "KeypointHead", "detect", "detection_settings",
           "refine_detections", "hflip_heatmaps",
           "select_class_masks", "mask_quality", "rescore_by_masks", "decode_keypoints",
           "pooler_style", "DETECTRON2_SCALE_CLAMP",
           "GLUONCV_SCALE_CLAMP"]

DETECTRON2_SCALE_CLAMP = math.log(1000.0 / 16)
GLUONCV_SCALE_CLAMP = 4.42          # GluonCV's predefined FPN models: clip=4.42


def pooler_style(cfg):
    """The level-assignment style of :class:`MultiLevelRoIAlign` for this config.

    Args:
        cfg: the config.

    Returns:
        ``model.box_head.level_mapper``, or when it is empty ``"gluoncv"`` with
        ``model.box_plus_one`` and ``"detectron2"`` otherwise.
    """
    if cfg.model.box_head.level_mapper:
        return cfg.model.box_head.level_mapper
    return "gluoncv" if cfg.model.box_plus_one else "detectron2"


def _pooler(cfg, resolution, rois_in_image=False):
    """A multi-level RoIAlign over P2..P5 at ``resolution`` with the box head's sampling mode.
    ``rois_in_image``: the rois always lie inside the (padded) image, which lets the legacy mode
    pool on the level canvas too: proposals and sampled training rois are clipped to it, and so
    are the detections the mask and keypoint heads pool when ``model.clip_boxes`` is on."""
    bh = cfg.model.box_head
    return MultiLevelRoIAlign(resolution, tuple(cfg.model.anchor.strides[:4]), bh.sampling_ratio,
                              bh.aligned, pooler_style(cfg), rois_in_image=rois_in_image)


def _conv_stack(num_conv, channels, in_channels, prefix_format, norm="", gn_groups=32,
                key="model.box_head"):
    """``num_conv`` x (3x3 conv to ``channels`` + ReLU); layer i is named ``prefix_format % i``
    (1-based, Detectron2's names). With ``norm="gn"`` each conv has no bias and is followed by a
    GroupNorm of ``gn_groups`` groups (named ``<conv prefix>norm_``) before its ReLU. Returns
    (the stack, its output channels: ``channels``, or ``in_channels`` when ``num_conv`` is 0).
    ``key`` is the head's config section, named in the errors (a norm other than "" or "gn", or
    ``gn_groups`` that does not divide ``channels``)."""
    if norm not in ("", "gn"):
        raise UserError("%s.norm: expected '' or 'gn', got %r" % (key, norm))
    if norm and num_conv and channels % gn_groups:
        raise UserError("model.backbone.gn_groups=%d does not divide %s's conv_dim=%d"
                        % (gn_groups, key, channels))
    convs = nn.HybridSequential(prefix="")
    for i in range(num_conv):
        prefix = prefix_format % (i + 1)
        if not norm:
            convs.add(Conv2D(channels, 3, padding=1, activation="relu",
                             in_channels=in_channels, prefix=prefix))
        else:
            convs.add(Conv2D(channels, 3, padding=1, use_bias=False, in_channels=in_channels,
                             prefix=prefix),
                      make_norm(norm, channels, gn_groups=gn_groups, prefix=prefix + "norm_"),
                      nn.Activation("relu"))
        in_channels = channels
    return convs, in_channels


# --------------------------------------------------------------------------------------------
# Box branch
# --------------------------------------------------------------------------------------------
class BoxHead(mx.gluon.HybridBlock):
    """Pool each roi from P2..P5 and run the fc layers (Detectron2 ``FastRCNNConvFCHead`` /
    GluonCV ``box_features``).

    MultiLevelRoIAlign at ``box_head.pooler_resolution``; with ``pool_then_avgpool`` (GluonCV)
    a 3x3/2 pad-1 average pool (count_include_pad) brings 14x14 to 7x7; then ``num_conv`` x
    (3x3 ``conv_dim`` [+ GroupNorm] + ReLU) (Detectron2's "4conv1fc" heads; none by default)
    and ``num_fc`` x (Dense(``fc_dim``) + ReLU) on the flattened (channels*P*P) input.
    ``out_units`` is the feature size.

    Args:
        cfg: the config (``model.box_head``, ``model.fpn.out_channels``).
    """

    def __init__(self, cfg, **kwargs):
        super(BoxHead, self).__init__(**kwargs)
        bh = cfg.model.box_head
        channels = cfg.model.fpn.out_channels
        resolution = bh.pooler_resolution
        with self.name_scope():
            self.pooler = _pooler(cfg, resolution, rois_in_image=True)
            if bh.pool_then_avgpool:
                self.avgpool = nn.AvgPool2D(pool_size=3, strides=2, padding=1)
                resolution = (resolution + 2 - 3) // 2 + 1
            else:
                self.avgpool = None
            self.convs, channels = _conv_stack(bh.num_conv, bh.conv_dim, channels, "conv%d_",
                                               bh.norm, cfg.model.backbone.gn_groups,
                                               "model.box_head")
            self.fcs = nn.HybridSequential(prefix="")
            in_units = channels * resolution * resolution
            for i in range(bh.num_fc):
                self.fcs.add(nn.Dense(bh.fc_dim, activation="relu", in_units=in_units,
                                      prefix="fc%d_" % (i + 1)))
                in_units = bh.fc_dim
        self.out_units = in_units

    def hybrid_forward(self, F, rois, *features):
        """
        Args:
            rois: (B, R, 4) xyxy in input pixels.
            features: P2..P5.

        Returns:
            (B*R, out_units) box features, image-major.
        """
        x = self.pooler(rois, *features)
        if self.avgpool is not None:
            x = self.avgpool(x)
        x = F.flatten(self.convs(x))
        return self.fcs(x)


class BoxPredictor(mx.gluon.HybridBlock):
    """Class logits (C+1, background first) and class-specific box deltas (C*4), or one set of
    deltas for every class (4) with ``cls_agnostic`` (Detectron2's
    ``box_head.cls_agnostic_bbox_reg``). The layout of GluonCV's class_predictor /
    box_predictor, copied as is: column 0 is background, class c has its deltas at columns
    4c..4c+3.

    Args:
        in_units: the box head's feature size.
        num_classes: C.
        cls_agnostic: one set of deltas for every class.
    """

    def __init__(self, in_units, num_classes, cls_agnostic=False, **kwargs):
        super(BoxPredictor, self).__init__(**kwargs)
        self.num_classes = num_classes
        self.cls_agnostic = bool(cls_agnostic)
        with self.name_scope():
            self.cls_score = nn.Dense(num_classes + 1, in_units=in_units, prefix="cls_score_")
            self.bbox_pred = nn.Dense(4 if cls_agnostic else num_classes * 4, in_units=in_units,
                                      prefix="bbox_pred_")

    def hybrid_forward(self, F, x):
        """
        Args:
            x: (B*R, in_units) box features.

        Returns:
            cls_logits (B*R, C+1) and box_deltas (B*R, C*4), or (B*R, 4) with
            ``cls_agnostic``.
        """
        return self.cls_score(x), self.bbox_pred(x)


def detection_settings(cfg):
    """Keyword arguments of :func:`detect` taken from the config.

    The scale clamp of the box decoder is 4.42 when ``model.anchor.style`` is ``gluoncv``:
    GluonCV's RCNN decoder (``NormalizedBoxCenterDecoder(clip=4.42)`` -> ``contrib.box_decode``
    with stds 0.1/0.1/0.2/0.2) clamps the log-scales there instead of at log(1000/16); it has
    no "+1" in widths (``box_coder.decode_boxes`` with plus_one=True is bit-exact with it).

    Args:
        cfg: the config (``model``, ``test``).

    Returns:
        dict: ``num_classes`` and the other keyword arguments of :func:`detect` (and of
        :func:`refine_detections`).
    """
    bh = cfg.model.box_head
    clamp = getattr(bh, "scale_clamp", None)  # a config field the lead may add
    if clamp is None:
        gluoncv = cfg.model.anchor.style == "gluoncv"
        clamp = GLUONCV_SCALE_CLAMP if gluoncv else DETECTRON2_SCALE_CLAMP
    if cfg.test.max_dets <= 0:
        raise ValueError("test.max_dets must be > 0, got %d" % cfg.test.max_dets)
    return dict(num_classes=cfg.model.num_classes,
                cls_agnostic_bbox_reg=bool(bh.cls_agnostic_bbox_reg),
                bbox_reg_weights=tuple(float(w) for w in bh.bbox_reg_weights),
                score_thresh=float(cfg.test.score_thresh),
                nms_thresh=float(cfg.test.nms_thresh),
                max_dets=int(cfg.test.max_dets),
                clip=bool(cfg.model.clip_boxes),
                clip_plus_one=bool(cfg.model.box_plus_one),
                decode_plus_one=bool(cfg.model.box_plus_one),
                scale_clamp=float(clamp),
                min_box_size=float(cfg.test.min_box_size))


def detect(F, cls_logits, box_deltas, rois, roi_scores, im_info, num_classes,
           cls_agnostic_bbox_reg=False, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
           score_thresh=0.05, nms_thresh=0.5, max_dets=100, clip=True, clip_plus_one=False,
           decode_plus_one=False, scale_clamp=DETECTRON2_SCALE_CLAMP, min_box_size=0.0):
    """Turn box-head outputs into at most ``max_dets`` detections per image.

    Softmax, class-specific decode from the rois, optional clip, score threshold (strict
    ``>``), per-class NMS (one ``box_nms`` call over a (B, C, R, 6) array: each class of each
    image is an independent batch) and the top D scores per image.

    GluonCV's ``MultiPerClassDecoder`` (the ``gluoncv_mask_rcnn_r50_fpn`` preset) keeps
    ``score > 0.01``, runs per-class NMS at 0.5 with ``topk=-1`` and ``valid_thresh=0.0001`` on
    a (C, N, 6) array per image (the same computation as here), then argsorts all C*N results by
    score, takes the top ``rcnn_max_dets`` (the preset uses 100) and does not clip. Only the
    order of exactly equal scores can differ (argsort vs topk).

    Args:
        cls_logits: (B*R, C+1) from :class:`BoxPredictor`.
        box_deltas: (B*R, C*4), or (B*R, 4) with ``cls_agnostic_bbox_reg`` (one box per roi,
            shared by the classes).
        rois: (B, R, 4) from the RPN.
        roi_scores: (B, R); rois with a negative score are padding and yield no detection.
        im_info: (B, 3) = (h, w, scale).
        num_classes: C.
        bbox_reg_weights, decode_plus_one, scale_clamp: the box decoder's
            (:func:`~mxmask.modeling.box_coder.decode_boxes`).
        score_thresh: detections must score above it.
        nms_thresh: the per-class NMS IoU threshold.
        max_dets: D.
        clip, clip_plus_one: clip the boxes to the image (``model.clip_boxes``).
        min_box_size: > 0 drops boxes (after the clip) whose width or height is under it
            (torchvision's ``remove_small_boxes``).

    Returns:
        ids (B, D) float class labels 0..C-1, scores (B, D), boxes (B, D, 4), sorted by score,
        valid rows first; padded rows are id -1, score -1, box 0.
    """
    C = int(num_classes)
    # (B*R, X) -> (B, R, X)
    probs = F.softmax(F.reshape_like(cls_logits, rois, lhs_begin=0, lhs_end=1,
                                     rhs_begin=0, rhs_end=2), axis=-1)
    fg = F.slice_axis(probs, axis=-1, begin=1, end=None)                       # (B, R, C)
    deltas = F.reshape_like(box_deltas, rois, lhs_begin=0, lhs_end=1, rhs_begin=0, rhs_end=2)
    deltas = F.reshape(deltas, (0, 0, -4, 1 if cls_agnostic_bbox_reg else C, 4))  # (B, R, C, 4)
    anchors = F.broadcast_like(F.expand_dims(rois, axis=2), deltas)           # (B, R, C, 4)
    boxes = decode_boxes(F, deltas, anchors, weights=tuple(bbox_reg_weights),
                         plus_one=decode_plus_one, scale_clamp=scale_clamp)
    if cls_agnostic_bbox_reg:
        boxes = F.broadcast_axis(boxes, axis=2, size=C)                        # (B, R, C, 4)
    boxes = F.reshape(boxes, (0, -3, 4))                                       # (B, R*C, 4)
    if clip:
        boxes = clip_boxes(F, boxes, im_info, plus_one=clip_plus_one)
    # score threshold; padded rois (score < 0) never produce a detection
    keep = F.broadcast_mul(fg > score_thresh, F.expand_dims(roi_scores >= 0, axis=2))
    if min_box_size > 0:
        x1, y1, x2, y2 = F.split(F.reshape(boxes, (0, -4, -1, C, 4)), axis=-1, num_outputs=4,
                                 squeeze_axis=True)                            # (B, R, C) each
        keep = keep * (x2 - x1 >= min_box_size) * (y2 - y1 >= min_box_size)
    scores = F.where(keep, fg, F.ones_like(fg) * -1)
    class_ids = F.broadcast_like(F.reshape(F.contrib.arange_like(fg, axis=2), (1, 1, C)), fg)
    class_ids = F.where(keep, class_ids, F.ones_like(fg) * -1)
    entries = F.concat(F.expand_dims(class_ids, axis=3), F.expand_dims(scores, axis=3),
                       F.reshape(boxes, (0, -4, -1, C, 4)), dim=-1)            # (B, R, C, 6)
    # per-class NMS: box_nms treats the leading axes as independent batches, so with the class
    # axis in front each class of each image is its own NMS (C * R^2 pairs instead of
    # (C * R)^2 for one NMS with id_index over all classes). Each (b, c) row comes back sorted
    # by score, with the suppressed and invalid entries as rows of -1.
    nms = box_nms(F, F.transpose(entries, axes=(0, 2, 1, 3)), overlap_thresh=nms_thresh,
                  valid_thresh=0.0, topk=-1, coord_start=2, score_index=1, id_index=0,
                  background_id=-1, force_suppress=False, in_format="corner",
                  out_format="corner")                                          # (B, C, R, 6)
    nms = F.reshape(nms, (0, -3, 0))                                           # (B, C*R, 6)
    # append max_dets padding rows so that top-k exists even when C*R < max_dets
    pad = F.broadcast_axis(F.ones_like(F.slice_axis(nms, axis=1, begin=0, end=1)) * -1,
                           axis=1, size=max_dets)
    nms = F.concat(nms, pad, dim=1)
    # the max_dets highest scores over all classes (invalid rows have score -1)
    key = F.reshape(F.slice_axis(nms, axis=-1, begin=1, end=2), (0, -1))
    top = F.topk(key, axis=1, k=max_dets, ret_typ="indices", is_ascend=False)  # (B, D)
    out = batch_gather(F, nms, top)                                            # (B, D, 6)
    ids = F.reshape(F.slice_axis(out, axis=-1, begin=0, end=1), (0, -1))
    valid = ids >= 0
    scores = F.where(valid, F.reshape(F.slice_axis(out, axis=-1, begin=1, end=2), (0, -1)),
                     F.ones_like(ids) * -1)
    boxes = F.broadcast_mul(F.slice_axis(out, axis=-1, begin=2, end=6), F.expand_dims(valid, 2))
    return ids, scores, boxes


def refine_detections(F, cls_logits, box_deltas, ids, scores, boxes, im_info, num_classes,
                      cls_agnostic_bbox_reg=False, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
                      clip=True, clip_plus_one=False, decode_plus_one=False,
                      scale_clamp=DETECTRON2_SCALE_CLAMP, **_):
    """A second pass of the box head on its own detections (``test.refine_boxes``).

    Each valid detection moves to the box its class's deltas give from it (decoded and clipped
    as in :func:`detect`), and its score becomes the mean of its score and the second pass's
    probability of its class: Cascade R-CNN's test-time refinement and score averaging, with
    one head. The class stays. Rows are re-sorted by the new scores.

    Args:
        cls_logits: (B*D, C+1), the box head's outputs on ``boxes``.
        box_deltas: (B*D, C*4), or (B*D, 4) with ``cls_agnostic_bbox_reg``.
        ids, scores, boxes: (B, D), (B, D), (B, D, 4), the detections of :func:`detect`.
        im_info: (B, 3) = (h, w, scale).
        num_classes and the other keyword arguments: those of :func:`detection_settings`
            (the NMS and threshold ones are not used).

    Returns:
        ids (B, D), scores (B, D), boxes (B, D, 4), re-sorted; padding rows (id -1) keep
        score -1 and box 0.
    """
    C = int(num_classes)
    valid = ids >= 0
    onehot = F.one_hot(F.relu(ids), C)                                         # (B, D, C)
    probs = F.softmax(F.reshape_like(cls_logits, ids, lhs_begin=0, lhs_end=1,
                                     rhs_begin=0, rhs_end=2), axis=-1)
    prob = F.sum(F.slice_axis(probs, axis=-1, begin=1, end=None) * onehot, axis=-1)   # (B, D)
    deltas = F.reshape_like(box_deltas, ids, lhs_begin=0, lhs_end=1, rhs_begin=0, rhs_end=2)
    if not cls_agnostic_bbox_reg:
        deltas = F.reshape(deltas, (0, 0, -4, C, 4))                            # (B, D, C, 4)
        deltas = F.sum(F.broadcast_mul(deltas, F.expand_dims(onehot, axis=3)), axis=2)
    refined = decode_boxes(F, deltas, boxes, weights=tuple(bbox_reg_weights),
                           plus_one=decode_plus_one, scale_clamp=scale_clamp)
    if clip:
        refined = clip_boxes(F, refined, im_info, plus_one=clip_plus_one)
    refined = F.broadcast_mul(refined, F.expand_dims(valid, axis=2))           # padding: 0
    new_scores = F.where(valid, (scores + prob) * 0.5, F.ones_like(scores) * -1)
    order = F.topk(new_scores, axis=1, k=0, ret_typ="indices", is_ascend=False)  # (B, D)
    return tuple(batch_gather(F, a, order) for a in (ids, new_scores, refined))


# --------------------------------------------------------------------------------------------
# Mask branch
# --------------------------------------------------------------------------------------------
class Deconv2D(nn.Conv2DTranspose):
    """``nn.Conv2DTranspose`` (same arguments, parameters and names) that adds its bias after
    the ``Deconvolution`` operator instead of inside it, as a depthwise 1x1 ``Convolution`` with
    unit weights (exactly ``+ bias``).

    The same values, faster on CPU: MXNet 1.9.1's ``Deconvolution`` with a bias is slow there
    (DEVELOPING.md, "Measured facts about MXNet 1.9.1 on CPU"; docs/benchmarks.md).
    ``broadcast_add`` is slower still, and a ``BatchNorm`` affine needs its statistics as graph
    variables (new parameters). Input (N, C_in, H, W) -> output as ``nn.Conv2DTranspose``'s.
    """

    def hybrid_forward(self, F, x, weight, bias=None):
        y = F.Deconvolution(x, weight, name="fwd", **dict(self._kwargs, no_bias=True))
        if bias is not None:
            unit = F.BlockGrad(F.ones_like(F.reshape(bias, (-1, 1, 1, 1))))    # (C, 1, 1, 1)
            y = F.Convolution(y, unit, bias, kernel=(1, 1), num_filter=self._channels,
                              num_group=self._channels, name="bias")
        return self.act(y) if self.act is not None else y


class ImageGuide(mx.gluon.HybridBlock):
    """The input image at the mask head's own resolution (``mask_head.image_guide`` = g > 0; not
    in Detectron2).

    Each roi is pooled from the image at 2P x 2P (RoIAlign at stride 1, the box head's sampling
    ratio and aligned flag), then a 3x3 conv + ReLU (``conv_``) makes g channels. Stride-4
    features pooled to 14x14 blur the edges, points and limbs a pixel or two wide that these
    pixels still show.

    Args:
        cfg: the config (``model.box_head`` sampling).
        channels: g.
        resolution: the output side, the mask head's 2P.
    """

    def __init__(self, cfg, channels, resolution, **kwargs):
        super(ImageGuide, self).__init__(**kwargs)
        bh = cfg.model.box_head
        with self.name_scope():
            self.pooler = MultiLevelRoIAlign(resolution, (1,), bh.sampling_ratio, bh.aligned,
                                             pooler_style(cfg))
            self.conv = Conv2D(channels, 3, padding=1, activation="relu", in_channels=3,
                               prefix="conv_")

    def hybrid_forward(self, F, rois, image):
        """
        Args:
            rois: (B, R, 4) xyxy in input pixels.
            image: (B, 3, H, W) the normalised network input.

        Returns:
            (B*R, g, 2P, 2P), image-major.
        """
        return self.conv(self.pooler(rois, image))


def head_inputs(head, levels, image):
    """What a RoI head takes after its rois.

    Args:
        head: a RoI head block.
        levels: P2..P5.
        image: (B, 3, H, W) the normalised network input.

    Returns:
        tuple: ``levels``, then ``image`` when the head has an ``image_guide`` (the mask
        head's option).
    """
    return tuple(levels) + ((image,) if getattr(head, "image_guide", 0) else ())


class MaskHead(mx.gluon.HybridBlock):
    """Detectron2's ``MaskRCNNConvUpsampleHead`` (= GluonCV's ``Mask`` with 4 convs): pool at
    ``mask_head.pooler_resolution`` P, num_conv x (3x3 conv_dim [+ norm] + ReLU), 2x2/2 deconv
    + ReLU, 1x1 conv to C mask logits at 2P x 2P (one, shared by the classes, with
    ``mask_head.cls_agnostic_mask``: ``num_classes`` is then 1).

    With ``mask_head.image_guide`` = g > 0 (not in Detectron2) the last input is the network's
    input image: an :class:`ImageGuide` pools it at the output resolution 2P into g channels,
    and one more 3x3 conv (+ the head's norm) + ReLU maps [deconv output, those g] to g
    channels before the predictor (:func:`head_inputs` builds the inputs).

    Args:
        cfg: the config (``model.mask_head``, ``model.clip_boxes``, ...).
    """

    def __init__(self, cfg, **kwargs):
        super(MaskHead, self).__init__(**kwargs)
        mh = cfg.model.mask_head
        self.num_classes = 1 if mh.cls_agnostic_mask else cfg.model.num_classes
        self.image_guide = int(mh.image_guide)
        if self.image_guide < 0:
            raise UserError("model.mask_head.image_guide: expected a channel count >= 0 (0: "
                            "off), got %d" % self.image_guide)
        channels = cfg.model.fpn.out_channels
        with self.name_scope():
            self.pooler = _pooler(cfg, mh.pooler_resolution, cfg.model.clip_boxes)
            self.convs, channels = _conv_stack(mh.num_conv, mh.conv_dim, channels, "mask_fcn%d_",
                                               mh.norm, cfg.model.backbone.gn_groups,
                                               "model.mask_head")
            self.deconv = Deconv2D(mh.conv_dim, 2, strides=2, in_channels=channels,
                                   activation="relu", prefix="deconv_")
            channels = mh.conv_dim
            if self.image_guide:
                self.image = ImageGuide(cfg, self.image_guide, 2 * mh.pooler_resolution,
                                        prefix="image_")
                self.fuse, channels = _conv_stack(1, self.image_guide, channels + self.image_guide,
                                                  "mask_fuse%d_", mh.norm,
                                                  min(cfg.model.backbone.gn_groups,
                                                      self.image_guide), "model.mask_head")
            self.predictor = Conv2D(self.num_classes, 1, in_channels=channels,
                                    prefix="predictor_")

    def hybrid_forward(self, F, rois, *features):
        """
        Args:
            rois: (B, R, 4) xyxy in input pixels.
            features: P2..P5, then with ``image_guide`` the input image (B, 3, H, W).

        Returns:
            (B*R, C, 2P, 2P) mask logits, image-major.
        """
        levels = features[:-1] if self.image_guide else features
        x = self.convs(self.pooler(rois, *levels))
        x = self.deconv(x)            # with its ReLU (Activation op: MKLDNN can fuse it)
        if self.image_guide:
            x = self.fuse(F.concat(x, self.image(rois, features[-1]), dim=1))
        return self.predictor(x)


def select_class_masks(F, mask_logits, ids, num_classes):
    """The mask probabilities of each detection's class.

    Args:
        mask_logits: (B*D, C, M, M), M = 2P.
        ids: (B, D) class labels; padding ids (-1) select channel 0 (their masks are
            meaningless but finite). With class-agnostic masks (C = 1) every id selects
            channel 0.
        num_classes: C.

    Returns:
        (B, D, M, M) sigmoid of the id's channel.
    """
    cls = F.reshape(F.clip(ids, 0, num_classes - 1), (-1,))                    # (B*D,)
    # a gather of one M x M plane per roi: a one-hot product summed over the C classes would
    # read all of them
    picked = F.gather_nd(mask_logits, F.stack(F.contrib.arange_like(cls), cls, axis=0))
    picked = F.reshape_like(picked, ids, lhs_begin=0, lhs_end=1, rhs_begin=0, rhs_end=2)
    return F.sigmoid(picked)


def mask_quality(F, masks, threshold):
    """SOLOv2's maskness: the mean probability of the cells at or above ``threshold`` (the
    mask's foreground), 0 for an empty mask.

    Args:
        masks: (B, D, M, M) probabilities.
        threshold: ``test.mask_thresh``.

    Returns:
        (B, D) maskness.
    """
    fg = masks >= threshold
    area = F.sum(fg, axis=(2, 3))
    return F.sum(masks * fg, axis=(2, 3)) / F.maximum(area, 1.0)


def rescore_by_masks(F, ids, scores, masks, threshold, *others):
    """``test.mask_score``: each detection's score times its maskness (:func:`mask_quality`),
    so that detections whose masks are confident rank first, then every output re-sorted by the
    new score. Mask AP rewards the ranking (docs/experiments/shapes_test_time.md,
    "test.mask_score").

    Args:
        ids, scores: (B, D).
        masks: (B, D, M, M) probabilities.
        threshold: ``test.mask_thresh``, for :func:`mask_quality`.
        others: more (B, D, ...) outputs to re-sort.

    Returns:
        ``(ids, scores, masks) + others`` in the new order, with the new scores. Padding rows
        (score < 0) keep their score and stay last.
    """
    rescored = F.where(scores >= 0, scores * mask_quality(F, masks, threshold), scores)
    order = F.topk(rescored, axis=1, k=0, ret_typ="indices", is_ascend=False)
    return tuple(batch_gather(F, a, order) for a in (ids, rescored, masks) + tuple(others))


# --------------------------------------------------------------------------------------------
# Keypoint branch
# --------------------------------------------------------------------------------------------
class KeypointHead(mx.gluon.HybridBlock):
    """Detectron2's ``KRCNNConvDeconvUpsampleHead``: pool at ``keypoint_head.pooler_resolution``
    P (14), num_conv x (3x3 conv_dim [+ norm] + ReLU), 4x4/2 pad-1 deconv to K channels (2P),
    bilinear x2 (half-pixel centres, align_corners=False, :func:`upsample2x_bilinear`) to
    S = 4P (56).

    Args:
        cfg: the config (``model.keypoint_head``, ``model.num_keypoints``, ...);
            ``keypoint_head.resolution`` must be 4P.
    """

    def __init__(self, cfg, **kwargs):
        super(KeypointHead, self).__init__(**kwargs)
        kh = cfg.model.keypoint_head
        self.num_keypoints = cfg.model.num_keypoints
        self.resolution = 4 * kh.pooler_resolution
        if kh.resolution != self.resolution:
            raise ValueError("model.keypoint_head.resolution must be 4 x pooler_resolution (%d), "
                             "got %d" % (self.resolution, kh.resolution))
        channels = cfg.model.fpn.out_channels
        with self.name_scope():
            self.pooler = _pooler(cfg, kh.pooler_resolution, cfg.model.clip_boxes)
            self.convs, channels = _conv_stack(kh.num_conv, kh.conv_dim, channels, "conv_fcn%d_",
                                               kh.norm, cfg.model.backbone.gn_groups,
                                               "model.keypoint_head")
            self.deconv = Deconv2D(self.num_keypoints, 4, strides=2, padding=1,
                                   in_channels=channels, prefix="score_lowres_")

    def hybrid_forward(self, F, rois, *features):
        """
        Args:
            rois: (B, R, 4) xyxy in input pixels.
            features: P2..P5.

        Returns:
            (B*R, K, S, S) heatmap logits, image-major.
        """
        x = self.deconv(self.convs(self.pooler(rois, *features)))
        return upsample2x_bilinear(F, x, self.num_keypoints)


def upsample2x_bilinear(F, x, channels):
    """Bilinear x2 with half-pixel centres (align_corners=False, edges clamped), as
    ``BilinearResize2D`` / ``F.interpolate(scale_factor=2)``.

    Output pixel 2i is 0.25 x[i-1] + 0.75 x[i] and 2i+1 is 0.75 x[i] + 0.25 x[i+1], with x[-1] and
    x[T] the edge values: a depthwise 4x4 stride-2 transposed convolution with the kernel
    outer([.25, .75, .75, .25]) of the edge-padded input (pad 3 crops it to 2T). The same
    numbers as ``BilinearResize2D``, whose CPU backward is slow.

    Args:
        x: (N, C, T, T), T >= 4.
        channels: C.

    Returns:
        (N, C, 2T, 2T).
    """
    i = F.slice_axis(F.contrib.arange_like(x, axis=3), axis=0, begin=0, end=4)   # 0, 1, 2, 3
    k = 1.0 - 0.5 * F.abs(i - 1.5)                                                 # .25 .75 .75 .25
    kernel = F.BlockGrad(F.broadcast_mul(F.reshape(k, (1, 1, 4, 1)), F.reshape(k, (1, 1, 1, 4))))
    kernel = F.tile(kernel, reps=(channels, 1, 1, 1))                              # (C, 1, 4, 4)
    padded = F.pad(x, mode="edge", pad_width=(0, 0, 0, 0, 1, 1, 1, 1))
    return F.Deconvolution(padded, kernel, kernel=(4, 4), stride=(2, 2), pad=(3, 3),
                           num_filter=channels, num_group=channels, no_bias=True)


def hflip_heatmaps(F, heatmaps, flip_map):
    """The heatmaps of mirrored boxes in the mirror image -> the heatmaps of the boxes in the
    image: columns reversed, and keypoint k takes the channel of its mirror ``flip_map[k]``
    (left <-> right; the data loader's flip uses the same map).

    Exact for the heatmap grid: column j of a mirrored box covers the image columns of column
    S - 1 - j of the box.

    Args:
        heatmaps: (N, K, S, S) logits.
        flip_map: K keypoint indices.

    Returns:
        (N, K, S, S).
    """
    channels = [F.slice_axis(heatmaps, axis=1, begin=j, end=j + 1) for j in flip_map]
    return F.flip(F.concat(*channels, dim=1), axis=3)


def decode_keypoints(F, heatmaps, boxes, resolution):
    """Argmax decode: the peak cell (px, py) maps to x = (px + 0.5) / S * max(x2 - x1, 1) + x1
    (same for y). Finer decodes (bicubic / Taylor) live in postprocess.py.

    Args:
        heatmaps: (B, D, K, S, S) logits.
        boxes: (B, D, 4) xyxy in input pixels.
        resolution: S.

    Returns:
        (B, D, K, 3) keypoints (x, y, peak logit).
    """
    S = float(resolution)
    flat = F.reshape(heatmaps, (0, 0, 0, -1))                                 # (B, D, K, S*S)
    idx = F.expand_dims(F.argmax(flat, axis=-1), axis=-1)                      # (B, D, K, 1)
    peak = F.max(flat, axis=-1, keepdims=True)
    py = F.floor(idx / S)
    px = idx - py * S
    x1, y1, x2, y2 = [F.expand_dims(v, axis=2) for v in F.split(boxes, num_outputs=4, axis=-1)]
    w = F.maximum(x2 - x1, 1.0)                                                # (B, D, 1, 1)
    h = F.maximum(y2 - y1, 1.0)
    x = F.broadcast_add(F.broadcast_mul((px + 0.5) / S, w), x1)
    y = F.broadcast_add(F.broadcast_mul((py + 0.5) / S, h), y1)
    return F.concat(x, y, peak, dim=-1)

"""Mask R-CNN / Keypoint R-CNN with FPN: the whole inference network, top to bottom.

    net = build_model(cfg)                      # MaskRCNN, parameters initialised
    net.hybridize(static_alloc=True, static_shape=True)
    outputs = net(data, im_info)                # one graph; names in net.output_names

Inputs: data (B, 3, H, W) normalised RGB, H and W multiples of 32; im_info (B, 3) = (h, w, scale)
with (h, w) the valid (unpadded) resized size. Outputs, in this order (DEVELOPING.md, "Network
outputs"), D = cfg.test.max_dets, C classes, K keypoints:

    ids        (B, D)             class label 0..C-1 (float), -1 for padding rows
    scores     (B, D)             softmax score (times the mask's maskness with
                                  test.mask_score), -1 for padding rows; rows sorted by score
    boxes      (B, D, 4)          x1, y1, x2, y2 in network-input pixels, 0 for padding rows
    masks      (B, D, 28, 28)     mask probability of the predicted class    if model.mask_on
    keypoints  (B, D, K, 3)       x, y, peak logit (argmax decode)             if model.keypoint_on
    heatmaps   (B, D, K, 56, 56)  keypoint logits                              if model.keypoint_on

The training graph (training.py) reuses the stages, :class:`MaskRCNN`'s attributes.
"""
import warnings

import mxnet as mx

from ..ops import compiled_kernels, resolve_kernels
from ..utils import UserError
from .box_coder import hflip_boxes, hflip_deltas
from .fpn import build_backbone
from .poolers import shared_level_canvas
from .roi_heads import (BoxHead, BoxPredictor, KeypointHead, MaskHead, decode_keypoints,
                        head_inputs,
                        detect, detection_settings, hflip_heatmaps, refine_detections,
                        rescore_by_masks, select_class_masks)
from .rpn import RPN

__all__ = ["MaskRCNN", "build_model", "output_names", "init_weights", "inference_kernels"]


def output_names(cfg):
    """Names of the inference outputs of a model built from ``cfg``, in order.

    Args:
        cfg: the config (``model.mask_on``, ``model.keypoint_on``).

    Returns:
        list of str: ids, scores, boxes[, masks][, keypoints, heatmaps].
    """
    names = ["ids", "scores", "boxes"]
    if cfg.model.mask_on:
        names.append("masks")
    if cfg.model.keypoint_on:
        names += ["keypoints", "heatmaps"]
    return names


def _check_config(cfg):
    """Raise UserError for a config that cannot build the network (class or keypoint counts)."""
    m = cfg.model
    if m.num_classes <= 0:
        raise UserError("model.num_classes must be > 0 to build the network (got %d); it is set "
                        "from the training data's categories, or pass --set model.num_classes=N"
                        % m.num_classes)
    if m.keypoint_on and m.num_keypoints <= 0:
        raise UserError("model.num_keypoints must be > 0 when model.keypoint_on is true (got %d); "
                        "it is set from the training data, or pass --set model.num_keypoints=K"
                        % m.num_keypoints)
    if len(m.anchor.strides) != 5 or len(m.anchor.sizes) != 5:
        raise UserError("model.anchor.sizes and model.anchor.strides need one entry per level "
                        "P2..P6 (5), got %d and %d" % (len(m.anchor.sizes), len(m.anchor.strides)))
    if cfg.test.max_dets <= 0:
        raise UserError("test.max_dets must be > 0, got %d" % cfg.test.max_dets)


def keypoint_flip_map(cfg):
    """The keypoint mirror map of the flip test-time augmentation.

    The one the training flip uses, ``data.keypoint_flip_map``, else derived from
    ``data.keypoint_names`` (``left_*`` <-> ``right_*``), else no swap. Raises UserError when it
    is not a permutation of the ``num_keypoints`` keypoints.

    Args:
        cfg: the config.

    Returns:
        list of K ints, the index of each keypoint's mirror; ``[]`` without keypoints or
        ``test.flip``.
    """
    m = cfg.model
    if not (cfg.test.flip and m.keypoint_on):
        return []
    flip = list(cfg.data.keypoint_flip_map)
    if not flip and cfg.data.keypoint_names:
        from ..data.coco import keypoint_flip_map as from_names
        flip = from_names(cfg.data.keypoint_names)
    if not flip:
        flip = list(range(m.num_keypoints))
    if sorted(flip) != list(range(m.num_keypoints)):
        raise UserError("data.keypoint_flip_map must be a permutation of the %d keypoints (the "
                        "mirror of each) for test.flip, got %r" % (m.num_keypoints, flip))
    return [int(i) for i in flip]


def inference_kernels(kernels):
    """The :func:`mxmask.ops.compiled_kernels` block of an inference graph.

    Args:
        kernels: ``"mxnet"`` or ``"mxmask"``: the compiled RoIAlign (on a channels-last level
            canvas) and NMS, which give MXNet's outputs exactly; GroupNorm stays MXNet's, so
            that the outputs are exactly those of the exported graph.

    Returns:
        a context manager.
    """
    return compiled_kernels(kernels == "mxmask", ["roi_align", "box_nms", "level_canvas"])


class MaskRCNN(mx.gluon.HybridBlock):
    """Backbone + FPN, RPN, box head, detection, mask head, keypoint head.

    The stages, as attributes and methods that the training code reuses::

        backbone       data -> (P2, P3, P4, P5, P6)                      fpn.build_backbone
        rpn            (im_info, P2..P6) -> rois (B, R, 4), roi_scores (B, R)
                       (in training mode also anchors, logits and deltas per level; see rpn.py)
        box_head       (rois, P2..P5) -> box features (B*R, fc_dim)      RoIAlign + avg-pool + fcs
        box_predictor  features -> cls_logits (B*R, C+1), box_deltas (B*R, C*4) (or 4: agnostic)
        box_forward(rois, *features) -> box_head + box_predictor on any rois (B, R, 4)
        detect_kwargs  roi_heads.detect's settings: score threshold, per-class NMS, top D
        mirror(F, data) -> None, or with test.flip (W, P2..P6 of the input flipped left to
                       right, that flipped input)
        detections(F, im_info, rois, roi_scores, *features, mirror=None) -> box_forward +
                       detect, then with test.refine_boxes a second box_forward on the
                       detections + refine_detections (each box_forward averaged with the
                       mirror's if given)
        mask_head      (rois (B, D, 4), P2..P5[, data]) -> mask logits (B*D, C, 28, 28) or None
        keypoint_head  (rois (B, D, 4), P2..P5) -> heatmap logits (B*D, K, 56, 56)    or None
        roi_features(features) -> the levels the RoI heads pool from (P2..P5)

    With ``model.mask_head.image_guide`` the mask head also takes the input ``data`` after
    P2..P5 (``roi_heads.ImageGuide``: each roi's pixels at the head's 28x28;
    ``roi_heads.head_inputs`` builds the list). At inference the mask and keypoint heads run on
    the D final detections of each image, never on all proposals. With ``test.mask_score`` the
    scores are the box head's times the maskness of each detection's mask (the mean
    probability over its foreground, ``roi_heads.rescore_by_masks``), and the rows are
    re-sorted by it.

    ``hybrid_forward`` is the inference graph. Called in training mode it still returns the
    outputs of the module docstring (computed from the RPN's training-mode proposal counts);
    the training step composes the stages itself (``rpn`` in training mode, target sampling,
    ``box_forward``, ``mask_head``, ``keypoint_head``). A hybridized MaskRCNN retraces its graph
    when the autograd training mode changes between calls.

    Export: ``net.export(prefix)`` (after one hybridized forward) writes a graph whose two
    inputs are named ``data0`` (data) and ``data1`` (im_info), Gluon's names for a two-input
    block; load it with ``mx.gluon.SymbolBlock.imports(prefix + "-symbol.json",
    ["data0", "data1"], prefix + "-0000.params")``. The anchors are constants saved among the
    parameters.

    Args:
        cfg: the config; ``model.num_classes`` (and ``num_keypoints`` with ``keypoint_on``)
            must be > 0.
        num_devices: for syncbn.
    """

    def __init__(self, cfg, num_devices=None, **kwargs):
        super(MaskRCNN, self).__init__(**kwargs)
        _check_config(cfg)
        m = cfg.model
        self.num_classes = m.num_classes
        self.num_keypoints = m.num_keypoints if m.keypoint_on else 0
        self.output_names = output_names(cfg)
        self.detect_kwargs = detection_settings(cfg)
        self.refine_boxes = bool(cfg.test.refine_boxes)
        self.flip_test = bool(cfg.test.flip)
        self.mask_score = bool(cfg.test.mask_score) and m.mask_on
        self.mask_thresh = float(cfg.test.mask_thresh)
        self.keypoint_flip_map = keypoint_flip_map(cfg)
        with self.name_scope():
            # 1. ResNet-v1b + FPN -> P2..P6 (strides 4..64)
            self.backbone = build_backbone(cfg, num_devices=num_devices)
            # 2. anchors + shared RPN head + proposals (decode, clip, top-k, NMS)
            self.rpn = RPN(cfg)
            # 3. RoIAlign on P2..P5 + fc layers, then class logits and class-specific deltas
            self.box_head = BoxHead(cfg)
            self.box_predictor = BoxPredictor(self.box_head.out_units, m.num_classes,
                                              m.box_head.cls_agnostic_bbox_reg)
            # 4. mask and keypoint heads, run on the final detections
            self.mask_head = MaskHead(cfg) if m.mask_on else None
            self.keypoint_head = KeypointHead(cfg) if m.keypoint_on else None
        self.keypoint_resolution = m.keypoint_head.resolution
        self.kernels = "mxnet"
        self._traced_training = None

    def contexts(self):
        """The contexts the parameters live on."""
        return next(iter(self.collect_params().values())).list_ctx()

    def use_kernels(self, kernels):
        """Choose the operators of the inference graph.

        ``net.kernels`` is ``"mxnet"`` (the default: MXNet's own operators, what every exported
        graph holds) or ``"mxmask"`` (RoIAlign and NMS by the compiled CPU operators of
        :mod:`mxmask.ops`, which repeat ``contrib.ROIAlign``'s arithmetic bit for bit, faster
        (docs/kernels.md), and ``contrib.box_nms``'s rows exactly: the same outputs). The
        predictor calls ``use_kernels("auto")`` for the graphs it runs in-process;
        ``mxmask.graph.network_symbol`` always traces MXNet's operators.

        Args:
            kernels: ``"mxnet"``, ``"mxmask"``, or ``"auto"``: ``"mxmask"`` on CPU contexts
                where the compiled operators load.

        Returns:
            The choice. A change drops the cached graph, which is traced again on the next
            call.
        """
        kernels = resolve_kernels(kernels, self.contexts())
        if kernels != self.kernels:
            self._clear_cached_op()
            self.kernels = kernels
        return kernels

    def forward(self, *args):
        # the RPN's proposal counts depend on the training mode: retrace the graph on a change
        training = mx.autograd.is_training()
        if self._active and self._traced_training is not None and training != self._traced_training:
            self._clear_cached_op()
        self._traced_training = training
        return super(MaskRCNN, self).forward(*args)

    @staticmethod
    def roi_features(features):
        """The FPN levels pooled by the RoI heads: P2..P5 (P6 only feeds the RPN)."""
        return tuple(features[:4])

    def box_forward(self, rois, *features):
        """Box head + predictor on any rois; works on NDArrays and Symbols.

        Args:
            rois: (B, R, 4) xyxy in input pixels.
            features: the backbone outputs (P2..P6 or P2..P5).

        Returns:
            cls_logits (B*R, C+1), box_deltas (B*R, C*4) (or (B*R, 4): class-agnostic).
        """
        return self.box_predictor(self.box_head(rois, *self.roi_features(features)))

    def mirror(self, F, data):
        """The mirror image of horizontal-flip test-time augmentation (``test.flip``).

        The backbone also runs on the mirrored input (the whole padded (H, W) tensor, so a
        coordinate x maps to W - x), and every head averages its logits over the image and the
        mirror image: the box head on the proposals and, with refine_boxes, on the detections
        (class logits averaged; box deltas averaged after ``dx`` of the mirror pass changes
        sign), the mask head (the mirror pass's 28x28 logits flipped back), the keypoint head
        (heatmap logits flipped back, left and right keypoints swapped with
        ``data.keypoint_flip_map``). Proposals come from the image alone. The outputs keep
        their shapes; the cost is one more backbone pass and one more pass of each head
        (docs/experiments/shapes_test_time.md, "test.flip").

        Args:
            data: (B, 3, H, W) the network input.

        Returns:
            With ``test.flip``: ``(W, mirrored features, mirrored input)``, the padded width
            (1,), the backbone outputs of the input flipped left to right, and that input;
            else None.
        """
        if not self.flip_test:
            return None
        width = F.cast(F.slice_axis(F.shape_array(data), axis=0, begin=3, end=4), "float32")
        flipped = F.flip(data, axis=3)
        return width, self.backbone(flipped), flipped

    def _box_pass(self, F, rois, features, mirror):
        # box_forward, averaged with the mirror image's pass (test.flip) when mirror is given
        cls_logits, box_deltas = self.box_forward(rois, *features)
        if mirror is None:
            return cls_logits, box_deltas
        width, mirrored, _ = mirror
        m_logits, m_deltas = self.box_forward(hflip_boxes(F, rois, width), *mirrored)
        return (cls_logits + m_logits) * 0.5, (box_deltas + hflip_deltas(F, m_deltas)) * 0.5

    def detections(self, F, im_info, rois, roi_scores, *features, mirror=None):
        """Box head on the proposals, then per-class NMS; with ``test.refine_boxes`` the box head
        runs once more on those detections.

        Args:
            im_info: (B, 3) = (h, w, scale).
            rois, roi_scores: (B, R, 4), (B, R) the RPN's proposals.
            features: the backbone outputs.
            mirror: from :meth:`mirror`; averages in the mirror image's box head
                (``test.flip``).

        Returns:
            ids (B, D), scores (B, D), boxes (B, D, 4), as :func:`~roi_heads.detect`.
        """
        cls_logits, box_deltas = self._box_pass(F, rois, features, mirror)
        ids, scores, boxes = detect(F, cls_logits, box_deltas, rois, roi_scores, im_info,
                                    **self.detect_kwargs)
        if self.refine_boxes:
            cls_logits, box_deltas = self._box_pass(F, boxes, features, mirror)
            ids, scores, boxes = refine_detections(F, cls_logits, box_deltas, ids, scores, boxes,
                                                   im_info, **self.detect_kwargs)
        return ids, scores, boxes

    def _head_pass(self, F, head, boxes, features, image, mirror):
        # a mask / keypoint head on boxes (B, D, 4) -> (B*D, X, S, S) logits, and with mirror
        # its logits on the mirrored boxes of the mirror image (still mirrored), else None
        logits = head(boxes, *head_inputs(head, self.roi_features(features), image))
        if mirror is None:
            return logits, None
        width, mirrored, flipped = mirror
        return logits, head(hflip_boxes(F, boxes, width),
                            *head_inputs(head, self.roi_features(mirrored), flipped))

    def hybrid_forward(self, F, data, im_info):
        """
        Args:
            data: (B, 3, H, W) normalised RGB, H and W multiples of 32.
            im_info: (B, 3) = (h, w, scale).

        Returns:
            The outputs of the module docstring, in ``output_names`` order.
        """
        # every RoI head pools from one level canvas (poolers.shared_level_canvas)
        with inference_kernels(self.kernels), shared_level_canvas():
            return self._inference(F, data, im_info)

    def _inference(self, F, data, im_info):
        """The inference graph's body (:meth:`hybrid_forward` sets the kernels and canvas)."""
        # backbone: (B, 3, H, W) -> P2..P6
        features = self.backbone(data)
        # test.flip: (W, backbone outputs of the mirrored input), else None
        mirror = self.mirror(F, data)
        # RPN: rois (B, R, 4), roi_scores (B, R); padded rows have score -1
        rpn_out = self.rpn(im_info, *features)
        rois, roi_scores = F.stop_gradient(rpn_out[0]), rpn_out[1]
        # box head on all proposals, then per-class NMS -> D detections per image
        ids, scores, boxes = self.detections(F, im_info, rois, roi_scores, *features,
                                             mirror=mirror)
        outputs = [ids, scores, boxes]
        # mask head on the B*D detected boxes -> the predicted class's mask
        if self.mask_head is not None:
            mask_logits, mirrored = self._head_pass(F, self.mask_head, boxes, features, data,
                                                    mirror)
            if mirrored is not None:
                mask_logits = (mask_logits + F.flip(mirrored, axis=3)) * 0.5
            outputs.append(select_class_masks(F, mask_logits, ids, self.mask_head.num_classes))
        # keypoint head on the B*D detected boxes -> heatmaps and argmax keypoints
        if self.keypoint_head is not None:
            heatmaps, mirrored = self._head_pass(F, self.keypoint_head, boxes, features, data,
                                                 mirror)
            if mirrored is not None:
                heatmaps = (heatmaps + hflip_heatmaps(F, mirrored, self.keypoint_flip_map)) * 0.5
            heatmaps = F.reshape_like(heatmaps, ids, lhs_begin=0, lhs_end=1,
                                      rhs_begin=0, rhs_end=2)          # (B, D, K, S, S)
            outputs.append(decode_keypoints(F, heatmaps, boxes, self.keypoint_resolution))
            outputs.append(heatmaps)
        if self.mask_score:
            # outputs: ids, scores, boxes, masks[, keypoints, heatmaps]
            ids, scores, masks, boxes, *rest = rescore_by_masks(
                F, ids, scores, outputs[3], self.mask_thresh, boxes, *outputs[4:])
            outputs = [ids, scores, boxes, masks] + rest
        return tuple(outputs)


# --------------------------------------------------------------------------------------------
# Initialisation (Detectron2-like)
# --------------------------------------------------------------------------------------------
def _msra_fan_out():
    # kaiming_normal(mode="fan_out", nonlinearity="relu") = Detectron2's c2_msra_fill
    return mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2.0)


def _xavier_fill():
    # kaiming_uniform(a=1) = Detectron2's c2_xavier_fill, used for its box-head fc layers
    return mx.init.Xavier(rnd_type="uniform", factor_type="in", magnitude=3.0)


def init_weights(net, ctx=None):
    """Initialise every parameter of ``net`` (biases 0; norm gamma 1, beta 0), Detectron2-like:

    backbone: the layers' own initialisers (He fan-out convs, Xavier FPN), else Xavier;
    RPN head: N(0, 0.01); box convs (if any): He fan-out; box fcs: c2_xavier_fill;
    cls_score N(0, 0.01); bbox_pred N(0, 0.001); mask/keypoint convs and deconvs: He fan-out;
    mask predictor N(0, 0.001).

    Args:
        net: a :class:`MaskRCNN`.
        ctx: the context(s) (default CPU).

    Returns:
        ``net``.
    """
    ctx = ctx or mx.cpu()
    subsets = [(net.backbone, mx.init.Xavier()),
               (net.rpn, mx.init.Normal(0.01)),
               (net.box_head.convs, _msra_fan_out()),
               (net.box_head, _xavier_fill()),
               (net.box_predictor.cls_score, mx.init.Normal(0.01)),
               (net.box_predictor.bbox_pred, mx.init.Normal(0.001))]
    if net.mask_head is not None:
        subsets += [(net.mask_head.predictor, mx.init.Normal(0.001)),
                    (net.mask_head, _msra_fan_out())]
    if net.keypoint_head is not None:
        subsets.append((net.keypoint_head, _msra_fan_out()))
    with warnings.catch_warnings():
        # a parameter of a nested subset (mask predictor) is initialised once, first; the later
        # call on its parent skips it with a warning that is expected here
        warnings.simplefilter("ignore")
        for block, init in subsets:
            block.collect_params().initialize(init=init, ctx=ctx)
        net.collect_params().initialize(init=mx.init.Xavier(), ctx=ctx)   # anything left over
    return net


def build_model(cfg, ctx=None, num_devices=None):
    """Build and initialise the network of ``cfg``.

    Pretrained backbone weights are not loaded here (see backbone.load_pretrained_from_config).
    Raises UserError when model.num_classes (or num_keypoints with keypoint_on) is 0.

    Args:
        cfg: the config.
        ctx: the context(s) (default CPU).
        num_devices: for syncbn.

    Returns:
        A :class:`MaskRCNN`, parameters initialised (:func:`init_weights`).
    """
    net = MaskRCNN(cfg, num_devices=num_devices)
    init_weights(net, ctx)
    return net

"""The training graph: the model's own stages, plus targets and losses.

    loss_net = RCNNLoss(net, cfg)             # net = build_model(cfg); shares its parameters
    loss_net.hybridize(static_alloc=True)     # optional: two hybridized graphs
    with autograd.record():
        losses = loss_net(**batch_on_ctx)     # dict name -> (1,) loss; over several contexts:
                                              # begin(**b) on each, then finish(state) on each

Inputs (one context's share of a training batch, DEVELOPING.md "Training batches"):
``data`` (B, 3, Hp, Wp), ``im_info`` (B, 3), ``gt_boxes`` (B, G, 4), ``gt_labels`` (B, G),
``gt_crowd`` (B, Gc, 4), plus ``gt_masks`` (B, G, Hp, Wp) for mask models and ``gt_keypoints``
(B, G, K, 3) for keypoint models. Output: the losses, in this order (``RCNNLoss.loss_names``):

    loss_rpn_cls, loss_rpn_loc     RPN objectness (sigmoid BCE) and box (smooth-L1) losses
    loss_cls, loss_box_reg         box head softmax CE and class-specific smooth-L1 (or
                                   1 - GIoU: model.box_head.bbox_reg_loss), times
                                   model.box_head.bbox_reg_loss_weight
    loss_mask                      per-pixel sigmoid BCE on the gt class's 28x28 mask, times
                                   model.mask_head.loss_weight
    loss_keypoint                  softmax CE over the 56x56 heatmap of each visible keypoint
"""
import mxnet as mx

from ..ops import compiled_kernels, resolve_kernels
from ..utils import UserError
from . import losses as L
from ._utils import batch_gather
from .poolers import shared_level_canvas
from .precision import check_conv_precision, conv_precision, resolve_amp
from .targets import KeypointTargets, MaskTargets, RoISampler, RPNTargets

__all__ = ["RCNNLoss", "BoxStage", "HeadStage"]

_SLOT_STEP = 8           # k is rounded up to a multiple of this (fewer distinct graph shapes)


def _weighted(loss, weight):
    """``loss`` times its config weight (no op in the graph for the default weight 1)."""
    return loss if weight == 1.0 else loss * weight


class BoxStage(mx.gluon.HybridBlock):
    """Stage 1 of :class:`RCNNLoss`: backbone -> RPN (anchors, logits, deltas, proposals) ->
    anchor targets -> RPN losses; proposals -> RoI sampler (gt boxes appended; S rois,
    positives in the first P slots) -> ``net.box_forward`` -> box losses. It also returns the
    sampled rois, labels and matched gts, and the FPN levels the RoI heads pool from.

    Args:
        net: the :class:`~mxmask.modeling.rcnn.MaskRCNN` whose stages it runs.
        cfg: the config (``model.rpn``, ``model.box_head``, ...).
        kernels: ``"mxnet"`` or ``"mxmask"`` (:class:`RCNNLoss`).
        amp: ``""`` or ``"bfloat16"``, the convolutions' precision.
    """

    def __init__(self, net, cfg, kernels, amp="", **kwargs):
        super(BoxStage, self).__init__(**kwargs)
        m = cfg.model
        self.amp = amp
        # the network's stages this graph runs (registering all of ``net`` would make Gluon
        # warn about the parameters of the other stage)
        self.backbone, self.rpn = net.backbone, net.rpn
        self.box_head, self.box_predictor = net.box_head, net.box_predictor
        self.roi_features = net.roi_features
        self.kernels = kernels
        self.rpn_batch = m.rpn.batch_size_per_image
        self.rpn_normalizer = m.rpn.loss_normalizer
        self.rpn_beta = m.rpn.smooth_l1_beta
        self.box_beta = m.box_head.smooth_l1_beta
        self.box_reg_loss = m.box_head.bbox_reg_loss
        self.box_reg_weight = float(m.box_head.bbox_reg_loss_weight)
        self.box_coder_weights = tuple(m.box_head.bbox_reg_weights)
        with self.name_scope():
            self.rpn_targets = RPNTargets(
                batch_size_per_image=m.rpn.batch_size_per_image,
                positive_fraction=m.rpn.positive_fraction, fg_iou=m.rpn.fg_iou_thresh,
                bg_iou=m.rpn.bg_iou_thresh, plus_one=m.box_plus_one, crowd_ioa=m.rpn.crowd_ioa)
            self.roi_sampler = RoISampler(
                m.num_classes, batch_size_per_image=m.box_head.batch_size_per_image,
                positive_fraction=m.box_head.positive_fraction, fg_iou=m.box_head.fg_iou_thresh,
                plus_one=m.box_plus_one, box_weights=tuple(m.box_head.bbox_reg_weights))

    def hybrid_forward(self, F, data, im_info, gt_boxes, gt_labels, gt_crowd):
        """
        Args:
            data, im_info, gt_boxes, gt_labels, gt_crowd: as in the module docstring.

        Returns:
            (loss_rpn_cls, loss_rpn_loc, loss_cls, loss_box_reg, rois (B, S, 4),
            labels (B, S), matched (B, S), P2, P3, P4, P5).
        """
        with compiled_kernels(self.kernels == "mxmask"), conv_precision(self.amp):
            # 1. backbone + FPN
            features = self.backbone(data)
            levels = self.roi_features(features)

            # 2. RPN: proposals, plus per-level anchors / logits / deltas for its loss
            rpn_out = self.rpn(im_info, *features)
            n = self.rpn.num_levels
            rois = rpn_out[0]
            anchors = F.concat(*rpn_out[2:2 + n], dim=1)
            logits = F.concat(*rpn_out[2 + n:2 + 2 * n], dim=1)
            deltas = F.concat(*rpn_out[2 + 2 * n:2 + 3 * n], dim=1)
            rpn_labels, rpn_box_targets, _ = self.rpn_targets(anchors, gt_boxes, gt_crowd,
                                                              im_info)
            loss_rpn_cls, loss_rpn_loc = L.rpn_losses(logits, deltas, rpn_labels,
                                                      rpn_box_targets, self.rpn_beta,
                                                      self.rpn_batch, self.rpn_normalizer)

            # 3. RoI sampling and the box head
            s_rois, s_labels, s_matched, s_box_targets, _ = self.roi_sampler(rois, gt_boxes,
                                                                             gt_labels)
            cls_logits, box_deltas = self.box_predictor(self.box_head(s_rois, *levels))
            loss_cls, loss_box_reg = L.fast_rcnn_losses(
                cls_logits, box_deltas, s_labels, s_box_targets, self.box_beta,
                self.box_predictor.cls_agnostic, self.box_reg_loss, self.box_coder_weights)
            loss_box_reg = _weighted(loss_box_reg, self.box_reg_weight)
        return (loss_rpn_cls, loss_rpn_loc, loss_cls, loss_box_reg, s_rois, s_labels,
                s_matched) + tuple(levels)


class HeadStage(mx.gluon.HybridBlock):
    """Stage 2 of :class:`RCNNLoss`: the mask head / keypoint head and their targets and
    losses, on the slots :class:`RCNNLoss` chose (:meth:`RCNNLoss.head_slots`,
    :meth:`RCNNLoss.keypoint_slots`). Both heads pool from one level canvas.

    Args:
        net: the :class:`~mxmask.modeling.rcnn.MaskRCNN` whose heads it runs.
        cfg: the config (``model.mask_head``, ``model.keypoint_head``).
        kernels: ``"mxnet"`` or ``"mxmask"`` (:class:`RCNNLoss`).
        amp: ``""`` or ``"bfloat16"``, the convolutions' precision.
    """

    def __init__(self, net, cfg, kernels, amp="", **kwargs):
        super(HeadStage, self).__init__(**kwargs)
        m = cfg.model
        self.mask_head, self.keypoint_head = net.mask_head, net.keypoint_head
        self.kernels = kernels
        self.amp = amp
        self.mask_on = net.mask_head is not None
        self.keypoint_on = net.keypoint_head is not None
        self.keypoint_weight = m.keypoint_head.loss_weight
        self.mask_weight = m.mask_head.loss_weight
        self.mask_dice_weight = float(m.mask_head.dice_weight)
        if not self.mask_dice_weight >= 0:
            raise UserError("model.mask_head.dice_weight: expected a weight >= 0 (0: no Dice "
                            "loss), got %r" % m.mask_head.dice_weight)
        with self.name_scope():
            self.mask_targets = MaskTargets(None, m.mask_head.resolution,
                                            aligned=m.mask_head.target_aligned,
                                            soft=m.mask_head.soft_targets) \
                if self.mask_on else None
            self.keypoint_targets = KeypointTargets(None, m.keypoint_head.resolution) \
                if self.keypoint_on else None

    def hybrid_forward(self, F, *inputs):
        """
        Args:
            inputs: [rois (B, k, 4), labels (B, k), matched (B, k), gt_masks] if mask_on,
                [rois (B, k', 4), labels (B, k'), matched (B, k'), gt_keypoints] if
                keypoint_on, P2..P5, [data: the input, with model.mask_head.image_guide].
                The keypoint head pools P2..P5 only.

        Returns:
            ([loss_mask], [loss_keypoint]), each (1,).
        """
        mask_in = inputs[:4] if self.mask_on else None
        keypoint_in = inputs[4 * self.mask_on:4 * self.mask_on + 4] if self.keypoint_on else None
        levels = inputs[4 * (self.mask_on + self.keypoint_on):]      # P2..P5[, data]
        outputs = []
        with compiled_kernels(self.kernels == "mxmask"), conv_precision(self.amp), \
                shared_level_canvas():
            if self.mask_on:
                rois, labels, matched, gt_masks = mask_in
                mask_logits = self.mask_head(rois, *levels)       # (+ the image: image_guide)
                mask_targets = self.mask_targets(rois, labels, matched, gt_masks)
                loss = L.mask_rcnn_loss(mask_logits, labels, mask_targets,
                                        self.mask_head.num_classes == 1, self.mask_dice_weight)
                outputs.append(_weighted(loss, self.mask_weight))
            if self.keypoint_on:
                rois, labels, matched, gt_keypoints = keypoint_in
                heatmaps = self.keypoint_head(rois, *levels[:4])
                kp_targets, kp_valid = self.keypoint_targets(rois, labels, matched, gt_keypoints)
                loss = L.keypoint_rcnn_loss(heatmaps, kp_targets, kp_valid)
                outputs.append(_weighted(loss, self.keypoint_weight))
        return tuple(outputs)


class RCNNLoss(mx.gluon.Block):
    """Losses of Mask R-CNN / Keypoint R-CNN for a training batch (the module docstring), in
    two graphs that call the model's own sub-blocks (rcnn.py): :class:`BoxStage` and
    :class:`HeadStage`.

    The conventions are Detectron2's; four fields switch to torchvision's training ones (the
    torchvision presets set them): ``model.rpn.loss_normalizer: sampled``,
    ``model.rpn.crowd_ioa: 1`` and, for the mask targets, ``model.mask_head.target_aligned:
    false`` with ``soft_targets: true``. With them, and both sides' samplers taking every
    candidate, each loss equals torchvision's on the same weights, image and targets within
    1e-4 (tests/test_torchvision_training.py; docs/torchvision.md).

    The mask head runs on the first ``k`` sampled slots, where ``k`` (:meth:`head_slots`) is
    the largest number of positives of an image of the batch, rounded up to a multiple of 8 (at
    most P). Slots past an image's positives carry no loss, so the losses equal those over all
    P slots (Detectron2 and torchvision also run these heads on the positives only), while the
    heads' cost follows the real positives: with 2 objects in a ResNet-50 FPN training image,
    20-odd of the 128 slots instead of all of them. With ``model.mask_head.max_train_rois`` =
    n > 0, k is at most n: the mask head trains on the first n positive slots of each image, a
    random subset of its positives (the sampler orders them at random), and its cost stops
    growing with crowded images. The keypoint head runs on the positives whose gt has a
    labelled keypoint (:meth:`keypoint_slots`). Reading the counts waits for stage 1;
    :meth:`begin` / :meth:`finish` let a multi-context step start every context's stage 1
    first.

    Kernels: ``"auto"`` picks ``"mxmask"`` when the network's parameters live on CPU contexts
    only and :func:`mxmask.ops.load_ops` can build the compiled operators, else ``"mxnet"``.
    With ``"mxmask"`` the RoI poolers, GroupNorm layers and NMS of these training graphs run
    the compiled operators of :mod:`mxmask.ops`: the same values as the stock operators
    (tests/test_ops.py), with faster CPU backward passes (docs/kernels.md). Inference graphs of
    the same network are not affected.

    Mixed precision (``solver.amp="bfloat16"``, or ``"auto"`` on a CPU with AMX; ``self.amp``
    says which applies): both stages are traced inside
    :func:`mxmask.modeling.precision.conv_precision`, so every ``Convolution`` of the network
    computes in bfloat16 with float32 inputs, outputs, weights and gradients.

    Args:
        net: the :class:`~mxmask.modeling.rcnn.MaskRCNN`; the loss shares its parameters.
        cfg: the config.
        kernels: ``"auto"``, ``"mxnet"`` or ``"mxmask"``.
    """

    _BOX_INPUTS = ("data", "im_info", "gt_boxes", "gt_labels", "gt_crowd")

    def __init__(self, net, cfg, kernels="auto", **kwargs):
        super(RCNNLoss, self).__init__(**kwargs)
        ctxs = net.contexts()
        self.kernels = resolve_kernels(kernels, ctxs)
        self.amp = resolve_amp(cfg.solver.amp, ctxs)            # "" or "bfloat16"
        check_conv_precision(self.amp, ctxs)
        self.mask_on = net.mask_head is not None
        self.keypoint_on = net.keypoint_head is not None
        with self.name_scope():
            self.box_stage = BoxStage(net, cfg, self.kernels, self.amp)
            self.head_stage = HeadStage(net, cfg, self.kernels, self.amp) \
                if self.mask_on or self.keypoint_on else None
        self.num_pos_slots = self.box_stage.roi_sampler.num_pos_slots
        self.mask_slot_cap = int(cfg.model.mask_head.max_train_rois)
        if self.mask_slot_cap < 0:
            raise UserError("model.mask_head.max_train_rois: expected a count >= 0 (0: every "
                            "positive roi), got %d" % self.mask_slot_cap)
        self.loss_names = ["loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"] + \
            (["loss_mask"] if self.mask_on else []) + \
            (["loss_keypoint"] if self.keypoint_on else [])

    def hybridize(self, active=True, **kwargs):
        """Hybridize both stages (each is its own graph)."""
        self.box_stage.hybridize(active, **kwargs)
        if self.head_stage is not None:
            self.head_stage.hybridize(active, **kwargs)

    def _round_slots(self, count):
        """``count`` rounded up to a multiple of 8, between 8 and P."""
        return min(self.num_pos_slots, max(_SLOT_STEP, -(-int(count) // _SLOT_STEP) * _SLOT_STEP))

    def head_slots(self, labels):
        """The mask head's slot count. Waits for stage 1.

        Args:
            labels: (B, S) the sampled labels (NDArray).

        Returns:
            int k: the most positives (label > 0) of one image among the first P slots,
            rounded up to a multiple of 8, between 8 and P, and at most
            ``model.mask_head.max_train_rois`` when that is > 0.
        """
        first = mx.nd.slice_axis(labels, axis=1, begin=0, end=self.num_pos_slots)
        k = self._round_slots(mx.nd.max(mx.nd.sum(first > 0, axis=1)).asscalar())
        return min(k, self.mask_slot_cap) if self.mask_slot_cap > 0 else k

    def keypoint_slots(self, labels, matched, gt_keypoints):
        """The keypoint head's slots: the positives whose gt has a labelled keypoint (v > 0),
        moved to the front of the P slots (Detectron2's
        ``select_proposals_with_visible_keypoints``). The other positives have no keypoint
        target, and the keypoint loss, normalised by the number of labelled keypoints, is the
        same as over all P slots (the shapes dataset: a third of the objects are figures).
        Waits for stage 1.

        Args:
            labels, matched: (B, S) the sampled labels and matched gts (NDArrays).
            gt_keypoints: (B, G, K, 3).

        Returns:
            ``(order (B, P), k')``: ``order`` lists each image's first P slots with those
            positives first; ``k'`` is the most such slots of one image, rounded up to a
            multiple of 8, between 8 and P.
        """
        P = self.num_pos_slots
        labels, matched = [mx.nd.slice_axis(a, axis=1, begin=0, end=P) for a in (labels, matched)]
        vis = mx.nd.slice_axis(gt_keypoints, axis=3, begin=2, end=3)
        labelled = mx.nd.max(vis, axis=(2, 3)) > 0                               # (B, G)
        pos = labels > 0
        gidx = mx.nd.where(pos, matched, mx.nd.zeros_like(matched))
        has = pos * batch_gather(mx.nd, labelled, gidx)                          # (B, P)
        order = mx.nd.topk(has, axis=1, k=P, ret_typ="indices", is_ascend=False)
        return order, self._round_slots(mx.nd.max(mx.nd.sum(has, axis=1)).asscalar())

    def begin(self, **inputs):
        """Stage 1 on one context's inputs.

        Args:
            inputs: one context's batch (the module docstring), by name.

        Returns:
            the state that :meth:`finish` takes.
        """
        return inputs, self.box_stage(*[inputs[n] for n in self._BOX_INPUTS])

    def finish(self, state):
        """Stage 2 from :meth:`begin`'s state.

        Returns:
            dict {loss name: (1,) loss}, in ``loss_names`` order.
        """
        inputs, out = state
        losses = list(out[:4])
        if self.head_stage is not None:
            sampled = out[4:7]                                   # rois, labels, matched
            head_in = []
            if self.mask_on:
                k = self.head_slots(sampled[1])
                head_in += [mx.nd.slice_axis(a, axis=1, begin=0, end=k) for a in sampled]
                head_in.append(inputs["gt_masks"])
            if self.keypoint_on:
                order, k = self.keypoint_slots(sampled[1], sampled[2], inputs["gt_keypoints"])
                order = mx.nd.slice_axis(order, axis=1, begin=0, end=k)
                head_in += [batch_gather(mx.nd, a, order) for a in sampled]
                head_in.append(inputs["gt_keypoints"])
            image = [inputs["data"]] if self.mask_on and self.head_stage.mask_head.image_guide \
                else []
            head = self.head_stage(*(head_in + list(out[7:]) + image))
            losses += list(head) if isinstance(head, (list, tuple)) else [head]
        return dict(zip(self.loss_names, losses))

    def __call__(self, **inputs):
        """:meth:`begin` then :meth:`finish`: {loss name: (1,) loss}."""
        return self.finish(self.begin(**inputs))

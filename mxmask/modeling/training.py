"""The training graph: the model's own stages, plus targets and losses.

    loss_net = RCNNLoss(net, cfg)             # net = build_model(cfg); shares its parameters
                                              # roi_align="auto": see below
    loss_net.hybridize(static_alloc=True)     # optional: one training graph
    with autograd.record():
        losses = loss_net(**batch_on_ctx)     # dict name -> (1,) loss

Inputs (one context's share of a training batch, DEVELOPING.md "Training batches"):
``data`` (B, 3, Hp, Wp), ``im_info`` (B, 3), ``gt_boxes`` (B, G, 4), ``gt_labels`` (B, G),
``gt_crowd`` (B, Gc, 4), plus ``gt_masks`` (B, G, Hp, Wp) for mask models and ``gt_keypoints``
(B, G, K, 3) for keypoint models. Output: the losses, in this order (``RCNNLoss.loss_names``):

    loss_rpn_cls, loss_rpn_loc     RPN objectness (sigmoid BCE) and box (smooth-L1) losses
    loss_cls, loss_box_reg         box head softmax CE and class-specific smooth-L1
    loss_mask                      per-pixel sigmoid BCE on the gt class's 28x28 mask
    loss_keypoint                  softmax CE over the 56x56 heatmap of each visible keypoint

The path, stage by stage (the same sub-blocks as inference, see rcnn.py):
backbone -> RPN (anchors, logits, deltas, proposals) -> anchor targets -> RPN losses;
proposals -> RoI sampler (gt boxes appended; S rois, positives in the first P slots) ->
``net.box_forward`` -> box losses; the first P slots -> mask head / keypoint head -> losses.

RoIAlign kernel (``roi_align``): ``"auto"`` picks ``"mxmask"`` when the network's parameters live
on CPU contexts only and :func:`mxmask.ops.load_roi_align` can build the op, else ``"mxnet"``.
Both pool the same values (tests/test_roi_align_op.py); ``"mxmask"`` has a parallel CPU backward
(:mod:`mxmask.ops`). The choice holds for this training graph only.
"""
import mxnet as mx

from . import losses as L
from .poolers import roi_align_kernel
from .targets import KeypointTargets, MaskTargets, RoISampler, RPNTargets

__all__ = ["RCNNLoss"]


class RCNNLoss(mx.gluon.HybridBlock):
    """Losses of Mask R-CNN / Keypoint R-CNN for a training batch (see module doc)."""

    def __init__(self, net, cfg, roi_align="auto", **kwargs):
        super(RCNNLoss, self).__init__(**kwargs)
        m = cfg.model
        self.net = net
        from .. import ops
        if roi_align == "auto":
            roi_align = ops.roi_align_backend(next(iter(net.collect_params().values())).list_ctx())
        if roi_align not in ("mxnet", "mxmask"):
            raise ValueError("roi_align must be 'auto', 'mxnet' or 'mxmask', got %r"
                             % (roi_align,))
        if roi_align == "mxmask" and not ops.load_roi_align():
            raise RuntimeError("roi_align='mxmask': the op could not be built (see the warning)")
        self.roi_align = roi_align
        self.mask_on = net.mask_head is not None
        self.keypoint_on = net.keypoint_head is not None
        self.rpn_batch = m.rpn.batch_size_per_image
        self.rpn_beta = m.rpn.smooth_l1_beta
        self.box_beta = m.box_head.smooth_l1_beta
        self.keypoint_weight = m.keypoint_head.loss_weight
        with self.name_scope():
            self.rpn_targets = RPNTargets(
                batch_size_per_image=m.rpn.batch_size_per_image,
                positive_fraction=m.rpn.positive_fraction, fg_iou=m.rpn.fg_iou_thresh,
                bg_iou=m.rpn.bg_iou_thresh, plus_one=m.box_plus_one)
            self.roi_sampler = RoISampler(
                m.num_classes, batch_size_per_image=m.box_head.batch_size_per_image,
                positive_fraction=m.box_head.positive_fraction, fg_iou=m.box_head.fg_iou_thresh,
                plus_one=m.box_plus_one, box_weights=tuple(m.box_head.bbox_reg_weights))
            positives = self.roi_sampler.num_pos_slots
            self.num_pos_slots = positives
            self.mask_targets = MaskTargets(positives, m.mask_head.resolution) \
                if self.mask_on else None
            self.keypoint_targets = KeypointTargets(positives, m.keypoint_head.resolution) \
                if self.keypoint_on else None
        self.loss_names = ["loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"] + \
            (["loss_mask"] if self.mask_on else []) + \
            (["loss_keypoint"] if self.keypoint_on else [])

    def __call__(self, **inputs):
        names = ["data", "im_info", "gt_boxes", "gt_labels", "gt_crowd"] + \
            (["gt_masks"] if self.mask_on else []) + \
            (["gt_keypoints"] if self.keypoint_on else [])
        outputs = super(RCNNLoss, self).__call__(*[inputs[n] for n in names])
        return dict(zip(self.loss_names, outputs))

    def hybrid_forward(self, F, data, im_info, gt_boxes, gt_labels, gt_crowd, *extra):
        with roi_align_kernel(self.roi_align):
            return self._losses(F, data, im_info, gt_boxes, gt_labels, gt_crowd, *extra)

    def _losses(self, F, data, im_info, gt_boxes, gt_labels, gt_crowd, *extra):
        net = self.net
        gt_masks = extra[0] if self.mask_on else None
        gt_keypoints = extra[-1] if self.keypoint_on else None

        # 1. backbone + FPN
        features = net.backbone(data)
        pooled_levels = net.roi_features(features)

        # 2. RPN: proposals, plus per-level anchors / logits / deltas for its loss
        rpn_out = net.rpn(im_info, *features)
        n = net.rpn.num_levels
        rois = rpn_out[0]
        anchors = F.concat(*rpn_out[2:2 + n], dim=1)
        logits = F.concat(*rpn_out[2 + n:2 + 2 * n], dim=1)
        deltas = F.concat(*rpn_out[2 + 2 * n:2 + 3 * n], dim=1)
        rpn_labels, rpn_box_targets, _ = self.rpn_targets(anchors, gt_boxes, gt_crowd, im_info)
        loss_rpn_cls, loss_rpn_loc = L.rpn_losses(logits, deltas, rpn_labels, rpn_box_targets,
                                                  self.rpn_beta, self.rpn_batch)

        # 3. RoI sampling and the box head
        s_rois, s_labels, s_matched, s_box_targets, _ = self.roi_sampler(rois, gt_boxes, gt_labels)
        cls_logits, box_deltas = net.box_forward(s_rois, *features)
        loss_cls, loss_box_reg = L.fast_rcnn_losses(cls_logits, box_deltas, s_labels,
                                                    s_box_targets, self.box_beta)
        outputs = [loss_rpn_cls, loss_rpn_loc, loss_cls, loss_box_reg]

        # 4. mask and keypoint heads on the first P slots (every positive is there)
        p = self.num_pos_slots
        pos_rois = F.slice_axis(s_rois, axis=1, begin=0, end=p)
        pos_labels = F.slice_axis(s_labels, axis=1, begin=0, end=p)
        if self.mask_on:
            mask_logits = net.mask_head(pos_rois, *pooled_levels)
            mask_targets = self.mask_targets(s_rois, s_labels, s_matched, gt_masks)
            outputs.append(L.mask_rcnn_loss(mask_logits, pos_labels, mask_targets))
        if self.keypoint_on:
            heatmaps = net.keypoint_head(pos_rois, *pooled_levels)
            kp_targets, kp_valid = self.keypoint_targets(s_rois, s_labels, s_matched, gt_keypoints)
            loss = L.keypoint_rcnn_loss(heatmaps, kp_targets, kp_valid)
            outputs.append(loss * self.keypoint_weight)
        return tuple(outputs)

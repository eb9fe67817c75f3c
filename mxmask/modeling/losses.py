"""Training losses of the RPN, the box head, the mask head and the keypoint head.

    rpn_losses(logits (B, N), deltas (B, N, 4), labels (B, N), box_targets (B, N, 4), ...)
        -> (loss_objectness, loss_box)
    fast_rcnn_losses(cls_logits (B*S, C+1), deltas (B*S, C*4), labels (B, S),
                     box_targets (B, S, 4), ...) -> (loss_cls, loss_box)
    mask_rcnn_loss(mask_logits (B*P, C, M, M), labels (B, P), mask_targets (B, P, M, M), ...)
        -> loss_mask
    keypoint_rcnn_loss(heatmap_logits (B*P, K, Q, Q), targets (B, P, K), valid (B, P, K))
        -> loss_keypoint

B images, N anchors of all levels, S sampled rois per image, P leading positive slots, C
foreground classes, M the mask side, K keypoints, Q the heatmap side. Labels and targets come
from :mod:`mxmask.modeling.targets` (``-1`` means "not sampled / ignore"). The arguments are
``mx.nd`` arrays (inside ``autograd.record``) or ``mx.sym`` symbols (inside a
``hybrid_forward``): the operator namespace is picked from the first argument. Every loss is a
``(1,)`` array of native ops, every normaliser is guarded with ``max(count, 1)``, so a batch
without positives gives a zero loss (and zero gradients) instead of a NaN. The normalisations
are Detectron2's unless an argument says otherwise.
"""
import mxnet as mx

from .box_coder import delta_giou

__all__ = ["sigmoid_bce_with_logits", "smooth_l1", "rpn_losses", "fast_rcnn_losses",
           "mask_rcnn_loss", "dice_loss", "keypoint_rcnn_loss"]


def _ns(x):
    """The operator namespace of ``x``: ``mx.sym`` for a Symbol, ``mx.nd`` otherwise."""
    return mx.sym if isinstance(x, mx.sym.Symbol) else mx.nd


def sigmoid_bce_with_logits(F, x, z):
    """Elementwise ``-z*log(sigmoid(x)) - (1-z)*log(1-sigmoid(x))``, computed stably.

    Args:
        x: logits, any shape.
        z: targets in [0, 1], the shape of ``x``.

    Returns:
        the losses, the shape of ``x``.
    """
    return F.relu(x) - x * z + F.log1p(F.exp(-F.abs(x)))


def smooth_l1(F, x, beta):
    """Detectron2's smooth-L1 of the difference ``x``: ``|x|`` when beta < 1e-5, otherwise
    ``0.5*x^2/beta`` for ``|x| < beta`` and ``|x| - 0.5*beta`` beyond.

    Args:
        x: differences, any shape.
        beta: a Python number.

    Returns:
        the losses, the shape of ``x``.
    """
    ax = F.abs(x)
    if beta < 1e-5:
        return ax
    return F.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def _total(F, x):
    """Sum of all elements as a (1,) array."""
    return F.reshape(F.sum(x), shape=(1,))


def rpn_losses(logits, deltas, labels, box_targets, beta=0.0, batch_size_per_image=256,
               normalizer="batch_size"):
    """The RPN's objectness and box losses.

    objectness: sigmoid binary cross-entropy summed over the sampled anchors (label 0 or 1);
    box: smooth-L1 summed over the 4 deltas of the fg anchors. Both sums are divided by the
    same normaliser: ``batch_size_per_image * B`` with ``normalizer="batch_size"``
    (Detectron2), not by the number of anchors actually sampled; with ``"sampled"``
    (``model.rpn.loss_normalizer``) by the number of anchors sampled in the batch (label >= 0):
    torchvision's ``RegionProposalNetwork.compute_loss``, a mean cross-entropy and a box sum
    over ``sampled_inds.numel()``. The two agree when every image fills its
    batch_size_per_image.

    Args:
        logits: (B, N) objectness logits of all levels.
        deltas: (B, N, 4) predicted deltas.
        labels: (B, N) 1 fg, 0 bg, -1 not sampled (``RPNTargets``).
        box_targets: (B, N, 4) target deltas (used where labels is 1).
        beta: smooth-L1's beta (0: L1).
        batch_size_per_image: the anchors sampled per image (``model.rpn``).
        normalizer: ``"batch_size"`` or ``"sampled"``.

    Returns:
        (loss_objectness, loss_box), each (1,).
    """
    F = _ns(logits)
    sampled = labels >= 0
    fg = labels > 0
    if normalizer == "sampled":
        normalizer = F.maximum(_total(F, sampled), 1.0)
    elif normalizer == "batch_size":
        # number of images B as a (1,) array, from the labels' own shape
        num_images = _total(F, F.ones_like(F.slice_axis(labels, axis=1, begin=0, end=1)))
        normalizer = F.maximum(num_images * float(batch_size_per_image), 1.0)
    else:
        raise ValueError("rpn_losses: normalizer must be 'batch_size' or 'sampled', got %r"
                         % (normalizer,))
    bce = sigmoid_bce_with_logits(F, logits, fg)
    loss_obj = _total(F, bce * sampled) / normalizer
    l1 = F.sum(smooth_l1(F, deltas - box_targets, beta), axis=-1)
    loss_box = _total(F, l1 * fg) / normalizer
    return loss_obj, loss_box


def fast_rcnn_losses(cls_logits, deltas, labels, box_targets, beta=0.0, cls_agnostic=False,
                     reg_loss="smooth_l1", reg_weights=(1.0, 1.0, 1.0, 1.0)):
    """The box head's classification and box regression losses.

    classification: softmax cross-entropy averaged over the sampled rois (label >= 0); box:
    smooth-L1 on the deltas of the gt class (columns ``4*(label-1) .. 4*(label-1)+3``) of the
    fg rois, summed and divided by the number of sampled rois (label >= 0), Detectron2's
    ``max(gt_classes.numel(), 1)``. With ``reg_loss="giou"`` (Detectron2's
    ``BBOX_REG_LOSS_TYPE: giou``) each fg roi's term is instead ``1 - GIoU`` of the box its
    deltas make with the box its targets make (``box_coder.delta_giou``), normalised the same
    way; the caller multiplies by ``model.box_head.bbox_reg_loss_weight``.

    Args:
        cls_logits: (B*S, C+1) class logits, background in column 0.
        deltas: (B*S, C*4) class-specific deltas, or (B*S, 4) with ``cls_agnostic`` (the one
            box of every class).
        labels: (B, S) or (B*S,): c + 1 for class c, 0 bg, -1 not sampled (``RoISampler``).
        box_targets: (B, S, 4) or (B*S, 4) target deltas (used where labels > 0).
        beta: smooth-L1's beta (0: L1).
        cls_agnostic: ``model.box_head.cls_agnostic_bbox_reg``.
        reg_loss: ``"smooth_l1"`` or ``"giou"`` (``model.box_head.bbox_reg_loss``).
        reg_weights: the box coder's weights (``model.box_head.bbox_reg_weights``), for GIoU.

    Returns:
        (loss_cls, loss_box), each (1,).
    """
    F = _ns(cls_logits)
    labels = F.reshape(labels, shape=(-1,))
    box_targets = F.reshape(box_targets, shape=(-1, 4))
    sampled = labels >= 0
    fg = labels > 0
    num_sampled = F.maximum(_total(F, sampled), 1.0)
    logp = F.log_softmax(cls_logits, axis=-1)
    nll = -F.pick(logp, F.relu(labels), axis=-1)
    loss_cls = _total(F, nll * sampled) / num_sampled
    if cls_agnostic:
        picked = deltas                                                 # (B*S, 4)
    else:
        # (B*S, C*4) -> (B*S, C, 4) -> deltas of the gt class (B*S, 4); bg rois: class 0, masked
        per_class = F.reshape(deltas, shape=(0, -1, 4))
        cls = F.relu(labels - 1)
        index = F.broadcast_like(F.reshape(cls, shape=(-1, 1)), box_targets)
        picked = F.pick(per_class, index, axis=1)
    if reg_loss == "giou":
        # box_targets of background rois are not used (and may be anything): masked by fg
        per_roi = 1.0 - delta_giou(F, picked, F.where(F.broadcast_like(
            F.reshape(fg, shape=(-1, 1)), box_targets), box_targets, picked), reg_weights)
    else:
        per_roi = F.sum(smooth_l1(F, picked - box_targets, beta), axis=-1)
    loss_box = _total(F, per_roi * fg) / num_sampled
    return loss_cls, loss_box


def mask_rcnn_loss(mask_logits, labels, mask_targets, cls_agnostic=False, dice_weight=0.0):
    """The mask head's loss.

    Per-pixel sigmoid binary cross-entropy on the channel of the gt class (label - 1; channel
    0 with ``cls_agnostic``), averaged over all pixels of the positive slots (label > 0). With
    ``dice_weight > 0`` (not in Detectron2) plus that weight times the :func:`dice_loss` of the
    same channel, averaged over the positive slots: each slot counts as much as any other,
    however few cells its object covers, so thin parts (a limb) weigh more than in the
    per-pixel average.

    Args:
        mask_logits: (B*P, C, M, M), or (B*P, 1, M, M) with ``cls_agnostic``.
        labels: (B, P) or (B*P,): c + 1 for class c; slots with label <= 0 carry no loss.
        mask_targets: (B, P, M, M) in [0, 1] (``MaskTargets``).
        cls_agnostic: ``model.mask_head.cls_agnostic_mask``.
        dice_weight: ``model.mask_head.dice_weight``.

    Returns:
        loss_mask (1,).
    """
    F = _ns(mask_logits)
    labels = F.reshape(labels, shape=(-1,))
    targets = F.reshape(mask_targets, shape=(-3, -2))                   # (B*P, M, M)
    fg = labels > 0
    cls = F.zeros_like(labels) if cls_agnostic else F.relu(labels - 1)
    index = F.broadcast_like(F.reshape(cls, shape=(-1, 1, 1)), targets)
    logits = F.pick(mask_logits, index, axis=1)                         # (B*P, M, M)
    bce = sigmoid_bce_with_logits(F, logits, targets)
    per_roi = F.sum(bce, axis=(1, 2))
    pixels = _total(F, F.ones_like(F.slice_axis(targets, axis=0, begin=0, end=1)))
    num_fg = _total(F, fg)
    loss = _total(F, per_roi * fg) / F.maximum(num_fg * pixels, 1.0)
    if dice_weight > 0:
        loss = loss + dice_weight * _total(F, dice_loss(F, logits, targets) * fg) / \
            F.maximum(num_fg, 1.0)
    return loss


def dice_loss(F, logits, targets):
    """Per-slot Dice loss ``1 - (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1)``, with
    ``p = sigmoid(logits)`` and the sums over the M x M cells.

    Args:
        logits: (N, M, M) mask logits.
        targets: (N, M, M) in [0, 1].

    Returns:
        (N,) the loss of each slot.
    """
    prob = F.sigmoid(logits)
    inter = F.sum(prob * targets, axis=(1, 2))
    union = F.sum(prob, axis=(1, 2)) + F.sum(targets, axis=(1, 2))
    return 1.0 - (2.0 * inter + 1.0) / (union + 1.0)


def keypoint_rcnn_loss(heatmap_logits, targets, valid):
    """The keypoint head's loss: softmax cross-entropy over the Q*Q positions of each heatmap,
    summed over the valid keypoints and divided by their number in the batch (Detectron2's
    default ``NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS``; the caller multiplies by
    ``model.keypoint_head.loss_weight``).

    Args:
        heatmap_logits: (B*P, K, Q, Q).
        targets: (B, P, K) heatmap index y * Q + x of each keypoint (``KeypointTargets``).
        valid: (B, P, K) 1 where the keypoint carries a loss, else 0.

    Returns:
        loss_keypoint (1,).
    """
    F = _ns(heatmap_logits)
    flat = F.reshape(heatmap_logits, shape=(-3, -3))                    # (B*P*K, S*S)
    logp = F.log_softmax(flat, axis=-1)
    nll = -F.pick(logp, F.reshape(targets, shape=(-1,)), axis=-1)
    valid = F.reshape(valid, shape=(-1,))
    count = F.maximum(_total(F, valid), 1.0)
    return _total(F, nll * valid) / count

"""Training losses of the RPN, the box head, the mask head and the keypoint head.

Each function takes ``mx.nd`` arrays (inside ``autograd.record``) or ``mx.sym`` symbols (inside a
``hybrid_forward``); the operator namespace is picked from the type of the first argument, so the
calls are the same in both modes. Every loss is a shape ``(1,)`` array, built from native ops only,
and every normaliser is guarded with ``max(count, 1)`` so that a batch without positives gives a
zero loss (and zero gradients) instead of a NaN. Labels and targets come from
:mod:`mxmask.modeling.targets` (``-1`` means "not sampled / ignore").

Normalisations follow Detectron2:

``rpn_losses(logits (B, N), deltas (B, N, 4), labels (B, N), box_targets (B, N, 4), beta=0.0,
batch_size_per_image=256, normalizer="batch_size")`` -> ``(loss_objectness, loss_box)``
    objectness: sigmoid binary cross-entropy summed over the sampled anchors (label 0 or 1);
    box: smooth-L1 (``beta`` 0 is L1) summed over the 4 deltas of the fg anchors. BOTH sums are
    divided by ``batch_size_per_image * B`` (Detectron2's ``normalizer``), not by the number of
    anchors actually sampled; with ``normalizer="sampled"`` (``model.rpn.loss_normalizer``)
    by the number of anchors sampled in the batch (label >= 0): torchvision's
    ``RegionProposalNetwork.compute_loss``, a mean cross-entropy and a box sum over
    ``sampled_inds.numel()``. The two agree when every image fills its batch_size_per_image.

``fast_rcnn_losses(cls_logits (B*S, C+1), deltas (B*S, C*4), labels (B, S) or (B*S,),
box_targets (B, S, 4) or (B*S, 4), beta=0.0, cls_agnostic=False, reg_loss="smooth_l1",
reg_weights=(1, 1, 1, 1))`` -> ``(loss_cls, loss_box)``
    classification: softmax cross-entropy averaged over the sampled rois (label >= 0);
    box: smooth-L1 on the deltas of the gt class (columns ``4*(label-1) .. 4*(label-1)+3``; with
    ``cls_agnostic`` deltas is (B*S, 4), the one box of every class) of the fg rois, summed and
    divided by the number of sampled rois (label >= 0), Detectron2's
    ``max(gt_classes.numel(), 1)``. With ``reg_loss="giou"`` (Detectron2's
    ``BBOX_REG_LOSS_TYPE: giou``) each fg roi's term is instead ``1 - GIoU`` of the box its
    deltas make with the box its targets make (``box_coder.delta_giou``; ``reg_weights`` are the
    box coder's weights, ``model.box_head.bbox_reg_weights``), normalised the same way; the
    caller multiplies by ``model.box_head.bbox_reg_loss_weight``.

``mask_rcnn_loss(mask_logits (B*P, C, M, M), labels (B, P) or (B*P,), mask_targets (B, P, M, M),
cls_agnostic=False, dice_weight=0.0)``
    per-pixel sigmoid binary cross-entropy on the channel of the gt class (label - 1; channel 0,
    of C = 1, with ``cls_agnostic``), averaged over all pixels of the positive slots (label > 0).
    With ``dice_weight > 0`` (``model.mask_head.dice_weight``; not in Detectron2) plus that
    weight times the Dice loss of the same channel, averaged over the positive slots: per slot
    ``1 - (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1)`` with ``p = sigmoid(logit)`` and the
    sums over its M x M cells. Each slot counts as much as any other, however few cells its
    object covers, so thin parts (a limb) weigh more than in the per-pixel average.

``keypoint_rcnn_loss(heatmap_logits (B*P, K, S, S), targets (B, P, K), valid (B, P, K))``
    softmax cross-entropy over the S*S positions of each heatmap, summed over the valid
    keypoints and divided by their number in the batch (Detectron2's default
    ``NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS``; the caller multiplies by
    ``model.keypoint_head.loss_weight``).
"""
import mxnet as mx

from .box_coder import delta_giou

__all__ = ["sigmoid_bce_with_logits", "smooth_l1", "rpn_losses", "fast_rcnn_losses",
           "mask_rcnn_loss", "dice_loss", "keypoint_rcnn_loss"]


def _ns(x):
    """The operator namespace of ``x``: ``mx.sym`` for a Symbol, ``mx.nd`` otherwise."""
    return mx.sym if isinstance(x, mx.sym.Symbol) else mx.nd


def sigmoid_bce_with_logits(F, x, z):
    """Elementwise ``-z*log(sigmoid(x)) - (1-z)*log(1-sigmoid(x))``, computed stably."""
    return F.relu(x) - x * z + F.log1p(F.exp(-F.abs(x)))


def smooth_l1(F, x, beta):
    """Detectron2's smooth-L1 of the difference ``x``: ``|x|`` when beta < 1e-5, otherwise
    ``0.5*x^2/beta`` for ``|x| < beta`` and ``|x| - 0.5*beta`` beyond."""
    ax = F.abs(x)
    if beta < 1e-5:
        return ax
    return F.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def _total(F, x):
    """Sum of all elements as a (1,) array."""
    return F.reshape(F.sum(x), shape=(1,))


def rpn_losses(logits, deltas, labels, box_targets, beta=0.0, batch_size_per_image=256,
               normalizer="batch_size"):
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
    """Per-slot Dice loss ``1 - (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1)`` of mask logits
    ``(N, M, M)`` against targets in [0, 1] ``(N, M, M)``, ``p = sigmoid(logits)`` -> ``(N,)``."""
    prob = F.sigmoid(logits)
    inter = F.sum(prob * targets, axis=(1, 2))
    union = F.sum(prob, axis=(1, 2)) + F.sum(targets, axis=(1, 2))
    return 1.0 - (2.0 * inter + 1.0) / (union + 1.0)


def keypoint_rcnn_loss(heatmap_logits, targets, valid):
    F = _ns(heatmap_logits)
    flat = F.reshape(heatmap_logits, shape=(-3, -3))                    # (B*P*K, S*S)
    logp = F.log_softmax(flat, axis=-1)
    nll = -F.pick(logp, F.reshape(targets, shape=(-1,)), axis=-1)
    valid = F.reshape(valid, shape=(-1,))
    count = F.maximum(_total(F, valid), 1.0)
    return _total(F, nll * valid) / count

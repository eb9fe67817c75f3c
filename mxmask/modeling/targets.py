"""Training targets: RPN anchor labels, RoI sampling with box targets, mask and keypoint targets.

    RPNTargets(...)         forward(anchors (1, N, 4), gt_boxes (B, G, 4), gt_crowd (B, Gc, 4),
                                    im_info (B, 3))
                            -> labels (B, N), box_targets (B, N, 4), matched (B, N)
    RoISampler(C, ...)      forward(rois (B, R, 4), gt_boxes (B, G, 4), gt_labels (B, G))
                            -> rois (B, S, 4), labels (B, S), matched (B, S),
                               box_targets (B, S, 4), num_pos (B,)
    MaskTargets(P, ...)     forward(rois (B, S, 4), labels (B, S), matched (B, S),
                                    gt_masks (B, G, Hp, Wp)) -> mask_targets (B, P, M, M)
    KeypointTargets(P, ...) forward(rois, labels, matched, gt_keypoints (B, G, K, 3))
                            -> targets (B, P, K), valid (B, P, K)

B images, N anchors of all levels, G gt slots, Gc crowd slots, R proposals per image, S sampled
rois per image, P leading "positive" slots, M the mask side, K keypoints. Inputs follow the
training batch of DEVELOPING.md ("Training batches"): boxes are ``(x1, y1, x2, y2)`` in
resized-image pixels, padding rows are ``-1``. Everything is built from batched MXNet ops (no
Python loop over images, anchors, rois or gts), so the training graph hybridizes and runs on its
inputs' context. Random choices come from ``F.random.uniform_like``, reproducible after
``mx.random.seed(k)`` (per context). All outputs pass through ``BlockGrad``: targets carry no
gradient.
"""
import mxnet as mx

from ._utils import batch_gather
from .box_coder import box_area, encode_boxes, pairwise_iou

__all__ = ["RPNTargets", "RoISampler", "MaskTargets", "KeypointTargets", "sample_balanced",
           "valid_boxes"]


# --------------------------------------------------------------------------------------------
# Helpers (F functions)
# --------------------------------------------------------------------------------------------
def _coords(F, boxes):
    """(..., 4) -> four (..., 1) slices x1, y1, x2, y2."""
    return [F.slice_axis(boxes, axis=-1, begin=i, end=i + 1) for i in range(4)]


def valid_boxes(F, boxes):
    """Which boxes are real: a gt slot or a proposal row is valid iff x2 > x1 and y2 > y1.

    Padding gt rows are ``-1`` everywhere and the proposal generator pads with zero boxes, so
    neither ever matches or is sampled.

    Args:
        boxes: (..., 4) xyxy.

    Returns:
        (...) float 1 for a valid box, 0 otherwise.
    """
    x1, y1, x2, y2 = _coords(F, boxes)
    return F.squeeze((x2 > x1) * (y2 > y1), axis=-1)


def _mask_columns(F, overlaps, valid):
    """Set the columns of invalid boxes of ``overlaps`` (B, N, M) to -1; ``valid`` is (B, M)."""
    v = F.expand_dims(valid, axis=1)
    return F.broadcast_add(F.broadcast_mul(overlaps, v), v - 1)


def _masked_rows(F, overlaps, valid):
    """Set the rows of invalid boxes of ``overlaps`` (B*G, N) to -1; ``valid`` is (B, G)."""
    v = F.reshape(valid, shape=(-1, 1))
    return F.broadcast_add(F.broadcast_mul(overlaps, v), v - 1)


def _any_per_image(F, flags, per_image):
    """flags (B*G, N) in {0, 1} and per_image (B, G) -> (B, N): 1 where any of the image's G
    rows is set (a batch_dot with ones, i.e. a BLAS reduction over G)."""
    flags = F.reshape_like(flags, per_image, lhs_begin=0, lhs_end=1, rhs_begin=0, rhs_end=2)
    ones = F.expand_dims(F.ones_like(per_image), axis=1)                   # (B, 1, G)
    return F.reshape(F.batch_dot(ones, flags) > 0, shape=(0, -1))


def sample_balanced(F, pos, neg, num_samples, num_pos_max):
    """Random balanced subsampling (Detectron2 ``subsample_labels``), batched.

    Each element gets a key ``2*pos + neg + u/2`` with ``u ~ U[0, 1)``; its rank in the
    descending order (argsort of the argsort, a permutation, so ranks are unique even when keys
    tie) places the positives first in random order, then the negatives; a rank threshold picks
    the first ones of each group. Ranks are float32, exact for N < 2**24.

    Args:
        pos, neg: disjoint (B, N) 0/1 masks.
        num_samples: the elements to select per image.
        num_pos_max: the most positives to select per image.

    Returns:
        ``(sel_pos, sel_neg, num_pos)``: (B, N) masks of ``min(#pos, num_pos_max)`` random
        positives and ``min(#neg, num_samples - num_pos)`` random negatives per image, and the
        number of selected positives (B, 1).
    """
    rand = F.random.uniform_like(pos)
    key = 2.0 * pos + neg + 0.5 * rand
    order = F.argsort(key, axis=1, is_ascend=False)
    rank = F.argsort(order, axis=1)
    npos = F.sum(pos, axis=1, keepdims=True)
    nneg = F.sum(neg, axis=1, keepdims=True)
    num_pos = F.minimum(npos, float(num_pos_max))
    num_neg = F.minimum(nneg, float(num_samples) - num_pos)
    sel_pos = pos * F.broadcast_lesser(rank, num_pos)
    sel_neg = neg * F.broadcast_lesser(F.broadcast_sub(rank, npos), num_neg)
    return sel_pos, sel_neg, num_pos


# --------------------------------------------------------------------------------------------
# RPN
# --------------------------------------------------------------------------------------------
class RPNTargets(mx.gluon.HybridBlock):
    """Anchor labels and box targets for the RPN.

    Matching (Detectron2 ``Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)``):
    max IoU >= fg_iou is fg, < bg_iou is bg, in between ignored; in addition, for every valid
    gt, every anchor whose IoU equals that gt's highest IoU (ties included, only when it is
    > 0) is fg; the box target of such an anchor is still taken from its own argmax gt, as in
    Detectron2. An image without valid gts gives only background. The IoU is
    ``contrib.box_iou`` of all gts against the shared anchors, a (B*G, N) matrix (the rules of
    ``box_coder.pairwise_iou``, faster than a broadcast formula on the anchors of a large
    image); it has no +1, so ``plus_one`` changes no result, as in GluonCV.

    Crowd rule: an anchor lying more than ``crowd_ioa`` inside one crowd box (intersection /
    anchor area > 0.7) is never used as a negative (it becomes -1); positives are kept, since
    they match a real object. With ``crowd_ioa >= 1`` (``model.rpn.crowd_ioa``) no anchor can
    be more inside, and the crowd boxes are not looked at: torchvision and Detectron2, which
    drop crowd instances when they load the data, where an anchor inside a crowd region can be
    a negative.

    Sampling (Detectron2 ``subsample_labels``, :func:`sample_balanced`): min(#fg,
    int(256 * 0.5)) random positives, then min(#bg, 256 - #positives) random negatives;
    everything else -1.

    Args:
        batch_size_per_image: the anchors sampled per image (256).
        positive_fraction: the most positives, as a share of them (0.5).
        fg_iou, bg_iou: the matching thresholds (0.7, 0.3).
        plus_one: ``model.box_plus_one``; passed to the box coder for a uniform signature.
        crowd_ioa: the crowd rule's threshold (>= 1: no crowd rule).
        boundary_threshold: -1 keeps anchors that cross the image border (Detectron2's
            default); with ``t >= 0`` anchors reaching more than ``t`` pixels outside
            ``im_info``'s (h, w) are -1.
    """

    def __init__(self, batch_size_per_image=256, positive_fraction=0.5, fg_iou=0.7, bg_iou=0.3,
                 plus_one=False, crowd_ioa=0.7, boundary_threshold=-1, **kwargs):
        super(RPNTargets, self).__init__(**kwargs)
        if not 0.0 <= bg_iou <= fg_iou:
            raise ValueError("RPNTargets: need 0 <= bg_iou <= fg_iou, got %r, %r"
                             % (bg_iou, fg_iou))
        self._num_samples = int(batch_size_per_image)
        self._num_pos = int(batch_size_per_image * positive_fraction)
        self._fg_iou = float(fg_iou)
        self._bg_iou = float(bg_iou)
        self._plus_one = bool(plus_one)
        self._crowd_ioa = float(crowd_ioa)
        self._boundary = float(boundary_threshold)

    def hybrid_forward(self, F, anchors, gt_boxes, gt_crowd, im_info):
        """
        Args:
            anchors: (1, N, 4) the anchors of all levels.
            gt_boxes: (B, G, 4), padded with -1; G >= 1 (the loader pads an image without
                gts with a -1 row).
            gt_crowd: (B, Gc, 4) crowd boxes, padded with -1; Gc >= 1.
            im_info: (B, 3) = (h, w, scale).

        Returns:
            labels (B, N): 1 sampled fg, 0 sampled bg, -1 not sampled / ignored;
            box_targets (B, N, 4): ``encode_boxes(matched gt, anchor, weights (1, 1, 1, 1))``,
            exactly 0 for anchors that are not fg;
            matched (B, N): index of the matched gt (argmax IoU), -1 where not fg.
        """
        # Layout (B*G, N): contrib.box_iou of all gts against the shared anchors has no wasted
        # cross-image pairs, and the reductions below use fast kernels (global max Pooling over
        # N, argmax/pick and batch_dot over G) instead of slow generic reductions.
        anchors = F.reshape(F.BlockGrad(anchors), shape=(-1, 4))               # (N, 4)
        gt_boxes = F.BlockGrad(gt_boxes)
        gt_valid = valid_boxes(F, gt_boxes)                                   # (B, G)
        iou = _masked_rows(F, F.contrib.box_iou(F.reshape(gt_boxes, shape=(-1, 4)), anchors,
                                                format="corner"), gt_valid)  # (B*G, N)
        iou3 = F.reshape_like(iou, gt_valid, lhs_begin=0, lhs_end=1, rhs_begin=0, rhs_end=2)
        best_idx = F.argmax(iou3, axis=1)                                     # (B, N)
        best = F.pick(iou3, best_idx, axis=1)                                 # (B, N)
        fg = best >= self._fg_iou
        # low-quality matches: the anchors with each gt's highest IoU (ties included)
        gt_best = F.reshape(F.Pooling(F.expand_dims(F.expand_dims(iou, axis=0), axis=3),
                                      kernel=(1, 1), pool_type="max", global_pool=True),
                            shape=(-1, 1))                                    # (B*G, 1)
        is_best = F.broadcast_mul(F.broadcast_equal(iou, gt_best), gt_best > 0)
        fg = F.maximum(fg, _any_per_image(F, is_best, gt_valid))
        bg = (best < self._bg_iou) * (1 - fg)
        if self._crowd_ioa < 1.0:
            # crowd regions: never negatives. IoA = inter / area(anchor), with the intersection
            # recovered from the IoU: inter = iou * (area_a + area_c) / (1 + iou)
            crowd_valid = valid_boxes(F, gt_crowd)                            # (B, Gc)
            crowd = F.reshape(F.BlockGrad(gt_crowd), shape=(-1, 4))
            ciou = F.contrib.box_iou(crowd, anchors, format="corner")         # (B*Gc, N)
            area_a = F.reshape(box_area(F, anchors), shape=(1, -1))
            area_c = F.reshape(F.relu(box_area(F, crowd)), shape=(-1, 1))
            inter = ciou * F.broadcast_add(area_a, area_c) / (1 + ciou)
            ioa = F.broadcast_div(inter, F.maximum(area_a, 1e-12))
            in_crowd = F.broadcast_mul(ioa > self._crowd_ioa,
                                       F.reshape(crowd_valid, shape=(-1, 1)))
            bg = bg * (1 - _any_per_image(F, in_crowd, crowd_valid))
        else:
            # crowd boxes play no part; gt_crowd still enters the graph (as a (B, 1) factor of
            # ones) so that Gluon does not warn about an unused input
            first = F.slice_axis(F.slice_axis(gt_crowd, axis=1, begin=0, end=1), axis=2,
                                 begin=0, end=1)
            bg = F.broadcast_mul(bg, F.ones_like(F.reshape(first, shape=(-1, 1))))
        h = F.slice_axis(im_info, axis=1, begin=0, end=1)                     # (B, 1)
        w = F.slice_axis(im_info, axis=1, begin=1, end=2)
        if self._boundary >= 0:
            t = self._boundary
            ax1, ay1, ax2, ay2 = [F.reshape(c, shape=(1, -1)) for c in _coords(F, anchors)]
            inside = F.broadcast_mul((ax1 >= -t) * (ay1 >= -t), F.broadcast_mul(
                F.broadcast_lesser(ax2, w + t), F.broadcast_lesser(ay2, h + t)))
        else:
            # every anchor is kept; im_info still enters the graph (as a (B, 1) factor of ones)
            # so that Gluon does not warn about an unused input
            inside = F.ones_like(h)
        fg = F.broadcast_mul(fg, inside)
        bg = F.broadcast_mul(bg, inside)
        sel_pos, sel_neg, _ = sample_balanced(F, fg, bg, self._num_samples, self._num_pos)
        labels = sel_pos + sel_pos + sel_neg - 1                              # 1 / 0 / -1
        matched_boxes = batch_gather(F, gt_boxes, best_idx)                  # (B, N, 4)
        anchors_b = F.broadcast_like(F.expand_dims(anchors, axis=0), matched_boxes)
        is_fg = F.broadcast_like(F.expand_dims(sel_pos, axis=2), matched_boxes)
        targets = encode_boxes(F, F.where(is_fg, matched_boxes, anchors_b), anchors_b,
                               weights=(1.0, 1.0, 1.0, 1.0), plus_one=self._plus_one)
        targets = F.where(is_fg, targets, F.zeros_like(targets))
        matched = F.where(sel_pos > 0, best_idx, -F.ones_like(best_idx))
        return F.BlockGrad(labels), F.BlockGrad(targets), F.BlockGrad(matched)


# --------------------------------------------------------------------------------------------
# RoI sampling + box targets
# --------------------------------------------------------------------------------------------
class RoISampler(mx.gluon.HybridBlock):
    """Sample S rois per image among proposals + gts, with labels and box targets.

    The gt boxes are appended to the proposals before matching (Detectron2). Matching
    (``box_coder.pairwise_iou``, per image): max IoU >= fg_iou is fg, otherwise bg (no
    low-quality matches); a gt slot takes part iff it is valid (:func:`valid_boxes`) and
    ``gt_labels >= 0``. Sampling as for the RPN: min(#fg, P) positives with
    ``P = int(S * positive_fraction)``, then min(#bg, S - #positives) negatives, all at random.

    Output order per image: the sampled positives first, then the sampled negatives, then
    padding rows with label -1 when there are fewer than S valid candidates (their box is a
    proposal, gt or zero row with a minimum size of 1 pixel forced, so pooling them is safe;
    losses ignore them). Hence the first ``P = RoISampler.num_pos_slots`` slots hold every
    positive: the mask and keypoint heads run on ``rois[:, :P]`` and use the slots whose label
    is > 0 (leading slots beyond ``num_pos`` hold negatives or padding, label 0 or -1, and get
    no mask/keypoint loss).

    Args:
        num_classes: C.
        batch_size_per_image: S (512).
        positive_fraction: P / S (0.25).
        fg_iou: the fg threshold (0.5).
        plus_one: ``model.box_plus_one``; IoU and encoding have no +1, so it changes no
            result (as in GluonCV).
        box_weights: the box coder's weights (10, 10, 5, 5).
    """

    def __init__(self, num_classes, batch_size_per_image=512, positive_fraction=0.25, fg_iou=0.5,
                 plus_one=False, box_weights=(10.0, 10.0, 5.0, 5.0), **kwargs):
        super(RoISampler, self).__init__(**kwargs)
        self.num_classes = int(num_classes)     # C: labels are 1..C (read from gt_labels + 1)
        self.num_samples = int(batch_size_per_image)
        self.num_pos_slots = int(batch_size_per_image * positive_fraction)
        self._fg_iou = float(fg_iou)
        self._plus_one = bool(plus_one)
        self._weights = tuple(float(w) for w in box_weights)

    def hybrid_forward(self, F, rois, gt_boxes, gt_labels):
        """
        Args:
            rois: (B, R, 4) proposals; zero rows are padding.
            gt_boxes: (B, G, 4), padded with -1.
            gt_labels: (B, G) contiguous labels 0..C-1, -1 for padding.

        Returns:
            rois (B, S, 4): the sampled rois;
            labels (B, S): c + 1 for a fg roi of class c, 0 bg, -1 padding;
            matched (B, S): gt index of fg rois, -1 otherwise;
            box_targets (B, S, 4): ``encode_boxes(matched gt, roi, box_weights)`` for fg rois
            (the regression target of the gt class), 0 otherwise;
            num_pos (B,): the number of fg rois of each image (<= P).
        """
        S = self.num_samples
        rois = F.BlockGrad(rois)
        gt_boxes = F.BlockGrad(gt_boxes)
        gt_labels = F.BlockGrad(gt_labels)
        gt_valid = valid_boxes(F, gt_boxes) * (gt_labels >= 0)                 # (B, G)
        # S zero rows guarantee at least S candidates (they are invalid, hence padding)
        zeros = F.zeros_like(F.slice_axis(rois, axis=1, begin=0, end=1))      # (B, 1, 4)
        pad = F.broadcast_axis(zeros, axis=1, size=S)                         # (B, S, 4)
        cand = F.concat(rois, gt_boxes, pad, dim=1)                           # (B, M, 4)
        cand_valid = F.concat(valid_boxes(F, rois), gt_valid,
                              F.sum(pad, axis=2), dim=1)                      # (B, M)
        iou = _mask_columns(F, pairwise_iou(F, cand, gt_boxes, self._plus_one), gt_valid)
        best = F.max(iou, axis=2)
        best_idx = F.argmax(iou, axis=2)
        fg = cand_valid * (best >= self._fg_iou)
        bg = cand_valid * (best < self._fg_iou)
        sel_pos, sel_neg, num_pos = sample_balanced(F, fg, bg, S, self.num_pos_slots)
        # output order: sampled positives, sampled negatives, then padding (ties never cross
        # groups: keys are 2 + u/2, 1 + u/2, u/2)
        key = 2.0 * sel_pos + sel_neg + 0.5 * F.random.uniform_like(sel_pos)
        keep = F.topk(key, axis=1, k=S, ret_typ="indices", is_ascend=False)   # (B, S)
        out_rois = batch_gather(F, cand, keep)                               # (B, S, 4)
        out_pos = batch_gather(F, sel_pos, keep)
        out_neg = batch_gather(F, sel_neg, keep)
        out_idx = batch_gather(F, best_idx, keep)
        gt_cls = batch_gather(F, gt_labels, out_idx)
        labels = F.where(out_pos > 0, gt_cls + 1, out_neg - 1)                # c+1 / 0 / -1
        matched = F.where(out_pos > 0, out_idx, -F.ones_like(out_idx))
        # padding rows: force a 1-pixel minimum size so that pooling them is always safe
        x1, y1, x2, y2 = _coords(F, out_rois)
        safe = F.concat(x1, y1, F.maximum(x2, x1 + 1), F.maximum(y2, y1 + 1), dim=-1)
        is_pad = F.broadcast_like(F.expand_dims(labels < 0, axis=2), out_rois)
        out_rois = F.where(is_pad, safe, out_rois)
        # class-specific regression target of the gt class (fg rois have positive size)
        gt_match = batch_gather(F, gt_boxes, out_idx)
        is_fg = F.broadcast_like(F.expand_dims(out_pos, axis=2), out_rois)
        ref = F.where(is_fg, out_rois, safe)
        targets = encode_boxes(F, F.where(is_fg, gt_match, safe), ref, weights=self._weights,
                               plus_one=self._plus_one)
        targets = F.where(is_fg, targets, F.zeros_like(targets))
        num_pos = F.reshape(num_pos, shape=(-1,))
        return (F.BlockGrad(out_rois), F.BlockGrad(labels), F.BlockGrad(matched),
                F.BlockGrad(targets), F.BlockGrad(num_pos))


# --------------------------------------------------------------------------------------------
# Mask and keypoint targets for the first P slots
# --------------------------------------------------------------------------------------------
def _leading_slots(F, P, rois, labels, matched):
    """The first P slots (all when P is None): rois, is_pos (label > 0), gt index (0 if not)."""
    if P is not None:
        rois = F.slice_axis(rois, axis=1, begin=0, end=P)
        labels = F.slice_axis(labels, axis=1, begin=0, end=P)
        matched = F.slice_axis(matched, axis=1, begin=0, end=P)
    is_pos = labels > 0
    return rois, is_pos, F.where(is_pos, matched, F.zeros_like(matched))


class MaskTargets(mx.gluon.HybridBlock):
    """Binary (or, with ``soft``, fractional) M x M mask targets of the positive rois.

    For slot ``i < P`` the gt mask of its matched gt is cropped and resized to ``M x M`` with
    ``contrib.ROIAlign`` over the roi box (aligned=True, adaptive sampling: Detectron2's
    ``BitMasks.crop_and_resize``), then thresholded at >= 0.5; with ``soft=True`` the crop is
    kept as it is, the fraction of each cell the mask covers (``mask_head.soft_targets``: a
    structure thinner than a cell, a limb or a star's tip, is not lost to the threshold; the
    binary cross-entropy takes fractional targets as they are).

    ``aligned=False`` (``mask_head.target_aligned: false``) crops without the half-pixel shift
    and with sides of at least 1 pixel; with ``soft=True`` that is torchvision's
    ``project_masks_on_boxes`` (``roi_align(aligned=False)``, adaptive sampling,
    unthresholded). There the masks are the image's (H, W) and a sample past the last valid row
    or column reads that row (column); here the padded masks read 0 beyond it, so the two
    differ only in the cells of a positive roi whose mask touches the valid image's bottom or
    right edge.

    ``ROIAlign`` reads the masks as float32 ``(B*G, 1, Hp, Wp)`` (``4 * B * G * Hp * Wp``
    bytes, 86 MB for 2 x 20 masks at 800 x 1344) and each roi uses the batch index
    ``b*G + matched``, which is never negative (non-fg slots use gt 0 and a 1-pixel box;
    DEVELOPING.md, "Measured facts about MXNet 1.9.1 on CPU"). Roi sides are forced to at least
    0.01 pixel, so aligned=True never sees a degenerate roi.

    Args:
        num_pos_slots: P, the leading slots to use; None: every slot (the training graph
            passes ``rois[:, :k]``, ``k`` covering every positive).
        resolution: M (28).
        sampling_ratio: ROIAlign's samples per bin side (0: adaptive).
        aligned: the crop's ROIAlign mode.
        soft: keep the fractional crop instead of thresholding it.
    """

    def __init__(self, num_pos_slots, resolution=28, sampling_ratio=0, aligned=True,
                 soft=False, **kwargs):
        super(MaskTargets, self).__init__(**kwargs)
        self._P = None if num_pos_slots is None else int(num_pos_slots)
        self._M = int(resolution)
        self._soft = bool(soft)
        self._ratio = int(sampling_ratio)
        self._aligned = bool(aligned)

    def hybrid_forward(self, F, rois, labels, matched, gt_masks):
        """
        Args:
            rois, labels, matched: (B, S, 4), (B, S), (B, S) from :class:`RoISampler`.
            gt_masks: (B, G, Hp, Wp) uint8 binary masks in resized-image pixels.

        Returns:
            mask_targets (B, P, M, M) float32 in {0, 1} ([0, 1] when soft); all 0 for slots
            whose label <= 0.
        """
        P, M = self._P, self._M
        rois, is_pos, gidx = _leading_slots(F, P, F.BlockGrad(rois), labels, matched)
        # number of gt slots G as a (B, 1) tensor, from the masks' own shape
        first = F.slice_axis(F.slice_axis(gt_masks, axis=2, begin=0, end=1), axis=3, begin=0, end=1)
        num_gt = F.sum(F.ones_like(F.reshape(F.cast(first, "float32"), shape=(0, 0))),
                       axis=1, keepdims=True)                                 # (B, 1)
        bidx = F.expand_dims(F.contrib.arange_like(gidx, axis=0), axis=1)    # (B, 1)
        flat = F.broadcast_add(F.broadcast_mul(bidx, num_gt), gidx)           # (B, P) >= 0
        x1, y1, x2, y2 = _coords(F, rois)
        unit = F.concat(F.zeros_like(x1), F.zeros_like(x1), F.ones_like(x1), F.ones_like(x1),
                        dim=-1)
        pos3 = F.broadcast_like(F.expand_dims(is_pos, axis=2), rois)
        safe = F.concat(x1, y1, F.maximum(x2, x1 + 0.01), F.maximum(y2, y1 + 0.01), dim=-1)
        boxes = F.where(pos3, safe, unit)
        pool_rois = F.concat(F.reshape(flat, shape=(-1, 1)), F.reshape(boxes, shape=(-1, 4)), dim=1)
        masks = F.expand_dims(F.cast(F.reshape(gt_masks, shape=(-3, -2)), "float32"), axis=1)
        crops = F.contrib.ROIAlign(masks, pool_rois, pooled_size=(M, M), spatial_scale=1.0,
                                   sample_ratio=self._ratio, aligned=self._aligned)
        crops = F.reshape_like(crops, is_pos, lhs_begin=0, lhs_end=2, rhs_begin=0,
                               rhs_end=2)                                     # (B, P, M, M)
        keep = F.reshape(is_pos, shape=(0, 0, 1, 1))
        crops = F.clip(crops, 0.0, 1.0) if self._soft else crops >= 0.5
        return F.BlockGrad(F.broadcast_mul(crops, keep))


class KeypointTargets(mx.gluon.HybridBlock):
    """Heatmap indices and validity of the keypoints of the positive rois.

    Detectron2 ``keypoints_to_heatmap``: x = floor((kx - x1) * Q / (x2 - x1)), same for y,
    with Q the heatmap side; a keypoint exactly on the right (bottom) edge kx == x2 gets
    x = Q - 1; valid iff the slot is a positive, v > 0 and 0 <= x, y < Q. Keypoint coordinates
    are used as given (continuous coordinates; Detectron2 adds 0.5 to COCO's integer keypoints
    when it loads them). A positive without labelled keypoints simply has no valid entry
    (Detectron2 drops such proposals from the keypoint head; here they stay in their slot with
    zero weight).

    Args:
        num_pos_slots: P, the leading slots to use; None: every slot.
        resolution: Q (56).
    """

    def __init__(self, num_pos_slots, resolution=56, **kwargs):
        super(KeypointTargets, self).__init__(**kwargs)
        self._P = None if num_pos_slots is None else int(num_pos_slots)
        self._S = int(resolution)

    def hybrid_forward(self, F, rois, labels, matched, gt_keypoints):
        """
        Args:
            rois, labels, matched: (B, S, 4), (B, S), (B, S) from :class:`RoISampler`.
            gt_keypoints: (B, G, K, 3) (x, y, v) in resized-image pixels.

        Returns:
            targets (B, P, K) float32 holding integers: the heatmap index y * Q + x (0 when
            invalid; float32 so that ``pick`` and the loss need no dtype casts; exact up to
            2**24);
            valid (B, P, K) float32 in {0, 1}.
        """
        S = float(self._S)
        rois, is_pos, gidx = _leading_slots(F, self._P, F.BlockGrad(rois), labels, matched)
        kps = batch_gather(F, F.BlockGrad(gt_keypoints), gidx)               # (B, P, K, 3)
        kx = F.squeeze(F.slice_axis(kps, axis=3, begin=0, end=1), axis=3)     # (B, P, K)
        ky = F.squeeze(F.slice_axis(kps, axis=3, begin=1, end=2), axis=3)
        kv = F.squeeze(F.slice_axis(kps, axis=3, begin=2, end=3), axis=3)
        x1, y1, x2, y2 = _coords(F, rois)                                      # (B, P, 1)
        sx = S / F.maximum(x2 - x1, 1e-6)
        sy = S / F.maximum(y2 - y1, 1e-6)
        x = F.floor(F.broadcast_mul(F.broadcast_sub(kx, x1), sx))
        y = F.floor(F.broadcast_mul(F.broadcast_sub(ky, y1), sy))
        # a keypoint exactly on the right / bottom edge goes to the last cell (Detectron2)
        x = F.where(F.broadcast_equal(kx, x2), F.ones_like(x) * (S - 1), x)
        y = F.where(F.broadcast_equal(ky, y2), F.ones_like(y) * (S - 1), y)
        inside = (x >= 0) * (y >= 0) * (x < S) * (y < S)
        valid = F.broadcast_mul(inside * (kv > 0), F.expand_dims(is_pos, axis=2))
        targets = (y * S + x) * valid
        return F.BlockGrad(targets), F.BlockGrad(valid)

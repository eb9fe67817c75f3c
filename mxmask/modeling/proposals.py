"""RPN proposals: decode the RPN outputs of all levels, clip, drop tiny boxes, NMS, keep the top.

    ProposalGenerator(pre_nms_topk_train, pre_nms_topk_test, post_nms_topk_train,
                      post_nms_topk_test, nms_thresh, min_size, per_level_nms=True,
                      plus_one=False, style='detectron2', num_levels=None, scale_clamp=None)
        forward(im_info (B, 3), anchors_1..anchors_L, logits_1..logits_L, deltas_1..deltas_L)
            -> rois (B, post, 4), scores (B, post)
    TrainTestBlock: a HybridBlock that retraces its graph when the training mode changes

Per level l: anchors (1, N_l, 4) xyxy in input pixels (AnchorGenerator), objectness logits
(B, N_l) and deltas (B, N_l, 4) (weights 1, 1, 1, 1) in the same (h, w, a) order. ``pre`` and
``post`` are the training counts when ``autograd.is_training()``, else the test counts. Outputs
are sorted by score, highest first; scores are sigmoid probabilities; padded rows (fewer than
``post`` proposals survive) have score -1 and box (0, 0, 0, 0); neither output carries a
gradient.
"""
from mxnet import autograd
from mxnet.gluon import HybridBlock

from ._utils import box_nms
from .box_coder import clip_boxes, decode_boxes, DEFAULT_SCALE_CLAMP

__all__ = ["ProposalGenerator", "GLUONCV_RPN_SCALE_CLAMP"]

GLUONCV_RPN_SCALE_CLAMP = 4.42
_NEG_INF = float("-inf")
_VALID_THRESH = -3.0e38       # box_nms keeps scores > valid_thresh: every finite logit, not -inf
_FINITE_MAX = 3.0e38


def _rows_like(F, x, count, value):
    """A (B, count, ...) array filled with ``value``, shaped like ``x`` (B, N, ...) otherwise."""
    first = F.slice_axis(x, axis=1, begin=0, end=1)
    return F.broadcast_axis(F.ones_like(first) * value, axis=1, size=count)


def _batch_index(F, x, like):
    """(B, K) batch indices for ``like`` (B, K); ``x`` has B on axis 0."""
    b = F.reshape(F.contrib.arange_like(x, axis=0), (-1, 1))
    return F.broadcast_like(b, like)


class TrainTestBlock(HybridBlock):
    """A HybridBlock whose graph differs between training and inference
    (``autograd.is_training()`` is read while tracing): when hybridized, it retraces when the
    mode changes.

    Only a block called on its own retraces: inside a hybridized parent the parent's cached
    graph keeps the mode it was traced in, and the parent must clear its cache
    (``_clear_cached_op()``) when the mode changes.
    """

    def __init__(self, **kwargs):
        super(TrainTestBlock, self).__init__(**kwargs)
        self._traced_training = None

    def forward(self, *args):
        training = autograd.is_training()
        if self._active and self._traced_training is not None and training != self._traced_training:
            self._clear_cached_op()
        self._traced_training = training
        return super(TrainTestBlock, self).forward(*args)


class ProposalGenerator(TrainTestBlock):
    """RPN outputs of L levels -> rois (B, post, 4), scores (B, post).

    Two algorithms, chosen by ``per_level_nms``:

    - ``per_level_nms=True`` (Detectron2 ``find_top_rpn_proposals``; torchvision's per-level
      NMS then global top-k is the same): per level and image, the top ``min(pre, N_l)``
      anchors by logit; decode; drop non-finite boxes; clip to the image; drop boxes that fail
      the min-size rule; NMS at ``nms_thresh`` independently per level; then the top ``post``
      over all levels by score (:meth:`_per_level`).
    - ``per_level_nms=False`` (GluonCV ``RPN(multi_level=True, per_level_nms=False)`` +
      ``RPNProposal``, reproduced op for op): all anchors of all levels are decoded (no
      per-level top-k), clipped, boxes failing the min-size rule get score -1, then one NMS
      over all levels whose input is the ``pre`` highest-scoring valid boxes of the image, and
      the first ``post`` rows are kept (:meth:`_all_levels`).

    ``style`` sets the min-size rule (:meth:`_size_ok`) and the default scale clamp:
    log(1000/16) for ``detectron2`` and ``torchvision``, 4.42 for ``gluoncv`` (GluonCV's FPN
    models pass ``clip=4.42``). Decoding never adds 1 (box_coder.py); ``plus_one=True``
    decodes bit-exactly like GluonCV's ``contrib.box_decode`` and adds 1 to the sizes of the
    min-size rule.

    Args:
        pre_nms_topk_train, pre_nms_topk_test: ``pre``, the boxes per level (per image with
            ``per_level_nms=False``) that enter the NMS.
        post_nms_topk_train, post_nms_topk_test: ``post``, the proposals kept per image.
        nms_thresh: the NMS IoU threshold.
        min_size: the min-size rule's side in pixels.
        per_level_nms: the algorithm (above).
        plus_one: ``model.box_plus_one``.
        style: ``"detectron2"``, ``"gluoncv"`` or ``"torchvision"``.
        num_levels: L, checked at forward when given.
        scale_clamp: the decoder's clamp of dw, dh; None: the style's default.
    """

    def __init__(self, pre_nms_topk_train, pre_nms_topk_test, post_nms_topk_train,
                 post_nms_topk_test, nms_thresh, min_size, per_level_nms=True, plus_one=False,
                 style="detectron2", num_levels=None, scale_clamp=None, **kwargs):
        super(ProposalGenerator, self).__init__(**kwargs)
        if style not in ("detectron2", "gluoncv", "torchvision"):
            raise ValueError("unknown proposal style %r (expected 'detectron2', 'gluoncv' or "
                             "'torchvision')" % (style,))
        counts = (pre_nms_topk_train, pre_nms_topk_test, post_nms_topk_train, post_nms_topk_test)
        if min(int(c) for c in counts) < 1:
            raise ValueError("pre/post NMS top-k counts must be >= 1, got %r" % (counts,))
        self.pre_nms_topk = {True: int(pre_nms_topk_train), False: int(pre_nms_topk_test)}
        self.post_nms_topk = {True: int(post_nms_topk_train), False: int(post_nms_topk_test)}
        self.nms_thresh = float(nms_thresh)
        self.min_size = float(min_size)
        self.per_level_nms = bool(per_level_nms)
        self.plus_one = bool(plus_one)
        self.style = style
        self.num_levels = None if num_levels is None else int(num_levels)
        if scale_clamp is None:
            scale_clamp = GLUONCV_RPN_SCALE_CLAMP if style == "gluoncv" else DEFAULT_SCALE_CLAMP
        self.scale_clamp = scale_clamp


    # ----------------------------------------------------------------------------------------
    def _size_ok(self, F, boxes):
        """(B, K, 4) clipped boxes -> (B, K) 1 where the box passes the min-size rule, with
        ``w = x2 - x1`` and ``h = y2 - y1`` (+1 each with ``plus_one``) measured after clipping:
        ``detectron2`` keeps a box iff ``w > min_size and h > min_size`` (``Boxes.nonempty``);
        ``gluoncv`` drops it iff ``w < min_size or h < min_size``; ``torchvision``
        (``remove_small_boxes``) keeps it iff ``w >= min_size and h >= min_size``."""
        x1, y1, x2, y2 = F.split(boxes, axis=-1, num_outputs=4, squeeze_axis=True)
        p = 1.0 if self.plus_one else 0.0
        w = x2 - x1 + p
        h = y2 - y1 + p
        if self.style == "detectron2":
            return (w > self.min_size) * (h > self.min_size)
        return (w >= self.min_size) * (h >= self.min_size)

    def hybrid_forward(self, F, im_info, *args):
        """
        Args:
            im_info: (B, 3) = (h, w, scale), the valid image size used for clipping.
            args: anchors (1, N_l, 4) of the L levels, then logits (B, N_l), then deltas
                (B, N_l, 4).

        Returns:
            rois (B, post, 4) and scores (B, post), sorted by score; padded rows have score -1
            and box 0. Both pass through ``stop_gradient``, and the logits and deltas are not
            differentiated through here. This is also a safety measure: without the
            stop_gradients, ``backward()`` through this graph segfaults in MXNet 1.9.1's
            imperative backward (``SetDependency``) on CPU.
        """
        if len(args) % 3 or not args:
            raise ValueError("ProposalGenerator expects L anchors, L logits and L deltas, got %d"
                             " arrays" % len(args))
        L = len(args) // 3
        if self.num_levels is not None and L != self.num_levels:
            raise ValueError("ProposalGenerator built for %d levels got %d" % (self.num_levels, L))
        anchors = list(args[:L])
        logits = [F.stop_gradient(x) for x in args[L:2 * L]]
        deltas = [F.stop_gradient(x) for x in args[2 * L:]]
        training = bool(autograd.is_training())
        pre = self.pre_nms_topk[training]
        post = self.post_nms_topk[training]
        if self.per_level_nms:
            rois, scores = self._per_level(F, im_info, anchors, logits, deltas, pre, post)
        else:
            rois, scores = self._all_levels(F, im_info, anchors, logits, deltas, pre, post)
        return F.stop_gradient(rois), F.stop_gradient(scores)

    # ----------------------------------------------------------------------------------------
    def _per_level(self, F, im_info, anchors, logits, deltas, pre, post):
        """Detectron2: per-level top-k, decode, clip, min size, per-level NMS, global top post.

        The per-level NMS is one ``box_nms`` over a (B, L, pre, 6) array (box_nms treats the
        leading axes as independent batches): L * pre^2 box pairs instead of (L * pre)^2 for one
        NMS with level ids."""
        rows = []
        for anc, lg, dl in zip(anchors, logits, deltas):
            # pad every level with `pre` invalid entries so that top-k never exceeds N_l
            lg = F.concat(lg, _rows_like(F, lg, pre, _NEG_INF), dim=1)            # (B, N+pre)
            dl = F.concat(dl, _rows_like(F, dl, pre, 0.0), dim=1)                 # (B, N+pre, 4)
            anc = F.concat(anc, _rows_like(F, anc, pre, 0.0), dim=1)              # (1, N+pre, 4)
            top_s, top_i = F.topk(lg, axis=1, k=pre, ret_typ="both")               # (B, pre)
            bidx = _batch_index(F, lg, top_i)
            d_sel = F.gather_nd(dl, F.stack(bidx, top_i, axis=0))                 # (B, pre, 4)
            a_sel = F.take(F.reshape(anc, (-1, 4)), top_i)                        # (B, pre, 4)
            boxes = decode_boxes(F, d_sel, a_sel, plus_one=self.plus_one,
                                 scale_clamp=self.scale_clamp)
            finite = F.min(F.abs(boxes) <= _FINITE_MAX, axis=-1) * (F.abs(top_s) <= _FINITE_MAX)
            boxes = clip_boxes(F, boxes, im_info)
            valid = finite * self._size_ok(F, boxes)
            key = F.where(valid, top_s, F.ones_like(top_s) * _NEG_INF)
            row = F.concat(F.expand_dims(key, axis=2), boxes,
                           F.ones_like(F.expand_dims(key, axis=2)), dim=-1)     # (B, pre, 6)
            rows.append(F.expand_dims(row, axis=1))
        data = F.concat(*rows, dim=1) if len(rows) > 1 else rows[0]               # (B, L, pre, 6)
        # columns: logit, x1, y1, x2, y2, flag; suppressed/invalid rows come back as all -1
        nms = box_nms(F, data, overlap_thresh=self.nms_thresh, valid_thresh=_VALID_THRESH,
                      topk=-1, coord_start=1, score_index=0, id_index=-1,
                      force_suppress=True, in_format="corner", out_format="corner")
        flat = F.reshape(nms, (0, -3, 0))                                          # (B, L*pre, 6)
        total = len(rows) * pre
        if total < post:
            flat = F.concat(flat, _rows_like(F, flat, post - total, -1.0), dim=1)
        flag = F.slice_axis(flat, axis=-1, begin=5, end=6).reshape((0, -1))
        score = F.slice_axis(flat, axis=-1, begin=0, end=1).reshape((0, -1))
        key = F.where(flag > 0, score, F.ones_like(score) * _NEG_INF)
        top_i = F.topk(key, axis=1, k=post, ret_typ="indices")                     # (B, post)
        sel = F.gather_nd(flat, F.stack(_batch_index(F, key, top_i), top_i, axis=0))  # (B, post, 6)
        valid = F.slice_axis(sel, axis=-1, begin=5, end=6) > 0                     # (B, post, 1)
        boxes = F.slice_axis(sel, axis=-1, begin=1, end=5)
        boxes = F.where(F.broadcast_like(valid, boxes), boxes, F.zeros_like(boxes))
        valid = F.reshape(valid, (0, -1))
        logit = F.slice_axis(sel, axis=-1, begin=0, end=1).reshape((0, -1))
        scores = F.where(valid, F.sigmoid(logit), F.ones_like(logit) * -1.0)
        return boxes, scores

    def _all_levels(self, F, im_info, anchors, logits, deltas, pre, post):
        """GluonCV: decode all anchors, clip, min size, one NMS over all levels (topk=pre).

        NaN boxes get score -1 too (GluonCV would keep them). GluonCV returns -1 rows as
        padding; here padded rows follow the module's contract (score -1, box 0)."""
        anc = F.concat(*anchors, dim=1) if len(anchors) > 1 else anchors[0]     # (1, N, 4)
        lg = F.concat(*logits, dim=1) if len(logits) > 1 else logits[0]         # (B, N)
        dl = F.concat(*deltas, dim=1) if len(deltas) > 1 else deltas[0]         # (B, N, 4)
        boxes = decode_boxes(F, dl, anc, plus_one=self.plus_one, scale_clamp=self.scale_clamp)
        boxes = clip_boxes(F, boxes, im_info)
        score = F.sigmoid(lg)
        score = F.where(self._size_ok(F, boxes), score, F.ones_like(score) * -1.0)
        data = F.concat(F.expand_dims(score, axis=2), boxes, dim=-1)              # (B, N, 5)
        # `post` rows of padding (score -1, filtered by box_nms) so that the slice always exists
        data = F.concat(data, _rows_like(F, data, post, -1.0), dim=1)
        nms = box_nms(F, data, overlap_thresh=self.nms_thresh, topk=pre, coord_start=1,
                      score_index=0, id_index=-1, force_suppress=True)
        res = F.slice_axis(nms, axis=1, begin=0, end=post)                        # (B, post, 5)
        scores = F.slice_axis(res, axis=-1, begin=0, end=1)                       # (B, post, 1)
        boxes = F.slice_axis(res, axis=-1, begin=1, end=5)
        valid = scores >= 0
        boxes = F.where(F.broadcast_like(valid, boxes), boxes, F.zeros_like(boxes))
        return boxes, F.reshape(scores, (0, -1))

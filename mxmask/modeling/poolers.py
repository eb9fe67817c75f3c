"""Multi-level RoIAlign: pool each roi from the FPN level its size selects.

    assign_fpn_levels(F, rois (..., 4), min_level=2, max_level=5, canonical_size=224,
                      canonical_level=4, style='detectron2') -> levels (...) float32
    sanitize_rois(F, rois (..., 4)) -> rois (..., 4) that ROIAlign accepts
    MultiLevelRoIAlign(output_size, strides=(4, 8, 16, 32), sampling_ratio=0, aligned=True,
                       style='detectron2', canonical_size=224, canonical_level=4,
                       rois_in_image=False)
        forward(rois (B, R, 4), P_min, ..., P_max) -> (B*R, C, P, P), image-major
        (row b*R + r is roi r of image b)
    level_canvas(F, levels) -> the levels stacked into one tensor; shared_level_canvas()

rois are xyxy in input pixels, ``P`` is the output size and ``C`` the feature channels. Feature
``k`` has stride ``strides[k]`` (consecutive powers of two: level = log2(stride)); extra
trailing features (e.g. P6) are ignored. ROIAlign never sees a negative batch index or a
degenerate roi (:func:`sanitize_rois`). Rois that lie inside the image are pooled once each, in
one ROIAlign call over all levels (:func:`level_canvas`; the modes: :class:`MultiLevelRoIAlign`).
"""
import contextlib
import math
import threading

import numpy as np
from mxnet.gluon import HybridBlock

from ..ops import compiled_kernels_active
from .box_coder import box_area

__all__ = ["assign_fpn_levels", "sanitize_rois", "MultiLevelRoIAlign", "level_canvas",
           "shared_level_canvas", "MIN_ROI_SIZE", "COORD_LIMIT"]

MIN_ROI_SIZE = 0.01
COORD_LIMIT = 1.0e4
_EPS = {"detectron2": 2.220446049250313e-16, "gluoncv": 1e-6, "torchvision": 1e-6}
_CANVASES = threading.local()


@contextlib.contextmanager
def shared_level_canvas():
    """Within the block (this thread), :func:`level_canvas` of the same level arrays or symbols
    returns the canvas built the first time, so that several heads pooling the same levels
    share one canvas. The network's inference graph (box head, the ``refine_boxes`` pass, mask
    and keypoint heads) and the training graph's second stage (mask and keypoint heads) build
    it once each. Nested blocks share one cache."""
    outer = getattr(_CANVASES, "cache", None)
    if outer is None:
        _CANVASES.cache = {}
    try:
        yield
    finally:
        _CANVASES.cache = outer


def sanitize_rois(F, rois):
    """Make rois safe for ROIAlign: NaN -> 0, coordinates clipped to [-COORD_LIMIT, COORD_LIMIT]
    (this also removes +-inf), then ``x2 = max(x2, x1 + MIN_ROI_SIZE)`` and likewise y2.

    ``contrib.ROIAlign(aligned=True)`` aborts the process for a roi with x2 <= x1 or y2 <= y1
    (DEVELOPING.md, "Measured facts about MXNet 1.9.1 on CPU"), so every roi goes through here
    before level assignment and pooling. In float32 at |x| <= 1e4 the ulp is <= 1e-3, so the
    pooled width stays > 0 at every stride; padded all-zero rois become (0, 0, .01, .01). A roi
    with width and height >= 0.01 px inside [-1e4, 1e4] is unchanged, so every real roi is
    pooled exactly.

    Args:
        rois: (..., 4) xyxy.

    Returns:
        (..., 4) finite rois with x2 >= x1 + MIN_ROI_SIZE and y2 >= y1 + MIN_ROI_SIZE.
    """
    rois = F.where(rois == rois, rois, F.zeros_like(rois))                      # NaN -> 0
    rois = F.clip(rois, -COORD_LIMIT, COORD_LIMIT)
    x1, y1, x2, y2 = F.split(rois, axis=-1, num_outputs=4)
    x2 = F.maximum(x2, x1 + MIN_ROI_SIZE)
    y2 = F.maximum(y2, y1 + MIN_ROI_SIZE)
    return F.concat(x1, y1, x2, y2, dim=-1)


def assign_fpn_levels(F, rois, min_level=2, max_level=5, canonical_size=224, canonical_level=4,
                      style="detectron2"):
    """The FPN level of each roi: ``floor(canonical_level + log2(sqrt(area) / canonical_size
    + eps))`` clamped to [min_level, max_level], in the style of one framework:

    - ``detectron2`` (``assign_boxes_to_levels``): area = (x2-x1)*(y2-y1), eps = 2.2e-16
      (float64 machine epsilon, which vanishes in float32 as it does in Detectron2).
    - ``gluoncv`` (``RCNN._pyramid_roi_feats``): area = (x2-x1+1)*(y2-y1+1), eps = 1e-6,
      evaluated with the same op sequence.
    - ``torchvision`` (``LevelMapper``): area = (x2-x1)*(y2-y1) and
      ``floor(canonical_level + log2(sqrt(area) / canonical_size) + 1e-6)``: eps after the log.

    Args:
        rois: (..., 4) xyxy in input pixels, with a non-negative area (use
            :func:`sanitize_rois`); a NaN area gives a NaN level.
        min_level, max_level: the levels of the finest and coarsest feature map.
        canonical_size, canonical_level: a roi of side canonical_size maps to canonical_level.
        style: ``"detectron2"``, ``"gluoncv"`` or ``"torchvision"``.

    Returns:
        (...) float32 levels, integral values in [min_level, max_level].
    """
    if style not in _EPS:
        raise ValueError("unknown pooler style %r (expected one of %s)" % (style, sorted(_EPS)))
    area = box_area(F, rois, plus_one=(style == "gluoncv"))
    if style == "torchvision":
        lvl = F.floor(F.log2(F.sqrt(area) / float(canonical_size)) + canonical_level + _EPS[style])
    else:
        lvl = F.floor(F.log2(F.sqrt(area) / float(canonical_size) + _EPS[style]) + canonical_level)
    return F.clip(lvl, float(min_level), float(max_level))


class MultiLevelRoIAlign(HybridBlock):
    """Pool each roi from its level: ``contrib.ROIAlign(pooled_size, sample_ratio=sampling_ratio,
    aligned=aligned)`` of the roi scaled by 1 / stride of its level (:func:`assign_fpn_levels`).

    ``aligned=True`` shifts sampling by -0.5 px (Detectron2's ROIAlignV2); False is the legacy
    mode (rois at least 1x1 feature pixel, GluonCV and torchvision); ``sampling_ratio=0`` means
    ``ceil(roi_size / P)`` samples per bin, adaptively. Every roi keeps its real batch index:
    MXNet's CPU kernel corrupts another roi's output for a negative one, the index GluonCV
    gives the rois of other levels (DEVELOPING.md, "Measured facts about MXNet 1.9.1 on CPU").

    Two ways to pool, chosen by the mode:

    - With ``aligned=True`` (the Detectron2 presets, ``shapes``), and in the legacy mode when
      ``rois_in_image``, every roi is pooled exactly once, in one ROIAlign call over the
      :func:`level_canvas` (:meth:`_pool_on_canvas`). The legacy mode's edge slivers get their
      zero samples back by weights (:meth:`_kept_share`).
    - Otherwise (the legacy mode for rois that may leave the image: the mask head of the
      GluonCV preset pools its detections, which GluonCV does not clip) every level pools every
      roi (:meth:`_pool_per_level`).

    Kernel: ``contrib.ROIAlign`` by default. Inside :func:`mxmask.ops.compiled_kernels` (the
    training graph on CPU, and the in-process inference network) the pooler calls
    ``mxmask_roi_align`` with the same arguments: the same values, with a parallel CPU backward
    (docs/kernels.md).

    Args:
        output_size: P, or (P_h, P_w).
        strides: the strides of the levels, finest first: consecutive powers of two.
        sampling_ratio: samples per bin side; 0 is adaptive.
        aligned: ROIAlignV2 (True) or the legacy mode (False).
        style: the level assignment of :func:`assign_fpn_levels`.
        canonical_size, canonical_level: as in :func:`assign_fpn_levels`.
        rois_in_image: the rois always lie inside the (padded) input image, which lets the
            legacy mode pool on the canvas too.
    """

    def __init__(self, output_size, strides=(4, 8, 16, 32), sampling_ratio=0, aligned=True,
                 style="detectron2", canonical_size=224, canonical_level=4, rois_in_image=False,
                 **kwargs):
        super(MultiLevelRoIAlign, self).__init__(**kwargs)
        if isinstance(output_size, (list, tuple)):
            self.output_size = (int(output_size[0]), int(output_size[1]))
        else:
            self.output_size = (int(output_size), int(output_size))
        self.strides = tuple(int(s) for s in strides)
        levels = [math.log2(s) for s in self.strides]
        if not self.strides or any(l != int(l) for l in levels) or \
                any(b - a != 1 for a, b in zip(levels, levels[1:])):
            raise ValueError("strides must be consecutive powers of two, got %r" % (strides,))
        if style not in _EPS:
            raise ValueError("unknown pooler style %r (expected one of %s)"
                             % (style, sorted(_EPS)))
        self.min_level = int(levels[0])
        self.max_level = int(levels[-1])
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.style = style
        self.canonical_size = float(canonical_size)
        self.canonical_level = float(canonical_level)
        self.rois_in_image = bool(rois_in_image)

    def hybrid_forward(self, F, rois, *features):
        """
        Args:
            rois: (B, R, 4) xyxy in input pixels.
            features: the levels (B, C, H_k, W_k), finest first, one per stride; extra
                trailing levels are ignored.

        Returns:
            (B*R, C, P, P) pooled features, image-major (row b*R + r is roi r of image b).
        """
        L = len(self.strides)
        if len(features) < L:
            raise ValueError("MultiLevelRoIAlign with strides %r needs %d feature maps, got %d"
                             % (self.strides, L, len(features)))
        features = features[:L]
        rois = sanitize_rois(F, rois)                                           # (B, R, 4)
        levels = assign_fpn_levels(F, rois, self.min_level, self.max_level, self.canonical_size,
                                   self.canonical_level, self.style)           # (B, R)
        bidx = F.broadcast_like(F.reshape(F.contrib.arange_like(rois, axis=0), (-1, 1, 1)),
                                F.slice_axis(rois, axis=-1, begin=0, end=1))   # (B, R, 1)
        if L > 1 and (self.aligned or self.rois_in_image):
            return self._pool_on_canvas(F, rois, levels, bidx, features)
        return self._pool_per_level(F, rois, levels, bidx, features)

    def _roi_align(self, F, data, rois5, spatial_scale, layout="NCHW"):
        """ROIAlign of rois5 (N, 5) = (batch index, xyxy) on data: compiled or MXNet's; a
        channels-last ``data`` (``layout="NHWC"``) needs the compiled one."""
        if compiled_kernels_active("roi_align"):
            return F.mxmask_roi_align(data, rois5, pooled_h=self.output_size[0],
                                      pooled_w=self.output_size[1], spatial_scale=spatial_scale,
                                      sample_ratio=self.sampling_ratio, aligned=int(self.aligned),
                                      layout=layout)
        return F.contrib.ROIAlign(data, rois5, pooled_size=self.output_size,
                                  spatial_scale=spatial_scale, sample_ratio=self.sampling_ratio,
                                  position_sensitive=False, aligned=self.aligned)

    def _pool_on_canvas(self, F, rois, levels, bidx, features):
        """One ROIAlign over the level canvas: each roi goes to its level, x' = x / stride_k,
        y' = y / stride_k + o_k (:func:`level_canvas`), pooled at ``spatial_scale=1``.

        In the legacy mode (``aligned=False``) a roi is at least 1x1 feature pixel. A roi less
        than one pixel tall that starts in its level's last row (at the bottom edge of an image
        whose size is a multiple of the stride) is widened past the level, and its samples below
        row H_k read zeros in ROIAlign (``y > H_k``) where the canvas would read the next tile;
        the same for columns. Since the rois lie inside the image (``rois_in_image``), such a
        sliver is pooled on the canvas from the level's last row instead (y in [H_k - 1, H_k]:
        every sample reads row H_k - 1, as every kept sample of the widened roi does), and each
        output row is multiplied by the share of its samples that ROIAlign keeps (those with
        y <= H_k, :meth:`_kept_share`); the same for columns, and both for a corner sliver. That
        is exact: a sample's value does not depend on its y once y is clamped to the last row.
        Every other roi inside the image samples within [0, H_k] x [0, W_k] of its level, where
        the canvas is exact.
        """
        k = F.expand_dims(levels - float(self.min_level), axis=-1)             # (B, R, 1)
        scale = (0.5 ** k) / float(self.strides[0])                            # 1 / stride
        heights = [_extent(F, f, 2) for f in features]                         # (1, 1, 1) each
        offsets, offset = [], None
        for height in heights[:-1]:
            offset = height + 2.0 if offset is None else offset + height + 2.0  # o_1, o_2, ...
            offsets.append(offset)
        shift_y = _of_level(F, k, [F.zeros_like(heights[0])] + offsets)
        x1, y1, x2, y2 = F.split(F.broadcast_mul(rois, scale), axis=-1, num_outputs=4)  # level px
        if self.aligned:
            rois5 = F.concat(bidx, x1, y1 + shift_y, x2, y2 + shift_y, dim=-1)
            return self._roi_align_canvas(F, features, F.reshape(rois5, (-1, 5)))
        # legacy mode: a roi under one feature pixel is widened to one pixel, so one that starts
        # in its level's last row (column) samples past the level, where ROIAlign reads zeros and
        # the canvas the next tile. Such a sliver is pooled on the last row (column) instead, all
        # of whose samples read that row, and each output row (column) is scaled by the share of
        # its samples that ROIAlign would have kept (y <= H). Exact: see the docstring.
        height = _of_level(F, k, heights)
        width = _of_level(F, k, [_extent(F, f, 3) for f in features])
        sliver_y = (y2 - y1 < 1.0) * (y1 > height - 1.0)
        sliver_x = (x2 - x1 < 1.0) * (x1 > width - 1.0)
        keep_y = self._kept_share(F, y1, height, sliver_y, self.output_size[0])
        keep_x = self._kept_share(F, x1, width, sliver_x, self.output_size[1])
        y1, y2 = F.where(sliver_y, height - 1.0, y1), F.where(sliver_y, height, y2)
        x1, x2 = F.where(sliver_x, width - 1.0, x1), F.where(sliver_x, width, x2)
        rois5 = F.concat(bidx, x1, y1 + shift_y, x2, y2 + shift_y, dim=-1)
        pooled = self._roi_align_canvas(F, features, F.reshape(rois5, (-1, 5)))
        keep_y = F.expand_dims(F.expand_dims(F.reshape(keep_y, (-3, -1)), axis=1), axis=3)
        keep_x = F.expand_dims(F.expand_dims(F.reshape(keep_x, (-3, -1)), axis=1), axis=2)
        keep = F.broadcast_mul(keep_y, keep_x)                                  # (B*R, 1, P, P)
        return F.broadcast_mul(pooled, keep)

    def _roi_align_canvas(self, F, features, rois5):
        """ROIAlign of rois5 (N, 5) on the level canvas of ``features`` at ``spatial_scale=1``:
        the channels-last canvas of ``mxmask_level_canvas`` when the ``"level_canvas"`` kernel
        is on (with the compiled RoIAlign; the same values), else :func:`level_canvas`."""
        if compiled_kernels_active("level_canvas") and compiled_kernels_active("roi_align"):
            return self._roi_align(F, level_canvas(F, features, channels_last=True), rois5, 1.0,
                                   layout="NHWC")
        return self._roi_align(F, level_canvas(F, features), rois5, 1.0)

    def _kept_share(self, F, start, size, sliver, pooled):
        """(B, R, pooled): for a sliver (roi widened to 1 pixel from ``start``), the share of
        the samples of each output row that ROIAlign keeps (coordinate <= ``size``, computed in
        the kernel's order of float32 operations); else 1."""
        grid = self.sampling_ratio if self.sampling_ratio > 0 else 1   # ceil(1 / pooled) = 1
        step = np.float32(1.0) / np.float32(pooled)                    # bin size of a 1-px roi
        index = F.reshape(F.contrib.arange_like(F.tile(start, reps=(1, 1, pooled)), axis=-1),
                          (1, 1, -1))                                   # 0 .. pooled-1
        base = F.broadcast_add(start, index * float(step))
        kept = None
        for i in range(grid):
            # the kernel's order of operations: start + ph * bin + (i + .5) * bin / grid
            delta = float(np.float32(np.float32(i + 0.5) * step) / np.float32(grid))
            inside = F.broadcast_lesser_equal(base + delta, size)
            kept = inside if kept is None else kept + inside
        return F.where(F.broadcast_like(sliver, kept), kept / float(grid), F.ones_like(kept))

    def _pool_per_level(self, F, rois, levels, bidx, features):
        """Legacy mode for rois that may leave the image: every level pools every roi, the rois
        of other levels replaced by the tiny valid roi (b, 0, 0, 1, 1) of their own image;
        ``where`` picks each roi's level (each roi is on exactly one level). A tiny roi costs
        C*P*P*g*g samples (g = sampling_ratio, or 1 when adaptive); the kernel has no safe way
        to skip a roi."""
        levels = F.reshape(levels, (-1,))                                       # (B*R,)
        rois5 = F.reshape(F.concat(bidx, rois, dim=-1), (-1, 5))                # (B*R, 5)
        tiny = F.concat(F.slice_axis(rois5, axis=-1, begin=0, end=1),
                        F.zeros_like(F.slice_axis(rois5, axis=-1, begin=1, end=3)),
                        F.ones_like(F.slice_axis(rois5, axis=-1, begin=3, end=5)), dim=-1)
        out = None
        for k, f in enumerate(features):
            on_level = levels == float(self.min_level + k)                      # (B*R,)
            level_rois = F.where(on_level, rois5, tiny) if len(features) > 1 else rois5
            pooled = self._roi_align(F, f, level_rois, 1.0 / self.strides[k])
            out = pooled if out is None else F.where(on_level, pooled, out)
        return out


def _extent(F, feature, axis):
    """The size of ``feature`` along ``axis`` as a float32 (1, 1, 1) array (read at run time)."""
    size = F.slice_axis(F.shape_array(feature), axis=0, begin=axis, end=axis + 1)
    return F.reshape(F.cast(size, "float32"), (1, 1, 1))


def _of_level(F, k, values):
    """Per-roi value of its level: ``values[k]`` (each (1, 1, 1)) for k (B, R, 1) -> (B, R, 1)."""
    out = F.broadcast_like(values[0], k)
    for i, value in enumerate(values[1:], 1):
        out = F.where(k > i - 0.5, F.broadcast_like(value, k), out)
    return out


def level_canvas(F, features, channels_last=False):
    """The "level canvas": the levels stacked top to bottom into one tensor, left-aligned, the
    finest first at the origin, each with a one-pixel edge-replicated border below and to the
    right (and above, from the second level on), and zero filler on the right up to the width
    of the finest level::

        canvas (B, C, H_0 + 1 + sum_{k>0} (H_k + 2), W_0 + 1)
        level k occupies rows o_k .. o_k + H_k - 1 and columns 0 .. W_k - 1
        o_0 = 0,  o_1 = H_0 + 2,  o_{k+1} = o_k + H_k + 2

    A roi of level k pooled at x' = x / stride_k, y' = y / stride_k + o_k
    (``ROIAlign(spatial_scale=1)``) gives what pooling it on its own level gives: RoIAlign is
    translation invariant, and its edge rule (a sample in [-1, 0] reads row 0, one in
    [H-1, H] reads row H-1) is reproduced exactly by the replicated borders, for every roi whose
    samples lie in [-1, H_k] x [-1, W_k] of its level, i.e. every roi inside the (padded) input
    image, which is where proposals, sampled training rois and detections always are (they are
    clipped to the image). A roi reaching further right or down samples a neighbouring tile
    instead of zeros. x is never shifted and the finest level (most rois) is not shifted at
    all, so those coordinates are bit for bit those of per-level pooling; the y of a coarser
    level's roi loses at most one float32 ulp of its offset (about 3e-5 px at o_k = 500). The
    offsets come from ``shape_array``, so one graph serves any input size. The canvas costs one
    copy of the levels (about 1.9x P2) instead of one pooling pass over all rois per level.

    Args:
        features: the levels (B, C, H_k, W_k), finest first, with H_k <= H_0 and W_k <= W_0.
        channels_last: build it channels-last, (B, H_c, W_c, C), in one compiled operator
            (``mxmask_level_canvas``; the in-process inference network), the layout that
            ``mxmask_roi_align(layout="NHWC")`` pools from without a copy of its own.

    Returns:
        The canvas (B, C, H_c, W_c), H_c = H_0 + 1 + sum_{k>0} (H_k + 2), W_c = W_0 + 1, or
        (B, H_c, W_c, C). Inside :func:`shared_level_canvas`, the same ``features`` and layout
        give the same canvas object.
    """
    cache = getattr(_CANVASES, "cache", None)
    key = (bool(channels_last),) + tuple(id(f) for f in features)
    if cache is not None and key in cache:
        return cache[key][0]
    if channels_last:
        canvas = F.mxmask_level_canvas(*features, num_args=len(features))
        if cache is not None:
            cache[key] = (canvas, tuple(features))
        return canvas
    first = F.pad(features[0], mode="edge", pad_width=(0, 0, 0, 0, 0, 1, 0, 1))
    rows = [first]
    for f in features[1:]:
        tile = F.pad(f, mode="edge", pad_width=(0, 0, 0, 0, 1, 1, 0, 1))
        column = F.zeros_like(F.slice_axis(tile, axis=3, begin=0, end=1))     # (B, C, H_k+2, 1)
        filler = F.broadcast_like(column, first, lhs_axes=(3,), rhs_axes=(3,))
        rows.append(F.slice_like(F.concat(tile, filler, dim=3), first, axes=(3,)))
    canvas = F.concat(*rows, dim=2)
    if cache is not None:
        # the levels are kept with it: while they live, no other object can take their ids
        cache[key] = (canvas, tuple(features))
    return canvas

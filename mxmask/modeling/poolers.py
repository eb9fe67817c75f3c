"""Multi-level RoIAlign: pool each roi from the FPN level its size selects.

    assign_fpn_levels(F, rois (..., 4), min_level=2, max_level=5, canonical_size=224,
                      canonical_level=4, style='detectron2') -> levels (...) float32
    sanitize_rois(F, rois (..., 4)) -> rois (..., 4) that ROIAlign accepts
    MultiLevelRoIAlign(output_size, strides=(4, 8, 16, 32), sampling_ratio=0, aligned=True,
                       style='detectron2', canonical_size=224, canonical_level=4)
        forward(rois (B, R, 4), P_min, ..., P_max) -> (B*R, C, P, P), image-major
        (row b*R + r is roi r of image b)

rois are xyxy in input pixels. Feature ``k`` has stride ``strides[k]`` (consecutive powers of
two: level = log2(stride)); extra trailing features (e.g. P6) are ignored.

Level assignment: ``floor(canonical_level + log2(sqrt(area) / canonical_size + eps))`` clamped to
[min_level, max_level]:
- ``detectron2`` (``assign_boxes_to_levels``): area = (x2-x1)*(y2-y1), eps = 2.2e-16
  (float64 machine epsilon, which vanishes in float32 as it does in Detectron2).
- ``gluoncv`` (``RCNN._pyramid_roi_feats``): area = (x2-x1+1)*(y2-y1+1), eps = 1e-6, evaluated
  with the same op sequence.

Pooling: ``contrib.ROIAlign(pooled_size, sample_ratio=sampling_ratio, aligned=aligned)`` of the
roi scaled by 1/stride of its level (below); ``aligned=True`` shifts sampling by -0.5 px (Detectron2 ROIAlignV2), False is
the legacy mode (rois at least 1x1 feature pixel, GluonCV); ``sampling_ratio=0`` means
``ceil(roi_size / P)`` samples per bin, adaptively.

Two measured MXNet 1.9.1 CPU bugs are avoided (DESIGN.md section 6):
- A negative batch index makes the kernel skip the roi and write ``top[n] = 0`` into roi 0's
  output (GluonCV masks other levels' rois with -1: corrupted, nondeterministic output). Here
  every roi keeps its real batch index.
- ``aligned=True`` aborts the process (CHECK in an OpenMP loop) for a roi with x2 <= x1 or
  y2 <= y1. Before pooling (and before level assignment) every roi is sanitised: NaN -> 0,
  coordinates clipped to [-1e4, 1e4] (this also removes +-inf), then ``x2 = max(x2, x1 + 0.01)``
  and ``y2 = max(y2, y1 + 0.01)`` (MIN_ROI_SIZE px). In float32 at |x| <= 1e4 the ulp is <= 1e-3,
  so the pooled width stays > 0 at every stride; padded all-zero rois become (0, 0, .01, .01).
  A roi with width and height >= 0.01 px inside [-1e4, 1e4] is unchanged, so every real roi
  is pooled exactly.

Two ways to pool, chosen by the mode:

With ``aligned=True`` (the Detectron2 presets, ``shapes``) every roi is pooled exactly once, in
one ROIAlign call over a "level canvas": the levels are
stacked top to bottom into one tensor, left-aligned, the finest first at the origin, each with
a one-pixel edge-replicated border below and to the right (and above, from the second level
on), and zero filler on the right up to the width of the finest level:

    canvas (B, C, H_0 + 1 + sum_{k>0} (H_k + 2), W_0 + 1)
    level k occupies rows o_k .. o_k + H_k - 1 and columns 0 .. W_k - 1
    o_0 = 0,  o_1 = H_0 + 2,  o_{k+1} = o_k + H_k + 2

and each roi goes to its level: x' = x / stride_k, y' = y / stride_k + o_k (then
``ROIAlign(spatial_scale=1)``). RoIAlign is translation invariant and its edge rule (a sample in
[-1, 0] reads row 0, one in [H-1, H] reads row H-1) is reproduced exactly by the replicated
borders, so the result equals pooling the roi on its own level for every roi whose samples lie
in [-1, H_k] x [-1, W_k] of its level, i.e. every roi inside the (padded) input image, which is
where proposals, sampled training rois and detections always are (they are clipped to the
image). A roi reaching further right or down samples a neighbouring tile instead of zeros. x
is never shifted and the finest level (most rois) is not shifted at all, so those coordinates
are bit for bit those of per-level pooling; the y of a coarser level's roi loses at most one
float32 ulp of its offset (about 3e-5 px at o_k = 500). The offsets come from ``shape_array``, so
one graph serves any input size.

In the legacy mode (``aligned=False``, the GluonCV preset) a roi is at least 1x1 feature pixel,
so a roi starting in a level's last row or column (at the bottom or right edge of an image
whose size is a multiple of the stride) samples past the level's extent, where ROIAlign reads
zeros and the canvas would read the next tile: GluonCV's detections then change. So the legacy
mode pools per level: every level pools every roi, the rois of other levels replaced by the
tiny valid roi (b, 0, 0, 1, 1) of their own image, and ``where`` selects each roi's level (each
roi is on exactly one level). A tiny roi costs C*P*P*g*g samples (g = sampling_ratio, or 1 when
adaptive); the kernel has no safe way to skip a roi.

Cost of the canvas: one copy of the levels (about 1.9x P2) instead of L pooling passes over all
rois. On the ``shapes`` training step the pooler's backward went from 12 ROIAlign calls (one per
level and head, 532 ms) to 3 (about 170 ms).

Kernel: ``contrib.ROIAlign`` by default. Inside :func:`mxmask.ops.compiled_kernels` (the
training graph on CPU, :mod:`mxmask.modeling.training`) the pooler calls ``mxmask_roi_align``
with the same arguments: the same values, and a parallel CPU backward (``shapes`` step: those 3
backward calls 200 -> 28 ms).
"""
import math

from mxnet.gluon import HybridBlock

from ..ops import compiled_kernels_active
from .box_coder import box_area

__all__ = ["assign_fpn_levels", "sanitize_rois", "MultiLevelRoIAlign", "MIN_ROI_SIZE",
           "COORD_LIMIT"]

MIN_ROI_SIZE = 0.01
COORD_LIMIT = 1.0e4
_EPS = {"detectron2": 2.220446049250313e-16, "gluoncv": 1e-6}


def sanitize_rois(F, rois):
    """rois (..., 4) -> finite rois with x2 >= x1 + MIN_ROI_SIZE and y2 >= y1 + MIN_ROI_SIZE."""
    rois = F.where(rois == rois, rois, F.zeros_like(rois))                      # NaN -> 0
    rois = F.clip(rois, -COORD_LIMIT, COORD_LIMIT)
    x1, y1, x2, y2 = F.split(rois, axis=-1, num_outputs=4)
    x2 = F.maximum(x2, x1 + MIN_ROI_SIZE)
    y2 = F.maximum(y2, y1 + MIN_ROI_SIZE)
    return F.concat(x1, y1, x2, y2, dim=-1)


def assign_fpn_levels(F, rois, min_level=2, max_level=5, canonical_size=224, canonical_level=4,
                      style="detectron2"):
    """FPN level (float, integral values in [min_level, max_level]) of each roi (..., 4) -> (...).

    See the module docstring for the two styles. Rois must have a non-negative area (use
    :func:`sanitize_rois`); a NaN area gives a NaN level.
    """
    if style not in _EPS:
        raise ValueError("unknown pooler style %r (expected 'detectron2' or 'gluoncv')" % (style,))
    area = box_area(F, rois, plus_one=(style == "gluoncv"))
    lvl = F.floor(F.log2(F.sqrt(area) / float(canonical_size) + _EPS[style]) + canonical_level)
    return F.clip(lvl, float(min_level), float(max_level))


class MultiLevelRoIAlign(HybridBlock):
    """rois (B, R, 4) + features -> pooled (B*R, C, P, P); see the module docstring."""

    def __init__(self, output_size, strides=(4, 8, 16, 32), sampling_ratio=0, aligned=True,
                 style="detectron2", canonical_size=224, canonical_level=4, **kwargs):
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
            raise ValueError("unknown pooler style %r (expected 'detectron2' or 'gluoncv')"
                             % (style,))
        self.min_level = int(levels[0])
        self.max_level = int(levels[-1])
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.style = style
        self.canonical_size = float(canonical_size)
        self.canonical_level = float(canonical_level)

    def hybrid_forward(self, F, rois, *features):
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
        if self.aligned and L > 1:
            return self._pool_on_canvas(F, rois, levels, bidx, features)
        return self._pool_per_level(F, rois, levels, bidx, features)

    def _roi_align(self, F, data, rois5, spatial_scale):
        if compiled_kernels_active():
            return F.mxmask_roi_align(data, rois5, pooled_h=self.output_size[0],
                                      pooled_w=self.output_size[1], spatial_scale=spatial_scale,
                                      sample_ratio=self.sampling_ratio, aligned=int(self.aligned))
        return F.contrib.ROIAlign(data, rois5, pooled_size=self.output_size,
                                  spatial_scale=spatial_scale, sample_ratio=self.sampling_ratio,
                                  position_sensitive=False, aligned=self.aligned)

    def _pool_on_canvas(self, F, rois, levels, bidx, features):
        """aligned=True: one ROIAlign over the level canvas (module docstring)."""
        k = F.expand_dims(levels - float(self.min_level), axis=-1)             # (B, R, 1)
        scale = (0.5 ** k) / float(self.strides[0])                            # 1 / stride
        shift_y = F.zeros_like(k)
        offset = None
        for i, f in enumerate(features[:-1]):
            height = F.reshape(F.cast(F.slice_axis(F.shape_array(f), axis=0, begin=2, end=3),
                                      "float32"), (1, 1, 1))
            offset = height + 2.0 if offset is None else offset + height + 2.0  # o_{i+1}
            shift_y = F.where(k > i + 0.5, F.broadcast_like(offset, k), shift_y)
        x1, y1, x2, y2 = F.split(rois, axis=-1, num_outputs=4)
        rois5 = F.concat(bidx, x1 * scale, y1 * scale + shift_y, x2 * scale, y2 * scale + shift_y,
                         dim=-1)
        return self._roi_align(F, level_canvas(F, features), F.reshape(rois5, (-1, 5)), 1.0)

    def _pool_per_level(self, F, rois, levels, bidx, features):
        """Legacy mode: every level pools every roi, the rois of other levels replaced by the
        tiny valid roi (b, 0, 0, 1, 1) of their own image; ``where`` picks each roi's level."""
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


def level_canvas(F, features):
    """Levels (B, C, H_k, W_k), finest first -> canvas (B, C, H_0 + 1 + sum_{k>0} (H_k + 2), W_0 + 1).

    See the module docstring: level k at rows o_k.., columns 0.., with edge-replicated borders;
    the filler right of a coarser level is zeros. Needs H_k <= H_0 and W_k <= W_0.
    """
    first = F.pad(features[0], mode="edge", pad_width=(0, 0, 0, 0, 0, 1, 0, 1))
    rows = [first]
    for f in features[1:]:
        tile = F.pad(f, mode="edge", pad_width=(0, 0, 0, 0, 1, 1, 0, 1))
        column = F.zeros_like(F.slice_axis(tile, axis=3, begin=0, end=1))     # (B, C, H_k+2, 1)
        filler = F.broadcast_like(column, first, lhs_axes=(3,), rhs_axes=(3,))
        rows.append(F.slice_like(F.concat(tile, filler, dim=3), first, axes=(3,)))
    return F.concat(*rows, dim=2)

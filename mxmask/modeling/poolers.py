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

Pooling: ``contrib.ROIAlign(pooled_size, spatial_scale=1/stride, sample_ratio=sampling_ratio,
aligned=aligned)``; ``aligned=True`` shifts sampling by -0.5 px (Detectron2 ROIAlignV2), False is
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

Per level, the rois of other levels are replaced by the tiny valid roi (b, 0, 0, 1, 1) of their
own image b before pooling, and the level's output is selected with ``where`` (each roi is on
exactly one level). A tiny roi costs C*P*P*g*g samples with g = 1 when ``sampling_ratio=0``
(adaptive) and g = sampling_ratio otherwise; the kernel has no safe way to skip a roi. Measured
on the 2-core CPU (other jobs running), 1000 rois on P2..P5 of an 800x1344 input, C=256, roi
sizes log-uniform in 8..600 px (71% on P2):

    setting                      tiny rois (used)   every roi on every level   lower bound*
    7x7, adaptive, aligned       0.95 s             1.75 s                     0.55 s
    7x7, ratio 2, aligned        0.91 s             1.13 s                     0.30 s
    14x14, ratio 2, legacy       3.3 s              4.4 s                      0.86 s
    (* each roi pooled once on its level, with dynamic shapes: not possible in a static graph)

So the Detectron2 presets (adaptive) pay about 1.7x the lower bound, and a fixed sampling ratio
(the GluonCV preset) about L = 4x. Stacking the levels into one edge-padded (B*L, C, H2, W2)
tensor and pooling once was measured at 1.6 s for the 14x14 case but is not exact for rois
reaching past a coarse level's extent (ROIAlign's y > H cut-off), so it is not used.
"""
import math

from mxnet.gluon import HybridBlock

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
        rois = sanitize_rois(F, rois)                                           # (B, R, 4)
        levels = assign_fpn_levels(F, rois, self.min_level, self.max_level, self.canonical_size,
                                   self.canonical_level, self.style)           # (B, R)
        levels = F.reshape(levels, (-1,))                                       # (B*R,)
        bidx = F.broadcast_like(F.reshape(F.contrib.arange_like(rois, axis=0), (-1, 1, 1)),
                                F.slice_axis(rois, axis=-1, begin=0, end=1))   # (B, R, 1)
        rois5 = F.reshape(F.concat(bidx, rois, dim=-1), (-1, 5))                # (B*R, 5)
        # the tiny valid stand-in of each roi: same image, (0, 0, 1, 1)
        tiny = F.concat(F.slice_axis(rois5, axis=-1, begin=0, end=1),
                        F.zeros_like(F.slice_axis(rois5, axis=-1, begin=1, end=3)),
                        F.ones_like(F.slice_axis(rois5, axis=-1, begin=3, end=5)), dim=-1)
        out = None
        for k in range(L):
            on_level = levels == float(self.min_level + k)                      # (B*R,)
            level_rois = F.where(on_level, rois5, tiny) if L > 1 else rois5
            pooled = F.contrib.ROIAlign(features[k], level_rois, pooled_size=self.output_size,
                                        spatial_scale=1.0 / self.strides[k],
                                        sample_ratio=self.sampling_ratio,
                                        position_sensitive=False, aligned=self.aligned)
            out = pooled if out is None else F.where(on_level, pooled, out)
        return out

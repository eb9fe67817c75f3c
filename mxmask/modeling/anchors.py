"""Anchors of one FPN level, precomputed for the largest feature map and stored in the block.

    AnchorGenerator(stride, size, aspect_ratios=(0.5, 1.0, 2.0), offset=0.0,
                    style='detectron2', max_size=1344, runtime_stride=False, reference_stride=4)
        forward(feature (B, C, H, W)[, reference]) -> anchors (1, H*W*A, 4)
    generate_cell_anchors(stride, sizes, aspect_ratios, style) -> (A, 4) float64

Anchors are ``(x1, y1, x2, y2)`` in input pixels, ordered (h, w, a) row-major: row
``(i * W + j) * A + a`` is anchor ``a`` of feature cell (row i, column j); ``A`` is
``len(sizes) * len(aspect_ratios)``. An aspect ratio is ``height / width``. The styles
``detectron2``, ``gluoncv`` and ``torchvision`` reproduce those frameworks' anchors
(:func:`generate_cell_anchors`; the torchvision stride rule in :class:`AnchorGenerator`).
All values are computed in float64 with numpy and stored as float32.
"""
import math

import numpy as np
import mxnet as mx

__all__ = ["AnchorGenerator", "generate_cell_anchors", "DEFAULT_MAX_SIZE"]

DEFAULT_MAX_SIZE = 1344


def _as_tuple(x):
    if isinstance(x, (list, tuple)):
        return tuple(float(v) for v in x)
    return (float(x),)


def generate_cell_anchors(stride, sizes, aspect_ratios, style="detectron2"):
    """The anchors of feature cell (0, 0), before the offset of detectron2 style.

    Styles:

    - ``detectron2`` (``DefaultAnchorGenerator``): for each size s (outer) and ratio r (inner),
      ``w = sqrt(s*s / r)``, ``h = r * w``, the box ``(-w/2, -h/2, w/2, h/2)``. No rounding.
    - ``gluoncv`` (GluonCV ``RPNAnchorGenerator`` with ``base_size = stride`` as its FPN models
      use it, Detectron1 ``generate_anchors`` conventions): a ``stride x stride`` reference box
      ``(0, 0, stride-1, stride-1)`` centred at ``c = (stride - 1) / 2``; for each ratio r
      (outer) ``ws = round(sqrt(stride*stride / r))``, ``hs = round(ws * r)`` (numpy round: half
      to even), then for each size s (inner) ``W = ws * s / stride``, ``H = hs * s / stride``
      and the box ``(c - (W-1)/2, c - (H-1)/2, c + (W-1)/2, c + (H-1)/2)`` ("+1" widths). For
      GluonCV's ``mask_rcnn_fpn_resnet50_v1b_coco`` (strides 4..64, scales 2..32 times
      base_size 16 = sizes 32..512, ratios 0.5/1/2) the values equal its anchors exactly.
    - ``torchvision`` (``AnchorGenerator.generate_anchors``): for each ratio r (outer) and size s
      (inner), in float32, ``h = sqrt(r) * s``, ``w = s / sqrt(r)``, the box
      ``(-w/2, -h/2, w/2, h/2)`` rounded to integers (half to even, as ``torch.round``). With
      one size per level this is the detectron2 cell rounded.

    Args:
        stride: the level's stride in pixels (used by the gluoncv style only).
        sizes: one anchor size (sqrt of the area, pixels) or a sequence of them.
        aspect_ratios: one height / width ratio or a sequence of them.
        style: ``"detectron2"``, ``"gluoncv"`` or ``"torchvision"``.

    Returns:
        (A, 4) float64 xyxy, A = len(sizes) * len(aspect_ratios): centred at (0, 0)
        (detectron2, torchvision) or at ((stride-1)/2, (stride-1)/2) (gluoncv).
    """
    sizes = _as_tuple(sizes)
    ratios = _as_tuple(aspect_ratios)
    out = []
    if style == "detectron2":
        for s in sizes:
            for r in ratios:
                w = math.sqrt(s * s / r)
                h = r * w
                out.append((-w / 2.0, -h / 2.0, w / 2.0, h / 2.0))
    elif style == "gluoncv":
        base = float(stride)
        ctr = 0.5 * (base - 1.0)
        for r in ratios:
            ws = float(np.round(np.sqrt(base * base / r)))
            hs = float(np.round(ws * r))
            for s in sizes:
                scale = s / base
                W = ws * scale
                H = hs * scale
                out.append((ctr - 0.5 * (W - 1.0), ctr - 0.5 * (H - 1.0),
                            ctr + 0.5 * (W - 1.0), ctr + 0.5 * (H - 1.0)))
    elif style == "torchvision":
        h_ratios = np.sqrt(np.array(ratios, np.float32))
        w_ratios = np.float32(1.0) / h_ratios
        scales = np.array(sizes, np.float32)
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        cell = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2.0)
        out = np.round(cell).astype(np.float64)
    else:
        raise ValueError("unknown anchor style %r (expected 'detectron2', 'gluoncv' or "
                         "'torchvision')" % (style,))
    return np.array(out, dtype=np.float64).reshape(-1, 4)


def _grid_anchors(stride, cell, offset, height, width):
    """(1, 1, height, width, A*4) float32 anchors of a height x width feature map."""
    shift_x = (np.arange(width, dtype=np.float64) + offset) * stride
    shift_y = (np.arange(height, dtype=np.float64) + offset) * stride
    sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")             # (H, W)
    shifts = np.stack([sx, sy, sx, sy], axis=-1)                      # (H, W, 4)
    anchors = shifts[:, :, None, :] + cell[None, None, :, :]          # (H, W, A, 4)
    return anchors.reshape(1, 1, height, width, -1).astype(np.float32)


class AnchorGenerator(mx.gluon.HybridBlock):
    """Anchors of one level: the cell anchors of :func:`generate_cell_anchors` shifted to every
    feature cell, ``(j + offset) * stride`` in x and ``(i + offset) * stride`` in y.

    The anchors of the largest feature map, ``ceil(max_size / stride)`` cells square, are a
    constant of the block (``self.anchors``, shape (1, 1, Hmax, Wmax, A*4), saved with the
    parameters), and forward slices the (H, W) corner of it with ``slice_like``, so the exported
    graph needs no Python. A feature map larger than the constant raises an MXNet shape error.

    Strides: detectron2 and gluoncv use the level's nominal stride. torchvision infers it at
    run time as ``padded input size // feature size`` per axis, which differs from the nominal
    stride on the coarsest level when the padded size is not a multiple of it (P6 of an
    800-pixel side: 13 cells, stride 61). With ``runtime_stride=True`` forward takes a
    reference feature map of known ``reference_stride`` (P2), whose size times that stride is
    the padded input size, and moves each anchor by ``(actual - nominal stride) * (j, i)``; a
    second constant, ``cell_index``, holds the ``(j, i, j, i)`` of every anchor. Where the
    stride is exact the move is zero.

    Args:
        stride: the level's stride in pixels.
        size: one anchor size (sqrt of the area, pixels) or a list of sizes.
        aspect_ratios: height / width ratios.
        offset: cell-centre offset in units of the stride (detectron2 style only; the other
            styles need 0).
        style: ``"detectron2"``, ``"gluoncv"`` or ``"torchvision"``.
        max_size: the largest padded input side in pixels that must be covered (1344 covers
            the 1333 max-size presets padded to 32).
        runtime_stride: infer the stride from a reference feature map (torchvision).
        reference_stride: the stride of that reference feature map.
    """

    def __init__(self, stride, size, aspect_ratios=(0.5, 1.0, 2.0), offset=0.0,
                 style="detectron2", max_size=DEFAULT_MAX_SIZE, runtime_stride=False,
                 reference_stride=4, **kwargs):
        super(AnchorGenerator, self).__init__(**kwargs)
        if style not in ("detectron2", "gluoncv", "torchvision"):
            raise ValueError("unknown anchor style %r (expected 'detectron2', 'gluoncv' or "
                             "'torchvision')" % (style,))
        if style != "detectron2" and offset != 0:
            raise ValueError("%s-style anchors take no offset; it must be 0, got %r"
                             % (style, offset))
        if stride <= 0 or max_size <= 0:
            raise ValueError("stride and max_size must be positive")
        self.stride = stride
        self.sizes = _as_tuple(size)
        self.aspect_ratios = _as_tuple(aspect_ratios)
        self.offset = float(offset)
        self.style = style
        self.max_cells = int(math.ceil(float(max_size) / stride))
        cell = generate_cell_anchors(stride, self.sizes, self.aspect_ratios, style)
        self.num_anchors = cell.shape[0]
        grid = _grid_anchors(stride, cell, self.offset, self.max_cells, self.max_cells)
        self.runtime_stride = bool(runtime_stride)
        self.reference_stride = float(reference_stride)
        with self.name_scope():
            self.anchors = self.params.get_constant("anchors", grid)
            if self.runtime_stride:
                index = _grid_anchors(1, np.zeros_like(cell), 0.0, self.max_cells, self.max_cells)
                self.cell_index = self.params.get_constant("cell_index", index)

    def hybrid_forward(self, F, feature, *reference, anchors, cell_index=None):
        """
        Args:
            feature: (B, C, H, W) the level's feature map (only its shape is read).
            reference: with ``runtime_stride``, the (B, C', H', W') map of
                ``reference_stride``.

        Returns:
            (1, H*W*A, 4) float32 anchors, xyxy in input pixels, ordered (h, w, a) row-major.
        """
        a = F.slice_like(anchors, feature, axes=(2, 3))               # (1, 1, H, W, A*4)
        if self.runtime_stride:
            # stride = padded input size // feature size, per axis (y, x); padded input size =
            # reference size * reference_stride
            ref = F.cast(F.slice_axis(F.shape_array(reference[0]), axis=0, begin=2, end=4),
                         "float32") * self.reference_stride
            size = F.cast(F.slice_axis(F.shape_array(feature), axis=0, begin=2, end=4),
                          "float32")
            move = F.floor(ref / size) - float(self.stride)             # (2,) = (dy, dx)
            move = F.tile(F.reverse(move, axis=0), reps=(self.num_anchors * 2,))  # (A*4,)
            index = F.slice_like(cell_index, feature, axes=(2, 3))     # (1, 1, H, W, A*4)
            a = a + F.broadcast_mul(index, F.reshape(move, (1, 1, 1, 1, -1)))
        return F.reshape(a, (1, -1, 4))

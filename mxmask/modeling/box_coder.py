"""Box maths, written once: encode, decode, clip, area, pairwise IoU and GIoU, mirroring.

    encode_boxes(F, boxes (..., 4), anchors (..., 4), weights, plus_one) -> deltas (..., 4)
    decode_boxes(F, deltas (..., 4), anchors (..., 4), weights, plus_one, scale_clamp)
        -> boxes (..., 4)
    clip_boxes(F, boxes (B, ..., 4), im_info (B, 3)) -> boxes (B, ..., 4)
    box_area(F, boxes (..., 4), plus_one) -> (...)
    pairwise_iou(F, a (B, N, 4), b (B, M, 4)) -> (B, N, M)
    generalized_iou(F, a (..., 4), b (..., 4)), delta_giou(F, deltas, target_deltas) -> (...)
    hflip_boxes(F, boxes (..., 4), width), hflip_deltas(F, deltas (N, 4k))

Every function takes ``F`` (``mx.nd`` or ``mx.sym``) first, so it works inside a HybridBlock's
``hybrid_forward`` both imperatively and after ``hybridize()``, on any context. Boxes are
``(x1, y1, x2, y2)`` in pixels on the last axis, deltas ``(dx, dy, dw, dh)``. Leading axes
broadcast (``broadcast_*`` ops), e.g. deltas (B, R, C, 4) with anchors (B, R, 1, 4).

``plus_one`` (``model.box_plus_one``, the GluonCV preset) reproduces what GluonCV computes: its
"+1" is in box areas and sizes only (:func:`box_area`), never in the coder, the clipping or the
IoU; each function says what the flag changes.
"""
import math

__all__ = ["encode_boxes", "decode_boxes", "clip_boxes", "box_area", "pairwise_iou",
           "generalized_iou", "delta_giou", "hflip_boxes", "hflip_deltas", "DEFAULT_SCALE_CLAMP"]

DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _corners(F, boxes):
    """Split (..., 4) boxes into four (..., 1) arrays x1, y1, x2, y2."""
    return F.split(boxes, axis=-1, num_outputs=4)


def _center_size(F, boxes):
    """(..., 4) corner boxes -> cx, cy, w, h, each (..., 1); no +1 (see :func:`encode_boxes`)."""
    x1, y1, x2, y2 = _corners(F, boxes)
    w = x2 - x1
    h = y2 - y1
    return x1 + w * 0.5, y1 + h * 0.5, w, h


def encode_boxes(F, boxes, anchors, weights=(1.0, 1.0, 1.0, 1.0), plus_one=False):
    """Regression targets that turn ``anchors`` into ``boxes``.

    The box coding of Detectron2's ``Box2BoxTransform``, and equally of GluonCV's
    ``NormalizedBoxCenterEncoder/Decoder`` and MXNet's ``contrib.box_encode/box_decode`` in
    "corner" format with ``stds = 1 / weights``::

        w  = x2 - x1          cx = x1 + 0.5 * w           (the same for anchors and boxes)
        dx = wx * (cx - cx_a) / w_a      dw = ww * log(w / w_a)      (and dy, dh likewise)

    No +1 in the widths: GluonCV's ``BBoxCornerToCenter`` has none either ("we do not have +1
    here since our nms and box iou does not"). Anchors and boxes should have positive size; a
    zero-size box gives ``-inf`` in dw/dh, as in Detectron2 and GluonCV.

    Args:
        boxes: (..., 4) xyxy targets.
        anchors: (..., 4) xyxy reference boxes; broadcast with ``boxes`` on the leading axes.
        weights: (wx, wy, ww, wh).
        plus_one: accepted for a uniform signature; does not change the result.

    Returns:
        (..., 4) deltas ``(dx, dy, dw, dh)``.
    """
    del plus_one
    wx, wy, ww, wh = [float(w) for w in weights]
    gx, gy, gw, gh = _center_size(F, boxes)
    ax, ay, aw, ah = _center_size(F, anchors)
    dx = F.broadcast_div(F.broadcast_sub(gx, ax), aw) * wx
    dy = F.broadcast_div(F.broadcast_sub(gy, ay), ah) * wy
    dw = F.log(F.broadcast_div(gw, aw)) * ww
    dh = F.log(F.broadcast_div(gh, ah)) * wh
    return F.concat(dx, dy, dw, dh, dim=-1)


def decode_boxes(F, deltas, anchors, weights=(1.0, 1.0, 1.0, 1.0), plus_one=False,
                 scale_clamp=DEFAULT_SCALE_CLAMP):
    """Apply ``deltas`` to ``anchors``: the inverse of :func:`encode_boxes`::

        cx = dx / wx * w_a + cx_a,   w = exp(min(dw / ww, scale_clamp)) * w_a,
        x1 = cx - 0.5 * w,   x2 = cx + 0.5 * w                          (and y likewise)

    The deltas are multiplied by ``1 / weights`` (GluonCV's ``stds``) rather than divided by
    the weights: bit-exact with GluonCV's decoder, and within 1 ulp of Detectron2's division.
    dw and dh are clamped from above at ``scale_clamp`` (Detectron2: log(1000/16); GluonCV's
    FPN models: 4.42); ``None`` or a value <= 0 disables the clamp, as ``clip=-1`` does for
    ``contrib.box_decode``. No +1 either way.

    Args:
        deltas: (..., 4) ``(dx, dy, dw, dh)``.
        anchors: (..., 4) xyxy; broadcast with ``deltas`` on the leading axes (e.g. deltas
            (B, N, 4) with anchors (1, N, 4)).
        weights: (wx, wy, ww, wh).
        plus_one: True makes the result bit-exact with GluonCV's
            ``contrib.box_decode(..., format='corner')`` (std_i = 1 / weight_i): that op
            evaluates exp in double precision, so exp is computed in float64 (float32 in,
            float32 out). Otherwise exp runs in the input dtype.
        scale_clamp: the upper bound of dw / ww and dh / wh before exp.

    Returns:
        (..., 4) boxes xyxy.
    """
    wx, wy, ww, wh = [float(w) for w in weights]
    ax, ay, aw, ah = _center_size(F, anchors)
    d = F.split(deltas, axis=-1, num_outputs=4)
    # same operation order as contrib.box_decode: (d * std) * w_a + cx_a
    ox = F.broadcast_add(F.broadcast_mul(d[0] * (1.0 / wx), aw), ax)
    oy = F.broadcast_add(F.broadcast_mul(d[1] * (1.0 / wy), ah), ay)
    dw = d[2] * (1.0 / ww)
    dh = d[3] * (1.0 / wh)
    if scale_clamp is not None and scale_clamp > 0:
        dw = F.minimum(dw, float(scale_clamp))
        dh = F.minimum(dh, float(scale_clamp))
    if plus_one:
        dw = F.cast(F.exp(F.cast(dw, dtype="float64")), dtype="float32")
        dh = F.cast(F.exp(F.cast(dh, dtype="float64")), dtype="float32")
    else:
        dw = F.exp(dw)
        dh = F.exp(dh)
    ow = F.broadcast_mul(dw, aw) * 0.5
    oh = F.broadcast_mul(dh, ah) * 0.5
    return F.concat(F.broadcast_sub(ox, ow), F.broadcast_sub(oy, oh),
                    F.broadcast_add(ox, ow), F.broadcast_add(oy, oh), dim=-1)


def clip_boxes(F, boxes, im_info, plus_one=False):
    """Clip boxes into their image: x to [0, w], y to [0, h].

    Computed as ``min(max(box, 0), (w, h, w, h))`` like GluonCV's ``BBoxClipToImage`` (which
    clips to the unpadded image tensor's W and H, without -1). +-inf are clipped to the bounds;
    NaN coordinates stay NaN.

    Args:
        boxes: (B, ..., 4) xyxy.
        im_info: (B, 3) = (h, w, scale): the valid (resized, unpadded) size of each image.
        plus_one: accepted for a uniform signature; does not change the result.

    Returns:
        boxes of the input shape.
    """
    del plus_one
    hw = F.slice_axis(im_info, axis=1, begin=0, end=2)                  # (B, 2) = (h, w)
    bounds = F.tile(F.reverse(hw, axis=1), reps=(1, 2))                 # (B, 4) = (w, h, w, h)
    flat = F.reshape(boxes, (0, -1, 4))                                 # (B, N, 4)
    clipped = F.broadcast_minimum(F.maximum(flat, 0.0), F.expand_dims(bounds, axis=1))
    return F.reshape_like(clipped, boxes)


def generalized_iou(F, a, b, eps=1e-7):
    """Generalized IoU (Rezatofighi et al. 2019) of box pairs, elementwise:
    ``IoU - (|C| - |A u B|) / |C|`` with C the smallest box enclosing both; in [-1, 1], 1 only
    for equal boxes.

    Args:
        a, b: (..., 4) xyxy boxes of positive size, paired elementwise.
        eps: guards the divisions.

    Returns:
        (...) the GIoU of each pair.
    """
    ax1, ay1, ax2, ay2 = F.split(a, axis=-1, num_outputs=4, squeeze_axis=True)
    bx1, by1, bx2, by2 = F.split(b, axis=-1, num_outputs=4, squeeze_axis=True)
    inter = (F.relu(F.minimum(ax2, bx2) - F.maximum(ax1, bx1))
             * F.relu(F.minimum(ay2, by2) - F.maximum(ay1, by1)))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    hull = (F.maximum(ax2, bx2) - F.minimum(ax1, bx1)) * (F.maximum(ay2, by2) - F.minimum(ay1, by1))
    return inter / (union + eps) - (hull - union) / (hull + eps)


def delta_giou(F, deltas, target_deltas, weights=(1.0, 1.0, 1.0, 1.0),
               scale_clamp=DEFAULT_SCALE_CLAMP):
    """:func:`generalized_iou` of the boxes that two sets of deltas make of the same reference
    box. GIoU does not change under a shift or an axis-wise scaling of both boxes, so it is that
    of the two boxes decoded against the unit box (0, 0, 1, 1), whatever the reference box: the
    box head's GIoU loss needs only its deltas and targets (Detectron2 decodes both against the
    proposals).

    Args:
        deltas, target_deltas: (..., 4) ``(dx, dy, dw, dh)``, paired elementwise.
        weights, scale_clamp: as in :func:`decode_boxes`.

    Returns:
        (...) the GIoU of each pair.
    """
    corner = F.slice_axis(deltas, axis=-1, begin=0, end=2)
    unit = F.concat(F.zeros_like(corner), F.ones_like(corner), dim=-1)
    return generalized_iou(F, decode_boxes(F, deltas, unit, weights, scale_clamp=scale_clamp),
                           decode_boxes(F, target_deltas, unit, weights, scale_clamp=scale_clamp))


def hflip_boxes(F, boxes, width):
    """Mirror boxes left to right in an image ``width`` pixels wide.

    ``x1' = W - x2``, ``x2' = W - x1``; y unchanged. Continuous coordinates: pixel column ``i``
    of the mirrored image is column ``W - 1 - i`` of the image, so a coordinate ``x`` (pixel
    edges, pixel ``i`` centred at ``i + 0.5``) becomes ``W - x`` (the data loader's flip,
    data/transforms.py, is the same map). Applied twice it gives the boxes back.

    Args:
        boxes: (..., 4) xyxy.
        width: W, a number or an array that broadcasts against ``(..., 1)``, e.g. shape (1,).

    Returns:
        (..., 4) the mirrored boxes.
    """
    x1, y1, x2, y2 = F.split(boxes, axis=-1, num_outputs=4)
    if isinstance(width, (int, float)):
        return F.concat(width - x2, y1, width - x1, y2, dim=-1)
    return F.concat(F.broadcast_sub(width, x2), y1, F.broadcast_sub(width, x1), y2, dim=-1)


def hflip_deltas(F, deltas):
    """Mirror box deltas: ``dx`` changes sign, the rest stays.

    The deltas that take box ``b`` to ``t`` take ``hflip_boxes(b)`` to ``hflip_boxes(t)`` once
    mirrored: ``decode_boxes(hflip_deltas(d), hflip_boxes(b)) == hflip_boxes(decode_boxes(d, b))``
    (the centre offset mirrors, the log-sizes do not).

    Args:
        deltas: (N, 4k), k sets of ``(dx, dy, dw, dh)`` (e.g. one per class).

    Returns:
        (N, 4k) the mirrored deltas.
    """
    d = F.reshape(deltas, (0, -1, 4))                                   # (N, k, 4)
    dx = F.slice_axis(d, axis=-1, begin=0, end=1)
    rest = F.slice_axis(d, axis=-1, begin=1, end=4)
    return F.reshape(F.concat(-dx, rest, dim=-1), (0, -1))


def box_area(F, boxes, plus_one=False):
    """Areas ``(x2 - x1 + p) * (y2 - y1 + p)``, p = 1 if plus_one else 0.

    The one function here where ``plus_one`` changes the result: GluonCV's "+1" is in box
    sizes (the RPN's min-size test, the FPN level assignment). Not clamped: an inverted box has
    a negative or sign-flipped "area", as in Detectron2's ``Boxes.area()`` and GluonCV's level
    assignment.

    Args:
        boxes: (..., 4) xyxy.
        plus_one: add 1 to the width and height (GluonCV / Detectron1).

    Returns:
        (...) the areas; the last axis is removed.
    """
    x1, y1, x2, y2 = F.split(boxes, axis=-1, num_outputs=4, squeeze_axis=True)
    p = 1.0 if plus_one else 0.0
    return (x2 - x1 + p) * (y2 - y1 + p)


def pairwise_iou(F, a, b, plus_one=False):
    """IoU of every box of ``a`` with every box of ``b``, per image.

    No cross-image pairs, unlike ``contrib.box_iou`` on 3-d inputs, but ``contrib.box_iou``'s
    rules: widths x2 - x1 (no +1, as in GluonCV), an inverted box has area 0, and a pair whose
    intersection is 0 has IoU 0 (never NaN).

    Args:
        a: (B, N, 4) xyxy.
        b: (B, M, 4) xyxy.
        plus_one: accepted for a uniform signature; does not change the result.

    Returns:
        (B, N, M) IoU.
    """
    del plus_one
    ax1, ay1, ax2, ay2 = F.split(F.expand_dims(a, axis=2), axis=-1, num_outputs=4,
                                 squeeze_axis=True)                     # (B, N, 1) each
    bx1, by1, bx2, by2 = F.split(F.expand_dims(b, axis=1), axis=-1, num_outputs=4,
                                 squeeze_axis=True)                     # (B, 1, M) each
    iw = F.relu(F.broadcast_sub(F.broadcast_minimum(ax2, bx2), F.broadcast_maximum(ax1, bx1)))
    ih = F.relu(F.broadcast_sub(F.broadcast_minimum(ay2, by2), F.broadcast_maximum(ay1, by1)))
    inter = iw * ih                                                     # (B, N, M)

    def _area(x1, y1, x2, y2):
        w = x2 - x1
        h = y2 - y1
        return (w * h) * ((w >= 0) * (h >= 0))

    union = F.broadcast_sub(F.broadcast_add(_area(ax1, ay1, ax2, ay2), _area(bx1, by1, bx2, by2)),
                            inter)
    iou = inter / F.maximum(union, 1e-12)
    return F.where(inter > 0, iou, F.zeros_like(iou))

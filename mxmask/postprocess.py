"""Post-processing of one image's network outputs: pasted masks, decoded keypoints, COCO entries.

Coordinates follow DEVELOPING.md ("Coordinates and labels"): boxes are ``(x1, y1, x2, y2)`` in
continuous pixel coordinates (pixel ``i`` covers ``[i, i + 1)``, its centre is ``i + 0.5``);
keypoints are ``(x, y, v)`` in the same frame. All functions here work on numpy arrays
(``mx.nd`` arrays are converted).

Inputs (one image, ``D = test.max_dets`` rows, padded rows have ``ids == -1``)::

    ids       (D,)            contiguous class labels 0..C-1, -1 for padding
    scores    (D,)
    boxes     (D, 4)          xyxy in network-input (resized) coordinates
    masks     (D, M, M)       mask probabilities, M = 28                       (optional)
    keypoints (D, K, 3)       (x, y, score) in network-input coordinates       (optional)
    heatmaps  (D, K, S, S)    keypoint logits, S = 56                          (optional)
    im_info   (3,)            (h, w, scale): valid resized size, resized/original
    orig_size (2,)            (height, width) of the original image

Output: COCO result dicts in original-image coordinates (:func:`detections_to_coco`), made with
:func:`paste_masks_in_image`, :func:`mask_extents` and :func:`decode_keypoints`.
"""
import math

import cv2
import numpy as np
import pycocotools.mask as mask_util

__all__ = ["paste_masks_in_image", "mask_extents", "heatmaps_to_keypoints_bicubic",
           "heatmaps_to_keypoints_taylor", "decode_keypoints", "detections_to_coco"]

KEYPOINT_DECODERS = ("bicubic", "taylor", "torchvision")
OUTPUT_KEYS = ("ids", "scores", "boxes", "masks", "keypoints", "heatmaps")


def _np(x):
    """numpy view of an ``mx.nd.NDArray`` / array-like."""
    if hasattr(x, "asnumpy"):
        return x.asnumpy()
    return np.asarray(x)


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------
def _interp_matrix(coords, start, length, m):
    """Bilinear weights from image pixels to one axis of the mask grid.

    ``coords``: integer pixel indices (P,); the box covers ``[start, start + length)`` on this
    axis and the mask has ``m`` cells. Returns ``(P, m)`` float64 where row ``p`` holds the
    weights of the two grid cells around ``(coords[p] + 0.5 - start) / length * m - 0.5``;
    neighbours outside ``[0, m)`` are dropped (zero padding).
    """
    g = (coords + 0.5 - start) / length * m - 0.5
    j0 = np.floor(g)
    frac = g - j0
    j0 = j0.astype(np.int64)
    rows = np.arange(len(coords))
    w = np.zeros((len(coords), m), np.float64)
    lo = (j0 >= 0) & (j0 < m)
    w[rows[lo], j0[lo]] = 1.0 - frac[lo]
    hi = (j0 + 1 >= 0) & (j0 + 1 < m)
    w[rows[hi], j0[hi] + 1] = frac[hi]
    return w


def _support(lo, hi, m, size):
    """Integer pixel range ``[a, b)`` (clipped to ``[0, size)``) whose centres can read a
    non-zero sample of a mask spanning ``[lo, hi)`` with ``m`` cells: half a cell beyond the box
    on each side (plus one pixel of slack, which only adds exact zeros)."""
    half = 0.5 * (hi - lo) / m
    a = int(max(math.floor(lo - half - 0.5), 0))
    b = int(min(math.ceil(hi + half - 0.5) + 1, size))
    return a, b


def paste_masks_in_image(masks, boxes, height, width, threshold=0.5, box_threshold=None,
                         style="detectron2"):
    """Paste ``(N, Mh, Mw)`` mask probabilities into ``(N, height, width)`` image masks.

    ``style="detectron2"``: aligned bilinear sampling as Detectron2: image pixel centre
    ``x + 0.5`` maps to mask-grid coordinate ``(x + 0.5 - x1) / (x2 - x1) * M - 0.5``; samples
    outside the ``M x M`` grid read zero; the mask is ``prob >= threshold``. Bilinear
    interpolation is separable, so each detection's crop is ``Wy @ mask @ Wx.T`` with sparse (2
    weights a row) interpolation matrices restricted to the pixels the mask can reach.

    ``style="torchvision"`` pastes as torchvision's ``paste_masks_in_image`` (``test.mask_paste``):
    the grid padded by one zero cell, the box expanded by that cell in float32 and truncated to
    whole pixels, the padded grid resized bilinearly (align_corners=False) to the box's
    ``x2 - x1 + 1`` by ``y2 - y1 + 1`` pixels, and the mask is ``prob > threshold``.

    Args:
        masks: ``(N, Mh, Mw)`` probabilities.
        boxes: ``(N, 4)`` xyxy in the image's continuous pixel coordinates; they may lie partly
            outside the image and be fractional. Boxes with ``x2 <= x1``, ``y2 <= y1`` or
            non-finite coordinates give empty masks.
        height, width: the image's size.
        threshold: the mask threshold; None returns the probabilities.
        box_threshold: when given, also the tight boxes of the pasted probabilities at this
            threshold (:func:`mask_extents`), computed on each crop (no (N, H, W) float buffer).
        style: ``detectron2`` or ``torchvision``.

    Returns:
        bool ``(N, H, W)`` masks, or float32 probabilities when ``threshold`` is None; with
        ``box_threshold`` ``(masks, tight (N, 4), found (N,))``. The array is a transposed view
        of a C-ordered ``(N, W, H)`` buffer, so that ``out.transpose(1, 2, 0)`` is
        Fortran-contiguous ``(H, W, N)``, the layout ``pycocotools.mask.encode`` takes, with no
        copy.

    Raises:
        ValueError: ``masks`` and ``boxes`` do not match, or an unknown ``style``.
    """
    masks = _np(masks)
    boxes = _np(boxes).astype(np.float64).reshape(-1, 4)
    if masks.ndim != 3 or masks.shape[0] != boxes.shape[0]:
        raise ValueError("paste_masks_in_image: masks %s and boxes %s do not match"
                         % (masks.shape, boxes.shape))
    height, width = int(height), int(width)
    n, mh, mw = masks.shape
    dtype = np.float32 if threshold is None else np.bool_
    buf = np.zeros((n, width, height), dtype)
    tight, found = np.zeros((n, 4)), np.zeros(n, np.bool_)
    if style not in ("detectron2", "torchvision"):
        raise ValueError("paste_masks_in_image: unknown style %r" % (style,))
    crops = _torchvision_crops if style == "torchvision" else _detectron2_crops
    above = np.greater if style == "torchvision" else np.greater_equal
    for i, xa, xb, ya, yb, crop_t in crops(masks, boxes, height, width):
        if box_threshold is not None:
            box, hit = mask_extents(crop_t.T[None], box_threshold)
            if hit[0]:
                tight[i], found[i] = box[0] + (xa, ya, xa, ya), True
        if threshold is None:
            buf[i, xa:xb, ya:yb] = crop_t
        else:
            buf[i, xa:xb, ya:yb] = above(crop_t, threshold)
    pasted = buf.transpose(0, 2, 1)
    return pasted if box_threshold is None else (pasted, tight, found)


def _detectron2_crops(masks, boxes, height, width):
    """Yield ``(i, xa, xb, ya, yb, crop (xb - xa, yb - ya))`` of each pasted mask with pixels in
    the image: aligned bilinear sampling of the grid (:func:`paste_masks_in_image`), zero outside
    it.
    """
    _, mh, mw = masks.shape
    for i in range(len(boxes)):
        x1, y1, x2, y2 = boxes[i]
        if not (np.isfinite(boxes[i]).all() and x2 > x1 and y2 > y1):
            continue
        xa, xb = _support(x1, x2, mw, width)
        ya, yb = _support(y1, y2, mh, height)
        if xb <= xa or yb <= ya:
            continue
        wx = _interp_matrix(np.arange(xa, xb), x1, x2 - x1, mw)
        wy = _interp_matrix(np.arange(ya, yb), y1, y2 - y1, mh)
        # (w, Mw) @ (Mw, Mh) @ (Mh, h): the crop already transposed to the buffer's layout
        yield i, xa, xb, ya, yb, wx @ masks[i].astype(np.float64).T @ wy.T


def _torchvision_crops(masks, boxes, height, width):
    """The same as :func:`_detectron2_crops` by torchvision's paste (``paste_masks_in_image``
    with padding 1, ``expand_boxes``, ``paste_mask_in_image``), in its float32 arithmetic."""
    _, m, _ = masks.shape
    b = boxes.astype(np.float32)
    scale = np.float32(m + 2) / np.float32(m)
    half_w = (b[:, 2] - b[:, 0]) * np.float32(0.5) * scale
    half_h = (b[:, 3] - b[:, 1]) * np.float32(0.5) * scale
    cx = (b[:, 2] + b[:, 0]) * np.float32(0.5)
    cy = (b[:, 3] + b[:, 1]) * np.float32(0.5)
    expanded = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)
    padded = np.zeros((m + 2, m + 2), np.float32)
    for i in range(len(boxes)):
        if not np.isfinite(expanded[i]).all():
            continue
        x0, y0, x1, y1 = (int(v) for v in expanded[i])       # truncation, as .to(int64)
        xa, xb = max(x0, 0), min(x1 + 1, width)
        ya, yb = max(y0, 0), min(y1 + 1, height)
        if xb <= xa or yb <= ya:
            continue
        padded[1:-1, 1:-1] = masks[i]
        resized = cv2.resize(padded, (max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)),
                             interpolation=cv2.INTER_LINEAR)
        yield i, xa, xb, ya, yb, resized[ya - y0:yb - y0, xa - x0:xb - x0].T


def mask_extents(probs, threshold):
    """Tight boxes of pasted masks.

    Args:
        probs: ``(N, H, W)`` pasted mask probabilities.
        threshold: the probability a pixel must reach.

    Returns:
        ``(boxes (N, 4), found (N,) bool)``: the tight xyxy box, in continuous pixel coordinates,
        of each mask's pixels ``>= threshold`` (pixel ``(r, c)`` covers ``[c, c + 1) x [r, r +
        1)``, COCO's ``toBbox`` of the same mask); ``found`` is False, and the box zeros, where
        no pixel reaches it.
    """
    on = np.asarray(probs) >= threshold
    n, h, w = on.shape
    cols, rows = on.any(axis=1), on.any(axis=2)                            # (N, W), (N, H)
    found = cols.any(axis=1)
    boxes = np.stack([cols.argmax(axis=1), rows.argmax(axis=1),
                      w - cols[:, ::-1].argmax(axis=1), h - rows[:, ::-1].argmax(axis=1)],
                     axis=1).astype(np.float64)
    boxes[~found] = 0.0
    return boxes, found


# --------------------------------------------------------------------------------------------
# Keypoints
# --------------------------------------------------------------------------------------------
def _box_frame(boxes):
    """Offsets and sizes of ``(N, 4)`` boxes; sizes clamped to >= 1 (Detectron2), non-finite
    boxes become a unit box at the origin so that decoding never fails."""
    boxes = _np(boxes).astype(np.float64).reshape(-1, 4)
    finite = np.isfinite(boxes).all(axis=1)
    boxes = np.where(finite[:, None], boxes, np.array([0.0, 0.0, 1.0, 1.0]))
    widths = np.maximum(boxes[:, 2] - boxes[:, 0], 1.0)
    heights = np.maximum(boxes[:, 3] - boxes[:, 1], 1.0)
    return boxes[:, 0], boxes[:, 1], widths, heights


def heatmaps_to_keypoints_bicubic(heatmaps, boxes):
    """Mask R-CNN's decoder: resize each roi's heatmaps bicubically to the box size, argmax.

    Each roi's maps are resized (``cv2.INTER_CUBIC``: half-pixel centres, a = -0.75, as torch's
    bicubic with align_corners=False) to ``ceil(h) x ceil(w)`` of the box (sizes clamped to
    >= 1); the argmax cell ``(xi, yi)`` maps to ``x1 + (xi + 0.5) * w / ceil(w)``.

    Args:
        heatmaps: ``(N, K, Sh, Sw)`` logits.
        boxes: ``(N, 4)`` xyxy.

    Returns:
        float32 ``(N, K, 3)`` ``(x, y, score)`` in the boxes' frame, score the resized logit at
        the peak.
    """
    heatmaps = np.ascontiguousarray(_np(heatmaps), dtype=np.float32)
    n, k = heatmaps.shape[:2]
    out = np.zeros((n, k, 3), np.float32)
    if n == 0 or k == 0:
        return out
    x1, y1, widths, heights = _box_frame(boxes)
    wc = np.ceil(widths).astype(np.int64)
    hc = np.ceil(heights).astype(np.int64)
    xi = np.zeros(k, np.int64)
    yi = np.zeros(k, np.int64)
    for i in range(n):  # each roi has its own output size: cv2 calls per roi and keypoint
        size = (int(wc[i]), int(hc[i]))
        for j in range(k):  # resize + minMaxLoc per channel beats a numpy argmax over (h*w, K)
            _, peak, _, (xi[j], yi[j]) = cv2.minMaxLoc(
                cv2.resize(heatmaps[i, j], size, interpolation=cv2.INTER_CUBIC))
            out[i, j, 2] = peak
        out[i, :, 0] = x1[i] + (xi + 0.5) * (widths[i] / wc[i])
        out[i, :, 1] = y1[i] + (yi + 0.5) * (heights[i] / hc[i])
    return out


def heatmaps_to_keypoints_taylor(heatmaps, boxes):
    """Argmax on the heatmap plus a second-order Taylor step for a sub-cell offset.

    At the argmax cell ``(px, py)`` the gradient ``g`` and Hessian ``H`` are central finite
    differences; the offset ``-H^-1 g`` (each component clamped to [-1, 1]) is used when the
    peak is not on the border and ``H`` is negative definite, else the offset is 0. The cell maps
    into the box as ``x1 + (px + 0.5 + dx) / Sw * w`` (sizes clamped to >= 1 like the bicubic
    decoder). Fully vectorised over N and K.

    Args:
        heatmaps: ``(N, K, Sh, Sw)`` logits.
        boxes: ``(N, 4)`` xyxy.

    Returns:
        float32 ``(N, K, 3)`` ``(x, y, score)`` in the boxes' frame, score the logit at the
        argmax cell.
    """
    hm = _np(heatmaps)
    if hm.dtype not in (np.float32, np.float64):
        hm = hm.astype(np.float32)
    n, k, sh, sw = hm.shape
    out = np.zeros((n, k, 3), np.float32)
    if n == 0 or k == 0:
        return out
    flat = hm.reshape(n * k, sh * sw)
    idx = flat.argmax(axis=1)                 # the first NaN when a map has one: redo those
    bad = np.flatnonzero(np.isnan(flat[np.arange(n * k), idx]))
    if bad.size:
        idx[bad] = np.where(np.isnan(flat[bad]), -np.inf, flat[bad]).argmax(axis=1)
    py, px = np.divmod(idx, sw)
    rows = np.arange(n * k)
    score = flat[rows, idx]
    maps = hm.reshape(n * k, sh, sw)
    interior = (px >= 1) & (px <= sw - 2) & (py >= 1) & (py <= sh - 2)
    cx = np.clip(px, 1, max(sw - 2, 1)) if sw >= 3 else px
    cy = np.clip(py, 1, max(sh - 2, 1)) if sh >= 3 else py
    if sw >= 3 and sh >= 3:
        def at(dy, dx):
            return maps[rows, cy + dy, cx + dx].astype(np.float64)
        c = at(0, 0)
        left, right, up, down = at(0, -1), at(0, 1), at(-1, 0), at(1, 0)
        gx = 0.5 * (right - left)
        gy = 0.5 * (down - up)
        hxx = right - 2.0 * c + left
        hyy = down - 2.0 * c + up
        hxy = 0.25 * (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1))
        det = hxx * hyy - hxy * hxy
        ok = interior & (hxx < 0) & (det > 0) & np.isfinite(det)
        safe = np.where(ok, det, 1.0)
        # -H^-1 g with H^-1 = [[hyy, -hxy], [-hxy, hxx]] / det
        ox = np.where(ok, -(hyy * gx - hxy * gy) / safe, 0.0)
        oy = np.where(ok, -(hxx * gy - hxy * gx) / safe, 0.0)
        ox = np.clip(ox, -1.0, 1.0)
        oy = np.clip(oy, -1.0, 1.0)
    else:
        ox = oy = np.zeros(n * k)
    x1, y1, widths, heights = _box_frame(boxes)
    xs = (px + 0.5 + ox).reshape(n, k) / sw * widths[:, None] + x1[:, None]
    ys = (py + 0.5 + oy).reshape(n, k) / sh * heights[:, None] + y1[:, None]
    out[:, :, 0] = xs
    out[:, :, 1] = ys
    out[:, :, 2] = score.reshape(n, k)
    return out


def decode_keypoints(heatmaps, boxes, method="taylor", network_boxes=None, scale=(1.0, 1.0)):
    """Keypoints of heatmaps, by ``test.keypoint_decode``.

    ``bicubic`` and ``taylor`` decode each roi's heatmaps in ``boxes`` directly.
    ``torchvision`` (its ``heatmaps_to_keypoints`` runs before the resize is undone) decodes
    bicubically in ``network_boxes``, the same boxes in network-input pixels, and divides x and
    y by ``scale``.

    Args:
        heatmaps: ``(N, K, S, S)`` logits.
        boxes: ``(N, 4)`` xyxy, the frame of the result.
        method: ``bicubic``, ``taylor`` or ``torchvision``.
        network_boxes: ``(N, 4)``, needed by ``torchvision``.
        scale: (sx, sy), the per-axis resize factors (network input / original).

    Returns:
        float32 ``(N, K, 3)`` ``(x, y, score)`` in the frame of ``boxes``.

    Raises:
        ValueError: an unknown ``method``, or ``torchvision`` without ``network_boxes``.
    """
    if method == "bicubic":
        return heatmaps_to_keypoints_bicubic(heatmaps, boxes)
    if method == "taylor":
        return heatmaps_to_keypoints_taylor(heatmaps, boxes)
    if method == "torchvision":
        if network_boxes is None:
            raise ValueError("keypoint_decode 'torchvision' needs the network-input boxes")
        kpts = heatmaps_to_keypoints_bicubic(heatmaps, network_boxes)
        kpts[:, :, 0] /= np.float32(scale[0])
        kpts[:, :, 1] /= np.float32(scale[1])
        return kpts
    raise ValueError("keypoint_decode must be one of %s, got %r" % (KEYPOINT_DECODERS, method))


# --------------------------------------------------------------------------------------------
# COCO result entries
# --------------------------------------------------------------------------------------------
def _squeeze_batch(outputs):
    """Accept one image's outputs with or without a leading batch axis of 1."""
    arrays = {key: _np(outputs[key]) for key in OUTPUT_KEYS
              if key in outputs and outputs[key] is not None}
    if "ids" not in arrays or "scores" not in arrays or "boxes" not in arrays:
        raise ValueError("detections_to_coco: outputs need ids, scores and boxes, got %s"
                         % sorted(arrays))
    if arrays["ids"].ndim == 2:
        if arrays["ids"].shape[0] != 1:
            raise ValueError("detections_to_coco takes one image's outputs, got a batch of %d"
                             % arrays["ids"].shape[0])
        arrays = {key: value[0] for key, value in arrays.items()}
    return arrays


def detections_to_coco(outputs, im_info, orig_size, image_id, category_ids, score_thresh=0.0,
                       mask_thresh=0.5, keypoint_decode="taylor", keypoint_category_ids=None,
                       file_name=None, mask_box_thresh=0.0, mask_paste="detectron2",
                       keypoint_offset=0.5, unused_labels=()):
    """One image's network outputs -> COCO result dicts in original-image coordinates.

    Boxes are mapped back per axis by ``w / width`` and ``h / height`` (the exact ratios of the
    resize; ``scale`` is used when ``h``/``w`` are not positive). They are written in continuous
    coordinates whatever ``model.box_plus_one`` (that flag is the network's box coding): ``bbox``
    is ``[x1, y1, x2 - x1, y2 - y1]`` and masks are pasted over ``[x1, x2)``, which is how
    GluonCV's COCO instance evaluation, the one behind its Mask R-CNN APs, writes its
    ``x2 - x1 + 1``-coded boxes (``utils/metrics/coco_instance.py``;
    ``data/transforms/mask.fill``); Detectron2 and torchvision write them so too. (GluonCV's
    box-only ``COCODetectionMetric`` adds 1 to w and h.) ``scripts/predict_exported.py`` uses
    the same convention.

    ``mask_box_thresh`` > 0 (``test.mask_box_thresh``, with masks): each ``bbox`` becomes the
    tight box of its pasted mask probability ``>= mask_box_thresh`` (:func:`mask_extents`; the
    network's box where no pixel reaches it). COCO's box of an object is the tight box of its
    segmentation, and a threshold under ``mask_thresh`` keeps the thin points and limbs the
    mask thresholded at ``mask_thresh`` loses. The mask is pasted, and keypoints decoded, in the
    network's box either way.

    Args:
        outputs: dict with ``ids``, ``scores``, ``boxes`` and optionally ``masks``,
            ``keypoints``, ``heatmaps`` (module docstring; a leading batch axis of 1 is
            accepted).
        im_info: ``(h, w, scale)``.
        orig_size: ``(height, width)`` of the original image.
        image_id: the entries' ``image_id``; a str gives ``file_name`` entries instead
            (``mxmask predict`` on arbitrary files).
        category_ids: ``category_ids[label]`` is the COCO id of a label.
        score_thresh: rows with ``id < 0``, ``score < score_thresh`` or a label in
            ``unused_labels`` are dropped.
        mask_thresh: the paste threshold of ``segmentation``.
        keypoint_decode: the decoder of ``heatmaps`` (:func:`decode_keypoints`).
        keypoint_category_ids: when given, only detections of those COCO categories get
            keypoints.
        file_name: when given, the entries carry it instead of ``image_id``.
        mask_box_thresh: see above; 0 keeps the network's boxes.
        mask_paste: the paste style (:func:`paste_masks_in_image`).
        keypoint_offset: ``data.keypoint_offset``, subtracted from the keypoints to give COCO's
            integer pixel indices.
        unused_labels: label indices with no category, such as torchvision's unused COCO ids.

    Returns:
        list of dicts: ``image_id`` (or ``file_name``), ``category_id``, ``bbox`` as ``[x, y,
        w, h]``, ``score``; ``segmentation`` (with ``masks``) as compressed RLE with ``str``
        counts; ``keypoints`` (with ``heatmaps``, decoded, else from ``keypoints`` rescaled)
        flat ``[x, y, 2, ...]``, every keypoint with ``v = 2``.

    Raises:
        ValueError: outputs without ids, scores or boxes, a batch of several images, a bad
        ``im_info``, or a label without a category id.
    """
    out = _squeeze_batch(outputs)
    ids = out["ids"].reshape(-1)
    scores = out["scores"].reshape(-1).astype(np.float64)
    boxes = out["boxes"].reshape(-1, 4).astype(np.float64)
    keep = np.flatnonzero((ids >= 0) & (scores >= score_thresh) & np.isfinite(scores)
                          & ~np.isin(ids, np.asarray(unused_labels, np.float64)))
    height, width = int(orig_size[0]), int(orig_size[1])
    im_h, im_w, scale = (float(v) for v in _np(im_info).reshape(-1)[:3])
    sx = im_w / width if im_w > 0 and width > 0 else scale
    sy = im_h / height if im_h > 0 and height > 0 else scale
    if not (sx > 0 and sy > 0):
        raise ValueError("detections_to_coco: bad im_info %s for size %s" % (im_info, orig_size))
    factor = np.array([sx, sy, sx, sy])

    labels = ids[keep].astype(np.int64)
    category_ids = list(category_ids)
    if len(labels) and labels.max() >= len(category_ids):
        raise ValueError("detections_to_coco: label %d but only %d category ids"
                         % (labels.max(), len(category_ids)))
    cats = np.asarray(category_ids, np.int64)[labels] if len(labels) else np.zeros(0, np.int64)
    boxes = boxes[keep] / factor
    scores = scores[keep]
    extent = boxes.copy()      # continuous extent [x1, x2) used for pasting / decoding
    reported = extent          # the bbox written: the extent, or the mask's tight box

    rles = None
    if "masks" in out:
        masks = out["masks"][keep]
        if mask_box_thresh > 0:
            pasted, tight, found = paste_masks_in_image(masks, extent, height, width,
                                                        mask_thresh, mask_box_thresh, mask_paste)
            reported = np.where(found[:, None], tight, extent)
        else:
            pasted = paste_masks_in_image(masks, extent, height, width, threshold=mask_thresh,
                                          style=mask_paste)
        rles = mask_util.encode(pasted.view(np.uint8).transpose(1, 2, 0)) if len(keep) else []
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")

    kpts = None
    if "heatmaps" in out:
        kpts = decode_keypoints(out["heatmaps"][keep], extent, keypoint_decode,
                                network_boxes=out["boxes"].reshape(-1, 4)[keep], scale=(sx, sy))
    elif "keypoints" in out:
        kpts = out["keypoints"][keep].astype(np.float64).copy()
        kpts[:, :, 0] /= sx
        kpts[:, :, 1] /= sy
    if kpts is not None:
        flat = np.empty((kpts.shape[0], kpts.shape[1], 3), np.float64)
        flat[:, :, :2] = kpts[:, :, :2] - keypoint_offset   # -> COCO's integer pixel indices
        flat[:, :, 2] = 2.0
        kpt_lists = flat.reshape(len(keep), kpts.shape[1] * 3).tolist()
        kpt_cats = (None if keypoint_category_ids is None
                    else set(int(c) for c in keypoint_category_ids))

    if file_name is None and isinstance(image_id, str):
        key, value = "file_name", image_id
    elif file_name is not None:
        key, value = "file_name", str(file_name)
    else:
        key, value = "image_id", int(image_id)
    results = []
    xywh = np.concatenate([reported[:, :2], reported[:, 2:] - reported[:, :2]], axis=1)
    xywh_list, score_list, cat_list = xywh.tolist(), scores.tolist(), cats.tolist()
    for j in range(len(keep)):
        entry = {key: value, "category_id": cat_list[j], "bbox": xywh_list[j],
                 "score": score_list[j]}
        if rles is not None:
            entry["segmentation"] = rles[j]
        if kpts is not None and (kpt_cats is None or cat_list[j] in kpt_cats):
            entry["keypoints"] = kpt_lists[j]
        results.append(entry)
    return results

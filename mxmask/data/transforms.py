"""Per-image transforms and batching for training and testing (numpy and OpenCV; MXNet for the
``cubic`` test-time resize).

In:  a dataset record (DEVELOPING.md, "Dataset records") whose image file is read as HxWx3 uint8
     RGB, plus a ``numpy.random.Generator`` for the augmentation draws.
Out: a *sample* dict for training (:class:`TrainTransform`), or a tuple ``(image, im_info,
     image_id, orig_size)`` for testing (:class:`TestTransform`); :func:`batchify_train` /
     :func:`batchify_test` stack samples into the batch dicts of DEVELOPING.md ("Training
     batches": ``data``, ``im_info``, ``gt_*``, ``image_id``, ``orig_size``).

Coordinates stay continuous (pixel ``i`` covers ``[i, i+1)``) throughout: the resize scales
boxes and keypoints by the actual per-axis factors (:func:`resize_shortest_edge`), masks stay
aligned with them (:func:`resize_masks`), the flip mirrors in the same coordinates
(:func:`hflip`), and batching pads images with 0 and annotations with -1
(:func:`batchify_train`). The test-time pipeline follows ``input.resize_rule``,
``input.resize_interp`` and ``input.normalize`` (:class:`TestTransform`).
"""
import math

import numpy as np
import cv2
import pycocotools.mask as mask_util

from ..utils import UserError

# Masks are resized as 0/255 with linear interpolation; a resized pixel is on when >= this.
MASK_ON_VALUE = 255
MASK_THRESHOLD = 128


# --------------------------------------------------------------------------------------------
# Masks from COCO segmentations
# --------------------------------------------------------------------------------------------
def segmentation_to_rle(segmentation, height, width):
    """One COCO segmentation (polygon list, uncompressed or compressed RLE) -> compressed RLE.

    Polygons with fewer than 3 points are ignored (none left: an empty mask); any other type is
    a ValueError.
    """
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return mask_util.encode(np.zeros((height, width, 1), np.uint8, order="F"))[0]
        return mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation:
        if isinstance(segmentation["counts"], list):  # uncompressed RLE
            return mask_util.frPyObjects(segmentation, height, width)
        return segmentation
    raise ValueError("unsupported segmentation of type %s" % type(segmentation).__name__)


def decode_masks(segmentations, height, width):
    """Decode COCO segmentations into binary masks.

    Args:
        segmentations (list): N polygon lists or RLE dicts (:func:`segmentation_to_rle`).
        height, width (int): the image size.

    Returns:
        uint8 (N, H, W) of 0/1.
    """
    if len(segmentations) == 0:
        return np.zeros((0, height, width), np.uint8)
    rles = [segmentation_to_rle(s, height, width) for s in segmentations]
    decoded = mask_util.decode(rles)  # (H, W, N), Fortran order
    return np.ascontiguousarray(decoded.transpose(2, 0, 1))


# --------------------------------------------------------------------------------------------
# Resize
# --------------------------------------------------------------------------------------------
# input.resize_rule: how (short, max_size) becomes the resized size (:func:`resized_size`)
RESIZE_RULES = ("half_up", "gluoncv", "torchvision", "torchvision_float32")
# input.resize_interp: how the test-time image is resampled (:func:`resize_image`,
# :func:`resize_bilinear_float`)
RESIZE_INTERPS = ("linear", "cubic", "bilinear_float")
# input.normalize: the float32 arithmetic of (x / 255 - mean) / std (:func:`normalize`)
NORMALIZE_MODES = ("fused", "stepwise")


def resized_size(height, width, short, max_size, rule="half_up"):
    """The shortest-edge resize: short side ``short``, long side at most ``max_size``.

    Args:
        height, width: the image size.
        short, max_size: ``input.min_size_test`` / ``max_size_test`` (or the training ones).
        rule: one of :data:`RESIZE_RULES`, the arithmetic of a framework:

            ``half_up``: ``scale = min(short / min(h, w), max_size / max(h, w))``, sizes
            ``int(h * scale + 0.5)`` (rounded half up, as Detectron2).
            ``gluoncv``: GluonCV's ``resize_short_within(src, short, max_size, mult_base=1)``:
            ``scale = short / min(h, w)`` unless ``np.round(scale * max(h, w)) > max_size``,
            then ``max_size / max(h, w)``; sizes ``np.round(h * scale)`` (half to even).
            ``torchvision``: ``GeneralizedRCNNTransform`` in eager mode (torchvision 0.29):
            ``scale = min(short / min(h, w), max_size / max(h, w))`` in Python floats, sizes
            ``floor(h * scale)`` (``F.interpolate(scale_factor=scale,
            recompute_scale_factor=True)``). A 500x375 image gives 1066x800.
            ``torchvision_float32``: the same transform scripted or traced, where the scale is a
            float32 tensor, ``float32(1 / min(h, w)) * short`` (PyTorch's ``int / Tensor`` is a
            reciprocal then a product); a 500x375 image gives 1066x799.

    Returns:
        ``(new_h, new_w, scale)``: the resized size and the nominal factor.
    """
    if rule == "half_up":
        scale = min(float(short) / min(height, width), float(max_size) / max(height, width))
        return int(height * scale + 0.5), int(width * scale + 0.5), scale
    if rule == "gluoncv":
        size_min, size_max = (height, width) if width > height else (width, height)
        scale = float(short) / float(size_min)
        if np.round(scale * size_max) > max_size:
            scale = float(np.floor(max_size)) / float(size_max)
        return int(np.round(height * scale)), int(np.round(width * scale)), scale
    if rule == "torchvision":
        scale = min(short / min(height, width), max_size / max(height, width))
        return int(height * scale), int(width * scale), scale
    if rule == "torchvision_float32":
        f = np.float32
        scale = float(min(f(1) / f(min(height, width)) * f(short),
                          f(1) / f(max(height, width)) * f(max_size)))
        return int(math.floor(height * scale)), int(math.floor(width * scale)), scale
    raise UserError("input.resize_rule: expected one of %s, got %r"
                    % (", ".join(RESIZE_RULES), rule))


def resize_image(image, new_h, new_w, interp="linear"):
    """HxWxC uint8 -> new_h x new_w x C uint8.

    Args:
        image: the image.
        new_h, new_w: the output size (an image already of that size is returned as it is).
        interp: ``linear``: ``cv2.INTER_LINEAR`` (MXNet's ``imresize(interp=1)`` and so
            GluonCV's COCO evaluation transform give the same bytes); ``cubic``: MXNet's
            ``mx.image.imresize(..., interp=2)``, which is OpenCV's ``INTER_CUBIC`` (OpenCV's
            enum: 2 is cubic, whatever MXNet's and GluonCV's docstrings call "area") as the
            OpenCV inside MXNet computes it; that is GluonCV's ``load_test`` resize, and 4-5% of
            its pixels differ by 1 from ``cv2.resize(..., INTER_CUBIC)`` of OpenCV 4.8.

    Returns:
        The resized image.
    """
    if image.shape[:2] == (new_h, new_w):
        return image
    if interp == "linear":
        return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    if interp == "cubic":
        import mxnet as mx
        src = mx.nd.array(image, dtype=np.uint8, ctx=mx.cpu())
        return mx.image.imresize(src, int(new_w), int(new_h), interp=2).asnumpy()
    raise UserError("input.resize_interp: expected one of %s for a uint8 resize, got %r"
                    % (", ".join(RESIZE_INTERPS[:2]), interp))


def _linear_taps(size, new_size):
    """Per output index along one axis: the two source indices and their float32 weights of
    PyTorch's CPU bilinear resize (``align_corners=False``): ``scale = float32(size) /
    new_size``, source ``max(scale * (i + 0.5) - 0.5, 0)`` rounded once to float32 (PyTorch's
    kernel computes it with a fused multiply-add; the float64 product of a float32 and
    ``i + 0.5`` is exact, so one rounding reproduces it), ``i0 = floor``, ``i1 = i0 + 1``
    (``i0`` at the last index), weights ``1 - l`` and ``l``."""
    scale = np.float32(size) / np.float32(new_size)
    src = (np.float64(scale) * (np.arange(new_size) + 0.5) - 0.5).astype(np.float32)
    np.maximum(src, np.float32(0), out=src)
    i0 = np.minimum(np.floor(src).astype(np.int64), size - 1)
    lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = i0 + (i0 < size - 1)
    return i0, i1, (np.float32(1) - lam).astype(np.float32), lam


def _fma32(a, b, c):
    """float32 ``a * b + c`` rounded once, as a fused multiply-add (float64 holds the product of
    two float32 values exactly; the sum is rounded to float64 then float32, which equals one
    rounding except in ties far below what any comparison here can see)."""
    return (a.astype(np.float64) * b + c).astype(np.float32)


def resize_bilinear_float(data, new_h, new_w):
    """Float32 (C, H, W) -> (C, new_h, new_w): PyTorch's ``F.interpolate(mode="bilinear",
    align_corners=False)`` (no antialias) as its CPU kernel computes it with several threads
    (``upsample_generic_Nd_kernel_impl``): taps of :func:`_linear_taps`, along the width
    ``fma(x0, w0, x1 * w1)``, then along the height the same on the two rows. (With one thread
    and three channels PyTorch takes another kernel, whose sums round differently by an ulp.)

    Args:
        data: float32 (C, H, W), the normalised image (torchvision normalises, then resizes).
        new_h, new_w: the output size.

    Returns:
        float32 (C, new_h, new_w).
    """
    data = np.asarray(data, np.float32)
    if data.shape[1:] == (new_h, new_w):
        return data
    y0, y1, wy0, wy1 = _linear_taps(data.shape[1], new_h)
    x0, x1, wx0, wx1 = _linear_taps(data.shape[2], new_w)
    out = np.empty((data.shape[0], new_h, new_w), np.float32)
    for c in range(data.shape[0]):                      # per channel: a smaller working set
        rows = []
        for y in (y0, y1):
            r = data[c, y]                                                   # (new_h, W)
            rows.append(_fma32(r[:, x0], wx0, r[:, x1] * wx1))               # (new_h, new_w)
        out[c] = _fma32(rows[0], wy0[:, None], rows[1] * wy1[:, None])
    return out


def resize_masks(masks, new_h, new_w):
    """Resize binary masks so that they stay aligned with the scaled boxes.

    Masks are resized with ``cv2.INTER_LINEAR`` on 0/255 values and thresholded at 128 (a
    linear value >= 0.5). OpenCV's linear resize maps pixel centres the same way as the
    continuous coordinates (pixel ``i`` covers ``[i, i+1)``), so masks stay aligned with the
    boxes scaled by :func:`scale_boxes`; OpenCV's ``INTER_NEAREST`` takes ``floor(i / scale)``
    and shifts masks by up to half a source pixel.

    Args:
        masks: uint8 (N, H, W) of 0/1.
        new_h, new_w (int): the output size.

    Returns:
        uint8 (N, new_h, new_w) of 0/1 (``masks`` itself when the size is unchanged).
    """
    if masks.shape[1:] == (new_h, new_w):
        return masks
    out = np.empty((masks.shape[0], new_h, new_w), np.uint8)
    for i, mask in enumerate(masks):
        scaled = cv2.resize(mask * np.uint8(MASK_ON_VALUE), (new_w, new_h),
                            interpolation=cv2.INTER_LINEAR)
        np.greater_equal(scaled, MASK_THRESHOLD, out=out[i])
    return out


def scale_boxes(boxes, sx, sy):
    """xyxy boxes (N, 4) times the per-axis factors."""
    return (boxes * np.array([sx, sy, sx, sy], np.float32)).astype(np.float32)


def scale_keypoints(keypoints, sx, sy):
    """Keypoints (N, K, 3): x, y of labelled points times the factors; v = 0 points stay 0."""
    out = keypoints.astype(np.float32, copy=True)
    out[..., 0] *= sx
    out[..., 1] *= sy
    out[out[..., 2] <= 0] = 0.0
    return out


def resize_shortest_edge(image, short, max_size, boxes=None, masks=None, keypoints=None,
                         crowd_boxes=None):
    """Resize an image and its annotations so that the short side is ``short`` (long side capped
    at ``max_size``); the training resize.

    ``scale = min(short / min(h, w), max_size / max(h, w))`` and the new size is
    ``int(h * scale + 0.5), int(w * scale + 0.5)`` (round half up, as Detectron2), resized with
    ``cv2.INTER_LINEAR``. Because of that rounding the true factors differ slightly per axis,
    so boxes and keypoints are multiplied by the *actual* factors ``sx = new_w / w`` and
    ``sy = new_h / h``. That keeps annotations exactly on the resized pixels (an object touching
    the right border still does). ``im_info`` carries ``(new_h, new_w, scale)`` with the nominal
    ``scale``; undo the resize exactly with ``orig_size / im_info[:2]`` per axis.

    Args:
        image: uint8 (H, W, 3).
        short, max_size (int): the target short side and the cap on the long side.
        boxes: float32 (N, 4) xyxy, or None; crowd_boxes likewise (M, 4).
        masks: uint8 (N, H, W) of 0/1, or None.
        keypoints: float32 (N, K, 3), or None.

    Returns:
        dict: ``image`` uint8 (new_h, new_w, 3), ``scale`` (the nominal factor), ``sx`` / ``sy``
        (the actual per-axis factors) and ``boxes``, ``masks``, ``keypoints``, ``crowd_boxes``
        transformed (``None`` for the ones not given).
    """
    h, w = image.shape[:2]
    new_h, new_w, scale = resized_size(h, w, short, max_size)
    sx, sy = new_w / float(w), new_h / float(h)
    return {
        "image": resize_image(image, new_h, new_w),
        "scale": scale, "sx": sx, "sy": sy,
        "boxes": None if boxes is None else scale_boxes(boxes, sx, sy),
        "masks": None if masks is None else resize_masks(masks, new_h, new_w),
        "keypoints": None if keypoints is None else scale_keypoints(keypoints, sx, sy),
        "crowd_boxes": None if crowd_boxes is None else scale_boxes(crowd_boxes, sx, sy),
    }


# --------------------------------------------------------------------------------------------
# Horizontal flip
# --------------------------------------------------------------------------------------------
def flip_boxes(boxes, width):
    """Mirror xyxy boxes left-right: x1' = W - x2, x2' = W - x1.

    Args:
        boxes: float32 (N, 4) xyxy.
        width (float): the image width W.

    Returns:
        float32 (N, 4).
    """
    out = boxes.astype(np.float32, copy=True)
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def flip_keypoints(keypoints, width, flip_map=None):
    """Mirror keypoints: x' = W - x for labelled points, then left/right swapped.

    Args:
        keypoints: float32 (N, K, 3).
        width (float): the image width W.
        flip_map (list[int] or None): ``flip_map[k]`` is the index of keypoint k's mirror image
            (k itself for central points), so ``new[k] = old[flip_map[k]]``; empty or None
            means no swap. ValueError when its length is not K.

    Returns:
        float32 (N, K, 3); unlabelled points (v = 0) are (0, 0, 0).
    """
    out = keypoints.astype(np.float32, copy=True)
    labelled = out[..., 2] > 0
    out[..., 0] = np.where(labelled, width - out[..., 0], 0.0)
    out[~labelled] = 0.0
    if flip_map is not None and len(flip_map):
        if len(flip_map) != out.shape[1]:
            raise ValueError("keypoint flip map has %d entries for %d keypoints"
                             % (len(flip_map), out.shape[1]))
        out = out[:, np.asarray(flip_map, np.int64), :]
    return out


def hflip(image, boxes=None, masks=None, keypoints=None, crowd_boxes=None, flip_map=None):
    """Mirror an image and its annotations left-right, in continuous coordinates.

    Boxes become ``x1' = W - x2``, ``x2' = W - x1`` (:func:`flip_boxes`); labelled keypoints
    ``x' = W - x``, their left/right indices then swapped with the flip map
    (:func:`flip_keypoints`); unlabelled keypoints (``v = 0``) are always ``(0, 0, 0)``.

    Args:
        image: (H, W, C).
        boxes, crowd_boxes: float32 (N, 4) / (M, 4) xyxy, or None.
        masks: (N, H, W), or None.
        keypoints: float32 (N, K, 3), or None.
        flip_map (list[int] or None): as in :func:`flip_keypoints`.

    Returns:
        dict like :func:`resize_shortest_edge`'s: ``image``, ``boxes``, ``masks``,
        ``keypoints``, ``crowd_boxes`` (``None`` for the ones not given).
    """
    width = image.shape[1]
    return {
        "image": np.ascontiguousarray(image[:, ::-1]),
        "boxes": None if boxes is None else flip_boxes(boxes, width),
        "masks": None if masks is None else np.ascontiguousarray(masks[:, :, ::-1]),
        "keypoints": None if keypoints is None else flip_keypoints(keypoints, width, flip_map),
        "crowd_boxes": None if crowd_boxes is None else flip_boxes(crowd_boxes, width),
    }


# --------------------------------------------------------------------------------------------
# Copy-paste
# --------------------------------------------------------------------------------------------
def mask_boxes(masks):
    """Tight boxes of binary masks, in continuous coordinates.

    Args:
        masks: (N, H, W), nonzero = on.

    Returns:
        float32 (N, 4) xyxy: a mask covering pixel columns i..j gives x1 = i, x2 = j + 1;
        empty masks give zeros.
    """
    masks = np.asarray(masks, bool)
    out = np.zeros((len(masks), 4), np.float32)
    cols = masks.any(axis=1)
    rows = masks.any(axis=2)
    for i in range(len(masks)):
        xs = np.flatnonzero(cols[i])
        ys = np.flatnonzero(rows[i])
        if len(xs):
            out[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return out


def paste_instances(dst, src, order, min_visible=0.5):
    """Simple copy-paste: the instances ``order`` of ``src`` painted, in that order, on ``dst``.

    An instance is pasted with its mask's pixels, unless it is empty or would leave an instance
    already in the image less than ``min_visible`` of its visible area (the placement rule of
    the synthetic generator, ``mxmask.data.shapes``).

    Args:
        dst, src (dict): one image each, at the same size: ``image`` uint8 (H, W, 3), ``boxes``
            float32 (N, 4) xyxy, ``labels`` (N,), ``masks`` uint8 (N, H, W) of 0/1 and
            ``keypoints`` float32 (N, K, 3) or None.
        order: indices of ``src``'s instances, in pasting order.
        min_visible (float): the fraction of its visible area an instance must keep.

    Returns:
        dict of the same form: ``dst``'s instances, their masks minus the pixels pasted over
        them, the boxes of the covered ones shrunk to what is left (tight mask boxes) and their
        visible keypoints (v = 2) under pasted pixels marked covered (v = 1, the COCO and
        generator convention), followed by the pasted instances with ``src``'s boxes, labels
        and keypoints.
    """
    image = dst["image"].copy()
    src_image = src["image"]
    h, w = image.shape[:2]
    n = len(dst["masks"])
    masks = np.zeros((n + len(order), h, w), bool)           # room for every pasted instance
    masks[:n] = np.asarray(dst["masks"], bool)
    area = np.zeros(n + len(order), np.int64)                 # pixels left of each instance
    area[:n] = masks[:n].sum(axis=(1, 2))
    boxes = [b for b in np.asarray(dst["boxes"], np.float32).reshape(-1, 4)]
    labels = list(np.asarray(dst["labels"]).reshape(-1))
    with_kps = dst.get("keypoints") is not None
    kps = [k for k in np.array(dst["keypoints"], np.float32)] if with_kps else []
    covered = np.zeros(n + len(order), bool)
    for j in order:
        m = np.asarray(src["masks"][j], bool)
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        if not len(rows):
            continue
        window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))   # m's box
        m_win = m[window]
        hidden = (masks[:n, window[0], window[1]] & m_win).sum(axis=(1, 2))
        if np.any(area[:n] - hidden < min_visible * area[:n]):
            continue
        for i in np.flatnonzero(hidden):
            masks[i, window[0], window[1]] &= ~m_win
            area[i] -= hidden[i]
            covered[i] = True
            if with_kps:
                k = kps[i]
                px = np.clip(np.floor(k[:, 0]).astype(np.int64), 0, w - 1)
                py = np.clip(np.floor(k[:, 1]).astype(np.int64), 0, h - 1)
                k[(k[:, 2] == 2) & m[py, px], 2] = 1.0
        image[m] = src_image[m]
        masks[n] = m
        area[n] = m_win.sum()
        n += 1
        boxes.append(np.asarray(src["boxes"][j], np.float32))
        labels.append(src["labels"][j])
        if with_kps:
            kps.append(np.array(src["keypoints"][j], np.float32))
    out_masks = masks[:n].astype(np.uint8)
    out_boxes = np.asarray(boxes, np.float32).reshape(n, 4)
    redo = np.flatnonzero(covered[:n])
    if len(redo):
        out_boxes[redo] = mask_boxes(out_masks[redo])
    return {
        "image": image,
        "boxes": out_boxes,
        "labels": np.asarray(labels, np.asarray(dst["labels"]).dtype).reshape(n),
        "masks": out_masks,
        "keypoints": (np.asarray(kps, np.float32).reshape((n,) + np.shape(dst["keypoints"])[1:])
                      if with_kps else None),
    }


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------
def normalize(image, mean, std, mode="fused"):
    """HxWx3 uint8 RGB -> float32 (3, H, W) equal to ``(x / 255 - mean) / std`` per channel.

    Args:
        image: the image.
        mean, std: per channel (``input.pixel_mean`` / ``pixel_std``).
        mode: ``fused`` (one float32 multiply and subtract per value, with the constants
            folded in float64; the fast default) or ``stepwise``: float32 ``x / 255``, minus
            ``float32(mean)``, divided by ``float32(std)``, which is what MXNet's
            ``image.to_tensor`` + ``image.normalize`` (GluonCV) and torchvision's ``to_tensor``
            + ``GeneralizedRCNNTransform.normalize`` compute, bit for bit. The two differ by at
            most 4.8e-7.

    Returns:
        float32 (3, H, W).
    """
    if mode == "stepwise":
        out = np.empty((image.shape[2],) + image.shape[:2], np.float32)
        for c in range(image.shape[2]):
            out[c] = image[:, :, c]
            out[c] /= np.float32(255)
            out[c] -= np.float32(mean[c])
            out[c] /= np.float32(std[c])
        return out
    if mode != "fused":
        raise UserError("input.normalize: expected one of %s, got %r"
                        % (", ".join(NORMALIZE_MODES), mode))
    scale = 1.0 / (255.0 * np.asarray(std, np.float64))
    shift = np.asarray(mean, np.float64) / np.asarray(std, np.float64)
    out = np.empty((image.shape[2],) + image.shape[:2], np.float32)
    for c in range(image.shape[2]):  # per channel, in place: cheaper than broadcasting over HWC
        out[c] = image[:, :, c]
        out[c] *= np.float32(scale[c])
        out[c] -= np.float32(shift[c])
    return out


# --------------------------------------------------------------------------------------------
# Record -> sample
# --------------------------------------------------------------------------------------------
def read_image_file(path):
    """Default image reader: :func:`mxmask.data.images.read_image` (imported on first use)."""
    from .images import read_image
    return read_image(path)


def _checked_image(record, reader):
    """The record's image via ``reader``; UserError unless it is uint8 RGB of the json's size."""
    image = reader(record["file_name"])
    expected = (int(record["height"]), int(record["width"]))
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise UserError("%s: expected an HxWx3 uint8 RGB image, got shape %s dtype %s"
                        % (record["file_name"], image.shape, image.dtype))
    if image.shape[:2] != expected:
        raise UserError("%s: image is %dx%d (WxH) but the annotation says %dx%d"
                        % (record["file_name"], image.shape[1], image.shape[0],
                           expected[1], expected[0]))
    return image


def _clip_boxes(boxes, height, width):
    """xyxy boxes clipped to [0, width] x [0, height]."""
    out = boxes.copy()
    np.clip(out[:, 0::2], 0, width, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0, height, out=out[:, 1::2])
    return out


class TrainTransform:
    """Record + Generator -> training sample: copy-paste, resize, flip, normalise.

    ``transform(record, rng)`` returns a dict: ``image`` float32 (3, h, w), ``im_info`` float32
    (h, w, scale), ``gt_boxes`` float32 (N, 4) clipped to the image, ``gt_labels`` int32 (N,),
    ``gt_crowd`` float32 (M, 4), ``image_id`` int, plus ``gt_masks`` uint8 (N, h, w) when
    ``cfg.model.mask_on`` and ``gt_keypoints`` float32 (N, K, 3) when ``cfg.model.keypoint_on``.
    The image is always resized with Detectron2's rounding and ``cv2.INTER_LINEAR``
    (:func:`resize_shortest_edge`), whatever the test-time settings.

    The generator draws, in this order, the short side (uniformly from
    ``cfg.input.min_size_train``) and the flip (probability ``cfg.input.flip_prob``); then,
    only when ``cfg.input.copy_paste_prob`` > 0, whether to paste, and if so, for each of
    ``cfg.input.copy_paste_sources`` source images in turn, which one (another record of
    ``paste_pool``, resized to this image's size) and which of its instances (a random order of
    a random non-empty subset, :func:`paste_instances`). Pasting happens at
    the original size, before the resize and the flip.

    Args:
        cfg: the config (``input.*``, ``model.mask_on``, ``model.keypoint_on``,
            ``data.keypoint_flip_map`` when ``info`` has none).
        info (DatasetInfo or None): the keypoint names and flip map.
        reader: image reader, default :func:`read_image_file`.
        paste_pool (list[dict] or None): the records copy-paste draws from.
    """

    def __init__(self, cfg, info=None, reader=None, paste_pool=None):
        self.short_sizes = [int(s) for s in cfg.input.min_size_train]
        if not self.short_sizes:
            raise UserError("input.min_size_train: needs at least one size")
        self.max_size = int(cfg.input.max_size_train)
        self.flip_prob = float(cfg.input.flip_prob)
        self.mean = cfg.input.pixel_mean
        self.std = cfg.input.pixel_std
        self.mask_on = bool(cfg.model.mask_on)
        self.keypoint_on = bool(cfg.model.keypoint_on)
        flip_map = getattr(info, "keypoint_flip_map", None) if info is not None else None
        self.flip_map = list(flip_map if flip_map else cfg.data.keypoint_flip_map)
        names = getattr(info, "keypoint_names", None) if info is not None else None
        self.num_keypoints = len(names) if names else int(cfg.model.num_keypoints)
        self.reader = reader or read_image_file
        self.copy_paste_prob = float(getattr(cfg.input, "copy_paste_prob", 0.0))
        if not 0.0 <= self.copy_paste_prob <= 1.0:
            raise UserError("input.copy_paste_prob: expected a probability in [0, 1], got %r"
                            % cfg.input.copy_paste_prob)
        self.copy_paste_sources = int(getattr(cfg.input, "copy_paste_sources", 1))
        if self.copy_paste_sources < 1:
            raise UserError("input.copy_paste_sources: expected at least 1 image to paste "
                            "from, got %r" % cfg.input.copy_paste_sources)
        self.paste_pool = list(paste_pool) if paste_pool is not None else []

    def draw_augmentation(self, rng):
        """-> (short side, flip?) drawn from ``rng``."""
        short = self.short_sizes[int(rng.integers(len(self.short_sizes)))]
        flip = bool(rng.random() < self.flip_prob)
        return short, flip

    def _decoded_masks(self, record, why):
        segs = record.get("segmentations")
        if segs is None or any(s is None for s in segs):
            raise UserError("%s: %s but the annotations have no segmentation"
                            % (record["file_name"], why))
        return decode_masks(segs, int(record["height"]), int(record["width"]))

    def annotations(self, record):
        """The record's annotations as arrays at the original size (masks decoded)."""
        name = record["file_name"]
        boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
        crowd = record.get("crowd_boxes")
        crowd = np.zeros((0, 4), np.float32) if crowd is None else \
            np.asarray(crowd, np.float32).reshape(-1, 4)
        ann = {"boxes": boxes, "crowd_boxes": crowd, "masks": None, "keypoints": None}
        if self.mask_on:
            ann["masks"] = self._decoded_masks(record, "model.mask_on is true")
        if self.keypoint_on:
            kps = record.get("keypoints")
            if kps is None:
                raise UserError("%s: model.keypoint_on is true but the annotations have no "
                                "keypoints" % name)
            kps = np.asarray(kps, np.float32)
            if kps.ndim != 3:
                kps = kps.reshape(len(boxes), -1, 3) if kps.size else \
                    np.zeros((len(boxes), self.num_keypoints, 3), np.float32)
            ann["keypoints"] = kps
        return ann

    def copy_paste(self, image, record, ann, labels, rng):
        """Draws whether to paste (``cfg.input.copy_paste_prob``) and, if so, pastes instances
        of ``cfg.input.copy_paste_sources`` other records of the pool, one after the other ->
        (image, ann, labels), unchanged when nothing is drawn."""
        pool = self.paste_pool
        if self.copy_paste_prob <= 0.0 or len(pool) < 2 or rng.random() >= self.copy_paste_prob:
            return image, ann, labels
        why = "input.copy_paste_prob > 0"
        dst = {"image": image, "boxes": ann["boxes"], "labels": labels,
               "masks": ann["masks"] if ann["masks"] is not None
               else self._decoded_masks(record, why),
               "keypoints": ann["keypoints"]}
        for _ in range(self.copy_paste_sources):
            index = int(rng.integers(len(pool)))
            if pool[index] is record:
                index = (index + 1) % len(pool)
            dst = self._paste_from(dst, pool[index], why, rng)
        ann = dict(ann, boxes=dst["boxes"], keypoints=dst["keypoints"],
                   masks=dst["masks"] if self.mask_on else None)
        return dst["image"], ann, dst["labels"]

    def _paste_from(self, dst, source, why, rng):
        """``dst`` (a :func:`paste_instances` dict) with a random non-empty subset of
        ``source``'s instances, resized to its size, pasted on it in a random order."""
        src_image = _checked_image(source, self.reader)
        src_ann = self.annotations(source)
        src_masks = src_ann["masks"] if src_ann["masks"] is not None \
            else self._decoded_masks(source, why)
        count = len(src_masks)
        order = rng.permutation(count)[:max(1, int(rng.binomial(count, 0.5)))] if count else []
        h, w = dst["image"].shape[:2]
        sh, sw = src_image.shape[:2]
        sx, sy = w / float(sw), h / float(sh)
        src = {
            "image": resize_image(src_image, h, w),
            "masks": resize_masks(src_masks, h, w),
            "boxes": scale_boxes(src_ann["boxes"], sx, sy),
            "labels": np.asarray(source["labels"]).reshape(-1),
            "keypoints": (None if src_ann["keypoints"] is None
                          else scale_keypoints(src_ann["keypoints"], sx, sy)),
        }
        return paste_instances(dst, src, order)

    def __call__(self, record, rng):
        image = _checked_image(record, self.reader)
        short, flip = self.draw_augmentation(rng)
        ann = self.annotations(record)
        labels = np.asarray(record["labels"], np.int32).reshape(-1)
        image, ann, labels = self.copy_paste(image, record, ann, labels, rng)
        out = resize_shortest_edge(image, short, self.max_size, **ann)
        scale = out.pop("scale")
        if flip:
            out = hflip(out["image"], out["boxes"], out["masks"], out["keypoints"],
                        out["crowd_boxes"], self.flip_map)
        h, w = out["image"].shape[:2]
        sample = {
            "image": normalize(out["image"], self.mean, self.std),
            "im_info": np.array([h, w, scale], np.float32),
            "gt_boxes": _clip_boxes(out["boxes"], h, w),
            "gt_labels": labels,
            "gt_crowd": _clip_boxes(out["crowd_boxes"], h, w),
            "image_id": int(record["image_id"]),
        }
        if self.mask_on:
            sample["gt_masks"] = out["masks"]
        if self.keypoint_on:
            sample["gt_keypoints"] = out["keypoints"]
        return sample


class TestTransform:
    """Record -> ``(image float32 (3, h, w), im_info float32 (h, w, scale), image_id,
    orig_size int64 (height, width))`` with the test-time shortest-edge resize.

    The pipeline is the config's, so that a preset feeds its network exactly the tensor its
    original framework does: ``input.resize_rule`` sizes the image (:func:`resized_size`,
    :data:`RESIZE_RULES`); with ``input.resize_interp`` (:data:`RESIZE_INTERPS`) ``linear`` or
    ``cubic`` the uint8 image is resized (:func:`resize_image`) then normalised
    (``input.normalize``, :data:`NORMALIZE_MODES`, :func:`normalize`); with ``bilinear_float``
    it is normalised first and the float image resized (:func:`resize_bilinear_float`), as
    torchvision does. The defaults are Detectron2's rounding, ``cv2.INTER_LINEAR`` and the
    fused normalisation.

    Args:
        cfg: the config (``input.min_size_test``, ``max_size_test``, ``pixel_mean``,
            ``pixel_std`` and the three settings above; UserError for an unknown value).
        reader: image reader, default :func:`read_image_file`.
    """

    __test__ = False  # not a pytest class

    def __init__(self, cfg, reader=None):
        i = cfg.input
        self.short = int(i.min_size_test)
        self.max_size = int(i.max_size_test)
        self.mean = i.pixel_mean
        self.std = i.pixel_std
        self.resize_rule = str(i.resize_rule)
        self.resize_interp = str(i.resize_interp)
        self.normalize = str(i.normalize)
        for key, value, choices in (("resize_rule", self.resize_rule, RESIZE_RULES),
                                    ("resize_interp", self.resize_interp, RESIZE_INTERPS),
                                    ("normalize", self.normalize, NORMALIZE_MODES)):
            if value not in choices:
                raise UserError("input.%s: expected one of %s, got %r"
                                % (key, ", ".join(choices), value))
        self.reader = reader or read_image_file

    def apply_image(self, image):
        """HxWx3 uint8 RGB -> (normalised CHW float32, im_info)."""
        h, w = image.shape[:2]
        new_h, new_w, scale = resized_size(h, w, self.short, self.max_size, self.resize_rule)
        if self.resize_interp == "bilinear_float":
            data = resize_bilinear_float(normalize(image, self.mean, self.std, self.normalize),
                                         new_h, new_w)
        else:
            data = normalize(resize_image(image, new_h, new_w, self.resize_interp),
                             self.mean, self.std, self.normalize)
        return data, np.array([new_h, new_w, scale], np.float32)

    def __call__(self, record):
        image = _checked_image(record, self.reader)
        data, im_info = self.apply_image(image)
        orig_size = np.array(image.shape[:2], np.int64)
        return data, im_info, int(record["image_id"]), orig_size


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------
def padded_size(height, width, size_divisibility):
    """Round (height, width) up to multiples of ``size_divisibility`` (<= 1: unchanged).

    Returns:
        tuple: ``(Hp, Wp)`` as ints.
    """
    d = int(size_divisibility)
    if d <= 1:
        return int(height), int(width)
    return -(-int(height) // d) * d, -(-int(width) // d) * d


def pad_images(images, size_divisibility):
    """Stack images, zero padded at the bottom/right.

    Args:
        images (list): B float32 arrays (3, h_i, w_i).
        size_divisibility (int): Hp and Wp are the largest h_i / w_i rounded up to multiples of
            it (:func:`padded_size`).

    Returns:
        float32 (B, 3, Hp, Wp).
    """
    hp, wp = padded_size(max(im.shape[1] for im in images), max(im.shape[2] for im in images),
                         size_divisibility)
    out = np.zeros((len(images), images[0].shape[0], hp, wp), np.float32)
    for i, im in enumerate(images):
        out[i, :, :im.shape[1], :im.shape[2]] = im
    return out


def _stack_padded(arrays, fill, dtype, count):
    """List of (n_i, *rest) arrays -> (B, count, *rest) padded with ``fill`` on axis 1."""
    rest = arrays[0].shape[1:]
    out = np.full((len(arrays), count) + rest, fill, dtype)
    for i, a in enumerate(arrays):
        out[i, :len(a)] = a
    return out


def batchify_train(samples, size_divisibility=32):
    """Training samples -> the batch dict of DEVELOPING.md, "Training batches".

    Images are zero padded (after normalisation) at the bottom/right to a multiple of
    ``size_divisibility``; gt boxes, labels, keypoints and crowd boxes are padded with -1, masks
    with 0. The instance axes ``G`` and ``Gc`` are at least 1 so that no batch array is empty.

    Args:
        samples (list[dict]): :class:`TrainTransform` samples.
        size_divisibility (int): ``input.size_divisibility``.

    Returns:
        dict of numpy arrays: ``data`` float32 (B, 3, Hp, Wp), ``im_info`` float32 (B, 3),
        ``gt_boxes`` float32 (B, G, 4), ``gt_labels`` float32 (B, G), ``gt_crowd`` float32
        (B, Gc, 4), ``image_id`` int64 (B,), plus ``gt_masks`` uint8 (B, G, Hp, Wp) and
        ``gt_keypoints`` float32 (B, G, K, 3) when the samples have them.
    """
    data = pad_images([s["image"] for s in samples], size_divisibility)
    hp, wp = data.shape[2:]
    count = max(1, max(len(s["gt_boxes"]) for s in samples))
    crowd_count = max(1, max(len(s["gt_crowd"]) for s in samples))
    batch = {
        "data": data,
        "im_info": np.stack([s["im_info"] for s in samples]).astype(np.float32),
        "gt_boxes": _stack_padded([s["gt_boxes"] for s in samples], -1, np.float32, count),
        "gt_labels": _stack_padded([s["gt_labels"] for s in samples], -1, np.float32, count),
        "gt_crowd": _stack_padded([s["gt_crowd"] for s in samples], -1, np.float32, crowd_count),
        "image_id": np.array([s["image_id"] for s in samples], np.int64),
    }
    if "gt_masks" in samples[0]:
        masks = np.zeros((len(samples), count, hp, wp), np.uint8)
        for i, s in enumerate(samples):
            n, h, w = s["gt_masks"].shape
            masks[i, :n, :h, :w] = s["gt_masks"]
        batch["gt_masks"] = masks
    if "gt_keypoints" in samples[0]:
        batch["gt_keypoints"] = _stack_padded([s["gt_keypoints"] for s in samples], -1,
                                              np.float32, count)
    return batch


def batchify_test(samples, size_divisibility=32):
    """Test tuples -> a test batch dict.

    Args:
        samples (list[tuple]): :class:`TestTransform` outputs ``(image, im_info, image_id,
            orig_size)``.
        size_divisibility (int): ``input.size_divisibility``.

    Returns:
        dict: ``data`` float32 (B, 3, Hp, Wp) zero padded, ``im_info`` float32 (B, 3),
        ``image_id`` int64 (B,) and ``orig_size`` int64 (B, 2) = (height, width).
    """
    return {
        "data": pad_images([s[0] for s in samples], size_divisibility),
        "im_info": np.stack([s[1] for s in samples]).astype(np.float32),
        "image_id": np.array([s[2] for s in samples], np.int64),
        "orig_size": np.stack([s[3] for s in samples]).astype(np.int64),
    }

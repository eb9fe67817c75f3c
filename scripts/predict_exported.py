#!/usr/bin/env python
"""Run a model exported by ``mxmask export`` on images, without mxmask.

    python scripts/predict_exported.py PREFIX IMAGE [IMAGE ...] [--out results.json]
                                       [--score-thresh T]

Needs only MXNet, NumPy and OpenCV (plus the standard library): this file is meant to be copied
next to an export and used where mxmask is not installed. It reads:

    PREFIX-symbol.json, PREFIX-0000.params   the graph and weights (SymbolBlock.imports)
    PREFIX-meta.json                         resize rule, interpolation and normalisation,
                                             mean/std, size divisibility, output names, class
                                             names, COCO category ids, thresholds

Each image is prepared as mxmask's Predictor prepares it (:func:`prepare`), run through the
graph, and its detections are mapped back to the original image (:func:`to_entries`):
``file_name``, ``category_id``, ``class_name``, ``score``, ``bbox`` [x, y, w, h],
``segmentation`` (uncompressed RLE) and ``area``, ``keypoints``. One line per detection is
printed; ``--out`` writes them all as a JSON list.
"""
import argparse
import json
import os
import sys

import cv2
import mxnet as mx
import numpy as np

# the graph's inputs, in order
INPUTS = ("data", "im_info")


class ScriptError(Exception):
    """A problem with the user's files: printed as one line, exit code 2."""


def load_meta(prefix):
    """``PREFIX-meta.json`` as a dict; ScriptError when it is missing, not JSON, not an mxmask
    export record, or lacks a field this script needs.
    """
    path = prefix + "-meta.json"
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ScriptError("%s: not found (written by mxmask export next to the graph)" % path)
    except ValueError as e:
        raise ScriptError("%s: not valid JSON (%s)" % (path, e))
    if meta.get("format") != "mxmask-export":
        raise ScriptError("%s: not an mxmask export record (field 'format')" % path)
    for key in ("outputs", "min_size_test", "max_size_test", "size_divisibility", "pixel_mean",
                "pixel_std", "category_ids", "score_thresh", "mask_thresh"):
        if key not in meta:
            raise ScriptError("%s: field '%s' is missing" % (path, key))
    return meta


def load_network(prefix):
    """The graph and weights as a ``SymbolBlock`` on the CPU; ScriptError when a file is
    missing.
    """
    import warnings
    for suffix in ("-symbol.json", "-0000.params"):
        if not os.path.exists(prefix + suffix):
            raise ScriptError("%s%s: not found" % (prefix, suffix))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Cannot decide type")
        return mx.gluon.SymbolBlock.imports(prefix + "-symbol.json", list(INPUTS),
                                            prefix + "-0000.params", ctx=mx.cpu())


# ----------------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------------
def read_rgb(path):
    """An image file as HxWx3 uint8 RGB (EXIF orientation ignored, as mxmask reads images);
    ScriptError when it is not a readable image.
    """
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imread(path, flags) if os.path.isfile(path) else None
    if image is None:
        raise ScriptError("%s: not a readable image file" % path)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resized_size(h, w, short, longest, rule):
    """(new_h, new_w, scale) of the shortest-edge resize under ``rule`` (input.resize_rule)."""
    if rule == "half_up":
        scale = min(float(short) / min(h, w), float(longest) / max(h, w))
        return int(h * scale + 0.5), int(w * scale + 0.5), scale
    if rule == "gluoncv":                       # resize_short_within(mult_base=1)
        size_min, size_max = (h, w) if w > h else (w, h)
        scale = float(short) / float(size_min)
        if np.round(scale * size_max) > longest:
            scale = float(np.floor(longest)) / float(size_max)
        return int(np.round(h * scale)), int(np.round(w * scale)), scale
    if rule == "torchvision":                   # GeneralizedRCNNTransform, eager
        scale = min(short / min(h, w), longest / max(h, w))
        return int(h * scale), int(w * scale), scale
    if rule == "torchvision_float32":           # the same, scripted: a float32 scale
        f = np.float32
        scale = float(min(f(1) / f(min(h, w)) * f(short), f(1) / f(max(h, w)) * f(longest)))
        return int(np.floor(h * scale)), int(np.floor(w * scale)), scale
    raise ScriptError("meta file: unknown resize_rule %r" % rule)


def normalized(image, mean, std, mode):
    """HxWx3 uint8 -> float32 (3, H, W) = (x / 255 - mean) / std, in the float32 arithmetic of
    ``mode`` (input.normalize: fused, or stepwise as GluonCV and torchvision)."""
    out = np.empty((3,) + image.shape[:2], np.float32)
    if mode == "stepwise":
        for c in range(3):
            out[c] = image[:, :, c]
            out[c] /= np.float32(255)
            out[c] -= np.float32(mean[c])
            out[c] /= np.float32(std[c])
        return out
    if mode != "fused":
        raise ScriptError("meta file: unknown normalize %r" % mode)
    std = np.asarray(std, np.float64)
    mul = 1.0 / (255.0 * std)
    sub = np.asarray(mean, np.float64) / std
    for c in range(3):
        out[c] = image[:, :, c]
        out[c] *= np.float32(mul[c])
        out[c] -= np.float32(sub[c])
    return out


def _linear_taps(size, new_size):
    """Source indices and float32 weights of PyTorch's CPU bilinear resize along one axis
    (align_corners=False; the source coordinate rounded once, as its fused multiply-add)."""
    scale = np.float32(size) / np.float32(new_size)
    src = (np.float64(scale) * (np.arange(new_size) + 0.5) - 0.5).astype(np.float32)
    np.maximum(src, np.float32(0), out=src)
    i0 = np.minimum(np.floor(src).astype(np.int64), size - 1)
    lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, i0 + (i0 < size - 1), (np.float32(1) - lam).astype(np.float32), lam


def _fma32(a, b, c):
    return (a.astype(np.float64) * b + c).astype(np.float32)


def resize_bilinear_float(data, new_h, new_w):
    """float32 (C, H, W) -> (C, new_h, new_w): torchvision's F.interpolate(bilinear,
    align_corners=False) as PyTorch's CPU kernel computes it (mxmask's resize_bilinear_float)."""
    if data.shape[1:] == (new_h, new_w):
        return data
    y0, y1, wy0, wy1 = _linear_taps(data.shape[1], new_h)
    x0, x1, wx0, wx1 = _linear_taps(data.shape[2], new_w)
    out = np.empty((data.shape[0], new_h, new_w), np.float32)
    for c in range(data.shape[0]):
        rows = [_fma32(data[c, y][:, x0], wx0, data[c, y][:, x1] * wx1) for y in (y0, y1)]
        out[c] = _fma32(rows[0], wy0[:, None], rows[1] * wy1[:, None])
    return out


def prepare(image, meta):
    """The graph's inputs for one image, as mxmask's Predictor computes them
    (mxmask.data.transforms.TestTransform), so the results are the same.

    The image is resized so that its short side is ``min_size_test`` (long side at most
    ``max_size_test``), normalised as ``(x / 255 - mean) / std``, and zero padded at the
    bottom/right to a multiple of ``size_divisibility``. The size rule, the interpolation and the
    normalisation arithmetic are the checkpoint's ``input.resize_rule`` (half_up, gluoncv,
    torchvision, torchvision_float32: :func:`resized_size`), ``resize_interp`` (linear, cubic,
    bilinear_float) and ``normalize`` (fused, stepwise: :func:`normalized`), from the meta file.

    Args:
        image: HxWx3 uint8 RGB.
        meta: the meta file's record.

    Returns:
        ``(data (1, 3, Hp, Wp) float32, im_info (1, 3) float32 = (h, w, scale))``.

    Raises:
        ScriptError: the padded image is larger than the model's anchors cover, or an unknown
        resize rule, interpolation or normalisation.
    """
    h, w = image.shape[:2]
    rule = meta.get("resize_rule", "half_up")
    interp = meta.get("resize_interp", "linear")
    mode = meta.get("normalize", "fused")
    new_h, new_w, scale = resized_size(h, w, meta["min_size_test"], meta["max_size_test"], rule)
    div = max(int(meta["size_divisibility"]), 1)
    hp, wp = -(-new_h // div) * div, -(-new_w // div) * div
    biggest = meta.get("max_input_size")
    if biggest and max(hp, wp) > biggest:
        raise ScriptError("the resized image (%dx%d) is larger than the %d pixels the model "
                          "supports" % (hp, wp, biggest))
    mean, std = meta["pixel_mean"], meta["pixel_std"]
    if interp == "bilinear_float":               # torchvision: normalise, then resize
        chw = resize_bilinear_float(normalized(image, mean, std, mode), new_h, new_w)
    else:
        if (new_h, new_w) != (h, w):
            if interp == "linear":
                image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
            elif interp == "cubic":              # GluonCV: MXNet's imresize, OpenCV's bicubic
                image = mx.image.imresize(mx.nd.array(image, dtype=np.uint8), new_w, new_h,
                                          interp=2).asnumpy()
            else:
                raise ScriptError("meta file: unknown resize_interp %r" % interp)
        chw = normalized(image, mean, std, mode)
    data = np.zeros((1, 3, hp, wp), np.float32)
    data[0, :, :new_h, :new_w] = chw
    im_info = np.array([[new_h, new_w, scale]], np.float32)
    return data, im_info


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def _axis_weights(start, length, cells, size):
    """Bilinear weights (pixels, cells) from pixel centres of [a, b) to a mask axis of ``cells``
    spanning [start, start + length), zero outside the grid; returns (a, b, weights)."""
    half = 0.5 * length / cells
    a = int(max(np.floor(start - half - 0.5), 0))
    b = int(min(np.ceil(start + length + half - 0.5) + 1, size))
    if b <= a:
        return a, b, None
    g = (np.arange(a, b) + 0.5 - start) / length * cells - 0.5
    j0 = np.floor(g)
    frac = g - j0
    j0 = j0.astype(np.int64)
    rows = np.arange(b - a)
    weights = np.zeros((b - a, cells), np.float64)
    lo = (j0 >= 0) & (j0 < cells)
    weights[rows[lo], j0[lo]] = 1.0 - frac[lo]
    hi = (j0 + 1 >= 0) & (j0 + 1 < cells)
    weights[rows[hi], j0[hi] + 1] = frac[hi]
    return a, b, weights


def paste_mask(mask, box, height, width, threshold):
    """(M, M) probabilities + box (x1, y1, x2, y2) -> bool (height, width) image mask, or the
    float probabilities with ``threshold`` None."""
    out = np.zeros((height, width), bool if threshold is not None else np.float64)
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (np.isfinite([x1, y1, x2, y2]).all() and x2 > x1 and y2 > y1):
        return out
    xa, xb, wx = _axis_weights(x1, x2 - x1, mask.shape[1], width)
    ya, yb, wy = _axis_weights(y1, y2 - y1, mask.shape[0], height)
    if wx is None or wy is None:
        return out
    # x first, then y: the order mxmask.postprocess uses, so the sums round the same way
    crop_t = wx @ mask.astype(np.float64).T @ wy.T
    out[ya:yb, xa:xb] = (crop_t >= threshold).T if threshold is not None else crop_t.T
    return out


def paste_mask_torchvision(mask, box, height, width, threshold):
    """torchvision's paste (meta ``mask_paste``: torchvision): the (M, M) grid padded by one zero
    cell, the box expanded by that cell in float32 and truncated to whole pixels, the padded grid
    resized bilinearly to it; bool ``prob > threshold``, or the probabilities with None."""
    out = np.zeros((height, width), bool if threshold is not None else np.float64)
    m = mask.shape[0]
    b = np.asarray(box, np.float32)
    scale = np.float32(m + 2) / np.float32(m)
    half_w = (b[2] - b[0]) * np.float32(0.5) * scale
    half_h = (b[3] - b[1]) * np.float32(0.5) * scale
    cx, cy = (b[2] + b[0]) * np.float32(0.5), (b[3] + b[1]) * np.float32(0.5)
    corners = np.array([cx - half_w, cy - half_h, cx + half_w, cy + half_h], np.float32)
    if not np.isfinite(corners).all():
        return out
    x0, y0, x1, y1 = (int(v) for v in corners)
    xa, xb, ya, yb = max(x0, 0), min(x1 + 1, width), max(y0, 0), min(y1 + 1, height)
    if xb <= xa or yb <= ya:
        return out
    padded = np.zeros((m + 2, m + 2), np.float32)
    padded[1:-1, 1:-1] = mask
    resized = cv2.resize(padded, (max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)),
                         interpolation=cv2.INTER_LINEAR)[ya - y0:yb - y0, xa - x0:xb - x0]
    out[ya:yb, xa:xb] = resized > threshold if threshold is not None else resized
    return out


def tight_box(on):
    """bool (H, W) -> the xyxy box of its True pixels (pixel (r, c) covers [c, c + 1) x
    [r, r + 1)), or None when there are none."""
    rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
    if not len(rows):
        return None
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def uncompressed_rle(mask):
    """bool (H, W) -> COCO uncompressed RLE: run lengths in column-major order, 0s first."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    if flat.size == 0:
        return {"size": list(mask.shape), "counts": []}
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


def to_entries(outputs, meta, im_info, orig_size, file_name, score_thresh):
    """The graph's outputs for one image -> result dicts in original-image coordinates.

    Rows with ``id < 0``, a score under ``score_thresh`` or a class named ``N/A`` (torchvision's
    unused COCO ids) are dropped. Each entry holds ``file_name``, ``category_id``,
    ``class_name``, ``score`` and:

    - ``bbox`` ``[x, y, w, h]`` in original pixels, ``w = x2 - x1`` whatever the model's
      ``box_plus_one`` (GluonCV's COCO instance evaluation and ``mxmask predict`` write it so);
      with ``mask_box_thresh`` > 0 in the meta file, the tight box of the pasted mask probability
      >= it, as mxmask's ``test.mask_box_thresh``;
    - ``segmentation``: the mask pasted into the image (meta ``mask_paste``: aligned bilinear,
      >= ``mask_thresh``, or torchvision's) as COCO *uncompressed* RLE ``{"size": [h, w],
      "counts": [...]}`` (column-major runs starting with 0s; pycocotools' ``frPyObjects`` reads
      it), and ``area`` its pixels;
    - ``keypoints`` ``[x, y, 2, ...]`` in COCO pixel indices (minus ``keypoint_offset``), from the
      graph's argmax keypoints (``mxmask predict`` refines them from the heatmaps, so they differ
      slightly).

    Args:
        outputs: the graph's outputs as numpy arrays, in the meta file's ``outputs`` order.
        meta: the meta file's record.
        im_info: (1, 3) ``(h, w, scale)`` of :func:`prepare`.
        orig_size: (height, width) of the original image.
        file_name: the entries' ``file_name``.
        score_thresh: the score threshold.

    Returns:
        list of result dicts.
    """
    out = {name: value[0] for name, value in zip(meta["outputs"], outputs)}
    ids, scores = out["ids"].reshape(-1), out["scores"].reshape(-1).astype(np.float64)
    boxes = out["boxes"].reshape(-1, 4).astype(np.float64)
    # labels named N/A stand for no category (torchvision's unused COCO ids)
    unused = [i for i, name in enumerate(meta.get("class_names") or []) if name == "N/A"]
    keep = np.flatnonzero((ids >= 0) & (scores >= score_thresh) & np.isfinite(scores)
                          & ~np.isin(ids, np.asarray(unused, np.float64)))
    height, width = orig_size
    im_h, im_w, scale = (float(v) for v in im_info[0])
    sx = im_w / width if im_w > 0 else scale
    sy = im_h / height if im_h > 0 else scale
    # continuous coordinates [x1, x2) whatever box_plus_one: mxmask predict's convention
    extent = boxes[keep] / np.array([sx, sy, sx, sy])
    names = meta.get("class_names") or []
    kpt_cats = set(meta.get("keypoint_category_ids") or []) or None
    paste = paste_mask_torchvision if meta.get("mask_paste") == "torchvision" else paste_mask
    offset = float(meta.get("keypoint_offset", 0.5))
    entries = []
    for row, k in enumerate(keep):
        label = int(ids[k])
        category = int(meta["category_ids"][label])
        x1, y1, x2, y2 = extent[row].tolist()
        entry = {"file_name": file_name, "category_id": category,
                 "class_name": names[label] if label < len(names) else str(category),
                 "score": float(scores[k]), "bbox": [x1, y1, x2 - x1, y2 - y1]}
        if "masks" in out:
            box_thresh = float(meta.get("mask_box_thresh", 0.0))
            if box_thresh > 0:
                # the box becomes the tight box of the mask probability >= mask_box_thresh
                probs = paste(out["masks"][k], extent[row], height, width, None)
                mask = (probs > meta["mask_thresh"] if paste is paste_mask_torchvision
                        else probs >= meta["mask_thresh"])
                tight = tight_box(probs >= box_thresh)
                if tight is not None:
                    entry["bbox"] = [tight[0], tight[1], tight[2] - tight[0], tight[3] - tight[1]]
            else:
                mask = paste(out["masks"][k], extent[row], height, width, meta["mask_thresh"])
            entry["segmentation"] = uncompressed_rle(mask)
            entry["area"] = int(mask.sum())
        if "keypoints" in out and (kpt_cats is None or category in kpt_cats):
            kp = out["keypoints"][k].astype(np.float64)
            flat = np.stack([kp[:, 0] / sx - offset, kp[:, 1] / sy - offset,
                             np.full(len(kp), 2.0)], axis=1)
            entry["keypoints"] = flat.reshape(-1).tolist()
        entries.append(entry)
    return entries


def main(argv=None):
    """The script: runs the export on each image and prints its detections. Returns the exit
    code: 0, or 2 after a ScriptError (one line on stderr).
    """
    parser = argparse.ArgumentParser(description="Run an mxmask export (no mxmask needed).")
    parser.add_argument("prefix", help="export prefix (PREFIX-symbol.json, -0000.params, "
                                       "-meta.json)")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--out", help="write the detections as a JSON list here")
    parser.add_argument("--score-thresh", type=float,
                        help="drop detections below this score (default: the model's)")
    args = parser.parse_args(argv)
    try:
        meta = load_meta(args.prefix)
        net = load_network(args.prefix)
        thresh = meta["score_thresh"] if args.score_thresh is None else args.score_thresh
        results = []
        for path in args.images:
            image = read_rgb(path)
            data, im_info = prepare(image, meta)
            outputs = net(mx.nd.array(data), mx.nd.array(im_info))
            outputs = [o.asnumpy() for o in (outputs if isinstance(outputs, (list, tuple))
                                             else [outputs])]
            entries = to_entries(outputs, meta, im_info, image.shape[:2],
                                 os.path.basename(path), thresh)
            print("%s: %d detections" % (path, len(entries)))
            for e in entries:
                x, y, w, h = e["bbox"]
                area = "  mask %d px" % e["area"] if "area" in e else ""
                print("  %-12s %.3f  box %.1f %.1f %.1f %.1f%s"
                      % (e["class_name"], e["score"], x, y, x + w, y + h, area))
            results.extend(entries)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f)
            print("results: %s (%d entries)" % (args.out, len(results)))
    except ScriptError as e:
        print("predict_exported: error: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

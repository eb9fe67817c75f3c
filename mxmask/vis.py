"""Pictures: detections drawn on images, RGBA cut-outs per instance, training curves.

Inputs are COCO result entries in original-image coordinates, as produced by
:func:`mxmask.postprocess.detections_to_coco`: ``bbox`` ``[x, y, w, h]`` in continuous pixel
coordinates (pixel ``i`` covers ``[i, i + 1)``), ``score``, ``category_id``, optionally
``segmentation`` (compressed RLE, ``size == [H, W]``) and ``keypoints`` flat ``[x, y, v] * K``.
Images are RGB ``(H, W, 3)`` uint8.

- :func:`draw_instances` -> a PNG of exactly ``W x H`` pixels (RGB): translucent masks, boxes,
  "name score" labels, keypoints with ``v > 0`` and skeleton lines (0-based index pairs).
- :func:`write_cutouts` -> one RGBA PNG per instance, cropped to its box rounded outward and
  clipped to the image; alpha = mask * 255 (255 inside the box for entries without a mask).
- :func:`plot_training_curves` -> a PNG with losses (log scale), learning rate and AP at each
  evaluation.

Drawing uses matplotlib's Agg canvas directly (no pyplot state, no display needed); files are
written atomically.
"""
import io
import os

import cv2
import numpy as np

from .utils import atomic_write_bytes

DPI = 100


def _colors(n):
    """n distinct RGB colours in [0, 1], deterministic (tab10, then tab20b/c)."""
    from matplotlib import colormaps
    base = np.concatenate([colormaps["tab10"].colors, colormaps["tab20b"].colors,
                           colormaps["tab20c"].colors])[:, :3]
    return base[np.arange(n) % len(base)]


def _check_image(image):
    """The image as an array; ValueError unless it is RGB uint8 (H, W, 3)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError("expected an RGB uint8 image (H, W, 3), got %s %s"
                         % (image.dtype, image.shape))
    return image


def _decode_masks(entries, height, width):
    """(H, W, n) uint8 masks of the entries (zeros for entries without ``segmentation``)."""
    import pycocotools.mask as mask_util
    masks = np.zeros((height, width, len(entries)), np.uint8)
    with_mask = [j for j, e in enumerate(entries) if e.get("segmentation")]
    if with_mask:
        rles = []
        for j in with_mask:
            seg = entries[j]["segmentation"]
            if list(seg["size"]) != [height, width]:
                raise ValueError("segmentation size %s does not match the image %s"
                                 % (list(seg["size"]), [height, width]))
            rles.append(seg if not isinstance(seg["counts"], list)
                        else mask_util.frPyObjects(seg, height, width))
        masks[:, :, with_mask] = mask_util.decode(rles).reshape(height, width, len(rles))
    return masks


def _png_bytes(array_rgb_or_rgba):
    """PNG bytes of an RGB or RGBA uint8 array."""
    code = cv2.COLOR_RGB2BGR if array_rgb_or_rgba.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
    ok, data = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(array_rgb_or_rgba), code))
    if not ok:
        raise RuntimeError("could not encode a PNG")
    return data.tobytes()


def draw_instances(image, results, class_names, skeleton, out_path, score_thresh=0.5,
                   mask_alpha=0.45):
    """Draw one image's results and save a PNG of the image's size.

    Args:
        image: uint8 RGB (H, W, 3), the original image.
        results (list[dict]): COCO result entries of this image (module docstring).
        class_names (dict or None): ``{category_id: name}``; the id is shown when missing.
        skeleton: 0-based keypoint index pairs (may be empty or None).
        out_path (str): the PNG, written atomically.
        score_thresh (float): entries with ``score < score_thresh`` are skipped.
        mask_alpha (float): the opacity of the mask colours.

    Returns:
        uint8 RGB (H, W, 3): the picture as written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    image = _check_image(image)
    height, width = image.shape[:2]
    entries = [e for e in results if float(e.get("score", 1.0)) >= score_thresh]
    colors = _colors(len(entries))

    # masks: blended in numpy, shown with the image in one imshow
    canvas_img = image.astype(np.float32)
    masks = _decode_masks(entries, height, width)
    for j in range(len(entries)):
        m = masks[:, :, j].astype(bool)
        if m.any():
            canvas_img[m] = canvas_img[m] * (1 - mask_alpha) + colors[j] * 255 * mask_alpha

    # a little over the size so that Agg's int() of the pixel size cannot round it down
    fig = Figure(figsize=((width + 0.01) / DPI, (height + 0.01) / DPI), dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    # the picture goes in unresampled (figimage: one image pixel per output pixel); the
    # overlays are drawn in an axes on top whose data coordinates are image pixels
    fig.figimage(canvas_img.round().clip(0, 255).astype(np.uint8), xo=0, yo=0, origin="upper",
                 zorder=0)
    ax = fig.add_axes([0, 0, 1, 1], zorder=1)
    ax.set_axis_off()
    ax.patch.set_visible(False)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    fontsize = float(np.clip(0.02 * np.sqrt(height * width) * 72 / DPI, 5, 14))
    linewidth = float(np.clip(0.004 * np.sqrt(height * width) * 72 / DPI, 0.6, 3))
    segments, seg_colors, points, point_colors = [], [], [], []
    for j, e in enumerate(entries):
        x, y, w, h = (float(v) for v in e["bbox"])
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colors[j],
                               linewidth=linewidth))
        name = class_names.get(e["category_id"], str(e["category_id"])) if class_names \
            else str(e["category_id"])
        label = "%s %.2f" % (name, float(e["score"])) if "score" in e else name
        above = y >= fontsize * DPI / 72 + 2     # room for the label above the box?
        ax.text(max(x, 0), y if above else max(y, 0), label, fontsize=fontsize, color="white",
                va="bottom" if above else "top", ha="left", clip_on=True,
                bbox=dict(facecolor=colors[j], alpha=0.75, pad=1, edgecolor="none"))
        if e.get("keypoints"):
            kp = np.asarray(e["keypoints"], np.float64).reshape(-1, 3)
            visible = kp[:, 2] > 0
            points.append(kp[visible, :2])
            point_colors.extend([colors[j]] * int(visible.sum()))
            for a, b in (skeleton or ()):
                if a < len(kp) and b < len(kp) and visible[a] and visible[b]:
                    segments.append(kp[[a, b], :2])
                    seg_colors.append(colors[j])
    if segments:
        ax.add_collection(LineCollection(segments, colors=seg_colors, linewidths=linewidth))
    if points:
        pts = np.concatenate(points)
        ax.scatter(pts[:, 0], pts[:, 1], s=(2.5 * linewidth) ** 2 * 4, c=point_colors,
                   edgecolors="white", linewidths=0.5 * linewidth, zorder=3)
    canvas.draw()
    drawn = np.asarray(canvas.buffer_rgba())[:height, :width, :3].copy()
    if drawn.shape[:2] != (height, width):       # never expected; keep the size contract
        drawn = cv2.resize(drawn, (width, height), interpolation=cv2.INTER_NEAREST)
    atomic_write_bytes(out_path, _png_bytes(drawn))
    return drawn


def write_cutouts(image, results, out_dir, prefix, score_thresh=0.5):
    """Write one RGBA cut-out per instance, ``{prefix}_{index:03d}_c{category_id}.png``.

    The crop is the box rounded outward (floor of x1/y1, ceil of x2/y2) and clipped to the
    image; entries whose crop is empty are skipped. Alpha is the instance mask * 255, or 255
    when the entry has no ``segmentation``.

    Args:
        image: uint8 RGB (H, W, 3), the original image.
        results (list[dict]): COCO result entries of this image; ``index`` in the file name is
            the entry's position in this list.
        out_dir (str): the folder of the PNGs.
        prefix (str): the start of each file name (the image's name).
        score_thresh (float): entries with ``score < score_thresh`` are skipped.

    Returns:
        list[str]: the paths written.
    """
    image = _check_image(image)
    height, width = image.shape[:2]
    chosen = [(i, e) for i, e in enumerate(results) if float(e.get("score", 1.0)) >= score_thresh]
    paths = []
    for i, e in chosen:   # one small crop per instance; the mask is decoded per instance
        x, y, w, h = (float(v) for v in e["bbox"])
        x1, y1 = max(int(np.floor(x)), 0), max(int(np.floor(y)), 0)
        x2, y2 = min(int(np.ceil(x + w)), width), min(int(np.ceil(y + h)), height)
        if x2 <= x1 or y2 <= y1:
            continue
        rgba = np.empty((y2 - y1, x2 - x1, 4), np.uint8)
        rgba[:, :, :3] = image[y1:y2, x1:x2]
        if e.get("segmentation"):
            mask = _decode_masks([e], height, width)[y1:y2, x1:x2, 0]
            rgba[:, :, 3] = mask * 255
        else:
            rgba[:, :, 3] = 255
        path = os.path.join(out_dir, "%s_%03d_c%s.png" % (prefix, i, e.get("category_id", "")))
        atomic_write_bytes(path, _png_bytes(rgba))
        paths.append(path)
    return paths


def plot_training_curves(history, out_path):
    """Plot ``history`` to a PNG: losses (log y), learning rate, AP at each evaluation.

    Args:
        history (dict): ``{"iter": [...], "losses": {name: [...]}, "lr": [...],
            "eval": [{"iter": i, "bbox": AP, "segm": AP, "keypoints": AP}, ...]}`` (any part may
            be missing or empty; loss lists align with ``iter`` from its start), as
            :class:`mxmask.engine.trainer.History` saves it.
        out_path (str): the PNG, written atomically.

    Returns:
        str: ``out_path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    iters = np.asarray(history.get("iter") or [], np.float64)
    fig = Figure(figsize=(7, 9), dpi=DPI)
    FigureCanvasAgg(fig)
    ax_loss, ax_lr, ax_ap = fig.subplots(3, 1, sharex=True)

    any_positive = False
    for name, values in sorted((history.get("losses") or {}).items()):
        v = np.asarray(values, np.float64)
        n = min(len(v), len(iters))
        v = np.where(np.isfinite(v[:n]) & (v[:n] > 0), v[:n], np.nan)
        any_positive |= bool(np.isfinite(v).any())
        ax_loss.plot(iters[:n], v, label=name, linewidth=1)
    if any_positive:
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=7, ncol=2)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training losses")
    ax_loss.grid(alpha=0.3, which="both")

    lr = np.asarray(history.get("lr") or [], np.float64)
    n = min(len(lr), len(iters))
    ax_lr.plot(iters[:n], lr[:n], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)

    evals = history.get("eval") or []
    plotted = False
    for task, marker in (("bbox", "o"), ("segm", "s"), ("keypoints", "^")):
        pts = [(float(ev["iter"]), float(ev[task])) for ev in evals
               if ev.get(task) is not None and "iter" in ev]
        if pts:
            xs, ys = zip(*pts)
            ax_ap.plot(xs, ys, marker=marker, label=task)
            plotted = True
    if plotted:
        ax_ap.legend(fontsize=8)
    else:
        ax_ap.text(0.5, 0.5, "no evaluation yet", transform=ax_ap.transAxes, ha="center",
                   va="center", color="gray")
    ax_ap.set_ylim(0, 1)
    ax_ap.set_ylabel("AP")
    ax_ap.set_xlabel("iteration")
    ax_ap.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out_path, buf.getvalue())
    return out_path

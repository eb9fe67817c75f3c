"""The synthetic ``shapes`` dataset: coloured shapes and stick figures on textured backgrounds.

In:  an output folder, the number of train and val images, a nominal image size and a seed.
Out: ``OUT/images/{train,val}/NNNNNN.png`` (RGB) and ``OUT/annotations/{train,val}.json`` (real
     COCO: instances, crowd regions and one keypoint category), plus a summary dict with the
     number of images and instances per split.

    generate_shapes("datasets/shapes", num_train=400, num_val=50, size=192, seed=0)
    ensure_shapes("datasets/shapes")      # generates only when the json files are missing/stale

The categories have non-contiguous ids (:data:`CATEGORIES`): ellipse 1, triangle 2, rectangle 5,
star 6 (masks) and figure 9 (mask plus :data:`KEYPOINT_NAMES` and the 1-based :data:`SKELETON`).
Each annotation describes the instance's visible part (:func:`layer_annotation`). The files are
a pure function of the arguments (:func:`image_rng`, :func:`snap`).
"""
import json
import logging
import os
from collections import namedtuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from ..utils import UserError, atomic_write_json

logger = logging.getLogger(__name__)

GENERATOR = "mxmask.data.shapes"
GENERATOR_VERSION = 1
SPLITS = ("train", "val")
_SPLIT_CODES = {"train": 0, "val": 1}

ELLIPSE, TRIANGLE, RECTANGLE, STAR, FIGURE = 1, 2, 5, 6, 9
SHAPE_IDS = (ELLIPSE, TRIANGLE, RECTANGLE, STAR)
POLYGON_IDS = (TRIANGLE, RECTANGLE, STAR)

KEYPOINT_NAMES = ["head", "neck", "left_hand", "right_hand", "hip", "left_foot", "right_foot"]
SKELETON = [[1, 2], [2, 3], [2, 4], [2, 5], [5, 6], [5, 7]]
# COCO's values for the comparable joints: shoulder-like head/neck, elbow-like hands, hip, ankle.
KEYPOINT_OKS_SIGMAS = [0.079, 0.079, 0.072, 0.072, 0.107, 0.089, 0.089]

CATEGORIES = [
    {"id": ELLIPSE, "name": "ellipse", "supercategory": "shape"},
    {"id": TRIANGLE, "name": "triangle", "supercategory": "shape"},
    {"id": RECTANGLE, "name": "rectangle", "supercategory": "shape"},
    {"id": STAR, "name": "star", "supercategory": "shape"},
    {"id": FIGURE, "name": "figure", "supercategory": "figure",
     "keypoints": list(KEYPOINT_NAMES), "skeleton": [list(p) for p in SKELETON]},
]

# Sizes in pixels for a 192 image; they scale with size / 192.
_REFERENCE_SIZE = 192.0
_EXTENT_RANGE = (12.0, 100.0)          # shapes: longest dimension
_FIGURE_HEIGHT_RANGE = (42.0, 100.0)   # figures: nominal height
_FIGURE_PROB = 0.3
_CROWD_PROB = 0.1
_MAX_OBJECTS = 6
_TRIES_PER_OBJECT = 30
_MIN_VISIBLE_FRACTION = 0.5            # of an instance's full area, after later instances
_MIN_INSIDE_FRACTION = 0.6             # of an instance's full area, inside the image
_MIN_PIXELS = 20
_NONSQUARE_PROB = 0.4
_MAX_ASPECT = 1.33
_BG_COLOUR_DIST = 100.0                # RGB distance of an object's colour to the background's
_OBJ_COLOUR_DIST = 90.0                # ... and to the other objects' colours
_SNAP = 8.0                            # geometry snapped to 1/8 px

Shape = namedtuple("Shape", "category_id x0 y0 mask polygon keypoints")
"""One rasterised object: ``mask`` is a bool window whose top-left pixel is (x0, y0) in image
pixels and that holds the whole shape (also the part outside the image). ``polygon`` is the flat
COCO polygon or None; ``keypoints`` is (K, 2) in image coordinates or None."""


class Layer:
    """A placed object: its in-image mask, what of it is still visible, and how it is painted."""

    def __init__(self, shape, mask, full_area, iscrowd):
        self.shape = shape
        self.mask = mask
        self.visible = mask.copy()
        self.full_area = full_area
        self.iscrowd = iscrowd
        self.colour = None
        self.shading = None


# --------------------------------------------------------------------------------------------
# Random streams and image sizes
# --------------------------------------------------------------------------------------------
def image_rng(seed, split, index):
    """The generator of one image, independent of how many images the split has.

    Each image draws from its own ``Generator(PCG64)`` seeded with (seed, split, index), so the
    first images of a small set equal those of a large one, and a re-run gives identical bytes.
    """
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SPLIT_CODES[split], index])))


def image_hw(rng, size):
    """(height, width): mostly size x size, sometimes one side up to 1.33x longer."""
    if rng.random() >= _NONSQUARE_PROB:
        return size, size
    longer = int(round(size * rng.uniform(1.0, _MAX_ASPECT)))
    return (size, longer) if rng.random() < 0.5 else (longer, size)


def log_uniform(rng, low, high):
    """A float drawn uniformly in log space between ``low`` and ``high``."""
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def snap(values):
    """Values rounded to 1/8 px, so that the geometry is exact in floating point and in the
    json (a polygon read back rasterises to the same mask)."""
    return np.round(np.asarray(values, dtype=np.float64) * _SNAP) / _SNAP


# --------------------------------------------------------------------------------------------
# Backgrounds
# --------------------------------------------------------------------------------------------
def background_palette(rng):
    """Two background colours (2, 3) of moderate contrast."""
    c0 = rng.uniform(20.0, 235.0, 3)
    c1 = np.clip(c0 + rng.uniform(-70.0, 70.0, 3), 0.0, 255.0)
    return np.stack([c0, c1])


def background_weight(rng, h, w):
    """A (h, w) blend weight in [0, 1]: smooth noise, a gradient, stripes or a checkerboard."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:
        grid = rng.uniform(0.0, 1.0, (rng.integers(2, 8), rng.integers(2, 8))).astype(np.float32)
        return np.clip(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
    angle = rng.uniform(0.0, np.pi)
    along = xs * np.float32(np.cos(angle)) + ys * np.float32(np.sin(angle))
    if kind == 1:
        return (along - along.min()) / max(float(along.max() - along.min()), 1.0)
    period = rng.uniform(6.0, 24.0)
    if kind == 2:
        return ((along / period) % 1.0 < 0.5).astype(np.float32)
    return ((np.floor(xs / period) + np.floor(ys / period)) % 2).astype(np.float32)


def render_background(rng, h, w):
    """(background float32 (h, w, 3), palette (2, 3))."""
    palette = background_palette(rng)
    weight = background_weight(rng, h, w)[..., None]
    image = palette[0].astype(np.float32) + weight * (palette[1] - palette[0]).astype(np.float32)
    return image, palette


# --------------------------------------------------------------------------------------------
# Rasterisers: each returns a Shape whose window holds the whole object
# --------------------------------------------------------------------------------------------
def pixel_centres(xmin, ymin, xmax, ymax):
    """Window origin and pixel-centre grids (1, W) and (H, 1) covering
    [xmin, xmax] x [ymin, ymax], with a pixel of margin."""
    x0, y0 = int(np.floor(xmin)) - 1, int(np.floor(ymin)) - 1
    x1, y1 = int(np.ceil(xmax)) + 1, int(np.ceil(ymax)) + 1
    xs = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
    ys = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
    return x0, y0, xs, ys


def ellipse_shape(rng, cx, cy, extent):
    """A rotated ellipse, long axis ``extent``, short axis 45-100% of it."""
    a = extent / 2.0
    b = a * rng.uniform(0.45, 1.0)
    phi = rng.uniform(0.0, np.pi)
    x0, y0, xs, ys = pixel_centres(cx - a, cy - a, cx + a, cy + a)
    dx, dy = xs - cx, ys - cy
    u = dx * np.cos(phi) + dy * np.sin(phi)
    v = -dx * np.sin(phi) + dy * np.cos(phi)
    return Shape(ELLIPSE, x0, y0, (u / a) ** 2 + (v / b) ** 2 <= 1.0, None, None)


def capsules_mask(starts, ends, radii):
    """Union of capsules (segments thickened by a radius; a disk when start == end).

    starts, ends (S, 2), radii (S,) -> (x0, y0, bool window)."""
    lo = np.minimum(starts, ends) - radii[:, None]
    hi = np.maximum(starts, ends) + radii[:, None]
    x0, y0, xs, ys = pixel_centres(lo[:, 0].min(), lo[:, 1].min(), hi[:, 0].max(), hi[:, 1].max())
    shape = (ys.shape[0], xs.shape[1])
    points = np.stack(np.broadcast_arrays(xs, ys), axis=-1).reshape(-1, 2)            # (N, 2)
    seg = ends - starts                                                               # (S, 2)
    seg_len2 = np.maximum((seg ** 2).sum(-1), 1e-12)
    t = ((points[None] - starts[:, None]) * seg[:, None]).sum(-1) / seg_len2[:, None]       # (S, N)
    closest = starts[:, None] + np.clip(t, 0.0, 1.0)[..., None] * seg[:, None]        # (S, N, 2)
    inside = ((points[None] - closest) ** 2).sum(-1) <= (radii ** 2)[:, None]
    return x0, y0, inside.any(axis=0).reshape(shape)


def polygon_shape(category_id, points):
    """Rasterise a polygon (n, 2) with pycocotools in a window, so that the json polygon gives
    the same mask."""
    points = snap(points)
    x0 = int(np.floor(points[:, 0].min())) - 2
    y0 = int(np.floor(points[:, 1].min())) - 2
    ww = int(np.ceil(points[:, 0].max())) - x0 + 3
    hh = int(np.ceil(points[:, 1].max())) - y0 + 3
    local = (points - np.array([x0, y0], dtype=np.float64)).ravel().tolist()
    mask = mask_utils.decode(mask_utils.frPyObjects([local], hh, ww)[0]).astype(bool)
    return Shape(category_id, x0, y0, mask, points.ravel().tolist(), None)


def regular_points(cx, cy, angles, radii):
    """Points (n, 2) at ``angles`` and ``radii`` around (cx, cy)."""
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def triangle_shape(rng, cx, cy, extent):
    """A triangle with no very sharp corner: vertices near 120 degrees apart."""
    angles = rng.uniform(0, 2 * np.pi) + np.arange(3) * (2 * np.pi / 3) + rng.uniform(-0.35, 0.35, 3)
    return polygon_shape(TRIANGLE, regular_points(cx, cy, angles, extent / 2.0 * rng.uniform(0.85, 1.0, 3)))


def rectangle_shape(rng, cx, cy, extent):
    """A rotated rectangle, long side ``extent``, short side 35-100% of it."""
    half = np.array([extent, extent * rng.uniform(0.35, 1.0)]) / 2.0
    theta = rng.uniform(0, np.pi)
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return polygon_shape(RECTANGLE, corners @ rot.T + np.array([cx, cy]))


def star_shape(rng, cx, cy, extent):
    """A five-pointed star, inner radius 38-50% of the outer one."""
    outer = extent / 2.0
    radii = np.tile([outer, outer * rng.uniform(0.38, 0.5)], 5)
    angles = rng.uniform(0, 2 * np.pi) + np.arange(10) * (np.pi / 5)
    return polygon_shape(STAR, regular_points(cx, cy, angles, radii))


def figure_keypoints(rng, cx, cy, height):
    """(K, 2) keypoints in ``KEYPOINT_NAMES`` order of a figure facing the viewer, hip at (cx, cy).

    Arms hang 25-155 degrees and legs 8-40 degrees away from "down"; the body tilts by up to 25
    degrees. ``left_*`` limbs go to the figure's left, i.e. the image's right, as for COCO
    persons."""
    tilt = rng.uniform(-0.44, 0.44)
    up = np.array([np.sin(tilt), -np.cos(tilt)])
    side = np.array([np.cos(tilt), np.sin(tilt)])   # towards the image's right (figure's left)

    def limb(start, length, angle, sign):
        return start + length * (-up * np.cos(angle) + sign * side * np.sin(angle))

    hip = np.array([cx, cy])
    neck = hip + up * 0.30 * height
    head = neck + up * 0.13 * height
    arms = rng.uniform(0.44, 2.7, 2)
    legs = rng.uniform(0.14, 0.7, 2)
    arm_len, leg_len = 0.30 * height * rng.uniform(0.85, 1.1), 0.40 * height * rng.uniform(0.9, 1.1)
    points = [head, neck, limb(neck, arm_len, arms[0], 1), limb(neck, arm_len, arms[1], -1), hip,
              limb(hip, leg_len, legs[0], 1), limb(hip, leg_len, legs[1], -1)]
    return snap(points)


def figure_shape(rng, cx, cy, height):
    """A stick figure: head disk, thick torso, thin limbs ending in hand and foot disks."""
    kp = figure_keypoints(rng, cx, cy, height)
    head, neck, lhand, rhand, hip, lfoot, rfoot = kp
    limb = max(0.03 * height, 1.1)
    end = max(0.05 * height, 1.6)
    starts = np.array([head, neck, neck, neck, hip, hip, lhand, rhand, lfoot, rfoot])
    ends = np.array([head, hip, lhand, rhand, lfoot, rfoot, lhand, rhand, lfoot, rfoot])
    radii = np.array([0.10 * height, max(0.06 * height, 1.6)] + [limb] * 4 + [end] * 4)
    x0, y0, mask = capsules_mask(starts, ends, radii)
    return Shape(FIGURE, x0, y0, mask, None, kp)


def crowd_shape(rng, h, w, scale):
    """A cluster of 6-15 small blobs, later annotated as one iscrowd region of category ellipse."""
    centre = np.array([rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h])
    spread = rng.uniform(10.0, 22.0) * scale
    n = int(rng.integers(6, 16))
    centres = snap(centre + rng.normal(0.0, spread / 2.0, (n, 2)))
    x0, y0, mask = capsules_mask(centres, centres, rng.uniform(1.5, 3.0, n) * scale)
    return Shape(ELLIPSE, x0, y0, mask, None, None)


def sample_shape(rng, h, w, scale):
    """One random object anywhere in the image (placement decides whether it is kept)."""
    cx, cy = rng.uniform(0.0, w), rng.uniform(0.0, h)
    if rng.random() < _FIGURE_PROB:
        return figure_shape(rng, cx, cy, log_uniform(rng, *_FIGURE_HEIGHT_RANGE) * scale)
    extent = log_uniform(rng, *_EXTENT_RANGE) * scale
    maker = (ellipse_shape, triangle_shape, rectangle_shape, star_shape)[rng.integers(4)]
    return maker(rng, cx, cy, extent)


# --------------------------------------------------------------------------------------------
# Placement with occlusion control
# --------------------------------------------------------------------------------------------
def mask_in_image(shape, h, w):
    """The part of a shape's window inside the image, as a (h, w) bool mask."""
    out = np.zeros((h, w), dtype=bool)
    hh, ww = shape.mask.shape
    xa, ya = max(shape.x0, 0), max(shape.y0, 0)
    xb, yb = min(shape.x0 + ww, w), min(shape.y0 + hh, h)
    if xb > xa and yb > ya:
        out[ya:yb, xa:xb] = shape.mask[ya - shape.y0:yb - shape.y0, xa - shape.x0:xb - shape.x0]
    return out


def try_place(shape, layers, h, w, iscrowd=False):
    """A Layer for ``shape`` drawn on top of ``layers``, or None when it is mostly outside the image
    or would leave an earlier layer less than half visible. Updates the visibility of ``layers``."""
    full_area = int(np.count_nonzero(shape.mask))
    mask = mask_in_image(shape, h, w)
    inside = int(np.count_nonzero(mask))
    if inside < max(_MIN_PIXELS, _MIN_INSIDE_FRACTION * full_area):
        return None
    remaining = [np.count_nonzero(layer.visible & ~mask) for layer in layers]
    if any(r < _MIN_VISIBLE_FRACTION * layer.full_area for r, layer in zip(remaining, layers)):
        return None
    for layer in layers:
        layer.visible &= ~mask
    return Layer(shape, mask, full_area, iscrowd)


def distance_to_segment(points, a, b):
    """Euclidean distance of points (N, 3) to the segment from a to b (the background's colours)."""
    t = np.clip((points - a) @ (b - a) / max(float((b - a) @ (b - a)), 1e-12), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[:, None] * (b - a)), axis=1)


def object_colour(rng, palette, used):
    """An RGB colour far from every background colour (all blends of the palette) and from the
    other objects' colours."""
    candidates = rng.uniform(0.0, 255.0, (64, 3))
    margin = distance_to_segment(candidates, palette[0], palette[1]) - _BG_COLOUR_DIST
    if used:
        to_used = np.linalg.norm(candidates[:, None] - np.array(used)[None], axis=-1).min(1)
        margin = np.minimum(margin, to_used - _OBJ_COLOUR_DIST)
    good = np.flatnonzero(margin >= 0)
    return candidates[good[0] if good.size else int(np.argmax(margin))]


def place_layers(rng, h, w, scale, palette):
    """Layers in drawing order (bottom first): maybe one crowd region, then 1-6 objects."""
    layers = []
    if rng.random() < _CROWD_PROB:
        layer = try_place(crowd_shape(rng, h, w, scale), layers, h, w, iscrowd=True)
        if layer is not None:
            layers.append(layer)
    wanted = int(rng.integers(1, _MAX_OBJECTS + 1))
    placed = 0
    for _ in range(wanted * _TRIES_PER_OBJECT):
        if placed == wanted:
            break
        layer = try_place(sample_shape(rng, h, w, scale), layers, h, w)
        if layer is not None:
            layers.append(layer)
            placed += 1
    used = []
    for layer in layers:
        layer.colour = object_colour(rng, palette, used)
        layer.shading = rng.uniform(-0.15, 0.15, 2)
        used.append(layer.colour)
    return layers


# --------------------------------------------------------------------------------------------
# Painting
# --------------------------------------------------------------------------------------------
def paint_layers(background, layers, rng):
    """Composite the layers over the background with soft (blurred-mask) edges, add pixel noise,
    and return the uint8 RGB image."""
    h, w = background.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    image = background
    for layer in layers:
        alpha = cv2.GaussianBlur(layer.mask.astype(np.float32), (3, 3), 0.6)[..., None]
        box = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(layer.mask.astype(np.uint8))))
        cx, cy, extent = box[0] + box[2] / 2, box[1] + box[3] / 2, max(box[2], box[3], 1.0)
        shade = 1.0 + (layer.shading[0] * (xs - cx) + layer.shading[1] * (ys - cy)) / extent
        paint = layer.colour.astype(np.float32) * shade[..., None]
        image = image + alpha * (paint - image)
    image = image + rng.normal(0.0, rng.uniform(0.0, 6.0), image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------------------------
def encode_mask(mask):
    """pycocotools' compressed RLE of a (h, w) bool mask."""
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def uncompressed_rle_counts(mask):
    """COCO uncompressed RLE counts of a (h, w) bool mask: column-major runs, zeros first."""
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds)
    if flat[0]:
        counts = np.concatenate([[0], counts])
    return [int(c) for c in counts]


def polygon_matches(polygon, rle, h, w):
    """Whether a polygon lies inside the image and pycocotools rasterises it to exactly ``rle``."""
    xy = np.asarray(polygon).reshape(-1, 2)
    if xy.min() < 0 or xy[:, 0].max() > w or xy[:, 1].max() > h:
        return False
    return mask_utils.frPyObjects([polygon], h, w)[0]["counts"] == rle["counts"]


def segmentation_json(layer, rle, h, w):
    """The json ``segmentation`` of a layer whose visible mask has the compressed ``rle``.

    A polygon when the shape is a polygon, unoccluded and inside the image (pycocotools
    rasterises that polygon to exactly the mask); otherwise the compressed RLE of the visible
    mask. Crowd regions are uncompressed RLE, as in COCO.
    """
    if layer.iscrowd:
        return {"size": [h, w], "counts": uncompressed_rle_counts(layer.visible)}
    polygon = layer.shape.polygon
    if polygon is not None and polygon_matches(polygon, rle, h, w):
        return [polygon]
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def keypoint_visibility(points, covered, h, w):
    """COCO v per keypoint: 0 outside the image, 1 when its pixel is covered by a later layer,
    else 2."""
    x, y = points[:, 0], points[:, 1]
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    px = np.clip(np.floor(x), 0, w - 1).astype(int)
    py = np.clip(np.floor(y), 0, h - 1).astype(int)
    return np.where(inside, np.where(covered[py, px], 1, 2), 0)


def keypoints_json(points, visibility):
    """Flat COCO list [x1, y1, v1, ...], with x = y = 0 where v = 0.

    COCO keypoints are pixel indices (the centre of pixel i is i), so the continuous geometry
    (centre at i + 0.5) is shifted by -0.5, as Detectron2 reads them back."""
    xy = np.where(visibility[:, None] > 0, points - 0.5, 0.0)
    return [value for (x, y), v in zip(xy.tolist(), visibility.tolist()) for value in (x, y, int(v))]


def covered_by_later(layers, index):
    """The union of the masks of the layers drawn after ``layers[index]``."""
    later = [layer.mask for layer in layers[index + 1:]]
    return np.logical_or.reduce(later) if later else np.zeros_like(layers[index].mask)


def layer_annotation(layers, index, h, w):
    """The COCO annotation (without ids) of one layer's visible mask.

    Every mask is the instance's visible part after occlusion by the instances drawn later;
    ``area`` is its pixel count and ``bbox`` its tight pixel box (``pycocotools.mask.toBbox``).
    ``segmentation``: :func:`segmentation_json`. A figure also gets ``keypoints``
    (:func:`keypoints_json`, visibility by :func:`keypoint_visibility`) and ``num_keypoints``,
    the count of v > 0. Crowd regions (clusters of small blobs, category ellipse) have
    ``iscrowd=1``.
    """
    layer = layers[index]
    rle = encode_mask(layer.visible)
    ann = {
        "category_id": int(layer.shape.category_id),
        "segmentation": segmentation_json(layer, rle, h, w),
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": int(layer.iscrowd),
    }
    if layer.shape.keypoints is not None:
        vis = keypoint_visibility(layer.shape.keypoints, covered_by_later(layers, index), h, w)
        ann["keypoints"] = keypoints_json(layer.shape.keypoints, vis)
        ann["num_keypoints"] = int(np.count_nonzero(vis))
    return ann


def generate_image(seed, split, index, size):
    """One image: (uint8 RGB (h, w, 3), list of COCO annotations without ids)."""
    rng = image_rng(seed, split, index)
    h, w = image_hw(rng, size)
    background, palette = render_background(rng, h, w)
    layers = place_layers(rng, h, w, size / _REFERENCE_SIZE, palette)
    image = paint_layers(background, layers, rng)
    return image, [layer_annotation(layers, i, h, w) for i in range(len(layers))]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def annotation_path(out_dir, split):
    """``OUT/annotations/<split>.json``."""
    return os.path.join(out_dir, "annotations", split + ".json")


def image_dir(out_dir, split):
    """``OUT/images/<split>``."""
    return os.path.join(out_dir, "images", split)


def generation_info(split, num_images, size, seed):
    """The json's ``info``: the generator, its version and the arguments (see ensure_shapes)."""
    return {"description": "mxmask synthetic shapes", "generator": GENERATOR,
            "version": GENERATOR_VERSION, "split": split, "num_images": int(num_images),
            "size": int(size), "seed": int(seed)}


def png_bytes(image):
    """PNG bytes of a uint8 RGB image."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def write_split(out_dir, split, num_images, size, seed):
    """Write a split's PNGs and return its COCO dict (the caller writes the json)."""
    folder = image_dir(out_dir, split)
    os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, anns = generate_image(seed, split, index, size)
        image_id = index + 1
        file_name = "%06d.png" % image_id
        with open(os.path.join(folder, file_name), "wb") as f:
            f.write(png_bytes(image))
        images.append({"id": image_id, "file_name": file_name,
                       "height": int(image.shape[0]), "width": int(image.shape[1])})
        for ann in anns:
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, **ann))
    return {"info": generation_info(split, num_images, size, seed), "licenses": [],
            "images": images, "annotations": annotations,
            "categories": json.loads(json.dumps(CATEGORIES))}


def summarize_split(coco):
    """Counts of one split's COCO dict."""
    anns = coco.get("annotations", [])
    crowd = sum(1 for a in anns if a.get("iscrowd", 0))
    return {"images": len(coco.get("images", [])), "instances": len(anns) - crowd,
            "crowd_regions": crowd, "keypoint_instances": sum(1 for a in anns if "keypoints" in a)}


def check_arguments(num_train, num_val, size, seed):
    """UserError unless the counts and seed are integers >= 0 and the size one >= 64."""
    for name, value, low in (("num_train", num_train, 0), ("num_val", num_val, 0),
                             ("size", size, 64), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise UserError("shapes: %s must be an integer >= %d, got %r" % (name, low, value))


def generate_shapes(out_dir, num_train=400, num_val=50, size=192, seed=0):
    """Generate the dataset into ``out_dir``, overwriting it.

    The json files are removed first and written last (atomically), so a half-generated folder
    counts as missing.

    Args:
        out_dir (str): the dataset folder.
        num_train, num_val (int): images per split, >= 0.
        size (int): the nominal image side, >= 64; some images have one side up to 1.33x
            longer.
        seed (int): >= 0; the files are a pure function of the arguments.

    Returns:
        dict: ``{"out_dir", "generated": True, "train": {"images", "instances",
        "crowd_regions", "keypoint_instances"}, "val": {...}}``.

    Raises:
        UserError: for a bad argument or a folder that cannot be written.
    """
    check_arguments(num_train, num_val, size, seed)
    out_dir = os.path.abspath(out_dir)
    try:
        for split in SPLITS:                      # an interrupted run must look incomplete
            if os.path.exists(annotation_path(out_dir, split)):
                os.remove(annotation_path(out_dir, split))
        cocos = {split: write_split(out_dir, split, n, size, seed)
                 for split, n in zip(SPLITS, (num_train, num_val))}
        for split in SPLITS:
            atomic_write_json(annotation_path(out_dir, split), cocos[split])
    except OSError as err:
        raise UserError("shapes: cannot write the dataset in %s: %s" % (out_dir, err)) from err
    summary = {"out_dir": out_dir, "generated": True}
    for split in SPLITS:
        summary[split] = summarize_split(cocos[split])
        logger.info("shapes %s: %s", split, summary[split])
    return summary


def read_json_or_none(path):
    """The parsed json file, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ensure_shapes(out_dir, num_train=400, num_val=50, size=192, seed=0):
    """Generate the dataset unless both annotation files exist.

    Files written by this generator with other parameters (or an older generator version) are
    regenerated; a json written by something else is left alone.

    Args:
        out_dir, num_train, num_val, size, seed: as in :func:`generate_shapes`.

    Returns:
        dict: the summary of :func:`generate_shapes`, with ``generated`` telling whether the
        files were written.
    """
    check_arguments(num_train, num_val, size, seed)
    out_dir = os.path.abspath(out_dir)
    cocos = {split: read_json_or_none(annotation_path(out_dir, split)) for split in SPLITS}
    if all(isinstance(c, dict) for c in cocos.values()):
        counts = dict(zip(SPLITS, (num_train, num_val)))
        wanted = {split: generation_info(split, counts[split], size, seed) for split in SPLITS}
        infos = {split: cocos[split].get("info") or {} for split in SPLITS}
        foreign = any(infos[s].get("generator") != GENERATOR for s in SPLITS)
        if foreign or all(infos[s] == wanted[s] for s in SPLITS):
            summary = {"out_dir": out_dir, "generated": False}
            summary.update({split: summarize_split(cocos[split]) for split in SPLITS})
            return summary
    return generate_shapes(out_dir, num_train, num_val, size, seed)

"""COCO reader and dataset validation.

In:  a COCO ``instances`` or ``person_keypoints`` json file and the folder holding its images.
Out:
- :func:`load_coco` -> ``(records, info, report)``: one record dict per image in the layout fixed by
  DEVELOPING.md ("Dataset records"), a :class:`DatasetInfo` (class names and COCO ids in
  contiguous-label order, keypoint names, flip map, 0-based skeleton) and a :class:`DatasetReport`.
  It raises :class:`DatasetError` (a ``UserError``) whose message lists the problems, one per line.
- :func:`check_dataset` -> :class:`DatasetReport` (per-category counts, what was skipped and why,
  one line per problem naming the file, the image/annotation id and the field).
- :func:`run_check` prints the report and returns the CLI exit code (0 valid, 2 not).
- :func:`read_image` -> ``HxWx3`` uint8 RGB, or ``UserError`` naming the file when it is missing,
  corrupt or truncated. The data loader workers and the predictor decode through it.

The json is parsed with ``json.load`` and validated field by field before pycocotools indexes it,
so malformed input gives problem lines instead of a ``KeyError`` (or a buffer overrun in the RLE
decoder) deep inside pycocotools. Degenerate boxes (w or h < 1) are not problems: they are dropped
and counted under ``report.skipped``, as are the images that training cannot use.
"""
import contextlib
import io
import json
import math
import os
import re
import sys
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import cv2
import numpy as np
from PIL import Image

from ..utils import UserError

CHECK_MODES = ("none", "header", "full")
MAX_MESSAGE_LINES = 20
MAX_EXAMPLES = 3

SKIP_DEGENERATE = "annotation dropped: degenerate box (w or h < 1)"
SKIP_NO_ANNOTATIONS = "image skipped for training: no annotations"
SKIP_NO_USABLE = "image skipped for training: only crowd or degenerate annotations"


class DatasetError(UserError):
    """A COCO dataset with problems; the message has one line per problem."""


# --------------------------------------------------------------------------------------------
# DatasetInfo and the keypoint flip map
# --------------------------------------------------------------------------------------------
_SIDE_WORDS = {"left": "right", "right": "left", "l": "r", "r": "l"}
_SIDE_PREFIX = re.compile(r"^(left|right|l|r)([_\-\s])(.+)$", re.IGNORECASE)
_SIDE_SUFFIX = re.compile(r"^(.+?)([_\-\s])(left|right|l|r)$", re.IGNORECASE)


def mirrored_keypoint_name(name):
    """``left_eye`` -> ``right_eye`` (also ``r_ankle``, ``eye_left``); None for an unsided name."""
    match = _SIDE_PREFIX.match(name)
    if match:
        side, sep, rest = match.groups()
        return _SIDE_WORDS[side.lower()] + sep + rest.lower()
    match = _SIDE_SUFFIX.match(name)
    if match:
        rest, sep, side = match.groups()
        return rest.lower() + sep + _SIDE_WORDS[side.lower()]
    return None


def keypoint_flip_map(names):
    """Index of the mirrored keypoint for each name; identity for names without a partner."""
    index_of = {}
    for i, name in enumerate(names):
        index_of.setdefault(name.lower(), i)
    flip = []
    for i, name in enumerate(names):
        mirror = mirrored_keypoint_name(name)
        flip.append(index_of.get(mirror, i) if mirror is not None else i)
    return flip


@dataclass
class DatasetInfo:
    """Category and keypoint metadata of a dataset, in contiguous-label order.

    ``category_ids[label]`` is the COCO id of contiguous label ``label`` (categories sorted by id).
    ``skeleton`` holds 0-based keypoint index pairs.
    """
    class_names: List[str]
    category_ids: List[int]
    keypoint_names: List[str] = field(default_factory=list)
    keypoint_flip_map: List[int] = field(default_factory=list)
    skeleton: List[List[int]] = field(default_factory=list)
    keypoint_category_ids: List[int] = field(default_factory=list)   # categories with keypoints

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def num_keypoints(self):
        return len(self.keypoint_names)

    def label_to_category_id(self, labels):
        """Contiguous label(s) -> COCO category id(s): an int for a scalar, else an int64 array."""
        ids = np.asarray(self.category_ids, dtype=np.int64)
        lab = np.asarray(labels)
        idx = lab.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(ids) or np.any(idx != lab)):
            bad = lab[(idx < 0) | (idx >= len(ids)) | (idx != lab)].ravel()[0]
            raise ValueError("label %r is not a class label 0..%d" % (bad.item(), len(ids) - 1))
        out = ids[idx]
        return int(out) if out.ndim == 0 else out

    def category_id_to_label(self, category_id):
        """COCO category id -> contiguous label."""
        try:
            return self.category_ids.index(category_id)
        except ValueError:
            raise ValueError("category id %r is not one of %s" % (category_id, self.category_ids))

    def to_dict(self):
        """The fields under the names ``cfg.data`` uses (``class_names``, ``category_ids``, ...)."""
        return {"class_names": list(self.class_names),
                "category_ids": [int(c) for c in self.category_ids],
                "keypoint_names": list(self.keypoint_names),
                "keypoint_flip_map": [int(i) for i in self.keypoint_flip_map],
                "skeleton": [[int(a), int(b)] for a, b in self.skeleton],
                "keypoint_category_ids": [int(c) for c in self.keypoint_category_ids]}

    @classmethod
    def from_dict(cls, d):
        """Inverse of :meth:`to_dict`; also accepts ``cfg.data`` (any object with those fields)."""
        get = d.get if isinstance(d, dict) else (lambda k, default: getattr(d, k, default))
        names = list(get("keypoint_names", []) or [])
        flip = list(get("keypoint_flip_map", []) or []) or keypoint_flip_map(names)
        return cls(class_names=list(get("class_names", [])),
                   category_ids=[int(c) for c in get("category_ids", [])],
                   keypoint_names=names, keypoint_flip_map=flip,
                   skeleton=[list(p) for p in get("skeleton", []) or []],
                   keypoint_category_ids=[int(c) for c in
                                          get("keypoint_category_ids", []) or []])


# --------------------------------------------------------------------------------------------
# DatasetReport
# --------------------------------------------------------------------------------------------
@dataclass
class DatasetReport:
    """What validation found: counts, skipped items with reasons, and problem lines."""
    ann_file: str
    image_dir: str
    problems: List[str] = field(default_factory=list)
    skipped: Dict[str, int] = field(default_factory=OrderedDict)
    skipped_examples: Dict[str, List[str]] = field(default_factory=dict)
    categories: List[Tuple[int, str]] = field(default_factory=list)   # (id, name), by id
    instance_counts: Dict[int, int] = field(default_factory=dict)     # non-crowd, kept
    crowd_counts: Dict[int, int] = field(default_factory=dict)
    keypoint_counts: Dict[int, int] = field(default_factory=dict)     # instances with v > 0
    num_keypoints: int = 0
    num_images: int = 0        # image entries in the json
    num_records: int = 0       # images returned as records

    @property
    def ok(self):
        return not self.problems

    def add_problem(self, line):
        """Record one problem; line breaks inside names (a file_name with a newline) are escaped."""
        self.problems.append(line.replace("\r", "\\r").replace("\n", "\\n"))

    def skip(self, reason, example):
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        examples = self.skipped_examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(example)

    def error_message(self, max_lines=MAX_MESSAGE_LINES):
        """The problem lines, capped at ``max_lines`` plus a '... and N more' line."""
        lines = self.problems[:max_lines]
        if len(self.problems) > max_lines:
            lines.append("... and %d more" % (len(self.problems) - max_lines))
        return "\n".join(lines)

    def format(self):
        """Printable report: counts table, skipped lines with reasons, problem lines, status."""
        lines = ["dataset %s (images in %s)" % (self.ann_file, self.image_dir),
                 "images: %d in the json, %d usable" % (self.num_images, self.num_records)]
        lines += self._format_counts()
        if self.skipped:
            lines.append("skipped:")
            for reason, count in self.skipped.items():
                lines.append("  %6d  %s: e.g. %s"
                             % (count, reason, ", ".join(self.skipped_examples[reason])))
        if self.problems:
            lines.append("%d problem%s:" % (len(self.problems), "s" * (len(self.problems) != 1)))
            lines.extend(self.problems)
            lines.append("INVALID: %d problem%s" % (len(self.problems),
                                                   "s" * (len(self.problems) != 1)))
        else:
            lines.append("OK")
        return "\n".join(lines)

    def _format_counts(self):
        if not self.categories:
            return ["categories: none"]
        name_width = max(4, max(len(name) for _, name in self.categories))
        columns = ["instances", "crowd"] + (["keypoints"] if self.num_keypoints else [])
        header = "  %6s  %-*s" % ("id", name_width, "name") + "".join(
            "  %9s" % c for c in columns)
        lines = ["categories: %d" % len(self.categories)
                 + (", keypoints: %d" % self.num_keypoints if self.num_keypoints else ""), header]
        totals = [0] * len(columns)
        for cat_id, name in self.categories:
            values = [self.instance_counts.get(cat_id, 0), self.crowd_counts.get(cat_id, 0),
                      self.keypoint_counts.get(cat_id, 0)][:len(columns)]
            totals = [t + v for t, v in zip(totals, values)]
            lines.append("  %6d  %-*s" % (cat_id, name_width, name)
                         + "".join("  %9d" % v for v in values))
        lines.append("  %6s  %-*s" % ("", name_width, "total")
                     + "".join("  %9d" % v for v in totals))
        return lines


# --------------------------------------------------------------------------------------------
# Small value checks
# --------------------------------------------------------------------------------------------
def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return _all_finite_numbers((v,))


def _all_finite_numbers(values):
    """True if every item is an int or float (not a bool, not a string) and finite.

    Written with C-level builtins (map, set, sum): COCO has tens of millions of coordinates.
    """
    if not set(map(type, values)) <= {int, float}:
        return False
    try:
        return math.isfinite(sum(values))     # inf or nan anywhere makes the sum non-finite
    except OverflowError:                     # an int too large for a float
        return False


def _is_positive_integer(v):
    return _is_number(v) and v > 0 and float(v).is_integer()


def _short(value, limit=60):
    finite = not isinstance(value, float) or math.isfinite(value)
    text = json.dumps(value) if finite else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _type_name(value):
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(value), type(value).__name__)


def _list_ids(ids, limit=10):
    ids = sorted(ids)
    text = ", ".join(str(i) for i in ids[:limit])
    return text + (", ... (%d ids)" % len(ids) if len(ids) > limit else "")


# --------------------------------------------------------------------------------------------
# Reading and validating the json
# --------------------------------------------------------------------------------------------
def _read_json(ann_file, report):
    """Parse ``ann_file``; problems (missing, not JSON, not an object) go to ``report``."""
    try:
        with open(ann_file, "r", encoding="utf-8-sig") as f:
            data = json.load(f)
    except FileNotFoundError:
        report.add_problem("%s: annotation file not found" % ann_file)
        return None
    except IsADirectoryError:
        report.add_problem("%s: is a folder, expected a COCO json file" % ann_file)
        return None
    except UnicodeDecodeError as e:
        report.add_problem("%s: not UTF-8 text (byte %d), expected a COCO json file"
                           % (ann_file, e.start))
        return None
    except json.JSONDecodeError as e:
        report.add_problem("%s: not valid JSON: %s at line %d column %d"
                           % (ann_file, e.msg, e.lineno, e.colno))
        return None
    except (OSError, ValueError, RecursionError) as e:
        report.add_problem("%s: cannot read the annotation file (%s)" % (ann_file, e))
        return None
    if not isinstance(data, dict):
        report.add_problem("%s: expected a JSON object at the top level, got a %s"
                           % (ann_file, _type_name(data)))
        return None
    return data


def _top_level_lists(data, where, report):
    """The ``images``, ``annotations`` and ``categories`` lists, or None if one is unusable."""
    lists = {}
    for key in ("images", "annotations", "categories"):
        if key not in data:
            report.add_problem("%s: missing top-level key '%s'" % (where, key))
        elif not isinstance(data[key], list):
            report.add_problem("%s: top-level '%s' must be a list, got a %s"
                               % (where, key, _type_name(data[key])))
        else:
            lists[key] = data[key]
    return lists if len(lists) == 3 else None


_LIST_OF = {"image": "images", "annotation": "annotations", "category": "categories"}


def _entry_name(kind, index, entry):
    """``image 3`` when the entry has a usable id, else ``images[index]``."""
    if isinstance(entry, dict) and _is_int(entry.get("id")):
        return "%s %d" % (kind, entry["id"])
    return "%s[%d]" % (_LIST_OF[kind], index)


def _missing_keys(entry, keys):
    return [k for k in keys if k not in entry]


def _valid_categories(categories, where, report):
    """(category dicts that pass, sorted by id; ids of the entries that fail)."""
    valid, bad_ids = {}, set()
    for i, cat in enumerate(categories):
        name = _entry_name("category", i, cat)
        if not isinstance(cat, dict):
            report.add_problem("%s: categories[%d]: expected an object, got a %s"
                               % (where, i, _type_name(cat)))
            continue
        missing = _missing_keys(cat, ("id", "name"))
        if missing:
            report.add_problem("%s: %s: missing key%s %s" % (
                where, name, "s" * (len(missing) > 1), ", ".join("'%s'" % k for k in missing)))
            if _is_int(cat.get("id")):
                bad_ids.add(cat["id"])
            continue
        if not _is_int(cat["id"]):
            report.add_problem("%s: categories[%d]: id must be an integer, got %s"
                               % (where, i, _short(cat["id"])))
            continue
        if cat["id"] in valid:
            report.add_problem("%s: categories[%d]: duplicate category id %d"
                               % (where, i, cat["id"]))
            continue
        if not isinstance(cat["name"], str):
            report.add_problem("%s: %s: name must be a string, got %s"
                               % (where, name, _short(cat["name"])))
            bad_ids.add(cat["id"])
            continue
        valid[cat["id"]] = cat
    if not categories:
        report.add_problem("%s: 'categories' is empty, expected at least one category" % where)
    return [valid[k] for k in sorted(valid)], bad_ids


def _keypoint_names_problem(names):
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return "keypoints must be a list of keypoint names, got %s" % _short(names)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        return "keypoints has duplicate names: %s" % ", ".join(duplicates)
    return None


def _skeleton_problem(skeleton, num_keypoints):
    if not isinstance(skeleton, list):
        return "skeleton must be a list of [a, b] pairs, got %s" % _short(skeleton)
    for j, pair in enumerate(skeleton):
        if not (isinstance(pair, list) and len(pair) == 2 and all(_is_int(v) for v in pair)):
            return "skeleton pair %d must be 2 integers, got %s" % (j, _short(pair))
        if not all(1 <= v <= num_keypoints for v in pair):
            return ("skeleton pair %d %s is out of range 1..%d (1-based keypoint indices)"
                    % (j, _short(pair), num_keypoints))
    return None


def _keypoint_spec(categories, where, report):
    """(keypoint names, 0-based skeleton, {category id: K}) shared by the keypoint categories."""
    names, skeleton, owner = [], [], None
    per_category = {}
    for cat in categories:
        cat_names = cat.get("keypoints") or []
        problem = _keypoint_names_problem(cat_names)
        if problem is None and cat_names:
            problem = _skeleton_problem(cat.get("skeleton") or [], len(cat_names))
        if problem is not None:
            report.add_problem("%s: category %d: %s" % (where, cat["id"], problem))
            per_category[cat["id"]] = None          # its keypoints cannot be checked
            continue
        per_category[cat["id"]] = len(cat_names)
        if not cat_names:
            continue
        if owner is None:
            owner, names = cat, list(cat_names)
            skeleton = [[a - 1, b - 1] for a, b in cat.get("skeleton") or []]
        elif cat_names != names:
            report.add_problem(
                "%s: category %d: keypoints %s differ from category %d's %s (all categories "
                "with keypoints must share one list)"
                % (where, cat["id"], _short(cat_names), owner["id"], _short(names)))
            per_category[cat["id"]] = None
    return names, skeleton, per_category


def _valid_images(images, where, report):
    """{id: image dict} of the image entries that pass; ids of entries that fail."""
    valid, bad_ids, first_index = OrderedDict(), set(), {}
    for i, img in enumerate(images):
        name = _entry_name("image", i, img)
        if not isinstance(img, dict):
            report.add_problem("%s: images[%d]: expected an object, got a %s"
                               % (where, i, _type_name(img)))
            continue
        missing = _missing_keys(img, ("id", "file_name", "width", "height"))
        if missing:
            report.add_problem("%s: %s: missing key%s %s" % (
                where, name, "s" * (len(missing) > 1), ", ".join("'%s'" % k for k in missing)))
            if _is_int(img.get("id")):
                bad_ids.add(img["id"])
            continue
        if not _is_int(img["id"]):
            report.add_problem("%s: images[%d]: id must be an integer, got %s"
                               % (where, i, _short(img["id"])))
            continue
        if img["id"] in first_index:
            report.add_problem("%s: image %d: duplicate image id (images[%d] and images[%d])"
                               % (where, img["id"], first_index[img["id"]], i))
            continue
        first_index[img["id"]] = i
        problems = []
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            problems.append("file_name must be a non-empty string, got %s"
                            % _short(img["file_name"]))
        for key in ("width", "height"):
            if not _is_positive_integer(img[key]):
                problems.append("%s must be a positive integer, got %s" % (key, _short(img[key])))
        for problem in problems:
            report.add_problem("%s: image %d: %s" % (where, img["id"], problem))
        if problems:
            bad_ids.add(img["id"])
        else:
            valid[img["id"]] = img
    return valid, bad_ids


def _bbox_problem(bbox):
    if not (isinstance(bbox, list) and len(bbox) == 4 and _all_finite_numbers(bbox)):
        return "bbox must be 4 finite numbers [x, y, w, h], got %s" % _short(bbox)
    if bbox[2] < 0 or bbox[3] < 0:
        return "bbox %s has a negative width or height" % _short(bbox)
    return None


def decode_rle_string(text):
    """Counts of a compressed COCO RLE string (the inverse of pycocotools' ``rleToString``).

    Raises ValueError for a character outside the alphabet or a string ending mid-number, which
    pycocotools' C decoder would read past.
    """
    counts, p, n = [], 0, len(text)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("compressed RLE counts end in the middle of a number")
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise ValueError("compressed RLE counts contain the character %r" % text[p])
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _rle_problem(segm, height, width):
    missing = _missing_keys(segm, ("counts", "size"))
    if missing:
        return "segmentation RLE is missing %s" % ", ".join("'%s'" % k for k in missing)
    size, counts = segm["size"], segm["counts"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
        return "segmentation RLE size must be [height, width], got %s" % _short(size)
    if size != [height, width]:
        return ("segmentation RLE size %s does not match the image's [height, width] [%d, %d]"
                % (_short(size), height, width))
    if isinstance(counts, str):
        try:
            counts = decode_rle_string(counts)
        except ValueError as e:
            return "segmentation %s" % e
    elif isinstance(counts, list):
        if not set(map(type, counts)) <= {int}:
            return "segmentation RLE counts must be integers"
    else:
        return "segmentation RLE counts must be a string or a list, got a %s" % _type_name(counts)
    if any(c < 0 for c in counts):
        return "segmentation RLE counts contain a negative run"
    if sum(counts) != height * width:
        return ("segmentation RLE counts cover %d pixels, expected height x width = %d"
                % (sum(counts), height * width))
    return None


def _polygons_problem(segm):
    if not segm:
        return "segmentation is an empty list, expected polygons"
    for j, poly in enumerate(segm):
        if not isinstance(poly, list):
            return ("segmentation polygon %d must be a flat list of numbers [x1, y1, x2, y2, ...], "
                    "got a %s" % (j, _type_name(poly)))
        if not _all_finite_numbers(poly):
            return "segmentation polygon %d has a value that is not a finite number" % j
        if len(poly) < 6 or len(poly) % 2:
            return ("segmentation polygon %d has %d values, expected an even number >= 6"
                    % (j, len(poly)))
    return None


def _segmentation_problem(segm, height, width):
    """None for a list of polygons or an RLE dict that fits an image of ``height x width``."""
    if isinstance(segm, list):
        return _polygons_problem(segm)
    if isinstance(segm, dict):
        return _rle_problem(segm, height, width)
    return ("segmentation must be a list of polygons or an RLE object, got a %s"
            % _type_name(segm))


def _keypoints_problem(kps, num_keypoints, cat):
    described = "category %d '%s'" % (cat["id"], cat["name"])
    if not isinstance(kps, list):
        return "keypoints must be a list of numbers, got a %s" % _type_name(kps)
    if num_keypoints == 0:
        if kps:
            return "keypoints given but %s has no keypoint names" % described
        return None
    if len(kps) != 3 * num_keypoints:
        return ("keypoints has %d values, expected %d (3 x %d keypoints of %s)"
                % (len(kps), 3 * num_keypoints, num_keypoints, described))
    if not _all_finite_numbers(kps):
        return "keypoints has a value that is not a finite number"
    bad_v = [v for v in kps[2::3] if v not in (0, 1, 2)]
    if bad_v:
        return "keypoints visibility must be 0, 1 or 2, got %s" % _short(bad_v[0])
    return None


def _annotation_problems(ann, img, cat, num_keypoints, has_segmentations):
    """Problems (without the location prefix) of an annotation whose image and category exist."""
    problems = []
    bbox_problem = _bbox_problem(ann["bbox"])
    if bbox_problem:
        problems.append(bbox_problem)
    if ann.get("iscrowd", 0) not in (0, 1):
        problems.append("iscrowd must be 0 or 1, got %s" % _short(ann.get("iscrowd")))
    segm = ann.get("segmentation")
    if segm is not None:
        problem = _segmentation_problem(segm, int(img["height"]), int(img["width"]))
        if problem:
            problems.append(problem)
    elif has_segmentations:
        problems.append("segmentation is missing (other annotations in the file have one)")
    if "keypoints" in ann and num_keypoints is not None:
        problem = _keypoints_problem(ann["keypoints"], num_keypoints, cat)
        if problem:
            problems.append(problem)
    return problems


def _valid_annotations(annotations, images, bad_image_ids, categories, bad_category_ids,
                       kp_per_category, where, report):
    """The annotations that pass; those of images or categories that failed are left out quietly
    (their entry already has a problem line)."""
    cats = {c["id"]: c for c in categories}
    has_segmentations = any(isinstance(a, dict) and a.get("segmentation") is not None
                            for a in annotations)
    valid, seen = [], {}
    for i, ann in enumerate(annotations):
        name = _entry_name("annotation", i, ann)
        if not isinstance(ann, dict):
            report.add_problem("%s: annotations[%d]: expected an object, got a %s"
                               % (where, i, _type_name(ann)))
            continue
        missing = _missing_keys(ann, ("id", "image_id", "category_id", "bbox"))
        if missing:
            report.add_problem("%s: %s: missing key%s %s" % (
                where, name, "s" * (len(missing) > 1), ", ".join("'%s'" % k for k in missing)))
            continue
        if not _is_int(ann["id"]):
            report.add_problem("%s: annotations[%d]: id must be an integer, got %s"
                               % (where, i, _short(ann["id"])))
            continue
        if ann["id"] in seen:
            report.add_problem("%s: annotation %d: duplicate annotation id (annotations[%d] and "
                               "annotations[%d])" % (where, ann["id"], seen[ann["id"]], i))
            continue
        seen[ann["id"]] = i
        image_id, cat_id = ann["image_id"], ann["category_id"]
        if ((_is_int(image_id) and image_id in bad_image_ids)
                or (_is_int(cat_id) and cat_id in bad_category_ids)):
            continue
        located = True
        if not (_is_int(image_id) and image_id in images):
            report.add_problem("%s: %s: image_id %s is not in images"
                               % (where, name, _short(image_id)))
            located = False
        if not (_is_int(cat_id) and cat_id in cats):
            report.add_problem("%s: %s: category_id %s is not in categories (known ids: %s)"
                               % (where, name, _short(cat_id), _list_ids(cats)))
            located = False
        if not located:
            continue
        problems = _annotation_problems(ann, images[image_id], cats[cat_id],
                                        kp_per_category.get(cat_id), has_segmentations)
        for problem in problems:
            report.add_problem("%s: %s: %s" % (where, name, problem))
        if not problems:
            valid.append(ann)
    return valid, has_segmentations


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------
def _coco_index(dataset):
    """pycocotools' index of an already validated dataset dict, without its prints."""
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _instance_keypoints(ann, num_keypoints, kp_per_category):
    """(K, 3) float32; zeros (v = 0) for categories without keypoints or a missing field."""
    if kp_per_category.get(ann["category_id"]) and ann.get("keypoints"):
        # COCO's integer pixel indices; load_coco adds the keypoint offset
        return np.asarray(ann["keypoints"], dtype=np.float32).reshape(num_keypoints, 3)
    return np.zeros((num_keypoints, 3), np.float32)


def _record_for_image(img, anns, label_of, num_keypoints, kp_per_category, has_segmentations,
                      image_dir, report):
    """One record (DEVELOPING.md layout); drops degenerate boxes and counts instances."""
    boxes, labels, segms, kps, crowd_boxes, crowd_segms = [], [], [], [], [], []
    for ann in anns:
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w < 1 or h < 1:
            report.skip(SKIP_DEGENERATE, "annotation %d" % ann["id"])
            continue
        cat_id = ann["category_id"]
        if ann.get("iscrowd", 0):
            crowd_boxes.append([x, y, x + w, y + h])
            crowd_segms.append(ann.get("segmentation"))
            report.crowd_counts[cat_id] = report.crowd_counts.get(cat_id, 0) + 1
            continue
        boxes.append([x, y, x + w, y + h])
        labels.append(label_of[cat_id])
        segms.append(ann.get("segmentation"))
        report.instance_counts[cat_id] = report.instance_counts.get(cat_id, 0) + 1
        if num_keypoints:
            kp = _instance_keypoints(ann, num_keypoints, kp_per_category)
            kps.append(kp)
            if np.any(kp[:, 2] > 0):
                report.keypoint_counts[cat_id] = report.keypoint_counts.get(cat_id, 0) + 1
    return {
        "image_id": img["id"],
        "file_name": os.path.abspath(os.path.join(image_dir, img["file_name"])),
        "height": int(img["height"]),
        "width": int(img["width"]),
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, np.int32).reshape(-1),
        "segmentations": segms if has_segmentations else None,
        "keypoints": (np.asarray(kps, np.float32).reshape(-1, num_keypoints, 3)
                      if num_keypoints else None),
        "crowd_boxes": np.asarray(crowd_boxes, np.float32).reshape(-1, 4),
        "crowd_segmentations": crowd_segms,
    }


def _build_records(images, annotations, categories, info, kp_per_category, has_segmentations,
                   image_dir, for_training, report):
    """Records in json image order; for training, images without a usable instance are skipped."""
    dataset = {"images": list(images.values()), "annotations": annotations,
               "categories": categories}
    coco = _coco_index(dataset)
    label_of = {cat_id: label for label, cat_id in enumerate(info.category_ids)}
    records = []
    for image_id, img in images.items():
        anns = coco.imgToAnns.get(image_id, [])
        record = _record_for_image(img, anns, label_of, info.num_keypoints, kp_per_category,
                                   has_segmentations, image_dir, report)
        if for_training and len(record["boxes"]) == 0:
            report.skip(SKIP_NO_ANNOTATIONS if not anns else SKIP_NO_USABLE, "image %d" % image_id)
            continue
        records.append(record)
    return records


# --------------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------------
def _jpeg_truncation_problem(data):
    """None if the JPEG has an end-of-image marker after its first scan, else what is wrong."""
    pos = 2
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return "truncated JPEG (the file ends before the image data)"
        marker = data[pos + 1]
        if marker == 0xFF or marker == 0x00:        # fill byte / stuffed byte: keep looking
            pos += 1
            continue
        if marker == 0xD9:
            return "corrupt JPEG (end-of-image marker before any image data)"
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if pos + 4 > len(data):
            return "truncated JPEG (the file ends inside a header segment)"
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        pos += 2 + length
        if marker == 0xDA:                          # start of scan: the image data follows
            break
    if data.find(b"\xff\xd9", pos) < 0:
        return "truncated JPEG (no end-of-image marker)"
    return None


def _png_truncation_problem(data):
    """None if walking the PNG chunks reaches IEND, else what is wrong."""
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IEND":
            return None
        pos += 12 + length
    return "truncated PNG (no IEND chunk)"


def _truncation_problem(data):
    if data[:2] == b"\xff\xd8":
        return _jpeg_truncation_problem(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_truncation_problem(data)
    return None


def _decode_image(path):
    """(RGB image, None) or (None, problem). Ignores EXIF orientation so sizes match the json."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, "image file not found"
    except IsADirectoryError:
        return None, "is a folder, expected an image file"
    except OSError as e:
        return None, "cannot read the image file (%s)" % (e.strerror or e)
    if not data:
        return None, "empty image file"
    problem = _truncation_problem(data)
    if problem:
        return None, problem
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8),
                             cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as e:
        return None, "OpenCV cannot decode the image (%s)" % str(e).strip().splitlines()[-1]
    if image is None:
        return None, "corrupt or unsupported image file (OpenCV cannot decode it)"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), None


def read_image(path):
    """Decode an image file into an ``HxWx3`` uint8 RGB array.

    Raises UserError naming the file when it is missing, empty, corrupt or truncated (JPEG files
    must have their end-of-image marker and PNG files their IEND chunk).
    """
    image, problem = _decode_image(path)
    if problem:
        raise UserError("%s: %s" % (path, problem))
    return image


def _header_size(path):
    """((width, height), None) from the file header without decoding, or (None, problem)."""
    try:
        with Image.open(path) as im:
            return im.size, None
    except FileNotFoundError:
        return None, "image file not found"
    except IsADirectoryError:
        return None, "is a folder, expected an image file"
    except Exception as e:   # PIL raises many types for bad headers; all mean the same here
        return None, "cannot read the image header (%s)" % (str(e) or type(e).__name__)


def _image_file_problem(path, width, height, mode):
    """None if the file at ``path`` is an image of ``width x height`` (decoded fully if 'full')."""
    try:
        size, problem = _header_size(path)
        if problem:
            return problem
        if tuple(size) != (width, height):
            return ("file is %dx%d (width x height) but the json says %dx%d"
                    % (size[0], size[1], width, height))
        if mode == "full":
            image, problem = _decode_image(path)
            if problem:
                return problem
            if image.shape[:2] != (height, width):
                return ("decoded image is %dx%d (width x height) but the json says %dx%d"
                        % (image.shape[1], image.shape[0], width, height))
        return None
    except Exception as e:   # never let a decoder error escape as a traceback
        return "cannot check the image file (%s: %s)" % (type(e).__name__, e)


def _check_image_files(images, image_dir, mode, report):
    """Check each image file in a thread pool (PIL and OpenCV release the GIL while decoding)."""
    if not os.path.isdir(image_dir):
        report.add_problem("%s: image folder not found" % image_dir)
        return
    jobs = [(os.path.join(image_dir, img["file_name"]), int(img["width"]), int(img["height"]),
             img["id"]) for img in images]
    workers = min(32, 2 * (os.cpu_count() or 1) + 2)

    def check(job):
        return _image_file_problem(job[0], job[1], job[2], mode)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(check, jobs)
        if len(jobs) >= 2000:
            from tqdm import tqdm
            results = tqdm(results, total=len(jobs), desc="checking images", file=sys.stderr,
                           disable=not sys.stderr.isatty())
        for (path, _, _, image_id), problem in zip(jobs, results):
            if problem:
                report.add_problem("%s: image %d: %s" % (path, image_id, problem))


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def _check_mode(check_images):
    mode = "none" if check_images in (None, False) else check_images
    if mode not in CHECK_MODES:
        raise UserError("check_images must be one of %s, got %r" % (", ".join(CHECK_MODES),
                                                                  check_images))
    return mode


def _inspect(ann_file, image_dir, for_training, check_images, check_all_images):
    """Validate the json, build records, check image files. -> (records, info, report)."""
    mode = _check_mode(check_images)
    where = str(ann_file)
    image_dir = str(image_dir)
    report = DatasetReport(ann_file=where, image_dir=image_dir)
    data = _read_json(where, report)
    lists = _top_level_lists(data, where, report) if data is not None else None
    if lists is None:
        return [], DatasetInfo([], []), report
    report.num_images = len(lists["images"])
    categories, bad_category_ids = _valid_categories(lists["categories"], where, report)
    kp_names, skeleton, kp_per_category = _keypoint_spec(categories, where, report)
    info = DatasetInfo(class_names=[c["name"] for c in categories],
                       category_ids=[c["id"] for c in categories],
                       keypoint_names=kp_names, keypoint_flip_map=keypoint_flip_map(kp_names),
                       skeleton=skeleton,
                       keypoint_category_ids=[c["id"] for c in categories
                                              if kp_per_category.get(c["id"])])
    report.categories = [(c["id"], c["name"]) for c in categories]
    report.num_keypoints = info.num_keypoints
    images, bad_image_ids = _valid_images(lists["images"], where, report)
    annotations, has_segmentations = _valid_annotations(
        lists["annotations"], images, bad_image_ids, categories, bad_category_ids, kp_per_category,
        where, report)
    try:
        records = _build_records(images, annotations, categories, info, kp_per_category,
                                 has_segmentations, image_dir, for_training, report)
    except Exception as e:   # validation should make this unreachable; keep it one line anyway
        report.add_problem("%s: cannot index the annotations (%s: %s)"
                           % (where, type(e).__name__, e))
        return [], info, report
    report.num_records = len(records)
    if not records and report.ok:
        report.add_problem("%s: no usable image (%d images in the json; see 'skipped')"
                           % (where, len(lists["images"])))
    if mode != "none":
        to_check = list(images.values()) if check_all_images else [
            images[r["image_id"]] for r in records]
        _check_image_files(to_check, image_dir, mode, report)
    return records, info, report


def load_coco(ann_file, image_dir, for_training=True, check_images="header",
              keypoint_offset=0.5):
    """Read a COCO json into records. -> (records, DatasetInfo, DatasetReport).

    ``for_training`` skips images without a usable (non-crowd, non-degenerate) instance.
    ``check_images``: 'none', 'header' (file exists, header size matches the json) or 'full'
    (also decode it). ``keypoint_offset`` (``data.keypoint_offset``) is added to the x and y of
    labelled keypoints: COCO's integer pixel indices become mxmask's continuous coordinates,
    where the centre of pixel i is i + 0.5 (Detectron2; torchvision uses the indices as they
    are, offset 0). Raises DatasetError listing the problems (at most 20 lines).
    """
    records, info, report = _inspect(ann_file, image_dir, for_training, check_images,
                                     check_all_images=False)
    if not report.ok:
        raise DatasetError(report.error_message())
    for record in records:
        kps = record.get("keypoints")
        if kps is not None and keypoint_offset:
            kps[..., :2] += np.where(kps[..., 2:] > 0, keypoint_offset, 0.0).astype(np.float32)
    return records, info, report


def check_dataset(ann_file, image_dir, check_images="full"):
    """Validate a dataset as training would use it, checking every image file. -> DatasetReport."""
    _, _, report = _inspect(ann_file, image_dir, True, check_images, check_all_images=True)
    return report


def run_check(ann_file, image_dir):
    """``mxmask data check``: print the report; return 0 if the dataset is valid, else 2."""
    report = check_dataset(ann_file, image_dir, check_images="full")
    print(report.format())
    return 0 if report.ok else 2

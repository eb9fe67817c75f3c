"""Validation of a COCO json, field by field, before pycocotools indexes it.

    report = DatasetReport(ann_file)
    dataset = read_json(ann_file, report)        # then the checks below, each adding problems

In: the parsed json (a dict). Out: a :class:`DatasetReport`: one problem line per bad entry,
naming the file, the image/annotation/category id and the field (a malformed file gives these
lines instead of a ``KeyError``, or a buffer overrun in the RLE decoder, deep inside pycocotools),
per-category counts, and what training skips and why. Degenerate boxes (w or h < 1) are not
problems: :mod:`mxmask.data.coco` drops and counts them. Checks: the top-level lists, each
category (names, keypoint names, a skeleton of 1-based pairs), each image (ids, positive integer
sizes, file names), each annotation (its image and category exist; finite bbox; polygons or an
RLE that fits the image; ``3 * K`` keypoint values with visibility 0, 1 or 2).
"""
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

__all__ = ["DatasetReport", "read_json", "top_level_lists", "valid_categories", "keypoint_spec",
           "valid_images", "valid_annotations", "decode_rle_string"]

MAX_MESSAGE_LINES = 20
MAX_EXAMPLES = 3


# --------------------------------------------------------------------------------------------
# DatasetReport
# --------------------------------------------------------------------------------------------
@dataclass
class DatasetReport:
    """What validation found: counts, skipped items with reasons, and problem lines.

    Attributes:
        ann_file, image_dir (str): the dataset.
        problems (list[str]): one line per problem, naming the file, the entry and the field;
            the dataset is valid (``ok``) when empty.
        skipped (dict): ``{reason: count}`` of what training skips (not problems), with up to
            three ``skipped_examples`` per reason.
        categories (list): ``(id, name)`` of the valid categories, by id.
        instance_counts, crowd_counts, keypoint_counts (dict): per category id: kept non-crowd
            instances, crowd instances, instances with a labelled keypoint.
        num_keypoints (int): K of the keypoint categories (0 without).
        num_images (int), num_records (int): image entries in the json, images returned as
            records.
    """
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
        """Count one skipped item under ``reason``, keeping a few examples ("image 3")."""
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
        """The per-category counts table, with a total row."""
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
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


# ids are int64 from the loader on (the batches' image_id) and in pycocotools' evaluation
# (np.unique of the image ids); a larger json integer would first fail there, as an OverflowError
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1


def id_range_problem(field_name, value):
    """The problem text of an integer id that does not fit in int64, else None.

    Args:
        field_name: the field, for the text (``id``, ``image_id``, ``category_id``).
        value: the id, an int.

    Returns:
        ``"id must fit in int64 (-2^63 to 2^63-1), got ..."`` or None.
    """
    if INT64_MIN <= value <= INT64_MAX:
        return None
    return "%s must fit in int64 (-2^63 to 2^63-1), got %s" % (field_name, _short(value))


def _is_number(v):
    """A finite int or float (not a bool)."""
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
    """A finite number > 0 with an integer value (``640`` or ``640.0``)."""
    return _is_number(v) and v > 0 and float(v).is_integer()


def _short(value, limit=60):
    """A value as json text for a message, cut to ``limit`` characters."""
    finite = not isinstance(value, float) or math.isfinite(value)
    text = json.dumps(value) if finite else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _type_name(value):
    """The json name of a value's type ("object", "list", "string", ...)."""
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(value), type(value).__name__)


def _list_ids(ids, limit=10):
    """Sorted ids for a message, cut after ``limit``."""
    ids = sorted(ids)
    text = ", ".join(str(i) for i in ids[:limit])
    return text + (", ... (%d ids)" % len(ids) if len(ids) > limit else "")


# --------------------------------------------------------------------------------------------
# Reading and validating the json
# --------------------------------------------------------------------------------------------
def read_json(ann_file, report):
    """Parse a COCO json file.

    Args:
        ann_file (str): the json file.
        report (DatasetReport): gets one problem line when the file is missing, not UTF-8, not
            JSON or not an object at the top level.

    Returns:
        dict or None: the parsed json; None after a problem.
    """
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


def top_level_lists(data, where, report):
    """The three top-level lists of a COCO json.

    Args:
        data (dict): the parsed json.
        where (str): the file name for the problem lines.
        report (DatasetReport): gets a problem line per missing or non-list key.

    Returns:
        dict or None: ``{"images": [...], "annotations": [...], "categories": [...]}``, or None
        if one is unusable.
    """
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
    """The ``keys`` that ``entry`` lacks, in order."""
    return [k for k in keys if k not in entry]


def valid_categories(categories, where, report):
    """Check the category entries (an object with an integer ``id``, unique, and a string
    ``name``).

    Args:
        categories (list): the json's ``categories``.
        where (str): the file name for the problem lines.
        report (DatasetReport): gets one problem line per bad entry.

    Returns:
        tuple: ``(valid, bad_ids)``: the category dicts that pass, sorted by id, and the ids of
        the entries that fail (their annotations are left out without further lines).
    """
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
        if id_range_problem("id", cat["id"]):
            report.add_problem("%s: categories[%d]: %s"
                               % (where, i, id_range_problem("id", cat["id"])))
            bad_ids.add(cat["id"])            # its annotations are skipped, not reported again
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
    """None for a list of distinct keypoint names, else what is wrong."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return "keypoints must be a list of keypoint names, got %s" % _short(names)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        return "keypoints has duplicate names: %s" % ", ".join(duplicates)
    return None


def _skeleton_problem(skeleton, num_keypoints):
    """None for a list of 1-based [a, b] pairs within 1..num_keypoints, else what is wrong."""
    if not isinstance(skeleton, list):
        return "skeleton must be a list of [a, b] pairs, got %s" % _short(skeleton)
    for j, pair in enumerate(skeleton):
        if not (isinstance(pair, list) and len(pair) == 2 and all(_is_int(v) for v in pair)):
            return "skeleton pair %d must be 2 integers, got %s" % (j, _short(pair))
        if not all(1 <= v <= num_keypoints for v in pair):
            return ("skeleton pair %d %s is out of range 1..%d (1-based keypoint indices)"
                    % (j, _short(pair), num_keypoints))
    return None


def keypoint_spec(categories, where, report):
    """The keypoint set shared by the keypoint categories.

    Every category with ``keypoints`` must carry the same name list (distinct names) and a
    ``skeleton`` of 1-based pairs; a category that breaks this gets a problem line.

    Args:
        categories (list[dict]): the valid categories (:func:`valid_categories`).
        where (str): the file name for the problem lines.
        report (DatasetReport): gets the problem lines.

    Returns:
        tuple: ``(names, skeleton, per_category)``: the keypoint names (empty without
        keypoints), the skeleton as 0-based pairs, and ``{category id: K}`` (0 for a category
        without keypoints, None for one whose keypoint fields failed).
    """
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


def valid_images(images, where, report):
    """Check the image entries (an object with a unique integer ``id``, a non-empty string
    ``file_name`` and positive integer ``width`` and ``height``).

    Args:
        images (list): the json's ``images``.
        where (str): the file name for the problem lines.
        report (DatasetReport): gets one problem line per bad entry.

    Returns:
        tuple: ``(valid, bad_ids)``: ``{id: image dict}`` of the entries that pass, in json
        order, and the ids of the entries that fail.
    """
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
        if id_range_problem("id", img["id"]):
            report.add_problem("%s: images[%d]: %s"
                               % (where, i, id_range_problem("id", img["id"])))
            bad_ids.add(img["id"])            # its annotations are skipped, not reported again
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
    """None for 4 finite numbers [x, y, w, h] with w, h >= 0, else what is wrong."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and _all_finite_numbers(bbox)):
        return "bbox must be 4 finite numbers [x, y, w, h], got %s" % _short(bbox)
    if bbox[2] < 0 or bbox[3] < 0:
        return "bbox %s has a negative width or height" % _short(bbox)
    return None


def decode_rle_string(text):
    """Decode a compressed COCO RLE string (the inverse of pycocotools' ``rleToString``).

    Args:
        text (str): the ``counts`` string.

    Returns:
        list[int]: the run lengths.

    Raises:
        ValueError: for a character outside the alphabet or a string ending mid-number, which
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
    """None for an RLE dict of the image's size whose runs cover it, else what is wrong."""
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
    """None for a non-empty list of flat polygons of >= 3 finite points, else what is wrong."""
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
    """None for ``3 * K`` finite values with visibility 0, 1 or 2, else what is wrong."""
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


def valid_annotations(annotations, images, bad_image_ids, categories, bad_category_ids,
                       kp_per_category, where, report):
    """Check the annotation entries against the valid images and categories.

    Each annotation needs a unique integer ``id``, an existing ``image_id`` and
    ``category_id``, a finite ``bbox``, ``iscrowd`` 0 or 1, polygons or an RLE that fits the
    image (required when other annotations have one), and ``3 * K`` keypoint values with
    visibility 0, 1 or 2. Annotations of images or categories that failed are left out quietly
    (their entry already has a problem line).

    Args:
        annotations (list): the json's ``annotations``.
        images (dict): ``{id: image}`` of :func:`valid_images`; bad_image_ids its failures.
        categories (list[dict]): of :func:`valid_categories`; bad_category_ids its failures.
        kp_per_category (dict): ``{category id: K}`` of :func:`keypoint_spec`.
        where (str): the file name for the problem lines.
        report (DatasetReport): gets one problem line per problem.

    Returns:
        tuple: ``(valid, has_segmentations)``: the annotations that pass, and whether any
        annotation has a ``segmentation``.
    """
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
        if id_range_problem("id", ann["id"]):
            report.add_problem("%s: annotations[%d]: %s"
                               % (where, i, id_range_problem("id", ann["id"])))
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
        for key in ("image_id", "category_id"):
            if _is_int(ann[key]) and id_range_problem(key, ann[key]):
                report.add_problem("%s: %s: %s" % (where, name, id_range_problem(key, ann[key])))
                located = False
        if not located:
            continue
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

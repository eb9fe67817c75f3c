"""COCO datasets as records: reading, with the validation of :mod:`mxmask.data.validation`.

In:  a COCO ``instances`` or ``person_keypoints`` json file and the folder holding its images.
Out:
- :func:`load_coco` -> ``(records, info, report)``: one record dict per image in the layout fixed by
  DEVELOPING.md ("Dataset records"), a :class:`DatasetInfo` (class names and COCO ids in
  contiguous-label order, keypoint names, flip map, 0-based skeleton) and a
  :class:`~mxmask.data.validation.DatasetReport`. It raises :class:`DatasetError` (a
  ``UserError``) whose message lists the problems, one per line.
- :func:`check_dataset` -> the report (per-category counts, what was skipped and why, one line
  per problem naming the file, the image/annotation id and the field); :func:`run_check` prints
  it and returns the CLI exit code (0 valid, 2 not).
- :func:`keypoint_flip_map` of keypoint names (``left_*`` <-> ``right_*``).

Degenerate boxes (w or h < 1) are dropped and counted under ``report.skipped``, as are the images
that training cannot use. Image files are checked by :mod:`mxmask.data.images`.
"""
import contextlib
import io
import os
import re
from dataclasses import dataclass, field
from typing import List

import numpy as np

from ..utils import UserError
from .images import check_image_files
from .validation import (DatasetReport, keypoint_spec, read_json, top_level_lists,  # noqa: F401
                         valid_annotations, valid_categories, valid_images)

CHECK_MODES = ("none", "header", "full")

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
    """The horizontal-flip map of a keypoint list.

    Args:
        names (list[str]): keypoint names; ``left_*`` / ``right_*`` (also ``l_*``, ``*_left``,
            ..., case-insensitive) pair up.

    Returns:
        list[int]: for each keypoint, the index of its mirror image; its own index for names
        without a partner.
    """
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

    Attributes:
        class_names (list[str]): the category names, categories sorted by id.
        category_ids (list[int]): ``category_ids[label]`` is the COCO id of contiguous label
            ``label``.
        keypoint_names (list[str]): the names shared by the keypoint categories (may be empty).
        keypoint_flip_map (list[int]): :func:`keypoint_flip_map` of the names.
        skeleton (list[[int, int]]): 0-based keypoint index pairs.
        keypoint_category_ids (list[int]): the categories that have keypoints.
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
        """Contiguous label(s) -> COCO category id(s).

    Args:
        labels: an int or an array of ints in ``0 .. C-1``; ValueError otherwise.

    Returns:
        int for a scalar, else an int64 array of the same shape.
    """
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
# Entry points
# --------------------------------------------------------------------------------------------
def _check_mode(check_images):
    """``check_images`` as one of :data:`CHECK_MODES` (None / False mean ``none``)."""
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
    data = read_json(where, report)
    lists = top_level_lists(data, where, report) if data is not None else None
    if lists is None:
        return [], DatasetInfo([], []), report
    report.num_images = len(lists["images"])
    categories, bad_category_ids = valid_categories(lists["categories"], where, report)
    kp_names, skeleton, kp_per_category = keypoint_spec(categories, where, report)
    info = DatasetInfo(class_names=[c["name"] for c in categories],
                       category_ids=[c["id"] for c in categories],
                       keypoint_names=kp_names, keypoint_flip_map=keypoint_flip_map(kp_names),
                       skeleton=skeleton,
                       keypoint_category_ids=[c["id"] for c in categories
                                              if kp_per_category.get(c["id"])])
    report.categories = [(c["id"], c["name"]) for c in categories]
    report.num_keypoints = info.num_keypoints
    images, bad_image_ids = valid_images(lists["images"], where, report)
    annotations, has_segmentations = valid_annotations(
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
        check_image_files(to_check, image_dir, mode, report)
    return records, info, report


def load_coco(ann_file, image_dir, for_training=True, check_images="header",
              keypoint_offset=0.5):
    """Read a COCO json into records.

    Args:
        ann_file (str): the COCO ``instances`` or ``person_keypoints`` json.
        image_dir (str): the folder that ``file_name`` is relative to.
        for_training (bool): skip images without a usable (non-crowd, non-degenerate) instance.
        check_images (str): ``none``, ``header`` (the file exists and its header size matches
            the json) or ``full`` (also decode it).
        keypoint_offset (float): ``data.keypoint_offset``, added to the x and y of labelled
            keypoints: COCO's integer pixel indices become mxmask's continuous coordinates,
            where the centre of pixel i is i + 0.5 (Detectron2; torchvision uses the indices as
            they are, offset 0).

    Returns:
        tuple: ``(records, info, report)``: a list of record dicts (DEVELOPING.md, "Dataset
        records"; boxes float32 (N, 4) xyxy, labels int32 (N,), keypoints float32 (N, K, 3) or
        None, crowd_boxes float32 (M, 4)), the :class:`DatasetInfo` and the
        :class:`~mxmask.data.validation.DatasetReport`.

    Raises:
        DatasetError: listing the problems (at most 20 lines).
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
    """Validate a dataset as training would use it, checking every image file.

    Args:
        ann_file (str): the COCO json.
        image_dir (str): its image folder.
        check_images (str): as in :func:`load_coco`; every image of the json is checked, also
            the ones training would skip.

    Returns:
        DatasetReport: never raises for a bad dataset; ``report.ok`` tells.
    """
    _, _, report = _inspect(ann_file, image_dir, True, check_images, check_all_images=True)
    return report


def run_check(ann_file, image_dir):
    """``mxmask data check``: print the report of :func:`check_dataset` (full image checks).

    Returns:
        int: the exit code, 0 if the dataset is valid, else 2.
    """
    report = check_dataset(ann_file, image_dir, check_images="full")
    print(report.format())
    return 0 if report.ok else 2

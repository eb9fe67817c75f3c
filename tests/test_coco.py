"""COCO reader and validation: records, DatasetInfo, skipped items, one line per bad input."""
import copy
import json
import os
import pathlib

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mxmask.data.coco import (SKIP_DEGENERATE, SKIP_NO_ANNOTATIONS, SKIP_NO_USABLE, DatasetError,
                              DatasetInfo, check_dataset, keypoint_flip_map, load_coco, run_check)
from mxmask.data.images import read_image
from mxmask.data.validation import decode_rle_string
from mxmask.utils import UserError

# image id -> (file name, width, height)
IMAGES = {1: ("a.png", 64, 48), 2: ("b.jpg", 32, 32), 3: ("sub/c.png", 40, 30),
          4: ("d.png", 20, 20)}


def _noise_image(width, height, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _mask_runs(mask):
    """Uncompressed COCO RLE counts of a binary mask (column-major, starting with zeros)."""
    flat = np.asarray(mask, np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return counts


def segmentation_to_mask(segm, height, width):
    """Decode a record's segmentation the way pycocotools' COCO.annToMask does."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_utils.decode(rle)


def _base_json():
    mask2 = np.zeros((32, 32), np.uint8)
    mask2[4:20, 6:18] = 1
    compressed = mask_utils.encode(np.asfortranarray(mask2))
    compressed["counts"] = compressed["counts"].decode("ascii")
    crowd_mask = np.zeros((48, 64), np.uint8)
    crowd_mask[30:40, 40:60] = 1
    return {
        "images": [{"id": i, "file_name": f, "width": w, "height": h}
                   for i, (f, w, h) in IMAGES.items()],
        "categories": [
            {"id": 12, "name": "person", "supercategory": "person",
             "keypoints": ["nose", "left_eye", "right_eye"], "skeleton": [[1, 2], [1, 3]]},
            {"id": 3, "name": "circle"},
            {"id": 7, "name": "square"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 20], "iscrowd": 0,
             "area": 200, "segmentation": [[2, 3, 12, 3, 12, 23, 2, 23]]},
            {"id": 11, "image_id": 1, "category_id": 12, "bbox": [5.5, 5, 20, 20], "iscrowd": 0,
             "area": 400, "segmentation": [[5, 5, 25, 5, 25, 25], [30, 30, 34, 30, 34, 34, 30, 34]],
             "keypoints": [6, 7, 2, 10, 7, 1, 8, 9, 0], "num_keypoints": 2},
            {"id": 12, "image_id": 1, "category_id": 3, "bbox": [40, 30, 20, 10], "iscrowd": 1,
             "area": 200, "segmentation": {"size": [48, 64], "counts": _mask_runs(crowd_mask)}},
            {"id": 13, "image_id": 2, "category_id": 3, "bbox": [6, 4, 12, 16], "iscrowd": 0,
             "area": 192, "segmentation": compressed},
            {"id": 14, "image_id": 2, "category_id": 7, "bbox": [1, 1, 0.5, 10], "iscrowd": 0,
             "area": 5, "segmentation": [[1, 1, 1.5, 1, 1.5, 11]]},
            {"id": 15, "image_id": 4, "category_id": 3, "bbox": [0, 0, 10, 10], "iscrowd": 1,
             "area": 100, "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]},
        ],
    }


def _write_images(image_dir):
    for i, (name, w, h) in IMAGES.items():
        path = image_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), _noise_image(w, h, i))


def _write_dataset(tmp_path, data):
    ann = tmp_path / "annotations" / "train.json"
    ann.parent.mkdir(exist_ok=True)
    ann.write_text(json.dumps(data))
    image_dir = tmp_path / "images"
    if not image_dir.exists():
        _write_images(image_dir)
    return str(ann), str(image_dir)


@pytest.fixture
def dataset(tmp_path):
    return _write_dataset(tmp_path, _base_json())


def _record(records, image_id):
    (rec,) = [r for r in records if r["image_id"] == image_id]
    return rec


def _annotation(data, ann_id):
    (ann,) = [a for a in data["annotations"] if a["id"] == ann_id]
    return ann


# ---------------------------------------------------------------------------------------------
# Records and DatasetInfo
# ---------------------------------------------------------------------------------------------
def test_category_ids_map_to_contiguous_labels_in_id_order_with_names_from_json(dataset):
    _, info, _ = load_coco(*dataset)
    assert info.category_ids == [3, 7, 12]
    assert info.class_names == ["circle", "square", "person"]
    assert info.num_classes == 3
    assert info.label_to_category_id(2) == 12
    np.testing.assert_array_equal(info.label_to_category_id(np.array([1.0, 0.0, 2.0])), [7, 3, 12])
    assert info.category_id_to_label(7) == 1
    with pytest.raises(ValueError):
        info.label_to_category_id([0, 3])
    with pytest.raises(ValueError):
        info.label_to_category_id(-1)


def test_training_records_follow_the_documented_layout(dataset):
    ann_file, image_dir = dataset
    records, info, report = load_coco(ann_file, image_dir, for_training=True)
    data = _base_json()
    assert [r["image_id"] for r in records] == [1, 2]

    rec = _record(records, 1)
    assert rec["file_name"] == os.path.abspath(os.path.join(image_dir, "a.png"))
    assert os.path.isabs(rec["file_name"])
    assert (rec["height"], rec["width"]) == (48, 64)
    assert rec["boxes"].dtype == np.float32 and rec["labels"].dtype == np.int32
    np.testing.assert_allclose(rec["boxes"], [[2, 3, 12, 23], [5.5, 5, 25.5, 25]])
    np.testing.assert_array_equal(rec["labels"], [1, 2])
    assert rec["segmentations"] == [_annotation(data, 10)["segmentation"],
                                    _annotation(data, 11)["segmentation"]]
    # keypoints: (N, K, 3); the square (category without keypoint names) gets zeros with v = 0
    assert rec["keypoints"].shape == (2, 3, 3) and rec["keypoints"].dtype == np.float32
    np.testing.assert_array_equal(rec["keypoints"][0], np.zeros((3, 3)))
    # labelled keypoints move to pixel centres (+0.5, Detectron2); v = 0 stays put
    np.testing.assert_array_equal(rec["keypoints"][1], [[6.5, 7.5, 2], [10.5, 7.5, 1], [8, 9, 0]])
    # data.keypoint_offset 0 (torchvision): COCO's pixel indices as they are
    as_is = _record(load_coco(ann_file, image_dir, keypoint_offset=0.0)[0], 1)
    np.testing.assert_array_equal(as_is["keypoints"][1], [[6, 7, 2], [10, 7, 1], [8, 9, 0]])
    # the crowd RLE is an ignore region, not an instance
    np.testing.assert_allclose(rec["crowd_boxes"], [[40, 30, 60, 40]])
    assert rec["crowd_boxes"].dtype == np.float32
    assert rec["crowd_segmentations"] == [_annotation(data, 12)["segmentation"]]

    rec2 = _record(records, 2)         # the degenerate square is dropped
    np.testing.assert_allclose(rec2["boxes"], [[6, 4, 18, 20]])
    np.testing.assert_array_equal(rec2["labels"], [0])
    assert rec2["segmentations"] == [_annotation(data, 13)["segmentation"]]
    assert rec2["crowd_boxes"].shape == (0, 4) and rec2["crowd_segmentations"] == []

    assert report.ok and report.num_images == 4 and report.num_records == 2
    assert report.instance_counts == {3: 1, 7: 1, 12: 1}
    assert report.crowd_counts == {3: 2}
    assert report.keypoint_counts == {12: 1}


def test_record_segmentations_decode_to_the_drawn_masks(dataset):
    records, _, _ = load_coco(*dataset)
    rec = _record(records, 2)                  # compressed RLE
    expected = np.zeros((32, 32), np.uint8)
    expected[4:20, 6:18] = 1
    np.testing.assert_array_equal(segmentation_to_mask(rec["segmentations"][0], 32, 32), expected)
    rec = _record(records, 1)
    crowd = segmentation_to_mask(rec["crowd_segmentations"][0], 48, 64)   # uncompressed RLE
    assert crowd.shape == (48, 64) and crowd.sum() == 200 and crowd[30:40, 40:60].all()
    square = segmentation_to_mask(rec["segmentations"][0], 48, 64)         # one polygon
    assert square[3:23, 2:12].all() and square.sum() == 200
    two_parts = segmentation_to_mask(rec["segmentations"][1], 48, 64)      # polygons merged
    assert two_parts.shape == (48, 64) and two_parts[10, 20] == 1 and two_parts[32, 32] == 1
    assert two_parts[20, 10] == 0                                          # below the diagonal


def test_images_without_usable_annotations_are_skipped_for_training_and_kept_for_eval(dataset):
    _, _, train_report = load_coco(*dataset, for_training=True)
    assert train_report.skipped[SKIP_NO_ANNOTATIONS] == 1
    assert train_report.skipped_examples[SKIP_NO_ANNOTATIONS] == ["image 3"]
    assert train_report.skipped[SKIP_NO_USABLE] == 1          # image 4: crowd only
    assert train_report.skipped_examples[SKIP_NO_USABLE] == ["image 4"]

    records, _, report = load_coco(*dataset, for_training=False)
    assert [r["image_id"] for r in records] == [1, 2, 3, 4]
    empty = _record(records, 3)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert empty["keypoints"].shape == (0, 3, 3) and empty["segmentations"] == []
    assert SKIP_NO_ANNOTATIONS not in report.skipped


def test_degenerate_boxes_are_dropped_and_counted_not_errors(tmp_path):
    data = _base_json()
    data["annotations"].append({"id": 16, "image_id": 1, "category_id": 7, "bbox": [3, 3, 10, 0],
                                "iscrowd": 0, "segmentation": [[3, 3, 13, 3, 13, 3]]})
    records, _, report = load_coco(*_write_dataset(tmp_path, data))
    assert report.ok
    assert report.skipped[SKIP_DEGENERATE] == 2
    assert report.skipped_examples[SKIP_DEGENERATE] == ["annotation 16", "annotation 14"]
    assert len(_record(records, 1)["boxes"]) == 2
    assert "2  %s: e.g. annotation 16, annotation 14" % SKIP_DEGENERATE in report.format()


def test_flip_map_pairs_left_and_right_names():
    names = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "l_ankle", "r_ankle",
             "tail", "left_wing", "paw_right", "paw_left"]
    assert keypoint_flip_map(names) == [0, 2, 1, 4, 3, 6, 5, 7, 8, 10, 9]


def test_dataset_info_carries_keypoint_names_flip_map_and_zero_based_skeleton(tmp_path):
    data = _base_json()
    data["categories"][0]["keypoints"] = ["nose", "left_eye", "right_eye"]
    _, info, _ = load_coco(*_write_dataset(tmp_path, data))
    assert info.keypoint_names == ["nose", "left_eye", "right_eye"]
    assert info.num_keypoints == 3
    assert info.keypoint_flip_map == [0, 2, 1]
    assert info.skeleton == [[0, 1], [0, 2]]
    assert DatasetInfo.from_dict(info.to_dict()) == info
    json.dumps(info.to_dict())


def test_dataset_without_keypoints_or_segmentations_gives_none(tmp_path):
    data = {"images": [{"id": 5, "file_name": "a.png", "width": 64, "height": 48}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [0, 0, 8, 8]}]}
    records, info, _ = load_coco(*_write_dataset(tmp_path, data))
    assert info.keypoint_names == [] and info.keypoint_flip_map == [] and info.skeleton == []
    assert records[0]["keypoints"] is None and records[0]["segmentations"] is None
    assert records[0]["crowd_segmentations"] == []


def test_compressed_rle_string_decoder_matches_pycocotools():
    mask = np.zeros((37, 53), np.uint8)
    mask[3:30, 5:9] = 1
    mask[10:12, 20:50] = 1
    mask[36, 52] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    assert decode_rle_string(rle["counts"].decode("ascii")) == _mask_runs(mask)
    with pytest.raises(ValueError):
        decode_rle_string("0" + chr(0x20 + 48))      # ends inside a number
    with pytest.raises(ValueError):
        decode_rle_string("ab\x7f")


# ---------------------------------------------------------------------------------------------
# One line per bad input
# ---------------------------------------------------------------------------------------------
def _drop(key):
    return lambda entry: entry.pop(key)


def _set(key, value):
    return lambda entry: entry.__setitem__(key, value)


def _on_image(image_id, change):
    return lambda d: change([i for i in d["images"] if i["id"] == image_id][0])


def _on_ann(ann_id, change):
    return lambda d: change(_annotation(d, ann_id))


BAD_JSON_CASES = {
    # name: (change to the base json, pieces the single problem line must contain)
    # ids beyond int64 (the loader's image_id, pycocotools' np.unique) are problems of the json
    "image id beyond int64": (_on_image(3, _set("id", 2 ** 63)),
                              ["images[2]", "id must fit in int64", str(2 ** 63)]),
    "category id beyond int64": (lambda d: d["categories"].append({"id": 2 ** 64, "name": "x"}),
                                 ["categories[3]", "id must fit in int64"]),
    "annotation id beyond int64": (_on_ann(13, _set("id", -2 ** 63 - 1)),
                                   ["annotations[3]", "id must fit in int64"]),
    "annotation image_id beyond int64": (_on_ann(13, _set("image_id", 2 ** 70)),
                                         ["annotation 13", "image_id must fit in int64"]),
    "annotation category_id beyond int64": (_on_ann(13, _set("category_id", 2 ** 63)),
                                            ["annotation 13", "category_id must fit in int64"]),
    "missing images": (lambda d: d.pop("images"), ["missing top-level key 'images'"]),
    "missing annotations": (lambda d: d.pop("annotations"), ["'annotations'"]),
    "missing categories": (lambda d: d.pop("categories"), ["'categories'"]),
    "images not a list": (lambda d: d.__setitem__("images", {}), ["'images' must be a list"]),
    "image missing id": (_on_image(3, _drop("id")), ["images[2]", "'id'"]),
    "image missing file_name": (_on_image(2, _drop("file_name")), ["image 2", "'file_name'"]),
    "image missing width": (_on_image(2, _drop("width")), ["image 2", "'width'"]),
    "image missing height": (_on_image(2, _drop("height")), ["image 2", "'height'"]),
    "width zero": (_on_image(2, _set("width", 0)), ["image 2", "width", "positive integer"]),
    "height negative": (_on_image(1, _set("height", -48)), ["image 1", "height", "-48"]),
    "width fractional": (_on_image(2, _set("width", 31.5)), ["image 2", "width", "31.5"]),
    "width huge": (_on_image(2, _set("width", 10 ** 400)), ["image 2", "width"]),
    "width string": (_on_image(2, _set("width", "32")), ["image 2", "width", '"32"']),
    "duplicate image id": (lambda d: d["images"].append(dict(d["images"][2])),
                           ["image 3", "duplicate image id", "images[2]", "images[4]"]),
    "annotation missing image_id": (_on_ann(13, _drop("image_id")),
                                    ["annotation 13", "'image_id'"]),
    "annotation missing category_id": (_on_ann(13, _drop("category_id")),
                                       ["annotation 13", "'category_id'"]),
    "annotation missing bbox": (_on_ann(13, _drop("bbox")), ["annotation 13", "'bbox'"]),
    "bbox three numbers": (_on_ann(10, _set("bbox", [1, 2, 3])),
                           ["annotation 10", "bbox", "[1, 2, 3]"]),
    "bbox not numbers": (_on_ann(10, _set("bbox", [1, "2", 3, 4])), ["annotation 10", "bbox"]),
    "bbox NaN": (_on_ann(10, _set("bbox", [1, 2, float("nan"), 4])), ["annotation 10", "bbox"]),
    "bbox boolean": (_on_ann(10, _set("bbox", [1, 2, True, 4])), ["annotation 10", "bbox"]),
    "polygon infinite": (_on_ann(10, _set("segmentation", [[1, 2, 3, 4, 5, float("inf")]])),
                         ["annotation 10", "segmentation polygon 0", "not a finite number"]),
    "bbox negative w": (_on_ann(10, _set("bbox", [1, 2, -3, 4])),
                        ["annotation 10", "bbox", "negative width or height"]),
    "unknown image_id": (_on_ann(13, _set("image_id", 42)),
                         ["annotation 13", "image_id 42 is not in images"]),
    "image_id a list": (_on_ann(13, _set("image_id", [2])), ["annotation 13", "image_id [2]"]),
    "category_id an object": (_on_ann(13, _set("category_id", {"id": 3})),
                              ["annotation 13", "category_id {\"id\": 3}"]),
    "unknown category_id": (_on_ann(13, _set("category_id", 99)),
                            ["annotation 13: category_id 99 is not in categories "
                             "(known ids: 3, 7, 12)"]),
    "segmentation string": (_on_ann(10, _set("segmentation", "x")),
                            ["annotation 10", "segmentation", "list of polygons or an RLE"]),
    "polygon odd length": (_on_ann(10, _set("segmentation", [[1, 2, 3, 4, 5, 6, 7]])),
                           ["annotation 10", "segmentation polygon 0", "7 values"]),
    "polygon too short": (_on_ann(11, _set("segmentation", [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4]])),
                          ["annotation 11", "segmentation polygon 1", "4 values"]),
    "polygon not flat": (_on_ann(10, _set("segmentation", [[[1, 2], [3, 4], [5, 6]]])),
                         ["annotation 10", "segmentation polygon 0"]),
    "polygons empty": (_on_ann(10, _set("segmentation", [])), ["annotation 10", "segmentation"]),
    "rle missing size": (_on_ann(12, lambda a: a["segmentation"].pop("size")),
                         ["annotation 12", "segmentation", "'size'"]),
    "rle size mismatch": (_on_ann(13, lambda a: a["segmentation"].__setitem__("size", [32, 31])),
                          ["annotation 13", "segmentation", "[32, 31]", "[32, 32]"]),
    "rle counts wrong sum": (_on_ann(12, lambda a: a["segmentation"]["counts"].append(5)),
                             ["annotation 12", "segmentation", "3077 pixels", "3072"]),
    "rle counts negative": (_on_ann(12, lambda a: a["segmentation"].__setitem__(
        "counts", [3072 + 5, -5])), ["annotation 12", "segmentation", "negative"]),
    "rle counts bad type": (_on_ann(12, lambda a: a["segmentation"].__setitem__("counts", 7)),
                            ["annotation 12", "segmentation", "counts"]),
    "compressed rle bad chars": (_on_ann(13, lambda a: a["segmentation"].__setitem__(
        "counts", "PP\x7f")), ["annotation 13", "segmentation", "character"]),
    "segmentation missing in one": (_on_ann(10, _drop("segmentation")),
                                    ["annotation 10", "segmentation is missing"]),
    "keypoints wrong length": (_on_ann(11, _set("keypoints", [1, 2, 2] * 2)),
                               ["annotation 11", "keypoints has 6 values, expected 9",
                                "category 12 'person'"]),
    "keypoints not numbers": (_on_ann(11, _set("keypoints", [1, 2, 2, 3, "x", 2, 0, 0, 0])),
                              ["annotation 11", "keypoints", "not a finite number"]),
    "keypoints not a list": (_on_ann(11, _set("keypoints", "1 2 2")),
                             ["annotation 11", "keypoints"]),
    "keypoints bad visibility": (_on_ann(11, _set("keypoints", [1, 2, 3, 0, 0, 0, 0, 0, 0])),
                                 ["annotation 11", "keypoints visibility", "3"]),
    "keypoints on category without names": (_on_ann(10, _set("keypoints", [1, 2, 2] * 3)),
                                            ["annotation 10", "category 7 'square'"]),
    "iscrowd two": (_on_ann(10, _set("iscrowd", 2)), ["annotation 10", "iscrowd must be 0 or 1"]),
    "iscrowd string": (_on_ann(10, _set("iscrowd", "0")), ["annotation 10", "iscrowd"]),
    "annotation missing id": (lambda d: d["annotations"][0].pop("id"),
                              ["annotations[0]", "'id'"]),
    "duplicate annotation id": (lambda d: d["annotations"].append(dict(d["annotations"][3])),
                                ["annotation 13", "duplicate annotation id"]),
    "category missing name": (lambda d: d["categories"][1].pop("name"), ["category 3", "'name'"]),
    "duplicate category id": (lambda d: d["categories"].append({"id": 7, "name": "again"}),
                              ["categories[3]", "duplicate category id 7"]),
    "skeleton out of range": (lambda d: d["categories"][0].__setitem__("skeleton", [[1, 4]]),
                              ["category 12", "skeleton", "[1, 4]", "1..3"]),
    "keypoint categories disagree": (lambda d: d["categories"][2].__setitem__(
        "keypoints", ["a", "b", "c"]), ["category 7", "keypoints", "category 12"]),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON_CASES))
def test_each_bad_json_input_gives_one_line_naming_file_and_field(tmp_path, case):
    change, pieces = BAD_JSON_CASES[case]
    data = copy.deepcopy(_base_json())
    change(data)
    ann_file, image_dir = _write_dataset(tmp_path, data)
    with pytest.raises(DatasetError) as err:
        load_coco(ann_file, image_dir)
    message = str(err.value)
    assert "\n" not in message, message
    assert message.startswith(ann_file + ": "), message
    for piece in pieces:
        assert piece in message, (piece, message)
    report = check_dataset(ann_file, image_dir)
    assert report.problems == [message]
    assert not report.ok


def test_missing_annotation_file(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="nope.json: annotation file not found"):
        load_coco(missing, str(tmp_path))


def test_annotation_file_that_is_not_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "images": [,\n')
    report = check_dataset(str(path), str(tmp_path))
    assert report.problems == ["%s: not valid JSON: Expecting value at line 2 column 14" % path]
    with pytest.raises(DatasetError):
        load_coco(str(path), str(tmp_path))


def test_annotation_file_that_is_not_utf8_or_not_an_object(tmp_path):
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    (line,) = check_dataset(str(binary), str(tmp_path)).problems
    assert line.startswith(str(binary) + ": ") and "not UTF-8 text" in line
    array = tmp_path / "array.json"
    array.write_text("[1, 2]")
    assert check_dataset(str(array), str(tmp_path)).problems == [
        "%s: expected a JSON object at the top level, got a list" % array]


def test_no_usable_image_is_a_problem(tmp_path):
    data = _base_json()
    data["annotations"] = [a for a in data["annotations"] if a["iscrowd"] == 1]
    ann_file, image_dir = _write_dataset(tmp_path, data)
    with pytest.raises(DatasetError, match="no usable image"):
        load_coco(ann_file, image_dir)
    records, _, _ = load_coco(ann_file, image_dir, for_training=False)
    assert len(records) == 4


def test_error_message_is_capped(tmp_path):
    data = _base_json()
    for i in range(25):
        data["annotations"].append({"id": 100 + i, "image_id": 1, "category_id": 50,
                                    "bbox": [0, 0, 5, 5], "segmentation": [[0, 0, 5, 0, 5, 5]]})
    with pytest.raises(DatasetError) as err:
        load_coco(*_write_dataset(tmp_path, data))
    lines = str(err.value).splitlines()
    assert len(lines) == 21 and lines[-1] == "... and 5 more"
    assert "annotation 100: category_id 50" in lines[0]


# ---------------------------------------------------------------------------------------------
# Image files
# ---------------------------------------------------------------------------------------------
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_missing_image_file(dataset, tmp_path):
    ann_file, image_dir = dataset
    os.remove(os.path.join(image_dir, "b.jpg"))
    with pytest.raises(DatasetError) as err:
        load_coco(ann_file, image_dir)
    assert str(err.value) == "%s: image 2: image file not found" % os.path.join(image_dir, "b.jpg")
    # images that training skips are not read by load_coco, but check_dataset checks them all
    os.remove(os.path.join(image_dir, "sub", "c.png"))
    problems = check_dataset(ann_file, image_dir).problems
    assert len(problems) == 2 and "image 3: image file not found" in problems[1]


def test_missing_image_folder_is_one_line(dataset, tmp_path):
    ann_file, _ = dataset
    missing = str(tmp_path / "elsewhere")
    assert check_dataset(ann_file, missing).problems == ["%s: image folder not found" % missing]


def test_image_size_must_match_json(dataset):
    ann_file, image_dir = dataset
    cv2.imwrite(os.path.join(image_dir, "a.png"), _noise_image(60, 48, 0))
    (line,) = check_dataset(ann_file, image_dir, check_images="header").problems
    assert line.startswith(os.path.join(image_dir, "a.png") + ": image 1: ")
    assert "60x48" in line and "64x48" in line


@pytest.mark.parametrize("name,image_id", [("a.png", 1), ("b.jpg", 2)])
def test_truncated_png_and_jpeg_are_caught_by_full_check_only(dataset, name, image_id):
    ann_file, image_dir = dataset
    path = os.path.join(image_dir, name)
    _truncate(pathlib.Path(path))
    assert check_dataset(ann_file, image_dir, check_images="header").ok   # the header is intact
    (line,) = check_dataset(ann_file, image_dir, check_images="full").problems
    assert line.startswith("%s: image %d: truncated" % (path, image_id)), line
    with pytest.raises(DatasetError):
        load_coco(ann_file, image_dir, check_images="full")
    assert load_coco(ann_file, image_dir, check_images="none")[2].ok


def test_corrupt_image_file_is_one_line(dataset):
    ann_file, image_dir = dataset
    path = os.path.join(image_dir, "a.png")
    with open(path, "wb") as f:
        f.write(os.urandom(300))
    (line,) = check_dataset(ann_file, image_dir, check_images="header").problems
    assert line.startswith(path + ": image 1: cannot read the image header")


def test_unknown_check_mode_is_a_user_error(dataset):
    with pytest.raises(UserError, match="check_images"):
        load_coco(*dataset, check_images="quick")


# ---------------------------------------------------------------------------------------------
# read_image
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_read_image_returns_rgb_uint8(tmp_path, ext):
    bgr = np.zeros((20, 30, 3), np.uint8)
    bgr[...] = (255, 0, 0)                      # blue in OpenCV's BGR order
    path = str(tmp_path / ("blue" + ext))
    cv2.imwrite(path, bgr)
    image = read_image(path)
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8
    assert image[..., 2].min() > 240 and image[..., 0].max() < 15


def test_read_image_accepts_gray_and_trailing_bytes_after_jpeg_end(tmp_path):
    gray = str(tmp_path / "gray.png")
    cv2.imwrite(gray, np.full((5, 7), 128, np.uint8))
    assert read_image(gray).shape == (5, 7, 3)
    jpg = tmp_path / "tail.jpg"
    cv2.imwrite(str(jpg), _noise_image(16, 16, 3))
    jpg.write_bytes(jpg.read_bytes() + b"\x00camera trailer\x00" * 10)
    assert read_image(str(jpg)).shape == (16, 16, 3)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_read_image_rejects_truncated_files(tmp_path, ext):
    path = tmp_path / ("cut" + ext)
    cv2.imwrite(str(path), _noise_image(40, 30, 1))
    _truncate(path)
    with pytest.raises(UserError, match="cut%s: truncated" % ext.replace(".", r"\.")):
        read_image(str(path))


def test_read_image_rejects_missing_empty_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match="nothere.png: image file not found"):
        read_image(str(tmp_path / "nothere.png"))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty.jpg: empty image file"):
        read_image(str(empty))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image" * 10)
    with pytest.raises(UserError, match="junk.png: corrupt"):
        read_image(str(junk))
    with pytest.raises(UserError, match="is a folder"):
        read_image(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# run_check (mxmask data check)
# ---------------------------------------------------------------------------------------------
def test_run_check_returns_zero_and_prints_counts_on_a_good_set(dataset, capsys):
    assert run_check(*dataset) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[-1] == "OK"
    assert any(line.split()[:2] == ["12", "person"] for line in lines)
    assert "images: 4 in the json, 2 usable" in out
    assert SKIP_NO_ANNOTATIONS in out and "image 3" in out


def test_run_check_returns_two_with_one_line_per_problem(tmp_path, capsys):
    data = _base_json()
    _annotation(data, 10)["category_id"] = 99
    _annotation(data, 13)["bbox"] = [1, 2]
    ann_file, image_dir = _write_dataset(tmp_path, data)
    _truncate(tmp_path / "images" / "b.jpg")
    assert run_check(ann_file, image_dir) == 2
    lines = capsys.readouterr().out.splitlines()
    problems = check_dataset(ann_file, image_dir).problems
    assert len(problems) == 3
    for problem in problems:
        assert lines.count(problem) == 1
    assert any("annotation 10: category_id 99" in p for p in problems)
    assert any("annotation 13: bbox" in p for p in problems)
    assert any(p.startswith(os.path.join(image_dir, "b.jpg") + ": image 2: truncated")
               for p in problems)
    assert lines[-1] == "INVALID: 3 problems"


# ---------------------------------------------------------------------------------------------
# No other exception type leaks
# ---------------------------------------------------------------------------------------------
JUNK = [None, True, -1, 0, 2, 1.5, float("nan"), "x", "", [], [[]], {}, {"counts": "x"},
        [1, 2, 3], 10 ** 30]


def _paths(node, prefix=()):
    """Every (container, key) position in a json tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        yield node, key
        if isinstance(value, (dict, list)):
            yield from _paths(value, prefix + (key,))


def test_random_corruptions_give_dataset_errors_only(tmp_path):
    rng = np.random.default_rng(0)
    ann_file, image_dir = _write_dataset(tmp_path, _base_json())
    outcomes = {"ok": 0, "problem": 0}
    for _ in range(200):
        data = _base_json()
        for _ in range(int(rng.integers(1, 3))):
            positions = list(_paths(data))
            node, key = positions[int(rng.integers(len(positions)))]
            if isinstance(node, dict) and rng.random() < 0.3:
                del node[key]
            else:
                node[key] = copy.deepcopy(JUNK[int(rng.integers(len(JUNK)))])
        with open(ann_file, "w") as f:
            json.dump(data, f)
        try:
            records, _, _ = load_coco(ann_file, image_dir, check_images="none")
            assert records
            outcomes["ok"] += 1
        except DatasetError as err:
            lines = str(err).splitlines()
            assert lines and all(line.startswith(ann_file + ": ") for line in lines), lines
            outcomes["problem"] += 1
    assert outcomes["problem"] > 100 and outcomes["ok"] > 5, outcomes


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_read_image_on_damaged_bytes_returns_an_image_or_a_user_error(tmp_path, ext):
    rng = np.random.default_rng(1)
    ok, encoded = cv2.imencode(ext, _noise_image(24, 16, 2))
    original = encoded.tobytes()
    path = tmp_path / ("damaged" + ext)
    for _ in range(40):
        data = bytearray(original)
        for pos in rng.integers(0, len(data), int(rng.integers(1, 6))):
            data[pos] = int(rng.integers(256))
        cut = len(data) if rng.random() < 0.5 else int(rng.integers(1, len(data)))
        path.write_bytes(bytes(data[:cut]))
        try:
            image = read_image(str(path))
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        except UserError as err:
            assert str(err).startswith(str(path) + ": ")


def test_the_synthetic_shapes_dataset_is_valid(shapes_dataset):
    for split in ("train", "val"):
        ann_file = os.path.join(shapes_dataset, "annotations", split + ".json")
        image_dir = os.path.join(shapes_dataset, "images", split)
        report = check_dataset(ann_file, image_dir)
        assert report.ok, report.format()
    records, info, _ = load_coco(ann_file, image_dir, for_training=False)
    assert info.num_keypoints > 0 and info.keypoint_flip_map != list(range(info.num_keypoints))
    assert all(r["keypoints"].shape[1:] == (info.num_keypoints, 3) for r in records)


@pytest.mark.parametrize("where, key", [("images", "id"), ("annotations", "image_id"),
                                        ("annotations", "category_id"), ("categories", "id")])
def test_eval_names_an_id_beyond_int64_in_the_annotation_file(tmp_path, capsys, where, key):
    """``eval --results R --ann GT`` reads GT with pycocotools: a too large id is one line
    naming the file, the entry and the field, not an OverflowError inside COCOeval."""
    from mxmask.cli import main
    data = _base_json()
    data[where][0][key] = 2 ** 63
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(data))
    results = tmp_path / "r.json"
    results.write_text("[]")
    assert main(["eval", "--results", str(results), "--ann", str(gt)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert str(gt) in lines[0] and "%s[0]" % where in lines[0] and key in lines[0]
    assert "int64" in lines[0]

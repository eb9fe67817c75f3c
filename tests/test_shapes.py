"""Tests of mxmask.data.shapes: COCO validity, annotation consistency (visible masks, area, bbox,
keypoint visibility, left/right), exact self-evaluation with pycocotools, determinism and
``ensure_shapes``."""
import contextlib
import io
import json
import os

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mxmask.data import shapes
from mxmask.utils import UserError

SPLITS = ("train", "val")


def quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def all_files(root):
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("shapes_small"))
    summary = shapes.generate_shapes(out_dir, num_train=12, num_val=6, size=128, seed=0)
    return out_dir, summary


@pytest.fixture(scope="module")
def cocos(small_set):
    out_dir = small_set[0]
    return {s: quiet(COCO, shapes.annotation_path(out_dir, s)) for s in SPLITS}


def all_anns(cocos):
    return [(coco, ann) for coco in cocos.values() for ann in coco.dataset["annotations"]]


def test_summary_counts_match_json(small_set, cocos):
    _, summary = small_set
    for split in SPLITS:
        anns = cocos[split].dataset["annotations"]
        assert summary[split]["images"] == (12 if split == "train" else 6) == len(cocos[split].imgs)
        assert summary[split]["instances"] == sum(1 for a in anns if not a["iscrowd"])
        assert summary[split]["crowd_regions"] == sum(1 for a in anns if a["iscrowd"])


def test_categories_and_fields(cocos):
    cats = cocos["train"].dataset["categories"]
    assert cats == shapes.CATEGORIES
    ids = [c["id"] for c in cats]
    assert ids != list(range(1, len(ids) + 1))                      # non-contiguous on purpose
    kp_cats = [c for c in cats if "keypoints" in c]
    assert len(kp_cats) == 1 and len(cats) >= 4
    k = len(shapes.KEYPOINT_NAMES)
    assert kp_cats[0]["keypoints"] == shapes.KEYPOINT_NAMES and k >= 5
    assert len(shapes.KEYPOINT_OKS_SIGMAS) == k
    assert all(0.02 <= s <= 0.11 for s in shapes.KEYPOINT_OKS_SIGMAS)
    assert all(1 <= i <= k for pair in kp_cats[0]["skeleton"] for i in pair)
    lefts = {n[5:] for n in shapes.KEYPOINT_NAMES if n.startswith("left_")}
    rights = {n[6:] for n in shapes.KEYPOINT_NAMES if n.startswith("right_")}
    assert lefts and lefts == rights
    for coco, ann in all_anns(cocos):
        assert {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"} <= set(ann)
        assert ann["category_id"] in ids and ann["image_id"] in coco.imgs
        assert ("keypoints" in ann) == (ann["category_id"] == kp_cats[0]["id"] and not ann["iscrowd"])
        if "keypoints" in ann:
            kps = np.array(ann["keypoints"]).reshape(k, 3)
            assert ann["num_keypoints"] == np.count_nonzero(kps[:, 2] > 0)
            assert np.all(kps[kps[:, 2] == 0, :2] == 0)


def test_all_kinds_occur(cocos):
    anns = [ann for _, ann in all_anns(cocos)]
    segs = [a["segmentation"] for a in anns]
    assert any(isinstance(s, list) for s in segs)
    assert any(isinstance(s, dict) and isinstance(s["counts"], str) for s in segs)
    assert any(a["iscrowd"] == 1 and isinstance(a["segmentation"]["counts"], list) for a in anns)
    assert {a["category_id"] for a in anns} == {c["id"] for c in shapes.CATEGORIES}
    vis = np.concatenate([np.array(a["keypoints"]).reshape(-1, 3)[:, 2] for a in anns if "keypoints" in a])
    assert set(vis.tolist()) == {0, 1, 2}
    imgs = [im for coco in cocos.values() for im in coco.dataset["images"]]
    assert any(im["width"] != im["height"] for im in imgs)
    per_image = [len(coco.getAnnIds(imgIds=i, iscrowd=False)) for coco in cocos.values() for i in coco.imgs]
    assert min(per_image) >= 1 and max(per_image) <= 6


def test_area_and_bbox_are_those_of_the_mask(cocos):
    for coco, ann in all_anns(cocos):
        rle = coco.annToRLE(ann)
        assert ann["area"] == mask_utils.area(rle) > 0
        np.testing.assert_array_equal(ann["bbox"], mask_utils.toBbox(rle))


def test_masks_are_disjoint_visible_parts(cocos):
    for coco in cocos.values():
        for image_id in coco.imgs:
            masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
            assert np.sum(masks, axis=0).max() == 1


def test_keypoint_visibility_agrees_with_masks(cocos):
    k = len(shapes.KEYPOINT_NAMES)
    for coco in cocos.values():
        for image_id in coco.imgs:
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            masks = [coco.annToMask(a).astype(bool) for a in anns]
            for i, ann in enumerate(anns):
                if "keypoints" not in ann:
                    continue
                others = np.logical_or.reduce([m for j, m in enumerate(masks) if j != i])
                for x, y, v in np.array(ann["keypoints"]).reshape(k, 3):
                    px, py = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))  # COCO: pixel indices
                    if v == 2:
                        assert masks[i][py, px]
                    elif v == 1:
                        assert others[py, px] and not masks[i][py, px]


def cross(a, b):
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def test_left_limbs_are_on_the_image_right_of_the_body(cocos):
    names = shapes.KEYPOINT_NAMES
    neck, hip = names.index("neck"), names.index("hip")
    checked = 0
    for _, ann in all_anns(cocos):
        if "keypoints" not in ann:
            continue
        kps = np.array(ann["keypoints"], dtype=np.float64).reshape(len(names), 3)
        up = kps[neck, :2] - kps[hip, :2]
        if kps[neck, 2] == 0 or kps[hip, 2] == 0:
            continue
        for limb, root in (("hand", neck), ("foot", hip)):
            for side, sign in (("left_", 1), ("right_", -1)):
                j = names.index(side + limb)
                if kps[j, 2] > 0:
                    # y points down: a positive cross(up, d) means d points to the image's right
                    assert sign * cross(up, kps[j, :2] - kps[root, :2]) > 0
                    checked += 1
    assert checked >= 20


def gt_as_results(coco, kind):
    results = []
    for ann in coco.dataset["annotations"]:
        if ann["iscrowd"]:
            continue
        res = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0}
        if kind == "bbox":
            res["bbox"] = ann["bbox"]
        elif kind == "segm":
            res["segmentation"] = coco.annToRLE(ann)
        elif "keypoints" in ann:
            res["keypoints"] = ann["keypoints"]
        else:
            continue
        results.append(res)
    return results


@pytest.mark.parametrize("kind", ["bbox", "segm", "keypoints"])
def test_self_evaluation_is_exact(cocos, kind):
    for coco in cocos.values():
        dets = quiet(coco.loadRes, gt_as_results(coco, kind))
        ev = COCOeval(coco, dets, kind)
        if kind == "keypoints":
            ev.params.catIds = [shapes.FIGURE]
            ev.params.kpt_oks_sigmas = np.array(shapes.KEYPOINT_OKS_SIGMAS)
        quiet(ev.evaluate)
        quiet(ev.accumulate)
        quiet(ev.summarize)
        assert ev.stats[0] == 1.0


def test_png_files_match_json(small_set, cocos):
    out_dir = small_set[0]
    for split, coco in cocos.items():
        for im in coco.dataset["images"]:
            img = cv2.imread(os.path.join(out_dir, "images", split, im["file_name"]), cv2.IMREAD_UNCHANGED)
            assert img.shape == (im["height"], im["width"], 3) and img.dtype == np.uint8


def test_objects_stand_out_from_the_background(small_set, cocos):
    """Mean colour just inside each instance vs a background ring just outside it."""
    out_dir = small_set[0]
    compared = 0
    for split, coco in cocos.items():
        for image_id, im in coco.imgs.items():
            img = cv2.imread(os.path.join(out_dir, "images", split, im["file_name"])).astype(np.float64)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            covered = np.logical_or.reduce([coco.annToMask(a).astype(bool) for a in anns])
            for ann in anns:
                if ann["iscrowd"]:
                    continue
                mask = coco.annToMask(ann)
                inner = cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)
                near = cv2.dilate(mask, np.ones((7, 7), np.uint8)).astype(bool)
                ring = near & ~cv2.dilate(mask, np.ones((3, 3), np.uint8)).astype(bool) & ~covered
                if inner.sum() >= 20 and ring.sum() >= 20:
                    assert np.linalg.norm(img[inner].mean(0) - img[ring].mean(0)) > 60
                    compared += 1
    assert compared >= 30


def test_generation_is_deterministic_and_prefix_stable(small_set, tmp_path):
    out_dir = small_set[0]
    again = tmp_path / "again"
    shapes.generate_shapes(str(again), num_train=12, num_val=6, size=128, seed=0)
    assert all_files(str(again)) == all_files(out_dir)

    few = tmp_path / "few"
    shapes.generate_shapes(str(few), num_train=3, num_val=2, size=128, seed=0)
    big, small = all_files(out_dir), all_files(str(few))
    assert all(small[name] == big[name] for name in small if name.endswith(".png"))
    for split in SPLITS:
        small_json = json.loads(small[os.path.join("annotations", split + ".json")])
        big_json = json.loads(big[os.path.join("annotations", split + ".json")])
        kept = {im["id"] for im in small_json["images"]}
        assert small_json["annotations"] == [a for a in big_json["annotations"] if a["image_id"] in kept]

    other = tmp_path / "other"
    shapes.generate_shapes(str(other), num_train=3, num_val=2, size=128, seed=1)
    first_png = os.path.join("images", "train", "000001.png")
    assert all_files(str(other))[first_png] != small[first_png]


def test_ensure_shapes_generates_only_when_missing_or_stale(tmp_path):
    out_dir = str(tmp_path / "ds")
    first = shapes.ensure_shapes(out_dir, num_train=2, num_val=1, size=64, seed=3)
    assert first["generated"] and first["train"]["images"] == 2 and first["val"]["images"] == 1
    ann = shapes.annotation_path(out_dir, "train")
    stamp = os.stat(ann).st_mtime_ns
    second = shapes.ensure_shapes(out_dir, num_train=2, num_val=1, size=64, seed=3)
    assert not second["generated"] and os.stat(ann).st_mtime_ns == stamp
    assert {k: second[k] for k in SPLITS} == {k: first[k] for k in SPLITS}

    os.remove(shapes.annotation_path(out_dir, "val"))              # half-generated folder
    assert shapes.ensure_shapes(out_dir, num_train=2, num_val=1, size=64, seed=3)["generated"]
    assert os.path.exists(shapes.annotation_path(out_dir, "val"))

    stale = shapes.ensure_shapes(out_dir, num_train=3, num_val=1, size=64, seed=3)
    assert stale["generated"] and stale["train"]["images"] == 3

    foreign = {"images": [], "annotations": [], "categories": []}
    for split in SPLITS:
        with open(shapes.annotation_path(out_dir, split), "w") as f:
            json.dump(foreign, f)
    assert not shapes.ensure_shapes(out_dir, num_train=3, num_val=1, size=64, seed=3)["generated"]
    with open(shapes.annotation_path(out_dir, "train")) as f:
        assert json.load(f) == foreign


@pytest.mark.parametrize("kwargs", [{"size": 32}, {"num_train": -1}, {"seed": -2}, {"num_val": 1.5}])
def test_bad_arguments_are_user_errors(tmp_path, kwargs):
    with pytest.raises(UserError):
        shapes.generate_shapes(str(tmp_path / "x"), **kwargs)
    assert not os.path.exists(tmp_path / "x")


def test_uncompressed_rle_counts_round_trip():
    rng = np.random.default_rng(0)
    for first in (0, 1):
        mask = rng.random((7, 5)) < 0.5
        mask[0, 0] = bool(first)
        counts = shapes.uncompressed_rle_counts(mask)
        assert sum(counts) == mask.size and (counts[0] == 0) == bool(first)
        rle = mask_utils.frPyObjects({"size": [7, 5], "counts": counts}, 7, 5)
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)


def test_shared_fixture_dataset_loads(shapes_dataset):
    for split, n in zip(SPLITS, (8, 4)):
        coco = quiet(COCO, os.path.join(shapes_dataset, "annotations", split + ".json"))
        assert len(coco.imgs) == n
        for im in coco.dataset["images"]:
            assert os.path.exists(os.path.join(shapes_dataset, "images", split, im["file_name"]))

"""evaluate_results against pycocotools run directly, error cases, and gather_results."""
import copy
import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mxmask.engine.evaluator import evaluate_results, gather_results
from mxmask.utils import UserError

H, W = 240, 320
SIGMAS = [0.03, 0.05, 0.07, 0.09, 0.11]
KPT_NAMES = ["top", "left", "right", "bottom", "centre"]


def rect_poly(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def kite_poly(x, y, w, h):
    return [[x + w / 2, y, x + w, y + h / 2, x + w / 2, y + h, x, y + h / 2]]


def kite_keypoints(x, y, w, h):
    return [x + w / 2, y, 2, x, y + h / 2, 2, x + w, y + h / 2, 1, x + w / 2, y + h, 2,
            x + w / 2, y + h / 2, 2]


def make_gt(path):
    """4 images; 'box' (rectangles, no keypoints) and 'kite' (diamonds with K=5 keypoints);
    small, medium and large instances of both."""
    images = [{"id": i, "file_name": "img%d.png" % i, "height": H, "width": W}
              for i in (1, 2, 3, 4)]
    specs = [  # image, category, x, y, w, h
        (1, 1, 10, 10, 20, 20), (1, 1, 60, 40, 50, 45), (1, 2, 150, 30, 160, 200),
        (2, 2, 20, 20, 60, 70), (2, 1, 120, 100, 150, 110), (2, 1, 280, 10, 18, 25),
        (3, 2, 40, 60, 110, 120), (3, 2, 200, 20, 70, 55), (3, 1, 170, 150, 40, 35),
        (4, 1, 5, 5, 300, 220), (4, 2, 100, 80, 25, 28),
    ]
    anns = []
    for n, (img, cat, x, y, w, h) in enumerate(specs, 1):
        poly = rect_poly(x, y, w, h) if cat == 1 else kite_poly(x, y, w, h)
        rle = mask_util.merge(mask_util.frPyObjects(poly, H, W))
        ann = {"id": n, "image_id": img, "category_id": cat, "bbox": [x, y, w, h],
               "area": float(mask_util.area(rle)), "iscrowd": 0, "segmentation": poly}
        if cat == 2:
            ann["keypoints"] = kite_keypoints(x, y, w, h)
            ann["num_keypoints"] = 5
        anns.append(ann)
    # a kite with no labelled keypoints: ignored by the keypoint evaluation
    anns.append({"id": 99, "image_id": 4, "category_id": 2, "bbox": [200, 150, 60, 60],
                 "area": 1800.0, "iscrowd": 0, "segmentation": kite_poly(200, 150, 60, 60),
                 "keypoints": [0] * 15, "num_keypoints": 0})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": 1, "name": "box", "supercategory": "shape"},
                         {"id": 2, "name": "kite", "supercategory": "shape",
                          "keypoints": KPT_NAMES, "skeleton": [[1, 2], [2, 4], [4, 3], [3, 1]]}]}
    with open(path, "w") as f:
        json.dump(gt, f)
    return gt


def make_results(gt, seed=0):
    """Right, shifted, wrong-class and false-positive detections with masks and keypoints."""
    rng = np.random.default_rng(seed)
    results = []

    def entry(img, cat, x, y, w, h, score, kind):
        poly = rect_poly(x, y, w, h) if kind == 1 else kite_poly(x, y, w, h)
        rle = mask_util.merge(mask_util.frPyObjects(poly, H, W))
        rle["counts"] = rle["counts"].decode("ascii")
        e = {"image_id": img, "category_id": cat, "bbox": [x, y, w, h], "score": score,
             "segmentation": rle}
        if cat == 2:
            kp = np.array(kite_keypoints(x, y, w, h), float).reshape(5, 3)
            kp[:, :2] += rng.normal(0, 1.5, (5, 2))
            kp[:, 2] = 2
            e["keypoints"] = kp.reshape(-1).tolist()
        return e

    for i, ann in enumerate(gt["annotations"]):
        x, y, w, h = ann["bbox"]
        cat, img = ann["category_id"], ann["image_id"]
        mode = i % 4
        if mode == 0:                      # right
            results.append(entry(img, cat, x, y, w, h, float(rng.uniform(0.6, 1.0)), cat))
        elif mode == 1:                    # shifted by a fraction of the size
            results.append(entry(img, cat, x + 0.25 * w, y + 0.1 * h, w, h,
                                 float(rng.uniform(0.3, 0.9)), cat))
        elif mode == 2:                    # right place, wrong class
            results.append(entry(img, 3 - cat, x, y, w, h, float(rng.uniform(0.2, 0.8)), cat))
            results.append(entry(img, cat, x + 1, y + 1, w - 2, h - 1,
                                 float(rng.uniform(0.1, 0.5)), cat))
        else:                              # slightly off
            results.append(entry(img, cat, x + 3, y - 2, w * 0.9, h * 1.05,
                                 float(rng.uniform(0.4, 1.0)), cat))
    for img in (1, 2, 3, 4):               # false positives
        for cat in (1, 2):
            x, y = rng.uniform(0, W - 60), rng.uniform(0, H - 60)
            results.append(entry(img, cat, x, y, 40, 45, float(rng.uniform(0.0, 0.7)), cat))
    return results


def direct_stats(gt_path, results, task, names):
    """pycocotools run by hand with the protocol evaluate_results documents."""
    gt = COCO(gt_path)
    if task == "bbox":
        dets = [{k: r[k] for k in ("image_id", "category_id", "bbox", "score")} for r in results]
    elif task == "segm":
        dets = [{k: r[k] for k in ("image_id", "category_id", "segmentation", "score")}
                for r in results]
    else:
        dets = [{k: r[k] for k in ("image_id", "category_id", "keypoints", "bbox", "score")}
                for r in results if "keypoints" in r]
    ev = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), task)
    if task == "keypoints":
        ev.params.catIds = [2]
        ev.params.kpt_oks_sigmas = np.array(SIGMAS)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return dict(zip(names, [float(s) for s in ev.stats[:len(names)]]))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    gt_path = str(root / "gt.json")
    gt = make_gt(gt_path)
    return gt_path, gt, make_results(gt)


def test_metrics_equal_pycocotools(dataset, tmp_path, capsys):
    gt_path, gt, results = dataset
    res_path = str(tmp_path / "results.json")
    with open(res_path, "w") as f:
        json.dump(results, f)
    before = copy.deepcopy(results)
    out_dir = str(tmp_path / "eval")
    metrics = evaluate_results(res_path, gt_path, kpt_oks_sigmas=SIGMAS, out_dir=out_dir,
                               plots=True)
    printed = capsys.readouterr().out
    assert sorted(metrics) == ["bbox", "keypoints", "segm"]
    expected_names = {"bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl"],
                      "segm": ["AP", "AP50", "AP75", "APs", "APm", "APl"],
                      "keypoints": ["AP", "AP50", "AP75", "APm", "APl"]}
    for task, names in expected_names.items():
        assert list(metrics[task]) == names
        direct = direct_stats(gt_path, results, task, names)
        assert all(v >= 0 for v in direct.values())
        assert metrics[task] == direct, task
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in metrics[task].values())
        assert 0.05 < metrics[task]["AP"] < 0.95     # a meaningful mix of hits and misses
    with open(os.path.join(out_dir, "metrics.json")) as f:
        assert json.load(f) == metrics
    for task in ("bbox", "segm", "keypoints"):
        assert os.path.getsize(os.path.join(out_dir, "pr_%s.png" % task)) > 1000
    assert "Per-category bbox AP" in printed and "kite" in printed and "box" in printed
    assert "Average Precision" in printed
    # the in-memory list gives the same numbers and is left untouched
    again = evaluate_results(results, gt_path, tasks=["bbox"], per_category=False)
    assert again == {"bbox": metrics["bbox"]}
    assert results == before


def test_per_category_table_matches_precision(dataset, capsys):
    gt_path, gt, results = dataset
    evaluate_results(results, gt_path, tasks=["bbox"])
    printed = capsys.readouterr().out
    coco = COCO(gt_path)
    ev = COCOeval(coco, coco.loadRes([{k: r[k] for k in ("image_id", "category_id", "bbox",
                                                         "score")} for r in results]), "bbox")
    ev.evaluate()
    ev.accumulate()
    for k, name in ((0, "box"), (1, "kite")):
        p = ev.eval["precision"][:, :, k, 0, -1]
        line = [ln for ln in printed.splitlines() if ln.strip().startswith(name + " ")][0]
        assert line.split("|")[1].strip() == "%.3f" % p[p > -1].mean()


def test_default_tasks_follow_result_fields(dataset):
    gt_path, gt, results = dataset
    boxes_only = [{k: r[k] for k in ("image_id", "category_id", "bbox", "score")}
                  for r in results]
    assert list(evaluate_results(boxes_only, gt_path, per_category=False)) == ["bbox"]
    no_kpts = [{k: v for k, v in r.items() if k != "keypoints"} for r in results]
    assert list(evaluate_results(no_kpts, gt_path, per_category=False)) == ["bbox", "segm"]


def test_empty_results_give_zeros(dataset, tmp_path):
    gt_path, _, _ = dataset
    metrics = evaluate_results([], gt_path, tasks=["bbox", "segm", "keypoints"],
                               kpt_oks_sigmas=SIGMAS, out_dir=str(tmp_path))
    assert metrics["bbox"] == {n: 0.0 for n in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    assert metrics["segm"] == metrics["bbox"]
    assert metrics["keypoints"] == {n: 0.0 for n in ("AP", "AP50", "AP75", "APm", "APl")}
    assert evaluate_results([], gt_path) == {"bbox": metrics["bbox"]}
    empty_file = tmp_path / "empty.json"
    empty_file.write_text("[]")
    assert evaluate_results(str(empty_file), gt_path, tasks=["segm"]) == {"segm": metrics["segm"]}


def test_undefined_area_range_is_zero(dataset, tmp_path):
    gt_path, gt, results = dataset
    only = [r for r in results if r["image_id"] == 3]
    metrics = evaluate_results(only, gt_path, tasks=["bbox"], image_ids=[3], per_category=False)
    coco = COCO(gt_path)
    ev = COCOeval(coco, coco.loadRes([{k: r[k] for k in ("image_id", "category_id", "bbox",
                                                         "score")} for r in only]), "bbox")
    ev.params.imgIds = [3]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[3] == -1            # image 3 has no small object
    assert metrics["bbox"]["APs"] == 0.0
    assert metrics["bbox"]["AP"] == float(ev.stats[0])


def test_keypoint_sigma_errors(dataset):
    gt_path, _, results = dataset
    with pytest.raises(UserError, match=r"K=5 keypoints but test.keypoint_oks_sigmas has 3 values"):
        evaluate_results(results, gt_path, tasks=["keypoints"], kpt_oks_sigmas=[0.1, 0.1, 0.1])
    with pytest.raises(UserError, match=r"K=5 .*empty"):
        evaluate_results(results, gt_path, tasks=["keypoints"])
    with pytest.raises(UserError, match="K=5"):
        evaluate_results([], gt_path, tasks=["keypoints"], kpt_oks_sigmas=[0.1] * 17)


def write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_malformed_results_name_file_entry_and_field(dataset, tmp_path):
    gt_path, _, results = dataset
    good = [copy.deepcopy(r) for r in results[:3]]
    cases = []
    bad = copy.deepcopy(good)
    del bad[2]["category_id"]
    cases.append((bad, r"entry 2: category_id None"))
    bad = copy.deepcopy(good)
    bad[0]["image_id"] = 12345
    cases.append((bad, r"entry 0: image_id 12345 is not an image"))
    bad = copy.deepcopy(good)
    bad[1]["bbox"] = [1, 2, 3]
    cases.append((bad, r"entry 1: field bbox"))
    bad = copy.deepcopy(good)
    bad[1]["score"] = "high"
    cases.append((bad, r"entry 1: field score"))
    bad = copy.deepcopy(good)
    bad[0]["segmentation"]["size"] = [10, 10]
    cases.append((bad, r"entry 0: field segmentation has size \[10, 10\]"))
    bad = [copy.deepcopy(r) for r in results if "keypoints" in r][:2]
    bad[1]["keypoints"] = bad[1]["keypoints"][:12]
    cases.append((bad, r"entry 1: field keypoints must be 15 numbers"))
    cases.append(({"image_id": 1}, r"expected a json list"))
    cases.append(([{"image_id": 1, "category_id": 1, "score": 0.5}], r"entry 0: has none"))
    cases.append(([{"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [0, 0, 1, 1]}, 7],
                  r"entry 1: expected an object"))
    for i, (obj, pattern) in enumerate(cases):
        path = write(tmp_path, "bad%d.json" % i, obj)
        with pytest.raises(UserError, match=pattern) as err:
            evaluate_results(path, gt_path, kpt_oks_sigmas=SIGMAS)
        assert str(err.value).startswith(path)
    path = write(tmp_path, "broken.json", "[{\"image_id\": 1,")
    with pytest.raises(UserError, match="broken.json: not a readable json"):
        evaluate_results(path, gt_path)
    with pytest.raises(UserError, match="results file not found"):
        evaluate_results(str(tmp_path / "nope.json"), gt_path)
    with pytest.raises(UserError, match="annotation file not found"):
        evaluate_results([], str(tmp_path / "nope_gt.json"))


def test_file_name_entries_resolve_to_gt_images(dataset):
    gt_path, gt, results = dataset
    names = {img["id"]: "some/dir/" + img["file_name"] for img in gt["images"]}
    by_name = []
    for r in results:
        e = {k: v for k, v in r.items() if k != "image_id"}
        e["file_name"] = names[r["image_id"]]
        by_name.append(e)
    assert evaluate_results(by_name, gt_path, tasks=["bbox"], per_category=False) == \
        evaluate_results(results, gt_path, tasks=["bbox"], per_category=False)
    by_name[0]["file_name"] = "other.png"
    with pytest.raises(UserError, match="entry 0: file_name 'other.png' matches no image"):
        evaluate_results(by_name, gt_path)


def det(image_id, score, cat=1):
    return {"image_id": image_id, "category_id": cat, "bbox": [0, 0, 1, 1], "score": score}


def test_gather_results_orders_and_checks_coverage():
    shards = [[det(3, 0.2), det(1, 0.5), det(3, 0.9)], [det(2, 0.1), det(2, 0.7, cat=2)]]
    merged = gather_results(shards, expected_image_ids=[1, 2, 3, 4],
                            shard_image_ids=[[1, 3], [2, 4]])
    assert [(d["image_id"], d["score"]) for d in merged] == \
        [(1, 0.5), (2, 0.7), (2, 0.1), (3, 0.9), (3, 0.2)]
    assert gather_results(shards[::-1]) == merged
    with pytest.raises(ValueError, match=r"missing from every shard: 4, 5"):
        gather_results(shards, expected_image_ids=[1, 2, 3, 4, 5],
                       shard_image_ids=[[1, 3], [2]])
    with pytest.raises(ValueError, match=r"more than one shard: 3"):
        gather_results([shards[0], shards[1] + [det(3, 0.4)]], expected_image_ids=[1, 2, 3])
    with pytest.raises(ValueError, match=r"more than one shard: 2"):
        gather_results(shards, shard_image_ids=[[1, 2, 3], [2, 4]])
    with pytest.raises(ValueError, match=r"not expected: 3"):
        gather_results(shards, expected_image_ids=[1, 2])
    with pytest.raises(ValueError, match=r"did not process: 3"):
        gather_results(shards, shard_image_ids=[[1], [2]])

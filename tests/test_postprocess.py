"""detections_to_coco: padding, rescaling, category ids, RLE masks, keypoints, file names."""
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest

from mxmask.postprocess import (decode_keypoints, detections_to_coco, mask_extents,
                                paste_masks_in_image)

HEIGHT, WIDTH = 50, 75
IM_INFO = np.array([75.0, 113.0, 1.5], np.float32)      # resized h, w (w rounded), scale
SX, SY = 113.0 / 75.0, 75.0 / 50.0
CATEGORY_IDS = [7, 3]


def make_outputs(seed=0, k=3):
    rng = np.random.default_rng(seed)
    ids = np.array([0, 1, -1, 1, -1], np.float32)
    scores = np.array([0.9, 0.6, 0.0, 0.03, -1.0], np.float32)
    xy = rng.uniform(0, 80, (5, 2))
    wh = rng.uniform(8, 40, (5, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    masks = rng.uniform(0, 1, (5, 28, 28)).astype(np.float32)
    heatmaps = rng.normal(0, 1, (5, k, 56, 56)).astype(np.float32)
    keypoints = np.concatenate([rng.uniform(0, 100, (5, k, 2)), rng.normal(0, 1, (5, k, 1))],
                               axis=2).astype(np.float32)
    return {"ids": ids, "scores": scores, "boxes": boxes, "masks": masks,
            "heatmaps": heatmaps, "keypoints": keypoints}


def orig_boxes(boxes):
    return boxes.astype(np.float64) / np.array([SX, SY, SX, SY])


@pytest.mark.parametrize("method", ["taylor", "bicubic"])
def test_entries_masks_and_heatmap_keypoints(method):
    out = make_outputs()
    res = detections_to_coco(out, IM_INFO, (HEIGHT, WIDTH), 42, CATEGORY_IDS,
                             keypoint_decode=method)
    json.dumps(res)                                    # serialisable as is
    assert len(res) == 3                               # padded rows dropped
    keep = [0, 1, 3]
    boxes = orig_boxes(out["boxes"][keep])
    assert [r["image_id"] for r in res] == [42, 42, 42]
    assert [r["category_id"] for r in res] == [7, 3, 3]
    np.testing.assert_allclose([r["score"] for r in res], out["scores"][keep])
    expected_xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    np.testing.assert_allclose([r["bbox"] for r in res], expected_xywh, rtol=1e-6)
    pasted = paste_masks_in_image(out["masks"][keep], boxes, HEIGHT, WIDTH)
    for j, r in enumerate(res):
        seg = r["segmentation"]
        assert isinstance(seg["counts"], str) and seg["size"] == [HEIGHT, WIDTH]
        decoded = mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), pasted[j])
        assert decoded.any()
    kp = decode_keypoints(out["heatmaps"][keep], boxes, method)
    for j, r in enumerate(res):
        flat = np.array(r["keypoints"]).reshape(-1, 3)
        np.testing.assert_allclose(flat[:, :2], kp[j, :, :2] - 0.5, rtol=1e-6)  # COCO pixel indices
        assert (flat[:, 2] == 2).all()


def test_mask_extents_hand_made_and_coco_tobbox():
    """The tight xyxy box of the pixels >= threshold (pixel (r, c) covers [c, c + 1) x
    [r, r + 1)), pycocotools' toBbox of the same mask; a mask with no such pixel is not found."""
    probs = np.zeros((3, 6, 8), np.float32)
    probs[0, 1:4, 2:5] = 0.6
    probs[0, 5, 7] = 0.3
    probs[1] = 0.1
    probs[2, 0, 0] = 1.0
    boxes, found = mask_extents(probs, 0.5)
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(boxes, [[2, 1, 5, 4], [0, 0, 0, 0], [0, 0, 1, 1]])
    boxes, found = mask_extents(probs, 0.25)
    np.testing.assert_array_equal(boxes[0], [2, 1, 8, 6])
    rng = np.random.default_rng(1)
    probs = rng.uniform(0, 1, (4, 30, 40)) * (rng.uniform(0, 1, (4, 1, 40)) > 0.6)
    boxes, found = mask_extents(probs, 0.7)
    assert found.all()
    rles = mask_util.encode(np.asfortranarray((probs >= 0.7).astype(np.uint8).transpose(1, 2, 0)))
    xywh = mask_util.toBbox(rles)
    np.testing.assert_array_equal(boxes, np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]],
                                                        axis=1))


def test_mask_box_thresh_makes_each_box_its_masks_tight_box():
    """``mask_box_thresh`` (test.mask_box_thresh): each bbox is the tight box of the pasted
    probability >= it, in original pixels; a detection whose mask never reaches it keeps the
    network's box; the masks (pasted in the network's boxes at mask_thresh), keypoints, scores
    and categories are those without it."""
    out = make_outputs()
    out["masks"][3] = 0.2                               # never reaches 0.3
    plain = detections_to_coco(out, IM_INFO, (HEIGHT, WIDTH), 42, CATEGORY_IDS)
    res = detections_to_coco(out, IM_INFO, (HEIGHT, WIDTH), 42, CATEGORY_IDS,
                             mask_box_thresh=0.3)
    keep = [0, 1, 3]
    boxes = orig_boxes(out["boxes"][keep])
    probs = paste_masks_in_image(out["masks"][keep], boxes, HEIGHT, WIDTH, threshold=None)
    # the extents computed crop by crop while pasting equal those of the whole pasted masks
    pasted, tight, found = paste_masks_in_image(out["masks"][keep], boxes, HEIGHT, WIDTH, 0.5,
                                                box_threshold=0.3)
    want_tight, want_found = mask_extents(probs, 0.3)
    assert found.tolist() == want_found.tolist() == [True, True, False]
    np.testing.assert_array_equal(tight, want_tight)
    np.testing.assert_array_equal(pasted, paste_masks_in_image(out["masks"][keep], boxes,
                                                               HEIGHT, WIDTH))
    for j in (0, 1):
        rows, cols = np.nonzero(probs[j] >= 0.3)
        want = [cols.min(), rows.min(), cols.max() + 1 - cols.min(), rows.max() + 1 - rows.min()]
        assert res[j]["bbox"] == want
        assert np.abs(np.array(res[j]["bbox"]) - plain[j]["bbox"]).max() > 0.01
    np.testing.assert_allclose(res[2]["bbox"], plain[2]["bbox"])
    for a, b in zip(res, plain):
        assert {k: v for k, v in a.items() if k != "bbox"} == \
            {k: v for k, v in b.items() if k != "bbox"}


def test_keypoints_output_rescaled_and_filters():
    out = make_outputs(1)
    del out["heatmaps"], out["masks"]
    res = detections_to_coco(out, IM_INFO, (HEIGHT, WIDTH), 5, CATEGORY_IDS, score_thresh=0.05,
                             keypoint_category_ids=[3])
    assert len(res) == 2 and "segmentation" not in res[0]
    assert "keypoints" not in res[0]                   # category 7 has no keypoints
    flat = np.array(res[1]["keypoints"]).reshape(-1, 3)
    np.testing.assert_allclose(flat[:, 0], out["keypoints"][1, :, 0] / SX - 0.5, rtol=1e-6)
    np.testing.assert_allclose(flat[:, 1], out["keypoints"][1, :, 1] / SY - 0.5, rtol=1e-6)
    assert (flat[:, 2] == 2).all()


def test_file_name_batch_axis_width_and_empty():
    out = make_outputs(2)
    del out["heatmaps"], out["keypoints"]
    batched = {k: v[None] for k, v in out.items()}
    res = detections_to_coco(batched, IM_INFO[None], (HEIGHT, WIDTH), "a/b.png", CATEGORY_IDS)
    assert all(r["file_name"] == "a/b.png" and "image_id" not in r for r in res)
    boxes = orig_boxes(out["boxes"][[0, 1, 3]])
    # one convention for every model, GluonCV's +1-coded boxes included: w = x2 - x1
    np.testing.assert_allclose([r["bbox"][2] for r in res], boxes[:, 2] - boxes[:, 0],
                               rtol=1e-6)
    res2 = detections_to_coco(out, IM_INFO, (HEIGHT, WIDTH), None, CATEGORY_IDS, file_name="c.jpg")
    assert res2[0]["file_name"] == "c.jpg"
    empty = {k: v.copy() for k, v in out.items()}
    empty["ids"][:] = -1
    assert detections_to_coco(empty, IM_INFO, (HEIGHT, WIDTH), 1, CATEGORY_IDS) == []
    with pytest.raises(ValueError):
        detections_to_coco(out, IM_INFO, (HEIGHT, WIDTH), 1, [7])   # label 1 has no id


def test_scale_fallback_when_im_info_has_no_size():
    out = make_outputs(3)
    del out["heatmaps"], out["keypoints"], out["masks"]
    res = detections_to_coco(out, np.array([0, 0, 2.0]), (HEIGHT, WIDTH), 1, CATEGORY_IDS)
    np.testing.assert_allclose(res[0]["bbox"][:2], out["boxes"][0, :2] / 2.0, rtol=1e-6)


def test_round_trip_through_coco_evaluation(tmp_path):
    """Perfect network outputs made from a gt (resized frame, per-axis scale) score ~1 AP."""
    import cv2

    from mxmask.engine.evaluator import evaluate_results

    height, width = 201, 299
    h_r, w_r = 302, 448                                  # round(1.5 * size) per axis
    sx, sy = w_r / width, h_r / height
    rng = np.random.default_rng(0)
    anns, outputs = [], {"ids": [], "scores": [], "boxes": [], "masks": [], "heatmaps": []}
    yy, xx = np.mgrid[0:56, 0:56] + 0.5
    for n in range(6):
        w, h = rng.uniform(30, 110), rng.uniform(30, 90)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        poly = [[x + w / 2, y, x + w, y + h / 2, x + w / 2, y + h, x, y + h / 2]]
        rle = mask_util.merge(mask_util.frPyObjects(poly, height, width))
        kps = np.array([[x + w / 2, y + 2], [x + 2, y + h / 2], [x + w - 3, y + h / 2]])
        anns.append({"id": n + 1, "image_id": 1, "category_id": 3, "bbox": [x, y, w, h],
                     "area": float(mask_util.area(rle)), "iscrowd": 0, "segmentation": poly,
                     "keypoints": np.concatenate([kps, np.full((3, 1), 2)], 1).ravel().tolist(),
                     "num_keypoints": 3})
        box = np.array([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
        # 28x28 mask target: the gt mask sampled at the cell centres (RoIAlign, aligned)
        gt_mask = mask_util.decode(rle).astype(np.float32)
        cells = (np.arange(28) + 0.5) / 28
        map_x = np.tile((x + cells * w - 0.5).astype(np.float32), (28, 1))
        map_y = np.tile((y + cells * h - 0.5).astype(np.float32)[:, None], (1, 28))
        outputs["masks"].append(cv2.remap(gt_mask, map_x, map_y, cv2.INTER_LINEAR))
        centres = (kps - [x, y]) / [w, h] * 56           # heatmap units
        outputs["heatmaps"].append(-((xx[None] - centres[:, 0, None, None]) ** 2 +
                                     (yy[None] - centres[:, 1, None, None]) ** 2) / 8.0)
        outputs["ids"].append(0)
        outputs["scores"].append(0.9 - 0.1 * n)
        outputs["boxes"].append(box)
    outputs = {k: np.array(v, np.float32) for k, v in outputs.items()}
    gt = {"images": [{"id": 1, "file_name": "a.png", "height": height, "width": width}],
          "annotations": anns,
          "categories": [{"id": 3, "name": "kite", "keypoints": ["t", "l", "r"],
                          "skeleton": [[1, 2]]}]}
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    for method in ("taylor", "bicubic"):
        res = detections_to_coco(outputs, np.array([h_r, w_r, 1.5]), (height, width), 1, [3],
                                 keypoint_decode=method)
        metrics = evaluate_results(res, str(gt_path), kpt_oks_sigmas=[0.05] * 3,
                                   per_category=False)
        assert metrics["bbox"]["AP"] == 1.0
        assert metrics["segm"]["AP"] >= 0.95, metrics
        assert metrics["keypoints"]["AP"] >= 0.95, metrics
        ious = mask_util.iou([r["segmentation"] for r in res],
                             [mask_util.merge(mask_util.frPyObjects(a["segmentation"], height,
                                                                    width)) for a in anns],
                             [0] * len(anns)).diagonal()
        # ~0.98 on average; half a pixel of misalignment in the pasting drops it to ~0.955
        assert ious.min() > 0.95 and ious.mean() > 0.97, ious


def test_no_detections_with_keypoints_gives_no_entries():
    outputs = {"ids": -np.ones(5, np.float32), "scores": -np.ones(5, np.float32),
               "boxes": np.zeros((5, 4), np.float32),
               "masks": np.zeros((5, 28, 28), np.float32),
               "keypoints": np.zeros((5, 7, 3), np.float32),
               "heatmaps": np.zeros((5, 7, 56, 56), np.float32)}
    for method in ("taylor", "bicubic"):
        assert detections_to_coco(outputs, np.array([64, 80, 1.0]), (64, 80), 3, [1, 2],
                                  keypoint_decode=method) == []


# ------------------------------------------------------------------------------------------
# torchvision's output conventions
def np_bilinear(image, out_h, out_w):
    """Bilinear resize with half-pixel centres (align_corners=False), edges clamped, written out
    (torch's F.interpolate(mode='bilinear') for an upscale, without OpenCV)."""
    def axis(out_size, in_size):
        src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
        hi = np.minimum(lo + 1, in_size - 1)
        return lo, hi, src - lo
    y0, y1, fy = axis(out_h, image.shape[0])
    x0, x1, fx = axis(out_w, image.shape[1])
    rows = image[y0] * (1 - fy)[:, None] + image[y1] * fy[:, None]
    return rows[:, x0] * (1 - fx) + rows[:, x1] * fx


def np_torchvision_paste(mask, box, height, width):
    """torchvision's paste_masks_in_image(padding=1) of one mask, step by step."""
    m = mask.shape[0]
    padded = np.pad(mask.astype(np.float64), 1)
    x1, y1, x2, y2 = box
    half_w, half_h = (x2 - x1) * 0.5 * (m + 2) / m, (y2 - y1) * 0.5 * (m + 2) / m
    cx, cy = (x2 + x1) * 0.5, (y2 + y1) * 0.5
    bx0, by0, bx1, by1 = (int(v) for v in (cx - half_w, cy - half_h, cx + half_w, cy + half_h))
    resized = np_bilinear(padded, by1 - by0 + 1, bx1 - bx0 + 1)
    out = np.zeros((height, width))
    xa, xb, ya, yb = max(bx0, 0), min(bx1 + 1, width), max(by0, 0), min(by1 + 1, height)
    out[ya:yb, xa:xb] = resized[ya - by0:yb - by0, xa - bx0:xb - bx0]
    return out


def test_torchvision_paste_equals_its_definition():
    rng = np.random.default_rng(4)
    masks = rng.uniform(0, 1, (6, 28, 28)).astype(np.float32)
    boxes = np.array([[10.3, 5.6, 60.2, 40.9], [0, 0, 75, 50], [70.5, 44.2, 75, 50],
                      [20.25, 10.5, 21.0, 11.75], [5, 5, 35, 45], [-3, -2, 12, 9]], np.float32)
    probs = paste_masks_in_image(masks, boxes, HEIGHT, WIDTH, threshold=None, style="torchvision")
    for mask, box, got in zip(masks, boxes, probs):
        np.testing.assert_allclose(got, np_torchvision_paste(mask, box, HEIGHT, WIDTH),
                                   atol=2e-6)
    # bool masks: probability > threshold (torchvision's evaluation), not >=
    half = np.full((1, 28, 28), 0.5, np.float32)
    box = np.array([[10, 10, 40, 40]], np.float32)
    assert not paste_masks_in_image(half, box, HEIGHT, WIDTH, style="torchvision").any()
    assert paste_masks_in_image(half, box, HEIGHT, WIDTH).any()
    # and it is not Detectron2's paste
    other = paste_masks_in_image(masks, boxes, HEIGHT, WIDTH, threshold=None)
    assert np.abs(other - probs).max() > 0.1


def test_unused_labels_and_keypoint_offset():
    out = make_outputs(2)
    del out["masks"], out["heatmaps"]
    args = (out, IM_INFO, (HEIGHT, WIDTH), 5, CATEGORY_IDS)
    every = detections_to_coco(*args, score_thresh=0.05)
    assert [e["category_id"] for e in every] == [7, 3]
    # label 0 stands for no category (class name N/A): its detections are left out
    kept = detections_to_coco(*args, score_thresh=0.05, unused_labels=[0])
    assert [e["category_id"] for e in kept] == [3] and kept[0] == every[1]
    # keypoints are written minus the offset: 0.5 (Detectron2, the default) or 0 (torchvision)
    as_is = detections_to_coco(*args, score_thresh=0.05, keypoint_offset=0.0)
    np.testing.assert_allclose(np.array(as_is[1]["keypoints"]).reshape(-1, 3)[:, :2],
                               np.array(every[1]["keypoints"]).reshape(-1, 3)[:, :2] + 0.5)

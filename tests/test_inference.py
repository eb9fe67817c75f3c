"""Tests of mxmask.engine.inference: every image's results exactly once with several contexts,
with shards merged by gather_shards, and with the file-based gather across processes (run here
as shards in one process); refusals of datasets the model cannot be scored on.

The tiny checkpoint comes from tests/helpers/tiny.py (shared with tests/test_cli_eval.py).
"""
import copy
import json
import os

import mxnet as mx
import numpy as np
import pytest

from mxmask.data.coco import load_coco
from mxmask.engine import inference
from mxmask.engine.inference import (evaluate_on_dataset, gather_shards, inference_on_dataset,
                                     parse_shard, read_shard, run_fingerprint, shard_paths,
                                     wait_for_shards, write_shard)
from mxmask.predictor import Predictor
from mxmask.utils import UserError
from helpers.tiny import shapes_paths

def entry_key(e):
    return (e["image_id"], e["category_id"], tuple(np.round(e["bbox"], 2)), round(e["score"], 4))


def assert_same_entries(a, b, score_tol=1e-5):
    """Same entries up to order: ids equal, scores to ``score_tol``, boxes/keypoints close,
    identical RLE."""
    assert len(a) == len(b)
    for x, y in zip(sorted(a, key=entry_key), sorted(b, key=entry_key)):
        assert x.keys() == y.keys()
        assert (x["image_id"], x["category_id"]) == (y["image_id"], y["category_id"])
        assert abs(x["score"] - y["score"]) <= score_tol
        np.testing.assert_allclose(x["bbox"], y["bbox"], atol=1e-3)
        if "keypoints" in x:
            np.testing.assert_allclose(x["keypoints"], y["keypoints"], atol=1e-3)
        if "segmentation" in x:
            assert x["segmentation"] == y["segmentation"]


@pytest.fixture(scope="module")
def predictor(ckpt):
    return Predictor(ckpt, ctx=[mx.cpu(0)])


@pytest.fixture(scope="module")
def val_records(shapes_dataset):
    return load_coco(*shapes_paths(shapes_dataset, "val"), for_training=False)[0]


@pytest.fixture(scope="module")
def single_run(predictor, val_records):
    """The unsharded, single-context run: (merged entries, image ids)."""
    entries, ids, _ = inference_on_dataset(predictor, val_records)
    return gather_shards([entries], [ids], val_records), ids


def test_single_run_covers_every_image(single_run, val_records):
    entries, ids = single_run
    assert sorted(ids) == sorted(r["image_id"] for r in val_records)
    assert entries, "a random-init model scores above 0.05 somewhere"
    assert {e["image_id"] for e in entries} <= set(ids)
    assert {"bbox", "segmentation", "keypoints"} <= set().union(*entries)


def test_two_contexts_give_the_same_results(ckpt, val_records, single_run):
    two = Predictor(ckpt, ctx=[mx.cpu(0), mx.cpu(1)])
    entries, ids, _ = inference_on_dataset(two, val_records)
    assert sorted(ids) == sorted(single_run[1])          # every image once
    assert_same_entries(gather_shards([entries], [ids], val_records), single_run[0])


def test_two_contexts_with_batches_cover_every_image_once(ckpt, val_records):
    """3 batches of 2 images over 2 contexts (the last context gets a short, odd batch)."""
    records = val_records + [dict(r, image_id=r["image_id"] + 1000) for r in val_records[:1]]
    two = Predictor(ckpt, ctx=[mx.cpu(0), mx.cpu(1)])
    entries, ids, _ = inference_on_dataset(two, records, batch_size=2)
    assert sorted(ids) == sorted(r["image_id"] for r in records)
    gather_shards([entries], [ids], records)     # raises on a missing or duplicated image


def test_three_shards_gather_to_the_unsharded_run(predictor, val_records, single_run):
    shards = [inference_on_dataset(predictor, val_records, shard=(r, 3)) for r in range(3)]
    entries = [s[0] for s in shards]
    ids = [s[1] for s in shards]
    assert sorted(sum(ids, [])) == sorted(single_run[1])
    merged = gather_shards(entries, ids, val_records)
    assert_same_entries(merged, single_run[0])
    with pytest.raises(ValueError, match="more than one shard: %d" % ids[1][0]):
        gather_shards(entries + [entries[1]], ids + [ids[1]], val_records)
    missing = ", ".join(str(i) for i in sorted(ids[2]))
    with pytest.raises(ValueError, match="missing from every shard: %s" % missing):
        gather_shards(entries[:2], ids[:2], val_records)


def test_file_gather_across_ranks_equals_the_unsharded_run(predictor, shapes_dataset, tmp_path,
                                                           single_run):
    ann, images = shapes_paths(shapes_dataset, "val")
    out = str(tmp_path / "sharded")
    for rank in (2, 1):                              # the other "processes" finish first
        assert evaluate_on_dataset(predictor, ann, images, out_dir=out, shard=(rank, 3),
                                   log=None) is None
        assert os.path.exists(shard_paths(out, rank)[1])
    results = os.path.join(out, "results.json")
    metrics = evaluate_on_dataset(predictor, ann, images, out_dir=out, results_path=results,
                                  shard=(0, 3), gather_timeout=5, log=None)
    with open(results) as f:
        assert_same_entries(json.load(f), single_run[0])
    full = str(tmp_path / "full")
    expected = evaluate_on_dataset(predictor, ann, images, out_dir=full, log=None)
    assert metrics == expected
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f) == expected


def test_wait_for_shards_names_missing_and_stale_ranks(tmp_path):
    d = str(tmp_path)
    entries = [{"image_id": 3, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]
    write_shard(d, 1, 3, entries, [3, 6], fingerprint="run-a")
    assert read_shard(d, 1, 3, "run-a") == ((entries, [3, 6]), None)
    with pytest.raises(UserError, match=r"rank\(s\) 2 of 3 .*rank 2: results.rank2.ids.json "
                                        r"not written yet"):
        wait_for_shards(d, 3, [1, 2], "run-a", timeout=0.3, poll=0.05)
    with pytest.raises(UserError, match="rank 1: results.rank1.ids.json is from another run"):
        wait_for_shards(d, 3, [1], "run-b", timeout=0.2, poll=0.05)
    with pytest.raises(UserError, match="rank 1: .*from another run"):
        wait_for_shards(d, 4, [1], "run-a", timeout=0.2, poll=0.05)   # other shard count
    with open(shard_paths(d, 1)[0], "w") as f:                          # entries replaced
        json.dump(entries * 2, f)
    assert "holds 2 entries but results.rank1.ids.json says 1" in read_shard(d, 1, 3, "run-a")[1]


def test_wait_for_shards_picks_up_a_late_rank(tmp_path, monkeypatch):
    """Rank 2 appears while rank 0 waits: the wait returns it (no fixed sleep)."""
    d = str(tmp_path)
    calls = []
    real_sleep = inference.time.sleep

    def sleep(seconds):
        calls.append(seconds)
        if len(calls) == 2:
            write_shard(d, 2, 3, [], [7], fingerprint="f")
        real_sleep(0)
    monkeypatch.setattr(inference.time, "sleep", sleep)
    write_shard(d, 1, 3, [], [5], fingerprint="f")
    assert wait_for_shards(d, 3, [1, 2], "f", timeout=30, poll=0.01) == [([], [5]), ([], [7])]
    assert len(calls) == 2


def test_fingerprint_changes_with_the_weights(ckpt, predictor, shapes_dataset):
    ann = shapes_paths(shapes_dataset, "val")[0]
    a = run_fingerprint(predictor, ann, 3, 4)
    # another process loads the same checkpoint (here: a second instance, other Gluon prefixes)
    assert a == run_fingerprint(Predictor(ckpt, ctx=[mx.cpu(1)]), ann, 3, 4)
    assert a != run_fingerprint(predictor, ann, 2, 4)
    param = next(iter(predictor.net.collect_params().values()))
    old = param.data().copy()
    try:
        param.set_data(old + 1e-3)
        assert a != run_fingerprint(predictor, ann, 3, 4)
    finally:
        param.set_data(old)


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)


def test_refuses_a_dataset_the_model_cannot_be_scored_on(predictor, shapes_dataset, tmp_path):
    ann, images = shapes_paths(shapes_dataset, "val")
    with open(ann) as f:
        gt = json.load(f)
    fig = [c for c in gt["categories"] if c.get("keypoints")][0]
    other = dict(gt, categories=[c for c in gt["categories"] if c["id"] != 1],
                 annotations=[a for a in gt["annotations"] if a["category_id"] != 1])
    path = str(tmp_path / "no_cat1.json")
    with open(path, "w") as f:
        json.dump(other, f)
    with pytest.raises(UserError, match=r"no_cat1.json: has no categories with ids \[1\]"):
        evaluate_on_dataset(predictor, path, images, log=None)
    fewer = dict(gt, categories=[dict(c, keypoints=c["keypoints"][:5]) if c is fig else c
                                 for c in gt["categories"]], annotations=[])
    path = str(tmp_path / "k5.json")
    with open(path, "w") as f:
        json.dump(fewer, f)
    with pytest.raises(UserError, match="K=5 keypoints but the checkpoint's model predicts 7"):
        evaluate_on_dataset(predictor, path, images, log=None, kpt_oks_sigmas=[0.1] * 5)
    # the checkpoint's sigmas are empty here: K=7 needs them
    cfg_sigmas = predictor.cfg.test.keypoint_oks_sigmas
    predictor.cfg.test.keypoint_oks_sigmas = []
    try:
        with pytest.raises(UserError, match="K=7 keypoints but no OKS sigmas"):
            evaluate_on_dataset(predictor, ann, images, log=None)
    finally:
        predictor.cfg.test.keypoint_oks_sigmas = cfg_sigmas


def test_labels_named_na_need_no_category(predictor, shapes_dataset, tmp_path):
    """A label whose class name is N/A (torchvision's unused COCO ids) stands for no category:
    the dataset need not have it."""
    from mxmask.engine.evaluator import load_gt
    from mxmask.engine.inference import check_eval_set
    ann, _ = shapes_paths(shapes_dataset, "val")
    with open(ann) as f:
        gt = json.load(f)
    other = dict(gt, categories=[c for c in gt["categories"] if c["id"] != 1],
                 annotations=[a for a in gt["annotations"] if a["category_id"] != 1])
    path = str(tmp_path / "no_cat1.json")
    with open(path, "w") as f:
        json.dump(other, f)
    cfg = copy.deepcopy(predictor.cfg)
    with pytest.raises(UserError, match=r"has no categories with ids \[1\]"):
        check_eval_set(cfg, load_gt(path), path, cfg.data.category_ids)
    label = cfg.data.category_ids.index(1)
    cfg.data.class_names[label] = "N/A"
    check_eval_set(cfg, load_gt(path), path, cfg.data.category_ids, [0.1] * 7)

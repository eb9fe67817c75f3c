"""`mxmask eval` end to end: a checkpoint on its val set and on a given --ann/--images pair,
sharded over processes, a saved results json scored exactly as pycocotools scores it, and the
user errors (exit code 2, one line). ``scripts/eval.sh`` runs as a real process."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mxmask.cli import main
from mxmask.data.shapes import KEYPOINT_OKS_SIGMAS
from mxmask.engine.checkpoint import load_checkpoint_config, save_config
from helpers.tiny import build_tiny_checkpoint, shapes_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_SH = os.path.join(ROOT, "scripts", "eval.sh")
FIELDS = {"bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl"],
          "segm": ["AP", "AP50", "AP75", "APs", "APm", "APl"],
          "keypoints": ["AP", "AP50", "AP75", "APm", "APl"]}


def run(argv):
    """``mxmask`` in this process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def run_script(args):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run([EVAL_SH] + list(args), capture_output=True, text=True, env=env,
                          timeout=240)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def assert_one_error_line(code, out, err, *parts):
    """(exit code, stdout, stderr) of a failed run: exit 2 and one error line naming parts."""
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mxmask: error: "), err
    for part in parts:
        assert part in lines[0], (part, lines[0])


def assert_contract_metrics(metrics, tasks):
    assert list(metrics) == list(tasks)
    for task in tasks:
        assert list(metrics[task]) == FIELDS[task]
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in metrics[task].values())


def pycocotools_metrics(results, gt_ann, sigmas):
    """Each task scored by pycocotools directly (Detectron2's protocol: segm from the masks
    only; keypoints over the keypoint categories with the given OKS sigmas); -1 -> 0.0."""
    gt = COCO(gt_ann)
    kp_cats = [c for c in gt.getCatIds() if gt.cats[c].get("keypoints")]
    out = {}
    for task, key in (("bbox", "bbox"), ("segm", "segmentation"), ("keypoints", "keypoints")):
        dets = [dict(e) for e in results if key in e]
        if task == "segm":
            for d in dets:
                d.pop("bbox", None)
        if task == "keypoints":
            dets = [d for d in dets if d["category_id"] in kp_cats]
        ev = COCOeval(gt, gt.loadRes(dets), task)
        if task == "keypoints":
            ev.params.catIds = kp_cats
            ev.params.kpt_oks_sigmas = np.array(sigmas)
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[task] = {n: max(float(s), 0.0) for n, s in zip(FIELDS[task], ev.stats)}
    return out


def gt_like_results(gt_ann, seed=0):
    """Entries built from the gt (jittered boxes and keypoints, exact or eroded masks, some wrong
    classes, random scores): a results file with AP well inside (0, 1)."""
    rng = np.random.default_rng(seed)
    gt = COCO(gt_ann)
    cats = sorted(gt.getCatIds())
    entries = []
    for ann in gt.loadAnns(gt.getAnnIds(iscrowd=False)):
        if rng.random() < 0.2:
            continue                                          # a miss
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        mask = gt.annToMask(ann)
        if rng.random() < 0.4:
            mask[:, ::2] = 0                                  # a poor mask
        rle = mask_util.encode(np.asfortranarray(mask))
        cat = ann["category_id"] if rng.random() < 0.85 else int(rng.choice(cats))
        e = {"image_id": ann["image_id"], "category_id": int(cat),
             "bbox": [float(v) for v in np.array([x, y, w, h]) + jitter],
             "score": float(rng.uniform(0.05, 1.0)),
             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}}
        if "keypoints" in ann and gt.cats[cat].get("keypoints"):
            kp = np.array(ann["keypoints"], float).reshape(-1, 3)
            kp[:, :2] += rng.normal(0, 1.0, (len(kp), 2))
            kp[:, 2] = 2
            e["keypoints"] = kp.ravel().tolist()
        entries.append(e)
    return entries


@pytest.fixture(scope="module")
def evaluated(ckpt):
    """``scripts/eval.sh CKPT --plots`` (a real process): its result."""
    return run_script([ckpt, "--plots"])


def test_eval_checkpoint_on_its_val_set(ckpt, evaluated, shapes_dataset):
    assert evaluated.returncode == 0, evaluated.stderr
    out = evaluated.stdout
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in out
    assert "Per-category segm AP:" in out and "rectangle" in out
    assert "metrics: %s" % os.path.join(ckpt, "metrics.json") in out
    metrics = read_json(os.path.join(ckpt, "metrics.json"))
    assert_contract_metrics(metrics, ["bbox", "segm", "keypoints"])
    for task in ("bbox", "segm", "keypoints"):
        assert os.path.getsize(os.path.join(ckpt, "pr_%s.png" % task)) > 1000
    results = read_json(os.path.join(ckpt, "results.json"))
    val_ann = shapes_paths(shapes_dataset, "val")[0]
    val_ids = {img["id"] for img in read_json(val_ann)["images"]}
    assert results and {e["image_id"] for e in results} <= val_ids
    assert metrics == pycocotools_metrics(results, val_ann, KEYPOINT_OKS_SIGMAS)


def test_eval_results_file_equals_pycocotools(ckpt, evaluated, shapes_dataset, tmp_path):
    val_ann = shapes_paths(shapes_dataset, "val")[0]
    results = read_json(os.path.join(ckpt, "results.json")) + gt_like_results(val_ann)
    path = str(tmp_path / "mixed.json")
    with open(path, "w") as f:
        json.dump(results, f)
    sigmas = [str(s) for s in KEYPOINT_OKS_SIGMAS]
    code, out, err = run(["eval", "--results", path, "--ann", val_ann, "--sigmas"] + sigmas)
    assert code == 0, err
    metrics = read_json(str(tmp_path / "metrics.json"))      # default: the results' folder
    expected = pycocotools_metrics(results, val_ann, KEYPOINT_OKS_SIGMAS)
    assert metrics == expected
    assert_contract_metrics(metrics, ["bbox", "segm", "keypoints"])
    assert all(0.05 < metrics[t]["AP"] < 1.0 for t in metrics), metrics
    # with a checkpoint, its test.keypoint_oks_sigmas are used and metrics.json goes there
    other = str(tmp_path / "ckpt_copy")
    shutil.copytree(ckpt, other)
    code, _, err = run(["eval", other, "--results", path, "--ann", val_ann])
    assert code == 0, err
    assert read_json(os.path.join(other, "metrics.json")) == expected
    # a results file without masks and keypoints is scored on bbox only
    boxes = [{k: e[k] for k in ("image_id", "category_id", "bbox", "score")} for e in results]
    with open(path, "w") as f:
        json.dump(boxes, f)
    code, _, err = run(["eval", "--results", path, "--ann", val_ann])
    assert code == 0, err
    assert read_json(str(tmp_path / "metrics.json")) == {"bbox": expected["bbox"]}


def test_eval_checkpoint_on_a_given_dataset(ckpt, shapes_dataset, tmp_path):
    ann, images = shapes_paths(shapes_dataset, "train")
    out_dir, results = str(tmp_path / "eval_train"), str(tmp_path / "train_results.json")
    code, out, err = run(["eval", ckpt, "--ann", ann, "--images", images, "--out-dir", out_dir,
                          "--out", results])
    assert code == 0, err
    metrics = read_json(os.path.join(out_dir, "metrics.json"))
    assert_contract_metrics(metrics, ["bbox", "segm", "keypoints"])
    entries = read_json(results)
    train_ids = {img["id"] for img in read_json(ann)["images"]}
    assert entries and {e["image_id"] for e in entries} <= train_ids
    assert metrics == pycocotools_metrics(entries, ann, KEYPOINT_OKS_SIGMAS)


def test_eval_sharded_over_processes_equals_one_process(ckpt, evaluated, tmp_path):
    """Two `mxmask eval --shard` runs (rank 1 first, as another process would) give rank 0 the
    same results and metrics as the unsharded run."""
    out_dir = str(tmp_path / "sharded")
    code, out, err = run(["eval", ckpt, "--shard", "1/2", "--out-dir", out_dir])
    assert code == 0, err
    assert "shard 1/2 written to" in out
    assert not os.path.exists(os.path.join(out_dir, "metrics.json"))
    code, out, err = run(["eval", ckpt, "--shard", "0/2", "--out-dir", out_dir,
                          "--gather-timeout", "10", "--ctx", "cpu:2"])
    assert code == 0, err
    assert read_json(os.path.join(out_dir, "metrics.json")) == \
        read_json(os.path.join(ckpt, "metrics.json"))
    sharded = read_json(os.path.join(out_dir, "results.json"))
    single = read_json(os.path.join(ckpt, "results.json"))
    assert [(e["image_id"], e["category_id"]) for e in sharded] == \
        [(e["image_id"], e["category_id"]) for e in single]
    np.testing.assert_allclose([e["score"] for e in sharded], [e["score"] for e in single],
                               atol=1e-5)
    # rank 0 alone, rank 1's files gone: a bounded wait, then the missing rank is named
    for name in ("results.rank1.json", "results.rank1.ids.json"):
        os.remove(os.path.join(out_dir, name))
    code, out, err = run(["eval", ckpt, "--shard", "0/2", "--out-dir", out_dir,
                          "--gather-timeout", "0.5"])
    assert_one_error_line(code, out, err, "waiting for the results of rank(s) 1 of 2")


def test_a_model_without_keypoints_leaves_them_out(shapes_dataset, tmp_path):
    ckpt = str(tmp_path / "masks_only")
    build_tiny_checkpoint(shapes_dataset, ckpt, ["model.keypoint_on=false"])
    code, _, err = run(["eval", ckpt])
    assert code == 0, err
    metrics = read_json(os.path.join(ckpt, "metrics.json"))
    assert_contract_metrics(metrics, ["bbox", "segm"])
    assert not any("keypoints" in e for e in read_json(os.path.join(ckpt, "results.json")))


def test_eval_set_changes_test_settings_only(ckpt, evaluated, shapes_dataset, tmp_path):
    """``eval --set test.KEY=VALUE`` changes how the checkpoint is run (here the second box-head
    pass, test.refine_boxes: the same detections, moved); any other key is a one-line error."""
    out_dir = str(tmp_path / "refined")
    code, out, err = run(["eval", ckpt, "--out-dir", out_dir, "--set", "test.refine_boxes=true"])
    assert code == 0, out + err
    plain = read_json(os.path.join(ckpt, "results.json"))
    refined = read_json(os.path.join(out_dir, "results.json"))
    key = lambda e: (e["image_id"], e["category_id"])                      # noqa: E731
    assert refined and {key(e) for e in refined} <= {key(e) for e in plain}
    plain_boxes = {tuple(np.round(e["bbox"], 3)) for e in plain}
    moved = [e for e in refined if tuple(np.round(e["bbox"], 3)) not in plain_boxes]
    assert len(moved) > len(refined) // 2
    val_ann = shapes_paths(shapes_dataset, "val")[0]
    assert read_json(os.path.join(out_dir, "metrics.json")) == \
        pycocotools_metrics(refined, val_ann, KEYPOINT_OKS_SIGMAS)
    assert_one_error_line(*run(["eval", ckpt, "--set", "model.num_classes=2"]),
                          "--set model.num_classes=2", "only test.* settings")
    assert_one_error_line(*run(["eval", ckpt, "--set", "test.refine_box=true"]),
                          "test.refine_box", "did you mean test.refine_boxes")


def test_user_errors_exit_2_with_one_line(ckpt, evaluated, shapes_dataset, tmp_path):
    val_ann, val_images = shapes_paths(shapes_dataset, "val")
    missing = str(tmp_path / "no_such_ckpt")
    assert_one_error_line(*run(["eval", missing]), missing, "checkpoint folder not found")
    # a results file with a bad entry
    results = read_json(os.path.join(ckpt, "results.json"))
    results[3]["score"] = "high"
    bad = str(tmp_path / "bad.json")
    with open(bad, "w") as f:
        json.dump(results, f)
    assert_one_error_line(*run(["eval", "--results", bad, "--ann", val_ann]),
                          "bad.json: entry 3: field score must be a finite number")
    # K = 7 keypoints and no sigmas: the user is told to pass them
    good = os.path.join(ckpt, "results.json")
    assert_one_error_line(*run(["eval", "--results", good, "--ann", val_ann]),
                          "val.json", "K=7", "pass 7 with --sigmas")
    assert_one_error_line(*run(["eval", "--results", good, "--ann", val_ann,
                                "--sigmas", "0.1", "0.1"]), "K=7", "has 2 values")
    assert_one_error_line(*run(["eval", "--results", good]), "--results needs --ann")
    assert_one_error_line(*run(["eval", ckpt, "--images", val_images]), "--images needs --ann")
    assert_one_error_line(*run(["eval", ckpt, "--ann", val_ann]), "--ann needs --images")
    assert_one_error_line(*run(["eval", ckpt, "--shard", "2/2"]), "--shard 2/2")
    assert_one_error_line(*run(["eval"]), "needs a checkpoint folder")
    assert_one_error_line(*run(["eval", ckpt, "--ctx", "cpu:2", "--dtype", "bfloat16"]),
                          "--ctx cpu(0),cpu(1)", "one CPU context")
    # the checkpoint's val set is gone: say which file, and how to make the shapes set
    moved = str(tmp_path / "moved_ckpt")
    shutil.copytree(ckpt, moved)
    cfg = load_checkpoint_config(moved)
    cfg.data.shapes.root = str(tmp_path / "gone")
    cfg.data.val_ann = os.path.join(cfg.data.shapes.root, "annotations", "val.json")
    save_config(cfg, moved)
    assert_one_error_line(*run(["eval", moved]), cfg.data.val_ann, "data.val_ann",
                          "mxmask data shapes %s" % cfg.data.shapes.root)


def test_eval_sh_is_executable_and_reports_errors(tmp_path):
    assert os.access(EVAL_SH, os.X_OK)
    with open(EVAL_SH) as f:
        text = f.read()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    proc = run_script([str(tmp_path / "nothing")])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "mxmask: error: %s: checkpoint folder not found" % (
        tmp_path / "nothing")
    assert run_script([]).returncode == 2


def test_bench_eval_splits_the_time(ckpt, tmp_path, capsys):
    """dev/bench_eval.py on the tiny checkpoint's val set: every stage timed, the total is
    the sum of the counted stages, the pieces of post-processing add up to it."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "bench_eval", os.path.join(ROOT, "dev", "bench_eval.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = str(tmp_path / "bench.json")
    assert bench.main(["--ckpt", ckpt, "--warmup", "1", "--limit", "2", "--json", report]) == 0
    out = capsys.readouterr().out
    assert "network forward" in out and "COCOeval segm" in out
    numbers = read_json(report)
    assert numbers["images"] == 2
    s = numbers["seconds"]
    counted = ["data (read + resize)", "network forward", "post-processing (all)",
               "COCOeval bbox", "COCOeval segm", "COCOeval keypoints"]
    assert all(s[k] > 0 for k in counted + ["mask paste", "RLE encode",
                                              "keypoint decode (taylor)"])
    assert numbers["total"] == pytest.approx(sum(s[k] for k in counted))
    pieces = ["mask paste", "RLE encode", "keypoint decode (taylor)", "rest, by difference"]
    assert sum(s[k] for k in pieces) == pytest.approx(s["post-processing (all)"])
    assert set(numbers["extras"]) == {"keypoint decode (bicubic)"}
    assert bench.main(["--ckpt", str(tmp_path / "none")]) == 2

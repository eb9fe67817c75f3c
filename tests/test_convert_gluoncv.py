"""``mxmask convert gluoncv``: a GluonCV ``mask_rcnn_fpn_resnet50_v1b_coco`` parameter file becomes
a checkpoint of preset ``gluoncv_mask_rcnn_r50_fpn`` that reproduces GluonCV's network, and
``mxmask predict`` on it writes GluonCV's detections as GluonCV's COCO evaluation writes them:
on an image file, with the preset's input pipeline, the tensor of GluonCV's ``load_test`` and
GluonCV's detections end to end.

One GluonCV build (module fixture) with random weights, randomised BatchNorm statistics and
rescaled prediction layers so that scores and mask probabilities are spread out (GluonCV's
default init gives near-tied class scores of ~1/81 and mask probabilities near 0.5, which would
compare nothing). Nothing is downloaded. GluonCV's FPN pooling is patched (its -1 batch index
corrupts ROIAlign on CPU: DEVELOPING.md, "Measured facts about MXNet 1.9.1 on CPU") with the
imperative-only "gathered" workaround of mxmask.convert.gluoncv_reference: each level's rois
pooled once, the GluonCV net not hybridized.
"""
import json
import os
import types

import mxnet as mx
import numpy as np
import pytest
from PIL import Image

from mxmask import cli
from mxmask.config import load_yaml
from mxmask.convert.gluoncv import (COCO_CATEGORY_IDS, COCO_CLASS_NAMES, GLUONCV_HEADS,
                                    convert_gluoncv)
from mxmask.convert.gluoncv_reference import patch_pyramid_roi_feats
from mxmask.postprocess import paste_masks_in_image
from mxmask.utils import UserError

gcv = pytest.importorskip("gluoncv")

SHORT, MAX_SIZE = 800, 1333
IMAGE_HW = (200, 256)          # resized x4 to 800x1024: a multiple of 32, so no padding either side


def _randomise(g, rng):
    """Random BN statistics / affine, non-zero biases, and prediction layers scaled so that the
    class scores and mask probabilities spread out."""
    params = g._collect_params_with_prefix()
    for name, p in params.items():
        if "anchor_generator" in name:
            continue
        shape = p.shape
        if name.endswith("running_mean"):
            p.set_data(mx.nd.array(rng.randn(*shape) * 0.1))
        elif name.endswith("running_var"):
            p.set_data(mx.nd.array(rng.uniform(0.5, 2.0, shape)))
        elif name.endswith("gamma"):
            p.set_data(mx.nd.array(rng.uniform(0.5, 1.5, shape)))
        elif name.endswith("beta") or name.endswith("bias"):
            p.set_data(mx.nd.array(rng.randn(*shape) * 0.01))
    w = params["class_predictor.weight"]
    w.set_data(w.data() * 10)                                  # logits std ~0.4 -> ~4
    params["class_predictor.bias"].set_data(mx.nd.array(rng.randn(81)))
    m = params["mask.mask.weight"]
    m.set_data(m.data() * 20)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """GluonCV net (random, patched, 100 detections), its params file and the converted ckpt."""
    tmp = tmp_path_factory.mktemp("convert_gluoncv")
    mx.random.seed(3)
    g = gcv.model_zoo.get_model("mask_rcnn_fpn_resnet50_v1b_coco", pretrained=False,
                                pretrained_base=False)
    g.initialize()
    patch_pyramid_roi_feats(g, "gathered")
    # resolve the deferred shapes with a cheap forward (10 rois), then GluonCV's test settings
    g._rpn_test_post_nms = g.rpn._test_post_nms = g._rcnn_max_dets = 10
    g(mx.nd.zeros((1, 3, 64, 64)))
    g._rpn_test_post_nms = g.rpn._test_post_nms = 1000
    # get_model(..., rcnn_max_dets=...) raises (DEVELOPING.md, "Outside references")
    g._rcnn_max_dets = 100
    _randomise(g, np.random.RandomState(0))
    src = str(tmp / "gluoncv_mask_rcnn.params")
    g.save_parameters(src)
    ckpt = str(tmp / "ckpt")
    assert cli.main(["convert", "gluoncv", src, "--out", ckpt]) == 0
    from mxmask.predictor import load_network
    cfg = load_yaml(os.path.join(ckpt, "config.yaml"))
    ours = load_network(cfg, os.path.join(ckpt, "model.params"), [mx.cpu()], hybridize=False)
    return types.SimpleNamespace(g=g, src=src, ckpt=ckpt, tmp=tmp, cfg=cfg, ours=ours)


# --------------------------------------------------------------------------------------------
def test_converted_checkpoint_files_and_config(converted):
    ckpt = converted.ckpt
    for name in ("config.yaml", "model.params", "progress.json"):
        assert os.path.isfile(os.path.join(ckpt, name)), name
    with open(os.path.join(ckpt, "progress.json")) as f:
        progress = json.load(f)
    assert progress["iter"] == 0 and progress["max_iter"] == 0
    assert progress["source"] == os.path.abspath(converted.src)
    cfg = converted.cfg
    assert cfg.model.num_classes == 80
    assert cfg.data.class_names == list(gcv.data.COCODetection.CLASSES)
    ids = cfg.data.category_ids
    assert len(ids) == 80 and ids == sorted(ids) and ids[0] == 1 and ids[-1] == 90
    assert set(range(1, 91)) - set(ids) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    assert cfg.data.val_ann == "datasets/coco/annotations/instances_val2017.json"
    assert cfg.data.val_images == "datasets/coco/val2017"
    # GluonCV's test-time behaviour
    assert cfg.model.box_plus_one and not cfg.model.clip_boxes
    assert (cfg.test.score_thresh, cfg.test.nms_thresh, cfg.test.max_dets) == (0.01, 0.5, 100)
    assert (cfg.input.min_size_test, cfg.input.max_size_test) == (SHORT, MAX_SIZE)
    assert (cfg.input.resize_rule, cfg.input.resize_interp, cfg.input.normalize,
            cfg.input.size_divisibility) == ("gluoncv", "cubic", "stepwise", 1)
    # the arrays arrive unchanged under their mxmask names
    saved = mx.nd.load(os.path.join(ckpt, "model.params"))
    gp = converted.g._collect_params_with_prefix()
    for theirs, ours in GLUONCV_HEADS.items():
        np.testing.assert_array_equal(saved[ours + ".weight"].asnumpy(),
                                      gp[theirs + ".weight"].data().asnumpy())
    np.testing.assert_array_equal(
        saved["backbone.bottom_up.layer4.2.bn3.running_var"].asnumpy(),
        gp["features.resnetv1b_layers4_batchnorm8_running_var"].data().asnumpy())


def test_fpn_features_match(converted):
    """(a) P2..P6 of the converted network equal GluonCV's on the same normalised input."""
    x = mx.nd.array(np.random.RandomState(1).randn(1, 3, 256, 320).astype(np.float32))
    theirs = [f.asnumpy() for f in converted.g.features(x)]
    ours = [f.asnumpy() for f in converted.ours.backbone(x)]
    assert len(theirs) == len(ours) == 5
    for t, o in zip(theirs, ours):
        assert t.shape == o.shape and t.std() > 1.0
        np.testing.assert_allclose(o, t, rtol=1e-4, atol=1e-4 * np.abs(t).max())


def _predict(converted, monkeypatch, path, *args):
    """``mxmask predict CKPT PATH [ARGS]`` through the CLI -> (its test batch, the network's raw
    outputs (numpy), the results json)."""
    from mxmask.predictor import Predictor
    seen = []
    forward = Predictor.forward

    def capture(self, batch, ctx):
        outs = forward(self, batch, ctx)
        seen.append((batch, [o.asnumpy() for o in outs]))
        return outs

    monkeypatch.setattr(Predictor, "forward", capture)
    out_json = str(converted.tmp / "results.json")
    assert cli.main(["predict", converted.ckpt, path, "--out", out_json] + list(args)) == 0
    (batch, outs), = seen
    with open(out_json) as f:
        return batch, outs, json.load(f)


def _assert_detections_equal_gluoncv(converted, outs, results, data, image_hw):
    """GluonCV's network on ``data`` (its own input tensor, (1, 3, h, w)) against mxmask's raw
    outputs and results json for an image of ``image_hw``: (b) the top-100 detections: same
    labels, scores within 1e-4, boxes within 0.01 px, masks within 2e-4; (c) the json:
    GluonCV's detections mapped to COCO ids, bbox [x1, y1, x2 - x1, y2 - y1] as GluonCV's
    COCO instance writer (utils/metrics/coco_instance.py) of the boxes mapped back by the
    resize's per-axis factors, masks as its evaluation pastes them (fill, fast_fill=False)."""
    from gluoncv.data.transforms.mask import fill
    import pycocotools.mask as mask_util
    ids, scores, boxes, masks = (o[0] for o in outs)
    gi, gs, gb, gm = [o.asnumpy()[0] for o in converted.g(mx.nd.array(data))]
    gi, gs = gi[:, 0], gs[:, 0]
    assert (gi >= 0).sum() == 100 and gs[99] > 0.3 and gs[0] - gs[99] > 0.1
    assert 0.05 < (gm[:10] > 0.5).mean() < 0.95

    # (b) network outputs: same labels, scores within 1e-4, boxes within 0.01 px
    np.testing.assert_array_equal(ids, gi)
    np.testing.assert_allclose(scores, gs, rtol=0, atol=1e-4)
    np.testing.assert_allclose(boxes, gb, rtol=0, atol=0.01)
    # masks within 2e-4: the steep random mask layer amplifies float noise (GluonCV against
    # itself on inputs 4.8e-7 apart: 1.9e-3); on equal inputs the two networks gave 1.3e-4 on 2
    # of 78,400 values of the evaluation-transform image and 1.7e-5 from the order of float sums
    np.testing.assert_allclose(masks, gm, rtol=0, atol=2e-4)

    # (c) the results json
    assert len(results) == 100
    cats = np.array([r["category_id"] for r in results])
    np.testing.assert_array_equal(cats, np.array(COCO_CATEGORY_IDS)[gi.astype(int)])
    np.testing.assert_allclose([r["score"] for r in results], gs, rtol=0, atol=1e-4)
    sx, sy = data.shape[3] / image_hw[1], data.shape[2] / image_hw[0]
    original = gb / [sx, sy, sx, sy]
    xywh = np.array([r["bbox"] for r in results])
    gxywh = np.concatenate([original[:, :2], original[:, 2:] - original[:, :2]], axis=1)
    np.testing.assert_allclose(xywh, gxywh, rtol=0, atol=0.01 / min(sx, sy))
    full = fill(gm, original, image_hw[::-1], fast_fill=False).astype(bool)
    decoded = mask_util.decode([r["segmentation"] for r in results]).transpose(2, 0, 1)
    assert decoded.shape == (100,) + tuple(image_hw)
    assert full.sum() > 400 and (full.sum(axis=(1, 2)) > 0).sum() > 30
    differ = (decoded != full).sum(axis=(1, 2))
    assert (differ <= 0.001 * full.sum(axis=(1, 2)) + 1).all(), differ


def test_predict_matches_gluoncv_eval_transform(converted, monkeypatch):
    """``mxmask predict --set input.resize_interp=linear`` gives the input tensor of GluonCV's
    COCO evaluation transform (``MaskRCNNDefaultValTransform``: short 800, max 1333, interp=1,
    the pipeline behind its published AP) exactly, and (b) the network's top-100 detections
    and (c) the results json equal GluonCV's on it."""
    from gluoncv.data.transforms.presets.rcnn import MaskRCNNDefaultValTransform

    rng = np.random.RandomState(2)
    small = rng.randint(0, 256, (IMAGE_HW[0] // 4, IMAGE_HW[1] // 4, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(small).resize(IMAGE_HW[::-1], Image.BILINEAR))
    path = str(converted.tmp / "image.png")
    Image.fromarray(image).save(path)
    batch, outs, results = _predict(converted, monkeypatch, path,
                                    "--set", "input.resize_interp=linear")
    data, im_info = MaskRCNNDefaultValTransform(SHORT, MAX_SIZE)(
        mx.image.imread(path), np.zeros((0, 5)), np.zeros((0,) + IMAGE_HW))
    assert data.shape == (3, 800, 1024) and float(im_info[2].asscalar()) == 4.0
    np.testing.assert_array_equal(batch["data"][0], data.asnumpy())
    np.testing.assert_allclose(batch["im_info"][0], [800, 1024, 4.0])
    assert all(r["file_name"] == "image.png" for r in results)
    _assert_detections_equal_gluoncv(converted, outs, results, batch["data"], IMAGE_HW)


def test_predict_image_file_reproduces_load_test(converted, monkeypatch):
    """``mxmask predict CKPT IMAGE`` is GluonCV end to end. The preset's input pipeline
    (``input.resize_rule`` gluoncv, ``resize_interp`` cubic, ``normalize`` stepwise,
    ``size_divisibility`` 1) makes from a 500x375 JPEG exactly the tensor of GluonCV's
    ``load_test(path, short=800, max_size=1333)`` (1067x800: no side a multiple of the input's
    or of 32, so rounding, interpolation and padding all matter), and GluonCV's network on its
    own tensor gives mxmask's top-100 detections."""
    from gluoncv.data.transforms.presets.rcnn import load_test
    hw = (375, 500)
    rng = np.random.RandomState(4)
    small = rng.randint(0, 256, (hw[0] // 5, hw[1] // 5, 3)).astype(np.uint8)
    path = str(converted.tmp / "photo.jpg")
    Image.fromarray(small).resize(hw[::-1], Image.BILINEAR).save(path, quality=92)
    batch, outs, results = _predict(converted, monkeypatch, path)
    theirs, _ = load_test(path, short=SHORT, max_size=MAX_SIZE)
    assert theirs.shape == (1, 3, 800, 1067)
    np.testing.assert_array_equal(batch["data"], theirs.asnumpy())
    np.testing.assert_array_equal(batch["im_info"][0], np.float32([800, 1067, 800 / 375]))
    _assert_detections_equal_gluoncv(converted, outs, results, theirs.asnumpy(), hw)


def test_paste_equals_gluoncv_eval_fill():
    """Our paste of a box in continuous coordinates (box_plus_one=False) is GluonCV's evaluation
    paste (``fill(..., fast_fill=False)``) pixel for pixel; the +1 extent is not."""
    from gluoncv.data.transforms.mask import fill
    rng = np.random.RandomState(0)
    masks = ((rng.rand(6, 28, 28) + np.linspace(0, 1, 28)[None, None]) / 2).astype(np.float32)
    boxes = np.concatenate([rng.uniform(0, 50, (6, 2)), rng.uniform(60, 120, (6, 2))], axis=1)
    boxes = boxes.astype(np.float32)
    theirs = fill(masks, boxes, (128, 112), fast_fill=False)
    ours = paste_masks_in_image(masks, boxes, 112, 128)
    np.testing.assert_array_equal(ours, theirs.astype(bool))
    plus_one = paste_masks_in_image(masks, boxes + [0, 0, 1, 1], 112, 128)
    assert (plus_one != theirs.astype(bool)).sum() > 100


# --------------------------------------------------------------------------------------------
def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_src_gives_exit_code_2(converted, tmp_path, capsys):
    out = str(tmp_path / "out")
    missing = str(tmp_path / "nope.params")
    assert cli.main(["convert", "gluoncv", missing, "--out", out]) == 2
    line = _error_line(capsys)
    assert missing in line and "not found" in line

    text = tmp_path / "text.params"
    text.write_text("not a parameter file")
    assert cli.main(["convert", "gluoncv", str(text), "--out", out]) == 2
    assert str(text) in _error_line(capsys)

    arrays = mx.nd.load(converted.src)
    del arrays["mask.mask.bias"]                                       # missing
    arrays["rpn.rpn_head.extra.weight"] = mx.nd.zeros((3,))            # unexpected
    arrays["class_predictor.weight"] = mx.nd.zeros((91, 1024))         # wrong shape
    bad = str(tmp_path / "bad.params")
    mx.nd.save(bad, arrays)
    assert cli.main(["convert", "gluoncv", bad, "--out", out]) == 2
    line = _error_line(capsys)
    assert line.startswith("mxmask: error: %s: " % bad)
    assert "missing 1: mask.mask.bias" in line
    assert "unexpected 1: rpn.rpn_head.extra.weight" in line
    assert "wrong shape 1: class_predictor.weight (91, 1024)" in line
    assert not os.path.exists(os.path.join(out, "model.params"))


def test_refuses_to_overwrite_a_training_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "progress.json").write_text(json.dumps({"iter": 10, "max_iter": 100}))
    with pytest.raises(UserError, match="already holds a checkpoint"):
        convert_gluoncv(str(tmp_path / "unused.params"), str(run))


def test_coco_tables():
    assert COCO_CLASS_NAMES == list(gcv.data.COCODetection.CLASSES)
    assert len(COCO_CATEGORY_IDS) == 80 == len(set(COCO_CATEGORY_IDS))

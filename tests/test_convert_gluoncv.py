"""``mxmask convert gluoncv``: a GluonCV ``mask_rcnn_fpn_resnet50_v1b_coco`` parameter file becomes
a checkpoint of preset ``gluoncv_mask_rcnn_r50_fpn`` that reproduces GluonCV's network, and
``mxmask predict`` on it writes GluonCV's detections as GluonCV's COCO evaluation writes them.

One GluonCV build (module fixture) with random weights, randomised BatchNorm statistics and
rescaled prediction layers so that scores and mask probabilities are spread out (GluonCV's
default init gives near-tied class scores of ~1/81 and mask probabilities near 0.5, which would
compare nothing). Nothing is downloaded. GluonCV's FPN pooling is patched (its -1 batch index
corrupts ROIAlign on CPU, DESIGN.md section 6) with the imperative-only "gathered" workaround of
mxmask.convert.gluoncv_reference: each level's rois pooled once, the GluonCV net not hybridized.
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
    g._rcnn_max_dets = 100       # get_model(..., rcnn_max_dets=...) raises (DESIGN.md section 6)
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


def test_predict_matches_gluoncv(converted, monkeypatch):
    """(b) the network's top-100 detections and (c) ``mxmask predict``'s results json equal
    GluonCV's on an image preprocessed as GluonCV's COCO evaluation does (short 800, max 1333,
    bilinear: ``MaskRCNNDefaultValTransform``; the resized 800x1024 needs no padding)."""
    from gluoncv.data.transforms.mask import fill
    from gluoncv.data.transforms.presets.rcnn import MaskRCNNDefaultValTransform
    import pycocotools.mask as mask_util
    from mxmask.predictor import Predictor

    rng = np.random.RandomState(2)
    small = rng.randint(0, 256, (IMAGE_HW[0] // 4, IMAGE_HW[1] // 4, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(small).resize(IMAGE_HW[::-1], Image.BILINEAR))
    path = str(converted.tmp / "image.png")
    Image.fromarray(image).save(path)

    # mxmask through the CLI, with the network input and raw outputs captured on the way
    seen = []
    forward = Predictor.forward

    def capture(self, batch, ctx):
        outs = forward(self, batch, ctx)
        seen.append((batch, [o.asnumpy() for o in outs]))
        return outs

    monkeypatch.setattr(Predictor, "forward", capture)
    out_json = str(converted.tmp / "results.json")
    assert cli.main(["predict", converted.ckpt, path, "--out", out_json]) == 0
    (batch, outs), = seen
    ids, scores, boxes, masks = (o[0] for o in outs)

    # GluonCV's evaluation transform gives the same tensor (up to float rounding of the
    # normalisation); GluonCV's network then runs on our tensor so that nothing but the
    # networks differ (its random mask layer is steep enough to amplify 1-ulp input changes)
    data, im_info = MaskRCNNDefaultValTransform(SHORT, MAX_SIZE)(
        mx.image.imread(path), np.zeros((0, 5)), np.zeros((0,) + IMAGE_HW))
    scale = float(im_info[2].asscalar())
    assert data.shape == (3, 800, 1024) and scale == 4.0
    assert tuple(batch["data"].shape) == (1, 3, 800, 1024)
    np.testing.assert_allclose(batch["data"][0], data.asnumpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(batch["im_info"][0], [800, 1024, 4.0])
    gi, gs, gb, gm = [o.asnumpy()[0] for o in converted.g(mx.nd.array(batch["data"]))]
    gi, gs = gi[:, 0], gs[:, 0]
    assert (gi >= 0).sum() == 100 and gs[99] > 0.3 and gs[0] - gs[99] > 0.1
    assert 0.05 < (gm[:10] > 0.5).mean() < 0.95

    # (b) network outputs: same labels, scores within 1e-4, boxes within 0.01 px
    np.testing.assert_array_equal(ids, gi)
    np.testing.assert_allclose(scores, gs, rtol=0, atol=1e-4)
    np.testing.assert_allclose(boxes, gb, rtol=0, atol=0.01)
    # masks as the scores: within 1e-4 (the steep random mask layer turns the order of float
    # sums into 1.7e-5 with OMP_NUM_THREADS=1)
    np.testing.assert_allclose(masks, gm, rtol=0, atol=1e-4)

    # (c) the results json: GluonCV's detections mapped to COCO ids, bbox as GluonCV's writer
    # (utils/metrics/coco_instance.py: [x1, y1, x2 - x1, y2 - y1] of the boxes / im_scale)
    with open(out_json) as f:
        results = json.load(f)
    assert len(results) == 100
    assert all(r["file_name"] == "image.png" for r in results)
    cats = np.array([r["category_id"] for r in results])
    np.testing.assert_array_equal(cats, np.array(COCO_CATEGORY_IDS)[gi.astype(int)])
    np.testing.assert_allclose([r["score"] for r in results], gs, rtol=0, atol=1e-4)
    xywh = np.array([r["bbox"] for r in results])
    gxywh = np.concatenate([gb[:, :2], gb[:, 2:] - gb[:, :2]], axis=1) / scale
    np.testing.assert_allclose(xywh, gxywh, rtol=0, atol=0.01 / scale)
    # masks as GluonCV's evaluation pastes them (fill with fast_fill=False, boxes / im_scale)
    full = fill(gm, gb / scale, IMAGE_HW[::-1], fast_fill=False).astype(bool)
    decoded = mask_util.decode([r["segmentation"] for r in results]).transpose(2, 0, 1)
    assert decoded.shape == (100,) + IMAGE_HW
    assert full.sum() > 400 and (full.sum(axis=(1, 2)) > 0).sum() > 30
    differ = (decoded != full).sum(axis=(1, 2))
    assert (differ <= 0.001 * full.sum(axis=(1, 2)) + 1).all(), differ


def test_load_test_tensor_equals_ours_without_resize(converted, tmp_path):
    """GluonCV's demo loader ``load_test`` resizes with INTER_AREA (ours, like its COCO eval
    transform, is bilinear), so both give the same tensor only when no resize is needed."""
    from gluoncv.data.transforms.presets.rcnn import load_test
    from mxmask.data.transforms import TestTransform
    rng = np.random.RandomState(4)
    image = rng.randint(0, 256, (800, 1024, 3)).astype(np.uint8)
    path = str(tmp_path / "big.png")
    Image.fromarray(image).save(path)
    theirs, _ = load_test(path, short=SHORT, max_size=MAX_SIZE)
    ours, im_info = TestTransform(converted.cfg).apply_image(image)
    assert tuple(im_info) == (800, 1024, 1.0)
    np.testing.assert_allclose(ours, theirs.asnumpy()[0], atol=2e-6)


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

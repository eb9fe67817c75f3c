"""Tests of mxmask.modeling.rcnn: every preset builds and runs, output contract, hybridize and
export equality, heads on the final detections only, and exact agreement with GluonCV."""
import warnings

import mxnet as mx
import numpy as np
import pytest

from mxmask.config import get_config, list_presets
from mxmask.convert.gluoncv import GLUONCV_HEADS
from mxmask.convert.gluoncv_reference import patch_pyramid_roi_feats
from mxmask.modeling.rcnn import MaskRCNN, build_model, output_names
from mxmask.utils import UserError

SHAPES = ["model.num_classes=3", "model.num_keypoints=4", "test.max_dets=20",
          "model.rpn.post_nms_topk_test=100", "test.refine_boxes=false", "test.flip=false",
          "test.mask_score=false"]


def inputs(B=2, H=128, W=160, seed=0):
    rng = np.random.RandomState(seed)
    data = mx.nd.array(rng.randn(B, 3, H, W).astype(np.float32))
    im_info = mx.nd.array([[H, W, 1.0]] + [[H - 28, W - 40, 0.5]] * (B - 1))
    return data, im_info


@pytest.fixture(scope="module")
def shapes_net():
    mx.random.seed(0)
    return build_model(get_config("shapes", SHAPES))


@pytest.fixture(scope="module")
def shapes_outputs(shapes_net):
    data, im_info = inputs()
    return [o.asnumpy() for o in shapes_net(data, im_info)]


def check_contract(outs, cfg, B):
    D = cfg.test.max_dets
    names = output_names(cfg)
    assert len(outs) == len(names)
    o = dict(zip(names, outs))
    ids, scores, boxes = o["ids"], o["scores"], o["boxes"]
    assert ids.shape == (B, D) and scores.shape == (B, D) and boxes.shape == (B, D, 4)
    pad = ids < 0
    assert (ids[pad] == -1).all() and (ids[~pad] < cfg.model.num_classes).all()
    assert (ids[~pad] == np.round(ids[~pad])).all()
    assert (scores[pad] == -1).all() and (scores[~pad] > cfg.test.score_thresh).all()
    assert (boxes[pad] == 0).all()
    for b in range(B):
        n = int((~pad[b]).sum())
        assert (~pad[b, :n]).all() and (np.diff(scores[b, :n]) <= 0).all()
    if cfg.model.mask_on:
        R = cfg.model.mask_head.resolution
        assert o["masks"].shape == (B, D, R, R)
        assert (o["masks"] >= 0).all() and (o["masks"] <= 1).all()
    if cfg.model.keypoint_on:
        K, S = cfg.model.num_keypoints, cfg.model.keypoint_head.resolution
        kp, hm = o["keypoints"], o["heatmaps"]
        assert kp.shape == (B, D, K, 3) and hm.shape == (B, D, K, S, S)
        np.testing.assert_allclose(kp[..., 2], hm.reshape(B, D, K, -1).max(-1), rtol=1e-6)
        valid = ~pad
        x1 = boxes[..., 0][..., None]
        x2 = np.maximum(boxes[..., 2], boxes[..., 0] + 1)[..., None]
        assert ((kp[..., 0] >= x1 - 1e-3) & (kp[..., 0] <= x2 + 1e-3))[valid].all()
    for v in outs:
        assert np.isfinite(v).all()
    return o


# --------------------------------------------------------------------------------------------
def test_build_model_needs_classes_and_keypoints():
    with pytest.raises(UserError, match="model.num_classes"):
        build_model(get_config("shapes", ["model.num_keypoints=4"]))
    with pytest.raises(UserError, match="model.num_keypoints"):
        build_model(get_config("shapes", ["model.num_classes=3"]))
    with pytest.raises(UserError, match="test.max_dets"):
        MaskRCNN(get_config("shapes", SHAPES + ["test.max_dets=0"]))


def test_output_names():
    assert output_names(get_config("mask_rcnn_r50_fpn")) == ["ids", "scores", "boxes", "masks"]
    assert output_names(get_config("keypoint_rcnn_r50_fpn")) == [
        "ids", "scores", "boxes", "keypoints", "heatmaps"]
    assert output_names(get_config("shapes")) == [
        "ids", "scores", "boxes", "masks", "keypoints", "heatmaps"]
    assert output_names(get_config("mask_rcnn_r50_fpn", ["model.mask_on=false"])) == [
        "ids", "scores", "boxes"]


def test_shapes_outputs_contract(shapes_net, shapes_outputs):
    cfg = get_config("shapes", SHAPES)
    assert shapes_net.output_names == output_names(cfg)
    o = check_contract(shapes_outputs, cfg, B=2)
    assert (o["ids"] >= 0).sum() > 0
    # the second image is smaller: its boxes are clipped to its valid size
    assert o["boxes"][1, :, 2].max() <= 160 - 40 + 1e-4
    assert o["boxes"][1, :, 3].max() <= 128 - 28 + 1e-4


def test_shapes_all_padding_when_nothing_passes():
    net = build_model(get_config("shapes", SHAPES + ["test.score_thresh=0.999"]))
    data, im_info = inputs(B=1)
    outs = [o.asnumpy() for o in net(data, im_info)]
    o = check_contract(outs, get_config("shapes", SHAPES + ["test.score_thresh=0.999"]), B=1)
    assert (o["ids"] == -1).all()


def test_heads_run_on_final_detections_only(shapes_net):
    seen = {}

    def hook(name):
        def fn(block, args):
            seen[name] = [a.shape for a in args]
        return fn

    handles = [getattr(shapes_net, n).register_forward_pre_hook(hook(n))
               for n in ("box_head", "mask_head", "keypoint_head")]
    try:
        data, im_info = inputs()
        outs = shapes_net(data, im_info)
    finally:
        for h in handles:
            h.detach()
    cfg = get_config("shapes", SHAPES)
    D, post = cfg.test.max_dets, cfg.model.rpn.post_nms_topk_test
    assert seen["box_head"][0] == (2, post, 4)
    assert seen["mask_head"][0] == (2, D, 4) and seen["keypoint_head"][0] == (2, D, 4)
    # rois + P2..P5 + the input image (the preset's model.mask_head.image_guide); the keypoint
    # head takes no image
    assert len(seen["mask_head"]) == 6 and seen["mask_head"][5] == data.shape
    assert len(seen["keypoint_head"]) == 5
    assert D < post


def test_hybridized_equals_imperative(shapes_outputs):
    mx.random.seed(0)
    net = build_model(get_config("shapes", SHAPES))      # same seed: same weights
    net.hybridize(static_alloc=True, static_shape=True)
    data, im_info = inputs()
    for _ in range(2):
        outs = net(data, im_info)
        for ref, got in zip(shapes_outputs, outs):
            np.testing.assert_allclose(got.asnumpy(), ref, rtol=1e-4, atol=1e-4)
        # a call in training mode retraces (training proposal counts), and back again
        with mx.autograd.record(train_mode=True):
            train_outs = net(data, im_info)
        assert [o.shape for o in train_outs] == [o.shape for o in outs]


def test_refine_boxes_runs_the_box_head_again_on_the_detections(shapes_net, shapes_outputs):
    """test.refine_boxes: the first pass's detections, then box_forward on them and
    refine_detections; the mask and keypoint heads run on the refined boxes. Hybridized too."""
    from mxmask.modeling.roi_heads import refine_detections, select_class_masks
    cfg = get_config("shapes", SHAPES + ["test.refine_boxes=true"])
    mx.random.seed(0)
    net = build_model(cfg)                               # same seed: shapes_net's weights
    data, im_info = inputs()
    got = [o.asnumpy() for o in net(data, im_info)]
    features = shapes_net.backbone(data)
    ids, scores, boxes = [mx.nd.array(a) for a in shapes_outputs[:3]]   # the first pass
    logits, deltas = shapes_net.box_forward(boxes, *features)
    ids, scores, boxes = refine_detections(mx.nd, logits, deltas, ids, scores, boxes, im_info,
                                           **shapes_net.detect_kwargs)
    assert (ids.asnumpy() >= 0).sum() >= 10
    assert np.abs(boxes.asnumpy() - shapes_outputs[2]).max() > 0.1      # the boxes moved
    np.testing.assert_array_equal(got[0], ids.asnumpy())
    np.testing.assert_allclose(got[1], scores.asnumpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2], boxes.asnumpy(), rtol=1e-5, atol=1e-4)
    masks = select_class_masks(mx.nd, shapes_net.mask_head(boxes, *features[:4], data), ids,
                               cfg.model.num_classes)
    np.testing.assert_allclose(got[3], masks.asnumpy(), rtol=1e-4, atol=1e-5)
    net.hybridize(static_alloc=True, static_shape=True)
    for ref, out in zip(got, net(data, im_info)):
        np.testing.assert_allclose(out.asnumpy(), ref, rtol=1e-4, atol=1e-4)


def test_mask_score_rescores_and_resorts_the_detections(shapes_outputs):
    """test.mask_score: the same detections, each score times its mask's maskness (numpy), every
    output (keypoints and heatmaps too) in the order of the new scores. Hybridized too."""
    cfg = get_config("shapes", SHAPES + ["test.mask_score=true"])
    mx.random.seed(0)
    net = build_model(cfg)                               # same seed: shapes_net's weights
    data, im_info = inputs()
    got = [o.asnumpy() for o in net(data, im_info)]
    check_contract(got, cfg, 2)
    ref = dict(zip(output_names(cfg), shapes_outputs))
    masks, scores = ref["masks"], ref["scores"]
    fg = masks >= cfg.test.mask_thresh
    maskness = (masks * fg).sum((2, 3)) / np.maximum(fg.sum((2, 3)), 1)
    rescored = np.where(scores >= 0, scores * maskness, scores)
    moved = 0
    for b in range(2):
        order = np.argsort(-rescored[b], kind="stable")
        moved += int((order != np.arange(len(order))).sum())
        np.testing.assert_allclose(got[1][b], rescored[b, order], rtol=1e-5, atol=1e-6)
        for name, out in zip(output_names(cfg), got):
            if name != "scores":
                np.testing.assert_allclose(out[b], ref[name][b, order], rtol=1e-4, atol=1e-4)
    assert moved > 0                                     # the new scores reorder some rows
    net.hybridize(static_alloc=True, static_shape=True)
    for want, out in zip(got, net(data, im_info)):
        np.testing.assert_allclose(out.asnumpy(), want, rtol=1e-4, atol=1e-4)


def _np_hflip(boxes, width):
    b = np.array(boxes, dtype=np.float32)
    return np.stack([width - b[..., 2], b[..., 1], width - b[..., 0], b[..., 3]], axis=-1)


def test_flip_averages_every_head_over_the_mirror_image(shapes_net):
    """test.flip: the box head (proposals and the refine pass), the mask head and the keypoint
    head average their logits with their pass on the mirrored input; recomputed here from the
    model's own blocks with numpy flips. Hybridized too."""
    from mxmask.modeling.roi_heads import (detect, head_inputs, refine_detections,
                                           select_class_masks)
    assert shapes_net.mask_head.image_guide > 0          # the mirrored input reaches the head
    flip_map = [1, 0, 2, 3]
    cfg = get_config("shapes", SHAPES + ["test.refine_boxes=true", "test.flip=true",
                                         "data.keypoint_flip_map=[1, 0, 2, 3]"])
    mx.random.seed(0)
    net = build_model(cfg)                               # same seed: shapes_net's weights
    data, im_info = inputs()
    got = dict(zip(net.output_names, [o.asnumpy() for o in net(data, im_info)]))
    W = data.shape[3]
    features = shapes_net.backbone(data)
    flipped = mx.nd.array(data.asnumpy()[..., ::-1].copy())
    mirrored = shapes_net.backbone(flipped)
    C = cfg.model.num_classes

    def box_pass(rois):
        logits, deltas = shapes_net.box_forward(rois, *features)
        m_logits, m_deltas = shapes_net.box_forward(mx.nd.array(_np_hflip(rois.asnumpy(), W)),
                                                    *mirrored)
        m_deltas = m_deltas.asnumpy().reshape(-1, C, 4)
        m_deltas[..., 0] *= -1
        return ((logits + m_logits) / 2,
                (deltas + mx.nd.array(m_deltas.reshape(-1, C * 4))) / 2)

    rois, roi_scores = shapes_net.rpn(im_info, *features)
    ids, scores, boxes = detect(mx.nd, *box_pass(rois), rois, roi_scores, im_info,
                                **shapes_net.detect_kwargs)
    ids, scores, boxes = refine_detections(mx.nd, *box_pass(boxes), ids, scores, boxes, im_info,
                                           **shapes_net.detect_kwargs)
    assert (ids.asnumpy() >= 0).sum() >= 10
    np.testing.assert_array_equal(got["ids"], ids.asnumpy())
    np.testing.assert_allclose(got["scores"], scores.asnumpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["boxes"], boxes.asnumpy(), rtol=1e-5, atol=1e-4)
    flipped_boxes = mx.nd.array(_np_hflip(boxes.asnumpy(), W))

    def head_pair(head):
        # the mask head (image_guide in the preset) also pools the input, mirrored in its pass
        own = head(boxes, *head_inputs(head, features[:4], data)).asnumpy()
        return own, head(flipped_boxes,
                         *head_inputs(head, mirrored[:4], flipped)).asnumpy()[..., ::-1]

    own, back = head_pair(shapes_net.mask_head)
    masks = select_class_masks(mx.nd, mx.nd.array((own + back) / 2), ids, C).asnumpy()
    np.testing.assert_allclose(got["masks"], masks, rtol=1e-4, atol=1e-5)
    assert np.abs(select_class_masks(mx.nd, mx.nd.array(own), ids, C).asnumpy()
                  - masks).max() > 1e-3                  # the mirror pass changed the masks
    own, back = head_pair(shapes_net.keypoint_head)
    heatmaps = (own + back[:, flip_map]) / 2             # left and right swapped back
    np.testing.assert_allclose(got["heatmaps"], heatmaps.reshape(got["heatmaps"].shape),
                               rtol=1e-4, atol=1e-4)
    net.hybridize(static_alloc=True, static_shape=True)
    for name, out in zip(net.output_names, net(data, im_info)):
        np.testing.assert_allclose(out.asnumpy(), got[name], rtol=1e-4, atol=1e-4)


def test_flip_keypoint_map_is_the_training_flips():
    """test.flip swaps keypoints with data.keypoint_flip_map, else the map of the keypoint names,
    else none (as the training flip, data/transforms.py); a map that is not a permutation of
    the keypoints is an error."""
    cfg = get_config("shapes", SHAPES + ["test.flip=true"])
    assert MaskRCNN(cfg).keypoint_flip_map == [0, 1, 2, 3]
    cfg.data.keypoint_names = ["nose", "left_eye", "right_eye", "tail"]
    assert MaskRCNN(cfg).keypoint_flip_map == [0, 2, 1, 3]
    cfg.data.keypoint_flip_map = [3, 1, 2, 0]
    assert MaskRCNN(cfg).keypoint_flip_map == [3, 1, 2, 0]
    for bad in ([0, 1, 1, 3], [1, 0, 2]):
        cfg.data.keypoint_flip_map = bad
        with pytest.raises(UserError, match="data.keypoint_flip_map must be a permutation"):
            MaskRCNN(cfg)


def test_inference_graph_builds_one_level_canvas():
    """The box head, the refine_boxes pass, the mask head and the keypoint head pool from one
    level canvas (poolers.shared_level_canvas): the traced graph pads each level once."""
    import json
    cfg = get_config("shapes", SHAPES + ["test.refine_boxes=true"])
    net = build_model(cfg)
    graph = json.loads(mx.sym.Group(list(net(mx.sym.var("data"), mx.sym.var("im_info"))))
                       .tojson())
    canvas_pads = [n for n in graph["nodes"] if n["op"] == "Pad" and
                   n["attrs"]["pad_width"].endswith(", 0, 1)")]
    assert len(canvas_pads) == 4                      # P2..P5, once (16 with one canvas per head)
    # one per head and the refine pass, and the mask head's pooling of the input image (the
    # preset's model.mask_head.image_guide)
    assert sum(n["op"] == "_contrib_ROIAlign" for n in graph["nodes"]) == 4 + 1


def test_export_and_symbolblock(tmp_path):
    cfg = get_config("shapes", SHAPES + ["test.max_dets=8"])
    net = build_model(cfg)
    net.hybridize(static_alloc=True, static_shape=True)
    data, im_info = inputs(B=1, H=96, W=128)
    ref = [o.asnumpy() for o in net(data, im_info)]
    prefix = str(tmp_path / "model")
    net.export(prefix)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Gluon names the graph inputs of a two-input block data0, data1
        sb = mx.gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data0", "data1"],
                                          prefix + "-0000.params")
    outs = sb(data, im_info)
    assert len(outs) == len(net.output_names) == 6
    for a, b in zip(ref, outs):
        np.testing.assert_allclose(b.asnumpy(), a, rtol=1e-5, atol=1e-5)


def test_box_forward_and_init(shapes_net):
    feats = shapes_net.backbone(inputs(B=1)[0])
    assert len(feats) == 5
    rois = mx.nd.array([[[0, 0, 30, 30], [10, 10, 100, 90], [0, 0, 0, 0]]])
    cls, box = shapes_net.box_forward(rois, *feats)
    assert cls.shape == (3, 4) and box.shape == (3, 12)
    p = shapes_net._collect_params_with_prefix()
    std = lambda k: float(p[k].data().asnumpy().std())  # noqa: E731
    assert 0.007 < std("rpn.head.logits.weight") < 0.013
    assert 0.0007 < std("box_predictor.bbox_pred.weight") < 0.0013
    assert 0.007 < std("box_predictor.cls_score.weight") < 0.013
    fan_out = p["mask_head.convs.0.weight"].shape[0] * 9   # He fan-out: out channels x 3 x 3
    assert abs(std("mask_head.convs.0.weight") / np.sqrt(2.0 / fan_out) - 1) < 0.1
    for k, v in p.items():
        if k.endswith("bias") and "backbone" not in k:
            assert (v.data().asnumpy() == 0).all(), k
        v.data()        # every parameter is initialised (no deferred init left)


# --------------------------------------------------------------------------------------------
PRESET_FORWARD = {
    "mask_rcnn_r50_fpn": 1, "keypoint_rcnn_r50_fpn": 1, "gluoncv_mask_rcnn_r50_fpn": 1,
    "mask_rcnn_r101_fpn": 0,      # built and checked, not run (R50 covers the graph)
    "torchvision_mask_rcnn_r50_fpn": 1, "torchvision_keypoint_rcnn_r50_fpn": 1,
}


@pytest.mark.parametrize("preset", [p for p in list_presets() if p != "shapes"])
def test_preset_builds_and_runs(preset):
    small = ["test.max_dets=5", "model.rpn.post_nms_topk_test=100"]
    cfg = get_config(preset, small)
    net = build_model(cfg)
    p = {k: v.shape for k, v in net._collect_params_with_prefix().items()}
    C = cfg.model.num_classes
    assert p["box_predictor.cls_score.weight"] == (C + 1, 1024)
    assert p["box_predictor.bbox_pred.weight"] == (C * 4, 1024)
    assert p["box_head.fcs.0.weight"] == (1024, 256 * 7 * 7)
    A = 3
    rpn_ch = cfg.model.rpn.conv_channels
    assert p["rpn.head.conv.weight"] == (rpn_ch, 256, 3, 3)
    assert p["rpn.head.logits.weight"] == (A, rpn_ch, 1, 1)
    assert p["rpn.head.deltas.weight"] == (4 * A, rpn_ch, 1, 1)
    if cfg.model.mask_on:
        assert p["mask_head.predictor.weight"] == (C, 256, 1, 1)
        assert p["mask_head.deconv.weight"] == (256, 256, 2, 2)
        assert sum(k.startswith("mask_head.convs.") for k in p) == 2 * cfg.model.mask_head.num_conv
    if cfg.model.keypoint_on:
        assert p["keypoint_head.deconv.weight"] == (512, 17, 4, 4)
        assert sum(k.startswith("keypoint_head.convs.") for k in p) == 16
    layers = {"mask_rcnn_r101_fpn": 23, "gluoncv_mask_rcnn_r50_fpn": 6}.get(preset, 6)
    assert ("backbone.bottom_up.layer3.%d.conv1.weight" % (layers - 1)) in p
    if PRESET_FORWARD[preset]:
        data, im_info = inputs(B=1, H=128, W=128)
        outs = [o.asnumpy() for o in net(data, im_info)]
        check_contract(outs, cfg, B=1)


def test_gluoncv_preset_has_gluoncv_parameter_shapes():
    gcv = pytest.importorskip("gluoncv")
    g = gcv.model_zoo.get_model("mask_rcnn_fpn_resnet50_v1b_coco", pretrained=False,
                                pretrained_base=False)
    g.initialize()
    g(inputs(B=1, H=64, W=64)[0])        # resolve deferred shapes
    theirs = sorted(v.shape for k, v in g._collect_params_with_prefix().items()
                    if "anchor_generator" not in k)
    net = MaskRCNN(get_config("gluoncv_mask_rcnn_r50_fpn"))
    ours = sorted(v.shape for k, v in net._collect_params_with_prefix().items()
                  if not k.endswith("anchors"))
    assert ours == theirs


def test_gluoncv_preset_reproduces_gluoncv_outputs():
    """With GluonCV's weights copied in, the gluoncv preset gives GluonCV's detections and masks
    (GluonCV's FPN pooling patched to avoid the ROIAlign -1 index bug): the same ids, and scores
    and boxes equal up to float32 rounding (the box head pools on the level canvas, where the y
    of a coarser level's roi loses up to one ulp of its offset: modeling/poolers.py)."""
    gcv = pytest.importorskip("gluoncv")
    from mxmask.modeling.fpn import gluoncv_backbone_name_map
    post, dets = 200, 30
    mx.random.seed(1)
    g = gcv.model_zoo.get_model("mask_rcnn_fpn_resnet50_v1b_coco", pretrained=False,
                                pretrained_base=False)
    g.initialize()
    # every roi pooled on every level with its real batch index (hybridizable)
    patch_pyramid_roi_feats(g, "every_level")
    g._rcnn_max_dets = dets
    g._rpn_test_post_nms = post
    g.rpn._test_post_nms = post
    data, _ = inputs(B=1, H=128, W=192, seed=5)
    g(data)
    gp = g._collect_params_with_prefix()
    rng = np.random.RandomState(0)
    for k, v in gp.items():            # non-zero biases, so that a swapped bias would show
        if k.endswith("bias") or k.endswith("beta"):
            v.set_data(mx.nd.array(rng.randn(*v.shape) * 0.01))
    cfg = get_config("gluoncv_mask_rcnn_r50_fpn", ["model.rpn.post_nms_topk_test=%d" % post,
                                                   "test.max_dets=%d" % dets])
    net = build_model(cfg)
    ours = net._collect_params_with_prefix()
    mapping = {k: "backbone." + v for k, v in gluoncv_backbone_name_map(list(gp)).items()}
    for a, b in GLUONCV_HEADS.items():
        mapping.update({a + ".weight": b + ".weight", a + ".bias": b + ".bias"})
    copied = set()
    for k, v in gp.items():
        if "anchor_generator" not in k:
            ours[mapping[k]].set_data(v.data())
            copied.add(mapping[k])
    assert copied == {k for k in ours if not k.endswith("anchors")}
    gi, gs, gb, gm = [o.asnumpy() for o in g(data)]
    net.hybridize(static_alloc=True, static_shape=True)
    ids, scores, boxes, masks = [o.asnumpy() for o in net(data, mx.nd.array([[128, 192, 1]]))]
    valid = gi[0, :, 0] >= 0
    assert valid.sum() == dets
    np.testing.assert_array_equal(ids[0], gi[0, :, 0])
    np.testing.assert_allclose(scores[0], gs[0, :, 0], rtol=1e-6, atol=0)
    np.testing.assert_allclose(boxes[0], gb[0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(masks[0], gm[0], rtol=1e-5, atol=1e-6)


def test_init_weights_of_the_box_head():
    """Detectron2's initialisation of a conv box head: He fan-out convs (std sqrt(2 / (9 *
    out_channels))), GroupNorm gamma 1 and beta 0, c2_xavier_fill fcs (uniform within
    sqrt(3 / fan_in)), zero biases."""
    cfg = get_config("shapes", ["model.num_classes=5", "model.num_keypoints=7"])
    assert cfg.model.box_head.num_conv == 2 and cfg.model.box_head.norm == "gn"
    mx.random.seed(0)
    head = build_model(cfg).box_head
    dim = cfg.model.box_head.conv_dim
    for i in (1, 2):
        conv, norm = head.convs[3 * (i - 1)], head.convs[3 * (i - 1) + 1]
        std = float(conv.weight.data().asnumpy().std())
        assert abs(std - np.sqrt(2.0 / (9 * dim))) < 0.05 * np.sqrt(2.0 / (9 * dim)), std
        assert (norm.gamma.data().asnumpy() == 1).all() and (norm.beta.data().asnumpy() == 0).all()
    fc = head.fcs[0]
    w = fc.weight.data().asnumpy()
    bound = np.sqrt(3.0 / w.shape[1])
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert (fc.bias.data().asnumpy() == 0).all()

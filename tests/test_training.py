"""RCNNLoss's two stages (modeling/training.py): the mask and keypoint heads run on the first k
slots, k covering every positive, and that changes no loss and no gradient."""
import numpy as np
import mxnet as mx
import pytest

from mxmask.bench import build_bench_model, synthetic_train_batch
from mxmask.modeling import training
from mxmask.modeling.roi_heads import head_inputs
from mxmask.modeling.training import RCNNLoss
from mxmask.utils import UserError

nd = mx.nd


@pytest.fixture(scope="module")
def quarter_positive():
    """(cfg, loss_net) of shapes with 64 rois, a quarter positive: P = 16 slots."""
    cfg, net = build_bench_model("shapes", overrides=["solver.amp=",
                                                      "model.box_head.positive_fraction=0.25"])
    loss_net = RCNNLoss(net, cfg, kernels="mxnet")
    assert loss_net.num_pos_slots == 16
    return cfg, loss_net


def test_head_slots_cover_the_most_positives_of_an_image_in_steps_of_8(quarter_positive):
    loss_net = quarter_positive[1]
    P = loss_net.num_pos_slots

    def labels(*positives):
        rows = np.zeros((len(positives), 64), np.float32)
        for i, n in enumerate(positives):
            rows[i, :n] = 1 + i
            rows[i, P:P + 5] = 2                     # labels past P are never counted
        return nd.array(rows)
    assert loss_net.head_slots(labels(0, 0)) == 8
    assert loss_net.head_slots(labels(3, 8)) == 8
    assert loss_net.head_slots(labels(9, 2)) == 16
    assert loss_net.head_slots(labels(16, 16)) == 16


def test_mask_head_max_train_rois_caps_its_slots(quarter_positive, monkeypatch):
    """model.mask_head.max_train_rois = n: k is at most n, and the mask head of a training pass
    pools n rois per image (the first n positive slots, a random subset); a negative n is an
    error."""
    cfg, net = build_bench_model("shapes", overrides=["solver.amp=",
                                                      "model.box_head.positive_fraction=0.25",
                                                      "model.mask_head.max_train_rois=5"])
    loss_net = RCNNLoss(net, cfg, kernels="mxnet")
    assert loss_net.mask_slot_cap == 5

    def labels(*positives):
        rows = np.zeros((len(positives), 64), np.float32)
        for i, n in enumerate(positives):
            rows[i, :n] = 1
        return nd.array(rows)
    assert loss_net.head_slots(labels(3, 2)) == 5
    assert loss_net.head_slots(labels(16, 9)) == 5
    assert quarter_positive[1].head_slots(labels(16, 9)) == 16     # uncapped

    np_batch = synthetic_train_batch(cfg, (128, 160), 2, objects=4)
    keys = ["data", "im_info", "gt_boxes", "gt_labels", "gt_crowd", "gt_masks", "gt_keypoints"]
    pooled = []
    real_forward = net.mask_head.forward

    def forward(rois, *features):
        pooled.append(rois.shape)
        return real_forward(rois, *features)
    monkeypatch.setattr(net.mask_head, "forward", forward)
    with mx.autograd.record():
        losses = loss_net(**{k: nd.array(np_batch[k]) for k in keys})
    assert pooled == [(2, 5, 4)] and losses["loss_mask"].asscalar() > 0

    cfg.model.mask_head.max_train_rois = -1
    with pytest.raises(UserError, match="model.mask_head.max_train_rois"):
        RCNNLoss(net, cfg, kernels="mxnet")


@pytest.mark.parametrize("preset", ["shapes", "mask_rcnn_r50_fpn"])
def test_heads_on_the_positive_slots_equal_heads_on_all_slots(preset, monkeypatch):
    """The mask head on the first k slots and the keypoint head on the positives with labelled
    keypoints give the losses and gradients of both heads on all P positive slots."""
    overrides = ["model.backbone.depth=18", "model.backbone.width=16", "model.fpn.out_channels=32",
                 "model.rpn.conv_channels=32", "model.box_head.fc_dim=64",
                 "model.mask_head.conv_dim=32", "model.rpn.pre_nms_topk_train=300"] \
        if preset != "shapes" else ["model.rpn.pre_nms_topk_train=300",
                                    "model.box_head.batch_size_per_image=128"]
    overrides.append("solver.amp=")                  # float32 convolutions: exact comparisons
    cfg, net = build_bench_model(preset, overrides=overrides)
    np_batch = synthetic_train_batch(cfg, (128, 160), 2, objects=3)
    np_batch["gt_keypoints"][:, 1:, :, 2] = 0        # objects 1 and 2 have no keypoints
    np_batch["gt_keypoints"][1, 0, :3, 2] = 0        # and object 0 of image 1 only some
    keys = ["data", "im_info", "gt_boxes", "gt_labels", "gt_crowd", "gt_masks"] + \
        (["gt_keypoints"] if cfg.model.keypoint_on else [])
    batch = {k: nd.array(np_batch[k]) for k in keys}
    params = [p for p in net.collect_params().values() if p.grad_req != "null"]
    monkeypatch.setattr(training, "_SLOT_STEP", 1)   # k = the counts themselves

    def run(all_slots):
        loss_net = RCNNLoss(net, cfg, kernels="mxnet")
        loss_net.hybridize(static_alloc=True)
        P = loss_net.num_pos_slots
        used = {}
        real_k, real_kp = loss_net.head_slots, loss_net.keypoint_slots

        def head_slots(labels):
            used["mask"] = P if all_slots else real_k(labels)
            return used["mask"]

        def keypoint_slots(labels, matched, gt_keypoints):
            order, k = real_kp(labels, matched, gt_keypoints)
            if all_slots:                            # every slot, in the sampler's order
                order, k = nd.broadcast_like(nd.arange(P).reshape((1, -1)), order), P
            used["keypoint"] = k
            return order, k
        monkeypatch.setattr(loss_net, "head_slots", head_slots)
        monkeypatch.setattr(loss_net, "keypoint_slots", keypoint_slots)
        mx.random.seed(5)
        with mx.autograd.record():
            losses = loss_net(**batch)
            total = nd.add_n(*losses.values())
        total.backward()
        return ({k: float(v.asscalar()) for k, v in losses.items()},
                {p.name: p.grad().asnumpy().copy() for p in params}, used)

    ref, ref_grads, k_all = run(True)
    out, grads, k = run(False)
    assert k["mask"] < k_all["mask"], "the test batch should leave slots without positives"
    if cfg.model.keypoint_on:
        assert k["keypoint"] < k["mask"], "fewer positives with keypoints than positives"
        assert out["loss_keypoint"] > 0
    assert out.keys() == ref.keys() and "loss_mask" in out
    for name in ref:
        assert out[name] == pytest.approx(ref[name], rel=1e-5, abs=1e-7), name
    for name, g in ref_grads.items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-4,
                                   atol=1e-5 * max(float(np.abs(g).max()), 1e-6), err_msg=name)


def test_keypoint_only_model_trains():
    """A keypoint model without masks (the keypoint_rcnn_r50_fpn layout): stage 2 takes the
    keypoint head's inputs alone; its loss and gradients are finite and non-zero."""
    cfg, net = build_bench_model("shapes", overrides=["solver.amp=", "model.mask_on=false"])
    np_batch = synthetic_train_batch(cfg, (128, 160), 2, objects=3)
    keys = ["data", "im_info", "gt_boxes", "gt_labels", "gt_crowd", "gt_keypoints"]
    loss_net = RCNNLoss(net, cfg, kernels="mxnet")
    loss_net.hybridize(static_alloc=True)
    with mx.autograd.record():
        losses = loss_net(**{k: nd.array(np_batch[k]) for k in keys})
        nd.add_n(*losses.values()).backward()
    assert "loss_mask" not in losses and losses["loss_keypoint"].asscalar() > 0
    grads = [p.grad().asnumpy() for p in net.keypoint_head.collect_params().values()
             if p.grad_req != "null"]
    assert grads and all(np.isfinite(g).all() for g in grads)
    assert sum(np.abs(g).sum() for g in grads) > 0


def test_keypoint_slots_put_the_positives_with_keypoints_first(quarter_positive):
    cfg, loss_net = quarter_positive
    P = loss_net.num_pos_slots
    K = cfg.model.num_keypoints
    gt_keypoints = np.zeros((2, 3, K, 3), np.float32)
    gt_keypoints[0, 1, 2, 2] = 2                     # image 0: gt 1 has one labelled keypoint
    gt_keypoints[1, 0, :, 2] = 1                     # image 1: gt 0, all labelled (occluded)
    labels = np.zeros((2, 64), np.float32)
    matched = -np.ones((2, 64), np.float32)
    labels[0, :12] = 1                               # 12 positives of image 0: gts 0, 1, 2 ...
    matched[0, :12] = [0, 1, 2] * 4
    labels[0, 20:30] = 3                             # past P: never counted
    matched[0, 20:30] = 1
    labels[1, :10] = 2                               # 10 positives of image 1, 9 of them on gt 0
    matched[1, :10] = [0] * 9 + [2]
    order, k = loss_net.keypoint_slots(nd.array(labels), nd.array(matched), nd.array(gt_keypoints))
    assert k == 16                                   # 9 slots -> 16
    order = order.asnumpy().astype(int)
    assert order.shape == (2, P)
    assert sorted(order[0, :4]) == [1, 4, 7, 10]     # the slots matched to gt 1
    assert sorted(order[1, :9]) == list(range(9))
    for row in order:
        assert sorted(row) == list(range(P))         # a permutation of the P slots
    labels[1, :10] = 0
    labels[0, :12] = 0
    assert loss_net.keypoint_slots(nd.array(labels), nd.array(matched),
                                   nd.array(gt_keypoints))[1] == 8


def training_pass(cfg, net):
    """(batch, losses): a synthetic batch of 2 images (128x160, 3 objects each) and the losses
    of one recorded training pass of ``net`` on it, gradients computed (MXNet's kernels)."""
    np_batch = synthetic_train_batch(cfg, (128, 160), 2, objects=3)
    keys = ["data", "im_info", "gt_boxes", "gt_labels", "gt_crowd", "gt_masks", "gt_keypoints"]
    batch = {k: nd.array(np_batch[k]) for k in keys}
    loss_net = RCNNLoss(net, cfg, kernels="mxnet")
    loss_net.hybridize(static_alloc=True)
    with mx.autograd.record():
        losses = loss_net(**batch)
        nd.add_n(*losses.values()).backward()
    return batch, losses


def test_class_agnostic_box_and_mask_heads_train_and_predict():
    """model.box_head.cls_agnostic_bbox_reg and model.mask_head.cls_agnostic_mask (Detectron2's
    options): a 4-unit box regressor and a 1-channel mask predictor, a training step whose losses
    and gradients are finite, and an inference graph whose masks come from that one channel."""
    cfg, net = build_bench_model("shapes", overrides=["model.box_head.cls_agnostic_bbox_reg=true",
                                                      "model.mask_head.cls_agnostic_mask=true",
                                                      "solver.amp=", "test.flip=false"])
    assert net.box_predictor.bbox_pred.weight.shape[0] == 4
    assert net.mask_head.predictor.weight.shape[0] == 1
    batch, losses = training_pass(cfg, net)
    assert losses["loss_box_reg"].asscalar() > 0 and losses["loss_mask"].asscalar() > 0
    for name in ("bbox_pred", "predictor"):
        p = [p for n, p in net.collect_params().items() if name + "_weight" in n][0]
        g = p.grad().asnumpy()
        assert np.isfinite(g).all() and np.abs(g).sum() > 0, name
    net.hybridize(static_alloc=True)
    outs = dict(zip(net.output_names, net(batch["data"], batch["im_info"])))
    ids = outs["ids"].asnumpy()
    assert (ids >= 0).sum() > 0 and len(np.unique(ids[ids >= 0])) > 0
    levels = net.roi_features(net.backbone(batch["data"]))
    logits = net.mask_head(outs["boxes"], *head_inputs(net.mask_head, levels, batch["data"]))
    want = 1 / (1 + np.exp(-logits.asnumpy()[:, 0]))
    np.testing.assert_allclose(outs["masks"].asnumpy().reshape(want.shape), want, atol=1e-5)


@pytest.fixture(scope="module")
def mask_loss_case():
    """(cfg, net, batch, run): the shapes model with random weights, a synthetic batch with
    masks and keypoints, and ``run(**mask_head_settings)`` -> (losses, the mask predictor's
    weight gradient) of one training pass with those ``model.mask_head`` settings."""
    cfg, net = build_bench_model("shapes", overrides=["solver.amp="])
    np_batch = synthetic_train_batch(cfg, (128, 160), 2, objects=3)
    keys = ["data", "im_info", "gt_boxes", "gt_labels", "gt_crowd", "gt_masks", "gt_keypoints"]
    batch = {k: nd.array(np_batch[k]) for k in keys}
    predictor = list(net.mask_head.predictor.collect_params().values())[0]
    defaults = {"soft_targets": False, "dice_weight": 0.0, "loss_weight": 1.0}

    def run(**settings):
        for key, value in dict(defaults, **settings).items():
            setattr(cfg.model.mask_head, key, value)
        loss_net = RCNNLoss(net, cfg, kernels="mxnet")
        loss_net.hybridize(static_alloc=True)
        mx.random.seed(5)
        with mx.autograd.record():
            losses = loss_net(**batch)
            nd.add_n(*losses.values()).backward()
        return ({k: float(v.asscalar()) for k, v in losses.items()},
                predictor.grad().asnumpy().copy())
    yield cfg, net, batch, run
    for key, value in defaults.items():
        setattr(cfg.model.mask_head, key, value)


def test_soft_mask_targets_change_the_mask_gradient_only(mask_loss_case):
    """``model.mask_head.soft_targets`` reaches the training graph: on the same batch and
    weights it changes the mask predictor's gradient (the synthetic masks' edges cover cells in
    part; at initialisation the mask logits are ~0, so the loss itself is ~log 2 either way) and
    no other loss."""
    run = mask_loss_case[3]
    out, grad = {}, {}
    for soft in (False, True):
        out[soft], grad[soft] = run(soft_targets=soft)
    assert np.abs(grad[False]).max() > 0
    assert np.abs(grad[True] - grad[False]).max() > 1e-3 * np.abs(grad[False]).max()
    assert out[False].keys() == out[True].keys()
    for name in out[False]:
        if name != "loss_mask":
            assert out[True][name] == pytest.approx(out[False][name], rel=1e-6), name


def test_mask_dice_weight_adds_to_the_mask_loss_only(mask_loss_case):
    """``model.mask_head.dice_weight`` reaches the training graph: at initialisation (mask
    probabilities ~0.5) it adds a Dice loss of about 1 - (sum t + 1) / (M*M/2 + sum t + 1) per
    positive to the mask loss and changes no other loss; a negative weight is refused."""
    from mxmask.utils import UserError
    cfg, net, _, run = mask_loss_case
    out = {weight: run(dice_weight=weight)[0] for weight in (0.0, 1.0)}
    for name in out[0.0]:
        if name == "loss_mask":
            assert 0.2 < out[1.0][name] - out[0.0][name] < 1.0
        else:
            assert out[1.0][name] == pytest.approx(out[0.0][name], rel=1e-6), name
    cfg.model.mask_head.dice_weight = -1.0
    with pytest.raises(UserError, match="model.mask_head.dice_weight"):
        RCNNLoss(net, cfg, kernels="mxnet")


def test_mask_loss_weight_scales_the_mask_loss_only(mask_loss_case):
    """``model.mask_head.loss_weight`` multiplies the mask loss, and its gradient, and nothing
    else."""
    run = mask_loss_case[3]
    (one, grad_one), (two, grad_two) = run(loss_weight=1.0), run(loss_weight=2.5)
    for name in one:
        factor = 2.5 if name == "loss_mask" else 1.0
        assert two[name] == pytest.approx(factor * one[name], rel=1e-5), name
    np.testing.assert_allclose(grad_two, 2.5 * grad_one, rtol=1e-4, atol=1e-9)


def test_box_head_giou_loss_reaches_the_training_graph():
    """``model.box_head.bbox_reg_loss=giou`` changes the box loss (to 1 - GIoU per positive,
    losses.py), ``bbox_reg_loss_weight`` scales it, and no other loss changes."""
    cfg, net = build_bench_model("shapes", overrides=["solver.amp="])
    np_batch = synthetic_train_batch(cfg, (128, 160), 2, objects=3)
    keys = ["data", "im_info", "gt_boxes", "gt_labels", "gt_crowd", "gt_masks", "gt_keypoints"]
    batch = {k: nd.array(np_batch[k]) for k in keys}

    def run(kind, weight):
        cfg.model.box_head.bbox_reg_loss = kind
        cfg.model.box_head.bbox_reg_loss_weight = weight
        loss_net = RCNNLoss(net, cfg, kernels="mxnet")
        mx.random.seed(5)
        with mx.autograd.record():
            losses = loss_net(**batch)
        return {k: float(v.asscalar()) for k, v in losses.items()}
    l1, giou, giou3 = run("smooth_l1", 1.0), run("giou", 1.0), run("giou", 3.0)
    assert 0 < giou["loss_box_reg"] < 2 and abs(giou["loss_box_reg"] - l1["loss_box_reg"]) > 1e-3
    assert giou3["loss_box_reg"] == pytest.approx(3 * giou["loss_box_reg"], rel=1e-5)
    for name in l1:
        if name != "loss_box_reg":
            assert giou[name] == pytest.approx(l1[name], rel=1e-5), name
            assert giou3[name] == pytest.approx(l1[name], rel=1e-5), name


def test_mask_head_image_guide_trains_and_predicts():
    """``model.mask_head.image_guide``: the training graph hands the input image to the mask
    head (its image conv and fuse conv get finite, non-zero gradients; the keypoint head still
    pools P2..P5 only), and the inference graph's masks are the head's on (detections, P2..P5,
    image)."""
    cfg, net = build_bench_model("shapes", overrides=["model.mask_head.image_guide=8",
                                                      "solver.amp=", "test.flip=false",
                                                      "test.mask_score=false"])
    batch, losses = training_pass(cfg, net)
    assert all(np.isfinite(v.asscalar()) for v in losses.values())
    for block in (net.mask_head.image.conv, net.mask_head.fuse[0]):
        g = block.weight.grad().asnumpy()
        assert np.isfinite(g).all() and np.abs(g).sum() > 0
    net.hybridize(static_alloc=True)
    outs = dict(zip(net.output_names, net(batch["data"], batch["im_info"])))
    ids = outs["ids"].asnumpy()
    assert (ids >= 0).sum() > 0
    features = net.roi_features(net.backbone(batch["data"]))
    logits = net.mask_head(outs["boxes"], *(features + (batch["data"],))).asnumpy()
    flat = ids.reshape(-1)
    want = 1 / (1 + np.exp(-logits[np.arange(len(flat)), np.maximum(flat, 0).astype(int)]))
    got = outs["masks"].asnumpy().reshape(want.shape)
    np.testing.assert_allclose(got[flat >= 0], want[flat >= 0], atol=1e-5)


def test_torchvision_training_conventions_reach_the_training_graph():
    """``model.rpn.loss_normalizer``, ``model.rpn.crowd_ioa`` and
    ``model.mask_head.target_aligned`` reach RCNNLoss's blocks (defaults: Detectron2's), and
    the torchvision presets set them, with ``soft_targets`` (tests/test_torchvision_training.py
    compares the losses with torchvision's). On the synthetic batch every image fills its 256
    RPN anchors and has no crowd box, so the two RPN settings leave every loss as it was."""
    from mxmask.config import get_config
    for preset in ("torchvision_mask_rcnn_r50_fpn", "torchvision_keypoint_rcnn_r50_fpn"):
        rpn = get_config(preset).model.rpn
        assert (rpn.loss_normalizer, rpn.crowd_ioa) == ("sampled", 1.0), preset
    head = get_config("torchvision_mask_rcnn_r50_fpn").model.mask_head
    assert (head.soft_targets, head.target_aligned) == (True, False)

    cfg, net = build_bench_model("shapes", overrides=["solver.amp="])
    np_batch = synthetic_train_batch(cfg, (128, 160), 2, objects=3)
    keys = ["data", "im_info", "gt_boxes", "gt_labels", "gt_crowd", "gt_masks", "gt_keypoints"]
    batch = {k: nd.array(np_batch[k]) for k in keys}
    out = {}
    for torchvision in (False, True):
        cfg.model.rpn.loss_normalizer = "sampled" if torchvision else "batch_size"
        cfg.model.rpn.crowd_ioa = 1.0 if torchvision else 0.7
        cfg.model.mask_head.target_aligned = not torchvision
        loss_net = RCNNLoss(net, cfg, kernels="mxnet")
        assert loss_net.box_stage.rpn_normalizer == cfg.model.rpn.loss_normalizer
        assert loss_net.box_stage.rpn_targets._crowd_ioa == cfg.model.rpn.crowd_ioa
        assert loss_net.head_stage.mask_targets._aligned is (not torchvision)
        loss_net.hybridize(static_alloc=True)
        mx.random.seed(5)
        with mx.autograd.record():
            out[torchvision] = {k: float(v.asscalar()) for k, v in loss_net(**batch).items()}
    for name in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_keypoint"):
        assert out[True][name] == pytest.approx(out[False][name], rel=1e-6), name

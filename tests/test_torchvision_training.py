"""mxmask's training graph against torchvision's training losses, on the same weights and data.

torchvision's ``maskrcnn_resnet50_fpn`` and ``keypointrcnn_resnet50_fpn`` are built with seeded
random weights (``mxmask/convert/torchvision_reference.py build``) and converted by ``mxmask
convert torchvision``; both sides then take one training step (losses only) on the same batch:
two normalised, padded 256x320 tensors (the second image's valid part 224x288), gt boxes in
network-input pixels, masks or keypoints, torchvision's labels ``l`` and mxmask's ``l - 1``.
The second image also has a padding gt row and a crowd box, which only mxmask sees (torchvision
has no crowd input; its data loading drops crowd instances).

Samplers: torchvision's ``losses`` verb gives both of its BalancedPositiveNegativeSamplers a
batch size no image reaches, so they take every candidate whatever their random permutation
(``training_losses``' docstring). mxmask takes the same sets: ``model.rpn.batch_size_per_image``
above the anchor count, and ``model.box_head.batch_size_per_image`` = S slots for the
``post_nms_topk_train`` proposals plus the G gt boxes with ``positive_fraction: 1``, so that the
RoISampler's S static slots hold every valid candidate (padded proposals are never sampled).

The torchvision presets set torchvision's training conventions (``model.rpn.loss_normalizer:
sampled``, ``model.rpn.crowd_ioa: 1``, ``model.mask_head.soft_targets: true`` and
``target_aligned: false``); with them each loss equals torchvision's within 1e-4 relative
(``|ours - theirs| <= 1e-4 * |theirs|``; seen: at most 1.1e-6), the sampled roi counts are
equal, and so are the heads' targets on the positive rois (mask targets within 1e-4, keypoint
heatmap indices and validity exactly): with random weights the head losses hardly feel a
change of targets, so the targets are compared too. Each of those fields set back to
Detectron2's convention moves the RPN losses by more than five times the tolerance, or the
mask targets by more than 0.1 in some cell.

torch never enters this process: the torch side runs in the interpreter named by
``MXMASK_TORCH_PYTHON``; without it every test here skips with that reason (CI has no torch).
"""
import copy
import os

import mxnet as mx
import numpy as np
import pytest

from mxmask import cli
from mxmask.config import load_yaml, set_value
from mxmask.modeling.rcnn import build_model
from mxmask.modeling.training import RCNNLoss
from helpers.torchvision_side import needs_torch, smooth_image, torch_side

MASK, KEYPOINT = "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"
HP, WP = 256, 320                                   # padded input
SIZES = [(256, 320), (224, 288)]                    # valid (h, w) of the two images
RTOL = 1e-4
# mxmask loss name -> torchvision's
NAMES = {"loss_rpn_cls": "loss_objectness", "loss_rpn_loc": "loss_rpn_box_reg",
         "loss_cls": "loss_classifier", "loss_box_reg": "loss_box_reg",
         "loss_mask": "loss_mask", "loss_keypoint": "loss_keypoint"}

pytestmark = needs_torch


def training_batch(cfg):
    """mxmask's training batch of two images (DEVELOPING.md "Training batches") with
    torchvision's labels (``tv_labels``: mxmask's + 1, -1 padding).

    Image 0 has four objects, image 1 three and a padding row, and a crowd box. Masks are
    ellipses, one with a 1-pixel-wide line through it (thinner than a 28x28 cell: soft and
    thresholded targets differ there), none touching the valid image's bottom or right edge
    (where torchvision's unpadded masks and mxmask's padded ones are read differently, see
    mxmask.modeling.targets). Keypoints: random around each box (some outside it), a fifth
    unlabelled, one exactly on the box's right edge (the last heatmap column)."""
    rng = np.random.RandomState(1)
    boxes = np.full((2, 4, 4), -1.0, np.float32)
    boxes[0] = [[20.3, 30.7, 120.2, 150.9], [150.5, 20.25, 280.1, 110.6],
                [60.0, 140.0, 200.0, 230.0], [200.2, 120.3, 240.7, 200.1]]
    boxes[1, :3] = [[10.5, 12.0, 110.0, 140.5], [120.25, 60.0, 260.0, 200.0],
                    [30.0, 150.0, 90.5, 210.0]]
    labels = np.array([[0, 17, 61, 2], [5, 0, 43, -1]], np.float32)
    masks = np.zeros((2, 4, HP, WP), np.uint8)
    kps = np.zeros((2, 4, 17, 3), np.float32)
    yy, xx = np.mgrid[0:HP, 0:WP] + 0.5
    for b in range(2):
        for g in range(int((labels[b] >= 0).sum())):
            x1, y1, x2, y2 = boxes[b, g]
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            masks[b, g] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
            kps[b, g, :, 0] = rng.uniform(x1 - 5, x2 + 5, 17)
            kps[b, g, :, 1] = rng.uniform(y1 - 5, y2 + 5, 17)
            kps[b, g, :, 2] = rng.choice([0, 1, 2], 17, p=[0.2, 0.3, 0.5])
            kps[b, g, 0] = [x2, (y1 + y2) / 2, 2]
    masks[0, 0, 90, 20:120] = 1                        # the 1-pixel line
    for b, (h, w) in enumerate(SIZES):
        assert not masks[b, :, h - 1:].any() and not masks[b, :, :, w - 1:].any()
    mean, std = np.array(cfg.input.pixel_mean), np.array(cfg.input.pixel_std)
    data = np.zeros((2, 3, HP, WP), np.float32)
    for b, (h, w) in enumerate(SIZES):
        data[b, :, :h, :w] = ((smooth_image(h, w, b, noise=0.05, shift=b) - mean) / std).transpose(2, 0, 1)
    crowd = np.full((2, 1, 4), -1.0, np.float32)
    crowd[1, 0] = [150.0, 0.0, 288.0, 58.0]
    return dict(data=data, im_info=np.array([[h, w, 1.0] for h, w in SIZES], np.float32),
                gt_boxes=boxes, gt_labels=labels, gt_crowd=crowd, gt_masks=masks,
                gt_keypoints=kps, tv_labels=np.where(labels >= 0, labels + 1, -1))


def take_all(cfg):
    """Overrides under which mxmask's samplers take every candidate (module docstring)."""
    G = 4
    return ["model.rpn.batch_size_per_image=1000000",
            "model.box_head.batch_size_per_image=%d" % (cfg.model.rpn.post_nms_topk_train + G),
            "model.box_head.positive_fraction=1.0", "solver.amp="]


def mxmask_step(ckpt, batch, overrides=()):
    """mxmask's training step on ``batch`` with the checkpoint's config plus :func:`take_all`
    and ``overrides``.

    Returns:
        dict: ``losses`` {name: float}; ``counts`` (roi positives, roi negatives) of the
        RoISampler; and the positive rois the heads train on with their targets, as the
        ``losses`` verb returns them: ``head_image`` (N,), ``head_rois`` (N, 4),
        ``head_labels`` (N,) (the RoISampler's label, torchvision's for the mask arch), then
        ``mask_targets`` (N, M, M) or ``keypoint_heatmaps`` and ``keypoint_valid`` (N, K), from
        the training graph's own target blocks on the sampled rois; ``graph``: (net, cfg,
        (rois, labels, matched) (B, S) of the RoISampler, the input arrays).
    """
    cfg = load_yaml(os.path.join(ckpt, "config.yaml"))
    for assignment in take_all(cfg) + list(overrides):
        set_value(cfg, assignment)
    net = build_model(cfg)
    net.load_parameters(os.path.join(ckpt, "model.params"))
    loss_net = RCNNLoss(net, cfg, kernels="mxnet")
    loss_net.hybridize(static_alloc=True)
    keys = ["data", "im_info", "gt_boxes", "gt_labels", "gt_crowd"] + \
        (["gt_masks"] if cfg.model.mask_on else []) + \
        (["gt_keypoints"] if cfg.model.keypoint_on else [])
    inputs = {k: mx.nd.array(batch[k], dtype=batch[k].dtype) for k in keys}
    with mx.autograd.record():
        state = loss_net.begin(**inputs)
        losses = loss_net.finish(state)
    rois, labels, matched = state[1][4:7]                   # the RoISampler's (B, S) outputs
    lab = labels.asnumpy()
    pos = lab > 0
    out = dict(losses={k: float(v.asscalar()) for k, v in losses.items()},
               counts=(int(pos.sum()), int((lab == 0).sum())),
               head_image=np.nonzero(pos)[0], head_rois=rois.asnumpy()[pos],
               head_labels=lab[pos])
    out.update(head_targets(loss_net, rois, labels, matched, inputs))
    out["graph"] = (net, cfg, (rois, labels, matched), inputs)
    return out


def head_targets(loss_net, rois, labels, matched, inputs):
    """The training graph's mask / keypoint targets of the positive slots of ``rois``,
    ``labels``, ``matched`` (B, S): ``mask_targets`` (N, M, M) or ``keypoint_heatmaps`` and
    ``keypoint_valid`` (N, K)."""
    pos = labels.asnumpy() > 0
    heads, out = loss_net.head_stage, {}
    if heads.mask_on:
        out["mask_targets"] = heads.mask_targets(rois, labels, matched,
                                                 inputs["gt_masks"]).asnumpy()[pos]
    if heads.keypoint_on:
        heat, valid = heads.keypoint_targets(rois, labels, matched, inputs["gt_keypoints"])
        out["keypoint_heatmaps"], out["keypoint_valid"] = heat.asnumpy()[pos], valid.asnumpy()[pos]
    return out


def pair_rows(ours, ref):
    """Indices ``i`` with ``ours`` row ``i[j]`` the roi of ``ref`` row ``j`` (same image, the
    same box within 1e-3 px: the two RPNs' proposals agree to ~1e-5 px), one to one."""
    index = np.full(len(ref["head_rois"]), -1)
    for j, (b, roi) in enumerate(zip(ref["head_image"], ref["head_rois"])):
        dist = np.abs(ours["head_rois"] - roi).max(axis=1) + 1e9 * (ours["head_image"] != b)
        index[j] = np.argmin(dist)
        assert dist[index[j]] < 1e-3, (j, roi, dist[index[j]])
    assert len(set(index)) == len(index) == len(ours["head_rois"])
    return index


@pytest.fixture(scope="module", params=[MASK, KEYPOINT])
def step(request, tmp_path_factory):
    """One arch: its converted checkpoint, the batch, torchvision's losses and mxmask's."""
    arch = request.param
    tmp = tmp_path_factory.mktemp(arch)
    pth, ckpt = tmp / "weights.pth", tmp / "ckpt"
    torch_side("build", "--arch", arch, "--seed", 0, "--out", pth)
    assert cli.main(["convert", "torchvision", str(pth), "--out", str(ckpt)]) == 0
    batch = training_batch(load_yaml(str(ckpt / "config.yaml")))
    inputs = dict(x=batch["data"], image_size=np.array(SIZES), boxes=batch["gt_boxes"],
                  labels=batch["tv_labels"])
    if arch == MASK:
        inputs["masks"] = batch["gt_masks"]
    else:
        inputs["keypoints"] = batch["gt_keypoints"]
        batch["gt_labels"] = np.where(batch["gt_labels"] >= 0, 0, -1).astype(np.float32)
        inputs["labels"] = np.where(batch["gt_labels"] >= 0, 1, -1)
    np.savez(tmp / "in.npz", **inputs)
    torch_side("losses", "--arch", arch, "--weights", pth, "--input", tmp / "in.npz",
               "--out", tmp / "out.npz")
    with np.load(tmp / "out.npz") as f:
        ref = {k: f[k] for k in f.files}
    return dict(arch=arch, ckpt=str(ckpt), batch=batch, ref=ref, ours=mxmask_step(str(ckpt), batch))


def _rel(ours, ref):
    return abs(ours - ref) / abs(ref)


def test_each_loss_equals_torchvisions(step):
    ref, ours = step["ref"], step["ours"]["losses"]
    head = "loss_mask" if step["arch"] == MASK else "loss_keypoint"
    assert sorted(ours) == sorted(["loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg",
                                   head])
    table = {name: (ours[name], float(ref[NAMES[name]])) for name in ours}
    bad = {k: v for k, v in table.items() if _rel(*v) > RTOL}
    assert not bad, "mxmask vs torchvision beyond %g relative: %r" % (RTOL, bad)
    assert all(abs(t) > 1e-5 for _, t in table.values()), table     # nothing trivially 0


def test_the_same_rois_are_sampled(step):
    ref, ours = step["ref"], step["ours"]
    assert ours["counts"] == (int(ref["roi_positives"]), int(ref["roi_negatives"]))
    # the step is not a trivial one: positives on both stages, many proposals per image
    assert ref["rpn_positives"] >= 10 and ref["roi_positives"] >= 40
    assert min(ref["proposals"]) > 1000
    index = pair_rows(ours, ref)
    np.testing.assert_array_equal(ours["head_labels"][index], ref["head_labels"])


def test_the_heads_targets_equal_torchvisions(step):
    """The mask and keypoint targets themselves: with random weights the head losses hardly
    feel a change of targets (the logits do not follow them, and the changes cancel), so the
    targets are compared as well."""
    ref, ours = step["ref"], step["ours"]
    index = pair_rows(ours, ref)
    if step["arch"] == MASK:
        targets = ours["mask_targets"][index]
        np.testing.assert_allclose(targets, ref["mask_targets"], rtol=0, atol=1e-4)
        fraction = (ref["mask_targets"] > 0) & (ref["mask_targets"] < 1)
        assert fraction.mean() > 0.02                   # soft targets: many fractional cells
    else:
        valid = ours["keypoint_valid"][index]
        np.testing.assert_array_equal(valid, ref["keypoint_valid"])
        np.testing.assert_array_equal(ours["keypoint_heatmaps"][index] * valid,
                                      ref["keypoint_heatmaps"] * valid)
        assert 0.3 < valid.mean() < 0.9                 # unlabelled and outside keypoints too


# each torchvision convention field set back to Detectron2's, and what it moves
DETECTRON2 = [("model.rpn.loss_normalizer=batch_size", ("loss_rpn_cls", "loss_rpn_loc")),
              ("model.rpn.crowd_ioa=0.7", ("loss_rpn_cls", "loss_rpn_loc")),
              ("model.mask_head.soft_targets=false", ("mask_targets",)),
              ("model.mask_head.target_aligned=true", ("mask_targets",))]


@pytest.mark.parametrize("override,moved", DETECTRON2, ids=[o for o, _ in DETECTRON2])
def test_each_torchvision_convention_is_needed(step, override, moved):
    """Each field back at Detectron2's value: the RPN losses move by more than 5x the
    tolerance (a new step; the other losses stay), or the mask targets, from the training graph
    of that config on the same sampled rois, by more than 0.1 in some cell (with random
    weights the mask loss hardly feels them). On the mask arch (the RPN is the same code in
    both)."""
    if step["arch"] != MASK:
        pytest.skip("the mask arch covers every field")
    ref = step["ref"]
    if moved == ("mask_targets",):
        net, cfg, sampled, inputs = step["ours"]["graph"]
        cfg = copy.deepcopy(cfg)
        set_value(cfg, override)
        ours = dict(step["ours"], **head_targets(RCNNLoss(net, cfg, kernels="mxnet"), *sampled,
                                                 inputs))
        index = pair_rows(ours, ref)
        assert np.abs(ours["mask_targets"][index] - ref["mask_targets"]).max() > 0.1
        return
    ours = mxmask_step(step["ckpt"], step["batch"], [override])["losses"]
    for name in moved:
        assert _rel(ours[name], float(ref[NAMES[name]])) > 5 * RTOL, (name, ours)
    for name in set(ours) - set(moved):
        assert ours[name] == pytest.approx(step["ours"]["losses"][name], rel=1e-6), name

"""RCNNLoss's two stages (modeling/training.py): the mask and keypoint heads run on the first k
slots, k covering every positive, and that changes no loss and no gradient."""
import numpy as np
import mxnet as mx
import pytest

from mxmask.bench import build_bench_model, synthetic_train_batch
from mxmask.modeling.training import RCNNLoss

nd = mx.nd


def test_head_slots_cover_the_most_positives_of_an_image_in_steps_of_8():
    # 64 rois, a quarter positive: P = 16 slots
    cfg, net = build_bench_model("shapes", overrides=["solver.amp=",
                                                      "model.box_head.positive_fraction=0.25"])
    loss_net = RCNNLoss(net, cfg, kernels="mxnet")
    P = loss_net.num_pos_slots
    assert P == 16

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


@pytest.mark.parametrize("preset", ["shapes", "mask_rcnn_r50_fpn"])
def test_heads_on_the_positive_slots_equal_heads_on_all_slots(preset, monkeypatch):
    overrides = ["model.backbone.depth=18", "model.backbone.width=16", "model.fpn.out_channels=32",
                 "model.rpn.conv_channels=32", "model.box_head.fc_dim=64",
                 "model.mask_head.conv_dim=32", "model.rpn.pre_nms_topk_train=300"] \
        if preset != "shapes" else ["model.rpn.pre_nms_topk_train=300",
                                    "model.box_head.batch_size_per_image=128"]
    overrides.append("solver.amp=")                  # float32 convolutions: exact comparisons
    cfg, net = build_bench_model(preset, overrides=overrides)
    np_batch = synthetic_train_batch(cfg, (128, 160), 2, objects=3)
    keys = ["data", "im_info", "gt_boxes", "gt_labels", "gt_crowd", "gt_masks"] + \
        (["gt_keypoints"] if cfg.model.keypoint_on else [])
    batch = {k: nd.array(np_batch[k]) for k in keys}
    params = [p for p in net.collect_params().values() if p.grad_req != "null"]

    def run(all_slots):
        loss_net = RCNNLoss(net, cfg, kernels="mxnet")
        loss_net.hybridize(static_alloc=True)
        used = []
        real = loss_net.head_slots
        k_fn = (lambda labels: used.append(loss_net.num_pos_slots) or loss_net.num_pos_slots) \
            if all_slots else (lambda labels: used.append(real(labels)) or used[-1])
        monkeypatch.setattr(loss_net, "head_slots", k_fn)
        mx.random.seed(5)
        with mx.autograd.record():
            losses = loss_net(**batch)
            total = nd.add_n(*losses.values())
        total.backward()
        return ({k: float(v.asscalar()) for k, v in losses.items()},
                {p.name: p.grad().asnumpy().copy() for p in params}, used[0])

    ref, ref_grads, k_all = run(True)
    out, grads, k = run(False)
    assert k < k_all, "the test batch should leave slots without positives"
    assert out.keys() == ref.keys() and "loss_mask" in out
    for name in ref:
        assert out[name] == pytest.approx(ref[name], rel=1e-5, abs=1e-7), name
    for name, g in ref_grads.items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-4,
                                   atol=1e-5 * max(float(np.abs(g).max()), 1e-6), err_msg=name)


def test_class_agnostic_box_and_mask_heads_train_and_predict():
    """model.box_head.cls_agnostic_bbox_reg and model.mask_head.cls_agnostic_mask (Detectron2's
    options): a 4-unit box regressor and a 1-channel mask predictor, a training step whose losses
    and gradients are finite, and an inference graph whose masks come from that one channel."""
    cfg, net = build_bench_model("shapes", overrides=["model.box_head.cls_agnostic_bbox_reg=true",
                                                      "model.mask_head.cls_agnostic_mask=true",
                                                      "solver.amp=", "test.flip=false"])
    assert net.box_predictor.bbox_pred.weight.shape[0] == 4
    assert net.mask_head.predictor.weight.shape[0] == 1
    np_batch = synthetic_train_batch(cfg, (128, 160), 2, objects=3)
    keys = ["data", "im_info", "gt_boxes", "gt_labels", "gt_crowd", "gt_masks", "gt_keypoints"]
    batch = {k: nd.array(np_batch[k]) for k in keys}
    loss_net = RCNNLoss(net, cfg, kernels="mxnet")
    loss_net.hybridize(static_alloc=True)
    with mx.autograd.record():
        losses = loss_net(**batch)
        total = nd.add_n(*losses.values())
    total.backward()
    assert losses["loss_box_reg"].asscalar() > 0 and losses["loss_mask"].asscalar() > 0
    for name in ("bbox_pred", "predictor"):
        p = [p for n, p in net.collect_params().items() if name + "_weight" in n][0]
        g = p.grad().asnumpy()
        assert np.isfinite(g).all() and np.abs(g).sum() > 0, name
    net.hybridize(static_alloc=True)
    outs = dict(zip(net.output_names, net(batch["data"], batch["im_info"])))
    ids = outs["ids"].asnumpy()
    assert (ids >= 0).sum() > 0 and len(np.unique(ids[ids >= 0])) > 0
    logits = net.mask_head(outs["boxes"], *net.roi_features(net.backbone(batch["data"])))
    want = 1 / (1 + np.exp(-logits.asnumpy()[:, 0]))
    np.testing.assert_allclose(outs["masks"].asnumpy().reshape(want.shape), want, atol=1e-5)

"""The compiled operators (mxmask/ops): mxmask_roi_align, mxmask_group_norm, mxmask_box_nms,
mxmask_level_canvas.

Each must compute what the stock operator it replaces computes (contrib.ROIAlign and the numpy
RoIAlign of test_poolers.py; the LayerNorm-based GroupNorm of modeling/norm.py and numpy;
contrib.box_nms, row for row; poolers.level_canvas and a numpy canvas, channels-last, and
RoIAlign on it the same as on the stock canvas), with the same gradients (box_nms: none); the
training graph uses the first three on CPU, inference graphs the canvas too; a machine without
a working compiler falls back to the stock operators with a warning.
"""
import json
import logging
import os
import shutil

import numpy as np
import mxnet as mx
import pytest

from mxmask import ops
from mxmask.bench import build_bench_model, synthetic_train_batch
from mxmask.modeling.training import RCNNLoss

from helpers.numpy_reference import np_group_norm
from helpers.numpy_reference import np_roi_align, np_roi_align_weights

nd = mx.nd
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None,
                                    reason="no C++ compiler on this machine")


def _rois(rng, B, R, H, W, scale):
    """(R, 5) rois in input pixels over feature maps of H x W at ``scale``: some reaching past
    the borders, sizes from a fraction of a feature pixel to most of the map."""
    b = rng.randint(0, B, R)
    size = np.exp(rng.uniform(np.log(0.3), np.log(0.8 * min(H, W)), (R, 2))) / scale
    xy = rng.uniform(-0.1, 0.95, (R, 2)) * [W / scale, H / scale]
    return np.concatenate([b[:, None], xy, xy + size], 1).astype(np.float32)


def _pool_and_grad(kind, feat, rois, pooled, scale, ratio, aligned, ograd):
    x = nd.array(feat)
    x.attach_grad()
    with mx.autograd.record():
        if kind == "mxmask":
            y = nd.mxmask_roi_align(x, nd.array(rois), pooled_h=pooled, pooled_w=pooled,
                                    spatial_scale=scale, sample_ratio=ratio, aligned=int(aligned))
        else:
            y = nd.contrib.ROIAlign(x, nd.array(rois), (pooled, pooled), scale,
                                    sample_ratio=ratio, aligned=aligned)
    y.backward(nd.array(ograd))
    return y.asnumpy(), x.grad.asnumpy()


@needs_compiler
def test_builds_into_an_empty_cache_and_loads(tmp_path, capfd):
    out = str(tmp_path / "lib.so")
    ops.build(os.environ.get("CXX") or "g++", out)
    # the ~10 s compile is announced, with where the library goes
    err = capfd.readouterr().err
    assert "mxmask: compiling the CPU kernels" in err and out in err
    assert os.path.getsize(out) > 0
    assert os.listdir(str(tmp_path)) == ["lib.so"]          # no temp file left behind
    assert ops.load_ops()
    assert all(hasattr(mx.sym, name) for name in ops.OP_NAMES)


@needs_compiler
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("ratio", [0, 2])
@pytest.mark.parametrize("C", [3, 37])
def test_forward_and_gradient_equal_contrib_and_numpy(aligned, ratio, C):
    """The forward is contrib.ROIAlign's float32 arithmetic bit for bit (the in-process network
    and its exported graph give the same outputs); channel counts below and across the
    vectorised loop's width."""
    assert ops.load_ops()
    rng = np.random.RandomState(3 + ratio + aligned + C)
    B, H, W, pooled, scale = 2, 13, 17, 5, 0.25
    feat = rng.randn(B, C, H, W).astype(np.float32)
    rois = _rois(rng, B, 40, H, W, scale)
    ograd = rng.randn(len(rois), C, pooled, pooled).astype(np.float32)
    y, g = _pool_and_grad("mxmask", feat, rois, pooled, scale, ratio, aligned, ograd)
    y_ref, g_ref = _pool_and_grad("contrib", feat, rois, pooled, scale, ratio, aligned, ograd)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
    # and against numpy: pooled values, and the gradient as the adjoint of the weights
    g_np = np.zeros(feat.shape)
    for r, roi in enumerate(rois):
        b = int(roi[0])
        np.testing.assert_allclose(y[r], np_roi_align(feat[b], roi[1:], scale, pooled, ratio,
                                                      aligned), rtol=1e-4, atol=1e-5)
        wy, wx = np_roi_align_weights(roi[1:], scale, pooled, ratio, aligned, H, W)
        g_np[b] += np.einsum("ph,cpq,qw->chw", wy, ograd[r].astype(np.float64), wx)
    np.testing.assert_allclose(g, g_np, rtol=1e-4, atol=1e-4)


@needs_compiler
def test_negative_batch_index_pools_zeros_and_gets_no_gradient():
    """contrib.ROIAlign writes its zero into another roi's output here (DEVELOPING.md,
    "Measured facts about MXNet 1.9.1 on CPU"); this op zeroes the roi's own row and leaves
    every other roi alone."""
    assert ops.load_ops()
    rng = np.random.RandomState(0)
    feat = rng.randn(1, 2, 8, 8).astype(np.float32)
    rois = np.array([[0, 1, 1, 20, 20], [-1, 0, 0, 30, 30], [0, 5, 5, 9, 13]], np.float32)
    ograd = np.ones((3, 2, 4, 4), np.float32)
    y, g = _pool_and_grad("mxmask", feat, rois, 4, 0.25, 2, True, ograd)
    assert not y[1].any()
    keep = rois[[0, 2]]
    y_ref, g_ref = _pool_and_grad("mxmask", feat, keep, 4, 0.25, 2, True, ograd[[0, 2]])
    np.testing.assert_array_equal(y[[0, 2]], y_ref)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)


@needs_compiler
def test_empty_aligned_roi_does_not_abort():
    """contrib.ROIAlign(aligned=True) aborts the process on x2 <= x1; this op takes one sample
    per bin at the roi's corner."""
    assert ops.load_ops()
    feat = np.arange(2 * 6 * 6, dtype=np.float32).reshape(1, 2, 6, 6)
    rois = np.array([[0, 8, 8, 8, 4]], np.float32)           # zero width, negative height
    y, g = _pool_and_grad("mxmask", feat, rois, 3, 0.5, 0, True, np.ones((1, 2, 3, 3), "f"))
    assert np.isfinite(y).all() and np.isfinite(g).all()


def _np_canvas(levels):
    """The level canvas (poolers.level_canvas's docstring) in numpy, channels-last."""
    B, C, H0, W0 = levels[0].shape
    rows = []
    for k, f in enumerate(levels):
        h, w = f.shape[2:]
        ys = ([0] if k else []) + list(range(h)) + [h - 1]        # replicated rows
        tile = np.zeros((B, C, len(ys), W0 + 1), np.float32)
        tile[..., :w] = f[:, :, ys]
        tile[..., w] = f[:, :, ys, w - 1]                          # replicated column
        rows.append(tile)
    return np.concatenate(rows, axis=2).transpose(0, 2, 3, 1)


@needs_compiler
@pytest.mark.parametrize("shapes", [[(2, 37, 13, 17), (2, 37, 7, 9), (2, 37, 4, 5), (2, 37, 2, 3)],
                                    [(1, 3, 9, 31), (1, 3, 9, 2)], [(2, 16, 5, 6)]])
def test_level_canvas_is_the_stock_canvas_channels_last(shapes):
    """mxmask_level_canvas gives poolers.level_canvas's values exactly, transposed to
    (B, H_c, W_c, C), for any number of levels, ragged sizes and channels across the 16-wide
    tiles, and the stock canvas's gradients; in a symbol too (shape inference)."""
    from mxmask.modeling.poolers import level_canvas
    assert ops.load_ops()
    rng = np.random.RandomState(len(shapes))
    levels = [rng.randn(*s).astype(np.float32) for s in shapes]
    outs, grads = [], []
    for compiled in (True, False):
        xs = [nd.array(f) for f in levels]
        for x in xs:
            x.attach_grad()
        with mx.autograd.record():
            out = (nd.mxmask_level_canvas(*xs, num_args=len(xs)) if compiled else
                   nd.transpose(level_canvas(nd, xs), (0, 2, 3, 1)))
        ograd = np.random.RandomState(1).randn(*out.shape).astype(np.float32)
        out.backward(nd.array(ograd))
        outs.append(out.asnumpy())
        grads.append([x.grad.asnumpy() for x in xs])
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], _np_canvas(levels))
    for g, g_ref in zip(*grads):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
    names = ["p%d" % k for k in range(len(levels))]
    sym = mx.sym.mxmask_level_canvas(*[mx.sym.var(n) for n in names], num_args=len(names))
    assert sym.infer_shape(**dict(zip(names, shapes)))[1] == [out.shape]


@needs_compiler
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_on_the_channels_last_canvas_equals_the_stock_canvas(aligned):
    """``layout="NHWC"`` pools the channels-last canvas to exactly the values of the NCHW canvas
    (so the in-process network keeps the exported graph's outputs), with the same gradients
    through the canvas to the levels; an unknown layout is an error, not an abort."""
    from mxmask.modeling.poolers import level_canvas
    assert ops.load_ops()
    rng = np.random.RandomState(7)
    levels = [nd.array(rng.randn(2, 19, 12 // 2 ** k, 16 // 2 ** k)) for k in range(3)]
    rois = nd.array(_rois(rng, 2, 60, 12, 16, 1.0))
    kw = dict(pooled_h=7, pooled_w=5, spatial_scale=1.0, sample_ratio=2, aligned=int(aligned))
    ograd = nd.array(rng.randn(60, 19, 7, 5))
    outs, grads = [], []
    for layout in ("NCHW", "NHWC"):
        for x in levels:
            x.attach_grad()
        with mx.autograd.record():
            canvas = (level_canvas(nd, levels) if layout == "NCHW" else
                      nd.mxmask_level_canvas(*levels, num_args=3))
            y = nd.mxmask_roi_align(canvas, rois, layout=layout, **kw)
        y.backward(ograd)
        outs.append(y.asnumpy())
        grads.append([x.grad.asnumpy() for x in levels])
    assert outs[0].shape == (60, 19, 7, 5)
    np.testing.assert_array_equal(outs[1], outs[0])
    for g, g_ref in zip(*grads):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(mx.MXNetError, match="layout must be NCHW or NHWC"):
        nd.mxmask_roi_align(canvas, rois, layout="NWHC", **kw).wait_to_read()


@needs_compiler
@pytest.mark.parametrize("shape,groups", [((2, 8, 5, 7), 4), ((3, 6, 4, 4), 3), ((2, 32, 24, 20), 16)])
def test_group_norm_equals_the_layernorm_block_and_numpy(shape, groups):
    from mxmask.modeling.norm import GroupNorm
    assert ops.load_ops()
    rng = np.random.RandomState(sum(shape))
    C = shape[1]
    x_np = (rng.randn(*shape) * 3 + 1).astype(np.float32)
    g_np = rng.uniform(0.5, 1.5, C).astype(np.float32)
    b_np = rng.randn(C).astype(np.float32)
    og = nd.array(rng.randn(*shape).astype(np.float32))
    block = GroupNorm(groups, C)
    block.initialize()
    block.gamma.set_data(nd.array(g_np))
    block.beta.set_data(nd.array(b_np))

    def run(compiled):
        x = nd.array(x_np)
        x.attach_grad()
        with mx.autograd.record(), ops.compiled_kernels(compiled):
            y = block(x)
        y.backward(og)
        return (y.asnumpy(), x.grad.asnumpy(), block.gamma.grad().asnumpy().copy(),
                block.beta.grad().asnumpy().copy())
    ref = run(False)
    out = run(True)
    for name, a, b in zip(["out", "d_data", "d_gamma", "d_beta"], out, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(b).max())),
                                   err_msg=name)
    # numpy: normalise each (sample, group) with the biased variance, then the affine
    expected, x_hat = np_group_norm(x_np, groups, g_np, b_np)
    np.testing.assert_allclose(out[0], expected, rtol=1e-4, atol=1e-4)
    axes = (0,) + tuple(range(2, len(shape)))
    np.testing.assert_allclose(out[3], og.asnumpy().sum(axis=axes), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(out[2], (og.asnumpy() * x_hat).sum(axis=axes), rtol=1e-4,
                               atol=1e-3)


def _nms_rows(rng, shape, ties=False, classes=1):
    """Random (..., N, 6) rows [score, x1, y1, x2, y2, class]: heavily overlapping boxes, some
    with negative width or height, scores tied in pairs when ``ties``."""
    d = np.zeros(shape, np.float32)
    xy = rng.uniform(0, 300, shape[:-1] + (2,))
    d[..., 1:3] = xy
    d[..., 3:5] = xy + rng.uniform(-3, 120, shape[:-1] + (2,))
    score = rng.normal(size=shape[:-1])
    d[..., 0] = np.round(score * 2) / 2 if ties else score
    d[..., 5] = rng.randint(0, classes, shape[:-1])
    return d


NMS_CASES = {
    # the RPN's per-level NMS (modeling/proposals.py, Detectron2 style)
    "rpn_per_level": ((2, 5, 400, 6), dict(
        overlap_thresh=0.7, valid_thresh=-3e38, topk=-1, coord_start=1, score_index=0,
        id_index=-1, force_suppress=True, in_format="corner", out_format="corner")),
    # GluonCV's one NMS over all levels, the top `pre` only
    "rpn_all_levels": ((1, 3000, 6), dict(
        overlap_thresh=0.7, topk=500, coord_start=1, score_index=0, id_index=-1,
        force_suppress=True)),
    # the detections' per-class NMS (modeling/roi_heads.py), and mixed classes in one batch
    "per_class": ((1, 7, 300, 6), dict(
        overlap_thresh=0.5, valid_thresh=0.0, topk=-1, coord_start=1, score_index=0,
        id_index=5, background_id=-1, force_suppress=False, in_format="corner",
        out_format="corner")),
    "classes_topk": ((4, 300, 6), dict(
        overlap_thresh=0.3, valid_thresh=0.2, topk=50, coord_start=1, score_index=0,
        id_index=5, force_suppress=False)),
}


@needs_compiler
@pytest.mark.parametrize("case", sorted(NMS_CASES))
@pytest.mark.parametrize("ties", [False, True])
def test_box_nms_gives_contrib_box_nms_rows_exactly(case, ties):
    assert ops.load_ops()
    shape, kwargs = NMS_CASES[case]
    data = _nms_rows(np.random.RandomState(len(case) + ties), shape, ties, classes=3)
    data[0, ..., :40, 0] = -np.inf if kwargs.get("valid_thresh", 0) < -1 else -1.0  # invalid
    ref = nd.contrib.box_nms(nd.array(data), **kwargs).asnumpy()
    out = nd.mxmask_box_nms(nd.array(data), **kwargs).asnumpy()
    kept = ref[..., 0] != -1
    assert 0 < kept.sum() < kept.size                # some suppressed, some kept
    np.testing.assert_array_equal(out, ref)


@needs_compiler
def test_box_nms_edge_cases_and_refused_settings():
    assert ops.load_ops()
    kwargs = dict(overlap_thresh=0.5, coord_start=1, score_index=0)
    nothing_valid = np.full((2, 4, 5), -1, np.float32)
    np.testing.assert_array_equal(nd.mxmask_box_nms(nd.array(nothing_valid), **kwargs).asnumpy(),
                                  nothing_valid)
    # the same box twice, and an empty box (IoU 0/0): box_nms keeps the NaN pair apart
    rows = np.array([[[0.9, 0, 0, 10, 10], [0.8, 0, 0, 10, 10], [0.7, 5, 5, 5, 5],
                      [0.6, 5, 5, 5, 5]]], np.float32)
    ref = nd.contrib.box_nms(nd.array(rows), **kwargs).asnumpy()
    np.testing.assert_array_equal(nd.mxmask_box_nms(nd.array(rows), **kwargs).asnumpy(), ref)
    np.testing.assert_array_equal(ref[0, :, 0], np.float32([0.9, 0.7, 0.6, -1]))
    # no gradient flows through it (the proposals and detections stop gradients anyway)
    x = nd.array(rows)
    x.attach_grad()
    with mx.autograd.record():
        y = nd.mxmask_box_nms(x, **kwargs)
    y.backward(nd.ones_like(y))
    assert float(nd.abs(x.grad).sum().asscalar()) == 0.0
    # what it does not implement is an error, not a wrong answer or an abort
    for bad in (dict(in_format="center"), dict(out_format="center"), dict(background_id=0)):
        with pytest.raises(mx.base.MXNetError, match="mxmask_box_nms"):
            nd.mxmask_box_nms(nd.array(rows), **kwargs, **bad).wait_to_read()
    with pytest.raises(mx.base.MXNetError, match="mxmask_box_nms: every input must be float32"):
        nd.mxmask_box_nms(nd.array(rows, dtype="float64"), **kwargs).wait_to_read()


def _loss_and_grads(net, cfg, kind, batch):
    loss_net = RCNNLoss(net, cfg, kernels=kind)
    loss_net.hybridize(static_alloc=True)
    params = [p for p in net.collect_params().values() if p.grad_req != "null"]
    mx.random.seed(11)
    with mx.autograd.record():
        losses = loss_net(**batch)
        total = nd.add_n(*losses.values())
    total.backward()
    graph = [(n["op"], n["name"]) for stage in (loss_net.box_stage, loss_net.head_stage)
             for n in json.loads(stage._cached_graph[1].tojson())["nodes"]]
    return ({k: float(v.asscalar()) for k, v in losses.items()},
            {p.name: p.grad().asnumpy().copy() for p in params}, graph)


@needs_compiler
def test_training_graph_with_either_kernel_gives_the_same_losses_and_gradients():
    # float32 convolutions; the network's own inference graph with MXNet's kernels
    cfg, net = build_bench_model("shapes", overrides=["solver.amp="], kernels="mxnet")
    cfg.model.rpn.pre_nms_topk_train = 200
    np_batch = synthetic_train_batch(cfg, (96, 128), 2, objects=3)
    keys = ["data", "im_info", "gt_boxes", "gt_labels", "gt_crowd", "gt_masks", "gt_keypoints"]
    batch = {k: nd.array(np_batch[k]) for k in keys}
    losses_ref, grads_ref, graph_ref = _loss_and_grads(net, cfg, "mxnet", batch)
    losses, grads, graph = _loss_and_grads(net, cfg, "mxmask", batch)
    # every pooler and GroupNorm runs the compiled op (the mask targets, gt masks with no
    # gradient, keep contrib.ROIAlign), and only in the graph that asked for it
    pooled = [name for op, name in graph if op == "mxmask_roi_align"]
    assert len(pooled) == 4            # box, mask and keypoint heads, the mask head's image guide
    norms = [name for op, name in graph if op == "mxmask_group_norm"]
    assert len(norms) == len([1 for op, _ in graph_ref if op == "LayerNorm"]) > 10
    assert not [1 for op, _ in graph if op == "LayerNorm"]
    assert [name.rsplit("_", 2)[1:] for op, name in graph if op == "_contrib_ROIAlign"] == \
        [["masktargets0", "roialign0"]]
    assert len([1 for op, _ in graph_ref if op == "_contrib_ROIAlign"]) == 4 + 1
    # the RPN's NMS: one call, compiled in the compiled graph only
    assert [op for op, _ in graph if "box_nms" in op] == ["mxmask_box_nms"]
    assert [op for op, _ in graph_ref if "box_nms" in op] == ["_contrib_box_nms"]
    for k in losses_ref:
        assert losses[k] == pytest.approx(losses_ref[k], rel=1e-5, abs=1e-6), k
    # float32 sums in another order (the compiled GroupNorm accumulates in float64): agreement
    # to 1e-3 of each parameter's largest gradient; a wrong kernel is off by O(1)
    for name, ref in grads_ref.items():
        scale = max(float(np.abs(ref).max()), 1e-6)
        np.testing.assert_allclose(grads[name], ref, rtol=1e-3, atol=1e-3 * scale + 1e-7,
                                   err_msg=name)
    # the inference graph of the same network keeps the stock op it was told to use
    net.hybridize(static_alloc=True)
    net(batch["data"], batch["im_info"])
    inference = net._cached_graph[1].tojson()
    assert '"mxmask_roi_align"' not in inference and '"mxmask_group_norm"' not in inference
    assert '"mxmask_box_nms"' not in inference


@needs_compiler
def test_auto_picks_the_compiled_op_on_cpu_only():
    assert ops.kernels_for([mx.cpu(0), mx.cpu(1)]) == "mxmask"
    assert ops.kernels_for([mx.cpu(0), mx.gpu(0)]) == "mxnet"


def test_forced_stock_op_and_failed_builds_fall_back_with_a_warning(monkeypatch, tmp_path,
                                                                     caplog):
    monkeypatch.setenv("MXMASK_CACHE", str(tmp_path))
    monkeypatch.setattr(ops, "_STATE", {})
    monkeypatch.setenv("MXMASK_OPS", "mxnet")
    assert not ops.load_ops()
    assert ops.kernels_for([mx.cpu()]) == "mxnet"
    monkeypatch.delenv("MXMASK_OPS")

    caplog.set_level(logging.WARNING, logger="mxmask.ops")
    monkeypatch.setattr(ops, "_STATE", {})
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert not ops.load_ops()
    assert "no C++ compiler" in caplog.text

    caplog.clear()
    failing = tmp_path / "broken-cxx"
    failing.write_text("#!/bin/sh\necho 'broken-cxx: cannot compile' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setattr(ops, "_STATE", {})
    monkeypatch.setenv("CXX", str(failing))
    assert not ops.load_ops()
    assert "could not build or load" in caplog.text and "exit 1" in caplog.text
    assert [n for n in os.listdir(str(tmp_path)) if n.endswith(".so")] == []

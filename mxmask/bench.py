"""``mxmask bench``: inference (and training-step) speed, stage by stage, and peak memory.

    mxmask bench --preset mask_rcnn_r50_fpn --size 800x1344 --runs 5
    mxmask bench --ckpt runs/shapes --size 192x256 --train --json bench.json

What goes in: a preset (random weights) or a checkpoint, an input size ``HxW`` (rounded up to a
multiple of 32), a batch size. What comes out: a table and, with ``--json``, a JSON record:

    {"settings": {...}, "mxmask": {"total_s": {"median", "min", "max"},
                                   "stages": {stage: {"median", "min", "max"}},
                                   "peak_rss_mb": ..., "train_step_s": {...}, "train_images_per_s": ...}}

Stages (each run as its own hybridized block on the real intermediate tensors, so their sum
is close to, but not exactly, the end-to-end time of the single graph):

    backbone+fpn        data -> P2..P6
    rpn+proposals       anchors, RPN head, decode, top-k, NMS
    box_head+nms        RoIAlign, fc head, per-class NMS -> D detections
    mask_head           RoIAlign + mask head on the D detections
    keypoint_head       RoIAlign + keypoint head on the D detections
    paste/decode        masks pasted into the image, keypoints decoded, RLE encoded (numpy)

``total`` is the end-to-end hybridized network plus the paste/decode stage. With random weights
the classifier bias of class 0 is raised so that every image yields ``test.max_dets`` detections
(the same work a trained model does on a busy image); a checkpoint is measured as it is.
"""
import os
import resource
import time
import warnings

import mxnet as mx
import numpy as np

from .config import get_config
from .engine.checkpoint import checkpoint_files, load_checkpoint_config
from .modeling.rcnn import build_model
from .modeling.roi_heads import detect, select_class_masks
from .postprocess import detections_to_coco
from .utils import UserError, atomic_write_json


def parse_size(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError("--size %s: expected HxW, e.g. 800x1344" % text)
    return -(-h // 32) * 32, -(-w // 32) * 32


def _stats(times):
    times = sorted(times)
    return {"median": float(np.median(times)), "min": float(times[0]), "max": float(times[-1])}


def _timed(fn, runs, warmup):
    for _ in range(warmup):
        out = fn()
        mx.nd.waitall()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        mx.nd.waitall()
        times.append(time.perf_counter() - t0)
    return out, times


class _BoxStage(mx.gluon.HybridBlock):
    def __init__(self, net, **kwargs):
        super(_BoxStage, self).__init__(**kwargs)
        self.net = net

    def hybrid_forward(self, F, im_info, rois, roi_scores, *features):
        cls_logits, deltas = self.net.box_forward(rois, *features)
        return detect(F, cls_logits, deltas, rois, roi_scores, im_info, **self.net.detect_kwargs)


class _HeadStage(mx.gluon.HybridBlock):
    def __init__(self, head, num_classes=0, **kwargs):
        super(_HeadStage, self).__init__(**kwargs)
        self.head = head
        self.num_classes = num_classes

    def hybrid_forward(self, F, boxes, ids, *levels):
        out = self.head(boxes, *levels)
        if self.num_classes:
            return select_class_masks(F, out, ids, self.num_classes)
        return out


def build_bench_model(preset=None, ckpt=None, overrides=(), ctx=None):
    """(cfg, net) from a checkpoint or a preset with random weights (see module doc)."""
    ctx = ctx or mx.cpu()
    if ckpt:
        cfg = load_checkpoint_config(ckpt)
        for o in overrides:
            from .config import set_value
            set_value(cfg, o)
        net = build_model(cfg, ctx=ctx)
        net.load_parameters(checkpoint_files(ckpt)[0], ctx=ctx)
        return cfg, net
    cfg = get_config(preset, overrides)
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = 5
    if cfg.model.keypoint_on and cfg.model.num_keypoints == 0:
        cfg.model.num_keypoints = 7
    mx.random.seed(cfg.seed)
    net = build_model(cfg, ctx=ctx)
    bias = net.box_predictor.cls_score.bias
    value = bias.data(ctx).asnumpy()
    value[1] = 10.0                 # class 0 wins every roi: max_dets detections per image
    bias.set_data(mx.nd.array(value, ctx=ctx))
    return cfg, net


def bench_inference(cfg, net, size, batch=1, runs=5, warmup=2, ctx=None):
    """Per-stage and end-to-end latency; returns the result dict (seconds)."""
    with warnings.catch_warnings():
        # a stage block holds the whole network but uses only its own part of it
        warnings.filterwarnings("ignore", message=".*is not used by any computation")
        return _bench_inference(cfg, net, size, batch, runs, warmup, ctx)


def _bench_inference(cfg, net, size, batch, runs, warmup, ctx):
    ctx = ctx or mx.cpu()
    h, w = size
    rng = np.random.RandomState(0)
    data = mx.nd.array(rng.normal(0, 1, (batch, 3, h, w)), ctx=ctx)
    im_info = mx.nd.array([[h, w, 1.0]] * batch, ctx=ctx)
    net.hybridize(static_alloc=True, static_shape=True)
    _, total = _timed(lambda: net(data, im_info), runs, warmup)
    outputs = net(data, im_info)
    names = list(net.output_names)

    stages = {}
    backbone = net.backbone
    features, stages["backbone+fpn"] = _timed(lambda: backbone(data), runs, warmup)
    (rois, roi_scores), stages["rpn+proposals"] = _timed(lambda: net.rpn(im_info, *features),
                                                         runs, warmup)
    box_stage = _BoxStage(net)
    box_stage.hybridize(static_alloc=True, static_shape=True)
    (ids, _, boxes), stages["box_head+nms"] = _timed(
        lambda: box_stage(im_info, rois, roi_scores, *features), runs, warmup)
    levels = net.roi_features(features)
    if net.mask_head is not None:
        mask_stage = _HeadStage(net.mask_head, net.num_classes)
        mask_stage.hybridize(static_alloc=True, static_shape=True)
        _, stages["mask_head"] = _timed(lambda: mask_stage(boxes, ids, *levels), runs, warmup)
    if net.keypoint_head is not None:
        kp_stage = _HeadStage(net.keypoint_head)
        kp_stage.hybridize(static_alloc=True, static_shape=True)
        _, stages["keypoint_head"] = _timed(lambda: kp_stage(boxes, ids, *levels), runs, warmup)

    arrays = [o.asnumpy() for o in outputs]
    num_dets = int((arrays[0] >= 0).sum())

    def post():
        for i in range(batch):
            out = {n: a[i] for n, a in zip(names, arrays)}
            detections_to_coco(out, np.array([h, w, 1.0]), (h, w), i,
                               list(range(1, net.num_classes + 1)),
                               keypoint_decode=cfg.test.keypoint_decode,
                               box_plus_one=cfg.model.box_plus_one)
    _, stages["paste/decode"] = _timed(post, runs, 1)
    total = [t + p for t, p in zip(total, stages["paste/decode"])]
    return {"total_s": _stats(total), "stages": {k: _stats(v) for k, v in stages.items()},
            "detections_per_image": num_dets / float(batch),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def synthetic_train_batch(cfg, size, batch, objects=2, seed=0):
    """A training batch of ``batch`` images of ``size`` with ``objects`` boxes/masks each."""
    h, w = size
    rng = np.random.RandomState(seed)
    k = max(1, cfg.model.num_keypoints)
    boxes = np.zeros((batch, objects, 4), np.float32)
    masks = np.zeros((batch, objects, h, w), np.float32)
    kps = np.zeros((batch, objects, k, 3), np.float32)
    for b in range(batch):
        for j in range(objects):
            bw, bh = rng.uniform(0.2, 0.5) * w, rng.uniform(0.2, 0.5) * h
            x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            boxes[b, j] = [x1, y1, x1 + bw, y1 + bh]
            masks[b, j, int(y1):int(y1 + bh), int(x1):int(x1 + bw)] = 1
            kps[b, j, :, 0] = rng.uniform(x1, x1 + bw, k)
            kps[b, j, :, 1] = rng.uniform(y1, y1 + bh, k)
            kps[b, j, :, 2] = 2
    return {"data": rng.normal(0, 1, (batch, 3, h, w)).astype(np.float32),
            "im_info": np.array([[h, w, 1.0]] * batch, np.float32),
            "gt_boxes": boxes, "gt_labels": np.zeros((batch, objects), np.float32),
            "gt_crowd": -np.ones((batch, 1, 4), np.float32), "gt_masks": masks,
            "gt_keypoints": kps}


def bench_train_step(cfg, net, size, batch=1, runs=3, warmup=2, ctx=None):
    """Seconds per SGD step (forward, backward, update) on a synthetic batch."""
    from mxnet import autograd, gluon
    from .modeling.training import RCNNLoss
    ctx = ctx or mx.cpu()
    loss_net = RCNNLoss(net, cfg)
    loss_net.hybridize(static_alloc=True)
    params = {k: v for k, v in net.collect_params().items() if v.grad_req != "null"}
    trainer = gluon.Trainer(params, "sgd", {"learning_rate": 1e-4, "momentum": 0.9, "wd": 1e-4})
    batch_np = synthetic_train_batch(cfg, size, batch)
    keys = ["data", "im_info", "gt_boxes", "gt_labels", "gt_crowd"] + \
        (["gt_masks"] if net.mask_head is not None else []) + \
        (["gt_keypoints"] if net.keypoint_head is not None else [])
    inputs = {k: mx.nd.array(batch_np[k], ctx=ctx) for k in keys}

    def step():
        with autograd.record():
            losses = loss_net(**inputs)
            total = mx.nd.add_n(*losses.values())
        total.backward()
        trainer.step(batch)
        return total
    _, times = _timed(step, runs, warmup)
    return {"train_step_s": _stats(times), "train_images_per_s": batch / float(np.median(times))}


def format_table(result, settings):
    lines = ["mxmask bench: %s" % ", ".join("%s=%s" % kv for kv in settings.items()),
             "%-16s %9s %9s %9s" % ("stage", "median s", "min s", "max s")]
    m = result["mxmask"]
    for name, s in m["stages"].items():
        lines.append("%-16s %9.3f %9.3f %9.3f" % (name, s["median"], s["min"], s["max"]))
    if "plain_total_s" in m:
        t = m["plain_total_s"]
        lines.append("%-16s %9.3f %9.3f %9.3f" % ("total fp32 plain", t["median"], t["min"],
                                                  t["max"]))
        variant = "total %s%s" % ("bf16" if settings["dtype"] == "bfloat16" else "fp32",
                                  " fused" if settings["fuse"] else "")
    else:
        variant = "total"
    t = m["total_s"]
    lines.append("%-16s %9.3f %9.3f %9.3f" % (variant, t["median"], t["min"], t["max"]))
    lines.append("detections/image %.0f, peak RSS %.0f MB" % (m["detections_per_image"],
                                                             m["peak_rss_mb"]))
    if "train_step_s" in m:
        s = m["train_step_s"]
        lines.append("train step       %9.3f %9.3f %9.3f   (%.2f images/s)"
                     % (s["median"], s["min"], s["max"], m["train_images_per_s"]))
    return "\n".join(lines)


def bench_optimized(net, size, batch, fuse, dtype, runs, warmup):
    """End-to-end latency of the exported graph, bf16-converted and/or MKLDNN-fused."""
    from .export import network_symbol, optimized_block
    h, w = size
    rng = np.random.RandomState(0)
    data = mx.nd.array(rng.normal(0, 1, (batch, 3, h, w)))
    im_info = mx.nd.array([[h, w, 1.0]] * batch)
    block, _ = optimized_block(network_symbol(net), net.collect_params(), data, im_info,
                               fuse, dtype)
    _, times = _timed(lambda: block(data, im_info), runs, warmup)
    return _stats(times)


def run_bench(preset="mask_rcnn_r50_fpn", ckpt=None, size="800x1344", batch=1, runs=5,
              warmup=2, train=False, overrides=(), json_path=None, fuse=False, dtype="float32",
              out=print):
    if dtype not in ("float32", "bfloat16"):
        raise UserError("--dtype %s: expected float32 or bfloat16" % dtype)
    hw = parse_size(size)
    cfg, net = build_bench_model(preset, ckpt, overrides)
    settings = {"preset": ckpt or preset, "size": "%dx%d" % hw, "batch": batch, "runs": runs,
                "dtype": dtype, "fuse": bool(fuse), "max_dets": cfg.test.max_dets,
                "omp_threads": os.environ.get("OMP_NUM_THREADS", "default")}
    result = {"settings": settings, "mxmask": bench_inference(cfg, net, hw, batch, runs, warmup)}
    if fuse or dtype != "float32":
        # stages stay those of the plain fp32 network; total is the optimised graph + paste
        network = bench_optimized(net, hw, batch, fuse, dtype, runs, warmup)
        paste = result["mxmask"]["stages"]["paste/decode"]["median"]
        result["mxmask"]["plain_total_s"] = result["mxmask"]["total_s"]
        result["mxmask"]["total_s"] = {k: v + paste for k, v in network.items()}
    if train:
        result["mxmask"].update(bench_train_step(cfg, net, hw, batch, max(1, runs // 2), 1))
    out(format_table(result, settings))
    if json_path:
        atomic_write_json(json_path, result, indent=1)
    return result

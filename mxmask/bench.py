"""``mxmask bench``: inference (and training-step) speed, stage by stage, peak memory, the
network's arithmetic and achieved GFLOP/s, optionally side by side with GluonCV's Mask R-CNN and a
plain ResNet-50 on the same machine.

    mxmask bench --preset mask_rcnn_r50_fpn --size 800x1344 --runs 5
    mxmask bench --preset mask_rcnn_r50_fpn --size 800x1344 --runs 5 --train \
                 --against gluoncv --json bench.json --chart stages.png
    mxmask bench --ckpt runs/shapes --size 192x256 --train --json bench.json

What goes in: a preset (random weights) or a checkpoint, an input size ``HxW`` (rounded up to a
multiple of 32), a batch size. What comes out: a table, with ``--json`` a JSON record and with
``--chart`` a PNG bar chart of the stages (matplotlib, Agg)::

    {"settings": {...},
     "mxmask": {"total_s": {"median", "min", "max"}, "network_s": {...},
                "stages": {stage: {"median", "min", "max"}},
                "detections_per_image", "peak_rss_mb",
                "gmac", "gmac_stages": {stage: GMAC}, "gflop_per_s",
                ["plain_total_s"]                      with --fuse / --dtype bfloat16
                ["keypoint_head_per_rois": {"10": stats, "100": stats},
                 "keypoint_head_gmac_per_rois": {"10": GMAC, "100": GMAC}]    keypoint presets
                ["train_step_s", "train_images_per_s"]},                      with --train
                (--dtype bfloat16 --train: the step's convolutions in bf16, solver.amp;
                 settings["train_amp"] says which)
     ["gluoncv": {"total_s", "network_s", "paste_s", "detections_per_image", "gmac",
                  "gmac_stages", "gflop_per_s", ["train_step_s", "train_images_per_s",
                  "rpn_targets_s"]},
      "speedup": gluoncv total median / mxmask total median,
      "network_speedup": the same for the networks alone (no paste),
      ["train_speedup": gluoncv train_step median / mxmask train_step median]]   --against gluoncv
     ["resnet50": {"gmac", "plain_s", "mkldnn_s", "gflop_per_s": {"plain", "mkldnn"}}]}
                                                             --resnet50 (implied by --against)

A speedup above 1 means mxmask is faster.

Stages (each run as its own hybridized block on the real intermediate tensors, so their sum
is close to, but not exactly, the end-to-end time of the single graph):

    backbone+fpn        data -> P2..P6
    rpn+proposals       anchors, RPN head, decode, top-k, NMS
    box_head+nms        RoIAlign, fc head, per-class NMS -> D detections
    mask_head           RoIAlign + mask head on the D detections
    keypoint_head       RoIAlign + keypoint head on the D detections
    paste/decode        masks pasted into the image, keypoints decoded, RLE encoded (numpy)

Kernels (``--kernels``, ``settings["kernels"]``): on a CPU the in-process network pools with
mxmask's compiled RoIAlign (``auto``, as ``mxmask predict`` and ``eval`` run it; the same outputs
as ``contrib.ROIAlign``); ``mxnet`` times MXNet's operator, as in an exported graph. The
``--fuse`` / ``--dtype bfloat16`` graphs are built from the exported graph and keep MXNet's.

``network_s`` is the end-to-end hybridized network (the MKLDNN-fused / bf16 graph with those
options), ``total`` is it plus the paste/decode stage. With random weights the classifier bias of
class 0 is raised so that every image yields ``test.max_dets`` detections (the same work a trained
model does on a busy image); a checkpoint is measured as it is.

Keypoint presets also time the keypoint head stage (RoIAlign + head, on the first image's P2..P5)
on exactly 10 and 100 rois, as the cost a deployment pays per detection that needs keypoints.

Arithmetic (:mod:`mxmask.flops`): the multiply-accumulates of every Convolution, Deconvolution and
FullyConnected of the plain inference graph at the bench input's shapes; the RoI heads count the
graph's fixed roi counts (``model.rpn.post_nms_topk_test`` proposals per image for the box head,
``test.max_dets`` detections for the mask and keypoint heads). ``gflop_per_s`` = 2 * MACs /
median ``network_s``. ``--resnet50`` times GluonCV's ``resnet50_v1b`` (random weights, 1000
classes, hybridized) on the same input, plain and after ``optimize_for(x, backend="MKLDNN")``: the
rate a well-optimised plain CNN reaches on this machine, to read the detector's rate against.

``--against gluoncv`` runs GluonCV's ``mask_rcnn_fpn_resnet50_v1b_coco`` in the same process on the
same random-normal input tensor, with matched settings: random weights, hybridized
(``static_alloc``, ``static_shape``, as mxmask), ``test.max_dets`` detections per image (GluonCV's
``_rcnn_max_dets``; it keeps its own 1000 RPN test proposals and 80 classes), batch 1 (GluonCV's
inference graph takes one image), no test-time flip on mxmask's side (``test.flip`` is turned
off), the same runs and warm-up. Its CPU RoIAlign bug is worked around
with :func:`mxmask.convert.gluoncv_reference.pyramid_roi_feats_masked`, which does the same
RoIAlign work as GluonCV's own code. Its ``total`` is the network plus GluonCV's evaluation
post-processing (``mask.fill`` into the image and an RLE per detection), the counterpart of
mxmask's paste/decode. With ``--train`` its training step is timed on the same synthetic batch
(:func:`synthetic_train_batch`: same image size, same 2 objects with box masks, class 0) with the
same runs and warm-up as mxmask's step; the step is, per iteration (details in
:mod:`mxmask.convert.gluoncv_reference`):

1. the RPN anchor targets GluonCV computes in its data loader (``MaskRCNNDefaultTrainTransform`` +
   ``MaskRCNNTrainBatchify``: anchor/gt IoU, sampling, encoding, per-level padding); mxmask
   computes these inside its training graph, so they are timed as part of GluonCV's step
   (``rpn_targets_s`` reports them alone);
2. forward in autograd train mode with gt boxes and labels (RPN proposals, RoI sampling of 512,
   box targets, box head, mask head on the positive slots), GluonCV's mask targets and the losses
   exactly as ``train_mask_rcnn.py`` computes them;
3. backward and an SGD update (momentum 0.9, weight decay 1e-4, lr 1e-4, as mxmask's bench step)
   of GluonCV's trainable parameters (``collect_train_params``).

Neither side's image decoding / augmentation is timed. The two models are not the same network
(mxmask's preset decides its own widths, proposal counts and head sizes), which is the point of
the comparison: the speedup is for the configurations as shipped.
"""
import os
import resource
import time
import warnings

import mxnet as mx
import numpy as np

from .config import get_config
from .engine.checkpoint import checkpoint_files, load_checkpoint_config
from .export import check_anchors_cover, check_dtype, parse_hw
from .modeling.poolers import shared_level_canvas
from .modeling.rcnn import build_model, inference_kernels
from .modeling.roi_heads import head_inputs, select_class_masks
from .postprocess import detections_to_coco
from .utils import UserError, atomic_write_bytes, atomic_write_json


def parse_size(text):
    """``"HxW"`` -> (H, W) rounded up to multiples of 32."""
    h, w = parse_hw(text)
    if h <= 0 or w <= 0:
        raise UserError("--size %s: height and width must be positive" % text)
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
        with shared_level_canvas():         # the box head and the refine_boxes pass
            return self.net.detections(F, im_info, rois, roi_scores, *features)


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


def build_bench_model(preset=None, ckpt=None, overrides=(), ctx=None, kernels="auto"):
    """(cfg, net) from a checkpoint or a preset with random weights (see module doc); the
    network's RoIAlign ``kernels`` as :meth:`MaskRCNN.use_kernels` takes them."""
    ctx = ctx or mx.cpu()
    if ckpt:
        cfg = load_checkpoint_config(ckpt)
        for o in overrides:
            from .config import set_value
            set_value(cfg, o)
        net = build_model(cfg, ctx=ctx)
        net.load_parameters(checkpoint_files(ckpt)[0], ctx=ctx)
    else:
        cfg = get_config(preset, overrides)
        if cfg.model.num_classes == 0:
            cfg.model.num_classes = 5
        if cfg.model.keypoint_on and cfg.model.num_keypoints == 0:
            cfg.model.num_keypoints = 7
        mx.random.seed(cfg.seed)
        net = build_model(cfg, ctx=ctx)
        bias = net.box_predictor.cls_score.bias
        value = bias.data(ctx).asnumpy()
        value[1] = 10.0             # class 0 wins every roi: max_dets detections per image
        bias.set_data(mx.nd.array(value, ctx=ctx))
    net.use_kernels(kernels)
    return cfg, net


def bench_inference(cfg, net, size, batch=1, runs=5, warmup=2, ctx=None):
    """Per-stage and end-to-end latency; returns the result dict (seconds)."""
    with warnings.catch_warnings():
        # a stage block holds the whole network but uses only its own part of it
        warnings.filterwarnings("ignore", message=".*is not used by any computation")
        # the stage blocks are traced with the network's kernels
        with inference_kernels(net.kernels):
            return _bench_inference(cfg, net, size, batch, runs, warmup, ctx)


def bench_input(size, batch=1, ctx=None):
    """``(data, im_info)``: the random-normal input every timed network gets (seed 0)."""
    h, w = size
    rng = np.random.RandomState(0)
    data = mx.nd.array(rng.normal(0, 1, (batch, 3, h, w)), ctx=ctx or mx.cpu())
    im_info = mx.nd.array([[h, w, 1.0]] * batch, ctx=ctx or mx.cpu())
    return data, im_info


def _bench_inference(cfg, net, size, batch, runs, warmup, ctx):
    ctx = ctx or mx.cpu()
    h, w = size
    data, im_info = bench_input(size, batch, ctx)
    net.hybridize(static_alloc=True, static_shape=True)
    _, network = _timed(lambda: net(data, im_info), runs, warmup)
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
        mask_stage = _HeadStage(net.mask_head, net.mask_head.num_classes)
        mask_stage.hybridize(static_alloc=True, static_shape=True)
        mask_in = head_inputs(net.mask_head, levels, data)
        _, stages["mask_head"] = _timed(lambda: mask_stage(boxes, ids, *mask_in), runs, warmup)
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
                               mask_box_thresh=cfg.test.mask_box_thresh)
    _, stages["paste/decode"] = _timed(post, runs, 1)
    total = [t + p for t, p in zip(network, stages["paste/decode"])]
    result = {"total_s": _stats(total), "network_s": _stats(network),
              "stages": {k: _stats(v) for k, v in stages.items()},
              "detections_per_image": num_dets / float(batch)}
    if net.keypoint_head is not None:
        result.update(bench_keypoint_head_rois(net, levels, size, KEYPOINT_ROIS, runs, warmup))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return result


KEYPOINT_ROIS = (10, 100)


def _random_boxes(rng, count, size):
    """(1, count, 4) boxes inside an image of ``size`` = (h, w), 8 px to half the image."""
    h, w = size
    bw = rng.uniform(8, max(9, w / 2), count)
    bh = rng.uniform(8, max(9, h / 2), count)
    x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    return np.stack([x1, y1, x1 + bw, y1 + bh], axis=1)[None].astype(np.float32)


def bench_keypoint_head_rois(net, levels, size, counts=KEYPOINT_ROIS, runs=5, warmup=2):
    """The keypoint head stage (RoIAlign + head) on exactly ``count`` rois of the first image
    (``levels`` = its P2..P5, any batch; the first image is used): ``{"keypoint_head_per_rois":
    {"10": stats, ...}, "keypoint_head_gmac_per_rois": {"10": GMAC, ...}}``."""
    from .flops import count_block_macs
    ctx = levels[0].context
    first = [lvl[0:1] for lvl in levels]
    times, gmacs = {}, {}
    rng = np.random.RandomState(1)
    for count in counts:
        boxes = mx.nd.array(_random_boxes(rng, count, size), ctx=ctx)
        ids = mx.nd.zeros((1, count), ctx=ctx)
        stage = _HeadStage(net.keypoint_head)
        stage.hybridize(static_alloc=True, static_shape=True)
        _, t = _timed(lambda: stage(boxes, ids, *first), runs, warmup)
        times[str(count)] = _stats(t)
        shapes = {"boxes": boxes.shape, "ids": ids.shape}
        shapes.update({"p%d" % (i + 2): lvl.shape for i, lvl in enumerate(first)})
        gmacs[str(count)] = count_block_macs(stage, shapes)["total"] / 1e9
    return {"keypoint_head_per_rois": times, "keypoint_head_gmac_per_rois": gmacs}


def stage_mac_groups(net):
    """``{stage: block prefixes + parameter names}`` of a MaskRCNN, for
    :func:`mxmask.flops.count_macs` (the prefix also catches layers whose weight is computed in the
    graph, such as the keypoint head's bilinear upsampling deconvolution)."""
    def names(*blocks):
        return [b.prefix for b in blocks] + \
            [p.name for b in blocks for p in b.collect_params().values()]
    groups = {"backbone+fpn": names(net.backbone), "rpn+proposals": names(net.rpn),
              "box_head+nms": names(net.box_head, net.box_predictor)}
    if net.mask_head is not None:
        groups["mask_head"] = names(net.mask_head)
    if net.keypoint_head is not None:
        groups["keypoint_head"] = names(net.keypoint_head)
    return groups


def _gmac_record(macs, median_s):
    return {"gmac": macs["total"] / 1e9,
            "gmac_stages": {k: v / 1e9 for k, v in macs["by_group"].items()},
            "gflop_per_s": 2.0 * macs["total"] / median_s / 1e9}


def count_network_macs(net, size, batch=1):
    """:func:`mxmask.flops.count_macs` of the plain inference graph (``network_symbol``) at the
    input ``size``, grouped by stage."""
    from .export import network_symbol
    from .flops import count_macs
    h, w = size
    params = {p.name: p.shape for p in net.collect_params().values()}
    return count_macs(network_symbol(net), {"data": (batch, 3, h, w), "im_info": (batch, 3)},
                      stage_mac_groups(net), params)


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
    return {"train_step_s": _stats(times), "train_images_per_s": batch / float(np.median(times)),
            "train_amp": loss_net.amp or "float32"}


def bench_gluoncv(cfg, size, batch=1, runs=5, warmup=2, train=False, ctx=None):
    """GluonCV ``mask_rcnn_fpn_resnet50_v1b_coco`` on the bench input (module docstring):
    ``(record, settings)``. ``batch`` must be 1 (:func:`run_bench` checks it up front)."""
    from .convert.gluoncv_reference import (MODEL_NAME, GluonCVTrainStep, build_gluoncv_mask_rcnn,
                                            gluoncv_postprocess, mac_groups)
    from .flops import count_macs
    ctx = ctx or mx.cpu()
    h, w = size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # GluonCV's deprecation and constant warnings
        g = build_gluoncv_mask_rcnn(max_dets=cfg.test.max_dets, batch=batch, ctx=ctx)
        data, _ = bench_input(size, batch, ctx)
        g.hybridize(static_alloc=True, static_shape=True)
        _, network = _timed(lambda: g(data), runs, warmup)
        ids, scores, boxes, masks = [o.asnumpy()[0] for o in g(data)]
        _, paste = _timed(lambda: gluoncv_postprocess(ids, scores, boxes, masks, h, w), runs, 1)
        with mx.autograd.predict_mode():
            sym = mx.sym.Group(list(g(mx.sym.var("data"))))
        macs = count_macs(sym, {"data": (batch, 3, h, w)}, mac_groups(g),
                          {p.name: p.shape for p in g.collect_params().values()})
        record = {"total_s": _stats([a + b for a, b in zip(network, paste)]),
                  "network_s": _stats(network), "paste_s": _stats(paste),
                  "detections_per_image": float((ids >= 0).sum())}
        record.update(_gmac_record(macs, record["network_s"]["median"]))
        settings = {"model": MODEL_NAME, "max_dets": int(g._rcnn_max_dets),
                    "rpn_test_post_nms": int(g._rpn_test_post_nms),
                    "roi_align_workaround": "pyramid_roi_feats_masked",
                    "hybridize": "static_alloc, static_shape (training: static_alloc)"}
        if train:
            # a hybridized GluonCV block keeps the graph of its first call: re-hybridizing drops
            # the inference graph so the training graph is traced
            g.hybridize(static_alloc=True)
            step = GluonCVTrainStep(g, batch, ctx=ctx)
            batch_np = synthetic_train_batch(cfg, size, batch)
            arrays = step.inputs(batch_np)
            _, times = _timed(lambda: step.step(batch_np, arrays), runs, max(1, warmup))
            _, target_times = _timed(lambda: step.rpn_targets(batch_np), runs, 0)
            record.update({"train_step_s": _stats(times),
                           "train_images_per_s": batch / float(np.median(times)),
                           "rpn_targets_s": _stats(target_times)})
    return record, settings


def bench_resnet50(size, batch=1, runs=5, warmup=2, ctx=None):
    """GluonCV ``resnet50_v1b`` (random weights) forward on the bench input, hybridized plain and
    after ``optimize_for(x, backend="MKLDNN")``, with its MACs and GFLOP/s."""
    from gluoncv.model_zoo import resnet50_v1b
    from .flops import count_block_macs
    ctx = ctx or mx.cpu()
    data, _ = bench_input(size, batch, ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = resnet50_v1b(pretrained=False)
        net.initialize(ctx=ctx)
        net.hybridize(static_alloc=True, static_shape=True)
        _, plain = _timed(lambda: net(data), runs, warmup)
        macs = count_block_macs(net, {"data": data.shape})["total"]
        net.optimize_for(data, backend="MKLDNN", static_alloc=True, static_shape=True)
        _, fused = _timed(lambda: net(data), runs, warmup)
    plain, fused = _stats(plain), _stats(fused)
    return {"gmac": macs / 1e9, "plain_s": plain, "mkldnn_s": fused,
            "gflop_per_s": {"plain": 2.0 * macs / plain["median"] / 1e9,
                            "mkldnn": 2.0 * macs / fused["median"] / 1e9}}


def _row(name, s, note=""):
    return "%-22s %9.3f %9.3f %9.3f%s" % (name, s["median"], s["min"], s["max"], note)


def format_table(result, settings):
    flat = [(k, v) for k, v in settings.items() if not isinstance(v, dict)]
    lines = ["mxmask bench: %s" % ", ".join("%s=%s" % kv for kv in flat),
             "%-22s %9s %9s %9s" % ("stage", "median s", "min s", "max s")]
    m = result["mxmask"]
    stage_gmac = m.get("gmac_stages", {})
    for name, s in m["stages"].items():
        note = "   %7.2f GMAC" % stage_gmac[name] if name in stage_gmac else ""
        lines.append(_row(name, s, note))
    if "plain_total_s" in m:
        lines.append(_row("total fp32 plain", m["plain_total_s"]))
        variant = "total %s%s" % ("bf16" if settings["dtype"] == "bfloat16" else "fp32",
                                  " fused" if settings["fuse"] else "")
    else:
        variant = "total"
    lines.append(_row(variant, m["total_s"]))
    if settings.get("test_flip"):
        lines.append("test.flip: the total includes the mirror image's backbone and head "
                     "passes; the stages time the image's own pass")
    lines.append("detections/image %.0f, peak RSS %.0f MB" % (m["detections_per_image"],
                                                             m["peak_rss_mb"]))
    if "gmac" in m:
        lines.append("network %.2f GMAC in %.3f s (median, no paste): %.1f GFLOP/s"
                     % (m["gmac"], m["network_s"]["median"], m["gflop_per_s"]))
    for count, s in m.get("keypoint_head_per_rois", {}).items():
        gmac = m["keypoint_head_gmac_per_rois"][count]
        lines.append(_row("keypoint head %s rois" % count, s,
                          "   %7.2f GMAC, %.1f GFLOP/s" % (gmac, 2 * gmac / s["median"])))
    if "train_step_s" in m:
        lines.append(_row("train step", m["train_step_s"],
                          "   (%.2f images/s, convolutions in %s)"
                          % (m["train_images_per_s"], settings.get("train_amp", "float32"))))
    if "gluoncv" in result:
        gs = settings.get("gluoncv", {})
        gc = result["gluoncv"]
        lines.append("gluoncv %s: %s" % (gs.get("model", ""), ", ".join(
            "%s=%s" % kv for kv in gs.items() if kv[0] != "model")))
        lines.append(_row("gluoncv network", gc["network_s"]))
        lines.append(_row("gluoncv paste/rle", gc["paste_s"]))
        lines.append(_row("gluoncv total", gc["total_s"]))
        lines.append("gluoncv network %.2f GMAC (%s): %.1f GFLOP/s" % (
            gc["gmac"], ", ".join("%s %.2f" % kv for kv in gc["gmac_stages"].items()),
            gc["gflop_per_s"]))
        if "train_step_s" in gc:
            lines.append(_row("gluoncv train step", gc["train_step_s"],
                              "   (%.2f images/s; RPN targets %.3f s of it)"
                              % (gc["train_images_per_s"], gc["rpn_targets_s"]["median"])))
        line = "speedup (gluoncv / mxmask median): inference %.2fx (networks alone %.2fx)" % (
            result["speedup"], result["network_speedup"])
        if "train_speedup" in result:
            line += ", train step %.2fx" % result["train_speedup"]
        lines.append(line)
    if "resnet50" in result:
        r = result["resnet50"]
        lines.append(_row("resnet50 fp32", r["plain_s"], "   %7.2f GMAC, %.1f GFLOP/s"
                          % (r["gmac"], r["gflop_per_s"]["plain"])))
        lines.append(_row("resnet50 mkldnn", r["mkldnn_s"], "   %7.2f GMAC, %.1f GFLOP/s"
                          % (r["gmac"], r["gflop_per_s"]["mkldnn"])))
    return "\n".join(lines)


def write_chart(path, result, settings):
    """A horizontal bar chart (PNG) of mxmask's stage medians (min-max as error bars), its total
    and, when present, GluonCV's total, titled with preset, size and dtype. The stages are those
    of the plain fp32 network; with --fuse / --dtype bfloat16 the plain total and the optimised
    total are both drawn, each named."""
    import io
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    m = result["mxmask"]
    bars = [(name, s, "#4c72b0") for name, s in m["stages"].items()]
    if "plain_total_s" in m:
        optimised = "%s%s" % ("bf16" if settings["dtype"] == "bfloat16" else "fp32",
                              " fused" if settings["fuse"] else "")
        bars.append(("mxmask total, fp32 plain", m["plain_total_s"], "#1f3a60"))
        bars.append(("mxmask total, %s" % optimised, m["total_s"], "#0b1d33"))
    else:
        bars.append(("mxmask total", m["total_s"], "#1f3a60"))
    if "gluoncv" in result:
        bars.append(("gluoncv total", result["gluoncv"]["total_s"], "#dd8452"))
    bars.reverse()                                    # first stage on top
    fig = Figure(figsize=(8, 1.2 + 0.45 * len(bars)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pos = np.arange(len(bars))
    med = np.array([s["median"] for _, s, _ in bars])
    err = np.array([[s["median"] - s["min"] for _, s, _ in bars],
                    [s["max"] - s["median"] for _, s, _ in bars]])
    ax.barh(pos, med, xerr=err, color=[c for _, _, c in bars], capsize=3)
    ax.set_yticks(pos)
    ax.set_yticklabels([n for n, _, _ in bars])
    top = med + err[1]
    for y, v, t in zip(pos, med, top):
        ax.text(t, y, "  %.3f s" % v, va="center", fontsize=8)
    ax.set_xlim(0, top.max() * 1.25 or 1)
    ax.set_xlabel("seconds (median of %d runs; bars: min-max)" % settings["runs"])
    ax.set_title("mxmask bench: %s, %s, batch %d" % (settings["preset"], settings["size"],
                                                      settings["batch"]))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def bench_optimized(net, size, batch, fuse, dtype, runs, warmup):
    """End-to-end latency of the exported graph, bf16-converted and/or MKLDNN-fused."""
    from .export import network_symbol, optimized_block
    data, im_info = bench_input(size, batch)
    block, _ = optimized_block(network_symbol(net), net.collect_params(), data, im_info,
                               fuse, dtype)
    _, times = _timed(lambda: block(data, im_info), runs, warmup)
    return _stats(times)


def run_bench(preset="mask_rcnn_r50_fpn", ckpt=None, size="800x1344", batch=1, runs=5,
              warmup=2, train=False, overrides=(), json_path=None, fuse=False, dtype="float32",
              against=None, resnet50=False, chart_path=None, kernels="auto", out=print):
    check_dtype(dtype)
    if against not in (None, "gluoncv"):
        raise UserError("--against %s: expected gluoncv" % against)
    if runs < 1 or warmup < 0:
        raise UserError("--runs must be at least 1 and --warmup at least 0")
    if against and batch != 1:
        raise UserError("--against gluoncv: GluonCV's Mask R-CNN infers one image at a time; "
                        "use --batch 1")
    if against or resnet50:         # checked before any network is built
        from .convert.common import import_gluoncv
        import_gluoncv("mxmask bench --against gluoncv" if against else "mxmask bench --resnet50")
    hw = parse_size(size)
    if against:
        overrides = list(overrides) + ["test.flip=false"]    # GluonCV has no test-time flip
    cfg, net = build_bench_model(preset, ckpt, overrides, kernels=kernels)
    check_anchors_cover(size, hw, cfg, "input.max_size_train / max_size_test; add --set "
                        "input.max_size_test=%d" % max(hw))
    settings = {"preset": ckpt or preset, "size": "%dx%d" % hw, "batch": batch, "runs": runs,
                "warmup": warmup, "dtype": dtype, "fuse": bool(fuse),
                "max_dets": cfg.test.max_dets, "test_flip": bool(cfg.test.flip),
                "rpn_post_nms_topk_test": cfg.model.rpn.post_nms_topk_test,
                "omp_threads": os.environ.get("OMP_NUM_THREADS", "default"),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                "against": against, "kernels": net.kernels}
    result = {"settings": settings, "mxmask": bench_inference(cfg, net, hw, batch, runs, warmup)}
    m = result["mxmask"]
    if fuse or dtype != "float32":
        # stages stay those of the plain fp32 network; total is the optimised graph + paste
        network = bench_optimized(net, hw, batch, fuse, dtype, runs, warmup)
        paste = m["stages"]["paste/decode"]["median"]
        m["plain_total_s"], m["plain_network_s"] = m["total_s"], m["network_s"]
        m["network_s"] = network
        m["total_s"] = {k: v + paste for k, v in network.items()}
    m.update(_gmac_record(count_network_macs(net, hw, batch), m["network_s"]["median"]))
    if train:
        if dtype == "bfloat16":
            cfg.solver.amp = "bfloat16"      # the training step's convolutions in bf16
        m.update(bench_train_step(cfg, net, hw, batch, runs, max(1, warmup)))
        settings["train_amp"] = m.pop("train_amp")      # what RCNNLoss resolved solver.amp to
    if against == "gluoncv":
        result["gluoncv"], settings["gluoncv"] = bench_gluoncv(cfg, hw, batch, runs, warmup,
                                                               train)
        gc = result["gluoncv"]
        result["speedup"] = gc["total_s"]["median"] / m["total_s"]["median"]
        result["network_speedup"] = gc["network_s"]["median"] / m["network_s"]["median"]
        if train:
            result["train_speedup"] = gc["train_step_s"]["median"] / m["train_step_s"]["median"]
    if resnet50 or against:
        result["resnet50"] = bench_resnet50(hw, batch, runs, warmup)
    out(format_table(result, settings))
    if json_path:
        atomic_write_json(json_path, result, indent=1)
    if chart_path:
        write_chart(chart_path, result, settings)
    return result

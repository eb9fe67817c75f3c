"""``mxmask bench``: inference (and training-step) speed, stage by stage, peak memory, the
network's arithmetic and achieved GFLOP/s, optionally side by side with GluonCV's Mask R-CNN,
torchvision's Mask / Keypoint R-CNN and a plain ResNet-50 on the same machine.

    mxmask bench --preset mask_rcnn_r50_fpn --size 800x1344 --runs 5
    mxmask bench --preset mask_rcnn_r50_fpn --size 800x1344 --runs 5 --train \
                 --against gluoncv --json bench.json --chart stages.png
    mxmask bench --ckpt runs/shapes --size 192x256 --train --json bench.json
    mxmask bench --preset torchvision_mask_rcnn_r50_fpn --against torchvision \
                 --torch-python tv/bin/python --json bench.json

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
     ["torchvision": {"total_s", "network_s", "paste_s", "detections_per_image", "gmac",
                      "gmac_stages", "gflop_per_s",
                      ["keypoint_head_per_rois", "keypoint_head_gmac_per_rois"],
                      ["train_step_s", "train_images_per_s"]},
      "speedup", "network_speedup", ["train_speedup"]: as for gluoncv,
      ["keypoint_head_speedup": {"10": ratio, "100": ratio}]]              --against torchvision
     ["resnet50": {"gmac", "plain_s", "mkldnn_s", "gflop_per_s": {"plain", "mkldnn"}}]}
                                                     --resnet50 (implied by --against gluoncv)

A speedup above 1 means mxmask is faster. ``settings["gluoncv"]`` / ``settings["torchvision"]``
hold the peer's own settings.

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

``--against torchvision`` times torchvision's ``maskrcnn_resnet50_fpn`` (presets with masks) or
``keypointrcnn_resnet50_fpn`` (keypoint presets; 17 keypoints) after mxmask's timings, in a
separate torch interpreter (``--torch-python``, or the ``MXMASK_TORCH_PYTHON`` environment
variable; mxmask never imports torch) running ``mxmask/convert/torchvision_reference.py time``
(:func:`bench_torchvision`). The two never run at the same time. ``--preset
torchvision_mask_rcnn_r50_fpn`` / ``torchvision_keypoint_rcnn_r50_fpn`` is mxmask with
torchvision's architecture: the same network on both sides. Matched: the same arrays (the bench
input, the synthetic training batch, the keypoint-head boxes, written to a temporary npz), random
weights, ``test.max_dets`` detections (``box_detections_per_img``, with ``box_score_thresh=0`` so
its heads see all of them), no test-time flip, the same runs and warm-up, ``torch.set_num_threads``
= mxmask's ``OMP_NUM_THREADS``, and the precision: ``--dtype float32`` is torchvision in fp32,
``--dtype bfloat16`` its best CPU setting, ``torch.autocast("cpu", dtype=torch.bfloat16)`` with
channels_last tensors; its training step takes the precision of mxmask's (``train_amp``: bf16
with ``--dtype bfloat16`` or a preset's ``solver.amp``). torchvision's network is
timed on the normalised tensor through its backbone, RPN and RoI heads (its
GeneralizedRCNNTransform is not run: no resize, as mxmask's network; its network decodes the
keypoints, which mxmask does in paste/decode); its ``paste`` is the transform's ``postprocess``
(masks pasted into the image, no RLE); its training step is the forward with targets, backward
and SGD with mxmask's step settings. Its keypoint head is timed on the boxes mxmask's is (and
in ``--dtype``, while mxmask's stages stay fp32: ``keypoint_head_speedup`` only with float32).
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


def keypoint_head_boxes(size, counts=KEYPOINT_ROIS):
    """``{count: (1, count, 4) float32 boxes}`` inside an image of ``size`` = (h, w): the rois
    the keypoint head is timed on (seed 1; the torchvision comparison gets the same boxes)."""
    rng = np.random.RandomState(1)
    return {count: _random_boxes(rng, count, size) for count in counts}


def bench_keypoint_head_rois(net, levels, size, counts=KEYPOINT_ROIS, runs=5, warmup=2):
    """The keypoint head stage (RoIAlign + head) on exactly ``count`` rois of the first image
    (``levels`` = its P2..P5, any batch; the first image is used): ``{"keypoint_head_per_rois":
    {"10": stats, ...}, "keypoint_head_gmac_per_rois": {"10": GMAC, ...}}``."""
    from .flops import count_block_macs
    ctx = levels[0].context
    first = [lvl[0:1] for lvl in levels]
    times, gmacs = {}, {}
    for count, array in keypoint_head_boxes(size, counts).items():
        boxes = mx.nd.array(array, ctx=ctx)
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


def torchvision_arch(cfg):
    """The torchvision network an mxmask config is compared with: ``maskrcnn_resnet50_fpn`` when
    ``model.mask_on``, else ``keypointrcnn_resnet50_fpn`` with ``model.keypoint_on`` (whose 17
    keypoints the config must have); UserError otherwise."""
    if cfg.model.mask_on:
        return "maskrcnn_resnet50_fpn"
    if not cfg.model.keypoint_on:
        raise UserError("--against torchvision: the preset has neither masks nor keypoints "
                        "(torchvision's references are Mask R-CNN and Keypoint R-CNN)")
    if cfg.model.num_keypoints != 17:
        raise UserError("--against torchvision: keypointrcnn_resnet50_fpn has 17 keypoints, "
                        "model.num_keypoints is %d" % cfg.model.num_keypoints)
    return "keypointrcnn_resnet50_fpn"


def torch_threads():
    """The thread count the torch side gets: mxmask's ``OMP_NUM_THREADS`` (``import mxmask``
    sets it to the usable cores unless the user set it), else the usable cores."""
    from . import usable_cores
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return usable_cores()


TORCHVISION_RECORD_KEYS = ("network_s", "paste_s", "total_s", "detections_per_image", "gmac",
                           "gmac_stages")


def bench_torchvision(python, arch, cfg, size, batch=1, runs=5, warmup=2, train=False,
                      dtype="float32", threads=None, train_dtype=None):
    """torchvision's ``arch`` timed by ``python`` (module docstring) on mxmask's bench arrays.

    Args:
        python: the torch interpreter (:func:`mxmask.convert.torch_python.find_torch_python`).
        arch: ``maskrcnn_resnet50_fpn`` or ``keypointrcnn_resnet50_fpn`` (:func:`torchvision_arch`).
        cfg: mxmask's config (``test.max_dets``; the keypoints of the synthetic batch).
        size, batch, runs, warmup, train: as mxmask's side.
        dtype: ``float32``, or ``bfloat16``: torchvision under bf16 autocast with channels_last.
        threads: ``torch.set_num_threads`` (default :func:`torch_threads`).
        train_dtype: the training step's precision (default ``dtype``): mxmask's own step's
            (``settings["train_amp"]``), which ``solver.amp`` may make bf16 under ``--dtype
            float32``.

    Returns:
        ``(record, settings)``: the ``time`` verb's figures (stats in seconds) plus
        ``gflop_per_s``, and its settings with ``model`` = ``arch``.

    Raises:
        UserError: the torch program fails or prints something other than its record.
    """
    import tempfile
    from .convert.torch_python import run_reference_json
    data, _ = bench_input(size, batch)
    arrays = {"data": data.asnumpy()}
    if train:
        b = synthetic_train_batch(cfg, size, batch)
        arrays.update(train_data=b["data"], gt_boxes=b["gt_boxes"], gt_labels=b["gt_labels"],
                      gt_masks=b["gt_masks"], gt_keypoints=b["gt_keypoints"])
    if arch == "keypointrcnn_resnet50_fpn":
        arrays.update({"keypoint_boxes_%d" % count: boxes
                       for count, boxes in keypoint_head_boxes(size).items()})
    args = ["--arch", arch, "--dtype", dtype, "--runs", runs, "--warmup", warmup,
            "--threads", threads or torch_threads(), "--detections", cfg.test.max_dets,
            "--score-thresh", 0.0]
    if train:
        args += ["--train", "--train-dtype", train_dtype or dtype]
    what = "torchvision's timing (torchvision_reference.py time)"
    with tempfile.TemporaryDirectory(prefix="mxmask-bench-") as tmp:
        path = os.path.join(tmp, "inputs.npz")
        np.savez(path, **arrays)
        record = run_reference_json(python, "time", ["--inputs", path] + args, what)
    wanted = TORCHVISION_RECORD_KEYS + (("train_step_s", "train_images_per_s") if train else ())
    missing = [k for k in wanted if k not in record]
    if missing:
        raise UserError("%s: its record has no %s (%s)" % (what, ", ".join(missing), python))
    tv = record.pop("settings", {})
    record["gflop_per_s"] = 2.0 * record["gmac"] / record["network_s"]["median"]
    settings = {"model": arch}
    for key, name in (("torch", "torch"), ("torchvision", "torchvision"), ("threads", "threads"),
                      ("dtype", "dtype"), ("autocast", "autocast"),
                      ("memory_format", "memory_format"), ("train_dtype", "train_dtype"),
                      ("box_detections_per_img", "max_dets"),
                      ("box_score_thresh", "score_thresh"),
                      ("rpn_post_nms_top_n_test", "rpn_test_post_nms"), ("input", "input"),
                      ("train_note", "train_note")):
        if tv.get(key) is not None:
            settings[name] = tv[key]
    settings["python"] = python
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


PEERS = ("gluoncv", "torchvision")
# what each peer's paste_s times
_PASTE_NAMES = {"gluoncv": "paste/rle", "torchvision": "postprocess"}
_NAME_WIDTH = 30


def _row(name, s, note=""):
    return "%-*s %9.3f %9.3f %9.3f%s" % (_NAME_WIDTH, name, s["median"], s["min"], s["max"],
                                          note)


def peer_ratios(m, peer, keypoint_heads=True):
    """mxmask's speedups over a peer (peer median / mxmask median: above 1 mxmask is faster).

    Args:
        m: mxmask's record; peer: the peer's record (``total_s``, ``network_s``, optionally
            ``train_step_s`` and ``keypoint_head_per_rois``).
        keypoint_heads: compare the keypoint heads on 10 / 100 rois (False when the two were
            timed in different precisions).

    Returns:
        ``{"speedup": totals, "network_speedup": networks}``, plus ``train_speedup`` and
        ``keypoint_head_speedup`` (``{count: ratio}``) where both records have the figure.
    """
    def ratio(a, b):
        return a["median"] / b["median"]
    out = {"speedup": ratio(peer["total_s"], m["total_s"]),
           "network_speedup": ratio(peer["network_s"], m["network_s"])}
    if "train_step_s" in peer and "train_step_s" in m:
        out["train_speedup"] = ratio(peer["train_step_s"], m["train_step_s"])
    theirs = peer.get("keypoint_head_per_rois", {}) if keypoint_heads else {}
    kp = {c: ratio(theirs[c], s) for c, s in m.get("keypoint_head_per_rois", {}).items()
          if c in theirs}
    if kp:
        out["keypoint_head_speedup"] = kp
    return out


def _peer_lines(peer, result, settings):
    """The table lines of ``result[peer]`` and the speedups (``result``'s top-level ratios)."""
    ps, rec = settings.get(peer, {}), result[peer]
    lines = ["%s %s: %s" % (peer, ps.get("model", ""), ", ".join(
        "%s=%s" % kv for kv in ps.items() if kv[0] != "model"))]
    lines.append(_row("%s network" % peer, rec["network_s"]))
    lines.append(_row("%s %s" % (peer, _PASTE_NAMES.get(peer, "paste")), rec["paste_s"]))
    lines.append(_row("%s total" % peer, rec["total_s"]))
    if "detections_per_image" in rec:
        lines.append("%s detections/image %.0f" % (peer, rec["detections_per_image"]))
    if "gmac" in rec:
        lines.append("%s network %.2f GMAC (%s): %.1f GFLOP/s" % (
            peer, rec["gmac"], ", ".join("%s %.2f" % kv for kv in rec["gmac_stages"].items()),
            rec["gflop_per_s"]))
    gmacs = rec.get("keypoint_head_gmac_per_rois", {})
    for count, s in rec.get("keypoint_head_per_rois", {}).items():
        note = ("   %7.2f GMAC, %.1f GFLOP/s" % (gmacs[count], 2 * gmacs[count] / s["median"])
                if count in gmacs else "")
        lines.append(_row("%s keypoint %s rois" % (peer, count), s, note))
    if "train_step_s" in rec:
        note = "   (%.2f images/s" % rec["train_images_per_s"]
        if "rpn_targets_s" in rec:
            note += "; RPN targets %.3f s of it" % rec["rpn_targets_s"]["median"]
        lines.append(_row("%s train step" % peer, rec["train_step_s"], note + ")"))
    line = "speedup (%s / mxmask median): inference %.2fx (networks alone %.2fx)" % (
        peer, result["speedup"], result["network_speedup"])
    if "train_speedup" in result:
        line += ", train step %.2fx" % result["train_speedup"]
    for count, r in result.get("keypoint_head_speedup", {}).items():
        line += ", keypoint head %s rois %.2fx" % (count, r)
    lines.append(line)
    return lines


def format_table(result, settings):
    flat = [(k, v) for k, v in settings.items() if not isinstance(v, dict)]
    lines = ["mxmask bench: %s" % ", ".join("%s=%s" % kv for kv in flat),
             "%-*s %9s %9s %9s" % (_NAME_WIDTH, "stage", "median s", "min s", "max s")]
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
    for peer in PEERS:
        if peer in result:
            lines.extend(_peer_lines(peer, result, settings))
    if "resnet50" in result:
        r = result["resnet50"]
        lines.append(_row("resnet50 fp32", r["plain_s"], "   %7.2f GMAC, %.1f GFLOP/s"
                          % (r["gmac"], r["gflop_per_s"]["plain"])))
        lines.append(_row("resnet50 mkldnn", r["mkldnn_s"], "   %7.2f GMAC, %.1f GFLOP/s"
                          % (r["gmac"], r["gflop_per_s"]["mkldnn"])))
    return "\n".join(lines)


def write_chart(path, result, settings):
    """A horizontal bar chart (PNG) of mxmask's stage medians (min-max as error bars), its total
    and, when present, the peer's (GluonCV's or torchvision's) total, titled with preset, size
    and dtype. The stages are those of the plain fp32 network; with --fuse / --dtype bfloat16
    the plain total and the optimised total are both drawn, each named."""
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
    for peer in PEERS:
        if peer in result:
            bars.append(("%s total" % peer, result[peer]["total_s"], "#dd8452"))
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
              against=None, resnet50=False, chart_path=None, kernels="auto", torch_python=None,
              out=print):
    """``mxmask bench`` (module docstring): times, prints the table and returns the record;
    ``torch_python`` is the interpreter of ``against="torchvision"`` (None:
    ``MXMASK_TORCH_PYTHON``)."""
    check_dtype(dtype)
    if against not in (None,) + PEERS:
        raise UserError("--against %s: expected one of %s" % (against, ", ".join(PEERS)))
    if runs < 1 or warmup < 0:
        raise UserError("--runs must be at least 1 and --warmup at least 0")
    if against == "gluoncv" and batch != 1:
        raise UserError("--against gluoncv: GluonCV's Mask R-CNN infers one image at a time; "
                        "use --batch 1")
    if against == "gluoncv" or resnet50:         # checked before any network is built
        from .convert.common import import_gluoncv
        import_gluoncv("mxmask bench --against gluoncv" if against == "gluoncv"
                       else "mxmask bench --resnet50")
    if against == "torchvision":                 # checked before any network is built
        from .convert.torch_python import find_torch_python
        torch_python, _ = find_torch_python(torch_python, "mxmask bench --against torchvision")
    hw = parse_size(size)
    if against:
        overrides = list(overrides) + ["test.flip=false"]    # neither peer has test-time flip
    cfg, net = build_bench_model(preset, ckpt, overrides, kernels=kernels)
    arch = torchvision_arch(cfg) if against == "torchvision" else None
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
    elif against == "torchvision":      # after mxmask's timings: the two never run together
        result["torchvision"], settings["torchvision"] = bench_torchvision(
            torch_python, arch, cfg, hw, batch, runs, warmup, train, dtype,
            train_dtype=settings.get("train_amp"))
    if against:
        # mxmask's keypoint heads on 10 / 100 rois are timed in the plain fp32 network (as its
        # stages), torchvision's in --dtype: their ratio only in fp32
        result.update(peer_ratios(m, result[against], keypoint_heads=dtype == "float32"))
    if resnet50 or against == "gluoncv":
        result["resnet50"] = bench_resnet50(hw, batch, runs, warmup)
    out(format_table(result, settings))
    if json_path:
        atomic_write_json(json_path, result, indent=1)
    if chart_path:
        write_chart(chart_path, result, settings)
    return result

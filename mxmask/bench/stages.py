"""mxmask's own timings: the network stage by stage, the keypoint head, a training step.

    net = build_bench_model("mask_rcnn_r50_fpn")                 # random weights, or a ckpt
    record = bench_inference(cfg, net, (800, 1344), runs=5)      # stage medians, GMAC, paste
    record = bench_train_step(cfg, net, (512, 512), runs=3)      # one RCNNLoss step + update

In: a config and its network (kernels ``auto``: the compiled CPU operators where they load), an
input size (H, W) rounded up to multiples of 32 (:func:`bench_input_size`), the batch, runs and
warm-up runs. Out: records of ``{"median", "min", "max"}`` seconds per stage (backbone+fpn,
rpn+proposals, box_head+nms, mask_head / keypoint_head, paste/decode, total), each stage's
multiply-accumulates (:func:`count_network_macs`), detections per image and peak memory.

The input is random normal data; class 0's logit is raised so that every image yields
``test.max_dets`` detections, the work a trained model does. Each stage is its own hybridized
block fed the previous stage's outputs, so a stage's time is its own. docs/benchmarks.md says
what each figure holds and how to read it.
"""
import resource
import time
import warnings

import mxnet as mx
import numpy as np

from ..config import check_config, get_config
from ..engine.checkpoint import checkpoint_files, load_checkpoint_config
from ..graph import parse_hw
from ..modeling.poolers import shared_level_canvas
from ..modeling.rcnn import build_model, inference_kernels
from ..modeling.roi_heads import head_inputs, select_class_masks
from ..postprocess import detections_to_coco
from ..quantize import quantized_block
from ..utils import UserError

__all__ = ["bench_input_size", "stats", "timed", "build_bench_model", "bench_inference",
           "bench_input", "stage_calls", "bench_int8_stages", "KEYPOINT_ROIS",
           "keypoint_head_boxes", "bench_keypoint_head_rois",
           "stage_mac_groups", "gmac_record", "count_network_macs", "synthetic_train_batch",
           "bench_train_step", "bench_optimized"]


def bench_input_size(text):
    """The bench input size of ``--size``.

    Args:
        text: ``"HxW"``.

    Returns:
        (H, W) rounded up to multiples of 32.

    Raises:
        UserError: naming ``--size`` when it is not ``HxW`` of positive integers.
    """
    h, w = parse_hw(text)
    if h <= 0 or w <= 0:
        raise UserError("--size %s: height and width must be positive" % text)
    return -(-h // 32) * 32, -(-w // 32) * 32


def stats(times):
    """Summary of timed runs.

    Args:
        times: seconds of each run (at least one).

    Returns:
        ``{"median", "min", "max"}`` as floats.
    """
    times = sorted(times)
    return {"median": float(np.median(times)), "min": float(times[0]), "max": float(times[-1])}


def timed(fn, runs, warmup):
    """Call ``fn()`` ``warmup`` times untimed, then ``runs`` times timed, each call followed by
    ``mx.nd.waitall()`` so that MXNet's asynchronous work is counted.

    Args:
        fn: the work, no arguments.
        runs, warmup: timed and untimed calls.

    Returns:
        ``(last output, [seconds of each timed call])``.
    """
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


class _TimedDetections(mx.gluon.HybridBlock):
    """The box_head+nms stage: ``MaskRCNN.detections`` on the RPN's rois, one level canvas."""

    def __init__(self, net, **kwargs):
        super(_TimedDetections, self).__init__(**kwargs)
        self.net = net

    def hybrid_forward(self, F, im_info, rois, roi_scores, *features):
        with shared_level_canvas():         # the box head and the refine_boxes pass
            return self.net.detections(F, im_info, rois, roi_scores, *features)


class _TimedHead(mx.gluon.HybridBlock):
    """A mask or keypoint head stage on the detections (with ``num_classes``: the predicted
    class's mask plane)."""

    def __init__(self, head, num_classes=0, **kwargs):
        super(_TimedHead, self).__init__(**kwargs)
        self.head = head
        self.num_classes = num_classes

    def hybrid_forward(self, F, boxes, ids, *levels):
        out = self.head(boxes, *levels)
        if self.num_classes:
            return select_class_masks(F, out, ids, self.num_classes)
        return out


def build_bench_model(preset=None, ckpt=None, overrides=(), ctx=None, kernels="auto"):
    """The network ``mxmask bench`` times.

    Args:
        preset: preset name; the network gets random weights (seed ``cfg.seed``), 5 classes
            and 7 keypoints where the preset leaves them to the data, and class 0's classifier
            bias (column 1; column 0 is background) set to 10, so that every image yields
            ``test.max_dets`` detections.
        ckpt: a checkpoint folder instead, with its config and weights as they are.
        overrides: ``key=value`` config overrides.
        ctx: the context (default CPU).
        kernels: the in-process RoIAlign and NMS, as
            :meth:`mxmask.modeling.rcnn.MaskRCNN.use_kernels` takes them.

    Returns:
        ``(cfg, net)``: the config and the initialised ``MaskRCNN``.
    """
    ctx = ctx or mx.cpu()
    if ckpt:
        cfg = load_checkpoint_config(ckpt)
        for o in overrides:
            from ..config import set_value
            set_value(cfg, o)
        check_config(cfg)           # settings that conflict once the overrides are applied
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
    """Per-stage and end-to-end latency of ``net`` on :func:`bench_input`.

    Args:
        cfg: the network's config (``test.keypoint_decode``, ``test.mask_box_thresh``).
        net: a ``MaskRCNN``; hybridized here with ``static_alloc`` and ``static_shape``.
        size: (H, W) of the input.
        batch, runs, warmup: images per forward, timed and untimed runs.
        ctx: the context (default CPU).

    Returns:
        dict: ``total_s`` (network + paste/decode per run), ``network_s``, ``stages`` (stage
        name -> stats), each ``{"median", "min", "max"}`` seconds; ``detections_per_image``;
        ``peak_rss_mb`` (this process's peak resident memory); for keypoint presets the
        figures of :func:`bench_keypoint_head_rois`.
    """
    with warnings.catch_warnings():
        # a stage block holds the whole network but uses only its own part of it
        warnings.filterwarnings("ignore", message=".*is not used by any computation")
        # the stage blocks are traced with the network's kernels
        with inference_kernels(net.kernels):
            return _bench_inference(cfg, net, size, batch, runs, warmup, ctx)


def bench_input(size, batch=1, ctx=None):
    """The input every timed network gets.

    Args:
        size: (H, W).
        batch: images.
        ctx: the context (default CPU).

    Returns:
        ``(data, im_info)`` NDArrays: ``data`` (batch, 3, H, W) normal(0, 1) (seed 0), a
        normalised image; ``im_info`` (batch, 3) = (H, W, 1).
    """
    h, w = size
    rng = np.random.RandomState(0)
    data = mx.nd.array(rng.normal(0, 1, (batch, 3, h, w)), ctx=ctx or mx.cpu())
    im_info = mx.nd.array([[h, w, 1.0]] * batch, ctx=ctx or mx.cpu())
    return data, im_info


def stage_calls(net, data, im_info):
    """The stages of ``net``'s inference graph as blocks and their inputs, each stage's inputs
    the outputs of the stages before it (run once here).

    Args:
        net: a ``MaskRCNN`` (its kernels in force: :func:`bench_inference`'s block).
        data, im_info: the input, (B, 3, H, W) and (B, 3).

    Returns:
        ``(calls, levels)``: ``calls`` a list of ``(name, HybridBlock, inputs tuple)``:
        backbone+fpn, rpn+proposals, box_head+nms, then mask_head and keypoint_head when the
        network has them; ``levels`` the P2..P5 features the RoI heads pool.
    """
    calls = []

    def run(name, block, *inputs):
        if isinstance(block, (_TimedDetections, _TimedHead)):    # the others are net's own
            block.hybridize(static_alloc=True, static_shape=True)
        calls.append((name, block, inputs))
        return block(*inputs)

    features = run("backbone+fpn", net.backbone, data)
    rois, roi_scores = run("rpn+proposals", net.rpn, im_info, *features)
    ids, _, boxes = run("box_head+nms", _TimedDetections(net), im_info, rois, roi_scores,
                        *features)
    levels = net.roi_features(features)
    if net.mask_head is not None:
        run("mask_head", _TimedHead(net.mask_head, net.mask_head.num_classes), boxes, ids,
            *head_inputs(net.mask_head, levels, data))
    if net.keypoint_head is not None:
        run("keypoint_head", _TimedHead(net.keypoint_head), boxes, ids, *levels)
    return calls, levels


def bench_int8_stages(cfg, net, size, batch, runs, warmup):
    """The stages of :func:`stage_calls`, each quantized on its own
    (:func:`mxmask.quantize.quantized_block`, calibrated on its float32 inputs from the bench
    input) and timed: where the int8 graph's time goes. Each stage's int8 graph starts and
    ends in float32, so their sum is a little above the whole int8 graph's time.

    Args:
        cfg: the config (``test.int8``).
        net: the ``MaskRCNN``.
        size, batch, runs, warmup: as :func:`bench_inference`.

    Returns:
        ``{stage name: stats}``.
    """
    data, im_info = bench_input(size, batch)
    out = {}
    with warnings.catch_warnings(), inference_kernels(net.kernels):
        warnings.filterwarnings("ignore", message=".*is not used by any computation")
        for name, block, inputs in stage_calls(net, data, im_info)[0]:
            names = ["in%d" % i for i in range(len(inputs))]
            outs = block(*[mx.sym.var(n) for n in names])
            outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
            # each output through a float32 operator: a graph whose output is a quantized
            # convolution fails in MXNet 1.9.1 (bad_alloc, or an abort, when the block is built)
            sym = mx.sym.Group([mx.sym._internal._plus_scalar(o, scalar=0.0) for o in outs])
            qblock, _ = quantized_block(sym, block.collect_params(), [inputs], cfg.test.int8,
                                        input_names=names)
            _, times = timed(lambda: qblock(*inputs), runs, warmup)
            out[name] = stats(times)
    return out


def _bench_inference(cfg, net, size, batch, runs, warmup, ctx):
    """The body of :func:`bench_inference`, inside its warning filter and kernel block."""
    ctx = ctx or mx.cpu()
    h, w = size
    data, im_info = bench_input(size, batch, ctx)
    net.hybridize(static_alloc=True, static_shape=True)
    _, network = timed(lambda: net(data, im_info), runs, warmup)
    outputs = net(data, im_info)
    names = list(net.output_names)

    stages = {}
    calls, levels = stage_calls(net, data, im_info)
    for name, block, inputs in calls:
        _, stages[name] = timed(lambda: block(*inputs), runs, warmup)

    arrays = [o.asnumpy() for o in outputs]
    num_dets = int((arrays[0] >= 0).sum())

    def post():
        for i in range(batch):
            out = {n: a[i] for n, a in zip(names, arrays)}
            detections_to_coco(out, np.array([h, w, 1.0]), (h, w), i,
                               list(range(1, net.num_classes + 1)),
                               keypoint_decode=cfg.test.keypoint_decode,
                               mask_box_thresh=cfg.test.mask_box_thresh)
    _, stages["paste/decode"] = timed(post, runs, 1)
    total = [t + p for t, p in zip(network, stages["paste/decode"])]
    result = {"total_s": stats(total), "network_s": stats(network),
              "stages": {k: stats(v) for k, v in stages.items()},
              "detections_per_image": num_dets / float(batch)}
    if net.keypoint_head is not None:
        result.update(bench_keypoint_head_rois(net, levels, size, KEYPOINT_ROIS, runs, warmup))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return result


# the roi counts the keypoint head is timed on, alone (bench_keypoint_head_rois)
KEYPOINT_ROIS = (10, 100)


def _random_boxes(rng, count, size):
    """(1, count, 4) boxes inside an image of ``size`` = (h, w), 8 px to half the image."""
    h, w = size
    bw = rng.uniform(8, max(9, w / 2), count)
    bh = rng.uniform(8, max(9, h / 2), count)
    x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    return np.stack([x1, y1, x1 + bw, y1 + bh], axis=1)[None].astype(np.float32)


def keypoint_head_boxes(size, counts=KEYPOINT_ROIS):
    """The rois the keypoint head is timed on (seed 1; the torchvision comparison gets the same
    boxes).

    Args:
        size: (h, w) of the image the boxes lie in.
        counts: roi counts.

    Returns:
        ``{count: (1, count, 4) float32 xyxy boxes}``, 8 px to half the image on each side.
    """
    rng = np.random.RandomState(1)
    return {count: _random_boxes(rng, count, size) for count in counts}


def bench_keypoint_head_rois(net, levels, size, counts=KEYPOINT_ROIS, runs=5, warmup=2):
    """The keypoint head stage (RoIAlign + head) on exactly ``count`` rois of the first image:
    the cost a deployment pays per detection that needs keypoints.

    Args:
        net: a ``MaskRCNN`` with a keypoint head.
        levels: P2..P5, each (B, C, H_l, W_l); only the first image is used.
        size: (h, w) of the input, for :func:`keypoint_head_boxes`.
        counts, runs, warmup: roi counts, timed and untimed runs.

    Returns:
        ``{"keypoint_head_per_rois": {"10": stats, ...}, "keypoint_head_gmac_per_rois":
        {"10": GMAC, ...}}``, keyed by the count as a string.
    """
    from ..flops import count_block_macs
    ctx = levels[0].context
    first = [lvl[0:1] for lvl in levels]
    times, gmacs = {}, {}
    for count, array in keypoint_head_boxes(size, counts).items():
        boxes = mx.nd.array(array, ctx=ctx)
        ids = mx.nd.zeros((1, count), ctx=ctx)
        stage = _TimedHead(net.keypoint_head)
        stage.hybridize(static_alloc=True, static_shape=True)
        _, t = timed(lambda: stage(boxes, ids, *first), runs, warmup)
        times[str(count)] = stats(t)
        shapes = {"boxes": boxes.shape, "ids": ids.shape}
        shapes.update({"p%d" % (i + 2): lvl.shape for i, lvl in enumerate(first)})
        gmacs[str(count)] = count_block_macs(stage, shapes)["total"] / 1e9
    return {"keypoint_head_per_rois": times, "keypoint_head_gmac_per_rois": gmacs}


def stage_mac_groups(net):
    """The groups :func:`mxmask.flops.count_macs` counts a MaskRCNN's stages by.

    Args:
        net: a ``MaskRCNN``.

    Returns:
        ``{stage: block prefixes + parameter names}`` for backbone+fpn, rpn+proposals,
        box_head+nms and the mask / keypoint head when present (the prefix also catches layers
        whose weight is computed in the graph, such as the keypoint head's bilinear upsampling
        deconvolution).
    """
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


def gmac_record(macs, median_s):
    """The arithmetic fields of a bench record.

    Args:
        macs: a :func:`mxmask.flops.count_macs` result (``{"total", "by_group"}``).
        median_s: the median seconds of the network the MACs belong to.

    Returns:
        ``{"gmac", "gmac_stages": {stage: GMAC}, "gflop_per_s": 2 * MACs / median_s / 1e9}``.
    """
    return {"gmac": macs["total"] / 1e9,
            "gmac_stages": {k: v / 1e9 for k, v in macs["by_group"].items()},
            "gflop_per_s": 2.0 * macs["total"] / median_s / 1e9}


def count_network_macs(net, size, batch=1):
    """Multiply-accumulates of the plain inference graph at the bench input's shapes.

    Args:
        net: a ``MaskRCNN``.
        size: (H, W) of the input.
        batch: images.

    Returns:
        :func:`mxmask.flops.count_macs` of ``network_symbol(net)``, grouped by
        :func:`stage_mac_groups`; the RoI heads count the graph's fixed roi counts.
    """
    from ..graph import network_symbol
    from ..flops import count_macs
    h, w = size
    params = {p.name: p.shape for p in net.collect_params().values()}
    return count_macs(network_symbol(net), {"data": (batch, 3, h, w), "im_info": (batch, 3)},
                      stage_mac_groups(net), params)


def synthetic_train_batch(cfg, size, batch, objects=2, seed=0):
    """The synthetic training batch every timed training step gets (GluonCV's and
    torchvision's too).

    Args:
        cfg: the config (``model.num_keypoints``).
        size: (h, w) of the images.
        batch: images.
        objects: gt instances per image.
        seed: numpy seed.

    Returns:
        dict of numpy float32 arrays (``gt_masks`` too) in the layout of a training batch
        (DEVELOPING.md, "Training batches"): ``data`` (B, 3, h, w) normal(0, 1), ``im_info``
        (B, 3), ``gt_boxes`` (B, objects, 4) xyxy of 0.2 to 0.5 of the image side,
        ``gt_labels`` (B, objects) all 0, ``gt_crowd`` (B, 1, 4) padding, ``gt_masks``
        (B, objects, h, w) the boxes filled with 1, ``gt_keypoints`` (B, objects, K, 3)
        visible points inside the boxes (K at least 1).
    """
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
    """Seconds per training step on :func:`synthetic_train_batch`: ``RCNNLoss`` forward,
    backward and an SGD update (lr 1e-4, momentum 0.9, weight decay 1e-4) of the trainable
    parameters.

    Args:
        cfg: the config (``solver.amp`` sets the convolutions' precision).
        net: the ``MaskRCNN`` whose weights the step updates.
        size, batch, runs, warmup: (h, w), images, timed and untimed steps.
        ctx: the context (default CPU).

    Returns:
        ``{"train_step_s": stats, "train_images_per_s": batch / median, "train_amp": the
        precision RCNNLoss resolved solver.amp to ("float32" when none)}``.
    """
    from mxnet import autograd, gluon
    from ..modeling.training import RCNNLoss
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
    _, times = timed(step, runs, warmup)
    return {"train_step_s": stats(times), "train_images_per_s": batch / float(np.median(times)),
            "train_amp": loss_net.amp or "float32"}


def bench_optimized(net, size, batch, fuse, dtype, runs, warmup, cfg=None):
    """End-to-end latency of the exported graph, bfloat16-converted and/or MKLDNN-fused, or
    quantized to int8 (:func:`mxmask.graph.optimized_block`).

    bfloat16 and fused graphs hold MXNet's own operators, as an export does; the int8 graph
    keeps ``net``'s kernels, as ``mxmask predict --dtype int8`` runs it (the compiled RoIAlign
    and NMS where they load).

    Args:
        net: the ``MaskRCNN`` whose graph and parameters are taken.
        size, batch: (H, W) and images of :func:`bench_input`.
        fuse, dtype: MKLDNN fusion; ``float32``, ``bfloat16`` or ``int8``.
        runs, warmup: timed and untimed runs.
        cfg: int8: the config; calibrated on ``test.int8.calib_images`` when set
            (:func:`mxmask.quantize.calibration_batches`), else on the bench input.

    Returns:
        ``(stats, record)``: stats (``{"median", "min", "max"}`` seconds) and
        :func:`mxmask.graph.optimized_block`'s record plus ``detections_per_image`` and, for
        int8, ``calibrated_on``.
    """
    from ..graph import network_symbol, optimized_block
    data, im_info = bench_input(size, batch)
    calib, source = None, None
    if dtype == "int8":
        if cfg.test.int8.calib_images:
            from ..quantize import calibration_batches
            calib, source = calibration_batches(cfg), cfg.test.int8.calib_images
        else:
            calib, source = [bench_input(size, 1)], "the bench input"
    kernels = net.kernels if dtype == "int8" else "mxnet"
    block, record = optimized_block(network_symbol(net, kernels), net.collect_params(), data,
                                    im_info, fuse, dtype, calib, cfg.test.int8 if cfg else None)
    outs, times = timed(lambda: block(data, im_info), runs, warmup)
    record = dict(record, detections_per_image=float((outs[0] >= 0).sum().asscalar()) / batch)
    if source:
        record["calibrated_on"] = source
    return stats(times), record

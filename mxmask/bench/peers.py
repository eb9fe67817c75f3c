"""The peers ``mxmask bench --against`` times in the same run: GluonCV and torchvision.

    bench_gluoncv(cfg, (800, 1344))                         -> GluonCV's record (this process)
    bench_torchvision(python, arch, cfg, (800, 1344), ...)  -> torchvision's (a subprocess)
    bench_resnet50((800, 1344))                             -> the ResNet-50 convolution floor

In: mxmask's config, the input size, batch, runs and warm-up runs. Out: records in the layout
of :mod:`mxmask.bench.stages` (``network_s``, ``paste_s``, ``total_s``, ``train_step_s``, ...).
GluonCV's ``mask_rcnn_fpn_resnet50_v1b_coco`` runs in this process with its CPU RoIAlign bug
worked around (:mod:`mxmask.convert.gluoncv_reference`). torchvision runs in the torch
interpreter the user names (``--torch-python``, ``MXMASK_TORCH_PYTHON``), after mxmask's timings,
on mxmask's own arrays (:mod:`mxmask.convert.torchvision_reference`, verb ``time``).
"""
import os
import warnings

import mxnet as mx
import numpy as np

from ..utils import UserError
from .stages import (bench_input, gmac_record, keypoint_head_boxes, stats,
                     synthetic_train_batch, timed)

__all__ = ["bench_gluoncv", "torchvision_arch", "torch_threads", "TORCHVISION_RECORD_KEYS",
           "bench_torchvision", "bench_resnet50", "PEERS"]


def bench_gluoncv(cfg, size, batch=1, runs=5, warmup=2, train=False, ctx=None):
    """GluonCV's ``mask_rcnn_fpn_resnet50_v1b_coco`` timed in this process on the bench input.

    Matched to mxmask's side: random weights, hybridized (``static_alloc``, ``static_shape``),
    ``test.max_dets`` detections per image (GluonCV keeps its own 1000 RPN test proposals and
    80 classes), the same runs and warm-up. Its CPU RoIAlign bug is worked around with
    :func:`mxmask.convert.gluoncv_reference.pyramid_roi_feats_masked`, which does GluonCV's own
    RoIAlign work. Its paste is GluonCV's COCO evaluation post-processing
    (:func:`~mxmask.convert.gluoncv_reference.gluoncv_postprocess`: ``mask.fill`` and an RLE
    per detection), the counterpart of mxmask's paste/decode. Its training step
    (:class:`~mxmask.convert.gluoncv_reference.GluonCVTrainStep`) includes the RPN anchor
    targets GluonCV computes in its data loader, since mxmask computes them in its graph.

    Args:
        cfg: mxmask's config (``test.max_dets``; the synthetic batch's keypoints).
        size: (H, W) of the input.
        batch: must be 1, GluonCV's inference graph takes one image (:func:`run_bench` checks
            it up front).
        runs, warmup: timed and untimed runs.
        train: also time a training step on :func:`synthetic_train_batch`.
        ctx: the context (default CPU).

    Returns:
        ``(record, settings)``: ``total_s``, ``network_s``, ``paste_s`` (stats in seconds),
        ``detections_per_image``, ``gmac``, ``gmac_stages``, ``gflop_per_s``, and with
        ``train`` ``train_step_s``, ``train_images_per_s`` and ``rpn_targets_s`` (the anchor
        targets alone); the settings name the model, its detections and RPN proposals, the
        RoIAlign workaround and the hybridization.
    """
    from ..convert.gluoncv_reference import (MODEL_NAME, GluonCVTrainStep, build_gluoncv_mask_rcnn,
                                            gluoncv_postprocess, mac_groups)
    from ..flops import count_macs
    ctx = ctx or mx.cpu()
    h, w = size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # GluonCV's deprecation and constant warnings
        g = build_gluoncv_mask_rcnn(max_dets=cfg.test.max_dets, batch=batch, ctx=ctx)
        data, _ = bench_input(size, batch, ctx)
        g.hybridize(static_alloc=True, static_shape=True)
        _, network = timed(lambda: g(data), runs, warmup)
        ids, scores, boxes, masks = [o.asnumpy()[0] for o in g(data)]
        _, paste = timed(lambda: gluoncv_postprocess(ids, scores, boxes, masks, h, w), runs, 1)
        with mx.autograd.predict_mode():
            sym = mx.sym.Group(list(g(mx.sym.var("data"))))
        macs = count_macs(sym, {"data": (batch, 3, h, w)}, mac_groups(g),
                          {p.name: p.shape for p in g.collect_params().values()})
        record = {"total_s": stats([a + b for a, b in zip(network, paste)]),
                  "network_s": stats(network), "paste_s": stats(paste),
                  "detections_per_image": float((ids >= 0).sum())}
        record.update(gmac_record(macs, record["network_s"]["median"]))
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
            _, times = timed(lambda: step.step(batch_np, arrays), runs, max(1, warmup))
            _, target_times = timed(lambda: step.rpn_targets(batch_np), runs, 0)
            record.update({"train_step_s": stats(times),
                           "train_images_per_s": batch / float(np.median(times)),
                           "rpn_targets_s": stats(target_times)})
    return record, settings


def torchvision_arch(cfg):
    """The torchvision network an mxmask config is compared with.

    Args:
        cfg: mxmask's config.

    Returns:
        ``maskrcnn_resnet50_fpn`` when ``model.mask_on``, else ``keypointrcnn_resnet50_fpn``
        with ``model.keypoint_on``.

    Raises:
        UserError: neither masks nor keypoints, or a keypoint config without 17 keypoints.
    """
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
    """The thread count the torch side gets.

    Returns:
        mxmask's ``OMP_NUM_THREADS`` (``import mxmask`` sets it to the usable cores unless the
        user set it), else the usable cores.
    """
    from .. import usable_cores
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return usable_cores()


# what the torch program's record must hold (train_step_s and train_images_per_s with --train)
TORCHVISION_RECORD_KEYS = ("network_s", "paste_s", "total_s", "detections_per_image", "gmac",
                           "gmac_stages")


def bench_torchvision(python, arch, cfg, size, batch=1, runs=5, warmup=2, train=False,
                      dtype="float32", threads=None, train_dtype=None):
    """torchvision's ``arch`` timed by ``python`` on mxmask's bench arrays, after mxmask's
    timings (the two never run at the same time).

    The arrays (the bench input, the synthetic training batch, the keypoint-head boxes) go to
    the torch program (``torchvision_reference.py time``) in a temporary npz. Matched to
    mxmask's side: random weights, ``test.max_dets`` detections with score threshold 0 (its
    heads see all of them), no test-time flip, the same runs and warm-up, mxmask's thread
    count. Its network is timed on the normalised tensor through backbone, RPN and RoI heads
    (GeneralizedRCNNTransform bypassed, as mxmask's network gets no resize); its paste is the
    transform's ``postprocess`` (no RLE); its keypoint head runs on mxmask's boxes, in
    ``dtype``.

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
    from ..convert.torch_python import run_reference_json
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


def bench_resnet50(size, batch=1, runs=5, warmup=2, ctx=None, int8=False):
    """GluonCV's ``resnet50_v1b`` (random weights, 1000 classes) on the bench input, hybridized
    plain and after ``optimize_for(x, backend="MKLDNN")``: the rate a well-optimised plain CNN
    reaches on this machine, to read the detector's GFLOP/s against.

    Args:
        size, batch: (H, W) and images of :func:`bench_input`.
        runs, warmup: timed and untimed runs.
        ctx: the context (default CPU).
        int8: also its int8 graph (:func:`mxmask.quantize.quantized_block`, naive calibration
            on the bench input): the int8 floor.

    Returns:
        ``{"gmac", "plain_s": stats, "mkldnn_s": stats, "gflop_per_s": {"plain", "mkldnn"}}``,
        with ``int8`` also ``"int8_s"`` and ``gflop_per_s["int8"]`` (int8 operations counted
        as FLOPs).
    """
    from gluoncv.model_zoo import resnet50_v1b
    from ..flops import count_block_macs
    ctx = ctx or mx.cpu()
    data, _ = bench_input(size, batch, ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = resnet50_v1b(pretrained=False)
        net.initialize(ctx=ctx)
        net.hybridize(static_alloc=True, static_shape=True)
        _, plain = timed(lambda: net(data), runs, warmup)
        macs = count_block_macs(net, {"data": data.shape})["total"]
        net.optimize_for(data, backend="MKLDNN", static_alloc=True, static_shape=True)
        _, fused = timed(lambda: net(data), runs, warmup)
        times = {"plain": stats(plain), "mkldnn": stats(fused)}
        if int8:
            times["int8"] = stats(_resnet50_int8_times(net, data, runs, warmup))
    record = {"gmac": macs / 1e9, "gflop_per_s": {}}
    for name, s in times.items():
        record["%s_s" % name] = s
        record["gflop_per_s"][name] = 2.0 * macs / s["median"] / 1e9
    return record


def _resnet50_int8_times(net, data, runs, warmup):
    """Seconds of ``net``'s int8 graph on ``data`` (calibrated on it), one per timed run."""
    from ..quantize import quantized_block
    from ..config import Int8Config
    sym = net(mx.sym.var("data"))
    block, _ = quantized_block(sym, net.collect_params(), [(data,)], Int8Config())
    return timed(lambda: block(data), runs, warmup)[1]


# the values of --against
PEERS = ("gluoncv", "torchvision")

"""``mxmask export``: a checkpoint as a self-contained MXNet graph that needs no mxmask to run.

    export_checkpoint("runs/shapes", "export/shapes")                  # plain fp32 graph
    export_checkpoint("runs/shapes", "export/shapes", fuse=True)       # MKLDNN-fused fp32
    export_checkpoint(ckpt, prefix, fuse=True, dtype="bfloat16")       # bf16, then fused
    export_checkpoint(ckpt, prefix, dtype="int8")                      # calibrated int8

What goes in: a checkpoint folder (``config.yaml`` + weights, see :mod:`mxmask.engine.checkpoint`).
What comes out, for ``PREFIX``:

    PREFIX-symbol.json    the inference graph (:func:`mxmask.graph.network_symbol`): inputs
                          ``data`` (B, 3, H, W) normalised RGB and ``im_info`` (B, 3) =
                          (h, w, scale), outputs as in DEVELOPING.md, "Network outputs"
    PREFIX-0000.params    every weight plus the anchor constants (``arg:``/``aux:`` keys, as
                          ``HybridBlock.export`` writes them)
    PREFIX-config.yaml    the checkpoint's full config
    PREFIX-meta.json      what a program needs to run the graph without mxmask (:func:`export_meta`)

It loads with ``mx.gluon.SymbolBlock.imports`` (:func:`import_exported`) and gives the Gluon
model's outputs; before the files appear, :func:`export_checkpoint` checks that it does. An int8
export holds its calibrated scales in the graph (:mod:`mxmask.quantize`), so it runs with MXNet
alone too.
docs/export.md is the user's page.
"""
import contextlib
import os
import shutil
import tempfile
import warnings

import numpy as np

from .graph import (INPUT_NAMES, build_export_net, check_anchors_cover, check_dtype,
                    graph_json_text, network_symbol, optimized_block, param_dict, parse_hw)
from .utils import UserError, atomic_write_json, atomic_write_text

__all__ = ["EXPORT_SUFFIXES", "export_checkpoint", "export_meta", "export_input_size",
           "import_exported", "compare_outputs"]

# the files of an export, PREFIX + suffix
EXPORT_SUFFIXES = ("-symbol.json", "-0000.params", "-config.yaml", "-meta.json")

# the meta file's "format" and "version" fields
META_FORMAT = "mxmask-export"
META_VERSION = 1
_CHECK_SIDE_CAP = 512            # the default check input is at most 512 x 512
# the int8 check also counts the reference's detections scoring at least this
TOP_SCORE = 0.5


# --------------------------------------------------------------------------------------------
# Export of a checkpoint
# --------------------------------------------------------------------------------------------
def export_input_size(text, cfg):
    """The example input size of ``--size``.

    Args:
        text: ``"HxW"``.
        cfg: the checkpoint's config.

    Returns:
        (H, W), positive multiples of ``input.size_divisibility`` that the anchor constants
        cover.

    Raises:
        UserError: naming ``--size`` otherwise.
    """
    h, w = parse_hw(text)
    div = max(int(cfg.input.size_divisibility), 1)
    if h <= 0 or w <= 0 or h % div or w % div:
        raise UserError("--size %s: height and width must be positive multiples of %d "
                        "(input.size_divisibility)" % (text, div))
    check_anchors_cover(text, (h, w), cfg)
    return h, w


def _default_check_size(cfg):
    """The default example input: a square of ``input.min_size_test`` capped at 512 and at the
    anchors' extent, rounded up to ``input.size_divisibility``."""
    from .modeling.rpn import anchor_max_size
    div = max(int(cfg.input.size_divisibility), 1)
    side = min(int(cfg.input.min_size_test), _CHECK_SIDE_CAP, anchor_max_size(cfg))
    side = max(-(-side // div) * div, div)
    return side, side


def _example_inputs(size, seed=0):
    """Random normalised data (1, 3, H, W) and im_info (1, 3) with the full size valid."""
    import mxnet as mx
    h, w = size
    rng = np.random.RandomState(seed)
    data = mx.nd.array(rng.randn(1, 3, h, w).astype(np.float32))
    return data, mx.nd.array([[h, w, 1.0]])


def export_meta(cfg, output_names, dtype="float32", fused=False, example_size=None, int8=None):
    """The ``PREFIX-meta.json`` record: everything a program needs to run the exported graph
    without mxmask, reading it with the standard library's json (scripts/predict_exported.py
    does).

    Args:
        cfg: the checkpoint's config.
        output_names: the graph's output names (``net.output_names``).
        dtype, fused: how the graph was optimised.
        example_size: (H, W) of the example input the export was traced and checked with.
        int8: an int8 export's calibration record (:func:`mxmask.quantize.quantize_symbol`).

    Returns:
        dict: ``format``, ``version``, input and output names, ``dtype``, ``fused``,
        ``example_size``; the test-time input pipeline (``min_size_test``,
        ``max_size_test``, ``size_divisibility``, ``max_input_size`` the largest side the
        anchor constants cover, ``resize_rule``, ``resize_interp``, ``normalize``,
        ``pixel_mean``, ``pixel_std``); the labels (``num_classes``, ``class_names``,
        ``category_ids``, ``keypoint_names``, ``keypoint_category_ids``, ``skeleton``); and
        the post-processing (``box_plus_one``, ``score_thresh``, ``mask_thresh``,
        ``mask_box_thresh``, ``mask_paste``, ``keypoint_offset``, ``max_dets``); for int8,
        ``int8``: ``calib_mode``, ``calib_num``, ``calib_images``, ``calib_seed``,
        ``granularity``,
        ``float32_nodes`` and ``quantized_nodes`` (counts of convolution and fully connected
        layers).
    """
    from .modeling.rpn import anchor_max_size
    d, i, m, t = cfg.data, cfg.input, cfg.model, cfg.test
    return {
        "format": META_FORMAT, "version": META_VERSION,
        "inputs": list(INPUT_NAMES), "outputs": list(output_names),
        "dtype": dtype, "fused": bool(fused),
        "example_size": list(example_size) if example_size else None,
        "min_size_test": int(i.min_size_test), "max_size_test": int(i.max_size_test),
        "size_divisibility": int(i.size_divisibility), "max_input_size": anchor_max_size(cfg),
        "resize_rule": str(i.resize_rule), "resize_interp": str(i.resize_interp),
        "normalize": str(i.normalize),
        "pixel_mean": [float(v) for v in i.pixel_mean],
        "pixel_std": [float(v) for v in i.pixel_std],
        "num_classes": int(m.num_classes),
        "class_names": list(d.class_names), "category_ids": [int(c) for c in d.category_ids],
        "keypoint_names": list(d.keypoint_names),
        "keypoint_category_ids": [int(c) for c in d.keypoint_category_ids],
        "skeleton": [list(p) for p in d.skeleton],
        "box_plus_one": bool(m.box_plus_one),
        "score_thresh": float(t.score_thresh), "mask_thresh": float(t.mask_thresh),
        "mask_box_thresh": float(t.mask_box_thresh), "mask_paste": str(t.mask_paste),
        "keypoint_offset": float(d.keypoint_offset),
        "max_dets": int(t.max_dets),
        "int8": None if int8 is None else {
            "calib_mode": int8["calib_mode"], "calib_num": int(int8["calib_num"]),
            "calib_images": t.int8.calib_images or d.val_images,
            "calib_seed": int(t.int8.calib_seed), "granularity": int8["granularity"],
            "float32_nodes": list(int8["excluded"]), "quantized_nodes": len(int8["quantized"])},
    }


def _load_checkpoint(ckpt, overrides=()):
    """(cfg, MaskRCNN with the export prefix and the checkpoint's weights on the CPU)."""
    import mxnet as mx
    from .engine.checkpoint import checkpoint_files, load_checkpoint_config
    cfg = load_checkpoint_config(ckpt, overrides)
    folder = os.path.dirname(ckpt) if ckpt.endswith((".yaml", ".yml")) else ckpt
    params = checkpoint_files(folder)[0]
    net = build_export_net(cfg)
    try:
        net.load_parameters(params, ctx=mx.cpu())
    except (AssertionError, mx.base.MXNetError, OSError) as e:
        raise UserError("%s: does not match the network of its config (%s)"
                        % (params, str(e).strip().splitlines()[0][:300]))
    return cfg, net


def import_exported(prefix):
    """Load an export with MXNet alone.

    Args:
        prefix: the export's ``PREFIX``.

    Returns:
        ``mx.gluon.SymbolBlock.imports(PREFIX + "-symbol.json", ["data", "im_info"],
        PREFIX + "-0000.params")`` on the CPU (its warning about input types silenced). It
        takes any input size that is a multiple of ``input.size_divisibility`` up to the meta
        file's ``max_input_size``.
    """
    import mxnet as mx
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Cannot decide type")
        return mx.gluon.SymbolBlock.imports(prefix + "-symbol.json", list(INPUT_NAMES),
                                            prefix + "-0000.params", ctx=mx.cpu())


def _iou(a, b):
    """IoU matrix of xyxy boxes a (N, 4) and b (M, 4)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def compare_outputs(ref, got, names, iou=0.9, min_score=None):
    """Compare two lists of network outputs.

    Rows swap when scores are nearly tied, which moves whole boxes without any real difference,
    so besides the row-by-row differences the report has an order-free view.

    Args:
        ref, got: the outputs (NDArrays or arrays), ``ids`` (B, D), ``scores`` (B, D),
            ``boxes`` (B, D, 4), ...; equal shapes.
        names: their names, as in ``net.output_names`` (``ids``, ``scores`` and ``boxes``
            needed).
        iou: the IoU at which two detections of the same class match.
        min_score: only the reference's detections scoring at least this count for
            ``matched`` (default: every valid row).

    Returns:
        dict: per output name the largest absolute difference, row by row; ``ids_agree``, the
        fraction of detection rows with the same class id; ``matched``, the fraction of the
        reference's detections that have a detection of the same class with IoU >= ``iou``
        in ``got`` (per image), and over those pairs ``matched_score`` and ``matched_box``,
        the largest score and box-coordinate differences; ``reference_count`` and
        ``matched_count``, the counts behind ``matched``.

    Raises:
        RuntimeError: an output's shapes differ.
    """
    ref = [r.asnumpy() if hasattr(r, "asnumpy") else np.asarray(r) for r in ref]
    got = [g.asnumpy() if hasattr(g, "asnumpy") else np.asarray(g) for g in got]
    report = {}
    for name, r, g in zip(names, ref, got):
        if r.shape != g.shape:
            raise RuntimeError("output %s: shape %s, expected %s" % (name, g.shape, r.shape))
        report[name] = float(np.abs(r.astype(np.float64) - g.astype(np.float64)).max()) \
            if r.size else 0.0
    out = dict(zip(names, zip(ref, got)))
    (ri, gi), (rs, gs), (rb, gb) = out["ids"], out["scores"], out["boxes"]
    report["ids_agree"] = float((ri == gi).mean()) if ri.size else 1.0
    total = found = 0
    score_diff = box_diff = 0.0
    for b in range(ri.shape[0]):
        rv, gv = ri[b] >= 0, gi[b] >= 0
        if min_score is not None:
            rv &= rs[b] >= min_score
        total += int(rv.sum())
        if not rv.any() or not gv.any():
            continue
        ious = _iou(rb[b][rv].astype(np.float64), gb[b][gv].astype(np.float64))
        ious[ri[b][rv][:, None] != gi[b][gv][None, :]] = -1.0
        best = ious.argmax(axis=1)
        ok = ious[np.arange(len(best)), best] >= iou
        found += int(ok.sum())
        if ok.any():
            score_diff = max(score_diff, float(np.abs(
                rs[b][rv][ok].astype(np.float64) - gs[b][gv][best[ok]]).max()))
            box_diff = max(box_diff, float(np.abs(
                rb[b][rv][ok].astype(np.float64) - gb[b][gv][best[ok]]).max()))
    report["matched"] = float(found) / total if total else 1.0
    report["matched_score"] = score_diff
    report["matched_box"] = box_diff
    report["reference_count"], report["matched_count"] = total, found
    return report


@contextlib.contextmanager
def _write_errors(prefix):
    """MXNet's file writes fail with an MXNetError whose text holds a C++ traceback; turn it
    into a one-line UserError naming ``prefix`` and the reason (the message's last part)."""
    import mxnet as mx
    try:
        yield
    except mx.base.MXNetError as err:
        lines = str(err).strip().splitlines() or [""]
        reason = lines[-1].rsplit(": ", 1)[-1].strip() or type(err).__name__
        raise UserError("%s: the export could not be written: %s" % (prefix, reason)) from None


def export_checkpoint(ckpt, prefix, size=None, fuse=False, dtype="float32", check=True,
                      overrides=()):
    """Export checkpoint ``ckpt`` to ``PREFIX-{symbol.json,0000.params,config.yaml,meta.json}``.

    The graph is :func:`mxmask.graph.network_symbol` of the checkpoint's network; ``fuse`` and
    ``dtype`` go through :func:`mxmask.graph.optimized_block`. All files are written to a
    staging folder next to ``PREFIX`` and moved in together, so they replace an earlier export
    only when everything succeeded. The plain export is the Gluon model's graph, so its
    outputs are the model's.

    Args:
        ckpt: a checkpoint folder (or its ``config.yaml``).
        prefix: the output prefix (a file prefix such as ``export/model``, not a folder).
        size: (H, W) of the example input used to trace, partition (``fuse``) and check;
            default a square of ``input.min_size_test`` capped at 512. An int8 export is
            checked on its first calibration image instead, whose size is returned.
        fuse: MKLDNN subgraph fusion.
        dtype: ``float32``, ``bfloat16`` or ``int8`` (calibrated as the config's ``test.int8``
            says, :mod:`mxmask.quantize`).
        check: load the written files back with ``SymbolBlock.imports`` and run them against
            the Gluon model on the example input (:func:`compare_outputs`).
        overrides: ``key=value`` settings applied to the checkpoint's config (``test.*`` and
            the test-time input keys, :func:`mxmask.engine.checkpoint.load_checkpoint_config`).

    Returns:
        ``{"files": [the four paths], "check": the compare_outputs report or None, "size":
        (H, W), "check_outputs": the output names, "float32_nodes": [names of the nodes kept
        in float32 by bfloat16 or int8], "int8": the calibration record or None}``. An int8
        check's report also has ``top_count`` and ``top_matched``: the Gluon model's
        detections scoring at least :data:`TOP_SCORE`, and how many the export matches.

    Raises:
        UserError: a bad ``dtype``, ``prefix`` or checkpoint; int8: no readable calibration
        image, or a graph that cannot be quantized.
    """
    import mxnet as mx
    from .config import dump_yaml
    check_dtype(dtype)
    if not os.path.basename(prefix) or os.path.isdir(prefix):
        raise UserError("--out %s: expected a file prefix such as export/model (the files are "
                        "PREFIX-symbol.json, ...), not a folder" % prefix)
    cfg, net = _load_checkpoint(ckpt, overrides)
    size = tuple(size) if size else _default_check_size(cfg)
    sym = network_symbol(net)
    params = net.collect_params()
    data, im_info = _example_inputs(size)
    calib = None
    if dtype == "int8":
        from .quantize import calibration_batches
        calib = calibration_batches(cfg)
    record = {"float32_nodes": []}
    out_dir = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    tmp = os.path.join(staging, "model")
    try:
        if not fuse and dtype == "float32":
            atomic_write_text(tmp + "-symbol.json", graph_json_text(sym))
            with _write_errors(prefix):
                mx.nd.save(tmp + "-0000.params", param_dict(sym, params))
        else:
            block, record = optimized_block(sym, params, data, im_info, fuse, dtype, calib,
                                            cfg.test.int8)
            with _write_errors(prefix):
                block.export(tmp, remove_amp_cast=False)
        dump_yaml(cfg, tmp + "-config.yaml")
        int8 = record if dtype == "int8" else None
        atomic_write_json(tmp + "-meta.json", export_meta(
            cfg, net.output_names, dtype, fuse or dtype == "int8", size, int8), indent=1)
        report = None
        if check:
            if calib:                     # int8: a real image says more than noise
                data, im_info = calib[0]
                size = tuple(data.shape[2:])
            net.hybridize(static_alloc=True)
            ref = net(data, im_info)
            got = import_exported(tmp)(data, im_info)
            report = compare_outputs(ref, got, net.output_names)
            if calib:                     # int8: the confident detections, as users see them
                top = compare_outputs(ref, got, net.output_names, min_score=TOP_SCORE)
                report["top_count"], report["top_matched"] = (top["reference_count"],
                                                              top["matched_count"])
        files = []
        for suffix in EXPORT_SUFFIXES:
            os.replace(tmp + suffix, prefix + suffix)
            files.append(prefix + suffix)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"files": files, "check": report, "size": size, "check_outputs": net.output_names,
            "float32_nodes": record["float32_nodes"], "int8": int8}


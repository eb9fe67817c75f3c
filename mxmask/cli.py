"""The ``mxmask`` command: one verb per job (``data``, ``train``, ``eval``, ``predict``, ...).

Each verb parses its arguments here and calls one function in the package. A
:class:`~mxmask.utils.UserError` or :class:`~mxmask.config.ConfigError` becomes one line on
stderr and exit code 2, never a traceback; so does an OSError (a file that cannot be read or
written). Each verb checks its output paths before it builds a model or runs anything.
"""
import argparse
import os
import sys

from .config import ConfigError
from .graph import DTYPES
from .utils import UserError, check_output_dir, check_output_file, check_output_prefix


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def _cmd_data_shapes(args):
    from .data.shapes import generate_shapes
    check_output_dir(args.out, "data shapes OUT")
    summary = generate_shapes(args.out, num_train=args.train, num_val=args.val,
                              size=args.size, seed=args.seed)
    print("wrote the shapes dataset to %s" % args.out)
    for key, value in summary.items():
        print("  %s: %s" % (key, value))
    return 0


def _cmd_data_check(args):
    from .data.coco import run_check
    return run_check(args.ann, args.images)


def _add_data(sub):
    p = sub.add_parser("data", help="make or check datasets")
    dsub = p.add_subparsers(dest="data_cmd", metavar="{shapes,check}")
    dsub.required = True
    s = dsub.add_parser("shapes", help="generate the synthetic shapes dataset (COCO json + PNGs)")
    s.add_argument("out", help="output folder")
    s.add_argument("--train", type=int, default=400, help="training images (default 400)")
    s.add_argument("--val", type=int, default=50, help="validation images (default 50)")
    s.add_argument("--size", type=int, default=192, help="image short side in pixels (default 192)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.set_defaults(func=_cmd_data_shapes)
    c = dsub.add_parser("check", help="validate a COCO dataset: counts, skipped, problems")
    c.add_argument("ann", help="COCO annotation json")
    c.add_argument("--images", required=True, help="image folder")
    c.set_defaults(func=_cmd_data_check)


# --------------------------------------------------------------------------------------------
# contexts
# --------------------------------------------------------------------------------------------
def parse_ctx(text):
    """The contexts of ``--ctx``.

    The rule: ``cpu`` and ``cpu:0`` are one CPU context, ``cpu:N`` with N >= 1 is N CPU
    contexts (each batch split N ways, as over N GPUs); ``gpu:I,J`` are those GPUs (``gpu``:
    GPU 0), each of which must exist on this machine.

    Args:
        text: ``cpu``, ``cpu:N`` or ``gpu:I,J``.

    Returns:
        list of ``mx.Context``, never empty.

    Raises:
        UserError: naming ``--ctx`` when the text is malformed or a GPU does not exist.
    """
    import mxnet as mx
    kind, _, rest = text.strip().partition(":")
    kind = kind.lower()
    try:
        if kind == "cpu":
            num = int(rest) if rest.strip() else 1
            if num >= 0:
                return [mx.cpu(i) for i in range(max(num, 1))]
        elif kind == "gpu":
            ids = [int(x) for x in rest.split(",")] if rest.strip() else [0]
            if min(ids) >= 0 and len(set(ids)) == len(ids):
                try:
                    num = mx.context.num_gpus()
                except mx.base.MXNetError:   # a CUDA build without a driver
                    num = 0
                missing = [i for i in ids if i >= num]
                if missing:
                    raise UserError("--ctx %s: this machine has %d GPU(s); gpu %s does not exist"
                                    % (text, num, ",".join(map(str, missing))))
                return [mx.gpu(i) for i in ids]
    except ValueError:
        pass
    raise UserError("--ctx %s: expected cpu, cpu:N (N >= 0; cpu and cpu:0 are one CPU context, "
                    "N >= 1 N contexts) or gpu:I,J (distinct GPU ids >= 0)" % text)


# --------------------------------------------------------------------------------------------
# eval / predict
# --------------------------------------------------------------------------------------------
def _cmd_eval(args):
    """``mxmask eval``: score a checkpoint on its val set or on --ann/--images (optionally as one
    shard of several processes), or score a saved results json with --results."""
    def _print_metrics(metrics):
        for task, m in metrics.items():
            print("%-10s %s" % (task, "  ".join("%s %.3f" % (k, v) for k, v in m.items())))

    if args.images and not args.ann:
        raise UserError("eval --images needs --ann GT.json too")
    if args.results:
        from .engine.evaluator import evaluate_results
        if not args.ann:
            raise UserError("eval --results needs --ann GT.json")
        sigmas = args.sigmas
        if args.ckpt and not sigmas:          # the checkpoint's keypoint OKS sigmas
            from .engine.checkpoint import load_checkpoint_config
            sigmas = list(load_checkpoint_config(args.ckpt, args.set).test.keypoint_oks_sigmas) \
                or None
        out_dir = args.out_dir or args.ckpt or os.path.dirname(os.path.abspath(args.results))
        check_output_dir(out_dir, "--out-dir")
        metrics = evaluate_results(args.results, args.ann, kpt_oks_sigmas=sigmas,
                                   out_dir=out_dir, plots=args.plots)
        _print_metrics(metrics)
        print("metrics: %s" % os.path.join(out_dir, "metrics.json"))
        return 0
    if not args.ckpt:
        raise UserError("eval needs a checkpoint folder, or --results FILE --ann GT.json")
    if args.ann and not args.images:
        raise UserError("eval --ann needs --images DIR too")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1, got %d" % args.batch_size)
    if not args.gather_timeout > 0:
        raise UserError("--gather-timeout must be > 0 seconds, got %g" % args.gather_timeout)
    from .engine.inference import evaluate_on_dataset, parse_shard
    from .predictor import Predictor
    shard = parse_shard(args.shard) if args.shard else (0, 1)
    ctxs = parse_ctx(args.ctx)
    if not os.path.isdir(args.ckpt):
        raise UserError("%s: checkpoint folder not found" % args.ckpt)
    out_dir = check_output_dir(args.out_dir or args.ckpt, "--out-dir")
    results = check_output_file(args.out or os.path.join(out_dir, "results.json"), "--out")
    predictor = Predictor(args.ckpt, ctx=ctxs, fuse=args.fuse, dtype=args.dtype,
                          overrides=_overrides(args))
    cfg = predictor.cfg
    ann = args.ann or cfg.data.val_ann
    images = args.images or cfg.data.val_images
    if not args.ann and not os.path.exists(ann):
        s = cfg.data.shapes
        hint = ""
        if os.path.normpath(ann) == os.path.join(os.path.normpath(s.root), "annotations",
                                                 "val.json"):
            hint = " (make it with: mxmask data shapes %s --train %d --val %d --size %d " \
                   "--seed %d)" % (s.root, s.train, s.val, s.size, s.seed)
        raise UserError("%s: the checkpoint's validation json (data.val_ann) does not exist%s; "
                        "or pass --ann GT.json --images DIR" % (ann, hint))
    metrics = evaluate_on_dataset(predictor, ann, images, out_dir=out_dir, results_path=results,
                                  plots=args.plots, shard=shard,
                                  gather_timeout=args.gather_timeout,
                                  batch_size=args.batch_size, kpt_oks_sigmas=args.sigmas)
    if metrics is None:                   # a rank > 0 of a sharded evaluation
        print("shard %d/%d written to %s; rank 0 writes the metrics" % (shard + (out_dir,)))
        return 0
    _print_metrics(metrics)
    print("results: %s\nmetrics: %s" % (results, os.path.join(out_dir, "metrics.json")))
    return 0


def _add_eval(sub):
    p = sub.add_parser("eval", help="COCO metrics of a checkpoint, or of a saved results json",
                       description="Score CKPT on its validation set (or --ann/--images), or "
                                   "score a saved results json (--results R.json --ann GT.json)."
                                   " Prints the pycocotools tables and per-category AP, writes "
                                   "the results json and metrics.json.")
    p.add_argument("ckpt", nargs="?", help="checkpoint folder")
    p.add_argument("--ann", help="COCO json to evaluate on (default: the config's val set)")
    p.add_argument("--images", help="image folder of --ann")
    p.add_argument("--results", help="score this results json instead of running a model")
    p.add_argument("--out", help="where to write the results json (default OUT_DIR/results.json)")
    p.add_argument("--out-dir", help="where metrics.json, plots and shard files go (default: the "
                                     "checkpoint; with --results and no CKPT: the results' folder)")
    p.add_argument("--plots", action="store_true", help="write precision/recall curves (PNG)")
    p.add_argument("--sigmas", type=float, nargs="+", metavar="S",
                   help="keypoint OKS sigmas, one per keypoint (needed when K != 17 and the "
                        "checkpoint has no test.keypoint_oks_sigmas)")
    p.add_argument("--ctx", default="cpu", help="cpu, cpu:N or gpu:0,1 (default cpu)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per forward on each context (default 1)")
    p.add_argument("--shard", metavar="RANK/NUM",
                   help="run as process RANK of NUM: each processes images RANK::NUM and writes "
                        "OUT_DIR/results.rankRANK.json; rank 0 waits for the others, merges and "
                        "scores (all ranks need the same --out-dir)")
    p.add_argument("--gather-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long rank 0 waits for the other shards (default 600)")
    _add_graph_args(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_predict(args):
    from .predictor import Predictor
    check_output_file(args.out, "--out")
    for path, option in ((args.vis, "--vis"), (args.cutout, "--cutout")):
        if path:
            check_output_dir(path, option)
    predictor = Predictor(args.ckpt, ctx=parse_ctx(args.ctx), score_thresh=args.score_thresh,
                          fuse=args.fuse, dtype=args.dtype, overrides=_overrides(args))
    vis_thresh = args.score_thresh if args.score_thresh is not None else 0.5

    def on_image(path, image, entries):
        stem = os.path.splitext(os.path.basename(path))[0]
        if args.vis:
            from .vis import draw_instances
            draw_instances(image, entries, predictor.class_names,
                           predictor.cfg.data.skeleton, os.path.join(args.vis, stem + ".png"),
                           score_thresh=vis_thresh)
        if args.cutout:
            from .vis import write_cutouts
            write_cutouts(image, entries, args.cutout, stem, score_thresh=vis_thresh)
        print("%s: %d detections" % (path, len(entries)))

    from .predictor import list_images
    paths = list_images(args.inputs)
    if not paths:
        raise UserError("no image files in %s" % " ".join(args.inputs))
    results, failures = predictor.predict_paths(paths, on_image=on_image)
    from .utils import atomic_write_json
    atomic_write_json(args.out, results)
    print("results: %s (%d entries)" % (args.out, len(results)))
    for path, message in failures:
        print("mxmask: skipped %s" % message, file=sys.stderr)
    if failures:
        print("mxmask: error: %d of %d images could not be read: %s"
              % (len(failures), len(paths), ", ".join(p for p, _ in failures)), file=sys.stderr)
        return 1
    return 0


def _add_predict(sub):
    p = sub.add_parser("predict", help="detect, segment and find keypoints in images")
    p.add_argument("ckpt", help="checkpoint folder")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", default="results.json", help="COCO results json (default results.json)")
    p.add_argument("--vis", help="folder for pictures of the detections")
    p.add_argument("--cutout", help="folder for one RGBA PNG cut-out per instance")
    p.add_argument("--score-thresh", type=float, help="drop detections below this score")
    p.add_argument("--ctx", default="cpu", help="cpu (one CPU context) or gpu:I (default cpu)")
    _add_graph_args(p)
    p.set_defaults(func=_cmd_predict)


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
def _cmd_train(args):
    from .config import get_config
    from .train import run_training
    cfg = get_config(args.config, args.set)
    if args.out:
        cfg.output_dir = args.out
    check_output_dir(cfg.output_dir, "--out" if args.out else "output_dir")
    ctxs = parse_ctx(args.ctx)
    out_dir, metrics = run_training(cfg, ctxs, kvstore=args.kvstore, resume=args.resume)
    if metrics is not None:
        print("checkpoint: %s" % os.path.abspath(out_dir))
        print("metrics:    %s" % os.path.abspath(os.path.join(out_dir, "metrics.json")))
        print("curves:     %s" % os.path.abspath(os.path.join(out_dir, "curves.png")))
        print("results:    %s" % os.path.abspath(os.path.join(out_dir, "results.json")))
        for task, m in metrics.items():
            print("%-10s AP %.3f  AP50 %.3f  AP75 %.3f" % (task, m["AP"], m["AP50"], m["AP75"]))
    return 0


def _add_train(sub):
    p = sub.add_parser("train", help="train a model (default: the shapes preset on synthetic data)")
    p.add_argument("--config", default="shapes", help="preset name or YAML file (default shapes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set solver.max_iter=1000 (repeatable)")
    p.add_argument("--out", help="checkpoint folder (default: the config's output_dir)")
    p.add_argument("--ctx", default="cpu", help="cpu, cpu:N (N CPU contexts) or gpu:0,1")
    p.add_argument("--kvstore", default="device", choices=["device", "local", "dist_sync"],
                   help="gradient aggregation over the contexts (default device); dist_sync "
                   "trains over processes or machines: start it with scripts/train_dist.sh")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with its saved "
                   "config.yaml (--config and --set are not used then); a damaged last "
                   "checkpoint falls back to the newest intact iter_* one; a folder without a "
                   "checkpoint is an error (exit 2). One run at a time writes to a folder "
                   "(lock file --out/.mxmask-train.lock)")
    p.set_defaults(func=_cmd_train)


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------
def _cmd_bench(args):
    from .bench import run_bench
    for path, option in ((args.json, "--json"), (args.chart, "--chart")):
        if path:
            check_output_file(path, option)
    run_bench(preset=args.preset, ckpt=args.ckpt, size=args.size, batch=args.batch,
              runs=args.runs, warmup=args.warmup, train=args.train, overrides=_overrides(args),
              json_path=args.json, fuse=args.fuse, dtype=args.dtype, against=args.against,
              resnet50=args.resnet50, chart_path=args.chart, kernels=args.kernels,
              torch_python=args.torch_python)
    return 0


def _add_bench(sub):
    p = sub.add_parser("bench", help="inference and training-step speed, stage by stage")
    p.add_argument("--preset", default="mask_rcnn_r50_fpn", help="preset with random weights")
    p.add_argument("--ckpt", help="measure this checkpoint instead of a preset")
    p.add_argument("--size", default="800x1344", help="input HxW, rounded up to 32 (800x1344)")
    p.add_argument("--batch", type=int, default=1, help="images per forward (default 1)")
    p.add_argument("--runs", type=int, default=5, help="timed runs after warm-up (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs (default 2)")
    p.add_argument("--train", action="store_true", help="also time a training step")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=False,
                   help="time the MKLDNN-fused graph too (--no-fuse: plain only)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="precision of the timed graph (bfloat16: CPU AMP conversion, and with "
                        "--train the training step's convolutions too; int8: oneDNN "
                        "quantization, calibrated on --calib-images or, without it, on the "
                        "bench input)")
    _add_calib_args(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable)")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--against", choices=["gluoncv", "torchvision"],
                   help="also time GluonCV's mask_rcnn_fpn_resnet50_v1b_coco, or torchvision's "
                        "maskrcnn_resnet50_fpn (mask presets) / keypointrcnn_resnet50_fpn "
                        "(keypoint presets; recommended: --preset torchvision_mask_rcnn_r50_fpn / "
                        "torchvision_keypoint_rcnn_r50_fpn, the same architecture; --dtype "
                        "bfloat16: torchvision under bf16 autocast with channels_last), on the "
                        "same input (and training step with --train), and print the speed ratios")
    p.add_argument("--torch-python", metavar="PATH",
                   help="--against torchvision: a Python with torch and torchvision, which runs "
                        "the torchvision side in its own process (default: $MXMASK_TORCH_PYTHON)")
    p.add_argument("--resnet50", action="store_true",
                   help="also time a plain ResNet-50 forward (plain and MKLDNN-fused) for its "
                        "GFLOP/s (implied by --against gluoncv)")
    p.add_argument("--chart", metavar="PATH", help="write a PNG bar chart of the stages here")
    p.add_argument("--kernels", default="auto", choices=["auto", "mxmask", "mxnet"],
                   help="RoIAlign and NMS of the in-process network: auto (default) uses "
                        "mxmask's compiled CPU operators where they load, as mxmask predict and "
                        "eval do; mxnet: MXNet's own, as in an exported graph")
    p.set_defaults(func=_cmd_bench)


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------
def _cmd_convert_gluoncv(args):
    from .convert.gluoncv import convert_gluoncv
    check_output_dir(args.out, "--out")
    info = convert_gluoncv(args.src, args.out)
    print("converted %d GluonCV arrays from %s" % (info["copied"], args.src))
    print("checkpoint: %s (preset gluoncv_mask_rcnn_r50_fpn)" % os.path.abspath(args.out))
    return 0


def _cmd_convert_torchvision(args):
    from .convert.torchvision import convert_torchvision
    check_output_dir(args.out, "--out")
    info = convert_torchvision(args.src, args.out, arch=args.arch)
    where = " (the state dict under %r)" % info["wrapper"] if info["wrapper"] else ""
    print("converted %d torchvision %s arrays from %s%s"
          % (info["copied"], info["arch"], args.src, where))
    print("checkpoint: %s (preset %s)" % (os.path.abspath(args.out), info["preset"]))
    return 0


def _add_convert(sub):
    from .convert.torchvision import ARCHS
    p = sub.add_parser("convert", help="turn other frameworks' weights into a checkpoint")
    csub = p.add_subparsers(dest="convert_cmd", metavar="{gluoncv,torchvision}")
    csub.required = True
    g = csub.add_parser("gluoncv", help="GluonCV mask_rcnn_fpn_resnet50_v1b_coco .params -> "
                                        "checkpoint of preset gluoncv_mask_rcnn_r50_fpn")
    g.add_argument("src", help="GluonCV parameter file (from net.save_parameters)")
    g.add_argument("--out", required=True, help="checkpoint folder to write")
    g.set_defaults(func=_cmd_convert_gluoncv)
    t = csub.add_parser("torchvision", help="torchvision maskrcnn_resnet50_fpn or "
                                            "keypointrcnn_resnet50_fpn .pth -> checkpoint of "
                                            "preset torchvision_{mask,keypoint}_rcnn_r50_fpn")
    t.add_argument("src", help="torch.save(model.state_dict()) file, or a training checkpoint "
                               "holding it under 'model' / 'state_dict' (torch is not needed)")
    t.add_argument("--out", required=True, help="checkpoint folder to write")
    t.add_argument("--arch", choices=list(ARCHS),
                   help="the file's architecture (default: from its keys)")
    t.set_defaults(func=_cmd_convert_torchvision)


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def _cmd_export(args):
    from .engine.checkpoint import load_checkpoint_config
    from .export import EXPORT_SUFFIXES, export_checkpoint, export_input_size
    check_output_prefix(args.out, EXPORT_SUFFIXES, "--out")
    size = export_input_size(args.size, load_checkpoint_config(args.ckpt)) if args.size else None
    result = export_checkpoint(args.ckpt, args.out, size=size, fuse=args.fuse, dtype=args.dtype,
                               check=not args.no_check, overrides=_overrides(args))
    for path in result["files"]:
        print("wrote %s" % path)
    if result["int8"]:
        q = result["int8"]
        print("int8: %d convolution and fc layers quantized, calibrated (%s) on %d images; "
              "kept float32 besides the proposal generator: %s"
              % (len(q["quantized"]), q["calib_mode"], q["calib_num"],
                 ", ".join(q["excluded"]) or "nothing"))
    report = result["check"]
    if report is not None:
        h, w = result["size"]
        diffs = "  ".join("%s %.3g" % (k, v) for k, v in report.items()
                          if k in result["check_outputs"])
        what = "the first calibration image" if result["int8"] else "a random input"
        print("check on %s (%dx%d), exported vs Gluon fp32: max |diff| %s"
              % (what, h, w, diffs))
        print("  same class per row %.1f%%; detections matched (same class, IoU >= 0.9) %.1f%%, "
              "their max score diff %.3g, box diff %.3g px"
              % (100 * report["ids_agree"], 100 * report["matched"], report["matched_score"],
                 report["matched_box"]))
        if "top_count" in report:
            print("  of the %d detections scoring >= 0.5, %d matched"
                  % (report["top_count"], report["top_matched"]))
        exact = args.dtype == "float32" and not args.fuse
        if exact and max(report[k] for k in ("scores", "boxes")) > 1e-4:
            print("mxmask: error: the exported graph does not reproduce the Gluon model",
                  file=sys.stderr)
            return 1
    return 0


def _add_graph_args(p):
    """--fuse, --dtype and --set: the graph as mxmask export writes it (export, eval, predict).
    --set takes the keys a trained checkpoint may change
    (:func:`mxmask.engine.checkpoint.load_checkpoint_config`)."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a test-time setting of the checkpoint's config, e.g. --set "
                        "test.refine_boxes=true (repeatable; test.* keys and input.resize_rule, "
                        "input.resize_interp, input.normalize)")
    p.add_argument("--fuse", action="store_true",
                   help="fuse conv + BN/relu for MKLDNN (optimize_for backend MKLDNN)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="bfloat16: convolutions, deconvolutions and fc layers in bf16 (use with "
                        "--fuse); int8: convolutions and fc layers quantized with oneDNN, "
                        "calibrated on images (one CPU context; docs/int8.md)")
    _add_calib_args(p)


def _add_calib_args(p):
    """--calib-images, --calib-num, --calib-mode: the int8 calibration (test.int8.*)."""
    p.add_argument("--calib-images", metavar="DIR",
                   help="--dtype int8: calibrate on images of DIR (default: the checkpoint's "
                        "data.val_images; test.int8.calib_images)")
    p.add_argument("--calib-num", type=int, metavar="N",
                   help="--dtype int8: calibrate on N images drawn from it with "
                        "test.int8.calib_seed (default 32)")
    p.add_argument("--calib-mode", choices=["naive", "entropy"],
                   help="--dtype int8: naive (min/max seen, the default) or entropy (KL-optimal "
                        "ranges)")


def _overrides(args):
    """``--set`` plus the calibration options as ``test.int8.*`` settings."""
    out = list(args.set)
    for option, key in (("calib_images", "calib_images"), ("calib_num", "calib_num"),
                        ("calib_mode", "calib_mode")):
        value = getattr(args, option, None)
        if value is not None:
            out.append("test.int8.%s=%s" % (key, value))
    return out


def _add_export(sub):
    p = sub.add_parser("export", help="write a checkpoint as PREFIX-symbol.json + "
                                      "PREFIX-0000.params (SymbolBlock.imports, no mxmask needed)")
    p.add_argument("ckpt", help="checkpoint folder")
    p.add_argument("--out", required=True, metavar="PREFIX",
                   help="output prefix: PREFIX-symbol.json, -0000.params, -config.yaml, -meta.json")
    p.add_argument("--size", metavar="HxW", help="example input to trace, fuse and check with "
                   "(multiples of input.size_divisibility; default min_size_test square, at "
                   "most 512); the graph still takes other sizes")
    _add_graph_args(p)
    p.add_argument("--no-check", action="store_true",
                   help="skip running the export against the Gluon model")
    p.set_defaults(func=_cmd_export)


# --------------------------------------------------------------------------------------------
# the verbs, in the order of mxmask --help
VERBS = [_add_data, _add_train, _add_eval, _add_predict, _add_bench, _add_convert, _add_export]


def build_parser():
    """The ``mxmask`` argument parser: one subparser per verb of :data:`VERBS`, each with its
    ``func``."""
    parser = argparse.ArgumentParser(
        prog="mxmask",
        description="Mask R-CNN and Keypoint R-CNN with FPN for MXNet/Gluon.")
    from . import __version__
    parser.add_argument("--version", action="version", version="mxmask " + __version__)
    sub = parser.add_subparsers(dest="cmd", metavar="VERB")
    for add in VERBS:
        add(sub)
    return parser


def main(argv=None):
    """Run the ``mxmask`` command.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        the exit code: the verb's (0 when it returns None); 2 after a UserError, ConfigError or
        OSError, printed as one line on stderr; 130 on Ctrl-C. No verb prints the help and
        returns 0.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except (UserError, ConfigError) as e:
        print("mxmask: error: %s" % e, file=sys.stderr)
        return 2
    except OSError as e:                  # a write that fails late (full disk, lost mount, ...)
        where = "%s: " % e.filename if e.filename else ""
        print("mxmask: error: %s%s" % (where, e.strerror or e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mxmask: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

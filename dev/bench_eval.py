#!/usr/bin/env python
"""Where the time of `mxmask eval` goes: data, network, mask pasting, RLE, keypoints, COCOeval.

In:  a checkpoint (``--ckpt``; its val set, or ``--ann``/``--images``), or by default a
     random-init ``shapes`` model (``--set`` overrides its config) on the synthetic val set,
     generated with ``mxmask.data.shapes.generate_shapes`` into ``--data`` (or a temporary
     folder) when missing. A random-init model keeps ``test.max_dets`` detections per image
     (every score is near 1/(C+1) > 0.05), the post-processing load of a full COCO model.
Out: a table on stdout (total seconds, ms per image and share of each stage; :func:`run` says
     what each stage holds) and, with ``--json``, the same numbers as JSON. Nothing else is
     written.

    python dev/bench_eval.py                          # random-init shapes model, 50 images
    python dev/bench_eval.py --ckpt runs/shapes --json bench_eval.json
    python dev/bench_eval.py --size 480 --set test.max_dets=100 input.min_size_test=480 \\
        input.max_size_test=800                         # bigger images: more paste/RLE work

The machine may be shared: the numbers are indicative unless it was idle.
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mxmask.config import ConfigError  # noqa: E402
from mxmask.utils import UserError  # noqa: E402


def parse_args(argv=None):
    """The command-line options (``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="checkpoint folder (default: a random-init shapes model)")
    p.add_argument("--ann", help="COCO json to evaluate on (default: the checkpoint's val set, "
                   "or the synthetic val set)")
    p.add_argument("--images", help="image folder of --ann")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides (for the random-init model; with --ckpt only test.* "
                   "and input.*_test keys make sense)")
    p.add_argument("--data", default="", help="synthetic dataset folder (generated if missing; "
                   "default: a temporary folder)")
    p.add_argument("--num-val", type=int, default=50,
                   help="val images to generate when the dataset is missing (default 50)")
    p.add_argument("--size", type=int, default=0,
                   help="image size when generating (default: the config's data.shapes.size)")
    p.add_argument("--limit", type=int, default=0, help="time at most this many images")
    p.add_argument("--warmup", type=int, default=2, help="untimed first images (default 2)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------
def synthetic_val(folder, num_val, size, seed):
    """(ann, images) of the shapes val split in ``folder``, generated when missing."""
    ann = os.path.join(folder, "annotations", "val.json")
    if not os.path.exists(ann):
        from mxmask.data.shapes import generate_shapes
        start = time.perf_counter()
        generate_shapes(folder, num_train=0, num_val=num_val, size=size, seed=seed)
        print("generated %d val images of size %d in %s (%.1f s)"
              % (num_val, size, folder, time.perf_counter() - start))
    return ann, os.path.join(folder, "images", "val")


def build_predictor(args, tmp):
    """(predictor, ann, images)."""
    import mxnet as mx
    from mxmask.config import get_config, set_value
    from mxmask.predictor import Predictor
    if args.ckpt:
        from mxmask.engine.checkpoint import load_checkpoint_config
        cfg = load_checkpoint_config(args.ckpt)
        for assignment in args.set:
            set_value(cfg, assignment)
        predictor = Predictor(args.ckpt, ctx=[mx.cpu()], cfg=cfg)
        ann = args.ann or cfg.data.val_ann
        images = args.images or cfg.data.val_images
        return predictor, ann, images
    from mxmask.data.coco import load_coco
    from mxmask.modeling.rcnn import build_model
    cfg = get_config("shapes", args.set)
    if args.ann:
        ann, images = args.ann, args.images
    else:
        folder = args.data or os.path.join(tmp, "shapes")
        ann, images = synthetic_val(folder, args.num_val, args.size or cfg.data.shapes.size,
                                    cfg.data.shapes.seed)
    info = load_coco(ann, images, for_training=False)[1]
    cfg.model.num_classes = info.num_classes
    if cfg.model.keypoint_on:
        cfg.model.num_keypoints = info.num_keypoints
        if cfg.test.keypoint_oks_sigmas and len(cfg.test.keypoint_oks_sigmas) != \
                info.num_keypoints:
            cfg.test.keypoint_oks_sigmas = []
    for key, value in info.to_dict().items():
        setattr(cfg.data, key, value)
    mx.random.seed(cfg.seed)
    net = build_model(cfg, ctx=[mx.cpu()])
    net.hybridize(static_alloc=True)
    return Predictor(None, ctx=[mx.cpu()], cfg=cfg, net=net), ann, images


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
class Clock:
    """Accumulates seconds per stage."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, stage):
        start = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def kept_detections(predictor, out, im_info, orig_size):
    """The rows ``detections_to_coco`` keeps and their boxes' extent in original pixels."""
    ids = out["ids"].reshape(-1)
    scores = out["scores"].reshape(-1)
    keep = np.flatnonzero((ids >= 0) & (scores >= predictor.score_thresh) & np.isfinite(scores))
    height, width = int(orig_size[0]), int(orig_size[1])
    sx, sy = im_info[1] / width, im_info[0] / height
    extent = out["boxes"].reshape(-1, 4)[keep].astype(np.float64) / np.array([sx, sy, sx, sy])
    return keep, extent, height, width


def time_image(predictor, batch, clock, counts):
    """Time the stages of one test batch of one image (:func:`run`); returns its COCO
    entries.
    """
    import pycocotools.mask as mask_util
    from mxmask.postprocess import decode_keypoints, paste_masks_in_image
    cfg = predictor.cfg
    with clock("network forward"):
        outputs = predictor.forward(batch, predictor.ctxs[0])
        arrays = [o.asnumpy() for o in outputs]
    out = {name: a[0] for name, a in zip(predictor.output_names, arrays)}
    im_info, orig_size = batch["im_info"][0], batch["orig_size"][0]
    keep, extent, height, width = kept_detections(predictor, out, im_info, orig_size)
    counts["detections"] += len(keep)
    counts["pixels"] += height * width
    if "masks" in out:
        with clock("mask paste"):
            pasted = paste_masks_in_image(out["masks"][keep], extent, height, width,
                                          threshold=cfg.test.mask_thresh)
        if len(keep):
            with clock("RLE encode"):
                mask_util.encode(pasted.view(np.uint8).transpose(1, 2, 0))
    if "heatmaps" in out:
        method = cfg.test.keypoint_decode
        other = "bicubic" if method == "taylor" else "taylor"
        net_boxes = out["boxes"].reshape(-1, 4)[keep]
        scale = (im_info[1] / orig_size[1], im_info[0] / orig_size[0])
        with clock("keypoint decode (%s)" % method):
            decode_keypoints(out["heatmaps"][keep], extent, method, net_boxes, scale)
        with clock("keypoint decode (%s)*" % other):
            decode_keypoints(out["heatmaps"][keep], extent, other, net_boxes, scale)
    with clock("detections_to_coco"):            # what evaluation runs, outputs read back
        entries = predictor.to_entries(outputs, batch)[0]
    return entries


def run(args, tmp):
    """Time every stage over the val images; returns ``(predictor, ann, timed records,
    {stage: seconds}, counts, number of entries)``.

    Stages, timed one after the other on each image (one context, batch 1, after ``--warmup``
    untimed images):

    - data: read the image file, resize, normalise (``TestBatchMaker``, in this process);
    - network forward: the hybridized model plus reading its outputs back (``asnumpy``);
    - post-processing (all): ``Predictor.to_entries`` (``detections_to_coco`` per image, as
      evaluation runs it), which is what counts in the total. Its pieces are timed again
      separately on the same inputs and listed under it: mask paste (``paste_masks_in_image`` of
      the kept detections into the original image), RLE encode (``pycocotools.mask.encode``, one C
      call for all masks), keypoint decode (``decode_keypoints`` with ``test.keypoint_decode``;
      the other decoder is shown for comparison, outside the total), and the rest (output copy,
      box mapping, entry dicts) by difference: it is small, so timing noise can make it slightly
      negative;
    - COCOeval per task: ``evaluate_results`` (validation, ``loadRes``, evaluate, accumulate,
      summarize, per-category AP) with the gt loaded once.
    """
    from mxmask.data.coco import load_coco
    from mxmask.data.loader import TestBatchMaker
    from mxmask.engine.evaluator import evaluate_results, load_gt
    from mxmask.engine.inference import check_eval_set, model_tasks
    predictor, ann, images = build_predictor(args, tmp)
    cfg = predictor.cfg
    sigmas = list(cfg.test.keypoint_oks_sigmas) or None
    with contextlib.redirect_stdout(io.StringIO()):
        gt = load_gt(ann)
    check_eval_set(cfg, gt, ann, predictor.category_ids, sigmas)
    records = load_coco(ann, images, for_training=False)[0]
    if args.limit:
        records = records[:args.warmup + args.limit]
    if len(records) <= args.warmup:
        raise UserError("%s: %d images, need more than --warmup %d"
                        % (ann, len(records), args.warmup))
    make_batch = TestBatchMaker(cfg, records, 1)
    clock, counts = Clock(), {"detections": 0, "pixels": 0}
    for k in range(args.warmup):
        time_image(predictor, make_batch(k), Clock(), dict(counts))
    entries = []
    for k in range(args.warmup, len(make_batch)):
        with clock("data (read + resize)"):
            batch = make_batch(k)
        entries.extend(time_image(predictor, batch, clock, counts))
    timed = records[args.warmup:]
    for task in model_tasks(cfg):
        with contextlib.redirect_stdout(io.StringIO()), clock("COCOeval %s" % task):
            evaluate_results(entries, gt, tasks=[task], kpt_oks_sigmas=sigmas,
                             image_ids=[r["image_id"] for r in timed])
    return predictor, ann, timed, clock.seconds, counts, len(entries)


def table(seconds):
    """-> (rows, total, extras). ``rows``: (stage, seconds, counted in the total); the pieces of
    the post-processing are listed under it, with the rest found by difference."""
    s = dict(seconds)
    post = s.pop("detections_to_coco", 0.0)
    pieces = [k for k in ("mask paste", "RLE encode") if k in s]
    pieces += [k for k in s if k.startswith("keypoint decode") and not k.endswith("*")]
    rows = [(k, s[k], True) for k in ("data (read + resize)", "network forward") if k in s]
    rows.append(("post-processing (all)", post, True))
    rows += [("  " + k, s[k], False) for k in pieces]
    rows.append(("  rest, by difference", post - sum(s[k] for k in pieces), False))
    rows += [(k, v, True) for k, v in s.items() if k.startswith("COCOeval")]
    total = sum(v for _, v, counted in rows if counted)
    extras = [(k.rstrip("*"), v) for k, v in s.items() if k.endswith("*")]
    return rows, total, extras


def main(argv=None):
    """Run, print the table (and with ``--json`` write it). Returns the exit code: 0, or 2 after
    a bad option, config or dataset.
    """
    args = parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_eval_")
    try:
        predictor, ann, timed, seconds, counts, num_entries = run(args, tmp)
    except (UserError, ConfigError) as e:
        print("bench_eval: error: %s" % e, file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = len(timed)
    cfg = predictor.cfg
    rows, total, extras = table(seconds)
    print("%s: %d images (%.0f pixels on average), %.1f detections/image, %d entries; "
          "input %d/%d, max_dets %d, keypoint_decode %s"
          % (ann, n, counts["pixels"] / n, counts["detections"] / n, num_entries,
             cfg.input.min_size_test, cfg.input.max_size_test, cfg.test.max_dets,
             cfg.test.keypoint_decode))
    print("%-30s %9s %10s %7s" % ("stage", "total s", "ms/image", "share"))
    for name, value, _ in rows:
        print("%-30s %9.3f %10.2f %6.1f%%" % (name, value, 1e3 * value / n, 100 * value / total))
    print("%-30s %9.3f %10.2f %6.1f%%" % ("total", total, 1e3 * total / n, 100.0))
    for name, value in extras:
        print("%-30s %9.3f %10.2f   (for comparison, not in the total)"
              % (name, value, 1e3 * value / n))
    print("indicative only when the machine is shared")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"annotations": ann, "images": n, "detections_per_image":
                       counts["detections"] / n, "total": total,
                       "seconds": {name.strip(): value for name, value, _ in rows},
                       "extras": dict(extras)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

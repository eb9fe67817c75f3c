#!/usr/bin/env python
"""How many of a checkpoint's float32 detections its int8 graph reproduces.

In:  a checkpoint and images (``--images DIR``, default its ``data.val_images``; the first
     ``--num`` files in name order), the int8 calibration options of ``mxmask eval``.
Out: one line per image (with ``--verbose``) and a summary: of float32's detections scoring at
     least ``--score``, the share that the int8 graph also finds (same label, IoU > ``--iou``,
     any score), the largest score and box differences of those pairs, and the share of
     float32's label per detection row the int8 graph keeps. ``--json`` writes the same.

    python dev/int8_agreement.py runs/shapes
    python dev/int8_agreement.py ckpt/torchvision --images val2017 --num 100 \\
        --calib-images train_sample/ --calib-num 32

Both networks are mxmask's in-process graphs (``Predictor(dtype="float32")`` and
``Predictor(dtype="int8")``) on the same test-time inputs; images are not written anywhere.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mxmask.config import ConfigError  # noqa: E402
from mxmask.utils import UserError  # noqa: E402


def parse_args(argv=None):
    """The command-line options (``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="checkpoint folder")
    p.add_argument("--images", help="image folder (default: the checkpoint's data.val_images)")
    p.add_argument("--num", type=int, default=50, help="images compared (default 50)")
    p.add_argument("--score", type=float, default=0.5,
                   help="float32 detections scoring at least this count (default 0.5)")
    p.add_argument("--iou", type=float, default=0.9, help="IoU of a match (default 0.9)")
    p.add_argument("--calib-images", help="as mxmask eval --calib-images")
    p.add_argument("--calib-num", type=int, help="as mxmask eval --calib-num")
    p.add_argument("--calib-mode", choices=["naive", "entropy"], help="as mxmask eval")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="test-time config override, as mxmask eval --set (repeatable)")
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--verbose", action="store_true", help="one line per image")
    return p.parse_args(argv)


def run(args):
    """Compare the two graphs image by image; returns the summary dict."""
    from mxmask.data.images import list_images, read_image
    from mxmask.export import compare_outputs
    from mxmask.predictor import Predictor
    overrides = list(args.set)
    for key in ("calib_images", "calib_num", "calib_mode"):
        if getattr(args, key) is not None:
            overrides.append("test.int8.%s=%s" % (key, getattr(args, key)))
    fp32 = Predictor(args.ckpt, overrides=overrides)
    int8 = Predictor(args.ckpt, dtype="int8", overrides=overrides)
    folder = args.images or fp32.cfg.data.val_images
    paths = list_images([folder])[:args.num]
    if not paths:
        raise UserError("%s: holds no image file" % folder)
    total = found = 0
    rows = same_label = 0
    score_diff = box_diff = 0.0
    for path in paths:
        batch = fp32.prepare(read_image(path))
        ref = fp32.forward(batch, fp32.ctxs[0])
        got = int8.forward(batch, int8.ctxs[0])
        r = compare_outputs(ref, got, fp32.output_names, iou=args.iou, min_score=args.score)
        total += r["reference_count"]
        found += r["matched_count"]
        n = ref[0].size
        rows += n
        same_label += r["ids_agree"] * n
        score_diff = max(score_diff, r["matched_score"])
        box_diff = max(box_diff, r["matched_box"])
        if args.verbose:
            print("%s: %d of %d reproduced" % (os.path.basename(path), r["matched_count"],
                                               r["reference_count"]))
    summary = {"ckpt": args.ckpt, "images": folder, "num_images": len(paths),
               "score": args.score, "iou": args.iou, "int8": int8.cfg.test.int8.__dict__,
               "fp32_detections": total, "reproduced": found,
               "share": found / float(total) if total else 1.0,
               "max_score_diff": score_diff, "max_box_diff": box_diff,
               "same_label_rows": same_label / float(rows) if rows else 1.0}
    return summary


def main(argv=None):
    args = parse_args(argv)
    try:
        s = run(args)
    except (UserError, ConfigError) as e:
        print("int8_agreement: error: %s" % e, file=sys.stderr)
        return 2
    print("%d images of %s: int8 reproduces %d of float32's %d detections scoring >= %g "
          "(same label, IoU > %g): %.1f%%; their largest differences: score %.3f, box %.2f px; "
          "same label per row %.1f%%"
          % (s["num_images"], s["images"], s["reproduced"], s["fp32_detections"], s["score"],
             s["iou"], 100 * s["share"], s["max_score_diff"], s["max_box_diff"],
             100 * s["same_label_rows"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``mxmask`` command: one verb per job (``data``, ``train``, ``eval``, ``predict``, ...).

Each verb parses its arguments here and calls one function in the package. A
:class:`~mxmask.utils.UserError` or :class:`~mxmask.config.ConfigError` becomes one line on
stderr and exit code 2, never a traceback.
"""
import argparse
import sys

from .config import ConfigError
from .utils import UserError


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def _cmd_data_shapes(args):
    from .data.shapes import generate_shapes
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
VERBS = [_add_data]


def build_parser():
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
    except KeyboardInterrupt:
        print("mxmask: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

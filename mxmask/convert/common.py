"""What the converters share: COCO tables, the name-mismatch report and the checkpoint writer.

In: the pieces of one conversion (a filled mxmask network, its config, the source file; or
the missing / unexpected / wrong-shape names found while mapping).

Out:

- :data:`COCO_CLASS_NAMES` / :data:`COCO_CATEGORY_IDS`: COCO's 80 classes in category-id order
  and their ids (1..90 with 10 gaps); :func:`coco_names_by_id` gives the 90-slot list with
  ``"N/A"`` at the unused ids (torchvision's layout); :data:`COCO_PERSON_KEYPOINTS` /
  :data:`COCO_PERSON_SKELETON` the person category's keypoints (0-based skeleton pairs).
- :func:`mismatch_report`: ``"missing N: a, b, ...; unexpected M: ...; wrong shape K: ..."``,
  the one-line body of a converter's UserError.
- :func:`is_anchor_param`: mxmask's anchor constants, which the network builds itself.
- :func:`check_out_dir` and :func:`write_checkpoint`: a converted checkpoint folder
  (``config.yaml``, ``model.params``, ``progress.json`` with ``iter`` 0 and the absolute
  ``source`` path), never written over a training run.
- :func:`import_gluoncv`: ``import gluoncv`` for the GluonCV features, one UserError line when
  it cannot be imported (GluonCV 0.10.5's ``import gluoncv`` raises a RuntimeError when torch >= 2
  is importable beside it).
"""
import os

from ..config import UNUSED_CLASS_NAME
from ..engine.checkpoint import read_progress, save_checkpoint, save_config
from ..utils import UserError, shorten_names

__all__ = ["COCO_CLASS_NAMES", "COCO_CATEGORY_IDS", "COCO_INSTANCES_PATHS",
           "COCO_KEYPOINTS_PATHS", "COCO_PERSON_KEYPOINTS", "COCO_PERSON_SKELETON",
           "coco_names_by_id", "mismatch_report", "is_anchor_param", "check_out_dir",
           "write_checkpoint", "import_gluoncv"]

# The 80 COCO classes sorted by category id (the categories of instances_*2017.json; GluonCV's
# COCODetection.CLASSES) and their COCO category ids.
COCO_CLASS_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"]
COCO_CATEGORY_IDS = [i for i in range(1, 91)
                     if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]

# COCO's person category (person_keypoints_*2017.json): keypoint names in order, and the
# skeleton as 0-based index pairs (the json's pairs are 1-based)
COCO_PERSON_KEYPOINTS = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle"]
COCO_PERSON_SKELETON = [[a - 1, b - 1] for a, b in [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
    [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]]

COCO_INSTANCES_PATHS = {
    "train_ann": "datasets/coco/annotations/instances_train2017.json",
    "train_images": "datasets/coco/train2017",
    "val_ann": "datasets/coco/annotations/instances_val2017.json",
    "val_images": "datasets/coco/val2017",
}
COCO_KEYPOINTS_PATHS = dict(
    COCO_INSTANCES_PATHS,
    train_ann="datasets/coco/annotations/person_keypoints_train2017.json",
    val_ann="datasets/coco/annotations/person_keypoints_val2017.json")


def coco_names_by_id(unused=UNUSED_CLASS_NAME):
    """torchvision's 90-slot label space as class names.

    Args:
        unused: the name of the 10 ids COCO does not use (default ``"N/A"``,
            :data:`mxmask.config.UNUSED_CLASS_NAME`).

    Returns:
        the names of COCO category ids 1..90 in id order, ``unused`` at the skipped ids.
    """
    by_id = dict(zip(COCO_CATEGORY_IDS, COCO_CLASS_NAMES))
    return [by_id.get(i, unused) for i in range(1, 91)]


def is_anchor_param(name):
    """Whether an mxmask parameter is an anchor constant, which the network builds itself and
    converters leave alone.

    Args:
        name: an mxmask structural parameter name.

    Returns:
        True for ``rpn.anchor_generators.<i>.anchors`` and any other anchor constant.
    """
    return name.startswith("rpn.anchor_generators.") or name.endswith("anchors")


def mismatch_report(missing=(), unexpected=(), wrong=(), limit=5):
    """The one-line body of a converter's UserError.

    Args:
        missing, unexpected, wrong: name lists (``wrong`` entries may carry their shapes).
        limit: the names shown per list; the rest are counted.

    Returns:
        ``"missing N: ...; unexpected M: ...; wrong shape K: ..."`` (empty parts left out),
        each list sorted and shortened; "" when all three are empty.
    """
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", wrong)):
        if names:
            parts.append("%s %d: %s" % (label, len(names), shorten_names(names, limit)))
    return "; ".join(parts)


def check_out_dir(out_dir):
    """Check a converter's output folder before any work, so that a conversion never writes
    over a training run.

    Args:
        out_dir: the checkpoint folder to write; it may be missing, empty, or hold an earlier
            conversion.

    Raises:
        UserError: ``out_dir`` is a file, or holds a checkpoint other than a conversion (its
        progress.json has no ``source``, or there is a model.params without progress.json).
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError("%s: is a file, expected a folder for the checkpoint" % out_dir)
    if os.path.isdir(out_dir):
        try:
            progress = read_progress(out_dir)
        except UserError:
            progress = {}
        if (progress is not None and "source" not in progress) or (
                progress is None and os.path.exists(os.path.join(out_dir, "model.params"))):
            raise UserError("%s: already holds a checkpoint that is not a conversion; "
                            "choose another --out folder" % out_dir)


def write_checkpoint(cfg, net, out_dir, src, extra=None):
    """Write the converted checkpoint folder.

    Args:
        cfg: the full config (``output_dir`` is set to ``out_dir``).
        net: the filled network.
        out_dir: the folder (see :func:`check_out_dir`, called before converting).
        src: the source file, recorded in progress.json as an absolute path.
        extra: more progress.json fields.

    Returns:
        ``{"params": model.params path, "config": config.yaml path}``.
    """
    cfg.output_dir = out_dir
    fields = {"source": os.path.abspath(src)}
    fields.update(extra or {})
    save_config(cfg, out_dir)
    save_checkpoint(out_dir, net, None, 0, 0, extra=fields)
    return {"params": os.path.join(out_dir, "model.params"),
            "config": os.path.join(out_dir, "config.yaml")}


def import_gluoncv(feature):
    """``import gluoncv`` for a GluonCV-specific feature.

    mxmask imports GluonCV only inside its GluonCV features (``mxmask bench --against gluoncv``
    and ``--resnet50``, the GluonCV reference network), each of which calls this function
    first; convert, predict, eval, export and train never import it, so they also run where
    torch >= 2 is installed.

    Args:
        feature: what needs it, for the message (``"mxmask bench --against gluoncv"``).

    Returns:
        the ``gluoncv`` module.

    Raises:
        UserError: one line when GluonCV is not installed, or refuses to import (its
        ``check.py`` raises a RuntimeError when torch >= 2 is importable in the same
        environment: run the GluonCV feature in an environment without torch).
    """
    try:
        import gluoncv
    except ImportError as e:
        raise UserError("%s needs GluonCV, which is not installed (pip install gluoncv): %s"
                        % (feature, _first_line(e)))
    except RuntimeError as e:
        raise UserError("%s needs GluonCV, whose import fails here (%s); run it in an "
                        "environment without torch >= 2" % (feature, _first_line(e)))
    return gluoncv


def _first_line(error):
    lines = [x.strip() for x in str(error).strip().splitlines() if x.strip()]
    return lines[0] if lines else type(error).__name__

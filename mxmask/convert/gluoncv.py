"""GluonCV ``mask_rcnn_fpn_resnet50_v1b_coco`` weights -> an mxmask checkpoint folder.

In: a parameter file written by GluonCV's ``net.save_parameters`` for
``gluoncv.model_zoo.get_model("mask_rcnn_fpn_resnet50_v1b_coco")`` (for example the published
``mask_rcnn_fpn_resnet50_v1b_coco-*.params``; nothing is downloaded here).

Out: a checkpoint folder of preset ``gluoncv_mask_rcnn_r50_fpn``::

    config.yaml      the preset with the 80 COCO classes and ids (:func:`converted_config`)
    model.params     mxmask parameter names (``backbone.*``, ``rpn.head.*``, ``box_head.*``, ...)
    progress.json    {"iter": 0, "max_iter": 0, "source": <absolute SRC path>, ...}

The names map through :func:`gluoncv_name_map` and the tensors are copied as they are
(:func:`convert_gluoncv_params`); a file that is not this model's parameters is a
:class:`~mxmask.utils.UserError` naming the file and the names that do not fit.
"""
import os

import mxnet as mx
import numpy as np

from ..config import get_config
from ..utils import UserError
from .common import (COCO_CATEGORY_IDS, COCO_CLASS_NAMES, COCO_INSTANCES_PATHS, check_out_dir,
                     is_anchor_param, mismatch_report, write_checkpoint)

__all__ = ["GLUONCV_HEADS", "COCO_CLASS_NAMES", "COCO_CATEGORY_IDS", "PRESET",
           "gluoncv_name_map", "convert_gluoncv_params", "convert_gluoncv", "load_params_file",
           "converted_config"]

PRESET = "gluoncv_mask_rcnn_r50_fpn"

# GluonCV head prefix -> mxmask prefix (each has a .weight and a .bias)
GLUONCV_HEADS = {
    "rpn.rpn_head.conv1.0": "rpn.head.conv",
    "rpn.rpn_head.score": "rpn.head.logits",
    "rpn.rpn_head.loc": "rpn.head.deltas",
    "box_features.1": "box_head.fcs.0",
    "box_features.3": "box_head.fcs.1",
    "class_predictor": "box_predictor.cls_score",
    "box_predictor": "box_predictor.bbox_pred",
    "mask.deconv.0": "mask_head.convs.0",
    "mask.deconv.2": "mask_head.convs.1",
    "mask.deconv.4": "mask_head.convs.2",
    "mask.deconv.6": "mask_head.convs.3",
    "mask.deconv.8": "mask_head.deconv",
    "mask.mask": "mask_head.predictor",
}

# COCO's 80 classes in GluonCV's order (gluoncv.data.COCODetection.CLASSES: the categories of
# instances_*2017.json sorted by id) are common.COCO_CLASS_NAMES, with COCO_CATEGORY_IDS.
COCO_PATHS = COCO_INSTANCES_PATHS


def _is_anchor(name):
    """GluonCV's anchor constants (``rpn.anchor_generator.<i>.anchors``)."""
    return "anchor_generator" in name and name.endswith("anchors")


def gluoncv_name_map(gluon_names, net):
    """Map GluonCV's parameter names to mxmask's.

    GluonCV's keys are the model's structural parameter names (``features.resnetv1b_conv0_weight``,
    ``rpn.rpn_head.conv1.0.weight``, ``class_predictor.bias``, ...). ``features.*`` (ResNet-50-v1b
    and FPN) goes through :func:`mxmask.modeling.fpn.gluoncv_backbone_name_map`; the heads through
    :data:`GLUONCV_HEADS` (``<gluoncv prefix>.weight/.bias -> <mxmask prefix>.weight/.bias``).

    Args:
        gluon_names: the names in the GluonCV file.
        net: a ``MaskRCNN`` of the gluoncv preset.

    Returns:
        ``{gluoncv name: mxmask structural name}`` for the names that have a counterpart in
        ``net``. Anchors and unknown names are left out; :func:`convert_gluoncv_params`
        reports what is left over.
    """
    from ..modeling.fpn import gluoncv_backbone_name_map
    mapping = {k: "backbone." + v for k, v in
               gluoncv_backbone_name_map(gluon_names, net.backbone, strict=False).items()}
    heads = {}
    for theirs, ours in GLUONCV_HEADS.items():
        for suffix in (".weight", ".bias"):
            heads[theirs + suffix] = ours + suffix
    for name in gluon_names:
        if name in heads:
            mapping[name] = heads[name]
    return mapping


def convert_gluoncv_params(arrays, net, source="GluonCV parameters"):
    """Copy GluonCV arrays into ``net``.

    GluonCV's anchor constants (``rpn.anchor_generator.*.anchors``) are skipped: mxmask stores
    its own anchors (same boxes, different table size) and keeps the ones the network builds.
    Every other GluonCV name must map to an mxmask parameter of the same shape, and every mxmask
    parameter except the anchors must be covered. The tensors are copied as they are (cast to
    float32): the class column layout (background first), the class-specific box deltas and
    mask channels are GluonCV's layout in mxmask too.

    Args:
        arrays: ``{GluonCV name: NDArray}`` (:func:`load_params_file`).
        net: a ``MaskRCNN`` of the gluoncv preset, initialised.
        source: the file name the message starts with.

    Returns:
        the number of arrays copied.

    Raises:
        UserError: one line naming ``source`` and listing the missing, unexpected and
        wrong-shape names.
    """
    ours = net._collect_params_with_prefix()
    names = [k for k in arrays if not _is_anchor(k)]
    mapping = gluoncv_name_map(names, net)
    unexpected = [k for k in names if k not in mapping]
    wanted = {k for k in ours if not is_anchor_param(k)}
    missing = wanted - set(mapping.values())
    wrong = []
    for theirs, target in mapping.items():
        got, want = tuple(arrays[theirs].shape), tuple(ours[target].shape)
        if got != want:
            wrong.append("%s %s (mxmask %s %s)" % (theirs, got, target, want))
    if missing or unexpected or wrong:
        raise UserError("%s: not GluonCV mask_rcnn_fpn_resnet50_v1b_coco parameters (%s)" % (
            source, mismatch_report([_gluon_name_of(m, net) for m in missing], unexpected,
                                    wrong)))
    for theirs, target in mapping.items():
        value = arrays[theirs]
        if value.dtype != np.float32:
            value = value.astype(np.float32)
        ours[target].set_data(value)
    return len(mapping)


def _gluon_name_of(ours, net):
    """The GluonCV name that fills the mxmask parameter ``ours`` (for error messages)."""
    for theirs, mine in GLUONCV_HEADS.items():
        for suffix in (".weight", ".bias"):
            if ours == mine + suffix:
                return theirs + suffix
    if ours.startswith("backbone."):
        param = net.backbone._collect_params_with_prefix().get(ours[len("backbone."):])
        if param is not None:
            return "features." + param.name[len(net.backbone.prefix):]
    return ours


def load_params_file(path):
    """Read a GluonCV ``net.save_parameters`` file.

    Args:
        path: the ``.params`` file.

    Returns:
        ``{name: NDArray}``.

    Raises:
        UserError: the file is missing, a folder, not an MXNet parameter file, or holds no
        named parameters.
    """
    if not os.path.exists(path):
        raise UserError("%s: parameter file not found" % path)
    if not os.path.isfile(path):
        raise UserError("%s: is a folder, expected a .params file" % path)
    try:
        arrays = mx.nd.load(path)
    except mx.base.MXNetError as e:
        lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
        reason = lines[-1].replace("MXNetError: ", "") if lines else type(e).__name__
        raise UserError("%s: not an MXNet parameter file (%s)" % (path, reason[:200]))
    if not isinstance(arrays, dict) or not arrays:
        raise UserError("%s: holds no named parameters (expected a file from "
                        "net.save_parameters)" % path)
    return arrays


def converted_config():
    """The config of a converted checkpoint.

    Returns:
        preset ``gluoncv_mask_rcnn_r50_fpn`` with ``data.class_names`` / ``data.category_ids``
        the 80 COCO classes in GluonCV's order and their COCO category ids (1..90 with gaps),
        ``model.num_classes`` 80 and ``data.{train,val}_{ann,images}`` at the usual
        datasets/coco paths, so that the results json scores on COCO val2017 as it is.
    """
    cfg = get_config(PRESET)
    cfg.model.num_classes = len(COCO_CLASS_NAMES)
    cfg.data.class_names = list(COCO_CLASS_NAMES)
    cfg.data.category_ids = list(COCO_CATEGORY_IDS)
    for key, value in COCO_PATHS.items():
        setattr(cfg.data, key, value)
    cfg.output_dir = ""
    return cfg


def convert_gluoncv(src, out_dir):
    """Convert the GluonCV file ``src`` into the checkpoint folder ``out_dir``.

    Args:
        src: a GluonCV ``mask_rcnn_fpn_resnet50_v1b_coco`` parameter file.
        out_dir: the checkpoint folder; refused if it already holds a checkpoint other than an
            earlier conversion (:func:`~mxmask.convert.common.check_out_dir`).

    Returns:
        ``{"params": path, "config": path, "copied": n}``.

    Raises:
        UserError: one line naming the file or folder.
    """
    from ..modeling.rcnn import build_model
    check_out_dir(out_dir)
    arrays = load_params_file(src)
    cfg = converted_config()
    net = build_model(cfg)
    copied = convert_gluoncv_params(arrays, net, source=src)
    info = write_checkpoint(cfg, net, out_dir, src)
    info["copied"] = copied
    return info

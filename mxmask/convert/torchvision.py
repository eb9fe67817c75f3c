"""torchvision ``maskrcnn_resnet50_fpn`` / ``keypointrcnn_resnet50_fpn`` weights -> an mxmask
checkpoint folder.

In: a ``torch.save(model.state_dict())`` file of either architecture (e.g. the published
``maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth``; nothing is downloaded), or a training checkpoint
dict holding it under ``"model"`` / ``"state_dict"``; the v1 files' key names and today's are
both accepted (:func:`torchvision_key`). The arch defaults to what the keys show.

Out: a checkpoint folder (``config.yaml``, ``model.params``, ``progress.json``, as
:mod:`mxmask.convert.gluoncv` writes them) of preset ``torchvision_mask_rcnn_r50_fpn`` or
``torchvision_keypoint_rcnn_r50_fpn``, with COCO's label space (:func:`converted_config`).
A file that is not the arch's weights is a :class:`~mxmask.utils.UserError` naming the file
and the keys that do not fit (:func:`convert_torchvision_params`).

No torch: :mod:`mxmask.convert.torch_file` reads the file with the standard library and numpy,
so this runs in mxmask's environment (docs/torchvision.md, "Why torch stays out of mxmask's
environment").
"""
import re

import numpy as np

from ..config import get_config
from ..utils import UserError
from .common import (COCO_INSTANCES_PATHS, COCO_KEYPOINTS_PATHS, COCO_PERSON_KEYPOINTS,
                     COCO_PERSON_SKELETON, check_out_dir, coco_names_by_id, is_anchor_param,
                     mismatch_report, write_checkpoint)
from .torch_file import load_state_dict

__all__ = ["ARCHS", "PRESETS", "torchvision_key", "detect_arch", "convert_torchvision_params",
           "converted_config", "convert_torchvision"]

# the torchvision architectures and the presets they convert to
MASK, KEYPOINT = "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"
ARCHS = (MASK, KEYPOINT)
PRESETS = {MASK: "torchvision_mask_rcnn_r50_fpn", KEYPOINT: "torchvision_keypoint_rcnn_r50_fpn"}

# mxmask's BatchNorm parameter names -> FrozenBatchNorm2d's
_BN_NAMES = {"gamma": "weight", "beta": "bias"}
# mxmask head prefix -> torchvision prefix, for the layers whose names do not depend on the
# key-name version
_HEADS = {
    "rpn.head.logits": "rpn.head.cls_logits",
    "rpn.head.deltas": "rpn.head.bbox_pred",
    "box_head.fcs.0": "roi_heads.box_head.fc6",
    "box_head.fcs.1": "roi_heads.box_head.fc7",
    "box_predictor.cls_score": "roi_heads.box_predictor.cls_score",
    "box_predictor.bbox_pred": "roi_heads.box_predictor.bbox_pred",
    "mask_head.deconv": "roi_heads.mask_predictor.conv5_mask",
    "mask_head.predictor": "roi_heads.mask_predictor.mask_fcn_logits",
    "keypoint_head.deconv": "roi_heads.keypoint_predictor.kps_score_lowres",
}
# leading rows (axis 0) of a torchvision tensor that mxmask does not have: the background
# class's 4 box deltas and mask channel
_DROP = {"box_predictor.bbox_pred": 4, "mask_head.predictor": 1}


def torchvision_key(ours, old=False):
    """The torchvision state_dict key that fills the mxmask parameter ``ours``.

    ``backbone.bottom_up.*`` <- ``backbone.body.*`` (the same ResNet-50 names, stride in the 3x3
    conv in both; FrozenBatchNorm2d ``weight``/``bias`` -> ``gamma``/``beta``, eps 1e-5 in both),
    ``backbone.fpn.P{i+2}_conv_lat`` / ``P{i+2}_conv1`` <- ``fpn.inner_blocks.i`` /
    ``layer_blocks.i`` (i = 0 is C2's), ``rpn.head.{conv,logits,deltas}`` <- ``rpn.head.{conv,
    cls_logits,bbox_pred}``, ``box_head.fcs.{0,1}`` <- ``roi_heads.box_head.fc{6,7}``,
    ``mask_head.convs.i`` / ``deconv`` / ``predictor`` <- ``roi_heads.mask_head.i`` /
    ``mask_predictor.conv5_mask`` / ``mask_fcn_logits``, ``keypoint_head.convs.i`` / ``deconv``
    <- ``roi_heads.keypoint_head.{2i}`` (a Sequential of Conv2d and ReLU) /
    ``keypoint_predictor.kps_score_lowres``.

    Args:
        ours: an mxmask structural parameter name (``backbone.fpn.P2_conv_lat.weight``).
        old: the key names of torchvision's published v1 files (``inner_blocks.0.weight``,
            ``rpn.head.conv.weight``, ``mask_head.mask_fcn1.weight``) instead of today's
            (``inner_blocks.0.0.weight``, ``rpn.head.conv.0.0.weight``,
            ``mask_head.0.0.weight``).

    Returns:
        ``(key, drop)``: the torchvision key and the number of leading rows to drop from its
        tensor; ``(None, 0)`` for a parameter torchvision has no counterpart of (anchors).
    """
    prefix, _, leaf = ours.rpartition(".")
    if ours.startswith("backbone.bottom_up."):
        return "backbone.body.%s.%s" % (prefix[len("backbone.bottom_up."):],
                                        _BN_NAMES.get(leaf, leaf)), 0
    m = re.match(r"backbone\.fpn\.P(\d)_(conv_lat|conv1)$", prefix)
    if m:
        block = "inner_blocks" if m.group(2) == "conv_lat" else "layer_blocks"
        return "backbone.fpn.%s.%d%s.%s" % (block, int(m.group(1)) - 2, "" if old else ".0",
                                            leaf), 0
    if prefix == "rpn.head.conv":
        return "rpn.head.conv%s.%s" % ("" if old else ".0.0", leaf), 0
    m = re.match(r"mask_head\.convs\.(\d+)$", prefix)
    if m:
        i = int(m.group(1))
        return ("roi_heads.mask_head.mask_fcn%d.%s" % (i + 1, leaf) if old else
                "roi_heads.mask_head.%d.0.%s" % (i, leaf)), 0
    m = re.match(r"keypoint_head\.convs\.(\d+)$", prefix)
    if m:          # a Sequential of Conv2d and ReLU: the convs are its even entries
        return "roi_heads.keypoint_head.%d.%s" % (2 * int(m.group(1)), leaf), 0
    if prefix in _HEADS:
        return "%s.%s" % (_HEADS[prefix], leaf), _DROP.get(prefix, 0)
    return None, 0


def detect_arch(names):
    """The architecture a state dict's keys show.

    Args:
        names: the keys.

    Returns:
        ``keypointrcnn_resnet50_fpn`` when they include the keypoint predictor
        (``roi_heads.keypoint_predictor.*``), ``maskrcnn_resnet50_fpn`` when they include the
        mask predictor, else None.
    """
    if any(k.startswith("roi_heads.keypoint_predictor.") for k in names):
        return KEYPOINT
    if any(k.startswith("roi_heads.mask_predictor.") for k in names):
        return MASK
    return None


def _key_table(net):
    """``{torchvision key: (mxmask name, drop)}`` over both key-name versions, and
    ``{mxmask name: (new key, old key)}`` for the parameters to fill."""
    table, wanted = {}, {}
    for ours in net._collect_params_with_prefix():
        if is_anchor_param(ours):
            continue
        new, drop = torchvision_key(ours)
        old, _ = torchvision_key(ours, old=True)
        wanted[ours] = (new, old)
        if new is not None:
            table[new] = table[old] = (ours, drop)
    return table, wanted


def convert_torchvision_params(arrays, net, arch, source="torchvision state_dict"):
    """Copy torchvision arrays into ``net`` (a MaskRCNN of the arch's preset).

    The keys map through :func:`torchvision_key`, in either key-name version;
    ``num_batches_tracked`` buffers are ignored. mxmask's class-specific box deltas and mask
    channels have no background: the first 4 rows of ``bbox_pred`` and channel 0 of
    ``mask_fcn_logits`` are dropped (``cls_score`` keeps its background column 0, as mxmask's).
    Every other tensor is copied as it is (ConvTranspose2d's ``(in, out, kh, kw)`` is
    Conv2DTranspose's layout too). Every key must be used and every mxmask parameter but the
    anchor constants filled, with equal shapes.

    Args:
        arrays: ``{torchvision key: numpy array}`` (a state dict as read by
            :func:`mxmask.convert.torch_file.load_state_dict`).
        net: the mxmask network, initialised.
        arch: ``maskrcnn_resnet50_fpn`` or ``keypointrcnn_resnet50_fpn`` (for the messages).
        source: the file name the messages start with.

    Returns:
        the number of arrays copied.

    Raises:
        UserError: one line naming ``source`` and listing the missing, unexpected, duplicate
        (old and new name of one tensor) and wrong-shape keys.
    """
    ours = net._collect_params_with_prefix()
    table, wanted = _key_table(net)
    names = [k for k in arrays if not k.endswith(".num_batches_tracked")]
    # name the missing keys as the file names its keys (published v1 files use the old names)
    new_keys = {pair[0] for pair in wanted.values()}
    old_style = any(k in table and k not in new_keys for k in names)
    mapping, unexpected, wrong, filled, duplicate = {}, [], [], {}, []
    for key in names:
        if key not in table:
            unexpected.append(key)
            continue
        target, drop = table[key]
        if target in filled:
            duplicate.append("%s and %s" % (filled[target], key))
            continue
        filled[target] = key
        mapping[key] = (target, drop)
        got, want = tuple(arrays[key].shape), tuple(ours[target].shape)
        expected = (want[0] + drop,) + want[1:]
        if got != expected:
            wrong.append("%s %s (expected %s)" % (key, got, expected))
    missing = [(pair[1] if old_style else pair[0]) or ours_name
               for ours_name, pair in wanted.items() if ours_name not in filled]
    if missing or unexpected or wrong or duplicate:
        found = detect_arch(names)
        hint = ""
        if found is None and any(k.startswith("roi_heads.box_predictor.") for k in names):
            hint = "no mask or keypoint predictor keys (a Faster R-CNN file?); "
        elif found is None:
            hint = "no torchvision detection model keys; "
        elif found != arch:
            hint = "the keys are %s's; " % found
        report = mismatch_report(missing, unexpected, wrong)
        if duplicate:
            report += "%sduplicate %d: %s" % ("; " if report else "", len(duplicate),
                                              ", ".join(sorted(duplicate)[:3]))
        raise UserError("%s: not torchvision %s weights (%s%s)" % (source, arch, hint, report))
    for key, (target, drop) in mapping.items():
        value = np.ascontiguousarray(arrays[key][drop:], dtype=np.float32)
        ours[target].set_data(value)
    return len(mapping)


def converted_config(arch):
    """The config of a converted checkpoint.

    Args:
        arch: ``maskrcnn_resnet50_fpn`` or ``keypointrcnn_resnet50_fpn``.

    Returns:
        the arch's preset with the usual datasets/coco paths and, for the mask arch, 90 classes
        (torchvision's label i is COCO category id i, ``"N/A"`` at the 10 ids COCO does not
        use), so that the results json scores on COCO val2017 as it is; for the keypoint arch
        ``person`` (id 1) with COCO's 17 keypoints, flip map and skeleton.
    """
    cfg = get_config(PRESETS[arch])
    d = cfg.data
    if arch == MASK:
        d.class_names = coco_names_by_id()
        d.category_ids = list(range(1, 91))
        paths = COCO_INSTANCES_PATHS
    else:
        from ..data.coco import keypoint_flip_map
        d.class_names, d.category_ids = ["person"], [1]
        d.keypoint_names = list(COCO_PERSON_KEYPOINTS)
        d.keypoint_flip_map = keypoint_flip_map(d.keypoint_names)
        d.skeleton = [list(pair) for pair in COCO_PERSON_SKELETON]
        d.keypoint_category_ids = [1]
        paths = COCO_KEYPOINTS_PATHS
    cfg.model.num_classes = len(d.class_names)
    for key, value in paths.items():
        setattr(d, key, value)
    cfg.output_dir = ""
    return cfg


def convert_torchvision(src, out_dir, arch=None):
    """Convert the torchvision file ``src`` into the checkpoint folder ``out_dir``.

    Args:
        src: a ``torch.save`` state dict file (or a checkpoint dict holding one).
        out_dir: the checkpoint folder; refused (UserError) if it holds a checkpoint other than
            an earlier conversion.
        arch: ``maskrcnn_resnet50_fpn`` / ``keypointrcnn_resnet50_fpn``, or None to detect it
            from the keys (:func:`detect_arch`; the mask arch when they show neither).

    Returns:
        ``{"params": path, "config": path, "copied": n, "arch": arch, "preset": name,
        "wrapper": None | "model" | "state_dict"}``.

    Raises:
        UserError: one line naming the file, the folder or ``--arch``.
    """
    from ..modeling.rcnn import build_model
    if arch is not None and arch not in ARCHS:
        raise UserError("--arch %s: expected one of %s" % (arch, ", ".join(ARCHS)))
    check_out_dir(out_dir)
    arrays, wrapper = load_state_dict(src)
    arch = arch or detect_arch(arrays) or MASK
    cfg = converted_config(arch)
    net = build_model(cfg)
    copied = convert_torchvision_params(arrays, net, arch, source=src)
    info = write_checkpoint(cfg, net, out_dir, src)
    info.update(copied=copied, arch=arch, preset=PRESETS[arch], wrapper=wrapper)
    return info

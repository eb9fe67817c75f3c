"""The config tree: typed dataclasses, named presets, YAML round trip and ``--set`` overrides.

A config is a tree of dataclasses (:class:`Config` at the root). Every leaf has a type, and a
value set from YAML or from ``--set key=value`` is checked against it. Presets are YAML files in
``mxmask/configs/<name>.yaml`` that override the defaults below; a user's YAML file may start with
``_base_: PRESET`` to build on a preset.

    cfg = get_config("shapes", overrides=["solver.max_iter=100"])
    cfg.model.backbone.depth      # -> 18
    dump_yaml(cfg, "config.yaml"); load_yaml("config.yaml") == cfg   # lossless

Errors are :class:`ConfigError` with one line naming the key (and the file) and, for an unknown
key, the nearest valid keys.
"""
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import yaml

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


# the class name of a label index that stands for no category (torchvision's unused COCO ids):
# its detections are left out of results, and evaluation does not look for its category
UNUSED_CLASS_NAME = "N/A"


class ConfigError(ValueError):
    """A bad config file, key or value. The message is one line meant for the user."""


# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------
@dataclass
class ShapesData:
    """How ``mxmask train`` generates the synthetic dataset when it is missing."""
    root: str = "datasets/shapes"
    train: int = 400
    val: int = 50
    size: int = 192
    seed: int = 0


@dataclass
class DataConfig:
    train_ann: str = "datasets/shapes/annotations/train.json"
    train_images: str = "datasets/shapes/images/train"
    val_ann: str = "datasets/shapes/annotations/val.json"
    val_images: str = "datasets/shapes/images/val"
    num_workers: int = 2
    shapes: ShapesData = field(default_factory=ShapesData)
    # Category names and COCO ids, in contiguous-label order. Filled from the training json when
    # empty, and saved with every checkpoint so that a model can label its outputs without data.
    class_names: List[str] = field(default_factory=list)
    category_ids: List[int] = field(default_factory=list)
    keypoint_names: List[str] = field(default_factory=list)
    keypoint_flip_map: List[int] = field(default_factory=list)
    skeleton: List[List[int]] = field(default_factory=list)
    keypoint_category_ids: List[int] = field(default_factory=list)
    # COCO keypoints are integer pixel indices: the reader adds this to labelled keypoints (the
    # centre of pixel i is i + 0.5 in mxmask's continuous coordinates) and the result writer
    # subtracts it (Detectron2: 0.5; torchvision: 0, its networks learn the indices as they are)
    keypoint_offset: float = 0.5


@dataclass
class InputConfig:
    # Short side for training; several values mean multi-scale training (one drawn per image).
    min_size_train: List[int] = field(default_factory=lambda: [800])
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    flip_prob: float = 0.5
    # Copy-paste augmentation (Ghiasi et al., "Simple Copy-Paste", 2021): the probability that a
    # training image gets instances of another training image pasted on it. Needs masks.
    copy_paste_prob: float = 0.0
    copy_paste_sources: int = 1          # how many other images' instances are pasted, in turn
    # RGB in [0, 255] -> (x/255 - mean) / std, ImageNet statistics (GluonCV convention).
    pixel_mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    pixel_std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    size_divisibility: int = 32
    # The test-time pipeline (data.transforms.TestTransform: predict, eval, the export's meta
    # file and scripts/predict_exported.py), so that a preset feeds its network the tensor of
    # its original framework. Training keeps half_up, cv2 linear and fused.
    # resize_rule: half_up (sizes int(h * scale + 0.5), Detectron2) | gluoncv (GluonCV's
    # resize_short_within: np.round, its own max-size test) | torchvision (its eager
    # GeneralizedRCNNTransform: floor(h * scale)) | torchvision_float32 (the same transform
    # scripted or traced, the scale in float32: a 500x375 image gives 1066x799, not 1066x800)
    resize_rule: str = "half_up"
    # resize_interp: linear (cv2.INTER_LINEAR on uint8; GluonCV's COCO evaluation transform
    # gives the same bytes) | cubic (mx.image.imresize(interp=2): OpenCV's bicubic on uint8,
    # GluonCV's load_test, whose docs call it "area") | bilinear_float (normalise, then
    # torchvision's F.interpolate(bilinear, align_corners=False) on the float image)
    resize_interp: str = "linear"
    # normalize: fused (x * (1 / (255 std)) - mean / std, fast) | stepwise ((x / 255 - mean) /
    # std in float32 steps, as GluonCV and torchvision compute it); at most 4.8e-7 apart
    normalize: str = "fused"
    # The decoder is not a field: OpenCV's (mxmask), mx.image.imread (GluonCV) and PIL's
    # Image.open().convert("RGB") (torchvision) give the same RGB bytes for 8-bit JPEG and PNG
    # files, grey ones included (CMYK JPEGs differ by 1 level, 16-bit PNGs by much more).


@dataclass
class BackboneConfig:
    depth: int = 50                      # ResNet-v1b depth: 18, 34, 50 or 101
    width: int = 64                      # stem width; 64 is the standard ResNet
    norm: str = "frozen_bn"              # frozen_bn | bn | syncbn | gn
    gn_groups: int = 32
    pretrained: str = ""                 # local GluonCV ImageNet .params file, or "" for none
    freeze_at: int = 2                   # 0: train all; 1: freeze stem; k: stem + res2..res(k)


@dataclass
class FPNConfig:
    out_channels: int = 256
    p6: str = "maxpool"                  # maxpool (Detectron2) | conv (GluonCV: 3x3/2, P5 lateral)
    norm: str = ""                       # "" or gn


@dataclass
class AnchorConfig:
    sizes: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    strides: List[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])
    offset: float = 0.0                  # anchor centre offset in units of the stride
    # detectron2 | gluoncv (rounded sizes, +1 boxes) | torchvision (AnchorGenerator: the
    # detectron2 cell anchors rounded to integers; its proposals keep boxes with w, h >= min_size)
    style: str = "detectron2"


@dataclass
class RPNConfig:
    conv_channels: int = 256             # 1024 for GluonCV
    pre_nms_topk_train: int = 2000
    pre_nms_topk_test: int = 1000
    post_nms_topk_train: int = 1000
    post_nms_topk_test: int = 1000
    nms_thresh: float = 0.7
    min_size: float = 0.0
    per_level_nms: bool = True           # False: one NMS over all levels (GluonCV)
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    smooth_l1_beta: float = 0.0
    # what divides both RPN losses: batch_size (batch_size_per_image x images, Detectron2) |
    # sampled (the anchors actually sampled in the batch, torchvision); the same whenever every
    # image has enough anchors to fill its batch_size_per_image
    loss_normalizer: str = "batch_size"
    # an anchor more than this fraction inside a crowd box (intersection / anchor area) is never
    # a negative; >= 1: crowd boxes play no part (torchvision and Detectron2 drop crowd
    # instances when they load the data)
    crowd_ioa: float = 0.7


@dataclass
class BoxHeadConfig:
    pooler_resolution: int = 7
    # FPN level of a roi, floor(4 + log2(sqrt(area) / 224)) clamped to P2..P5, in one of three
    # numerics (poolers.assign_fpn_levels): detectron2 | gluoncv (+1 areas, eps 1e-6 inside the
    # log) | torchvision (LevelMapper: eps 1e-6 added after the log); "": gluoncv when
    # model.box_plus_one, else detectron2
    level_mapper: str = ""
    pool_then_avgpool: bool = False      # GluonCV: RoIAlign at 14x14, then 3x3/2 avg pool to 7x7
    sampling_ratio: int = 0
    aligned: bool = True
    num_conv: int = 0                    # Detectron2 NUM_CONV: 3x3 convs on the pooled features
    conv_dim: int = 256                  # before the fc layers ("4conv1fc": 4 convs, num_fc 1)
    norm: str = ""                       # "" or gn (after each conv; gn_groups of the backbone)
    num_fc: int = 2
    fc_dim: int = 1024
    bbox_reg_weights: List[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou_thresh: float = 0.5
    smooth_l1_beta: float = 0.0
    bbox_reg_loss: str = "smooth_l1"     # smooth_l1 | giou (Detectron2 BBOX_REG_LOSS_TYPE)
    bbox_reg_loss_weight: float = 1.0    # Detectron2 BBOX_REG_LOSS_WEIGHT
    cls_agnostic_bbox_reg: bool = False  # Detectron2 CLS_AGNOSTIC_BBOX_REG: one box for all classes


@dataclass
class MaskHeadConfig:
    pooler_resolution: int = 14
    num_conv: int = 4
    conv_dim: int = 256
    resolution: int = 28
    norm: str = ""                       # "" or gn (after each conv; gn_groups of the backbone;
                                         # Detectron2's ROI_MASK_HEAD.NORM)
    cls_agnostic_mask: bool = False      # Detectron2 CLS_AGNOSTIC_MASK: one mask for all classes
    soft_targets: bool = False           # targets are the fraction of each cell covered, not
                                         # thresholded at 0.5 (Detectron2 thresholds)
    target_aligned: bool = True          # the gt masks are cropped for the targets with
                                         # RoIAlign(aligned=True) (Detectron2); false:
                                         # aligned=False (torchvision's project_masks_on_boxes)
    dice_weight: float = 0.0             # > 0: adds this times a per-roi Dice loss to the
                                         # per-pixel cross-entropy (Detectron2 has none)
    loss_weight: float = 1.0             # the mask loss's weight in the total (Detectron2: 1)
    max_train_rois: int = 0              # > 0: the mask head trains on at most this many of
                                         # an image's positive rois (a random subset, fewer
                                         # convolutions); 0: on all of them (Detectron2)
    image_guide: int = 0                 # > 0: the mask head also sees the input image pooled
                                         # at 28x28, through a 3x3 conv of this many channels
                                         # (roi_heads.ImageGuide); not in Detectron2


@dataclass
class KeypointHeadConfig:
    pooler_resolution: int = 14
    num_conv: int = 8
    conv_dim: int = 512
    resolution: int = 56
    norm: str = ""                       # "" or gn, as the mask head's
    loss_weight: float = 1.0


@dataclass
class ModelConfig:
    num_classes: int = 80                # foreground classes; set from the data when 0
    mask_on: bool = True
    keypoint_on: bool = False
    num_keypoints: int = 17
    box_plus_one: bool = False           # True: widths are x2 - x1 + 1 (GluonCV / Detectron1)
    clip_boxes: bool = True              # clip final boxes to the image (GluonCV does not)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    box_head: BoxHeadConfig = field(default_factory=BoxHeadConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    keypoint_head: KeypointHeadConfig = field(default_factory=KeypointHeadConfig)


@dataclass
class SolverConfig:
    max_iter: int = 90000
    base_lr: float = 0.02
    ims_per_batch: int = 16
    optimizer: str = "sgd"               # sgd (Detectron2) | adam (L2 wd; momentum unused)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "step"            # step | cosine
    steps: List[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_gradient: float = 0.0           # 0 disables
    checkpoint_period: int = 5000
    eval_period: int = 0                 # 0: only at the end
    log_period: int = 20
    nonfinite_policy: str = "stop"       # stop | skip
    dist_timeout: float = 600.0          # seconds a dist kvstore wait may take; 0 = forever
    amp: str = ""                        # "" | bfloat16 | auto: bf16 convs, CPU (precision.py)


@dataclass
class Int8Config:
    """``--dtype int8`` (:mod:`mxmask.quantize`): how the graph is calibrated and what stays
    float32. ``--calib-images``, ``--calib-num`` and ``--calib-mode`` set the first three."""
    # folder of calibration images, resized as at test time; "": the config's data.val_images
    calib_images: str = ""
    # how many of its images, drawn with calib_seed (all when it holds fewer)
    calib_num: int = 32
    # naive: each layer's range is the min and max seen; entropy: the range that keeps the
    # KL divergence of the int8 distribution from the float32 one smallest
    calib_mode: str = "naive"
    calib_seed: int = 0
    # the scales of the weights: one per output channel (channel-wise) or one per layer
    granularity: str = "tensor-wise"
    # graph nodes kept in float32 besides the proposal generator (fnmatch patterns of node
    # names, which `mxmask export --dtype int8` prints); each preset says why it leaves one out
    exclude: List[str] = field(default_factory=list)


@dataclass
class TestConfig:
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    max_dets: int = 100
    mask_thresh: float = 0.5
    # how masks are pasted into the image: detectron2 (aligned bilinear sampling of the 28x28
    # grid over the box, probability >= mask_thresh) | torchvision (its paste_masks_in_image: the
    # grid padded by one cell, resized bilinearly into the box expanded by that cell and rounded
    # to whole pixels, probability > mask_thresh)
    mask_paste: str = "detectron2"
    # > 0: each detection's box becomes the tight box of its pasted mask probability >= this
    # (COCO's box is its segmentation's tight box; below mask_thresh it keeps thin points and
    # limbs); 0: the box head's box (Detectron2). Post-processing: exported graphs output the
    # box head's boxes, and scripts/predict_exported.py applies it from the meta file
    mask_box_thresh: float = 0.0
    # scores times each mask's maskness (the mean probability over its foreground; SOLOv2),
    # rows re-sorted: confident masks rank first (roi_heads.rescore_by_masks; Detectron2 has none)
    mask_score: bool = False
    # a second box-head pass on the detections: boxes regressed again, scores averaged
    # (Cascade R-CNN's test-time refinement with one head; roi_heads.refine_detections)
    refine_boxes: bool = False
    # horizontal-flip test-time augmentation: the box, mask and keypoint heads also run on the
    # mirrored image and their outputs are averaged (MaskRCNN docstring; Detectron2's
    # TEST.AUG.FLIP). The backbone and the heads run twice per image.
    flip: bool = False
    # drop detections whose width or height is under this many network-input pixels, before
    # the per-class NMS (torchvision's postprocess_detections: 0.01); 0: keep all (Detectron2)
    min_box_size: float = 0.0
    # bicubic: each roi's heatmaps resized to its box in the original image, argmax (Detectron2);
    # taylor: argmax + a second-order sub-cell step; torchvision: bicubic at the box's size in
    # network-input pixels, then scaled to the original image (heatmaps_to_keypoints)
    keypoint_decode: str = "bicubic"
    keypoint_oks_sigmas: List[float] = field(default_factory=list)
    int8: Int8Config = field(default_factory=Int8Config)


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "output"
    data: DataConfig = field(default_factory=DataConfig)
    input: InputConfig = field(default_factory=InputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    test: TestConfig = field(default_factory=TestConfig)


CHOICES = {
    "test.int8.calib_mode": ("naive", "entropy"),
    "test.int8.granularity": ("channel-wise", "tensor-wise"),
    "model.backbone.norm": ("frozen_bn", "bn", "syncbn", "gn"),
    "model.backbone.depth": (18, 34, 50, 101),
    "input.resize_rule": ("half_up", "gluoncv", "torchvision", "torchvision_float32"),
    "input.resize_interp": ("linear", "cubic", "bilinear_float"),
    "input.normalize": ("fused", "stepwise"),
    "model.fpn.p6": ("maxpool", "conv"),
    "model.anchor.style": ("detectron2", "gluoncv", "torchvision"),
    "model.box_head.level_mapper": ("", "detectron2", "gluoncv", "torchvision"),
    "model.fpn.norm": ("", "gn"),
    "model.box_head.norm": ("", "gn"),
    "model.rpn.loss_normalizer": ("batch_size", "sampled"),
    "model.box_head.bbox_reg_loss": ("smooth_l1", "giou"),
    "model.mask_head.norm": ("", "gn"),
    "model.keypoint_head.norm": ("", "gn"),
    "solver.lr_schedule": ("step", "cosine"),
    "solver.optimizer": ("sgd", "adam"),
    "solver.nonfinite_policy": ("stop", "skip"),
    "solver.amp": ("", "bfloat16", "auto"),
    "test.keypoint_decode": ("bicubic", "taylor", "torchvision"),
    "test.mask_paste": ("detectron2", "torchvision"),
}


# The allowed range of a numeric key: (low, low included, high, high included); None: unbounded.
# NaN is in no range. Checked with CHOICES, for YAML files, presets and --set alike.
_PROBABILITY = (0.0, True, 1.0, True)
RANGES = {
    "solver.max_iter": (0, False, None, False),
    "solver.ims_per_batch": (0, False, None, False),
    "data.num_workers": (0, True, None, False),
    "input.flip_prob": _PROBABILITY,
    "input.copy_paste_prob": _PROBABILITY,
    "model.rpn.nms_thresh": _PROBABILITY,
    "model.rpn.positive_fraction": _PROBABILITY,
    "model.rpn.fg_iou_thresh": _PROBABILITY,
    "model.rpn.bg_iou_thresh": _PROBABILITY,
    "model.rpn.crowd_ioa": (0.0, True, None, False),   # >= 1 turns the crowd test off
    "model.box_head.positive_fraction": _PROBABILITY,
    "model.box_head.fg_iou_thresh": _PROBABILITY,
    "test.score_thresh": _PROBABILITY,
    "test.nms_thresh": _PROBABILITY,
    "test.mask_thresh": _PROBABILITY,
    # 1 would keep no pixel, so no box: the tight box needs a probability below 1
    "test.mask_box_thresh": (0.0, True, 1.0, False),
    "test.int8.calib_num": (1, True, None, False),
}


# --------------------------------------------------------------------------------------------
# Conversion between dicts and the tree, with type checks
# --------------------------------------------------------------------------------------------
def _all_keys(node, prefix=""):
    """Every dotted key of the tree under ``node``, sections included."""
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        name = prefix + f.name
        keys.append(name)
        if dataclasses.is_dataclass(value):
            keys.extend(_all_keys(value, name + "."))
    return keys


def _unknown_key(key, root, where):
    """Raise ConfigError for ``key``, naming the nearest valid keys of ``root``."""
    near = difflib.get_close_matches(key, _all_keys(root), n=3, cutoff=0.5)
    hint = ("; did you mean " + " or ".join(near) + "?") if near else ""
    raise ConfigError("%sunknown config key '%s'%s" % (where, key, hint))


def _coerce(value, tp, key, where):
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, where)
    if origin in (list, List, tuple, Tuple):
        (inner,) = typing.get_args(tp)[:1] or (typing.Any,)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and inner is not str:
            value = [value]  # a scalar where a list is expected: one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError("%s%s: expected a list, got %r" % (where, key, value))
        return [_coerce(v, inner, key + "[%d]" % i, where) for i, v in enumerate(value)]
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError("%s%s: expected true or false, got %r" % (where, key, value))
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError("%s%s: expected an integer, got %r" % (where, key, value))
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value and key not in RANGES:  # NaN: no setting means anything with it
                raise ConfigError("%s%s: expected a number, got nan" % (where, key))
            return float(value)
        raise ConfigError("%s%s: expected a number, got %r" % (where, key, value))
    if tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise ConfigError("%s%s: expected a string, got %r" % (where, key, value))
    if isinstance(value, list):  # nested lists such as List[List[int]]
        return value
    raise ConfigError("%s%s: unsupported type %r" % (where, key, tp))


def _field_types(node):
    """``{field name: annotation}`` of a dataclass node."""
    return typing.get_type_hints(type(node))


def _range_text(bounds):
    """``(low, low included, high, high included)`` as ``> 0``, ``>= 0``, ``in [0, 1)``."""
    low, low_in, high, high_in = bounds
    if high is None:
        return "%s %g" % (">=" if low_in else ">", low)
    return "in %s%g, %g%s" % ("[" if low_in else "(", low, high, "]" if high_in else ")")


def _in_range(value, bounds):
    """Whether the number ``value`` lies in ``bounds`` (NaN never does)."""
    low, low_in, high, high_in = bounds
    if value != value:  # NaN
        return False
    if low is not None and (value < low or (value == low and not low_in)):
        return False
    if high is not None and (value > high or (value == high and not high_in)):
        return False
    return True


def _check_choice(key, value, where):
    """Raise ConfigError when ``key`` has :data:`CHOICES` and ``value`` is not one of them, or
    has :data:`RANGES` and ``value`` lies outside its range."""
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError("%s%s: expected one of %s, got %r"
                          % (where, key, ", ".join(repr(c) for c in CHOICES[key]), value))
    if key in RANGES and not _in_range(value, RANGES[key]):
        raise ConfigError("%s%s: expected a value %s, got %r"
                          % (where, key, _range_text(RANGES[key]), value))


def check_config(cfg, where=""):
    """Check the settings that depend on each other, once every file and override is applied.

    Args:
        cfg: the :class:`Config`.
        where: the message prefix naming the source (``"file.yaml: "``).

    Returns:
        ``cfg``.

    Raises:
        ConfigError: one line naming the keys that conflict.
    """
    if cfg.model.box_head.aligned and not cfg.model.clip_boxes:
        # the aligned multi-level pooler (modeling/poolers.py, MultiLevelRoIAlign) pools the
        # detections of the mask and keypoint heads exactly only when they lie inside the image
        raise ConfigError("%smodel.box_head.aligned: true needs model.clip_boxes: true (the "
                          "aligned pooler is exact only for boxes inside the image); set "
                          "model.clip_boxes=true or model.box_head.aligned=false" % where)
    return cfg


def merge_dict(cfg, d, root=None, prefix="", where=""):
    """Merge a nested dict into the config tree in place, checking keys, types and choices.

    Args:
        cfg: a node of the tree (:class:`Config` or one of its sections).
        d: the nested dict (a YAML file's content).
        root: the tree's root, for the nearest-key hint (default ``cfg``).
        prefix: the dotted key of ``cfg`` in the tree, with a trailing dot.
        where: the message prefix naming the source (``"file.yaml: "``).

    Returns:
        ``cfg``.

    Raises:
        ConfigError: an unknown key (with the nearest valid keys), a value of the wrong type,
        not one of :data:`CHOICES` or outside :data:`RANGES`.
    """
    root = cfg if root is None else root
    if not isinstance(d, dict):
        raise ConfigError("%s%s: expected a mapping, got %r" % (where, prefix.rstrip(".") or "config", d))
    types = _field_types(cfg)
    for name, value in d.items():
        key = prefix + str(name)
        if name not in types:
            _unknown_key(key, root, where)
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            merge_dict(current, value, root, key + ".", where)
        else:
            tp = types[name]
            if tp == List[List[int]]:
                value = [[int(x) for x in pair] for pair in (value or [])]
            else:
                value = _coerce(value, tp, key, where)
            _check_choice(key, value, where)
            setattr(cfg, name, value)
    return cfg


def to_dict(cfg):
    """The tree as nested dicts and lists (``dataclasses.asdict``)."""
    return dataclasses.asdict(cfg)


def set_value(cfg, assignment):
    """Apply one ``--set`` override in place.

    Args:
        cfg: the :class:`Config`.
        assignment: ``a.b.c=value``; the value is parsed as YAML (``[640, 800]``, ``true``,
            ``1e-3``), then type-checked; an empty value is "".

    Returns:
        ``cfg``.

    Raises:
        ConfigError: no ``=``, an unknown key or a section, a bad value.
    """
    if "=" not in assignment:
        raise ConfigError("--set %s: expected key=value" % assignment)
    key, text = assignment.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() != "" else ""
    except yaml.YAMLError:
        value = text
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(node) or part not in _field_types(node):
            _unknown_key(key, cfg, "--set: ")
        node = getattr(node, part)
    if not dataclasses.is_dataclass(node) or parts[-1] not in _field_types(node):
        _unknown_key(key, cfg, "--set: ")
    if dataclasses.is_dataclass(getattr(node, parts[-1])):
        raise ConfigError("--set: %s is a section, not a value" % key)
    tp = _field_types(node)[parts[-1]]
    if tp == List[List[int]]:
        value = [[int(x) for x in pair] for pair in (value or [])]
    else:
        value = _coerce(value, tp, key, "--set: ")
    _check_choice(key, value, "--set: ")
    setattr(node, parts[-1], value)
    return cfg


# --------------------------------------------------------------------------------------------
# Presets and files
# --------------------------------------------------------------------------------------------
def unused_labels(cfg):
    """The labels that stand for no category.

    Args:
        cfg: a config with ``data.class_names``.

    Returns:
        the labels whose class name is :data:`UNUSED_CLASS_NAME` (torchvision's unused COCO
        ids), whose detections results leave out.
    """
    return [label for label, name in enumerate(cfg.data.class_names)
            if name == UNUSED_CLASS_NAME]


def list_presets():
    """The preset names (``mxmask/configs/*.yaml``), sorted."""
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def _read_yaml(path):
    """A YAML file's mapping ({} when empty), or ConfigError naming the file."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError("%s: config file not found" % path)
    except yaml.YAMLError as e:
        raise ConfigError("%s: not valid YAML (%s)" % (path, str(e).splitlines()[0]))
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise ConfigError("%s: not a YAML config file (%s)" % (path, type(e).__name__))
    if data is None:
        return {}
    if not isinstance(data, dict):
        got = "a list" if isinstance(data, list) else "the single value %.40r" % (data,)
        raise ConfigError("%s: expected a mapping of config keys at the top level, got %s"
                          % (path, got))
    return data


def _load_into(cfg, path, depth=0):
    """Merge the file ``path`` into ``cfg``, its ``_base_`` chain first (at most 8 deep)."""
    if depth > 8:
        raise ConfigError("%s: _base_ chain is too deep (a cycle?)" % path)
    data = _read_yaml(path)
    base = data.pop("_base_", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError("%s: _base_: expected a preset name or a YAML path, got %r"
                          % (path, base))
    if base:
        _load_into(cfg, _resolve_name(base, os.path.dirname(path)), depth + 1)
    return merge_dict(cfg, data, where="%s: " % path)


def _resolve_name(name, relative_to="."):
    """A preset name or YAML path -> the file to read (a relative ``_base_`` path is taken
    from ``relative_to`` first)."""
    if name.endswith((".yaml", ".yml")):
        candidate = name if os.path.isabs(name) else os.path.join(relative_to, name)
        if os.path.exists(candidate) or not os.path.exists(name):
            return candidate
        return name
    path = os.path.join(PRESET_DIR, name + ".yaml")
    if not os.path.exists(path):
        near = difflib.get_close_matches(name, list_presets(), n=3, cutoff=0.3)
        hint = ("; did you mean " + " or ".join(near) + "?") if near else ""
        raise ConfigError("unknown preset '%s' (presets: %s)%s" % (name, ", ".join(list_presets()), hint))
    return path


def get_config(name_or_path="shapes", overrides=()):
    """Build a config.

    Args:
        name_or_path: a preset name or a YAML file (which may build on a preset with
            ``_base_:``).
        overrides: ``key=value`` strings, applied in order (:func:`set_value`).

    Returns:
        the :class:`Config`: the defaults, then the file, then the overrides.

    Raises:
        ConfigError: an unknown preset (with the nearest names), a missing or invalid file, a
        bad key or value (:data:`CHOICES`, :data:`RANGES`), settings that conflict
        (:func:`check_config`).
    """
    cfg = Config()
    _load_into(cfg, _resolve_name(name_or_path))
    for assignment in overrides or ():
        set_value(cfg, assignment)
    return check_config(cfg)


def load_yaml(path):
    """Load a config file.

    Args:
        path: a full config saved by :func:`dump_yaml`, or any partial YAML over the defaults.

    Returns:
        the :class:`Config`.

    Raises:
        ConfigError: a missing or invalid file, a bad key or value, settings that conflict.
    """
    return check_config(_load_into(Config(), path), "%s: " % path)


def dump_yaml(cfg, path=None):
    """The whole config as YAML; :func:`load_yaml` reads it back equal.

    Args:
        cfg: the :class:`Config`.
        path: when given, the text is also written there, atomically.

    Returns:
        the YAML text.
    """
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    if path is not None:
        from .utils import atomic_write_text
        atomic_write_text(path, text)
    return text

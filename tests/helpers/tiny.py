"""Test helper (not a test module): a tiny random-init shapes checkpoint for the inference,
evaluation and CLI tests.

``build_tiny_checkpoint`` saves a random-init shapes model with small input sizes whose config
points at the ``shapes_dataset`` fixture's val split.
"""
import os

import mxnet as mx

from mxmask.config import get_config
from mxmask.data.coco import load_coco
from mxmask.engine.checkpoint import save_checkpoint, save_config
from mxmask.modeling.rcnn import build_model

SMALL = ["input.min_size_test=128", "input.max_size_test=160", "test.max_dets=20",
         "model.rpn.post_nms_topk_test=100", "data.num_workers=0",
         # the fc-only box head: with random weights its top detections mix keypoint and plain
         # classes, which the prediction and evaluation tests need (the preset's conv head
         # gives one class at random init; it is tested in test_roi_heads and test_export)
         "model.box_head.num_conv=0", "model.box_head.num_fc=2",
         # one box-head pass (test_cli_eval compares it with --set test.refine_boxes=true) and
         # its boxes, not the masks' (test.mask_box_thresh: test_postprocess, test_export)
         "test.refine_boxes=false", "test.mask_box_thresh=0",
         # --dtype int8 calibrates naively: the preset's entropy search costs about a minute here
         "test.int8.calib_mode=naive"]


def shapes_paths(root, split):
    return (os.path.join(root, "annotations", split + ".json"),
            os.path.join(root, "images", split))


def build_tiny_checkpoint(shapes_dataset, out, overrides=(), seed=0):
    """A random-init shapes checkpoint (5 classes, 7 keypoints) in ``out``; returns its cfg."""
    train_ann, train_images = shapes_paths(shapes_dataset, "train")
    info = load_coco(train_ann, train_images)[1]
    cfg = get_config("shapes", ["model.num_classes=%d" % info.num_classes,
                                "model.num_keypoints=%d" % info.num_keypoints]
                     + SMALL + list(overrides))
    for key, value in info.to_dict().items():
        setattr(cfg.data, key, value)
    cfg.data.val_ann, cfg.data.val_images = shapes_paths(shapes_dataset, "val")
    cfg.data.train_ann, cfg.data.train_images = train_ann, train_images
    mx.random.seed(seed)
    net = build_model(cfg)
    save_config(cfg, out)
    save_checkpoint(out, net, None, 0, 0)
    return cfg


# the tiny model that `mxmask train` runs in the trainer, resume and dist tests
TINY = ["input.min_size_train=[96]", "input.max_size_train=128", "input.min_size_test=96",
        "input.max_size_test=128", "solver.ims_per_batch=2", "model.backbone.width=16",
        "model.backbone.gn_groups=4", "model.fpn.out_channels=16", "model.rpn.conv_channels=16",
        "model.box_head.fc_dim=32", "model.box_head.num_conv=0", "model.box_head.num_fc=2",
        "model.mask_head.num_conv=1", "model.mask_head.conv_dim=16",
        "model.keypoint_head.num_conv=1", "model.keypoint_head.conv_dim=16",
        "model.rpn.pre_nms_topk_train=200", "model.rpn.post_nms_topk_train=100",
        "model.rpn.pre_nms_topk_test=200", "model.rpn.post_nms_topk_test=50",
        "model.rpn.batch_size_per_image=64", "model.box_head.batch_size_per_image=32",
        "test.max_dets=20", "solver.warmup_iters=0", "solver.log_period=1",
        # the mechanics tests (loss descent in a few steps) were tuned with SGD at 0.02; the
        # shapes preset itself trains with Adam
        "solver.optimizer=sgd", "solver.base_lr=0.02",
        # and with half of the sampled rois positive (the preset takes three quarters), the L1
        # box loss, no GroupNorm in the mask and keypoint heads and a mask head that does not
        # see the image (the preset: GIoU, GN, image_guide; tests/test_training.py)
        "model.box_head.positive_fraction=0.5", "model.box_head.bbox_reg_loss=smooth_l1",
        "model.box_head.bbox_reg_loss_weight=1.0", "model.mask_head.norm=",
        "model.keypoint_head.norm=", "model.mask_head.image_guide=0",
        # float32 convolutions whatever the preset's solver.amp (bf16: tests/test_precision.py)
        "solver.amp=",
        "data.num_workers=0",
        # always some detections, so that the evaluation after training has entries to score
        "test.score_thresh=0.0"]


def tiny_args(ds, out, *extra):
    """``mxmask train`` arguments of the tiny model on the dataset in ``ds``."""
    sets = TINY + ["data.train_ann=%s/annotations/train.json" % ds,
                   "data.train_images=%s/images/train" % ds,
                   "data.val_ann=%s/annotations/val.json" % ds,
                   "data.val_images=%s/images/val" % ds] + list(extra)
    args = []
    for s in sets:
        args += ["--set", s]
    return args + ["--out", str(out)]


def tiny_cfg(ds, out, *extra):
    args = tiny_args(ds, out, *extra)
    cfg = get_config("shapes", [a for a in args[:-2] if a != "--set"])
    cfg.output_dir = str(out)
    return cfg


def load_tiny_params(cfg, path):
    from mxmask.modeling.rcnn import build_model
    net = build_model(cfg)
    net.load_parameters(path)
    return {k: v.data().asnumpy() for k, v in net.collect_params().items()}

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
         # one box-head pass (test_eval_cli compares it with --set test.refine_boxes=true) and
         # its boxes, not the masks' (test.mask_box_thresh: test_postprocess, test_export)
         "test.refine_boxes=false", "test.mask_box_thresh=0"]


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

#!/usr/bin/env bash
# Speed of the shipped presets on this machine. Arguments are passed to `mxmask bench`;
# docs/benchmarks.md ("How `mxmask bench` measures") says what every number it prints and writes
# holds, and keeps the measured figures with their commands, machines and dates.
#
# Inference, stage by stage, with the network's GMAC and achieved GFLOP/s:
#   scripts/bench.sh --preset mask_rcnn_r50_fpn --size 800x1344 --runs 5
# Against GluonCV's mask_rcnn_fpn_resnet50_v1b_coco on the same input (100 detections, its CPU
# RoIAlign bug worked around), inference and a training step, plus a plain ResNet-50 forward
# (fp32 and MKLDNN-fused) for the machine's GFLOP/s; JSON record and stage chart:
#   scripts/bench.sh --preset mask_rcnn_r50_fpn --size 800x1344 --runs 5 --train \
#       --against gluoncv --json bench.json --chart stages.png
# The GluonCV-equivalent architecture in mxmask against GluonCV itself:
#   scripts/bench.sh --preset gluoncv_mask_rcnn_r50_fpn --size 800x1344 --runs 5 --train \
#       --against gluoncv --json bench_gluoncv_preset.json --chart stages_gluoncv_preset.png
# Keypoint R-CNN (keypoint head also timed on exactly 10 and 100 rois):
#   scripts/bench.sh --preset keypoint_rcnn_r50_fpn --size 800x1344 --runs 5 --resnet50 \
#       --json bench_keypoint.json --chart stages_keypoint.png
# Against torchvision's maskrcnn_resnet50_fpn (the same architecture on both sides), run by a
# Python with torch and torchvision (--torch-python or MXMASK_TORCH_PYTHON):
#   scripts/bench.sh --preset torchvision_mask_rcnn_r50_fpn --size 800x1344 --runs 5 \
#       --against torchvision --torch-python tv/bin/python --json bench_torchvision.json
# MKLDNN-fused fp32 and bf16 graphs:
#   scripts/bench.sh --preset mask_rcnn_r50_fpn --size 800x1344 --runs 5 --fuse
#   scripts/bench.sh --preset mask_rcnn_r50_fpn --size 800x1344 --runs 5 --fuse --dtype bfloat16
#
# Time on an otherwise idle machine. OpenMP threads spin while they wait, so when other processes
# keep the cores busy, OMP_NUM_THREADS=<cores> can make MXNet many times slower (docs/kernels.md,
# "Threads"); OMP_WAIT_POLICY=PASSIVE avoids that. The thread count and wait policy are recorded
# in the JSON settings.
set -euo pipefail
exec python -m mxmask bench "$@"

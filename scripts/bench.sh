#!/usr/bin/env bash
# Speed of the shipped presets on this machine (see README "Speed"). Arguments are passed to
# `mxmask bench`, e.g.: scripts/bench.sh --preset mask_rcnn_r50_fpn --size 800x1344 --runs 5
set -euo pipefail
exec python -m mxmask bench "$@"

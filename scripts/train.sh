#!/usr/bin/env bash
# Train on one machine, on one or several devices of it.
#
#   scripts/train.sh [mxmask train arguments]
#
# Examples:
#   scripts/train.sh                                          # the shapes preset, defaults
#   scripts/train.sh --ctx cpu:2 --out runs/shapes2           # two CPU contexts
#   scripts/train.sh --config mask_rcnn_r50_fpn --ctx gpu:0,1,2,3 --kvstore device \
#       --set solver.ims_per_batch=8 --out runs/r50
#   scripts/train.sh --out runs/r50 --resume                  # continue after a crash / kill
#
# The global batch (solver.ims_per_batch) is split across the contexts of --ctx, uneven
# counts allowed; --kvstore device (default) or local sums the gradients. PYTHON selects the
# interpreter (default: python on PATH).
set -euo pipefail
exec "${PYTHON:-python}" -m mxmask train "$@"

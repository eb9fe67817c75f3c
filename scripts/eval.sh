#!/usr/bin/env bash
# COCO evaluation of a checkpoint: a thin wrapper around `mxmask eval`.
#
#   scripts/eval.sh CKPT [--ann GT.json --images DIR] [--out results.json] [--out-dir DIR]
#                        [--plots] [--ctx cpu:2] [--shard RANK/NUM] ...
#   scripts/eval.sh --results results.json --ann GT.json [--sigmas S ...]
#
# Every argument goes to `python -m mxmask eval` unchanged (see `mxmask eval --help`); the
# exit code is mxmask's (0 done, 2 bad input). Set PYTHON to choose the interpreter.
set -euo pipefail
if [[ $# -eq 0 ]]; then
    echo "usage: $0 CKPT [mxmask eval options]   (or: $0 --results R.json --ann GT.json)" >&2
    exit 2
fi
# run this checkout's mxmask, installed or not
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m mxmask eval "$@"

#!/usr/bin/env bash
# Regenerate the committed preset graphs (symbols/), check them, or export a checkpoint.
#
#   scripts/export.sh                  rewrite symbols/<preset>-symbol.json from the code
#   scripts/export.sh --check          compare symbols/ with the code; exit 1 and list the
#                                      differing nodes/attributes when they drifted
#   scripts/export.sh CKPT --out PREFIX [--size HxW] [--fuse] [--dtype float32|bfloat16]
#                                      the same as `mxmask export CKPT ...`
#
# The preset graphs need no weights (they are built from the code); load them
# with the PREFIX-0000.params of `mxmask export` (see symbols/README.md). Set PYTHON to choose
# the interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
if [[ $# -eq 0 ]]; then
    exec "$PY" -m mxmask.graph --symbols "$ROOT/symbols"
elif [[ "$1" == "--check" ]]; then
    exec "$PY" -m mxmask.graph --check "$ROOT/symbols"
else
    exec "$PY" -m mxmask export "$@"
fi

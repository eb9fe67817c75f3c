#!/usr/bin/env bash
# Runs the tests that need torch (torchvision as an outside reference), which CI skips, in
# mxmask's environment, with a torch interpreter for the torch side:
#
#   . v/bin/activate && dev/check_torchvision.sh [PYTEST ARGS]
#
# Every test whose name contains "torchvision" runs, and -rs lists any that still skip.
# The torch interpreter is $MXMASK_TORCH_PYTHON when set; otherwise the script makes a virtual
# environment of its own in $TORCH_ENV (default .venv-torch) and installs $TORCH_PACKAGES
# (default "torch torchvision pillow") there, once. torch never enters mxmask's environment:
# GluonCV 0.10.5 refuses to import beside torch >= 2.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import mxmask" 2>/dev/null || {
  echo "check_torchvision.sh: run it from mxmask's environment (. v/bin/activate)" >&2; exit 2; }
if [ -z "${MXMASK_TORCH_PYTHON:-}" ]; then
  env_dir=${TORCH_ENV:-.venv-torch}
  if ! "$env_dir/bin/python" -c "import torch, torchvision, PIL" 2>/dev/null; then
    echo "check_torchvision.sh: installing ${TORCH_PACKAGES:-torch torchvision pillow} into $env_dir"
    python3 -m venv "$env_dir"
    # shellcheck disable=SC2086
    "$env_dir/bin/pip" install -q ${TORCH_PACKAGES:-torch torchvision pillow}
  fi
  MXMASK_TORCH_PYTHON="$(cd "$env_dir" && pwd)/bin/python"
fi
export MXMASK_TORCH_PYTHON
"$MXMASK_TORCH_PYTHON" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'at', '$MXMASK_TORCH_PYTHON')"
exec python -m pytest -q -rs tests -k torchvision "$@"

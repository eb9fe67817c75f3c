"""The torch side of the torchvision tests: the interpreter, the reference program, test images.

``TORCH`` is the interpreter named by ``MXMASK_TORCH_PYTHON`` ("" without one: ``needs_torch``
skips, saying how to get one); :func:`torch_side` runs a verb of
``mxmask/convert/torchvision_reference.py`` in it, so torch never enters the test process.
"""
import os
import subprocess

import numpy as np
import pytest

TORCH = os.environ.get("MXMASK_TORCH_PYTHON", "")
REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "mxmask", "convert", "torchvision_reference.py")

needs_torch = pytest.mark.skipif(
    not TORCH, reason="needs a torch interpreter: set MXMASK_TORCH_PYTHON (torch and "
                      "torchvision), or run dev/check_torchvision.sh")


def torch_side(*args):
    """Run a verb of torchvision_reference.py in the torch interpreter; fail with its stderr."""
    run = subprocess.run([TORCH, REFERENCE] + [str(a) for a in args], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def smooth_image(h, w, seed=0, noise=0.1, shift=0.0):
    """An RGB float image in [0, 1] (h, w, 3) with structure at several scales: crossed sine
    waves (phase ``shift``) plus uniform noise of amplitude ``noise`` drawn with ``seed``."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w] / 50.0
    img = np.stack([np.sin(xx * 1.3 + c + shift) * np.cos(yy * 0.7 - c) for c in range(3)],
                   axis=-1)
    return np.clip(img * 0.45 + 0.5 + rng.rand(h, w, 3) * noise, 0, 1)

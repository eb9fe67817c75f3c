"""Mixed-precision training on CPU: bfloat16 convolutions, everything else in float32.

    with conv_precision("bfloat16"):      # while a training graph is called or traced
        y = conv(x)                       # conv: mxmask.modeling.precision.Conv2D
    check_conv_precision("bfloat16", ctxs)  # UserError unless every context can run it
    resolve_amp("auto", ctxs)             # -> "bfloat16" or ""

``solver.amp`` selects it for training: ``""`` (off), ``"bfloat16"``, or ``"auto"``
(:func:`resolve_amp`). RCNNLoss resolves it and traces its stages inside
:func:`conv_precision`; every convolution of the model is a :class:`Conv2D`, so only the
``Convolution`` operators change. Inference and exported graphs are unchanged. What it gives:
docs/training.md, "Mixed precision".

Why not ``mx.contrib.amp``: on MXNet 1.9.1 its bfloat16 mode crashes in the backward of
``Deconvolution`` (oneDNN), and with ``Deconvolution`` kept in float32 the hybridized graph fails
type inference (DEVELOPING.md, "Measured facts about MXNet 1.9.1 on CPU"; docs/training.md,
"Mixed precision"; ``dev/amp_probe.py``).
"""
import contextlib
import functools
import threading

import mxnet as mx
import numpy as np
from mxnet.gluon import nn

from ..utils import UserError

__all__ = ["Conv2D", "conv_precision", "active_conv_dtype", "check_conv_precision",
           "resolve_amp", "PRECISIONS", "BFLOAT16"]

PRECISIONS = ("", "bfloat16")           # what conv_precision takes; solver.amp may also be auto
# MXNet 1.9.1's bfloat16 numpy dtype (mxnet.ndarray.ndarray's table); amp_cast takes it for
# NDArrays and Symbols alike
BFLOAT16 = np.dtype([("bfloat16", np.uint16)])
_ACTIVE = threading.local()


@contextlib.contextmanager
def conv_precision(dtype):
    """Within the block (this thread), :class:`Conv2D` layers called or traced compute their
    convolution in ``dtype``.

    Args:
        dtype: ``"bfloat16"``; ``""`` or None: float32 (no cast).
    """
    if dtype not in PRECISIONS and dtype is not None:
        raise ValueError("conv_precision: expected one of %r, got %r" % (PRECISIONS, dtype))
    previous = active_conv_dtype()
    _ACTIVE.dtype = dtype or ""
    try:
        yield
    finally:
        _ACTIVE.dtype = previous


def active_conv_dtype():
    """``"bfloat16"`` inside :func:`conv_precision("bfloat16")`, else ``""``."""
    return getattr(_ACTIVE, "dtype", "")


class Conv2D(nn.Conv2D):
    """``nn.Conv2D`` (same arguments, parameters, names, and graph outside
    :func:`conv_precision`) whose convolution, inside ``conv_precision("bfloat16")``, runs in
    bfloat16: amp_cast of x, weight and bias to bfloat16, Convolution, amp_cast back to float32,
    then the layer's activation.

    oneDNN accumulates in float32; the weights, their gradients and the optimizer state stay
    float32 (``amp_cast``'s backward casts the gradient back), and normalisation, pooling,
    RoIAlign, the fc layers, the deconvolutions, targets and losses are unchanged. bfloat16 has
    float32's exponent range, so no loss scaling is needed. A convolution with fewer than 16
    input channels (the stem) stays float32. Input (N, C_in, H, W) -> output (N, C_out, H', W')
    float32, as ``nn.Conv2D``.
    """

    def hybrid_forward(self, F, x, weight, bias=None):
        # a convolution of fewer than 16 input channels (the stem's 3) stays float32: oneDNN's
        # bfloat16 kernels gain nothing there and the casts cost time (docs/training.md,
        # "Mixed precision")
        if active_conv_dtype() != "bfloat16" or 0 < self._in_channels < 16:
            return super(Conv2D, self).hybrid_forward(F, x, weight, bias)
        args = [F.amp_cast(a, dtype=BFLOAT16) for a in (x, weight, bias) if a is not None]
        out = F.amp_cast(F.Convolution(*args, name="fwd", **self._kwargs), dtype="float32")
        return self.act(out) if self.act is not None else out


def resolve_amp(amp, ctxs):
    """The precision of the training graph's convolutions for ``solver.amp``.

    ``"auto"`` is bfloat16 when every context is a CPU and this process let oneDNN use the AMX
    tiles (:func:`mxmask.amx_enabled`), else off: without AMX, oneDNN's bfloat16 convolutions
    are no faster than float32 ones (docs/kernels.md, "AMX and bfloat16").

    Args:
        amp: ``solver.amp``: ``""``, ``"bfloat16"`` or ``"auto"``.
        ctxs: the training contexts.

    Returns:
        ``""`` or ``"bfloat16"`` (any other value of ``amp`` is returned as it is, for
        :func:`check_conv_precision` to refuse).
    """
    if amp != "auto":
        return amp or ""
    from .. import amx_enabled
    return "bfloat16" if all(c.device_type == "cpu" for c in ctxs) and amx_enabled() else ""


def check_conv_precision(dtype, ctxs):
    """Raise UserError unless ``dtype`` can run on every context of ``ctxs``.

    bfloat16 convolutions need CPU contexts (MXNet 1.9.1 has no bfloat16 convolution on GPUs)
    and a CPU whose oneDNN has bfloat16 kernels (AVX-512; checked by running one small
    convolution forward and backward).

    Args:
        dtype: the resolved ``solver.amp`` (:func:`resolve_amp`): ``""`` (nothing to check)
            or ``"bfloat16"``.
        ctxs: the training contexts.
    """
    if not dtype:
        return
    if dtype not in PRECISIONS:
        raise UserError("solver.amp: expected '' (off), 'bfloat16' or 'auto', got %r" % (dtype,))
    others = [str(c) for c in ctxs if c.device_type != "cpu"]
    if others:
        raise UserError("solver.amp=bfloat16 runs the convolutions in bfloat16 on CPUs only "
                        "(MXNet 1.9.1 has no bfloat16 GPU convolution); got %s. Train without "
                        "it on GPUs (docs/training.md, \"Mixed precision\")" % ", ".join(others))
    error = _bfloat16_conv_error()
    if error:
        raise UserError("solver.amp=bfloat16: this CPU / MXNet build cannot run a bfloat16 "
                        "convolution (%s); train without solver.amp" % error)


@functools.lru_cache(maxsize=None)
def _bfloat16_conv_error():
    """None if one small bfloat16 convolution runs forward and backward on the CPU, else the
    first line of MXNet's error. Probed once per process."""
    try:
        x = mx.nd.ones((1, 8, 6, 6))
        w = mx.nd.ones((8, 8, 3, 3))
        w.attach_grad()
        with mx.autograd.record():
            y = mx.nd.Convolution(mx.nd.amp_cast(x, dtype=BFLOAT16),
                                  mx.nd.amp_cast(w, dtype=BFLOAT16), kernel=(3, 3), pad=(1, 1),
                                  num_filter=8, no_bias=True)
            y = mx.nd.amp_cast(y, dtype="float32")
        y.backward()
        w.grad.wait_to_read()
    except mx.base.MXNetError as err:
        return str(err).strip().splitlines()[0][:200]
    return None

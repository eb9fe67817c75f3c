"""Compiled CPU operators, built on first use with MXNet's extension API.

    load_ops() -> True when mxmask_roi_align, mxmask_group_norm and mxmask_box_nms exist in
                  mx.nd / mx.sym
    kernels_for(ctxs) -> "mxmask" (CPU contexts and the ops load) or "mxnet"
    resolve_kernels(kernels, ctxs) -> "auto" | "mxnet" | "mxmask" checked, "auto" resolved
    with compiled_kernels(True): ...   # blocks traced inside use the ops (training graph)
    with compiled_kernels(True, ["roi_align", "box_nms"]): ...   # inference: not GroupNorm
    compiled_kernels_active("roi_align" | "group_norm" | "box_nms") -> bool

Three operators, each the same computation as the stock one it replaces, faster on a CPU:

- ``mxmask_roi_align`` (``roi_align.cc``): ``contrib.ROIAlign`` (same sampling, see the file's
  header), whose forward it repeats bit for bit. Its forward pools from a channels-last copy of
  the feature map, vectorised over channels (1000 rois of 256 channels on a 200x336 map: 235 ms
  stock, 84 ms here, 2 threads); the stock CPU backward is one serial loop that recomputes the
  sample positions for every output element (on a ResNet-50 FPN training step at 512x512 its
  two calls took 2.8 s of 7.8 s), this one is parallel.
- ``mxmask_group_norm`` (``group_norm.cc``): the GroupNorm of :mod:`mxmask.modeling.norm`, its
  per-group normalisation and per-channel affine in one operator (there a LayerNorm, whose
  backward took 186 ms of the 1.0 s ``shapes`` training step, and an inference-mode BatchNorm);
  it accumulates in float64, so it agrees with the stock pair to float32 rounding.
- ``mxmask_box_nms`` (``box_nms.cc``): ``contrib.box_nms`` in corner format, the same rows
  exactly (stable score order, topk, greedy suppression with its float32 IoU), without a
  gradient. The stock CPU kernel launches one parallel loop per reference box: 14 ms of a
  ``shapes`` training step for 2 x 5 x 400 proposals, about 0.3 s for GluonCV's NMS over all
  anchors (topk 6000); here each batch is one task and each kept box suppresses the later ones
  in one vectorised pass (0.4 ms and 20 ms).

Who uses them: the training graph on CPU contexts (:class:`mxmask.modeling.training.RCNNLoss`
traces its graphs inside :func:`compiled_kernels`), all three; the inference network run
in-process on CPUs (``MaskRCNN.use_kernels``, which the predictor, ``mxmask eval`` and
``mxmask bench`` call), the RoIAlign and the NMS, so that it gives exactly the outputs of its
exported graph, which keeps the stock operators and needs nothing but MXNet.

The library is compiled once per machine with the C++ compiler ``$CXX`` (default ``g++``),
against the headers and ``src/lib_api.cc`` shipped in the mxnet wheel, into
``$MXMASK_CACHE`` (default ``~/.cache/mxmask``) under a name that hashes the sources, the mxnet
version, the compiler and its flags; the file appears atomically (temp file + rename), so
concurrent processes are safe. When no compiler is found or the build fails, a one-line warning
names the reason and training and inference use the stock operators. ``MXMASK_OPS=mxnet``
forces the stock operators.
"""
import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import mxnet as mx

__all__ = ["load_ops", "kernels_for", "resolve_kernels", "compiled_kernels",
           "compiled_kernels_active"]

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(_HERE, name) for name in ("roi_align.cc", "group_norm.cc", "box_nms.cc")]
HEADERS = [os.path.join(_HERE, "common.h")]
OP_NAMES = ("mxmask_roi_align", "mxmask_group_norm", "mxmask_box_nms")
# no FMA contraction: mxmask_roi_align's forward repeats contrib.ROIAlign's float32 arithmetic
FLAGS = ["-shared", "-fPIC", "-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]
_LOCK = threading.Lock()
_STATE = {}                      # "loaded": True/False once tried
_ACTIVE = threading.local()
_log = logging.getLogger(__name__)


def _cache_dir():
    return os.environ.get("MXMASK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "mxmask")


def _mxnet_dir():
    return os.path.dirname(os.path.abspath(mx.__file__))


def library_path(compiler):
    """Where the compiled library for these sources, mxnet and compiler lives."""
    digest = hashlib.sha1()
    for path in SOURCES + HEADERS + [os.path.join(_mxnet_dir(), "src", "lib_api.cc")]:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(mx.__version__.encode())
    digest.update(compiler.encode())
    digest.update(" ".join(FLAGS).encode())
    return os.path.join(_cache_dir(), "libmxmask_ops-%s.so" % digest.hexdigest()[:16])


def build(compiler, out):
    """Compile the sources into ``out`` (atomically), saying so on stderr (it takes about 10 s,
    once per machine); raises RuntimeError with the compiler's message on failure."""
    print("mxmask: compiling the CPU kernels (once per machine, about 10 s) into %s" % out,
          file=sys.stderr, flush=True)
    mxdir = _mxnet_dir()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=os.path.dirname(out))
    os.close(fd)
    cmd = [compiler] + FLAGS + ["-I", os.path.join(mxdir, "include")] + SOURCES + \
        [os.path.join(mxdir, "src", "lib_api.cc"), "-o", tmp]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError("%s failed (exit %d): %s" % (" ".join(cmd), proc.returncode,
                                                            proc.stdout.strip()[-2000:]))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load():
    if os.environ.get("MXMASK_OPS", "").lower() == "mxnet":
        return False
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        _log.warning("mxmask: no C++ compiler (%s) found: training and inference use MXNet's "
                     "own RoIAlign, GroupNorm and NMS kernels, which are slower on a CPU",
                     compiler)
        return False
    path = library_path(compiler)
    try:
        if not os.path.exists(path):
            build(compiler, path)
        mx.library.load(path, False)
    except Exception as e:         # noqa: BLE001 - any failure falls back to the stock ops
        _log.warning("mxmask: could not build or load %s (%s): training and inference use "
                     "MXNet's own RoIAlign, GroupNorm and NMS kernels", path,
                     str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
    return all(hasattr(mx.nd, name) and hasattr(mx.sym, name) for name in OP_NAMES)


def load_ops():
    """Build (once per machine) and load the operators (once per process)."""
    with _LOCK:
        if "loaded" not in _STATE:
            _STATE["loaded"] = _load()
        return _STATE["loaded"]


def kernels_for(ctxs):
    """``"mxmask"`` when every context is a CPU and the operators load, else ``"mxnet"``."""
    if all(c.device_type == "cpu" for c in ctxs) and load_ops():
        return "mxmask"
    return "mxnet"


def resolve_kernels(kernels, ctxs):
    """``"auto"`` -> :func:`kernels_for` ``(ctxs)``; ``"mxnet"`` / ``"mxmask"`` are checked
    (``"mxmask"`` needs the operators: RuntimeError when they could not be built)."""
    if kernels == "auto":
        return kernels_for(ctxs)
    if kernels not in ("mxnet", "mxmask"):
        raise ValueError("kernels must be 'auto', 'mxnet' or 'mxmask', got %r" % (kernels,))
    if kernels == "mxmask" and not load_ops():
        raise RuntimeError("kernels='mxmask': the operators could not be built (see the warning)")
    return kernels


KERNELS = ("roi_align", "group_norm", "box_nms")


@contextlib.contextmanager
def compiled_kernels(enabled=True, kernels=KERNELS):
    """Within the block (this thread), the RoI poolers (``"roi_align"``), GroupNorm layers
    (``"group_norm"``) and NMS calls (``"box_nms"``) called, or traced into a graph, use the
    compiled operators named in ``kernels`` when ``enabled`` (they must be loaded:
    :func:`load_ops`)."""
    previous = getattr(_ACTIVE, "on", frozenset())
    _ACTIVE.on = frozenset(kernels) if enabled else frozenset()
    try:
        yield
    finally:
        _ACTIVE.on = previous


def compiled_kernels_active(kernel):
    """Whether ``kernel`` (``"roi_align"``, ``"group_norm"`` or ``"box_nms"``) is compiled in
    this block."""
    return kernel in getattr(_ACTIVE, "on", frozenset())

"""Compiled CPU operators, built on first use with MXNet's extension API.

    load_ops() -> True when mxmask_roi_align, mxmask_group_norm, mxmask_box_nms and
                  mxmask_level_canvas exist in mx.nd / mx.sym
    kernels_for(ctxs) -> "mxmask" (CPU contexts and the ops load) or "mxnet"
    resolve_kernels(kernels, ctxs) -> "auto" | "mxnet" | "mxmask" checked, "auto" resolved
    with compiled_kernels(True): ...   # blocks traced inside use the ops (training graph)
    with compiled_kernels(True, ["roi_align", "box_nms", "level_canvas"]): ...   # inference
    compiled_kernels_active("roi_align" | "group_norm" | "box_nms" | "level_canvas") -> bool

Four operators. Three are the same computation as the stock CPU operator they replace, which is
slow (DEVELOPING.md, "Measured facts about MXNet 1.9.1 on CPU"; figures in docs/kernels.md); the
fourth builds the RoI poolers' level canvas channels-last, which the compiled RoIAlign reads
without a copy of its own. Each source file's header says what it computes and how it differs:

- ``mxmask_roi_align`` (``roi_align.cc``): ``contrib.ROIAlign``, its forward bit for bit.
- ``mxmask_group_norm`` (``group_norm.cc``): the GroupNorm of :mod:`mxmask.modeling.norm` and
  its per-channel affine in one operator; it accumulates in float64, so it agrees with the
  stock LayerNorm + BatchNorm pair to float32 rounding.
- ``mxmask_box_nms`` (``box_nms.cc``): ``contrib.box_nms`` in corner format, the same rows.
- ``mxmask_level_canvas`` (``level_canvas.cc``): :func:`mxmask.modeling.poolers.level_canvas`
  channels-last, the same values (and gradients); inference graphs use it, training graphs
  keep the stock canvas (:data:`TRAINING_KERNELS`).
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
SOURCES = [os.path.join(_HERE, name) for name in ("roi_align.cc", "group_norm.cc", "box_nms.cc",
                                                  "level_canvas.cc")]
HEADERS = [os.path.join(_HERE, "common.h")]
OP_NAMES = ("mxmask_roi_align", "mxmask_group_norm", "mxmask_box_nms", "mxmask_level_canvas")
# no FMA contraction: mxmask_roi_align's forward repeats contrib.ROIAlign's float32 arithmetic
FLAGS = ["-shared", "-fPIC", "-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]
_LOCK = threading.Lock()
_STATE = {}                      # "loaded": True/False once tried
_ACTIVE = threading.local()
_log = logging.getLogger(__name__)


def _cache_dir():
    """``$MXMASK_CACHE``, default ``~/.cache/mxmask``."""
    return os.environ.get("MXMASK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "mxmask")


def _mxnet_dir():
    """The installed mxnet package (its ``include`` and ``src/lib_api.cc`` are built against)."""
    return os.path.dirname(os.path.abspath(mx.__file__))


def library_path(compiler):
    """Where the compiled library for these sources, mxnet and compiler lives.

    The name hashes the sources, ``lib_api.cc``, the mxnet version, the compiler and its flags,
    so a change to any of them builds a new library.

    Args:
        compiler (str): the C++ compiler (``$CXX``, default ``g++``).

    Returns:
        str: ``<cache>/libmxmask_ops-<hash>.so`` under ``$MXMASK_CACHE`` (default
        ``~/.cache/mxmask``).
    """
    digest = hashlib.sha1()
    for path in SOURCES + HEADERS + [os.path.join(_mxnet_dir(), "src", "lib_api.cc")]:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(mx.__version__.encode())
    digest.update(compiler.encode())
    digest.update(" ".join(FLAGS).encode())
    return os.path.join(_cache_dir(), "libmxmask_ops-%s.so" % digest.hexdigest()[:16])


def build(compiler, out):
    """Compile the sources into ``out``, saying so on stderr (once per machine).

    The library is built against the headers and ``src/lib_api.cc`` shipped in the mxnet
    wheel, into a temp file that is then renamed, so concurrent processes are safe.

    Args:
        compiler (str): the C++ compiler.
        out (str): the library path (:func:`library_path`).

    Raises:
        RuntimeError: with the compiler's message when the build fails.
    """
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
    """Build when needed and load the library; False (with a one-line warning naming the
    reason) without a compiler, after a failed build or with ``MXMASK_OPS=mxnet``."""
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
    """Build (once per machine) and load the operators (once per process).

    Returns:
        bool: whether ``mxmask_roi_align``, ``mxmask_group_norm`` and ``mxmask_box_nms`` exist
        in ``mx.nd`` and ``mx.sym``. False means training and inference use the stock
        operators.
    """
    with _LOCK:
        if "loaded" not in _STATE:
            _STATE["loaded"] = _load()
        return _STATE["loaded"]


def kernels_for(ctxs):
    """Which kernels suit these contexts.

    Args:
        ctxs (list[mx.Context]): the contexts.

    Returns:
        str: ``"mxmask"`` when every context is a CPU and the operators load, else
        ``"mxnet"``.
    """
    if all(c.device_type == "cpu" for c in ctxs) and load_ops():
        return "mxmask"
    return "mxnet"


def resolve_kernels(kernels, ctxs):
    """Resolve a kernels setting.

    Args:
        kernels (str): ``"auto"``, ``"mxnet"`` or ``"mxmask"`` (ValueError otherwise).
        ctxs (list[mx.Context]): the contexts, for ``"auto"``.

    Returns:
        str: ``"mxnet"`` or ``"mxmask"``; ``"auto"`` becomes :func:`kernels_for` ``(ctxs)``.

    Raises:
        RuntimeError: for ``"mxmask"`` when the operators could not be built.
    """
    if kernels == "auto":
        return kernels_for(ctxs)
    if kernels not in ("mxnet", "mxmask"):
        raise ValueError("kernels must be 'auto', 'mxnet' or 'mxmask', got %r" % (kernels,))
    if kernels == "mxmask" and not load_ops():
        raise RuntimeError("kernels='mxmask': the operators could not be built (see the warning)")
    return kernels


KERNELS = ("roi_align", "group_norm", "box_nms", "level_canvas")
# the kernels with a backward, which a training graph may use
TRAINING_KERNELS = ("roi_align", "group_norm", "box_nms")


@contextlib.contextmanager
def compiled_kernels(enabled=True, kernels=TRAINING_KERNELS):
    """Within the block (this thread), the RoI poolers (``"roi_align"``; their level canvas,
    ``"level_canvas"``), GroupNorm layers (``"group_norm"``) and NMS calls (``"box_nms"``)
    called, or traced into a graph, use the compiled operators named in ``kernels`` when
    ``enabled`` (they must be loaded: :func:`load_ops`).

    Who uses them: the training graph on CPU contexts
    (:class:`mxmask.modeling.training.RCNNLoss` traces its graphs inside this block), the
    :data:`TRAINING_KERNELS`, which have a backward; the inference network run in-process on
    CPUs (``MaskRCNN.use_kernels``, which the predictor, ``mxmask eval`` and ``mxmask bench``
    call), the RoIAlign, its canvas and the NMS, so that it gives exactly the outputs of its
    exported graph, which keeps the stock operators and needs nothing but MXNet.

    Args:
        enabled (bool): False turns every compiled kernel off inside the block.
        kernels: names among :data:`KERNELS`.
    """
    previous = getattr(_ACTIVE, "on", frozenset())
    _ACTIVE.on = frozenset(kernels) if enabled else frozenset()
    try:
        yield
    finally:
        _ACTIVE.on = previous


def compiled_kernels_active(kernel):
    """Whether a compiled kernel is on in the current :func:`compiled_kernels` block.

    Args:
        kernel (str): one of :data:`KERNELS`.

    Returns:
        bool: True inside ``compiled_kernels(True, kernels)`` with ``kernel`` in ``kernels``
        (this thread only).
    """
    return kernel in getattr(_ACTIVE, "on", frozenset())

"""Compiled CPU operators for the training graph, built on first use with MXNet's extension API.

    load_roi_align() -> True when ``mx.nd.mxmask_roi_align`` / ``mx.sym.mxmask_roi_align`` exist

``roi_align.cc`` holds ``mxmask_roi_align``: ``contrib.ROIAlign``'s forward and backward for CPU
(same sampling; see the file's header), with a parallel backward. MXNet 1.9.1's own CPU
backward is one serial loop that recomputes the sample positions for every output element: on
a ResNet-50 FPN training step at 512x512 its two calls took 2.8 s of 7.8 s. Only the training
graph uses this op (:class:`mxmask.modeling.training.RCNNLoss`, on CPU contexts); inference and
exported graphs keep ``contrib.ROIAlign``, so they need nothing but MXNet.

The library is compiled once per machine with the C++ compiler ``$CXX`` (default ``g++``),
against the headers and ``src/lib_api.cc`` shipped in the mxnet wheel, into
``$MXMASK_CACHE`` (default ``~/.cache/mxmask``) under a name that hashes the source, the mxnet
version and the compiler; the file appears atomically (temp file + rename), so concurrent
processes are safe. When no compiler is found or the build fails, a one-line warning names the
reason and training uses ``contrib.ROIAlign``. ``MXMASK_ROI_ALIGN=mxnet`` forces the stock op.
"""
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading

import mxnet as mx

__all__ = ["load_roi_align", "roi_align_backend"]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "roi_align.cc")
_LOCK = threading.Lock()
_STATE = {}                      # "roi_align": True/False once tried
_log = logging.getLogger(__name__)


def _cache_dir():
    return os.environ.get("MXMASK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "mxmask")


def _mxnet_dir():
    return os.path.dirname(os.path.abspath(mx.__file__))


def library_path(compiler):
    """Where the compiled library for this source, mxnet and compiler lives."""
    digest = hashlib.sha1()
    for path in (_SOURCE, os.path.join(_mxnet_dir(), "src", "lib_api.cc")):
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(mx.__version__.encode())
    digest.update(compiler.encode())
    return os.path.join(_cache_dir(), "libmxmask_ops-%s.so" % digest.hexdigest()[:16])


def build(compiler, out):
    """Compile ``roi_align.cc`` into ``out`` (atomically); raises RuntimeError with the
    compiler's message on failure."""
    mxdir = _mxnet_dir()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=os.path.dirname(out))
    os.close(fd)
    cmd = [compiler, "-shared", "-fPIC", "-O3", "-std=c++17", "-fopenmp",
           "-I", os.path.join(mxdir, "include"), _SOURCE,
           os.path.join(mxdir, "src", "lib_api.cc"), "-o", tmp]
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
    if os.environ.get("MXMASK_ROI_ALIGN", "").lower() == "mxnet":
        return False
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        _log.warning("mxmask: no C++ compiler (%s) found: training uses contrib.ROIAlign, "
                     "whose CPU backward is serial (slower training steps)", compiler)
        return False
    path = library_path(compiler)
    try:
        if not os.path.exists(path):
            build(compiler, path)
        mx.library.load(path, False)
    except Exception as e:         # noqa: BLE001 - any failure falls back to the stock op
        _log.warning("mxmask: could not build or load %s (%s): training uses contrib.ROIAlign",
                     path, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
    return hasattr(mx.nd, "mxmask_roi_align")


def load_roi_align():
    """Build (once per machine) and load ``mxmask_roi_align`` (once per process)."""
    with _LOCK:
        if "roi_align" not in _STATE:
            _STATE["roi_align"] = _load()
        return _STATE["roi_align"]


def roi_align_backend(ctxs):
    """``"mxmask"`` when every context is a CPU and the op loads, else ``"mxnet"``."""
    if all(c.device_type == "cpu" for c in ctxs) and load_roi_align():
        return "mxmask"
    return "mxnet"

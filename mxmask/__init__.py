"""mxmask: Mask R-CNN and Keypoint R-CNN with FPN for MXNet/Gluon.

Importing mxmask (before mxnet) sets ``OMP_NUM_THREADS`` to the usable cores unless it is set
(:func:`_default_omp_threads`) and, on a CPU with AMX, lets oneDNN use it (:func:`_enable_amx`);
see DEVELOPING.md, "Threads". It also exports the config entry points of :mod:`mxmask.config`.
"""
__version__ = "0.1.0"

import os as _os
import sys as _sys


def _default_omp_threads():
    """Give MXNet's OpenMP pool every core this process may use.

    Left alone, MXNet 1.9.1 reserves one core per CPU engine worker and runs its kernels
    (the MKLDNN convolutions included) on the cores left over: on a 2-core machine that is ONE
    thread. The setting is read once, when libmxnet loads, so it must happen before the first
    ``import mxnet``; an ``OMP_NUM_THREADS`` the user set is always kept. Scripts that import
    mxnet before mxmask should export OMP_NUM_THREADS themselves (DEVELOPING.md, "Threads";
    the measured effect is in docs/kernels.md, "Threads").
    """
    if "OMP_NUM_THREADS" in _os.environ or "mxnet" in _sys.modules:
        return
    _os.environ["OMP_NUM_THREADS"] = str(usable_cores())


def usable_cores():
    """The number of cores this process may run on.

    Returns:
        int >= 1: the size of the CPU affinity set where the OS reports it (Linux), else
        ``os.cpu_count()``.
    """
    try:
        return max(1, len(_os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, _os.cpu_count() or 1)


def _amx_available():
    """True on a Linux x86-64 CPU whose flags list the AMX bf16 tiles."""
    if not _sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "amx_bf16" in flags and "amx_tile" in flags
    except OSError:
        pass
    return False


def _request_amx_permission():
    """Ask Linux (5.16+) for this process's permission to use the AMX tile registers
    (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``). Without it the first AMX
    instruction kills the process with SIGILL. The permission is inherited by forked children
    (DataLoader workers) and cleared by ``exec``. Returns True when granted."""
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl on x86-64
    except (OSError, AttributeError):
        return False


_ISA_VARS = ("DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "MKLDNN_MAX_CPU_ISA")


class _AfterMxnetImport(object):
    """A one-shot import hook: runs ``callback(mxnet)`` right after ``import mxnet`` completes,
    whoever imports it first. It keeps ``import mxmask`` (and ``mxmask --help``) free of the
    slow mxnet import."""

    def __init__(self, callback):
        self.callback = callback

    def find_spec(self, name, path=None, target=None):
        if name != "mxnet":
            return None
        _sys.meta_path.remove(self)
        import importlib.util
        spec = importlib.util.find_spec("mxnet")
        if spec is None or spec.loader is None:
            return spec
        loader, callback = spec.loader, self.callback

        class _Loader(object):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                callback(module)

        spec.loader = _Loader()
        return spec


_AMX = {"on": False}


def amx_enabled():
    """Whether this process let oneDNN use the AMX tiles (:func:`_enable_amx`).

    With AMX, bfloat16 convolutions run faster than float32 ones, so ``solver.amp=auto``
    trains with them (figures: docs/kernels.md, "AMX and bfloat16").

    Returns:
        bool.
    """
    return _AMX["on"]


def _enable_amx():
    """Let MXNet's oneDNN run bfloat16 convolutions on the AMX tiles where the CPU has them.

    oneDNN 2.4.4, which MXNet 1.9.1 bundles, leaves AMX off unless ``DNNL_MAX_CPU_ISA`` allows
    it, and it does not ask Linux for the tile permission (DEVELOPING.md, "Measured facts about
    MXNet 1.9.1 on CPU"; the speed is in docs/kernels.md, "AMX and bfloat16"). fp32 kernels are
    unaffected: AMX only multiplies bf16 and int8.

    oneDNN reads the variable once, at its first primitive. So the variable is set, the first
    primitive is made as soon as mxnet is imported, and the variable is removed again: a
    program started from this process (``exec``) does not inherit the tile permission and must
    not inherit the setting either, or its first AMX kernel would die with SIGILL.
    ``MXMASK_AMX=0`` or the user's own ``DNNL_MAX_CPU_ISA`` turns all this off.
    """
    if _os.environ.get("MXMASK_AMX", "1") == "0" or any(v in _os.environ for v in _ISA_VARS):
        return
    if not _amx_available() or not _request_amx_permission():
        return
    _os.environ["DNNL_MAX_CPU_ISA"] = "AVX512_CORE_AMX"
    _AMX["on"] = True

    def first_primitive(mx):
        try:
            one = mx.nd.ones((1, 1, 1, 1))
            mx.nd.Convolution(one, one, kernel=(1, 1), num_filter=1, no_bias=True).wait_to_read()
        except Exception:  # noqa: BLE001  (an mxnet without oneDNN: nothing to switch on)
            pass
        finally:
            _os.environ.pop("DNNL_MAX_CPU_ISA", None)

    if "mxnet" in _sys.modules:
        first_primitive(_sys.modules["mxnet"])
    else:
        _sys.meta_path.insert(0, _AfterMxnetImport(first_primitive))


_default_omp_threads()
_enable_amx()

from .config import get_config, load_yaml, dump_yaml, ConfigError  # noqa: E402,F401

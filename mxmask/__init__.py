"""mxmask: Mask R-CNN and Keypoint R-CNN with FPN for MXNet/Gluon."""
__version__ = "0.1.0"

import os as _os
import sys as _sys


def _default_omp_threads():
    """Give MXNet's OpenMP pool every core this process may use.

    Left alone, MXNet 1.9.1 reserves one core per CPU engine worker and runs its kernels
    (the MKLDNN convolutions included) on the cores left over: on a 2-core machine that is ONE
    thread, and a ResNet-50 forward at 800x1344 takes 1.8 s instead of 0.95 s. The setting is
    read once, when libmxnet loads, so it must happen before the first ``import mxnet``; an
    ``OMP_NUM_THREADS`` the user set is always kept. Scripts that import mxnet before mxmask
    should export OMP_NUM_THREADS themselves (README, "Speed").
    """
    if "OMP_NUM_THREADS" in _os.environ or "mxnet" in _sys.modules:
        return
    _os.environ["OMP_NUM_THREADS"] = str(usable_cores())


def usable_cores():
    """The number of cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return max(1, len(_os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, _os.cpu_count() or 1)


_default_omp_threads()

from .config import get_config, load_yaml, dump_yaml, ConfigError  # noqa: E402,F401

"""mxmask lets oneDNN use the AMX tiles for bfloat16 (mxmask/__init__.py, ``_enable_amx``).

Each case runs in a fresh interpreter, because oneDNN fixes its instruction set at its first
primitive. A bf16 3x3 convolution of ones (32 channels) gives 9 * 32 = 288 at an inner pixel;
``DNNL_VERBOSE=1`` names the kernel that ran.
"""
import os
import subprocess
import sys

import pytest

import mxmask

AMX_KERNEL = "avx512_core_amx_bf16"

BF16_CONV = """
import mxnet as mx
from mxnet.contrib.amp.amp import bfloat16
x = mx.nd.amp_cast(mx.nd.ones((1, 32, 16, 16)), dtype=bfloat16)
w = mx.nd.amp_cast(mx.nd.ones((32, 32, 3, 3)), dtype=bfloat16)
y = mx.nd.Convolution(x, w, kernel=(3, 3), pad=(1, 1), num_filter=32, no_bias=True)
print("value", mx.nd.amp_cast(y, dtype="float32")[0, 0, 5, 5].asscalar(), flush=True)
"""

needs_amx = pytest.mark.skipif(not mxmask._amx_available(),
                               reason="this CPU has no AMX bf16 tiles")


def run(code, **env):
    full = dict(os.environ, DNNL_VERBOSE="1", **env)
    for var in mxmask._ISA_VARS + ("MXMASK_AMX",):
        if var not in env:
            full.pop(var, None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full, timeout=120)


def test_the_isa_setting_is_gone_once_mxnet_is_imported():
    r = run("import mxmask, mxnet, os; print('isa', os.environ.get('DNNL_MAX_CPU_ISA'))")
    assert r.returncode == 0, r.stderr
    assert "isa None" in r.stdout


@needs_amx
@pytest.mark.parametrize("order", ["import mxmask, mxnet", "import mxnet, mxmask"])
def test_bf16_convolutions_run_on_amx(order):
    r = run(order + "\n" + BF16_CONV)
    assert r.returncode == 0, r.stderr
    assert "value 288.0" in r.stdout
    assert AMX_KERNEL in r.stdout


@needs_amx
def test_mxmask_amx_0_keeps_oneDNN_default():
    r = run("import mxmask\n" + BF16_CONV, MXMASK_AMX="0")
    assert r.returncode == 0, r.stderr
    assert "value 288.0" in r.stdout and AMX_KERNEL not in r.stdout


@needs_amx
def test_programs_started_from_mxmask_do_not_inherit_amx():
    """A child ``exec``'d from an mxmask process lacks the tile permission: had it inherited
    the ISA setting, its first AMX kernel would die with SIGILL (measured: exit code 132)."""
    parent = ("import mxmask, subprocess, sys\n" + BF16_CONV +
              "r = subprocess.run([sys.executable, '-c', %r])\n" % BF16_CONV +
              "print('child exit', r.returncode)\n")
    r = run(parent)
    assert r.returncode == 0, r.stderr
    assert "child exit 0" in r.stdout
    assert r.stdout.count("value 288.0") == 2

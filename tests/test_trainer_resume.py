"""Exact resume: a run killed with SIGKILL and continued with ``mxmask train --resume`` ends
with the weights of an uninterrupted run, bit for bit (CPU, fixed seeds). The killed run also
loads its data with 2 worker processes and the straight run in process, so the same check
covers the loader's determinism.

Measured: no MXNET_ENFORCE_DETERMINISM or OMP_NUM_THREADS setting is needed on CPU; the
subprocesses run with the environment of the test.
"""
import json
import os
import signal
import subprocess
import sys
import time

import mxnet as mx
import numpy as np
import pytest

from helpers.tiny import tiny_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_ITER, PERIOD = 6, 3


def train_cmd(ds, out, *extra):
    return [sys.executable, "-m", "mxmask", "train"] + tiny_args(
        ds, out, "solver.max_iter=%d" % MAX_ITER, "solver.checkpoint_period=%d" % PERIOD, *extra)


def run(cmd, timeout=240):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def progress_iter(out):
    try:
        with open(os.path.join(out, "progress.json")) as f:
            return json.load(f)["iter"]
    except (OSError, ValueError, KeyError):
        return None


def kill_after_first_checkpoint(cmd, out, timeout=240):
    """Start ``cmd``, SIGKILL it as soon as progress.json shows a checkpoint; return its iter."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            it = progress_iter(out)
            if it is not None and it >= PERIOD:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                return it
            if proc.poll() is not None:
                raise AssertionError("the run ended before it could be killed:\n" +
                                     proc.stdout.read().decode()[-3000:])
            time.sleep(0.01)
        raise AssertionError("no checkpoint after %d s" % timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def load(path):
    return {k: v.asnumpy() for k, v in mx.nd.load(path).items()}


@pytest.mark.parametrize("solver", [["solver.optimizer=sgd"],
                                    ["solver.optimizer=adam", "solver.base_lr=0.001"]])
def test_kill_9_then_resume_gives_the_straight_run(shapes_dataset, tmp_path, solver):
    """SGD's momentum, and Adam's moments and step count (its bias correction), come back."""
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    run(train_cmd(shapes_dataset, straight, "data.num_workers=0", *solver))

    it = kill_after_first_checkpoint(
        train_cmd(shapes_dataset, killed, "data.num_workers=2", *solver), killed)
    assert PERIOD <= it < MAX_ITER
    assert progress_iter(killed) == it
    assert not os.path.exists(os.path.join(killed, "metrics.json"))

    log = run([sys.executable, "-m", "mxmask", "train", "--resume", "--out", killed])
    assert "resuming %s at iteration %d" % (killed, it) in log
    assert "iter %d/%d" % (it + 1, MAX_ITER) in log and "iter %d/%d" % (it, MAX_ITER) not in log
    assert progress_iter(killed) == MAX_ITER

    a = load(os.path.join(straight, "model.params"))
    b = load(os.path.join(killed, "model.params"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the training history of the resumed run is the straight run's
    ha = json.load(open(os.path.join(straight, "history.json")))
    hb = json.load(open(os.path.join(killed, "history.json")))
    assert ha["iter"] == hb["iter"] == list(range(1, MAX_ITER + 1))
    assert ha["lr"] == hb["lr"]
    for name in ha["losses"]:
        np.testing.assert_allclose(ha["losses"][name], hb["losses"][name], rtol=1e-6)
    # the resumed run kept the saved config (no --set on the command line)
    assert "num_workers: 2" in open(os.path.join(killed, "config.yaml")).read()

